"""Triton write_tokens vs. the PyTorch reference (interpreter on CPU, native on CUDA)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.write_tokens import write_tokens

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("num_tokens,num_kv_heads", [(1, 8), (37, 2), (5, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype,cache_dtype,scales", [
    (torch.float32, torch.float32, None), (torch.bfloat16, torch.bfloat16, None), (torch.float16, torch.float16, None),
    (torch.float32, torch.bfloat16, None),  # rows are cast to the cache's dtype
    # quantized with the layer's scales, or with each head's own (heads of several layers)
    (torch.float32, FP8, "layer"), (torch.bfloat16, FP8, "layer"), (torch.float16, FP8, "layer"),
    (torch.bfloat16, FP8, "per head"),
], ids=str)
def test_matches_reference(num_tokens, num_kv_heads, head_dim, dtype, cache_dtype, scales, device, fp8_scales):
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_kv_heads * 10 + head_dim)
    block_size, num_blocks = 16, 13
    # Key and value as slices of one fused tensor: strided in the token dim.
    kv = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen)
    if scales is None:
        scales = [None, None]
    else:
        scales = fp8_scales(gen, device, num_heads=num_kv_heads if scales == "per head" else None)
        # rows of magnitudes 1e-4..10: fp8 subnormals, and values saturating at 448 * scale
        kv = kv * 10 ** (5 * torch.rand(num_tokens, 2 * num_kv_heads + 1, 1, generator=gen) - 4)
    kv = kv.to(dtype).to(device)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads + 1 :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[: num_tokens * num_kv_heads]
    slots = slots.view(num_tokens, num_kv_heads).clone()
    slots[torch.rand(slots.shape, generator=gen) < 0.3] = -1  # evicted rows are skipped
    slots = slots.to(device)
    k_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(cache_dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(cache_dtype).to(device)
    if cache_dtype == FP8:  # poisoned: NaN everywhere, so rows the kernel skips or misses show
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_tokens(key, value, slots, k_ref, v_ref, *scales)
    write_tokens(key, value, slots, k_cache, v_cache, *scales)
    if cache_dtype == FP8:  # both quantize the same way: the same bytes, none of them NaN where written
        written = (slots >= 0).sum().item() * head_dim
        for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            assert got.float().isnan().sum().item() == got.numel() - written
        return
    # A copy must be bit-exact; untouched rows stay as they were. A cast rounds to nearest on the
    # GPU (bit-exact too), but Triton's interpreter truncates: allow one bf16 ulp there.
    exact = dtype == cache_dtype or device == "cuda"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(k_cache, k_ref, **tol)
    torch.testing.assert_close(v_cache, v_ref, **tol)


def test_all_skipped_and_empty(device):
    k_cache = torch.randn(2, 16, 64, device=device)
    before = k_cache.clone()
    key = torch.randn(3, 2, 64, device=device)
    write_tokens(key, key, torch.full((3, 2), -1, device=device), k_cache, k_cache)
    write_tokens(key[:0], key[:0], torch.zeros(0, 2, dtype=torch.long, device=device), k_cache, k_cache)
    assert torch.equal(k_cache, before)
