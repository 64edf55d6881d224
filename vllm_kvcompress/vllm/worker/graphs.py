"""Persistent buffers of pure-decode steps, so that vLLM can run them as full CUDA graphs.

With ``cuda_graphs`` on, the backend declares ``UNIFORM_SINGLE_TOKEN_DECODE`` support: vLLM then
captures whole decode forwards (all layers) once per batch size and replays them, and no Python
runs between the layers. A replayed graph reads its inputs from the addresses it was captured
with, so every pure-decode step -- captured, replayed or run eagerly -- lays its metadata out in
these buffers, at fixed widths, instead of in fresh tensors:

* ``slots`` int64 [L, rows, H]: where each new token's K/V goes (-1: a padded row, nothing written);
* ``tables`` int32 [L, rows, H, width]: per-head block tables, ``width`` = blocks of the longest
  head a graph step may hold (``cuda_graphs_max_len`` rows, at most ``max_model_len``; a step with a
  longer head runs without the graphs); columns past a head's length are never read;
* ``lens`` int32 [L, rows, H]: rows held after the append (1 for padded rows);
* ``queries`` [L, rows, Hq, D]: every row's query, copied out inside the graph; after the forward
  the rows that record queries for decode-time recompression are moved to the request's ring
  (:meth:`WorkerState.flush_graph_queries`), whose size may change between steps.

Padded rows (vLLM pads a batch up to the next captured size) attend to row 0 of block 0, vLLM's
null block, which no request owns: their outputs are garbage that nothing reads.

Between two layouts that change a request's blocks or lengths, the buffers advance in place
(:meth:`DecodeBuffers.advance`): when the next decode step runs the same requests in the same
order and every head has room for its new row in the blocks it holds (:class:`HeldRows`), its
layout is the last one with one more row a head, made by a few device operations from the tables
already there -- no block assignment, table gather or upload (a 256-request decode step is
host-bound: serving-notes.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeldRows:
    """The requests whose layout the buffers hold (rows 0 .. len - 1, in the step's order), their
    table rows (host int64 [R]), the padded batch, and ``headroom``: the rows every head of theirs
    can still append before one needs a block it does not hold."""

    req_ids: list[str]
    table_rows: torch.Tensor
    padded_rows: int
    headroom: int

    def can_advance(self, req_ids: list[str], padded_rows: int) -> bool:
        return self.headroom > 0 and padded_rows == self.padded_rows and req_ids == self.req_ids


@dataclass
class DecodeBuffers:
    slots: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    queries: torch.Tensor
    held: HeldRows | None = None  # whose layout the buffers hold (None: unknown, a full fill comes next)

    @classmethod
    def allocate(cls, num_layers: int, num_kv_heads: int, num_q_heads: int, head_dim: int, rows: int,
                 width: int, dtype: torch.dtype, device) -> "DecodeBuffers":
        shape = (num_layers, rows, num_kv_heads)
        return cls(slots=torch.full(shape, -1, dtype=torch.int64, device=device),
                   tables=torch.zeros(*shape, width, dtype=torch.int32, device=device),
                   lens=torch.ones(shape, dtype=torch.int32, device=device),
                   queries=torch.zeros(num_layers, rows, num_q_heads, head_dim, dtype=dtype, device=device))

    @property
    def rows(self) -> int:
        return self.slots.shape[1]

    @property
    def width(self) -> int:
        return self.tables.shape[3]

    def fill(self, slots: torch.Tensor | None, tables: torch.Tensor | None, lens: torch.Tensor | None,
             padded_rows: int, held: HeldRows | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy a step's layout (slots [L, R, H], tables [L, R, H, W], lens [L, R, H]; None: no real
        rows, as in capture) into the buffers and mark rows R .. padded_rows as padding; ``held``:
        whose layout it is (None: the buffers will not advance). Returns :meth:`views`."""
        self.held = held
        real = 0 if lens is None else lens.shape[1]
        if padded_rows > self.rows or real > padded_rows:
            raise RuntimeError(f"kv compression: a decode batch of {padded_rows} rows ({real} real) does not fit "
                               f"the {self.rows} rows of the CUDA-graph buffers")
        if real:
            width = tables.shape[3]
            if width > self.width:
                raise RuntimeError(f"kv compression: a head holds {width} blocks, more than the {self.width} "
                                   "columns of the CUDA-graph buffers (cuda_graphs_max_len / block_size)")
            self.slots[:, :real].copy_(slots)
            self.tables[:, :real, :, :width].copy_(tables)
            self.lens[:, :real].copy_(lens)
        if padded_rows > real:
            self.slots[:, real:padded_rows].fill_(-1)
            self.lens[:, real:padded_rows].fill_(1)
            self.tables[:, real:padded_rows, :, 0].fill_(0)
        return self.views(padded_rows)

    def views(self, padded_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots, tables (full width) and lens of rows 0 .. padded_rows - 1."""
        return self.slots[:, :padded_rows], self.tables[:, :padded_rows], self.lens[:, :padded_rows]

    def advance(self, block_size: int) -> None:
        """The held rows' next decode step, in place: one more row in every head (lens + 1), written
        at the slot its tables already hold a block for (``held.headroom`` > 0). Device operations
        only; the caller updates the host's counts."""
        real = len(self.held.req_ids)
        lens = self.lens[:, :real]
        position = lens.long()  # the new row's index in its head: the rows it held
        lens += 1
        block = self.tables[:, :real].gather(3, (position // block_size).unsqueeze(-1)).squeeze(-1)
        torch.add(position % block_size, block, alpha=block_size, out=self.slots[:, :real])
        self.held.headroom -= 1

    def forget(self) -> None:
        """A request's blocks or lengths changed outside a decode step: the next step fills anew."""
        self.held = None
