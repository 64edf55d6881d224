"""A compression policy = scorer + allocator + reducer + budget."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.allocation import AllocationInput, Allocator
from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.observation import LayerObservation, check_signals
from vllm_kvcompress.policies.reduction import Reducer, RetainedLayer, protected_positions
from vllm_kvcompress.policies.scoring import Scorer
from vllm_kvcompress.policies.tensor_parallel import SINGLE, HeadShards


@dataclass(frozen=True)
class Policy:
    """Compress every layer of one request.

    window: observation-window length (its tokens are always kept); sink: leading tokens always kept.
    window_in_budget: whether the budget counts the window and sinks (True: a head's budget is every
    token it retains, so equal budgets are equal memory). False keeps them on top of the budget, as
    WindowKV's paper counts its budget (its suffix on top): a head then retains up to budget +
    window + sink tokens.
    """

    scorer: Scorer
    allocator: Allocator
    reducer: Reducer
    budget: Budget
    window: int = 32
    sink: int = 0
    window_in_budget: bool = True

    def __post_init__(self) -> None:
        check_signals(self.scorer.observes)

    @property
    def observes(self) -> frozenset[str]:
        """The prefill signals the engines collect for this policy (its scorer's)."""
        return self.scorer.observes

    @property
    def needs_global_attention(self) -> bool:
        return self.scorer.needs_global_attention

    @property
    def scores_from_pages(self) -> bool:
        """Whether heads can be compressed straight from their pages, the kept rows moved in place
        (:meth:`select_heads`): the reducer only selects rows and the scorer reads no keys. The
        prefill's compression also needs an allocator that reads scores only (:meth:`select_prefills`)."""
        return self.reducer.selects_rows and not self.scorer.reads_keys

    def floor(self, seq_len: int) -> int:
        return min(seq_len, self.window + self.sink)

    def per_head(self, seq_len: int) -> int:
        """The average tokens per head a request of ``seq_len`` keeps (window and sinks included)."""
        floor = self.floor(seq_len)
        if self.window_in_budget:
            return self.budget.per_head(seq_len, floor)
        return min(seq_len, self.budget.per_head(seq_len) + floor)

    def for_request(self, observations: list[LayerObservation], shards: HeadShards = SINGLE
                    ) -> tuple["Policy", list[LayerObservation]]:
        """This policy as it compresses one request, and the observations it then sees: the reducer
        may pick the request's observation window (WindowKV: its suffix by task type), shorter
        than the one the engine collected (``window``). ``shards``: the observations hold one
        tensor-parallel rank's heads; the reducer decides from every rank's."""
        window, reducer = self.reducer.for_request(observations, self.window, shards)
        if window == self.window and reducer is self.reducer:
            return self, observations
        trimmed = [dataclasses.replace(o, window_queries=o.window_queries[:, -window:]) for o in observations]
        return dataclasses.replace(self, window=window, reducer=reducer), trimmed

    def budgets(self, observations: list[LayerObservation]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(budgets int64 [num_layers, num_kv_heads], scores per layer, protected bool [seq_len])."""
        policy, observations = self.for_request(observations)
        return policy._allocate(observations)

    def _allocate(self, observations: list[LayerObservation], shards: HeadShards = SINGLE
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(budgets of every head, int64 [num_layers, all KV heads]; these heads' scores; protected).
        With ``shards`` the observations are one tensor-parallel rank's heads: every rank's scores
        are gathered and allocated together, as on one GPU (:mod:`~vllm_kvcompress.policies.tensor_parallel`)."""
        seq_len = observations[0].seq_len
        scores = [self.scorer.score(o) for o in observations]
        protected = protected_positions(seq_len, self.window, self.sink, device=scores[0].device)
        inp = self._allocation_input(scores, seq_len, protected, observations, shards)
        return self.allocator.allocate(inp), scores, protected

    @property
    def compresses_heads_apart(self) -> bool:
        """Whether a prefill's heads can be scored and reduced in batches of any heads, from any
        layers (:meth:`prefill_budgets`, :meth:`reduce_prefill_heads`): the reducer decides each
        head alone and keeps the policy's window, and the allocator reads scores only. The engine
        then compresses a request in a few calls over many layers each, not one per layer (on a
        GPU a per-layer loop's launches, not its arithmetic, are what a prefill compression costs)."""
        return self.reducer.heads_independent and not self.allocator.reads_layers

    def prefill_budgets(self, scores, shards: HeadShards = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """The budgets of every head of some requests, each from its own heads' scores as if it were
        alone (``scorer.score`` of any batches of heads): per request float32 [num_layers,
        num_kv_heads, its prompt length] (a list, or a tensor [requests, ...] of one length; one
        tensor-parallel rank's heads under ``shards``); one allocator call for all
        (:meth:`Allocator.allocate_requests`). Returns (budgets int64 [requests, num_layers, all KV
        heads], the first request's protected positions, bool [its length]). For allocators that
        read scores only (:attr:`compresses_heads_apart`)."""
        inputs = [self._prefill_input(request_scores, shards) for request_scores in scores]
        return torch.stack(self.allocator.allocate_requests(inputs)), inputs[0].protected

    def _prefill_input(self, scores: torch.Tensor, shards: HeadShards) -> AllocationInput:
        """What the allocator sees of a prefill from its heads' scores, as :meth:`prefill_budgets` takes them."""
        if self.allocator.reads_layers:
            raise ValueError(f"{type(self.allocator).__name__} reads the layers: use compress_shard")
        seq_len = scores.shape[-1]
        protected = protected_positions(seq_len, self.window, self.sink, device=scores.device)
        return self._allocation_input(list(scores), seq_len, protected, None, shards)

    def reduce_prefill_heads(self, heads: LayerObservation, scores: torch.Tensor, budgets: torch.Tensor,
                             protected: torch.Tensor) -> RetainedLayer:
        """Some heads of a prefill (any layers, whole prompts), each reduced to its budget as
        :meth:`compress` reduces it: heads [n heads], scores [n, seq_len] (``scorer.score``),
        budgets int64 [n] (of :meth:`prefill_budgets`), protected from it."""
        if not self.compresses_heads_apart:
            raise ValueError(f"{type(self.reducer).__name__} with {type(self.allocator).__name__} compresses "
                             "whole layers: use compress_shard")
        return self.reducer.reduce_heads(heads, scores, budgets, protected)

    def _allocation_input(self, scores: list[torch.Tensor], seq_len: int, protected: torch.Tensor, observations,
                          shards: HeadShards) -> AllocationInput:
        if shards.sharded:  # the allocator sees every rank's scores; observations stay this rank's
            scores = list(shards.gather(torch.stack(scores), dim=1))
        return AllocationInput(scores, self.per_head(seq_len), self.floor(seq_len), protected, observations, shards)

    def decode_budgets(self, retained: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Per-head lengths decode-time recompression brings heads back to, int64 [num_layers, num_kv_heads].

        Normally the allocated budgets (``retained``). A prompt shorter than the per-head budget the
        policy asks for (at least window + sinks) was kept whole, every head at ``prompt_len``; its
        heads may then grow to that budget before they are compressed -- holding them at the prompt
        length would keep fewer tokens than the user allowed and, under window + sinks, would evict
        the newest tokens (all protected, the oldest win the tie)."""
        asked = self.budget.tokens if self.budget.tokens is not None else round(self.budget.fraction * prompt_len)
        asked = max(asked, self.window + self.sink)
        return retained + max(0, asked - prompt_len)

    def recompress_heads(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         budgets: torch.Tensor, lengths: torch.Tensor | None = None,
                         scored: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode-time recompression of some KV heads, each down to its own budget, as if each were
        recompressed alone.

        queries: [num_heads * group, <=window, D] the heads' query heads' recent queries;
        keys, values: [num_heads, n, D]; budgets: int [num_heads]; lengths: int64 [num_heads] or
        None -- heads of different lengths (only if ``reducer.pads_heads``): head i's rows are its
        last ``lengths[i]``, padding before them. Returns the kept keys and values, each
        [num_heads, max(budgets), D]: head i's first ``budgets[i]`` rows, zeros after them.
        ``scored``: what :meth:`decode_scores` gives for these heads, when the caller scored them
        already (from their pages: scorers that read no keys)."""
        if lengths is not None and not self.reducer.pads_heads:
            raise ValueError(f"{type(self.reducer).__name__} recompresses heads of equal lengths only")
        obs = LayerObservation(queries, keys, values, lengths=lengths)
        scores, protected = self.decode_scores(obs) if scored is None else scored
        kept = self.reducer.reduce_heads(obs, scores, torch.as_tensor(budgets).cpu(), protected)
        return kept.keys, kept.values

    def decode_scores(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [n, seq_len] with padding -inf, protected positions) of heads being recompressed."""
        window = min(self.window, obs.window)
        protected = protected_positions(obs.seq_len, window, self.sink, obs.device, obs.lengths)
        scores = self.scorer.score(obs)
        if obs.lengths is not None:  # padding is never kept
            scores = scores.masked_fill(obs.padding, float("-inf"))
        return scores, protected

    def select_heads(self, heads, budgets: torch.Tensor) -> torch.Tensor:
        """:meth:`recompress_heads` for reducers that only select rows (``reducer.selects_rows``),
        from an observation without dense keys (:class:`~vllm_kvcompress.paged.heads.PagedHeads`):
        the rows each head keeps, int64 [n, max(budgets)], increasing columns of ``heads`` (its
        right-aligned layout), -1 padded. budgets: int64 [n] on the host (they reach the device
        through pinned memory, :func:`~vllm_kvcompress.policies.reduction.on_device`, so that
        nothing waits for it)."""
        scores, protected = self.decode_scores(heads)
        return self.reducer.select_heads(heads, scores, budgets, protected)

    def recompress_head(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`recompress_heads` of one head: queries [group, <=window, D]; keys, values [n, D].
        Returns the kept keys and values, [budget, D] each."""
        kept_keys, kept_values = self.recompress_heads(queries, keys[None], values[None], torch.tensor([budget]))
        return kept_keys[0], kept_values[0]

    def select_prefills(self, heads, lengths: list[int], num_layers: int, shards: HeadShards = SINGLE
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`compress` for reducers that only select rows, of one or more requests at once (one
        scoring and one selection for all), from an observation of their heads without dense keys
        (:class:`~vllm_kvcompress.paged.heads.PagedHeads`), for allocators that read scores only
        (not ``allocator.reads_layers``). ``heads`` holds each request's ``num_layers *
        num_kv_heads`` heads in turn, layer-major, request r's ``lengths[r]`` prompt rows
        right-aligned in ``heads.width`` columns. Each request's budgets come from its own scores,
        as if it were alone (one allocator call for all: :meth:`Allocator.allocate_requests`). Returns
        (the columns each head keeps, int64 [all heads, max budget], increasing, -1 padded; each
        request's budgets, int64 [L, H]). With ``shards``: one tensor-parallel rank's heads, the
        budgets of all of every rank's heads [L, shards.total] (:meth:`_allocate`)."""
        scores = self.scorer.score(heads)  # [all heads, width], each head's rows last
        per_request = scores.shape[0] // len(lengths)
        budgets, _ = self.prefill_budgets([scores[r * per_request:(r + 1) * per_request, heads.width - n:]
                                           .reshape(num_layers, -1, n) for r, n in enumerate(lengths)], shards)
        protected = protected_positions(heads.width, self.window, self.sink, scores.device, heads.lengths)
        mine = torch.cat([shards.mine(b).flatten().cpu() for b in budgets])
        keep = self.reducer.select_heads(heads, scores.masked_fill(heads.padding, float("-inf")), mine, protected)
        return keep, list(budgets)

    def compress(self, observations: list[LayerObservation]) -> list[RetainedLayer]:
        """observations: one per layer, all of the same request (same seq_len)."""
        return self.compress_shard(observations)[0]

    def compress_shard(self, observations: list[LayerObservation], shards: HeadShards = SINGLE
                       ) -> tuple[list[RetainedLayer], torch.Tensor]:
        """:meth:`compress` of one tensor-parallel rank's heads (``shards``; by default all heads).
        Returns the retained layers of these heads and the budgets of every head, [num_layers, all
        heads]. A reducer whose heads share a decision (not ``heads_independent``: WindowKV's
        windows) decides from every rank's scores and keeps this rank's heads' rows."""
        if len({o.seq_len for o in observations}) != 1:
            raise ValueError("all layers of a request must hold the same number of tokens")
        policy, observations = self.for_request(observations, shards)
        budgets, scores, protected = policy._allocate(observations, shards)
        if policy.reducer.ranks_query_heads:
            rows = [policy.scorer.query_head_scores(o) for o in observations]
            scores = scores if rows[0] is None else rows
        if shards.sharded and not policy.reducer.heads_independent:
            scores = [shards.gather(s, dim=0) for s in scores]  # query heads (or KV heads) in rank order
        return policy.reducer.reduce(observations, scores, shards.mine(budgets), protected), budgets
