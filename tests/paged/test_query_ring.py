"""QueryRing.dense: each head's query heads' queries, oldest first, out of the ring."""
import pytest
import torch

from vllm_kvcompress.paged.query_ring import QueryRing


@pytest.mark.parametrize("window,slots,count", [(4, 4, 4), (5, 8, 3), (6, 6, 1)])
def test_dense_reads_each_heads_queries_oldest_first_around_its_window(window, slots, count):
    """A request's queries wrap around its policy's first ``window`` slots (the ring may be wider,
    for another policy's window); query c of head i is at position oldest[i] + c."""
    gen = torch.Generator().manual_seed(window * 10 + slots)
    layers_, rows_, kv_heads, group, head_dim = 3, 4, 2, 3, 8
    ring = torch.randn(layers_, rows_, slots, kv_heads * group, head_dim, generator=gen)
    layers, rows, heads = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 1, 0, 3]), torch.tensor([1, 0, 1, 0])
    oldest = torch.tensor([0, window - 1, 17, 2 * window + 1])  # positions past the window wrap
    got = QueryRing(ring, layers, rows, heads, oldest, count, window, group).dense()
    assert got.shape == (4, group, count, head_dim)
    for i in range(4):
        for g in range(group):
            for c in range(count):
                slot = (int(oldest[i]) + c) % window
                assert torch.equal(got[i, g, c], ring[layers[i], rows[i], slot, heads[i] * group + g])


def test_starts_are_the_element_offsets_of_each_heads_first_query_head():
    ring = torch.zeros(2, 3, 4, 6, 8)
    heads = QueryRing(ring, torch.tensor([1, 0]), torch.tensor([2, 1]), torch.tensor([2, 1]), torch.tensor([0, 0]),
                      count=2, window=4, group=2)
    flat = ring.view(-1)
    for i, start in enumerate(heads.starts().tolist()):
        flat.zero_()
        ring[heads.layers[i], heads.rows[i], 0, heads.heads[i] * 2, 0] = 1.0
        assert flat[start] == 1.0
