"""Throughput benchmark: plain vLLM against the kv-compression plugin, same GPU, same memory.

Every configuration -- ``plain`` (stock vLLM 0.26, its default attention backend and model runner)
or ``POLICY@BUDGET`` (the plugin) -- runs in a FRESH subprocess (a vLLM engine does not reliably
give its GPU memory back in-process; ``--share-engine`` runs the plugin configurations of one
offline workload one after another in one engine instead, each request carrying its configuration's
options, to save engine starts) with identical engine arguments apart from the plugin's
``additional_config``: same ``gpu_memory_utilization``, ``max_num_seqs``, ``max_model_len``,
``max_num_batched_tokens``, prefix caching off for both (the plugin requires it off), same prompts.
On CUDA vLLM 0.26 runs dense models on its V2 model runner by default while the plugin pins V1
(``VLLM_USE_V2_MODEL_RUNNER=0``); ``plain-v1`` is stock vLLM on the V1 runner, to tell the runner's
share of a difference apart (records say ``v2_model_runner``). Budgets are ``POLICY@0.1`` (fraction
of the prompt) or ``POLICY@256`` (tokens per KV head); ``--kv-options`` adds plugin options.

Models are dummy-weight (``load_format="dummy"``) stand-ins with the shapes of real ones, written
by this script (config.json + an offline tokenizer, nothing downloaded):

* ``llama3-8b``: 32 layers, hidden 4096, MLP 14336, 32 q / 8 KV heads, head_dim 128, vocab 128256,
  rope_theta 5e5, bf16 (max_position_embeddings 131072 so that 32k prompts are allowed);
* ``qwen2-7b``: 28 layers, hidden 3584, MLP 18944, 28 q / 4 KV heads, vocab 152064, qkv bias,
  rope_theta 1e6, bf16;
* ``tiny`` (``--quick``): the test suite's 4-layer GQA Llama (``vllm_kvcompress.tools.models.tiny_llama_folder``), fp32.

The tokenizer (``tokenizers`` package, in a ``tokenizer/`` folder of its own) is a WordLevel
vocabulary with exactly ``vocab_size`` entries (``<unk> <s> <|end_of_text|>`` then ``t3 .. tN``): the LM head
has the real size (128k / 152k, not a small tokenizer's), every id the model can emit detokenizes,
and a decoded random prompt re-tokenizes to the same length (which ``vllm bench serve``'s random
dataset relies on). Prompts are seeded random token ids in ``[3, vocab)``, the same for every
configuration; outputs are greedy with ``ignore_eos`` and fixed length.

Workloads (``--workloads``):

* ``a``: 16k-token prompts, 1k outputs; ``b``: 32k / 512; ``c``: 2k / 8k (long generation) --
  offline, all ``--requests`` submitted at once through ``LLM`` (one warm-up request first);
* ``d``: a mixed arrival stream through the OpenAI server (``python -m
  vllm.entrypoints.openai.api_server``) driven by vLLM's own client (``vllm.benchmarks.serve``,
  what ``vllm bench serve`` runs): random dataset, prompts 8k +- 50%, outputs 512 +- 50%, Poisson
  arrivals at ``--request-rate``.

Per configuration: output and total tok/s, TTFT / TPOT p50/p90/p99 (offline: from
``RequestOutput.metrics``, which V1 fills when stats are on -- TTFT then includes the time a request
waited in the queue, since all arrive at once), peak concurrently running requests, preemptions,
KV blocks in use (peak fraction of the pool, blocks, GiB), the pool's capacity in tokens, wall time,
engine start time, and for the plugin the retained fraction actually kept (from the plugin's
``VLLM_KVC_EVENTS`` log). ``output_tok_s_ratio`` = output tok/s / that of ``plain`` on the same
model and workload with the same settings (in the same JSON; ``ratio_reference`` says which run).

Peak concurrency is measured the same way for plain and plugin runs, offline and served: a hook on
the front end's ``StatLoggerManager.record`` (:class:`StepStats`; ``LLM`` takes no custom stat
loggers, so it wraps ``llm.llm_engine.logger_manager``; the API server runs as this file in
``--serve`` mode with the same hook) sees the ``SchedulerStats`` of every step that produced output
(``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``) and its ``IterationStats`` (new
tokens, preemptions). Polling Prometheus' ``vllm:num_requests_running`` would miss short peaks.
The plugin's own ``peak_requests`` event (requests holding blocks) is recorded next to it.

    python benchmarks/throughput.py --workloads a --configs plain,snapkv@0.1,snapkv@0.25 --requests 64
    python benchmarks/throughput.py --models qwen2-7b --workloads b --time-limit 560
    python benchmarks/throughput.py --quick --out /tmp/t.json          # CPU, tiny model, ~2-3 minutes
    python benchmarks/throughput.py --plot benchmarks/results/throughput-h100.json

Output: a table on stdout, ``benchmarks/results/throughput-<device>.json`` (one record per (model,
workload, configuration); how and where it ran) and a PNG next to it. Resumable: configurations
already in the JSON with the same settings are skipped unless ``--force``. ``--timeout`` bounds one
configuration (engine start included); a run that reaches it aborts what is left and records what it
measured so far (``status: partial``: throughput = tokens produced / time; kept on resume, since the
same settings would stop the same way). ``--time-limit`` starts a configuration only while its whole
``--timeout`` fits, for device calls of bounded length. Progress goes to stderr; each engine's own
log, spec and plugin event file to ``--log-dir``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FIRST_ID, SHAPES, build_model_dir, detect_device, device_slug, dtype_bytes,  # noqa: E402,F401
                    plugin_entry_point, plugin_started, read_metrics, replot, shape_dims, versions)
from recording import write_json  # noqa: E402

from vllm_kvcompress.tools.openai_server import Server, stop_group  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROGRESS = "[throughput]"  # child lines with this prefix are echoed to the parent's stderr
POOL_BLOCK_SIZE = 16  # block size pinned for both when --kv-pool-tokens sizes the pool
PERCENTILES = (50, 90, 99)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h")

# ---- workloads and configurations --------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """prompt_len/output_len: tokens (served: the means of the random dataset, +- range_ratio)."""

    name: str
    prompt_len: int
    output_len: int
    description: str
    served: bool = False
    range_ratio: float = 0.0

    @property
    def max_prompt(self) -> int:
        return math.floor(self.prompt_len * (1 + self.range_ratio))

    @property
    def max_model_len(self) -> int:
        """Longest prompt + longest output, rounded up to a multiple of 128."""
        longest = self.max_prompt + math.floor(self.output_len * (1 + self.range_ratio))
        return -(-longest // 128) * 128


WORKLOADS = {
    "a": Workload("a", 16384, 1024, "16k prompt / 1k output, offline"),
    "b": Workload("b", 32768, 512, "32k prompt / 512 output, offline"),
    "c": Workload("c", 2048, 8192, "2k prompt / 8k output (long generation), offline"),
    "d": Workload("d", 8192, 512, "OpenAI server, Poisson arrivals, prompts 8k +-50%, outputs 512 +-50%",
                  served=True, range_ratio=0.5),
}
QUICK_WORKLOADS = {  # --quick: same kinds, CPU-sized
    "a": Workload("a", 300, 8, "--quick: 300 prompt / 8 output, offline"),
    "d": Workload("d", 300, 8, "--quick: OpenAI server, prompts 300 +-20%, outputs 8 +-20%", served=True,
                  range_ratio=0.2),
}
DEFAULT_CONFIGS = "plain,snapkv@0.1,snapkv@0.25,adakv@0.1"
PLAIN = "plain"


@dataclass(frozen=True)
class RunConfig:
    """``plain`` / ``plain-v1`` (stock vLLM; -v1 pins the V1 model runner the plugin uses) or
    ``POLICY@BUDGET`` (budget: tokens per head ``256`` or a fraction of the prompt ``0.1``), with
    ``+graphs`` for the plugin's full CUDA graphs of decode steps (``cuda_graphs``)."""

    label: str
    policy: str  # "none" for plain
    budget: int | float | None = None
    v1_runner: bool = False
    graphs: bool = False

    @property
    def plugin(self) -> bool:
        return self.policy != "none"

    def budget_fraction(self, prompt_len: int) -> float:
        if not self.plugin:
            return 1.0
        if isinstance(self.budget, int):
            return min(1.0, self.budget / prompt_len)
        return float(self.budget)


