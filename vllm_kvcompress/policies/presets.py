"""Named presets: which scorer, allocator and reducer each policy a user types stands for.

    build_policy("ems", budget=128)                 # keyword options
    build_policy(CompressionConfig(policy="snapkv", allocator="adakv"))   # parts overridden

``none`` builds no policy (``None``): the full cache. Every other preset is one choice of the three
parts (:data:`~vllm_kvcompress.policies.config.PRESETS`), built from the registry
(:mod:`~vllm_kvcompress.policies.registry`) with their options; ``scorer=`` / ``allocator=`` / ``reducer=``
in the config replace the preset's choice, so users combine parts freely (e.g. EMS scores with
HeadKV budgets).
"""
from __future__ import annotations

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.policies.policy import Policy
from vllm_kvcompress.policies.registry import KINDS

# how a part's resource fields are read from the config's files
_READERS = {"headkv_scores": lambda path, part: HeadScores.load(path).tensor(part["heads"])}


def build_part(kind: str, config: CompressionConfig):
    """The config's ``kind`` part (``"scorer"``, ``"allocator"`` or ``"reducer"``) with its options,
    and the fields it reads from the config's files (:meth:`~vllm_kvcompress.policies.registry.Registry.resources`)."""
    registry, name = KINDS[kind], getattr(config, f"{kind}_name")
    given = config.part_options(kind)
    options = {**registry.options(name), **given}  # what the readers see: the defaults filled in
    resources = {part_field: _READERS[source](getattr(config, source), options)
                 for part_field, source in registry.resources(name).items()}
    return registry.build(name, given, **resources)


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
        scorer=build_part("scorer", config),
        allocator=build_part("allocator", config),
        reducer=build_part("reducer", config),
        budget=config.budget,
        window=config.effective_window,
        sink=config.effective_sink,
        window_in_budget=config.window_in_budget,
    )
