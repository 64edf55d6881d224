"""build_policy: every preset, aliases, part overrides and options reaching the parts."""
import pytest

from vllm_kvcompress.policies.allocation import (
    AdaKVAllocator,
    HeadKVAllocator,
    PyramidAllocator,
    UniformAllocator,
    WindowKVAllocator,
    ZigZagAllocator,
)
from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.config import PRESETS, CompressionConfig
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.policies.policy import Policy
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.policies.reduction import EvictThenMergeReducer, TopKReducer, WindowReducer
from vllm_kvcompress.policies.registry import KINDS
from vllm_kvcompress.policies.scoring import (EMSScorer, KeyDiffScorer, RecencyScorer, SnapKVScorer, SquaredAttentionScorer,
                                     WindowKVScorer)

SCORERS = {"recency": RecencyScorer, "snapkv": SnapKVScorer, "squared": SquaredAttentionScorer, "ems": EMSScorer,
           "windowkv": WindowKVScorer, "keydiff": KeyDiffScorer}
ALLOCATORS = {
    "uniform": UniformAllocator,
    "pyramid": PyramidAllocator,
    "adakv": AdaKVAllocator,
    "zigzag": ZigZagAllocator,
    "headkv": HeadKVAllocator,
    "windowkv": WindowKVAllocator,
}
REDUCERS = {"topk": TopKReducer, "ems-merge": EvictThenMergeReducer, "windows": WindowReducer}
RETRIEVAL = [[1.0, 2.0], [3.0, 4.0]]
REASONING = [[5.0, 6.0], [7.0, 8.0]]


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("head_scores") / "scores.json"
    HeadScores("tiny", RETRIEVAL, REASONING).save(path)
    return str(path)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_its_parts(preset, scores_file):
    policy = build_policy(preset, budget=64, window=8, headkv_scores=scores_file)
    parts = PRESETS[preset]
    assert isinstance(policy, Policy)
    assert type(policy.scorer) is SCORERS[parts.scorer]
    assert type(policy.allocator) is ALLOCATORS[parts.allocator]
    assert type(policy.reducer) is REDUCERS[parts.reducer]
    assert policy.budget == Budget(tokens=64) and policy.window == 8
    assert policy.sink == (4 if preset == "streamingllm" else 0)
    assert policy.window_in_budget  # every preset's budget counts every retained token


@pytest.mark.parametrize(
    "preset, window",
    [("snapkv", 32), ("ems", 32), ("windowkv", 32), ("zigzag", 32), ("headkv", 8), ("headkv-r2", 8)],
)
def test_preset_windows(preset, window, scores_file):
    # HeadKV's official code observes 8 queries, WindowKV keeps a 32-token suffix for QA prompts
    assert build_policy(preset, headkv_scores=scores_file).window == window
    assert build_policy(preset, headkv_scores=scores_file, window=16).window == 16  # an explicit window wins


@pytest.mark.parametrize(
    "preset, options, local_weight, needs_global",
    [("ems", {}, 0.5, True), ("ems-tuned", {}, 1.0, False), ("ems-tuned", {"ems_local_weight": 0.5}, 0.5, True),
     ("ems", {"ems_local_weight": 1.0}, 1.0, False)],
)
def test_ems_presets_local_weight(preset, options, local_weight, needs_global):
    # a preset's option default; an explicit option wins, even when it equals another preset's default
    policy = build_policy(preset, **options)
    assert policy.scorer.local_weight == local_weight and policy.needs_global_attention == needs_global


def test_ems_tuned_splits_budgets_uniformly_and_merges():
    policy = build_policy("ems-tuned")
    assert isinstance(policy.allocator, UniformAllocator) and isinstance(policy.reducer, EvictThenMergeReducer)


@pytest.mark.parametrize("preset, options, measure",
                         [("zigzag", {}, "lmba"), ("zigzag-lmbo", {}, "lmbo"), ("zigzag-lmbo", {"zigzag_measure": "lmba"}, "lmba"),
                          ("snapkv", {"allocator": "zigzag"}, "lmba")])
def test_zigzag_presets_measure(preset, options, measure):
    assert build_policy(preset, **options).allocator.measure == measure


@pytest.mark.parametrize("preset, options, group_size",
                         [("windowkv", {}, 8), ("windowkv-tuned", {}, 1), ("windowkv-tuned", {"windowkv_group_size": 4}, 4)])
