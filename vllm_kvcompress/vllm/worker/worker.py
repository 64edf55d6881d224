"""worker_cls: the platform's worker plus three hooks.

* ``__init__``: our backend answers for the attention backend vLLM selects (before the model is
  built). CPU: ``CpuPlatform.get_attn_backend_cls`` ignores the selection and returns CPU_ATTN's
  path, so CPU_ATTN is pointed at our class; CUDA: the ``CUSTOM`` slot (settings selects it).
* ``init_device``: the runner becomes an instance of a subclass of its own class whose
  ``get_kv_cache_spec`` reports one :class:`HeadBlockSpec` for the first layer and maps every other
  layer onto it (``shared_kv_cache_layers``): one kv-cache group, one pool, one metadata build.
  The runner's own per-request block table goes unused (``may_reinitialize_input_batch``).
  With ``cuda_graphs`` the persistent decode buffers (:mod:`.graphs`) are allocated there too, and
  with decode-time recompression the ring of recent queries it scores with, for ``max_num_seqs``
  requests (:meth:`WorkerState.reserve_rows`): before vLLM's profiling run, so the KV pool is
  sized around them. A step in which a request still observes its prefill, or a head outgrows the
  graph tables, is kept from replaying a decode graph (``_is_uniform_decode``).
  On a GPU it also takes the process to one intra-op host thread (:func:`limit_host_threads`).
* ``execute_model``: the scheduler's block ids go to :class:`WorkerState` before the forward.
"""
from __future__ import annotations

import os
import re

import torch

from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.policies.tensor_parallel import HeadShards
from vllm_kvcompress.vllm.attention import kernels
from vllm_kvcompress.vllm import runtime, settings
from vllm_kvcompress.vllm.compat import (AttentionBackendEnum, BlockTable, FullAttentionSpec, SlotMappingMode,
                                         get_dtype_size, get_tp_group, register_backend)
from vllm_kvcompress.vllm.worker.compressor import Compressor
from vllm_kvcompress.vllm.worker.graphs import DecodeBuffers
from vllm_kvcompress.vllm.scheduler.spec import HeadBlockSpec
from vllm_kvcompress.vllm.worker.state import WorkerState

BACKEND = "vllm_kvcompress.vllm.attention.backend.HeadBlockBackend"


def _layer_number(name: str) -> int:
    found = re.search(r"\.(\d+)\.", name)
    if found is None:
        raise ValueError(f"cannot tell the layer index of attention layer {name!r}")
    return int(found.group(1))


