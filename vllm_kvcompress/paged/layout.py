"""The head-block layout: the one description of the paged, per-head KV cache.

Both the vLLM integration and the kernels (Triton, CUDA, and their PyTorch references) use it.

A *head-block* holds ``block_size`` consecutive retained tokens of ONE (request, layer, KV head).
All head-blocks of a model live in one pool, so memory follows the sum of retained lengths over
requests, layers and heads, not their maximum:

    key_cache, value_cache : [num_head_blocks, block_size, head_dim]   (bf16 / fp16 / fp32)

For one layer of a batch of ``num_seqs`` requests:

    head_block_table : int32 [num_seqs, num_kv_heads, max_blocks_per_head]
        head_block_table[s, h, i] is the pool index of the i-th head-block of request s, head h.
        Entries past ``cdiv(retained_len, block_size)`` are undefined (kernels must not read them).
    retained_len     : int32 [num_seqs, num_kv_heads]
        number of valid tokens of each head; token j of a head sits at
        block head_block_table[s, h, j // block_size], row j % block_size.

Slots: a flat index ``block * block_size + row`` into ``key_cache.view(-1, head_dim)``.
``slot_mapping`` tensors use -1 for "do not write" (an evicted token).

RoPE is applied before the cache write, so a token's position is baked into its key; cache rows
and sequence positions are decoupled and the order of rows inside a head does not matter to
attention (we still keep retained tokens in sequence order, which compaction relies on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_SIZE = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HeadBlockLayout:
    """Shape facts of one model's head-block pool."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeadBlockLayout.{name} must be positive, got {getattr(self, name)}")

    def blocks_for(self, num_tokens: int) -> int:
        """Head-blocks one head needs to hold ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.block_size)

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        """Bytes of one head-block, K and V together."""
        return 2 * self.block_size * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def allocate_pool(self, num_head_blocks: int, dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Empty (key_cache, value_cache), each [num_head_blocks, block_size, head_dim]."""
        shape = (num_head_blocks, self.block_size, self.head_dim)
        return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)


def slots_for_positions(head_block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of logical row ``positions`` of each head.

    head_block_table: [..., max_blocks]; positions: [..., n] (int, -1 = none) -> [..., n] int64 (-1 kept).
    """
    valid = positions >= 0
    pos = positions.clamp(min=0).long()
    blocks = torch.gather(head_block_table.long(), -1, pos // block_size)
    slots = blocks * block_size + pos % block_size
    return torch.where(valid, slots, torch.full_like(slots, -1))
