"""Compaction of the head-block cache, dispatched to the fastest implementation available.

``compact`` has the semantics of :func:`vllm_kvcompress.paged.reference.compact`. Choices:

* ``cuda``:   the CUDA C++ kernel ``vllm_kvcompress._C.compact`` (built with KVC_BUILD_CUDA=1;
              importing it needs torch imported first, which this module does);
* ``triton``: :mod:`vllm_kvcompress.triton_kernels.compaction`;
* ``torch``:  the plain-PyTorch reference (CPU tensors, or as a last resort).

The environment variable ``KVC_COMPACTION=cuda|triton|torch`` forces one (for benchmarks and
tests: the CUDA extension is a benchmark alternative); otherwise the package's one rule decides
(:func:`vllm_kvcompress.triton_kernels.runs_on`): Triton for CUDA tensors, torch elsewhere.
"""
from __future__ import annotations

import logging
import os

import torch

from vllm_kvcompress.triton_kernels import runs_on
from vllm_kvcompress.paged import reference

logger = logging.getLogger(__name__)

# Measured on an H100 (benchmarks/bench_cache_ops.py; numbers in benchmarks/results/cache-ops-notes.md):
# the Triton kernel matches the CUDA one with many heads (both ~0.9 of copy bandwidth) and beats it
# with fewer heads than SMs, so CUDA tensors use Triton unless KVC_COMPACTION=cuda.
GPU_DEFAULT = "triton"
CHOICES = ("cuda", "triton", "torch")

_logged: set[tuple[str, str]] = set()


def cuda_extension():
    """The compiled module ``vllm_kvcompress._C``, or None when it was not built."""
    try:
        from vllm_kvcompress import _C
    except ImportError:
        return None
    return _C


def choose(device: torch.device) -> tuple[str, str]:
    """(implementation, reason) for tensors on ``device``."""
    forced = os.environ.get("KVC_COMPACTION", "").strip().lower()
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"KVC_COMPACTION={forced!r}: expected one of {CHOICES}")
        if forced == "cuda" and (device.type != "cuda" or cuda_extension() is None):
            raise RuntimeError("KVC_COMPACTION=cuda needs CUDA tensors and the built vllm_kvcompress._C "
                               "(pip install with KVC_BUILD_CUDA=1)")
        return forced, "forced by KVC_COMPACTION"
    if not runs_on(device):
        return "torch", f"tensors on {device.type}"
    if GPU_DEFAULT == "cuda":
        if cuda_extension() is not None:
            return "cuda", "CUDA extension built and measured fastest"
        return "triton", "CUDA extension vllm_kvcompress._C not built"
    return GPU_DEFAULT, "measured at least as fast as the CUDA extension"


def compact(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
    old_len: torch.Tensor,
) -> list[torch.Tensor]:
    """Move each head's kept rows to the front of its own pages, in place.

    key_cache, value_cache: [num_head_blocks, block_size, head_dim]
    head_block_table: int32 [num_heads, max_blocks] (one row per (request, layer, head))
    keep_idx:  int [num_heads, max_keep], strictly increasing row indices, padded past keep_len
    keep_len:  int [num_heads];  old_len: int [num_heads] (rows held before compaction)
    returns    per head, the int64 block ids that no longer hold a retained row (to free)
    """
    impl, why = choose(key_cache.device)
    if (impl, why) not in _logged:
        _logged.add((impl, why))
        logger.info("KV compaction uses the %s implementation (%s)", impl, why)
    if impl == "torch":
        return reference.compact(key_cache, value_cache, head_block_table, keep_idx, keep_len, old_len)
    from vllm_kvcompress.triton_kernels import compaction as triton_compaction

    if impl == "triton":
        return triton_compaction.compact(key_cache, value_cache, head_block_table, keep_idx, keep_len, old_len)
    table = head_block_table if head_block_table.stride(-1) == 1 else head_block_table.contiguous()
    keep = keep_idx if keep_idx.stride(-1) == 1 else keep_idx.contiguous()
    cuda_extension().compact(key_cache, value_cache, table.to(torch.int32), keep,
                             keep_len.to(torch.int32).contiguous())
    return triton_compaction.freed_blocks(head_block_table, keep_len, old_len, key_cache.shape[1])


def compact_rows(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
) -> None:
    """:func:`compact` without the freed block ids (the caller knows them): nothing waits for the
    device. CUDA: the Triton kernel (in place, no copy of the rows); CPU: the PyTorch reference."""
    if not runs_on(key_cache):
        reference.compact_rows(key_cache, value_cache, head_block_table, keep_idx, keep_len)
        return
    from vllm_kvcompress.triton_kernels import compaction as triton_compaction

    triton_compaction.compact_rows(key_cache, value_cache, head_block_table, keep_idx, keep_len)
