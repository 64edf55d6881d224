"""Reducers on cases where the kept, merged and dropped tokens can be named by hand."""
import pytest
import torch

from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.paged.reference import merge_by_class
from vllm_kvcompress.policies.reduction import (
    EvictThenMergeReducer,
    RetainedLayer,
    TopKReducer,
    WindowReducer,
    fit_whole_windows,
    protected_positions,
    redundancy,
    top_k_indices,
    top_mass,
    unprotected_windows,
    window_statistic,
)


def layer(keys, values) -> LayerObservation:
    """keys, values: nested lists [num_kv_heads][seq_len][head_dim]; queries are unused here."""
    k = torch.tensor(keys, dtype=torch.float32)
    v = torch.tensor(values, dtype=torch.float32)
    return LayerObservation(torch.zeros(k.shape[0], 1, k.shape[-1]), k, v)


def ramp_layer(num_heads: int, seq_len: int, head_dim: int = 2) -> LayerObservation:
    """Row t of head h holds the distinct numbers 100 h + t (so gathered rows can be recognised)."""
    rows = 100 * torch.arange(num_heads)[:, None] + torch.arange(seq_len)[None, :]
    x = rows[..., None].float().expand(-1, -1, head_dim).contiguous()
    return LayerObservation(torch.zeros(num_heads, 1, head_dim), x, -x)


@pytest.mark.parametrize(
    "seq_len, window, sink, expected",
    [
        (8, 2, 1, [1, 0, 0, 0, 0, 0, 1, 1]),
        (5, 0, 0, [0, 0, 0, 0, 0]),
        (4, 3, 2, [1, 1, 1, 1]),  # window and sinks overlap: everything
        (4, 9, 0, [1, 1, 1, 1]),
    ],
)
def test_protected_positions(seq_len, window, sink, expected):
    assert protected_positions(seq_len, window, sink).tolist() == [bool(x) for x in expected]


def test_top_k_protects_window_and_sink_and_breaks_ties_by_position():
    # sink 1 + window 2 protect 0, 6, 7 despite their zero scores; 2, 3 and 5 tie at 5: 2 and 3 win.
    scores = torch.tensor([[0.0, 3.0, 5.0, 5.0, 1.0, 5.0, 0.0, 0.0]] * 3)
    protected = protected_positions(8, window=2, sink=1)
    keep = top_k_indices(scores, torch.tensor([5, 3, 6]), protected)
    assert keep.tolist() == [[0, 2, 3, 6, 7, -1], [0, 6, 7, -1, -1, -1], [0, 2, 3, 5, 6, 7]]


def test_protected_positions_of_heads_padded_at_the_front():
    # lengths 5 and 3 in 5 rows: the second head's rows are 2..4, its sink is row 2
    protected = protected_positions(5, window=1, sink=1, lengths=torch.tensor([5, 3]))
    assert protected.int().tolist() == [[1, 0, 0, 0, 1], [0, 0, 1, 0, 1]]


def test_merge_classes_leave_padding_out_even_when_it_matches_a_kept_key():
    # head 1 holds 3 rows (padding at 0 and 1 copies its kept row 2): the padding is class 0
    keys = [[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.9, 0.0], [0.0, 1.0]],
            [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]
    obs = layer(keys, keys)
    obs.lengths = torch.tensor([5, 3])
    protected = protected_positions(5, window=1, sink=0, lengths=obs.lengths)
    classes = EvictThenMergeReducer(merge_threshold=0.5).classes(obs, torch.tensor([[0, 4], [2, 4]]), protected)
    assert classes.tolist() == [[1, 0, 1, 1, 2], [0, 0, 1, 0, 2]]


def test_top_k_budget_zero_keeps_nothing():
    keep = top_k_indices(torch.rand(2, 5), torch.tensor([0, 0]), torch.zeros(5, dtype=torch.bool))
    assert keep.shape == (2, 0)


