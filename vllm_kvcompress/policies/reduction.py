"""Reducers: turn scores and per-head budgets into the retained cache of each layer.

The result keeps a variable length per KV head -- the structure the paged cache holds later.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.policies.scoring import WindowKVScorer
from vllm_kvcompress.policies.registry import REDUCERS, check_bool, check_choice, check_int, check_number
from vllm_kvcompress.policies.tensor_parallel import SINGLE, HeadShards
from vllm_kvcompress.triton_kernels import runs_on


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


def on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (e.g. budgets the allocator made on the host) on ``device``, without waiting for it:
    a CUDA copy from pageable host memory synchronizes the stream -- the host would wait for the
    step's queued work -- so such a copy goes through pinned memory (PyTorch's pinned allocator
    keeps the buffer until the copy is done)."""
    if host.device == device or host.device.type != "cpu" or device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)


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
    in_budget = torch.arange(width, device=scores.device)[None, :] < on_device(budgets, scores.device)[:, None]
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

    @property
    def block_bytes(self) -> int:
        """Temporary bytes a call holds besides what scales with its heads' rows (the engine sizes
        its calls with it): 0 unless the reducer works in blocks of its own."""
        return 0

    def select_heads(self, obs, scores: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """For reducers that ``selects_rows``: the rows :meth:`reduce_heads` keeps, int64
        [num_heads, max(budgets)], increasing positions, -1 padded. obs needs no keys."""
        raise NotImplementedError(f"{type(self).__name__} does not only select rows")
    # Whether reduce() ranks by the scorer's per-query-head rows where it has them
    # (Scorer.query_head_scores) instead of the per-KV-head scores.
    ranks_query_heads = False

    @property
    def fills_budgets(self) -> bool:
        """Whether every head keeps exactly its budget at prefill (else at most: whole windows)."""
        return True

    def for_request(self, observations: list[LayerObservation], window: int, shards: HeadShards = SINGLE
                    ) -> tuple[int, "Reducer"]:
        """(the observation window one request's compression uses, the reducer that compresses it).
        Most reducers: the policy's window and themselves. WindowKV's task type picks both, from
        every tensor-parallel rank's heads (``shards``: the observations hold one rank's)."""
        return window, self

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


@REDUCERS.register("topk")
@dataclass(frozen=True)
class TopKReducer(Reducer):
    """Evict all but each head's top-``budget`` tokens (protected positions always kept)."""

    selects_rows = True

    def select_heads(self, obs, scores, budgets, protected):
        return top_k_indices(scores, budgets, protected)

    def reduce_layer(self, obs, scores, budgets, protected):
        return RetainedLayer.gather(obs, top_k_indices(scores, budgets, protected))


def rank_of(values: torch.Tensor) -> torch.Tensor:
    """int64 [..., n]: the position of each value in a descending stable sort of its row (0 = best)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(values.shape[-1], device=values.device).expand_as(order))
    return rank


def top_mass(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """bool [num_heads, seq_len]: per head the best-scored tokens that together hold ``mass`` of
    its score (the fewest such, ties by position; 1.0 = every token with a positive score)."""
    weight = scores.float().clamp(min=0)
    ordered, order = weight.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered  # mass of the better tokens
    needed = (before < mass * ordered.sum(-1, keepdim=True)) & (ordered > 0)
    return torch.empty_like(needed).scatter_(1, order, needed)  # back to the tokens' order


def redundancy(keys: torch.Tensor, values: torch.Tensor, kept_keys: torch.Tensor, kept_values: torch.Tensor
               ) -> torch.Tensor:
    """EMS's redundancy of tokens with retained ones: cos(K_x, K_c) * cos(V_x, V_c), each cosine
    clamped at 0 (ours: two anti-aligned pairs are not redundant). keys/values [heads, n, D],
    kept_* [heads, b, D] -> float32 [heads, n, b]."""
    return unit_redundancy(unit_rows(keys), unit_rows(values), unit_rows(kept_keys), unit_rows(kept_values))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` with each row scaled to unit length (a zero row stays zero)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def unit_redundancy(keys: torch.Tensor, values: torch.Tensor, kept_keys: torch.Tensor, kept_values: torch.Tensor
                    ) -> torch.Tensor:
    """:func:`redundancy` of rows already through :func:`unit_rows` (the centres normalised once
    for all the blocks compared with them)."""
    key_cos = torch.bmm(keys, kept_keys.mT).clamp_(min=0)
    return key_cos.mul_(torch.bmm(values, kept_values.mT).clamp_(min=0))


def nearest_centres(keys: torch.Tensor, values: torch.Tensor, keep_idx: torch.Tensor, target: torch.Tensor,
                    order: torch.Tensor, candidate: torch.Tensor, block_rows: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each compared row's most :func:`redundancy`-similar merge target (EMS's class centres).

    keys, values: [num_heads, seq_len, head_dim]; keep_idx: int64 [num_heads, num_kept], the
    retained rows (-1 padded); target: bool [num_heads, num_kept], the slots a row may merge into;
    order: int64 [num_heads, num_compared], the rows compared (distinct per head, candidates first);
    candidate: bool [num_heads, seq_len], the rows that may merge; block_rows: compared rows a head
    per pass (bounds the [heads, rows, num_kept] similarities; None: all at once).
    Returns float32 [num_heads, seq_len] the best redundancy of each candidate compared (-inf for
    every other row, and where no slot is a target) and int64 [num_heads, seq_len] its slot (of
    equal maxima any). Triton kernel: :mod:`vllm_kvcompress.triton_kernels.redundancy`."""
    num_heads, seq_len, head_dim = keys.shape
    index = keep_idx.clamp(min=0)[..., None].expand(-1, -1, head_dim)
    kept_keys, kept_values = (unit_rows(torch.gather(cached, 1, index)) for cached in (keys, values))
    rows = order[..., None].expand(-1, -1, head_dim)
    best_sim = torch.full((num_heads, seq_len), float("-inf"), device=keys.device)
    best = torch.zeros(num_heads, seq_len, dtype=torch.long, device=keys.device)
    block = block_rows or max(1, order.shape[1])
    for start in range(0, order.shape[1], block):
        part = order[:, start:start + block]
        compared = (unit_rows(torch.gather(cached, 1, rows[:, start:start + block])) for cached in (keys, values))
        similar = unit_redundancy(*compared, kept_keys, kept_values)
        sim, arg = similar.masked_fill(~target[:, None, :], float("-inf")).max(-1)
        sim = sim.masked_fill(~candidate.gather(1, part), float("-inf"))
        best_sim.scatter_(1, part, sim)
        best.scatter_(1, part, arg)
    return best_sim, best


@REDUCERS.register("ems-merge")
@dataclass(frozen=True)
class EvictThenMergeReducer(Reducer):
    """EMS evict-then-merge (arXiv 2412.08521, Sec. 3.3), all heads in one batched op.

    Three tiers per head. The head's top-``budget`` tokens are kept and are the class centres.
    First evict: tokens outside the head's best-scored ones holding ``relevant_mass`` of its score
    (0.9, ours) are irrelevant and dropped -- a sparse head (scores concentrated on few tokens)
    drops most of its tail, a dispersed one little. Then merge: a remaining token joins the centre
    it is most redundant with, if that redundancy cos(K) * cos(V) (:func:`redundancy`) reaches
    ``merge_threshold`` (0.5, ours); a token redundant with no centre is dropped too. So each head's
    merged and evicted tiers follow its own sparsity and redundancy. Protected tokens (observation
    window, sinks) are never merge targets, so the most recent keys stay exact. A merged row is
    the score-weighted mean of its members (ours: the sources give no merge weights):
    ``weight_sum * merged_row`` equals the weighted sum of the originals; attention logits get no
    extra bias for it.

    Zero-class: every token gets a class, ``c in 1..max_budget`` = retained slot ``c-1``,
    0 = dropped; one ``scatter_add`` over ``[heads, max_budget + 1]`` then serves heads of any
    budget and any tier sizes at once (a head with a smaller budget leaves its extra classes empty).
    """

    merges_rows = True

    merge_threshold: float = 0.5
    relevant_mass: float = 0.9
    # similarities per block of compared rows, across the call's heads: a block holds
    # ~3 x 4 bytes x this, whether the call reduces one layer's heads or many layers'
    block_values: int = 1 << 24
    # compared rows per head above which the candidates are counted first (one device sync) rather
    # than bounded from the budgets; a decode-time recompression (~slack rows) stays below it
    count_above: int = 256

    @property
    def block_bytes(self) -> int:
        # a block's similarities, the two cosines and float32 unit rows: about four float32 copies
        return 4 * 4 * self.block_values

    def __post_init__(self) -> None:
        check_number("merge_threshold", self.merge_threshold, -1.0, 1.0)
        check_number("relevant_mass", self.relevant_mass, 0.0, 1.0, open_low=True)
        check_int("block_values", self.block_values)
        check_int("count_above", self.count_above, minimum=0)

    def classes(self, obs: LayerObservation, keep_idx: torch.Tensor, protected: torch.Tensor,
                scores: torch.Tensor | None = None, fewest_kept: int | None = None) -> torch.Tensor:
        """int64 [num_kv_heads, seq_len]: each token's class (see class docstring).
        keep_idx: [num_kv_heads, max_budget] (-1 padded); protected: bool [seq_len] (or per head);
        scores: [num_kv_heads, seq_len], for the eviction of irrelevant tokens (None: none is);
        fewest_kept: the fewest valid slots of a head's ``keep_idx`` when the caller knows it on the
        host (else it is counted, a wait for the device).

        Only the tokens that are neither kept nor padding (nor, with scores, irrelevant) can merge,
        so only they are compared with the centres: at most ``seq_len - min(budget)`` a head, a
        small share of the rows when a decode-time recompression brings heads from budget + slack
        back to their budgets."""
        from vllm_kvcompress.paged.merge import nearest_centres

        num_heads, seq_len, _ = obs.keys.shape
        valid = keep_idx >= 0
        guarded = protected if protected.dim() == 2 else protected[None, :].expand(num_heads, -1)
        target = valid & ~torch.gather(guarded, 1, keep_idx.clamp(min=0))
        # not kept: the padding slots of keep_idx mark a spare last column, dropped after
        candidate = torch.ones(num_heads, seq_len + 1, dtype=torch.bool, device=obs.keys.device)
        candidate.scatter_(1, torch.where(valid, keep_idx, seq_len), False)
        candidate = candidate[:, :seq_len]
        if obs.padding is not None:  # padding rows merge into nothing
            candidate &= ~obs.padding
        if scores is not None:  # evict first: irrelevant tokens merge into nothing
            candidate &= top_mass(scores, self.relevant_mass)
        # every head keeps at least its smallest budget, so this many columns hold every candidate;
        # when that is many (a prefill: most rows are evicted, few of them relevant), the reference
        # counts them. The kernel needs neither count (each a wait for the device): it skips the
        # blocks of compared rows that hold no candidate
        kernel = runs_on(obs.keys)
        if fewest_kept is None and not kernel:
            fewest_kept = int(valid.sum(-1).min()) if num_heads else seq_len
        most = seq_len - (fewest_kept or 0) if num_heads else 0
        if most > self.count_above and not kernel:
            most = int(candidate.sum(-1).max())
        order = torch.sort(candidate.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :most]
        block = max(1, self.block_values // max(1, num_heads * keep_idx.shape[1]))  # compared rows a head
        best_sim, best = nearest_centres(obs.keys, obs.values, keep_idx, target, order, candidate, block)
        merge = best_sim >= self.merge_threshold
        classes = torch.where(merge, best + 1, torch.zeros_like(best))
        # retained tokens are their own class, whatever their similarity to others. Padding slots
        # write into a spare last column (at position 0 they would overwrite its class); a scatter,
        # not a nonzero(), so nothing waits for the device
        slot_classes = torch.arange(1, keep_idx.shape[1] + 1, device=keep_idx.device).expand_as(keep_idx)
        classes = torch.cat([classes, torch.zeros_like(classes[:, :1])], 1)
        classes.scatter_(1, torch.where(valid, keep_idx, seq_len), slot_classes)
        return classes[:, :seq_len]

    def reduce_layer(self, obs, scores, budgets, protected):
        from vllm_kvcompress.paged.merge import merge_kv_by_class

        keep_idx = top_k_indices(scores, budgets, protected)
        # top_k_indices keeps min(budget, seq_len) rows a head: known here when the budgets are
        fewest = min(int(budgets.min()), obs.seq_len) if budgets.device.type == "cpu" and len(budgets) else None
        classes = self.classes(obs, keep_idx, protected, scores, fewest)
        weight = scores.float().clamp(min=0)
        # a padding slot of keep_idx is an empty class: its merged rows are zeros
        keys, values = merge_kv_by_class(obs.keys, obs.values, weight, classes, keep_idx.shape[1], obs.keys.dtype)
        return RetainedLayer(keep_idx, keys, values, (keep_idx >= 0).sum(-1))


def top_share(scores: torch.Tensor, share: float = 0.05) -> torch.Tensor:
    """[rows, seq_len] -> float32 [rows]: the part of each row's mass its top ``share`` of tokens hold."""
    top = max(1, round(share * scores.shape[1]))
    s = scores.float().clamp(min=0)
    return s.topk(top, dim=-1).values.sum(-1) / s.sum(-1).clamp(min=1e-30)


def unprotected_windows(protected: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """Windows of ``size`` consecutive unprotected positions, counted from the first (the last one
    may be shorter). protected: bool [seq_len] -> (int64 [seq_len] each position's window, -1 at
    protected positions; the number of windows). With protected = sinks + suffix the windows
    tile the prefix between them: from position 0 when there are no sinks."""
    free = ~protected
    window = torch.where(free, (free.long().cumsum(0) - 1) // size, torch.full_like(free, -1, dtype=torch.long))
    return window, int(window.max()) + 1 if bool(free.any()) else 0


def window_statistic(rows: torch.Tensor, window: torch.Tensor, num_windows: int, top: int | None) -> torch.Tensor:
    """Each row's score of each window: the mean of the window's ``top`` best values in that row
    (``min(top, window size)`` of them), or of all its values (``top`` None).
    rows: [num_rows, seq_len]; window: int64 [seq_len] from :func:`unprotected_windows`.
    Returns float64 [num_rows, num_windows]."""
    num_rows = rows.shape[0]
    device = rows.device
    inside = window >= 0
    pos = torch.arange(window.shape[0], device=device)[inside]
    ids = window[inside]
    size = torch.bincount(ids, minlength=num_windows)
    first = torch.full((num_windows,), window.shape[0], device=device).scatter_reduce(0, ids, pos, "amin")
    grid = torch.full((num_rows, num_windows, int(size.max())), float("-inf"), dtype=torch.float64, device=device)
    grid[:, ids, pos - first[ids]] = rows[:, inside].double()
    counted = size if top is None else size.clamp(max=top)
    best = grid.sort(-1, descending=True).values
    in_count = torch.arange(grid.shape[-1], device=device)[None, :] < counted[:, None]
    return torch.where(in_count, best, torch.zeros_like(best)).sum(-1) / counted


def fit_whole_windows(sizes: torch.Tensor, order: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Which windows each head keeps: the windows in ``order`` (best first), each taken whole if it
    still fits in the head's ``room`` (tokens). sizes int64 [num_windows]; room int64 [num_heads]
    -> bool [num_heads, num_windows]. Only the last window can be shorter than the others: after
    the first window that does not fit, only it may still fit."""
    ordered = sizes[order]
    taken = ordered.cumsum(0)[None, :] <= room[:, None]  # cumulative sizes grow: a prefix of the order
    left = room - (taken * ordered[None, :]).sum(-1)
    short = ordered < ordered.max()
    taken |= short[None, :] & (ordered[None, :] <= left[:, None])
    kept = torch.zeros_like(taken)
    kept[:, order] = taken
    return kept


TASK_TYPES = ("auto", "retrieval", "aggregation")


@REDUCERS.register("windows")
@dataclass(frozen=True)
class WindowReducer(Reducer):
    """WindowKV (arXiv 2503.17922, Sec. 3; official code): keep whole windows of consecutive tokens.

    The prefix (everything but the protected suffix and any sinks) is cut into windows of
    ``retrieval_window`` / ``aggregation_window`` tokens (8 and 8, as in the paper) from its first
    position -- position 0 without sinks; the last window may be shorter. A window's score over its
    [rows x window] block of raw scores (one row per query head when the scorer has them,
    :meth:`~.scoring.Scorer.query_head_scores`) depends on the task type: ``retrieval`` (the
    paper's question answering) takes per row the mean of its best ``window // 2`` values, then the
    mean over rows; ``aggregation`` (the paper's "other" tasks) the mean of the whole block. Every
    head of a layer keeps the same windows, the best first, only whole ones, as many as its budget
    minus the protected tokens holds (so a head may keep up to window - 1 tokens fewer than its
    budget); ``whole_windows=False`` (ours) fills the budget exactly with the best tokens of the
    next window. Layers are grouped ``group_size`` at a time (8, as in the paper): the group's first
    layer ranks the windows and the others reuse its ranking.

    The task type also sets the suffix: the request's observation window is the policy's for
    retrieval (32) and ``aggregation_suffix`` (16) for aggregation (:meth:`for_request`). The
    paper decides it with a BERT classifier whose weights are unpublished; ``task="auto"`` is our
    stand-in: a prompt is retrieval-like when the top 5 % of the prefix tokens hold at least
    ``retrieval_share`` (0.5) of the suffix's raw attention, averaged over layers and heads.

    Decode-time recompression (:meth:`reduce_heads`, not in the paper) ranks each head's own
    windows and fills its budget exactly, since the engine holds every head at its budget.
    """

    heads_independent = False  # the heads of a layer share one window ranking
    pads_heads = False  # windows are counted from each head's own first row: equal lengths only
    ranks_query_heads = True

    task: str = "auto"
    retrieval_window: int = 8
    aggregation_window: int = 8
    aggregation_suffix: int = 16
    group_size: int = 8
    whole_windows: bool = True
    retrieval_share: float = 0.5

    def __post_init__(self) -> None:
        check_choice("windowkv task type", self.task, TASK_TYPES)
        for name in ("retrieval_window", "aggregation_window", "aggregation_suffix", "group_size"):
            check_int(name, getattr(self, name))
        check_bool("whole_windows", self.whole_windows)
        check_number("retrieval_share", self.retrieval_share, 0.0, 1.0)

    @property
    def fills_budgets(self) -> bool:
        return not self.whole_windows

    def is_retrieval(self, rows: torch.Tensor) -> torch.Tensor:
        """The stand-in classifier on raw prefix scores [rows, seq_len] -> bool [rows]."""
        return top_share(rows) >= self.retrieval_share

    def task_type(self, scores: list[torch.Tensor], shards: HeadShards = SINGLE) -> str:
        """The request's task type: ``task`` if fixed, else the stand-in over every layer's rows
        (each rank's rows gathered under tensor parallelism)."""
        if self.task != "auto":
            return self.task
        shares = shards.gather(torch.stack([top_share(s) for s in scores]), dim=1)  # [layers, rows]
        share = torch.stack([layer.mean() for layer in shares]).mean()
        return "retrieval" if float(share) >= self.retrieval_share else "aggregation"

    def for_request(self, observations, window, shards=SINGLE):
        # the stand-in classifies on the raw suffix attention, whatever the policy's scorer
        task = self.task_type([WindowKVScorer().score(o) for o in observations], shards)
        suffix = window if task == "retrieval" else min(window, self.aggregation_suffix)
        return suffix, dataclasses.replace(self, task=task)

    def window_shape(self, task: str) -> tuple[int, int | None]:
        """(window size, how many of a row's best values a window's score averages: None = all)."""
        if task == "retrieval":
            return self.retrieval_window, max(1, self.retrieval_window // 2)
        return self.aggregation_window, None

    def keep(self, rows: torch.Tensor, budgets: torch.Tensor, protected: torch.Tensor, task: str,
             shared: bool) -> torch.Tensor:
        """keep_idx of every head: int64 [num_heads, max(budgets)], -1 padded.
        rows [num_rows, seq_len]: raw scores; shared: one ranking from all rows for every head
        (prefill), else row h ranks head h's own windows (decode-time)."""
        size, top = self.window_shape(task)
        num_heads, seq_len = budgets.shape[0], rows.shape[1]
        window, num_windows = unprotected_windows(protected, size)
        if num_windows == 0:
            return top_k_indices(torch.zeros(num_heads, seq_len, device=rows.device), budgets, protected)
        score = window_statistic(rows.float().clamp(min=0), window, num_windows, top)
        if shared:
            score = score.mean(0, keepdim=True)
        window_rank = rank_of(score)  # [1 or num_heads, num_windows]
        if self.whole_windows and shared:
            sizes = torch.bincount(window[window >= 0], minlength=num_windows)
            room = on_device(budgets, rows.device) - int(protected.sum())
            kept_windows = fit_whole_windows(sizes, window_rank[0].argsort(), room)
            mask = protected[None, :] | (kept_windows[:, window.clamp(min=0)] & (window >= 0)[None, :])
            pos = torch.arange(seq_len, device=rows.device)
            chosen = torch.where(mask, pos, seq_len).sort(-1).values[:, : int(mask.sum(-1).max())]
            return torch.where(chosen < seq_len, chosen, -1)
        # window rank first, then the token's own score: one strict order, best first
        token_score = rows.float().sum(0, keepdim=True) if shared else rows.float()
        token_rank = rank_of(token_score)
        priority = -(window_rank.gather(1, window.clamp(min=0).expand(window_rank.shape[0], -1)) * seq_len
                     + token_rank).double()
        return top_k_indices(priority.expand(num_heads, -1), budgets, protected)

    def reduce_heads(self, obs, scores, budgets, protected):
        # what reduce() does to one head alone (its own task type and window ranking), for all at once
        budgets = torch.as_tensor(budgets)
        if self.task == "auto":
            retrieval = self.is_retrieval(scores)
        else:
            retrieval = torch.full((scores.shape[0],), self.task == "retrieval", device=scores.device)
        keep_idx = torch.full((scores.shape[0], int(budgets.max())), -1, dtype=torch.long, device=scores.device)
        fill = dataclasses.replace(self, whole_windows=False)
        for task, rows in (("retrieval", retrieval), ("aggregation", ~retrieval)):
            if bool(rows.any()):
                kept = fill.keep(scores[rows], budgets[rows.cpu()], protected, task, shared=False)
                keep_idx[rows, : kept.shape[1]] = kept
        return RetainedLayer.gather(obs, keep_idx)

    def reduce(self, observations, scores, budgets, protected):
        task = self.task_type(scores)
        retained = []
        for layer, (obs, rows, layer_budgets) in enumerate(zip(observations, scores, budgets)):
            if layer % self.group_size == 0:
                leader = rows  # the group's first layer ranks the windows for the whole group
            keep_idx = self.keep(leader, layer_budgets, protected, task, shared=True)
            retained.append(RetainedLayer.gather(obs, keep_idx))
        return retained
