"""The compaction dispatcher: which implementation runs, and each one against the reference."""
import logging

import pytest
import torch

from vllm_kvcompress.paged import compaction, reference

ON_GPU = torch.cuda.is_available()


def make_case(device, seed=0, num_heads=6, max_blocks=5, block_size=16, head_dim=64):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = num_heads * max_blocks + 3
    key_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(torch.bfloat16)
    value_cache = torch.randn(num_blocks, block_size, head_dim, generator=gen).to(torch.bfloat16)
    table = torch.randperm(num_blocks, generator=gen)[: num_heads * max_blocks].view(num_heads, max_blocks)
    old_len = torch.randint(1, max_blocks * block_size + 1, (num_heads,), generator=gen)
    keep_idx = torch.zeros(num_heads, max_blocks * block_size, dtype=torch.long)
    keep_len = torch.zeros(num_heads, dtype=torch.long)
    for h in range(num_heads):
        n = int(torch.randint(0, int(old_len[h]) + 1, (), generator=gen))
        keep_idx[h, :n] = torch.randperm(int(old_len[h]), generator=gen)[:n].sort().values
        keep_len[h] = n
    return [t.to(device) for t in (key_cache, value_cache, table.int(), keep_idx, keep_len.int(), old_len.int())]


def check_against_reference(case):
    expected = [t.cpu().clone() for t in case]
    freed_ref = reference.compact(*expected)
    freed = compaction.compact(*case)
    assert torch.equal(case[0].cpu().view(torch.int16), expected[0].view(torch.int16))
    assert torch.equal(case[1].cpu().view(torch.int16), expected[1].view(torch.int16))
    assert [f.cpu().tolist() for f in freed] == [f.tolist() for f in freed_ref]


def test_cpu_uses_torch(monkeypatch, caplog):
    monkeypatch.delenv("KVC_COMPACTION", raising=False)
    assert compaction.choose(torch.device("cpu"))[0] == "torch"
    compaction._logged.clear()
    with caplog.at_level(logging.INFO, logger=compaction.__name__):
        check_against_reference(make_case("cpu"))
    assert "torch implementation" in caplog.text


def test_gpu_default(monkeypatch):
    monkeypatch.delenv("KVC_COMPACTION", raising=False)
    impl, _ = compaction.choose(torch.device("cuda"))
    built = compaction.cuda_extension() is not None
    assert impl == (compaction.GPU_DEFAULT if built else "triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("KVC_COMPACTION", "Torch")
    assert compaction.choose(torch.device("cuda")) == ("torch", "forced by KVC_COMPACTION")
    monkeypatch.setenv("KVC_COMPACTION", "triton")
    assert compaction.choose(torch.device("cpu"))[0] == "triton"
    monkeypatch.setenv("KVC_COMPACTION", "fastest")
    with pytest.raises(ValueError):
        compaction.choose(torch.device("cuda"))
    monkeypatch.setenv("KVC_COMPACTION", "cuda")
    with pytest.raises(RuntimeError):
        compaction.choose(torch.device("cpu"))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["torch", "triton", "cuda"])
def test_each_gpu_implementation(monkeypatch, impl):
    if impl == "cuda" and compaction.cuda_extension() is None:
        pytest.skip("vllm_kvcompress._C not built")
    monkeypatch.setenv("KVC_COMPACTION", impl)
    for seed, head_dim in ((1, 64), (2, 128)):
        check_against_reference(make_case("cuda", seed=seed, num_heads=40, max_blocks=30, head_dim=head_dim))


@pytest.mark.skipif(not ON_GPU or compaction.cuda_extension() is None, reason="needs the CUDA extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_cuda_extension_dtypes(dtype, idx_dtype):
    # The extension moves raw words: 16-byte words here, 2-byte words for an odd 3-wide row.
    for head_dim in (128, 3):
        case = make_case("cuda", seed=head_dim, num_heads=50, max_blocks=20, head_dim=head_dim)
        case[0], case[1] = case[0].to(dtype), case[1].to(dtype)
        case[3] = case[3].to(idx_dtype)
        expected = [t.cpu().clone() for t in case]
        reference.compact(*expected)
        compaction.cuda_extension().compact(*case[:5])
        assert torch.equal(case[0].cpu(), expected[0]) and torch.equal(case[1].cpu(), expected[1])
