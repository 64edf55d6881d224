"""Allocators: how a total budget is split across layers and KV heads.

Every allocator returns int64 ``[num_layers, num_kv_heads]`` budgets that sum to exactly
``per_head * num_layers * num_kv_heads``, each within ``[floor, seq_len]`` (``floor`` = the tokens
every head keeps anyway: observation window + sinks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import distribute


@dataclass(frozen=True)
class AllocationInput:
    """scores: per layer float32 [num_kv_heads, seq_len]; per_head: average budget; floor: minimum;
    protected: bool [seq_len], the positions every head keeps (window + sinks)."""

    scores: list[torch.Tensor]
    per_head: int
    floor: int
    protected: torch.Tensor

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
    def allocate(self, inp: AllocationInput) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def spread(inp: AllocationInput, weights: torch.Tensor) -> torch.Tensor:
        """Budgets proportional to ``weights`` [num_layers, num_kv_heads] above the floor."""
        return distribute(weights, inp.total, inp.floor, inp.seq_len)


@dataclass(frozen=True)
class UniformAllocator(Allocator):
    """Every head of every layer gets the same budget (SnapKV, StreamingLLM)."""

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        return self.spread(inp, torch.ones(inp.shape))


@dataclass(frozen=True)
class PyramidAllocator(Allocator):
    """PyramidKV (Cai et al. 2024, Sec. 3.2): budgets above the window fall linearly with depth,
    from ``2*B - B/beta`` at the first layer to ``B/beta`` at the last (B = average budget above
    the window; ``beta`` = 20 as in the paper's code); heads of a layer share equally."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        if self.beta <= 1:
            raise ValueError(f"pyramid beta must be > 1, got {self.beta}")

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        num_layers, num_heads = inp.shape
        above = float(inp.per_head - inp.floor)
        smallest = above / self.beta
        largest = 2 * above - smallest
        depth = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
        per_layer = largest - depth * (largest - smallest)
        return self.spread(inp, per_layer[:, None].expand(num_layers, num_heads))


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
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv alpha must be in [0, 1], got {self.alpha}")

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        above = inp.per_head - inp.floor
        budgets = []
        for scores in inp.scores:
            won = self.competition(scores, inp.protected, above * scores.shape[0])
            mixed = (1 - self.alpha) * won.double() + self.alpha * above
            budgets.append(distribute(mixed, above * scores.shape[0], 0, inp.seq_len - inp.floor) + inp.floor)
        return torch.stack(budgets)

    @staticmethod
    def competition(scores: torch.Tensor, protected: torch.Tensor, slots: int) -> torch.Tensor:
        """int64 [num_heads]: how many of the layer's best ``slots`` unprotected (head, token) scores
        each head holds. scores [num_heads, seq_len]; ties go to the lower flat index."""
        num_heads, seq_len = scores.shape
        flat = scores.float().masked_fill(protected[None, :], float("-inf")).reshape(-1)
        best = torch.sort(flat, descending=True, stable=True).indices[:slots]
        return torch.bincount(best // seq_len, minlength=num_heads)


def tokens_for_mass(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Fewest tokens whose scores cover ``mass`` of each row's total. scores [..., n] -> int64 [...]."""
    s = scores.float().clamp(min=0).sort(-1, descending=True).values
    cumulative = s.cumsum(-1)
    target = mass * cumulative[..., -1:]
    return ((cumulative < target).sum(-1) + 1).clamp(max=scores.shape[-1])


@dataclass(frozen=True)
class ZigZagAllocator(Allocator):
    """ZigZagKV layer-uncertainty budgets (arXiv 2412.09036, Sec. 4).

    A layer's uncertainty is how many tokens it needs to keep ``mass`` (default 0.9) of its
    attention: the fewest top-scored tokens covering that share of each head's score, averaged
    over its heads. Layers get budget in proportion to it, but never less than ``min_fraction``
    (default 0.2, our choice for the paper's bounded minimum) of the average; heads of a layer
    share equally.
    """

    mass: float = 0.9
    min_fraction: float = 0.2

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        num_layers, num_heads = inp.shape
        need = torch.stack([tokens_for_mass(s, self.mass).double().mean() for s in inp.scores])
        low = min(inp.per_head, max(inp.floor, round(self.min_fraction * inp.per_head)))
        return distribute(need[:, None].expand(num_layers, num_heads), inp.total, low, inp.seq_len)


@dataclass(frozen=True)
class HeadKVAllocator(Allocator):
    """HeadKV per-head budgets (arXiv 2410.19258, Sec. 3.2).

    Of each head's budget above the floor, ``A = per_head - floor``, the share ``floor(A / beta)``
    goes into one pool shared by all heads of all layers; each head keeps ``A - floor(A / beta)``
    of its own. The pool is dealt out in proportion to the heads' importance scores (retrieval, or
    retrieval-reasoning for headkv-r2). ``beta`` = 1.005 as in the paper's code, so nearly the whole
    budget follows the scores. head_scores: float [num_layers, num_kv_heads] from the calibration
    file (per KV head: the query heads of a group summed).
    """

    head_scores: torch.Tensor
    beta: float = 1.005

    def allocate(self, inp: AllocationInput) -> torch.Tensor:
        if tuple(self.head_scores.shape) != inp.shape:
            raise ValueError(
                f"head scores are for {tuple(self.head_scores.shape)} (layers, kv heads) but the model "
                f"has {inp.shape}: calibrate this model with `python -m vllm_kvcompress.calibrate`"
            )
        above = inp.per_head - inp.floor
        own = above - int(above / self.beta)
        return distribute(self.head_scores.double().clamp(min=0), inp.total, inp.floor + own, inp.seq_len)
