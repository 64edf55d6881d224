"""Worker side: which pool blocks each (request, layer, KV head) owns, and how many rows it holds.

The scheduler streams block ids per request (``NewRequestData.block_ids[0]``,
``CachedRequestData.new_block_ids[i][0]``) sized by :class:`~vllm_kvcompress.vllm.scheduler.spec.HeadBlockManager`; this state
keeps them as the request's *spare* list and hands them to heads, in order, as heads fill up.
After a compression the tail blocks go back to the spare list, and the spares beyond what the
next ``LAG_TOKENS`` tokens (and, with ``reserve_decode_growth``, the request's regrowth until its
next recompression) can need are reported to the scheduler (:meth:`WorkerState.take_reports`).
Invariant: the scheduler's blocks of a request = assigned + spare (+ reports in flight).

Every request owns one row of :attr:`WorkerState.tables`, int32 [rows, L, H, max_blocks], kept on
the attention device so a step's block tables and slots are gathered there without copying the
tables from the host; only newly assigned block ids travel. :attr:`WorkerState.host_tables` mirrors
them on the host (the same writes), so the blocks a compaction frees are known without reading the
device. Per-head lengths and block counts are small host tensors ([L, H] per request), so no step
needs a device-to-host sync. A request's phases and fields are its own (:mod:`.request`).

Under tensor parallelism each rank's state holds that rank's ``H`` KV heads (``shards``); the
scheduler's block ids and counts are the same on every rank (:class:`~.request.Request`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.policy import Policy
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.policies.tensor_parallel import HeadShards
from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.worker.graphs import HeldRows
from vllm_kvcompress.vllm.worker.request import HeadCounts, Request

# Tokens the scheduler may schedule before it sees a report (one step in flight, async scheduling).
LAG_TOKENS = 2

# Per-request overrides read from SamplingParams.extra_args (design section 6).
OVERRIDE_KEYS = {"kv_compression": "policy", "kv_budget": "budget"}
SERVER_OPTIONS = ("cuda_graphs", "cuda_graphs_max_len", "reserve_decode_growth")  # a request may repeat them, not change them


def request_config(base: CompressionConfig, extra_args: dict | None) -> CompressionConfig:
    """``base`` with the request's ``extra_args`` overrides applied (ValueError names the problem).
    ``extra_args["kv_compression_config"]`` may carry any further options as a dict."""
    extra = extra_args or {}
    changes = dict(extra.get("kv_compression_config") or {})
    changes.update({field_: extra[key] for key, field_ in OVERRIDE_KEYS.items() if key in extra})
    for name in SERVER_OPTIONS:  # the decode graphs are captured once for the whole server
        if name in changes and changes[name] is None:  # the default: whatever the server does
            del changes[name]
        elif name in changes and changes[name] != getattr(base, name):
            raise ValueError(f"{name} is a server option (--kv-compression-config), not a per-request one")
    return base.replace(**changes) if changes else base


class PinnedStaging:
    """Pinned host buffers that carry the steps' uploads to the device, reused round robin. A buffer
    is written again only once the copy that last read it has completed (its event); one whose copy
    is still queued is skipped, and when all are, the ring grows (up to ``most`` buffers; then the
    next buffer's copy is waited for): the host must not wait for the device here. A step uploads its
    layout, once per request whose prefill it compresses and once per policy call of a
    recompression tick, and with async scheduling the host runs a step ahead of the GPU. A fresh
    pinned allocation per upload would go through the caching host allocator, which cannot reuse a
    block whose copy is still queued behind the running step and then allocates anew -- a call that
    can stall the host for milliseconds."""

    def __init__(self, device: torch.device, slots: int = 8, most: int = 64):
        self.device, self.next, self.most = device, 0, most
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.copied: list = [None] * slots  # the event after each buffer's last copy (CUDA)

    def _free_slot(self) -> int:
        """A buffer no queued copy reads (the ring grows rather than wait, up to ``most``)."""
        for _ in range(len(self.buffers)):
            slot, self.next = self.next, (self.next + 1) % len(self.buffers)
            if self.copied[slot] is None or self.copied[slot].query():
                return slot
        if len(self.buffers) < self.most:
            self.buffers.append(None)
            self.copied.append(None)
            return len(self.buffers) - 1
        slot, self.next = self.next, (self.next + 1) % len(self.buffers)
        self.copied[slot].synchronize()
        return slot

    def upload(self, flat: torch.Tensor) -> torch.Tensor:
        """int64 [n] host -> a new int64 [n] tensor on the device (non-blocking)."""
        slot = self._free_slot()
        cuda = self.device.type == "cuda"
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < flat.numel():
            buffer = self.buffers[slot] = torch.empty(max(2 * flat.numel(), 1 << 16), dtype=torch.int64,
                                                      pin_memory=cuda)
        staged = buffer[:flat.numel()]
        staged.copy_(flat)
        on_device = staged.to(self.device, non_blocking=True) if cuda else staged.clone()
        if cuda:
            self.copied[slot] = torch.cuda.Event()
            self.copied[slot].record()
        return on_device


@dataclass
class StepLayout:
    """What one step's rows need in every layer (device tensors).

    rows: int64 [R] the requests' table rows (host); slots: int64 [L, T, H] where each new token's K/V goes
    (T = tokens this step); tables: int32 [L, R, H, W] block tables (W = the widest head);
    lens: int32 [L, R, H] rows held after this step's append; extra: the caller's tensors, uploaded
    with these; headroom: the rows every head can append after this step before one needs another
    block. Layer-major, so each layer's slice is contiguous as the kernels take it."""

    rows: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    extra: dict = field(default_factory=dict)
    headroom: int = 0


class WorkerState:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int, layer_index: dict[str, int],
                 config: CompressionConfig, device: str | torch.device = "cpu", workspace_bytes: int = 0,
                 shards: HeadShards | None = None):
        """num_kv_heads: the KV heads this worker holds (of ``shards.total`` under tensor parallelism)."""
        self.L, self.H, self.bs = num_layers, num_kv_heads, block_size
        self.shards = shards if shards is not None else HeadShards(local=num_kv_heads)
        if self.shards.local != num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads on this worker, {self.shards.local} in its shard")
        self.layer_index = layer_index  # attention layer name -> layer position
        self.config = config
        self.device = torch.device(device)
        self.workspace_bytes = workspace_bytes  # transient memory of one compression (profiling shows it to vLLM)
        self.pack_uploads = False  # tests: take upload()'s packed path on the CPU too
        self.staging = PinnedStaging(self.device)
        self.reqs: dict[str, Request] = {}
        self.preempted: dict[str, tuple[Policy | None, int | None]] = {}
        self.pending: list[str] = []  # requests whose prefill completed in this step, to compress
        self.pool: torch.Tensor | None = None  # (2, num_blocks, bs, D), set by the first forward
        # fp8 pool (float8_e4m3fn): layer -> vLLM's (k_scale, v_scale) tensors of that layer, float32
        # one element each on the device, registered by the layer's first forward
        self.layer_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tables = torch.zeros(0, self.L, self.H, 0, dtype=torch.int32, device=self.device)
        self.host_tables = torch.zeros(0, self.L, self.H, 0, dtype=torch.int32)  # the same, on the host
        self.counts = HeadCounts(self.L, self.shards)  # every request's heads' rows and blocks, by table row
        self.free_rows: list[int] = []
        self.step = 0  # engine steps with scheduled tokens so far: the clock of decode-time recompression
        # ring of decode queries, layer-major [L, rows, window, Hq, D]: one layer's slice is written by
        # one index_copy_ per step (rows * window + slot)
        self.recent: torch.Tensor | None = None
        self._policies: dict[str, Policy | None] = {}
        # cuda_graphs: persistent layout of pure-decode steps (graphs.DecodeBuffers, set by the worker)
        self.decode_buffers = None
        # this step must not replay a decode graph: a scheduled request still observes its prefill
        # (the backend stashes its queries in Python), or a head would outgrow the graph tables
        self.step_refuses_graphs = False
        self.graph_record: tuple | None = None  # (token indices, ring indices) left in decode_buffers.queries

    def cache_scales(self) -> torch.Tensor | None:
        """float32 [2, L]: every layer's K scale (row 0) and V scale (row 1) of an fp8 pool, read
        from vLLM's tensors now (one stack, no host sync); None when the pool holds the values."""
        if not self.layer_scales:
            return None
        if len(self.layer_scales) != self.L:
            raise RuntimeError(f"kv compression: the fp8 scales of {self.L - len(self.layer_scales)} layers are unknown")
        return torch.stack([s.reshape(()) for l in range(self.L) for s in self.layer_scales[l]]).view(self.L, 2).T

    # ---- policies ---------------------------------------------------------------------------
    def policy_for(self, extra_args: dict | None) -> tuple[Policy | None, int | None]:
        """The request's policy (None: no compression) and decode slack."""
        config = request_config(self.config, extra_args)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._policies:
            self._policies[key] = build_policy(config)
        return self._policies[key], config.decode_slack

    def reserve_rows(self, rows: int, window: int | None = None, num_q_heads: int = 0, head_dim: int = 0,
                     dtype: torch.dtype | None = None) -> None:
        """Table rows for ``rows`` requests at once (vLLM's ``max_num_seqs``) and, with ``window``,
        their ring of recent queries, made now. The worker calls it at start-up, before vLLM's
        profiling run, so the KV pool is sized around the ring (8.6 GB for 1,024 Llama-3-8B requests at a
        window of 32, vLLM's default ``max_num_seqs`` on an H100) instead of the ring growing into
        memory the pool took, mid-serving."""
        if rows > self.tables.shape[0]:
            self._grow_tables(rows, self.tables.shape[3])
        if window is not None:
            self.ensure_recent(window, num_q_heads, head_dim, dtype)

    def ensure_recent(self, window: int, num_q_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """The ring of recent queries (decode-time recompression) exists and holds ``window`` queries."""
        if self.recent is None or self.recent.shape[2] < window:
            recent = torch.zeros(self.L, self.tables.shape[0], window, num_q_heads, head_dim, dtype=dtype,
                                 device=self.device)
            if self.recent is not None:
                recent[:, :, : self.recent.shape[2]] = self.recent
            self.recent = recent

    # ---- request lifetime -------------------------------------------------------------------
    def _start(self, rid: str, policy: Policy | None, compress_at: int | None, decode_slack: int | None = None) -> Request:
        if not self.free_rows:
            self._grow_tables(rows=max(2 * self.tables.shape[0], 8), cols=self.tables.shape[3])
        request = Request(self.counts, self.shards, policy, compress_at, decode_slack, row=self.free_rows.pop())
        self.reqs[rid] = request
        return request

    def _end(self, rid: str) -> Request | None:
        request = self.reqs.pop(rid, None)
        if request is not None:
            self.free_rows.append(request.row)
            self._layout_changed()
        return request

    def _layout_changed(self) -> None:
        """Some request's table row, blocks or lengths changed outside a decode step that laid it
        out in the decode buffers: the next one lays out anew (:meth:`lay_out_decode`)."""
        if self.decode_buffers is not None:
            self.decode_buffers.forget()

    def _grow_tables(self, rows: int, cols: int) -> None:
        self._layout_changed()
        old, old_host = self.tables, self.host_tables
        self.tables = torch.zeros(rows, self.L, self.H, cols, dtype=torch.int32, device=self.device)
        self.tables[: old.shape[0], :, :, : old.shape[3]] = old
        self.host_tables = torch.zeros(rows, self.L, self.H, cols, dtype=torch.int32)
        self.host_tables[: old.shape[0], :, :, : old.shape[3]] = old_host
        self.free_rows.extend(range(rows - 1, old.shape[0] - 1, -1))
        if rows > old.shape[0]:  # new rows; widening alone must not copy the ring (8 GiB at 1,024 rows of Llama-3-8B)
            self.counts.grow(rows)
            if self.recent is not None:
                recent = self.recent.new_zeros(self.L, rows, *self.recent.shape[2:])
                recent[:, : self.recent.shape[1]] = self.recent
                self.recent = recent

    # ---- from the scheduler output (worker.execute_model, before the forward) --------------
    def ingest(self, scheduler_output) -> None:
        if scheduler_output.num_scheduled_tokens:
            self.step += 1
        for rid in scheduler_output.finished_req_ids:
            self._end(rid)
            self.preempted.pop(rid, None)
        for rid in scheduler_output.preempted_req_ids or ():
            request = self._end(rid)  # the scheduler freed all its blocks; it is recomputed later
            if request is not None:
                self.preempted[rid] = (request.policy, request.decode_slack)
        for new in scheduler_output.scheduled_new_reqs:
            extra = new.sampling_params.extra_args if new.sampling_params is not None else None
            policy, slack = self.policy_for(extra)
            request = self._start(new.req_id, policy, len(new.prompt_token_ids), slack)
            request.add_spares(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                # recomputed from scratch (prompt + output so far); compressed again at its end
                policy, slack = self.preempted.pop(rid, (None, None))
                target = len(cached.all_token_ids[rid]) if rid in cached.all_token_ids else None
                self._end(rid)
                self._start(rid, policy, target, slack)
            if new_ids is not None:
                self.reqs[rid].add_spares(new_ids[0])
        if self.decode_buffers is not None:
            limit = self.decode_buffers.width * self.bs
            self.step_refuses_graphs = any(
                request.observes_step() or request.max_len + n > limit
                for request, n in ((self.reqs.get(rid), n) for rid, n in scheduler_output.num_scheduled_tokens.items())
                if request is not None)

    def flush_graph_queries(self) -> None:
        """Move the recorded queries of a pure-decode step (left in ``decode_buffers.queries`` by the
        forward, inside or outside a CUDA graph) into their requests' rings, all layers at once."""
        if self.graph_record is None:
            return
        tokens, ring_index = self.graph_record
        self.graph_record = None
        ring = self.recent.view(self.L, -1, *self.recent.shape[3:])  # [L, rows * window, Hq, D]
        ring.index_copy_(1, ring_index, self.decode_buffers.queries[:, tokens].to(ring.dtype))

    # ---- appending rows (builder.build, once per step for all layers) -----------------------
    def upload(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The host tensors on the attention device, in ONE non-blocking copy from pinned memory: a
        copy from pageable memory waits for the GPU to drain, which would serialise every step's
        host preparation with the previous step's kernels (:class:`PinnedStaging`)."""
        if self.device.type == "cpu" and not self.pack_uploads:
            return host
        wide = torch.int64  # the packed copy's type; other types are converted on both sides
        with runtime.TIMER.host("upload_ms"):
            on_device = self.staging.upload(torch.cat([t.reshape(-1) if t.dtype == wide else t.reshape(-1).to(wide)
                                                       for t in host.values()]))
        pieces = on_device.split([t.numel() for t in host.values()])
        return {name: piece.view(t.shape) if t.dtype == wide else piece.view(t.shape).to(t.dtype)
                for (name, t), piece in zip(host.items(), pieces)}

    def _assign(self, reqs: list[Request], req_ids: list[str], rows: torch.Tensor, q_lens: torch.Tensor):
        """Give every head of the step's requests (table ``rows``) the blocks their next
        ``q_lens[r]`` rows need, from each request's spares in order (layer-major, then head, then
        row). All requests in one go: a decode step touches every running request. Returns the rows
        this worker's heads held before, int64 [R, L, H], the blocks they now have, the table
        writes to make (host tensors: request row, head, column, block id; or None), and the rows
        every head can append after these before one needs another block. Blocks follow the slots'
        rows (:attr:`Request.slot_lens`; the heads' own rows without tensor parallelism)."""
        heads = self.L * self.H
        before_all = self.counts.lens[rows]  # [R, L, all KV heads]
        before = self.shards.mine(before_all)
        slot_before = self.shards.slot_rows(before_all)
        held = self.counts.blocks[rows]
        slot_after = slot_before + q_lens[:, None, None]
        need = -(-slot_after // self.bs)  # blocks per head after the append
        add = (need - held).clamp(min=0).reshape(len(reqs), heads)
        totals = add.sum(1).tolist()
        ids = []
        for request, rid, total in zip(reqs, req_ids, totals):
            ids += request.take_spares(total, rid)
        writes = None
        if ids:
            widest = int(need.max())
            if widest > self.tables.shape[3]:
                self._grow_tables(rows=self.tables.shape[0], cols=max(widest, 2 * self.tables.shape[3]))
            flat = add.flatten()
            owner = torch.repeat_interleave(torch.arange(flat.numel()), flat)  # (request, head) of each id
            first = torch.cumsum(flat, 0) - flat
            col = held.flatten()[owner] + torch.arange(len(ids)) - first[owner]
            writes = (rows[owner // heads], owner.remainder(heads), col, torch.tensor(ids, dtype=torch.int32))
            self.host_tables.view(self.host_tables.shape[0], heads, -1)[writes[0], writes[1], writes[2]] = writes[3]
        blocks = torch.maximum(held, need)
        return before, blocks, writes, int((blocks * self.bs - slot_after).min())

    def prepare_step(self, req_ids: list[str], query_lens: list[int],
                     extra: dict[str, torch.Tensor] | None = None) -> StepLayout:
        """Append ``query_lens[r]`` rows to every head of request ``req_ids[r]`` and lay out the step.
        ``extra`` host tensors travel to the device in the same copy (``StepLayout.extra``)."""
        self._layout_changed()
        reqs = [self.reqs[rid] for rid in req_ids]
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        rows = torch.tensor([request.row for request in reqs], dtype=torch.int64)
        with runtime.TIMER.host("assign_ms"):
            before_host, blocks, writes, headroom = self._assign(reqs, req_ids, rows, q_lens)
        width = int(blocks.max())
        after_host = before_host + q_lens[:, None, None]
        self.counts.append(rows, q_lens, blocks)
        for request, q_len in zip(reqs, query_lens):
            request.appended(q_len)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_row = torch.repeat_interleave(torch.arange(len(reqs)), q_lens)
        host = {"rows": rows, "before": before_host,
                "after": after_host.int().transpose(0, 1).contiguous(), "token_row": token_row,
                "token_offset": torch.arange(int(q_lens.sum())) - starts[token_row], **(extra or {})}
        if writes is not None:
            host.update(write_row=writes[0], write_head=writes[1], write_col=writes[2], write_id=writes[3])
        dev = self.upload(host)
        if writes is not None:
            self.tables.view(self.tables.shape[0], self.L * self.H, -1)[
                dev["write_row"], dev["write_head"], dev["write_col"]] = dev["write_id"]
        dev_rows, token_row = dev["rows"], dev["token_row"]
        pos = dev["before"][token_row] + dev["token_offset"][:, None, None]  # [T, L, H]
        cols = self.tables.shape[3]
        heads = torch.arange(self.L * self.H, device=self.device).view(1, self.L, self.H)
        flat = (dev_rows[token_row][:, None, None] * (self.L * self.H) + heads) * cols + pos // self.bs
        slots = self.tables.view(-1)[flat].long() * self.bs + pos % self.bs
        tables = self.tables.transpose(0, 1)[:, dev_rows, :, :width].contiguous()  # [L, R, H, W]
        return StepLayout(rows, slots.permute(1, 0, 2).contiguous(), tables, dev["after"],
                          {name: dev[name] for name in (extra or {})}, headroom)

    def lay_out_decode(self, req_ids: list[str], extra: dict[str, torch.Tensor],
                       padded_rows: int) -> dict[str, torch.Tensor]:
        """A pure-decode step (one row a request) in the decode buffers (:mod:`.graphs`), padded up
        to ``padded_rows``; returns ``extra`` on the device. When the buffers hold the previous
        step's layout of the same requests and every head has room in its blocks, they advance in
        place (:meth:`DecodeBuffers.advance`): nothing to assign, gather or upload but ``extra``.
        Otherwise :meth:`prepare_step` and a full fill."""
        buffers = self.decode_buffers
        held = buffers.held
        advance = held is not None and held.can_advance(req_ids, padded_rows)
        runtime.TIMER.note(in_place=advance)
        if not advance:
            layout = self.prepare_step(req_ids, [1] * len(req_ids), extra)
            with runtime.TIMER.host("fill_ms"):
                buffers.fill(layout.slots, layout.tables, layout.lens, padded_rows,
                             HeldRows(list(req_ids), layout.rows, padded_rows, layout.headroom))
            return layout.extra
        self.counts.lens[held.table_rows] += 1  # what prepare_step's append does, no block to assign
        for rid in req_ids:
            self.reqs[rid].appended(1)
        with runtime.TIMER.host("fill_ms"):
            buffers.advance(self.bs)
        return self.upload(extra) if extra else {}

    def append(self, rid: str, num_new: int) -> torch.Tensor:
        """Room for ``num_new`` rows in every (layer, head); returns their slots int64 [L, num_new, H]."""
        return self.prepare_step([rid], [num_new]).slots

    # ---- read-only views (tests, invariant checks) --------------------------------------------
    def head_blocks(self, rid: str, layer: int, head: int) -> list[int]:
        """Block ids assigned to (layer, head) of the request, in row order."""
        request = self.reqs[rid]
        return self.tables[request.row, layer, head, : int(request.num_blocks[layer, head])].tolist()

    def assigned_blocks(self, rid: str) -> list[int]:
        """Every block id assigned to a head of the request (layer-major, head, row order)."""
        return [b for l in range(self.L) for h in range(self.H) for b in self.head_blocks(rid, l, h)]

    def spare_blocks(self, rid: str) -> list[int]:
        """Block ids the request holds but no head uses yet."""
        return list(self.reqs[rid].spare)

    def retained_lens(self, rid: str) -> list[list[int]]:
        """Rows held per (layer, KV head of the model): [L][all KV heads]."""
        return self.reqs[rid].lens.tolist()

    # ---- after a compression (compressor) and at the end of a step (connector) -------------
    def compacted_heads(self, rid: str, keep: torch.Tensor) -> None:
        """Every head now holds ``keep`` (int [L, all KV heads]) rows at the front of its blocks; the
        blocks past its slot's rows -> spare (with ``reserve_decode_growth``, those past the rows it
        refills before its next recompression: :meth:`growth_kept`)."""
        self.compacted_requests([rid], keep[None])

    def compacted_requests(self, rids: list[str], keep: torch.Tensor) -> None:
        """:meth:`compacted_heads` of several requests at once (``keep`` int [R, L, all KV heads]):
        a decode-time recompression brings every running request back to its budgets in one step."""
        self._layout_changed()
        requests = [self.reqs[rid] for rid in rids]
        rows = torch.tensor([request.row for request in requests], dtype=torch.int64)
        keep = keep.to(torch.int64).cpu()
        grown = (keep > self.counts.lens[rows]).flatten(1).any(1)
        if bool(grown.any()):
            r = int(grown.nonzero()[0])
            raise RuntimeError(f"request {rids[r]}: compaction cannot grow a head "
                               f"({keep[r].tolist()} > {requests[r].lens.tolist()})")
        slot_keep = self.shards.slot_rows(keep)  # [R, L, H]
        held = self.counts.blocks[rows]
        kept_blocks = -(-slot_keep // self.bs)
        regrows = torch.tensor([self.growth_kept(request) > 0 for request in requests])
        if bool(regrows.any()):
            # reserve_decode_growth: a head keeps in its own table the blocks it refills before its
            # next recompression (spares_needed's rows), so a tick lists and moves no block ids and the
            # steps after it assign none (serving-notes.md, sixth lease: 35 ms a tick of 256 requests,
            # 8-13 ms at every 16th step)
            refilled = torch.minimum(held, self._blocks_ahead(requests, slot_keep))
            kept_blocks = torch.where(regrows[:, None, None], refilled, kept_blocks)
        per_request = (held - kept_blocks).clamp(min=0).flatten(1).sum(1)
        freed = []
        if bool(per_request.any()):
            col = torch.arange(int(held.max()))
            tail = (col >= kept_blocks[..., None]) & (col < held[..., None])  # [R, L, H, width]
            freed = self.host_tables[rows, :, :, : len(col)][tail].tolist()  # request-major
        per_request = per_request.tolist()
        self.counts.compacted(rows, keep, kept_blocks)
        start = 0
        for request, count, max_len in zip(requests, per_request, keep.flatten(1).amax(1).tolist()):
            request.compacted(max_len, freed[start:start + count])
            start += count

    def compacted(self, rid: str, layer: int, head: int, keep: int) -> None:
        """Head (layer, head) now holds ``keep`` rows at the front of its blocks; tail -> spare."""
        lens = self.reqs[rid].lens.clone()
        lens[layer, head] = keep
        self.compacted_heads(rid, lens)

    def spares_needed(self, request: Request) -> int:
        """Spare blocks the request's heads can take in the next LAG_TOKENS rows -- and, with the
        server's ``reserve_decode_growth``, in the ``decode_slack`` rows before its next decode-time
        recompression: the blocks a tick frees then stay the request's own for its regrowth, so no
        head-block moves between the worker and the scheduler while it decodes (vLLM's Python
        ``BlockPool`` frees and hands out blocks one by one: serving-notes.md, fifth lease)."""
        return self._spares_needed([request])[0]

    def _spares_needed(self, reqs: list[Request]) -> list[int]:
        """:meth:`spares_needed` of several requests, in one go over their rows of ``counts``."""
        rows = torch.tensor([request.row for request in reqs], dtype=torch.int64)
        slot_lens = self.shards.slot_rows(self.counts.lens[rows])
        grow = (self._blocks_ahead(reqs, slot_lens) - self.counts.blocks[rows]).clamp(min=0)
        return grow.sum((1, 2)).tolist()

    def _blocks_ahead(self, reqs: list[Request], slot_lens: torch.Tensor) -> torch.Tensor:
        """int64 [R, L, H]: the blocks each head of ``reqs`` needs for its ``slot_lens`` rows and
        the next ``LAG_TOKENS`` + :meth:`growth_kept` rows."""
        ahead = torch.tensor([LAG_TOKENS + self.growth_kept(request) for request in reqs], dtype=torch.int64)
        return -(-(slot_lens + ahead[:, None, None]) // self.bs)

    def growth_kept(self, request: Request) -> int:
        """Rows a head of the request grows before its next recompression whose blocks it keeps as
        spares (``reserve_decode_growth``; else 0: the scheduler hands them out as heads fill)."""
        return request.decode_slack if self.config.reserve_decode_growth and request.records_queries else 0

    def take_reports(self) -> dict[str, tuple[list[int], int, list[list[int]]]]:
        """req_id -> (released block ids, T, slot rows [L][H]) for compressed requests holding more
        spares than :meth:`spares_needed`, or compacted since their last report (the scheduler's
        need of a request comes from its reported lengths). Only requests whose spares grew or whose
        heads were compacted since the last check can: appending rows never makes spares exceed that
        need (it assigns a spare to a head only when the head's own need grows by as much), so the
        others are skipped -- at 256 running requests checking every one cost ~6 ms of host time a
        step (benchmarks/host_overhead.py). The scheduler adds spares to most decoding requests at
        most steps (some head of theirs crosses a block's end), so those are checked together."""
        out = {}
        due = [(rid, request) for rid, request in self.reqs.items() if request.compressed and request.report_due]
        if not due:
            return out
        for (rid, request), need in zip(due, self._spares_needed([request for _, request in due])):
            released, reported = request.take_surplus(need)
            if reported:
                runtime.record_release(len(released))
                out[rid] = (released, request.num_tokens, request.slot_lens.tolist())
        return out
