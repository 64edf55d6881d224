"""CompressionConfig: names, defaults, validation of every option, dict/JSON round trips."""
import json

import pytest

from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.config import LEGACY_KEYS, PRESET_ALIASES, PRESET_NAMES, PRESETS, CompressionConfig, canonical_preset
from vllm_kvcompress.policies.registry import ALLOCATORS, KINDS, REDUCERS, SCORERS


def test_every_preset_but_none_has_parts():
    assert set(PRESETS) == set(PRESET_NAMES) - {"none"}
    for parts in PRESETS.values():
        assert parts.scorer in SCORERS.names
        assert parts.allocator in ALLOCATORS.names
        assert parts.reducer in REDUCERS.names
        assert parts.source
        for kind, options in parts.options.items():  # a preset's options are options of its parts
            assert set(options) <= set(KINDS[kind].options(getattr(parts, kind)))


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
    assert config.effective_sink == 0 and config.window_in_budget
    assert all(config.part_options(kind) == {} for kind in KINDS)  # every part at its own defaults


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
    "options, kind, expected",
    [({"policy": "ems"}, "scorer", {}), ({"policy": "ems-tuned"}, "scorer", {"local_weight": 1.0}),
     ({"policy": "ems-tuned", "scorer_options": {"local_weight": 0.5}}, "scorer", {"local_weight": 0.5}),
     ({"policy": "ems-tuned", "ems_local_weight": 0.5}, "scorer", {"local_weight": 0.5}),  # a legacy key
     ({"policy": "ems-tuned", "scorer": "snapkv"}, "scorer", {}),  # the preset's options are its parts'
     ({"policy": "zigzag-lmbo"}, "allocator", {"measure": "lmbo"}), ({"policy": "zigzag"}, "allocator", {}),
     ({"policy": "zigzag-lmbo", "zigzag_measure": None}, "allocator", {"measure": "lmbo"}),  # None: the preset's
     ({"policy": "headkv-r2", "headkv_scores": "s.json"}, "allocator", {"heads": "retrieval_reasoning"}),
     ({"policy": "pyramidkv", "allocator_options": {"beta": 4.0}}, "allocator", {"beta": 4.0})],
)
def test_part_options(options, kind, expected):
    config = CompressionConfig.from_dict(options)
    assert config.part_options(kind) == expected
    assert CompressionConfig.from_dict(config.to_dict()).part_options(kind) == expected  # survives the trip


@pytest.mark.parametrize("key", sorted(LEGACY_KEYS))
def test_every_legacy_key_reaches_its_part(key):
    """Each flat key of older configs sets the option of the part it belongs to, where that part
    is in effect, and nothing where another one is (as the unused flat field did)."""
    for kind, part, option in LEGACY_KEYS[key]:
        part = part or "snapkv"  # pool_kernel: any pooling scorer
        default = KINDS[kind].options(part)[option]
        value = {"measure": "lmbo", "task": "retrieval"}.get(option)  # another valid value than the default
        if value is None:
            value = (not default if isinstance(default, bool) else default + 2 if isinstance(default, int)
                     else default + 1 if default > 1 else default / 2)
        config = CompressionConfig.from_dict({"policy": "none", kind: part, key: value, "headkv_scores": "s.json"})
        assert config.part_options(kind)[option] == value
        other = next(name for name in KINDS[kind].names if option not in KINDS[kind].options(name))
        ignored = CompressionConfig.from_dict({"policy": "none", kind: other, key: value, "headkv_scores": "s.json"})
        assert ignored.part_options(kind) == {}


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
        ("allocator", "fair", "valid allocators: uniform, pyramid, adakv, zigzag, windowkv, headkv"),
        ("reducer", "drop", "valid reducers: topk, ems-merge, windows"),
        ("window", 0, "window"),
        ("window", 2.0, "window"),
        ("window", True, "window"),
        ("sink", -1, "sink"),
        ("decode_slack", -1, "decode_slack"),
        ("window_in_budget", 1, "window_in_budget must be true or false"),
        ("scorer_options", [7], "scorer_options must be a JSON object"),
    ],
)
def test_bad_option_is_a_clear_error(option, value, words):
    with pytest.raises(ValueError, match=words):
        CompressionConfig(**{option: value})


