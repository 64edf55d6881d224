"""Reliability benchmark, load section: many concurrent OpenAI clients against a server running the plugin.

Starts ``python -m vllm.entrypoints.openai.api_server --kv-compression snapkv --kv-budget N`` (the
test suite's tiny random GQA Llama on the CPU by default, ``--model`` for another one, or an
already running server with ``--url``) and runs ``--clients`` concurrent clients (asyncio + httpx)
for ``--seconds``. Each client loops over requests with a random prompt length and a random
``max_tokens`` (``ignore_eos``, so the answer's length is known), mixing /v1/completions and
/v1/chat/completions, streamed and not; a share carries per-request overrides (``vllm_xargs``:
``kv_compression`` preset names, ``kv_budget`` token counts and fractions) and a share is
deliberately bad (unknown policy, bad budget, unknown ``kv_*`` key, prompt longer than the model,
negative ``max_tokens``...), which must be answered 400. Every good request must be answered 200 with
exactly ``max_tokens`` tokens (streams: every chunk parsed, ``[DONE]`` reached, no error event).

Recorded: requests sent, answers per status code, 5xx (must be 0), transport errors, unexpected
answers (wrong status, wrong length, broken stream), requests/s, and the KV pool in use before and
after the load: vLLM's ``vllm:kv_cache_usage_perc`` gauge (for the plugin: 1 - free head-blocks /
pool) must return to its idle value. vLLM refreshes that gauge only with the stats of an engine
step, and a step runs only while a request is in the engine, so after the load (and after aborts,
which free blocks outside any step) a 1-token probe request is sent and the gauge polled until it
reads idle again (a leak keeps it above idle: the probe cannot free blocks nobody holds). When this
script starts the server it also reads the plugin's event log (``VLLM_KVC_EVENTS``): the scheduler's
free head-blocks when idle must equal the free head-blocks at start-up.

``--faults`` then injects faults and bad inputs (:func:`run_faults`):

* disconnects: streamed requests whose socket is closed (or reset) right after the first chunk;
* cancellations: requests given up by the client after 50 ms - 2 s (some during the prefill and
  the compression that ends it, some mid-decode), the server sees the connection close;
* bad and edge inputs, each checked for its expected status: prompt longer than max-model-len
  (400), ``max_tokens=1`` (200, one token: finishes at the step that compresses), ``n=2``,
  ``prompt_logprobs``, a prompt filling the context, ``vllm_xargs`` of wrong types (lists, numbers
  for names, objects, null...).

After each group: ``/health`` is 200, a reference request gives the same greedy tokens as before the
faults, and the pool is back to idle.

    python benchmarks/load.py --clients 8 --seconds 60 --out benchmarks/results/reliability.json
    python benchmarks/load.py --clients 8 --seconds 60 --faults --out benchmarks/results/reliability.json
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 64 --seconds 600   # a GPU server

Writes the ``load`` section of the results (``load_clients``, ``load_errors`` = 5xx + transport
errors + unexpected answers, ``load_requests``, ``load_requests_per_s``, ``load_seconds``, ...) and,
with ``--faults``, the ``bad_inputs`` section (``bad_inputs_tried``, ``faults_injected`` =
disconnects + cancellations) through ``benchmarks/reliability.py:merge_results``. Exit status 1 when
any check fails. Tests (tests/vllm/test_vllm_load.py, test_vllm_faults.py) import the same functions
and write nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from vllm_kvcompress.policies.config import PRESET_NAMES
from vllm_kvcompress.tools.models import TINY_SENTENCES, tiny_llama_folder
from vllm_kvcompress.tools.openai_server import TINY_ENGINE_FLAGS, Server, metric, start_tiny, write_chat_template

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "benchmarks" / "results" / "reliability.json"
USAGE = "vllm:kv_cache_usage_perc"  # vLLM 0.26: 1 - free / pool (head-blocks with the plugin)
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
WORDS = sorted({w for s in TINY_SENTENCES for w in s.split()})  # in the tiny model's vocabulary
# per-request presets: every one that needs no head-score file
SAFE_PRESETS = tuple(p for p in PRESET_NAMES if not p.startswith("headkv"))
BUDGETS = (8, 16, 48, 128, 0.1, 0.25, 0.5, 1.0)
# The started server: the tiny model's CPU flags with a 1024-token context and a pool of 520 head-blocks
# (one uncompressed 1024-token request of the tiny model needs 4 layers * 2 heads * 64 = 512), so that
# 8 concurrent requests with prompts of up to 900 tokens run the pool nearly dry (~15 blocks left).
ENGINE_FLAGS = [*TINY_ENGINE_FLAGS]
ENGINE_FLAGS[ENGINE_FLAGS.index("--max-model-len") + 1] = "1024"
POOL_FLAGS = ("--num-gpu-blocks-override", "520")


# ---- the server ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """What the clients talk to: base URL, served model name, its max-model-len, and (when this
    process started the server) the plugin's event log."""

    url: str
    model: str
    max_model_len: int
    events_path: str | None = None


