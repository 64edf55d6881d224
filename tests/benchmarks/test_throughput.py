"""The throughput benchmark (benchmarks/throughput.py and its throughput_*.py modules): ``--quick`` end
to end on the CPU (two engine starts, plain vLLM and snapkv@32, each in its own subprocess), and its
pure helpers.

``--quick`` fixes the KV pool at 512 full-cache tokens (32 plain blocks; the plugin gets the same bytes
as 256 head-blocks of the 4-layer, 2-KV-head tiny model): one uncompressed 300-token request fits
(19 blocks), two do not, so plain vLLM runs the 4 requests one at a time. Compressed to 32 tokens
per head (+ 8 outputs: 3 head-blocks per head, 24 per request), 4 requests plus one prefilling fit,
so the plugin runs all 4 at once."""
import json
import shutil
import time

import benchmark_modules
import pytest

common = benchmark_modules.load("common")
throughput = benchmark_modules.load("throughput")
child = benchmark_modules.load("throughput_child")
results = benchmark_modules.load("throughput_results")
workloads = benchmark_modules.load("throughput_workloads")
RECORD_FIELDS = {"model", "workload", "config", "policy", "budget_fraction", "output_tok_s", "output_tok_s_ratio",
                 "total_tok_s", "peak_concurrency", "ttft_ms", "tpot_ms", "wall_s", "engine_start_s",
                 "kv_capacity_tokens", "kv_usage_peak", "kv_blocks_peak", "status", "settings", "engine_args"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(JSON path, data, seconds) of one ``--quick`` run."""
    out = tmp_path_factory.mktemp("throughput") / "throughput-quick.json"
    started = time.monotonic()
    data = throughput.main(["--quick", "--out", str(out), "--log-dir", str(out.parent / "logs")])
    return out, data, time.monotonic() - started


def _records(data):
    return {r["config"]: r for r in data["records"]}


@pytest.mark.slow
def test_quick_run_records_plain_and_plugin(quick_run):
    out, data, _ = quick_run
    assert json.loads(out.read_text())["records"] == data["records"]
    records = _records(data)
    assert set(records) == {"plain", "snapkv@32"}
    for r in records.values():
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert (r["model"], r["workload"], r["status"], r["requests"], r["completed"]) == ("tiny", "a", "ok", 4, 4)
        assert r["output_tokens"] == r["stats_generation_tokens"] == 4 * 8
        assert r["prompt_tokens"] == 4 * 300
        assert r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"]
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"], rel=0.01)  # wall_s is rounded
        assert r["engine_start_s"] > 0 and r["child_s"] > r["engine_start_s"]
        for key in ("ttft_ms", "tpot_ms"):
            p = r[key]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        assert r["kv_capacity_tokens"] == 512  # the same memory for both
        assert r["engine_args"]["enable_prefix_caching"] is False
        assert 0 < r["kv_usage_peak"] <= 1
    plain, snap = records["plain"], records["snapkv@32"]
    assert (plain["policy"], plain["budget_fraction"], plain["compression"]) == ("none", 1.0, None)
    assert snap["compression"]["policy"] == "snapkv" and snap["compression"]["budget"] == 32
    # identical engine arguments apart from the plugin's pool being counted in head-blocks
    differ = {k for k in plain["engine_args"] if plain["engine_args"][k] != snap["engine_args"][k]}
    assert differ == {"num_gpu_blocks_override"}
    assert (plain["engine_args"]["num_gpu_blocks_override"], snap["engine_args"]["num_gpu_blocks_override"]) == (32, 256)
    assert (plain["kv_blocks_total"], snap["kv_blocks_total"]) == (32, 256)


@pytest.mark.slow
def test_quick_ratio_and_concurrency(quick_run):
    _, data, _ = quick_run
    records = _records(data)
    plain, snap = records["plain"], records["snapkv@32"]
    assert plain["output_tok_s_ratio"] == 1.0
    assert snap["output_tok_s_ratio"] == pytest.approx(snap["output_tok_s"] / plain["output_tok_s"], abs=1e-4)
    assert snap["ratio_reference"] == plain["ratio_reference"]  # the plain run of this invocation
    assert plain["date"] in snap["ratio_reference"]
    # KV-bound on purpose: plain holds one request at a time, compressed requests share the pool
    assert plain["peak_concurrency"] == 1
    assert snap["peak_concurrency"] >= 3 > plain["peak_concurrency"]
    assert snap["plugin_peak_requests"] >= snap["peak_concurrency"]
    assert snap["compressions"] == 4 and snap["blocks_returned"] > 0
    assert snap["budget_fraction"] == pytest.approx(32 / 300, abs=1e-4)
    assert snap["retained_fraction"] == pytest.approx(32 / 300, abs=0.005)  # 32 rows per (layer, head)


@pytest.mark.slow
def test_quick_run_header_plot_and_resume(quick_run):
    out, data, seconds = quick_run
    meta = data["meta"]
    assert "--quick" in meta["command"] and meta["date"] and meta["device"].startswith("CPU")
    assert {"vllm", "torch", "triton", "python"} <= set(meta["versions"])
    assert meta["settings"]["gpu_memory_utilization"] == 0.15
    assert seconds < 420  # two engine starts: ~100 s on 2 idle CPU cores, up to ~220 s on busy ones
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # resume: everything is in the JSON with the same settings, so nothing runs again
    copy = out.with_name("resumed.json")
    shutil.copy(out, copy)
    started = time.monotonic()
    again = throughput.main(["--quick", "--out", str(copy), "--log-dir", str(out.parent / "logs2")])
    assert time.monotonic() - started < 30
    assert again["records"] == data["records"]
    assert len(again["meta"]["runs"]) == len(meta["runs"]) + 1


@pytest.mark.slow
def test_shared_engine_runs_each_configuration_with_its_own_options(tmp_path):
    """``--share-engine``: one engine start for snapkv@32 and @64; each run's requests carry their
    budget, so the second keeps twice the rows although the engine was started with 32."""
    out = tmp_path / "shared.json"
    data = throughput.main(["--quick", "--configs", "snapkv@32,snapkv@64", "--share-engine", "--out", str(out),
                            "--log-dir", str(tmp_path / "logs")])
    records = _records(data)
    small, large = records["snapkv@32"], records["snapkv@64"]
    for r in (small, large):
        assert (r["status"], r["completed"], r["output_tokens"]) == ("ok", 4, 4 * 8)
        assert r["shared_engine"] == ["snapkv@32", "snapkv@64"] and r["compressions"] == 4
        assert r["plugin_peak_requests"] >= r["peak_concurrency"] >= 1  # this run's own peak
    assert small["engine_start_s"] == large["engine_start_s"]
    assert (small["compression"]["budget"], large["compression"]["budget"]) == (32, 64)
    assert small["retained_fraction"] == pytest.approx(32 / 300, abs=0.01)
    assert large["retained_fraction"] == pytest.approx(64 / 300, abs=0.01)
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1  # one engine


@pytest.mark.slow
def test_a_run_past_its_deadline_stops_at_once_and_the_engine_serves_the_next(tmp_path):
    """``measure_offline`` past its deadline aborts what is still running (``LLM.enqueue`` returns
    vLLM's internal request ids: aborting them as external ids does nothing, and the run would go on
    to the end), so a partial run counts only the tokens made before the stop and leaves the engine
    empty for the next run of a shared engine."""
    from vllm import LLM, SamplingParams

    args = throughput.parse_args(["--quick", "--configs", "plain"])
    model_dir = common.build_model_dir("tiny", tmp_path / "models")
    spec = throughput.make_spec(args, "tiny", model_dir, workloads.QUICK_WORKLOADS["a"], args.configs,
                                tmp_path, timeout=100)
    llm = LLM(model=spec["model_dir"], tokenizer=spec["tokenizer_dir"], disable_log_stats=False,
              **child.engine_kwargs(spec))
    stats = child.StepStats().install(llm.llm_engine.logger_manager)
    prompts = child.random_prompts(4, 100, spec["shape"]["vocab_size"], seed=0)
    long = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    stopped = child.measure_offline(llm.llm_engine, llm, prompts, long, stats, "t", deadline=0.0)
    assert (stopped["status"], stopped["completed"]) == ("partial", 0)
    assert 0 < stopped["output_tokens"] < 4 * 300 // 10  # not run to the end after the "abort"
    assert not llm.llm_engine.has_unfinished_requests()
    stats.reset()
    short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    after = child.measure_offline(llm.llm_engine, llm, prompts, short, stats, "t", deadline=float("inf"))
    assert (after["status"], after["completed"], after["output_tokens"]) == ("ok", 4, 4 * 5)


def test_engine_groups_share_only_plugin_runs_of_one_offline_workload_and_graph_mode():
    a, c, d = (workloads.WORKLOADS[w] for w in "acd")
    snap, ada, plain, graphs = (workloads.parse_config(x) for x in ("snapkv@0.1", "adakv@0.1", "plain",
                                                                       "snapkv@0.1+graphs"))
    todo = [("m", a, plain), ("m", a, snap), ("m", a, ada), ("m", a, graphs), ("m", c, snap), ("m", c, ada),
            ("m", d, snap), ("m", d, ada), ("n", c, snap)]
    labels = [[(item[1].name, item[2].label) for item in g] for g in throughput.engine_groups(todo, share=True)]
    assert labels == [[("a", "plain")], [("a", "snapkv@0.1"), ("a", "adakv@0.1")], [("a", "snapkv@0.1+graphs")],
                      [("c", "snapkv@0.1"), ("c", "adakv@0.1")], [("d", "snapkv@0.1")], [("d", "adakv@0.1")],
                      [("c", "snapkv@0.1")]]
    assert [len(g) for g in throughput.engine_groups(todo, share=False)] == [1] * len(todo)


# ---- helpers (no engine) ---------------------------------------------------------------------------


def test_parse_config():
    c = workloads.parse_config("snapkv@0.1")
    assert (c.label, c.policy, c.budget, c.plugin) == ("snapkv@0.1", "snapkv", 0.1, True)
    assert c.budget_fraction(16384) == 0.1
    t = workloads.parse_config("adakv@256")
    assert (t.budget, t.budget_fraction(1024)) == (256, 0.25)
    p = workloads.parse_config("plain")
    assert (p.policy, p.plugin, p.budget_fraction(100), p.v1_runner) == ("none", False, 1.0, False)
    assert workloads.parse_config("plain-v1").v1_runner
    g = workloads.parse_config("ems@0.1+graphs")
    assert (g.label, g.policy, g.budget, g.graphs, c.graphs) == ("ems@0.1+graphs", "ems", 0.1, True, False)
    assert workloads.compression_options(g, {})["cuda_graphs"] is True
    assert workloads.compression_options(c, {})["cuda_graphs"] is False  # not the plugin's default (None)
    with pytest.raises(ValueError, match=r"\+graphs"):
        workloads.compression_options(c, {"cuda_graphs": True})
    for bad in ("snapkv", "nosuch@0.1", "snapkv@1.5", "snapkv@-3", "none@0.1", "snapkv@0.1+fast"):
        with pytest.raises(ValueError):
            workloads.parse_config(bad)


def test_parse_args_orders_plain_first_and_validates():
    args = throughput.parse_args(["--configs", "snapkv@0.1,plain,snapkv@0.1", "--workloads", "a,b"])
    assert [c.label for c in args.configs] == ["plain", "snapkv@0.1"]
    assert (args.requests, args.gpu_memory_utilization, args.max_num_seqs, args.kv_pool_tokens) == (64, 0.85, 256, None)
    quick = throughput.parse_args(["--quick"])
    assert [c.label for c in quick.configs] == ["plain", "snapkv@32"] and quick.enforce_eager
    with pytest.raises(SystemExit):
        throughput.parse_args(["--workloads", "z"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--kv-options", '{"nosuch": 1}', "--configs", "snapkv@0.1"])


def test_workload_lengths():
    wl = workloads.WORKLOADS
    assert (wl["a"].prompt_len, wl["a"].output_len, wl["a"].max_model_len) == (16384, 1024, 17408)
    assert (wl["b"].prompt_len, wl["b"].output_len, wl["b"].max_model_len) == (32768, 512, 33280)
    assert (wl["c"].prompt_len, wl["c"].output_len, wl["c"].max_model_len) == (2048, 8192, 10240)
    assert wl["d"].served and wl["d"].max_model_len == 12288 + 768
    assert workloads.QUICK_WORKLOADS["a"].max_model_len == 384


def test_percentiles():
    p = child.percentiles([0.4, 0.1, 0.3, 0.2, 0.5], scale=1000)
    assert (p["p50"], p["mean"]) == (300.0, 300.0)
    assert p["p90"] == pytest.approx(460.0) and p["p99"] == pytest.approx(496.0)
    assert child.percentiles([]) is None


def test_ratios_need_plain_with_the_same_settings():
    def rec(config, tok_s, settings, date="d1"):
        return {"model": "m", "workload": "a", "config": config, "output_tok_s": tok_s, "settings": settings,
                "date": date, "status": "ok", "peak_concurrency": 2}

    records = [rec("plain", 100.0, {"x": 1}), rec("snapkv@0.1", 150.0, {"x": 1}), rec("snapkv@0.25", 90.0, {"x": 2})]
    results.add_ratios(records)
    assert [r["output_tok_s_ratio"] for r in records] == [1.0, 1.5, None]
    assert records[1]["ratio_reference"].startswith("plain run of d1")


def test_model_dirs_have_the_shapes_and_a_full_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    path = common.build_model_dir("qwen2-7b", tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["hidden_size"], config["intermediate_size"]) == (28, 28, 4, 3584, 18944)
    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))  # as vLLM loads it (--tokenizer)
    assert len(tok) == config["vocab_size"] == 152064
    ids = [3, 77, 152063]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids  # random prompts round-trip
    llama_dir = common.build_model_dir("llama3-8b", tmp_path)
    llama = json.loads((llama_dir / "config.json").read_text())
    assert (llama["num_hidden_layers"], llama["num_key_value_heads"], llama["head_dim"], llama["rope_theta"],
            llama["vocab_size"], llama["torch_dtype"]) == (32, 8, 128, 500000.0, 128256, "bfloat16")


def test_prompts_pass_the_servers_character_bound(tmp_path):
    """vLLM's front end refuses, untokenized, a prompt longer than max input tokens x its longest
    vocabulary entry: our longest words plus their spaces must stay under that bound."""
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(str(common.build_model_dir("llama3-8b", tmp_path) / "tokenizer"))
    ids = list(range(128256 - 1000, 128256))  # the longest words
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert len(text) <= len(ids) * tok.max_chars_per_token


def test_device_slug():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.device_slug("NVIDIA H200") == "h200"
    assert common.device_slug("CPU, 2 cores") == "cpu"


def test_kv_summary_counts_the_same_bytes_for_both():
    shape = common.SHAPES["llama3-8b"]
    plain = child.kv_summary({"shape": shape, "compression": None}, 1000, 16, 0.5, 0.25)
    plugin = child.kv_summary({"shape": shape, "compression": {"policy": "snapkv"}}, 1000 * 32 * 8, 16, 0.5, 0.25)
    assert plain["kv_block_bytes"] == 16 * 32 * 8 * 128 * 2 * 2  # 2 MiB per 16 tokens of Llama-3-8B
    assert plain["kv_pool_gib"] == plugin["kv_pool_gib"] and plain["kv_capacity_tokens"] == plugin["kv_capacity_tokens"]
    assert plain["kv_blocks_peak"] == 500 and plugin["kv_gib_peak"] == plain["kv_gib_peak"]
