"""EMS's merge of rows into their classes, dispatched by the package's one rule
(:func:`vllm_kvcompress.triton_kernels.runs_on`): the Triton kernel for CUDA tensors (K and V in one
launch, no atomics), the PyTorch reference elsewhere. Same semantics either way:
:func:`vllm_kvcompress.paged.reference.merge_by_class`."""
from __future__ import annotations

import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels import runs_on


def merge_kv_by_class(keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor,
                      num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of each class's key rows and value rows.

    keys, values: [num_heads, seq_len, head_dim]; weight: [num_heads, seq_len], >= 0; classes: int
    [num_heads, seq_len] in [0, num_classes] (0: dropped). Returns float32 [num_heads, num_classes,
    head_dim] each, row c-1 holding class c."""
    if runs_on(keys):
        from vllm_kvcompress.triton_kernels.merge import merge_kv_by_class as kernel

        return kernel(keys.contiguous() if keys.stride(-1) != 1 else keys,
                      values.contiguous() if values.stride(-1) != 1 else values, weight, classes, num_classes)
    return (reference.merge_by_class(keys, weight, classes, num_classes),
            reference.merge_by_class(values, weight, classes, num_classes))
