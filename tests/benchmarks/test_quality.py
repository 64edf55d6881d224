"""The quality benchmark (benchmarks/quality.py) end to end in --quick mode, its aggregation, and the
prefill-once API of vllm_kvcompress.reference.hf it is built on."""
import json
import math
import shutil

import benchmark_modules
import pytest
import torch

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import PRESET_NAMES, CompressionConfig
from vllm_kvcompress.policies.observation import PREFILL_SIGNALS
from vllm_kvcompress.tools.models import tiny_llama
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.policies.registry import REDUCERS
from vllm_kvcompress.tools.synthetic import make_sample



quality = benchmark_modules.load("quality")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(JSON path, data) of one ``--quick`` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("quality") / "quality-quick.json"
    data = quality.main(["--quick", "--out", str(out), "--export-prompts", str(out.with_name("prompts.json"))])
    return out, data


def test_exported_prompts_are_the_benchmarked_ones(quick_run):
    out, data = quick_run
    exported = json.loads(out.with_name("prompts.json").read_text())
    tokenizer = quality.ByteTokenizer()
    prompts = {(p["task"], p["sample"]): p for p in exported["prompts"]}
    assert set(prompts) == {(r["task"], r["sample"]) for r in data["samples"]}
    sample = make_sample("niah_single", tokenizer, 384, seed=0, depth=quality.DEFAULT_DEPTHS[0])
    prompt = prompts[("niah_single", 0)]
    assert prompt["prompt_ids"] == sample.prompt_ids(tokenizer)[0].tolist()
    assert prompt["context_len"] == sample.context_len(tokenizer) < len(prompt["prompt_ids"])
    assert tokenizer.decode(prompt["answer_ids"]) == sample.answers[0] == prompt["answers"][0]
    assert sample.question in tokenizer.decode(prompt["prompt_ids"][prompt["context_len"]:])
    ppl = prompts[(quality.PERPLEXITY, 0)]
    assert ppl["context_len"] is None and len(ppl["continuation_ids"]) == 32


def test_merge_adds_other_policies_and_replaces_their_earlier_rows(quick_run, tmp_path):
    out, data = quick_run
    target = tmp_path / "merged.json"
    shutil.copy(out, target)
    reference = [dict(r) for r in data["records"] if r["policy"] == "snapkv"]
    other = {"meta": {"command": "kvpress run 1"}, "records": [dict(r, policy="kvpress:SnapKVPress") for r in reference]}
    first = tmp_path / "kvpress-1.json"
    first.write_text(json.dumps(other))
    merged = quality.main(["--plot", str(target), "--merge", str(first)])
    rows = [r for r in merged["records"] if r["policy"] == "kvpress:SnapKVPress"]
    assert len(rows) == len(reference) and len(merged["records"]) == len(data["records"]) + len(reference)
    assert {(a["setting"], a["policy"]) for a in merged["averages"]} >= {(s, "kvpress:SnapKVPress") for s in quality.SETTINGS}
    again = {"meta": {"command": "kvpress run 2"}, "records": [dict(r, score=0.0) for r in rows]}
    second = tmp_path / "kvpress-2.json"
    second.write_text(json.dumps(again))
    merged = quality.main(["--plot", str(target), "--merge", str(second)])  # a rerun replaces, never doubles
    rows = [r for r in merged["records"] if r["policy"] == "kvpress:SnapKVPress"]
    assert len(rows) == len(reference) and all(r["score"] == 0.0 for r in rows)
    assert [m["meta"]["command"] for m in merged["merged"]] == ["kvpress run 2"]
    assert json.loads(target.read_text())["merged"] == merged["merged"]