def parse_config(text: str) -> RunConfig:
    from vllm_kvcompress.policies.budget import Budget
    from vllm_kvcompress.policies.config import PRESET_NAMES

    text = text.strip()
    if text in (PLAIN, "plain-v1"):
        return RunConfig(text, "none", None, v1_runner=text == "plain-v1")
    if "@" not in text:
        raise ValueError(f"configuration {text!r}: expected plain, plain-v1 or POLICY@BUDGET[+graphs] (snapkv@0.1)")
    body, _, flag = text.partition("+")
    if flag not in ("", "graphs"):
        raise ValueError(f"configuration {text!r}: unknown suffix +{flag} (only +graphs)")
    policy, budget_text = body.split("@", 1)
    if policy not in PRESET_NAMES or policy == "none":
        raise ValueError(f"configuration {text!r}: unknown policy {policy!r} ({', '.join(PRESET_NAMES[1:])})")
    budget = Budget.parse(budget_text)
    value = budget.tokens if budget.tokens is not None else budget.fraction
    return RunConfig(f"{policy}@{value}" + ("+graphs" if flag else ""), policy, value, graphs=bool(flag))


def series(record: dict) -> str:
    """A record's line in the plot: its policy, ``+graphs`` when it ran with the plugin's decode graphs."""
    return record["policy"] + ("+graphs" if (record.get("compression") or {}).get("cuda_graphs") else "")


def compression_options(config: RunConfig, extra: dict) -> dict | None:
    """The plugin's validated options (CompressionConfig defaults filled in), None for plain."""
    if not config.plugin:
        return None
    from vllm_kvcompress.policies.config import CompressionConfig

    if "cuda_graphs" in extra:
        raise ValueError("--kv-options: cuda_graphs is chosen per configuration (POLICY@BUDGET+graphs)")
    # explicit, so that a label without +graphs means no graphs on any device
    return CompressionConfig.from_dict({**extra, "policy": config.policy, "budget": config.budget,
                                        "cuda_graphs": config.graphs}).to_dict()


# ---- small helpers ----------------------------------------------------------------------------------


def percentiles(values, scale: float = 1.0) -> dict | None:
    """{"p50", "p90", "p99", "mean"} of ``values`` (linear interpolation) times ``scale``; None if empty."""
    values = sorted(v * scale for v in values)
    if not values:
        return None
    out = {}
    for p in PERCENTILES:
        pos = (len(values) - 1) * p / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{p}"] = round(values[lo] + (values[hi] - values[lo]) * (pos - lo), 3)
    out["mean"] = round(sum(values) / len(values), 3)
    return out


