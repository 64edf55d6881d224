"""The plugin's CPU attention paths against the plain per-head references (random inputs)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.vllm import kernels


@pytest.mark.parametrize("num_seqs,num_queries,num_kv_heads,group,block_size,max_len",
                         [(1, 1, 1, 1, 16, 5), (3, 1, 2, 4, 16, 37), (4, 2, 3, 3, 8, 50), (2, 3, 4, 1, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_decode_attention_matches_reference(num_seqs, num_queries, num_kv_heads, group, block_size,
                                                   max_len, dtype):
    gen = torch.Generator().manual_seed(num_seqs * 100 + max_len)
    head_dim, max_blocks = 16, -(-max_len // block_size) + 1
    num_blocks = num_seqs * num_kv_heads * max_blocks + 3
    key_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype)
    # every head its own shuffled pages and its own length (>= num_queries: the new rows are cached)
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * num_kv_heads * max_blocks]
    table = table.view(num_seqs, num_kv_heads, max_blocks).int()
    lens = torch.randint(num_queries, max_len + 1, (num_seqs, num_kv_heads), generator=gen).int()
    query = torch.randn(num_seqs, num_queries, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    expected = reference.decode_attention(query, key_cache, value_cache, table, lens, scale=0.3)
    got = kernels.padded_decode_attention(query, key_cache, value_cache, table, lens, 0.3)
    assert got.dtype == dtype and got.shape == expected.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("head_size", [16, 64, 128, 256])
def test_gpu_head_sizes_the_kernels_tile_are_accepted(head_size):
    kernels.check_head_size(head_size, "cuda")
    kernels.check_head_size(head_size, "cpu")


@pytest.mark.parametrize("head_size", [8, 80, 96, 112])
def test_other_head_sizes_are_refused_on_a_gpu_only(head_size):
    with pytest.raises(ValueError, match=f"power-of-two head size >= 16; this model's attention heads have {head_size}"):
        kernels.check_head_size(head_size, "cuda")
    kernels.check_head_size(head_size, "cpu")  # the PyTorch paths take any size


def test_column_mass_on_the_cpu_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(6, 9, 16, generator=gen), torch.randn(2, 30, 16, generator=gen)
    from vllm_kvcompress.observation import causal_column_mass

    torch.testing.assert_close(kernels.column_mass(query, key, start=21), causal_column_mass(query, key, start=21),
                               rtol=0, atol=0)
