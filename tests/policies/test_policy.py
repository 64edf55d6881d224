"""Policy invariants, property-tested over parts, shapes, GQA ratios, budgets and dtypes.

Whatever scorer, allocator and reducer are combined, a compressed request must:
hold exactly its allocated budget per head (the total budget overall), keep the observation
window and sinks of every head, hold only finite K/V, keep plain rows unchanged (eviction) or
preserve the score-weighted mass of each merged class (EMS), and be deterministic.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.registry import ALLOCATORS, REDUCERS, SCORERS
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.policies.reduction import EvictThenMergeReducer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MAX_LAYERS = 3
MAX_KV_HEADS = 3
# relative rounding of one value stored in each dtype (merged rows are computed in float32, then cast)
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module")
def scores_files(tmp_path_factory) -> dict[tuple[int, int], str]:
    """A HeadKV scores file for every (num_layers, num_kv_heads) the tests draw."""
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path_factory.mktemp("head_scores")
    files = {}
    for shape in itertools.product(range(1, MAX_LAYERS + 1), range(1, MAX_KV_HEADS + 1)):
        retrieval = torch.rand(shape, generator=gen)
        retrieval[0, 0] = 0.0  # a head nobody calibrated as important
        path = folder / f"{shape[0]}x{shape[1]}.json"
        HeadScores("random", retrieval.tolist(), torch.rand(shape, generator=gen).tolist()).save(path)
        files[shape] = str(path)
    return files


budget_values = st.one_of(st.integers(1, 60), st.floats(0.01, 1.0, allow_nan=False))


POOL = st.sampled_from([1, 3, 7])
# the options drawn for each part (the others stay at the part's defaults)
PART_OPTIONS = {
    ("scorer", "snapkv"): {"pool_kernel": POOL},
    ("scorer", "squared"): {"pool_kernel": POOL},
    ("scorer", "ems"): {"pool_kernel": POOL, "local_weight": st.sampled_from([0.0, 0.5, 1.0])},
    ("allocator", "pyramid"): {"beta": st.sampled_from([1.5, 20.0])},
    ("allocator", "adakv"): {"alpha": st.sampled_from([0.0, 0.2, 1.0])},
    ("allocator", "zigzag"): {"mass": st.sampled_from([0.5, 0.9, 1.0]), "min_fraction": st.sampled_from([0.0, 0.2, 1.0]),
                              "measure": st.sampled_from(["lmba", "lmbo", "scores"])},
    ("allocator", "windowkv"): {"group_size": st.integers(1, 3), "beta": st.sampled_from([1.0, 14.0])},
    ("reducer", "ems-merge"): {"merge_threshold": st.sampled_from([-1.0, 0.0, 0.5, 1.0]),
                               "relevant_mass": st.sampled_from([0.5, 0.9, 1.0])},
    ("reducer", "windows"): {"task": st.sampled_from(["auto", "retrieval", "aggregation"]),
                             "retrieval_window": st.integers(1, 4), "aggregation_window": st.integers(2, 12),
                             "aggregation_suffix": st.integers(1, 8), "group_size": st.integers(1, 3),
                             "whole_windows": st.booleans()},
}


@st.composite
def configs(draw) -> CompressionConfig:
    parts = {"scorer": draw(st.sampled_from(SCORERS.names)), "allocator": draw(st.sampled_from(ALLOCATORS.names)),
             "reducer": draw(st.sampled_from(REDUCERS.names))}
    options = {f"{kind}_options": {option: draw(values) for option, values in PART_OPTIONS.get((kind, name), {}).items()}
               for kind, name in parts.items()}
    return CompressionConfig(
        policy="snapkv",
        **parts,
        **options,
        budget=draw(budget_values),
        window=draw(st.integers(1, 8)),
        sink=draw(st.integers(0, 4)),
        headkv_scores="<drawn per shape>",
        window_in_budget=draw(st.booleans()),
    )


def check_merge_preserves_mass(reducer, obs, scores, retained, protected, tolerance):
    """For every retained slot c of every head: weight_sum * merged_row == sum of weight * member
    rows, and the merged row lies within its members' range (a convex combination)."""
    classes = reducer.classes(obs, retained.keep_idx, protected, scores)
    weight = scores.double().clamp(min=0)
    for h in range(obs.num_kv_heads):
        for slot in range(int(retained.lengths[h])):
            members = classes[h] == slot + 1
            assert bool(members[retained.keep_idx[h, slot]])  # the slot's own token is a member
            if protected[retained.keep_idx[h, slot]]:  # window and sinks stay exact: no merge target
                assert int(members.sum()) == 1
            w = weight[h, members]
            for source, merged in ((obs.keys, retained.keys), (obs.values, retained.values)):
                rows = source[h, members].double()
                row = merged[h, slot].double()
                scale = rows.abs().max() + 1e-30
                lhs = w.sum() * row
                rhs = (w[:, None] * rows).sum(0)
                assert bool(((lhs - rhs).abs() <= 2 * tolerance * w.sum() * scale + 1e-6 * scale).all())
                slack = 2 * tolerance * scale + 1e-6
                assert bool((row >= rows.min(0).values - slack).all() and (row <= rows.max(0).values + slack).all())