def progress(message: str) -> None:
    print(f"{PROGRESS} {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- child process: one configuration ------------------------------------------------------------------


class StepStats:
    """Peak running requests etc. from every step's ``SchedulerStats`` / ``IterationStats``, as the front
    end's ``StatLoggerManager.record`` receives them (steps that produced output). The same code
    measures plain and plugin runs, offline (:meth:`install` on the LLM's manager) and served
    (:func:`serve_main` patches the class inside the API server process)."""

    FIELDS = ("steps", "peak_running", "peak_waiting", "kv_usage_peak", "kv_usage_sum", "generation_tokens",
              "prompt_tokens", "preemptions", "running")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def update(self, scheduler_stats, iteration_stats) -> None:
        if scheduler_stats is not None:
            self.steps += 1
            self.running = scheduler_stats.num_running_reqs
            self.peak_running = max(self.peak_running, scheduler_stats.num_running_reqs)
            self.peak_waiting = max(self.peak_waiting, scheduler_stats.num_waiting_reqs)
            self.kv_usage_peak = max(self.kv_usage_peak, scheduler_stats.kv_cache_usage)
            self.kv_usage_sum += scheduler_stats.kv_cache_usage
        if iteration_stats is not None:
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.prompt_tokens += iteration_stats.num_prompt_tokens
            self.preemptions += iteration_stats.num_preempted_reqs

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def install(self, manager) -> "StepStats":
        original = manager.record

        def record(scheduler_stats=None, iteration_stats=None, *args, **kwargs):
            self.update(scheduler_stats, iteration_stats)
            return original(scheduler_stats, iteration_stats, *args, **kwargs)

        manager.record = record
        return self


def step_summary(stats: dict) -> dict:
    """The record fields of a :class:`StepStats` snapshot."""
    return {
        "peak_concurrency": stats["peak_running"],
        "peak_waiting": stats["peak_waiting"],
        "preemptions": stats["preemptions"],
        "steps_with_output": stats["steps"],
        "stats_generation_tokens": stats["generation_tokens"],
    }


def serve_main(stats_path: str, server_args: list[str]) -> None:
    """``python -m vllm.entrypoints.openai.api_server SERVER_ARGS`` with :class:`StepStats` hooked into
    the API server's StatLoggerManager; a thread writes its snapshot to ``stats_path`` every 0.2 s
    and resets it when ``stats_path + ".reset"`` appears."""
    import uvloop
    # what the module's own ``if __name__ == "__main__"`` block uses
    from vllm.entrypoints.openai.api_server import (cli_env_setup, make_arg_parser, run_server,
                                                    validate_parsed_serve_args)
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.metrics.loggers import StatLoggerManager

    stats = StepStats()
    lock = threading.Lock()
    original = StatLoggerManager.record

    def record(self, scheduler_stats=None, iteration_stats=None, *args, **kwargs):
        with lock:
            stats.update(scheduler_stats, iteration_stats)
        return original(self, scheduler_stats, iteration_stats, *args, **kwargs)

    StatLoggerManager.record = record
    reset = Path(stats_path + ".reset")

    def dump() -> None:
        while True:
            with lock:
                if reset.exists():
                    stats.reset()
                    reset.unlink()
                snap = stats.snapshot()
            tmp = stats_path + ".tmp"
            Path(tmp).write_text(json.dumps(snap))
            os.replace(tmp, stats_path)
            time.sleep(0.2)

    threading.Thread(target=dump, daemon=True).start()
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-Compatible RESTful API server."))
    args = parser.parse_args(server_args)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(length)] for _ in range(num)]


def plugin_summary(events_path: str, since: int, shape: dict) -> dict:
    """What the plugin logged after the warm-up: retained fraction (kept rows / full rows over all
    (layer, head) of every compressed prompt), compressions, its own peak of requests holding blocks
    (the pool's state before each step, and its own peak events, of this run only)."""
    from vllm_kvcompress.vllm.runtime import read_events

    events = read_events(events_path)
    layers, heads, _ = shape_dims(shape)
    compressed = [e for e in events[since:] if e["kind"] == "compressed"]
    fractions = [sum(map(sum, e["lens"])) / (layers * heads * e["tokens"]) for e in compressed if e["tokens"]]
    peaks = [e["requests"] if e["kind"] == "step" else e["peak"] for e in events[since:]
             if e["kind"] in ("step", "peak_requests")]
    return {
        "retained_fraction": round(sum(fractions) / len(fractions), 5) if fractions else None,
        "compressions": len(compressed),
        "plugin_peak_requests": max(peaks) if peaks else None,
        "blocks_returned": sum(e.get("freed", 0) for e in events[since:] if e["kind"] == "blocks_returned"),
    }


def kv_summary(spec: dict, num_blocks: int | None, block_size: int | None, usage_peak: float | None,
               usage_mean: float | None) -> dict:
    """Pool size and use in blocks, GiB and tokens (plain block: ``block_size`` tokens of every layer
    and KV head; plugin block: ``block_size`` rows of ONE head of one layer)."""
    shape = spec["shape"]
    layers, heads, head_dim = shape_dims(shape)
    block_size = block_size or POOL_BLOCK_SIZE
    head_block_bytes = 2 * block_size * head_dim * dtype_bytes(shape)
    per_block = head_block_bytes if spec["compression"] else head_block_bytes * layers * heads
    per_token_blocks = block_size if not spec["compression"] else block_size / (layers * heads)
    out = {"kv_blocks_total": num_blocks, "kv_block_size": block_size, "kv_block_bytes": per_block}
    if num_blocks:
        out["kv_pool_gib"] = round(num_blocks * per_block / 2**30, 3)
        out["kv_capacity_tokens"] = int(num_blocks * per_token_blocks)  # full-cache tokens the pool holds
    if usage_peak is not None and num_blocks:
        out["kv_usage_peak"] = round(usage_peak, 4)
        out["kv_blocks_peak"] = round(usage_peak * num_blocks)
        out["kv_gib_peak"] = round(usage_peak * num_blocks * per_block / 2**30, 3)
    if usage_mean is not None:
        out["kv_usage_mean"] = round(usage_mean, 4)
    return out


def check_plugin_active(spec: dict) -> None:
    """A plugin run must really run the plugin: its scheduler logs ``manager_init`` at start-up."""
    if spec["compression"] and not plugin_started(spec["events_path"]):
        raise RuntimeError("kv compression was requested but the plugin's HeadBlockManager never started "
                           "(no manager_init event): the engine ran without the plugin")


def engine_kwargs(spec: dict) -> dict:
    engine = dict(spec["engine"])
    if spec["compression"]:
        engine["additional_config"] = {"kv_compression": spec["compression"]}
    return engine


