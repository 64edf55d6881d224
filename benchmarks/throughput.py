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
the front end's ``StatLoggerManager.record`` sees the ``SchedulerStats`` of every step that produced
output (``throughput_child.StepStats``). The plugin's own ``peak_requests`` event (requests holding
blocks) is recorded next to it.

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

This file is the command line and the parent process (the configurations to run, a spec and a child
process per engine, the records); ``throughput_child.py`` the child process (one engine, offline or
served), ``throughput_workloads.py`` the workloads and configurations, ``throughput_results.py`` the
ratios, table and plot, ``common.py`` what it shares with ``serving.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHAPES, build_model_dir, invocation_paths, plugin_entry_point, replot, shape_dims,  # noqa: E402
                    shape_sha, versions)
from recording import write_json  # noqa: E402
from throughput_child import PROGRESS, progress, stop_margin  # noqa: E402
from throughput_results import add_ratios, plot, print_table, record_key  # noqa: E402
from throughput_workloads import (DEFAULT_CONFIGS, POOL_BLOCK_SIZE, QUICK_WORKLOADS, WORKLOADS, RunConfig,  # noqa: E402
                                  Workload, compression_options, parse_config)

from vllm_kvcompress.tools.openai_server import stop_group  # noqa: E402

CHILD = Path(__file__).resolve().parent / "throughput_child.py"  # the child process of one engine

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
        proc = subprocess.Popen([sys.executable, str(CHILD), str(spec_path)],
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
        "shape_sha": shape_sha(model),
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


# ---- command line ------------------------------------------------------------------------------------


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot:
        return replot(args.plot, print_table, plot)
    return run(args)


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    device, out, tmp_root, run_dir = invocation_paths("throughput", args.out, args.log_dir)
    model_root = args.model_dir or tmp_root / "models"
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


if __name__ == "__main__":    main()
