"""The fp8 cache rule inside the Triton kernels: :func:`vllm_kvcompress.paged.reference.quantize`
and :func:`~vllm_kvcompress.paged.reference.dequantize`, bit for bit, for float8_e4m3fn caches
with one float32 scale per layer (vLLM's ``--kv-cache-dtype fp8``; kernels over heads of several
layers take one scale per head).

Kernels load the scales from their tensors (no host sync, CUDA-graph friendly) and take an
``FP8`` flag as a ``tl.constexpr``: without scales they compile exactly as before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)  # float8_e4m3fn's largest finite value (it has no inf)
# Biased float32 exponent of e4m3's smallest normal 2^-6: below it, e4m3 steps are 2^-9 apart.
MIN_NORMAL_EXP = tl.constexpr(127 - 6)
SIGN_BIT = tl.constexpr(-(2**31))  # float32's sign bit, as an int32


@triton.jit
def quantize_fp8(x, scale):
    """float32 tile of the e4m3 values a cache stores for x: x / scale (IEEE division, as torch's),
    saturated to +-448 and rounded to nearest even. The cast to fp8 at the store is then exact.

    The rounding is done here, in float32, because casts differ: the GPU's rounds to nearest even,
    Triton's interpreter (3.6) rounds ties away and drops carries (about 3% of random values came
    out one step off). Adding then subtracting c = 2^(e + 20), where 2^e is x's binade (at least
    e4m3's smallest normal 2^-6), leaves |x| rounded to c's float32 step 2^(e - 3): e4m3's step
    there, with float32's own round-to-nearest-even."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    magnitude = tl.abs(y)
    binade = tl.maximum(magnitude.to(tl.int32, bitcast=True) >> 23, MIN_NORMAL_EXP)
    c = ((binade + 20) << 23).to(tl.float32, bitcast=True)
    rounded = (magnitude + c) - c
    # y's sign bit back on (bits, not a negation: -0.0 must stay -0.0, as the cast keeps it)
    sign = y.to(tl.int32, bitcast=True) & SIGN_BIT
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def dequantize_fp8(stored, scale):
    """float32 values of stored fp8 rows: stored * scale."""
    return stored.to(tl.float32) * scale


def check_scales(caches: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor | None, ...],
                 num_heads: int | None = None) -> bool:
    """Whether the caches are fp8 ones, read and written with their scales (all given) or hold the
    values themselves (all None). fp8 caches: float8_e4m3fn (vLLM's uint8 pool viewed as that).
    Scales: float32 on the caches' device, one element (a layer's), or where the operation takes
    ``num_heads`` heads, also [num_heads] contiguous (each head's own layer's scale: the heads of
    one call may come from several layers)."""
    given = [s is not None for s in scales]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("give the scales of all fp8 caches (k_scale and v_scale), or none")
    for cache, scale in zip(caches, scales):
        if cache.dtype != FP8_DTYPE:
            raise ValueError(f"scales go with {FP8_DTYPE} caches, got a {cache.dtype} one")
        per_head = num_heads is not None and scale.shape == (num_heads,) and scale.is_contiguous()
        if not (scale.numel() == 1 or per_head) or scale.dtype != torch.float32 or scale.device != cache.device:
            heads = "" if num_heads is None else f" or [{num_heads}] (one per head)"
            raise ValueError(f"a cache scale is float32 [1]{heads} on the cache's device, got {scale.dtype} "
                             f"{tuple(scale.shape)} on {scale.device}")
    return True


def scale_stride(scale: torch.Tensor | None) -> int:
    """How far apart the scales of consecutive heads lie: 0 for one shared scale (or none), 1 per head."""
    return 0 if scale is None or scale.numel() == 1 else 1
