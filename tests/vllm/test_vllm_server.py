"""The plugin behind vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``, CPU).

Two server starts for the module, one after the other: a plain server (no ``--kv-compression``),
whose greedy tokens are kept before it shuts down, and the plugin's server (``--kv-compression
snapkv --kv-budget 32``, every prompt longer than the budget) that every other test talks to. That
server trusts its clients (``--kv-request-overrides all``: any policy, option and budget per
request), so every preset is reached per request; the default rules have their own server in
test_vllm_request_rules.py.
The bad-flag tests start no engine: the front end refuses before spawning one.
The server process and the tiny model's flags come from vllm_kvcompress.tools.openai_server (shared
with the load and fault tests and benchmarks/load.py), the plugin's flags from kvc_server.py.
"""
import json
import os
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from kvc_server import PLUGIN_FLAGS, start_server
from vllm_kvcompress.policies.config import PRESET_NAMES
from vllm_kvcompress.tools.demo import SHIPPED_HEAD_SCORES
from vllm_kvcompress.tools.models import TINY_SENTENCES
from vllm_kvcompress.tools.openai_server import (SERVER, TINY_ENGINE_FLAGS, Server, free_port, metric,
                                                 write_chat_template)

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPT_LENS = (90, 170)  # tokens; both longer than the budget (32 rows per head)
CHAT_TEXT = " ".join(TINY_SENTENCES * 2)  # ~110 tokens, every word in the tiny vocabulary
METRICS = ("vllm:kv_compression_ratio", "vllm:kv_compression_compressions_total",
           "vllm:kv_compression_blocks_freed_total", "vllm:kv_compression_refused_requests_total")
TRUSTED_FLAGS = [*PLUGIN_FLAGS, "--kv-request-overrides", "all"]


# ---- requests --------------------------------------------------------------------------------------
def completion(server: Server, prompt, xargs=None, stream=False) -> requests.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return server.post("completions", body, stream=stream)