def test_merge_adds_the_tasks_of_another_run_with_their_full_cache_records(quick_run, tmp_path):
    # a run on more tasks (the same prompts' seeds) extends the grid; the full-cache records the
    # target has stay even where the other run has its own
    out, data = quick_run
    target = tmp_path / "merged.json"
    shutil.copy(out, target)
    task = data["records"][0]["task"]
    extra = [dict(r, task="extra_task") for r in data["records"] if r["task"] == task]
    full_again = [dict(r, score=-1.0) for r in data["records"] if r["policy"] == quality.FULL]
    other = tmp_path / "more-tasks.json"
    other.write_text(json.dumps({"meta": {"command": "more tasks"}, "records": extra + full_again}))
    merged = quality.main(["--plot", str(target), "--merge", str(other)])
    assert len(merged["records"]) == len(data["records"]) + len(extra)
    assert {r["policy"] for r in merged["records"] if r["task"] == "extra_task"} == {r["policy"] for r in extra}
    assert all(r["score"] != -1.0 for r in merged["records"])
    assert all("extra_task" in a["likelihood_tasks"] for a in merged["averages"])
    assert merged["merged"][-1]["tasks"] == sorted({"extra_task"} | {r["task"] for r in full_again})


def test_quick_run_has_one_record_per_task_setting_policy_budget(quick_run):
    out, data = quick_run
    on_disk = json.loads(out.read_text())
    assert on_disk["records"] == data["records"]
    assert on_disk["skipped"] == []  # --quick writes stand-in head scores, so HeadKV runs too
    keys = [(r["task"], r["setting"], r["policy"], r["budget_fraction"]) for r in data["records"]]
    assert len(keys) == len(set(keys))
    assert data["config"]["settings"] == list(quality.SETTINGS)
    expected = {(task, setting, quality.FULL, quality.FULL_BUDGET)
                for task in data["config"]["tasks"] for setting in quality.SETTINGS}
    expected |= {
        (task, setting, policy, budget)
        for task in data["config"]["tasks"]
        for setting in quality.SETTINGS
        for policy in PRESET_NAMES
        if policy != quality.FULL
        for budget in quality.DEFAULT_BUDGETS
    }
    assert set(keys) == expected
    assert quality.PERPLEXITY in data["config"]["tasks"]


def test_quick_settings_compress_what_they_say(quick_run):
    """question-aware compresses the whole prompt, question-agnostic the context before the question;
    with the full cache both are the same computation (the question fed whole, in one block, or in
    the prefill), so their answer likelihoods agree; perplexity has no question: one result, twice."""
    _, data = quick_run
    by_key = {(r["task"], r["setting"], r["policy"], r["budget_fraction"]): r for r in data["records"]}
    for task in data["config"]["tasks"]:
        aware = by_key[(task, quality.AWARE, quality.FULL, quality.FULL_BUDGET)]
        agnostic = by_key[(task, quality.AGNOSTIC, quality.FULL, quality.FULL_BUDGET)]
        if task == quality.PERPLEXITY:
            for budget in quality.DEFAULT_BUDGETS:
                a, b = by_key[(task, quality.AWARE, "snapkv", budget)], by_key[(task, quality.AGNOSTIC, "snapkv", budget)]
                assert a["perplexity"] == b["perplexity"]
            continue
        assert agnostic["answer_prob"] == pytest.approx(aware["answer_prob"], rel=1e-3)
        assert agnostic["compressed_tokens"] < aware["compressed_tokens"] == aware["prompt_tokens"]
        assert aware["prompt_tokens"] - agnostic["compressed_tokens"] > 20  # the question and the template's tail
    # 8 KV-head slots of 2 KV heads serve 4 query heads: the per-query-head fraction is half
    assert data["config"]["query_heads_per_kv_head"] == 2
    assert all(r["budget_fraction_per_query_head"] == pytest.approx(r["budget_fraction"] / 2) for r in data["records"])


