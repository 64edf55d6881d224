"""Scorers: how important each cached token is to each KV head.

A scorer maps a :class:`LayerObservation` to float32 scores ``[num_kv_heads, seq_len]``; higher
means keep. Query heads of a GQA group are summed onto their shared KV head (no KV repetition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.paged.reference import max_pool_scores
from vllm_kvcompress.policies.registry import SCORERS, check_bool, check_int, check_number


@dataclass(frozen=True)
class Scorer:
    """Base class. ``observes``: the prefill signals (:data:`~vllm_kvcompress.policies.observation.PREFILL_SIGNALS`)
    the engines must collect for it, e.g. ``{"global_attention"}``; ``reads_keys``: the scores read
    the layer's keys themselves (not only each KV head's window attention over them, which
    :class:`~vllm_kvcompress.paged.heads.PagedHeads` computes from the pages), so the engine hands
    the scorer dense keys instead of scoring straight from the pages."""

    observes = frozenset()  # a class attribute, not an option
    reads_keys = False

    @property
    def needs_global_attention(self) -> bool:
        return "global_attention" in self.observes

    def score(self, obs: LayerObservation) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def query_head_scores(self, obs: LayerObservation) -> torch.Tensor | None:
        """float32 [num_q_heads, seq_len]: the scores before the group sum, for reducers that rank
        by query head (WindowKV); None where a scorer has KV-head scores only."""
        return None


def prefix_only(scores: torch.Tensor, window: int) -> torch.Tensor:
    """``scores`` [num_heads, seq_len] with the last ``window`` positions set to 0.

    The observation window is always kept, and its queries attend strongly to themselves: left in,
    their scores would leak through max-pooling onto the tokens just before the window and count in
    the mass that allocators split (SnapKV scores the prefix only, for the same reason)."""
    out = scores.clone()
    out[:, max(0, scores.shape[1] - window) :] = 0
    return out


def _decidable(scores: torch.Tensor, obs: LayerObservation, exclude_window: bool) -> torch.Tensor:
    return prefix_only(scores, obs.window) if exclude_window else scores


def _check_pooling(scorer) -> None:
    check_int("pool_kernel", scorer.pool_kernel)
    if scorer.pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd, got {scorer.pool_kernel}")
    check_bool("exclude_window", scorer.exclude_window)


def _pooled(scores: torch.Tensor, obs: LayerObservation, kernel: int, exclude_window: bool) -> torch.Tensor:
    """Max-pooled scores; with ``exclude_window`` the window is zeroed before (no spill onto the
    prefix) and after (no prefix score spread onto it) the pooling."""
    pooled = max_pool_scores(_decidable(scores, obs, exclude_window), kernel)
    return _decidable(pooled, obs, exclude_window)


@SCORERS.register("recency")
@dataclass(frozen=True)
class RecencyScorer(Scorer):
    """StreamingLLM: newer tokens are worth more; with a top-k reducer and ``sink`` tokens this keeps
    the attention sinks plus the most recent tokens (Xiao et al. 2023)."""

    def score(self, obs: LayerObservation) -> torch.Tensor:
        positions = torch.arange(obs.seq_len, dtype=torch.float32, device=obs.device)
        if obs.lengths is not None:  # each head's own positions (its padding negative)
            return positions[None, :] - (obs.seq_len - obs.lengths.to(obs.device)).float()[:, None]
        return positions.expand(obs.num_kv_heads, -1).clone()


@SCORERS.register("snapkv")
@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    """SnapKV (Li et al. 2024, Sec. 4): softmax attention of the observation-window queries, summed
    over the window and the group's query heads, then max-pooled (``pool_kernel``, default 7) so
    that neighbours of important tokens survive together."""

    pool_kernel: int = 7
    exclude_window: bool = True  # score the prefix only (see prefix_only)

    def __post_init__(self) -> None:
        _check_pooling(self)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return _pooled(obs.window_mass(power=1), obs, self.pool_kernel, self.exclude_window)


@SCORERS.register("squared")
@dataclass(frozen=True)
class SquaredAttentionScorer(Scorer):
    """KV-Compress (Rehg 2024, Sec. 3.2): sum over the window and group of the *squared* attention
    probabilities, which favours keys that some query attends to sharply over keys that many
    queries touch weakly. Not pooled by default."""

    pool_kernel: int = 1
    exclude_window: bool = True

    def __post_init__(self) -> None:
        _check_pooling(self)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return _pooled(obs.window_mass(power=2), obs, self.pool_kernel, self.exclude_window)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each head's scores as a distribution (rows summing to 1; an all-zero row stays zero)."""
    return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@SCORERS.register("ems")
