"""Scorers on cases small enough to compute by hand, plus what every scorer promises.

Keys and queries use head_dim 4 (scale 1/2) and point along the first axis, so a query [a, 0, 0, 0]
and a key [b, 0, 0, 0] have the logit a * b / 2.
"""
import dataclasses
import math

import pytest
import torch

from vllm_kvcompress.policies.observation import LayerObservation, causal_column_mass
from vllm_kvcompress.paged.reference import max_pool_scores
from vllm_kvcompress.policies.scoring import (EMSScorer, KeyDiffScorer, RecencyScorer, SnapKVScorer, SquaredAttentionScorer,
                                     WindowKVScorer)

HEAD_DIM = 4


def along_axis(*xs: float) -> torch.Tensor:
    """[len(xs), HEAD_DIM] rows (x, 0, 0, 0)."""
    rows = torch.zeros(len(xs), HEAD_DIM)
    rows[:, 0] = torch.tensor(xs)
    return rows


def softmax(*logits: float) -> list[float]:
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def observation(queries: list[list[float]], keys: list[list[float]], global_attention=None) -> LayerObservation:
    """queries[q_head] = window query coordinates; keys[kv_head] = key coordinates (values are unused)."""
    q = torch.stack([along_axis(*row) for row in queries])
    k = torch.stack([along_axis(*row) for row in keys])
    return LayerObservation(q, k, torch.randn_like(k), global_attention=global_attention)


# One window query (2, 0, 0, 0) over keys 0, 1, 2 along the axis: logits 0, 1, 2.
ONE_QUERY = observation([[2.0]], [[0.0, 1.0, 2.0]])
P = softmax(0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "scorer, expected",
    [
        (SnapKVScorer(pool_kernel=1, exclude_window=False), [P]),
        (SnapKVScorer(pool_kernel=3, exclude_window=False), [[max(P[0], P[1]), max(P), max(P[1], P[2])]]),
        (SquaredAttentionScorer(exclude_window=False), [[p * p for p in P]]),
        (RecencyScorer(), [[0.0, 1.0, 2.0]]),
        (EMSScorer(pool_kernel=1, exclude_window=False), [P]),  # no global view: the local view alone
    ],
)
def test_one_query_three_keys(scorer, expected):
    scores = scorer.score(ONE_QUERY)
    assert scores.dtype == torch.float32 and scores.shape == (1, 3)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_window_queries_are_causal():
    # Window of 2 over 3 keys: query 0 sits at position 1 and sees keys 0-1, query 1 sees all three.
    obs = observation([[2.0, 0.0]], [[0.0, 1.0, 2.0]])
    first = softmax(0.0, 1.0) + [0.0]
    second = [1 / 3] * 3  # a zero query attends uniformly
    expected = [a + b for a, b in zip(first, second)]
    torch.testing.assert_close(SnapKVScorer(pool_kernel=1, exclude_window=False).score(obs), torch.tensor([expected]))
    squared = [a * a + b * b for a, b in zip(first, second)]
    torch.testing.assert_close(SquaredAttentionScorer(exclude_window=False).score(obs), torch.tensor([squared]))


def test_gqa_groups_are_contiguous_and_summed():
    # 4 query heads over 2 KV heads: query heads 0-1 read KV head 0, heads 2-3 read KV head 1.
    obs = observation([[2.0], [-2.0], [0.0], [4.0]], [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    head0 = [a + b for a, b in zip(softmax(0.0, 1.0, 2.0), softmax(0.0, -1.0, -2.0))]
    head1 = [a + b for a, b in zip([1 / 3] * 3, softmax(2.0, 0.0, 0.0))]
    torch.testing.assert_close(SnapKVScorer(pool_kernel=1, exclude_window=False).score(obs), torch.tensor([head0, head1]))


@pytest.mark.parametrize(
    "kernel, expected",
    [
        (1, [0.0, 5.0, 0.0, 0.0, 0.0, 3.0, 0.0]),
        (3, [5.0, 5.0, 5.0, 0.0, 3.0, 3.0, 3.0]),
        (5, [5.0, 5.0, 5.0, 5.0, 3.0, 3.0, 3.0]),
        (7, [5.0, 5.0, 5.0, 5.0, 5.0, 3.0, 3.0]),
    ],
)
def test_max_pooling(kernel, expected):
    scores = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 3.0, 0.0]])
    assert max_pool_scores(scores, kernel).tolist() == [expected]


def test_max_pooling_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        max_pool_scores(torch.zeros(1, 4), 4)


