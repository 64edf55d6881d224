"""Concurrent load on the OpenAI server with the plugin (issue #6): benchmarks/load.py's clients for ~45 s.

One server start, shared with test_vllm_faults.py (``kvc_plugin_server`` of conftest.py: tiny random GQA Llama,
snapkv, budget 32, max-model-len 1024, a pool of 520 head-blocks -- one uncompressed 1024-token
request needs 512 -- and the plugin's event log on). 8 clients mix completions and chat, streamed
and not, prompts of 4-900 tokens (most longer than the budget), 1-64 output tokens, per-request
presets and budgets, and ~10% deliberately bad requests; the pool runs nearly dry. Nothing is
written to benchmarks/results (that is ``python benchmarks/load.py --out ...``).
"""

import benchmark_modules
import pytest

from vllm_kvcompress.tools.openai_server import metric

pytestmark = pytest.mark.slow

SECONDS = 45
CLIENTS = 8


load = benchmark_modules.load("load")


@pytest.fixture(scope="module")
def load_run(kvc_plugin_server):
    result = load.run_load(kvc_plugin_server, load.LoadConfig(clients=CLIENTS, seconds=SECONDS))
    summary = {k: result[k] for k in ("load_requests", "load_requests_per_s", "load_seconds", "by_status",
                                      "by_kind", "bad_requests", "latency_s", "pool_after")}
    print(f"load: {summary}")
    return result


def test_no_server_errors(load_run):
    assert load_run["server_errors_5xx"] == 0, load_run["errors"]
    assert load_run["transport_errors"] == 0, load_run["errors"]


def test_every_request_answered_as_expected(load_run):
    """Every request got an answer; good ones 200 with exactly max_tokens tokens (streams: complete,
    no error event), bad ones 400."""
    assert load_run["answered"] == load_run["load_requests"]
    assert load_run["unexpected"] == 0, load_run["errors"]
    assert load_run["load_errors"] == 0


def test_bad_requests_answer_400(load_run):
    assert load_run["bad_requests"] > 0
    assert load_run["bad_answered_400"] == load_run["bad_requests"]


def test_the_load_was_real(load_run, kvc_plugin_server):
    """Not vacuous: many requests of every kind, several at once in the engine, compressions done."""
    assert load_run["load_requests"] >= 4 * CLIENTS
    assert set(load_run["by_kind"]) >= {"completion", "chat", "completion-stream", "chat-stream", "bad"}
    assert load_run["pool_after"]["peak_requests"] >= 4
    assert load_run["pool_after"]["min_free"] < load_run["pool_after"]["initial_free"] // 4  # the pool ran low
    text = metric(load.httpx.get(f"{kvc_plugin_server.url}/metrics").text, "vllm:kv_compression_compressions_total")
    assert text and text > 0


def test_pages_back_to_idle(load_run):
    """vLLM's kv_cache_usage_perc gauge and the scheduler's free head-blocks (event log) are back
    at their idle values once the load is over."""
    assert load_run["kv_usage_before"] == 0.0
    assert load_run["kv_usage_after"] == load_run["kv_usage_before"]
    pool = load_run["pool_after"]
    assert pool["idle_free"] == pool["initial_free"], pool
    assert load_run["pages_back_to_idle"]


def test_server_alive(load_run, kvc_plugin_server):
    assert load.httpx.get(f"{kvc_plugin_server.url}/health", timeout=30).status_code == 200