def test_quick_records_are_consistent(quick_run):
    _, data = quick_run
    fields = {"task", "setting", "policy", "budget_fraction", "budget_fraction_per_query_head", "score", "full_score",
              "relative_score", "num_samples", "context_tokens"}
    for record in data["records"]:
        assert fields <= set(record)
        assert record["num_samples"] == 1
        assert record["context_tokens"] == 384
        if record["full_score"] == 0:
            assert record["relative_score"] is None
        else:
            assert record["relative_score"] == pytest.approx(record["score"] / record["full_score"])
        if record["task"] == quality.PERPLEXITY:
            assert record["score"] == pytest.approx(1 / record["perplexity"])
            assert record["full_score"] == pytest.approx(1 / record["full_perplexity"])
        if record["task"] != quality.PERPLEXITY:
            likelihood = record["answer_prob"] / record["full_answer_prob"]
            assert record["relative_likelihood"] == pytest.approx(likelihood) and 0 < record["answer_prob"] <= 1
        if record["policy"] == quality.FULL:
            assert record["score"] == record["full_score"] and record["retained_fraction"] == 1.0
            assert record["relative_likelihood"] == 1.0
        else:
            # what was kept: the budget, or the observation window (8 here) + sinks where that is more
            config = CompressionConfig(policy=record["policy"], headkv_scores="x")
            floor = (8 + config.effective_sink) / record["compressed_tokens"]
            target = max(record["budget_fraction"], floor)
            if REDUCERS.build(config.reducer_name, config.part_options("reducer")).fills_budgets:
                assert record["retained_fraction"] == pytest.approx(target, abs=0.01)
            else:  # whole windows of 8: up to 7 tokens a head below the budget
                slack = 7 / record["compressed_tokens"]
                assert target - slack - 0.01 <= record["retained_fraction"] <= target + 0.01


def test_quick_run_records_how_it_ran_and_plots(quick_run):
    out, data = quick_run
    meta = data["meta"]
    assert "--quick" in meta["command"] and meta["date"] and meta["runtime_s"] > 0
    assert meta["device"].startswith("CPU") and {"python", "torch", "transformers"} <= set(meta["versions"])
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # averages: the mean relative score over the tasks where it is defined, the likelihood over all
    for row in data["averages"]:
        key = lambda r: (r["setting"], r["policy"], r["budget_fraction"])  # noqa: E731
        group = [r for r in data["records"] if key(r) == key(row)]
        defined = [r["relative_score"] for r in group if r["relative_score"] is not None]
        assert row["relative_score"] == pytest.approx(sum(defined) / len(defined))
        assert row["relative_likelihood"] == pytest.approx(sum(r["relative_likelihood"] for r in group) / len(group))
        assert row["likelihood_tasks"] == sorted(data["config"]["tasks"])


def test_resume_runs_only_what_is_missing(quick_run, tmp_path):
    source, _ = quick_run
    out = tmp_path / "resumed.json"
    shutil.copy(source, out)
    partial = json.loads(out.read_text())
    kept = [r for r in partial["samples"] if r["policy"] != "snapkv"]
    dropped = len(partial["samples"]) - len(kept)
    assert dropped > 0
    partial["samples"] = kept
    out.write_text(json.dumps(partial))
    data = quality.main(["--quick", "--out", str(out), "--resume"])
    before = {quality.sample_key(r): r for r in kept}
    after = {quality.sample_key(r): r for r in data["samples"]}
    assert len(after) == len(kept) + dropped
    assert all(after[k] == r for k, r in before.items())  # kept results untouched (timings included)
    assert {k[3] for k in set(after) - set(before)} == {"snapkv"}
    assert len(data["meta"]["runs"]) == len(partial["meta"]["runs"]) + 1


def test_resume_refuses_a_different_configuration(quick_run, tmp_path):
    source, _ = quick_run
    out = tmp_path / "other.json"
    shutil.copy(source, out)
    with pytest.raises(SystemExit, match="--resume"):
        quality.main(["--quick", "--out", str(out), "--resume", "--context-tokens", "256"])


def test_an_fp8_cache_run_is_a_configuration_of_its_own(quick_run, tmp_path):
    """--kv-cache-dtype fp8 runs every policy over the emulated fp8 cache (hf.prefill's options);
    its fingerprint says so, so --resume never mixes it with results over model-dtype rows."""
    source, _ = quick_run
    out = tmp_path / "auto.json"
    shutil.copy(source, out)
    with pytest.raises(SystemExit, match="--resume"):
        quality.main(["--quick", "--out", str(out), "--resume", "--kv-cache-dtype", "fp8"])
    data = quality.main(["--quick", "--out", str(tmp_path / "fp8.json"), "--kv-cache-dtype", "fp8", "--kv-scale", "0.05",
                         "--policies", "snapkv", "--budgets", "0.2", "--tasks", "niah_single", "--ppl-chunks", "0"])
    assert data["config"]["fingerprint"]["kv_cache"] == {"kv_cache_dtype": "fp8", "k_scale": 0.05, "v_scale": 0.05}
    assert {r["policy"] for r in data["records"]} == {quality.FULL, "snapkv"}


