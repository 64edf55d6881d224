"""Allocators on hand-computable splits, and their shared contract under hypothesis."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.policies.allocation import (
    AdaKVAllocator,
    AllocationInput,
    HeadKVAllocator,
    PyramidAllocator,
    UniformAllocator,
    WindowKVAllocator,
    ZigZagAllocator,
    attention_output_error,
    tokens_for_mass,
    tokens_for_output,
)
from vllm_kvcompress.policies.budget import Budget, distribute
from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.policies.reduction import protected_positions

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def allocation_input(scores, per_head: int, floor: int = 0, protected=None) -> AllocationInput:
    """scores: per layer a nested list [num_kv_heads][seq_len]; nothing protected unless given."""
    layers = [torch.tensor(s, dtype=torch.float32) for s in scores]
    seq_len = layers[0].shape[1]
    if protected is None:
        protected = torch.zeros(seq_len, dtype=torch.bool)
    return AllocationInput(layers, per_head, floor, protected)


def flat_scores(num_layers: int, num_heads: int, seq_len: int) -> list[list[list[float]]]:
    return [[[1.0] * seq_len] * num_heads] * num_layers


def test_uniform():
    inp = allocation_input(flat_scores(2, 3, 10), per_head=5, floor=2)
    assert UniformAllocator().allocate(inp).tolist() == [[5, 5, 5]] * 2


@pytest.mark.parametrize(
    "seq_len, expected",
    [
        # 10 above the floor of 2 on average; beta 2: 15, 10, 5 above it, falling with depth
        (20, [[17, 17], [12, 12], [7, 7]]),
        # first layer capped at the context (15): its 2 spare tokens per head go to the others,
        # 10:5 -> 11.33 / 5.67 above the floor; the larger fraction takes the spare unit
        (15, [[15, 15], [13, 13], [8, 8]]),
    ],
)
def test_pyramid(seq_len, expected):
    inp = allocation_input(flat_scores(3, 2, seq_len), per_head=12, floor=2)
    assert PyramidAllocator(beta=2.0).allocate(inp).tolist() == expected


def test_pyramid_paper_beta():
    # beta 20: above the floor the layers get 2 * 20 - 1 = 39 and 20 / 20 = 1.
    inp = allocation_input(flat_scores(2, 1, 50), per_head=22, floor=2)
    assert PyramidAllocator().allocate(inp).tolist() == [[41], [3]]


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_pyramid_rejects_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        PyramidAllocator(beta=beta)


ADAKV_LAYER = [[[10.0, 9.0, 8.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, [[5, 1]]),  # pure competition: the top 6 of both heads are 10 9 8 5 1 1
        (2 / 3, [[4, 2]]),  # each head first keeps its best 2 (10 9 | 5 0), then 8 and 1 win
        (1.0, [[3, 3]]),  # the safeguard is the whole budget: uniform
    ],
)
def test_adakv_competition_and_safeguard(alpha, expected):
    inp = allocation_input(ADAKV_LAYER, per_head=3)
    assert AdaKVAllocator(alpha=alpha).allocate(inp).tolist() == expected


def test_adakv_protected_positions_count_first():
    # The last position is protected (floor 1): each head holds it, then 10 9 8 5 win.
    protected = torch.tensor([False] * 5 + [True])
    inp = allocation_input(ADAKV_LAYER, per_head=3, floor=1, protected=protected)
    assert AdaKVAllocator(alpha=0.0).allocate(inp).tolist() == [[4, 2]]


def test_adakv_safeguard_mixes_above_the_floor():
    # floor 2 (last 2 protected), A = 6 - 2 = 4 per head: head 0 outscores head 1 everywhere and
    # wins all 8 slots; alpha 0.5 gives budgets 2 + 0.5 * 8 + 0.5 * 4 = 8 and 2 + 0 + 2 = 4.
    layer = [[[9.0] * 12, [1.0] * 12]]
    protected = torch.tensor([False] * 10 + [True] * 2)
    inp = allocation_input(layer, per_head=6, floor=2, protected=protected)
    assert AdaKVAllocator(alpha=0.5).allocate(inp).tolist() == [[8, 4]]


def test_adakv_ties_go_to_the_lower_head():
    inp = allocation_input(flat_scores(1, 2, 4), per_head=2)
    assert AdaKVAllocator(alpha=0.0).allocate(inp).tolist() == [[4, 0]]


def test_adakv_layers_compete_separately():
    scores = ADAKV_LAYER + [[[0.0] * 6, [1.0] * 6]]
    inp = allocation_input(scores, per_head=3)
    assert AdaKVAllocator(alpha=0.0).allocate(inp).tolist() == [[5, 1], [0, 6]]


@st.composite
def adakv_request(draw, num_layers: int, num_heads: int) -> AllocationInput:
    """One request's Ada-KV input: its own length, window and budget; scores random, or tied and
    concentrated (one head wins most slots: caps bind)."""
    seq_len, window = draw(st.integers(1, 60)), draw(st.integers(0, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scores = torch.rand(num_layers, num_heads, seq_len, generator=gen)
    if draw(st.booleans()):
        scores = (scores * 3).floor() * torch.rand(num_layers, num_heads, 1, generator=gen).round()
    floor = min(seq_len, window)
    per_head = min(seq_len, max(draw(st.integers(1, 60)), floor))
    return AllocationInput(list(scores), per_head, floor, protected_positions(seq_len, window, 0))


@settings(max_examples=150, deadline=None)
@given(num_layers=st.integers(1, 6), num_heads=st.integers(1, 8), alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       data=st.data())
def test_adakv_splits_all_layers_of_all_requests_as_one_by_one(num_layers, num_heads, alpha, data):
    """All layers of several requests (of different lengths) split in one call give the budgets of
    one ``distribute`` per layer of each request alone (the loop it replaced)."""
    inputs = data.draw(st.lists(adakv_request(num_layers, num_heads), min_size=1, max_size=3))
    allocator = AdaKVAllocator(alpha=alpha)
    for inp, budgets in zip(inputs, allocator.allocate_requests(inputs), strict=True):
        above = inp.per_head - inp.floor
        won = allocator.competition(torch.stack(inp.scores), inp.protected, above * num_heads)
        mixed = (1 - alpha) * won.double() + alpha * above
        one_by_one = torch.stack([distribute(layer, above * num_heads, 0, inp.seq_len - inp.floor) + inp.floor
                                  for layer in mixed])
        assert torch.equal(budgets, one_by_one) and torch.equal(allocator.allocate(inp), one_by_one)


@pytest.mark.parametrize("alpha", [-0.1, 1.1])
def test_adakv_rejects_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        AdaKVAllocator(alpha=alpha)


@pytest.mark.parametrize(
    "row, mass, expected",
    [
        ([0.5, 0.25, 0.125, 0.125], 0.5, 1),
        ([0.5, 0.25, 0.125, 0.125], 0.75, 2),
        ([0.5, 0.25, 0.125, 0.125], 0.8, 3),
        ([0.5, 0.25, 0.125, 0.125], 1.0, 4),
        ([0.125, 0.5, 0.125, 0.25], 0.75, 2),  # order does not matter
        ([0.0, 0.0, 0.0], 0.9, 1),  # nothing to cover: one token
        ([-3.0, 1.0, 0.0], 0.9, 1),  # negative scores count as zero
    ],
)
def test_tokens_for_mass(row, mass, expected):
    assert tokens_for_mass(torch.tensor([row]), mass).tolist() == [expected]


def test_tokens_for_mass_batched():
    scores = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    assert tokens_for_mass(scores, 0.5).tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "min_fraction, expected",
    [
        # need: layer 0 = 1 token, layer 1 = 4 of 8 for half its mass; 8 split 1:4 = 1.6 / 6.4
        (0.0, [[2], [6]]),
        # floor of each layer 0.5 * 4 = 2; the 4 above it split 1:4 = 0.8 / 3.2
        (0.5, [[3], [5]]),
    ],
)
def test_zigzag(min_fraction, expected):
    scores = [[[1.0] + [0.0] * 7], [[1.0] * 8]]
    inp = allocation_input(scores, per_head=4)
    assert ZigZagAllocator(mass=0.5, min_fraction=min_fraction, measure="scores").allocate(inp).tolist() == expected


def test_zigzag_heads_of_a_layer_share_the_mean_need():
    # layer 0 needs 1 and 3 tokens (mean 2), layer 1 needs 2 and 2: equal layers.
    scores = [
        [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]],
        [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]],
    ]
    inp = allocation_input(scores, per_head=2)
    assert ZigZagAllocator(mass=1.0, min_fraction=0.0, measure="scores").allocate(inp).tolist() == [[2, 2], [2, 2]]


def along_axis(*xs: float) -> torch.Tensor:
    """[len(xs), 4] rows (x, 0, 0, 0): a query (a, 0, 0, 0) and a key (b, 0, 0, 0) have logit a * b / 2."""
    rows = torch.zeros(len(xs), 4)
    rows[:, 0] = torch.tensor(xs)
    return rows


def test_zigzag_lmba_reads_raw_unpooled_window_attention():
    # One window query (2, 0, 0, 0) over keys (0, 1, 2, 0, 0, 0): logits 0, 1, 2, 0, 0, 0 -- the
    # key at 2 holds e^2 / (e^2 + e + 4) = 0.52 of the mass, the one at 1 another 0.19. The last key
    # is the (protected) window. Layer 0 needs 2 prefix tokens for 0.7 of the prefix mass (0.71 / 0.8
    # = 0.89 >= 0.7), layer 1 (a zero query: uniform) needs 4 of 5 (0.8 >= 0.7 > 0.6). The
    # scorer's pooled scores, all equal here, would make the layers equal.
    sharp = LayerObservation(along_axis(2.0)[None], along_axis(0.0, 1.0, 2.0, 0.0, 0.0, 0.0)[None], torch.ones(1, 6, 4))
    flat = LayerObservation(torch.zeros(1, 1, 4), sharp.keys, sharp.values)
    protected = protected_positions(6, window=1, sink=0)
    pooled = [torch.ones(1, 6), torch.ones(1, 6)]
    inp = AllocationInput(pooled, per_head=4, floor=1, protected=protected, observations=[sharp, flat])
    allocator = ZigZagAllocator(mass=0.7, min_fraction=0.0)
    torch.testing.assert_close(allocator.layer_needs(inp), torch.tensor([2.0, 4.0], dtype=torch.float64))
    # 8 tokens over 2 layers, at least 1 each: the 6 above the floor split 2:4
    assert allocator.allocate(inp).tolist() == [[3], [5]]
    assert ZigZagAllocator(mass=0.7, min_fraction=0.0, measure="scores").allocate(inp).tolist() == [[4], [4]]


def test_zigzag_needs_observations_for_the_layer_views():
    inp = allocation_input(flat_scores(1, 1, 4), per_head=2)
    with pytest.raises(ValueError, match="observations"):
        ZigZagAllocator(measure="lmbo").allocate(inp)


def test_zigzag_rejects_an_unknown_measure():
    with pytest.raises(ValueError, match="valid zigzag measures: lmba, lmbo, scores"):
        ZigZagAllocator(measure="hidden")


def test_attention_output_error_by_hand():
    # One query (2, 0, 0, 0) over keys at 0, 2 (logits 0, 2) with values 1 and 3 (1-D): the full
    # output is (1 + 3 e^2) / (1 + e^2). Keeping only the key at 2 gives 3: relative error
    # (3 - full) / full; keeping both, 0.
    obs = LayerObservation(along_axis(2.0)[None], along_axis(0.0, 2.0)[None], torch.tensor([[[1.0], [3.0]]]))
    full = (1 + 3 * math.e**2) / (1 + math.e**2)
    error = attention_output_error(obs, torch.tensor([[False, True]]))
    torch.testing.assert_close(error, torch.tensor([(3 - full) / full]))
    torch.testing.assert_close(attention_output_error(obs, torch.tensor([[True, True]])), torch.zeros(1))


@pytest.mark.parametrize("tolerance, expected", [(2.0, 0), (1.0, 1), (0.3, 2), (0.2, 3), (0.0, 3)])
def test_tokens_for_output(tolerance, expected):
    # One zero query attends uniformly to 4 keys (1-D values 1, 2, 3, 10; key 3 is the protected
    # window): full output 4. Best scores first, keys 2, 1, 0 join key 3: outputs 10, 6.5, 5, 4,
    # relative errors 1.5, 0.625, 0.25, 0.
    values = torch.tensor([[[1.0], [2.0], [3.0], [10.0]]])
    obs = LayerObservation(torch.zeros(1, 1, 1), torch.zeros(1, 4, 1), values)
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    protected = protected_positions(4, window=1, sink=0)
    assert tokens_for_output(obs, scores, protected, tolerance).tolist() == [expected]


@pytest.mark.parametrize(
    "floor, expected",
    [
        # A = 10: floor(10 / 2) = 5 per head pooled, 5 kept; the pool of 10 split 1:3 = 2.5 / 7.5,
        # the rounding tie goes to head 0
        (0, [[8, 12]]),
        # A = 3 above the floor 7: 1 pooled, 2 kept; the pool of 2 split 1:3 = 0.5 / 1.5
        (7, [[10, 10]]),
    ],
)
def test_headkv(floor, expected):
    inp = allocation_input(flat_scores(1, 2, 20), per_head=10, floor=floor)
    allocator = HeadKVAllocator(head_scores=torch.tensor([[1.0, 3.0]]), beta=2.0)
    assert allocator.allocate(inp).tolist() == expected


def test_headkv_official_default_beta():
    # beta 1.5: floor(10 / 1.5) = 6 of 10 pooled, 4 kept; the pool of 12 split 1:3 = 3 / 9
    inp = allocation_input(flat_scores(1, 2, 20), per_head=10)
    allocator = HeadKVAllocator(head_scores=torch.tensor([[1.0, 3.0]]))
    assert allocator.allocate(inp).tolist() == [[7, 13]]


def test_headkv_budget_pool_formula_of_the_official_code():
    # window 8 in a KV size of 64 per head: B = 56, pool = (56 // 1.5) * L * H = 37 * 4, each head
    # keeps 56 - 37 = 19 plus round(score * pool); scores normalised to sum 1 over all 4 heads
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    inp = allocation_input(flat_scores(2, 2, 200), per_head=64, floor=8)
    pool = 37 * 4
    official = [[8 + 19 + round(float(s) / 10 * pool) for s in row] for row in scores]
    assert official == [[42, 57], [71, 86]] and sum(map(sum, official)) == 64 * 4
    assert HeadKVAllocator(head_scores=scores).allocate(inp).tolist() == official


@pytest.mark.parametrize(
    "prefix_budget, groups, expected",
    [
        (14, 4, [20, 16, 12, 8]),  # last 14 * 8 // 14 = 8, first 28 - 8, steps of 12 // 3
        (100, 4, [143, 115, 87, 57]),  # last 57, first 143, steps of 86 // 3 = 28
        (100, 1, [100]),
        (14, 3, [20, 14, 8]),
    ],
)
def test_windowkv_group_budgets(prefix_budget, groups, expected):
    assert WindowKVAllocator().group_budgets(prefix_budget, groups) == expected


def test_windowkv_allocator_shares_a_budget_per_group_of_layers():
    # 8 layers in groups of 2, beta 3.5: last 14 * 2 / 3.5 = 8, first 20; floor 2 on top
    inp = allocation_input(flat_scores(8, 2, 40), per_head=16, floor=2)
    budgets = WindowKVAllocator(group_size=2, beta=3.5).allocate(inp)
    assert budgets.tolist() == [[22, 22]] * 2 + [[18, 18]] * 2 + [[14, 14]] * 2 + [[10, 10]] * 2


def test_windowkv_allocator_last_group_shorter():
    # 5 layers in groups of 2, 2, 1: group budgets 20, 14, 8 -> weights 20 20 14 14 8 (sum 76)
    # scaled to the exact total 70: 18.42 18.42 12.89 12.89 7.37 -> 19 18 13 13 7
    inp = allocation_input(flat_scores(5, 1, 40), per_head=14)
    assert WindowKVAllocator(group_size=2, beta=3.5).allocate(inp).tolist() == [[19], [18], [13], [13], [7]]


def test_windowkv_allocator_a_group_that_covers_the_prefix_gives_the_rest_away():
    # 4 layers in groups of 2, C = 10, beta 4: 15 15 5 5 -- but a head holds 12 tokens: the first
    # group keeps them all and its 3 + 3 spare go to the second
    inp = allocation_input(flat_scores(4, 1, 12), per_head=10)
    assert WindowKVAllocator(group_size=2, beta=4.0).allocate(inp).tolist() == [[12], [12], [8], [8]]


def test_headkv_zero_scores_split_evenly():
    inp = allocation_input(flat_scores(2, 2, 20), per_head=10)
    allocator = HeadKVAllocator(head_scores=torch.zeros(2, 2), beta=2.0)
    assert allocator.allocate(inp).tolist() == [[10, 10], [10, 10]]


def test_headkv_rejects_scores_of_another_model():
    inp = allocation_input(flat_scores(2, 3, 10), per_head=5)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\).*calibrate"):
        HeadKVAllocator(head_scores=torch.ones(2, 2)).allocate(inp)


def make_allocator(name: str, draw, shape: tuple[int, int]):
    if name == "windowkv":
        return WindowKVAllocator(group_size=draw(st.integers(1, 4)), beta=draw(st.floats(0.5, 30.0)))
    if name == "uniform":
        return UniformAllocator()
    if name == "pyramid":
        return PyramidAllocator(beta=draw(st.floats(1.01, 50.0)))
    if name == "adakv":
        return AdaKVAllocator(alpha=draw(st.floats(0.0, 1.0)))
    if name == "zigzag":
        return ZigZagAllocator(mass=draw(st.floats(0.05, 1.0)), min_fraction=draw(st.floats(0.0, 1.0)),
                               measure=draw(st.sampled_from(["lmba", "lmbo", "scores"])))
    head_scores = torch.tensor(draw(st.lists(st.floats(0.0, 10.0), min_size=shape[0] * shape[1],
                                             max_size=shape[0] * shape[1]))).reshape(shape)
    return HeadKVAllocator(head_scores=head_scores, beta=draw(st.floats(1.001, 4.0)))


@settings(max_examples=250, deadline=None)
@given(
    name=st.sampled_from(["uniform", "pyramid", "adakv", "zigzag", "headkv", "windowkv"]),
    num_layers=st.integers(1, 4),
    num_heads=st.integers(1, 4),
    seq_len=st.integers(1, 40),
    window=st.integers(0, 8),
    sink=st.integers(0, 4),
    budget=st.one_of(st.integers(1, 50).map(str), st.floats(0.01, 1.0).map(str)),
    score_kind=st.sampled_from(["random", "ties", "zeros"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_allocator_contract(make_layers, name, num_layers, num_heads, seq_len, window, sink, budget, score_kind,
                            seed, data):
    """Budgets are int64 [layers, heads], sum exactly to the total, each within [floor, seq_len],
    and the same inputs give the same budgets."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_heads, seq_len)
    scores = {
        "random": torch.rand(shape, generator=gen),
        "ties": torch.randint(0, 3, shape, generator=gen).float(),
        "zeros": torch.zeros(shape),
    }[score_kind]
    floor = min(seq_len, window + sink)
    per_head = Budget.parse(budget).per_head(seq_len, floor)
    protected = protected_positions(seq_len, window, sink)
    observations = make_layers(num_layers, num_heads, 2, seq_len, max(window, 1), seed=seed)
    inp = AllocationInput(list(scores), per_head, floor, protected, observations)
    allocator = make_allocator(name, data.draw, (num_layers, num_heads))

    budgets = allocator.allocate(inp)
    assert budgets.dtype == torch.int64 and budgets.shape == (num_layers, num_heads)
    assert int(budgets.sum()) == per_head * num_layers * num_heads
    assert int(budgets.min()) >= floor and int(budgets.max()) <= seq_len
    again = allocator.allocate(AllocationInput([s.clone() for s in scores], per_head, floor, protected.clone(),
                                               observations))
    assert torch.equal(budgets, again)
    if name in ("uniform", "pyramid", "zigzag", "windowkv"):  # per-layer allocators: heads of a layer within one unit
        assert int((budgets.max(1).values - budgets.min(1).values).max()) <= 1
    if name == "uniform":
        assert bool((budgets == per_head).all())