def test_gather_pads_with_zero_rows():
    obs = ramp_layer(num_heads=2, seq_len=5)
    retained = RetainedLayer.gather(obs, torch.tensor([[0, 3, 4], [2, -1, -1]]))
    assert retained.lengths.tolist() == [3, 1]
    assert retained.keys[..., 0].tolist() == [[0.0, 3.0, 4.0], [102.0, 0.0, 0.0]]
    assert retained.values[..., 0].tolist() == [[-0.0, -3.0, -4.0], [-102.0, 0.0, 0.0]]


def test_top_k_reducer_keeps_the_best_rows_unchanged():
    obs = ramp_layer(num_heads=2, seq_len=6)
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0, 0.0], [7.0, 0.0, 0.0, 0.0, 6.0, 0.0]])
    protected = protected_positions(6, window=1, sink=0)
    (retained,) = TopKReducer().reduce([obs], [scores], torch.tensor([[3, 2]]), protected)
    assert retained.keep_idx.tolist() == [[1, 3, 5], [0, 5, -1]]
    assert retained.keys[..., 1].tolist() == [[1.0, 3.0, 5.0], [100.0, 105.0, 0.0]]
    assert retained.lengths.tolist() == [3, 2]


# One head, four tokens, head_dim 2. Budget 2 with the last token protected: token 0 (score 3)
# is kept. Token 1's key has cosine 0.8 with token 0's, -0.8 with token 3's: it merges into slot 0.
# Token 2's key is orthogonal to both kept keys: cosine 0.
MERGE_KEYS = [[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]]
MERGE_VALUES = [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]]
MERGE_SCORES = torch.tensor([[3.0, 1.0, 2.0, 0.5]])


@pytest.mark.parametrize(
    "threshold, classes, key0, value0",
    [
        # token 1 joins slot 0 with weight 1 next to token 0's 3; token 2 is dropped
        (0.5, [1, 1, 0, 2], [0.95, 0.15], [1.5, 2.5]),
        # cosine 0.8 is below 0.9: nothing merges, plain eviction
        (0.9, [1, 0, 0, 2], [1.0, 0.0], [1.0, 2.0]),
        # everything merges into slot 0 (token 3 is protected, never a target): weights 3, 1, 2
        (-1.0, [1, 1, 1, 2], [(3 + 0.8) / 6, (0.6 + 2) / 6], [16 / 6, 22 / 6]),
    ],
)
def test_evict_then_merge_one_head(threshold, classes, key0, value0):
    obs = layer(MERGE_KEYS, MERGE_VALUES)
    protected = protected_positions(4, window=1, sink=0)
    reducer = EvictThenMergeReducer(merge_threshold=threshold)
    assert reducer.classes(obs, torch.tensor([[0, 3]]), protected).tolist() == [classes]
    (retained,) = reducer.reduce([obs], [MERGE_SCORES], torch.tensor([[2]]), protected)
    assert retained.keep_idx.tolist() == [[0, 3]]
    assert retained.lengths.tolist() == [2]
    torch.testing.assert_close(retained.keys[0], torch.tensor([key0, [-1.0, 0.0]]))
    torch.testing.assert_close(retained.values[0], torch.tensor([value0, [7.0, 8.0]]))


def test_redundancy_multiplies_key_and_value_cosines():
    # token x = key (0.8, 0.6), value (3, 4); centres: key (1, 0) value (1, 2) -> 0.8 * 11 / (5 sqrt 5);
    # key (1, 0) value (-4, 3) -> 0.8 * 0 (orthogonal values); key (-1, 0) value (3, 4) -> the key
    # cosine -0.8 is clamped to 0, whatever the values
    keys = torch.tensor([[[0.8, 0.6]]])
    values = torch.tensor([[[3.0, 4.0]]])
    kept_keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    kept_values = torch.tensor([[[1.0, 2.0], [-4.0, 3.0], [3.0, 4.0]]])
    expected = [0.8 * 11 / (5 * 5**0.5), 0.0, 0.0]
    torch.testing.assert_close(redundancy(keys, values, kept_keys, kept_values), torch.tensor([[expected]]))


