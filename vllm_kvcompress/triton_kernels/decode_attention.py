"""Decode attention over per-head paged KV (head-blocks), in Triton.

Semantics: exactly :func:`vllm_kvcompress.paged.reference.decode_attention`; layout:
:mod:`vllm_kvcompress.paged.layout`.

One program handles one (request, KV head, split): it stacks ALL query heads of the GQA group and
ALL new queries of the request into the rows of one tile (row r = query r // group, head
r % group), so the KV head's pages are read from memory once, and streams the head's tokens
through an online softmax with fp32 accumulation. Long contexts are cut into ``num_splits`` equal
shares of each head's own length (split-K); a small second kernel merges the splits' partial
results by their log-sum-exp. With one split, the main kernel writes the output itself.

fp8 caches (k_scale / v_scale given): the e4m3 rows convert exactly to the query's dtype and the
dots run as for that dtype, with fp32 accumulation; dequantizing (rows * scale) is folded into the
logits' scale (K) and the weighted sum (V), each one multiply per tile instead of one per element.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_kvcompress.triton_kernels.fp8 import check_scales

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_splits", "stride_ts", "stride_th", "stride_ls", "stride_lh"])
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, k_scale_ptr, v_scale_ptr,
    out_ptr, part_o_ptr, part_lse_ptr,
    sm_scale_log2,  # softmax scale * log2(e): the softmax runs in base 2 (exp2 is one instruction)
    num_kv_heads, num_splits,
    stride_qs, stride_qt, stride_qh,
    stride_kb, stride_kr, stride_vb, stride_vr,
    stride_ts, stride_th,
    stride_ls, stride_lh,
    stride_os, stride_ot, stride_oh,
    NUM_QUERIES: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    """Grid (num_seqs * num_kv_heads, num_splits); SPLIT is num_splits > 1 (a runtime count, so
    batch sizes that pick different counts share one compiled kernel).

    q: [S, NUM_QUERIES, Hq, D]; k, v: [blocks, PAGE, D]; table: [S, Hkv, max_blocks]; len: [S, Hkv]
    FP8: k, v are float8_e4m3fn with float32 [1] scales k_scale, v_scale
    out: [S, NUM_QUERIES, Hq, D] (written when not SPLIT)
    part_o: fp32 [S * Hkv, num_splits, NUM_QUERIES * GROUP, D], part_lse: fp32 [S * Hkv, num_splits,
    NUM_QUERIES * GROUP] (written when SPLIT; lse in base 2, -inf for an empty split)
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    s = pid // num_kv_heads
    h = pid % num_kv_heads
    length = tl.load(len_ptr + s * stride_ls + h * stride_lh)

    # This split's share of the head's own length, in whole BLOCK_N tiles (heads differ in length).
    tiles_per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, length)

    rows = tl.arange(0, BLOCK_M)
    t = rows // GROUP  # which new query
    head = h * GROUP + rows % GROUP  # which query head
    row_ok = rows < NUM_QUERIES * GROUP  # BLOCK_M is padded up to the dot's minimum of 16
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + s * stride_qs + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale_log2
    if FP8:
        qk_scale = sm_scale_log2 * tl.load(k_scale_ptr)  # q.(k * s) = (q.k) * s
    # Query t of n was appended at row length - n + t and sees the rows up to it.
    last_visible = length - NUM_QUERIES + t

    # Finite start for the running max: a tile whose keys a row cannot see leaves it finite, so
    # exp2(m_old - m_new) never evaluates -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table = table_ptr + s * stride_ts + h * stride_th
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tok_ok = offs < end  # table entries past the head's length are undefined: never read them
        blk = tl.load(table + offs // PAGE, mask=tok_ok, other=0).to(tl.int64)
        row = offs % PAGE
        k = tl.load(k_ptr + blk[:, None] * stride_kb + row[:, None] * stride_kr + d[None, :],
                    mask=tok_ok[:, None], other=0.0)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + row[:, None] * stride_vr + d[None, :],
                    mask=tok_ok[:, None], other=0.0)
        if FP8:  # exact: every e4m3 value is a bf16, fp16 and fp32 value
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if DOT_F32:  # Triton's interpreter computes bf16 dots wrongly (triton 3.6): upcast there
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        qk = tl.where(offs[None, :] <= last_visible[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if FP8:
        acc = acc * tl.load(v_scale_ptr)  # sum p (v * s) = (sum p v) * s
    if not SPLIT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + s * stride_os + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # An empty split (start >= length) has l == 0 and acc == 0: store o = 0, lse = -inf.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        part = pid * num_splits + split
        tl.store(part_o_ptr + (part * NUM_QUERIES * GROUP + rows[:, None]) * HEAD_DIM + d[None, :], o,
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part * NUM_QUERIES * GROUP + rows, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    num_kv_heads, num_splits,
    stride_os, stride_ot, stride_oh,
    NUM_QUERIES: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Grid (num_seqs * num_kv_heads, NUM_QUERIES * GROUP): one output row each.

    out[s, t, h * GROUP + g] = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M) over the splits i.
    """
    pid = tl.program_id(0)
    r = tl.program_id(1)
    s = pid // num_kv_heads
    h = pid % num_kv_heads
    rows_per = NUM_QUERIES * GROUP
    i = tl.arange(0, SPLITS_P2)
    ok = i < num_splits
    d = tl.arange(0, HEAD_DIM)
    base = pid * num_splits + i  # [SPLITS_P2]
    lse = tl.load(part_lse_ptr + base * rows_per + r, mask=ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # every query sees >= 1 key, so the max is finite
    o = tl.load(part_o_ptr + (base[:, None] * rows_per + r) * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    t = r // GROUP
    head = h * GROUP + r % GROUP
    tl.store(out_ptr + s * stride_os + t * stride_ot + head * stride_oh + d, res.to(out_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small count, so that tests exercise split-K on small shapes


def default_num_splits(num_work: int, max_tokens: int, block_n: int, num_sms: int) -> int:
    """Splits per (request, KV head): enough programs for ~2 waves over the SMs, down to one tile
    per split. Small batches are latency-bound (each tile is a dependent table -> K/V gather), so
    short splits pay: on an H100, batch 1 x 1k tokens took 7.7 us with 16 one-tile splits and
    11.3 us with 4 four-tile splits; with many requests ``want`` is 1 and nothing is split.

    ``max_tokens`` is an upper bound on the heads' lengths taken from the table's width, so the
    choice needs no device-to-host sync (the launcher stays CUDA-graph capturable).
    """
    want = triton.cdiv(2 * num_sms, num_work)
    most = max(1, max_tokens // block_n)
    return max(1, min(want, most, 64))


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shape and pipelining per head_dim (tuned on an H100, see benchmarks/results/kernels-notes.md)."""
    # Memory-bound: BLOCK_N 32-128, 4 or 8 warps and 2-4 stages were within 1-2% of each other at
    # head_dim 128; 64 / 4 / 3 was never worse than that. Larger heads halve the tile for registers.
    if head_dim <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2)


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    retained_len: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention of the newest query tokens over each KV head's own pages.

    query:            [num_seqs, num_queries, num_q_heads, head_dim] (bf16 / fp16 / fp32; last dim
                      contiguous), the newest tokens, already appended to the cache
    key_cache, value_cache: [num_head_blocks, block_size, head_dim] (last dim contiguous)
    head_block_table: int32 [num_seqs, num_kv_heads, max_blocks]
    retained_len:     int32 [num_seqs, num_kv_heads], each >= num_queries
    out:              optional [num_seqs, num_queries, num_q_heads, head_dim] to write into
    k_scale, v_scale: float32 [1] each for float8_e4m3fn caches (read as reference.dequantize
                      does), else None
    returns           out, [num_seqs, num_queries, num_q_heads, head_dim] in query.dtype

    num_splits / config override the split-K count and the tile config (tests and tuning).
    """
    num_seqs, num_queries, num_q_heads, head_dim = query.shape
    _, num_kv_heads, max_blocks = head_block_table.shape
    page = key_cache.shape[1]
    group = num_q_heads // num_kv_heads
    if group * num_kv_heads != num_q_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    for name, x in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("head_block_table", head_block_table)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    fp8 = check_scales((key_cache, value_cache), (k_scale, v_scale))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(query)
    if out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError("out must have query's shape and a contiguous last dim")
    cfg = {**_config(head_dim, query.dtype), **(config or {})}
    block_n = cfg["BLOCK_N"]
    if num_splits is None:
        num_splits = default_num_splits(num_seqs * num_kv_heads, max_blocks * page, block_n, _num_sms(query.device))
    rows = num_queries * group
    block_m = max(16, triton.next_power_of_2(rows))  # tl.dot needs M >= 16
    if num_splits > 1:
        part_o = torch.empty(num_seqs * num_kv_heads, num_splits, rows, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(num_seqs * num_kv_heads, num_splits, rows, dtype=torch.float32, device=query.device)
    else:
        part_o = part_lse = out  # unused
    _decode_attention_kernel[(num_seqs * num_kv_heads, num_splits)](
        query, key_cache, value_cache, head_block_table, retained_len, k_scale, v_scale,
        out, part_o, part_lse,
        scale * _LOG2E, num_kv_heads, num_splits,
        query.stride(0), query.stride(1), query.stride(2),
        key_cache.stride(0), key_cache.stride(1), value_cache.stride(0), value_cache.stride(1),
        head_block_table.stride(0), head_block_table.stride(1),
        retained_len.stride(0), retained_len.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_QUERIES=num_queries, GROUP=group, PAGE=page, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1,
        DOT_F32=bool(triton.knobs.runtime.interpret) and query.dtype == torch.bfloat16,
        # fp32 inputs get full-precision dots: tf32 (Triton's default) errs ~1.5e-3 at 8k tokens.
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", FP8=fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs * num_kv_heads, rows)](
            part_o, part_lse, out, num_kv_heads, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_QUERIES=num_queries, GROUP=group, HEAD_DIM=head_dim,
            # one binary for every split count default_num_splits picks (at most 64): a count that no
            # captured graph had compiled inside a served window (mixed steps run outside the graphs)
            SPLITS_P2=max(64, triton.next_power_of_2(num_splits)),
            num_warps=4,
        )
    return out
