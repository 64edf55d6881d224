"""EMS merge: weighted mean of the rows of each class, for K and V in one pass.

Semantics: :func:`vllm_kvcompress.paged.reference.merge_by_class` (class 0 is the dropped "zero
class"; classes 1..num_classes are output rows 0..num_classes-1).

The launcher sorts the tokens by (head, class) (one flat ``torch.sort``) and finds each class's
segment with ``torch.searchsorted``. The kernel, one program per (head, block of classes), walks
the segments of its classes side by side, gathering BLOCK_T rows of each class per step and
summing w * x, x and w in fp32 registers, and writes each output row exactly once. No atomics: the result is
deterministic and every output row (an empty class's zeros too) is written by the kernel.

fp8 cache rows (k_scale / v_scale given): rows are dequantized as they are gathered and the means
quantized with the same scales, so the outputs are fp8 rows ready for the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.triton_kernels.fp8 import FP8_DTYPE, check_scales, dequantize_fp8, quantize_fp8


# the merge's tiles: BLOCK_T tokens of BLOCK_C = 64 // BLOCK_T classes per step (each a binary of its own)
MERGE_BLOCK_TS = (2, 4, 8, 16, 32, 64)


@triton.jit(do_not_specialize=["seq_len", "num_classes", "stride_wh"])
def _merge_kernel(
    k_ptr, v_ptr, w_ptr, order_ptr, bounds_ptr, k_out_ptr, v_out_ptr, k_scale_ptr, v_scale_ptr,
    seq_len, num_classes,
    stride_kh, stride_kl, stride_vh, stride_vl, stride_wh,
    HAS_V: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr,
):
    """Classes [c0, c0 + BLOCK_C) of head h, all at once: each step gathers the next BLOCK_T
    tokens of every class ([BLOCK_C, BLOCK_T, head_dim]) and sums them over the tokens.
    FP8: k, v and the outputs are float8_e4m3fn rows of scales k_scale, v_scale (float32 [1]).
    Other outputs of 16 bits: the means rounded to nearest even, as torch's ``.to`` (natively;
    Triton 3.6's interpreter truncates)."""
    h = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output rows; the classes are c + 1
    c_ok = c < num_classes
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # bounds[h, k] = first sorted position of class k (class 0 = the dropped zero class).
    start = tl.load(bounds_ptr + h * (num_classes + 2) + c + 1, mask=c_ok, other=0)
    end = tl.load(bounds_ptr + h * (num_classes + 2) + c + 2, mask=c_ok, other=0)
    wk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    sk = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    wv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    sv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_C], tl.float32)
    if FP8:
        k_scale = tl.load(k_scale_ptr)
        if HAS_V:
            v_scale = tl.load(v_scale_ptr)
    for t0 in range(0, tl.max(end - start, axis=0), BLOCK_T):
        t = start[:, None] + t0 + tl.arange(0, BLOCK_T)[None, :]  # [BLOCK_C, BLOCK_T] sorted positions
        t_ok = t < end[:, None]
        tok = tl.load(order_ptr + h * seq_len + t, mask=t_ok, other=0)
        w = tl.load(w_ptr + h * stride_wh + tok, mask=t_ok, other=0.0).to(tl.float32)
        mass += tl.sum(w, axis=1)
        m = t_ok[:, :, None] & d_ok[None, None, :]
        dd = d[None, None, :]
        x = tl.load(k_ptr + h * stride_kh + tok[:, :, None] * stride_kl + dd, mask=m, other=0.0).to(tl.float32)
        if FP8:
            x = dequantize_fp8(x, k_scale)
        wk += tl.sum(x * w[:, :, None], axis=1)
        sk += tl.sum(x, axis=1)
        if HAS_V:
            x = tl.load(v_ptr + h * stride_vh + tok[:, :, None] * stride_vl + dd, mask=m, other=0.0).to(tl.float32)
            if FP8:
                x = dequantize_fp8(x, v_scale)
            wv += tl.sum(x * w[:, :, None], axis=1)
            sv += tl.sum(x, axis=1)
    # Weighted mean; plain mean where the weights sum to 0; zeros for an empty class; a class of
    # one row is that row exactly (w * x / w can be one rounding step off), as in the reference.
    members = end - start
    count = tl.maximum(members, 1).to(tl.float32)
    use_w = (mass > 0) & (members > 1)
    inv = tl.where(use_w, 1.0 / tl.where(use_w, mass, 1.0), 1.0 / count)[:, None]
    out = (h * num_classes + c[:, None]) * HEAD_DIM + d[None, :]
    m = c_ok[:, None] & d_ok[None, :]
    k_mean = tl.where(use_w[:, None], wk, sk) * inv
    if FP8:
        k_mean = quantize_fp8(k_mean, k_scale)
    tl.store(k_out_ptr + out, k_mean.to(k_out_ptr.dtype.element_ty), mask=m)
    if HAS_V:
        v_mean = tl.where(use_w[:, None], wv, sv) * inv
        if FP8:
            v_mean = quantize_fp8(v_mean, v_scale)
        tl.store(v_out_ptr + out, v_mean.to(v_out_ptr.dtype.element_ty), mask=m)