@pytest.mark.parametrize("local_weight", [0.5, 0.25, 0.0, 1.0])
def test_ems_mixes_mean_aligned_global_and_local(local_weight):
    # Global column mass [3, 1, 1] is taken as it is -- not divided by the 3, 2, 1 queries that see
    # each key -- and scaled to the local view's mean: [0.6, 0.2, 0.2]. The local view is the one
    # query's softmax P (mean 1/3 already).
    obs = observation([[2.0]], [[0.0, 1.0, 2.0]], global_attention=torch.tensor([[3.0, 1.0, 1.0]]))
    glob = [0.6, 0.2, 0.2]
    expected = [(1 - local_weight) * g + local_weight * p for g, p in zip(glob, P)]
    scores = EMSScorer(local_weight=local_weight, pool_kernel=1, exclude_window=False).score(obs)
    torch.testing.assert_close(scores, torch.tensor([expected]))
    pooled = EMSScorer(local_weight=local_weight, pool_kernel=3, exclude_window=False).score(obs)
    torch.testing.assert_close(pooled, torch.tensor([[max(expected[:2]), max(expected), max(expected[1:])]]))


def test_ems_global_keeps_the_early_token_bias_the_local_view_offsets():
    # Three zero queries over three keys: query i attends uniformly to keys 0..i, so the column mass
    # is [1 + 1/2 + 1/3, 1/2 + 1/3, 1/3] = [11/6, 5/6, 2/6]: the earliest key gets most. Divided by
    # the 3, 2, 1 queries that see each key it would be [11/18, 5/12, 1/3] / sum -- still early-
    # first here, but flattened toward the late keys; undivided it stays [11, 5, 2] / 18.
    keys = torch.zeros(1, 3, HEAD_DIM)
    mass = causal_column_mass(torch.zeros(1, 3, HEAD_DIM), keys)
    obs = LayerObservation(torch.zeros(1, 1, HEAD_DIM), keys, keys.clone(), global_attention=mass)
    scores = EMSScorer(local_weight=0.0, pool_kernel=1, exclude_window=False).score(obs)
    torch.testing.assert_close(scores, torch.tensor([[11 / 18, 5 / 18, 2 / 18]]))


def test_ems_global_is_per_head_and_gqa_aware():
    # Two query heads per KV head: their global mass is already summed onto the KV head; the
    # normalisation makes the group size irrelevant. Two KV heads get independent global views.
    obs = observation(
        [[2.0], [2.0], [0.0], [0.0]],
        [[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]],
        global_attention=torch.tensor([[6.0, 2.0, 2.0], [0.0, 0.0, 4.0]]),
    )
    local0 = P  # both query heads see P; summed then normalised back to P
    local1 = [1 / 3] * 3
    expected = [
        [0.5 * g + 0.5 * p for g, p in zip([0.6, 0.2, 0.2], local0)],
        [0.5 * g + 0.5 * p for g, p in zip([0.0, 0.0, 1.0], local1)],
    ]
    torch.testing.assert_close(EMSScorer(pool_kernel=1, exclude_window=False).score(obs), torch.tensor(expected))


def test_windowkv_scores_are_raw_per_query_head_sums_of_the_prefix():
    # 2 query heads on 1 KV head, a suffix of 2 queries over 4 keys. Query 0 (position 2) sees keys
    # 0-2, query 1 sees all 4. Head 0's queries (2, 0, 0, 0) and (4, 0, 0, 0) over keys (0, 1, 2, 0):
    # logits [0, 1, 2] and [0, 2, 4, 0]; head 1's zero queries attend uniformly. The suffix keys 2-3
    # score 0; nothing is pooled or normalised.
    obs = observation([[2.0, 4.0], [0.0, 0.0]], [[0.0, 1.0, 2.0, 0.0]])
    head0 = [a + b for a, b in zip(softmax(0.0, 1.0, 2.0) + [0.0], softmax(0.0, 2.0, 4.0, 0.0))]
    head1 = [1 / 3 + 1 / 4, 1 / 3 + 1 / 4]
    rows = WindowKVScorer().query_head_scores(obs)
    torch.testing.assert_close(rows, torch.tensor([head0[:2] + [0.0, 0.0], head1 + [0.0, 0.0]]))
    torch.testing.assert_close(WindowKVScorer().score(obs), rows.sum(0, keepdim=True))


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("seq_len, window", [(40, 8), (9, 9), (17, 1)])
def test_windowkv_query_head_rows_sum_to_snapkv_unpooled(make_layers, group, seq_len, window):
    (obs,) = make_layers(1, num_kv_heads=2, group=group, seq_len=seq_len, window=window)
    rows = WindowKVScorer().query_head_scores(obs)
    assert rows.shape == (2 * group, seq_len)
    assert not rows[:, seq_len - window :].any()
    torch.testing.assert_close(rows.reshape(2, group, seq_len).sum(1), SnapKVScorer(pool_kernel=1).score(obs))


