"""Where a decode step's time goes: vLLM's engine in process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
stepped by hand, with or without the plugin. All requests are prefilled first; then ``--steps``
decode steps are timed one by one (wall clock: a step returns once its tokens are sampled) with no
profiler attached; then ``--cprofile`` records ``--profile-steps`` more by cProfile (top Python
functions) and ``--torch-profile`` as many by torch.profiler (top ops by host and by device time);
``--profile-prefill`` puts torch.profiler over the prefill as well (where a prefill step's time goes),
``--cprofile-prefill`` cProfile (which Python functions; on the CPU, ``--shape llama3-8b-narrow``
keeps llama3-8b's head-block bookkeeping at a fraction of its arithmetic), ``--sync-debug`` counts
the prefill's waits for the GPU by the line of Python that made them.

    python benchmarks/profile_engine.py --config snapkv@0.1 --requests 24 --prompt 4096 --steps 64
    python benchmarks/profile_engine.py --config plain --requests 24 --prompt 4096 --torch-profile

Prints one JSON line (``decode_step_ms`` median / p90, requests running; ``prefill_s``: wall time
until every request decodes; ``prefill_compress_ms_per_request``: the plugin's prefill compression,
GPU time per request) and writes the profile tables to ``--out``. ``--kv-cache-dtype fp8``: an fp8
cache (plain vLLM's, or the plugin's head-blocks in fp8).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import random
import statistics
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# before the plugin is imported: its StepTimer reads the event log variable once, at import
os.environ.setdefault("VLLM_KVC_EVENTS", f"/tmp/kvc-profile-{os.getpid()}.jsonl")
sys.path.insert(0, os.path.dirname(__file__))
from dummy_model import make_dummy  # noqa: E402
from common import plugin_entry_point  # noqa: E402


def engine_kwargs(config: str, kv_options: dict) -> dict:
    """``plain`` (vLLM's defaults), ``plain-v1`` (V1 model runner) or ``POLICY@BUDGET`` (the plugin)."""
    if config in ("plain", "plain-v1"):
        if config == "plain-v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        return {}
    policy, _, budget = config.partition("@")
    options = {"policy": policy, "budget": float(budget) if "." in budget else int(budget), **kv_options}
    return {"additional_config": {"kv_compression": options}}


def timed_steps(engine, steps: int) -> list[float]:
    """Wall ms of each of ``steps`` engine steps (a step returns once its tokens are sampled)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def torch_profiler():
    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])


def write_tables(f, profiler, what: str) -> None:
    """The ops of a torch.profiler run by host time, then by device time."""
    averages = profiler.key_averages()
    f.write(f"\n# torch.profiler over {what}\n")
    f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    f.write(averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))


@contextlib.contextmanager
def host_waits():
    """Every wait of the host for the GPU inside the block (PyTorch's sync debug mode warns at each
    one), as the caught warnings."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode(0)


def pageable_copies(profiler) -> int:
    """Host-to-device copies from pageable memory in a torch.profiler run: each synchronizes the
    stream, a wait the sync debug mode (:func:`host_waits`) does not see."""
    return sum(e.count for e in profiler.key_averages() if "Pageable" in e.key and "HtoD" in e.key)


def write_waits(f, caught, what: str) -> None:
    """The host's waits for the GPU by the line that made them, most first."""
    import collections

    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    f.write(f"\n# waits for the GPU over {what}: {sum(where.values())}\n")
    for line, count in where.most_common(40):
        f.write(f"{count:8d}  {line}\n")


def write_cprofile(f, profiler, what: str) -> None:
    """The top Python functions of a cProfile run, by cumulative time, then by own time."""
    f.write(f"\n# cProfile over {what}\n")
    stats = pstats.Stats(profiler, stream=f)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="snapkv@0.1")
    parser.add_argument("--kv-options", type=json.loads, default={}, help="more plugin options, JSON")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--model", help="a model folder instead of the dummy --shape one")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8 (vLLM's flag)")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=16, help="steps under each profiler")
    parser.add_argument("--profile-prefill", action="store_true",
                        help="torch.profiler over the prefill too (its steps then run slower: prefill_s is not clean)")
    parser.add_argument("--cprofile-prefill", action="store_true",
                        help="cProfile over the prefill (top Python functions; prefill_s is not clean)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="count where the prefill waits for the GPU (torch.cuda.set_sync_debug_mode), by line")
    parser.add_argument("--step-times", action="store_true", help="also list every step's ms, in order")
    parser.add_argument("--out", default="profile.txt")
    args = parser.parse_args()
    plugin = args.config not in ("plain", "plain-v1")
    if plugin and plugin_entry_point():  # vLLM would silently ignore additional_config: plain numbers
        raise SystemExit(plugin_entry_point())
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.vllm.runtime import EVENTS_ENV, read_events

    events = os.environ[EVENTS_ENV]

    model = args.model or make_dummy(f"/tmp/kvc-dummy-{args.shape}", args.shape)
    # warm-up, timed and profiled steps, plus the steps the first request decodes while the others
    # prefill (chunks of max_num_batched_tokens): no request finishes inside a measured step
    batched = max(args.prompt + 64, 8192)
    steps = 4 + args.steps + 2 * args.profile_steps + -(-args.requests * args.prompt // batched) + 2
    max_len = args.prompt + steps + 64
    llm = LLM(model, load_format="dummy", max_model_len=max_len, enable_prefix_caching=False,
              max_num_batched_tokens=max(max_len, batched), gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
              **engine_kwargs(args.config, args.kv_options))
    engine = llm.llm_engine
    if plugin != any(e["kind"] == "manager_init" for e in read_events(events)):  # the plugin's start-up event
        raise SystemExit(f"--config {args.config}, but the plugin {'never' if plugin else 'also'} started")
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 16, ignore_eos=True, temperature=0)
    for i in range(args.requests):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(3, 40) for _ in range(args.prompt)]},
                           params)
    generated = {}
    steps_to_prefill = 0
    prefill_profile = torch_profiler() if args.profile_prefill else contextlib.nullcontext()
    prefill_cprofile = cProfile.Profile() if args.cprofile_prefill else contextlib.nullcontext()
    waits = host_waits() if args.sync_debug else contextlib.nullcontext([])
    prefill_start = time.perf_counter()
    with prefill_profile, prefill_cprofile, waits as caught:
        while len(generated) < args.requests or min(generated.values()) < 2:  # every request decoding
            for out in engine.step():
                generated[out.request_id] = len(out.outputs[0].token_ids)
            steps_to_prefill += 1
    prefill_s = time.perf_counter() - prefill_start
    for _ in range(4):  # warm the decode path
        engine.step()
    # every prefill compression so far (a step's device times are written once they are known)
    prefill_records = [e for e in read_events(events) if e["kind"] == "step_time"]
    times = timed_steps(engine, args.steps)  # clean: no profiler attached
    in_order = [round(t, 2) for t in times]
    times.sort()
    result = {"config": args.config, "kv_options": args.kv_options, "kv_cache_dtype": args.kv_cache_dtype,
              "requests": args.requests, "prompt": args.prompt, "steps_to_prefill": steps_to_prefill,
              # until every request decodes: the prompts' prefill (and the plugin's compression of them)
              "prefill_s": round(prefill_s, 3),
              "decode_step_ms": {"p50": round(statistics.median(times), 2),
                                 "p90": round(times[int(0.9 * (len(times) - 1))], 2),
                                 "mean": round(statistics.fmean(times), 2)}}
    if plugin:  # the worker's own account of the timed steps (StepTimer), medians
        # GPU time of the prefill compressions (StepTimer's device events), per request
        result["prefill_compress_ms_per_request"] = round(
            sum(r.get("compress_ms", 0.0) for r in prefill_records) / args.requests, 2)
        records = [e for e in read_events(events) if e["kind"] == "step_time"][-args.steps:]
        result["plugin_step_ms_p50"] = {
            key: round(statistics.median(r.get(key, 0.0) for r in records), 3)
            for key in ("interval_ms", "layout_ms", "recompress_ms", "report_ms")} if records else None
    if args.step_times:
        result["step_ms"] = in_order
    with open(args.out, "w") as f:
        f.write(json.dumps(result) + "\n")
        if args.cprofile:  # each profiler over its own steps, after the timed ones
            with cProfile.Profile() as profiler:
                timed_steps(engine, args.profile_steps)
            write_cprofile(f, profiler, f"{args.profile_steps} decode steps")
        if args.torch_profile:
            with torch_profiler() as profiler:
                timed_steps(engine, args.profile_steps)
            write_tables(f, profiler, f"{args.profile_steps} decode steps")
        if args.profile_prefill:
            write_tables(f, prefill_profile, f"the prefill ({steps_to_prefill} steps, {args.requests} prompts)")
        if args.sync_debug:
            write_waits(f, caught, f"the prefill ({steps_to_prefill} steps, {args.requests} prompts)")
        if args.cprofile_prefill:
            write_cprofile(f, prefill_cprofile, f"the prefill ({steps_to_prefill} steps, {args.requests} prompts)")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
