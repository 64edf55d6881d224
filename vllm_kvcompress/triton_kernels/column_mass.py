"""Causal attention mass per key (EMS's global score), in Triton.

Semantics: exactly :func:`vllm_kvcompress.policies.observation.causal_column_mass` -- for every key, the sum
over the queries that see it (causal) and over the query heads of its GQA group of the softmax
probability that query gives it.

Two passes over Q K^T on tensor cores, nothing of size q_len x seq_len in memory:

1. ``_row_lse_kernel``: one program per (query head, block of queries) streams the keys up to its
   last query's position and keeps each row's log-sum-exp (base 2), as FlashAttention does.
2. ``_column_mass_kernel``: one program per (KV head, block of keys) streams the queries that can
   see the block, for each query head of the group, and sums ``exp2(s - lse)`` down the columns.

The PyTorch version materialises 64 MiB of fp32 logits per 32 queries at 16k tokens (80 ms per
layer on an H200, 32 layers per request); this one reads Q and K twice.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, sm_scale_log2, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """[M, D] x [N, D] -> fp32 [M, N] logits in base 2."""
    if DOT_F32:  # Triton's interpreter computes bf16 dots wrongly (triton 3.6): upcast there
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2


@triton.jit(do_not_specialize=["q_len", "seq_len", "start", "stride_lh"])
def _row_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    q_len, seq_len, start, group, sm_scale_log2,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (num_q_heads, cdiv(q_len, BLOCK_M)); lse: fp32 [num_q_heads, q_len] (base 2)."""
    q_head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    position = start + rows  # query row r sees keys 0 .. start + r
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_head * stride_qh + rows[:, None] * stride_qt + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + (q_head // group) * stride_kh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    end = tl.minimum(seq_len, start + tl.program_id(1) * BLOCK_M + BLOCK_M)  # past the block's last query
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_kt + d[None, :], mask=(cols < seq_len)[:, None], other=0.0)
        s = _scores(q, k, sm_scale_log2, DOT_F32, PRECISION)
        # column 0 is visible to every row, so no row is all -inf
        s = tl.where((cols[None, :] <= position[:, None]) & (cols < seq_len)[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        row_max = new_max
    tl.store(lse_ptr + q_head * stride_lh + rows, row_max + tl.log2(row_sum), mask=row_ok)


@triton.jit(do_not_specialize=["q_len", "seq_len", "start", "num_prompts", "stride_lh", "stride_mh"])
def _column_mass_kernel(
    q_ptr, k_ptr, lse_ptr, mass_ptr, prompts_ptr,
    q_len, seq_len, start, group, sm_scale_log2, num_prompts,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_lh, stride_mh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PROMPTS: tl.constexpr,
):
    """Grid (num_kv_heads, cdiv(seq_len, BLOCK_N)); mass: fp32 [num_kv_heads, seq_len].
    PROMPTS: grid (num_kv_heads, cdiv(longest, BLOCK_N), num_prompts), whole prompts of one step;
    prompts_ptr: int64 [4, num_prompts] -- each prompt's first token in q / k, first column in lse,
    first column in mass, length (q_len = seq_len = its length, start 0)."""
    kv_head = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    if PROMPTS:
        prompt = tl.program_id(2)
        first_token = tl.load(prompts_ptr + prompt)
        q_ptr += first_token * stride_qt
        k_ptr += first_token * stride_kt
        lse_ptr += tl.load(prompts_ptr + num_prompts + prompt)
        mass_ptr += tl.load(prompts_ptr + 2 * num_prompts + prompt)
        q_len = tl.load(prompts_ptr + 3 * num_prompts + prompt)
        seq_len = q_len
        start = 0
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_len
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + kv_head * stride_kh + cols[:, None] * stride_kt + d[None, :], mask=col_ok[:, None], other=0.0)
    mass = tl.zeros([BLOCK_N], tl.float32)
    # the first query row that sees column n0 is n0 - start; earlier rows see none of the block
    first = (tl.maximum(n0 - start, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, group):
        q_head = kv_head * group + g
        for m0 in range(first, q_len, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q = tl.load(q_ptr + q_head * stride_qh + rows[:, None] * stride_qt + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + q_head * stride_lh + rows, mask=row_ok, other=0.0)
            p = tl.exp2(_scores(q, k, sm_scale_log2, DOT_F32, PRECISION) - lse[:, None])
            visible = (cols[None, :] <= (start + rows)[:, None]) & row_ok[:, None]
            mass += tl.sum(tl.where(visible, p, 0.0), 0)
    tl.store(mass_ptr + kv_head * stride_mh + cols, mass, mask=col_ok)


def column_mass(query: torch.Tensor, key: torch.Tensor, start: int = 0, out: torch.Tensor | None = None, *,
                lse: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Attention mass each key receives from causal queries, summed over each GQA group.

    query: [num_q_heads, q_len, head_dim] at positions ``start .. start+q_len-1`` (last dim contiguous)
    key:   [num_kv_heads, seq_len, head_dim] at positions ``0 .. seq_len-1``, seq_len >= start + q_len
           (last dim contiguous)
    out:   optional float32 [num_kv_heads, seq_len] to write into (every element is written)
    lse:   optional float32 [num_q_heads, q_len], each row's log-sum-exp (natural log) over the keys
           it sees, as FlashAttention returns it: then the first pass is skipped
    returns out; softmax scale 1/sqrt(head_dim). block_m / block_n: tile sizes (tests and tuning).
    """
    num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, seq_len, key_dim = key.shape
    group = _check_heads(query, key, num_q_heads, num_kv_heads, head_dim, key_dim)
    if seq_len < start + q_len:
        raise ValueError(f"{seq_len} keys cannot hold queries at positions {start} .. {start + q_len - 1}")
    given = lse
    if given is not None and given.shape != (num_q_heads, q_len):
        raise ValueError(f"lse must be [{num_q_heads}, {q_len}], got {tuple(given.shape)}")
    lse = torch.empty(num_q_heads, q_len, dtype=torch.float32, device=query.device) if given is None \
        else given.float() * _LOG2E  # base 2, as the kernel keeps it
    mass = torch.empty(num_kv_heads, seq_len, dtype=torch.float32, device=query.device) if out is None else out
    if mass.shape != (num_kv_heads, seq_len) or mass.dtype != torch.float32:
        raise ValueError(f"out must be float32 {(num_kv_heads, seq_len)}, got {mass.dtype} {tuple(mass.shape)}")
    if q_len == 0:
        return mass.zero_()
    common = _launch_options(query, head_dim, block_m, block_n)
    scale_log2 = _LOG2E / math.sqrt(head_dim)
    if given is None:
        _row_lse_kernel[(num_q_heads, triton.cdiv(q_len, block_m))](
            query, key, lse, q_len, seq_len, start, group, scale_log2,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), lse.stride(0), **common)
    _column_mass_kernel[(num_kv_heads, triton.cdiv(seq_len, block_n))](
        query, key, lse, mass, mass, q_len, seq_len, start, group, scale_log2, 0,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), lse.stride(0), mass.stride(0),
        PROMPTS=False, **common)
    return mass


def prompt_column_masses(query: torch.Tensor, key: torch.Tensor, prompts: torch.Tensor, longest: int, width: int,
                         lse: torch.Tensor, *, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """:func:`column_mass` of several whole prompts of one step, in one launch (a step of a few 2k
    prompts launched one small grid per prompt and layer: a fraction of the SMs busy).

    query: [tokens, num_q_heads, head_dim] and key: [tokens, num_kv_heads, head_dim], the step's
    tokens (last dim contiguous); prompts: int64 [4, P] on the device -- each prompt's first token,
    its first column in ``lse``, its first column in the result, its length (every prompt whole:
    queries at positions 0 .. length-1 over keys 0 .. length-1); longest: the longest length (host);
    width: the result's columns (host); lse: float32 [num_q_heads, >= the prompts' columns], the
    rows' log-sum-exp (natural log), as FlashAttention's varlen prefill returns it.
    Returns float32 [num_kv_heads, width]; prompt p's mass in its columns, the rest unwritten."""
    tokens, num_q_heads, head_dim = query.shape
    key_tokens, num_kv_heads, key_dim = key.shape
    group = _check_heads(query, key, num_q_heads, num_kv_heads, head_dim, key_dim if key_tokens == tokens else -1)
    if prompts.dim() != 2 or prompts.shape[0] != 4 or lse.shape[0] != num_q_heads:
        raise ValueError(f"prompts must be [4, P] and lse [{num_q_heads}, ...], got {tuple(prompts.shape)}, "
                         f"{tuple(lse.shape)}")
    mass = torch.empty(num_kv_heads, width, dtype=torch.float32, device=query.device)
    num_prompts = prompts.shape[1]
    if num_prompts == 0 or longest == 0:
        return mass
    lse = lse.float() * _LOG2E  # base 2, as the kernel keeps it
    _column_mass_kernel[(num_kv_heads, triton.cdiv(longest, block_n), num_prompts)](
        query, key, lse, mass, prompts.contiguous(), 0, 0, 0, group, _LOG2E / math.sqrt(head_dim), num_prompts,
        query.stride(1), query.stride(0), key.stride(1), key.stride(0), lse.stride(0), mass.stride(0),
        PROMPTS=True, **_launch_options(query, head_dim, block_m, block_n))
    return mass


def _check_heads(query: torch.Tensor, key: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 key_dim: int) -> int:
    """The GQA group size of ``query`` over ``key``, or a ValueError saying why they cannot pair
    (``key_dim`` -1: their tokens differ)."""
    group = num_q_heads // num_kv_heads
    if key_dim != head_dim or group * num_kv_heads != num_q_heads:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not pair into GQA groups")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query and key need a contiguous last dim")
    return group


def _launch_options(query: torch.Tensor, head_dim: int, block_m: int, block_n: int) -> dict:
    return dict(
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_F32=bool(triton.knobs.runtime.interpret) and query.dtype == torch.bfloat16,
        # fp32 inputs get full-precision dots: tf32 would err ~1e-3 in the logits
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
