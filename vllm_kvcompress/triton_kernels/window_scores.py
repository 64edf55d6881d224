"""Observation-window attention scores per key, without materialising the attention matrix.

Semantics: :func:`vllm_kvcompress.paged.reference.window_scores`. The window's queries of one KV
head's GQA group form ``rows = group * window`` query rows; each key's score is the sum over those
rows of softmax(q.k * scale)^power, with the causal mask of the window's last positions.

Two passes over the keys:

1. ``_row_stats_kernel``, grid (kv heads x row blocks, chunks of keys, so that a long prompt fills
   the GPU): for each row, the log-sum-exp of its visible logits inside the chunk. The launcher
   merges the chunks with one ``torch.logsumexp`` ([heads, chunks, rows], a few KB).
2. ``_window_scores_kernel``, grid (kv heads, chunks): recomputes the logits of its chunk's keys
   and sums exp(s - lse)^power over the rows, one block of rows after the other.

HBM traffic is two reads of the keys plus O(heads x chunks x rows) floats; the logits
([heads, rows, seq_len]) only ever live in registers. Exponentials are taken in base 2.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Logit of a masked (invisible) key: finite, so that exp2(NEG - m) is 0 without inf - inf = NaN.
NEG = tl.constexpr(-1.0e30)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(1.0 / LOG2E)


@triton.jit
def _load_rows(q_ptr, h, rows, rows_ok, group, window, stride_qh, stride_qw,
               BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Query rows [BLOCK_M, BLOCK_D] of KV head h: row r is window query r % window of query
    head h * group + r // window (GQA groups are contiguous)."""
    d = tl.arange(0, BLOCK_D)
    q_off = (h * group + rows // window).to(tl.int64) * stride_qh + (rows % window) * stride_qw
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=rows_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _logits(q, k_ptr, h, cols, cols_ok, stride_kh, stride_kl, qk_scale,
            BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """Base-2 logits [BLOCK_M, BLOCK_N] of the rows q against keys ``cols`` of KV head h."""
    d = tl.arange(0, BLOCK_D)
    k_off = h.to(tl.int64) * stride_kh + cols.to(tl.int64) * stride_kl
    k = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=cols_ok[None, :] & (d < HEAD_DIM)[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return tl.dot(q, k, input_precision=PRECISION) * qk_scale


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, plse_ptr,
    seq_len, group, window, num_rows, num_chunks,
    stride_qh, stride_qw, stride_kh, stride_kl,
    qk_scale,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """plse[h, chunk, row] = log sum_{visible keys in chunk} exp(logit)  (-inf if none is visible)."""
    row_blocks = tl.cdiv(num_rows, BLOCK_M)
    h = tl.program_id(0) // row_blocks
    rows = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    rows_ok = rows < num_rows
    last_visible = seq_len - window + rows % window  # causal: row sees keys <= its position
    q = _load_rows(q_ptr, h, rows, rows_ok, group, window, stride_qh, stride_qw, BLOCK_D, HEAD_DIM, UPCAST)

    m = tl.full([BLOCK_M], NEG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, seq_len), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cols_ok = cols < seq_len
        s = _logits(q, k_ptr, h, cols, cols_ok, stride_kh, stride_kl, qk_scale, BLOCK_D, HEAD_DIM, PRECISION, UPCAST)
        visible = cols_ok[None, :] & (cols[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, NEG)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.where(visible, tl.exp2(s - m_new[:, None]), 0.0)
        l = l * tl.exp2(m - m_new) + tl.sum(p, axis=1)
        m = m_new
    out = plse_ptr + (h * num_chunks + chunk) * num_rows + rows
    # Natural log, for torch.logsumexp; log2(0) = -inf: a chunk with no visible key adds nothing.
    tl.store(out, (m + tl.log2(l)) * LN2_C, mask=rows_ok)


@triton.jit
def _window_scores_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    seq_len, group, window, num_rows,
    stride_qh, stride_qw, stride_kh, stride_kl,
    qk_scale,
    POWER: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[h, keys of the chunk] = sum over rows of exp(logit - lse_row)^POWER."""
    h = tl.program_id(0)
    chunk_start = tl.program_id(1) * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, seq_len)
    for row_start in range(0, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        rows_ok = rows < num_rows
        q = _load_rows(q_ptr, h, rows, rows_ok, group, window, stride_qh, stride_qw, BLOCK_D, HEAD_DIM, UPCAST)
        # lse: natural log, merged over chunks by the launcher; to base 2. Padding rows read 0.
        lse = tl.load(lse_ptr + h * num_rows + rows, mask=rows_ok, other=0.0) * LOG2E_C
        last_visible = seq_len - window + rows % window
        for start in range(chunk_start, chunk_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cols_ok = cols < chunk_end
            s = _logits(q, k_ptr, h, cols, cols_ok, stride_kh, stride_kl, qk_scale,
                        BLOCK_D, HEAD_DIM, PRECISION, UPCAST)
            visible = rows_ok[:, None] & cols_ok[None, :] & (cols[None, :] <= last_visible[:, None])
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            if POWER == 2:
                p = p * p
            # Rows past the first block add to what this program stored before the barrier below.
            dst = out_ptr + h * seq_len + cols
            total = tl.sum(p, axis=0) + tl.load(dst, mask=cols_ok & (row_start > 0), other=0.0)
            tl.store(dst, total, mask=cols_ok)
        tl.debug_barrier()  # this row block's stores are visible to every thread of the next


def window_scores(
    window_query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None = None,
    power: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass each key receives from the observation window, summed over window and group.

    window_query: [num_q_heads, window, head_dim] (any strides with a unit last stride; e.g. a
                  permuted view of [window, num_q_heads, head_dim])
    key:          [num_kv_heads, seq_len, head_dim] (likewise; e.g. a view of [seq_len, kv, d])
    power:        1 (SnapKV) or 2 (KV-Compress)
    out:          optional float32 [num_kv_heads, seq_len] to write into
    returns       float32 [num_kv_heads, seq_len]
    """
    num_q_heads, window, head_dim = window_query.shape
    num_kv_heads, seq_len, key_dim = key.shape
    if key_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"shapes do not match: query {tuple(window_query.shape)}, key {tuple(key.shape)}")
    if not 1 <= window <= seq_len:
        raise ValueError(f"window {window} must be in [1, seq_len={seq_len}]")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    if window_query.dtype != key.dtype:
        raise ValueError(f"query {window_query.dtype} and key {key.dtype} dtypes differ")
    if window_query.stride(-1) != 1:
        window_query = window_query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    group = num_q_heads // num_kv_heads
    num_rows = group * window
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty(num_kv_heads, seq_len, dtype=torch.float32, device=key.device)
    elif out.shape != (num_kv_heads, seq_len) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{num_kv_heads}, {seq_len}] tensor")

    block_m = min(128, max(16, triton.next_power_of_2(num_rows)))
    block_n = 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Enough chunks that both passes fill the GPU (~4 programs per SM on an H100), few enough that
    # each program amortises its query tile over several key blocks; whole key blocks per chunk.
    row_blocks = triton.cdiv(num_rows, block_m)
    want = max(1, min(64, 512 // (num_kv_heads * row_blocks)))
    chunk = block_n * triton.cdiv(triton.cdiv(seq_len, want), block_n)
    num_chunks = triton.cdiv(seq_len, chunk)
    plse = torch.empty(num_kv_heads, num_chunks, num_rows, dtype=torch.float32, device=key.device)
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error on the scores).
    precision = "ieee" if key.dtype == torch.float32 else "tf32"
    # Triton's interpreter multiplies bf16 operands as raw uint16: upcast there (tests on CPU).
    upcast = key.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    num_warps = 8 if block_m * block_d * key.element_size() >= 32768 else 4
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
                  PRECISION=precision, UPCAST=upcast, num_warps=num_warps)
    strides = (window_query.stride(0), window_query.stride(1), key.stride(0), key.stride(1))
    _row_stats_kernel[(num_kv_heads * row_blocks, num_chunks)](
        window_query, key, plse, seq_len, group, window, num_rows, num_chunks, *strides,
        scale * LOG2E, CHUNK=chunk, **common)
    lse = torch.logsumexp(plse, dim=1)  # [num_kv_heads, num_rows]: every row sees key 0, finite
    _window_scores_kernel[(num_kv_heads, num_chunks)](
        window_query, key, lse, out, seq_len, group, window, num_rows, *strides,
        scale * LOG2E, POWER=power, CHUNK=chunk, **common)
    return out
