"""The recent queries of many KV heads, read where the worker keeps them: :class:`QueryRing`.

Decode-time recompression scores each head with its query heads' last queries. The worker keeps
them in a ring, [L, rows, slots, Hq, D] (a request's row, its decode queries wrapping around its
policy's first ``window`` slots). A tick of 256 Llama-3-8B requests scores 65k heads: copying
their queries out, [n, group, count, D], would be 2 GB written and read again. The scoring kernel
reads them in place instead (:func:`~vllm_kvcompress.triton_kernels.paged_window_scores.paged_window_scores`);
:meth:`QueryRing.dense` is that copy, for the PyTorch reference and the dense policy calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QueryRing:
    """n KV heads' recent queries in ``ring`` [L, rows, slots, Hq, D].

    layers, rows, heads: int64 [n] on the ring's device, each head's layer, request row and KV head;
    oldest: int64 [n] on the ring's device, the ring position (before ``% window``) of each head's
    oldest query; count: queries per query head (the newest is the head's last row);
    window: the slots the heads' requests wrap around (their policy's window); group: query heads
    per KV head (KV head h owns query heads ``h * group .. h * group + group - 1``)."""

    ring: torch.Tensor
    layers: torch.Tensor
    rows: torch.Tensor
    heads: torch.Tensor
    oldest: torch.Tensor
    count: int
    window: int
    group: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(n, group, count, D): the shape of :meth:`dense`."""
        return len(self.layers), self.group, self.count, self.ring.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.ring.dtype

    def starts(self) -> torch.Tensor:
        """int64 [n]: the element offset in ``ring`` of each head's first query head at slot 0."""
        stride = self.ring.stride()
        return self.layers * stride[0] + self.rows * stride[1] + self.heads * (self.group * stride[3])

    def first_slots(self) -> torch.Tensor:
        """int64 [n]: the slot of each head's oldest query."""
        return self.oldest % self.window

    def dense(self) -> torch.Tensor:
        """[n, group, count, D]: each head's query heads' queries, oldest first (a copy)."""
        device = self.ring.device
        order = (self.first_slots()[:, None] + torch.arange(self.count, device=device)) % self.window
        q_heads = self.heads[:, None] * self.group + torch.arange(self.group, device=device)
        return self.ring[self.layers[:, None, None], self.rows[:, None, None], order[:, None, :], q_heads[:, :, None]]


def dense_queries(queries: torch.Tensor | QueryRing) -> torch.Tensor:
    """[n, group, count, D]: ``queries`` as given, or copied out of a :class:`QueryRing`."""
    return queries.dense() if isinstance(queries, QueryRing) else queries
