"""Scorers: how important each cached token is to each KV head.

A scorer maps a :class:`LayerObservation` to float32 scores ``[num_kv_heads, seq_len]``; higher
means keep. Query heads of a GQA group are summed onto their shared KV head (no KV repetition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .observation import LayerObservation
from .paged.reference import max_pool_scores, window_scores


@dataclass(frozen=True)
class Scorer:
    """Base class. ``needs_global_attention`` asks the engine to collect
    :attr:`LayerObservation.global_attention` during prefill."""

    needs_global_attention = False

    def score(self, obs: LayerObservation) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class RecencyScorer(Scorer):
    """StreamingLLM: newer tokens are worth more; with a top-k reducer and ``sink`` tokens this keeps
    the attention sinks plus the most recent tokens (Xiao et al. 2023)."""

    def score(self, obs: LayerObservation) -> torch.Tensor:
        positions = torch.arange(obs.seq_len, dtype=torch.float32, device=obs.keys.device)
        return positions.expand(obs.num_kv_heads, -1).clone()


@dataclass(frozen=True)
class SnapKVScorer(Scorer):
    """SnapKV (Li et al. 2024, Sec. 4): softmax attention of the observation-window queries, summed
    over the window and the group's query heads, then max-pooled (``pool_kernel``, default 7) so
    that neighbours of important tokens survive together."""

    pool_kernel: int = 7

    def score(self, obs: LayerObservation) -> torch.Tensor:
        mass = window_scores(obs.window_queries, obs.keys, obs.scale, power=1)
        return max_pool_scores(mass, self.pool_kernel)


@dataclass(frozen=True)
class SquaredAttentionScorer(Scorer):
    """KV-Compress (Rehg 2024, Sec. 3.2): sum over the window and group of the *squared* attention
    probabilities, which favours keys that some query attends to sharply over keys that many
    queries touch weakly. Not pooled by default."""

    pool_kernel: int = 1

    def score(self, obs: LayerObservation) -> torch.Tensor:
        mass = window_scores(obs.window_queries, obs.keys, obs.scale, power=2)
        return max_pool_scores(mass, self.pool_kernel)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
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
    needs_global_attention = True

    def score(self, obs: LayerObservation) -> torch.Tensor:
        local = _normalize_rows(window_scores(obs.window_queries, obs.keys, obs.scale, power=1))
        if obs.global_attention is None:
            mixed = local
        else:
            seq_len = obs.seq_len
            group = obs.window_queries.shape[0] // obs.num_kv_heads
            # key j is seen by the seq_len - j causal queries of each of the group's heads
            seen_by = group * (seq_len - torch.arange(seq_len, device=obs.keys.device)).float()
            glob = _normalize_rows(obs.global_attention.float() / seen_by)
            mixed = (1 - self.local_weight) * glob + self.local_weight * local
        return max_pool_scores(mixed, self.pool_kernel)
