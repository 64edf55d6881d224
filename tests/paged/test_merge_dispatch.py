"""The merge dispatcher: the reference on the CPU, the Triton kernel on CUDA, the same means."""
import pytest
import torch

from vllm_kvcompress.paged import merge, reference

ON_GPU = torch.cuda.is_available()


def merge_case(device, dtype, seed=0, num_heads=5, seq_len=77, head_dim=64, num_classes=20):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_heads, seq_len, head_dim, generator=gen).to(dtype)
    values = torch.randn(num_heads, seq_len, head_dim, generator=gen).to(dtype)
    weight = torch.rand(num_heads, seq_len, generator=gen)
    classes = torch.randint(0, num_classes + 1, (num_heads, seq_len), generator=gen)
    return [t.to(device) for t in (keys, values, weight, classes)], num_classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_dispatch_matches_the_reference(dtype):
    device = "cuda" if ON_GPU else "cpu"
    (keys, values, weight, classes), num_classes = merge_case(device, dtype)
    got = merge.merge_kv_by_class(keys, values, weight, classes, num_classes)
    for out, x in zip(got, (keys, values)):
        ref = reference.merge_by_class(x.cpu(), weight.cpu(), classes.cpu(), num_classes)
        assert out.dtype == torch.float32 and out.device.type == device
        if ON_GPU:  # the kernel sums in another order
            assert ((out.cpu() - ref).norm() / ref.norm()).item() <= 1e-5
        else:
            assert torch.equal(out, ref)
