"""benchmarks/host_overhead.py at small sizes: it runs, and the counts it reports stay where the
batched code put them (deterministic PyTorch call counts, not timings)."""
import math

import benchmark_modules
import pytest

host = benchmark_modules.load("host_overhead")


@pytest.mark.parametrize("policy", ["snapkv", "ems", "windowkv"])
def test_one_recompression_of_all_heads_is_a_few_hundred_calls(policy):
    """256 heads in one call, WindowKV included (per-head loops cost 1,888 calls for snapkv and
    81,611 for windowkv at the full benchmark size)."""
    calls = host.recompress_calls(policy, prompt=48)
    assert 50 < calls < 1000, calls


def test_bookkeeping_timers_run():
    assert math.isfinite(host.take_reports_ms(num_requests=4))
    ms, held, released = host.apply_report_ms()
    assert math.isfinite(ms) and held == 32 * 8 * 111 and released == len(range(0, held, 28))


@pytest.mark.parametrize("policy", ["snapkv", "ems"])
def test_requests_due_together_share_the_policy_calls(policy):
    """Four requests due in one step: the policy runs once for all (only per-request bookkeeping
    repeats), so far fewer calls than four recompressions one by one (1,524 vs 635 for snapkv)."""
    one, four = host.recompress_calls(policy, prompt=48), host.recompress_calls(policy, prompt=48, num_requests=4)
    assert four < 2 * one, (one, four)
