"""Attention backend over the head-block pool (PyTorch reference attention; CPU and CUDA).

The KV-cache tensor of every layer is the same pool, ``(2, num_head_blocks, block_size, head_dim)``
(one head per block, so no head dimension). The metadata is built ONCE per step for all layers
(one kv-cache group) and carries, per layer, slots / per-head block tables / retained lengths
(the layout of ``paged/layout.py``), plus which rows observe (prefill of a request that will be
compressed) and which requests complete their prefill in this step. With ``cuda_graphs`` on, pure
decode steps use the persistent layout of :mod:`vllm_kvcompress.vllm.worker.graphs` instead, so vLLM can capture and replay
them as full CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm_kvcompress.paged import reference
from vllm_kvcompress.policies.observation import observe_prefill
from vllm_kvcompress.vllm.attention import kernels
from vllm_kvcompress.vllm import runtime, settings
from vllm_kvcompress.vllm.compat import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                     CommonAttentionMetadata)


class HeadBlockBackend(AttentionBackend):
    forward_includes_kv_cache_update = True  # forward writes K/V itself (per-head slots)
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto", *settings.FP8_CACHE_DTYPES]  # CUDA validates the CUSTOM backend's

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return HeadBlockImpl

    @staticmethod
    def get_builder_cls():
        return HeadBlockMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (2, num_blocks, block_size, head_size)  # no head dim: one KV head per block


@dataclass
class HeadBlockMetadata:
    """R rows (requests) and T tokens this step; L layers, H KV heads.

    query_start_loc: [R + 1]; seq_lens: [R] (after this step); req_ids: [R];
    slots: int64 [L, T, H]; tables: int32 [L, R, H, W]; lens: int32 [L, R, H] (after the append);
    fresh: rows whose whole sequence is in this step (attend over the fresh K/V), fresh_tokens: their
    token indices (None: all tokens); decode: rows with
    one new token over cached rows (batched), decode_tokens / decode_rows: their token indices and
    rows (device);
    fresh_cu: int32 [len(fresh) + 1] their sequences' offsets on the device;
    mass_spans: the fresh rows whose column mass is observed (EMS), one (first token, first column
    of FlashAttention's log-sum-exp, first column of the step's masses, length) each, computed
    together (kernels.prompt_column_masses); mass_prompts: the same on the device (CUDA only: the
    kernel then takes the prefill's log-sum-exp); mass_columns: row -> its first column of the
    step's masses;
    chunks: the other rows (continued prefill chunks), chunk: their layout (kernels.ChunkLayout);
    observe: rows whose queries the compressor needs; record: (token indices or None for every token, flat ring index row * window + slot) of
    the queries kept for decode-time recompression; dummy: profiling / warm-up run.
    graph: a pure-decode step in the persistent buffers of :mod:`vllm_kvcompress.vllm.worker.graphs` (slots / tables / lens are
    their views, every row one token, padded rows included; step_queries [L, T, Hq, D] receives the
    queries, which WorkerState.flush_graph_queries moves to the rings after the forward)."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    req_ids: list[str]
    slots: torch.Tensor | None = None
    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    fresh: list[int] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)
    decode_tokens: torch.Tensor | None = None
    decode_rows: torch.Tensor | None = None
    fresh_tokens: torch.Tensor | None = None
    fresh_cu: torch.Tensor | None = None
    mass_spans: list[tuple[int, int, int, int]] = field(default_factory=list)
    mass_prompts: torch.Tensor | None = None
    mass_columns: dict = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)
    chunk: kernels.ChunkLayout | None = None
    observe: list[int] = field(default_factory=list)
    record: tuple | None = None
    dummy: bool = False
    graph: bool = False
    step_queries: torch.Tensor | None = None


def _uniform_decode(common: CommonAttentionMetadata) -> bool:
    return common.max_query_len == 1 and common.num_actual_tokens == common.num_reqs


