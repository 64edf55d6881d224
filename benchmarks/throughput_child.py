"""The throughput benchmark's child process: one engine and the runs of one configuration (or
several, ``--share-engine``), started by ``throughput.py`` in a fresh process group; offline
through ``LLM`` (workloads a-c), or served (workload d) through vLLM's OpenAI server, which runs
as this file in ``--serve`` mode, driven by vLLM's own client (``vllm.benchmarks.serve``).

    python benchmarks/throughput_child.py SPEC_JSON                     # what throughput.py runs
    python benchmarks/throughput_child.py --serve STATS_JSON SERVER_ARGS  # the served workload's server

The spec (``throughput.make_spec``) says what to run; the results go to its ``result_path`` as a
JSON list, one per run; the parent echoes the progress lines (:data:`PROGRESS`) of the child's
output to its own stderr.

Peak concurrency is measured the same way for plain and plugin runs, offline and served: a hook on
the front end's ``StatLoggerManager.record`` (:class:`StepStats`; ``LLM`` takes no custom stat
loggers, so it wraps ``llm.llm_engine.logger_manager``; the API server runs as this file in
``--serve`` mode with the same hook) sees the ``SchedulerStats`` of every step that produced output
(``num_running_reqs``, ``num_waiting_reqs``, ``kv_cache_usage``) and its ``IterationStats`` (new
tokens, preemptions). Polling Prometheus' ``vllm:num_requests_running`` would miss short peaks.
The plugin's own ``peak_requests`` event (requests holding blocks) is recorded next to it.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FIRST_ID, bench_serve_args, client_percentiles, dtype_bytes, plugin_started,  # noqa: E402
                    read_metrics, shape_dims)
from throughput_workloads import POOL_BLOCK_SIZE, Workload  # noqa: E402

from vllm_kvcompress.tools.openai_server import Server  # noqa: E402

PROGRESS = "[throughput]"  # child lines with this prefix are echoed to the parent's stderr
PERCENTILES = (50, 90, 99)

# ---- small helpers -----------------------------------------------------------------------------------


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


def stop_margin(timeout: float) -> float:
    """Seconds before its timeout at which a child stops measuring, to shut down in time."""
    return max(15.0, min(60.0, 0.15 * timeout))


# ---- the step-stats hook (offline, and in the --serve server) ----------------------------------------


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


# ---- what a run records ------------------------------------------------------------------------------


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


# ---- offline runs (workloads a-c) --------------------------------------------------------------------


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


# ---- the served run (workload d) ---------------------------------------------------------------------


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
        bench_args = parser.parse_args(bench_serve_args(
            base, spec["model_name"], spec["tokenizer_dir"], workload.prompt_len, workload.output_len,
            workload.range_ratio, spec["requests"], spec["request_rate"], spec["seed"], PERCENTILES))
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
            result.update({
                "status": "ok" if bench["failed"] == 0 else "failed requests",
                "completed": bench["completed"],
                "failed": bench["failed"],
                "output_tokens": bench["total_output_tokens"],
                "prompt_tokens": bench["total_input_tokens"],
                "wall_s": round(bench["duration"], 3),
                "output_tok_s": round(bench["output_throughput"], 3),
                "total_tok_s": round(bench["total_token_throughput"], 3),
                "ttft_ms": client_percentiles(bench, "ttft", PERCENTILES, mean=True),
                "tpot_ms": client_percentiles(bench, "tpot", PERCENTILES, mean=True),
                "itl_ms": client_percentiles(bench, "itl", PERCENTILES, mean=True),
                "e2el_ms": client_percentiles(bench, "e2el", PERCENTILES, mean=True),
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


# ---- the process -------------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--serve"]:  # the API server of workload d (started by child_served)
        serve_main(argv[1], argv[2:])
    else:
        child_main(argv[0])


if __name__ == "__main__":
    main()
