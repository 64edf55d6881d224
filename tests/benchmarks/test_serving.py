"""The served benchmark (benchmarks/serving.py): ``--quick`` end to end on the CPU, and its pure helpers.

``--quick`` serves the tiny model from two servers started side by side (plain vLLM, and the plugin
started with snapkv@32 whose runs also carry streamingllm@64 per request) with the same KV bytes:
512 full-cache tokens (32 plain blocks, 256 head-blocks). ``quick`` (4 x 300 -> 96) runs to the end;
``quick-window`` (8 x 128 -> 384) is cut by its 1 s window. plain-fp8 is skipped: vLLM's CPU build
keeps fp8 KV only at block sizes of 32."""
import json
import math
import shutil
import time

import benchmark_modules
import pytest

serving = benchmark_modules.load("serving")
RECORD_FIELDS = {"workload", "config", "arrival", "model", "budget_fraction", "output_tok_s", "total_tok_s",
                 "ratio_plain", "ttft_ms", "tpot_ms", "peak_running", "preemptions", "ceiling_fraction", "complete",
                 "duration_s", "num_gpu_blocks", "kv_pool_tokens", "server_start_s", "settings", "client_command",
                 "jit_compiles"}
PLUGIN_FIELDS = {"ratio_fp8", "ratio_same_batch", "recompress_per_s", "recompress_share", "step_breakdown",
                 "decode_slack", "blocks_kept_fraction"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(JSON path, data, seconds) of one ``--quick`` run."""
    out = tmp_path_factory.mktemp("serving") / "serving-quick.json"
    started = time.monotonic()
    data = serving.main(["--quick", "--out", str(out), "--log-dir", str(out.parent / "logs")])
    return out, data, time.monotonic() - started


def _records(data):
    return {(r["workload"], r["config"]): r for r in data["records"]}


@pytest.mark.slow
def test_quick_records_every_run_with_consistent_numbers(quick_run):
    out, data, seconds = quick_run
    assert json.loads(out.read_text())["records"] == data["records"]
    records = _records(data)
    assert set(records) == {(w, c) for w in ("quick", "quick-window")
                            for c in ("plain", "plain-fp8", "snapkv@32", "streamingllm@64")}
    for (workload, config), r in records.items():
        if config == "plain-fp8":
            assert r["status"] == "skipped" and "fp8" in r["skip_reason"].lower()
            continue
        assert r["status"] == "ok", r
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert (r["model"], r["arrival"], r["kv_pool_tokens"]) == ("tiny", "all-at-once", 512)  # the same bytes
        assert r["num_gpu_blocks"] == (256 if r["plugin"] else 32)
        assert r["output_tokens"] > 0 and r["prompt_tokens"] > 0 and r["server_start_s"] > 0
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["duration_s"], rel=1e-3)
        assert r["total_tok_s"] == pytest.approx((r["output_tokens"] + r["prompt_tokens"]) / r["duration_s"], rel=1e-3)
        assert 0 <= r["peak_running"] <= r["settings"]["requests"] and r["running_samples"] >= 1
        assert r["client_command"].startswith("vllm bench serve --backend openai")
        assert 0 < r["ceiling_fraction"] == pytest.approx(r["output_tok_s"] / r["ceiling"]["output_tok_s"], abs=1e-4)
    # the 2 Hz samples of vllm:num_requests_running see the plugin's batches
    assert max(r.get("peak_running") or 0 for r in records.values() if r.get("plugin")) >= 2
    assert seconds < 600  # two server starts side by side: ~3 min on 2 idle CPU cores, more when busy


@pytest.mark.slow
def test_quick_complete_and_windowed_runs(quick_run):
    _, data, _ = quick_run
    for r in data["records"]:
        if r["status"] != "ok":
            continue
        if r["workload"] == "quick":  # inside its window: every token, and the client's own latencies
            assert r["complete"] is True and (r["completed"], r["failed"]) == (4, 0)
            assert (r["output_tokens"], r["prompt_tokens"]) == (4 * 96, 4 * 300)
            assert r["client_output_tok_s"] == pytest.approx(r["output_tok_s"], rel=1e-3)
            for key in ("ttft_ms", "tpot_ms"):
                assert 0 < r[key]["p50"] <= r[key]["p99"]
        else:  # 8 x 384 tokens do not come out of a 512-token pool in 1 s on a CPU (in 2 s they did once)
            assert r["complete"] is False and r["ttft_ms"] is None
            assert r["output_tokens"] < 8 * 384
            # the window, plus the last /metrics answer of a busy server: 4.3 s once on a loaded 2-core machine
            assert r["window_s"] <= r["duration_s"] < r["window_s"] + 8.0


@pytest.mark.slow
def test_quick_plugin_runs_share_a_server_and_keep_their_own_budgets(quick_run):
    _, data, _ = quick_run
    records = _records(data)
    for workload, prompt_len, output_len in (("quick", 300, 96), ("quick-window", 128, 384)):
        plain, snap, stream = (records[(workload, c)] for c in ("plain", "snapkv@32", "streamingllm@64"))
        assert plain["budget_fraction"] == 1.0 and plain["ratio_plain"] == 1.0
        for r, budget in ((snap, 32), (stream, 64)):
            assert PLUGIN_FIELDS <= set(r), PLUGIN_FIELDS - set(r)
            # the server started with snapkv@32: streamingllm's budget came with each request
            assert r["server"] == snap["server"] and r["server_configs"] == ["snapkv@32", "streamingllm@64"]
            # each configuration met the workload's prompt length before its run (its kernels compiled)
            assert r["warm_up"] == f"{prompt_len} prompt / {serving.WARM_UP_TOKENS} output tokens"
            # budget / the tokens at compression: the prompt, or more for a request preempted and
            # recomputed with its outputs so far (the 512-token pool preempts in quick-window)
            assert budget / (prompt_len + output_len) - 0.01 <= r["budget_fraction"] <= budget / prompt_len + 0.01
            if r["preemptions"] == 0:
                assert r["budget_fraction"] == pytest.approx(budget / prompt_len, abs=0.01)
            assert r["ratio_plain"] == round(r["output_tok_s"] / plain["output_tok_s"], 4)
            assert r["ratio_fp8"] is None and r["ratio_same_batch"] is None  # neither was measured
            assert r["decode_slack"] == 64
        if workload == "quick":  # the worker recompresses every 64 steps: each request's 96 outputs span 1 or 2 ticks
            for r in (snap, stream):
                assert 4 <= r["decode_recompressions"] <= 8
                assert r["recompress_per_s"] == pytest.approx(r["decode_recompressions"] / r["duration_s"], rel=1e-3)
    # plain holds one 396-token request at a time in 512 tokens
    assert records[("quick", "plain")]["peak_running"] <= 1


@pytest.mark.slow
def test_quick_step_breakdown_only_from_logged_events(quick_run):
    """No numbers without ``step_time`` events: the breakdown is empty exactly when the plugin logged none."""
    out, data, _ = quick_run
    events = "".join(p.read_text() for p in (out.parent / "logs").glob("*.events.jsonl"))
    logged = '"kind": "step_time"' in events
    for r in data["records"]:
        if r.get("plugin") and r["status"] == "ok":
            assert (r["step_breakdown"] is not None) == logged
            assert (r["recompress_share"] is not None) == logged


@pytest.mark.slow
def test_quick_header_plot_replot_and_resume(quick_run, tmp_path):
    out, data, _ = quick_run
    meta = data["meta"]
    assert "--quick" in meta["command"] and meta["device"].startswith("CPU")
    assert {"vllm", "torch", "python", "vllm_kvcompress_commit"} <= set(meta["versions"])
    assert meta["copy_bandwidth"]["bytes_per_s"] > 1e8
    assert {k: p["prompt_len"] for k, p in meta["prefill"].items()} == {"tiny/quick": 300, "tiny/quick-window": 128}
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    copy = tmp_path / "resumed.json"
    shutil.copy(out, copy)
    replot = serving.main(["--plot", str(copy)])
    assert replot["records"] == data["records"] and copy.with_suffix(".png").exists()
    started = time.monotonic()
    again = serving.main(["--quick", "--out", str(copy), "--log-dir", str(tmp_path / "logs")])
    assert time.monotonic() - started < 60  # every run is done: no server starts
    done = {k: r for k, r in _records(again).items() if r["status"] == "ok"}
    assert done == {k: r for k, r in _records(data).items() if r["status"] == "ok"}
    assert len(again["meta"]["runs"]) == len(meta["runs"]) + 1


# ---- helpers (no server) ---------------------------------------------------------------------------


def test_parse_config_and_its_errors():
    snap = serving.parse_config("snapkv@0.1")
    assert (snap.policy, snap.budget, snap.plugin, snap.server_kind, snap.kv_cache_dtype) == \
        ("snapkv", 0.1, True, "plugin", "auto")
    assert snap.xargs() == {"kv_compression": "snapkv", "kv_budget": 0.1}
    tokens = serving.parse_config("ems@256+fp8")
    assert (tokens.label, tokens.budget, tokens.fp8, tokens.server_kind, tokens.kv_cache_dtype) == \
        ("ems@256+fp8", 256, True, "plugin-fp8", "fp8")
    for label in ("plain", "plain-fp8", "same-batch-plain"):
        config = serving.parse_config(label)
        assert (config.plugin, config.server_kind, config.xargs()) == (False, label, None)
    assert serving.parse_config("plain-fp8").fp8
    with pytest.raises(ValueError, match="snapkv.*streamingllm|streamingllm.*snapkv"):
        serving.parse_config("nosuch@0.1")  # names the valid policies
    for bad in ("snapkv", "snapkv@1.5", "snapkv@0.1+int4", "none@0.1", "plain-int8"):
        with pytest.raises(ValueError):
            serving.parse_config(bad)


def test_parse_args_defaults_and_errors():
    args = serving.parse_args([])
    assert [w.name for w in args.workloads] == ["long-gen", "kvcompress"]
    assert [c.label for c in args.configs] == ["plain", "plain-fp8", "same-batch-plain", "ems@0.1", "snapkv@0.1",
                                               "streamingllm@0.1"]
    assert (args.request_rates, args.max_num_seqs, args.parallel_starts, args.duration) == ([math.inf], 256, 1, None)
    args = serving.parse_args(["--request-rate", "inf,2", "--workloads", "16k", "--requests", "8"])
    assert args.request_rates == [math.inf, 2.0] and args.workloads[0].requests == 8 and args.max_num_seqs == 8
    assert [serving.arrival_name(r) for r in args.request_rates] == ["all-at-once", "poisson-2/s"]
    for bad in (["--workloads", "nosuch"], ["--configs", "nosuch@0.1"], ["--request-rate", "0"],
                ["--kv-options", '{"nosuch": 1}'], ["--model", "gpt5"], ["--parallel-starts", "0"]):
        with pytest.raises(SystemExit):
            serving.parse_args(bad)


def test_servers_give_every_configuration_the_same_kv_bytes():
    args = serving.parse_args([])
    plans = serving.plan_servers(args.model, args.workloads, args.configs, [math.inf, 2.0], args.max_num_seqs)
    assert [(p.kind, p.max_model_len) for p in plans] == [
        ("plain", 10240), ("plain-fp8", 10240), ("plugin", 10240),
        ("plain", 6528), ("plain-fp8", 6528), ("plugin", 6528), ("same-batch-plain", 10240)]
    plain, fp8, plugin = plans[:3]
    assert (plain.num_blocks, fp8.num_blocks, plugin.num_blocks) == (5000, 10000, 5000 * 32 * 8)
    assert plain.pool_bytes() == fp8.pool_bytes() == plugin.pool_bytes() == 80_000 * 128 * 1024  # 128 KiB a token
    # one plugin server a workload: every policy, both arrivals
    assert [(r.config.label, r.rate) for r in plugin.runs] == [
        (c, rate) for c in ("ems@0.1", "snapkv@0.1", "streamingllm@0.1") for rate in (math.inf, 2.0)]
    same = plans[-1]
    assert same.pool_blocks is None and same.footprint() is None and len(same.runs) == 4  # both workloads


def test_server_flags(tmp_path):
    args = serving.parse_args(["--configs", "plain-fp8,ems@0.1", "--kv-options", '{"cuda_graphs": false}'])
    fp8, plugin = serving.plan_servers(args.model, args.workloads[:1], args.configs, [math.inf], 256)
    argv = serving.server_argv(fp8, tmp_path, args)

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert (flag(argv, "--kv-cache-dtype"), flag(argv, "--num-gpu-blocks-override"), flag(argv, "--block-size")) == \
        ("fp8", "10000", "16")
    assert flag(argv, "--kv-cache-memory-bytes") == str(80_000 * 128 * 1024)
    assert "--no-enable-prefix-caching" in argv and "--kv-compression" not in argv and "--jit-monitor-verbose" in argv
    argv = serving.server_argv(plugin, tmp_path, args)
    assert (flag(argv, "--kv-compression"), flag(argv, "--kv-budget"), flag(argv, "--num-gpu-blocks-override")) == \
        ("ems", "0.1", str(5000 * 256))
    assert json.loads(flag(argv, "--kv-compression-config")) == {"cuda_graphs": False}
    same = serving.plan_servers(args.model, args.workloads, [serving.parse_config("same-batch-plain")], [math.inf],
                                256)[0]
    argv = serving.server_argv(same, tmp_path, args)
    assert "--num-gpu-blocks-override" not in argv and flag(argv, "--gpu-memory-utilization") == \
        str(args.same_batch_memory_utilization)
    unmonitored = serving.parse_args(["--configs", "plain", "--no-jit-monitor"])
    assert "--jit-monitor-verbose" not in serving.server_argv(same, tmp_path, unmonitored)


def test_jit_compiles_counts_the_kernels_compiled_after_the_offset(tmp_path):
    """A run's record counts the compilations vLLM's JIT monitor logged during its window (lines
    after the log's size at the start), by kernel."""
    log = tmp_path / "server.log"
    line = ("(EngineCore pid=1) WARNING 12-07 14:48:38 [jit_monitor.py:135] Triton kernel JIT compilation during "
            "inference: {}. This causes a latency spike; consider extending warmup to cover this shape/config.\n")
    log.write_text(line.format("_merge_kernel") + "INFO other line\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write(line.format("_row_lse_kernel") + "INFO a step\n" + line.format("_merge_kernel"))
    assert serving.jit_compiles(log, offset) == ["_row_lse_kernel", "_merge_kernel"]
    assert serving.jit_compiles(log, log.stat().st_size) == []


def test_start_waves_pack_what_fits_side_by_side():
    args = serving.parse_args([])
    plans = serving.plan_servers(args.model, args.workloads, args.configs, [math.inf], args.max_num_seqs)
    h200 = 141 << 30
    names = [[p.kind for p in wave] for wave in serving.start_waves(plans, 3, h200)]
    assert names == [["plain", "plain-fp8", "plugin"]] * 2 + [["same-batch-plain"]]  # profiled: alone
    assert [len(w) for w in serving.start_waves(plans, 1, h200)] == [1] * 7
    assert [len(w) for w in serving.start_waves(plans, 3, None)] == [1] * 7  # memory unknown
    small = 80 << 30  # 90% of it holds two servers of ~30 GiB
    assert [len(w) for w in serving.start_waves(plans, 3, small)] == [2, 2, 2, 1]


def test_fit_wave_skips_what_does_not_fit(tmp_path):
    args = serving.parse_args(["--duration", "60", "--configs", "plain,snapkv@0.1,ems@0.1", "--workloads", "long-gen",
                               "--out", str(tmp_path / "s.json")])
    inv = serving.Invocation(args, "NVIDIA H200", tmp_path / "s.json")
    wave = serving.plan_servers(args.model, args.workloads, args.configs, [math.inf], 256)
    # start 100 s, plain: probe 30 + run 80; plugin: 80 a run -> 310 s hold the start, plain and one plugin run
    kept = serving.fit_wave(wave, inv, deadline=time.monotonic() + 310, start_estimate=100)
    assert [(p.kind, [r.config.label for r in p.runs]) for p in kept] == [("plain", ["plain"]),
                                                                          ("plugin", ["snapkv@0.1"])]
    skipped = [r for r in inv.records.values() if r["status"] == "skipped"]
    assert [r["config"] for r in skipped] == ["ems@0.1"] and "--time-limit" in skipped[0]["skip_reason"]


def test_a_results_file_of_another_device_is_refused(tmp_path):
    # records are keyed without the device: an H100 run into the H200 file would replace its rows
    out = tmp_path / "serving-h200.json"
    out.write_text(json.dumps({"meta": {"device": "NVIDIA H200", "runs": []}, "records": []}))
    args = serving.parse_args(["--configs", "plain", "--workloads", "kvcompress", "--out", str(out)])
    with pytest.raises(SystemExit, match="serving-h100.json"):
        serving.Invocation(args, "NVIDIA H100 80GB HBM3", out)
    assert serving.Invocation(args, "NVIDIA H200", out).records == {}


def test_ideal_output_tok_s_by_hand():
    ideal = serving.ideal_output_tok_s(requests=4, prompt_len=100, output_len=10, prefill_tok_s=1000.0,
                                       weight_bytes=1e9, kv_bytes_per_token=1000.0, pool_tokens=500.0,
                                       retained_tokens=200.0, max_num_seqs=8, copy_bytes_per_s=1e11)
    # the pool holds 2 requests of 200 tokens; a step reads 1e9 + 2 x 200 x 1000 bytes at 1e11 B/s = 10.004 ms;
    # prefill 400 tokens at 1000/s = 0.4 s; decode 4 x 10 tokens / 2 a step = 20 steps = 0.20008 s
    assert (ideal["batch"], ideal["step_ms"], ideal["prefill_s"], ideal["decode_s"]) == (2, 10.004, 0.4, 0.20008)
    assert ideal["output_tok_s"] == pytest.approx(40 / 0.60008, abs=1e-3)
    capped = serving.ideal_output_tok_s(requests=4, prompt_len=100, output_len=10, prefill_tok_s=1000.0,
                                        weight_bytes=1e9, kv_bytes_per_token=1000.0, pool_tokens=1e6,
                                        retained_tokens=200.0, max_num_seqs=3, copy_bytes_per_s=1e11)
    assert capped["batch"] == 3  # max_num_seqs, not the pool
    # plain keeps the prompt and on average half the outputs; the plugin its budget and half the slack;
    # both half a 16-token block of rounding
    assert serving.retained_tokens(2048, 8192, 1.0, None) == 2048 + 4096 + 8
    assert serving.retained_tokens(2048, 8192, 0.1, 64) == pytest.approx(204.8 + 32 + 8)
    assert serving.retained_tokens(2048, 16, 0.1, 64) == pytest.approx(204.8 + 8 + 8)


def test_weight_and_kv_bytes_of_llama3_8b():
    from common import decode_weight_bytes, kv_bytes_per_token

    shape = serving.SHAPES["llama3-8b"]
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert decode_weight_bytes(shape) == 2 * (32 * per_layer + 4096 + 128256 * 4096) == 15_009_849_344
    assert (kv_bytes_per_token(shape), kv_bytes_per_token(shape, "fp8")) == (131072, 65536)


def _event(kind, t, **fields):
    return {"kind": kind, "t": t, "pid": 1, **fields}


def test_step_breakdown_of_a_fake_event_log():
    steps = [  # (rows, tokens, interval, layout, compress, recompress, report, recompressed requests)
        (4, 4, 10.0, 1.0, 0.0, 0.0, 0.1, 0), (4, 4, 12.0, 1.0, 0.0, 6.0, 0.1, 2), (4, 4, 11.0, 2.0, 0.0, 0.0, 0.2, 0),
        (3, 515, 40.0, 3.0, 9.0, 0.0, 0.3, 0), (3, 600, 50.0, 5.0, 8.0, 2.0, 0.3, 1)]
    events = [_event("step_time", 100.0 + i, rows=r, tokens=t, graph=r == t, interval_ms=iv, layout_ms=lay,
                     compress_ms=c, recompress_ms=rc, report_ms=rep, recompressed_requests=n, in_place=i == 2)
              for i, (r, t, iv, lay, c, rc, rep, n) in enumerate(steps)]
    events.append(_event("step_time", 200.0, rows=1, tokens=1, graph=True, interval_ms=999.0, layout_ms=0.0,
                         compress_ms=0.0, recompress_ms=999.0, report_ms=0.0, recompressed_requests=9))  # after it
    events.append(_event("step", 101.5, free=10, requests=3))
    summary = serving.step_breakdown(events, 100.0, 110.0)
    assert (summary["steps"], summary["pure_decode_steps"], summary["with_prefill_steps"], summary["graph_steps"]) == \
        (5, 3, 2, 3)
    assert summary["in_place_steps"] == 1
    assert summary["interval_ms_median"] == {"pure_decode": 11.0, "with_prefill": 45.0}
    assert summary["layout_ms_median"] == {"pure_decode": 1.0, "with_prefill": 4.0}
    assert (summary["interval_ms_total"], summary["compress_ms_total"], summary["recompress_ms_total"]) == \
        (123.0, 17.0, 8.0)
    assert summary["report_ms_total"] == pytest.approx(1.0) and summary["recompressed_requests"] == 3
    assert summary["recompress_share"] == round(8.0 / 123.0, 5)
    # the pure-decode tick (12 ms) and the step after it (11 ms) over the median pure-decode step (11 ms);
    # the prefill step that recompressed is no tick of the decode
    assert summary["tick_wall_share"] == round(1.0 / 123.0, 5)
    # the one pure-decode tick's fields (absent ones count 0) and the step after it
    assert summary["tick_ms_median"] == {**{name: 0.0 for name in serving.TICK_FIELDS}, "interval_ms": 12.0,
                                         "recompress_ms": 6.0, "report_ms": 0.1, "next_interval_ms": 11.0}
    assert serving.step_breakdown([e for e in events if e["kind"] != "step_time"], 100.0, 110.0) is None


def test_compression_summary_of_a_fake_event_log():
    shape = serving.SHAPES["tiny"]  # 4 layers x 2 KV heads
    lens_a = [[30, 34]] * 4  # 256 of 8 x 300 rows
    lens_b = [[60, 60]] * 4  # 480 of 8 x 300
    events = [_event("compressed", 10.0, what="prefill", tokens=300, lens=lens_a, blocks_before=152, blocks_after=24),
              _event("compressed", 11.0, what="prefill", tokens=300, lens=lens_b, blocks_before=152, blocks_after=32),
              _event("compressed", 12.0, what="decode", tokens=364, lens=lens_a, blocks_before=40, blocks_after=24),
              _event("compressed", 99.0, what="prefill", tokens=300, lens=lens_a, blocks_before=152, blocks_after=1)]
    summary = serving.compression_summary(events, shape, 9.0, 20.0)
    assert summary["budget_fraction"] == round((256 / 2400 + 480 / 2400) / 2, 5)
    assert summary["blocks_kept_fraction"] == round(56 / 304, 5)
    assert (summary["prefill_compressions"], summary["decode_recompressions"]) == (2, 1)
    assert serving.compression_summary([], shape, 0, 1)["budget_fraction"] is None


def test_derived_ratios_and_ceiling_are_quotients():
    settings = {"requests": 4, "prompt_len": 100, "output_len": 10, "max_num_seqs": 8}

    def rec(config, tok_s, plugin=False, fraction=1.0, **extra):
        return {"model": "tiny", "workload": "w", "arrival": "all-at-once", "config": config, "plugin": plugin,
                "output_tok_s": tok_s, "settings": settings, "kv_pool_tokens": 512, "budget_fraction": fraction,
                "kv_cache_dtype": "auto", **extra}

    records = [rec("plain", 100.0, total_tok_s=1000.0), rec("plain-fp8", 125.0, kv_cache_dtype="fp8", kv_pool_tokens=1024),
               rec("same-batch-plain", 400.0),
               rec("snapkv@32", 150.0, plugin=True, fraction=0.1, decode_slack=64, total_tok_s=2600.0),
               dict(rec("streamingllm@0.1", 90.0, plugin=True), settings={**settings, "requests": 8}),
               rec("ems@0.1", None, plugin=True)]
    meta = {"copy_bandwidth": {"bytes_per_s": 1e10}, "prefill": {"tiny/w": {"prompt_tok_s": 5000.0, "source": "t"}}}
    serving.add_derived(records, meta)
    plain, fp8, same, snap, other, failed = records
    assert (plain["ratio_plain"], plain["ratio_fp8"], fp8["ratio_plain"], same["ratio_plain"]) == (1.0, None, 1.25, 4.0)
    assert (snap["ratio_plain"], snap["ratio_fp8"], snap["ratio_same_batch"]) == (1.5, 1.2, 0.375)
    # total tok/s, as KV-Compress reports its multipliers; none where a side has no total
    assert (snap["ratio_plain_total"], plain["ratio_plain_total"], fp8["ratio_plain_total"]) == (2.6, 1.0, None)
    assert (other["ratio_plain"], other["ratio_fp8"]) == (None, None)  # other settings: no reference
    assert "ratio_plain" not in failed and failed.get("ceiling_fraction") is None
    from common import decode_weight_bytes, kv_bytes_per_token

    shape = serving.SHAPES["tiny"]
    ideal = serving.ideal_output_tok_s(requests=4, prompt_len=100, output_len=10, prefill_tok_s=5000.0,
                                       weight_bytes=decode_weight_bytes(shape), kv_bytes_per_token=kv_bytes_per_token(shape),
                                       pool_tokens=512, retained_tokens=serving.retained_tokens(100, 10, 0.1, 64),
                                       max_num_seqs=8, copy_bytes_per_s=1e10)
    assert snap["ceiling"]["output_tok_s"] == ideal["output_tok_s"]
    assert snap["ceiling_fraction"] == round(150.0 / ideal["output_tok_s"], 4)
    assert fp8["ceiling"]["batch"] >= plain["ceiling"]["batch"]  # twice the tokens in the same bytes


def test_ratios_compare_runs_of_one_lease_whatever_options_plain_was_given():
    settings = {"requests": 4, "prompt_len": 100, "output_len": 10, "max_num_seqs": 8}

    def rec(config, tok_s, date, plugin=False, **options):
        return {"model": "tiny", "workload": "w", "arrival": "all-at-once", "config": config, "plugin": plugin,
                "output_tok_s": tok_s, "date": date, "settings": {**settings, "kv_options": options}}

    records = [rec("plain", 100.0, "2026-12-06 17:39:11 UTC"),  # run with the plugin's options: ignored
               rec("same-batch-plain", 300.0, "2026-12-06 17:46:40 UTC"),
               rec("plain-fp8", 200.0, "2026-12-06 14:30:00 UTC"),  # an earlier lease
               rec("snapkv@0.1", 450.0, "2026-12-06 17:42:43 UTC", plugin=True, reserve_decode_growth=True),
               rec("snapkv@0.1+fp8", 500.0, "2026-12-06 14:35:00 UTC", plugin=True, reserve_decode_growth=True)]
    records[0]["settings"]["kv_options"] = {"reserve_decode_growth": True}
    serving.add_derived(records, {})
    snap, fp8 = records[3], records[4]
    assert (snap["ratio_plain"], snap["ratio_same_batch"], snap["ratio_fp8"]) == (4.5, 1.5, None)
    assert (fp8["ratio_plain"], fp8["ratio_fp8"], fp8["ratio_bf16_policy"]) == (None, 2.5, None)
    assert serving.same_lease(records[0], records[1]) and not serving.same_lease(records[0], records[2])


def test_the_ideal_server_of_a_window_prefills_in_waves_and_stops_at_the_window():
    common = dict(prompt_len=100, prefill_tok_s=1000.0, weight_bytes=1e9, kv_bytes_per_token=1e6,
                  kept_prompt_tokens=100.0, decode_slack=None, max_num_seqs=8, copy_bytes_per_s=1e12)
    # everything finishes inside the window: every output counts, whatever the batch
    done = serving.ideal_window_output_tok_s(window_s=10.0, requests=4, output_len=10, pool_tokens=1e6, **common)
    assert (done["output_tok_s"], done["batch"], done["waves"]) == (4.0, 4, 1)
    # a pool that holds two requests at their start: waves of two, each prefilled before it decodes
    two = serving.ideal_window_output_tok_s(window_s=10.0, requests=4, output_len=10, pool_tokens=250.0, **common)
    assert (two["batch"], two["waves"], two["output_tok_s"]) == (2, 2, 4.0)
    # cut by the window: the first wave decodes until it ends, each step reading weights and KV
    cut = serving.ideal_window_output_tok_s(window_s=1.0, requests=4, output_len=100_000, pool_tokens=1e6, **common)
    step_s = (1e9 + 4 * (100 + 8 + cut["generated"] / 2) * 1e6) / 1e12  # about, the lengths grow
    assert cut["prefill_s"] == 0.4 and cut["generated"] == pytest.approx(0.6 / step_s, rel=0.02)
    assert cut["output_tok_s"] == pytest.approx(4 * cut["generated"], rel=1e-3)
    # with decode-time recompression a request holds at most decode_slack outputs: the pool keeps more
    slack = serving.ideal_window_output_tok_s(window_s=1.0, requests=8, output_len=100_000, pool_tokens=1000.0,
                                              **{**common, "decode_slack": 16})
    grow = serving.ideal_window_output_tok_s(window_s=1.0, requests=8, output_len=100_000, pool_tokens=1000.0, **common)
    assert slack["output_tok_s"] > grow["output_tok_s"] and slack["batch"] == grow["batch"] == 8


def test_compression_over_fp8_is_compared_with_the_same_policy_over_bf16():
    settings = {"requests": 4, "prompt_len": 100, "output_len": 10, "max_num_seqs": 8}

    def rec(config, tok_s, running, **extra):
        return {"model": "tiny", "workload": "w", "arrival": "all-at-once", "config": config, "plugin": True,
                "output_tok_s": tok_s, "peak_running": running, "settings": settings, **extra}

    records = [rec("snapkv@0.1", 100.0, 10), rec("snapkv@0.1+fp8", 150.0, 19, kv_cache_dtype="fp8"),
               rec("ems@0.1+fp8", 80.0, 7, kv_cache_dtype="fp8")]
    serving.add_derived(records, {})
    bf16, fp8, alone = records
    assert (fp8["ratio_bf16_policy"], fp8["running_ratio_bf16_policy"]) == (1.5, 1.9)
    assert "ratio_bf16_policy" not in bf16
    assert (alone["ratio_bf16_policy"], alone["running_ratio_bf16_policy"]) == (None, None)  # no ems@0.1 run
