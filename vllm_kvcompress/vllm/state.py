"""Worker side: which pool blocks each (request, layer, KV head) owns, and how many rows it holds.

The scheduler streams block ids per request (``NewRequestData.block_ids[0]``,
``CachedRequestData.new_block_ids[i][0]``) sized by :class:`~.spec.HeadBlockManager`; this state
keeps them as the request's *spare* list and hands them to heads, in order, as heads fill up.
After a compression the tail blocks go back to the spare list, and the spares beyond what the
next ``LAG_TOKENS`` tokens can need are reported to the scheduler (:meth:`WorkerState.take_reports`).
Invariant: the scheduler's blocks of a request = assigned + spare (+ reports in flight).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..config import CompressionConfig
from ..paged.layout import cdiv
from ..policy import Policy
from ..presets import build_policy

# Tokens the scheduler may schedule before it sees a report (one step in flight, async scheduling).
LAG_TOKENS = 2

# Per-request overrides read from SamplingParams.extra_args (design section 6).
OVERRIDE_KEYS = {"kv_compression": "policy", "kv_budget": "budget"}


def request_config(base: CompressionConfig, extra_args: dict | None) -> CompressionConfig:
    """``base`` with the request's ``extra_args`` overrides applied (ValueError names the problem).
    ``extra_args["kv_compression_config"]`` may carry any further options as a dict."""
    extra = extra_args or {}
    changes = dict(extra.get("kv_compression_config") or {})
    changes.update({field_: extra[key] for key, field_ in OVERRIDE_KEYS.items() if key in extra})
    return base.replace(**changes) if changes else base


@dataclass
class ReqState:
    """One request. blocks[l][h]: its pool block ids; lens[l][h]: rows held; num_tokens: the true
    sequence length whose K/V went through the cache; compress_at: the length at which the prefill
    completes (None = never compress); queries[l]: [Hq, <=window, D] the latest prefill queries;
    global_attention[l]: float32 [H, n] causal column mass so far (EMS scorers only)."""

    num_layers: int
    num_kv_heads: int
    policy: Policy | None
    compress_at: int | None
    spare: list[int] = field(default_factory=list)
    num_tokens: int = 0
    prefill_chunks: int = 0  # steps the observed prefill took (chunked prefill when > 1)
    compressed: bool = False
    blocks: list = None
    lens: list = None
    queries: dict = field(default_factory=dict)
    global_attention: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = [[[] for _ in range(self.num_kv_heads)] for _ in range(self.num_layers)]
        self.lens = [[0] * self.num_kv_heads for _ in range(self.num_layers)]

    @property
    def observing(self) -> bool:
        """True while the prefill runs for a request that will be compressed at its end."""
        return self.policy is not None and not self.compressed and self.compress_at is not None


class WorkerState:
    def __init__(self, num_layers: int, num_kv_heads: int, block_size: int, layer_index: dict[str, int],
                 config: CompressionConfig):
        self.L, self.H, self.bs = num_layers, num_kv_heads, block_size
        self.layer_index = layer_index  # attention layer name -> layer position
        self.config = config
        self.reqs: dict[str, ReqState] = {}
        self.preempted: dict[str, Policy | None] = {}
        self.pending: list[str] = []  # requests whose prefill completed in this step, to compress
        self.pool: torch.Tensor | None = None  # (2, num_blocks, bs, D), set by the first forward
        self._policies: dict[str, Policy | None] = {}

    # ---- policies ---------------------------------------------------------------------------
    def policy_for(self, extra_args: dict | None) -> Policy | None:
        config = request_config(self.config, extra_args)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._policies:
            self._policies[key] = build_policy(config)
        return self._policies[key]

    # ---- from the scheduler output (worker.execute_model, before the forward) --------------
    def ingest(self, scheduler_output) -> None:
        so = scheduler_output
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
            self.preempted.pop(rid, None)
        for rid in so.preempted_req_ids or ():
            st = self.reqs.pop(rid, None)  # the scheduler freed all its blocks; it is recomputed later
            if st is not None:
                self.preempted[rid] = st.policy
        for new in so.scheduled_new_reqs:
            extra = new.sampling_params.extra_args if new.sampling_params is not None else None
            policy = self.policy_for(extra)
            st = ReqState(self.L, self.H, policy, len(new.prompt_token_ids) if policy is not None else None)
            st.spare.extend(new.block_ids[0])
            self.reqs[new.req_id] = st
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                # recomputed from scratch (prompt + output so far); compressed again at its end
                policy = self.preempted.pop(rid, None)
                target = len(cached.all_token_ids[rid]) if rid in cached.all_token_ids else None
                self.reqs[rid] = ReqState(self.L, self.H, policy, target if policy is not None else None)
            if new_ids is not None:
                self.reqs[rid].spare.extend(new_ids[0])

    # ---- appending rows (builder.build, once per step for all layers) -----------------------
    def append(self, rid: str, num_new: int) -> torch.Tensor:
        """Room for ``num_new`` rows in every (layer, head); returns their slots int64 [L, num_new, H]."""
        st = self.reqs[rid]
        slots = torch.empty(self.L, num_new, self.H, dtype=torch.int64)
        offsets = torch.arange(num_new)
        for l in range(self.L):
            for h in range(self.H):
                blocks, start = st.blocks[l][h], st.lens[l][h]
                while len(blocks) < cdiv(start + num_new, self.bs):
                    if not st.spare:
                        raise RuntimeError(f"request {rid}: no spare head-block for layer {l} head {h} "
                                           "(scheduler under-allocated; accounting bug)")
                    blocks.append(st.spare.pop(0))
                pos = start + offsets
                table = torch.tensor(blocks, dtype=torch.int64)
                slots[l, :, h] = table[pos // self.bs] * self.bs + pos % self.bs
                st.lens[l][h] = start + num_new
        st.num_tokens += num_new
        return slots

    def table(self, rid: str, layer: int, width: int) -> torch.Tensor:
        """int32 [H, width] block table of one layer of a request (zero padded)."""
        out = torch.zeros(self.H, width, dtype=torch.int32)
        for h, blocks in enumerate(self.reqs[rid].blocks[layer]):
            out[h, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return out

    # ---- after a compression (compressor) and at the end of a step (connector) -------------
    def compacted(self, rid: str, layer: int, head: int, keep: int) -> None:
        """Head (layer, head) now holds ``keep`` rows at the front of its blocks; tail -> spare."""
        st = self.reqs[rid]
        blocks = st.blocks[layer][head]
        st.spare.extend(blocks[cdiv(keep, self.bs):])
        del blocks[cdiv(keep, self.bs):]
        st.lens[layer][head] = keep

    def take_reports(self) -> dict[str, tuple[list[int], int, list[list[int]]]]:
        """req_id -> (released block ids, T, lens [L][H]) for compressed requests holding more
        spares than the next LAG_TOKENS tokens can need."""
        out = {}
        for rid, st in self.reqs.items():
            if not st.compressed:
                continue
            need = sum(max(cdiv(st.lens[l][h] + LAG_TOKENS, self.bs) - len(st.blocks[l][h]), 0)
                       for l in range(self.L) for h in range(self.H))
            if len(st.spare) > need:
                released, st.spare = st.spare[need:], st.spare[:need]
                out[rid] = (released, st.num_tokens, [list(row) for row in st.lens])
        return out
