"""CompressionConfig: names, defaults, validation of every option, dict/JSON round trips."""
import json

import pytest

from vllm_kvcompress.budget import Budget
from vllm_kvcompress.config import (
    ALLOCATOR_NAMES,
    PRESET_ALIASES,
    PRESET_NAMES,
    PRESETS,
    REDUCER_NAMES,
    SCORER_NAMES,
    CompressionConfig,
    canonical_preset,
)


def test_every_preset_but_none_has_parts():
    assert set(PRESETS) == set(PRESET_NAMES) - {"none"}
    for parts in PRESETS.values():
        assert parts.scorer in SCORER_NAMES
        assert parts.allocator in ALLOCATOR_NAMES
        assert parts.reducer in REDUCER_NAMES
        assert parts.source


@pytest.mark.parametrize(
    "typed, canonical",
    [
        ("snapkv", "snapkv"),
        ("SnapKV", "snapkv"),
        ("  ems ", "ems"),
        ("layer-uncertainty", "zigzag"),
        ("layer_uncertainty", "zigzag"),
        ("Layer-Uncertainty", "zigzag"),
        ("full", "none"),
        ("headkv_r2", "headkv-r2"),
    ],
)
def test_canonical_preset(typed, canonical):
    assert canonical_preset(typed) == canonical


@pytest.mark.parametrize("name", ["h2o", "", "snap kv", "headkv-r3", None, 7])
def test_unknown_preset_lists_valid_names(name):
    with pytest.raises(ValueError) as error:
        CompressionConfig(policy=name)
    message = str(error.value)
    assert "unknown kv-compression policy" in message
    for valid in PRESET_NAMES + tuple(PRESET_ALIASES):
        assert valid in message


def test_defaults():
    config = CompressionConfig()
    assert config.policy == "snapkv"
    assert config.budget == Budget(tokens=256)
    assert (config.scorer_name, config.allocator_name, config.reducer_name) == ("snapkv", "uniform", "topk")
    assert config.window is None and config.effective_window == 32
    assert config.pool_kernel == 7 and config.effective_sink == 0 and config.window_in_budget


@pytest.mark.parametrize(
    "window, policy, expected",
    [(None, "snapkv", 32), (None, "windowkv", 32), (None, "headkv", 8), (None, "headkv-r2", 8), (16, "headkv", 16),
     (None, "none", 32)],
)
def test_effective_window(window, policy, expected):
    config = CompressionConfig(policy=policy, window=window, headkv_scores="scores.json")
    assert config.effective_window == expected


@pytest.mark.parametrize("policy", sorted(PRESETS))
def test_parts_follow_the_preset(policy):
    config = CompressionConfig(policy=policy, headkv_scores="scores.json")
    parts = PRESETS[policy]
    assert (config.scorer_name, config.allocator_name, config.reducer_name) == (
        parts.scorer,
        parts.allocator,
        parts.reducer,
    )


def test_none_has_no_parts():
    config = CompressionConfig(policy="none")
    assert (config.scorer_name, config.allocator_name, config.reducer_name) == (None, None, None)


def test_overrides_replace_the_preset_parts():
    config = CompressionConfig(policy="ems", scorer="squared", allocator="pyramid", reducer="windows")
    assert (config.scorer_name, config.allocator_name, config.reducer_name) == ("squared", "pyramid", "windows")


@pytest.mark.parametrize(
    "sink, policy, expected",
    [(None, "streamingllm", 4), (None, "snapkv", 0), (2, "streamingllm", 2), (0, "streamingllm", 0), (3, "ems", 3)],
)
def test_effective_sink(sink, policy, expected):
    assert CompressionConfig(policy=policy, sink=sink).effective_sink == expected


@pytest.mark.parametrize(
    "policy, options, name, expected",
    [("ems", {}, "ems_local_weight", 0.5), ("ems-tuned", {}, "ems_local_weight", 1.0),
     ("ems-tuned", {"ems_local_weight": 0.5}, "ems_local_weight", 0.5), ("none", {}, "zigzag_measure", "lmba"),
     ("zigzag-lmbo", {}, "zigzag_measure", "lmbo"), ("snapkv", {}, "zigzag_measure", "lmba")],
)
def test_preset_option(policy, options, name, expected):
    config = CompressionConfig(policy=policy, **options)
    assert config.preset_option(name) == expected
    assert CompressionConfig.from_dict(config.to_dict()).preset_option(name) == expected  # None survives the trip


@pytest.mark.parametrize("budget, expected", [(128, Budget(tokens=128)), ("0.2", Budget(fraction=0.2)),
                                              (0.5, Budget(fraction=0.5)), (Budget(tokens=9), Budget(tokens=9))])
