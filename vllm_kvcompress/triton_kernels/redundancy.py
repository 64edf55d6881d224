"""EMS's nearest centre of each row that can merge, in Triton.

Semantics: :func:`vllm_kvcompress.policies.reduction.nearest_centres` -- for each compared row x
of a head, the retained row c (a merge target) of greatest redundancy cos(K_x, K_c) * cos(V_x, V_c),
each cosine clamped at 0, and that redundancy.

One program per (head, block of compared rows): the block's K and V rows are normalised once in
registers, then the head's centres stream past in blocks, normalised as they load, and two dots
per block on tensor cores give the redundancies; a running maximum keeps the best. Nothing of size
rows x centres, and no float32 copy of the rows, reaches memory: the PyTorch version writes
float32 unit copies of every centre and compared row and a [heads, rows, centres] similarity
(~13 GB of passes in a 256-request tick of Llama-3-8B at 10 %).

Compared rows are given sorted candidates first (``order``), so a block whose rows are none of
them skips the centres: a caller can pass every row that might merge without counting the
candidates first (a wait for the device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unit(x, d_ok):
    """fp32 rows of ``x`` scaled to unit length (a zero row stays zero, as F.normalize's eps does)."""
    x = tl.where(d_ok[None, :], x.to(tl.float32), 0.0)
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]


@triton.jit(do_not_specialize=["seq_len", "num_kept", "num_compared", "stride_keep", "stride_order", "stride_cand"])
def _nearest_centre_kernel(
    k_ptr, v_ptr, keep_ptr, target_ptr, order_ptr, candidate_ptr, sim_ptr, best_ptr,
    seq_len, num_kept, num_compared,
    stride_kh, stride_kl, stride_vh, stride_vl, stride_keep, stride_order, stride_cand,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (num_heads, cdiv(num_compared, BLOCK_N)). sim/best: [num_heads, seq_len] (contiguous),
    written at the block's rows only."""
    h = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < num_compared
    row = tl.load(order_ptr + h * stride_order + j, mask=j_ok, other=0)
    is_candidate = j_ok & (tl.load(candidate_ptr + h * stride_cand + row, mask=j_ok, other=0) != 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m = j_ok[:, None] & d_ok[None, :]
    xk = _unit(tl.load(k_ptr + h * stride_kh + row[:, None] * stride_kl + d[None, :], mask=m, other=0.0), d_ok)
    xv = _unit(tl.load(v_ptr + h * stride_vh + row[:, None] * stride_vl + d[None, :], mask=m, other=0.0), d_ok)
    best_sim = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best = tl.zeros([BLOCK_N], tl.int64)
    # a block without candidates compares nothing (its rows' results are -inf whatever they are)
    end = tl.where(tl.sum(is_candidate.to(tl.int32), axis=0) > 0, num_kept, 0)
    for b0 in range(0, end, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < num_kept
        slot = tl.load(keep_ptr + h * stride_keep + b, mask=b_ok, other=0)
        target = b_ok & (tl.load(target_ptr + h * num_kept + b, mask=b_ok, other=0) != 0)
        cm = target[:, None] & d_ok[None, :]
        slot = tl.maximum(slot, 0)
        ck = _unit(tl.load(k_ptr + h * stride_kh + slot[:, None] * stride_kl + d[None, :], mask=cm, other=0.0), d_ok)
        cv = _unit(tl.load(v_ptr + h * stride_vh + slot[:, None] * stride_vl + d[None, :], mask=cm, other=0.0), d_ok)
        key_cos = tl.maximum(tl.dot(xk, tl.trans(ck), input_precision=PRECISION), 0.0)
        value_cos = tl.maximum(tl.dot(xv, tl.trans(cv), input_precision=PRECISION), 0.0)
        sim = tl.where(target[None, :], key_cos * value_cos, float("-inf"))  # [BLOCK_N, BLOCK_B]
        block_best = tl.max(sim, axis=1)
        block_arg = tl.argmax(sim, axis=1)
        better = block_best > best_sim  # strictly: the first of equal maxima stays
        best = tl.where(better, b0 + block_arg.to(tl.int64), best)
        best_sim = tl.where(better, block_best, best_sim)
    best_sim = tl.where(is_candidate, best_sim, float("-inf"))
    tl.store(sim_ptr + h * seq_len + row, best_sim, mask=j_ok)
    tl.store(best_ptr + h * seq_len + row, best, mask=j_ok)


def nearest_centres(keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, target: torch.Tensor,
                    order: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each compared row's most redundant merge target, as
    :func:`vllm_kvcompress.policies.reduction.nearest_centres` (same arguments and results).

    keys, values: [num_heads, seq_len, head_dim] (unit last stride); keep_idx: int64 [num_heads,
    num_kept] (-1 padded); target: bool [num_heads, num_kept]; order: int64 [num_heads,
    num_compared] distinct rows per head, candidates first; candidate: bool [num_heads, seq_len].
    Returns float32 [num_heads, seq_len] (-inf where no candidate) and int64 [num_heads, seq_len]."""
    num_heads, seq_len, head_dim = keys.shape
    num_kept, num_compared = keep_idx.shape[1], order.shape[1]
    if values.shape != keys.shape or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} need one shape and unit last strides")
    if target.shape != keep_idx.shape or candidate.shape != (num_heads, seq_len) or order.shape[0] != num_heads:
        raise ValueError("target must be keep_idx's shape, candidate [num_heads, seq_len], order [num_heads, n]")
    best_sim = torch.full((num_heads, seq_len), float("-inf"), device=keys.device)
    best = torch.zeros(num_heads, seq_len, dtype=torch.long, device=keys.device)
    if num_heads == 0 or num_kept == 0 or num_compared == 0:
        return best_sim, best
    keep_idx = keep_idx if keep_idx.stride(-1) == 1 else keep_idx.contiguous()
    order = order if order.stride(-1) == 1 else order.contiguous()
    candidate = (candidate if candidate.stride(-1) == 1 else candidate.contiguous()).view(torch.int8)
    target = target.contiguous().view(torch.int8)
    # one block size whatever the count: a served tick's calls compare from a few rows to thousands,
    # and a size per count compiled inside the serving window (~1 s each on an H100)
    block_n = 64
    grid = (num_heads, triton.cdiv(num_compared, block_n))
    _nearest_centre_kernel[grid](
        keys, values, keep_idx, target, order, candidate, best_sim, best,
        seq_len, num_kept, num_compared,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), keep_idx.stride(0), order.stride(0),
        candidate.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, BLOCK_B=32,
        # fp32 rows (an fp8 pool's, dequantized) get full-precision dots; tf32 errs ~1e-3 in a cosine
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=8,
    )
    return best_sim, best
