"""Compression of requests' head-blocks, with the policy library: :class:`Compressor`.

After every forward (connector ``wait_for_save``, :meth:`Compressor.after_forward`) it compresses
the requests whose prefill completed in the step, then recompresses the decoding requests that are
due on the worker's cadence.

After the prefill (:meth:`Compressor.compress_prefills`, every request the step completes): every
layer's K/V of the request is in its head-blocks and the global allocators (PyramidKV, Ada-KV,
ZigZag, HeadKV) see all layers at once. The fewer calls the better -- on a GPU a compression's cost
is its launches, not its arithmetic -- so the request goes the first of these ways its policy allows:

* reducers that only select rows (SnapKV, PyramidKV, Ada-KV, HeadKV, StreamingLLM): every head
  scored from its pages in one call (:class:`PagedHeads`), the kept rows moved in place; the
  requests of one policy that the step completes, all in that one call;
* reducers that decide each head alone but write rows (EMS's merges): every head scored from its
  pages in one call, the budgets allocated, then the heads gathered densely, reduced and written
  back as many layers per call as the compression workspace holds;
* the rest (WindowKV's shared windows, allocators that read the layers): each layer gathered into
  a dense :class:`LayerObservation` (window queries and the prefill signals, e.g. EMS's column
  mass, were stashed by the backend), ``Policy.compress_shard``, each head's retained rows written
  to the front of its own blocks (the dense copy was taken first).

Then the tail blocks move to the spare list.

During decode (:meth:`Compressor.recompress`, when ``decode_slack`` is set): every ``decode_slack``
engine steps (the worker's step counter; :meth:`Request.on_cadence`), every head over its budget is
brought back to it with its query heads' recent queries, as ``hf.generate(recompress_slack=...,
recompress_phase=...)`` does on the same cadence. All requests come due in the same steps, and the
heads due go through the policy in one call whatever their layer, request and length (padded at
the front; equal lengths only for reducers that need them, WindowKV's), and
``Policy.recompress_heads`` keeps each head's result its own.
Under tensor parallelism (``WorkerState.shards``) each rank compresses its own heads: the prefill
compression gathers every rank's scores once and allocates the budgets of all heads on every rank
(``Policy.compress_shard`` / ``select_prefills``), and decode-time recompression needs nothing of
the other ranks (the budgets are known; each head is reduced on its own). Every rank then knows
every head's rows, so all size their blocks alike (:class:`~.request.Request`).
The connector then reports surplus spares to the scheduler. Positions are untouched: RoPE is baked into the cached keys and vLLM keeps counting
positions from the true sequence length.

An fp8 pool (``--kv-cache-dtype fp8``) holds e4m3 rows with one K and one V scale per layer
(:meth:`WorkerState.cache_scales`): the policies see the rows dequantized (float32), rows written
back (a reducer's kept or merged rows) are quantized with their own layer's scales, and compaction
moves the stored bytes.
"""
from __future__ import annotations

import torch

from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.paged import compaction, reference
from vllm_kvcompress.paged.heads import PagedHeads
from vllm_kvcompress.paged.query_ring import QueryRing
from vllm_kvcompress.paged.layout import slots_for_positions
from vllm_kvcompress.triton_kernels import runs_on
from vllm_kvcompress.vllm.attention import kernels
from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.worker.request import Request
from vllm_kvcompress.vllm.worker.state import WorkerState


