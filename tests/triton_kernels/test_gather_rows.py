"""Triton gather_heads_padded vs. the PyTorch reference (interpreter on CPU, native on CUDA)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.gather_rows import gather_heads_padded

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("num_heads,width,extra", [(1, 1, 0), (5, 37, 3), (9, 70, 0), (3, 200, 17)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("cache_dtype,scales", [
    (torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
    (FP8, "layer"), (FP8, "per head"),  # heads of several layers: each its own layer's scales
], ids=str)
def test_matches_reference(num_heads, width, extra, head_dim, cache_dtype, scales, device, fp8_scales):
    """Heads of odd, different lengths (one of them empty, one as wide as the call) on shuffled
    pages, a table wider than they need; poisoned outputs: every element must be written."""
    gen = torch.Generator().manual_seed(num_heads * 1000 + width * 10 + head_dim)
    page = 16
    blocks_per_head = -(-(width + extra) // page)
    num_blocks = num_heads * blocks_per_head + 3
    k_cache, v_cache = (torch.randn(num_blocks, page, head_dim, generator=gen).to(cache_dtype).to(device)
                        for _ in range(2))
    table = torch.randperm(num_blocks, generator=gen)[: num_heads * blocks_per_head]
    table = table.view(num_heads, blocks_per_head).to(torch.int32).to(device)
    lengths = torch.randint(0, width + 1, (num_heads,), generator=gen)
    lengths[0] = width
    lengths[-1] = 0 if num_heads > 1 else lengths[-1]
    lengths = lengths.to(device)
    k_scale = v_scale = None
    if scales is not None:
        k_scale, v_scale = fp8_scales(gen, device, num_heads=num_heads if scales == "per head" else None)
    dtype = torch.float32 if scales is not None else cache_dtype
    out = tuple(torch.full((num_heads, width, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(2))
    keys, values = gather_heads_padded(k_cache, v_cache, table, lengths, width, k_scale, v_scale, out=out)
    assert keys.data_ptr() == out[0].data_ptr() and values.data_ptr() == out[1].data_ptr()
    for got, cache, scale in ((keys, k_cache, k_scale), (values, v_cache, v_scale)):
        want = reference.gather_heads_padded(cache, table, lengths, width, scale)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)  # a copy (and one float32 product) is exact
    fresh = gather_heads_padded(k_cache, v_cache, table, lengths, width, k_scale, v_scale)
    assert torch.equal(fresh[0], keys) and torch.equal(fresh[1], values)


def test_refuses_what_it_cannot_gather(device):
    cache = torch.randn(4, 16, 64, device=device)
    table = torch.zeros(2, 1, dtype=torch.int32, device=device)
    lengths = torch.tensor([3, 5], device=device)
    with pytest.raises(ValueError, match="power of two"):
        gather_heads_padded(cache[..., :48], cache[..., :48], table, lengths, 5)
    with pytest.raises(ValueError, match="one entry per head"):
        gather_heads_padded(cache, cache, table, lengths[:1], 5)
    with pytest.raises(ValueError, match="out must be"):
        gather_heads_padded(cache, cache, table, lengths, 5, out=(torch.empty(2, 4, 64, device=device),) * 2)
    with pytest.raises(ValueError, match="scales"):
        gather_heads_padded(cache, cache, table, lengths, 5, torch.ones(1, device=device), None)
