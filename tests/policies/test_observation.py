"""The prefill observer both engines share (policies/observation.py): signals by name, summed over chunks."""
from dataclasses import dataclass

import pytest
import torch

from vllm_kvcompress.policies.observation import (PREFILL_SIGNALS, add_chunk, causal_column_mass, check_signals,
                                                  observe_prefill)
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.policies.scoring import EMSScorer, Scorer, SnapKVScorer


def _qk(num_kv_heads: int, group: int, seq_len: int, head_dim: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_kv_heads * group, seq_len, head_dim, generator=gen),
            torch.randn(num_kv_heads, seq_len, head_dim, generator=gen))


def test_no_signal_observes_nothing():
    q, k = _qk(2, 2, 9)
    assert observe_prefill((), q, k) == {}


@pytest.mark.parametrize("num_kv_heads,group,seq_len", [(1, 1, 5), (2, 3, 17), (4, 2, 33)])
def test_global_attention_is_the_causal_column_mass(num_kv_heads, group, seq_len):
    q, k = _qk(num_kv_heads, group, seq_len)
    observed = observe_prefill({"global_attention"}, q, k)
    assert set(observed) == {"global_attention"}
    torch.testing.assert_close(observed["global_attention"], causal_column_mass(q, k))


@pytest.mark.parametrize("cuts", [(7,), (1, 2, 30), (16, 17)])
@pytest.mark.parametrize("group", [1, 4])
def test_chunks_add_up_to_the_whole_prompt(cuts, group):
    """A chunked prefill (the vLLM backend) observes what one pass over the prompt (the HF path) does."""
    seq_len = 31
    q, k = _qk(2, group, seq_len, seed=1)
    whole = observe_prefill(PREFILL_SIGNALS, q, k)
    observed = {}
    for start, end in zip((0, *cuts), (*cuts, seq_len)):
        chunk = observe_prefill(PREFILL_SIGNALS, q[:, start:end], k[:, :end], start)
        observed = add_chunk(observed, chunk)
        assert observed["global_attention"].shape == (2, end)
    for name in PREFILL_SIGNALS:
        torch.testing.assert_close(observed[name], whole[name])


def test_an_engine_kernel_replaces_the_reference():
    q, k = _qk(2, 2, 9)
    calls = []

    def kernel(queries, keys, start=0):
        calls.append((queries.shape, keys.shape, start))
        return torch.full((keys.shape[0], keys.shape[1]), 7.0)

    observed = observe_prefill({"global_attention"}, q[:, 4:], k, 4, {"global_attention": kernel})
    assert calls == [((4, 5, 8), (2, 9, 8), 4)]
    assert torch.equal(observed["global_attention"], torch.full((2, 9), 7.0))


def test_scorers_declare_what_they_observe():
    assert EMSScorer().observes == {"global_attention"}
    assert EMSScorer(local_weight=1.0).observes == frozenset()  # the local term alone
    assert SnapKVScorer().observes == frozenset()
    assert build_policy("ems", budget=0.2).observes == {"global_attention"}
    assert build_policy("snapkv", budget=0.2).observes == frozenset()


def test_a_scorer_asking_for_an_unknown_signal_fails_when_its_policy_is_built():
    @dataclass(frozen=True)
    class QueryStatsScorer(Scorer):
        observes = frozenset({"query_covariance"})

    with pytest.raises(ValueError, match=r"unknown prefill signal\(s\) \['query_covariance'\]; valid: global_attention"):
        check_signals(QueryStatsScorer().observes)
    snapkv = build_policy("snapkv", budget=0.2)
    with pytest.raises(ValueError, match="query_covariance"):
        type(snapkv)(QueryStatsScorer(), snapkv.allocator, snapkv.reducer, snapkv.budget)