def test_calibrated_fp8_scales_follow_vllms_calculate_kv_scales_rule(tmp_path):
    """--kv-scale calibrate: one K and one V scale per layer, max |row| / 200 (K) and / 100 (V) of
    the first prompt's cached rows -- the fingerprint holds them, so a calibrated run is its own."""
    from vllm_kvcompress.reference.hf import prefill
    from vllm_kvcompress.tools.models import tiny_llama

    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512)
    job = quality.synthetic_jobs(quality.ByteTokenizer(), ["niah_single"], 1, 384, [0.5])[0]
    k_scale, v_scale = quality.calibrated_scales(model, job)
    observations = prefill(model, job.prompt_ids).observations
    assert len(k_scale) == len(v_scale) == 2
    for layer, obs in enumerate(observations):
        assert k_scale[layer] == pytest.approx(obs.keys.abs().max().item() / 200, rel=1e-4)
        assert v_scale[layer] == pytest.approx(obs.values.abs().max().item() / 100, rel=1e-4)
    data = quality.main(["--quick", "--out", str(tmp_path / "fp8.json"), "--kv-cache-dtype", "fp8", "--kv-scale",
                         "calibrate", "--policies", "snapkv", "--budgets", "0.2", "--tasks", "niah_single",
                         "--ppl-chunks", "0"])
    stored = data["config"]["fingerprint"]["kv_cache"]
    assert len(stored["k_scale"]) == len(stored["v_scale"]) == 2 and stored["k_scale"] != stored["v_scale"]


def _result(task, sample, policy, budget, score=None, nll=None, answer_nll=None):
    return {
        "task": task, "sample": sample, "policy": policy, "budget_fraction": budget, "score": score, "nll": nll,
        "answer_nll": answer_nll, "depth": None, "prompt_tokens": 100, "retained_fraction": budget,
    }


def test_aggregate_relative_scores():
    full, budget = quality.FULL_BUDGET, 0.1
    results = [
        _result("niah_single", 0, "none", full, score=1.0, answer_nll=0.5),
        _result("niah_single", 1, "none", full, score=0.0, answer_nll=1.5),
        _result("niah_single", 0, "snapkv", budget, score=0.0, answer_nll=2.0),
        _result("niah_single", 1, "snapkv", budget, score=1.0, answer_nll=1.0),
        _result("common_words", 0, "none", full, score=0.0, answer_nll=4.0),
        _result("common_words", 0, "snapkv", budget, score=0.3, answer_nll=3.0),
        _result("perplexity", 0, "none", full, nll=2.0),
        _result("perplexity", 1, "none", full, nll=3.0),
        _result("perplexity", 0, "snapkv", budget, nll=2.5),
        _result("perplexity", 1, "snapkv", budget, nll=3.5),
        _result("niah_multikey", 0, "snapkv", budget, score=1.0),  # no full-cache result: left out
    ]
    records = {(r["task"], r["policy"]): r for r in quality.aggregate(results, context_tokens=100)}
    assert ("niah_multikey", "snapkv") not in records
    niah = records[("niah_single", "snapkv")]
    assert (niah["score"], niah["full_score"], niah["relative_score"], niah["num_samples"]) == (0.5, 0.5, 1.0, 2)
    assert niah["answer_prob"] == pytest.approx(math.exp(-1.5)) and niah["full_answer_prob"] == pytest.approx(math.exp(-1.0))
    assert niah["relative_likelihood"] == pytest.approx(math.exp(-0.5))
    words = records[("common_words", "snapkv")]
    assert words["relative_score"] is None  # full cache scored 0 ...
    assert words["relative_likelihood"] == pytest.approx(math.exp(1.0))  # ... the likelihood is still comparable
    ppl = records[("perplexity", "snapkv")]
    assert ppl["perplexity"] == pytest.approx(math.exp(3.0)) and ppl["full_perplexity"] == pytest.approx(math.exp(2.5))
    assert ppl["relative_score"] == pytest.approx(math.exp(2.5) / math.exp(3.0)) == ppl["relative_likelihood"]
    averages = {(a["policy"], a["budget_fraction"]): a for a in quality.averages(list(records.values()))}
    snap = averages[("snapkv", budget)]
    assert snap["tasks"] == ["niah_single", "perplexity"]
    assert snap["relative_score"] == pytest.approx((1.0 + math.exp(-0.5)) / 2)
    assert snap["likelihood_tasks"] == ["common_words", "niah_single", "perplexity"]
    assert snap["relative_likelihood"] == pytest.approx((math.exp(1.0) + math.exp(-0.5) + math.exp(-0.5)) / 3)