def child_offline(spec: dict, results: list[dict]) -> None:
    """One engine; each of ``spec["runs"]`` measured on it in turn (several: ``--share-engine``, their
    requests carrying their own compression options). A run gets the window a run of its own
    would have had (``run_timeout_s`` from the engine's start, less the stop margin), each from its
    first request.
    Appends a result per run to ``results`` (kept if a later run fails)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    deadline = started + (spec["deadline"] - time.time())  # stop working then (the parent kills us later)
    workload = Workload(**spec["workload"])
    shape = spec["shape"]
    llm = LLM(model=spec["model_dir"], tokenizer=spec["tokenizer_dir"], disable_log_stats=False, **engine_kwargs(spec))
    engine = llm.llm_engine
    common = {"engine_start_s": round(time.perf_counter() - started, 1),
              "v2_model_runner": bool(engine.vllm_config.use_v2_model_runner)}
    check_plugin_active(spec)
    num_blocks = engine.vllm_config.cache_config.num_gpu_blocks
    stats = StepStats().install(engine.logger_manager)
    progress(f"{spec['name']}: engine up in {common['engine_start_s']} s, {num_blocks} KV blocks")

    greedy = dict(temperature=0.0, ignore_eos=True)
    if spec["warmup"]:
        warm = random_prompts(1, min(workload.prompt_len, 256), shape["vocab_size"], seed=10_000)
        llm.generate([TokensPrompt(prompt_token_ids=warm[0])], SamplingParams(max_tokens=4, **greedy), use_tqdm=False)
    prompts = random_prompts(spec["requests"], workload.prompt_len, shape["vocab_size"], spec["seed"])
    window = None
    for run in spec["runs"]:
        since = len(open(spec["events_path"]).readlines()) if os.path.exists(spec["events_path"]) else 0
        stats.reset()
        params = SamplingParams(max_tokens=workload.output_len, extra_args=run["extra_args"], **greedy)
        t0 = time.perf_counter()
        if window is None:  # as long as a configuration of its own gets, engine start included
            window = started + spec["run_timeout_s"] - stop_margin(spec["run_timeout_s"]) - t0
        result = {**common, **measure_offline(engine, llm, prompts, params, stats, run["name"],
                                              min(t0 + window, deadline))}
        result.update(kv_summary(spec, num_blocks, engine.vllm_config.cache_config.block_size, stats.kv_usage_peak,
                                 stats.kv_usage_sum / stats.steps if stats.steps else None))
        if spec["compression"]:
            result.update(plugin_summary(spec["events_path"], since, shape))
        results.append(result)


def measure_offline(engine, llm, prompts, params, stats: "StepStats", name: str, deadline: float) -> dict:
    """Enqueue every prompt at once and step the engine until all finish or ``deadline`` (then abort
    the rest: status partial). Throughput, TTFT / TPOT percentiles and the step stats."""
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    ids = llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    finished = []
    last_report = t0
    status = "ok"
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out)
        now = time.perf_counter()
        if now - last_report > 20:
            last_report = now
            progress(f"{name}: {now - t0:.0f} s, {stats.generation_tokens} tokens out, "
                     f"{len(finished)}/{len(ids)} done, {stats.running} running (peak {stats.peak_running})")
        if now > deadline:
            status = "partial"
            progress(f"{name}: --timeout reached, aborting {len(ids) - len(finished)} requests")
            # enqueue returns vLLM's internal ids (external id + a random suffix); finished ones are skipped
            engine.abort_request(ids, internal=True)
            for _ in range(100):  # let the aborts land before a next run starts
                if not engine.has_unfinished_requests():
                    break
                engine.step()
            else:
                raise RuntimeError(f"{name}: requests still running after their abort")
            break
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in finished)
    if status == "partial":
        out_tokens = stats.generation_tokens  # finished or not, every token produced before the stop
    prompt_tokens = sum(len(o.prompt_token_ids) for o in finished) if status == "ok" else stats.prompt_tokens
    ttft = [o.metrics.first_token_latency for o in finished if o.metrics is not None]
    tpot = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (o.metrics.num_generation_tokens - 1)
            for o in finished if o.metrics is not None and o.metrics.num_generation_tokens > 1]
    return {
        "status": status,
        "completed": len(finished),
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_s": round(wall, 3),
        "output_tok_s": round(out_tokens / wall, 3),
        "total_tok_s": round((out_tokens + prompt_tokens) / wall, 3),
        "ttft_ms": percentiles(ttft, 1000),
        "tpot_ms": percentiles(tpot, 1000),
        **step_summary(stats.snapshot()),
    }


def server_command(spec: dict) -> list[str]:
    """This file in ``--serve`` mode: vLLM's OpenAI API server with the step-stats hook."""
    engine = spec["engine"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", spec["stats_path"], "--model", spec["model_dir"],
           "--tokenizer", spec["tokenizer_dir"],
           "--served-model-name", spec["model_name"],
           "--load-format", engine["load_format"], "--dtype", engine["dtype"], "--seed", str(engine["seed"]),
           "--max-model-len", str(engine["max_model_len"]), "--max-num-seqs", str(engine["max_num_seqs"]),
           "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]),
           "--gpu-memory-utilization", str(engine["gpu_memory_utilization"]), "--no-enable-prefix-caching"]
    if engine.get("enforce_eager"):
        cmd.append("--enforce-eager")
    if engine.get("num_gpu_blocks_override"):
        cmd += ["--num-gpu-blocks-override", str(engine["num_gpu_blocks_override"])]
    if engine.get("block_size"):
        cmd += ["--block-size", str(engine["block_size"])]
    if spec["compression"]:
        cmd += ["--additional-config", json.dumps({"kv_compression": spec["compression"]})]
    return cmd