def test_a_token_with_a_similar_key_but_a_different_value_is_not_merged():
    # token 1's key is close to token 0's (cosine 0.8) but its value is orthogonal: redundancy 0
    values = [[[1.0, 2.0], [-2.0, 1.0], [5.0, 6.0], [7.0, 8.0]]]
    obs = layer(MERGE_KEYS, values)
    protected = protected_positions(4, window=1, sink=0)
    classes = EvictThenMergeReducer(merge_threshold=0.5).classes(obs, torch.tensor([[0, 3]]), protected)
    assert classes.tolist() == [[1, 0, 0, 2]]


@pytest.mark.parametrize(
    "mass, relevant",
    [
        # scores 3, 1, 2, 0.5 (total 6.5): the best first until the mass before a token reaches the share
        (0.9, [1, 1, 1, 0]),  # 0, 3, 5 before tokens 0, 2, 1 are below 5.85; 6 before token 3 is not
        (0.5, [1, 0, 1, 0]),  # below 3.25: tokens 0 (0 before) and 2 (3 before)
        (0.4, [1, 0, 0, 0]),
        (1.0, [1, 1, 1, 1]),
    ],
)
def test_top_mass(mass, relevant):
    assert top_mass(MERGE_SCORES, mass).int().tolist() == [relevant]


def test_top_mass_leaves_zero_scores_out():
    assert top_mass(torch.tensor([[2.0, 0.0, 1.0, 0.0]]), 1.0).int().tolist() == [[1, 0, 1, 0]]


def test_evict_then_merge_evicts_irrelevant_tokens_before_merging():
    # token 1 is redundant with the centre (as in the 0.5 case above), but with relevant_mass 0.5
    # only tokens 0 and 2 hold the head's first half of the score: token 1 is evicted, not merged
    obs = layer(MERGE_KEYS, MERGE_VALUES)
    protected = protected_positions(4, window=1, sink=0)
    reducer = EvictThenMergeReducer(merge_threshold=0.5, relevant_mass=0.5)
    assert reducer.classes(obs, torch.tensor([[0, 3]]), protected, MERGE_SCORES).tolist() == [[1, 0, 0, 2]]
    (retained,) = reducer.reduce([obs], [MERGE_SCORES], torch.tensor([[2]]), protected)
    torch.testing.assert_close(retained.values[0], torch.tensor([[1.0, 2.0], [7.0, 8.0]]))


def test_evict_then_merge_keeps_a_retained_token_in_its_own_slot_next_to_padding():
    # Head 1 keeps 2 tokens, head 0 three, so head 1 has a padding slot. Head 1's sink token 0 has
    # a zero key (similar to nothing); it must still be its own slot, not lost to the padding.
    keys = [[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]]
    values = [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], [[9.0, 10.0], [11.0, 12.0], [13.0, 14.0], [15.0, 16.0]]]
    obs = layer(keys, values)
    scores = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.5]])
    protected = protected_positions(4, window=1, sink=1)
    reducer = EvictThenMergeReducer(merge_threshold=0.5)
    (retained,) = reducer.reduce([obs], [scores], torch.tensor([[3, 2]]), protected)
    assert retained.keep_idx.tolist() == [[0, 1, 3], [0, 3, -1]]
    # head 1 keeps only protected tokens (sink 0, window 3), which are never merge targets:
    # tokens 1 and 2 are dropped although token 2's key matches token 3's
    assert reducer.classes(obs, retained.keep_idx, protected)[1].tolist() == [1, 0, 0, 2]
    # head 1: token 0 alone in slot 0, token 3 alone in slot 1
    torch.testing.assert_close(retained.values[1], torch.tensor([[9.0, 10.0], [15.0, 16.0], [0.0, 0.0]]))
    torch.testing.assert_close(retained.keys[1], torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))


