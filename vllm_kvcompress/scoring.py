"""Scorers: how important each cached token is to each KV head.

A scorer maps a :class:`LayerObservation` to float32 scores ``[num_kv_heads, seq_len]``; higher
means keep. Query heads of a GQA group are summed onto their shared KV head (no KV repetition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .observation import LayerObservation
from .paged.reference import max_pool_scores


@dataclass(frozen=True)
class Scorer:
    """Base class. ``needs_global_attention`` asks the engine to collect
    :attr:`LayerObservation.global_attention` during prefill."""

    needs_global_attention = False

    def score(self, obs: LayerObservation) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


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


def _pooled(scores: torch.Tensor, obs: LayerObservation, kernel: int, exclude_window: bool) -> torch.Tensor:
    """Max-pooled scores; with ``exclude_window`` the window is zeroed before (no spill onto the
    prefix) and after (no prefix score spread onto it) the pooling."""
    pooled = max_pool_scores(_decidable(scores, obs, exclude_window), kernel)
    return _decidable(pooled, obs, exclude_window)


@dataclass(frozen=True)
class RecencyScorer(Scorer):
    """StreamingLLM: newer tokens are worth more; with a top-k reducer and ``sink`` tokens this keeps
    the attention sinks plus the most recent tokens (Xiao et al. 2023)."""

    def score(self, obs: LayerObservation) -> torch.Tensor:
        positions = torch.arange(obs.seq_len, dtype=torch.float32, device=obs.device)
        if obs.lengths is not None:  # each head's own positions (its padding negative)
            return positions[None, :] - (obs.seq_len - obs.lengths.to(obs.device)).float()[:, None]
        return positions.expand(obs.num_kv_heads, -1).clone()


@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    """SnapKV (Li et al. 2024, Sec. 4): softmax attention of the observation-window queries, summed
    over the window and the group's query heads, then max-pooled (``pool_kernel``, default 7) so
    that neighbours of important tokens survive together."""

    pool_kernel: int = 7
    exclude_window: bool = True  # score the prefix only (see prefix_only)

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return _pooled(obs.window_mass(power=1), obs, self.pool_kernel, self.exclude_window)


@dataclass(frozen=True)
class SquaredAttentionScorer(Scorer):
    """KV-Compress (Rehg 2024, Sec. 3.2): sum over the window and group of the *squared* attention
    probabilities, which favours keys that some query attends to sharply over keys that many
    queries touch weakly. Not pooled by default."""

    pool_kernel: int = 1
    exclude_window: bool = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        return _pooled(obs.window_mass(power=2), obs, self.pool_kernel, self.exclude_window)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each head's scores as a distribution (rows summing to 1; an all-zero row stays zero)."""
    return x / x.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class EMSScorer(Scorer):
    """EMS Global-Local importance (arXiv 2412.08521, Sec. 3.2).

    *Global*: the attention each key accumulated from every prompt query (H2O-style column sums),
    divided by the number of queries that could see it -- without that, early tokens win merely
    by being visible to more queries. *Local*: the observation-window attention (SnapKV's view of
    what the upcoming tokens need). Each is normalised per head to a distribution and they are
    mixed as ``(1 - local_weight) * global + local_weight * local`` (``local_weight`` = 0.5 is our
    choice; the paper combines both views without fixing a public constant), then max-pooled.

    During decode-time recompression there is no new global view; the global term is the one the
    engine carries along for retained tokens, or the local view alone when none is given.
    """

    local_weight: float = 0.5
    pool_kernel: int = 7
    exclude_window: bool = True
    needs_global_attention = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        local = obs.window_mass(power=1)
        local = normalize_rows(_decidable(local, obs, self.exclude_window))
        if obs.global_attention is None:
            mixed = local
        else:
            seq_len = obs.seq_len
            group = obs.window_queries.shape[0] // obs.num_kv_heads
            # key j is seen by the seq_len - j causal queries of each of the group's heads
            seen_by = group * (seq_len - torch.arange(seq_len, device=obs.device)).float()
            glob = normalize_rows(_decidable(obs.global_attention.float() / seen_by, obs, self.exclude_window))
            mixed = (1 - self.local_weight) * glob + self.local_weight * local
        return _pooled(mixed, obs, self.pool_kernel, self.exclude_window)
