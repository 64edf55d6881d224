"""Allocators: how a total budget is split across layers and KV heads.

Every allocator returns int64 ``[num_layers, num_kv_heads]`` budgets that sum to exactly
``per_head * num_layers * num_kv_heads``, each within ``[floor, seq_len]`` (``floor`` = the tokens
every head keeps anyway: observation window + sinks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vllm_kvcompress.policies.budget import distribute, distribute_rows
from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.paged.reference import window_scores
from vllm_kvcompress.policies.registry import ALLOCATORS, check_choice, check_int, check_number
from vllm_kvcompress.policies.scoring import window_probabilities
from vllm_kvcompress.policies.tensor_parallel import SINGLE, HeadShards


@dataclass(frozen=True)
class AllocationInput:
    """scores: per layer float32 [num_kv_heads, seq_len]; per_head: average budget; floor: minimum;
    protected: bool [seq_len], the positions every head keeps (window + sinks); observations: the
    layers themselves (None where a caller has only scores), for allocators that measure them.
    shards: under tensor parallelism the observations hold one rank's heads
    (:class:`~vllm_kvcompress.policies.tensor_parallel.HeadShards`), while the scores are every rank's."""

    scores: list[torch.Tensor]
    per_head: int
    floor: int
    protected: torch.Tensor
    observations: list[LayerObservation] | None = None
    shards: HeadShards = SINGLE

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.scores), self.scores[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.scores[0].shape[1]

    @property
    def total(self) -> int:
        num_layers, num_heads = self.shape
        return self.per_head * num_layers * num_heads


@dataclass(frozen=True)
class Allocator:
    # Whether allocate() reads AllocationInput.observations (the layers' keys and values), not
    # only their scores: the engine then hands it dense layers.
    reads_layers = False

    def allocate(self, inp: AllocationInput) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def allocate_requests(self, inputs: list[AllocationInput]) -> list[torch.Tensor]:
        """:meth:`allocate` of several requests (a step's prefills), each as if alone. Allocators
        whose host work batches over requests override it."""
        return [self.allocate(inp) for inp in inputs]

    @staticmethod
    def spread(inp: AllocationInput, weights: torch.Tensor) -> torch.Tensor:
        """Budgets proportional to ``weights`` [num_layers, num_kv_heads] above the floor."""
        return distribute(weights, inp.total, inp.floor, inp.seq_len)


@ALLOCATORS.register("uniform")
@dataclass(frozen=True)
class UniformAllocator(Allocator):
    """Every head of every layer gets the same budget (SnapKV, StreamingLLM)."""

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        # what spread() of equal weights gives (the total is per_head * heads: no remainder), without
        # its water-filling: SnapKV's prefill compression runs this per request on the host
        return torch.full(inp.shape, inp.per_head, dtype=torch.int64)


@ALLOCATORS.register("pyramid")
@dataclass(frozen=True)
class PyramidAllocator(Allocator):
    """PyramidKV (Cai et al. 2024, Sec. 3.2): budgets above the window fall linearly with depth,
    from ``2*B - B/beta`` at the first layer to ``B/beta`` at the last (B = average budget above
    the window; ``beta`` = 20 as in the paper's code); heads of a layer share equally."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        check_number("beta", self.beta, 1.0, 1e6, open_low=True)

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        num_layers, num_heads = inp.shape
        above = float(inp.per_head - inp.floor)
        smallest = above / self.beta
        largest = 2 * above - smallest
        depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
        per_layer = largest - depth * (largest - smallest)
        return self.spread(inp, per_layer[:, None].expand(num_layers, num_heads))


@ALLOCATORS.register("adakv")
@dataclass(frozen=True)
class AdaKVAllocator(Allocator):
    """Ada-KV (Feng et al. 2024, Alg. 1, with its safeguard): inside each layer the heads compete
    for the layer's budget above the floor, ``A = per_head - floor`` per head: the layer's top
    ``num_heads * A`` unprotected scores over ALL its heads (flattened) decide how many slots
    ``won[h]`` each head earns, so concentrated heads give budget to dispersed ones. The safeguard
    mixes that with the uniform share: ``budget[h] = floor + (1 - alpha) * won[h] + alpha * A``
    (``alpha`` = 0.2 as in the paper), rounded so the layer's total stays exact."""

    alpha: float = 0.2

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, 0.0, 1.0)

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        return self.allocate_requests([inp])[0]

    def allocate_requests(self, inputs: list[AllocationInput]) -> list[torch.Tensor]:
        """Requests of one model (same layers and heads), any lengths: each request's competition
        in one batch of its layers, one copy to the host for all, then every layer of every request
        split in one call (host work: one water-filling per layer was most of a prefill step's
        host calls)."""
        num_layers, num_heads = inputs[0].shape

        def each_layer(per_request: list[int], dtype=torch.int64) -> torch.Tensor:  # [requests * layers]
            return torch.tensor([value for value in per_request for _ in range(num_layers)], dtype=dtype)

        above = [inp.per_head - inp.floor for inp in inputs]
        won = torch.cat([self.competition(torch.stack(inp.scores), inp.protected, a * num_heads)
                         for inp, a in zip(inputs, above)]).cpu()
        mixed = (1 - self.alpha) * won.double() + self.alpha * each_layer(above, torch.float64)[:, None]
        above_floor = distribute_rows(mixed, each_layer([a * num_heads for a in above]), 0,
                                      each_layer([inp.seq_len - inp.floor for inp in inputs]))
        return [layers + inp.floor for layers, inp in zip(above_floor.split(num_layers), inputs)]

    @staticmethod
    def competition(scores: torch.Tensor, protected: torch.Tensor, slots: int) -> torch.Tensor:
        """int64 [..., num_heads]: how many of its layer's best ``slots`` unprotected (head, token)
        scores each head holds. scores [..., num_heads, seq_len] (one layer, or layers stacked);
        ties go to the lower flat index."""
        *layers, num_heads, seq_len = scores.shape
        flat = scores.float().masked_fill(protected, float("-inf")).reshape(-1, num_heads * seq_len)
        best = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, :slots]
        head = best // seq_len + torch.arange(flat.shape[0], device=flat.device)[:, None] * num_heads
        # a scatter, not torch.bincount: on a GPU bincount reads its input's largest value first (a wait
        # for the device in every prefill compression of EMS / Ada-KV)
        won = torch.zeros(flat.shape[0] * num_heads, dtype=torch.int64, device=flat.device)
        won.scatter_add_(0, head.reshape(-1), torch.ones_like(head.reshape(-1)))
        return won.reshape(*layers, num_heads)