@pytest.mark.parametrize(
    "options, words",
    [  # each part checks its own options and the error names the part; legacy keys reach the same checks
        ({"policy": "windowkv", "reducer_options": {"task": "summary"}}, "reducer 'windows': unknown windowkv task type"),
        ({"policy": "windowkv", "windowkv_task": "summary"}, "valid windowkv task types"),
        ({"policy": "snapkv", "scorer_options": {"pool_kernel": 4}}, "scorer 'snapkv': pool_kernel must be odd"),
        ({"policy": "snapkv", "pool_kernel": 0}, "pool_kernel"),
        ({"policy": "ems", "pool_kernel": 4}, "scorer 'ems': pool_kernel must be odd"),
        ({"policy": "pyramidkv", "pyramid_beta": 1.0}, "allocator 'pyramid': beta"),
        ({"policy": "pyramidkv", "allocator_options": {"beta": float("inf")}}, "beta"),
        ({"policy": "adakv", "adakv_alpha": 1.5}, "allocator 'adakv': alpha"),
        ({"policy": "adakv", "allocator_options": {"alpha": float("nan")}}, "alpha"),
        ({"policy": "adakv", "allocator_options": {"alpha": "0.2"}}, "alpha"),
        ({"policy": "zigzag", "zigzag_min_fraction": -0.1}, "min_fraction"),
        ({"policy": "zigzag", "allocator_options": {"mass": 0.0}}, "mass"),
        ({"policy": "zigzag", "allocator_options": {"measure": "lmbx"}}, "valid zigzag measures: lmba, lmbo, scores"),
        ({"policy": "headkv", "headkv_scores": "s.json", "headkv_beta": 1.0}, "allocator 'headkv': beta"),
        ({"policy": "headkv", "headkv_scores": "s.json", "allocator_options": {"heads": "r3"}}, "head score kind"),
        ({"policy": "ems", "ems_local_weight": 2}, "local_weight"),
        ({"policy": "ems", "ems_merge_threshold": 1.01}, "merge_threshold"),
        ({"policy": "ems", "reducer_options": {"relevant_mass": 0.0}}, "relevant_mass"),
        ({"policy": "windowkv", "windowkv_retrieval_window": 0}, "retrieval_window"),
        ({"policy": "windowkv", "windowkv_aggregation_window": -8}, "aggregation_window"),
        ({"policy": "windowkv", "allocator_options": {"group_size": 0}}, "allocator 'windowkv': group_size"),
        ({"policy": "windowkv", "windowkv_group_size": 0}, "group_size"),
        ({"policy": "windowkv", "windowkv_aggregation_suffix": 0}, "aggregation_suffix"),
        ({"policy": "windowkv", "windowkv_beta": 0.0}, "beta"),
        ({"policy": "windowkv", "windowkv_retrieval_share": 1.5}, "retrieval_share"),
        ({"policy": "windowkv", "windowkv_whole_windows": "yes"}, "whole_windows must be true or false"),
        ({"policy": "snapkv", "allocator_options": {"beta": 2.0}},
         "unknown option\\(s\\) \\['beta'\\] of allocator 'uniform'; its options: none"),
        ({"policy": "pyramidkv", "allocator_options": {"alpha": 0.1}}, "of allocator 'pyramid'; its options: beta"),
        ({"policy": "none", "scorer_options": {"pool_kernel": 3}}, "policy 'none' has no scorer"),
    ],
)
def test_bad_part_option_is_a_clear_error(options, words):
    with pytest.raises(ValueError, match=words):
        CompressionConfig.from_dict(options)


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
    config = CompressionConfig(policy="ems", budget=budget, sink=2, decode_slack=None,
                               scorer_options={"local_weight": 0.3}, reducer_options={"merge_threshold": 0.4})
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


def test_replace_adds_to_the_options_of_the_same_part_and_drops_another_parts():
    """Per-request overrides: options for the part in effect add to the server's; a request that
    puts another part in effect (here: another policy) leaves the server's options of it behind."""
    server = CompressionConfig(policy="ems", scorer_options={"local_weight": 0.3}, reducer_options={"block_values": 512})
    more = server.replace(scorer_options={"pool_kernel": 3})
    assert more.part_options("scorer") == {"local_weight": 0.3, "pool_kernel": 3}
    assert more.part_options("reducer") == {"block_values": 512}
    legacy = server.replace(ems_local_weight=0.8)
    assert legacy.part_options("scorer") == {"local_weight": 0.8}
    other = server.replace(policy="snapkv")
    assert other.part_options("scorer") == {} and other.part_options("reducer") == {}
