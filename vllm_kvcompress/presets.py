"""Named presets: which scorer, allocator and reducer each policy a user types stands for.

    build_policy("ems", budget=128)                 # keyword options
    build_policy(CompressionConfig(policy="snapkv", allocator="adakv"))   # parts overridden

``none`` builds no policy (``None``): the full cache. Every other preset is one choice of the three
parts; ``scorer=`` / ``allocator=`` / ``reducer=`` in the config replace the preset's choice, so
users combine parts freely (e.g. EMS scores with HeadKV budgets).
"""
from __future__ import annotations

from .allocation import (
    AdaKVAllocator,
    Allocator,
    HeadKVAllocator,
    PyramidAllocator,
    UniformAllocator,
    WindowKVAllocator,
    ZigZagAllocator,
)
from .config import CompressionConfig
from .head_scores import HeadScores
from .policy import Policy
from .reduction import EvictThenMergeReducer, Reducer, TopKReducer, WindowReducer
from .scoring import EMSScorer, RecencyScorer, Scorer, SnapKVScorer, SquaredAttentionScorer, WindowKVScorer


def make_scorer(name: str, config: CompressionConfig) -> Scorer:
    if name == "recency":
        return RecencyScorer()
    if name == "snapkv":
        return SnapKVScorer(pool_kernel=config.pool_kernel)
    if name == "squared":
        return SquaredAttentionScorer()
    if name == "ems":
        return EMSScorer(local_weight=config.preset_option("ems_local_weight"), pool_kernel=config.pool_kernel)
    if name == "windowkv":
        return WindowKVScorer()
    raise ValueError(f"unknown scorer {name!r}")  # config validation makes this unreachable


def make_allocator(name: str, config: CompressionConfig) -> Allocator:
    if name == "uniform":
        return UniformAllocator()
    if name == "pyramid":
        return PyramidAllocator(beta=config.pyramid_beta)
    if name == "adakv":
        return AdaKVAllocator(alpha=config.adakv_alpha)
    if name == "zigzag":
        return ZigZagAllocator(mass=config.zigzag_mass, min_fraction=config.zigzag_min_fraction,
                               measure=config.preset_option("zigzag_measure"))
    if name == "windowkv":
        return WindowKVAllocator(group_size=config.windowkv_group_size, beta=config.windowkv_beta)
    if name == "headkv":
        kind = "retrieval_reasoning" if config.policy == "headkv-r2" else "retrieval"
        scores = HeadScores.load(config.headkv_scores)
        return HeadKVAllocator(head_scores=scores.tensor(kind), beta=config.headkv_beta)
    raise ValueError(f"unknown allocator {name!r}")


def make_reducer(name: str, config: CompressionConfig) -> Reducer:
    if name == "topk":
        return TopKReducer()
    if name == "ems-merge":
        return EvictThenMergeReducer(merge_threshold=config.ems_merge_threshold, relevant_mass=config.ems_relevant_mass)
    if name == "windows":
        return WindowReducer(
            task=config.windowkv_task,
            retrieval_window=config.windowkv_retrieval_window,
            aggregation_window=config.windowkv_aggregation_window,
            aggregation_suffix=config.windowkv_aggregation_suffix,
            group_size=config.windowkv_group_size,
            whole_windows=config.windowkv_whole_windows,
            retrieval_share=config.windowkv_retrieval_share,
        )
    raise ValueError(f"unknown reducer {name!r}")


def build_policy(config: CompressionConfig | str | None = None, **options) -> Policy | None:
    """The :class:`Policy` for ``config`` (a config, a preset name, or None = the default config)
    with ``options`` applied; ``None`` for the ``none`` preset (keep the full cache)."""
    if config is None or isinstance(config, str):
        # an empty name is an error like any unknown one, not the default preset
        config = CompressionConfig.from_dict({**({"policy": config} if config is not None else {}), **options})
    elif options:
        config = config.replace(**options)
    if config.policy == "none":
        return None
    return Policy(
        scorer=make_scorer(config.scorer_name, config),
        allocator=make_allocator(config.allocator_name, config),
        reducer=make_reducer(config.reducer_name, config),
        budget=config.budget,
        window=config.effective_window,
        sink=config.effective_sink,
        window_in_budget=config.window_in_budget,
    )
