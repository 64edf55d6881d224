"""Reducers: turn scores and per-head budgets into the retained cache of each layer.

The result keeps a variable length per KV head -- the structure the paged cache holds later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .observation import LayerObservation


@dataclass
class RetainedLayer:
    """The retained cache of one layer.

    keep_idx: int64 [num_kv_heads, max_len], source positions in increasing order, -1 as padding
              (for merge reducers: the retained token each merged row is anchored at).
    keys, values: [num_kv_heads, max_len, head_dim], rows past ``lengths`` are zero.
    lengths:  int64 [num_kv_heads], the per-head retained length.
    """

    keep_idx: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def gather(cls, obs: LayerObservation, keep_idx: torch.Tensor) -> "RetainedLayer":
        """Plain eviction: the rows of ``keep_idx`` unchanged."""
        valid = keep_idx >= 0
        index = keep_idx.clamp(min=0)[..., None].expand(-1, -1, obs.keys.shape[-1])
        keys = torch.gather(obs.keys, 1, index) * valid[..., None]
        values = torch.gather(obs.values, 1, index) * valid[..., None]
        return cls(keep_idx, keys, values, valid.sum(-1))


def protected_positions(seq_len: int, window: int, sink: int, device=None) -> torch.Tensor:
    """bool [seq_len]: the first ``sink`` and the last ``window`` positions, which every head keeps."""
    pos = torch.arange(seq_len, device=device)
    return (pos < sink) | (pos >= seq_len - window)


def top_k_indices(scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per head, the protected positions plus the best-scoring others, ``budgets[h]`` in all.

    scores: [num_heads, seq_len]; budgets: int [num_heads]; protected: bool [seq_len]
    returns int64 [num_heads, max(budgets)], increasing positions, -1 padded. Ties go to the
    earlier position (stable sort), so the result is deterministic.
    """
    num_heads, seq_len = scores.shape
    s = scores.float().masked_fill(protected[None, :], float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    width = int(budgets.max()) if num_heads else 0
    chosen = order[:, :width]
    in_budget = torch.arange(width, device=scores.device)[None, :] < budgets[:, None].to(scores.device)
    chosen = torch.where(in_budget, chosen, torch.full_like(chosen, seq_len))  # padding sorts last
    chosen = chosen.sort(-1).values
    return torch.where(chosen < seq_len, chosen, torch.full_like(chosen, -1))


@dataclass(frozen=True)
class Reducer:
    def reduce(
        self,
        observations: list[LayerObservation],
        scores: list[torch.Tensor],
        budgets: torch.Tensor,
        protected: torch.Tensor,
    ) -> list[RetainedLayer]:
        """budgets: int [num_layers, num_kv_heads]; protected: bool [seq_len]."""
        return [self.reduce_layer(o, s, b, protected) for o, s, b in zip(observations, scores, budgets)]

    def reduce_layer(
        self, obs: LayerObservation, scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor
    ) -> RetainedLayer:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class TopKReducer(Reducer):
    """Evict all but each head's top-``budget`` tokens (protected positions always kept)."""

    def reduce_layer(self, obs, scores, budgets, protected):
        return RetainedLayer.gather(obs, top_k_indices(scores, budgets, protected))


@dataclass(frozen=True)
class EvictThenMergeReducer(Reducer):
    """EMS evict-then-merge (arXiv 2412.08521, Sec. 3.3), all heads in one batched op.

    Each head keeps its top-``budget`` tokens. Every evicted token whose key is close to a retained
    key (cosine similarity >= ``merge_threshold``, default 0.5, our choice) is merged into its most
    similar retained token; the others are dropped. A merged row is the score-weighted mean of its
    members, so ``weight_sum * merged_row`` equals the weighted sum of the originals -- the
    attention-weighted mass of the group is preserved. The behaviour adapts per head: a redundant
    head (evicted keys resemble kept ones) merges much, a sparse head (evicted tokens carry
    almost no score) effectively just evicts.

    Zero-class trick: every token gets a class, ``c in 1..max_budget`` = retained slot ``c-1``,
    0 = dropped; one ``scatter_add`` over ``[heads, max_budget + 1]`` then serves heads of any
    budget at once (a head with a smaller budget leaves its extra classes empty).
    """

    merge_threshold: float = 0.5

    def classes(self, obs: LayerObservation, keep_idx: torch.Tensor) -> torch.Tensor:
        """int64 [num_kv_heads, seq_len]: each token's class (see class docstring)."""
        num_heads, seq_len, _ = obs.keys.shape
        valid = keep_idx >= 0
        keys = torch.nn.functional.normalize(obs.keys.float(), dim=-1)
        kept = torch.gather(keys, 1, keep_idx.clamp(min=0)[..., None].expand(-1, -1, keys.shape[-1]))
        similarity = torch.einsum("hld,hbd->hlb", keys, kept).masked_fill(~valid[:, None, :], float("-inf"))
        best_sim, best = similarity.max(-1)
        merge = best_sim >= self.merge_threshold
        classes = torch.where(merge, best + 1, torch.zeros_like(best))
        # retained tokens are their own class, whatever their similarity to others. Only valid slots
        # are written: padding slots would alias position 0 and overwrite its class.
        heads, slots = valid.nonzero(as_tuple=True)
        classes[heads, keep_idx[heads, slots]] = slots + 1
        return classes

    def reduce_layer(self, obs, scores, budgets, protected):
        from .paged.reference import merge_by_class

        keep_idx = top_k_indices(scores, budgets, protected)
        classes = self.classes(obs, keep_idx)
        width = keep_idx.shape[1]
        valid = (keep_idx >= 0)[..., None]
        weight = scores.float().clamp(min=0)
        keys = merge_by_class(obs.keys, weight, classes, width) * valid
        values = merge_by_class(obs.values, weight, classes, width) * valid
        return RetainedLayer(keep_idx, keys.to(obs.keys.dtype), values.to(obs.values.dtype), valid[..., 0].sum(-1))


def window_priority(scores: torch.Tensor, window_size: int, start: int) -> torch.Tensor:
    """A ranking key that orders tokens window by window (best window first), and inside a window by
    token score. scores [num_heads, seq_len] -> float [num_heads, seq_len], higher = keep first.

    Windows are ``window_size`` consecutive tokens counted from ``start`` (tokens before it form
    one window of their own); a window's score is the sum of its tokens' scores.
    """
    num_heads, seq_len = scores.shape
    pos = torch.arange(seq_len, device=scores.device)
    window_id = torch.where(pos < start, torch.zeros_like(pos), (pos - start) // window_size + 1)
    num_windows = int(window_id.max()) + 1
    totals = torch.zeros(num_heads, num_windows, device=scores.device).index_add_(1, window_id, scores.float())
    window_rank = torch.empty_like(totals, dtype=torch.long)
    order = torch.sort(totals, dim=-1, descending=True, stable=True).indices
    window_rank.scatter_(1, order, torch.arange(num_windows, device=scores.device).expand(num_heads, -1))
    token_rank = torch.empty(num_heads, seq_len, dtype=torch.long, device=scores.device)
    token_order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    token_rank.scatter_(1, token_order, pos.expand(num_heads, -1))
    # primary key: window rank; secondary: token rank (both ascending = better), as one number
    return -(window_rank.gather(1, window_id.expand(num_heads, -1)) * seq_len + token_rank).double()


@dataclass(frozen=True)
class WindowReducer(Reducer):
    """WindowKV (arXiv 2503.17922): keep whole windows of consecutive tokens.

    Windows are ranked by their summed scores and taken best-first until the budget is reached
    (the last one partially, by token score). The window size depends on the task type:
    ``retrieval_window`` (default 8) for localisation-like prompts that need a few precise spans,
    ``aggregation_window`` (default 32) for summary-like prompts that need broad coherent context.
    ``task="auto"`` decides per request from the observation window's attention: if the top 5%
    of tokens hold at least half of the attention mass (averaged over layers and heads) the prompt
    is retrieval-like -- our stand-in for the paper's task classifier, which needs a trained model.
    Layers are grouped ``group_size`` at a time (default 4); the first layer of a group ranks the
    windows and the others reuse its selection (each taking its own budget from that ranking).
    """

    task: str = "auto"
    retrieval_window: int = 8
    aggregation_window: int = 32
    group_size: int = 4
    sink: int = 0

    def task_type(self, scores: list[torch.Tensor]) -> str:
        if self.task != "auto":
            return self.task
        top = max(1, round(0.05 * scores[0].shape[1]))
        shares = []
        for s in scores:
            s = s.float().clamp(min=0)
            shares.append((s.topk(top, dim=-1).values.sum(-1) / s.sum(-1).clamp(min=1e-30)).mean())
        return "retrieval" if float(torch.stack(shares).mean()) >= 0.5 else "aggregation"

    def window_size(self, scores: list[torch.Tensor]) -> int:
        return self.retrieval_window if self.task_type(scores) == "retrieval" else self.aggregation_window

    def reduce(self, observations, scores, budgets, protected):
        size = self.window_size(scores)
        retained = []
        for layer, (obs, layer_budgets) in enumerate(zip(observations, budgets)):
            if layer % self.group_size == 0:
                priority = window_priority(scores[layer], size, self.sink)
            retained.append(RetainedLayer.gather(obs, top_k_indices(priority, layer_budgets, protected)))
        return retained