def test_windowkv_presets_group_size(preset, options, group_size):
    # the tuned preset lets every layer choose its own windows and budget; an explicit option wins
    policy = build_policy(preset, **options)
    assert policy.allocator.group_size == group_size and policy.reducer.group_size == group_size


def test_window_in_budget_reaches_the_policy():
    assert not build_policy("windowkv", window_in_budget=False).window_in_budget

@pytest.mark.parametrize("preset, kind", [("headkv", RETRIEVAL), ("headkv-r2", REASONING)])
def test_headkv_picks_its_score_kind(preset, kind, scores_file):
    policy = build_policy(preset, headkv_scores=scores_file, headkv_beta=2.0)
    assert policy.allocator.head_scores.tolist() == kind
    assert policy.allocator.beta == 2.0
    assert build_policy(preset, headkv_scores=scores_file).allocator.beta == 1.5  # the official default


def test_headkv_allocator_under_another_preset_uses_retrieval(scores_file):
    policy = build_policy("ems", allocator="headkv", headkv_scores=scores_file)
    assert policy.allocator.head_scores.tolist() == RETRIEVAL


@pytest.mark.parametrize("name", ["none", "full", "NONE"])
def test_none_means_the_full_cache(name):
    assert build_policy(name) is None
    assert build_policy(CompressionConfig(policy=name)) is None


@pytest.mark.parametrize("alias", ["layer-uncertainty", "layer_uncertainty"])
def test_alias(alias):
    policy = build_policy(alias)
    assert isinstance(policy.allocator, ZigZagAllocator) and isinstance(policy.scorer, SnapKVScorer)


def test_default_is_snapkv():
    policy = build_policy()
    assert isinstance(policy.scorer, SnapKVScorer) and isinstance(policy.allocator, UniformAllocator)
    assert policy.budget == Budget(tokens=256) and policy.window == 32


@pytest.mark.parametrize(
    "override, attribute, cls",
    [
        ({"scorer": "ems"}, "scorer", EMSScorer),
        ({"scorer": "squared"}, "scorer", SquaredAttentionScorer),
        ({"allocator": "pyramid"}, "allocator", PyramidAllocator),
        ({"allocator": "adakv"}, "allocator", AdaKVAllocator),
        ({"reducer": "ems-merge"}, "reducer", EvictThenMergeReducer),
        ({"reducer": "windows"}, "reducer", WindowReducer),
    ],
)
def test_part_overrides(override, attribute, cls):
    policy = build_policy("streamingllm", **override)
    assert type(getattr(policy, attribute)) is cls
    # the parts not overridden stay the preset's
    untouched = {"scorer": RecencyScorer, "allocator": UniformAllocator, "reducer": TopKReducer}
    for name, default in untouched.items():
        if name != attribute:
            assert type(getattr(policy, name)) is default


@pytest.mark.parametrize("options", [
    {"scorer_options": {"pool_kernel": 3, "local_weight": 0.3}, "allocator_options": {"alpha": 0.5},
     "reducer_options": {"merge_threshold": 0.7}},
    {"pool_kernel": 3, "adakv_alpha": 0.5, "ems_local_weight": 0.3, "ems_merge_threshold": 0.7},  # legacy keys
])
def test_options_reach_the_parts(options):
    config = CompressionConfig.from_dict({"policy": "ems", "budget": 0.2, "window": 4, "sink": 2, **options})
    policy = build_policy(config)
    assert policy.scorer == EMSScorer(local_weight=0.3, pool_kernel=3)
    assert policy.allocator == AdaKVAllocator(alpha=0.5)
    assert policy.reducer == EvictThenMergeReducer(merge_threshold=0.7)
    assert (policy.budget, policy.window, policy.sink) == (Budget(fraction=0.2), 4, 2)
    assert policy.needs_global_attention


