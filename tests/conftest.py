"""Shared set-up of the test suite, and tiny builders of the policy-library tests.

Without a CUDA device the Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set
before any module decorates a kernel, and several test modules import the kernels (directly or
through the vLLM backend), so it is set here, before everything else.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_kvcompress.policies.observation import LayerObservation, causal_column_mass  # noqa: E402


def random_layers(
    num_layers: int,
    num_kv_heads: int,
    group: int,
    seq_len: int,
    window: int,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_global: bool = False,
) -> list[LayerObservation]:
    """``num_layers`` observations of one random request, the same for the same arguments.

    Queries [num_kv_heads * group, min(window, seq_len), head_dim], keys/values
    [num_kv_heads, seq_len, head_dim] in ``dtype``; ``with_global`` adds the causal column mass of
    all ``seq_len`` queries, as the engine collects it for EMS.
    """
    gen = torch.Generator().manual_seed(seed)
    num_q_heads = num_kv_heads * group
    observed = min(window, seq_len)
    layers = []
    for layer in range(num_layers):
        queries = torch.randn(num_q_heads, seq_len, head_dim, generator=gen).to(dtype)
        keys = torch.randn(num_kv_heads, seq_len, head_dim, generator=gen).to(dtype)
        values = torch.randn(num_kv_heads, seq_len, head_dim, generator=gen).to(dtype)
        global_attention = causal_column_mass(queries, keys) if with_global else None
        layers.append(LayerObservation(queries[:, seq_len - observed :], keys, values, layer, global_attention))
    return layers


@pytest.fixture(scope="session")
def make_layers():
    """The :func:`random_layers` builder (session-scoped, so hypothesis tests may use it)."""
    return random_layers


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module on one torch thread: its tensors are tiny, and on shared, loaded cores the
    thread pool's synchronisation costs ~10x the work (hypothesis modules run hundreds of cases)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