@dataclass(frozen=True)
class EMSScorer(Scorer):
    """EMS Global-Local importance (arXiv 2412.08521, Sec. 3.2).

    *Global*: the attention each key accumulated from every prompt query -- the causal column sums
    of the prompt's attention (H2O-style), summed over the group's query heads. The causal mask
    biases it toward early tokens (they are seen by more queries). *Local*: the observation-window
    attention (SnapKV's view of what the upcoming tokens need), biased toward recent tokens. The
    two are mean-aligned -- each scaled per head to mean 1 over the prefix, i.e. to the same
    scale -- and mixed as ``(1 - local_weight) * global + local_weight * local``, so the opposite
    biases offset each other; then max-pooled. Nothing divides the global term by the number of
    queries that see a key: that removes the early-token bias a second time and leaves a recency
    score. ``local_weight`` = 0.5 is ours (the sources combine the two views without a public
    weight); so is the pooling, shared with SnapKV-style scorers.

    ``local_weight`` = 1 is the local term alone: no column mass is collected then.

    scores: float32 [num_kv_heads, seq_len]; the window scores 0 (it is always kept). During
    decode-time recompression there is no new global view; the global term is the one the engine
    carries along for retained tokens, or the local view alone when none is given.
    """

    local_weight: float = 0.5
    pool_kernel: int = 7
    exclude_window: bool = True

    def __post_init__(self) -> None:
        check_number("local_weight", self.local_weight, 0.0, 1.0)
        _check_pooling(self)

    @property
    def observes(self) -> frozenset[str]:
        # the local term alone needs no column mass
        return frozenset({"global_attention"}) if self.local_weight < 1.0 else frozenset()

    def score(self, obs: LayerObservation) -> torch.Tensor:
        local = obs.window_mass(power=1)
        # rows summing to 1 over the same positions = rows with the same mean: mean alignment
        local = normalize_rows(_decidable(local, obs, self.exclude_window))
        if obs.global_attention is None:
            mixed = local
        else:
            glob = normalize_rows(_decidable(obs.global_attention.float(), obs, self.exclude_window))
            mixed = (1 - self.local_weight) * glob + self.local_weight * local
        return _pooled(mixed, obs, self.pool_kernel, self.exclude_window)


def window_probabilities(obs: LayerObservation) -> torch.Tensor:
    """Softmax attention of the window queries over the keys, causal among themselves (window query
    i sits at position seq_len - window + i): float32 [num_kv_heads, group * window, seq_len], the
    group's query heads one after the other (query head g * group + i reads KV head g)."""
    num_q_heads, window, head_dim = obs.window_queries.shape
    group = num_q_heads // obs.num_kv_heads
    q = obs.window_queries.float().reshape(obs.num_kv_heads, group * window, head_dim)
    logits = torch.einsum("hqd,hld->hql", q, obs.keys.float()) * obs.scale
    query_pos = (obs.seq_len - window + torch.arange(window, device=q.device)).repeat(group)
    hidden = (torch.arange(obs.seq_len, device=q.device)[None, :] > query_pos[:, None])[None]
    if obs.padding is not None:
        hidden = hidden | obs.padding[:, None, :]
    return logits.masked_fill(hidden, float("-inf")).softmax(-1)


def query_head_window_attention(obs: LayerObservation) -> torch.Tensor:
    """The window queries' attention summed over the window, one row per QUERY head: float32
    [num_q_heads, seq_len] (:func:`window_scores` sums each group onto its KV head)."""
    num_q_heads, window, _ = obs.window_queries.shape
    return window_probabilities(obs).reshape(num_q_heads, window, obs.seq_len).sum(1)


@SCORERS.register("windowkv")
@dataclass(frozen=True)
class WindowKVScorer(Scorer):
    """WindowKV token scores (arXiv 2503.17922, Sec. 3; official code): the softmax attention of
    the suffix queries (the observation window) against all keys, summed over the suffix, prefix
    positions only (the suffix is kept whole and scores 0). Raw: no pooling, no normalisation.

    :meth:`query_head_scores` keeps one row per query head, as WindowKV ranks its windows;
    :meth:`score` sums each group onto its KV head, for allocators and other reducers."""

    reads_keys = True  # its rows per query head need the dense keys (the pages give each KV head's sum)

    def query_head_scores(self, obs: LayerObservation) -> torch.Tensor:
        return prefix_only(query_head_window_attention(obs), obs.window)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        rows = self.query_head_scores(obs)
        return rows.reshape(obs.num_kv_heads, -1, obs.seq_len).sum(1)


@SCORERS.register("keydiff")
@dataclass(frozen=True)
class KeyDiffScorer(Scorer):
    """KeyDiff (arXiv 2504.15364; kvpress's ``KeyDiffPress``): a key is worth keeping the farther its
    direction is from its head's average key direction -- ``1 - cos(k, anchor)``, the anchor the
    normalised mean of the head's unit keys. It reads no queries, so the same keys score the same
    whatever follows them (the window is still kept, as by every policy). The ``1 -`` (ours; the
    sources rank by ``-cos``) keeps the scores nonnegative for allocators that split by score mass.
    During decode-time recompression the anchor is each head's own rows' (padding left out)."""

    reads_keys = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        unit = torch.nn.functional.normalize(obs.keys.float(), dim=-1)  # [H, n, D]
        if obs.lengths is not None:
            unit = unit.masked_fill(obs.padding[..., None], 0.0)
        anchor = torch.nn.functional.normalize(unit.sum(1), dim=-1)  # the mean's direction: [H, D]
        return 1.0 - (unit @ anchor[..., None]).squeeze(-1)

