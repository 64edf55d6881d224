"""User-facing compression options, validated in one place.

The same dataclass backs the CLI flags (``--kv-compression``, ``--kv-budget``, ...), the JSON of
``--kv-compression-config`` and per-request overrides. ``build_policy`` in :mod:`presets` turns it
into a :class:`~vllm_kvcompress.policies.policy.Policy`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from vllm_kvcompress.policies import allocation, reduction, scoring# noqa: F401 - their parts register themselves
from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.registry import KINDS, check_bool, check_int

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
    "windowkv-tuned",
    "zigzag",
    "zigzag-lmbo",
    "headkv",
    "headkv-r2",
)


@dataclass(frozen=True)
class PresetParts:
    """The parts a preset picks (names in :mod:`~vllm_kvcompress.policies.registry`), the paper section it
    follows, its defaults of ``window`` and ``sink``, and the options it gives its parts where they
    differ from the parts' own defaults: ``{"scorer": {...}, "allocator": {...}, "reducer": {...}}``."""

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
                             options={"scorer": {"local_weight": 1.0}}),
    # window 32 = its suffix for question answering; 16 for other tasks (the reducer's aggregation_suffix)
    "windowkv": PresetParts("windowkv", "windowkv", "windows", "arXiv 2503.17922, Sec. 3; official code"),
    # Ours, beside the faithful one: on Qwen2.5-Coder-0.5B the windows a layer group's first layer
    # picks for the whole group (index sharing) lose the needle the other layers attend to; each
    # layer choosing its own windows keeps it (quality-notes.md, "a real 32k-context model").
    "windowkv-tuned": PresetParts("windowkv", "windowkv", "windows", "ours: WindowKV without layer-group index sharing",
                                  options={"allocator": {"group_size": 1}, "reducer": {"group_size": 1}}),
    "zigzag": PresetParts("snapkv", "zigzag", "topk", "arXiv 2412.09036, Sec. 4"),
    # the paper's second view of a layer's minimum budget (our reading of it: see ZigZagAllocator)
    "zigzag-lmbo": PresetParts("snapkv", "zigzag", "topk", "arXiv 2412.09036, Sec. 4 (LMBO)",
                               options={"allocator": {"measure": "lmbo"}}),
    # window 8: the official code's observation window
    "headkv": PresetParts("snapkv", "headkv", "topk", "arXiv 2410.19258, Sec. 3 (retrieval heads)", window=8),
    "headkv-r2": PresetParts("snapkv", "headkv", "topk", "arXiv 2410.19258, Sec. 3 (retrieval-reasoning heads)",
                             window=8, options={"allocator": {"heads": "retrieval_reasoning"}}),
}

# The config fields that name files a part reads (Registry.resources), and what a user must pass.
RESOURCES = {"headkv_scores": "head scores: pass headkv_scores=PATH (make one with "
                              "`python -m vllm_kvcompress.tools.calibrate MODEL --out scores.json`)"}