def test_ems_asks_for_global_attention_and_others_do_not():
    assert EMSScorer().needs_global_attention
    assert not EMSScorer(local_weight=1.0).needs_global_attention  # the local term alone
    for scorer in (RecencyScorer(), SnapKVScorer(), SquaredAttentionScorer(), WindowKVScorer()):
        assert not scorer.needs_global_attention
        if not isinstance(scorer, WindowKVScorer):
            assert scorer.query_head_scores(ONE_QUERY) is None  # KV-head scores only


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_causal_column_mass(chunk):
    # Zero queries attend uniformly over what they see: query i gives 1 / (i + 1) to keys 0..i.
    # Two query heads share the KV head, so the mass doubles.
    queries = torch.zeros(2, 3, HEAD_DIM)
    keys = torch.randn(1, 3, HEAD_DIM)
    mass = causal_column_mass(queries, keys, chunk=chunk)
    expected = 2 * torch.tensor([[1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]])
    torch.testing.assert_close(mass, expected)


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_causal_column_mass_of_prefill_chunks_adds_up_to_the_whole_prompt(chunk):
    # a chunked prefill: queries at positions start..stop-1 over keys 0..stop-1
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 40, HEAD_DIM, generator=gen), torch.randn(2, 40, HEAD_DIM, generator=gen)
    total = torch.zeros(2, 40)
    for start, stop in ((0, 13), (13, 14), (14, 40)):
        total[:, :stop] += causal_column_mass(q[:, start:stop], k[:, :stop], start=start, chunk=chunk)
    torch.testing.assert_close(total, causal_column_mass(q, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scorer", [RecencyScorer(), SnapKVScorer(), SquaredAttentionScorer(), EMSScorer(), WindowKVScorer()], ids=type
)
def test_scores_are_float32_finite_nonnegative(make_layers, scorer, dtype):
    (obs,) = make_layers(1, num_kv_heads=2, group=3, seq_len=40, window=8, dtype=dtype, with_global=True)
    scores = scorer.score(obs)
    assert scores.dtype == torch.float32 and scores.shape == (2, 40)
    assert bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, words",
    [
        ((2, 1, 4), (1, 3, 8), (1, 3, 8), "shape mismatch"),
        ((2, 1, 4), (1, 3, 4), (1, 2, 4), "shape mismatch"),
        ((3, 1, 4), (2, 3, 4), (2, 3, 4), "do not split"),
    ],
)
def test_observation_rejects_bad_shapes(q_shape, k_shape, v_shape, words):
    with pytest.raises(ValueError, match=words):
        LayerObservation(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(v_shape))


@pytest.mark.parametrize("scorer", [SnapKVScorer(pool_kernel=3), SquaredAttentionScorer(), EMSScorer(pool_kernel=3)], ids=type)
def test_window_positions_score_zero_and_do_not_spill(scorer):
    # 2 window queries over 6 keys: the window (keys 4, 5) is kept anyway, so it scores 0, and the
    # pooling of key 3 sees only the prefix; the same scorer without the exclusion spreads key 4's
    # score onto key 3.
    obs = observation([[1.0, 1.0]], [[0.0, 0.1, 0.2, 0.3, 3.0, 0.0]])
    scores = scorer.score(obs)
    assert scores[0, 4:].tolist() == [0.0, 0.0]
    assert (scores[0, :4] > 0).all()
    inclusive = dataclasses.replace(scorer, exclude_window=False).score(obs)
    if scorer.pool_kernel > 1:
        assert inclusive[0, 3] > scores[0, 3]


def test_keydiff_scores_by_the_distance_from_the_average_key_direction():
    """Three keys of one head, two along x and one along y (lengths differ: only directions count):
    the anchor is the direction of (2, 1), so cos = 2/sqrt(5) for the x keys and 1/sqrt(5) for the y
    key, which scores highest. The queries play no part."""
    keys = torch.tensor([[[3.0, 0.0], [0.5, 0.0], [0.0, 2.0]]])
    obs = LayerObservation(torch.randn(1, 1, 2), keys, torch.randn_like(keys))
    far, near = 1 - 1 / math.sqrt(5), 1 - 2 / math.sqrt(5)
    torch.testing.assert_close(KeyDiffScorer().score(obs), torch.tensor([[near, near, far]]))
    other_queries = dataclasses.replace(obs, window_queries=torch.randn(1, 1, 2))
    torch.testing.assert_close(KeyDiffScorer().score(other_queries), KeyDiffScorer().score(obs))


def test_keydiff_anchor_leaves_the_padding_out():
    """Decode-time recompression: head 0 holds its last 2 rows (x, y), the poisoned row before them
    is padding; its anchor is (1, 1)/sqrt(2) from its own rows, as if scored alone."""
    keys = torch.tensor([[[0.0, 1e4], [1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    obs = LayerObservation(torch.randn(2, 1, 2), keys, torch.randn_like(keys), lengths=torch.tensor([2, 3]))
    scores = KeyDiffScorer().score(obs)
    alone = KeyDiffScorer().score(LayerObservation(torch.randn(1, 1, 2), keys[:1, 1:], keys[:1, 1:]))
    torch.testing.assert_close(scores[0, 1:], alone[0])
    torch.testing.assert_close(scores[0, 1:], torch.full((2,), 1 - 1 / math.sqrt(2)))
