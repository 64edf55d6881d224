"""Compression of a request's head-blocks, with the policy library.

After the prefill (:func:`compress_request`): called after the forward of the step in which the
last prefill chunk ran (connector ``wait_for_save``), so every layer's K/V of the request is in its
head-blocks and the global allocators (PyramidKV, Ada-KV, ZigZag, HeadKV) see all layers at once:

1. gather each layer's rows into a dense :class:`LayerObservation` (window queries and, for EMS,
   the causal column mass were stashed by the backend during prefill);
2. ``Policy.compress`` -> per layer keep_idx / keys / values / lengths (merged rows for EMS);
3. write each head's retained rows to the front of its own blocks (in place; the dense copy was
   taken first) and move the tail blocks to the spare list.

During decode (:func:`recompress_requests`, when ``decode_slack`` is set): a head holding more than
its budget + slack rows is brought back to its budget with its query heads' recent queries, as
``hf.generate(recompress_slack=...)`` does; the heads due go through the policy in one call
whatever their layer, request and length (padded at the front; equal lengths only for reducers
that need them, WindowKV's), and ``Policy.recompress_heads`` keeps each head's result its own.
The connector then reports surplus spares to the scheduler. Positions are untouched: RoPE is baked into the cached keys and vLLM keeps counting
positions from the true sequence length.
"""
from __future__ import annotations

import torch

from ..observation import LayerObservation
from ..paged import reference
from ..paged.layout import slots_for_positions
from . import kernels, runtime
from .state import WorkerState


