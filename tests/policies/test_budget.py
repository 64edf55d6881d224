"""Budget parsing and the exact integer split ``distribute`` (and ``distribute_rows``, row by row)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.policies.budget import Budget, distribute, distribute_rows

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize(
    "value, tokens, fraction",
    [
        (256, 256, None),
        ("256", 256, None),
        (" 64 ", 64, None),
        (1, 1, None),
        ("1", 1, None),
        (300.0, 300, None),  # a whole float above 1 is a count
        ("1e3", 1000, None),
        (0.1, None, 0.1),
        ("0.25", None, 0.25),
        (1.0, None, 1.0),  # 1.0 is the whole prompt, not one token
        ("1.0", None, 1.0),
    ],
)
def test_parse(value, tokens, fraction):
    budget = Budget.parse(value)
    assert (budget.tokens, budget.fraction) == (tokens, fraction)
    assert Budget.parse(budget) is budget


@pytest.mark.parametrize(
    "value",
    [0, -5, 0.0, -0.5, 1.5, "1.5", float("nan"), float("inf"), float("-inf"), "nan", "inf", True, False,
     "lots", "", "0x10", None, [256], object()],
)
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(value)


@pytest.mark.parametrize(
    "options",
    [{}, {"tokens": 4, "fraction": 0.5}, {"tokens": 2.5}, {"tokens": True}, {"fraction": True},
     {"fraction": "0.5"}, {"fraction": 0.0}, {"tokens": 0}],
)
def test_constructor_rejects(options):
    with pytest.raises(ValueError):
        Budget(**options)


@pytest.mark.parametrize(
    "budget, seq_len, floor, expected",
    [
        (Budget(tokens=10), 100, 0, 10),
        (Budget(tokens=10), 8, 0, 8),  # never more than the context
        (Budget(tokens=10), 100, 36, 36),  # never less than window + sinks
        (Budget(fraction=0.1), 100, 0, 10),
        (Budget(fraction=0.1), 125, 0, 12),  # round(12.5) = 12
        (Budget(fraction=0.1), 135, 0, 14),  # round(13.5) = 14
        (Budget(fraction=0.1), 100, 32, 32),
        (Budget(fraction=0.01), 20, 0, 0),
        (Budget(fraction=1.0), 77, 5, 77),
    ],
)
def test_per_head(budget, seq_len, floor, expected):
    assert budget.per_head(seq_len, floor) == expected


def test_str():
    assert str(Budget(tokens=256)) == "256"
    assert str(Budget(fraction=0.1)) == "0.1"


DISTRIBUTE_CASES = [
    ([1, 1, 2], 8, 0, 10, [2, 2, 4]),  # exact proportional split
    ([1, 1, 1], 10, 0, 10, [4, 3, 3]),  # rounding tie: the lower index gets the spare unit
    ([1, 1, 1], 11, 0, 10, [4, 4, 3]),
    ([0, 0, 0], 7, 1, 5, [3, 2, 2]),  # all-zero weights: even split
    ([1, 3], 10, 2, 5, [5, 5]),  # the capped share flows back to the other part
    ([1, 0, 0], 9, 0, 5, [5, 2, 2]),  # nothing left with weight: spread over zero-weight parts
    ([1, 0, 2], 6, 1, 10, [2, 1, 3]),  # zero weight stays at `low`
    ([-4, 1], 6, 0, 6, [0, 6]),  # negative weights count as zero
    ([2, 1, 1], 3, 1, 1, [1, 1, 1]),  # low == high: nothing to split
    ([8, 1, 1], 24, 2, 10, [10, 7, 7]),  # water-filling: 18 above low; 14.4 > 8 caps part 0
    ([3, 1], 7, 0, 7, [5, 2]),  # 5.25 / 1.75: the larger fraction gets the spare unit
]


@pytest.mark.parametrize("weights, total, low, high, expected", DISTRIBUTE_CASES)
def test_distribute_cases(weights, total, low, high, expected):
    result = distribute(torch.tensor(weights, dtype=torch.float32), total, low, high)
    assert result.dtype == torch.int64
    assert result.tolist() == expected


def test_distribute_keeps_shape():
    weights = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    result = distribute(weights, 24, 0, 24)
    assert result.shape == (2, 3)
    assert result.tolist() == [[2, 4, 6], [0, 0, 12]]


@pytest.mark.parametrize("total, low, high", [(2, 1, 5), (16, 1, 5), (5, 3, 2)])
def test_distribute_impossible(total, low, high):
    with pytest.raises(ValueError, match="cannot split"):
        distribute(torch.ones(3), total, low, high)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_distribute_rejects_non_finite(bad):
    with pytest.raises(ValueError, match="finite"):
        distribute(torch.tensor([1.0, bad]), 4, 0, 4)
    with pytest.raises(ValueError, match="finite"):  # in any row
        distribute_rows(torch.tensor([[1.0, 1.0], [1.0, bad]]), 4, 0, 4)


@pytest.mark.parametrize("totals, high, message", [([2, 9], 5, r"2 into 3 parts within \[1, 5\]"),
                                                    ([9, 16], 5, r"16 into 3 parts within \[1, 5\]"),
                                                    ([9, 9], torch.tensor([5, 2]), r"9 into 3 parts within \[1, 2\]")])
def test_distribute_rows_impossible(totals, high, message):
    with pytest.raises(ValueError, match=message):  # one row's total out of reach
        distribute_rows(torch.ones(2, 3), torch.tensor(totals), 1, high)


def water_fill_one_row(weights: torch.Tensor, total: int, low: int, high: int) -> torch.Tensor:
    """``distribute`` as it was before ``distribute_rows``: one row's water-filling in a loop of
    its own, the oracle that the batched rounds must match integer for integer. int64 [n]."""
    n = weights.numel()
    w = weights.reshape(-1).double().clamp(min=0)
    if w.sum() == 0:
        w = torch.ones_like(w)
    share = torch.zeros_like(w)
    capped = torch.zeros(n, dtype=torch.bool)
    remaining = float(total - low * n)
    room = float(high - low)
    while remaining > 1e-9:
        active = ~capped & (w > 0)
        if not active.any():
            active = ~capped
            w = torch.where(active, torch.ones_like(w), w)
        step = remaining * w * active / (w * active).sum()
        over = active & (share + step >= room)
        if over.any():
            remaining -= float((room - share[over]).sum())
            share[over] = room
            capped |= over
            continue
        share += step
        remaining = 0.0
    ints = share.floor()
    left = total - low * n - int(ints.sum())
    if left > 0:
        frac = torch.where(ints < room, share - ints, torch.full_like(share, -1.0))
        ints[torch.sort(-frac, stable=True).indices[:left]] += 1
    return ints.long() + low


def assert_rows_split_alone(weights: torch.Tensor, totals: list[int], low: int, high: int | list[int]) -> None:
    """distribute_rows == distribute of each row alone == the one-row loop, integer for integer.
    high: one cap for all rows, or each row's."""
    each_high = high if isinstance(high, list) else [high] * len(totals)
    result = distribute_rows(weights, torch.tensor(totals), low, torch.tensor(high) if isinstance(high, list) else high)
    assert result.dtype == torch.int64 and result.shape == weights.shape
    for row, total, row_high, split in zip(weights, totals, each_high, result):
        alone = distribute(row, total, low, row_high)
        assert split.tolist() == alone.tolist() == water_fill_one_row(row, total, low, row_high).tolist()