def child_served(spec: dict) -> dict:
    import httpx

    started = time.perf_counter()
    deadline = started + (spec["deadline"] - time.time())
    workload = Workload(**spec["workload"])
    server = Server.on_free_port(server_command(spec), spec["log_path"] + ".server")
    base = server.url
    try:
        server.wait_ready(spec["deadline"] - time.time())
        result = {"engine_start_s": round(time.perf_counter() - started, 1)}
        check_plugin_active(spec)
        progress(f"{spec['name']}: server up in {result['engine_start_s']} s")
        if spec["warmup"]:
            warm = " ".join(f"t{i}" for i in random_prompts(1, 64, spec["shape"]["vocab_size"], 10_000)[0])
            httpx.post(base + "/v1/completions", timeout=600, json={
                "model": spec["model_name"], "prompt": warm, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        since = len(open(spec["events_path"]).readlines()) if os.path.exists(spec["events_path"]) else 0
        before = read_metrics(base)
        stats_path = Path(spec["stats_path"])
        Path(str(stats_path) + ".reset").touch()
        for _ in range(200):  # the server's stats thread takes the reset within 0.2 s
            if not Path(str(stats_path) + ".reset").exists():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the API server's step-stats hook does not answer (see the server log)")

        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as bench_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        bench_args = parser.parse_args([
            "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
            "--model", spec["model_name"], "--tokenizer", spec["tokenizer_dir"],
            "--dataset-name", "random", "--random-input-len", str(workload.prompt_len),
            "--random-output-len", str(workload.output_len), "--random-range-ratio", str(workload.range_ratio),
            "--num-prompts", str(spec["requests"]), "--request-rate", str(spec["request_rate"]),
            "--seed", str(spec["seed"]), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--disable-tqdm",
        ])
        outcome: dict = {}

        def client() -> None:
            try:
                outcome["bench"] = bench_main(bench_args)
            except BaseException as e:  # noqa: BLE001
                outcome["error"] = e

        t0 = time.perf_counter()
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        while thread.is_alive() and time.perf_counter() < deadline:
            thread.join(20)
            if thread.is_alive() and stats_path.exists():
                snap = json.loads(stats_path.read_text())
                progress(f"{spec['name']}: {time.perf_counter() - t0:.0f} s, {snap['generation_tokens']} tokens out, "
                         f"{snap['running']} running (peak {snap['peak_running']})")
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)  # the stats thread's last snapshot
        snap = json.loads(stats_path.read_text())
        after = read_metrics(base)
        if "error" in outcome:
            raise outcome["error"]
        result.update(step_summary(snap))
        result["request_rate"] = spec["request_rate"]
        result["v2_model_runner"] = None  # decided in the server process; its log says which runner
        if thread.is_alive():  # --timeout: what the server produced so far
            progress(f"{spec['name']}: --timeout reached, stopping the server mid-run")
            result.update({
                "status": "partial",
                "output_tokens": snap["generation_tokens"],
                "prompt_tokens": snap["prompt_tokens"],
                "wall_s": round(elapsed, 3),
                "output_tok_s": round(snap["generation_tokens"] / elapsed, 3),
                "total_tok_s": round((snap["generation_tokens"] + snap["prompt_tokens"]) / elapsed, 3),
            })
        else:
            bench = outcome["bench"]

            def pct(metric):
                out = {f"p{p}": round(bench[f"p{p}_{metric}_ms"], 3) for p in PERCENTILES
                       if f"p{p}_{metric}_ms" in bench}
                if f"mean_{metric}_ms" in bench:
                    out["mean"] = round(bench[f"mean_{metric}_ms"], 3)
                return out or None

            result.update({
                "status": "ok" if bench["failed"] == 0 else "failed requests",
                "completed": bench["completed"],
                "failed": bench["failed"],
                "output_tokens": bench["total_output_tokens"],
                "prompt_tokens": bench["total_input_tokens"],
                "wall_s": round(bench["duration"], 3),
                "output_tok_s": round(bench["output_throughput"], 3),
                "total_tok_s": round(bench["total_token_throughput"], 3),
                "ttft_ms": pct("ttft"),
                "tpot_ms": pct("tpot"),
                "itl_ms": pct("itl"),
                "e2el_ms": pct("e2el"),
                "client_max_concurrent_requests": bench.get("max_concurrent_requests"),
            })
        preempt = "vllm:num_preemptions_total"
        result["prometheus_preemptions"] = int(after.get(preempt, 0) - before.get(preempt, 0))
        usage_mean = snap["kv_usage_sum"] / snap["steps"] if snap["steps"] else None
        result.update(kv_summary(spec, before.get("num_gpu_blocks"), before.get("block_size"), snap["kv_usage_peak"],
                                 usage_mean))
        if spec["compression"]:
            result.update(plugin_summary(spec["events_path"], since, spec["shape"]))
        return result
    finally:
        server.stop()


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = []
    try:
        if spec["workload"]["served"]:
            results.append(child_served(spec))
        else:
            child_offline(spec, results)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records it
        import traceback

        traceback.print_exc()
        results.append({"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
    Path(spec["result_path"]).write_text(json.dumps(results))
    progress(f"{spec['name']}: {', '.join(r['status'] for r in results)}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the parent stops whatever engine processes remain in our process group


# ---- parent process ------------------------------------------------------------------------------------


def run_child(spec: dict, timeout: float, log_path: Path) -> list[dict]:
    """Run one engine (its ``spec["runs"]``) in a fresh process group, at most ``timeout`` seconds;
    a result per run (runs that never reported: the failure, or a timeout)."""
    spec_path = log_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, **spec["env"])
    if Path(spec["result_path"]).exists():
        Path(spec["result_path"]).unlink()
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, text=True, errors="replace")
        timer = threading.Timer(timeout, lambda: stop_group(proc, grace=5.0))
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(PROGRESS):
                    sys.stderr.write(line)
                    sys.stderr.flush()
            proc.wait()
        finally:
            timer.cancel()
            stop_group(proc, grace=20.0)  # engine processes the child left behind
    elapsed = time.monotonic() - started
    result_path = Path(spec["result_path"])
    results = json.loads(result_path.read_text()) if result_path.exists() else []
    status = "timeout" if elapsed >= timeout - 1 else "failed"
    missing = results[-1:] if results and results[-1]["status"] == "failed" else \
        [{"status": status, "error": f"no result after {elapsed:.0f} s (exit code {proc.returncode})"}]
    results += missing * (len(spec["runs"]) - len(results))
    if any(r["status"] not in ("ok", "partial") for r in results):
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        sys.stderr.write("".join(f"    | {line}\n" for line in tail))
    for r in results:
        r["child_s"] = round(elapsed, 1)
    return results[:len(spec["runs"])]


def settings_of(args, workload: Workload, model: str) -> dict:
    """What makes two runs comparable; a record with other settings is not skipped on resume."""
    return {
        "model": model,
        "shape_sha": hashlib.sha1(json.dumps(SHAPES[model], sort_keys=True).encode()).hexdigest()[:10],
        "workload": asdict(workload),
        "requests": args.requests,
        "seed": args.seed,
        "max_model_len": args.max_model_len or workload.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens or max(workload.max_model_len, 2048),
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_pool_tokens": args.kv_pool_tokens,
        "enforce_eager": args.enforce_eager,
        "warmup": not args.no_warmup,
        "kv_options": args.kv_options,
        "request_rate": args.request_rate if workload.served else None,
    }


def make_spec(args, model: str, model_dir: Path, workload: Workload, configs: list[RunConfig], run_dir: Path,
              timeout: float) -> dict:
    """One engine started with ``configs[0]``; one measured run per configuration. Several (plugin
    configurations, ``--share-engine``): every request of a run carries its configuration's options
    (``kv_compression_config``, validated like a served request's), so the engine's own is only the
    default it overrides."""
    config = configs[0]
    settings = settings_of(args, workload, model)
    shape = SHAPES[model]
    layers, heads, _ = shape_dims(shape)
    engine = {
        "load_format": "dummy",
        "dtype": "float32" if shape["torch_dtype"] == "float32" else "bfloat16",
        "seed": 0,
        "max_model_len": settings["max_model_len"],
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": settings["max_num_batched_tokens"],
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": False,
        "enforce_eager": args.enforce_eager,
    }
    if args.kv_pool_tokens:
        # the same bytes for both: a plugin block is one (layer, KV head)'s share of a plain block
        engine["block_size"] = POOL_BLOCK_SIZE
        blocks = -(-args.kv_pool_tokens // POOL_BLOCK_SIZE)
        engine["num_gpu_blocks_override"] = blocks * (layers * heads if config.plugin else 1)
    name = f"{model}/{workload.name}/{','.join(c.label for c in configs)}"
    stem = name.replace("/", "_").replace("@", "-")
    env = {"VLLM_KVC_EVENTS": str(run_dir / f"{stem}.events.jsonl")}
    if config.v1_runner:
        env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if Path(env["VLLM_KVC_EVENTS"]).exists():
        Path(env["VLLM_KVC_EVENTS"]).unlink()
    return {
        "name": name,
        "model_name": model,
        "model_dir": str(model_dir),
        "tokenizer_dir": str(model_dir / "tokenizer"),
        "shape": shape,
        "workload": asdict(workload),
        "engine": engine,
        "compression": compression_options(config, args.kv_options),
        "runs": [{"name": f"{model}/{workload.name}/{c.label}", "label": c.label,
                  "extra_args": None if len(configs) == 1 else {
                      "kv_compression_config": compression_options(c, args.kv_options)}}
                 for c in configs],
        "requests": args.requests,
        "seed": args.seed,
        "request_rate": args.request_rate,
        "warmup": not args.no_warmup,
        "timeout_s": timeout,
        # wall-clock time at which the child stops and reports what it has: room for shutting down
        "deadline": time.time() + timeout - stop_margin(timeout),
        "run_timeout_s": args.timeout,  # what one configuration gets (several share ``timeout``)
        "events_path": env["VLLM_KVC_EVENTS"],
        "env": env,
        "result_path": str(run_dir / f"{stem}.result.json"),
        "stats_path": str(run_dir / f"{stem}.stats.json"),
        "log_path": str(run_dir / f"{stem}.log"),
        "settings": settings,
    }


def engine_groups(todo: list[tuple], share: bool) -> list[list[tuple]]:
    """``todo``'s (model, workload, config) in engine starts: one each, or with ``share`` the plugin
    configurations of one offline (model, workload) and the same ``+graphs`` (a server option) in one."""
    groups: list[list[tuple]] = []
    for item in todo:
        model, workload, config = item
        last = groups[-1][-1] if groups else None
        if share and last is not None and config.plugin and last[2].plugin and not workload.served \
                and (last[0], last[1].name, last[2].graphs) == (model, workload.name, config.graphs):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def stop_margin(timeout: float) -> float:
    """Seconds before its timeout at which a child stops measuring, to shut down in time."""
    return max(15.0, min(60.0, 0.15 * timeout))


def record_key(r: dict) -> tuple:
    return (r["model"], r["workload"], r["config"])


def add_ratios(records: list[dict]) -> None:
    """output_tok_s_ratio = output tok/s / plain vLLM's, same model, workload and settings."""
    plain = {(r["model"], r["workload"], json.dumps(r["settings"], sort_keys=True)): r
             for r in records if r["config"] == PLAIN and r.get("output_tok_s")}
    for r in records:
        ref = plain.get((r["model"], r["workload"], json.dumps(r["settings"], sort_keys=True)))
        if ref is None or not r.get("output_tok_s"):
            r["output_tok_s_ratio"], r["ratio_reference"] = None, None
            continue
        r["output_tok_s_ratio"] = round(r["output_tok_s"] / ref["output_tok_s"], 4)
        r["ratio_reference"] = f"{PLAIN} run of {ref['date']} ({ref['status']})"
        if ref.get("peak_concurrency"):
            r["peak_concurrency_ratio"] = round(r["peak_concurrency"] / ref["peak_concurrency"], 3)


def print_table(records: list[dict]) -> None:
    def f(value, fmt="{:.0f}"):
        return "-" if value is None else fmt.format(value)

    def pct(r, key, p):
        return f((r.get(key) or {}).get(p), "{:.0f}")

    header = (f"{'model':<12} {'wl':<3} {'config':<16} {'budget':>7} {'kept':>6} {'out tok/s':>10} {'ratio':>6} "
              f"{'tot tok/s':>10} {'peak':>5} {'preem':>5} {'kv%':>5} {'TTFT p50/p99 ms':>17} "
              f"{'TPOT p50/p99 ms':>16} {'wall s':>7}  status")
    print("\n" + header)
    print("-" * len(header))
    for r in sorted(records, key=lambda r: (r["model"], r["workload"], r["config"] != PLAIN, r["config"])):
        print(f"{r['model']:<12} {r['workload']:<3} {r['config']:<16} {f(r.get('budget_fraction'), '{:.3f}'):>7} "
              f"{f(r.get('retained_fraction'), '{:.3f}'):>6} {f(r.get('output_tok_s'), '{:.1f}'):>10} "
              f"{f(r.get('output_tok_s_ratio'), '{:.2f}'):>6} {f(r.get('total_tok_s'), '{:.1f}'):>10} "
              f"{f(r.get('peak_concurrency')):>5} {f(r.get('preemptions')):>5} "
              f"{f(None if r.get('kv_usage_peak') is None else 100 * r['kv_usage_peak']):>5} "
              f"{pct(r, 'ttft_ms', 'p50') + '/' + pct(r, 'ttft_ms', 'p99'):>17} "
              f"{pct(r, 'tpot_ms', 'p50') + '/' + pct(r, 'tpot_ms', 'p99'):>16} {f(r.get('wall_s'), '{:.1f}'):>7}  "
              f"{r['status']}")


def plot(data: dict, path: Path) -> None:
    """Per (model, workload) panel: output tok/s ratio vs budget fraction per policy (top) and peak
    concurrently running requests (bottom); plain vLLM dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in data["records"] if r.get("output_tok_s")]
    panels = sorted({(r["model"], r["workload"]) for r in records})
    if not panels:
        return
    policies = sorted({series(r) for r in records if r["policy"] != "none"})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7), squeeze=False)
    colors = plt.get_cmap("tab10")
    for col, (model, workload) in enumerate(panels):
        group = [r for r in records if (r["model"], r["workload"]) == (model, workload)]
        plain = [r for r in group if r["config"] == PLAIN]
        for row, (key, label) in enumerate((("output_tok_s_ratio", "output tok/s / plain vLLM"),
                                            ("peak_concurrency", "peak running requests"))):
            ax = axes[row][col]
            if plain and plain[0].get(key) is not None:
                ax.axhline(plain[0][key], color="black", linestyle="--", linewidth=1, label="plain vLLM")
            for i, policy in enumerate(policies):
                points = sorted((r["budget_fraction"], r[key]) for r in group
                                if series(r) == policy and r.get(key) is not None)
                if points:
                    ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], color=colors(i % 10), label=policy)
                partial = [(r["budget_fraction"], r[key]) for r in group
                           if series(r) == policy and r.get(key) is not None and r["status"] != "ok"]
                if partial:
                    ax.scatter(*zip(*partial), facecolors="none", edgecolors="red", s=120, zorder=5,
                               label="partial (timeout)" if i == 0 else None)
            ax.set_xscale("log")
            ticks = sorted({r["budget_fraction"] for r in group} | {1.0})
            ax.minorticks_off()
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:.0%}" if t >= 0.01 else f"{t:.1%}" for t in ticks], fontsize=8)
            ax.set_ylim(bottom=0, top=max([r.get(key) or 0 for r in group] + [1.0]) * 1.15)
            ax.set_xlabel("KV budget (fraction of the prompt)")
            ax.set_ylabel(label)
            if row == 0:
                wl = group[0]
                pool = wl.get("settings", {}).get("kv_pool_tokens")
                ax.set_title(f"{model}, workload {workload}\n{wl['prompt_len']} prompt / {wl['output_len']} output, "
                             f"{wl['requests']} requests" + (f", KV pool {pool:,} tokens" if pool else ""), fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    meta = data["meta"]
    fixed = any(r.get("settings", {}).get("kv_pool_tokens") for r in data["records"])
    memory = ("same KV pool bytes for both (per panel)" if fixed
              else f"gpu_memory_utilization {meta['settings']['gpu_memory_utilization']}")
    fig.suptitle(f"vllm-kvcompress vs plain vLLM {meta['versions'].get('vllm')}, {meta['device']}, {memory}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU check: tiny model, 4 requests of 300 tokens, 8 outputs, plain vs snapkv@32, "
                             "a KV pool of 512 tokens (one uncompressed request)")
    parser.add_argument("--models", help="comma-separated: llama3-8b, qwen2-7b, tiny (default llama3-8b)")
    parser.add_argument("--workloads", help="comma-separated of a, b, c, d (default a)")
    parser.add_argument("--configs", help=f"comma-separated: plain, plain-v1, POLICY@BUDGET (default {DEFAULT_CONFIGS})")
    parser.add_argument("--requests", type=int, help="requests per configuration (default 64; --quick: 4)")
    parser.add_argument("--request-rate", type=float, default=2.0, help="workload d: Poisson arrivals per second")
    parser.add_argument("--max-model-len", type=int, help="default: longest prompt + output, rounded up to 128")
    parser.add_argument("--max-num-seqs", type=int, help="default 256 (--quick: 8)")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="per-step token budget (default max_model_len: one prompt prefills in one step)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="default 0.85 (--quick: 0.15, as the tests)")
    parser.add_argument("--kv-pool-tokens", type=int,
                        help="fix the KV pool at this many full-cache tokens (num_gpu_blocks_override, block size "
                             "16 for both: plain gets tokens/16 blocks, the plugin the same bytes as tokens/16 x "
                             "layers x KV heads head-blocks). Default: from gpu_memory_utilization (--quick: 512, "
                             "one uncompressed request)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (both)")
    parser.add_argument("--kv-options", type=json.loads, default={},
                        help="extra plugin options as JSON, for every plugin configuration")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    parser.add_argument("--no-warmup", action="store_true", help="skip the one-request warm-up before timing")
    parser.add_argument("--timeout", type=float, help="seconds per configuration, engine start included (default 540: one fits a 10-minute "
                             "device call)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for this whole invocation: a configuration starts only while its whole "
                             "--timeout still fits; the rest is left for the next (resumable) call")
    parser.add_argument("--force", action="store_true", help="rerun configurations already in the JSON")
    parser.add_argument("--share-engine", action="store_true",
                        help="run the plugin configurations of one offline workload (same +graphs) in one engine, "
                             "one after another, each request carrying its configuration's options: one engine "
                             "start instead of one per configuration (records say shared_engine)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/throughput-<device>.json)")
    parser.add_argument("--model-dir", type=Path, help="where the model folders are written (default: a tmp dir)")
    parser.add_argument("--log-dir", type=Path, help="engine logs, specs and event files (default: a tmp dir)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only print the table and redraw the PNG of a JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    quick = args.quick
    for name, real, small in (("models", "llama3-8b", "tiny"), ("workloads", "a", "a"),
                              ("configs", DEFAULT_CONFIGS, "plain,snapkv@32"), ("requests", 64, 4),
                              ("max_num_seqs", 256, 8), ("gpu_memory_utilization", 0.85, 0.15),
                              ("kv_pool_tokens", None, 512), ("timeout", 540.0, 400.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else real)
    if quick:
        args.enforce_eager = True
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    table = QUICK_WORKLOADS if quick else WORKLOADS
    for m in args.models:
        if m not in SHAPES:
            parser.error(f"unknown model {m!r} ({', '.join(SHAPES)})")
    for w in args.workloads:
        if w not in table:
            parser.error(f"unknown workload {w!r} ({', '.join(table)})")
    try:
        configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as e:
        parser.error(str(e))
    # plain first: the ratios of the others need it
    args.configs = sorted(dict((c.label, c) for c in configs).values(), key=lambda c: c.plugin)
    for config in args.configs:
        try:
            compression_options(config, args.kv_options)  # bad options fail here, not in an engine
        except ValueError as e:
            parser.error(f"{config.label}: {e}")
    return args


def main(argv=None) -> dict | None:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["--serve"]:  # the API server of workload d (started by a child)
        serve_main(raw[1], raw[2:])
        return None
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return None
    if args.plot:
        return replot(args.plot, print_table, plot)
    return run(args)


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    device = detect_device()
    out: Path = args.out or RESULTS / f"throughput-{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.gettempdir()) / "vllm-kvcompress-throughput"
    model_root = args.model_dir or tmp_root / "models"
    tmp_root.mkdir(parents=True, exist_ok=True)
    run_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="logs-", dir=tmp_root))
    run_dir.mkdir(parents=True, exist_ok=True)
    table = QUICK_WORKLOADS if args.quick else WORKLOADS

    previous = json.loads(out.read_text()) if out.exists() else None
    records = previous["records"] if previous else []
    by_key = {record_key(r): r for r in records}
    vers = versions()
    run_info = {"command": " ".join(["python", "benchmarks/throughput.py"] + args.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "versions": vers}
    meta = {
        "benchmark": "throughput",
        "device": device,
        "versions": vers,
        "settings": {"gpu_memory_utilization": args.gpu_memory_utilization, "max_num_seqs": args.max_num_seqs,
                     "kv_pool_tokens": args.kv_pool_tokens, "enable_prefix_caching": False, "load_format": "dummy",
                     "enforce_eager": args.enforce_eager},
        "runs": (previous["meta"]["runs"] if previous else []) + [run_info],
    }

    def save() -> dict:
        run_info["runtime_s"] = round(time.monotonic() - started, 1)
        meta.update(command=run_info["command"], date=run_info["date"])
        add_ratios(records)
        data = {"meta": meta, "records": records}
        write_json(out, data)
        return data

    todo = []
    for model in args.models:
        for wname in args.workloads:
            workload = table[wname]
            for config in args.configs:
                settings = settings_of(args, workload, model)
                old = by_key.get((model, wname, config.label))
                # partial (stopped at --timeout) would end the same way again: kept too
                if old is not None and old["settings"] == settings and old["status"] in ("ok", "partial") \
                        and not args.force:
                    continue
                todo.append((model, workload, config))
    progress(f"{device}: {len(todo)} configuration(s) to run, {len(records)} record(s) already in {out}; "
             f"logs in {run_dir}")
    if any(config.plugin for _, _, config in todo) and plugin_entry_point():
        raise SystemExit(plugin_entry_point())
    model_dirs = {m: build_model_dir(m, model_root) for m in {t[0] for t in todo}}

    groups = engine_groups(todo, args.share_engine)
    done = 0
    for index, group in enumerate(groups, 1):
        model, workload = group[0][0], group[0][1]
        configs = [config for _, _, config in group]
        if args.time_limit is not None:
            # every configuration gets the same --timeout (comparable): what does not fit waits for the next call
            fits = int((args.time_limit - (time.monotonic() - started) - 10) // args.timeout)
            configs = configs[:max(fits, 0)]
            if not configs:
                progress(f"--time-limit: {len(todo) - done} configuration(s) left for the next call")
                break
        timeout = args.timeout * len(configs)
        spec = make_spec(args, model, model_dirs[model], workload, configs, run_dir, timeout)
        progress(f"[{index}/{len(groups)}] {spec['name']}: starting (timeout {timeout:.0f} s)")
        results = run_child(spec, timeout, Path(spec["log_path"]))
        for config, result in zip(configs, results):
            record = {
                "model": model,
                "workload": workload.name,
                "config": config.label,
                "policy": config.policy,
                "budget": config.budget,
                "budget_fraction": round(config.budget_fraction(workload.prompt_len), 5),
                "prompt_len": workload.prompt_len,
                "output_len": workload.output_len,
                "requests": args.requests,
                "timeout_s": args.timeout,
                "date": run_info["date"],
                "device": device,
                **result,
                "compression": compression_options(config, args.kv_options),
                "engine_args": spec["engine"],
                "env": {k: v for k, v in spec["env"].items() if k != "VLLM_KVC_EVENTS"},
                "settings": spec["settings"],
            }
            if len(configs) > 1:  # the engine started with the first; this run's requests carried its options
                record["shared_engine"] = [c.label for c in configs]
            by_key[record_key(record)] = record
            progress(f"[{index}/{len(groups)}] {model}/{workload.name}/{config.label}: {record['status']}, "
                     f"{record.get('output_tok_s', 0) or 0:.1f} output tok/s, peak {record.get('peak_concurrency')} "
                     f"running ({record.get('child_s')} s)")
        records[:] = list(by_key.values())
        save()
        done += len(configs)
        if len(configs) < len(group):
            progress(f"--time-limit: {len(todo) - done} configuration(s) left for the next call")
            break
    data = save()
    print_table(data["records"])
    png = out.with_suffix(".png")
    plot(data, png)
    print(f"\nwrote {out} and {png} ({time.monotonic() - started:.0f} s)")
    return data


if __name__ == "__main__":
    main()
