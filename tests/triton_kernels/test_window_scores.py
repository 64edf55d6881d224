"""window_scores kernel vs reference.window_scores (interpreter on CPU, native on GPU)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.window_scores import window_scores

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_case(device, num_kv_heads, group, window, seq_len, head_dim, dtype, power, strided, scale=None):
    gen = torch.Generator().manual_seed(seq_len * 131 + head_dim + group)
    q_heads = num_kv_heads * group
    if strided:  # the layouts a prefill produces: [tokens, heads, head_dim], viewed head-major
        query = torch.randn(window, q_heads, head_dim, generator=gen).to(dtype).to(device).transpose(0, 1)
        key = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype).to(device).transpose(0, 1)
    else:
        query = torch.randn(q_heads, window, head_dim, generator=gen).to(dtype).to(device)
        key = torch.randn(num_kv_heads, seq_len, head_dim, generator=gen).to(dtype).to(device)
    key = key * 2  # sharper softmax than unit logits: errors in the max/lse show up
    out = torch.full((num_kv_heads, seq_len), float("nan"), device=device)
    window_scores(query, key, scale=scale, power=power, out=out)
    ref = reference.window_scores(query.cpu().contiguous(), key.cpu(), scale=scale, power=power)
    assert not out.isnan().any()
    err = rel_err(out.cpu(), ref)
    assert err <= TOL[dtype], err


# (num_kv_heads, group, window, seq_len, head_dim, dtype, power, strided)
CPU_CASES = [
    (2, 1, 8, 37, 64, torch.float32, 1, False),
    (1, 4, 5, 130, 64, torch.bfloat16, 2, True),
    (2, 8, 3, 71, 128, torch.float16, 1, False),
    (1, 4, 16, 16, 64, torch.float32, 2, True),  # window == seq_len
    (3, 1, 1, 97, 64, torch.bfloat16, 1, False),  # window of one query
    (1, 8, 20, 70, 64, torch.float32, 2, False),  # 160 rows: two row blocks
]
GPU_CASES = CPU_CASES + [
    (8, 4, 32, 4099, 128, torch.bfloat16, 1, True),  # Llama-3-8B shape
    (8, 4, 32, 4099, 128, torch.bfloat16, 2, True),
    (4, 8, 32, 2001, 128, torch.float16, 1, False),
    (2, 1, 64, 3333, 64, torch.float32, 2, False),
    (2, 8, 64, 1025, 64, torch.bfloat16, 1, True),  # 512 rows: several row blocks
    (1, 4, 32, 33000, 128, torch.bfloat16, 2, True),  # long prompt, many chunks
]


@pytest.mark.parametrize("case", GPU_CASES if torch.cuda.is_available() else CPU_CASES, ids=str)
def test_window_scores_matches_reference(device, case):
    run_case(device, *case)


def test_window_scores_custom_scale(device):
    run_case(device, 2, 4, 7, 50, 64, torch.float32, 1, False, scale=0.3)


def test_window_scores_rejects_bad_shapes(device):
    q = torch.randn(3, 4, 64, device=device)
    with pytest.raises(ValueError):
        window_scores(q, torch.randn(2, 10, 64, device=device))  # 3 q heads over 2 kv heads
    with pytest.raises(ValueError):
        window_scores(q, torch.randn(1, 3, 64, device=device))  # window longer than the prompt
