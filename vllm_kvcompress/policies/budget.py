"""How much KV a policy may keep, and how an integer budget is split exactly.

A budget is either an average number of retained tokens per KV head (``256``) or a fraction of the
prompt (``0.1``). Every retained token counts: observation window and sink tokens included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# No model's context comes near this; a larger per-head budget is a mistake (and would overflow the
# int64 bookkeeping of decode-time budgets), so it is refused instead of meaning "keep everything".
MAX_TOKENS = 1 << 24


@dataclass(frozen=True)
class Budget:
    """Average retained tokens per KV head, as a count or as a fraction of the context."""

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("a Budget is either tokens or fraction, exactly one of them")
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0
        ):
            raise ValueError(f"budget must be a positive number of tokens per head, got {self.tokens!r}")
        if self.tokens is not None and self.tokens > MAX_TOKENS:
            raise ValueError(f"budget must be at most {MAX_TOKENS} tokens per head (longer than any context), "
                             f"got {self.tokens}")
        if self.fraction is not None and (
            isinstance(self.fraction, bool)
            or not isinstance(self.fraction, (int, float))
            or not (0.0 < self.fraction <= 1.0)
        ):
            raise ValueError(f"budget fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def parse(cls, value: "Budget | int | float | str") -> "Budget":
        """``256`` / ``"256"`` -> 256 tokens per head; ``0.1`` / ``"0.1"`` -> 10% of the context."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise ValueError(f"budget must be a number, got {value!r}")
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"budget must be a token count (256) or a fraction (0.1), got {text!r}") from None
        if isinstance(value, int):
            return cls(tokens=value)
        if isinstance(value, float):
            if math.isnan(value) or math.isinf(value):
                raise ValueError(f"budget must be finite, got {value}")
            if value.is_integer() and value > 1:
                return cls(tokens=int(value))
            return cls(fraction=value)
        raise ValueError(f"budget must be a token count or a fraction, got {value!r}")

    def per_head(self, seq_len: int, floor: int = 0) -> int:
        """Average tokens per head for a context of ``seq_len``: at least ``floor`` (the tokens every
        head always keeps: observation window + sinks) and at most ``seq_len``."""
        raw = self.tokens if self.tokens is not None else round(self.fraction * seq_len)
        return min(seq_len, max(raw, floor))

    def __str__(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"{self.fraction:g}"


def distribute(weights: torch.Tensor, total: int, low: int, high: int) -> torch.Tensor:
    """Split ``total`` into integers in [low, high], proportional to ``weights`` above ``low``.

    weights: float [...] >= 0 (all zero = split evenly), on any device; returns int64 of the same shape
    ON THE HOST that sums to exactly ``total`` (budgets are bookkeeping: a few numbers per layer and
    head, read by Python loops and the paged cache's host-side state). Water-filling: shares above a
    cap go to the others. Deterministic: ties in rounding go to the lower flat index. The one-row
    case of :func:`distribute_rows`.
    """
    return distribute_rows(weights.reshape(1, -1), total, low, high).reshape(weights.shape)


def distribute_rows(weights: torch.Tensor, totals: torch.Tensor | int, low: int,
                    high: torch.Tensor | int) -> torch.Tensor:
    """:func:`distribute` of every row of ``weights`` into its own total, all rows at once.

    weights: float [rows, n] >= 0, on any device; totals: int, or int [rows] (each row's total);
    high: int, or int [rows] (each row's cap: rows of requests of different lengths). Returns int64
    [rows, n] on the host: row r is ``distribute(weights[r], totals[r], low, high[r])``.
    The water-filling goes in rounds over all rows, a row's round either caps some of its parts
    (their shares reach ``high``) or settles it: at most n rounds, settled rows masked out.
    """
    rows, n = weights.shape
    totals, high = (torch.as_tensor(t, dtype=torch.int64).cpu().expand(rows) for t in (totals, high))
    impossible = (totals < low * n) | (totals > high * n)
    if bool(impossible.any()):
        row = int(impossible.nonzero()[0])
        raise ValueError(f"cannot split {int(totals[row])} into {n} parts within [{low}, {int(high[row])}]")
    w = weights.double().cpu().clamp(min=0)
    if not torch.isfinite(w).all():
        raise ValueError("allocation weights must be finite")
    room = (high - low).double()[:, None]  # [rows, 1]
    share = torch.zeros_like(w)  # above `low`; a part's share stays 0 until it caps or its row settles
    capped = torch.zeros_like(w, dtype=torch.bool)
    remaining = totals - low * n  # int64 [rows]: capping takes exactly `room`, so this stays whole
    while bool((remaining > 0).any()):
        splitting = (remaining > 0)[:, None]
        open_parts = splitting & ~capped
        # a row whose open parts all weigh zero spreads evenly over them (an all-zero row at once)
        w = torch.where(open_parts & ~(open_parts & (w > 0)).any(-1, keepdim=True), 1.0, w)
        active = open_parts & (w > 0)
        weight = (w * active).sum(-1, keepdim=True).where(splitting, 1.0)  # settled rows: no 0 / 0
        step = remaining[:, None] * w * active / weight
        over = active & (step >= room)
        settles = ~over.any(-1, keepdim=True)  # all its steps fit: the row's last round
        share = torch.where(over, room, torch.where(active & settles, step, share))
        capped |= over
        remaining = torch.where(settles[:, 0], 0, remaining - (high - low) * over.sum(-1))
    ints = share.floor()
    left = totals - low * n - ints.sum(-1).long()  # [rows]: the units rounding down left over
    frac = torch.where(ints < room, share - ints, -1.0)  # a part at the cap takes none of them
    order = torch.sort(-frac, dim=-1, stable=True).indices  # stable: equal fractions, the lower index first
    ints.scatter_add_(1, order, (torch.arange(n) < left[:, None]).double())
    return ints.long() + low
