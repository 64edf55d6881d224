"""A compression policy = scorer + allocator + reducer + budget."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocation import AllocationInput, Allocator
from .budget import Budget
from .observation import LayerObservation
from .reduction import Reducer, RetainedLayer, protected_positions
from .scoring import Scorer


@dataclass(frozen=True)
class Policy:
    """Compress every layer of one request.

    window: observation-window length (its tokens are always kept); sink: leading tokens always kept.
    """

    scorer: Scorer
    allocator: Allocator
    reducer: Reducer
    budget: Budget
    window: int = 32
    sink: int = 0

    @property
    def needs_global_attention(self) -> bool:
        return self.scorer.needs_global_attention

    def floor(self, seq_len: int) -> int:
        return min(seq_len, self.window + self.sink)

    def budgets(self, observations: list[LayerObservation]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(budgets int64 [num_layers, num_kv_heads], scores per layer, protected bool [seq_len])."""
        seq_len = observations[0].seq_len
        scores = [self.scorer.score(o) for o in observations]
        protected = protected_positions(seq_len, self.window, self.sink, device=scores[0].device)
        floor = self.floor(seq_len)
        inp = AllocationInput(scores, self.budget.per_head(seq_len, floor), floor, protected)
        return self.allocator.allocate(inp), scores, protected

    def compress(self, observations: list[LayerObservation]) -> list[RetainedLayer]:
        """observations: one per layer, all of the same request (same seq_len)."""
        if len({o.seq_len for o in observations}) != 1:
            raise ValueError("all layers of a request must hold the same number of tokens")
        budgets, scores, protected = self.budgets(observations)
        return self.reducer.reduce(observations, scores, budgets, protected)
