"""EMS's nearest-centre kernel vs reduction.nearest_centres (interpreter on CPU, native on GPU)."""
import pytest
import torch

from vllm_kvcompress.policies.reduction import nearest_centres, redundancy
from vllm_kvcompress.triton_kernels.redundancy import nearest_centres as kernel

ON_GPU = torch.cuda.is_available()
# tf32 dots (bf16/fp16 rows) err ~1e-3 in a cosine; fp32 rows get full-precision dots
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}


def centre_case(num_heads, seq_len, head_dim, num_kept, dtype, strided, seed):
    """Rows (near-copies of the centres among them, so that merges happen), each head's centres
    (distinct rows, -1 padded: head 0 keeps only half), targets, candidates (neither kept nor, at
    random, excluded) and the compared rows, candidates first, as EMS's classes() lays them out.
    The last head has no target and head 1 no candidate; one row is all zeros."""
    gen = torch.Generator().manual_seed(seed)
    if strided:  # [tokens, heads, head_dim] viewed head-major, as rows gathered from a cache
        keys, values = (torch.randn(seq_len, num_heads, head_dim, generator=gen).transpose(0, 1) for _ in range(2))
    else:
        keys, values = (torch.randn(num_heads, seq_len, head_dim, generator=gen) for _ in range(2))
    keep_idx = torch.stack([torch.randperm(seq_len, generator=gen)[:num_kept] for _ in range(num_heads)])
    keep_idx[0, num_kept // 2:] = -1
    near = torch.randint(0, num_kept // 2, (num_heads, seq_len), generator=gen)  # a centre each row is near
    source = keep_idx.gather(1, near)
    for x in (keys, values):
        copy = x.gather(1, source[..., None].expand(-1, -1, head_dim))
        x.copy_(torch.where(torch.rand(num_heads, seq_len, 1, generator=gen) < 0.5,
                            copy + 0.3 * torch.randn(x.shape, generator=gen), x))
    keys[:, 1] = 0.0
    valid = keep_idx >= 0
    target = valid & (torch.rand(num_heads, num_kept, generator=gen) < 0.8)
    target[-1] = False
    candidate = torch.rand(num_heads, seq_len, generator=gen) < 0.7
    candidate.scatter_(1, keep_idx.clamp(min=0), False)
    candidate[1] = False
    order = torch.sort(candidate.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = order[:, : seq_len - num_kept // 2]  # every candidate, and some rows that are not
    return keys.to(dtype), values.to(dtype), keep_idx, target, order, candidate


# (num_heads, seq_len, head_dim, num_kept, dtype, strided)
CPU_CASES = [
    (3, 37, 64, 9, torch.float32, False),
    (4, 70, 128, 33, torch.bfloat16, True),
    (2, 100, 80, 17, torch.float16, False),  # a head size that is not a power of two
]
GPU_CASES = CPU_CASES + [
    (64, 269, 128, 204, torch.bfloat16, True),  # a decode-time tick at 10 % of 2k
    (16, 2048, 128, 205, torch.bfloat16, False),  # a prefill compression
    (8, 999, 64, 77, torch.float32, True),
]


@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=str)
def test_nearest_centres_match_the_reference(case, device):
    *_, dtype, _ = case
    keys, values, keep_idx, target, order, candidate = centre_case(*case, seed=sum(case[:4]))
    ref_sim, ref_best = nearest_centres(keys.float(), values.float(), keep_idx, target, order, candidate)
    args = [t.to(device) for t in (keys, values, keep_idx, target, order, candidate)]
    got_sim, got_best = (t.cpu() for t in kernel(*args))
    # every row the reference leaves -inf is -inf here, the others agree within the dots' precision
    assert torch.equal(torch.isinf(got_sim), torch.isinf(ref_sim))
    finite = torch.isfinite(ref_sim)
    assert finite.sum() > 0.3 * candidate.sum()  # most candidates have a target
    torch.testing.assert_close(got_sim[finite], ref_sim[finite], atol=TOL[dtype], rtol=0)
    assert (ref_sim[finite] >= 0.5).any()  # some would merge at EMS's threshold
    # the slot chosen holds the best redundancy (of equal maxima any), and is a target
    heads, rows = finite.nonzero(as_tuple=True)
    slots = got_best[heads, rows]
    assert target[heads, slots].all()
    chosen = keep_idx[heads, slots]
    ks, vs = keys.float(), values.float()
    sim = redundancy(ks[heads, rows][:, None], vs[heads, rows][:, None], ks[heads, chosen][:, None],
                     vs[heads, chosen][:, None])[:, 0, 0]
    torch.testing.assert_close(sim, ref_sim[finite], atol=2 * TOL[dtype], rtol=0)
    # rows not compared are -inf at slot 0, as the reference leaves them
    compared = torch.zeros_like(candidate).scatter_(1, order, True)
    assert (~compared).any() and (got_best[~compared] == 0).all() and torch.equal(got_best[~compared], ref_best[~compared])


def test_nearest_centres_refuse_mismatched_shapes(device):
    keys, values, keep_idx, target, order, candidate = (t.to(device) for t in centre_case(2, 20, 16, 4, torch.float32,
                                                                                           False, 0))
    with pytest.raises(ValueError, match="one shape"):
        kernel(keys, values[:, :10], keep_idx, target, order, candidate)
    with pytest.raises(ValueError, match="target"):
        kernel(keys, values, keep_idx, target[:, :2], order, candidate)