def test_evict_then_merge_keeps_dtype():
    obs = layer(MERGE_KEYS, MERGE_VALUES)
    half = LayerObservation(obs.window_queries, obs.keys.bfloat16(), obs.values.bfloat16())
    protected = protected_positions(4, window=1, sink=0)
    (retained,) = EvictThenMergeReducer().reduce([half], [MERGE_SCORES], torch.tensor([[2]]), protected)
    assert retained.keys.dtype == retained.values.dtype == torch.bfloat16
    assert retained.values[0].float().tolist() == [[1.5, 2.5], [7.0, 8.0]]


def test_merge_by_class_zero_class():
    x = torch.tensor([[[1.0], [2.0], [6.0], [4.0], [5.0], [10.0]]])
    weight = torch.tensor([[9.0, 1.0, 2.0, 0.0, 0.0, 4.0]])
    assign = torch.tensor([[0, 1, 1, 2, 2, 3]])
    merged = merge_by_class(x, weight, assign, num_classes=4)
    # class 0 (token 0) is dropped; class 1: (1*2 + 2*6) / 3; class 2 has zero weight: plain mean;
    # class 3: token 5 alone; class 4 is empty: zeros
    torch.testing.assert_close(merged, torch.tensor([[[14 / 3], [4.5], [10.0], [0.0]]]))


def test_merge_by_class_heads_are_independent():
    x = torch.arange(8.0).reshape(2, 4, 1)
    weight = torch.ones(2, 4)
    assign = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 1]])
    merged = merge_by_class(x, weight, assign, num_classes=2)
    assert merged[..., 0].tolist() == [[0.5, 2.0], [7.0, 0.0]]


@pytest.mark.parametrize(
    "size, expected, count",
    [
        # sink 1 and window 2 protected: windows tile positions 1..6 from the first of them
        (2, [-1, 0, 0, 1, 1, 2, 2, -1, -1], 3),
        (4, [-1, 0, 0, 0, 0, 1, 1, -1, -1], 2),  # the last window is shorter
        (8, [-1, 0, 0, 0, 0, 0, 0, -1, -1], 1),
    ],
)
def test_unprotected_windows(size, expected, count):
    protected = protected_positions(9, window=2, sink=1)
    window, num_windows = unprotected_windows(protected, size)
    assert window.tolist() == expected and num_windows == count


def test_unprotected_windows_start_at_position_zero_without_sinks():
    window, num_windows = unprotected_windows(protected_positions(7, window=2, sink=0), 2)
    assert window.tolist() == [0, 0, 1, 1, 2, -1, -1] and num_windows == 3


def test_window_statistic_per_row_then_the_callers_mean():
    # windows {0..3} and {4..7}; with top 2: row 0 -> 4 and 3, row 1 -> 0 and (4 + 0) / 2;
    # without top: the plain means
    rows = torch.tensor([[4.0, 4.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    window = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert window_statistic(rows, window, 2, top=2).tolist() == [[4.0, 3.0], [0.0, 2.0]]
    assert window_statistic(rows, window, 2, top=None).tolist() == [[2.0, 3.0], [0.0, 1.0]]


def test_window_statistic_of_a_short_window_counts_what_it_has():
    # window 1 holds 2 tokens: its top 4 is both of them
    rows = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 0.0, 2.0, 4.0]])
    window = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    assert window_statistic(rows, window, 2, top=4).tolist() == [[(8 + 6 + 5 + 4) / 4, 3.0]]