def test_byte_tokenizer_round_trips_and_sizes_synthetic_prompts():
    tokenizer = quality.ByteTokenizer()
    text = "VAR ABCDE = 12345. naïve"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == text
    sample = make_sample("niah_single", tokenizer, context_tokens=512, seed=0, depth=0.5)
    assert sample.answers[0] in tokenizer.decode(sample.prompt_ids(tokenizer)[0].tolist())


# --- the prefill-once API of vllm_kvcompress.reference.hf -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A random tiny GQA Llama, one prompt, and stand-in HeadKV scores for it."""
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
    prompt = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(0))
    return model, prompt


def _policy(name, tmp_path_factory, **options):
    if name.startswith("headkv"):
        path = tmp_path_factory.getbasetemp() / "tiny-head-scores.json"
        if not path.exists():
            quality.quick_head_scores(path, num_layers=3, num_kv_heads=2)
        options["headkv_scores"] = str(path)
    return build_policy(name, **options)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_generate_from_shared_prefill_matches_generate(tiny, tmp_path_factory, name):
    model, prompt = tiny
    policy = _policy(name, tmp_path_factory, budget=0.2, window=16)
    prefilled = hf.prefill(model, prompt, window=32, signals=PREFILL_SIGNALS)  # serves every policy
    snapshot = [(o.keys.clone(), o.values.clone(), o.window_queries.clone()) for o in prefilled.observations]
    shared = hf.generate_from_prefill(model, prefilled, policy, max_new_tokens=24, recompress_slack=2)
    alone = hf.generate(model, prompt, policy, max_new_tokens=24, recompress_slack=2)
    assert shared.tokens == alone.tokens
    assert torch.equal(shared.retained_per_layer, alone.retained_per_layer)
    assert torch.equal(shared.final_per_layer, alone.final_per_layer)
    assert shared.recompressions == alone.recompressions
    for o, (k, v, q) in zip(prefilled.observations, snapshot):  # reusable: nothing was written into it
        assert torch.equal(o.keys, k) and torch.equal(o.values, v) and torch.equal(o.window_queries, q)