@pytest.mark.parametrize(
    "preset, options, expected",
    [
        ("snapkv", {"pool_kernel": 5}, ("scorer", SnapKVScorer(pool_kernel=5))),
        ("pyramidkv", {"pyramid_beta": 4.0}, ("allocator", PyramidAllocator(beta=4.0))),
        ("zigzag", {"zigzag_mass": 0.5, "zigzag_min_fraction": 0.1},
         ("allocator", ZigZagAllocator(mass=0.5, min_fraction=0.1, measure="lmba"))),
        ("zigzag", {"zigzag_measure": "lmbo"}, ("allocator", ZigZagAllocator(measure="lmbo"))),
        ("windowkv", {"windowkv_task": "retrieval", "windowkv_retrieval_window": 4, "windowkv_aggregation_window": 16,
                      "windowkv_group_size": 2, "windowkv_aggregation_suffix": 12, "windowkv_whole_windows": False,
                      "windowkv_retrieval_share": 0.3},
         ("reducer", WindowReducer(task="retrieval", retrieval_window=4, aggregation_window=16, aggregation_suffix=12,
                                   group_size=2, whole_windows=False, retrieval_share=0.3))),
        ("windowkv", {"windowkv_group_size": 4, "windowkv_beta": 7.0},
         ("allocator", WindowKVAllocator(group_size=4, beta=7.0))),
        ("windowkv", {}, ("scorer", WindowKVScorer())),
        ("ems", {"ems_merge_threshold": 0.2, "ems_relevant_mass": 0.5},
         ("reducer", EvictThenMergeReducer(merge_threshold=0.2, relevant_mass=0.5))),
    ],
)
def test_preset_options(preset, options, expected):
    attribute, part = expected
    assert getattr(build_policy(preset, **options), attribute) == part


def test_options_override_a_given_config():
    base = CompressionConfig(policy="snapkv", budget=128)
    policy = build_policy(base, budget=0.5, allocator="pyramid")
    assert policy.budget == Budget(fraction=0.5) and isinstance(policy.allocator, PyramidAllocator)
    assert base.budget == Budget(tokens=128)


@pytest.mark.parametrize("name", ["h2o", "", " "])
def test_unknown_preset_lists_valid_names(name):
    with pytest.raises(ValueError, match="valid policies: none, streamingllm, snapkv"):
        build_policy(name)


@pytest.mark.parametrize("preset", ["headkv", "headkv-r2"])
def test_headkv_without_scores(preset):
    with pytest.raises(ValueError, match="needs head scores"):
        build_policy(preset)


def test_headkv_with_a_missing_scores_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_policy("headkv", headkv_scores=str(tmp_path / "missing.json"))


def test_headkv_scores_for_another_model_fail_at_compress(scores_file, make_layers):
    # the file holds 2 layers x 2 KV heads; this request has 3 layers x 2 heads
    policy = build_policy("headkv", headkv_scores=scores_file, budget=8, window=2)
    layers = make_layers(3, num_kv_heads=2, group=1, seq_len=16, window=2)
    with pytest.raises(ValueError, match="calibrate"):
        policy.compress(layers)
    fitting = make_layers(2, num_kv_heads=2, group=1, seq_len=16, window=2)
    assert sum(int(r.lengths.sum()) for r in policy.compress(fitting)) == 8 * 2 * 2


@pytest.mark.parametrize("kind, known", [("scorer", SCORERS), ("allocator", ALLOCATORS), ("reducer", REDUCERS)])
def test_the_registry_holds_every_part(kind, known):
    assert {name: KINDS[kind].part(name) for name in KINDS[kind].names} == known


def test_a_registered_part_is_usable_by_name_with_its_options():
    """A part is one class and its registration: the config takes its name and options, and
    build_policy builds it (KeyDiff, added after the registry)."""
    policy = build_policy("snapkv", scorer="keydiff", budget=16)
    assert policy.scorer == KeyDiffScorer() and policy.scorer.reads_keys and not policy.scores_from_pages
    assert isinstance(policy.allocator, UniformAllocator) and isinstance(policy.reducer, TopKReducer)
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['pool_kernel'\\] of scorer 'keydiff'"):
        build_policy("snapkv", scorer="keydiff", scorer_options={"pool_kernel": 3})


def test_the_readme_table_lists_every_part_and_its_options():
    """The README's table of parts is the registry's: every name and every option, with its default."""
    from pathlib import Path

    rows = {(line.split("|")[1].strip(), line.split("|")[2].strip().strip("`")): line.split("|")[3]
            for line in (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
            if line.startswith("| scorer") or line.startswith("| allocator") or line.startswith("| reducer")}
    for kind, registry in KINDS.items():
        for name in registry.names:
            assert (kind, name) in rows, f"README lacks the {kind} {name}"
            for option, default in registry.options(name).items():
                shown = str(default).lower() if isinstance(default, bool) else str(default)
                assert f"`{option}` ({shown}" in rows[kind, name] or f"`{option}` (`{shown}`" in rows[kind, name], (
                    kind, name, option)
