"""Shared setup of the Triton kernel tests.

Without a CUDA device the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before any
kernel module imports triton); on a CUDA machine they run natively.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> str:
    """Where the kernels' inputs live: the GPU when there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
