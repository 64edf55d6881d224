"""The fp8 cache rule: reference.quantize / dequantize, and the kernels' quantize_fp8 against them."""
import pytest
import torch
import triton
import triton.language as tl

from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels.fp8 import FP8_DTYPE, check_scales, quantize_fp8

FP8_MAX = 448.0
MIN_NORMAL = 2.0**-6


def values_around_fp8(scale: float, gen: torch.Generator) -> torch.Tensor:
    """float32 values whose x / scale covers e4m3: every finite value, the ties between neighbours
    (rounding to even), random values over all magnitudes (subnormals included), signed zeros and
    values far beyond 448 (saturation)."""
    codes = torch.arange(256, dtype=torch.uint8)
    grid = codes[(codes & 0x7F) != 0x7F].view(FP8_DTYPE).float().sort().values
    ties = (grid[1:] + grid[:-1]) / 2
    spread = torch.randn(20000, generator=gen) * 10 ** (torch.rand(20000, generator=gen) * 9 - 5)
    special = torch.tensor([0.0, -0.0, 448.5, 463.9, 464.0, 480.0, -500.0, 1e6, -1e30, 2**-10, -(2**-10), 2**-9])
    return torch.cat([grid, ties, spread, special]) * scale


@pytest.mark.parametrize("scale", [0.37, 3.1e-3, 12.5])
def test_quantize_roundtrip_precision_and_saturation(scale):
    x = values_around_fp8(scale, torch.Generator().manual_seed(0))
    s = torch.tensor([scale])
    stored = reference.quantize(x, s, FP8_DTYPE)
    back = reference.dequantize(stored, s)
    assert stored.dtype == FP8_DTYPE and back.dtype == torch.float32
    assert back.isfinite().all()
    err = (back - x).abs()
    normal = (x.abs() >= MIN_NORMAL * scale) & (x.abs() <= FP8_MAX * scale)
    assert (err[normal] <= 2**-4 * x[normal].abs() * (1 + 1e-6)).all()  # e4m3: 3 mantissa bits
    tiny = x.abs() < MIN_NORMAL * scale
    assert (err[tiny] <= 2**-10 * scale * (1 + 1e-6)).all()  # subnormal step 2^-9, half of it
    beyond = x.abs() > FP8_MAX * scale
    assert beyond.sum() >= 5
    assert torch.equal(back[beyond], torch.sign(x[beyond]) * FP8_MAX * scale)


def test_no_scale_is_a_cast():
    x = torch.randn(100)
    assert torch.equal(reference.quantize(x, None, torch.bfloat16), x.to(torch.bfloat16))
    assert reference.dequantize(x, None) is x


@triton.jit
def _quantize_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(out_ptr + i, quantize_fp8(x, tl.load(scale_ptr)).to(out_ptr.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [0.37, 3.1e-3, 1.0])
def test_kernel_quantize_is_the_reference_bit_for_bit(device, dtype, scale):
    x = values_around_fp8(scale, torch.Generator().manual_seed(1))
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)  # within fp16 (a cast of 1e30 would be inf)
    x = x.to(dtype)
    s = torch.tensor([scale], device=device)
    out = torch.full(x.shape, float("nan"), device=device).to(FP8_DTYPE)
    _quantize_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), s, out, x.numel(), BLOCK=1024)
    expected = reference.quantize(x, s.cpu(), FP8_DTYPE)
    assert torch.equal(out.cpu().view(torch.uint8), expected.view(torch.uint8))


def test_check_scales():
    cache = torch.zeros(2, 16, 64, dtype=FP8_DTYPE)
    s = torch.tensor([0.5])
    assert check_scales((cache, cache), (s, s))
    assert not check_scales((cache, cache), (None, None))
    with pytest.raises(ValueError, match="all fp8 caches"):
        check_scales((cache, cache), (s, None))
    with pytest.raises(ValueError, match="go with"):
        check_scales((cache.float(),), (s,))
    with pytest.raises(ValueError, match=r"float32 \[1\] on"):
        check_scales((cache,), (torch.tensor([0.5, 0.5]),))
    assert check_scales((cache,), (torch.tensor([0.5, 0.5]),), num_heads=2)  # one per head
    with pytest.raises(ValueError, match=r"or \[3\]"):
        check_scales((cache,), (torch.tensor([0.5, 0.5]),), num_heads=3)
    with pytest.raises(ValueError, match="float32"):
        check_scales((cache,), (torch.tensor([1]),))


def test_gather_heads_dequantize_each_head_with_its_scale():
    gen = torch.Generator().manual_seed(2)
    cache = torch.randint(0, 0x7E, (6, 16, 8), generator=gen, dtype=torch.uint8).view(FP8_DTYPE)  # finite codes
    table = torch.randperm(6, generator=gen).view(3, 2)
    scales = torch.tensor([0.5, 0.02, 3.0])
    got = reference.gather_heads(cache, table, 20, scales)
    padded = reference.gather_heads_padded(cache, table, torch.tensor([20, 20, 20]), cache_scale=scales)
    for h in range(3):
        alone = reference.gather_head(cache, table[h], 20, scales[h:h + 1])
        assert alone.dtype == torch.float32
        assert torch.equal(got[h], alone) and torch.equal(padded[h], alone)
        assert torch.equal(alone, reference.gather_head(cache, table[h], 20).float() * scales[h])