def head_scales(scales: torch.Tensor | None, layers: torch.Tensor | int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The K and V scales an fp8 pool stores heads of ``layers`` with (int64 [n] on the device:
    float32 [n] each; one layer index: one element each), from ``scales``
    (:meth:`WorkerState.cache_scales`); (None, None) for a pool of values (``scales`` None)."""
    if scales is None:
        return None, None
    k_scale, v_scale = scales[:, layers].contiguous()
    return k_scale, v_scale


def write_rows(state: WorkerState, table: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               lengths: torch.Tensor, scales: tuple = (None, None)) -> None:
    """Write rows ``0 .. lengths[i]-1`` of keys/values [n, >=max(lengths), D] to the front of the
    heads whose block tables are ``table`` [n, max_blocks] (on the device), in place. ``lengths``:
    int [n] on the device -- the write is sized by the keys' columns, so nothing waits for the
    device to learn them; ``scales``: the heads' (K, V) scales in an fp8 pool (:func:`head_scales`)."""
    device = state.pool.device
    positions = torch.arange(keys.shape[1], device=device).expand(table.shape[0], -1)
    positions = torch.where(positions < lengths.to(device, non_blocking=True)[:, None], positions, -1)
    slots = slots_for_positions(table, positions, state.bs)  # [n, keys' columns]
    kernels.write_tokens(keys.transpose(0, 1), values.transpose(0, 1), slots.transpose(0, 1), state.pool[0],
                         state.pool[1], *scales)


PAGED_ROW_BYTES = 8 * 4 + 3 * 4  # a row scored from the pages: scores, pooled, masked, sort keys and indices; protected, padding
MERGE_ROW_BYTES = 10 * 8  # a row of EMS's merge through its kernels: weight, top_mass's sort and sums, candidate order, nearest centre and its redundancy, class, the merge's sort keys and order


def _max_rows(state: WorkerState, policy, count: int, width: int, fewest_kept: int) -> int | None:
    """Padded rows one recompression call may hold, so that its temporaries stay within the
    compression workspace that vLLM's profiling run reserved. Policies that score from the pages
    (``Policy.scores_from_pages``) hold their float32 scores and a few companions of one row each
    (:class:`PagedHeads`); the others a
    dense copy of K and V, the scores (from the pages, or window-score temporaries -- logits,
    probabilities, powers: float32 per query -- for scorers that read the keys) and, for a merge,
    on CUDA (its kernels: nothing of size rows x kept rows) the merged rows and a few companions of
    each row (:data:`MERGE_ROW_BYTES`), elsewhere (the reference) the similarity of each row that
    can merge (at most ``width - fewest_kept`` of a head's) to every kept row, with float32 copies
    of the rows compared. None: no limit (a WorkerState without a workspace, in tests)."""
    if not state.workspace_bytes:
        return None
    group = state.recent.shape[3] // state.H  # query heads per KV head (the rings exist once a request is due)
    if policy.scores_from_pages:
        per_row = PAGED_ROW_BYTES
    else:
        head_dim = state.pool.shape[-1]
        itemsize = 4 if state.layer_scales else state.pool.element_size()  # an fp8 pool's rows gather as float32
        # scorers that read no keys score from the pages (no dense window-score temporaries)
        scoring = 3 * group * max(count, 1) * 4 if policy.scorer.reads_keys else PAGED_ROW_BYTES
        per_row = 2 * head_dim * itemsize + scoring
        if policy.reducer.merges_rows:
            per_row += (2 * head_dim * itemsize + MERGE_ROW_BYTES if runs_on(state.pool)
                        else 4 * (width - fewest_kept) + 4 * 4 * head_dim)
    return max(1, state.workspace_bytes // per_row)


def _prefill_heads_per_call(state: WorkerState, policy, seq_len: int, fp8: bool, requests: int = 1) -> int:
    """Heads (whole layers) one dense reduction of the prefills of ``requests`` requests holds at
    once (:meth:`Compressor._reduce_prefill_apart`), so that its temporaries stay within the
    compression workspace: per head its K and V as gathered (float32 from an fp8 pool), float32
    copies of them (merges weigh rows in float32) and a few rows of masks and indices; per call the
    reducer's own blocks (:meth:`~vllm_kvcompress.policies.reduction.Reducer.block_bytes`). All
    heads: a WorkerState without a workspace (tests). ``fp8``: the pool holds e4m3 rows."""
    if not state.workspace_bytes:
        return requests * state.L * state.H
    head_dim = state.pool.shape[-1]
    gathered = 4 if fp8 else state.pool.element_size()
    per_head = seq_len * (2 * head_dim * (gathered + 4) + 64)
    layers = (state.workspace_bytes - policy.reducer.block_bytes) // (per_head * state.H)
    return min(requests * state.L, max(1, layers)) * state.H


def _prefill_batches(state: WorkerState, lengths: list[int]) -> list[slice]:
    """Runs of requests (in order, of prompts ``lengths``) whose heads, right-aligned to the run's
    longest prompt, one selection from the pages holds within the compression workspace
    (:data:`PAGED_ROW_BYTES` a row); a request alone always goes. All at once: a WorkerState
    without a workspace (tests)."""
    if not state.workspace_bytes:
        return [slice(0, len(lengths))]
    most, heads = state.workspace_bytes // PAGED_ROW_BYTES, state.L * state.H
    runs, start, width = [], 0, 0
    for end, length in enumerate(lengths):
        if end > start and (end - start + 1) * heads * max(width, length) > most:
            runs.append(slice(start, end))
            start, width = end, 0
        width = max(width, length)
    return runs + [slice(start, len(lengths))]


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


def _recompress_heads(state: WorkerState, policy, count: int, rows: torch.Tensor, layers: torch.Tensor,
                      heads: torch.Tensor, lengths: torch.Tensor, oldest: torch.Tensor, budgets: torch.Tensor) -> None:
    """One policy call: heads (table ``rows``, ``layers``, ``heads``, each holding ``lengths`` rows,
    its ring's oldest of ``count`` queries at ``oldest``) brought back to ``budgets``, in place.

    Everything the call needs is known on the host (the heads, their lengths and budgets), so it
    only launches work: the indices travel in one pinned copy, and nothing waits for the device.
    Policies that score from the pages (``Policy.scores_from_pages``: row-selecting reducers,
    scorers that read no keys) score the heads there (:class:`PagedHeads`) and move the kept rows
    to the front in place; the others (merges, shared windows, key scores) go through a dense,
    right-aligned copy of the heads and write their results back -- scored from the pages too
    unless their scorer reads the keys."""
    width = int(lengths.max())
    group = state.recent.shape[3] // state.H
    on_cuda = state.device.type == "cuda"
    with runtime.TIMER.device("tick_gather_ms", on_cuda):
        # per head only: where its queries sit in the ring is worked out on the device (a tick of 256
        # requests has 65k heads, whose [heads, count] slots alone were a 17 MB host tensor to copy)
        dev = state.upload({"rows": rows, "layers": layers, "heads": heads, "lengths": lengths, "budgets": budgets,
                            "oldest": oldest})
        table = state.tables[dev["rows"], dev["layers"], dev["heads"], : -(-width // state.bs)]  # [n_heads, blocks]
        queries = QueryRing(state.recent, dev["layers"], dev["rows"], dev["heads"], dev["oldest"], count,
                            policy.window, group)
        k_scale, v_scale = head_scales(state.cache_scales(), dev["layers"])
        # a scorer that reads no keys scores the heads from their pages (one kernel, not the dense
        # window scores, whose temporaries would split a tick into several times the calls)
        paged = None if policy.scorer.reads_keys else PagedHeads(queries, state.pool[0], table, dev["lengths"], width,
                                                                 k_scale)
    if policy.scores_from_pages:
        with runtime.TIMER.device("tick_score_ms", on_cuda):
            keep = policy.select_heads(paged, budgets)  # columns of the right-aligned layout
        with runtime.TIMER.device("tick_write_ms", on_cuda):
            own_rows = keep - (width - dev["lengths"])[:, None]  # -1 padding stays out of each head's budget
            compaction.compact_rows(state.pool[0], state.pool[1], table, own_rows.contiguous(), dev["budgets"])
        return
    with runtime.TIMER.device("tick_score_ms", on_cuda):
        uniform = bool((lengths == lengths[0]).all())
        scored = None if paged is None else policy.decode_scores(paged)  # the reducer gets the dense rows alone
        keys, values = kernels.gather_heads_padded(state.pool[0], state.pool[1], table, dev["lengths"], width,
                                                   k_scale, v_scale)
        # heads scored from their pages: no reducer reads queries, so a broadcast zero stands for
        # the copy of them ([heads x group, count, D]: GBs at a 256-request tick)
        dense_queries = (queries.dense().flatten(0, 1) if scored is None
                         else keys.new_zeros(()).expand(len(rows) * group, count, keys.shape[-1]))
        kept_keys, kept_values = policy.recompress_heads(dense_queries, keys, values, budgets,
                                                         None if uniform else dev["lengths"], scored)
    with runtime.TIMER.device("tick_write_ms", on_cuda):
        write_rows(state, table, kept_keys, kept_values, dev["budgets"], (k_scale, v_scale))


class Compressor:
    """Runs the policies over a :class:`WorkerState`'s requests, after each forward."""

    def __init__(self, state: WorkerState):
        self.state = state

    def after_forward(self) -> list[str]:
        """Compress the requests whose prefill completed in this step, then recompress the decoding
        ones due on this step of the cadence. Returns the requests recompressed."""
        state = self.state
        pending, state.pending = state.pending, []
        on_cuda = state.device.type == "cuda"
        with runtime.TIMER.device("compress_ms", on_cuda):
            self.compress_prefills([rid for rid in pending if rid in state.reqs])
        due = [rid for rid, request in state.reqs.items() if request.on_cadence(state.step) and rid not in pending]
        if not due:
            return []
        with runtime.TIMER.host("recompress_host_ms"), runtime.TIMER.device("recompress_ms", on_cuda):
            done = self.recompress(due)
        runtime.TIMER.note(recompressed_requests=len(done))
        return done

    def compress_prefill(self, rid: str) -> None:
        """:meth:`compress_prefills` of one request."""
        self.compress_prefills([rid])

    def compress_prefills(self, rids: list[str]) -> None:
        """Compress the requests whose prefill completed in this step. Requests of one policy whose
        reducer only selects rows go through :meth:`_select_prefill` together -- one scoring, one
        selection and one compaction for all (a step completes several prompts, and on a GPU a
        compression's cost is its launches) -- as long as their heads can share one right-aligned
        observation (the same number of window queries; prefill signals only at one length) and
        fit the compression workspace (:func:`_prefill_batches`); the others one by one. The
        bookkeeping of all of them runs at once (:meth:`_finish`)."""
        state = self.state
        requests = [state.reqs[rid] for rid in rids]
        keep: list[torch.Tensor | None] = [None] * len(rids)  # rows kept per head, int64 [L, all KV heads]
        together: dict[tuple, list[int]] = {}  # -> positions in rids
        for i, (rid, request) in enumerate(zip(rids, requests)):
            if bool((request.lens != request.num_tokens).any()):
                raise RuntimeError(f"request {rid}: heads hold {request.lens.tolist()} rows, expected "
                                   f"{request.num_tokens} each")
            policy = request.policy
            queries = request.queries[0].shape[1]
            if policy.scores_from_pages and not policy.allocator.reads_layers:
                length = request.num_tokens if policy.observes else None  # prefill signals are not padded
                together.setdefault((self._select_prefill, id(policy), queries, length), []).append(i)
            elif policy.compresses_heads_apart:  # dense reductions take prompts of one length
                together.setdefault((self._reduce_prefill_apart, id(policy), queries, request.num_tokens), []).append(i)
            else:
                keep[i] = self._reduce_prefill(request)
        for (compress, *_), members in together.items():
            for run in _prefill_batches(state, [requests[i].num_tokens for i in members]):
                for i, kept in zip(members[run], compress([requests[i] for i in members[run]])):
                    keep[i] = kept
        for request, kept in zip(requests, keep):
            if request.decode_slack is not None:
                self._seed_ring(request)
            request.compressed_to(request.policy.decode_budgets(kept, request.num_tokens))
        if rids:
            self._finish(rids, torch.stack(keep), "prefill")

    def _prefill_heads(self, requests: list[Request], k_scale: torch.Tensor | None) -> PagedHeads:
        """Every head of the requests, [R * L * H] request-major then layer-major, as one observation
        read from their pages (whole prompts, each right-aligned to the longest), with the prefill's
        window queries and signals; ``k_scale``: one request's heads' key scales of an fp8 pool
        (:meth:`_head_scales`), else None."""
        state = self.state
        heads = state.L * state.H
        width = max(request.num_tokens for request in requests)
        table = torch.cat([state.tables[request.row].reshape(heads, -1)[:, : -(-width // state.bs)]
                           for request in requests])
        queries = torch.stack([request.queries[l] for request in requests for l in range(state.L)])  # [R * L, Hq, window, D]
        queries = queries.view(len(requests) * heads, queries.shape[1] // state.H, *queries.shape[2:])
        if len(requests) == 1:  # made on the device: nothing to copy
            lengths = torch.full((heads,), width, dtype=torch.int64, device=state.pool.device)
        else:
            lengths = state.upload({"lengths": torch.tensor([request.num_tokens for request in requests])
                                    .repeat_interleave(heads)})["lengths"]
        signals = {name: torch.cat([request.signals[l][name] for request in requests for l in range(state.L)])
                   for name in requests[0].policy.observes}
        if k_scale is not None:
            k_scale = k_scale.repeat(len(requests))
        return PagedHeads(queries, state.pool[0], table, lengths, width, k_scale, **signals)

    def _head_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The K and V scales of every head of a request, [L * H] layer-major (None, None: not fp8)."""
        state = self.state
        return head_scales(state.cache_scales(), torch.arange(state.L, device=state.pool.device).repeat_interleave(state.H))

    def _select_prefill(self, requests: list[Request]) -> list[torch.Tensor]:
        """Reducers that only select rows: every head of the requests (one policy) scored from its
        pages in one observation (:class:`PagedHeads`), the kept rows moved to the front in place.
        Returns each request's rows kept per head, int64 [L, all KV heads] (host)."""
        state = self.state
        heads = self._prefill_heads(requests, self._head_scales()[0])
        keep_idx, budgets = requests[0].policy.select_prefills(heads, [request.num_tokens for request in requests],
                                                               state.L, state.shards)
        # budgets that the allocator made on the host (e.g. uniform ones) travel without waiting for the
        # device: a blocking copy would hold the host until the step's forward is done
        budgets = [b.cpu() for b in budgets]
        mine = state.upload({"budgets": torch.cat([state.shards.mine(b).flatten() for b in budgets])})["budgets"]
        keep_idx = keep_idx - (heads.width - heads.lengths)[:, None]  # right-aligned columns -> each head's own rows
        compaction.compact_rows(state.pool[0], state.pool[1], heads.head_block_table, keep_idx.contiguous(), mine)
        return budgets

    def _reduce_prefill_apart(self, requests: list[Request]) -> list[torch.Tensor]:
        """Reducers that decide each head alone but write rows (EMS's merges), for requests of one
        policy and one prompt length: every head of the requests scored at once from its pages
        (:class:`PagedHeads`; scorers that read the keys themselves, per call from the dense rows),
        each request's budgets allocated from its own scores, then the heads gathered densely,
        reduced and written back several layers per call -- as many as the compression workspace
        holds (:func:`_prefill_heads_per_call`), of any requests. Returns each request's rows kept
        per head of the model, int64 [L, all KV heads] (host)."""
        state, policy, n = self.state, requests[0].policy, requests[0].num_tokens
        k_scale, v_scale = self._head_scales()
        heads = self._prefill_heads(requests, k_scale)
        scales = tuple(None if scale is None else scale.repeat(len(requests)) for scale in (k_scale, v_scale))
        group = heads.queries.shape[1]
        step = _prefill_heads_per_call(state, policy, n, k_scale is not None, len(requests))
        parts = [slice(start, start + step) for start in range(0, heads.num_kv_heads, step)]

        def dense(part: slice) -> LayerObservation:  # these heads' rows, as the policies see them
            keys, values = (reference.gather_heads(cache, heads.head_block_table[part], n,
                                                   None if scale is None else scale[part])
                            for cache, scale in zip(state.pool, scales))
            signals = {} if heads.global_attention is None else {"global_attention": heads.global_attention[part]}
            queries = heads.window_queries[part.start * group:part.stop * group]
            return LayerObservation(queries, keys, values, **signals)

        if policy.scorer.reads_keys:
            scores = torch.cat([policy.scorer.score(dense(part)) for part in parts])
        else:
            scores = policy.scorer.score(heads)  # [requests * L * H, n]
        budgets, protected = policy.prefill_budgets(scores.view(len(requests), state.L, -1, n), state.shards)
        mine = torch.cat([state.shards.mine(request_budgets).flatten() for request_budgets in budgets])
        kept_lengths = []
        for part in parts:
            kept = policy.reduce_prefill_heads(dense(part), scores[part], mine[part], protected)
            write_rows(state, heads.head_block_table[part], kept.keys, kept.values, kept.lengths,
                       scales=tuple(None if scale is None else scale[part] for scale in scales))
            kept_lengths.append(kept.lengths)
        if policy.reducer.fills_budgets:  # every head kept min(budget, prompt) rows: known here, no wait
            return list(budgets.clamp(max=n).cpu())  # every rank's heads: the allocation saw them all
        keep = torch.cat(kept_lengths).view(len(requests), state.L, -1)
        return list(state.shards.gather_counts(keep.to(state.pool.device), dim=2).cpu())

    def _reduce_prefill(self, request: Request) -> torch.Tensor:
        """Shared-window reducers and allocators that read the layers: each layer gathered densely,
        reduced, written back. Returns the rows kept per head of the model, int64 [L, all KV heads]
        (host): what every rank kept, gathered (a reducer may keep fewer rows than its budget)."""
        state = self.state
        observations, scales = [], state.cache_scales()
        for l in range(state.L):  # every head holds num_tokens rows
            keys, values = (reference.gather_heads(cache, state.tables[request.row, l], request.num_tokens, cache_scale)
                            for cache, cache_scale in zip(state.pool, head_scales(scales, l)))
            observations.append(LayerObservation(request.queries[l], keys, values, l, **request.signals.get(l, {})))
        retained, _ = request.policy.compress_shard(observations, state.shards)
        keep = torch.stack([kept.lengths for kept in retained]).to(state.pool.device)
        for l, kept in enumerate(retained):
            write_rows(state, state.tables[request.row, l], kept.keys, kept.values, keep[l], scales=head_scales(scales, l))
        return state.shards.gather_counts(keep, dim=1).cpu()  # the one wait: the bookkeeping needs the counts

    def _seed_ring(self, request: Request) -> None:
        """Seed the request's ring of recent queries with the prefill's last window of queries."""
        state = self.state
        first = request.queries[0]  # [Hq, <=window, D]
        state.ensure_recent(request.policy.window, first.shape[0], first.shape[-1], first.dtype)
        # [L, Hq, window, D] -> the ring's [L, window, Hq, D]: one copy for all layers
        state.recent[:, request.row, : first.shape[1]] = torch.stack([request.queries[l] for l in range(state.L)]).transpose(1, 2)

    def _finish(self, rids: list[str], keep: torch.Tensor, what: str) -> None:
        """Shrink the bookkeeping of these requests to ``keep`` [R, L, all KV heads] rows, count and
        log their compressions; all at once (a recompression tick takes every running request)."""
        state = self.state
        requests = [state.reqs[rid] for rid in rids]
        rows = torch.tensor([request.row for request in requests], dtype=torch.int64)
        rows_before = state.counts.lens[rows].flatten(1).sum(1).tolist()
        blocks_before = state.counts.blocks[rows].flatten(1).sum(1).tolist()
        state.compacted_requests(rids, keep)
        rows_after = keep.flatten(1).sum(1).tolist()
        blocks_after = state.counts.blocks[rows].flatten(1).sum(1).tolist()
        logged = runtime.events_enabled()  # a tick's records hold every head's rows: 65k at 256 requests
        lens = keep.tolist() if logged else None
        records = []
        for i, (rid, request) in enumerate(zip(rids, requests)):
            runtime.record_compression(rows_before[i], rows_after[i])
            runtime.logger.debug("kv compression (%s) of request %s at %d tokens: %d/%d rows kept (%.1f%%), %d of %d "
                                 "head-blocks freed", what, rid, request.num_tokens, rows_after[i], rows_before[i],
                                 100.0 * rows_after[i] / max(rows_before[i], 1), blocks_before[i] - blocks_after[i],
                                 blocks_before[i])
            if logged:
                records.append(dict(what=what, req_id=rid, tokens=request.num_tokens, chunks=request.prefill_chunks,
                                    chunk_ends=request.prefill_ends, step=state.step, blocks_before=blocks_before[i],
                                    blocks_after=blocks_after[i], lens=lens[i]))
        runtime.events("compressed", records)

    def recompress(self, rids: list[str]) -> list[str]:
        """Bring every head over its budget of these requests back to it. Heads with the same policy
        and number of recent queries go through the policy in ONE call, whatever their request,
        layer or length (padded, :func:`_gather_padded`; of one length per call for reducers without
        ``pads_heads``; split by :func:`_calls` where they would outgrow the compression workspace),
        so the requests due in a step cost one round of launches. ``Policy.recompress_heads`` keeps
        each head's result its own. The bookkeeping, too, runs over all requests at once (one
        PyTorch call per step of it, not per request: a tick takes every running request). Under
        tensor parallelism each rank reduces its own heads over their budgets, and counts every
        rank's as brought back to theirs. Returns the requests that had a head over its budget."""
        state = self.state
        requests = [state.reqs[rid] for rid in rids]
        if not requests:
            return []
        rows = torch.tensor([request.row for request in requests], dtype=torch.int64)
        lens = state.counts.lens[rows]  # [R, L, all KV heads]
        budgets = torch.stack([request.decode_budget for request in requests])
        over = lens > budgets
        due = over.flatten(1).any(1).nonzero().flatten()  # requests with a head over its budget (any rank's)
        if not len(due):
            return []
        due_ids = due.tolist()
        due_requests = [requests[r] for r in due_ids]
        keep, rows = torch.where(over, budgets, lens)[due], rows[due]
        over, lens, budgets = (state.shards.mine(x[due]) for x in (over, lens, budgets))  # this rank's heads
        oldest = torch.tensor([request.recent_count for request in due_requests])
        groups: dict[tuple, list[int]] = {}  # (policy, queries) -> positions in due_requests
        for i, request in enumerate(due_requests):
            groups.setdefault((id(request.policy), request.recent_queries()), []).append(i)
        for (_, count), members in groups.items():
            policy = due_requests[members[0]].policy
            members = torch.tensor(members)
            member, layers, heads = over[members].nonzero().unbind(1)  # request-major, then layer, head
            if not len(member):
                continue  # only other ranks' heads are due
            heads_due = (rows[members][member], layers, heads, lens[members][member, layers, heads],
                         oldest[members][member] - count, budgets[members][member, layers, heads])
            lengths = heads_due[3]
            same_length = [None] if policy.reducer.pads_heads else [lengths == n for n in lengths.unique().tolist()]
            for same in same_length:
                picked = heads_due if same is None else tuple(x[same] for x in heads_due)
                most_rows = _max_rows(state, policy, count, int(picked[3].max()), int(picked[5].min()))
                for part in _calls(picked[3], most_rows):
                    _recompress_heads(state, policy, count, *(x if part is None else x[part] for x in picked))
        done = [rids[r] for r in due_ids]
        with runtime.TIMER.host("tick_bookkeeping_ms"):
            self._finish(done, keep, "decode")
        return done
