"""Served throughput at equal KV bytes: vLLM's OpenAI server driven by vLLM's own benchmark client.

What a user would run to check the plugin: ``vllm serve`` (here ``python -m
vllm.entrypoints.openai.api_server``: the CPU build's ``vllm`` command fails its version lookup)
loaded by ``vllm bench serve`` (``vllm.benchmarks.serve``, run in this process: random dataset,
``--ignore-eos``, greedy, ``--request-rate inf`` or Poisson, ``--extra-body`` for the plugin's
per-request ``vllm_xargs``). Every record says the exact client arguments.

Configurations (``--configs``), all with the SAME KV bytes of a workload's pool of N = pool tokens / 16
blocks, block size 16, prefix caching off, the same ``max_num_seqs`` / ``max_num_batched_tokens``:

* ``plain``: stock vLLM, bf16 KV, ``--num-gpu-blocks-override N``;
* ``plain-fp8``: stock vLLM with ``--kv-cache-dtype fp8``: 2N blocks of half the bytes;
* ``same-batch-plain``: stock vLLM with as much KV as vLLM's memory profiling gives at
  ``--same-batch-memory-utilization``, so that (where it fits) every request runs at once: is the
  plugin's step as cheap as a plain step of the same batch? Records say whether it fitted;
* ``POLICY@BUDGET``: the plugin (``--kv-compression POLICY --kv-budget B``) with N x layers x KV
  heads head-blocks (one head-block: 16 tokens of ONE KV head of one layer, so the same bytes);
  ``POLICY@BUDGET+fp8``: compression over an fp8 cache (``--kv-cache-dtype fp8``), 2N x layers x
  heads head-blocks in the same bytes; its records also say how they compare with ``POLICY@BUDGET``
  over bf16 (``ratio_bf16_policy``: output tok/s, ``running_ratio_bf16_policy``: peak running
  requests; issue #17 asks >= 1.4x and >= 1.8x). The plugin configurations of a workload share ONE server,
  started with the first of them: each run's requests carry their own policy and budget
  (``vllm_xargs``: ``kv_compression``, ``kv_budget``).

Servers whose settings agree are shared by workloads (``same-batch-plain``: one for all, sized for
the longest). ``--parallel-starts K`` starts up to K fixed-pool servers side by side (each with
``--kv-cache-memory-bytes``, which skips vLLM's memory profiling, so that they cannot disturb each
other's; as many as the device memory holds) and measures them one after another: server starts are
most of a GPU session's time.

Workloads (``--workloads``; Llama-3-8B shape, dummy weights, the offline tokenizer of
``common.build_model_dir``): ``long-gen`` 2k prompts / 8k outputs, 256 requests, pool 80k tokens;
``kvcompress`` KV-Compress's setup (Llama-3.1-8B on a 24 GB L4: ~48k tokens of KV; 6k prompts ->
500 outputs, 256 requests; Llama-3.1 differs from the llama3-8b shape only in its RoPE scaling,
which costs the same); ``16k`` 16k / 1k, 128 requests, pool 160k tokens. Arrivals: all at once
(``--request-rate inf``, the default) or Poisson (``--request-rate 2``; a comma list runs each).

Bounded runs: every run is measured over the same window (``--duration``, e.g. 120 s) from the
client's first request to min(its end, the window); a plain 2k/8k run of 256 requests would take
over 30 minutes. From the server's Prometheus counters between those two instants: output tok/s =
``vllm:generation_tokens_total`` / elapsed, total tok/s adds ``vllm:prompt_tokens_total`` (counted
when a prompt's prefill ends), preemptions; ``vllm:num_requests_running`` sampled at ~2 Hz for the
peak. Ratios to plain (``ratio_plain``) compare output tok/s; ``ratio_plain_total`` compares total
tok/s, as KV-Compress reports its multipliers (in a prefill-bound window a larger batch shows as
prompt tokens served more than as output). A run cut by its window has ``complete: false`` (the client is cancelled, its connections
close, the server aborts the requests and is drained before the next run); a run that finishes
inside it also records the client's TTFT / TPOT p50/p99. ``jit_compiles`` / ``jit_compiled_kernels``:
the kernel compilations vLLM's JIT monitor logged from the run's start until its client returned
(the window, and the abort of what the window cut; every server runs with ``--jit-monitor-verbose``
unless ``--no-jit-monitor``);
each stalls a step, often for a second or more.

Per plugin run, from the plugin's event log (``VLLM_KVC_EVENTS``): ``budget_fraction`` (rows kept /
rows of the prompt over every (layer, KV head) of its prefill compressions), decode-time
recompressions per second, and, where the plugin logs ``step_time`` events, the step breakdown
(:func:`step_breakdown`; absent on older code, never estimated). Before its runs a plugin server
gets one request per configuration and workload (its prompt length, :data:`WARM_UP_TOKENS`
outputs: ``warm_up``), as the plain server gets its prefill probe, so that no run's window holds
the kernels' first compilation.

Ceiling (:func:`ideal_output_tok_s`): the output tok/s of an ideal server for the workload and pool:
the prompts prefill at the plain prefill rate (a prefill-only probe on the plain server: requests of
the workload's prompt length with max_tokens 1), and a decode step reads the weights plus the KV
that the largest batch the pool holds retains, at the device's copy bandwidth (a device-to-device
copy measured once per invocation, bytes read + written). Where the window would cut that ideal
server too, the ceiling is its best batch over the window (:func:`ideal_window_output_tok_s`:
requests then hold the tokens they reach in the window, not their full length).
``ceiling_fraction`` = measured / ideal.

    python benchmarks/serving.py --workloads long-gen,kvcompress --duration 60 --parallel-starts 3
    python benchmarks/serving.py --workloads kvcompress --configs plain,snapkv@0.1 --request-rate 2
    python benchmarks/serving.py --quick --out /tmp/s.json   # CPU, tiny model, ~3-4 minutes
    python benchmarks/serving.py --plot benchmarks/results/serving-h200.json

Output: a table, ``benchmarks/results/serving-<device>.json`` (a header: command, device, versions,
probes; records keyed by model, workload, arrival, configuration, merged with what is there: runs
already done with the same settings are skipped unless ``--force``) and a PNG next to it.
``--time-limit`` bounds the invocation: what does not fit is recorded as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHAPES, bench_serve_args, build_model_dir, client_percentiles,  # noqa: E402
                    decode_weight_bytes, detect_device, device_slug, dtype_bytes, invocation_paths,
                    kv_bytes_per_token, plugin_entry_point, plugin_started, read_metrics, replot, shape_dims,
                    shape_sha, versions)
from recording import write_json  # noqa: E402

from vllm_kvcompress.tools.openai_server import SERVER, Server  # noqa: E402

BLOCK_SIZE = 16  # tokens of a plain block; rows of a head-block
PERCENTILES = (50, 99)
PLAIN, PLAIN_FP8, SAME_BATCH = "plain", "plain-fp8", "same-batch-plain"
DEFAULT_CONFIGS = "plain,plain-fp8,same-batch-plain,ems@0.1,snapkv@0.1,streamingllm@0.1"
# fixed-pool servers get --kv-cache-memory-bytes; vLLM then only checks that this share of the
# device's memory is free at start-up (side-by-side starts each pass it)
FIXED_POOL_UTILIZATION = 0.1
SERVER_OVERHEAD_BYTES = 8 << 30  # per GPU server beyond weights + pool: activations, graphs, context
RUN_OVERHEAD_S = 20.0  # per run beyond its window (for --time-limit): the client's dataset, the drain
PROBE_S = 30.0
WARM_UP_TOKENS = 2 * 64 + 2  # a plugin server's warm-up outputs: past two ticks at the default decode_slack
FINISH_MARGIN_S = 30.0  # at the end of --time-limit: stop the servers, write the results
PROGRESS = "[serving]"


def progress(message: str) -> None:
    print(f"{PROGRESS} {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- workloads and configurations --------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Fixed lengths (random token prompts, ``ignore_eos``); ``pool_tokens``: the KV pool in bf16
    tokens every configuration gets the bytes of; ``window_s``: the default bound of a run."""

    name: str
    prompt_len: int
    output_len: int
    requests: int
    pool_tokens: int
    description: str
    window_s: float = 120.0

    @property
    def max_model_len(self) -> int:
        return -(-(self.prompt_len + self.output_len) // 128) * 128

    @property
    def request_tokens(self) -> int:
        """KV tokens one request holds at its end, in whole blocks."""
        return -(-(self.prompt_len + self.output_len) // BLOCK_SIZE) * BLOCK_SIZE


WORKLOADS = {
    "long-gen": Workload("long-gen", 2048, 8192, 256, 80_000, "2k prompts / 8k outputs (long generation)"),
    "kvcompress": Workload("kvcompress", 6000, 500, 256, 48_000,
                           "KV-Compress's setup: 6k prompts / 500 outputs, ~48k tokens of KV (a 24 GB L4)"),
    "16k": Workload("16k", 16384, 1024, 128, 160_000, "16k prompts / 1k outputs"),
}
QUICK_WORKLOADS = {  # --quick: the CPU test's; plain runs one request at a time in 512 tokens, the
    # plugin (budget + decode_slack 64 < 96 outputs) recompresses each request once during decode
    "quick": Workload("quick", 300, 96, 4, 512, "--quick: 300 prompt / 96 output, runs to the end"),
    "quick-window": Workload("quick-window", 128, 384, 8, 512,
                             "--quick: 128 prompt / 384 output, cut by a 1 s window", window_s=1.0),
}


@dataclass(frozen=True)
class ServingConfig:
    """``plain``, ``plain-fp8``, ``same-batch-plain`` or ``POLICY@BUDGET[+fp8]``."""

    label: str
    policy: str | None = None  # None: stock vLLM
    budget: int | float | None = None
    fp8: bool = False

    @property
    def plugin(self) -> bool:
        return self.policy is not None

    @property
    def kv_cache_dtype(self) -> str:
        return "fp8" if self.fp8 else "auto"

    @property
    def server_kind(self) -> str:
        """Configurations of one kind (and workload settings) share a server."""
        if self.plugin:
            return "plugin-fp8" if self.fp8 else "plugin"
        return self.label

    def xargs(self) -> dict | None:
        """The per-request options of a plugin run (``vllm_xargs``)."""
        return {"kv_compression": self.policy, "kv_budget": self.budget} if self.plugin else None


def parse_config(text: str) -> ServingConfig:
    from vllm_kvcompress.policies.budget import Budget
    from vllm_kvcompress.policies.config import PRESET_NAMES

    text = text.strip()
    if text in (PLAIN, PLAIN_FP8, SAME_BATCH):
        return ServingConfig(text, fp8=text == PLAIN_FP8)
    policies = ", ".join(PRESET_NAMES[1:])
    if "@" not in text:
        raise ValueError(f"configuration {text!r}: expected {PLAIN}, {PLAIN_FP8}, {SAME_BATCH} or "
                         f"POLICY@BUDGET[+fp8] with POLICY one of {policies} (snapkv@0.1)")
    body, plus, suffix = text.partition("+")
    if plus and suffix != "fp8":
        raise ValueError(f"configuration {text!r}: unknown suffix +{suffix} (only +fp8)")
    policy, budget_text = body.split("@", 1)
    if policy not in PRESET_NAMES[1:]:
        raise ValueError(f"configuration {text!r}: unknown policy {policy!r} (one of {policies})")
    budget = Budget.parse(budget_text)
    value = budget.tokens if budget.tokens is not None else budget.fraction
    return ServingConfig(f"{policy}@{value}" + ("+fp8" if plus else ""), policy, value, fp8=bool(plus))


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise ValueError(f"request rate {text!r}: must be > 0 (inf: all at once)")
    return rate


def arrival_name(rate: float) -> str:
    return "all-at-once" if math.isinf(rate) else f"poisson-{rate:g}/s"


# ---- servers -----------------------------------------------------------------------------------------


@dataclass
class Run:
    workload: Workload
    config: ServingConfig
    rate: float


@dataclass
class ServerPlan:
    """One server and the runs it serves. ``pool_blocks``: the plain bf16 blocks whose bytes it
    gets (None: vLLM's memory profiling sizes the pool, ``same-batch-plain``)."""

    kind: str
    model: str
    max_model_len: int
    max_num_seqs: int
    pool_blocks: int | None
    first: ServingConfig  # a plugin server starts with its first configuration's policy and budget
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        pool = f"{self.pool_blocks * BLOCK_SIZE}tok" if self.pool_blocks else "profiled"
        return f"{self.model}-{self.kind}-{pool}-{self.max_model_len}"

    @property
    def num_blocks(self) -> int | None:
        """What ``--num-gpu-blocks-override`` gets: blocks, or head-blocks for the plugin (same bytes)."""
        if self.pool_blocks is None:
            return None
        layers, heads, _ = shape_dims(SHAPES[self.model])
        return self.pool_blocks * (2 if self.first.fp8 else 1) * (layers * heads if self.first.plugin else 1)

    def pool_bytes(self) -> int | None:
        if self.pool_blocks is None:
            return None
        return self.pool_blocks * BLOCK_SIZE * kv_bytes_per_token(SHAPES[self.model])

    def footprint(self) -> int | None:
        """Device bytes it may take: weights, pool and :data:`SERVER_OVERHEAD_BYTES` (None: profiled)."""
        if self.pool_blocks is None:
            return None
        shape = SHAPES[self.model]
        embedding = shape["vocab_size"] * shape["hidden_size"] * dtype_bytes(shape)
        return decode_weight_bytes(shape) + embedding + self.pool_bytes() + SERVER_OVERHEAD_BYTES


def plan_servers(model: str, workloads: list[Workload], configs: list[ServingConfig], rates: list[float],
                 max_num_seqs: int) -> list[ServerPlan]:
    """The servers the runs need, in the order they run: workload by workload (plain, plain-fp8,
    the plugin), ``same-batch-plain`` last (one for all workloads, sized for the longest)."""
    servers: dict[tuple, ServerPlan] = {}
    for workload in workloads:
        for config in configs:
            if config.label == SAME_BATCH:
                key = (SAME_BATCH,)
                max_len = max(w.max_model_len for w in workloads)
                blocks = None
            else:
                key = (config.server_kind, workload.pool_tokens, workload.max_model_len)
                max_len = workload.max_model_len
                blocks = -(-workload.pool_tokens // BLOCK_SIZE)
            plan = servers.setdefault(key, ServerPlan(config.server_kind, model, max_len, max_num_seqs, blocks, config))
            plan.runs += [Run(workload, config, rate) for rate in rates]
    return sorted(servers.values(), key=lambda s: s.kind == SAME_BATCH)  # stable: the rest keep their order


def start_waves(servers: list[ServerPlan], parallel: int, memory_bytes: int | None) -> list[list[ServerPlan]]:
    """Servers started side by side: up to ``parallel`` consecutive fixed-pool servers whose
    footprints fit in 90% of ``memory_bytes`` (None: unknown, one at a time); a profiled server
    (vLLM measures free memory: others would disturb it) starts alone."""
    waves: list[list[ServerPlan]] = []
    for server in servers:
        last = waves[-1] if waves else None
        fits = last is not None and memory_bytes is not None and server.footprint() is not None \
            and all(s.footprint() is not None for s in last) and len(last) < parallel \
            and sum(s.footprint() for s in last) + server.footprint() <= 0.9 * memory_bytes
        if fits:
            last.append(server)
        else:
            waves.append([server])
    return waves


def server_argv(plan: ServerPlan, model_dir: Path, args: argparse.Namespace) -> list[str]:
    """``python -m vllm.entrypoints.openai.api_server`` with this plan's flags (``--host``/``--port``:
    :meth:`Server.on_free_port`)."""
    shape = SHAPES[plan.model]
    argv = [*SERVER, "--model", str(model_dir), "--tokenizer", str(model_dir / "tokenizer"),
            "--served-model-name", plan.model, "--load-format", "dummy",
            "--dtype", "float32" if shape["torch_dtype"] == "float32" else "bfloat16", "--seed", "0",
            "--max-model-len", str(plan.max_model_len), "--max-num-seqs", str(plan.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--no-enable-prefix-caching",
            "--block-size", str(BLOCK_SIZE), "--disable-uvicorn-access-log",
            *([] if args.no_jit_monitor else ["--jit-monitor-verbose"])]  # every kernel compiled while serving is logged (jit_compiles)
    if plan.pool_blocks is None:
        argv += ["--gpu-memory-utilization", str(args.same_batch_memory_utilization)]
    else:
        argv += ["--num-gpu-blocks-override", str(plan.num_blocks), "--kv-cache-memory-bytes", str(plan.pool_bytes()),
                 "--gpu-memory-utilization", str(FIXED_POOL_UTILIZATION)]
    if plan.first.fp8:
        argv += ["--kv-cache-dtype", "fp8"]
    if plan.first.plugin:
        # one server runs every plugin configuration of a workload, each request naming its own
        argv += ["--kv-compression", plan.first.policy, "--kv-budget", str(plan.first.budget),
                 "--kv-request-overrides", "all"]
        if args.kv_options:
            argv += ["--kv-compression-config", json.dumps(args.kv_options)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    return argv


def fp8_unsupported(device: str, shape: dict) -> str | None:
    """Why vLLM's CPU build cannot keep this model's KV cache in fp8 at our block size (None: it can,
    or this is not the CPU). vLLM's CPU attention stores fp8 only with its AMX / VEC kernels, which
    it picks from the dtype, block size and head size; its own choice is asked."""
    if device_slug(device) != "cpu":
        return None
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    dtype = torch.float32 if shape["torch_dtype"] == "float32" else torch.bfloat16
    try:
        isa = _get_attn_isa(dtype, BLOCK_SIZE, shape_dims(shape)[2], "fp8")
    except NotImplementedError as error:
        return f"vLLM's CPU build: {error}"
    if isa not in ("amx", "vec"):
        return (f"vLLM's CPU build keeps an fp8 KV cache only with its AMX/VEC attention kernels; "
                f"{BLOCK_SIZE}-token blocks of this model select its {isa!r} kernel")
    return None


# ---- the client: vllm bench serve in this process ------------------------------------------------------


class BenchClient(threading.Thread):
    """``vllm bench serve ARGV`` (``vllm.benchmarks.serve.main_async``) on an event loop of its own
    thread, so that a run can be cut at its window (:meth:`cancel`: its requests' connections
    close and the server aborts them). ``t0`` / ``wall0``: when it began sending requests (perf
    counter / wall clock), after it built its dataset; ``result``: its metrics when it finished."""

    def __init__(self, argv: list[str]):
        super().__init__(daemon=True)
        from vllm.benchmarks import serve
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        _mark_request_start(serve)
        parser = FlexibleArgumentParser()
        serve.add_cli_args(parser)
        self.argv = argv
        self.args = parser.parse_args(argv)
        self.t0: float | None = None
        self.wall0: float | None = None
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._loop = asyncio.new_event_loop()
        self._task = None
        self._ready = threading.Event()

    def run(self) -> None:
        from vllm.benchmarks import serve

        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(_quiet_when_cancelled)
        self._task = self._loop.create_task(serve.main_async(self.args))
        self._ready.set()
        try:
            self.result = self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            self.cancelled = True
        except BaseException as error:  # noqa: BLE001 - the run records it
            self.error = error
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def cancel(self) -> None:
        self._ready.wait()
        with contextlib.suppress(RuntimeError):  # the loop already closed: it had finished
            self._loop.call_soon_threadsafe(self._task.cancel)


def _quiet_when_cancelled(loop, context: dict) -> None:
    """A cancelled client leaves its aiohttp session unclosed (vLLM's benchmark closes it only at its
    end); aiohttp reports that through the loop. Anything else is reported as usual."""
    if not context.get("message", "").startswith("Unclosed"):
        loop.default_exception_handler(context)


def _mark_request_start(serve) -> None:
    """Make vLLM's request generator (``serve.get_request``, started right after the benchmark's
    own start time) stamp the calling :class:`BenchClient`: the window starts there, not while the
    client builds its dataset. Installed once."""
    original = serve.get_request
    if getattr(original, "marks_start", False):
        return

    def get_request(*args, **kwargs):
        client = threading.current_thread()
        if isinstance(client, BenchClient):
            client.t0, client.wall0 = time.perf_counter(), time.time()
        return original(*args, **kwargs)

    get_request.marks_start = True
    serve.get_request = get_request


def client_argv(server: Server, plan: ServerPlan, model_dir: Path, prompt_len: int, output_len: int,
                requests: int, rate: float, seed: int, xargs: dict | None, max_concurrency: int | None) -> list[str]:
    argv = [*bench_serve_args(server.url, plan.model, str(model_dir / "tokenizer"), prompt_len, output_len, 0,
                              requests, rate, seed, PERCENTILES),
            "--ready-check-timeout-sec", "0", "--num-warmups", "0"]
    if xargs:
        argv += ["--extra-body", json.dumps({"vllm_xargs": xargs})]
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def wait_idle(url: str, model: str, timeout: float = 180.0) -> None:
    """Until no request runs or waits (after a cut run: until the server aborted what the client
    dropped). vLLM refreshes those gauges only at the end of an engine step, and aborts run no step,
    so each look follows a 1-token request of its own (outside any run's window)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        short_request(url, model, prompt_len=4, max_tokens=1)
        m = read_metrics(url)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the server still has requests {timeout:.0f} s after the run")


class RunningSampler(threading.Thread):
    """``vllm:num_requests_running`` every 0.5 s (a sample: a short peak between two can be missed)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.peak, self.samples = url, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, int(read_metrics(self.url).get("vllm:num_requests_running", 0)))
            self.samples += 1
            self.stopped.wait(0.5)


def drive(server: Server, model: str, argv: list[str], window_s: float, client_log) -> dict:
    """One client run against an idle server, measured from its first request to min(its end,
    ``window_s``) with the server's Prometheus counters; a cut run's client is cancelled and the
    server drained. Returns the counter deltas, the sampled peak of running requests, the times."""
    wait_idle(server.url, model)
    before = read_metrics(server.url)
    client = BenchClient(argv)
    with contextlib.redirect_stdout(client_log):  # vLLM's client prints its arguments and a summary
        client.start()
        while client.is_alive() and client.t0 is None:  # it builds its dataset
            client.join(0.05)
        sampler = RunningSampler(server.url)
        sampler.start()
        if client.t0 is not None:
            client.join(max(0.0, client.t0 + window_s - time.perf_counter()))
        cut = client.is_alive()  # the window ended first
        if cut:
            # /metrics answers from the server's busy event loop: the counters are of an instant
            # between the request and its answer, so the window ends midway
            asked, wall_asked = time.perf_counter(), time.time()
            after = read_metrics(server.url)
            t_end, wall_end = (asked + time.perf_counter()) / 2, (wall_asked + time.time()) / 2
            client.cancel()
            client.join(60)
        else:
            after = read_metrics(server.url)
        sampler.stopped.set()
        sampler.join()
    if client.error is not None:
        raise RuntimeError(f"vllm bench serve failed: {type(client.error).__name__}: {client.error}")
    if not cut:  # the client's own duration: from its first request to its last answer
        t_end = client.t0 + client.result["duration"]
        wall_end = client.wall0 + client.result["duration"]
    wait_idle(server.url, model)

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    return {
        "complete": not cut,
        "elapsed_s": t_end - client.t0,
        "wall0": client.wall0,
        "wall_end": wall_end,
        "generation_tokens": delta("vllm:generation_tokens_total"),
        "prompt_tokens": delta("vllm:prompt_tokens_total"),
        "preemptions": delta("vllm:num_preemptions_total"),
        "peak_running": max(sampler.peak, int(after.get("vllm:num_requests_running", 0))),
        "running_samples": sampler.samples,
        "client": client.result,
    }


# ---- the plugin's event log ----------------------------------------------------------------------------


def compression_summary(events: list[dict], shape: dict, wall0: float, wall_end: float) -> dict:
    """Of one run's window: ``budget_fraction`` = rows kept / rows of the prompt over every (layer,
    KV head) of its prefill compressions (mean over requests), the head-blocks they kept, and the
    decode-time recompressions (one ``compressed`` event of what ``decode`` per request recompressed)."""
    layers, heads, _ = shape_dims(shape)
    window = [e for e in events if e["kind"] == "compressed" and wall0 <= e["t"] <= wall_end]
    prefill = [e for e in window if e.get("what") == "prefill" and e["tokens"]]
    fractions = [sum(map(sum, e["lens"])) / (layers * heads * e["tokens"]) for e in prefill]
    blocks_before = sum(e["blocks_before"] for e in prefill)
    return {
        "budget_fraction": round(statistics.fmean(fractions), 5) if fractions else None,
        "blocks_kept_fraction": round(sum(e["blocks_after"] for e in prefill) / blocks_before, 5)
        if blocks_before else None,
        "prefill_compressions": len(prefill),
        "decode_recompressions": sum(1 for e in window if e.get("what") == "decode"),
    }


# a recompression tick's step_time fields: the step, the recompression's device ms and host ms, its
# parts (the inputs gathered, the scoring and selection or reduction, the rows written, the host
# bookkeeping) and the reports of the step
TICK_FIELDS = ("interval_ms", "recompress_ms", "recompress_host_ms", "tick_gather_ms", "tick_score_ms", "tick_write_ms",
               "tick_bookkeeping_ms", "report_ms")


def step_breakdown(events: list[dict], wall0: float, wall_end: float) -> dict | None:
    """Summary of the plugin's ``step_time`` events in a run's window (None: the plugin logged none).

    A step is pure decode when each of its rows brought one token (``tokens == rows``), else it had
    prefill. ``recompress_share``: the decode-time recompression's device ms over the steps' host
    intervals (all steps of the window: where the engine's time went). ``tick_wall_share``: what
    the recompression ticks cost in wall time -- each pure-decode step that recompressed, and the
    step after it (the scheduler takes the released head-blocks back before it), over the median
    pure-decode step -- over the same intervals; it includes the host work the device ms miss.
    ``tick_ms_median``: per pure-decode step that recompressed, the median of each of its fields
    (:data:`TICK_FIELDS`: the step's interval, the recompression's device and host ms and its parts)
    and of the next step's interval (``next_interval_ms``)."""
    steps = [e for e in events if e["kind"] == "step_time" and wall0 <= e["t"] <= wall_end]
    if not steps:
        return None
    kinds = {"pure_decode": [e for e in steps if e["tokens"] == e["rows"]],
             "with_prefill": [e for e in steps if e["tokens"] != e["rows"]]}
    interval_total = sum(e["interval_ms"] for e in steps)
    recompress_total = sum(e["recompress_ms"] for e in steps)
    tick_excess, tick_ms = 0.0, None
    if kinds["pure_decode"]:
        typical = statistics.median(e["interval_ms"] for e in kinds["pure_decode"])
        ticked = {i for i, e in enumerate(steps) if e["recompressed_requests"] and e["tokens"] == e["rows"]}
        tick_excess = sum(max(0.0, steps[i]["interval_ms"] - typical)
                          for i in ticked | {i + 1 for i in ticked if i + 1 < len(steps)})
        if ticked:
            tick_ms = {name: round(statistics.median(steps[i].get(name, 0.0) for i in ticked), 3) for name in TICK_FIELDS}
            after = [steps[i + 1]["interval_ms"] for i in ticked if i + 1 < len(steps)]
            tick_ms["next_interval_ms"] = round(statistics.median(after), 3) if after else None

    def median(group: list[dict], key: str) -> float | None:
        return round(statistics.median(e[key] for e in group), 3) if group else None

    return {
        "steps": len(steps),
        "graph_steps": sum(1 for e in steps if e.get("graph")),
        # graph steps whose buffers advanced in place (WorkerState.lay_out_decode): no layout made
        "in_place_steps": sum(1 for e in steps if e.get("in_place")),
        **{f"{kind}_steps": len(group) for kind, group in kinds.items()},
        "interval_ms_median": {kind: median(group, "interval_ms") for kind, group in kinds.items()},
        "layout_ms_median": {kind: median(group, "layout_ms") for kind, group in kinds.items()},
        "interval_ms_total": round(interval_total, 3),
        "compress_ms_total": round(sum(e["compress_ms"] for e in steps), 3),
        "recompress_ms_total": round(recompress_total, 3),
        "report_ms_total": round(sum(e["report_ms"] for e in steps), 3),
        "recompressed_requests": sum(e["recompressed_requests"] for e in steps),
        "recompress_share": round(recompress_total / interval_total, 5) if interval_total else None,
        "tick_wall_share": round(tick_excess / interval_total, 5) if interval_total else None,
        "tick_ms_median": tick_ms,
    }


# ---- the ceiling -------------------------------------------------------------------------------------


def retained_tokens(prompt_len: int, output_len: int, fraction: float, decode_slack: int | None) -> float:
    """Mean KV tokens a request holds over its life: the kept share of its prompt, plus its outputs
    (half of them on average; with decode-time recompression at most ``decode_slack`` above the
    budget, half of it on average), plus half a block of page rounding."""
    growth = output_len if decode_slack is None else min(decode_slack, output_len)
    return fraction * prompt_len + growth / 2 + BLOCK_SIZE / 2


def ideal_output_tok_s(*, requests: int, prompt_len: int, output_len: int, prefill_tok_s: float,
                       weight_bytes: float, kv_bytes_per_token: float, pool_tokens: float,
                       retained_tokens: float, max_num_seqs: int, copy_bytes_per_s: float) -> dict:
    """Output tok/s of an ideal server for the whole workload: prefill at ``prefill_tok_s``, then
    decode steps of the largest batch the pool holds (``pool_tokens`` / ``retained_tokens``, at most
    ``max_num_seqs`` and ``requests``), each reading the weights and the batch's retained KV at
    ``copy_bytes_per_s``; continuous batching keeps the batch full."""
    batch = max(1, min(requests, max_num_seqs, math.floor(pool_tokens / retained_tokens)))
    step_s = (weight_bytes + batch * retained_tokens * kv_bytes_per_token) / copy_bytes_per_s
    prefill_s = requests * prompt_len / prefill_tok_s
    decode_s = requests * output_len / batch * step_s
    return {"batch": batch, "step_ms": round(step_s * 1e3, 4), "prefill_s": round(prefill_s, 6),
            "decode_s": round(decode_s, 6), "output_tok_s": round(requests * output_len / (prefill_s + decode_s), 3)}


def ideal_window_output_tok_s(*, window_s: float, requests: int, prompt_len: int, output_len: int,
                              prefill_tok_s: float, weight_bytes: float, kv_bytes_per_token: float,
                              pool_tokens: float, kept_prompt_tokens: float, decode_slack: int | None,
                              max_num_seqs: int, copy_bytes_per_s: float, tokens_per_round: int = 16) -> dict:
    """Output tok/s of an ideal server over a window of ``window_s`` s from the first of
    ``requests`` sent at once (:func:`ideal_output_tok_s` assumes every request reaches its full
    length; cut by a window, they reach only ``generated`` tokens, so a pool holds more of them).
    In waves: it prefills as many waiting prompts as its pool holds (at most ``max_num_seqs``) at
    ``prefill_tok_s``, then decodes them together until they finish or the window ends; each step
    reads the weights and the batch's KV at ``copy_bytes_per_s``. A request holds
    ``kept_prompt_tokens`` of its prompt plus its outputs (with decode-time recompression at most
    ``decode_slack`` of them, half of that on average); when the batch outgrows the pool, the
    requests that no longer fit stop (a preempted request's recomputation would only cost the ideal
    server time). Simulated ``tokens_per_round`` decode steps at a time; the figures returned are
    the first wave's."""
    def held(generated: float, mean: bool = False) -> float:  # KV tokens a request holds
        growth = generated if decode_slack is None else min(decode_slack, generated) / (2 if mean else 1)
        return kept_prompt_tokens + growth + BLOCK_SIZE / 2

    def batch_at(generated: float) -> int:
        return max(0, min(requests, max_num_seqs, math.floor(pool_tokens / held(generated))))

    elapsed, tokens, waiting, waves = 0.0, 0.0, requests, []
    while elapsed < window_s and waiting:
        wave = min(waiting, batch_at(0))
        if not wave:
            break
        waiting -= wave
        prefill_s = min(wave * prompt_len / prefill_tok_s, window_s - elapsed)
        elapsed += prefill_s
        generated, step_s = 0.0, None
        while elapsed < window_s and generated < output_len:
            rounds = min(tokens_per_round, output_len - generated)
            batch = min(wave, batch_at(generated + rounds))
            if not batch:
                break
            step_s = (weight_bytes + batch * held(generated + rounds / 2, mean=True) * kv_bytes_per_token) / copy_bytes_per_s
            rounds = min(rounds, (window_s - elapsed) / step_s)
            tokens += batch * rounds
            generated += rounds
            elapsed += rounds * step_s
        waves.append({"batch": wave, "generated": generated, "step_s": step_s, "prefill_s": prefill_s})
    first = waves[0] if waves else {"batch": 0, "generated": 0.0, "step_s": None, "prefill_s": 0.0}
    return {"batch": first["batch"], "generated": round(first["generated"], 1), "waves": len(waves),
            "step_ms": None if first["step_s"] is None else round(first["step_s"] * 1e3, 4),
            "prefill_s": round(first["prefill_s"], 6), "window_s": window_s, "output_tok_s": round(tokens / window_s, 3)}


def measure_copy_bandwidth() -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second) and the device's memory,
    measured in a subprocess (its CUDA context would stay in this one, taking memory from servers)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--copy-bandwidth"], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"copy-bandwidth probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def copy_bandwidth_main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    size = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        dst.copy_(src)
    sync()
    iterations = 20 if cuda else 5
    started = time.perf_counter()
    for _ in range(iterations):
        dst.copy_(src)
    sync()
    seconds = time.perf_counter() - started
    memory = torch.cuda.mem_get_info()[1] if cuda else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(json.dumps({"bytes_per_s": 2 * size * iterations / seconds, "buffer_bytes": size, "iterations": iterations,
                      "device_memory_bytes": memory, "device": torch.cuda.get_device_name() if cuda else "cpu"}))


LEASE_S = 30 * 60  # the device tool holds a machine at most 30 minutes


def same_lease(a: dict, b: dict) -> bool:
    """Whether two records can come from one lease of the GPU (measured at most :data:`LEASE_S`
    apart): ratios compare only such runs, since hosts (and so host-bound steps) differ between
    leases. Records without a date (tests) count as one lease."""
    if "date" not in a or "date" not in b:
        return True
    def seconds(r):
        return time.mktime(time.strptime(r["date"][:19], "%Y-%m-%d %H:%M:%S"))  # then the zone's name
    return abs(seconds(a) - seconds(b)) <= LEASE_S


def add_derived(records: list[dict], meta: dict) -> None:
    """Ratios to plain / plain-fp8 / same-batch-plain of the same model, workload, arrival and
    settings, measured in the same lease (:func:`same_lease`; else None), and the ceiling, for
    every measured record (recomputed at every save). A plain reference matches whatever plugin
    options (``kv_options``) its run was given: plain vLLM never reads them."""
    def key(r, config):
        settings = {name: value for name, value in r["settings"].items() if name != "kv_options"}
        return (r["model"], r["workload"], r["arrival"], config, json.dumps(settings, sort_keys=True))

    measured = {key(r, r["config"]): r for r in records if r.get("output_tok_s")}

    def reference(r, config):
        ref = measured.get(key(r, config))
        return ref if ref is not None and same_lease(r, ref) else None

    bandwidth = (meta.get("copy_bandwidth") or {}).get("bytes_per_s")
    for r in records:
        if not r.get("output_tok_s"):
            continue
        for field_name, config, applies in (("ratio_plain", PLAIN, True), ("ratio_fp8", PLAIN_FP8, r["plugin"]),
                                            ("ratio_same_batch", SAME_BATCH, r["plugin"])):
            ref = reference(r, config) if applies else None
            r[field_name] = round(r["output_tok_s"] / ref["output_tok_s"], 4) if ref else None
        # total (prompt + output) tok/s against plain's, as KV-Compress reports its multipliers: in a
        # prefill-bound window output tok/s alone understates what a larger batch served
        ref = reference(r, PLAIN)
        r["ratio_plain_total"] = (round(r["total_tok_s"] / ref["total_tok_s"], 4)
                                  if ref and r.get("total_tok_s") and ref.get("total_tok_s") else None)
        if r["plugin"] and r["config"].endswith("+fp8"):  # against the same policy and budget over bf16
            ref = reference(r, r["config"].removesuffix("+fp8"))
            if ref is not None and ref["settings"].get("kv_options") != r["settings"].get("kv_options"):
                ref = None  # the plugin's options change its runs
            r["ratio_bf16_policy"] = round(r["output_tok_s"] / ref["output_tok_s"], 4) if ref else None
            r["running_ratio_bf16_policy"] = (round(r["peak_running"] / ref["peak_running"], 4)
                                              if ref and ref.get("peak_running") else None)
        prefill = (meta.get("prefill") or {}).get(f"{r['model']}/{r['workload']}")
        r["ceiling"], r["ceiling_fraction"] = None, None
        if prefill and bandwidth and r.get("kv_pool_tokens") and r.get("budget_fraction"):
            shape = SHAPES[r["model"]]
            s = r["settings"]
            ideal = ideal_output_tok_s(
                requests=s["requests"], prompt_len=s["prompt_len"], output_len=s["output_len"],
                prefill_tok_s=prefill["prompt_tok_s"], weight_bytes=decode_weight_bytes(shape),
                kv_bytes_per_token=kv_bytes_per_token(shape, r["kv_cache_dtype"]), pool_tokens=r["kv_pool_tokens"],
                retained_tokens=retained_tokens(s["prompt_len"], s["output_len"], r["budget_fraction"],
                                                r.get("decode_slack")),
                max_num_seqs=s["max_num_seqs"], copy_bytes_per_s=bandwidth)
            window = s.get("window_s")
            if window and ideal["prefill_s"] + ideal["decode_s"] > window:  # an ideal server too is cut by it
                ideal = ideal_window_output_tok_s(
                    window_s=window, requests=s["requests"], prompt_len=s["prompt_len"], output_len=s["output_len"],
                    prefill_tok_s=prefill["prompt_tok_s"], weight_bytes=decode_weight_bytes(shape),
                    kv_bytes_per_token=kv_bytes_per_token(shape, r["kv_cache_dtype"]), pool_tokens=r["kv_pool_tokens"],
                    kept_prompt_tokens=r["budget_fraction"] * s["prompt_len"],
                    decode_slack=r.get("decode_slack"), max_num_seqs=s["max_num_seqs"], copy_bytes_per_s=bandwidth)
            r["ceiling"] = {**ideal, "prefill_tok_s": prefill["prompt_tok_s"], "prefill_source": prefill["source"],
                            "copy_gb_s": round(bandwidth / 1e9, 1)}
            r["ceiling_fraction"] = round(r["output_tok_s"] / ideal["output_tok_s"], 4)


# ---- one invocation ----------------------------------------------------------------------------------


def settings_of(workload: Workload, args: argparse.Namespace) -> dict:
    """What makes two runs comparable (ratios only between equal settings; resume skips only these)."""
    return {
        "shape_sha": shape_sha(args.model),
        "prompt_len": workload.prompt_len, "output_len": workload.output_len, "requests": workload.requests,
        "pool_tokens": workload.pool_tokens, "window_s": window_of(workload, args), "seed": args.seed,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "enforce_eager": args.enforce_eager, "kv_options": args.kv_options,
        "max_concurrency": args.max_concurrency,
    }


def window_of(workload: Workload, args: argparse.Namespace) -> float:
    return args.duration if args.duration is not None else workload.window_s


def record_key(r: dict) -> tuple:
    return (r["model"], r["workload"], r["arrival"], r["config"])


def base_record(run: Run, args: argparse.Namespace, device: str) -> dict:
    return {"model": args.model, "workload": run.workload.name, "arrival": arrival_name(run.rate),
            "request_rate": "inf" if math.isinf(run.rate) else run.rate, "config": run.config.label,
            "plugin": run.config.plugin, "policy": run.config.policy, "requested_budget": run.config.budget,
            "kv_cache_dtype": run.config.kv_cache_dtype, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": device, "settings": settings_of(run.workload, args)}


def run_one(run: Run, server: Server, plan: ServerPlan, model_dir: Path, args, events_path: str | None,
            client_log) -> dict:
    """Measure one run on its (idle) server: the record's measured fields."""
    from vllm_kvcompress.policies.config import CompressionConfig
    from vllm_kvcompress.vllm.runtime import read_events

    workload, shape = run.workload, SHAPES[plan.model]
    argv = client_argv(server, plan, model_dir, workload.prompt_len, workload.output_len, workload.requests,
                       run.rate, args.seed, run.config.xargs(), args.max_concurrency)
    window = window_of(workload, args)
    log_offset = os.path.getsize(server.log_path)
    m = drive(server, plan.model, argv, window, client_log)
    elapsed = m["elapsed_s"]
    compiled = jit_compiles(server.log_path, log_offset)
    record = {
        "complete": m["complete"],
        "window_s": window,
        "duration_s": round(elapsed, 3),
        "output_tokens": m["generation_tokens"],
        "prompt_tokens": m["prompt_tokens"],
        "output_tok_s": round(m["generation_tokens"] / elapsed, 3),
        "total_tok_s": round((m["generation_tokens"] + m["prompt_tokens"]) / elapsed, 3),
        "peak_running": m["peak_running"],
        "running_samples": m["running_samples"],
        "preemptions": m["preemptions"],
        "jit_compiles": len(compiled), "jit_compiled_kernels": sorted(set(compiled)),
        "ttft_ms": None, "tpot_ms": None,
        "client_command": "vllm bench serve " + shlex.join(argv),
    }
    if m["complete"]:
        bench = m["client"]
        record.update(ttft_ms=client_percentiles(bench, "ttft", PERCENTILES),
                      tpot_ms=client_percentiles(bench, "tpot", PERCENTILES),
                      completed=bench["completed"], failed=bench["failed"],
                      client_output_tok_s=round(bench["output_throughput"], 3))
    if run.config.plugin:
        events = read_events(events_path)
        summary = compression_summary(events, shape, m["wall0"], m["wall_end"])
        breakdown = step_breakdown(events, m["wall0"], m["wall_end"])
        options = CompressionConfig.from_dict({**args.kv_options, "policy": run.config.policy,
                                               "budget": run.config.budget})
        record.update(summary, step_breakdown=breakdown, decode_slack=options.decode_slack,
                      recompress_per_s=round(summary["decode_recompressions"] / elapsed, 4),
                      recompress_share=breakdown["recompress_share"] if breakdown else None)
    else:
        record["budget_fraction"] = 1.0
    return record


JIT_EVENT = re.compile(r"(?:Triton|CuTeDSL|TileLang) \S+(?: \S+)* during inference: (\w+)")


def jit_compiles(log_path, offset: int) -> list[str]:
    """The kernels vLLM's JIT monitor saw compiled in a server's log after byte ``offset`` (the
    server runs with ``--jit-monitor-verbose``: one line per compilation): a compile inside a
    window stalls its step, often for seconds, so the record counts them."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return JIT_EVENT.findall(text)


def probe_prefill(server: Server, plan: ServerPlan, model_dir: Path, workload: Workload, args, client_log) -> dict:
    """Plain prefill rate for the ceiling: prompts of the workload's length, max_tokens 1, all at once."""
    requests = max(1, min(workload.requests, args.probe_tokens // workload.prompt_len))
    argv = client_argv(server, plan, model_dir, workload.prompt_len, 1, requests, math.inf, args.seed + 1, None, None)
    m = drive(server, plan.model, argv, window_s=300.0, client_log=client_log)
    return {"prompt_tok_s": round(m["prompt_tokens"] / m["elapsed_s"], 1), "requests": requests,
            "prompt_len": workload.prompt_len,
            "source": f"prefill-only probe on the plain server: {requests} x {workload.prompt_len}-token prompts, "
                      f"max_tokens 1, all at once"}


def short_request(url: str, model: str, prompt_len: int, max_tokens: int, xargs: dict | None = None) -> None:
    """A greedy completion of ``prompt_len`` tokens (a warm-up, or a step that refreshes the gauges);
    ``xargs``: a plugin configuration's per-request options."""
    import httpx

    prompt = " ".join(f"t{i}" for i in range(3, 3 + prompt_len))
    httpx.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}).raise_for_status()


class Invocation:
    """The results file and what this invocation adds to it."""

    def __init__(self, args: argparse.Namespace, device: str, out: Path):
        self.args, self.device, self.out = args, device, out
        previous = json.loads(out.read_text()) if out.exists() else None
        if previous and previous["meta"].get("device") not in (None, device):
            # records are keyed without the device: another device's runs would replace these
            raise SystemExit(f"{out} holds runs on {previous['meta']['device']}, this is {device}: "
                             f"write to serving-{device_slug(device)}.json (--out)")
        self.records = {record_key(r): r for r in (previous or {}).get("records", [])}
        self.run_info = {"command": shlex.join(["python", "benchmarks/serving.py", *args.argv]),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "versions": versions()}
        self.meta = {"benchmark": "serving", "device": device, "versions": self.run_info["versions"],
                     "prefill": {}, "copy_bandwidth": None, "runs": []}
        if previous:
            self.meta.update({k: previous["meta"][k] for k in ("prefill", "copy_bandwidth", "runs")
                              if k in previous["meta"]})
        self.meta["runs"] = self.meta["runs"] + [self.run_info]
        self.started = time.monotonic()

    def old(self, run: Run) -> dict | None:
        return self.records.get((self.args.model, run.workload.name, arrival_name(run.rate), run.config.label))

    def done(self, run: Run) -> bool:
        old = self.old(run)
        return not self.args.force and old is not None and old["status"] == "ok" \
            and old["settings"] == settings_of(run.workload, self.args)

    def put(self, run: Run, **fields) -> dict:
        record = {**base_record(run, self.args, self.device), **fields}
        self.records[record_key(record)] = record
        return record

    def skip(self, runs: list[Run], reason: str) -> None:
        """Record ``runs`` as skipped, but keep a measured record of other settings (still data)."""
        for run in runs:
            old = self.old(run)
            if old is None or old["status"] != "ok":
                self.put(run, status="skipped", skip_reason=reason)
        if runs:
            progress(f"skipped {len(runs)} run(s): {reason}")

    def save(self) -> dict:
        self.run_info["runtime_s"] = round(time.monotonic() - self.started, 1)
        self.meta.update(command=self.run_info["command"], date=self.run_info["date"])
        records = list(self.records.values())
        add_derived(records, self.meta)
        data = {"meta": self.meta, "records": records}
        write_json(self.out, data)
        return data


def run_wave(wave: list[ServerPlan], inv: Invocation, model_dir: Path, log_dir: Path, deadline: float,
             start_estimate: float) -> float:
    """Start the wave's servers side by side, measure their runs one after another, stop them.
    Returns the longest start seen (the next wave's estimate)."""
    args = inv.args
    servers: list[tuple[ServerPlan, Server, str | None]] = []
    longest = 0.0
    try:
        for slot, plan in enumerate(wave):
            events_path = str(log_dir / f"{plan.name}.events.jsonl") if plan.first.plugin else None
            if events_path and os.path.exists(events_path):
                os.unlink(events_path)
            env = {"VLLM_CACHE_ROOT": str(log_dir / "vllm-cache" / f"slot{slot}")}  # no two side by side share one
            if events_path:
                env["VLLM_KVC_EVENTS"] = events_path
            server = Server.on_free_port(server_argv(plan, model_dir, args), log_dir / f"{plan.name}.log", env=env)
            servers.append((plan, server, events_path))
        progress(f"starting {', '.join(p.name for p in wave)}")
        for plan, server, events_path in servers:
            try:
                longest = max(longest, server.wait_ready(min(deadline - time.monotonic(), 900)))
                if events_path and not plugin_started(events_path):
                    raise RuntimeError("the plugin's HeadBlockManager never started (no manager_init event)")
                short_request(server.url, plan.model, prompt_len=64, max_tokens=4)  # a warm-up
            except Exception as error:  # noqa: BLE001 - its runs record it; the wave goes on
                progress(f"{plan.name}: {type(error).__name__}: {str(error)[:2000]}")
                for run in plan.runs:
                    inv.put(run, status="failed", error=f"server: {type(error).__name__}: {error}"[:3000])
                server.stop()
                continue
            progress(f"{plan.name}: up in {server.start_s} s")
        for plan, server, events_path in servers:
            if server.start_s is None:
                continue
            with open(log_dir / f"{plan.name}.client.log", "a") as client_log:
                measure_server(plan, server, events_path, inv, model_dir, deadline, client_log)
            server.terminate()  # it shuts down while the next one measures; the wave's end waits for it
            inv.save()
    finally:
        for _, server, _ in servers:
            server.stop()
    return longest or start_estimate


def measure_server(plan: ServerPlan, server: Server, events_path: str | None, inv: Invocation, model_dir: Path,
                   deadline: float, client_log) -> None:
    args = inv.args
    num_blocks = read_metrics(server.url).get("num_gpu_blocks")
    layers, heads, _ = shape_dims(SHAPES[plan.model])
    # full-cache tokens the pool holds (fp8: twice the bf16 tokens in the same bytes)
    pool_tokens = num_blocks * BLOCK_SIZE // (layers * heads if plan.first.plugin else 1)
    if plan.first.plugin:
        # the first compression of a prompt length compiles the kernels it launches (~1 s in a
        # served window, fifth lease): each configuration meets the workloads' lengths once first,
        # through a recompression tick too, as the plain server meets them in its prefill probe
        warmed = set()
        for workload, config in dict.fromkeys((run.workload, run.config) for run in plan.runs):
            if time.monotonic() + PROBE_S < deadline:
                short_request(server.url, plan.model, workload.prompt_len, WARM_UP_TOKENS, config.xargs())
                warmed.add((workload.name, config.label))
    if plan.kind == PLAIN:
        for workload in dict.fromkeys(run.workload for run in plan.runs):
            if time.monotonic() + PROBE_S < deadline:
                probe = probe_prefill(server, plan, model_dir, workload, args, client_log)
                inv.meta["prefill"][f"{plan.model}/{workload.name}"] = probe
                progress(f"{workload.name}: plain prefill {probe['prompt_tok_s']:.0f} prompt tok/s ({probe['requests']} "
                         f"x {probe['prompt_len']} tokens)")
    for i, run in enumerate(plan.runs):
        window = window_of(run.workload, args)
        if time.monotonic() + window + RUN_OVERHEAD_S > deadline:
            inv.skip(plan.runs[i:], f"--time-limit: {max(0, deadline - time.monotonic()):.0f} s left, a run needs "
                                    f"~{window + RUN_OVERHEAD_S:.0f} s")
            return
        name = f"{run.workload.name}/{arrival_name(run.rate)}/{run.config.label}"
        try:
            measured = run_one(run, server, plan, model_dir, args, events_path, client_log)
        except Exception as error:  # noqa: BLE001 - recorded; the next run goes on
            progress(f"{name}: {type(error).__name__}: {error}")
            inv.put(run, status="failed", error=f"{type(error).__name__}: {error}"[:3000])
            continue
        fits = plan.pool_blocks is not None or pool_tokens >= run.workload.requests * run.workload.request_tokens
        if plan.first.plugin:
            measured["warm_up"] = (f"{run.workload.prompt_len} prompt / {WARM_UP_TOKENS} output tokens"
                                   if (run.workload.name, run.config.label) in warmed else None)
        inv.put(run, status="failed requests" if measured.get("failed") else "ok", **measured,
                num_gpu_blocks=num_blocks, kv_pool_tokens=pool_tokens, server=plan.name, server_start_s=server.start_s,
                server_configs=sorted({r.config.label for r in plan.runs}),
                **({"all_requests_fit": fits} if plan.kind == SAME_BATCH else {}))
        progress(f"{name}: {measured['output_tok_s']:.1f} output tok/s over {measured['duration_s']:.0f} s "
                 f"({'complete' if measured['complete'] else 'cut by the window'}), peak {measured['peak_running']} "
                 f"running, {measured['preemptions']} preemptions")
        inv.save()


def run(args: argparse.Namespace) -> dict:
    device, out, tmp_root, log_dir = invocation_paths("serving", args.out, args.log_dir)
    inv = Invocation(args, device, out)
    deadline = inv.started + (args.time_limit - FINISH_MARGIN_S if args.time_limit else math.inf)

    plans = plan_servers(args.model, args.workloads, args.configs, args.request_rates, args.max_num_seqs)
    fp8_reason = fp8_unsupported(device, SHAPES[args.model])
    for plan in plans:
        todo = [run for run in plan.runs if not inv.done(run)]
        if fp8_reason and plan.first.fp8:
            inv.skip(todo, fp8_reason)
            todo = []
        plan.runs = todo
    plans = [p for p in plans if p.runs]
    progress(f"{device}: {sum(len(p.runs) for p in plans)} run(s) on {len(plans)} server(s); results {out}; "
             f"logs {log_dir}")
    if any(p.first.plugin for p in plans) and plugin_entry_point():
        raise SystemExit(plugin_entry_point())
    if plans:
        inv.meta["copy_bandwidth"] = measure_copy_bandwidth()
        progress(f"copy bandwidth {inv.meta['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    model_dir = build_model_dir(args.model, args.model_dir or tmp_root / "models")
    memory = (inv.meta["copy_bandwidth"] or {}).get("device_memory_bytes")
    start_estimate = args.start_estimate
    for wave in start_waves(plans, args.parallel_starts, memory):
        wave = fit_wave(wave, inv, deadline, start_estimate)
        if wave:
            start_estimate = run_wave(wave, inv, model_dir, log_dir, deadline, start_estimate)
    data = inv.save()
    print_table(data["records"])
    png = out.with_suffix(".png")
    plot(data, png)
    print(f"\nwrote {out} and {png} ({time.monotonic() - inv.started:.0f} s)")
    return data


def fit_wave(wave: list[ServerPlan], inv: Invocation, deadline: float, start_estimate: float) -> list[ServerPlan]:
    """The wave's servers and runs that fit before ``deadline`` (one start, then every run one after
    another, in order); the runs that do not are recorded as skipped."""
    left = deadline - time.monotonic()
    cost = start_estimate
    kept = []
    for plan in wave:
        cost += PROBE_S if plan.kind == PLAIN else 0.0
        fitting = []
        for run in plan.runs:
            if cost + window_of(run.workload, inv.args) + RUN_OVERHEAD_S > left:
                break
            cost += window_of(run.workload, inv.args) + RUN_OVERHEAD_S
            fitting.append(run)
        inv.skip(plan.runs[len(fitting):], f"--time-limit: {max(0.0, left):.0f} s left, not enough for a server "
                                           f"start (~{start_estimate:.0f} s) and the runs before")
        if fitting:
            plan.runs = fitting
            kept.append(plan)
    return kept


# ---- table and plot ------------------------------------------------------------------------------------


def print_table(records: list[dict]) -> None:
    def f(value, fmt="{:.0f}"):
        return "-" if value is None else fmt.format(value)

    def pct(r, key):
        p = r.get(key) or {}
        return f"{f(p.get('p50'))}/{f(p.get('p99'))}"

    header = (f"{'workload':<13} {'arrival':<12} {'config':<20} {'kept':>6} {'out tok/s':>10} {'tot tok/s':>10} "
              f"{'xplain':>6} {'xtot':>5} {'xfp8':>5} {'xsame':>5} {'peak':>5} {'preem':>5} {'ceil%':>5} {'TTFT p50/99':>12} "
              f"{'TPOT p50/99':>11} {'s':>5}  status")
    print("\n" + header)
    print("-" * len(header))
    order = {PLAIN: 0, PLAIN_FP8: 1, SAME_BATCH: 2}
    for r in sorted(records, key=lambda r: (r["workload"], r["arrival"], order.get(r["config"], 3), r["config"])):
        status = r["status"] if r["status"] != "ok" else ("complete" if r.get("complete") else "window")
        reason = r.get("skip_reason") or r.get("error") or ""
        print(f"{r['workload']:<13} {r['arrival']:<12} {r['config']:<20} {f(r.get('budget_fraction'), '{:.3f}'):>6} "
              f"{f(r.get('output_tok_s'), '{:.1f}'):>10} {f(r.get('total_tok_s'), '{:.1f}'):>10} "
              f"{f(r.get('ratio_plain'), '{:.2f}'):>6} {f(r.get('ratio_plain_total'), '{:.2f}'):>5} "
              f"{f(r.get('ratio_fp8'), '{:.2f}'):>5} "
              f"{f(r.get('ratio_same_batch'), '{:.2f}'):>5} {f(r.get('peak_running')):>5} {f(r.get('preemptions')):>5} "
              f"{f(None if r.get('ceiling_fraction') is None else 100 * r['ceiling_fraction']):>5} "
              f"{pct(r, 'ttft_ms'):>12} {pct(r, 'tpot_ms'):>11} {f(r.get('duration_s')):>5}  {status} {reason[:80]}")


def plot(data: dict, path: Path) -> None:
    """A panel per (workload, arrival): output tok/s per configuration, annotated with its ratio to
    plain vLLM (and, for the plugin, to plain-fp8); hatched: cut by the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in data["records"] if r.get("output_tok_s")]
    panels = sorted({(r["workload"], r["arrival"]) for r in records})
    if not panels:
        return
    order = {PLAIN: 0, PLAIN_FP8: 1, SAME_BATCH: 2}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 1.0 + 0.9 * max(
        sum(1 for r in records if (r["workload"], r["arrival"]) == p) for p in panels)) * len(panels), 4.6),
        squeeze=False)
    for ax, (workload, arrival) in zip(axes[0], panels):
        group = sorted((r for r in records if (r["workload"], r["arrival"]) == (workload, arrival)),
                       key=lambda r: (order.get(r["config"], 3), r["config"]))
        colors = ["0.35" if not r["plugin"] else "tab:blue" for r in group]
        bars = ax.bar(range(len(group)), [r["output_tok_s"] for r in group], color=colors,
                      hatch=[None if r.get("complete") else "//" for r in group], edgecolor="black", linewidth=0.5)
        for bar, r in zip(bars, group):
            notes = [f"{r['ratio_plain']:.2f}x" if r.get("ratio_plain") else ""]
            if r.get("ratio_fp8"):
                notes.append(f"{r['ratio_fp8']:.2f}x fp8")
            ax.annotate("\n".join(n for n in notes if n), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([r["config"] for r in group], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("output tok/s")
        ax.set_ylim(top=max(r["output_tok_s"] for r in group) * 1.2)
        s = group[0]["settings"]
        ax.set_title(f"{workload}, {arrival}: {s['prompt_len']} / {s['output_len']}, {s['requests']} requests,\n"
                     f"KV pool {s['pool_tokens']:,} bf16 tokens, window {s['window_s']:.0f} s", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    meta = data["meta"]
    fig.suptitle(f"vLLM {meta['versions'].get('vllm')} served, {meta['device']}:\nplain vs vllm-kvcompress at "
                 f"equal KV bytes\n(hatched: cut by the window)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU check: tiny model, workloads quick (runs to the end) and quick-window (cut by a "
                             "1 s window), plain, plain-fp8, snapkv@32 and streamingllm@64, a pool of 512 tokens")
    parser.add_argument("--model", help=f"model shape: {', '.join(SHAPES)} (default llama3-8b; --quick: tiny)")
    parser.add_argument("--workloads", help="comma-separated (default long-gen,kvcompress); " + "; ".join(
        f"{w.name}: {w.description}" for w in WORKLOADS.values()))
    parser.add_argument("--configs", help=f"comma-separated (default {DEFAULT_CONFIGS})")
    parser.add_argument("--request-rate", default="inf",
                        help="arrivals: inf (all at once, default) or requests/s of Poisson arrivals; a comma list runs each")
    parser.add_argument("--duration", type=float,
                        help="window of every run in seconds (default: the workload's, 120 s; quick-window 1 s)")
    parser.add_argument("--requests", type=int, help="requests per run (default: the workload's)")
    parser.add_argument("--kv-pool-tokens", type=int, help="KV pool in bf16 tokens (default: the workload's)")
    parser.add_argument("--max-num-seqs", type=int, help="every server's (default: the most requests of a workload)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="every server's (default 8192; --quick: 2048)")
    parser.add_argument("--max-concurrency", type=int, help="the client's --max-concurrency (default: none)")
    parser.add_argument("--same-batch-memory-utilization", type=float,
                        help="gpu_memory_utilization of same-batch-plain, whose pool vLLM sizes (default 0.9; CPU: 0.15)")
    parser.add_argument("--kv-options", type=json.loads, default={},
                        help="plugin server options as JSON (--kv-compression-config), e.g. '{\"cuda_graphs\": false}'")
    parser.add_argument("--enforce-eager", action="store_true", help="every server without CUDA graphs / compile")
    parser.add_argument("--no-jit-monitor", action="store_true",
                        help="servers without --jit-monitor-verbose (jit_compiles then counts nothing): to check that "
                             "the monitor costs no throughput")
    parser.add_argument("--parallel-starts", type=int, default=None,
                        help="start up to this many fixed-pool servers side by side (default 1; --quick: 2)")
    parser.add_argument("--start-estimate", type=float, default=120.0,
                        help="seconds a server start is assumed to take before one was seen (--time-limit planning)")
    parser.add_argument("--probe-tokens", type=int, default=65536, help="prompt tokens of the plain prefill probe")
    parser.add_argument("--seed", type=int, default=0, help="the client's dataset seed (the same prompts for all)")
    parser.add_argument("--time-limit", type=float, help="seconds for this invocation; what does not fit is skipped")
    parser.add_argument("--force", action="store_true", help="rerun runs already in the JSON")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/serving-<device>.json)")
    parser.add_argument("--model-dir", type=Path, help="where the model folder is written (default: a tmp dir)")
    parser.add_argument("--log-dir", type=Path, help="server and client logs, event files (default: a tmp dir)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only recompute a JSON's ratios and ceiling, print its table and redraw its PNG")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    quick = args.quick
    for name, real, small in (("model", "llama3-8b", "tiny"), ("workloads", "long-gen,kvcompress", "quick,quick-window"),
                              ("configs", DEFAULT_CONFIGS, "plain,plain-fp8,snapkv@32,streamingllm@64"),
                              ("max_num_batched_tokens", 8192, 2048), ("parallel_starts", 1, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else real)
    if args.same_batch_memory_utilization is None:
        args.same_batch_memory_utilization = 0.15 if device_slug(detect_device()) == "cpu" else 0.9
    if quick:
        args.enforce_eager = True
    if args.model not in SHAPES:
        parser.error(f"unknown model {args.model!r} (one of {', '.join(SHAPES)})")
    table = QUICK_WORKLOADS if quick else WORKLOADS
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in table]
    if unknown or not names:
        parser.error(f"unknown workload(s) {', '.join(unknown) or '(none given)'} (one of {', '.join(table)})")
    args.workloads = [table[w] for w in names]
    if args.requests or args.kv_pool_tokens:
        args.workloads = [Workload(**{**asdict(w), **({"requests": args.requests} if args.requests else {}),
                                      **({"pool_tokens": args.kv_pool_tokens} if args.kv_pool_tokens else {})})
                          for w in args.workloads]
    try:
        configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
        args.request_rates = list(dict.fromkeys(parse_rate(r) for r in args.request_rate.split(",") if r.strip()))
        from vllm_kvcompress.policies.config import CompressionConfig

        CompressionConfig.from_dict(args.kv_options)  # bad options fail here, not in a server
    except ValueError as error:
        parser.error(str(error))
    if not configs or not args.request_rates:
        parser.error("no configuration or request rate given")
    args.configs = list({c.label: c for c in configs}.values())
    if args.max_num_seqs is None:
        args.max_num_seqs = max(w.requests for w in args.workloads)
    if args.parallel_starts < 1:
        parser.error("--parallel-starts must be at least 1")
    return args


def main(argv=None) -> dict | None:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["--copy-bandwidth"]:
        copy_bandwidth_main()
        return None
    args = parse_args(argv)
    if args.plot:  # the derived fields follow this code's rules (ratios, ceiling), then the table and PNG
        data = json.loads(args.plot.read_text())
        add_derived(data["records"], data["meta"])
        write_json(args.plot, data)
        return replot(args.plot, print_table, plot)
    return run(args)


if __name__ == "__main__":
    main()