def chat(server: Server, xargs=None) -> requests.Response:
    body = {"messages": [{"role": "user", "content": CHAT_TEXT}], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return server.post("chat/completions", body)


def token_ids(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def stream_events(response: requests.Response) -> list:
    """The JSON payloads of an SSE stream up to ``data: [DONE]`` (which must come)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events
        events.append(json.loads(line[len("data: "):]))
    pytest.fail(f"stream ended without [DONE]: {events}")


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_template(tmp_path_factory):
    return write_chat_template(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    vocab = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]
    return [[random.Random(seed).randrange(3, vocab) for _ in range(n)] for seed, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, chat_template, prompts, tmp_path_factory):
    """What the plain server answered (it is shut down before the plugin's server starts)."""
    server = start_server(tiny_model_dir, [], str(tmp_path_factory.mktemp("logs") / "plain.log"), chat_template)
    try:
        tokens = [token_ids(completion(server, p)) for p in prompts]
        # the plugin is inert here: kv_* extra args are ignored (design: params.py docstring)
        ignored = completion(server, prompts[0], {"kv_compression": "nosuch"})
        metrics = server.metrics()
    finally:
        server.stop()
    return {"tokens": tokens, "ignored_status": ignored.status_code, "metrics": metrics}


@pytest.fixture(scope="module")
def server(plain_run, tiny_model_dir, chat_template, tmp_path_factory):
    s = start_server(tiny_model_dir, TRUSTED_FLAGS, str(tmp_path_factory.mktemp("logs") / "plugin.log"), chat_template)
    yield s
    s.stop()


def preset_xargs(preset: str, head_scores_path: str) -> dict:
    xargs = {"kv_compression": preset}
    if preset.startswith("headkv"):
        # the options object travels as JSON text: vllm_xargs values are str | int | float | list
        xargs["kv_compression_config"] = json.dumps({"headkv_scores": head_scores_path})
    return xargs


@pytest.fixture(scope="module")
def preset_run(server, prompts, head_scores_path):
    """Every compressing preset through /v1/completions (each prompt) and /v1/chat/completions,
    sent 4 at a time; /metrics read before and after."""
    presets = [p for p in PRESET_NAMES if p != "none"]
    before = server.metrics()
    jobs = [(p, "completion", i) for p in presets for i in range(len(prompts))] + [(p, "chat", 0) for p in presets]

    def send(job):
        preset, kind, i = job
        xargs = preset_xargs(preset, head_scores_path)
        return completion(server, prompts[i], xargs) if kind == "completion" else chat(server, xargs)

    with ThreadPoolExecutor(4) as pool:
        responses = dict(zip(jobs, pool.map(send, jobs)))
    return {"responses": responses, "before": before, "num_compressed": len(jobs)}


# ---- (a) every preset answers, completions and chat ----------------------------------------------
def test_every_preset_answers(preset_run):
    for (preset, kind, i), response in preset_run["responses"].items():
        assert response.status_code == 200, f"{preset} {kind}: {response.text}"
        choice = response.json()["choices"][0]
        assert len(choice["token_ids"]) == MAX_TOKENS, f"{preset} {kind}"
        text = choice["text"] if kind == "completion" else choice["message"]["content"]
        assert text, f"{preset} {kind}: no text"


# ---- (b) policy none through the plugin == the plain server --------------------------------------
def test_none_equals_plain_server(server, prompts, plain_run, preset_run):
    got = [token_ids(completion(server, p, {"kv_compression": "none"})) for p in prompts]
    assert got == plain_run["tokens"]
    # not vacuous: the server's own policy (snapkv, budget 32) does change the continuation
    snapkv = [token_ids(preset_run["responses"]["snapkv", "completion", i]) for i in range(len(prompts))]
    assert snapkv != plain_run["tokens"]


def test_plain_server_is_untouched(plain_run):
    """Without --kv-compression the plugin registers nothing: no metrics, and vllm_xargs kv_* keys
    are not checked (vLLM passes unused extra args through)."""
    assert plain_run["ignored_status"] == 200
    assert all(metric(plain_run["metrics"], name) is None for name in METRICS)


# ---- (c) bad per-request values: 400, and the server keeps serving -------------------------------
BAD_XARGS = [
    ({"kv_compression": "nosuch"}, "unknown kv-compression policy 'nosuch'", "vllm_xargs.kv_compression"),
    ({"kv_budget": 0}, "budget must be a positive number", "vllm_xargs.kv_budget"),
    ({"kv_budget": "abc"}, "budget must be a token count", "vllm_xargs.kv_budget"),
    ({"kv_budget": -5}, "budget must be a positive number", "vllm_xargs.kv_budget"),
    ({"kv_budgte": 16}, "unknown per-request key(s) kv_budgte; valid keys: kv_compression, kv_budget",
     "vllm_xargs.kv_budgte"),
    ({"kv_compression": "headkv"}, "needs head scores", "vllm_xargs.kv_compression"),
    ({"kv_compression_config": "{window: 8"}, "kv_compression_config is not valid JSON",
     "vllm_xargs.kv_compression_config"),
    ({"kv_compression_config": '{"windw": 8}'}, "unknown kv-compression option", "vllm_xargs.kv_compression_config"),
    ({"kv_compression_config": '{"headkv_scores": "/no/such.json", "policy": "headkv"}'}, "does not exist",
     "vllm_xargs.kv_compression_config"),
]


@pytest.mark.parametrize("xargs, message, param", BAD_XARGS, ids=[json.dumps(x[0]) for x in BAD_XARGS])
def test_bad_request_options_answer_400(server, prompts, xargs, message, param):
    response = completion(server, prompts[0], xargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param, error


def test_bad_chat_options_answer_400(server):
    response = chat(server, {"kv_budget": 0})
    assert response.status_code == 400, response.text
    assert "budget must be a positive number" in response.json()["error"]["message"]


def test_one_api_server_counts_refusals(server, prompts):
    """One API-server process (no PROMETHEUS_MULTIPROC_DIR): the counter lives in the default
    registry, which vLLM's stat logger clears of vllm: metrics when it starts, so it must have been
    put back; each refusal counts once under its reason."""
    def invalid(text):
        return metric(text, 'vllm:kv_compression_refused_requests_total{reason="invalid"}') or 0.0

    before = server.metrics()
    assert 'vllm:kv_compression_refused_requests_total{reason="policy"}' in before
    assert completion(server, prompts[0], {"kv_budget": 0}).status_code == 400
    assert completion(server, prompts[0], {"kv_budget": 8}).status_code == 200  # allowed: not counted
    assert invalid(server.metrics()) == invalid(before) + 1


def test_server_keeps_serving_after_bad_requests(server, prompts):
    for xargs, _, _ in BAD_XARGS:
        assert completion(server, prompts[1], xargs).status_code == 400
    assert len(token_ids(completion(server, prompts[1], {"kv_budget": 0.5}))) == MAX_TOKENS
    assert server.proc.poll() is None


def test_streaming_bad_options_error_then_good_stream(server, prompts):
    """vLLM validates a streamed request when the stream starts: the error (code 400) is an SSE event
    of a 200 response, as for vLLM's own parameter errors; the next stream is served normally."""
    bad = completion(server, prompts[0], {"kv_budget": "abc"}, stream=True)
    events = stream_events(bad)
    assert [e["error"]["code"] for e in events] == [400], events
    assert "budget must be a token count" in events[0]["error"]["message"]
    good = stream_events(completion(server, prompts[0], {"kv_compression": "pyramidkv"}, stream=True))
    assert not any("error" in e for e in good)
    assert sum(len(e["choices"][0].get("token_ids") or []) for e in good) == MAX_TOKENS


# ---- (d) /metrics -----------------------------------------------------------------------------------
def wait_for_metrics(server: Server, done, timeout: float = 30.0) -> str:
    """The /metrics text once ``done(text)`` holds (stats reach the front end after the outputs)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_metrics_count_compressions(server, preset_run):
    def counted(text):  # compressions since before the preset requests
        return (metric(text, METRICS[1]) or 0) - (metric(preset_run["before"], METRICS[1]) or 0)

    text = wait_for_metrics(server, lambda t: counted(t) >= preset_run["num_compressed"])
    for name in METRICS:
        assert metric(text, name) is not None, f"{name} missing from /metrics"
    assert counted(text) >= preset_run["num_compressed"]  # every request was longer than the budget
    assert metric(text, METRICS[2]) > 0
    assert 0 < metric(text, METRICS[0]) < 1
    retained, original = (metric(text, f"vllm:kv_compression_tokens_{k}_total") for k in ("retained", "before"))
    assert 0 < retained < original


# ---- (e) bad flags on the real command line: non-zero exit, message names the problem -------------
@pytest.fixture(scope="module")
def sliding_window_model(tiny_model_dir, tmp_path_factory):
    """The tiny model's files as a Mistral with a 64-token sliding window (config only is read)."""
    out = tmp_path_factory.mktemp("sliding") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.load(open(out / "config.json"))
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.mark.parametrize("model, flags, message", [
    ("tiny", ["--kv-compression", "nosuch"],
     "unknown kv-compression policy 'nosuch'; valid policies: none, streamingllm, snapkv"),
    ("tiny", ["--kv-budget", "0"], "budget must be a positive number"),
    ("sliding", ["--kv-compression", "snapkv"], "sliding-window attention"),
    ("tiny", ["--kv-compression", "headkv", "--kv-compression-config", json.dumps({"headkv_scores": str(SHIPPED_HEAD_SCORES)})],
     "were computed for"),
], ids=["policy", "budget", "sliding-window-model", "head-scores-of-another-model"])
def test_bad_flags_exit_with_the_reason(model, flags, message, tiny_model_dir, sliding_window_model):
    model_dir = tiny_model_dir if model == "tiny" else sliding_window_model
    argv = [*SERVER, "--model", model_dir, "--host", "127.0.0.1", "--port", str(free_port()), *TINY_ENGINE_FLAGS,
            *flags]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output, output[-3000:]
    assert "EngineCore" not in output  # refused in the front end, before any engine process