def write_rows(ws: WorkerState, row: int | torch.Tensor, layers: torch.Tensor, heads: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> None:
    """Write rows ``0 .. lengths[i]-1`` of keys/values [n, >=max(lengths), D] to the front of KV head
    ``heads[i]`` of layer ``layers[i]`` of the request in table row ``row`` (or ``row[i]``: one per
    head), in the head's own blocks, in place."""
    width = int(lengths.max())
    device = ws.pool.device
    positions = torch.arange(width, device=device).expand(len(heads), -1)
    positions = torch.where(positions < lengths.to(device)[:, None], positions, -1)
    row = row.to(ws.device) if isinstance(row, torch.Tensor) else row
    table = ws.tables[row, layers.to(ws.device), heads.to(ws.device)]  # [n, max_blocks]
    slots = slots_for_positions(table, positions, ws.bs)  # [n, width]
    kernels.write_tokens(keys[:, :width].transpose(0, 1), values[:, :width].transpose(0, 1),
                         slots.transpose(0, 1), ws.pool[0], ws.pool[1])


def _finish(ws: WorkerState, rid: str, keep: torch.Tensor, what: str) -> None:
    """Shrink the bookkeeping to ``keep`` [L, H] rows, count and log the compression."""
    st = ws.reqs[rid]
    rows_before, blocks_before = int(st.lens.sum()), int(st.num_blocks.sum())
    ws.compacted_heads(rid, keep)
    if st.decode_budget is not None:  # the first length at which a head will exceed budget + slack
        st.recompress_at = st.num_tokens + int((st.decode_budget + st.decode_slack + 1 - st.lens).min())
    rows_after, blocks_after = int(st.lens.sum()), int(st.num_blocks.sum())
    runtime.record_compression(rows_before, rows_after)
    runtime.logger.debug("kv compression (%s) of request %s at %d tokens: %d/%d rows kept (%.1f%%), %d of %d "
                         "head-blocks freed", what, rid, st.num_tokens, rows_after, rows_before,
                         100.0 * rows_after / max(rows_before, 1), blocks_before - blocks_after, blocks_before)
    runtime.event("compressed", what=what, req_id=rid, tokens=st.num_tokens, chunks=st.prefill_chunks,
                  blocks_before=blocks_before, blocks_after=blocks_after, lens=st.lens.tolist())


def compress_request(ws: WorkerState, rid: str) -> None:
    st = ws.reqs[rid]
    if bool((st.lens != st.num_tokens).any()):
        raise RuntimeError(f"request {rid}: heads hold {st.lens.tolist()} rows, expected {st.num_tokens} each")
    observations = []
    for l in range(ws.L):  # every head holds num_tokens rows
        keys, values = (reference.gather_heads(cache, ws.tables[st.row, l], st.num_tokens) for cache in ws.pool)
        observations.append(LayerObservation(st.queries[l], keys, values, l, st.global_attention.get(l)))
    retained = st.policy.compress(observations)
    for l, kept in enumerate(retained):
        write_rows(ws, st.row, torch.full((ws.H,), l), torch.arange(ws.H), kept.keys, kept.values, kept.lengths)
    keep = torch.stack([kept.lengths.cpu() for kept in retained])
    if st.decode_slack is not None:
        st.decode_budget = st.policy.decode_budgets(keep, st.num_tokens)
        _start_recent(ws, st)
    st.compressed = True
    st.queries.clear()
    st.global_attention.clear()
    _finish(ws, rid, keep, "prefill")


def _start_recent(ws: WorkerState, st) -> None:
    """Seed the request's ring of recent queries with the prefill's last window of queries."""
    first = st.queries[0]  # [Hq, <=window, D]
    ws.ensure_recent(st.policy.window, first.shape[0], first.shape[-1], first.dtype)
    count = first.shape[1]
    for l in range(ws.L):
        ws.recent[l, st.row, :count] = st.queries[l].transpose(0, 1)
    st.recent_count = count


def _gather_padded(cache: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """Rows of heads of different lengths, each right-aligned: [n_heads, max(lengths), D], head i's
    ``lengths[i]`` rows last, zeros before them (``LayerObservation.lengths``)."""
    width = int(lengths.max())
    positions = torch.arange(width, device=table.device)[None, :] - (width - lengths.to(table.device))[:, None]
    slots = slots_for_positions(table, positions, block_size)  # -1 before each head's rows
    rows = cache.flatten(0, 1)[slots.clamp(min=0)]
    return rows.masked_fill((slots < 0)[..., None], 0)


def _max_rows(ws: WorkerState, count: int) -> int | None:
    """Padded rows one recompression call may gather: its dense K/V and window-score temporaries
    (logits, probabilities, powers: float32 per query) stay within the compression workspace that
    vLLM's profiling run reserved. None: no limit (a WorkerState without a workspace, in tests)."""
    if not ws.workspace_bytes:
        return None
    head_dim, itemsize = ws.pool.shape[-1], ws.pool.element_size()
    group = ws.recent.shape[3] // ws.H  # query heads per KV head (the rings exist once a request is due)
    return max(1, ws.workspace_bytes // (2 * head_dim * itemsize + 3 * group * max(count, 1) * 4))


def _calls(lengths: torch.Tensor, max_rows: int | None) -> list[torch.Tensor | None]:
    """How the heads of one group split into policy calls: [None] (all at once, in order) when
    ``len(lengths) * max(lengths)`` padded rows fit in ``max_rows``; else runs of heads of similar
    length, longest first, each within it (a head longer than it alone)."""
    longest = int(lengths.max())
    if max_rows is None or len(lengths) * longest <= max_rows:
        return [None]
    order = lengths.argsort(descending=True, stable=True)
    parts, start = [], 0
    while start < len(order):
        fit = max(1, max_rows // int(lengths[order[start]]))
        parts.append(order[start:start + fit])
        start += fit
    return parts


def _recompress_heads(ws: WorkerState, policy, count: int, rows: torch.Tensor, layers: torch.Tensor,
                      heads: torch.Tensor, lengths: torch.Tensor, oldest: torch.Tensor, budgets: torch.Tensor) -> None:
    """One policy call: heads (table ``rows``, ``layers``, ``heads``, each holding ``lengths`` rows,
    its ring's oldest of ``count`` queries at ``oldest``) brought back to ``budgets``, in place."""
    uniform = bool((lengths == lengths[0]).all())
    order = (oldest[:, None] + torch.arange(count)) % policy.window
    group = ws.recent.shape[3] // ws.H
    q_heads = heads[:, None] * group + torch.arange(group)  # [n_heads, group]
    rows_d, layers_d, heads_d, order_d, q_heads_d = (x.to(ws.device) for x in (rows, layers, heads, order, q_heads))
    table = ws.tables[rows_d, layers_d, heads_d]  # [n_heads, max_blocks]
    if uniform:
        keys, values = (reference.gather_heads(cache, table, int(lengths[0])) for cache in ws.pool)
    else:
        keys, values = (_gather_padded(cache, table, lengths, ws.bs) for cache in ws.pool)
    # ring [L, rows, W, Hq, D] -> each head's query heads, oldest query first: [n_heads, group, count, D]
    queries = ws.recent[layers_d[:, None, None], rows_d[:, None, None], order_d[:, None, :],
                        q_heads_d[:, :, None]].flatten(0, 1)
    kept_keys, kept_values = policy.recompress_heads(queries, keys, values, budgets, None if uniform else lengths)
    write_rows(ws, rows, layers, heads, kept_keys, kept_values, budgets)


def recompress_requests(ws: WorkerState, rids: list[str]) -> list[str]:
    """Bring the heads over budget + slack of these requests back to their budgets. Heads with the
    same policy and number of recent queries go through the policy in ONE call, whatever their
    request, layer or length (padded, :func:`_gather_padded`; of one length per call for reducers
    without ``pads_heads``; split by :func:`_calls` where they would outgrow the compression
    workspace), so the requests due in a step cost one round of launches.
    ``Policy.recompress_heads`` keeps each head's result its own. Returns the requests that had a
    head over its limit."""
    groups: dict[tuple, list] = {}  # (policy, rows or None: any, queries) -> [(request, layers, heads, rows)]
    keep = {}
    for rid in rids:
        st = ws.reqs[rid]
        over = st.lens > st.decode_budget + st.decode_slack
        if not bool(over.any()):
            continue
        keep[rid] = st.lens.clone()
        count = min(st.recent_count, st.policy.window)
        pairs, lengths = over.nonzero(), st.lens[over]  # (layer, head) of every head over its limit
        if st.policy.reducer.pads_heads:
            layers, heads = pairs.unbind(1)
            groups.setdefault((id(st.policy), None, count), []).append((rid, layers, heads, lengths))
            continue
        for n in sorted(set(lengths.tolist())):
            layers, heads = pairs[lengths == n].unbind(1)
            groups.setdefault((id(st.policy), n, count), []).append((rid, layers, heads, lengths[lengths == n]))
    for (_, _, count), members in groups.items():
        policy = ws.reqs[members[0][0]].policy
        sizes = [len(layers) for _, layers, _, _ in members]
        member = torch.arange(len(members)).repeat_interleave(torch.tensor(sizes))  # each head's member
        layers, heads, lengths = (torch.cat([m[i] for m in members]) for i in (1, 2, 3))
        budgets = torch.cat([ws.reqs[rid].decode_budget[l, h] for rid, l, h, _ in members])
        rows = torch.tensor([ws.reqs[rid].row for rid, _, _, _ in members])[member]
        oldest = torch.tensor([ws.reqs[rid].recent_count - count for rid, _, _, _ in members])[member]
        for part in _calls(lengths, _max_rows(ws, count)):
            _recompress_heads(ws, policy, count, *(x if part is None else x[part]
                                                   for x in (rows, layers, heads, lengths, oldest, budgets)))
        for (rid, l, h, _), kept in zip(members, budgets.split(sizes)):
            keep[rid][l, h] = kept
    for rid, rows_kept in keep.items():
        _finish(ws, rid, rows_kept, "decode")
    return list(keep)


def compress_pending(ws: WorkerState) -> None:
    """Compress every request whose prefill completed in this step, and recompress decoding heads
    that outgrew their budget + slack."""
    pending, ws.pending = ws.pending, []
    for rid in pending:
        if rid in ws.reqs:
            compress_request(ws, rid)
    recompress_requests(ws, [rid for rid, st in ws.reqs.items()
                             if st.decode_budget is not None and st.num_tokens >= st.recompress_at and rid not in pending])
