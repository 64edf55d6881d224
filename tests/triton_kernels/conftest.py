"""Where the kernel tests' inputs live. (TRITON_INTERPRET is set for CPU runs in tests/conftest.py.)"""
import pytest
import torch


@pytest.fixture
def device() -> str:
    """The GPU when there is one (native Triton), else the CPU (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