@pytest.mark.parametrize(
    "room, kept",
    [
        (4, [0, 1, 0]),  # the best window
        (5, [0, 1, 0]),  # the second does not fit, nor the short one in the 1 token left
        (6, [0, 1, 1]),  # the second does not fit, the short one does
        (10, [1, 1, 1]),
        (0, [0, 0, 0]),
    ],
)
def test_fit_whole_windows(room, kept):
    # windows of 4, 4 and 2 tokens, ranked 1, 0, 2
    sizes, order = torch.tensor([4, 4, 2]), torch.tensor([1, 0, 2])
    assert fit_whole_windows(sizes, order, torch.tensor([room])).int().tolist() == [kept]


def test_fit_whole_windows_takes_a_short_window_in_its_turn():
    # the short window ranks first: then the full ones follow while they fit
    sizes, order = torch.tensor([4, 4, 2]), torch.tensor([2, 0, 1])
    assert fit_whole_windows(sizes, order, torch.tensor([6, 9])).int().tolist() == [[1, 0, 1], [1, 0, 1]]


# windows of 4 over 10 prefix tokens and a protected suffix of 2: {0..3} {4..7} {8, 9}
WINDOW_SCORES = torch.tensor([[5.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "task, budget, expected",
    [
        # aggregation: windows count by their mean (1.25, 2, 0): the best window whole, not the
        # single best token 0
        ("aggregation", 6, [4, 5, 6, 7, 10, 11]),
        ("aggregation", 7, [4, 5, 6, 7, 10, 11]),  # no window fits in the 1 token left: 6 kept
        ("aggregation", 8, [4, 5, 6, 7, 8, 9, 10, 11]),  # {0..3} does not fit in 2, {8, 9} does
        ("aggregation", 12, list(range(12))),
        # retrieval: by the mean of a window's best half (2.5, 2, 0): the window of the peak wins
        ("retrieval", 6, [0, 1, 2, 3, 10, 11]),
        ("retrieval", 9, [0, 1, 2, 3, 8, 9, 10, 11]),
    ],
)
def test_window_reducer_keeps_whole_windows(task, budget, expected):
    obs = ramp_layer(num_heads=1, seq_len=12)
    reducer = WindowReducer(task=task, retrieval_window=4, aggregation_window=4)
    protected = protected_positions(12, window=2, sink=0)
    (retained,) = reducer.reduce([obs], [WINDOW_SCORES], torch.tensor([[budget]]), protected)
    assert retained.keep_idx.tolist() == [expected]
    assert retained.keys[0, :, 0].tolist() == [float(i) for i in expected]
    assert not reducer.fills_budgets


@pytest.mark.parametrize(
    "task, budget, expected",
    [
        ("aggregation", 7, [0, 4, 5, 6, 7, 10, 11]),  # the next window starts with its best token
        ("aggregation", 8, [0, 1, 4, 5, 6, 7, 10, 11]),
        ("retrieval", 7, [0, 1, 2, 3, 4, 10, 11]),
    ],
)
def test_window_reducer_can_fill_the_budget(task, budget, expected):
    obs = ramp_layer(num_heads=1, seq_len=12)
    reducer = WindowReducer(task=task, retrieval_window=4, aggregation_window=4, whole_windows=False)
    protected = protected_positions(12, window=2, sink=0)
    (retained,) = reducer.reduce([obs], [WINDOW_SCORES], torch.tensor([[budget]]), protected)
    assert retained.keep_idx.tolist() == [expected] and reducer.fills_budgets


def test_window_reducer_heads_share_raw_unnormalised_windows():
    # row 0 puts 40 on window {0..3} and 1 on {4..7}, row 1 puts 5 on {4..7}. Raw means: 40/8 vs
    # 6/8, so {0..3}; normalised per row first, {4..7} would win (1/41 + 1 > 40/41).
    scores = torch.tensor([[10.0, 10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]])
    obs = ramp_layer(num_heads=2, seq_len=8)
    reducer = WindowReducer(task="aggregation", aggregation_window=4)
    protected = protected_positions(8, window=0, sink=0)
    (retained,) = reducer.reduce([obs], [scores], torch.tensor([[4, 4]]), protected)
    assert retained.keep_idx.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_window_reducer_ranks_by_query_head_rows():
    # 4 rows (query heads, 2 per KV head), windows {0..3} {4..7}. Retrieval: per row the mean of its
    # best 2 of 4, then the mean over rows: {0..3} (4 + 0 + 0 + 0) / 4 = 1, {4..7} (0 + 2 + 2 +
    # 0.5) / 4 = 1.125, so every head keeps {4..7}. Summed per KV head first (rows 0+1, 2+3) the
    # windows would tie at 2 and the earlier one would win.
    rows = torch.zeros(4, 10)
    rows[0, :2] = 4.0
    rows[1, 4:6] = 2.0
    rows[2, 4:6] = 2.0
    rows[3, 6] = 1.0
    obs = ramp_layer(num_heads=2, seq_len=10)
    reducer = WindowReducer(task="retrieval", retrieval_window=4)
    (retained,) = reducer.reduce([obs], [rows], torch.tensor([[6, 6]]), protected_positions(10, window=2, sink=0))
    assert retained.keep_idx.tolist() == [[4, 5, 6, 7, 8, 9]] * 2


@pytest.mark.parametrize(
    "scores, expected",
    [
        (torch.eye(40)[:2] * 10, "retrieval"),  # one token per head holds all the attention
        (torch.ones(2, 40), "aggregation"),  # top 2 of 40 tokens hold 5%
    ],
)
def test_window_reducer_auto_task(scores, expected):
    assert WindowReducer().task_type([scores, scores]) == expected
    assert WindowReducer(task="retrieval").task_type([torch.ones(2, 40)]) == "retrieval"


@pytest.mark.parametrize(
    "task, window, suffix",
    [("retrieval", 32, 32), ("aggregation", 32, 16), ("aggregation", 8, 8), ("retrieval", 8, 8)],
)
def test_window_reducer_suffix_follows_the_task(make_layers, task, window, suffix):
    layers = make_layers(2, num_kv_heads=1, group=2, seq_len=64, window=window)
    chosen, reducer = WindowReducer(task=task).for_request(layers, window)
    assert chosen == suffix and reducer.task == task


def test_window_reducer_auto_decides_once_per_request(make_layers):
    layers = make_layers(2, num_kv_heads=1, group=2, seq_len=64, window=32)
    _, reducer = WindowReducer(task="auto", retrieval_share=0.0).for_request(layers, 32)
    assert reducer.task == "retrieval"
    _, reducer = WindowReducer(task="auto", retrieval_share=1.0).for_request(layers, 32)
    assert reducer.task == "aggregation"


@pytest.mark.parametrize("group_size, layer1_keep", [(2, [4, 5, 6, 7, 10, 11]), (1, [0, 1, 2, 3, 10, 11])])
def test_window_reducer_layer_groups_share_the_ranking(group_size, layer1_keep):
    # layer 1 prefers window {0..3} by its own scores; in a group of 2 it follows layer 0's ranking
    obs = ramp_layer(num_heads=1, seq_len=12)
    layer1_scores = torch.tensor([[3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    reducer = WindowReducer(task="aggregation", aggregation_window=4, group_size=group_size)
    protected = protected_positions(12, window=2, sink=0)
    retained = reducer.reduce([obs, obs], [WINDOW_SCORES, layer1_scores], torch.tensor([[6], [6]]), protected)
    assert retained[0].keep_idx.tolist() == [[4, 5, 6, 7, 10, 11]]
    assert retained[1].keep_idx.tolist() == [layer1_keep]


def test_window_reducer_decode_time_ranks_each_head_and_fills_its_budget():
    # two heads with opposite preferences, recompressed together: each keeps its own best window
    # and fills its budget exactly (the engine holds every head at its budget)
    scores = torch.cat([WINDOW_SCORES, WINDOW_SCORES.flip(-1)])
    scores[1, 10:] = 0.0
    obs = ramp_layer(num_heads=2, seq_len=12)
    reducer = WindowReducer(task="aggregation", aggregation_window=4)
    retained = reducer.reduce_heads(obs, scores, torch.tensor([7, 6]), protected_positions(12, window=2, sink=0))
    assert retained.lengths.tolist() == [7, 6]
    assert retained.keep_idx[0].tolist() == [0, 4, 5, 6, 7, 10, 11]


@pytest.mark.parametrize("budgets", [[6, 6, 6], [2, 9, 5]])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("relevant", [1.0, 0.9])
@pytest.mark.parametrize("count_above", [256, 0])  # bounded by the budgets / candidates counted
@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_ems_classes_compare_only_the_tokens_that_can_merge(budgets, padded, relevant, count_above, path, monkeypatch):
    """EvictThenMergeReducer.classes compares only the tokens neither kept nor padding nor
    irrelevant with the centres; the classes equal a comparison of every token with every centre.
    ``kernel``: the nearest centres from the Triton kernel (Triton's interpreter without a GPU),
    which counts nothing."""
    from vllm_kvcompress.paged import merge
    from vllm_kvcompress.policies import reduction
    from vllm_kvcompress.policies.reduction import EvictThenMergeReducer, protected_positions, redundancy, top_k_indices, top_mass

    device = "cuda" if path == "kernel" and torch.cuda.is_available() else "cpu"
    if path == "kernel":
        for module in (reduction, merge):
            monkeypatch.setattr(module, "runs_on", lambda where: True)

    gen = torch.Generator().manual_seed(sum(budgets) + padded)
    heads, seq_len = 3, 14
    keys, values = torch.randn(heads, seq_len, 8, generator=gen), torch.randn(heads, seq_len, 8, generator=gen)
    values[:, 1::2] = values[:, ::2] + 0.05 * torch.randn(heads, seq_len // 2, 8, generator=gen)  # redundant pairs
    keys[:, 1::2] = keys[:, ::2] + 0.05 * torch.randn(heads, seq_len // 2, 8, generator=gen)
    lengths = torch.tensor([14, 11, 9]) if padded else None
    obs = LayerObservation(torch.randn(heads, 2, 8, generator=gen), keys, values, lengths=lengths)
    protected = protected_positions(seq_len, 2, 1, lengths=lengths)
    scores = torch.rand(heads, seq_len, generator=gen)
    if padded:
        scores = scores.masked_fill(obs.padding, float("-inf"))
    keep_idx = top_k_indices(scores, torch.tensor(budgets), protected)
    reducer = EvictThenMergeReducer(merge_threshold=0.3, relevant_mass=relevant, count_above=count_above)
    on_device = LayerObservation(obs.window_queries.to(device), keys.to(device), values.to(device),
                                 lengths=None if lengths is None else lengths.to(device))
    got = reducer.classes(on_device, keep_idx.to(device), protected.to(device), scores.to(device)).cpu()
    # every token against every centre (protected centres excluded), as worked out here
    valid = keep_idx >= 0
    centre_ok = valid & ~torch.gather(protected if protected.dim() == 2 else protected.expand(heads, -1), 1,
                                      keep_idx.clamp(min=0))
    idx = keep_idx.clamp(min=0)[..., None].expand(-1, -1, 8)
    sim = redundancy(keys, values, keys.gather(1, idx), values.gather(1, idx)).masked_fill(~centre_ok[:, None], -1e9)
    best_sim, best = sim.max(-1)
    want = torch.where((best_sim >= 0.3) & top_mass(scores, relevant), best + 1, torch.zeros_like(best))
    if padded:
        want = want.masked_fill(obs.padding, 0)
    for h in range(heads):
        for slot in range(budgets[h]):
            want[h, keep_idx[h, slot]] = slot + 1
    assert torch.equal(got, want)
    assert relevant < 1 or (got > 0).sum() > valid.sum()  # some tokens did merge
