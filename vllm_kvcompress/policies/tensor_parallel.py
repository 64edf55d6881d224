"""Compression with the model's KV heads split over tensor-parallel ranks.

With vLLM's tensor parallelism each rank holds ``local`` of the ``total`` KV heads of every layer
(rank r: heads ``r * local .. (r + 1) * local - 1``) and compresses its own. What couples heads is
the budget: Ada-KV, EMS's and HeadKV's allocators split a layer's (or the model's) budget between
heads by their scores. So every rank's per-layer scores are gathered (one all-gather of float32
``[layers, local, seq_len]`` per compressed request) and every rank runs the allocator on all
heads, as one GPU would: the budgets, hence the per-head lengths, are those of a single GPU, and
every rank knows all of them. The reducers then keep each rank's heads from its own scores, rows
and budgets.

Where more than the scores couples heads, the rank gathers that too, so every policy compresses
exactly as on one GPU:

* allocators that measure the layers themselves (``Allocator.reads_layers``: ZigZag's lmba /
  lmbo) measure each rank's heads and gather the per-head minima (``[layers, local]`` counts);
* reducers whose heads share a decision (``Reducer.heads_independent`` false: WindowKV's windows,
  shared by a layer's heads, and its task type) decide from every rank's scores (the per-query-head
  rows gathered, ``[local * group, seq_len]`` a layer) and keep this rank's heads' rows.

Decode-time recompression reduces each head alone, from budgets every rank already knows: it
gathers nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadShards:
    """size ranks, this one ``rank``, each holding ``local`` KV heads of every layer.
    all_gather(tensor, dim): vLLM's tensor-parallel group's (None when size is 1)."""

    size: int = 1
    rank: int = 0
    local: int = 1
    all_gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of {self.size} tensor-parallel ranks")
        if self.size > 1 and self.all_gather is None:
            raise ValueError("several tensor-parallel ranks need their group's all_gather")

    @property
    def total(self) -> int:
        return self.size * self.local

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's ``local`` (this rank's heads along ``dim``), concatenated in rank order."""
        return local if not self.sharded else self.all_gather(local.contiguous(), dim)

    def gather_counts(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """:meth:`gather` of an integer tensor of counts below 2**24 (rows), through float32: vLLM's
        CPU communicator gathers floating-point tensors only."""
        if not self.sharded:
            return local
        return self.gather(local.float(), dim).round().to(local.dtype)

    def mine(self, full: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's heads of ``full`` (all heads along ``dim``)."""
        return full if not self.sharded else full.narrow(dim, self.rank * self.local, self.local)

    def slot_rows(self, full: torch.Tensor) -> torch.Tensor:
        """[..., total] -> [..., local]: per local head slot, the most rows any rank's head in that
        slot holds. Each rank assigns the scheduler's blocks to its heads in slot order, so with
        blocks for these rows in every slot the same block ids mean the same slot on every rank."""
        return full if not self.sharded else full.unflatten(-1, (self.size, self.local)).amax(-2)


# One rank holding every head (no tensor parallelism): ``mine`` and ``gather`` give their input back.
SINGLE = HeadShards()