class HeadBlockMetadataBuilder(AttentionMetadataBuilder[HeadBlockMetadata]):
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in the base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        config = settings.read(vllm_config.additional_config)
        if config is not None and config.cuda_graphs:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return cls._cudagraph_support

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> HeadBlockMetadata:
        state = runtime.WORKER_STATE
        if state is None or state.decode_buffers is None:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        if not _uniform_decode(common_attn_metadata):
            raise RuntimeError("kv compression captures full CUDA graphs of pure-decode batches only")
        return self._graph_padding(state, common_attn_metadata)

    @staticmethod
    def _graph_padding(state, common: CommonAttentionMetadata) -> HeadBlockMetadata:
        """A pure-decode step of padded rows only: what capture and its warm-up runs see."""
        with runtime.TIMER.host("fill_ms"):
            state.decode_buffers.fill(None, None, None, common.num_reqs)
        return _in_graph_buffers(state, HeadBlockMetadata(common.num_actual_tokens, [], [], []), common.num_reqs)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HeadBlockMetadata:
        with runtime.TIMER.host("layout_ms"):
            return self._build(common_attn_metadata)

    def _build(self, common: CommonAttentionMetadata) -> HeadBlockMetadata:
        state, runner = runtime.WORKER_STATE, runtime.RUNNER
        n = common.num_reqs
        # CommonAttentionMetadata has no request ids; the V1 runner's input_batch is in row order
        req_ids = list(runner.input_batch.req_ids[:n]) if runner is not None else []
        qsl = common.query_start_loc_cpu[: n + 1].tolist()
        known = getattr(common, "_seq_lens_cpu", None)  # set by the V1 runner; else one small copy
        seq_lens = (known[:n] if known is not None else common.seq_lens[:n].cpu()).tolist()
        metadata = HeadBlockMetadata(common.num_actual_tokens, qsl, seq_lens, req_ids)
        if state is None or not req_ids or any(r not in state.reqs for r in req_ids):
            if state is not None and state.decode_buffers is not None and _uniform_decode(common) \
                    and n <= state.decode_buffers.rows:
                return self._graph_padding(state, common)  # warm-up before a capture: the graph's kernels
            metadata.dummy = True  # profiling and warm-up runs: no requests behind the rows
            return metadata
        if state.decode_buffers is not None and _uniform_decode(common) and not state.step_refuses_graphs:
            # the runner's test too (it ran the step without a graph when the state refused one)
            return self._build_graph_step(state, metadata, common)
        q_lens = [qsl[r + 1] - qsl[r] for r in range(len(req_ids))]  # padded rows (full graphs) excluded
        record_tokens, record_index = [], []
        for r, rid in enumerate(req_ids):
            request = state.reqs[rid]
            _check_computed(rid, request, seq_lens[r] - q_lens[r])
            if seq_lens[r] == q_lens[r]:
                metadata.fresh.append(r)
            elif q_lens[r] == 1:
                metadata.decode.append(r)
            else:
                metadata.chunks.append(r)
            if request.observes_step():
                metadata.observe.append(r)
                if request.count_prefill_chunk(seq_lens[r]):
                    state.pending.append(rid)
            elif request.records_queries:  # newest queries into the request's ring
                record_tokens.extend(range(qsl[r], qsl[r + 1]))
                record_index.extend(request.ring_slots(q_lens[r], state.recent.shape[2]))
        with runtime.TIMER.host("event_ms"):
            runtime.event("build", rows=n, tokens=common.num_actual_tokens, fresh=len(metadata.fresh), chunks=len(metadata.chunks),
                          graph=False)
        runtime.TIMER.note(graph=False, prefill=bool(metadata.fresh or metadata.chunks))
        if len(req_ids) < n:
            raise RuntimeError(f"kv compression: {n - len(req_ids)} padded rows outside a pure-decode step")
        extra = {}  # index tensors the forward needs, uploaded with the step's layout
        on_gpu = state.device.type == "cuda"
        if metadata.fresh and len(metadata.fresh) < n:  # token indices of the fresh rows (absent: every token is)
            extra["fresh_tokens"] = torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in metadata.fresh])
        if metadata.fresh:  # FlashAttention's offsets, uploaded here: made in the forward, each layer's would wait
            fresh_lens = torch.tensor([seq_lens[r] for r in metadata.fresh], dtype=torch.int32)
            extra["fresh_cu"] = torch.cat([torch.zeros(1, dtype=torch.int32), fresh_lens.cumsum(0, dtype=torch.int32)])
            observed = set(metadata.observe)
            first = extra["fresh_cu"][:-1].tolist()
            massed = [(i, r) for i, r in enumerate(metadata.fresh)
                      if r in observed and state.reqs[req_ids[r]].policy.needs_global_attention]
            column = 0
            for i, r in massed:  # the whole prompts' column masses, all in one launch a layer
                metadata.mass_spans.append((qsl[r], first[i], column, seq_lens[r]))
                metadata.mass_columns[r] = column
                column += seq_lens[r]
            if on_gpu and massed:
                extra["mass_prompts"] = kernels.prompt_table(metadata.mass_spans)
        chunk_starts, chunk_lens = [qsl[r] for r in metadata.chunks], [q_lens[r] for r in metadata.chunks]
        if metadata.chunks:
            extra["chunk_rows"] = torch.tensor(metadata.chunks, dtype=torch.int64)
            if on_gpu:
                extra.update(kernels.ChunkLayout.host_index(chunk_starts, chunk_lens, state.H))
        if metadata.decode and len(metadata.decode) < n:  # (absent: a pure decode step, rows are tokens)
            extra["decode_tokens"] = torch.tensor([qsl[r] for r in metadata.decode], dtype=torch.int64)
            extra["decode_rows"] = torch.tensor(metadata.decode, dtype=torch.int64)
        if record_index:
            extra["record_index"] = torch.tensor(record_index, dtype=torch.int64)
            if len(record_tokens) < common.num_actual_tokens:  # (absent: every token is recorded, in order)
                extra["record_tokens"] = torch.tensor(record_tokens, dtype=torch.int64)
        layout = state.prepare_step(req_ids, q_lens, extra)
        metadata.slots, metadata.tables, metadata.lens = layout.slots, layout.tables, layout.lens
        metadata.fresh_tokens, metadata.fresh_cu = layout.extra.get("fresh_tokens"), layout.extra.get("fresh_cu")
        metadata.mass_prompts = layout.extra.get("mass_prompts")
        if metadata.chunks:
            metadata.chunk = kernels.ChunkLayout(layout.extra["chunk_rows"], chunk_starts, chunk_lens,
                                           layout.extra.get("chunk_q_index"), layout.extra.get("chunk_cu_q_lens"),
                                           max(seq_lens[r] for r in metadata.chunks))
        metadata.decode_tokens, metadata.decode_rows = layout.extra.get("decode_tokens"), layout.extra.get("decode_rows")
        if record_index:
            metadata.record = (layout.extra.get("record_tokens"), layout.extra["record_index"])
        return metadata

    @staticmethod
    def _build_graph_step(state, metadata, common) -> HeadBlockMetadata:
        """A pure-decode step in the persistent buffers (same forward whether vLLM replays a captured
        graph, captures one or runs eagerly); padded rows beyond the requests' rows. No request
        observes (``WorkerState.ingest`` refused the graphs otherwise): every row is one token of
        a decoding request, its query recorded when the request keeps them for recompression."""
        req_ids, seq_lens = metadata.req_ids, metadata.seq_lens
        record_tokens, record_index = [], []
        ring_width = state.recent.shape[2] if state.recent is not None else 0
        for r, rid in enumerate(req_ids):
            request = state.reqs[rid]
            _check_computed(rid, request, seq_lens[r] - 1)
            if request.records_queries:
                record_tokens.append(r)
                record_index.extend(request.ring_slots(1, ring_width))
        with runtime.TIMER.host("event_ms"):
            runtime.event("build", rows=common.num_reqs, tokens=common.num_actual_tokens, fresh=0, chunks=0, graph=True)
        runtime.TIMER.note(graph=True, prefill=False)
        extra = {}
        if record_index:
            extra = {"record_tokens": torch.tensor(record_tokens, dtype=torch.int64),
                     "record_index": torch.tensor(record_index, dtype=torch.int64)}
        on_device = state.lay_out_decode(req_ids, extra, common.num_reqs)
        metadata.fresh, metadata.decode = [], list(range(len(req_ids)))
        if record_index:
            state.graph_record = (on_device["record_tokens"], on_device["record_index"])
        return _in_graph_buffers(state, metadata, common.num_reqs)