@pytest.mark.parametrize("weights, total, low, high, expected", DISTRIBUTE_CASES)
def test_distribute_rows_cases(weights, total, low, high, expected):
    """Each hand-computed case as a row beside others: the least total, its own, the most."""
    n = len(weights)
    rows = torch.tensor([weights] * 3, dtype=torch.float32)
    assert distribute_rows(rows, torch.tensor([low * n, total, high * n]), low, high).tolist() == [
        [low] * n, expected, [high] * n]
    assert distribute_rows(rows, total, low, high).tolist() == [expected] * 3  # an int: every row's total


def weight_rows(n: int):
    """One row of ``n`` weights: random, small integers (ties), zeros, or one heavy part (it caps)."""
    return st.one_of(
        st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n),
        st.just([0.0] * n),
        st.integers(0, n - 1).map(lambda heavy: [1000.0 if i == heavy else float(i % 2) for i in range(n)]),
    )


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 13), num_rows=st.integers(1, 6), low=st.integers(0, 20), room=st.integers(0, 40),
       caps_per_row=st.booleans(), data=st.data())
def test_distribute_rows_splits_each_row_alone(n, num_rows, low, room, caps_per_row, data):
    rows = data.draw(st.lists(weight_rows(n), min_size=num_rows, max_size=num_rows))
    rooms = [data.draw(st.integers(0, 40)) if caps_per_row else room for _ in range(num_rows)]
    # nothing above `low`, every part at the cap, or between
    totals = [data.draw(st.one_of(st.sampled_from([low * n, (low + r) * n]), st.integers(low * n, (low + r) * n)))
              for r in rooms]
    high = [low + r for r in rooms] if caps_per_row else low + room
    assert_rows_split_alone(torch.tensor(rows, dtype=torch.float64), totals, low, high)