class _HeadBlockRunnerMixin:
    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()  # the stock spec of every attention layer
        bad = {n: type(s).__name__ for n, s in specs.items()
               if type(s) is not FullAttentionSpec or s.sliding_window is not None}
        if bad:
            raise ValueError(f"kv compression needs plain full-attention layers; found {bad}")
        names = sorted(specs, key=_layer_number)
        first = specs[names[0]]
        if any((s.num_kv_heads, s.head_size, s.dtype) != (first.num_kv_heads, first.head_size, first.dtype)
               for s in specs.values()):
            raise ValueError("kv compression needs the same KV heads, head size and dtype in every layer")
        kernels.check_head_size(first.head_size, self.device)
        spec = HeadBlockSpec(block_size=first.block_size, num_kv_heads=first.num_kv_heads,
                             head_size=first.head_size, dtype=first.dtype, num_layers=len(names))
        for name in names[1:]:  # same pool tensor and same metadata as the first layer
            self.shared_kv_cache_layers[name] = names[0]
        if runtime.WORKER_STATE is None:
            config = settings.read(self.vllm_config.additional_config)
            shards = tensor_parallel_shards(self.vllm_config, first.num_kv_heads)
            if config.headkv_scores:  # wrong shape: fail at start-up, not at the first compression
                HeadScores.load(config.headkv_scores).check_model(len(names), shards.total, config.headkv_scores)
            state = WorkerState(len(names), first.num_kv_heads, first.block_size, {n: i for i, n in enumerate(names)},
                             config, device=self.device, workspace_bytes=compression_workspace(spec, self.vllm_config),
                             shards=shards)
            policy, decode_slack = state.policy_for(None)
            if policy is not None and decode_slack is not None:  # the ring decode-time recompression scores with
                model = self.vllm_config.model_config
                state.reserve_rows(self.vllm_config.scheduler_config.max_num_seqs, policy.window,
                                   model.get_num_attention_heads(self.vllm_config.parallel_config), first.head_size,
                                   model.dtype)
                runtime.event("query_ring", shape=list(state.recent.shape),
                              bytes=state.recent.numel() * state.recent.element_size())
            if config.cuda_graphs:
                # the step's queries, in the model's dtype (the spec's is the pool's: uint8 for fp8)
                state.decode_buffers = DecodeBuffers.allocate(**decode_buffer_shape(spec, self.vllm_config,
                                                                                 config.cuda_graphs_max_len),
                                                           dtype=self.vllm_config.model_config.dtype, device=self.device)
            runtime.WORKER_STATE = state
            runtime.COMPRESSOR = Compressor(state)
        return {names[0]: spec}

    def _is_uniform_decode(self, *args, force_uniform_decode=None, **kwargs) -> bool:
        """vLLM's test for a full-graph decode batch, refused while a scheduled request still
        observes its prefill (its last chunk can be one token: the backend stashes those queries in
        Python, which a replayed graph would skip) or a head would hold more rows than the graph
        tables have (``cuda_graphs_max_len``): ``WorkerState.step_refuses_graphs``."""
        uniform = super()._is_uniform_decode(*args, force_uniform_decode=force_uniform_decode, **kwargs)
        state = runtime.WORKER_STATE
        return uniform and not (force_uniform_decode is None and state is not None and state.step_refuses_graphs)

    def may_reinitialize_input_batch(self, kv_cache_config, kernel_block_sizes):
        """The worker keeps every head's blocks in its own device tables (:class:`WorkerState`), so
        vLLM's per-request block table is made inert: one column (``HeadBlockSpec``), no appends,
        no slot mapping. Otherwise every step would copy num_reqs rows of L*H*max_len/bs block ids
        to the device (27 MB for 24 requests of 17k tokens on Llama-3-8B) that nothing reads."""
        super().may_reinitialize_input_batch(kv_cache_config, kernel_block_sizes)
        for table in self.input_batch.block_table.block_tables:
            table.__class__ = _UnusedBlockTable
            table.slot_mapping_mode = SlotMappingMode.NONE  # compute_slot_mapping returns at once
        runtime.event("block_tables", columns=[t.max_num_blocks_per_req for t in self.input_batch.block_table.block_tables])


def tensor_parallel_shards(vllm_config, num_kv_heads: int) -> HeadShards:
    """This worker's share of the model's KV heads (``num_kv_heads`` of them) and vLLM's
    tensor-parallel group to gather the other ranks' scores through."""
    size = vllm_config.parallel_config.tensor_parallel_size
    if size == 1:
        return HeadShards(local=num_kv_heads)
    total = vllm_config.model_config.get_total_num_kv_heads()
    if num_kv_heads * size != total:  # settings.refusals says so before any worker starts
        raise ValueError(f"kv compression needs the model's {total} KV heads split over the {size} tensor-parallel "
                         f"ranks, not replicated ({num_kv_heads} on this rank)")
    group = get_tp_group()
    runtime.TENSOR_PARALLEL_RANK = group.rank_in_group
    return HeadShards(size, group.rank_in_group, num_kv_heads, group.all_gather)


def limit_host_threads(environ=os.environ) -> int | None:
    """One PyTorch intra-op thread for this (GPU worker's) process unless ``OMP_NUM_THREADS`` says
    otherwise; returns the thread count it replaced (None: left alone). vLLM does the same for its
    multiprocess workers but not for a one-GPU engine, whose worker runs inside the EngineCore
    process. The plugin's per-step host tensors ([requests, layers, KV heads]) pass PyTorch's
    parallel grain past 128 requests, and a served step's host work then waits on 16 threads that
    the API server and clients keep off the cores (benchmarks/results/serving-notes.md)."""
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" in environ or before == 1:
        return None
    torch.set_num_threads(1)
    runtime.logger.info("kv compression: PyTorch host threads %d -> 1 in the GPU worker (set OMP_NUM_THREADS to choose)",
                        before)
    return before


