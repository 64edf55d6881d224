"""HeadwiseLayer, the dense per-head variable-length cache, on cases small enough to spell out.

Rows are tagged so that a test can tell which token sits where: ``row(t)`` is the key ``[t, t]`` and
its value is ``-row(t)``; padding rows are zero.
"""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.reference.headwise_cache import HeadwiseLayer
from vllm_kvcompress.policies.reduction import RetainedLayer

HEAD_DIM = 2


def rows(*tags: float) -> torch.Tensor:
    """[len(tags), HEAD_DIM] rows whose entries are all the tag."""
    return torch.tensor(tags, dtype=torch.float32)[:, None].expand(-1, HEAD_DIM).clone()


def layer_of(heads: list[list[float]], width: int | None = None) -> HeadwiseLayer:
    """A HeadwiseLayer whose head h holds rows(*heads[h]), zero-padded to ``width``."""
    width = max(len(h) for h in heads) if width is None else width
    keys = torch.zeros(len(heads), width, HEAD_DIM)
    for h, tags in enumerate(heads):
        keys[h, : len(tags)] = rows(*tags)
    return HeadwiseLayer(keys, -keys, torch.tensor([len(h) for h in heads]))


def tags_of(layer: HeadwiseLayer) -> list[list[float]]:
    """Each head's valid rows as tags, checking that keys and values agree and padding is zero."""
    out = []
    for h in range(layer.keys.shape[0]):
        keys, values = layer.head(h)
        assert torch.equal(values, -keys)
        assert (keys[:, 0:1] == keys).all()  # every entry of a row is its tag
        n = int(layer.lengths[h])
        assert not layer.keys[h, n:].any() and not layer.values[h, n:].any()
        out.append(keys[:, 0].tolist())
    return out


def test_full_holds_every_row_in_every_head():
    keys = torch.randn(3, 5, HEAD_DIM)
    layer = HeadwiseLayer.full(keys, -keys)
    assert layer.lengths.tolist() == [5, 5, 5] and layer.lengths.dtype == torch.long
    assert layer.uniform and layer.retained_tokens == 15
    assert layer.valid_mask().all()
    assert torch.equal(layer.head(1)[0], keys[1])


def test_from_retained_trims_padding_casts_and_copies_lengths():
    keys = torch.zeros(2, 4, HEAD_DIM, dtype=torch.float64)
    keys[0, :3] = rows(1, 2, 3).double()
    keys[1, :1] = rows(7).double()
    lengths = torch.tensor([3, 1])
    retained = RetainedLayer(torch.tensor([[1, 2, 3, -1], [7, -1, -1, -1]]), keys, -keys, lengths)
    layer = HeadwiseLayer.from_retained(retained, torch.float32)
    assert layer.keys.shape == (2, 3, HEAD_DIM)  # width = the longest head, not the padded 4
    assert layer.keys.dtype == layer.values.dtype == torch.float32
    assert tags_of(layer) == [[1, 2, 3], [7]]
    lengths[0] = 0  # the layer owns its lengths: it grows them in place during decode
    assert layer.lengths.tolist() == [3, 1]


def test_valid_mask_marks_each_heads_rows():
    layer = layer_of([[1, 2, 3], [4], []])
    assert layer.valid_mask().tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert not layer.uniform
    assert layer.retained_tokens == 4


def test_append_to_a_uniform_layer_concatenates():
    layer = layer_of([[1, 2], [3, 4]])
    assert layer.uniform
    layer.append(rows(5, 6), -rows(5, 6))
    assert tags_of(layer) == [[1, 2, 5], [3, 4, 6]]
    assert layer.keys.shape[1] == 3 and layer.lengths.tolist() == [3, 3] and layer.uniform


def test_append_grows_the_width_only_when_the_longest_head_needs_it():
    layer = layer_of([[1, 2, 3], [4]])
    layer.append(rows(5, 6), -rows(5, 6))  # the longest head is full: one more column
    assert layer.keys.shape[1] == 4
    assert tags_of(layer) == [[1, 2, 3, 5], [4, 6]]
    layer = layer_of([[1, 2], [4]], width=3)  # a spare column: written in place
    layer.append(rows(5, 6), -rows(5, 6))
    assert layer.keys.shape[1] == 3
    assert tags_of(layer) == [[1, 2, 5], [4, 6]]


def test_append_casts_to_the_cache_dtype():
    layer = layer_of([[1, 2], [3]])
    layer.keys, layer.values = layer.keys.double(), layer.values.double()
    layer.append(rows(5, 6), -rows(5, 6))
    assert layer.keys.dtype == layer.values.dtype == torch.float64
    assert tags_of(layer) == [[1, 2, 5], [3, 6]]


def test_replace_head_shrinks_the_width_to_the_longest_head():
    layer = layer_of([[1, 2, 3, 4], [5, 6]])
    layer.replace_head(0, rows(2, 4), -rows(2, 4))
    assert tags_of(layer) == [[2, 4], [5, 6]]
    assert layer.keys.shape[1] == 2 and layer.uniform


def test_replace_head_keeps_the_width_while_another_head_is_longer():
    layer = layer_of([[1, 2, 3], [5, 6, 7, 8]])
    layer.replace_head(0, rows(3), -rows(3))
    assert tags_of(layer) == [[3], [5, 6, 7, 8]]
    assert layer.keys.shape[1] == 4 and layer.lengths.tolist() == [1, 4]


def test_head_returns_only_valid_rows():
    layer = layer_of([[1, 2, 3], [4]])
    keys, values = layer.head(1)
    assert torch.equal(keys, rows(4)) and torch.equal(values, -rows(4))


# Any sequence of appends and head replacements keeps the cache equal to a plain list per head,
# with the width equal to the longest head and zeros past each head's length.
operations = st.lists(
    st.one_of(
        st.just(("append",)),
        st.tuples(st.just("replace"), st.integers(0, 3), st.lists(st.booleans(), max_size=12)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(start=st.lists(st.integers(0, 4), min_size=1, max_size=4), ops=operations)
def test_any_operation_sequence_matches_lists_per_head(start, ops):
    counter = iter(range(1, 10_000))
    expected = [[float(next(counter)) for _ in range(n)] for n in start]
    layer = layer_of(expected)
    for op in ops:
        if op[0] == "append":
            new = [float(next(counter)) for _ in expected]
            layer.append(rows(*new), -rows(*new))
            expected = [head + [tag] for head, tag in zip(expected, new)]
        else:
            _, h, keep = op
            h %= len(expected)
            kept = [tag for tag, k in zip(expected[h], keep) if k]
            layer.replace_head(h, rows(*kept), -rows(*kept))
            expected[h] = kept
        assert tags_of(layer) == expected
        assert layer.keys.shape[1] == max(len(head) for head in expected)
        assert layer.valid_mask().sum(1).tolist() == [len(head) for head in expected]
        assert layer.uniform == (len({len(head) for head in expected}) == 1)
