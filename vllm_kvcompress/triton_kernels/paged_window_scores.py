"""Observation-window scores of many KV heads straight from their head-blocks (decode-time
recompression), without gathering their keys.

Semantics: :func:`vllm_kvcompress.paged.reference.paged_window_scores`. Head ``i`` holds
``lengths[i]`` rows in the pages of ``head_block_table[i]``; its ``count`` most recent queries
of each of its ``group`` query heads form ``group * count`` query rows, the newest of which
sits at its last row (query ``c`` sees rows ``<= lengths[i] - count + c``). Each key's score is
the sum over the rows of softmax(q.k * scale)^power. Scores are right-aligned in ``width``
columns (head i's rows are the last ``lengths[i]``, the columns before them 0), as
:class:`~vllm_kvcompress.policies.observation.LayerObservation` lays out heads of different lengths.

One program per head, two passes over its keys per block of query rows (the row log-sum-exp,
then the scores); keys are read through the block table, 16-token pages at a time. HBM traffic
is two reads of the heads' keys plus the float32 scores; nothing ``rows x keys`` is stored.

The queries may also be read in place from a ring of recent queries (:class:`QueryRing`:
decode-time recompression keeps each request's last queries in slots that wrap around), so a tick
needs no [n, group, count, D] copy of them (2 GB for 256 Llama-3-8B requests).

An fp8 key cache (k_scale given): its e4m3 rows convert exactly to the queries' dtype and the
key scale joins the logits' scale (q.(k * s) = (q.k) * s), as in decode attention.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_kvcompress.paged.query_ring import QueryRing
from vllm_kvcompress.triton_kernels.fp8 import check_scales, scale_stride

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # logit of an invisible key: finite, so exp2(NEG - m) is 0 without NaN


@triton.jit
def _paged_logits(q, k_ptr, table_row, cols, cols_ok, stride_kb, stride_kr, qk_scale,
                  BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits q.k * qk_scale [BLOCK_M, BLOCK_N] of query rows q against rows ``cols`` of one
    head, read through its block table row."""
    d = tl.arange(0, BLOCK_D)
    block = tl.load(table_row + cols // BLOCK_SIZE, mask=cols_ok, other=0).to(tl.int64)
    offset = block * stride_kb + (cols % BLOCK_SIZE) * stride_kr
    k = tl.load(k_ptr + offset[None, :] + d[:, None], mask=cols_ok[None, :] & (d < HEAD_DIM)[:, None], other=0.0)
    # q's dtype: a no-op for keys of that dtype; exact for fp8 keys; fp32 when q was upcast
    k = k.to(q.dtype)
    return tl.dot(q, k, input_precision=PRECISION) * qk_scale


# index tensors may be views into a step's packed upload, at any offset: their alignment picks no binary
@triton.jit(do_not_specialize=["count", "num_rows", "width", "slots", "stride_t", "stride_o"],
            do_not_specialize_on_alignment=["q_start_ptr", "q_oldest_ptr", "table_ptr", "len_ptr"])
def _paged_window_scores_kernel(
    q_ptr, q_start_ptr, q_oldest_ptr, k_ptr, table_ptr, len_ptr, out_ptr, k_scale_ptr,
    count, num_rows, width, slots,
    stride_qn, stride_qg, stride_qc, stride_kb, stride_kr, stride_t, stride_o, stride_ks,
    qk_scale,
    POWER: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr, RING: tl.constexpr,
):
    i = tl.program_id(0)
    if RING:  # head i's queries start at q_start[i]; its oldest sits in slot q_oldest[i] of ``slots``
        q_start = tl.load(q_start_ptr + i)
        q_oldest = tl.load(q_oldest_ptr + i)
    else:
        q_start = i.to(tl.int64) * stride_qn
        q_oldest = 0
    if FP8:  # head i's layer's key scale (stride_ks 0: one layer's for all)
        qk_scale = qk_scale * tl.load(k_scale_ptr + i * stride_ks)
    length = tl.load(len_ptr + i).to(tl.int32)
    pad = width - length
    table_row = table_ptr + i.to(tl.int64) * stride_t
    out_row = out_ptr + i.to(tl.int64) * stride_o
    d = tl.arange(0, BLOCK_D)
    for start in range(0, pad, BLOCK_N):  # the padding columns before the head's rows
        cols = start + tl.arange(0, BLOCK_N)
        tl.store(out_row + cols, tl.zeros([BLOCK_N], tl.float32), mask=cols < pad)
    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        rows_ok = rows < num_rows
        q_off = q_start + (rows // count) * stride_qg + ((q_oldest + rows % count) % slots) * stride_qc
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=rows_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        last_visible = length - count + rows % count  # causal: the query's own row and those before
        m = tl.full([BLOCK_M], NEG, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, length, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cols_ok = cols < length
            s = _paged_logits(q, k_ptr, table_row, cols, cols_ok, stride_kb, stride_kr, qk_scale, BLOCK_SIZE,
                              BLOCK_D, HEAD_DIM, PRECISION)
            visible = cols_ok[None, :] & (cols[None, :] <= last_visible[:, None])
            s = tl.where(visible, s, NEG)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.where(visible, tl.exp2(s - m_new[:, None]), 0.0)
            l = l * tl.exp2(m - m_new) + tl.sum(p, axis=1)
            m = m_new
        lse = m + tl.log2(tl.maximum(l, 1e-30))  # base 2; rows past num_rows see nothing
        for start in range(0, length, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cols_ok = cols < length
            s = _paged_logits(q, k_ptr, table_row, cols, cols_ok, stride_kb, stride_kr, qk_scale, BLOCK_SIZE,
                              BLOCK_D, HEAD_DIM, PRECISION)
            visible = rows_ok[:, None] & cols_ok[None, :] & (cols[None, :] <= last_visible[:, None])
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            if POWER == 2:
                p = p * p
            dst = out_row + pad + cols
            # rows past the first block add to what this program stored before the barrier below
            total = tl.sum(p, axis=0) + tl.load(dst, mask=cols_ok & (row_start > 0), other=0.0)
            tl.store(dst, total, mask=cols_ok)
        tl.debug_barrier()  # this row block's stores are visible to every thread of the next


def paged_window_scores(queries: torch.Tensor | QueryRing, key_cache: torch.Tensor, head_block_table: torch.Tensor,
                        lengths: torch.Tensor, width: int, scale: float | None = None, power: int = 1,
                        out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """queries [n, group, count, D] (any strides with a unit last stride), or a :class:`QueryRing`
    (read in place); key_cache [num_blocks, block_size, D] of the queries' dtype, or
    float8_e4m3fn with its k_scale (float32 [1], or [n] for heads of several layers);
    head_block_table int [n, max_blocks] (unit last stride); lengths int [n] on the device, each
    in [count, width]; returns float32 [n, width] (right-aligned)."""
    n, group, count, head_dim = queries.shape
    block_size = key_cache.shape[1]
    if key_cache.shape[2] != head_dim or head_block_table.shape[0] != n or lengths.shape != (n,):
        raise ValueError(f"shapes do not match: queries {tuple(queries.shape)}, cache {tuple(key_cache.shape)}, "
                         f"table {tuple(head_block_table.shape)}, lengths {tuple(lengths.shape)}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    fp8 = check_scales((key_cache,), (k_scale,), n)
    if queries.dtype != key_cache.dtype and not fp8:
        raise ValueError(f"query {queries.dtype} and key {key_cache.dtype} dtypes differ")
    ring = isinstance(queries, QueryRing)
    if ring:  # head i's query (g, c) at starts[i] + g * stride(Hq) + ((first[i] + c) % window) * stride(slot)
        if queries.ring.stride(-1) != 1:
            raise ValueError("the ring's rows must be contiguous (unit stride on head_dim)")
        storage, starts, first, slots = queries.ring, queries.starts(), queries.first_slots(), queries.window
        stride_qn, stride_qg, stride_qc = 0, queries.ring.stride(3), queries.ring.stride(2)
    else:
        storage = queries if queries.stride(-1) == 1 else queries.contiguous()
        starts = first = None
        slots = count
        stride_qn, stride_qg, stride_qc = storage.stride(0), storage.stride(1), storage.stride(2)
    if head_block_table.stride(-1) != 1:
        head_block_table = head_block_table.contiguous()
    if out is None:
        out = torch.empty(n, width, dtype=torch.float32, device=key_cache.device)
    num_rows = group * count
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # one tile height whatever the rows: a size per count of recent queries compiled inside a served
    # window (~1 s each on an H100); a tick's heads have a full window (128 rows at GQA 4) anyway
    block_m = 128
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if queries.dtype == torch.float32 else "tf32"
    upcast = queries.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    if n:
        _paged_window_scores_kernel[(n,)](
            storage, starts, first, key_cache, head_block_table, lengths, out, k_scale, count, num_rows, width, slots,
            stride_qn, stride_qg, stride_qc, key_cache.stride(0), key_cache.stride(1),
            head_block_table.stride(0), out.stride(0), scale_stride(k_scale), scale * LOG2E,
            POWER=power, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, HEAD_DIM=head_dim,
            PRECISION=precision, UPCAST=upcast, FP8=fp8, RING=ring,
            num_warps=8 if block_m * block_d >= 8192 else 4)
    return out