def test_context_view_is_a_prefill_of_the_context_alone(tiny):
    """prefill(..., context_len=n).context holds what prefilling the first n tokens alone gives:
    their keys and values, their own last window queries, their own causal column mass, the
    prediction after token n; and the full view's column mass is still the whole prompt's."""
    model, prompt = tiny
    both = hf.prefill(model, prompt, window=16, signals=PREFILL_SIGNALS, context_len=120)
    alone = hf.prefill(model, prompt[:, :120], window=16, signals=PREFILL_SIGNALS)
    whole = hf.prefill(model, prompt, window=16, signals=PREFILL_SIGNALS)
    assert both.context.prompt_len == 120 and both.prompt_len == prompt.shape[1]
    for view, reference in ((both.context, alone), (both, whole)):
        for o, r in zip(view.observations, reference.observations):
            for name in ("keys", "values", "window_queries", "global_attention"):
                torch.testing.assert_close(getattr(o, name), getattr(r, name), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(view.logits, reference.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="context_len"):
        hf.prefill(model, prompt, window=16, context_len=8)


@pytest.mark.parametrize("name", ["none", "adakv", "ems"])
def test_uncompressed_tokens_in_one_block_equal_decoding_them_one_by_one(tiny, name):
    """Feeding the question whole after compressing the context (question-agnostic) appends its
    keys/values to every head and predicts what feeding it token by token through decode does."""
    model, prompt = tiny
    policy = None if name == "none" else build_policy(name, budget=0.2, window=16)
    context = hf.prefill(model, prompt, window=16, signals=PREFILL_SIGNALS, context_len=120).context
    question = prompt[:, 120:]
    block, _ = hf._decode_session(model, context, policy)
    block_logits = hf._feed_uncompressed(model, block, question, 120)
    steps, _ = hf._decode_session(model, context, policy)
    for i in range(question.shape[1]):
        step_logits = hf._feed_uncompressed(model, steps, question[:, i : i + 1], 120 + i)
    torch.testing.assert_close(block_logits, step_logits, atol=1e-4, rtol=1e-4)
    for i, layer in block.layers.items():
        other = steps.layers[i]
        assert torch.equal(layer.lengths, other.lengths)
        mask = layer.valid_mask()[..., None]
        torch.testing.assert_close(layer.keys * mask, other.keys * mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block.recent_queries[i], steps.recent_queries[i], atol=1e-5, rtol=1e-5)
    if policy is not None:
        assert any(not layer.uniform for layer in block.layers.values()) or name == "ems"
    # the public API: with the full cache, compressing nothing then asking = the whole prompt's prefill
    if policy is None:
        full = hf.prefill(model, prompt, window=16)
        answer = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
        asked = hf.continuation_logprobs(model, context, None, answer, uncompressed_ids=question)
        torch.testing.assert_close(asked.logprobs, hf.continuation_logprobs(model, full, None, answer).logprobs,
                                   atol=1e-4, rtol=1e-4)
        tokens = hf.generate_from_prefill(model, context, None, 12, uncompressed_ids=question)
        assert tokens.tokens == hf.generate_from_prefill(model, full, None, 12).tokens
        assert tokens.prompt_len == 120


def test_a_policy_compresses_a_prefill_once_for_generation_and_scoring(tiny, monkeypatch):
    model, prompt = tiny
    prefilled = hf.prefill(model, prompt, window=16)
    policy, other = build_policy("adakv", budget=0.2, window=16), build_policy("adakv", budget=0.2, window=16)
    calls = []
    real = type(policy).compress
    monkeypatch.setattr(type(policy), "compress", lambda self, obs: calls.append(self) or real(self, obs))
    answer = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    first = hf.generate_from_prefill(model, prefilled, policy, 8)
    scored = hf.continuation_logprobs(model, prefilled, policy, answer)
    again = hf.generate_from_prefill(model, prefilled, policy, 8)  # decoding did not write into the kept one
    assert len(calls) == 1 and first.tokens == again.tokens
    assert torch.equal(first.retained_per_layer, again.retained_per_layer)
    hf.generate_from_prefill(model, prefilled, other, 8)  # an equal but other policy object: compressed anew
    assert len(calls) == 2
    torch.testing.assert_close(hf.continuation_logprobs(model, prefilled, other, answer).logprobs, scored.logprobs)


def test_prefill_refuses_policies_it_cannot_serve(tiny):
    model, prompt = tiny
    narrow = hf.prefill(model, prompt, window=8)
    with pytest.raises(ValueError, match="window"):
        hf.generate_from_prefill(model, narrow, build_policy("snapkv", budget=0.2, window=16))
    with pytest.raises(ValueError, match=r"observes \[.global_attention.\] during prefill: prefill with signals="):
        hf.generate_from_prefill(model, narrow, build_policy("ems", budget=0.2, window=8))


def test_continuation_logprobs_of_full_cache_match_a_plain_forward(tiny):
    model, prompt = tiny
    continuation = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    scored = hf.continuation_logprobs(model, hf.prefill(model, prompt), None, continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, continuation], 1)).logits[0, prompt.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, continuation[0, :, None])[:, 0]
    torch.testing.assert_close(scored.logprobs, expected, atol=1e-4, rtol=1e-4)
    assert scored.perplexity == pytest.approx(math.exp(-expected.double().mean().item()), rel=1e-4)
    assert scored.retained_fraction == 1.0


