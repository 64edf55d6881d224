"""Where the kernel tests' inputs live. (TRITON_INTERPRET is set for CPU runs in tests/conftest.py.)"""
import pytest
import torch


@pytest.fixture
def device() -> str:
    """The GPU when there is one (native Triton), else the CPU (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def random_scales(gen: torch.Generator, device, count: int = 2, num_heads: int | None = None) -> list[torch.Tensor]:
    """``count`` fp8 cache scales log-uniform in [0.004, 0.1]: far from 1, and small enough that
    randn values beyond 448 * scale (saturating) turn up. Each float32 [1] (a layer's), or
    [num_heads] when given (heads of several layers, each with its layer's)."""
    return [(0.004 * 25 ** torch.rand(num_heads or 1, generator=gen)).to(device) for _ in range(count)]


@pytest.fixture(scope="session")
def fp8_scales():
    """The :func:`random_scales` builder."""
    return random_scales