def test_budget_is_parsed(budget, expected):
    assert CompressionConfig(budget=budget).budget == expected


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("budget", 0, "budget"),
        ("budget", -3, "budget"),
        ("budget", float("nan"), "budget"),
        ("budget", float("inf"), "budget"),
        ("budget", 1.5, "budget"),
        ("budget", True, "budget"),
        ("budget", "most of it", "budget"),
        ("scorer", "h2o", "valid scorers: recency, snapkv, squared, ems"),
        ("allocator", "fair", "valid allocators: uniform, pyramid, adakv, zigzag, headkv"),
        ("reducer", "drop", "valid reducers: topk, ems-merge, windows"),
        ("windowkv_task", "summary", "valid windowkv task types"),
        ("window", 0, "window"),
        ("window", 2.0, "window"),
        ("window", True, "window"),
        ("sink", -1, "sink"),
        ("pool_kernel", 4, "odd"),
        ("pool_kernel", 0, "pool_kernel"),
        ("decode_slack", -1, "decode_slack"),
        ("pyramid_beta", 1.0, "pyramid_beta"),
        ("pyramid_beta", float("inf"), "pyramid_beta"),
        ("adakv_alpha", 1.5, "adakv_alpha"),
        ("adakv_alpha", float("nan"), "adakv_alpha"),
        ("adakv_alpha", "0.2", "adakv_alpha"),
        ("zigzag_min_fraction", -0.1, "zigzag_min_fraction"),
        ("zigzag_mass", 0.0, "zigzag_mass"),
        ("headkv_beta", 1.0, "headkv_beta"),
        ("ems_local_weight", 2, "ems_local_weight"),
        ("ems_merge_threshold", 1.01, "ems_merge_threshold"),
        ("windowkv_retrieval_window", 0, "windowkv_retrieval_window"),
        ("windowkv_aggregation_window", -8, "windowkv_aggregation_window"),
        ("windowkv_group_size", 0, "windowkv_group_size"),
        ("windowkv_aggregation_suffix", 0, "windowkv_aggregation_suffix"),
        ("windowkv_beta", 0.0, "windowkv_beta"),
        ("windowkv_retrieval_share", 1.5, "windowkv_retrieval_share"),
        ("windowkv_whole_windows", "yes", "windowkv_whole_windows must be true or false"),
        ("window_in_budget", 1, "window_in_budget must be true or false"),
        ("ems_relevant_mass", 0.0, "ems_relevant_mass"),
        ("zigzag_measure", "lmbx", "valid zigzag measures: lmba, lmbo, scores"),
    ],
)
def test_bad_option_is_a_clear_error(option, value, words):
    with pytest.raises(ValueError, match=words):
        CompressionConfig(**{option: value})


@pytest.mark.parametrize("options", [{"policy": "headkv"}, {"policy": "headkv-r2"}, {"allocator": "headkv"},
                                     {"policy": "headkv", "headkv_scores": ""}])
def test_headkv_needs_scores(options):
    with pytest.raises(ValueError, match="headkv_scores"):
        CompressionConfig(**options)


def test_from_dict_unknown_options_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        CompressionConfig.from_dict({"policy": "ems", "bugdet": 64, "windw": 8})
    message = str(error.value)
    assert "'bugdet'" in message and "'windw'" in message
    for name in CompressionConfig.field_names():
        assert name in message


@pytest.mark.parametrize("options", [["ems"], "ems", None, 3])
def test_from_dict_needs_an_object(options):
    with pytest.raises(ValueError, match="JSON object"):
        CompressionConfig.from_dict(options)


def test_from_json():
    config = CompressionConfig.from_json('{"policy": "layer-uncertainty", "budget": 0.25, "window": 16}')
    assert config.policy == "zigzag" and config.budget == Budget(fraction=0.25) and config.window == 16


@pytest.mark.parametrize("text", ['{"policy": "ems",}', "policy=ems", "", '{"budget": 64'])
def test_from_json_malformed(text):
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionConfig.from_json(text)


def test_from_json_unknown_option():
    with pytest.raises(ValueError, match="valid options"):
        CompressionConfig.from_json('{"policy": "ems", "alpha": 0.3}')


@pytest.mark.parametrize("budget", [64, 0.5, 1.0, 1])
def test_dict_and_json_round_trip(budget):
    config = CompressionConfig(policy="ems", budget=budget, sink=2, decode_slack=None, ems_local_weight=0.3)
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert CompressionConfig.from_json(json.dumps(config.to_dict())) == config


def test_replace_validates_and_keeps_the_rest():
    config = CompressionConfig(policy="pyramidkv", budget=128, window=8)
    changed = config.replace(budget=0.3)
    assert changed.budget == Budget(fraction=0.3)
    assert (changed.policy, changed.window) == ("pyramidkv", 8)
    assert config.budget == Budget(tokens=128)  # the original is untouched
    with pytest.raises(ValueError, match="valid options"):
        config.replace(budgett=3)
    with pytest.raises(ValueError, match="budget"):
        config.replace(budget=-1)
