"""EMS merge kernel vs reference.merge_by_class (interpreter on CPU, native on GPU)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.merge import merge_by_class, merge_kv_by_class

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ON_GPU = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_steps(stored: torch.Tensor) -> torch.Tensor:
    """e4m3 codes as signed step counts from zero: neighbouring values differ by one."""
    codes = stored.cpu().view(torch.uint8).int()
    return torch.where(codes >= 0x80, 0x80 - codes, codes)


def make_inputs(num_heads, seq_len, head_dim, num_classes, dtype, device, strided, seed, scales=(None, None)):
    """key, value, weight, assign; with scales (CPU), key and value are fp8 rows quantized with them."""
    gen = torch.Generator().manual_seed(seed)

    def rows(scale):
        if strided:  # [tokens, heads, head_dim] viewed head-major
            x = torch.randn(seq_len, num_heads, head_dim, generator=gen)
            return reference.quantize(x, scale, dtype if scale is None else FP8).transpose(0, 1)
        x = torch.randn(num_heads, seq_len, head_dim, generator=gen)
        return reference.quantize(x, scale, dtype if scale is None else FP8)

    key, value = rows(scales[0]), rows(scales[1])
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
@pytest.mark.parametrize("cache", ["values", "fp8"])
def test_merge_kv_matches_reference(device, case, cache, fp8_scales):
    num_heads, seq_len, head_dim, num_classes, dtype, strided = case
    scales = fp8_scales(torch.Generator().manual_seed(num_classes), "cpu") if cache == "fp8" else [None, None]
    key, value, weight, assign = make_inputs(num_heads, seq_len, head_dim, num_classes, dtype, device,
                                             strided, seed=seq_len, scales=scales)
    shape = (num_heads, num_classes, head_dim)
    out_dtype = FP8 if cache == "fp8" else torch.float32
    out = tuple(torch.full(shape, float("nan"), device=device).to(out_dtype) for _ in range(2))  # all written?
    k_scale, v_scale = (None if s is None else s.to(device) for s in scales)
    k_out, v_out = merge_kv_by_class(key, value, weight, assign, num_classes, out=out, k_scale=k_scale, v_scale=v_scale)
    assert k_out is out[0] and v_out is out[1]
    for got, x, scale in ((k_out, key, scales[0]), (v_out, value, scales[1])):
        ref = reference.merge_by_class(x.cpu(), weight.cpu(), assign.cpu(), num_classes, scale)
        assert not got.float().isnan().any()
        if cache == "fp8":
            # Kernel and reference sum in different orders: a mean on a rounding boundary may be
            # stored one e4m3 step away, rarely.
            steps = (fp8_steps(got) - fp8_steps(ref)).abs()
            assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
            got, ref = reference.dequantize(got.cpu(), scale), reference.dequantize(ref, scale)
        assert rel_err(got.cpu(), ref) <= TOL[dtype]
        assert torch.equal(got[:, -1].cpu(), torch.zeros_like(ref[:, -1]))  # the empty class


def test_merge_single_tensor(device):
    key, _, weight, assign = make_inputs(2, 41, 64, 6, torch.float32, device, False, seed=1)
    out = torch.full((2, 6, 64), float("nan"), device=device)
    merge_by_class(key, weight, assign, 6, out=out)
    ref = reference.merge_by_class(key.cpu(), weight.cpu(), assign.cpu(), 6)
    assert rel_err(out.cpu(), ref) <= 1e-5


def test_merge_single_fp8_tensor(device):
    scale = torch.tensor([0.02])
    key, _, weight, assign = make_inputs(2, 41, 64, 6, torch.float32, device, False, seed=1, scales=(scale, scale))
    got = merge_by_class(key, weight, assign, 6, cache_scale=scale.to(device))
    ref = reference.merge_by_class(key.cpu(), weight.cpu(), assign.cpu(), 6, scale)
    assert got.dtype == FP8 and (fp8_steps(got) - fp8_steps(ref)).abs().max() <= 1


def test_merge_rejects_bad_shapes(device):
    x = torch.randn(2, 5, 64, device=device)
    with pytest.raises(ValueError):
        merge_by_class(x, torch.rand(2, 4, device=device), torch.zeros(2, 5, dtype=torch.long, device=device), 3)


def test_a_class_of_one_row_is_that_row_exactly(device):
    """Retained rows that nothing merged into leave the merge unchanged, bit for bit, as in the
    reference: a weighted mean of one row would be w * x / w, a rounding step off at times."""
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(3, 40, 64, generator=gen).to(torch.bfloat16).to(device)
    value = torch.randn(3, 40, 64, generator=gen).to(torch.bfloat16).to(device)
    weight = (torch.rand(3, 40, generator=gen) * 7 + 0.3).to(device)
    assign = torch.zeros(3, 40, dtype=torch.long)
    assign[:, :30] = torch.arange(1, 31)  # rows 0..29 alone in classes 1..30; 30..39 dropped
    k_out, v_out = merge_kv_by_class(key, value, weight, assign.to(device), 30)
    assert torch.equal(k_out.cpu(), key[:, :30].float().cpu()) and torch.equal(v_out.cpu(), value[:, :30].float().cpu())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_merge_stores_its_float32_means_rounded_to_out_dtype(device, out_dtype):
    """out_dtype: the means stored as the float32 ones rounded to nearest (the merged rows of a
    cache of that dtype, with no float32 copy in memory), as torch rounds them; empty classes are
    zeros there too. Triton 3.6's interpreter truncates instead: there, within one step."""
    key, value, weight, assign = make_inputs(3, 50, 128, 13, out_dtype, device, True, seed=5)
    wide = merge_kv_by_class(key, value, weight, assign, 13)
    narrow = merge_kv_by_class(key, value, weight, assign, 13, out_dtype=out_dtype)
    for got, want in zip(narrow, wide):
        rounded = want.to(out_dtype)
        assert got.dtype == out_dtype and not got[:, -1].any()  # the empty class
        if device == "cuda":
            assert torch.equal(got.cpu(), rounded.cpu())
        else:
            step = torch.finfo(out_dtype).eps * want.abs().cpu()
            assert ((got.float() - want).abs().cpu() <= step).all()
