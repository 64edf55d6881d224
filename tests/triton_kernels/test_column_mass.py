"""Triton causal column mass vs. the PyTorch reference (interpreter on CPU, native on CUDA)."""
import pytest
import torch

from vllm_kvcompress.policies.observation import causal_column_mass, causal_row_lse as row_lse
from vllm_kvcompress.triton_kernels.column_mass import column_mass

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def check(num_kv_heads, group, q_len, seq_len, start, head_dim, dtype, device, seed=0, **blocks):
    gen = torch.Generator().manual_seed(seed)
    # strided views, as the backend passes them (queries of a [T, Hq, D] tensor, transposed)
    query = torch.randn(q_len, num_kv_heads * group, head_dim, generator=gen).to(dtype).transpose(0, 1)
    key = (torch.randn(seq_len, num_kv_heads, head_dim, generator=gen) * 2).to(dtype).transpose(0, 1)
    out = torch.full((num_kv_heads, seq_len), float("nan"), device=device)  # every element must be written
    mass = column_mass(query.to(device), key.to(device), start, out, **blocks)
    assert mass is out
    ref = causal_column_mass(query.float(), key.float(), start=start)  # fp32 on the upcast inputs
    assert mass.shape == ref.shape and mass.dtype == torch.float32
    assert not mass.isnan().any()
    err = ((mass.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOL[dtype], f"rel err {err:.2e}"
    # each query row's probabilities sum to one: the total mass is the number of (query, q-head) pairs
    torch.testing.assert_close(mass.sum().cpu(), torch.tensor(float(q_len * num_kv_heads * group)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,group", [(1, 1), (2, 4), (3, 3)])
@pytest.mark.parametrize("q_len,seq_len,start", [
    (1, 1, 0),            # a single token
    (37, 37, 0),          # a whole odd-sized prompt
    (130, 130, 0),        # more than two blocks of queries and keys
    (45, 200, 155),       # a later prefill chunk over the cache so far
    (20, 90, 40),         # keys past the last query get no mass
])
def test_column_mass_matches_reference(num_kv_heads, group, q_len, seq_len, start, dtype, device):
    check(num_kv_heads, group, q_len, seq_len, start, 32, dtype, device)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_column_mass_head_dims(head_dim, device):
    check(2, 2, 70, 100, 30, head_dim, torch.bfloat16, device, seed=head_dim)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64), (64, 16)])
def test_column_mass_tile_shapes(block_m, block_n, device):
    check(2, 3, 83, 83, 0, 32, torch.float32, device, block_m=block_m, block_n=block_n)


def test_column_mass_of_chunks_adds_up_to_the_whole_prompt(device):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 150, 32, generator=gen).to(device)
    k = torch.randn(2, 150, 32, generator=gen).to(device)
    total = torch.zeros(2, 150, device=device)
    for lo, hi in ((0, 64), (64, 101), (101, 150)):
        total[:, :hi] += column_mass(q[:, lo:hi], k[:, :hi], start=lo)
    torch.testing.assert_close(total, column_mass(q, k), rtol=1e-4, atol=1e-5)


def test_column_mass_refuses_bad_shapes(device):
    q, k = torch.randn(4, 10, 32, device=device), torch.randn(2, 10, 32, device=device)
    with pytest.raises(ValueError, match="GQA"):
        column_mass(torch.randn(3, 10, 32, device=device), k)
    with pytest.raises(ValueError, match="cannot hold"):
        column_mass(q, k, start=1)
    with pytest.raises(ValueError, match="out must be"):
        column_mass(q, k, out=torch.empty(2, 9, device=device))
    with pytest.raises(ValueError, match="power of two"):
        column_mass(torch.randn(4, 10, 24, device=device), torch.randn(2, 10, 24, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,seq_len,start", [(37, 37, 0), (45, 200, 155)])
def test_column_mass_with_the_rows_lse_given_skips_nothing_else(dtype, q_len, seq_len, start, device):
    """The log-sum-exp FlashAttention hands over replaces the first pass: the same mass."""
    gen = torch.Generator().manual_seed(q_len)
    query = torch.randn(6, q_len, 32, generator=gen).to(dtype)
    key = (torch.randn(2, seq_len, 32, generator=gen) * 2).to(dtype)
    lse = row_lse(query, key, start)
    given = column_mass(query.to(device), key.to(device), start, lse=lse.to(device))
    ref = causal_column_mass(query.float(), key.float(), start=start)
    err = ((given.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= TOL[dtype], f"rel err {err:.2e}"
    with pytest.raises(ValueError, match="lse must be"):
        column_mass(query.to(device), key.to(device), start, lse=lse[:, 1:].to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,group,lengths", [(2, 4, [37, 1, 130]), (3, 1, [64, 65]), (1, 3, [90])])
def test_prompt_column_masses_of_a_step_equal_each_prompts_mass(dtype, num_kv_heads, group, lengths, device):
    """Whole prompts of one step in one launch: each prompt's columns hold its own mass, from its
    own tokens of the step (decode tokens between them), its own log-sum-exp columns."""
    from vllm_kvcompress.triton_kernels.column_mass import prompt_column_masses

    gen = torch.Generator().manual_seed(len(lengths))
    head_dim, gap = 32, 3  # 3 other tokens before each prompt in the step
    tokens = sum(lengths) + gap * len(lengths)
    query = torch.randn(tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    key = (torch.randn(tokens, num_kv_heads, head_dim, generator=gen) * 2).to(dtype)
    firsts = [gap * (i + 1) + sum(lengths[:i]) for i in range(len(lengths))]
    lse_cols = [5 + sum(lengths[:i]) for i in range(len(lengths))]  # FlashAttention's fresh rows, 5 others first
    out_cols = [sum(lengths[i + 1:]) for i in range(len(lengths))]  # the result in another order
    lse = torch.full((num_kv_heads * group, 5 + sum(lengths)), float("nan"))
    for a, c, n in zip(firsts, lse_cols, lengths):
        lse[:, c:c + n] = row_lse(query[a:a + n].transpose(0, 1), key[a:a + n].transpose(0, 1), 0)
    prompts = torch.tensor([firsts, lse_cols, out_cols, lengths], dtype=torch.int64)
    mass = prompt_column_masses(query.to(device), key.to(device), prompts.to(device), max(lengths), sum(lengths),
                                lse.to(device))
    assert mass.shape == (num_kv_heads, sum(lengths)) and not mass.isnan().any()
    for a, c, n in zip(firsts, out_cols, lengths):
        ref = causal_column_mass(query[a:a + n].transpose(0, 1).float(), key[a:a + n].transpose(0, 1).float())
        err = ((mass[:, c:c + n].cpu().double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= TOL[dtype], f"rel err {err:.2e}"
