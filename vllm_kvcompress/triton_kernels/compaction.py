"""In-place compaction of each head's kept rows to the front of its own head-blocks.

Semantics: :func:`vllm_kvcompress.paged.reference.compact`.

One program per head copies kept row ``keep_idx[j]`` to row ``j``, in chunks of ``BLOCK_R`` rows
(256 by default: with 8 warps, 128 KB of K and V in flight per program, which keeps the copy near
the device's copy bandwidth even with fewer heads than SMs; see benchmarks/bench_cache_ops.py).
Reads and writes of one head overlap (``keep_idx[j] >= j``), so the order matters:

* inside a chunk, every row is loaded before any is stored (a barrier between the two), since a
  chunk may read rows it also writes;
* chunk c reads rows ``keep_idx[j] >= j >= c * BLOCK_R`` and earlier chunks only wrote rows
  ``< c * BLOCK_R``, so no chunk reads what an earlier one wrote; and a later chunk's stores come
  after its own barrier, which every earlier load precedes in program order.

Rows with ``keep_idx[j] == j`` (an untouched prefix, say) are not copied at all. Heads are
independent, so many heads in flight keep the copy bandwidth-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Bitwise copies: move rows as integers of the same width (one compiled kernel per width, and no
# float canonicalisation of NaN payloads).
_AS_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# index tensors may be views into a step's packed upload, at any offset: their alignment picks no binary
@triton.jit(do_not_specialize=["stride_table", "stride_keep"],
            do_not_specialize_on_alignment=["table_ptr", "keep_idx_ptr", "keep_len_ptr"])
def _compact_kernel(
    k_ptr, v_ptr, table_ptr, keep_idx_ptr, keep_len_ptr,
    stride_block, stride_row, stride_table, stride_keep,
    ROW: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0)
    n_keep = tl.load(keep_len_ptr + head)
    table = table_ptr + head.to(tl.int64) * stride_table
    d = tl.arange(0, BLOCK_D)
    d_ok = d < ROW
    for start in range(0, n_keep, BLOCK_R):
        j = start + tl.arange(0, BLOCK_R)
        src = tl.load(keep_idx_ptr + head.to(tl.int64) * stride_keep + j, mask=j < n_keep, other=0)
        move = (j < n_keep) & (src != j)
        src_block = tl.load(table + src // BLOCK_SIZE, mask=move, other=0).to(tl.int64)
        dst_block = tl.load(table + j // BLOCK_SIZE, mask=move, other=0).to(tl.int64)
        src_off = src_block * stride_block + (src % BLOCK_SIZE) * stride_row
        dst_off = dst_block * stride_block + (j % BLOCK_SIZE) * stride_row
        m = move[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + src_off[:, None] + d[None, :], mask=m)
        v = tl.load(v_ptr + src_off[:, None] + d[None, :], mask=m)
        tl.debug_barrier()  # all of this chunk's reads happen before any of its writes
        tl.store(k_ptr + dst_off[:, None] + d[None, :], k, mask=m)
        tl.store(v_ptr + dst_off[:, None] + d[None, :], v, mask=m)


def freed_blocks(head_block_table: torch.Tensor, keep_len: torch.Tensor, old_len: torch.Tensor,
                 block_size: int) -> list[torch.Tensor]:
    """Per head, the int64 ids of blocks [cdiv(keep_len), cdiv(old_len)) of its table row.

    head_block_table: int [num_heads, max_blocks]; keep_len, old_len: int [num_heads].
    One host sync (the counts), whatever the number of heads.
    """
    first = (keep_len.long() + block_size - 1) // block_size
    end = (old_len.long() + block_size - 1) // block_size
    col = torch.arange(head_block_table.shape[1], device=head_block_table.device)
    freed = (col[None, :] >= first[:, None]) & (col[None, :] < end[:, None])
    counts = (end - first).clamp(min=0).tolist()
    return list(head_block_table[freed].long().split(counts))


def compact(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
    old_len: torch.Tensor,
    block_rows: int = 256,
) -> list[torch.Tensor]:
    """Move each head's kept rows to the front of its own pages, in place.

    key_cache, value_cache: [num_head_blocks, block_size, head_dim] (same strides; rows contiguous)
    head_block_table: int [num_heads, max_blocks] (one row per (request, layer, head))
    keep_idx:  int [num_heads, max_keep], strictly increasing row indices, padded past keep_len
    keep_len:  int [num_heads];  old_len: int [num_heads] (rows held before compaction)
    returns    per head, the int64 block ids that no longer hold a retained row (to free)
    """
    compact_rows(key_cache, value_cache, head_block_table, keep_idx, keep_len, block_rows)
    return freed_blocks(head_block_table, keep_len, old_len, key_cache.shape[1])


def compact_rows(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
    block_rows: int = 256,
) -> None:
    """:func:`compact` without the freed block ids: one launch, nothing waits for the device (the
    caller knows which blocks it freed)."""
    num_heads = head_block_table.shape[0]
    block_size, head_dim = key_cache.shape[1:]
    if key_cache.stride() != value_cache.stride() or key_cache.dtype != value_cache.dtype:
        raise ValueError("key_cache and value_cache must share dtype and strides")
    if key_cache.stride(2) != 1:
        raise ValueError("cache rows must be contiguous (unit stride on head_dim)")
    if head_block_table.stride(1) != 1 or keep_idx.stride(1) != 1:
        raise ValueError("head_block_table and keep_idx need a unit last stride")
    if num_heads and keep_idx.shape[1]:
        as_int = _AS_INT[key_cache.element_size()]
        _compact_kernel[(num_heads,)](
            key_cache.view(as_int), value_cache.view(as_int), head_block_table, keep_idx,
            keep_len.contiguous(),
            key_cache.stride(0), key_cache.stride(1), head_block_table.stride(0), keep_idx.stride(0),
            ROW=head_dim, BLOCK_SIZE=block_size, BLOCK_R=block_rows,
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=8,
        )