@pytest.mark.parametrize("num_rows, n, low, high", [(32, 8, 0, 2016), (32, 8, 0, 300), (5, 257, 3, 40), (3, 1, 2, 9)])
@pytest.mark.parametrize("kind", ["spread", "skewed", "sparse"])
def test_distribute_rows_larger_shapes(num_rows, n, low, high, kind):
    """Ada-KV's layers (32 x 8 heads) and odd sizes; weights spread, skewed (caps bind) or sparse."""
    gen = torch.Generator().manual_seed(n + high)
    weights = torch.rand(num_rows, n, generator=gen, dtype=torch.float64)
    if kind == "skewed":
        weights = weights ** 12
    if kind == "sparse":
        weights = weights * (torch.rand(num_rows, n, generator=gen) < 0.2)
    totals = torch.randint(low * n, high * n + 1, (num_rows,), generator=gen).tolist()
    assert_rows_split_alone(weights, totals, low, high)


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(
        st.one_of(st.just(0.0), st.floats(0.0, 1e6, allow_nan=False), st.integers(0, 3).map(float)),
        min_size=1,
        max_size=12,
    ),
    low=st.integers(0, 20),
    room=st.integers(0, 40),
    data=st.data(),
)
def test_distribute_properties(weights, low, room, data):
    high = low + room
    n = len(weights)
    total = data.draw(st.integers(low * n, high * n))
    w = torch.tensor(weights, dtype=torch.float64)
    result = distribute(w, total, low, high)
    assert int(result.sum()) == total
    assert bool((result >= low).all()) and bool((result <= high).all())
    assert torch.equal(result, distribute(w.clone(), total, low, high))  # deterministic
    # More weight never gets less (up to one unit of rounding), unless it sits at the cap.
    at_cap = result == high
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j] and not at_cap[i]:
                assert int(result[i]) >= int(result[j]) - 1
    # Without caps the split is within one unit of the exact proportional share.
    if w.sum() > 0 and not bool(at_cap.any()):
        exact = (total - low * n) * w / w.sum() + low
        assert bool(((result - exact).abs() < 1 + 1e-6).all())


@pytest.mark.parametrize("value", [(1 << 24) + 1, 10**19, 1e300, "99999999999"])
def test_budget_beyond_any_context_is_refused(value):
    with pytest.raises(ValueError, match="at most"):
        Budget.parse(value)
