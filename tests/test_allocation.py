"""Allocators on hand-computable splits, and their shared contract under hypothesis."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.allocation import (
    AdaKVAllocator,
    AllocationInput,
    HeadKVAllocator,
    PyramidAllocator,
    UniformAllocator,
    ZigZagAllocator,
    tokens_for_mass,
)
from vllm_kvcompress.budget import Budget
from vllm_kvcompress.reduction import protected_positions

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
    assert ZigZagAllocator(mass=0.5, min_fraction=min_fraction).allocate(inp).tolist() == expected


def test_zigzag_heads_of_a_layer_share_the_mean_need():
    # layer 0 needs 1 and 3 tokens (mean 2), layer 1 needs 2 and 2: equal layers.
    scores = [
        [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]],
        [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]],
    ]
    inp = allocation_input(scores, per_head=2)
    assert ZigZagAllocator(mass=1.0, min_fraction=0.0).allocate(inp).tolist() == [[2, 2], [2, 2]]


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


def test_headkv_paper_beta_pools_nearly_everything():
    # beta 1.005: floor(10 / 1.005) = 9 of 10 pooled, 1 kept; the pool of 18 split 1:3 = 4.5 / 13.5
    inp = allocation_input(flat_scores(1, 2, 20), per_head=10)
    allocator = HeadKVAllocator(head_scores=torch.tensor([[1.0, 3.0]]))
    assert allocator.allocate(inp).tolist() == [[6, 14]]


def test_headkv_zero_scores_split_evenly():
    inp = allocation_input(flat_scores(2, 2, 20), per_head=10)
    allocator = HeadKVAllocator(head_scores=torch.zeros(2, 2), beta=2.0)
    assert allocator.allocate(inp).tolist() == [[10, 10], [10, 10]]


def test_headkv_rejects_scores_of_another_model():
    inp = allocation_input(flat_scores(2, 3, 10), per_head=5)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\).*calibrate"):
        HeadKVAllocator(head_scores=torch.ones(2, 2)).allocate(inp)


def make_allocator(name: str, draw, shape: tuple[int, int]):
    if name == "uniform":
        return UniformAllocator()
    if name == "pyramid":
        return PyramidAllocator(beta=draw(st.floats(1.01, 50.0)))
    if name == "adakv":
        return AdaKVAllocator(alpha=draw(st.floats(0.0, 1.0)))
    if name == "zigzag":
        return ZigZagAllocator(mass=draw(st.floats(0.05, 1.0)), min_fraction=draw(st.floats(0.0, 1.0)))
    head_scores = torch.tensor(draw(st.lists(st.floats(0.0, 10.0), min_size=shape[0] * shape[1],
                                             max_size=shape[0] * shape[1]))).reshape(shape)
    return HeadKVAllocator(head_scores=head_scores, beta=draw(st.floats(1.001, 4.0)))


@settings(max_examples=250, deadline=None)
@given(
    name=st.sampled_from(["uniform", "pyramid", "adakv", "zigzag", "headkv"]),
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
def test_allocator_contract(name, num_layers, num_heads, seq_len, window, sink, budget, score_kind, seed, data):
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
    inp = AllocationInput(list(scores), per_head, floor, protected)
    allocator = make_allocator(name, data.draw, (num_layers, num_heads))

    budgets = allocator.allocate(inp)
    assert budgets.dtype == torch.int64 and budgets.shape == (num_layers, num_heads)
    assert int(budgets.sum()) == per_head * num_layers * num_heads
    assert int(budgets.min()) >= floor and int(budgets.max()) <= seq_len
    again = allocator.allocate(AllocationInput([s.clone() for s in scores], per_head, floor, protected.clone()))
    assert torch.equal(budgets, again)
    if name in ("uniform", "pyramid", "zigzag"):  # per-layer allocators: heads of a layer within one unit
        assert int((budgets.max(1).values - budgets.min(1).values).max()) <= 1
    if name == "uniform":
        assert bool((budgets == per_head).all())
