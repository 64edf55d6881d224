"""Triton decode attention vs. the PyTorch reference (interpreter on CPU, native on CUDA)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.paged.layout import cdiv
from vllm_kvcompress.triton_kernels.decode_attention import decode_attention

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
FP8 = torch.float8_e4m3fn


def make_inputs(lengths, num_queries, group, head_dim, dtype, device, block_size=16, gen=None, scales=None):
    """Random paged inputs: every head's blocks are a shuffled, non-contiguous set of pool blocks.

    lengths: int [num_seqs, num_kv_heads]. The query is a strided slice of a wider tensor (as a
    fused QKV projection gives), and table entries past each head's blocks hold an out-of-range
    block id, so reading one faults or fails the comparison. With scales (k_scale, v_scale) the
    caches are fp8, random values quantized with them.
    """
    num_seqs, num_kv_heads = lengths.shape
    need = [[cdiv(int(n), block_size) for n in row] for row in lengths]
    max_blocks = max(max(r) for r in need) + 1
    num_blocks = 2 * sum(sum(r) for r in need) + 3  # spare blocks: ids are scattered over the pool
    ids = torch.randperm(num_blocks, generator=gen)
    table = torch.full((num_seqs, num_kv_heads, max_blocks), 2**30, dtype=torch.int32)
    used = 0
    for s in range(num_seqs):
        for h in range(num_kv_heads):
            table[s, h, : need[s][h]] = ids[used : used + need[s][h]].int()
            used += need[s][h]
    key = torch.randn(num_blocks, block_size, head_dim, generator=gen)
    value = torch.randn(num_blocks, block_size, head_dim, generator=gen)
    if scales is None:
        key, value = key.to(dtype), value.to(dtype)
    else:
        key, value = (reference.quantize(x, s.cpu(), FP8) for x, s in zip((key, value), scales))
    wide = torch.randn(num_seqs, num_queries, num_kv_heads * group + 5, head_dim, generator=gen).to(dtype)
    query = wide[:, :, 2 : 2 + num_kv_heads * group]  # non-contiguous in the head and seq dims
    to = dict(device=device)
    return query.to(**to), key.to(**to), value.to(**to), table.to(**to), lengths.int().to(**to)


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def check(lengths, num_queries, group, head_dim, dtype, device, num_splits=None, scale=None, seed=0, fp8=None):
    """Kernel against reference on random inputs; fp8: the fp8_scales builder, for fp8 caches."""
    gen = torch.Generator().manual_seed(seed)
    scales = None if fp8 is None else fp8(gen, device)
    q, k, v, table, lens = make_inputs(lengths, num_queries, group, head_dim, dtype, device, gen=gen, scales=scales)
    k_scale, v_scale = scales or (None, None)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)  # every element must be written
    res = decode_attention(q, k, v, table, lens, scale=scale, out=out, num_splits=num_splits,
                           k_scale=k_scale, v_scale=v_scale)
    assert res is out
    assert not out.isnan().any()
    # The reference in fp32 on the upcast (or dequantized) inputs: our error is measured against the exact result.
    table_ref = torch.where(table == 2**30, 0, table)
    if fp8 is None:
        k, v = k.float(), v.float()
    ref = reference.decode_attention(q.float(), k, v, table_ref, lens, scale=scale, k_scale=k_scale, v_scale=v_scale)
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e}"


def random_lengths(num_seqs, num_kv_heads, low, high, gen):
    return torch.randint(low, high + 1, (num_seqs, num_kv_heads), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("cache", ["query dtype", "fp8"])
def test_matches_reference(dtype, group, head_dim, num_queries, cache, device, fp8_scales):
    gen = torch.Generator().manual_seed(hash((group, head_dim, num_queries)) % 2**31)
    # Odd lengths, non-multiples of the block size, a one-block head, a head of just the queries.
    lengths = random_lengths(2, 2, num_queries, 90, gen)
    lengths[0, 0], lengths[1, 1] = num_queries, 33
    check(lengths, num_queries, group, head_dim, dtype, device, fp8=fp8_scales if cache == "fp8" else None)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("cache", ["query dtype", "fp8"])
def test_split_k(num_splits, num_queries, cache, device, fp8_scales):
    """Split-K: shares of uneven head lengths, including splits that get no tokens at all."""
    lengths = torch.tensor([[150, 3], [64, 97]])
    check(lengths, num_queries, 4, 64, torch.bfloat16, device, num_splits=num_splits,
          fp8=fp8_scales if cache == "fp8" else None)


def test_scale_and_default_out(device):
    gen = torch.Generator().manual_seed(1)
    q, k, v, table, lens = make_inputs(torch.tensor([[45, 17]]), 1, 2, 64, torch.float32, device, gen=gen)
    out = decode_attention(q, k, v, table, lens, scale=0.3)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference.decode_attention(q, k, v, torch.where(table == 2**30, 0, table), lens, scale=0.3)
    assert rel_err(out, ref) <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes only natively on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("group,head_dim", [(4, 128), (8, 64), (1, 128)])
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("cache", ["query dtype", "fp8"])
def test_large_gpu(dtype, group, head_dim, num_queries, cache, fp8_scales):
    """Long, uneven heads with the default split-K heuristic (several splits per head)."""
    gen = torch.Generator().manual_seed(7)
    lengths = random_lengths(4, 8, num_queries, 5000, gen)
    lengths[0, 0] = 8191
    check(lengths, num_queries, group, head_dim, dtype, "cuda", fp8=fp8_scales if cache == "fp8" else None)
