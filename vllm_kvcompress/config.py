"""User-facing compression options, validated in one place.

The same dataclass backs the CLI flags (``--kv-compression``, ``--kv-budget``, ...), the JSON of
``--kv-compression-config`` and per-request overrides. ``build_policy`` in :mod:`presets` turns it
into a :class:`~vllm_kvcompress.policy.Policy`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .allocation import ZIGZAG_MEASURES
from .budget import Budget

PRESET_ALIASES = {"layer-uncertainty": "zigzag", "full": "none"}
PRESET_NAMES = (
    "none",
    "streamingllm",
    "snapkv",
    "pyramidkv",
    "adakv",
    "ems",
    "ems-tuned",
    "windowkv",
    "zigzag",
    "zigzag-lmbo",
    "headkv",
    "headkv-r2",
)
SCORER_NAMES = ("recency", "snapkv", "squared", "ems", "windowkv")
ALLOCATOR_NAMES = ("uniform", "pyramid", "adakv", "zigzag", "headkv", "windowkv")
REDUCER_NAMES = ("topk", "ems-merge", "windows")
TASK_TYPES = ("auto", "retrieval", "aggregation")


# What a config leaving these options None gets, unless its preset sets them (PresetParts.options).
OPTION_DEFAULTS = {"ems_local_weight": 0.5, "zigzag_measure": "lmba"}


@dataclass(frozen=True)
class PresetParts:
    """The parts a preset picks, the paper section it follows, its defaults of ``window`` and
    ``sink``, and of the options in :data:`OPTION_DEFAULTS` (what a config that leaves them None
    gets)."""

    scorer: str
    allocator: str
    reducer: str
    source: str
    window: int = 32
    sink: int = 0
    options: dict = field(default_factory=dict)


PRESETS: dict[str, PresetParts] = {
    "streamingllm": PresetParts("recency", "uniform", "topk", "Xiao et al. 2023 (arXiv 2309.17453), Sec. 3.2", sink=4),
    "snapkv": PresetParts("snapkv", "uniform", "topk", "Li et al. 2024 (arXiv 2404.14469), Sec. 4"),
    "pyramidkv": PresetParts("snapkv", "pyramid", "topk", "Cai et al. 2024 (arXiv 2406.02069), Sec. 3"),
    "adakv": PresetParts("snapkv", "adakv", "topk", "Feng et al. 2024 (arXiv 2407.11550), Alg. 1"),
    # EMS budgets heads adaptively from its own scores (Ada-KV's competition inside a layer).
    "ems": PresetParts("ems", "adakv", "ems-merge", "arXiv 2412.08521, Sec. 3.2-3.3"),
    # Ours, beside the faithful one: on SmolLM2 the global (column-sum) term spends the budget on
    # early tokens the answers do not need at any weight (benchmarks/results/quality-notes.md), and
    # Ada-KV's competition on per-head normalised scores loses to a uniform split. What is left of
    # EMS is its evict-then-merge; no column mass is collected (a prefill as cheap as SnapKV's).
    "ems-tuned": PresetParts("ems", "uniform", "ems-merge", "ours: EMS's evict-then-merge on its local term alone",
                             options={"ems_local_weight": 1.0}),
    # window 32 = its suffix for question answering; 16 for other tasks (windowkv_aggregation_suffix)
    "windowkv": PresetParts("windowkv", "windowkv", "windows", "arXiv 2503.17922, Sec. 3; official code"),
    "zigzag": PresetParts("snapkv", "zigzag", "topk", "arXiv 2412.09036, Sec. 4"),
    # the paper's second view of a layer's minimum budget (our reading of it: see ZigZagAllocator)
    "zigzag-lmbo": PresetParts("snapkv", "zigzag", "topk", "arXiv 2412.09036, Sec. 4 (LMBO)",
                               options={"zigzag_measure": "lmbo"}),
    # window 8: the official code's observation window
    "headkv": PresetParts("snapkv", "headkv", "topk", "arXiv 2410.19258, Sec. 3 (retrieval heads)", window=8),
    "headkv-r2": PresetParts("snapkv", "headkv", "topk", "arXiv 2410.19258, Sec. 3 (retrieval-reasoning heads)",
                             window=8),
}


def canonical_preset(name: str) -> str:
    """The preset a user-typed name refers to; ValueError listing the valid names otherwise."""
    # not str(name): None would read as "none" and silently turn compression off
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else None
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESET_NAMES:
        valid = ", ".join(PRESET_NAMES + tuple(PRESET_ALIASES))
        raise ValueError(f"unknown kv-compression policy {name!r}; valid policies: {valid}")
    return key


def _check_choice(kind: str, value: str | None, valid: tuple[str, ...]) -> None:
    if value is not None and value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid {kind}s: {', '.join(valid)}")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, low: float, high: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class CompressionConfig:
    """All options. ``policy`` picks a preset; ``scorer``/``allocator``/``reducer`` override its parts.

    budget: average retained tokens per KV head (int) or fraction of the prompt (float in (0, 1]).
    window: observation window (last prompt tokens whose queries score the cache; always kept).
        None = the preset's default: 8 for headkv / headkv-r2 (their official code), else 32
        (windowkv: its suffix for question answering).
    sink: leading tokens always kept (None = the preset's default: 4 for streamingllm, else 0).
    window_in_budget: whether the budget counts the window and sinks (default True: the budget is
        every token a head retains, so equal budgets are equal memory for every preset). WindowKV's
        paper keeps its suffix on top of its budget: its budget C is ours minus the suffix.
        False counts that way: a head retains up to budget + window + sink tokens.
    pool_kernel: max-pooling width of SnapKV-style scores (odd).
    decode_slack: decode-time recompression's cadence: every ``decode_slack`` engine steps (one
        clock for all requests, so the requests due are recompressed together, in one policy call),
        every head longer than its budget is brought back to it; a head then never holds more
        than budget + decode_slack rows (None = never recompress; the default 64 keeps long
        generations bounded).
    pyramid_beta: PyramidKV's ratio of largest to smallest layer budget, 2*beta - 1 (paper: 20).
    adakv_alpha: Ada-KV safeguard: share of each head's budget it keeps for itself (paper: 0.2).
    zigzag_*: see :class:`~vllm_kvcompress.allocation.ZigZagAllocator`.
    headkv_scores: path of a head-score JSON from ``python -m vllm_kvcompress.calibrate``
        (``headkv`` uses its retrieval scores, ``headkv-r2`` its retrieval-reasoning scores).
    headkv_beta: HeadKV's pool divisor (official default 1.5; see HeadKVAllocator).
    zigzag_measure: a layer's minimum budget by "lmba" (raw window attention, the paper's), "lmbo"
        (window attention output) or "scores" (the scorer's scores); see ZigZagAllocator. None = the
        preset's (lmbo for zigzag-lmbo, else lmba).
    ems_local_weight: weight of the local term against the global one (0.5, ours; None = the
        preset's: 1.0 for ems-tuned).
    ems_merge_threshold: redundancy cos(K) * cos(V) a token needs to merge into a centre (0.5, ours).
    ems_relevant_mass: share of a head's score mass whose tokens may merge; the others are evicted
        first (0.9, ours). See :class:`~vllm_kvcompress.scoring.EMSScorer` and
        :class:`~vllm_kvcompress.reduction.EvictThenMergeReducer`.
    windowkv_task: "retrieval" (the paper's QA), "aggregation" (its other tasks) or "auto" (our
        stand-in for its unpublished classifier: windowkv_retrieval_share).
    windowkv_aggregation_suffix: the suffix of aggregation prompts (paper: 16; retrieval: window).
    windowkv_beta: the group budgets' slope (paper: 14; see WindowKVAllocator).
    windowkv_whole_windows: keep whole windows only (paper); False fills each budget exactly (ours).
    windowkv_*: see :class:`~vllm_kvcompress.reduction.WindowReducer`.
    cuda_graphs: serve pure-decode steps as full CUDA graphs (persistent metadata buffers,
        :mod:`vllm_kvcompress.vllm.graphs`); a server option, not a per-request one. None (the
        default) = wherever vLLM captures CUDA graphs: on for a CUDA device unless ``enforce_eager``
        or a ``cudagraph_mode`` without full graphs, off on the CPU (decided once at start-up,
        ``vllm.settings.complete_engine_args``; H200: same outputs, 1.3-2.6x faster decode).
    cuda_graphs_max_len: rows per head a decode graph can hold (its table buffer is sized for it at
        every graph row: 4 bytes x layers x graph rows x KV heads x cuda_graphs_max_len / 16, 537 MB
        for Llama-3-8B at the default and 512 rows); a step in which a head would hold more runs
        without the graphs. Server options, like ``cuda_graphs``.
    """

    policy: str = "snapkv"
    budget: Budget = field(default_factory=lambda: Budget(tokens=256))
    scorer: str | None = None
    allocator: str | None = None
    reducer: str | None = None
    window: int | None = None
    sink: int | None = None
    window_in_budget: bool = True
    pool_kernel: int = 7
    decode_slack: int | None = 64
    pyramid_beta: float = 20.0
    adakv_alpha: float = 0.2
    zigzag_min_fraction: float = 0.2
    zigzag_mass: float = 0.9
    zigzag_measure: str | None = None
    headkv_scores: str | None = None
    headkv_beta: float = 1.5
    ems_local_weight: float | None = None
    ems_merge_threshold: float = 0.5
    ems_relevant_mass: float = 0.9
    windowkv_task: str = "auto"
    windowkv_retrieval_window: int = 8
    windowkv_aggregation_window: int = 8
    windowkv_aggregation_suffix: int = 16
    windowkv_group_size: int = 8
    windowkv_beta: float = 14.0
    windowkv_whole_windows: bool = True
    windowkv_retrieval_share: float = 0.5
    cuda_graphs: bool | None = None
    cuda_graphs_max_len: int = 16384

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", canonical_preset(self.policy))
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        _check_choice("scorer", self.scorer, SCORER_NAMES)
        _check_choice("allocator", self.allocator, ALLOCATOR_NAMES)
        _check_choice("reducer", self.reducer, REDUCER_NAMES)
        _check_choice("windowkv task type", self.windowkv_task, TASK_TYPES)
        _check_choice("zigzag measure", self.zigzag_measure, ZIGZAG_MEASURES)
        if self.window is not None:
            _check_positive_int("window", self.window)
        for name in ("window_in_budget", "windowkv_whole_windows"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sink is not None:
            _check_positive_int("sink", self.sink, minimum=0)
        _check_positive_int("pool_kernel", self.pool_kernel)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        if self.decode_slack is not None:
            _check_positive_int("decode_slack", self.decode_slack, minimum=1)
        _check_number("pyramid_beta", self.pyramid_beta, 1.0, 1e6, open_low=True)
        _check_number("adakv_alpha", self.adakv_alpha, 0.0, 1.0)
        _check_number("zigzag_min_fraction", self.zigzag_min_fraction, 0.0, 1.0)
        _check_number("zigzag_mass", self.zigzag_mass, 0.0, 1.0, open_low=True)
        _check_number("headkv_beta", self.headkv_beta, 1.0, 1e6, open_low=True)
        if self.ems_local_weight is not None:
            _check_number("ems_local_weight", self.ems_local_weight, 0.0, 1.0)
        _check_number("ems_merge_threshold", self.ems_merge_threshold, -1.0, 1.0)
        _check_number("ems_relevant_mass", self.ems_relevant_mass, 0.0, 1.0, open_low=True)
        _check_number("windowkv_beta", self.windowkv_beta, 0.0, 1e6, open_low=True)
        _check_number("windowkv_retrieval_share", self.windowkv_retrieval_share, 0.0, 1.0)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true, false or null (where vLLM captures graphs), "
                             f"got {self.cuda_graphs!r}")
        _check_positive_int("cuda_graphs_max_len", self.cuda_graphs_max_len)
        for name in ("windowkv_retrieval_window", "windowkv_aggregation_window", "windowkv_aggregation_suffix",
                     "windowkv_group_size"):
            _check_positive_int(name, getattr(self, name))
        if self.allocator_name == "headkv" and not self.headkv_scores:
            raise ValueError(
                f"policy {self.policy!r} with the headkv allocator needs head scores: pass headkv_scores=PATH "
                "(make one with `python -m vllm_kvcompress.calibrate MODEL --out scores.json`)"
            )

    def _part(self, kind: str) -> str | None:
        override = getattr(self, kind)
        if override is not None:
            return override
        return getattr(PRESETS[self.policy], kind) if self.policy in PRESETS else None

    @property
    def scorer_name(self) -> str | None:
        """The scorer in effect (the override, else the preset's; None for ``none``)."""
        return self._part("scorer")

    @property
    def allocator_name(self) -> str | None:
        return self._part("allocator")

    @property
    def reducer_name(self) -> str | None:
        return self._part("reducer")

    @property
    def effective_sink(self) -> int:
        if self.sink is not None:
            return self.sink
        return PRESETS[self.policy].sink if self.policy in PRESETS else 0

    def preset_option(self, name: str):
        """The value of option ``name`` in effect: the config's, else its preset's, else the default
        (:data:`OPTION_DEFAULTS`)."""
        value = getattr(self, name)
        if value is not None:
            return value
        preset = PRESETS.get(self.policy)
        return preset.options.get(name, OPTION_DEFAULTS[name]) if preset else OPTION_DEFAULTS[name]

    @property
    def effective_window(self) -> int:
        if self.window is not None:
            return self.window
        return PRESETS[self.policy].window if self.policy in PRESETS else 32

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: dict) -> "CompressionConfig":
        """Build from plain options; unknown keys are an error that lists the valid ones."""
        if not isinstance(options, dict):
            raise ValueError(f"kv-compression options must be a JSON object, got {type(options).__name__}")
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown kv-compression option(s) {unknown}; valid options: {', '.join(cls.field_names())}")
        return cls(**options)

    @classmethod
    def from_json(cls, text: str) -> "CompressionConfig":
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--kv-compression-config is not valid JSON: {error}") from None
        return cls.from_dict(options)

    def replace(self, **changes) -> "CompressionConfig":
        """A copy with ``changes`` applied and validated (per-request overrides)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["budget"] = self.budget.tokens if self.budget.tokens is not None else self.budget.fraction
        return out
