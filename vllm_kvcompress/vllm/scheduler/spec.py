"""Scheduler side: a KVCacheSpec whose block is ONE head-block (``block_size`` tokens of one KV head
of one layer) and the SingleTypeKVCacheManager that counts a request's head-blocks.

Only the first attention layer reports :class:`HeadBlockSpec` (the worker maps every other layer
onto it), so vLLM builds one kv-cache group with one tensor: the whole head-block pool of
``available_memory // page_size_bytes`` blocks, shared by all layers (``paged/layout.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.compat import AttentionSpec, SingleTypeKVCacheManager, cdiv, get_dtype_size


@dataclass(frozen=True, kw_only=True)
class HeadBlockSpec(AttentionSpec):
    """num_kv_heads / head_size / dtype describe the model; one block = one head's rows."""

    num_layers: int = 1

    @property
    def real_page_size_bytes(self) -> int:
        return 2 * self.block_size * self.head_size * get_dtype_size(self.dtype)  # K and V of one head

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.blocks_per_request(vllm_config.model_config.max_model_len) * self.page_size_bytes

    def blocks_per_request(self, num_tokens: int) -> int:
        """Head-blocks of an uncompressed request of ``num_tokens`` tokens (all layers and heads)."""
        return self.num_layers * self.num_kv_heads * cdiv(num_tokens, self.block_size)

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # sizes the model runner's BlockTable row, which the worker leaves unused (it keeps its
        # own per-head tables): one column
        return 1


