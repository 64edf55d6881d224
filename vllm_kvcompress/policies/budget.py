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
    head, read by Python loops and the paged cache's host-side state). Water-filling: shares above a cap go to the others. Deterministic: ties in
    rounding go to the lower flat index.
    """
    n = weights.numel()
    if not (low * n <= total <= high * n):
        raise ValueError(f"cannot split {total} into {n} parts within [{low}, {high}]")
    w = weights.reshape(-1).double().cpu().clamp(min=0)
    if not torch.isfinite(w).all():
        raise ValueError("allocation weights must be finite")
    if w.sum() == 0:
        w = torch.ones_like(w)
    share = torch.zeros_like(w)
    capped = torch.zeros(n, dtype=torch.bool)
    remaining = float(total - low * n)
    room = float(high - low)
    while remaining > 1e-9:
        active = ~capped & (w > 0)
        if not active.any():  # only zero-weight parts have room left: spread evenly over them
            active = ~capped
            w = torch.where(active, torch.ones_like(w), w)
        step = remaining * w * active / (w * active).sum()
        over = active & (share + step >= room)
        if over.any():
            remaining -= float((room - share[over]).sum())
            share[over] = room
            capped |= over
            continue
        share += step
        remaining = 0.0
    ints = share.floor()
    left = total - low * n - int(ints.sum())
    if left > 0:
        frac = torch.where(ints < room, share - ints, torch.full_like(share, -1.0))
        # stable sort: equal fractions go to the lower index
        order = torch.sort(-frac, stable=True).indices[:left]
        ints[order] += 1
    return (ints.long() + low).reshape(weights.shape)
