"""EMS's merge of rows into their classes -- each row's nearest centre, then the classes' means --
dispatched by the package's one rule (:func:`vllm_kvcompress.triton_kernels.runs_on`): Triton
kernels for CUDA tensors (K and V in one launch each, no atomics), the PyTorch references elsewhere.
Same semantics either way: :func:`vllm_kvcompress.policies.reduction.nearest_centres` and
:func:`vllm_kvcompress.paged.reference.merge_by_class`."""
from __future__ import annotations

import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels import runs_on


def merge_kv_by_class(keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor,
                      num_classes: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of each class's key rows and value rows.

    keys, values: [num_heads, seq_len, head_dim]; weight: [num_heads, seq_len], >= 0; classes: int
    [num_heads, seq_len] in [0, num_classes] (0: dropped). Returns [num_heads, num_classes,
    head_dim] each, row c-1 holding class c (zeros for an empty class), the float32 means rounded
    to ``dtype`` (the kernel stores them so: no float32 copy of the rows reaches memory)."""
    if runs_on(keys):
        from vllm_kvcompress.triton_kernels.merge import merge_kv_by_class as kernel

        return kernel(*_unit_last_stride(keys, values), weight, classes, num_classes, out_dtype=dtype)
    return (reference.merge_by_class(keys, weight, classes, num_classes).to(dtype),
            reference.merge_by_class(values, weight, classes, num_classes).to(dtype))


def nearest_centres(keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, target: torch.Tensor,
                    order: torch.Tensor, candidate: torch.Tensor, block_rows: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each compared row's most redundant merge target and that redundancy:
    :func:`vllm_kvcompress.policies.reduction.nearest_centres` (``block_rows`` bounds the
    reference's temporaries; the kernel has none)."""
    if runs_on(keys):
        from vllm_kvcompress.triton_kernels.redundancy import nearest_centres as kernel

        return kernel(*_unit_last_stride(keys, values), keep_idx, target, order, candidate)
    from vllm_kvcompress.policies.reduction import nearest_centres as reference_nearest

    return reference_nearest(keys, values, keep_idx, target, order, candidate, block_rows)


def _unit_last_stride(*rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` as the kernels read them: each with a unit last stride (copied only if it has none)."""
    return [x if x.stride(-1) == 1 else x.contiguous() for x in rows]
