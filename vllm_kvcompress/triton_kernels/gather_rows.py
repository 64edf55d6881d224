"""Heads' rows gathered from their pages into a dense, right-aligned copy, in Triton.

Semantics: :func:`vllm_kvcompress.paged.reference.gather_heads_padded` for K and V at once --
head i's ``lengths[i]`` rows last in its ``width`` columns, zeros before them, fp8 rows dequantized
with each head's scale. The PyTorch version is a row ``index_select`` of each cache and a
``masked_fill_`` of the padding: four passes over the copy, where this kernel writes it once
(a 256-request EMS tick of Llama-3-8B gathers ~9 GB of K and V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.triton_kernels.fp8 import check_scales, dequantize_fp8, scale_stride


# index tensors may be views into a step's packed upload, at any offset: their alignment picks no binary
@triton.jit(do_not_specialize=["width", "stride_th", "stride_oh", "stride_ks", "stride_vs"],
            do_not_specialize_on_alignment=["table_ptr", "lengths_ptr"])
def _gather_padded_kernel(
    key_cache_ptr, value_cache_ptr, table_ptr, lengths_ptr, k_scale_ptr, v_scale_ptr, key_out_ptr, value_out_ptr,
    width, stride_th, stride_kc, stride_vc, stride_ks, stride_vs, stride_oh,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, FP8: tl.constexpr,
):
    """Grid (num_heads, cdiv(width, BLOCK_R)). Caches viewed as [slots, D] (row strides stride_kc,
    stride_vc; slot = block * PAGE + row); outputs [num_heads, width, D] with head stride stride_oh
    and row stride HEAD_DIM; FP8: head h's scales at k_scale[h * stride_ks], v_scale[h * stride_vs]."""
    h = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = r < width
    position = r - (width - tl.load(lengths_ptr + h))  # the head's own row; < 0 in the padding
    valid = in_range & (position >= 0)
    position = tl.maximum(position, 0)
    block = tl.load(table_ptr + h * stride_th + position // PAGE, mask=valid, other=0).to(tl.int64)
    slot = block * PAGE + position % PAGE
    d = tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(key_cache_ptr + slot[:, None] * stride_kc + d, mask=valid[:, None], other=0.0)
    v = tl.load(value_cache_ptr + slot[:, None] * stride_vc + d, mask=valid[:, None], other=0.0)
    if FP8:
        k = dequantize_fp8(k, tl.load(k_scale_ptr + h * stride_ks))
        v = dequantize_fp8(v, tl.load(v_scale_ptr + h * stride_vs))
    out = h * stride_oh + r[:, None] * HEAD_DIM + d
    tl.store(key_out_ptr + out, k.to(key_out_ptr.dtype.element_ty), mask=in_range[:, None])
    tl.store(value_out_ptr + out, v.to(value_out_ptr.dtype.element_ty), mask=in_range[:, None])


def gather_heads_padded(key_cache: torch.Tensor, value_cache: torch.Tensor, head_block_table: torch.Tensor,
                        lengths: torch.Tensor, width: int, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows of ``num_heads`` heads, right-aligned in ``width`` columns with zeros before.

    key_cache, value_cache: [num_head_blocks, block_size, head_dim] (power-of-two head_dim, rows of
    all blocks evenly strided); head_block_table: int [num_heads, >= cdiv(max(lengths), block_size)]
    (last stride 1); lengths: int [num_heads] on the device, each <= width; k_scale / v_scale: fp8
    caches' float32 scales, one element or [num_heads]; out: the two results' tensors when the caller
    holds them ([num_heads, width, head_dim], contiguous). Returns (keys, values), each [num_heads,
    width, head_dim], in the caches' dtype, or float32 (the values) from fp8 caches."""
    num_heads, head_dim, page = head_block_table.shape[0], key_cache.shape[-1], key_cache.shape[1]
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.stride(-1) != 1 or cache.stride(0) != page * cache.stride(1):
            raise ValueError(f"{name}: rows need a unit last stride and the blocks' rows even strides")
    if head_block_table.stride(-1) != 1 or lengths.shape != (num_heads,):
        raise ValueError("the table needs a unit last stride and lengths one entry per head")
    fp8 = check_scales((key_cache, value_cache), (k_scale, v_scale), num_heads)
    dtype = torch.float32 if fp8 else key_cache.dtype
    shape = (num_heads, width, head_dim)
    if out is None:
        out = tuple(torch.empty(shape, dtype=dtype, device=key_cache.device) for _ in range(2))
    elif any(o.shape != shape or o.dtype != dtype or not o.is_contiguous() for o in out):
        raise ValueError(f"out must be two contiguous {dtype} tensors of shape {shape}")
    if num_heads and width:
        # 64 rows of 128 values: 16 KB of bf16 per cache and program, enough bytes in flight
        block_r = min(triton.next_power_of_2(width), max(1, 8192 // head_dim))
        _gather_padded_kernel[(num_heads, triton.cdiv(width, block_r))](
            key_cache, value_cache, head_block_table, lengths, k_scale, v_scale, out[0], out[1],
            width, head_block_table.stride(0), key_cache.stride(1), value_cache.stride(1),
            scale_stride(k_scale), scale_stride(v_scale), width * head_dim,
            PAGE=page, HEAD_DIM=head_dim, BLOCK_R=block_r, FP8=fp8,
            num_warps=4,
        )
    return out[0], out[1]