@settings(max_examples=400, deadline=None)
@given(
    config=configs(),
    num_layers=st.integers(1, MAX_LAYERS),
    num_kv_heads=st.integers(1, MAX_KV_HEADS),
    group=st.sampled_from([1, 2, 3, 4]),
    head_dim=st.sampled_from([2, 4, 8]),
    seq_len=st.integers(1, 48),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_policy_invariants(
    scores_files, make_layers, config, num_layers, num_kv_heads, group, head_dim, seq_len, dtype, seed
):
    config = config.replace(headkv_scores=scores_files[num_layers, num_kv_heads])
    policy = build_policy(config)
    layers = make_layers(
        num_layers, num_kv_heads, group, seq_len, config.window, head_dim, dtype, seed,
        with_global=policy.needs_global_attention,
    )
    resolved, _ = policy.for_request(layers)  # WindowKV: the request's suffix by its task type
    floor = resolved.floor(seq_len)
    per_head = resolved.per_head(seq_len)
    budgets, scores, protected = policy.budgets(layers)
    retained = policy.compress(layers)

    # allocation: exact total, each head within [floor, seq_len]
    assert budgets.shape == (num_layers, num_kv_heads)
    assert int(budgets.sum()) == per_head * num_layers * num_kv_heads
    assert int(budgets.min()) >= floor and int(budgets.max()) <= seq_len
    # retained lengths: the allocated budget per head (whole windows: at most, by less than one
    # window), never above what the user asked for unless the window and sinks alone need more
    # (or, with window_in_budget off, never above it plus the window and sinks)
    asked = policy.budget.tokens if policy.budget.tokens is not None else round(policy.budget.fraction * seq_len)
    lengths = torch.stack([r.lengths for r in retained])
    total = sum(int(r.lengths.sum()) for r in retained)
    if resolved.reducer.fills_budgets:
        assert torch.equal(lengths, budgets)
        assert total == per_head * num_layers * num_kv_heads
    else:
        size, _ = resolved.reducer.window_shape(resolved.reducer.task)
        assert bool((lengths <= budgets).all() and (lengths > budgets - size).all())
    allowed = max(asked, floor) if policy.window_in_budget else min(seq_len, asked + floor)
    assert total <= allowed * num_layers * num_kv_heads

    protected_idx = protected.nonzero().flatten()
    assert protected_idx.numel() == floor  # window and sinks, never more than the context
    tolerance = DTYPE_TOLERANCE[dtype]
    for obs, layer_scores, r in zip(layers, scores, retained):
        assert r.keys.dtype == r.values.dtype == dtype
        assert r.keys.shape == r.values.shape == (num_kv_heads, int(r.lengths.max()), head_dim)
        assert bool(torch.isfinite(r.keys).all() and torch.isfinite(r.values).all())
        for h in range(num_kv_heads):
            n = int(r.lengths[h])
            kept = r.keep_idx[h, :n]
            assert bool((kept[1:] > kept[:-1]).all()) and bool((kept >= 0).all() and (kept < seq_len).all())
            assert bool((r.keep_idx[h, n:] == -1).all())
            assert bool(torch.isin(protected_idx, kept).all())  # window + sinks of every head
            assert not r.keys[h, n:].any() and not r.values[h, n:].any()  # padding rows are zero
            if not isinstance(policy.reducer, EvictThenMergeReducer):  # eviction keeps rows as they are
                assert torch.equal(r.keys[h, :n], obs.keys[h, kept])
                assert torch.equal(r.values[h, :n], obs.values[h, kept])
        if isinstance(policy.reducer, EvictThenMergeReducer):
            check_merge_preserves_mass(policy.reducer, obs, layer_scores, r, protected, tolerance)

    again = policy.compress(layers)
    for r, s in zip(retained, again):
        assert torch.equal(r.keep_idx, s.keep_idx) and torch.equal(r.lengths, s.lengths)
        assert torch.equal(r.keys, s.keys) and torch.equal(r.values, s.values)


def test_streamingllm_keeps_sinks_and_the_most_recent_tokens(make_layers):
    policy = build_policy("streamingllm", budget=10, window=2)
    layers = make_layers(2, num_kv_heads=2, group=2, seq_len=20, window=2)
    for retained in policy.compress(layers):
        assert retained.keep_idx.tolist() == [[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]] * 2


@pytest.mark.parametrize("budget, per_head", [(0.5, 10), (0.05, 3), (100, 20)])
def test_budget_fraction_and_floor(make_layers, budget, per_head):
    # 20 tokens, window 3: a fraction counts from the prompt, lifted to the window, capped at 20
    policy = build_policy("snapkv", budget=budget, window=3)
    layers = make_layers(2, num_kv_heads=3, group=1, seq_len=20, window=3)
    for retained in policy.compress(layers):
        assert retained.lengths.tolist() == [per_head] * 3


def test_layers_of_different_lengths_are_rejected(make_layers):
    short = make_layers(1, num_kv_heads=1, group=1, seq_len=10, window=2)
    long = make_layers(1, num_kv_heads=1, group=1, seq_len=12, window=2)
    with pytest.raises(ValueError, match="same number of tokens"):
        build_policy("snapkv", budget=4, window=2).compress(short + long)


def test_budget_is_the_policy_budget():
    assert build_policy("snapkv", budget="0.3").budget == Budget(fraction=0.3)


@pytest.mark.parametrize("reducer", [name for name in REDUCERS.names if name != "windows"])
@pytest.mark.parametrize("scorer", SCORERS.names)
@pytest.mark.parametrize("sink", [0, 2])
def test_recompressing_heads_of_different_lengths_together_equals_one_at_a_time(scorer, reducer, sink):
    """Heads of different lengths in one call (PyramidKV, Ada-KV, HeadKV and ZigZag budgets make
    them): each head right-aligned, poisoned padding before its rows, comes out as if recompressed
    alone at its own length."""
    gen = torch.Generator().manual_seed(2)
    group, window, head_dim = 2, 4, 16
    lengths = torch.tensor([40, 23, 31, 40, 17])
    budgets = torch.tensor([9, 14, 20, 12, 16])
    num_heads, width = len(lengths), int(lengths.max())
    policy = build_policy(CompressionConfig(policy="snapkv", scorer=scorer, reducer=reducer, budget=12,
                                            window=window, sink=sink))
    queries = torch.randn(num_heads * group, window, head_dim, generator=gen)
    keys, values = torch.randn(2, num_heads, width, head_dim, generator=gen)
    padding = torch.arange(width)[None, :] < (width - lengths)[:, None]
    keys[padding], values[padding] = 1e4, -1e4  # poison: must not reach any kept row
    together_keys, together_values = policy.recompress_heads(queries, keys, values, budgets, lengths)
    assert together_keys.shape == (num_heads, int(budgets.max()), head_dim)
    for h in range(num_heads):
        n, b = int(lengths[h]), int(budgets[h])
        alone_keys, alone_values = policy.recompress_head(queries[h * group:(h + 1) * group], keys[h, width - n:],
                                                          values[h, width - n:], b)
        torch.testing.assert_close(together_keys[h, :b], alone_keys)
        torch.testing.assert_close(together_values[h, :b], alone_values)
        assert not together_keys[h, b:].any() and not together_values[h, b:].any()


def test_window_reducer_recompresses_equal_lengths_only():
    policy = build_policy(CompressionConfig(policy="windowkv", budget=12, window=4))
    assert not policy.reducer.pads_heads
    q, k = torch.randn(2, 4, 16), torch.randn(2, 1, 30, 16)
    with pytest.raises(ValueError, match="equal lengths"):
        policy.recompress_heads(q, k[0], k[1], torch.tensor([8]), torch.tensor([20]))


@pytest.mark.parametrize("reducer", REDUCERS.names)
@pytest.mark.parametrize("scorer", SCORERS.names)
def test_recompressing_heads_together_equals_one_at_a_time(scorer, reducer):
    """Decode-time recompression batches the heads of a layer that hold the same number of rows;
    each head must come out as if recompressed alone (WindowReducer shares rankings across heads,
    so it is run per head)."""
    gen = torch.Generator().manual_seed(1)
    num_heads, group, rows, window, head_dim = 3, 2, 40, 4, 16
    policy = build_policy(CompressionConfig(policy="snapkv", scorer=scorer, reducer=reducer, budget=12,
                                            window=window, sink=2))
    queries = torch.randn(num_heads * group, window, head_dim, generator=gen)
    keys, values = torch.randn(2, num_heads, rows, head_dim, generator=gen)
    budgets = torch.tensor([9, 14, 20])
    together_keys, together_values = policy.recompress_heads(queries, keys, values, budgets)
    assert together_keys.shape == together_values.shape == (num_heads, int(budgets.max()), head_dim)
    for h in range(num_heads):
        b = int(budgets[h])
        alone_keys, alone_values = policy.recompress_head(queries[h * group:(h + 1) * group], keys[h], values[h], b)
        assert alone_keys.shape == (b, head_dim)
        torch.testing.assert_close(together_keys[h, :b], alone_keys)
        torch.testing.assert_close(together_values[h, :b], alone_values)
        assert not together_keys[h, b:].any() and not together_values[h, b:].any()  # padding rows are zero


def test_windowkv_aggregation_prompt_keeps_a_16_token_suffix(make_layers):
    # the policy observes 32 queries (the QA suffix), an aggregation prompt keeps only the last 16
    # whole; budgets then count that suffix (window_in_budget) or come on top of it
    layers = make_layers(2, num_kv_heads=2, group=3, seq_len=100, window=32)
    for in_budget, per_head in ((True, 40), (False, 56)):
        policy = build_policy("windowkv", budget=40, windowkv_task="aggregation", window_in_budget=in_budget)
        resolved, seen = policy.for_request(layers)
        assert resolved.window == 16 and resolved.floor(100) == 16 and resolved.per_head(100) == per_head
        assert all(o.window_queries.shape[1] == 16 for o in seen)
        budgets, _, protected = policy.budgets(layers)
        assert protected.nonzero().flatten().tolist() == list(range(84, 100))
        assert int(budgets.sum()) == per_head * 2 * 2
        for retained in policy.compress(layers):
            assert bool(torch.isin(torch.arange(84, 100), retained.keep_idx).all())
            assert bool((retained.lengths <= per_head).all() and (retained.lengths > per_head - 8).all())


def test_windowkv_ranks_windows_by_query_head_rows(make_layers):
    """The preset's reducer sees one row per query head (not the group sums the allocator sees)."""
    layers = make_layers(2, num_kv_heads=2, group=3, seq_len=90, window=32, seed=4)
    policy = build_policy("windowkv", budget=48, windowkv_task="retrieval", windowkv_group_size=1)
    budgets, kv_scores, protected = policy.budgets(layers)
    rows = [policy.scorer.query_head_scores(o) for o in layers]
    assert rows[0].shape == (6, 90) and kv_scores[0].shape == (2, 90)
    expected = policy.reducer.reduce(layers, rows, budgets, protected)
    for got, want in zip(policy.compress(layers), expected):
        assert torch.equal(got.keep_idx, want.keep_idx)


def test_windowkv_keeps_everything_when_the_prefix_fits_its_budget(make_layers):
    # 64 tokens, suffix 32 on top of a budget of 32: the prefix fits, nothing is compressed
    layers = make_layers(3, num_kv_heads=1, group=2, seq_len=64, window=32)
    policy = build_policy("windowkv", budget=32, windowkv_task="retrieval", window_in_budget=False)
    for retained in policy.compress(layers):
        assert retained.keep_idx.tolist() == [list(range(64))]