@pytest.mark.parametrize("name", ["adakv", "pyramidkv", "windowkv"])
def test_continuation_block_equals_token_by_token_decode(tiny, name):
    """The teacher-forced block over a compressed cache gives what feeding the same tokens one at a
    time through the decode path gives (Ada-KV: heads of a layer hold different lengths)."""
    model, prompt = tiny
    policy = build_policy(name, budget=0.15, window=16)
    prefilled = hf.prefill(model, prompt, window=16, signals=PREFILL_SIGNALS)
    continuation = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    scored = hf.continuation_logprobs(model, prefilled, policy, continuation)
    session, _ = hf._decode_session(model, prefilled, policy)
    if name == "adakv":
        assert any(not layer.uniform for layer in session.layers.values())  # the masked, per-head path
    stepwise = [torch.log_softmax(prefilled.logits[0].float(), -1)[continuation[0, 0]]]
    token = hf._SESSION.set(session)
    try:
        with hf._attention_switched(model), torch.no_grad():
            for i in range(continuation.shape[1] - 1):
                logits = model(
                    input_ids=continuation[:, i : i + 1],
                    position_ids=torch.tensor([[prompt.shape[1] + i]]),
                    use_cache=False,
                ).logits[0, -1]
                stepwise.append(torch.log_softmax(logits.float(), -1)[continuation[0, i + 1]])
    finally:
        hf._SESSION.reset(token)
    torch.testing.assert_close(scored.logprobs, torch.stack(stepwise), atol=1e-4, rtol=1e-4)


def test_shipped_head_scores_were_calibrated_on_other_prompts_than_the_benchmark():
    """HeadKV's shipped SmolLM2 scores must not come from the committed benchmark's own samples
    (seeds 0 .. samples-1 of each task): the same planted needles would flatter headkv."""
    calibration = json.loads(quality.SMOLLM2_HEAD_SCORES.read_text())["calibration"]
    calibrated = set(range(calibration["seed"], calibration["seed"] + calibration["num_prompts"]))
    results = json.loads((quality.REPO / "benchmarks" / "results" / "quality-smollm2.json").read_text())
    benchmarked = set(range(results["config"]["samples_per_task"]))
    assert not calibrated & benchmarked


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ems", ("ems", {})),
        ("ems,ems_local_weight=0.75,reducer=topk", ("ems", {"ems_local_weight": 0.75, "reducer": "topk"})),
        ("windowkv,windowkv_whole_windows=false,window=16", ("windowkv", {"windowkv_whole_windows": False, "window": 16})),
    ],
)
def test_policy_spec(spec, expected):
    assert quality.policy_spec(spec) == expected


def test_policy_spec_needs_option_value_pairs():
    with pytest.raises(SystemExit, match="not option=value"):
        quality.policy_spec("ems,local")


def test_compare_runs_divides_answer_probabilities_and_inverse_perplexities():
    """--against: the other run over the base run, task by task; perplexity inverted so that above
    1 is better for both; ``answers`` the geometric mean of the answer tasks only."""
    def record(task, policy, budget, answer_prob=None, perplexity=None):
        return {"setting": quality.AWARE, "task": task, "policy": policy, "budget_fraction": budget,
                "answer_prob": answer_prob, "perplexity": perplexity}

    base = {"records": [record("niah_single", "snapkv", 0.1, answer_prob=0.5),
                        record("common_words", "snapkv", 0.1, answer_prob=0.2),
                        record(quality.PERPLEXITY, "snapkv", 0.1, perplexity=10.0),
                        record("niah_single", "ems", 0.1, answer_prob=0.4)]}
    other = {"records": [record("niah_single", "snapkv", 0.1, answer_prob=0.25),
                         record("common_words", "snapkv", 0.1, answer_prob=0.8),
                         record(quality.PERPLEXITY, "snapkv", 0.1, perplexity=12.5)]}
    ratios = quality.compare_runs(base, other)
    assert set(ratios) == {("snapkv", 0.1)}  # ems: only in the base run
    row = ratios["snapkv", 0.1]
    assert row["niah_single"] == pytest.approx(0.5) and row["common_words"] == pytest.approx(4.0)
    assert row[quality.PERPLEXITY] == pytest.approx(0.8)
    assert row["answers"] == pytest.approx(math.sqrt(0.5 * 4.0))
