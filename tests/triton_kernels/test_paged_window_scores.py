"""paged_window_scores kernel vs reference.paged_window_scores (interpreter on CPU, native on GPU)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.paged.query_ring import QueryRing
from vllm_kvcompress.triton_kernels.paged_window_scores import paged_window_scores

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
BS = 16


def heads_in_pages(lengths: list[int], head_dim: int, dtype, device, gen, k_scale=None):
    """A shuffled pool holding one head per entry of ``lengths``: (key_cache, table [n, max_blocks]);
    with k_scale, an fp8 pool of random keys quantized with it."""
    blocks = [-(-n // BS) for n in lengths]
    order = torch.randperm(sum(blocks) + 3, generator=gen)[: sum(blocks)]  # scattered, not all used
    keys = 2 * torch.randn(sum(blocks) + 3, BS, head_dim, generator=gen)
    key_cache = reference.quantize(keys, None if k_scale is None else k_scale.cpu(), dtype).to(device)
    table = torch.zeros(len(lengths), max(blocks) + 2, dtype=torch.int32)
    start = 0
    for i, b in enumerate(blocks):
        table[i, :b] = order[start:start + b]
        start += b
    return key_cache, table.to(device)


def run_case(device, lengths, group, count, head_dim, dtype, power, width_extra=0, strided=False, k_scale=None):
    """Kernel against reference on random inputs; with k_scale, over an fp8 key cache."""
    gen = torch.Generator().manual_seed(sum(lengths) * 7 + group + head_dim)
    cache_dtype = dtype if k_scale is None else torch.float8_e4m3fn
    # the pool quantized with one scale; with one per head, each head reads its bytes with its own
    pool_scale = None if k_scale is None else k_scale[:1]
    key_cache, table = heads_in_pages(lengths, head_dim, cache_dtype, device, gen, pool_scale)
    n = len(lengths)
    if strided:  # the ring's layout: [n, count, group, D] viewed as [n, group, count, D]
        queries = torch.randn(n, count, group, head_dim, generator=gen).to(dtype).to(device).transpose(1, 2)
    else:
        queries = torch.randn(n, group, count, head_dim, generator=gen).to(dtype).to(device)
    width = max(lengths) + width_extra
    lens = torch.tensor(lengths, device=device)
    out = torch.full((n, width), float("nan"), device=device)  # poisoned: every column must be written
    paged_window_scores(queries, key_cache, table, lens, width, power=power, out=out, k_scale=k_scale)
    ref = reference.paged_window_scores(queries.cpu(), key_cache.cpu(), table.cpu(), lens.cpu(), width, power=power,
                                        k_scale=None if k_scale is None else k_scale.cpu())
    assert not out.isnan().any()
    pad = torch.arange(width)[None, :] < (width - torch.tensor(lengths))[:, None]
    assert (out.cpu()[pad] == 0).all()
    err = ((out.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOL[dtype], err


# (lengths, group, count, head_dim, dtype, power, width_extra, strided)
CPU_CASES = [
    ([40, 17, 33], 4, 8, 64, torch.float32, 1, 0, False),
    ([70], 1, 5, 64, torch.bfloat16, 2, 3, True),
    ([16, 16], 8, 16, 128, torch.float16, 1, 0, False),  # heads exactly one page, count = length
    ([97, 50, 21, 64], 2, 3, 64, torch.float32, 2, 0, True),
    ([130, 35], 8, 20, 64, torch.bfloat16, 1, 0, False),  # 160 query rows: two row blocks
]
GPU_CASES = CPU_CASES + [
    ([1700] * 64 + [1650, 1690], 4, 32, 128, torch.bfloat16, 1, 0, True),  # Llama-3-8B heads due together
    ([1701, 333, 2049], 4, 32, 128, torch.bfloat16, 2, 5, True),
    ([900, 901], 8, 32, 128, torch.float16, 1, 0, False),
    ([4100], 1, 64, 64, torch.float32, 1, 0, False),
]


@pytest.mark.parametrize("case", GPU_CASES if torch.cuda.is_available() else CPU_CASES, ids=str)
@pytest.mark.parametrize("cache", ["query dtype", "fp8", "fp8 per head"])
def test_paged_window_scores_match_reference(device, case, cache, fp8_scales):
    """fp8: one layer's key scale; per head: each head's own (heads of several layers)."""
    k_scale = None
    if cache != "query dtype":
        num_heads = len(case[0]) if cache == "fp8 per head" else None
        k_scale = fp8_scales(torch.Generator().manual_seed(len(case[0])), device, 1, num_heads)[0]
    run_case(device, *case, k_scale=k_scale)


# (lengths, group, count, window, head_dim, dtype, power)
RING_CASES = [
    ([40, 17, 33, 25], 4, 8, 8, 64, torch.float32, 1),
    ([70, 9], 2, 5, 7, 64, torch.bfloat16, 2),  # count < window: the oldest queries are not read
    ([130, 35, 64], 8, 20, 20, 64, torch.bfloat16, 1),  # 160 query rows: two row blocks
]
GPU_RING_CASES = RING_CASES + [([270] * 200 + [333, 271], 4, 32, 32, 128, torch.bfloat16, 1)]  # a long-gen tick


@pytest.mark.parametrize("case", GPU_RING_CASES if torch.cuda.is_available() else RING_CASES, ids=str)
def test_queries_read_in_place_from_a_ring_score_as_their_copy(device, case):
    """A QueryRing (heads of several layers and requests, queries wrapping around the window,
    a ring wider than it) gives the scores of the same queries copied out, poisoned output."""
    lengths, group, count, window, head_dim, dtype, power = case
    n = len(lengths)
    gen = torch.Generator().manual_seed(n * 13 + count)
    key_cache, table = heads_in_pages(lengths, head_dim, dtype, device, gen)
    layers_, rows_, kv_heads = 3, 5, 2
    ring = torch.randn(layers_, rows_, window + 3, kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    queries = QueryRing(ring, torch.randint(0, layers_, (n,), generator=gen).to(device),
                        torch.randint(0, rows_, (n,), generator=gen).to(device),
                        torch.randint(0, kv_heads, (n,), generator=gen).to(device),
                        torch.randint(0, 4 * window, (n,), generator=gen).to(device), count, window, group)
    width, lens = max(lengths), torch.tensor(lengths, device=device)
    out = torch.full((n, width), float("nan"), device=device)
    paged_window_scores(queries, key_cache, table, lens, width, power=power, out=out)
    copied = paged_window_scores(queries.dense(), key_cache, table, lens, width, power=power)
    ref = reference.paged_window_scores(queries.dense().cpu(), key_cache.cpu(), table.cpu(), lens.cpu(), width,
                                        power=power)
    assert not out.isnan().any()
    torch.testing.assert_close(out, copied, rtol=0, atol=0)  # the same arithmetic on the same values
    err = ((out.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOL[dtype], err


def test_reference_equals_window_scores_of_each_head_alone():
    """The right-aligned reference is each head's own window_scores, placed at its end."""
    gen = torch.Generator().manual_seed(3)
    lengths = [30, 19]
    key_cache, table = heads_in_pages(lengths, 8, torch.float32, "cpu", gen)
    queries = torch.randn(2, 2, 4, 8, generator=gen)
    got = reference.paged_window_scores(queries, key_cache, table, torch.tensor(lengths), 32)
    for i, n in enumerate(lengths):
        keys = reference.gather_heads(key_cache, table[i:i + 1], n)
        alone = reference.window_scores(queries[i], keys)[0]
        torch.testing.assert_close(got[i, 32 - n:], alone)
        assert (got[i, :32 - n] == 0).all()