def describe(url: str, events_path: str | None = None) -> Target:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return Target(url.rstrip("/"), models[0]["id"], int(models[0].get("max_model_len") or 2048), events_path)


def start_server(workdir: str, model: str | None = None, chat_template: str | None = None, policy: str = "snapkv",
                 budget: str = "32", engine_flags: list[str] | None = None, extra_flags: tuple[str, ...] = POOL_FLAGS,
                 events: bool = True) -> tuple[Server, Target]:
    """A server with the plugin, its log and event log under ``workdir``, ready (ServerError if it
    does not start). ``model`` None: the tiny test Llama, built there (with a chat template of ours,
    as its tokenizer has none)."""
    if model is None:
        model = tiny_llama_folder(os.path.join(workdir, "tiny-llama"))
        chat_template = write_chat_template(workdir)
    events_path = os.path.join(workdir, "events.jsonl") if events else None
    env = {"VLLM_KVC_EVENTS": events_path} if events_path else None
    # the load's clients ask for any preset and budget per request: a server that allows them
    flags = ["--kv-compression", policy, "--kv-budget", str(budget), "--kv-request-overrides", "all", *extra_flags]
    server = start_tiny(model, flags, os.path.join(workdir, "server.log"), chat_template,
                        engine_flags=ENGINE_FLAGS if engine_flags is None else engine_flags, env=env)
    return server, describe(server.url, events_path)


