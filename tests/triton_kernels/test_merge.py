"""EMS merge kernel vs reference.merge_by_class (interpreter on CPU, native on GPU)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.merge import merge_by_class, merge_kv_by_class

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ON_GPU = torch.cuda.is_available()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(num_heads, seq_len, head_dim, num_classes, dtype, device, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # [tokens, heads, head_dim] viewed head-major
        key = torch.randn(seq_len, num_heads, head_dim, generator=gen).to(dtype).transpose(0, 1)
        value = torch.randn(seq_len, num_heads, head_dim, generator=gen).to(dtype).transpose(0, 1)
    else:
        key = torch.randn(num_heads, seq_len, head_dim, generator=gen).to(dtype)
        value = torch.randn(num_heads, seq_len, head_dim, generator=gen).to(dtype)
    weight = torch.rand(num_heads, seq_len, generator=gen) + 0.01
    assign = torch.randint(0, num_classes + 1, (num_heads, seq_len), generator=gen)
    # Edge classes: class 1 of head 0 has zero total weight (plain mean), the last class of every
    # head is empty (zeros), and class 2 of the last head holds a large share of the tokens.
    weight[0][assign[0] == 1] = 0.0
    assign[assign == num_classes] = 0
    assign[-1, : seq_len // 3] = min(2, num_classes - 1)
    return [t.to(device) for t in (key, value, weight, assign)]


# (num_heads, seq_len, head_dim, num_classes, dtype, strided)
CPU_CASES = [
    (2, 37, 64, 9, torch.float32, False),
    (3, 50, 128, 13, torch.bfloat16, True),
    (1, 29, 64, 40, torch.float16, False),  # more classes than tokens
    (2, 150, 64, 3, torch.float32, True),  # few, large classes
]
GPU_CASES = CPU_CASES + [
    (8, 4099, 128, 1000, torch.bfloat16, True),
    (8, 3001, 64, 2999, torch.float16, False),
    (4, 2047, 128, 17, torch.float32, False),  # few, large classes
]


@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=str)
def test_merge_kv_matches_reference(device, case):
    num_heads, seq_len, head_dim, num_classes, dtype, strided = case
    key, value, weight, assign = make_inputs(num_heads, seq_len, head_dim, num_classes, dtype, device,
                                             strided, seed=seq_len)
    shape = (num_heads, num_classes, head_dim)
    out = (torch.full(shape, float("nan"), device=device), torch.full(shape, float("nan"), device=device))
    k_out, v_out = merge_kv_by_class(key, value, weight, assign, num_classes, out=out)
    assert k_out is out[0] and v_out is out[1]
    for got, x in ((k_out, key), (v_out, value)):
        ref = reference.merge_by_class(x.cpu(), weight.cpu(), assign.cpu(), num_classes)
        assert not got.isnan().any()
        assert rel_err(got.cpu(), ref) <= TOL[dtype]
        assert torch.equal(got[:, -1].cpu(), torch.zeros_like(ref[:, -1]))  # the empty class


def test_merge_single_tensor(device):
    key, _, weight, assign = make_inputs(2, 41, 64, 6, torch.float32, device, False, seed=1)
    out = torch.full((2, 6, 64), float("nan"), device=device)
    merge_by_class(key, weight, assign, 6, out=out)
    ref = reference.merge_by_class(key.cpu(), weight.cpu(), assign.cpu(), 6)
    assert rel_err(out.cpu(), ref) <= 1e-5


def test_merge_rejects_bad_shapes(device):
    x = torch.randn(2, 5, 64, device=device)
    with pytest.raises(ValueError):
        merge_by_class(x, torch.rand(2, 4, device=device), torch.zeros(2, 5, dtype=torch.long, device=device), 3)
