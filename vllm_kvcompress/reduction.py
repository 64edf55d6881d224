"""Reducers: turn scores and per-head budgets into the retained cache of each layer.

The result keeps a variable length per KV head -- the structure the paged cache holds later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .observation import LayerObservation
from .scoring import normalize_rows


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


def protected_positions(seq_len: int, window: int, sink: int, device=None, lengths: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """bool [seq_len]: the first ``sink`` and the last ``window`` positions, which every head keeps.
    With ``lengths`` (heads padded at the front, :attr:`LayerObservation.lengths`): bool
    [num_heads, seq_len], each head's sinks counted from its own first row."""
    pos = torch.arange(seq_len, device=device)
    if lengths is None:
        return (pos < sink) | (pos >= seq_len - window)
    start = seq_len - lengths.to(pos.device)[:, None]
    return ((pos[None, :] >= start) & (pos[None, :] < start + sink)) | (pos[None, :] >= seq_len - window)


def top_k_indices(scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per head, the protected positions plus the best-scoring others, ``budgets[h]`` in all.

    scores: [num_heads, seq_len]; budgets: int [num_heads]; protected: bool [seq_len] (or
    [num_heads, seq_len]) returns int64 [num_heads, max(budgets)], increasing positions, -1 padded.
    Ties go to the earlier position (stable sort), so the result is deterministic.
    """
    num_heads, seq_len = scores.shape
    s = scores.float().masked_fill(protected if protected.dim() == 2 else protected[None, :], float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    width = int(budgets.max()) if num_heads else 0
    chosen = order[:, :width]
    # budgets may be a pinned host tensor (decode-time recompression): its copy must not wait
    in_budget = torch.arange(width, device=scores.device)[None, :] < budgets[:, None].to(scores.device, non_blocking=True)
    chosen = torch.where(in_budget, chosen, torch.full_like(chosen, seq_len))  # padding sorts last
    chosen = chosen.sort(-1).values
    return torch.where(chosen < seq_len, chosen, torch.full_like(chosen, -1))


@dataclass(frozen=True)
class Reducer:
    # Whether each head's result depends on its own scores and rows only (then any subset of a
    # layer's heads can be reduced in one call, e.g. by decode-time recompression).
    heads_independent = True
    # Whether reduce_heads takes heads of different lengths in one call (padded at the front,
    # LayerObservation.lengths; padding scored -inf). Decode-time recompression then needs one
    # call for all heads due, whatever their lengths, instead of one per distinct length.
    pads_heads = True
    # Whether the retained rows are rows of the cache, unchanged (no merging): then
    # select_heads says which, and the engine moves them in place (paged.heads.PagedHeads).
    selects_rows = False
    # Whether evicted rows are merged into kept ones (each row compared with every kept row).
    merges_rows = False

    def select_heads(self, obs, scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """For reducers that ``selects_rows``: the rows :meth:`reduce_heads` keeps, int64
        [num_heads, max(budgets)], increasing positions, -1 padded. obs needs no keys."""
        raise NotImplementedError(f"{type(self).__name__} does not only select rows")

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

    def reduce_heads(
        self, obs: LayerObservation, scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor
    ) -> RetainedLayer:
        """Some KV heads of a request (from any layers), each reduced as if it were alone: decode-time
        recompression. obs: keys/values [num_heads, n, D]; scores [num_heads, n]; budgets int [num_heads]."""
        if not self.heads_independent:  # pragma: no cover - interface
            raise NotImplementedError(f"{type(self).__name__} shares work across heads: it must reduce heads alone itself")
        return self.reduce([obs], [scores], torch.as_tensor(budgets).reshape(1, -1), protected)[0]


@dataclass(frozen=True)
class TopKReducer(Reducer):
    """Evict all but each head's top-``budget`` tokens (protected positions always kept)."""

    selects_rows = True

    def select_heads(self, obs, scores, budgets, protected):
        return top_k_indices(scores, budgets, protected)

    def reduce_layer(self, obs, scores, budgets, protected):
        return RetainedLayer.gather(obs, top_k_indices(scores, budgets, protected))


@dataclass(frozen=True)
class EvictThenMergeReducer(Reducer):
    """EMS evict-then-merge (arXiv 2412.08521, Sec. 3.3), all heads in one batched op.

    Each head keeps its top-``budget`` tokens. Every evicted token whose key is close to a retained
    key (cosine similarity >= ``merge_threshold``, default 0.5, our choice) is merged into its most
    similar retained token; the others are dropped. Protected tokens (observation window, sinks)
    are never merge targets, so the most recent keys stay exact. A merged row is the score-weighted
    mean of its members: ``weight_sum * merged_row`` equals the weighted sum of the originals (the
    score mass of the group is carried by one row; attention logits get no extra bias for it, since
    the paper's text available to us does not specify one). The behaviour adapts per head: a
    redundant head (evicted keys resemble kept ones) merges much, a sparse head (evicted tokens
    carry almost no score) effectively just evicts.

    Zero-class trick: every token gets a class, ``c in 1..max_budget`` = retained slot ``c-1``,
    0 = dropped; one ``scatter_add`` over ``[heads, max_budget + 1]`` then serves heads of any
    budget at once (a head with a smaller budget leaves its extra classes empty).
    """

    merges_rows = True

    merge_threshold: float = 0.5
    chunk: int = 4096  # tokens per similarity block: memory O(heads * chunk * max_budget)

    def classes(self, obs: LayerObservation, keep_idx: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """int64 [num_kv_heads, seq_len]: each token's class (see class docstring).
        keep_idx: [num_kv_heads, max_budget] (-1 padded); protected: bool [seq_len]."""
        num_heads, seq_len, _ = obs.keys.shape
        valid = keep_idx >= 0
        guarded = protected if protected.dim() == 2 else protected[None, :].expand(num_heads, -1)
        target = valid & ~torch.gather(guarded, 1, keep_idx.clamp(min=0))
        keys = torch.nn.functional.normalize(obs.keys.float(), dim=-1)
        kept = torch.gather(keys, 1, keep_idx.clamp(min=0)[..., None].expand(-1, -1, keys.shape[-1]))
        best_sim = torch.empty(num_heads, seq_len, device=keys.device)
        best = torch.empty(num_heads, seq_len, dtype=torch.long, device=keys.device)
        for start in range(0, seq_len, self.chunk):
            block = torch.einsum("hld,hbd->hlb", keys[:, start : start + self.chunk], kept)
            best_sim[:, start : start + self.chunk], best[:, start : start + self.chunk] = block.masked_fill(
                ~target[:, None, :], float("-inf")
            ).max(-1)
        merge = best_sim >= self.merge_threshold
        classes = torch.where(merge, best + 1, torch.zeros_like(best))
        # retained tokens are their own class, whatever their similarity to others. Only valid slots
        # are written: padding slots would alias position 0 and overwrite its class.
        if obs.padding is not None:  # padding rows merge into nothing
            classes.masked_fill_(obs.padding, 0)
        heads, slots = valid.nonzero(as_tuple=True)
        classes[heads, keep_idx[heads, slots]] = slots + 1
        return classes

    def reduce_layer(self, obs, scores, budgets, protected):
        from .paged.reference import merge_by_class

        keep_idx = top_k_indices(scores, budgets, protected)
        classes = self.classes(obs, keep_idx, protected)
        width = keep_idx.shape[1]
        valid = (keep_idx >= 0)[..., None]
        weight = scores.float().clamp(min=0)
        keys = merge_by_class(obs.keys, weight, classes, width) * valid
        values = merge_by_class(obs.values, weight, classes, width) * valid
        return RetainedLayer(keep_idx, keys.to(obs.keys.dtype), values.to(obs.values.dtype), valid[..., 0].sum(-1))


def window_priority(scores: torch.Tensor, window_size: int, start: int, top_fraction: float = 1.0) -> torch.Tensor:
    """A ranking key that orders tokens window by window (best window first), and inside a window by
    token score. scores [rows, seq_len] -> float64 [rows, seq_len], higher = keep first.

    Windows are ``window_size`` consecutive tokens counted from ``start`` (tokens before it form
    one window of their own). A window's score is the mean of its best ``ceil(top_fraction * n)``
    token scores (n = its size): 1.0 = the plain mean, 0.5 = the mean of its better half.
    """
    rows, seq_len = scores.shape
    device = scores.device
    pos = torch.arange(seq_len, device=device)
    window_id = torch.where(pos < start, torch.zeros_like(pos), (pos - start) // window_size + (1 if start > 0 else 0))
    num_windows = int(window_id.max()) + 1
    first = torch.full((num_windows,), seq_len, device=device).scatter_reduce(0, window_id, pos, "amin")
    size = torch.bincount(window_id, minlength=num_windows)
    # tokens laid out as [rows, num_windows, widest window], padded with -inf, best first
    grid = torch.full((rows, num_windows, int(size.max())), float("-inf"), dtype=torch.float64, device=device)
    grid[:, window_id, pos - first[window_id]] = scores.double()
    grid = grid.sort(-1, descending=True).values
    counted = torch.ceil(top_fraction * size).clamp(min=1)
    in_top = torch.arange(grid.shape[-1], device=device)[None, :] < counted[:, None]
    window_score = torch.where(in_top, grid, torch.zeros_like(grid)).sum(-1) / counted
    window_rank = torch.empty(rows, num_windows, dtype=torch.long, device=device)
    order = torch.sort(window_score, dim=-1, descending=True, stable=True).indices
    window_rank.scatter_(1, order, torch.arange(num_windows, device=device).expand(rows, -1))
    token_rank = torch.empty(rows, seq_len, dtype=torch.long, device=device)
    token_order = torch.sort(scores.double(), dim=-1, descending=True, stable=True).indices
    token_rank.scatter_(1, token_order, pos.expand(rows, -1))
    # primary key: window rank; secondary: token rank (both ascending = better), as one number
    return -(window_rank.gather(1, window_id.expand(rows, -1)) * seq_len + token_rank).double()


@dataclass(frozen=True)
class WindowReducer(Reducer):
    """WindowKV (arXiv 2503.17922, Sec. 3): keep whole windows of consecutive tokens.

    Per layer, the heads' scores are normalised per head and averaged, and windows of
    ``window_size`` consecutive tokens are ranked once from that: every head of the layer keeps the
    same windows (semantic coherence across heads), best first, until its budget is reached; we fill
    the budget exactly, so the last window may be partial (by token score). How a window is scored
    depends on the task type, as in the paper: a retrieval-like (question-answering) prompt needs a
    few precise spans, so a window counts by the mean of its better half; an aggregation-like
    (summary) prompt needs broad coverage, so by its plain mean. Window sizes per task type are
    ``retrieval_window`` / ``aggregation_window`` (8 and 8: the paper keeps 8 for both).
    ``task="auto"`` decides per request from the observation window's attention: if the top 5% of
    tokens hold at least half of the attention mass (averaged over layers and heads) the prompt is
    retrieval-like -- our stand-in for the paper's task classifier, a fine-tuned BERT we cannot ship.
    Layers are grouped ``group_size`` at a time (default 8, as in the paper); the first layer of a
    group ranks the windows and the others reuse its ranking (each taking its own budget from it).
    """

    heads_independent = False  # the heads of a layer share one window ranking
    pads_heads = False  # windows are counted from each head's own first row: equal lengths only

    task: str = "auto"
    retrieval_window: int = 8
    aggregation_window: int = 8
    group_size: int = 8
    sink: int = 0

    @staticmethod
    def top_share(scores: torch.Tensor) -> torch.Tensor:
        """[rows, seq_len] -> float32 [rows]: the share of each row's mass its top 5% of tokens hold."""
        top = max(1, round(0.05 * scores.shape[1]))
        s = scores.float().clamp(min=0)
        return s.topk(top, dim=-1).values.sum(-1) / s.sum(-1).clamp(min=1e-30)

    def task_type(self, scores: list[torch.Tensor]) -> str:
        if self.task != "auto":
            return self.task
        share = torch.stack([self.top_share(s).mean() for s in scores]).mean()
        return "retrieval" if float(share) >= 0.5 else "aggregation"

    def window_shape(self, task: str) -> tuple[int, float]:
        """(window size, share of a window's tokens its score counts) for a task type."""
        if task == "retrieval":
            return self.retrieval_window, 0.5
        return self.aggregation_window, 1.0

    def reduce_heads(self, obs, scores, budgets, protected):
        # what reduce() does to one head alone (its own task type and window ranking), for all at once
        if self.task == "auto":
            retrieval = self.top_share(scores) >= 0.5
        else:
            retrieval = torch.full((scores.shape[0],), self.task == "retrieval", device=scores.device)
        normalized = normalize_rows(scores.float().clamp(min=0))
        priority = torch.empty(normalized.shape, dtype=torch.float64, device=scores.device)
        for task, rows in (("retrieval", retrieval), ("aggregation", ~retrieval)):
            if bool(rows.any()):
                size, top_fraction = self.window_shape(task)
                priority[rows] = window_priority(normalized[rows], size, self.sink, top_fraction)
        return RetainedLayer.gather(obs, top_k_indices(priority, torch.as_tensor(budgets), protected))

    def reduce(self, observations, scores, budgets, protected):
        size, top_fraction = self.window_shape(self.task_type(scores))
        retained = []
        for layer, (obs, layer_scores, layer_budgets) in enumerate(zip(observations, scores, budgets)):
            if layer % self.group_size == 0:
                shared = normalize_rows(layer_scores.float().clamp(min=0)).mean(0)
                priority = window_priority(shared[None], size, self.sink, top_fraction)
            heads_priority = priority.expand(layer_scores.shape[0], -1)
            retained.append(RetainedLayer.gather(obs, top_k_indices(heads_priority, layer_budgets, protected)))
        return retained