def class_segments(assign: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by (head, class) and where each class starts.

    assign: int [num_heads, seq_len] in [0, num_classes]
    returns order: [num_heads, seq_len] token ids (within the head) sorted by class;
            bounds: [num_heads, num_classes + 2] first sorted position of each class (+ the end).
    One flat sort of (head, class) keys: much faster than a batched sort along dim 1.
    """
    num_heads, seq_len = assign.shape
    span = num_classes + 2
    heads = torch.arange(num_heads, device=assign.device, dtype=torch.int64)
    keys = (assign.long() + heads[:, None] * span).view(-1)
    if num_heads * span < 2**31:
        keys = keys.int()
    sorted_keys, order = torch.sort(keys, stable=True)
    order = order.view(num_heads, seq_len) - heads[:, None] * seq_len
    edges = torch.arange(num_heads * span, device=assign.device, dtype=sorted_keys.dtype)
    bounds = torch.searchsorted(sorted_keys, edges).view(num_heads, span) - heads[:, None] * seq_len
    return order, bounds


def merge_kv_by_class(
    key: torch.Tensor,
    value: torch.Tensor | None,
    weight: torch.Tensor,
    assign: torch.Tensor,
    num_classes: int,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted mean of each class's K rows and V rows (EMS merge), both in one launch.

    key, value: [num_heads, seq_len, head_dim] (unit last stride); value may be None
    weight:     [num_heads, seq_len], >= 0
    assign:     int [num_heads, seq_len] in [0, num_classes]; class 0 is dropped (values outside
                that range are not checked: they corrupt other heads' classes)
    out:        optional (key_out, value_out) [num_heads, num_classes, head_dim] of out_dtype, contiguous
    segments:   optional class_segments(assign, num_classes), to reuse one sort for several calls
    k_scale, v_scale: float32 [1] when key / value are float8_e4m3fn cache rows (v_scale None
                without value): rows read and means stored as reference.merge_by_class(...,
                cache_scale) does; the outputs are then float8_e4m3fn instead of float32
    out_dtype:  what the float32 means are rounded to as they are stored (without scales)
    returns     (key_out, value_out), [num_heads, num_classes, head_dim] of out_dtype; row c-1
                holds class c (value_out None when value is None)
    """
    num_heads, seq_len, head_dim = key.shape
    if value is not None and value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    if weight.shape != (num_heads, seq_len) or assign.shape != (num_heads, seq_len):
        raise ValueError("weight and assign must be [num_heads, seq_len]")
    if key.stride(-1) != 1 or (value is not None and value.stride(-1) != 1):
        raise ValueError("key/value need a unit last stride")
    has_v = value is not None
    fp8 = check_scales((key, value) if has_v else (key,), (k_scale, v_scale) if has_v else (k_scale,))
    if v_scale is not None and not has_v:
        raise ValueError("v_scale without value")
    shape = (num_heads, num_classes, head_dim)
    out_dtype = FP8_DTYPE if fp8 else out_dtype
    if out is None:
        out = (torch.empty(shape, dtype=out_dtype, device=key.device),
               torch.empty(shape, dtype=out_dtype, device=key.device) if has_v else None)
    k_out, v_out = out
    for o in (k_out, v_out):
        if o is not None and (o.shape != shape or o.dtype != out_dtype or not o.is_contiguous()):
            raise ValueError(f"outputs must be contiguous {out_dtype} {shape}")
    if num_heads == 0 or num_classes == 0:
        return k_out, v_out
    order, bounds = class_segments(assign, num_classes) if segments is None else segments
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    v_arg = value if has_v else key
    # About 64 rows gathered per step: a few tokens of many classes when classes are small (the
    # usual case: budget ~ a fraction of the prompt), many tokens of one class when they are large.
    avg = seq_len / (num_classes + 1)
    block_t = min(MERGE_BLOCK_TS[-1], max(MERGE_BLOCK_TS[0], triton.next_power_of_2(max(1, int(avg)))))
    block_c = max(1, 64 // block_t)
    grid = (num_heads, triton.cdiv(num_classes, block_c))
    _merge_kernel[grid](
        key, v_arg, weight, order, bounds, k_out, v_out if has_v else k_out, k_scale, v_scale,
        seq_len, num_classes,
        key.stride(0), key.stride(1), v_arg.stride(0), v_arg.stride(1), weight.stride(0),
        HAS_V=has_v, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_C=block_c, BLOCK_T=block_t, FP8=fp8, num_warps=4,
    )
    return k_out, v_out


def merge_by_class(
    x: torch.Tensor,
    weight: torch.Tensor,
    assign: torch.Tensor,
    num_classes: int,
    out: torch.Tensor | None = None,
    cache_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor's EMS merge: x [num_heads, seq_len, head_dim] -> float32 [num_heads, num_classes, head_dim]
    (float8_e4m3fn rows with the fp8 cache rows x's cache_scale).

    Same arguments as :func:`merge_kv_by_class` without value.
    """
    return merge_kv_by_class(x, None, weight, assign, num_classes, out=None if out is None else (out, None),
                             k_scale=cache_scale)[0]
