"""HeadKV head-importance scores: the file ``python -m vllm_kvcompress.tools.calibrate`` writes.

JSON object::

    {"format": "vllm-kvcompress/head-scores", "version": 1,
     "model": "<name or path the scores were computed for>",
     "num_layers": L, "num_kv_heads": H,
     "retrieval": [[...H floats...] x L],            # HeadKV-R  (retrieval heads)
     "retrieval_reasoning": [[...] x L],             # HeadKV-R2 (retrieval-reasoning heads)
     "calibration": {...}}                           # how they were made (prompts, seed, ...)

Scores are per KV head (the query heads of a GQA group are summed, since the cache is per KV head).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "vllm-kvcompress/head-scores"
KINDS = ("retrieval", "retrieval_reasoning")


@dataclass(frozen=True)
class HeadScores:
    """retrieval, retrieval_reasoning: float [num_layers][num_kv_heads], >= 0."""

    model: str
    retrieval: list[list[float]]
    retrieval_reasoning: list[list[float]]
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in KINDS:
            rows = getattr(self, kind)
            well_formed = isinstance(rows, list) and rows and all(
                isinstance(r, list) and len(r) == len(rows[0]) and r for r in rows
            )
            if not well_formed:
                raise ValueError(f"head scores: {kind!r} must be a non-empty [num_layers][num_kv_heads] list")
            numbers = (x for r in rows for x in r)
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 for x in numbers):
                raise ValueError(f"head scores: {kind!r} must hold finite numbers >= 0")
        if self.shape_of("retrieval") != self.shape_of("retrieval_reasoning"):
            raise ValueError("head scores: 'retrieval' and 'retrieval_reasoning' differ in shape")

    def shape_of(self, kind: str) -> tuple[int, int]:
        rows = getattr(self, kind)
        return len(rows), len(rows[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(num_layers, num_kv_heads)."""
        return self.shape_of("retrieval")

    def tensor(self, kind: str) -> torch.Tensor:
        """float64 [num_layers, num_kv_heads] of ``kind`` ('retrieval' or 'retrieval_reasoning')."""
        if kind not in KINDS:
            raise ValueError(f"unknown head-score kind {kind!r}; valid: {', '.join(KINDS)}")
        return torch.tensor(getattr(self, kind), dtype=torch.float64)

    def check_model(self, num_layers: int, num_kv_heads: int, source: str = "") -> None:
        """ValueError unless the scores fit a model of this shape."""
        if self.shape != (num_layers, num_kv_heads):
            raise ValueError(
                f"head scores{' ' + source if source else ''} were computed for {self.model!r} with "
                f"{self.shape[0]} layers x {self.shape[1]} KV heads, but this model has {num_layers} x "
                f"{num_kv_heads}: calibrate it with `python -m vllm_kvcompress.tools.calibrate MODEL --out scores.json`"
            )

    def to_json(self) -> dict:
        num_layers, num_kv_heads = self.shape
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model,
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "retrieval": self.retrieval,
            "retrieval_reasoning": self.retrieval_reasoning,
            "calibration": self.calibration,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        """Read and validate a scores file; errors name the file and the problem."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"head-scores file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"head-scores file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a head-scores file (expected \"format\": {FORMAT!r})")
        try:
            scores = cls(
                model=str(data.get("model", "")),
                retrieval=data["retrieval"],
                retrieval_reasoning=data["retrieval_reasoning"],
                calibration=data.get("calibration", {}),
            )
        except KeyError as missing:
            raise ValueError(f"head-scores file {str(path)!r} lacks {missing}") from None
        except ValueError as error:
            raise ValueError(f"head-scores file {str(path)!r}: {error}") from None
        if (data.get("num_layers"), data.get("num_kv_heads")) != scores.shape:
            raise ValueError(f"head-scores file {str(path)!r}: num_layers/num_kv_heads do not match its score arrays")
        return scores