class _UnusedBlockTable(BlockTable):
    """vLLM's BlockTable that ignores the block ids streamed to it (the worker assigns them)."""

    def append_row(self, block_ids, row_idx: int) -> None:
        pass


def compression_workspace(spec: HeadBlockSpec, vllm_config) -> int:
    """Bytes a compression of the longest request holds at once: the dense K/V copy of every layer
    (the policy scores all layers before any budget is known; an fp8 pool's rows dequantized to
    float32, 4 bytes a value) plus a quarter for retained rows and scoring temporaries, plus 256 MiB
    of attention logits (EMS column mass, window scores)."""
    page = spec.page_size_bytes
    if vllm_config.cache_config.cache_dtype in settings.FP8_CACHE_DTYPES:
        page *= 4 // get_dtype_size(spec.dtype)
    return workspace_for(spec.blocks_per_request(vllm_config.model_config.max_model_len) * page)


def workspace_for(dense_bytes: int) -> int:
    """:func:`compression_workspace` of a request whose K/V of every head take ``dense_bytes``
    as the policies see them."""
    return dense_bytes + dense_bytes // 4 + (256 << 20)


def decode_buffer_shape(spec: HeadBlockSpec, vllm_config, max_len: int) -> dict:
    """Sizes of the CUDA-graph decode buffers: a row for every request a decode graph can hold
    (vLLM pads batches up to its largest capture size), a table column for every block of the
    longest head a graph step may hold (``max_len`` rows, at most the context)."""
    compilation, scheduler = vllm_config.compilation_config, vllm_config.scheduler_config
    rows = max(scheduler.max_num_seqs, getattr(compilation, "max_cudagraph_capture_size", None) or 0)
    return dict(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                num_q_heads=vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config),
                head_dim=spec.head_size, rows=rows,
                width=-(-min(vllm_config.model_config.max_model_len, max_len) // spec.block_size))


_RUNNERS: dict[type, type] = {}


def _with_mixin(cls: type) -> type:
    if cls not in _RUNNERS:
        _RUNNERS[cls] = type(f"HeadBlock{cls.__name__}", (_HeadBlockRunnerMixin, cls), {})
    return _RUNNERS[cls]


class _KVCompressWorkerMixin:
    _backend_slot = AttentionBackendEnum.CUSTOM

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if settings.read(self.vllm_config.additional_config) is None:
            raise ValueError("the kv-compression worker was selected without a kv_compression policy")
        register_backend(self._backend_slot, BACKEND)

    def init_device(self):
        super().init_device()
        if self.model_runner.device.type == "cuda":
            limit_host_threads()
        self.model_runner.__class__ = _with_mixin(type(self.model_runner))
        runtime.RUNNER = self.model_runner

    def execute_model(self, scheduler_output, *args, **kwargs):
        runtime.TIMER.step_started(rows=len(scheduler_output.num_scheduled_tokens),
                                   tokens=scheduler_output.total_num_scheduled_tokens)
        if runtime.WORKER_STATE is not None:
            runtime.WORKER_STATE.ingest(scheduler_output)
        return super().execute_model(scheduler_output, *args, **kwargs)


def __getattr__(name: str) -> type:
    """The platform's worker class with our hooks, built on first use: importing vLLM's CPU worker
    monkeypatches torch (``vllm/v1/worker/cpu/shm.py`` replaces ``torch.accelerator.get_memory_info``,
    CUDA events and streams), so a GPU process must never import it."""
    if name == "KVCompressCPUWorker":
        from vllm_kvcompress.vllm.compat import CPUWorker

        cls = type(name, (_KVCompressWorkerMixin, CPUWorker), {"_backend_slot": AttentionBackendEnum.CPU_ATTN})
    elif name == "KVCompressGPUWorker":
        from vllm_kvcompress.vllm.compat import GPUWorker as Worker

        cls = type(name, (_KVCompressWorkerMixin, Worker), {})
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls.__module__ = __name__
    globals()[name] = cls
    return cls