def _check_computed(rid: str, request, computed: int) -> None:
    """The worker's cache holds as many of the request's tokens as vLLM computed before this step."""
    if request.num_tokens != computed:
        raise RuntimeError(f"request {rid}: worker holds {request.num_tokens} tokens, vLLM computed {computed}")


def _in_graph_buffers(state, metadata: HeadBlockMetadata, padded_rows: int) -> HeadBlockMetadata:
    """``metadata`` as a graph step: its slots / tables / lens / step queries are views of the
    persistent buffers (laid out for this step), rows 0 .. ``padded_rows`` - 1."""
    metadata.slots, metadata.tables, metadata.lens = state.decode_buffers.views(padded_rows)
    metadata.step_queries = state.decode_buffers.queries[:, :padded_rows]
    metadata.graph = True
    return metadata


class HeadBlockImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        unsupported = {"sliding_window": sliding_window, "alibi_slopes": alibi_slopes, "sinks": sinks,
                       "logits_soft_cap": logits_soft_cap}
        bad = [k for k, v in unsupported.items() if v is not None]
        if bad or attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"head-block compression supports plain decoder attention only ({bad or attn_type})")
        if kv_cache_dtype not in settings.CACHE_DTYPES:
            raise NotImplementedError(f"head-block compression: kv_cache_dtype {kv_cache_dtype!r} is not supported")
        # vLLM allocates an fp8 pool as uint8: viewed as e4m3, read and written with the layer's scales
        self.fp8 = kv_cache_dtype in settings.FP8_CACHE_DTYPES
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.group = num_heads // num_kv_heads
        self.layer: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query [T, Hq*D], key/value [T, H*D] (post-RoPE), output [T, Hq*D] written in place."""
        metadata: HeadBlockMetadata = attn_metadata
        state = runtime.WORKER_STATE
        if metadata is None or metadata.dummy:
            if state is not None and query.is_cuda and state.layer_index.get(layer.layer_name) == 0 \
                    and not torch.cuda.is_current_stream_capturing():
                # vLLM sizes the KV pool from the profiling run's peak memory: show it the transient
                # a compression needs (freed at once), so the pool leaves room for it
                torch.empty(state.workspace_bytes, dtype=torch.uint8, device=query.device)
                kernels.warm_up(self.num_heads, self.num_kv_heads, self.head_size, query.dtype, query.device)
            # zeros, as vLLM's FlashAttention backend gives profiling runs: later layers see defined
            # values (calculate_kv_scales sets the fp8 scales from this first forward)
            return output.fill_(0)
        k_scale = v_scale = None
        if self.fp8:
            kv_cache = kv_cache.view(kernels.FP8_DTYPE)
            # vLLM's per-tensor scales (float32 tensors on the device: the checkpoint's, or set in
            # place by calculate_kv_scales at the first forward), read by the kernels, never synced
            k_scale, v_scale = layer._k_scale, layer._v_scale
        if self.layer is None:
            self.layer = state.layer_index[layer.layer_name]
            if self.fp8:  # the compressor reads and writes rows of every layer with that layer's scales
                state.layer_scales[self.layer] = (k_scale, v_scale)
                if len(state.layer_scales) == state.L:  # once: what the pool is stored with (one sync)
                    k_scales, v_scales = state.cache_scales().tolist()
                    runtime.logger.info("kv compression: fp8 KV cache, per-layer scales k=%s v=%s", k_scales, v_scales)
                    runtime.event("fp8_scales", k=k_scales, v=v_scales)
        state.pool = kv_cache
        l, n = self.layer, metadata.num_actual_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        kernels.write_tokens(k, v, metadata.slots[l], key_cache, value_cache, k_scale, v_scale)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if metadata.graph:  # persistent buffers, nothing else: the same launches when a CUDA graph replays them
            if l == 0:  # Python runs here only when not replaying: graph_check counts these against builds
                runtime.event("graph_forward", capturing=query.is_cuda and torch.cuda.is_current_stream_capturing())
            kernels.decode_attention(q[:, None], key_cache, value_cache, metadata.tables[l], metadata.lens[l], self.scale,
                                     out[:, None], k_scale, v_scale)
            metadata.step_queries[l].copy_(q)
            return output
        tables, lens = metadata.tables[l], metadata.lens[l]  # [R, H, W], [R, H], contiguous
        lse = None
        if metadata.fresh:  # whole prompts in this step: attend over the fresh K/V
            rows = metadata.fresh_tokens
            q_f, k_f, v_f = (x if rows is None else x[rows] for x in (q, k, v))
            fresh_lens = [metadata.seq_lens[r] for r in metadata.fresh]
            if metadata.mass_prompts is not None:  # EMS's column mass kernel takes FlashAttention's log-sum-exp
                attended, lse = kernels.prefill_attention(q_f, k_f, v_f, fresh_lens, self.scale, metadata.fresh_cu,
                                                          return_lse=True)
            else:
                attended = kernels.prefill_attention(q_f, k_f, v_f, fresh_lens, self.scale, metadata.fresh_cu)
            if rows is None:
                out.copy_(attended)
            else:
                out[rows] = attended
        if metadata.decode:  # one new token per request, all requests in one call
            rows, batch = metadata.decode_tokens, metadata.decode_rows
            if rows is None:  # a pure decode step: written straight into vLLM's output
                kernels.decode_attention(q[:, None], key_cache, value_cache, tables, lens, self.scale, out[:, None],
                                         k_scale, v_scale)
            else:
                out[rows] = kernels.decode_attention(q[rows][:, None], key_cache, value_cache, tables[batch],
                                                     lens[batch], self.scale, None, k_scale, v_scale)[:, 0]
        if metadata.chunks:  # continued prefill chunks: causal over each request's pages so far
            chunk_rows = metadata.chunk.rows
            kernels.paged_chunk_attention(q, out, key_cache, value_cache, tables[chunk_rows], lens[chunk_rows],
                                          metadata.chunk, self.scale, k_scale, v_scale,
                                          layer._q_scale if self.fp8 else None)
        masses = None if not metadata.mass_spans else \
            kernels.prompt_column_masses(q, k, metadata.mass_spans, metadata.mass_prompts, lse)
        for r in metadata.observe:
            column = metadata.mass_columns.get(r)
            mass = None if column is None else masses[:, column:column + metadata.seq_lens[r]]
            self._observe(state, metadata, r, q, k, key_cache, mass, k_scale)
        if metadata.record is not None:  # newest queries into their requests' rings, one kernel
            tokens, ring_index = metadata.record
            ring = state.recent[l].view(-1, self.num_heads, self.head_size)  # [rows * window, Hq, D]
            ring.index_copy_(0, ring_index, (q if tokens is None else q[tokens]).to(ring.dtype))
        return output

    def _observe(self, state, metadata, r, q, k, key_cache, mass=None, k_scale=None) -> None:
        """Stash the request's latest window queries and (EMS) accumulate the causal column mass
        (``mass``: a whole prompt's, computed with the step's others, ``metadata.mass_spans``). A
        continued chunk's mass reads the earlier keys from the pages (fp8: dequantized with
        ``k_scale``)."""
        request = state.reqs[metadata.req_ids[r]]
        a, b = metadata.query_start_loc[r], metadata.query_start_loc[r + 1]
        qh = q[a:b].transpose(0, 1)  # [Hq, q_len, D]
        chunk = metadata.seq_lens[r] != b - a
        observed = {}
        if request.policy.observes:  # the prefill signals, through the same observer as the HF reference path
            if not chunk:
                keys, start = k[a:b].transpose(0, 1), 0
            else:
                # all heads full; an fp8 pool's rows (float32) in the queries' dtype, as the mass kernel takes them
                keys = reference.gather_heads(key_cache, metadata.tables[self.layer, r], metadata.seq_lens[r],
                                              k_scale).to(qh.dtype)
                start = metadata.seq_lens[r] - (b - a)
            signal_kernels = {"global_attention": kernels.column_mass if mass is None else lambda *_, **__: mass}
            observed = observe_prefill(request.policy.observes, qh, keys, start, signal_kernels)
        request.observe(self.layer, qh, request.policy.window, observed, accumulate=chunk)