class HeadLengths:
    """A worker report: every head's rows ``lens`` ([L][H] lists, or an int tensor) at ``T`` tokens.
    :meth:`need` answers ``sum cdiv(lens + N - T, bs)`` in O(1), since the scheduler asks for every
    running request at every step: with ``lens = q*bs + r`` and ``N - T + bs - 1 = m*bs + e``, each
    head needs ``q + m`` blocks, plus one if ``r + e >= bs``. Built in plain Python: a tick reports
    every running request at once, and a few small tensor ops per report cost more than the
    arithmetic over one request's heads."""

    def __init__(self, T: int, lens, block_size: int):
        rows = lens.flatten().tolist() if isinstance(lens, torch.Tensor) else [n for layer in lens for n in layer]
        self.T, self.rows, self.bs = T, rows, block_size
        self.whole = sum(n // block_size for n in rows)
        self.heads = len(rows)
        remainders = [0] * block_size
        for n in rows:
            remainders[n % block_size] += 1
        self.at_least = [0] * (block_size + 1)  # at_least[k]: heads whose remainder is >= k (k = 0 .. bs)
        for k in range(block_size - 1, -1, -1):
            self.at_least[k] = self.at_least[k + 1] + remainders[k]

    def need(self, num_tokens: int) -> int:
        grow = num_tokens - self.T
        if grow < 0:  # not reached by the scheduler (it never asks for fewer tokens than reported)
            return sum(-(-max(n + grow, 0) // self.bs) for n in self.rows)
        m, e = divmod(grow + self.bs - 1, self.bs)
        return self.whole + self.heads * m + self.at_least[self.bs - e]


class HeadBlockManager(SingleTypeKVCacheManager):
    """A request's blocks = the head-blocks of all its (layer, head) pairs.

    Need for ``N`` tokens: uncompressed ``L*H*cdiv(N, bs)``; after the worker's report
    ``(T, lens [L, H])``: ``sum cdiv(lens + N - T, bs)`` (exact for N >= T, and the uncompressed
    formula is an upper bound before the report lands). Allocation never shrinks what is held;
    surplus comes back only through :meth:`apply_report`. With the server's
    ``reserve_decode_growth``, admitting a request also asks for :meth:`admission_reserve` free.
    """

    def __init__(self, kv_cache_spec: HeadBlockSpec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        self.heads = kv_cache_spec.num_layers * kv_cache_spec.num_kv_heads
        self.reports: dict[str, HeadLengths] = {}
        self.peak_requests = 0
        from vllm_kvcompress.vllm.frontend import params# here, not at the top: plain vLLM (compression off) imports this module

        config = params.server_config()  # published by the front end before the EngineCore started
        # a compressed request's heads grow at most decode_slack rows before the next recompression
        self.growth_rows = (config.decode_slack or 0) if config is not None and config.reserve_decode_growth else 0
        runtime.MANAGER = self
        runtime.event("manager_init", num_blocks=self.block_pool.num_gpu_blocks,
                      free=self.block_pool.get_num_free_blocks(), heads=self.heads)

    def need(self, request_id: str, num_tokens: int) -> int:
        report = self.reports.get(request_id)
        if report is None:
            return self.heads * cdiv(num_tokens, self.block_size)
        return report.need(num_tokens)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model,
                                   apply_admission_cap=False) -> int:
        assert len(new_computed_blocks) == 0, "prefix caching must be off with head-block compression"
        held = self.req_to_blocks.get(request_id)
        missing = max(self.need(request_id, num_tokens) - len(held or ()), 0)
        if not held:  # admitting it (new or resumed): the running requests' growth stays free
            missing += self.admission_reserve()
        return missing

    def admission_reserve(self) -> int:
        """Head-blocks an admission leaves free (``reserve_decode_growth``; else 0): what the
        compressed requests running now (those with a report) may still take before their next
        decode-time recompression -- their heads' ``decode_slack`` rows past the reported lengths,
        less the blocks they hold (the worker keeps a tick's freed blocks as their spares)."""
        if not self.growth_rows:
            return 0
        return sum(max(0, report.need(report.T + self.growth_rows) - len(self.req_to_blocks[rid]))
                   for rid, report in self.reports.items())

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        held = self.req_to_blocks[request_id]
        missing = self.need(request_id, num_tokens) - len(held)
        new = self.block_pool.get_new_blocks(missing) if missing > 0 else []
        held.extend(new)
        if len(self.req_to_blocks) > self.peak_requests:
            self.peak_requests = len(self.req_to_blocks)
            runtime.event("peak_requests", peak=self.peak_requests)
        return new

    def apply_report(self, request_id: str, released: list[int], T: int, lens) -> int:
        """The worker no longer uses ``released`` (block ids) of the request; its heads held ``lens``
        [L][H] rows at ``T`` tokens. Returns the number of blocks given back to the pool."""
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:  # finished (or preempted) meanwhile: everything went back already
            return 0
        if released:  # none: new lengths only (a tick whose freed blocks the request keeps for its regrowth)
            ids = set(released)
            kept = [b for b in blocks if b.block_id not in ids]  # one pass: a request holds ~L*H*budget/bs
            if len(ids) != len(released):
                raise RuntimeError(f"worker released a head-block of request {request_id} twice in one report")
            if len(blocks) - len(kept) != len(ids):
                raise RuntimeError(f"worker released {len(ids) - (len(blocks) - len(kept))} head-blocks request "
                                   f"{request_id} does not hold: scheduler and worker disagree")
            self.req_to_blocks[request_id] = kept
            self.block_pool.free_blocks(self.block_pool.blocks[i] for i in released)
        self.reports[request_id] = HeadLengths(T, lens, self.block_size)
        return len(released)

    def pop_blocks_for_free(self, request_id: str):
        self.reports.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        runtime.event("request_freed", req_id=request_id, blocks=len(blocks))
        return blocks

    def new_step_starts(self) -> None:
        # called by the scheduler before each schedule(): the pool as the previous step left it
        state = (self.block_pool.get_num_free_blocks(), len(self.req_to_blocks))
        if state != getattr(self, "_last_state", None):
            self._last_state = state
            runtime.event("step", free=state[0], requests=state[1])

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0

    @classmethod
    def find_longest_cache_hit(cls, *args, **kwargs):
        raise NotImplementedError("prefix caching is not supported with head-block compression")


def register_spec() -> None:
    """HeadBlockSpec -> HeadBlockManager in vLLM's registry. The built-ins go first:
    ``KVCacheSpecRegistry._ensure_registered`` skips them once the registry is non-empty."""
    from vllm_kvcompress.vllm.compat import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(HeadBlockSpec, HeadBlockManager, uniform_type_base_spec=HeadBlockSpec)