def test_reference_per_head_scales_are_each_heads_own(fp8_scales):
    """Heads of several layers in one call: each scored as if alone with its own layer's scale."""
    gen = torch.Generator().manual_seed(4)
    lengths = [30, 19, 25]
    key_cache, table = heads_in_pages(lengths, 8, torch.float8_e4m3fn, "cpu", gen, torch.tensor([0.05]))
    (scales,) = fp8_scales(gen, "cpu", 1, len(lengths))
    queries = torch.randn(3, 2, 4, 8, generator=gen)
    got = reference.paged_window_scores(queries, key_cache, table, torch.tensor(lengths), 32, k_scale=scales)
    for i, n in enumerate(lengths):
        alone = reference.paged_window_scores(queries[i:i + 1], key_cache, table[i:i + 1], torch.tensor([n]), 32,
                                              k_scale=scales[i:i + 1])
        torch.testing.assert_close(got[i], alone[0])


def test_shapes_are_checked(device):
    key_cache = torch.zeros(4, BS, 64, device=device)
    with pytest.raises(ValueError, match="shapes do not match"):
        paged_window_scores(torch.zeros(2, 1, 4, 64, device=device), key_cache,
                            torch.zeros(3, 2, dtype=torch.int32, device=device), torch.tensor([8, 8], device=device), 8)
    with pytest.raises(ValueError, match="power"):
        paged_window_scores(torch.zeros(1, 1, 4, 64, device=device), key_cache,
                            torch.zeros(1, 2, dtype=torch.int32, device=device), torch.tensor([8], device=device), 8,
                            power=3)
