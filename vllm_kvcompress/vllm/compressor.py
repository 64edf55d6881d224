"""Compression of a request's head-blocks once its prefill is complete, with the policy library.

Called after the forward of the step in which the last prefill chunk ran (connector
``wait_for_save``), so every layer's K/V of the request is in its head-blocks and the global
allocators (PyramidKV, Ada-KV, ZigZag, HeadKV) see all layers at once. For each request:

1. gather each (layer, head)'s rows into a dense :class:`LayerObservation` (window queries and,
   for EMS, the causal column mass were stashed by the backend during prefill);
2. ``Policy.compress`` -> per layer keep_idx / keys / values / lengths (merged rows for EMS);
3. write each head's retained rows to the front of its own blocks (in place; kept rows only move
   forward, and the dense copy was taken first) and move the tail blocks to the spare list.

The connector then reports surplus spares to the scheduler. Positions are untouched: RoPE is baked
into the cached keys and vLLM keeps counting positions from the true sequence length.
"""
from __future__ import annotations

import torch

from ..observation import LayerObservation
from ..paged import reference
from ..paged.layout import slots_for_positions
from . import runtime
from .state import WorkerState


def gather_layer(ws: WorkerState, rid: str, layer: int, key_cache, value_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys, values [H, T, D] of an uncompressed request's layer (every head holds T rows)."""
    st = ws.reqs[rid]
    table = ws.table(rid, layer, max(len(b) for b in st.blocks[layer])).to(key_cache.device)
    keys = torch.stack([reference.gather_head(key_cache, table[h], st.lens[layer][h]) for h in range(ws.H)])
    values = torch.stack([reference.gather_head(value_cache, table[h], st.lens[layer][h]) for h in range(ws.H)])
    return keys, values


def compress_request(ws: WorkerState, rid: str) -> None:
    st = ws.reqs[rid]
    key_cache, value_cache = ws.pool[0], ws.pool[1]
    held_before = sum(len(b) for per_layer in st.blocks for b in per_layer)
    observations = []
    for l in range(ws.L):
        if any(n != st.num_tokens for n in st.lens[l]):
            raise RuntimeError(f"request {rid}: layer {l} holds {st.lens[l]} rows, expected {st.num_tokens} each")
        keys, values = gather_layer(ws, rid, l, key_cache, value_cache)
        observations.append(LayerObservation(st.queries[l], keys, values, l, st.global_attention.get(l)))
    retained = st.policy.compress(observations)
    for l, kept in enumerate(retained):
        lengths = kept.lengths.tolist()
        width = max(lengths)
        table = ws.table(rid, l, max(len(b) for b in st.blocks[l])).to(key_cache.device)
        positions = torch.arange(width, device=key_cache.device).expand(ws.H, -1)
        positions = torch.where(positions < kept.lengths[:, None].to(positions.device), positions, -1)
        slots = slots_for_positions(table, positions, ws.bs)  # [H, width]
        reference.write_tokens(kept.keys[:, :width].transpose(0, 1), kept.values[:, :width].transpose(0, 1),
                               slots.transpose(0, 1), key_cache, value_cache)
        for h, n in enumerate(lengths):
            ws.compacted(rid, l, h, int(n))
    st.compressed = True
    st.queries.clear()
    st.global_attention.clear()
    runtime.event("compressed", req_id=rid, tokens=st.num_tokens, chunks=st.prefill_chunks, blocks_before=held_before,
                  blocks_after=sum(len(b) for per_layer in st.blocks for b in per_layer),
                  lens=[list(row) for row in st.lens])


def compress_pending(ws: WorkerState) -> None:
    """Compress every request whose prefill completed in this step."""
    pending, ws.pending = ws.pending, []
    for rid in pending:
        if rid in ws.reqs:
            compress_request(ws, rid)