def tokens_for_mass(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Fewest tokens whose scores cover ``mass`` of each row's total. scores [..., n] -> int64 [...]."""
    s = scores.float().clamp(min=0).sort(-1, descending=True).values
    cumulative = s.cumsum(-1)
    target = mass * cumulative[..., -1:]
    return ((cumulative < target).sum(-1) + 1).clamp(max=scores.shape[-1])


def attention_output_error(obs: LayerObservation, kept: torch.Tensor) -> torch.Tensor:
    """Relative error of the window queries' attention output over the ``kept`` keys only.

    kept: bool [num_kv_heads, seq_len]. Each query head's output softmax(q K^T) V (causal inside the
    window) is compared with the one over the full cache: ||o_kept - o|| / ||o||, averaged over the
    window's queries and the group's query heads. Returns float32 [num_kv_heads]."""
    probs = window_probabilities(obs)  # [num_kv_heads, group * window, seq_len]
    values = obs.values.float()
    full = probs @ values
    masked = probs * kept[:, None, :].to(probs.dtype)
    part = (masked @ values) / masked.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    error = (part - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    return error.mean(-1)


def tokens_for_output(obs: LayerObservation, scores: torch.Tensor, protected: torch.Tensor,
                      tolerance: float) -> torch.Tensor:
    """Fewest unprotected tokens, best ``scores`` first, that keep each head's window attention
    output within ``tolerance`` relative error (:func:`attention_output_error`) next to its
    protected tokens. scores [num_kv_heads, seq_len], protected bool [seq_len] -> int64
    [num_kv_heads]. Binary search per head: the error falls, by and large, as tokens are added."""
    num_heads, seq_len = scores.shape
    ranked = scores.float().masked_fill(protected[None, :], float("-inf"))
    rank = torch.empty(num_heads, seq_len, dtype=torch.long, device=scores.device)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank.scatter_(1, order, torch.arange(seq_len, device=scores.device).expand(num_heads, -1))
    low = torch.zeros(num_heads, dtype=torch.long, device=scores.device)
    high = torch.full_like(low, seq_len - int(protected.sum()))  # every token: the full output
    while bool((low < high).any()):
        mid = (low + high) // 2
        kept = protected[None, :] | (rank < mid[:, None])
        close = attention_output_error(obs, kept) <= tolerance
        high = torch.where(close, mid, high)
        low = torch.where(close, low, torch.where(low < high, mid + 1, low))
    return low


ZIGZAG_MEASURES = ("lmba", "lmbo", "scores")
HEAD_SCORE_KINDS = ("retrieval", "retrieval_reasoning")


@ALLOCATORS.register("zigzag")
@dataclass(frozen=True)
class ZigZagAllocator(Allocator):
    """ZigZagKV layer-uncertainty budgets (arXiv 2412.09036, Sec. 4).

    A layer's uncertainty is its minimum budget, averaged over its heads, by one of two views:

    * ``measure="lmba"`` (the paper's budgets): the fewest prefix tokens holding ``mass``
      (default 0.9) of each head's raw window attention (softmax of the window queries summed
      over them, unpooled, prefix only);
    * ``"lmbo"`` (its second view, our reading): the fewest prefix tokens, best scores first,
      that keep the attention OUTPUT of the window queries within ``1 - mass`` relative error of
      the full cache's (the output before the layer's output projection: the policy interface
      sees no hidden states, and the projection is linear);
    * ``"scores"``: the LMBA of the scorer's own scores (pooled for SnapKV; our first version).

    ``lmba`` and ``lmbo`` read :attr:`AllocationInput.observations`. Layers get budget in
    proportion to their minimum, never less than ``min_fraction`` of the average: with u_l =
    LMB_l / sum LMB, B_l = B_min + (B_avg - B_min) * L * u_l (mass 0.9 and the bound 0.2 are a
    community reimplementation's reading of the paper's Eq. 6, not confirmed); heads of a layer
    share equally.
    """

    mass: float = 0.9
    min_fraction: float = 0.2
    measure: str = "lmba"

    @property
    def reads_layers(self) -> bool:
        return self.measure != "scores"

    def __post_init__(self) -> None:
        check_number("mass", self.mass, 0.0, 1.0, open_low=True)
        check_number("min_fraction", self.min_fraction, 0.0, 1.0)
        check_choice("zigzag measure", self.measure, ZIGZAG_MEASURES)

    def layer_needs(self, inp: AllocationInput) -> torch.Tensor:
        """float64 [num_layers]: each layer's minimum budget, averaged over its heads. Under tensor
        parallelism each rank measures its own heads and the heads' minima are gathered."""
        if self.measure == "scores":
            return torch.stack([tokens_for_mass(s, self.mass).double().mean() for s in inp.scores])
        if inp.observations is None:
            raise ValueError(f"the zigzag measure {self.measure!r} reads the layers: pass AllocationInput.observations")
        needs = []
        for obs, scores in zip(inp.observations, inp.scores):
            if self.measure == "lmba":
                attention = window_scores(obs.window_queries, obs.keys, obs.scale, padding=obs.padding)
                need = tokens_for_mass(attention.masked_fill(inp.protected[None, :], 0.0), self.mass)
            else:
                need = tokens_for_output(obs, inp.shards.mine(scores, dim=0), inp.protected, 1.0 - self.mass)
            needs.append(need)
        return inp.shards.gather_counts(torch.stack(needs)).double().mean(1).cpu()

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        num_layers, num_heads = inp.shape
        need = self.layer_needs(inp)
        low = min(inp.per_head, max(inp.floor, round(self.min_fraction * inp.per_head)))
        return distribute(need[:, None].expand(num_layers, num_heads), inp.total, low, inp.seq_len)


@ALLOCATORS.register("windowkv")
@dataclass(frozen=True)
class WindowKVAllocator(Allocator):
    """WindowKV layer-group budgets (arXiv 2503.17922, Sec. 3; official code's "arithmetic" decay).

    Layers form groups of ``group_size`` (8) consecutive layers; every head of a group gets its
    group's budget. With C = per_head - floor (the prefix budget; the suffix is kept on top of it)
    the group budgets fall by equal integer steps from first = 2C - last to last = floor(C *
    group_size / beta) (beta = 14: about 1.43 C down to 0.57 C). Ours: a model whose layers do not
    fill whole groups ends in a shorter group (SmolLM2's 30 layers: 8 + 8 + 8 + 6; the official
    code needs a multiple of 8), and the group budgets are then scaled so that the total is exact,
    capped at the context (a group whose budget covers the prefix keeps all of it -- no
    compression there -- and the rest goes to the other groups).
    """

    group_size: int = 8
    beta: float = 14.0

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size)
        check_number("beta", self.beta, 0.0, 1e6, open_low=True)

    def group_budgets(self, prefix_budget: int, num_groups: int) -> list[int]:
        """The prefix budget of each group, first to last (integers, as in the official code)."""
        if num_groups == 1:
            return [prefix_budget]
        last = math.floor(prefix_budget * self.group_size / self.beta)
        first = 2 * prefix_budget - last
        step = (first - last) // (num_groups - 1)
        return [first - g * step for g in range(num_groups - 1)] + [last]

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        num_layers, num_heads = inp.shape
        groups = self.group_budgets(inp.per_head - inp.floor, -(-num_layers // self.group_size))
        per_layer = torch.tensor([max(groups[layer // self.group_size], 0) for layer in range(num_layers)],
                                 dtype=torch.float64)
        return self.spread(inp, per_layer[:, None].expand(num_layers, num_heads))


@ALLOCATORS.register("headkv")
@dataclass(frozen=True)
class HeadKVAllocator(Allocator):
    """HeadKV per-head budgets (arXiv 2410.19258, Sec. 3.2).

    Of each head's budget above the floor, ``A = per_head - floor``, the share ``floor(A / beta)``
    goes into one pool shared by all heads of all layers; each head keeps ``A - floor(A / beta)``
    of its own. The pool is dealt out in proportion to the heads' importance scores (retrieval, or
    retrieval-reasoning for headkv-r2). ``beta`` = 1.5, the default of the official code's
    arguments (its scripts sweep 1.005-10; which one the paper's tables use is not stated): a
    third of the budget above the floor stays with each head, two thirds follow the scores. The
    official head budget round(score * pool + A - A // beta) can exceed the context, where it is
    wasted; ours water-fills it to the other heads, so the total stays exact. head_scores: float
    [num_layers, num_kv_heads], the ``heads`` scores of the calibration file (per KV head: the
    query heads of a group summed); :func:`~vllm_kvcompress.policies.presets.build_policy` reads them from
    the config's ``headkv_scores`` file.
    """

    head_scores: torch.Tensor | None = field(default=None, metadata={"from_config": "headkv_scores"})
    heads: str = "retrieval"
    beta: float = 1.5

    def __post_init__(self) -> None:
        check_choice("head score kind", self.heads, HEAD_SCORE_KINDS)
        check_number("beta", self.beta, 1.0, 1e6, open_low=True)

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        if self.head_scores is None:
            raise ValueError("the headkv allocator needs head scores (headkv_scores=PATH)")
        if tuple(self.head_scores.shape) != inp.shape:
            raise ValueError(
                f"head scores are for {tuple(self.head_scores.shape)} (layers, kv heads) but the model "
                f"has {inp.shape}: calibrate this model with `python -m vllm_kvcompress.tools.calibrate`"
            )
        above = inp.per_head - inp.floor
        own = above - int(above / self.beta)
        return distribute(self.head_scores.double().clamp(min=0), inp.total, inp.floor + own, inp.seq_len)