# ---- /metrics and the idle pool -------------------------------------------------------------------
def read_gauges(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {"usage": metric(text, USAGE), "running": metric(text, RUNNING), "waiting": metric(text, WAITING)}


def read_events(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pool_state(target: Target) -> dict | None:
    """The scheduler's head-block pool from the plugin's event log (None without one): free blocks at
    start-up, and the state at the start of the latest step (``free``, ``requests`` holding blocks).
    ``idle_free`` is that free count when no request held blocks then, else None (a request the
    scheduler still counts, e.g. a leaked one, keeps it None)."""
    events = read_events(target.events_path)
    init = [e for e in events if e["kind"] == "manager_init"]
    if not init:
        return None
    steps = [e for e in events if e["kind"] == "step"]
    last = steps[-1] if steps else {"free": init[-1]["free"], "requests": 0}
    return {"initial_free": init[-1]["free"], "idle_free": last["free"] if last["requests"] == 0 else None,
            "last_step_requests": last["requests"], "pool": init[-1]["num_blocks"],
            "min_free": min([e["free"] for e in steps], default=init[-1]["free"]),
            "peak_requests": max([e["peak"] for e in events if e["kind"] == "peak_requests"], default=0)}


COUNTERS = {"preemptions": "vllm:num_preemptions_total", "compressions": "vllm:kv_compression_compressions_total",
            "blocks_freed": "vllm:kv_compression_blocks_freed_total"}


def read_counters(url: str) -> dict:
    """Server-side counters (vLLM's and the plugin's) and finished requests per reason."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {k: metric(text, name) or 0.0 for k, name in COUNTERS.items()}
    for reason in ("length", "stop", "abort", "error"):
        out[f"finished_{reason}"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                        if line.startswith("vllm:request_success_total{")
                                        and f'finished_reason="{reason}"' in line)
    return out


def counters_delta(before: dict, after: dict) -> dict:
    return {k: int(after[k] - before[k]) for k in after}


def probe_body(target: Target) -> dict:
    return {"model": target.model, "prompt": "the quick brown fox", "max_tokens": 1, "temperature": 0.0}


def settle(target: Target, idle_usage: float = 0.0, timeout: float = 30.0) -> dict:
    """Wait for the pool to be idle again: send a 1-token probe (vLLM refreshes its gauges only in an
    engine step), read the gauges, repeat until usage == ``idle_usage`` with nothing running or
    waiting, or ``timeout``. Returns the last reading: usage, running, waiting, probes, seconds,
    idle (bool), and the event-log pool state when there is one."""
    start = time.monotonic()
    probes = 0
    while True:
        response = httpx.post(f"{target.url}/v1/completions", json=probe_body(target), timeout=120)
        probes += 1
        gauges = read_gauges(target.url)
        idle = (response.status_code == 200 and gauges["usage"] == idle_usage
                and not gauges["running"] and not gauges["waiting"])
        if idle or time.monotonic() - start > timeout:
            break
        time.sleep(0.5)
    out = dict(gauges, probes=probes, seconds=round(time.monotonic() - start, 2), idle=idle)
    pool = pool_state(target)
    if pool is not None:
        out["pool"] = pool
        out["idle"] = idle and pool["idle_free"] == pool["initial_free"]
    return out


# ---- requests ---------------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Job:
    """One request: route, JSON body, whether it is streamed, the status it must get and, for good
    requests, the number of tokens each choice must have."""

    kind: str            # completion | chat | completion-stream | chat-stream | bad:<what>
    route: str
    body: dict
    expect: int
    tokens: int | None = None
    choices: int = 1

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def good_job(rng: random.Random, target: Target, cfg: "LoadConfig") -> Job:
    prompt_len = rng.randint(cfg.prompt_min, cfg.prompt_max)
    max_tokens = rng.randint(1, cfg.max_tokens)
    prompt_len = min(prompt_len, target.max_model_len - max_tokens - 4)
    kind = rng.choices(("completion", "chat", "completion-stream", "chat-stream"), (4, 3, 2, 1))[0]
    body = {"model": target.model, "max_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7)),
            "ignore_eos": True, "seed": rng.randrange(1 << 30)}
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": words(rng, prompt_len)}]
    else:
        body["prompt"] = words(rng, prompt_len)
    if kind.endswith("stream"):
        body.update(stream=True, stream_options={"include_usage": True})
    if rng.random() < cfg.p_override:
        xargs = {}
        if rng.random() < 0.6:
            xargs["kv_compression"] = rng.choice(SAFE_PRESETS)
        if not xargs or rng.random() < 0.5:
            xargs["kv_budget"] = rng.choice(BUDGETS)
        body["vllm_xargs"] = xargs
    route = "chat/completions" if kind.startswith("chat") else "completions"
    return Job(kind, route, body, 200, tokens=max_tokens)


# deliberately bad requests of the load (non-streamed: a streamed one reports its 400 in the stream)
LOAD_BAD = {
    "policy": {"vllm_xargs": {"kv_compression": "nosuch"}},
    "budget-zero": {"vllm_xargs": {"kv_budget": 0}},
    "budget-text": {"vllm_xargs": {"kv_budget": "abc"}},
    "unknown-key": {"vllm_xargs": {"kv_budgte": 16}},
    "config-json": {"vllm_xargs": {"kv_compression_config": "{window: 8"}},
    "max-tokens": {"max_tokens": -1},
    "too-long": None,  # prompt longer than max-model-len, built per request
}


def bad_job(rng: random.Random, target: Target) -> Job:
    what = rng.choice(sorted(LOAD_BAD))
    chat = rng.random() < 0.4
    body = {"model": target.model, "max_tokens": 4, "temperature": 0.0}
    text = words(rng, target.max_model_len + 16 if what == "too-long" else rng.randint(8, 64))
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    body.update(LOAD_BAD[what] or {})
    return Job(f"bad:{what}", "chat/completions" if chat else "completions", body, 400)


@dataclass
class Outcome:
    status: int | None          # None: transport error / cancelled
    ok: bool                    # the answer is what the job expects
    error: str | None = None    # why not (or the transport error)
    seconds: float = 0.0
    first_chunk: bool = False   # streams: a data chunk arrived


def check_answer(job: Job, data: dict) -> str | None:
    """None when a 200 answer has the expected choices and token counts."""
    choices = data.get("choices") or []
    if len(choices) != job.choices:
        return f"{len(choices)} choices, expected {job.choices}"
    usage = data.get("usage") or {}
    if job.tokens is not None and usage.get("completion_tokens") != job.tokens * job.choices:
        return f"completion_tokens {usage.get('completion_tokens')}, expected {job.tokens * job.choices}"
    return None


async def read_stream(job: Job, response: httpx.Response) -> str | None:
    """Parse an SSE stream to [DONE]; None when it is complete, has no error event and its usage
    chunk counts the expected tokens."""
    usage, done, chunks = None, False, 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:
            return f"error event in stream: {event['error']}"
        chunks += 1
        if event.get("usage"):
            usage = event["usage"]
    if not done:
        return f"stream ended without [DONE] after {chunks} chunks"
    if job.tokens is not None and (usage or {}).get("completion_tokens") != job.tokens * job.choices:
        return f"stream usage {usage}, expected {job.tokens * job.choices} tokens"
    return None


async def send(client: httpx.AsyncClient, target: Target, job: Job, timeout: float) -> Outcome:
    start = time.monotonic()
    url = f"{target.url}/v1/{job.route}"
    try:
        if job.stream:
            async with client.stream("POST", url, json=job.body, timeout=timeout) as response:
                if response.status_code == 200:
                    error = await read_stream(job, response)
                else:
                    await response.aread()
                    error = f"status {response.status_code}: {response.text[:300]}"
                status = response.status_code
        else:
            response = await client.post(url, json=job.body, timeout=timeout)
            status = response.status_code
            if status != job.expect:
                error = f"status {status}, expected {job.expect}: {response.text[:300]}"
            elif status == 200:
                error = check_answer(job, response.json())
            else:
                error = None
    except httpx.HTTPError as e:
        return Outcome(None, False, f"{type(e).__name__}: {e}", time.monotonic() - start)
    return Outcome(status, error is None and status == job.expect, error, time.monotonic() - start)


# ---- the load -----------------------------------------------------------------------------------------
@dataclass
class LoadConfig:
    clients: int = 8
    seconds: float = 60.0
    prompt_min: int = 4
    prompt_max: int = 900
    max_tokens: int = 64
    p_bad: float = 0.1
    p_override: float = 0.3
    timeout: float = 300.0  # per request: a CPU server under load is slow
    seed: int = 0


@dataclass
class LoadStats:
    sent: int = 0
    answered: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    bad_sent: int = 0
    bad_400: int = 0
    server_errors: int = 0      # 5xx
    transport_errors: int = 0
    unexpected: int = 0         # answered, but not as expected (status, length, stream)
    errors: list = field(default_factory=list)  # the first few problems, for the report
    latencies: list = field(default_factory=list)

    def add(self, job: Job, outcome: Outcome) -> None:
        self.sent += 1
        self.by_kind[job.kind.split(":")[0]] += 1
        self.latencies.append(outcome.seconds)
        if job.expect == 400:
            self.bad_sent += 1
        if outcome.status is None:
            self.transport_errors += 1
        else:
            self.answered += 1
            self.by_status[outcome.status] += 1
            if outcome.status >= 500:
                self.server_errors += 1
            elif not outcome.ok:
                self.unexpected += 1
            if job.expect == 400 and outcome.status == 400:
                self.bad_400 += 1
        if not outcome.ok and len(self.errors) < 20:
            self.errors.append(f"{job.kind} -> {outcome.error}")

    @property
    def errors_total(self) -> int:
        return self.server_errors + self.transport_errors + self.unexpected


async def client_loop(index: int, client: httpx.AsyncClient, target: Target, cfg: LoadConfig,
                      deadline: float, stats: LoadStats) -> None:
    rng = random.Random(cfg.seed * 1000 + index)
    while time.monotonic() < deadline:
        job = bad_job(rng, target) if rng.random() < cfg.p_bad else good_job(rng, target, cfg)
        stats.add(job, await send(client, target, job, cfg.timeout))


async def _load(target: Target, cfg: LoadConfig) -> LoadStats:
    stats = LoadStats()
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        deadline = time.monotonic() + cfg.seconds
        await asyncio.gather(*(client_loop(i, client, target, cfg, deadline, stats) for i in range(cfg.clients)))
    return stats


def run_load(target: Target, cfg: LoadConfig) -> dict:
    """The load of ``cfg`` against ``target``: clients stop starting requests after ``cfg.seconds``
    and wait for the ones in flight. Returns the measurements (see the module docstring)."""
    before = settle(target)
    counters = read_counters(target.url)
    start = time.monotonic()
    stats = asyncio.run(_load(target, cfg))
    seconds = time.monotonic() - start
    after = settle(target, idle_usage=before["usage"])
    server = counters_delta(counters, read_counters(target.url))
    lat = sorted(stats.latencies) or [0.0]
    return {
        "load_clients": cfg.clients, "load_requests": stats.sent, "load_errors": stats.errors_total,
        "load_requests_per_s": round(stats.sent / seconds, 3), "load_seconds": round(seconds, 2),
        "answered": stats.answered, "by_status": {str(k): v for k, v in sorted(stats.by_status.items())},
        "by_kind": dict(sorted(stats.by_kind.items())), "bad_requests": stats.bad_sent,
        "bad_answered_400": stats.bad_400, "server_errors_5xx": stats.server_errors,
        "transport_errors": stats.transport_errors, "unexpected": stats.unexpected, "errors": stats.errors,
        "latency_s": {"p50": round(lat[len(lat) // 2], 3), "p99": round(lat[int(len(lat) * 0.99)], 3),
                      "max": round(lat[-1], 3)},
        "kv_usage_before": before["usage"], "kv_usage_after": after["usage"],
        "pool_before": before.get("pool"), "pool_after": after.get("pool"),
        "pages_back_to_idle": after["idle"], "settle_seconds": after["seconds"],
        "server_counters": server,  # during the load (+ the settle probes): preemptions, compressions...
        "config": asdict(cfg),
    }


# ---- faults and bad inputs --------------------------------------------------------------------------
def reference_body(target: Target) -> dict:
    """A greedy request whose tokens must not change across the faults (one request on an idle
    server: the same batch every time). It recompresses at every step (``decode_slack`` 1): on the
    server's default cadence its tokens would depend on where the server's step clock stands when
    it arrives (the README's note on ``decode_slack``), which the faults before it move."""
    text = " ".join(TINY_SENTENCES * 3)
    return {"model": target.model, "prompt": text, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": {"kv_compression_config": json.dumps({"decode_slack": 1})}}


def reference_tokens(target: Target) -> list[int] | None:
    response = httpx.post(f"{target.url}/v1/completions", json=reference_body(target), timeout=120)
    if response.status_code != 200:
        return None
    choice = response.json()["choices"][0]
    return choice.get("token_ids") or choice["text"]


async def disconnect_after_first_chunk(target: Target, body: dict, route: str, reset: bool,
                                       timeout: float = 120.0) -> bool:
    """Send a streamed request over a raw socket, read until the first ``data:`` chunk, then close
    the socket (``reset``: abort it, an RST). True when the first chunk had arrived."""
    host, port = target.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(f"POST /v1/{route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n\r\n".encode() + payload)
    await writer.drain()
    got = False
    try:
        async with asyncio.timeout(timeout):
            while line := await reader.readline():
                if line.startswith(b"data: "):
                    got = b'"error"' not in line
                    break
    except TimeoutError:
        pass
    if reset:
        writer.transport.abort()
    else:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return got


async def _disconnects(target: Target, n: int, rng: random.Random) -> dict:
    jobs = []
    for i in range(n):
        chat = i % 3 == 2
        body = {"model": target.model, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "stream": True}
        text = words(rng, min(rng.choice((20, 200, 800)), target.max_model_len - 216))
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if i % 4 == 3:
            body["vllm_xargs"] = {"kv_compression": rng.choice(SAFE_PRESETS)}
        jobs.append(disconnect_after_first_chunk(target, body, "chat/completions" if chat else "completions",
                                                 reset=i % 2 == 1))
    got = await asyncio.gather(*jobs)
    return {"disconnects_tried": n, "disconnects": sum(got)}


async def _cancellations(target: Target, n: int, rng: random.Random, concurrency: int = 8) -> dict:
    """``n`` requests given up by the client after a short timeout (httpx closes the connection)."""
    timeouts = (0.05, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    cancelled = completed = other = 0
    problems = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal cancelled, completed, other
        max_tokens = rng.choice((1, 8, 64))
        prompt_len = min(rng.choice((16, 100, 400, 1200)), target.max_model_len - max_tokens - 8)
        job = Job("cancel", "completions", {
            "model": target.model, "prompt": words(rng, prompt_len), "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": i % 3 == 0}, 200)
        if i % 5 == 4:
            job.body["vllm_xargs"] = {"kv_budget": rng.choice(BUDGETS)}
        async with sem:
            async with httpx.AsyncClient() as client:  # own connection: closing it is the cancellation
                outcome = await send(client, target, job, rng.choice(timeouts))
        if outcome.status is None and "Timeout" in (outcome.error or ""):
            cancelled += 1
        elif outcome.status == 200 and outcome.ok:
            completed += 1
        else:
            other += 1
            problems.append(outcome.error)

    await asyncio.gather(*(one(i) for i in range(n)))
    return {"cancellations_tried": n, "cancellations": cancelled, "completed_before_timeout": completed,
            "cancel_problems": other, "cancel_errors": problems[:10]}


def bad_inputs(target: Target) -> list[tuple[str, Job]]:
    """(name, job) pairs of bad and edge inputs with the status each must get."""
    m = target.model
    short = " ".join(TINY_SENTENCES)  # 53 words: longer than the tiny budget of 32
    too_long = words(random.Random(5), target.max_model_len + 8)
    filling = words(random.Random(6), target.max_model_len - 1)

    def comp(name, expect=400, tokens=None, choices=1, **body):
        return name, Job(f"bad:{name}", "completions",
                         {"model": m, "prompt": short, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                          **body}, expect, tokens, choices)

    def chat(name, expect=400, tokens=None, **body):
        return name, Job(f"bad:{name}", "chat/completions",
                         {"model": m, "messages": [{"role": "user", "content": short}], "max_tokens": 4,
                          "temperature": 0.0, "ignore_eos": True, **body}, expect, tokens)

    def xargs(name, value, expect=400):
        return comp(name, expect, vllm_xargs=value)

    return [
        # vLLM's own limits
        comp("prompt-too-long", prompt=too_long),
        chat("chat-prompt-too-long", messages=[{"role": "user", "content": too_long}]),
        comp("prompt-plus-max-tokens-too-long", prompt=filling, max_tokens=16),
        comp("max-tokens-zero", max_tokens=0),
        comp("max-tokens-negative", max_tokens=-1),
        comp("temperature-negative", temperature=-1.0),
        comp("empty-prompt", prompt=""),
        # edge inputs that must be served
        comp("max-tokens-1", 200, tokens=1, max_tokens=1),
        chat("chat-max-tokens-1", 200, tokens=1, max_tokens=1),
        comp("max-tokens-1-stream", 200, tokens=1, max_tokens=1, stream=True, stream_options={"include_usage": True}),
        comp("prompt-fills-context", 200, tokens=1, prompt=filling, max_tokens=1),
        comp("one-token-prompt", 200, tokens=4, prompt="the"),
        comp("n-2", 200, tokens=4, choices=2, n=2, temperature=0.8),
        comp("prompt-logprobs", 200, tokens=4, prompt_logprobs=1),
        comp("logprobs", 200, tokens=4, logprobs=2),
        comp("budget-above-prompt", 200, tokens=4, vllm_xargs={"kv_budget": 100000}),
        comp("budget-fraction-1", 200, tokens=4, vllm_xargs={"kv_budget": 1.0}),
        comp("budget-tiny", 200, tokens=4, vllm_xargs={"kv_budget": 1}),
        # per-request options of wrong types or values
        xargs("xargs-budget-list", {"kv_budget": [1, 2]}),
        xargs("xargs-budget-null", {"kv_budget": None}),
        xargs("xargs-budget-object", {"kv_budget": {"tokens": 8}}),
        xargs("xargs-budget-negative-fraction", {"kv_budget": -0.5}),
        xargs("xargs-budget-fraction-above-1", {"kv_budget": 1.5}),
        xargs("xargs-budget-empty-text", {"kv_budget": ""}),
        xargs("xargs-budget-beyond-any-context", {"kv_budget": 1e300}),
        xargs("xargs-policy-number", {"kv_compression": 5}),
        xargs("xargs-policy-list", {"kv_compression": ["snapkv"]}),
        xargs("xargs-policy-empty", {"kv_compression": ""}),
        xargs("xargs-config-number", {"kv_compression_config": 7}),
        xargs("xargs-config-list-json", {"kv_compression_config": "[1, 2]"}),
        xargs("xargs-config-object", {"kv_compression_config": {"window": 8}}),
        xargs("xargs-config-bad-window", {"kv_compression_config": '{"window": -3}'}),
        xargs("xargs-config-bad-type", {"kv_compression_config": '{"window": "wide"}'}),
        xargs("xargs-not-an-object", "kv_budget=8"),
        xargs("xargs-unknown-kv-key", {"kv_sink": 4}),
        chat("chat-xargs-budget-list", vllm_xargs={"kv_budget": [1, 2]}),
        chat("chat-xargs-policy-number", vllm_xargs={"kv_compression": 3}),
    ]


async def _bad_inputs(target: Target) -> dict:
    results = {}
    async with httpx.AsyncClient() as client:
        for name, job in bad_inputs(target):
            outcome = await send(client, target, job, 300.0)
            results[name] = {"status": outcome.status, "expected": job.expect, "ok": outcome.ok,
                             **({"error": outcome.error} if not outcome.ok else {})}
    return results


def healthy(target: Target, reference: list[int] | None) -> dict:
    """/health, the reference request's tokens, and the pool back to idle."""
    health = httpx.get(f"{target.url}/health", timeout=30).status_code
    same = reference_tokens(target) == reference
    pool = settle(target)
    return {"health": health, "reference_unchanged": same, "pages_back_to_idle": pool["idle"],
            "kv_usage": pool["usage"], "ok": health == 200 and same and pool["idle"], "pool": pool.get("pool")}


def run_faults(target: Target, disconnects: int = 12, cancellations: int = 48, seed: int = 0) -> dict:
    """Disconnects, cancellations and bad inputs, with a health check after each group."""
    rng = random.Random(seed)
    settle(target)
    reference = reference_tokens(target)
    out = {"reference_ok": reference is not None}
    counters = read_counters(target.url)
    first_event = len(read_events(target.events_path))
    start = time.monotonic()
    out.update(asyncio.run(_disconnects(target, disconnects, rng)))
    out["after_disconnects"] = healthy(target, reference)
    out.update(asyncio.run(_cancellations(target, cancellations, rng)))
    out["after_cancellations"] = healthy(target, reference)
    out["inputs"] = asyncio.run(_bad_inputs(target))
    out["after_bad_inputs"] = healthy(target, reference)
    out["bad_inputs_tried"] = len(out["inputs"])
    out["bad_inputs_unexpected"] = sorted(k for k, v in out["inputs"].items() if not v["ok"])
    out["faults_injected"] = out["disconnects"] + out["cancellations"]
    out["seconds"] = round(time.monotonic() - start, 2)
    # finished_abort: requests the engine aborted (a client gone before the request reached the
    # engine is not counted there)
    out["server_counters"] = counters_delta(counters, read_counters(target.url))
    if target.events_path:
        # requests that held head-blocks when the scheduler freed them, less those that finished
        # normally (and preemptions): the requests aborted inside the engine
        frees = sum(1 for e in read_events(target.events_path)[first_event:]
                    if e["kind"] == "request_freed" and e["blocks"] > 0)
        c = out["server_counters"]
        out["scheduler_frees"] = frees
        out["aborted_in_engine"] = frees - c["finished_length"] - c["finished_stop"] - c["preemptions"]
    out["ok"] = (out["reference_ok"] and not out["bad_inputs_unexpected"] and out["cancel_problems"] == 0
                 and all(out[k]["ok"] for k in ("after_disconnects", "after_cancellations", "after_bad_inputs")))
    return out


# ---- command line ----------------------------------------------------------------------------------------
def versions() -> dict:
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "httpx": httpx.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--url", help="an already running server (started with --kv-compression)")
    parser.add_argument("--model", help="model path for the server this script starts (default: the tiny test Llama)")
    parser.add_argument("--chat-template", help="chat template file for --model (default: the model's own)")
    parser.add_argument("--kv-compression", default="snapkv")
    parser.add_argument("--kv-budget", default="32")
    parser.add_argument("--engine-flags", default=shlex.join(ENGINE_FLAGS),
                        help="vLLM engine flags of the started server (default: the CPU test flags)")
    parser.add_argument("--server-flags", default=shlex.join(POOL_FLAGS),
                        help="more flags of the started server (default: a pool of 520 head-blocks)")
    parser.add_argument("--prompt-max", type=int, default=900, help="longest prompt, in words")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens")
    parser.add_argument("--faults", action="store_true", help="also run disconnects, cancellations, bad inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help=f"merge the results into this JSON (e.g. {RESULTS})")
    args = parser.parse_args(argv)

    cfg = LoadConfig(clients=args.clients, seconds=args.seconds, prompt_max=args.prompt_max,
                     max_tokens=args.max_tokens, seed=args.seed)
    server = None
    workdir = tempfile.mkdtemp(prefix="kvc-load-")
    try:
        if args.url:
            target = describe(args.url)
        else:
            server, target = start_server(workdir, args.model, args.chat_template, args.kv_compression,
                                          args.kv_budget, shlex.split(args.engine_flags),
                                          shlex.split(args.server_flags))
        load = run_load(target, cfg)
        faults = run_faults(target, seed=args.seed) if args.faults else None
        alive = server is None or server.alive()
    finally:
        if server is not None:
            server.stop()
    info = dict(versions(), model=args.model or "tiny-llama (vllm_kvcompress.tools.models.tiny_llama_folder)",
                kv_compression=args.kv_compression, kv_budget=args.kv_budget,
                server=args.url or f"started: {args.engine_flags} {args.server_flags}",
                server_start_s=server.start_s if server else None, server_alive_at_end=alive)
    print(json.dumps({"load": load, **({"faults": faults} if faults else {})}, indent=1, default=str))
    ok = load["load_errors"] == 0 and load["pages_back_to_idle"] and load["bad_answered_400"] == load["bad_requests"]
    ok = ok and alive and (faults is None or faults["ok"])
    if args.out:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from reliability import merge_results

        merge_results(args.out, "load", dict(load, **info))
        if faults is not None:
            merge_results(args.out, "bad_inputs", dict(faults, **info))
        print(f"wrote {args.out}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
