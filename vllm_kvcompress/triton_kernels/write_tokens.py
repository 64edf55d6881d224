"""Scatter fresh K/V rows into head-blocks, in Triton.

Semantics: exactly :func:`vllm_kvcompress.paged.reference.write_tokens`; layout:
:mod:`vllm_kvcompress.paged.layout`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.triton_kernels.fp8 import check_scales, quantize_fp8, scale_stride


@triton.jit(do_not_specialize=["num_rows", "stride_st", "stride_sh"])
def _write_tokens_kernel(
    key_ptr, value_ptr, slot_ptr, key_cache_ptr, value_cache_ptr, k_scale_ptr, v_scale_ptr,
    num_rows, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_st, stride_sh,
    stride_kc, stride_vc,
    stride_ks, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, FP8: tl.constexpr,
):
    """Grid (cdiv(num_tokens * num_kv_heads, BLOCK_R),): BLOCK_R (token, head) rows each.

    key, value: [T, H, D]; slot: [T, H] (-1 = skip); key_cache, value_cache viewed as [slots, D]
    with row stride stride_kc / stride_vc; FP8: the caches are fp8, head h's scales at
    k_scale[h * stride_ks], v_scale[h * stride_vs] (stride 0: one scale for all heads).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = r < num_rows
    t = r // num_kv_heads
    h = r % num_kv_heads
    slot = tl.load(slot_ptr + t * stride_st + h * stride_sh, mask=in_range, other=-1).to(tl.int64)
    keep = (slot >= 0)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(key_ptr + (t * stride_kt + h * stride_kh)[:, None] + d, mask=keep)
    v = tl.load(value_ptr + (t * stride_vt + h * stride_vh)[:, None] + d, mask=keep)
    if FP8:
        k = quantize_fp8(k, tl.load(k_scale_ptr + h * stride_ks)[:, None])
        v = quantize_fp8(v, tl.load(v_scale_ptr + h * stride_vs)[:, None])
    tl.store(key_cache_ptr + slot[:, None] * stride_kc + d, k.to(key_cache_ptr.dtype.element_ty), mask=keep)
    tl.store(value_cache_ptr + slot[:, None] * stride_vc + d, v.to(value_cache_ptr.dtype.element_ty), mask=keep)


def write_tokens(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter fresh K/V rows into head-blocks, one slot per (token, head).

    key, value:   [num_tokens, num_kv_heads, head_dim] (last dim contiguous; other strides free, so
                  slices of a fused QKV tensor need no copy)
    slot_mapping: int [num_tokens, num_kv_heads]; -1 skips the row (an evicted token)
    key_cache, value_cache: [num_head_blocks, block_size, head_dim] (rows of a block contiguous),
                  written in place; a row is cast to the cache's dtype, or with k_scale / v_scale
                  (float8_e4m3fn caches; float32 [1], or [num_kv_heads] for heads of several
                  layers) quantized as reference.write_tokens does.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    for name, x in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.stride(0) != c.shape[1] * c.stride(1):
            raise ValueError(f"{name}: the rows of all blocks must be evenly strided (slot = block * block_size + row)")
    fp8 = check_scales((key_cache, value_cache), (k_scale, v_scale), num_kv_heads)
    num_rows = num_tokens * num_kv_heads
    if num_rows == 0:
        return
    # ~16 KB of each of K and V per program: enough bytes in flight to stream at full bandwidth.
    block_r = max(1, min(triton.next_power_of_2(num_rows), 8192 // head_dim))
    _write_tokens_kernel[(triton.cdiv(num_rows, block_r),)](
        key, value, slot_mapping, key_cache, value_cache, k_scale, v_scale,
        num_rows, num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        slot_mapping.stride(0), slot_mapping.stride(1),
        key_cache.stride(1), value_cache.stride(1),
        scale_stride(k_scale), scale_stride(v_scale),
        HEAD_DIM=head_dim, BLOCK_R=block_r, FP8=fp8,
        num_warps=4,
    )