# Flat keys of configs written before parts owned their options, read once by from_dict:
# key -> the (kind, part, option)s it sets. A key whose part is not the one in effect is ignored,
# as the flat field it was went unused then.
LEGACY_KEYS: dict[str, tuple[tuple[str, str | None, str], ...]] = {
    "pool_kernel": (("scorer", None, "pool_kernel"),),  # any scorer that pools
    "pyramid_beta": (("allocator", "pyramid", "beta"),),
    "adakv_alpha": (("allocator", "adakv", "alpha"),),
    "zigzag_min_fraction": (("allocator", "zigzag", "min_fraction"),),
    "zigzag_mass": (("allocator", "zigzag", "mass"),),
    "zigzag_measure": (("allocator", "zigzag", "measure"),),
    "headkv_beta": (("allocator", "headkv", "beta"),),
    "ems_local_weight": (("scorer", "ems", "local_weight"),),
    "ems_merge_threshold": (("reducer", "ems-merge", "merge_threshold"),),
    "ems_relevant_mass": (("reducer", "ems-merge", "relevant_mass"),),
    "windowkv_task": (("reducer", "windows", "task"),),
    "windowkv_retrieval_window": (("reducer", "windows", "retrieval_window"),),
    "windowkv_aggregation_window": (("reducer", "windows", "aggregation_window"),),
    "windowkv_aggregation_suffix": (("reducer", "windows", "aggregation_suffix"),),
    "windowkv_group_size": (("allocator", "windowkv", "group_size"), ("reducer", "windows", "group_size")),
    "windowkv_beta": (("allocator", "windowkv", "beta"),),
    "windowkv_whole_windows": (("reducer", "windows", "whole_windows"),),
    "windowkv_retrieval_share": (("reducer", "windows", "retrieval_share"),),
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


@dataclass(frozen=True)
class CompressionConfig:
    """All options. ``policy`` picks a preset; ``scorer``/``allocator``/``reducer`` name other parts
    of :mod:`~vllm_kvcompress.policies.registry` in place of its own, and ``scorer_options`` /
    ``allocator_options`` / ``reducer_options`` set options of the parts in effect (the part
    classes' fields: e.g. ``{"policy": "pyramidkv", "allocator_options": {"beta": 10}}``; the
    preset's own options, then the parts' defaults, fill the rest: :meth:`part_options`).

    budget: average retained tokens per KV head (int) or fraction of the prompt (float in (0, 1]).
    window: observation window (last prompt tokens whose queries score the cache; always kept).
        None = the preset's default: 8 for headkv / headkv-r2 (their official code), else 32
        (windowkv: its suffix for question answering).
    sink: leading tokens always kept (None = the preset's default: 4 for streamingllm, else 0).
    window_in_budget: whether the budget counts the window and sinks (default True: the budget is
        every token a head retains, so equal budgets are equal memory for every preset). WindowKV's
        paper keeps its suffix on top of its budget: its budget C is ours minus the suffix.
        False counts that way: a head retains up to budget + window + sink tokens.
    decode_slack: decode-time recompression's cadence: every ``decode_slack`` engine steps (one
        clock for all requests, so the requests due are recompressed together, in one policy call),
        every head longer than its budget is brought back to it; a head then never holds more
        than budget + decode_slack rows (None = never recompress; the default 64 keeps long
        generations bounded).
    reserve_decode_growth: a server option. True: the scheduler admits a new (or resumed) request
        only while the pool keeps room, besides its own blocks, for every compressed request running
        now to grow ``decode_slack`` rows a head -- what it may take before its next decode-time
        recompression -- so requests admitted all at once do not preempt the running ones later;
        each head keeps in its own table the blocks a recompression would free and it refills
        before the next one (on the H100 at KV-Compress's setup snapkv@0.1 was preempted 68 times in
        45 s without it, each a 6k prompt recomputed). Fewer requests then run at once. Served with
        it, long generation ran at 5.9x plain vLLM (benchmarks/results/serving-notes.md, sixth
        lease), but no lease has run it on and off side by side, so it is off by default. No effect
        without ``decode_slack``.
    headkv_scores: path of a head-score JSON from ``python -m vllm_kvcompress.tools.calibrate``, which
        the headkv allocator reads (its ``heads`` option picks the retrieval or the
        retrieval-reasoning scores: ``headkv`` / ``headkv-r2``).
    cuda_graphs: serve pure-decode steps as full CUDA graphs (persistent metadata buffers,
        :mod:`vllm_kvcompress.vllm.worker.graphs`); a server option, not a per-request one. None (the
        default) = wherever vLLM captures CUDA graphs: on for a CUDA device unless ``enforce_eager``
        or a ``cudagraph_mode`` without full graphs, off on the CPU (decided once at start-up,
        ``vllm.settings.complete_engine_args``; H200: same outputs, 1.3-2.6x faster decode).
    cuda_graphs_max_len: rows per head a decode graph can hold (its table buffer is sized for it at
        every graph row: 4 bytes x layers x graph rows x KV heads x cuda_graphs_max_len / 16, 537 MB
        for Llama-3-8B at the default and 512 rows); a step in which a head would hold more runs
        without the graphs. Server options, like ``cuda_graphs``.

    Configs of the flat keys before (``pyramid_beta``, ``ems_local_weight``, ``windowkv_task``...:
    :data:`LEGACY_KEYS`) are read by :meth:`from_dict`.
    """

    policy: str = "snapkv"
    budget: Budget = field(default_factory=lambda: Budget(tokens=256))
    scorer: str | None = None
    allocator: str | None = None
    reducer: str | None = None
    scorer_options: dict = field(default_factory=dict)
    allocator_options: dict = field(default_factory=dict)
    reducer_options: dict = field(default_factory=dict)
    window: int | None = None
    sink: int | None = None
    window_in_budget: bool = True
    decode_slack: int | None = 64
    reserve_decode_growth: bool = False
    headkv_scores: str | None = None
    cuda_graphs: bool | None = None
    cuda_graphs_max_len: int = 16384

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", canonical_preset(self.policy))
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        for kind, registry in KINDS.items():
            if getattr(self, kind) is not None:
                registry.part(getattr(self, kind))
            options = getattr(self, f"{kind}_options")
            if not isinstance(options, dict):
                raise ValueError(f"{kind}_options must be a JSON object of the {kind}'s options, got {options!r}")
            object.__setattr__(self, f"{kind}_options", dict(options))  # a copy: the config is frozen
            name = self._part(kind)
            if name is None:
                if options:
                    raise ValueError(f"policy {self.policy!r} has no {kind}: {kind}_options {options} cannot apply")
                continue
            registry.build(name, self.part_options(kind))  # the part checks its options
            for source in registry.resources(name).values():  # the files it reads must be named
                if not getattr(self, source):
                    raise ValueError(f"policy {self.policy!r} with the {name} {kind} needs {RESOURCES[source]}")
        if self.window is not None:
            check_int("window", self.window)
        check_bool("window_in_budget", self.window_in_budget)
        if self.sink is not None:
            check_int("sink", self.sink, minimum=0)
        if self.decode_slack is not None:
            check_int("decode_slack", self.decode_slack, minimum=1)
        check_bool("reserve_decode_growth", self.reserve_decode_growth)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true, false or null (where vLLM captures graphs), "
                             f"got {self.cuda_graphs!r}")
        check_int("cuda_graphs_max_len", self.cuda_graphs_max_len)

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

    def part_options(self, kind: str) -> dict:
        """The options the config gives its ``kind`` part (not those left at the part's defaults):
        the preset's own for its part, then the config's ``{kind}_options``."""
        preset = PRESETS.get(self.policy)
        own = preset is not None and getattr(preset, kind) == self._part(kind)
        return {**(preset.options.get(kind, {}) if own else {}), **getattr(self, f"{kind}_options")}

    @property
    def effective_sink(self) -> int:
        if self.sink is not None:
            return self.sink
        return PRESETS[self.policy].sink if self.policy in PRESETS else 0

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
        """Build from plain options (flat keys of older configs translated: :data:`LEGACY_KEYS`);
        unknown keys are an error that lists the valid ones."""
        if not isinstance(options, dict):
            raise ValueError(f"kv-compression options must be a JSON object, got {type(options).__name__}")
        unknown = sorted(set(options) - set(cls.field_names()) - set(LEGACY_KEYS))
        if unknown:
            raise ValueError(f"unknown kv-compression option(s) {unknown}; valid options: {', '.join(cls.field_names())}")
        return cls(**_translate_legacy(options))

    @classmethod
    def from_json(cls, text: str) -> "CompressionConfig":
        try:
            options = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--kv-compression-config is not valid JSON: {error}") from None
        return cls.from_dict(options)

    def replace(self, **changes) -> "CompressionConfig":
        """A copy with ``changes`` applied and validated (per-request overrides). A part's options
        given in ``changes`` add to this config's for the same part; where ``changes`` puts another
        part in effect (another policy, scorer...), this config's options of that kind are dropped."""
        changed = CompressionConfig.from_dict({**{k: v for k, v in self.to_dict().items() if not k.endswith("_options")},
                                               **changes})
        merged = {}
        for kind in KINDS:
            mine = getattr(self, f"{kind}_options") if changed._part(kind) == self._part(kind) else {}
            merged[f"{kind}_options"] = {**mine, **getattr(changed, f"{kind}_options")}
        return dataclasses.replace(changed, **merged)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["budget"] = self.budget.tokens if self.budget.tokens is not None else self.budget.fraction
        return out


def _translate_legacy(options: dict) -> dict:
    """``options`` with the flat keys of :data:`LEGACY_KEYS` moved into the options of the parts in
    effect they belong to (ignored where another part is in effect, or where they are None: the
    preset's own value then)."""
    legacy = {key: options[key] for key in LEGACY_KEYS if key in options}
    if not legacy:
        return options
    out = {k: v for k, v in options.items() if k not in LEGACY_KEYS}
    policy = canonical_preset(out.get("policy", "snapkv"))
    preset = PRESETS.get(policy)
    for key, value in legacy.items():
        for kind, part, option in LEGACY_KEYS[key]:
            name = out.get(kind) or (getattr(preset, kind) if preset else None)
            if value is None or name is None or option not in KINDS[kind].options(name):
                continue
            if part is not None and name != part:
                continue
            out[f"{kind}_options"] = {**out.get(f"{kind}_options", {}), option: value}
    return out
