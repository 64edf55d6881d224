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
    ms, held, released = host.apply_report_ms(release=False)
    assert math.isfinite(ms) and held == 32 * 8 * 111 and released == 0


@pytest.mark.parametrize("policy", ["snapkv", "ems"])
def test_requests_due_together_share_the_policy_calls(policy):
    """Four requests due in one step: the policy runs once for all (only per-request bookkeeping
    repeats), so far fewer calls than four recompressions one by one (1,524 vs 635 for snapkv)."""
    one, four = host.recompress_calls(policy, prompt=48), host.recompress_calls(policy, prompt=48, num_requests=4)
    assert four < 2 * one, (one, four)


def test_prefills_of_one_step_compressed_together_share_the_policy_calls():
    """Four prefills a step completes, of a policy that only selects rows: one scoring, selection
    and compaction for all, about half the calls of four compressions one by one (1,020 vs 1,944
    at 2k prompts)."""
    counts = host.prefill_step_calls("snapkv", prompts=(200, 200, 170, 200))
    assert counts["together"] < 0.7 * counts["one_by_one"], counts


def test_a_decode_steps_layout_costs_the_same_calls_for_any_number_of_requests():
    """One batched layout per step (90 PyTorch calls at the full size), whatever the batch; the
    CUDA-graph buffers add their three copies (and a fill of padded rows only when padded)."""
    few, many = host.decode_step(num_requests=4, rows=40, steps=6), host.decode_step(num_requests=32, rows=40, steps=6)
    assert few["layout"]["pytorch_calls"] == many["layout"]["pytorch_calls"] < 150
    for run in (few, many):
        assert run["layout_and_graph_buffers"]["pytorch_calls"] - run["layout"]["pytorch_calls"] == 3


def test_the_plugins_whole_decode_step_costs_the_same_calls_for_any_number_of_requests():
    """Ingest, layout (graph buffers), rings, recompression check and reports of a pure-decode
    step: a constant number of PyTorch calls, so the host cost of a step does not grow with the
    batch (each request's rows and blocks were a tensor of its own, two calls a request a step)."""
    few, many = host.plugin_step(4, rows=40, steps=4), host.plugin_step(16, rows=40, steps=4)
    assert few["pytorch_calls_median"] == many["pytorch_calls_median"] < 500, (few, many)


def test_decode_steps_that_assign_no_block_advance_the_graph_buffers_in_place():
    """Ada-KV's heads hold many lengths, so without ``reserve_decode_growth`` some head needs a new
    block at nearly every step; with it none does between two recompressions, and a decode step
    advances the graph buffers in place (``WorkerState.lay_out_decode``) instead of assigning,
    gathering and uploading its layout: far fewer PyTorch calls a step."""
    full = host.plugin_step(16, rows=40, steps=4, policy="adakv")
    in_place = host.plugin_step(16, rows=40, steps=4, policy="adakv", options={"reserve_decode_growth": True})
    assert in_place["pytorch_calls_median"] < 0.5 * full["pytorch_calls_median"], (in_place, full)
