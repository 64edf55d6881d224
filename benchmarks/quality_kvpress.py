"""kvpress (NVIDIA, 0.5.5) on the quality benchmark's own prompts, side by side with our policies.

Runs in kvpress's environment (``bash scripts/install-kvpress.sh``: it pins transformers < 5.3), on
the token ids ``benchmarks/quality.py --export-prompts`` wrote, with the model folder
:func:`vllm_kvcompress.tools.models.real_model_folder` wrote (the same fp32 weights on both sides)::

    python benchmarks/quality.py --model qwen2.5-coder-0.5b --context-tokens 4096 --samples 1 \\
        --export-prompts /tmp/prompts-4k.json --out benchmarks/results/quality-qwen2.5-coder-0.5b-4k.json
    ../kvpress-venv/bin/python benchmarks/quality_kvpress.py --prompts /tmp/prompts-4k.json \\
        --out benchmarks/results/quality-qwen2.5-coder-0.5b-4k-kvpress.json
    python benchmarks/quality.py --plot benchmarks/results/quality-qwen2.5-coder-0.5b-4k.json \\
        --merge benchmarks/results/quality-qwen2.5-coder-0.5b-4k-kvpress.json

For every prompt and setting (question-aware: the whole prompt is compressed; question-agnostic:
the context, then the question is fed whole) it measures, relative to kvpress's own full cache,
what ``benchmarks/quality.py`` measures: the greedy answer's task score and the gold answer's
teacher-forced likelihood. Records are ``policy = "kvpress:<PressName>"``.

**One prefill per prompt and setting.** A kvpress press compresses each layer's cache in a forward
hook right after that layer's prefill; the hook's inputs (the layer's hidden states, its rotary
embeddings, the cache) do not depend on what the hooks of earlier layers did (the next layer reads
the full attention's output). So the prefill is run once, each layer's hook arguments are kept, and
every press and budget runs kvpress's own ``forward_hook`` on a copy of the cache -- what a prefill
under ``with press(model)`` does, at the cost of one prefill. ``--check-replay`` compares the
two on the first prompt (kept keys/values and masks equal) and records the result. KVzip, whose
scoring re-runs the model over the context, is run for real once per prompt and setting; its
scores then serve every budget through its own ``compress_post``.

**Selections compared.** For SnapKV, StreamingLLM, PyramidKV and AdaKV the kept positions of every
(layer, KV head) are compared with what our policy keeps at kvpress's settings (window 64,
pooling kernel 5, the same token count per head) on the same keys, values and window queries:
``agreement`` holds the mean and minimum share of kvpress's kept positions that ours keep too.
Our SnapKV scorer max-pools (SnapKV's experiment configurations); kvpress average-pools (SnapKV's
code defaults): the ``snapkv-avgpool`` / ``adakv-avgpool`` rows swap in average pooling (a scorer
defined here, not a preset) to show what remains once the pooling is the same. Perplexity has no
question: it is computed once and recorded under both settings, as benchmarks/quality.py does.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (its aggregation and record schema)
from recording import project_commit, write_json  # noqa: E402

from vllm_kvcompress.tools import synthetic# noqa: E402
from vllm_kvcompress.policies.budget import Budget  # noqa: E402
from vllm_kvcompress.tools.models import real_model_folder  # noqa: E402
from vllm_kvcompress.policies.observation import LayerObservation  # noqa: E402
from vllm_kvcompress.policies.presets import build_policy  # noqa: E402
from vllm_kvcompress.policies.scoring import SnapKVScorer, prefix_only  # noqa: E402

PRESS_NAMES = ("SnapKVPress", "StreamingLLMPress", "PyramidKVPress", "AdaKVPress", "ExpectedAttentionPress",
               "KVzipPress")
# our policy at kvpress's settings for each press whose selection we compare
COMPARED = {"SnapKVPress": ("snapkv", "snapkv-avgpool"), "StreamingLLMPress": ("streamingllm",),
            "PyramidKVPress": ("pyramidkv", "snapkv-avgpool"), "AdaKVPress": ("adakv", "adakv-avgpool")}
KVPRESS_WINDOW, KVPRESS_KERNEL = 64, 5  # SnapKVPress / PyramidKVPress defaults


def make_press(name: str, compression_ratio: float):
    """kvpress's press ``name`` at its defaults (AdaKV wraps SnapKV, as kvpress's leaderboard does)."""
    if name not in PRESS_NAMES:
        raise SystemExit(f"unknown press {name!r}; valid: {', '.join(PRESS_NAMES)}")
    import kvpress

    if name == "AdaKVPress":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=compression_ratio))
    return getattr(kvpress, name)(compression_ratio=compression_ratio)


@dataclass(frozen=True)
class AvgPoolSnapKVScorer(SnapKVScorer):
    """Our SnapKV scorer with average instead of max pooling (zero padding counted, as
    ``F.avg_pool1d`` does): only for comparing selections with kvpress here."""

    def score(self, obs: LayerObservation) -> torch.Tensor:
        scores = prefix_only(obs.window_mass(power=1), obs.window)
        pooled = F.avg_pool1d(scores[:, None], self.pool_kernel, stride=1, padding=self.pool_kernel // 2)[:, 0]
        return prefix_only(pooled, obs.window)


def our_policy(name: str, tokens_per_head: int):
    """Our policy ``name`` at kvpress's settings, keeping ``tokens_per_head`` on average."""
    options = dict(budget=Budget(tokens=tokens_per_head), window=KVPRESS_WINDOW, pool_kernel=KVPRESS_KERNEL)
    if name == "streamingllm":
        return build_policy("streamingllm", budget=Budget(tokens=tokens_per_head), sink=4)
    if name.endswith("-avgpool"):
        policy = build_policy(name.removesuffix("-avgpool"), **options)
        return dataclasses.replace(policy, scorer=AvgPoolSnapKVScorer(pool_kernel=KVPRESS_KERNEL))
    return build_policy(name, **options)


# ------------------------------------------------------------------------------------- prefill + replay


@dataclass
class Prefill:
    """One prefill of ``ids`` [1, n]: the full cache, each layer's hook arguments (module and the
    forward's keyword arguments, the cache left out), the last position's logits [1, vocab]."""

    ids: torch.Tensor
    cache: object
    hook_args: list
    logits: torch.Tensor


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> Prefill:
    from transformers import DynamicCache

    captured = []

    def keep(module, args, kwargs, output):
        captured.append((module, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}))

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    cache = DynamicCache()
    try:
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return Prefill(ids, cache, captured, logits.float())


def clone_cache(cache):
    return copy.deepcopy(cache)


def clear_masks(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


@torch.no_grad()
def replay(model, press, base: Prefill):
    """The cache ``with press(model)`` would have left after ``base``'s prefill: kvpress's own
    forward_hook on every layer, on a copy of the full cache."""
    clear_masks(model)
    press.post_init_from_model(model)
    for layer in model.model.layers:  # what BasePress.__call__ sets up
        layer.self_attn.rotary_emb = model.model.rotary_emb
    cache = clone_cache(base.cache)
    for module, kwargs in base.hook_args:
        press.forward_hook(module, (), {**kwargs, "past_key_values": cache}, (None, None))
    return cache


class KVzipScores:
    """KVzip run for real once (its scoring replays the context through the model); its layer x head
    x token scores then serve any compression ratio through its own ``compress_post``."""

    def __init__(self, model, ids: torch.Tensor):
        import kvpress

        press = kvpress.KVzipPress(compression_ratio=0.5)
        original = press.compress_post
        stash = {}

        def keep(m):
            stash["scores"] = press.score_val.clone()
            original(m)

        press.compress_post = keep
        from transformers import DynamicCache

        clear_masks(model)
        cache = DynamicCache()
        with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.press, self.scores, self.cache = kvpress.KVzipPress(compression_ratio=0.5), stash["scores"], cache

    def apply(self, model, compression_ratio: float):
        clear_masks(model)
        self.press.compression_ratio = compression_ratio
        self.press.score_val = self.scores.clone()
        self.press.compress_post(model)
        return clone_cache(self.cache)


def retained_fraction(model, cache, n: int) -> float:
    """Kept share of the compressed tokens, masked positions (AdaKV, KVzip) counted as dropped."""
    layers = model.model.layers
    heads = model.config.num_key_value_heads
    kept = 0
    for i, layer in enumerate(layers):
        length = cache.layers[i].keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        kept += heads * length - (0 if masked is None else len(masked[0]))
    return kept / (len(layers) * heads * n)


# ------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def answer(model, cache, first_logits, start: int, question, max_new: int, stop: set[int], answer_ids):
    """(greedy tokens, mean NLL of ``answer_ids``) over ``cache`` (not modified).

    start: the position after the compressed tokens; question: int [1, k] fed whole first (or None,
    then ``first_logits`` [1, vocab] predicts the first token)."""
    work = clone_cache(cache)
    position = start
    logits = first_logits
    if question is not None:
        pos = torch.arange(position, position + question.shape[1])[None]
        logits = model(input_ids=question, past_key_values=work, position_ids=pos, use_cache=True,
                       logits_to_keep=1).logits[:, -1].float()
        position += question.shape[1]
    tokens = []
    for step in range(max_new):
        token = int(logits.argmax(-1))
        tokens.append(token)
        if token in stop or step == max_new - 1:
            break
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=work,
                       position_ids=torch.tensor([[position + step]]), use_cache=True).logits[:, -1].float()
    # the gold answer teacher-forced: [question +] answer[:-1] in one block
    work = clone_cache(cache)
    given = answer_ids if question is None else torch.cat([question, answer_ids], 1)
    pos = torch.arange(start, start + given.shape[1] - 1)[None]
    if given.shape[1] > 1:
        block = model(input_ids=given[:, :-1], past_key_values=work, position_ids=pos, use_cache=True).logits[0].float()
    else:
        block = torch.empty(0, first_logits.shape[-1])
    logits = block if question is not None else torch.cat([first_logits, block])
    logits = logits[-answer_ids.shape[1]:]
    nll = -torch.log_softmax(logits, -1).gather(-1, answer_ids[0, :, None])[:, 0]
    return tokens, float(nll.mean())


# ------------------------------------------------------------------------------------- selections


def observations(model, base: Prefill, window: int) -> list[LayerObservation]:
    """What our HF path observes of ``base``: each layer's keys/values and its last ``window``
    queries after RoPE, from the hook arguments (the way kvpress's SnapKV recomputes them)."""
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    out = []
    for (module, kwargs), layer in zip(base.hook_args, base.cache.layers):
        hidden = kwargs["hidden_states"][:, -window:]
        cos, sin = (t[:, -window:] for t in kwargs["position_embeddings"])
        q = get_prerope_query_states(module, hidden)
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        out.append(LayerObservation(q[0], layer.keys[0], layer.values[0], layer_idx=module.layer_idx))
    return out


def kept_positions(model, base: Prefill, cache) -> list[list[set[int]]]:
    """Per layer, per KV head: the prompt positions a compressed ``cache`` kept (rows matched to
    the full cache's by value; masked positions left out)."""
    kept = []
    probe = torch.randn(base.cache.layers[0].keys.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(model.model.layers):
        full, small = base.cache.layers[i].keys[0].double() @ probe, cache.layers[i].keys[0].double() @ probe
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        heads = []
        for h in range(full.shape[0]):
            where = {float(v): p for p, v in enumerate(full[h].tolist())}
            positions = {where[float(v)] for v in small[h].tolist()}
            if masked is not None:
                positions -= {int(s) for hh, s in zip(masked[1].tolist(), masked[2].tolist()) if hh == h}
            heads.append(positions)
        kept.append(heads)
    return kept


def agreement(theirs: list[list[set[int]]], ours) -> dict:
    """Share of kvpress's kept positions that ours keep, per (layer, head): mean and min; and how
    many heads kept a different number of tokens."""
    shares, sizes = [], 0
    for layer_theirs, layer_ours in zip(theirs, ours):
        for h, positions in enumerate(layer_theirs):
            mine = {int(p) for p in layer_ours.keep_idx[h, : int(layer_ours.lengths[h])].tolist()}
            shares.append(len(positions & mine) / max(len(positions), 1))
            sizes += len(positions) != len(mine)
    return {"mean": round(sum(shares) / len(shares), 4), "min": round(min(shares), 4),
            "heads_with_other_length": sizes, "heads": len(shares)}


# ------------------------------------------------------------------------------------- main


def n_kept(n: int, compression_ratio: float) -> int:
    from kvpress.utils import compute_n_kept

    return compute_n_kept(n, compression_ratio)


@torch.no_grad()
def check_replay(model, ids: torch.Tensor) -> list[dict]:
    """The replayed caches against real prefills under ``with press(model)``, per press at 10 %."""
    from transformers import DynamicCache

    base = prefill(model, ids)
    checks = []
    for name in PRESS_NAMES:
        if name == "KVzipPress":
            continue  # run for real anyway
        press = make_press(name, 0.9)
        replayed = replay(model, press, base)
        masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
        clear_masks(model)
        real = DynamicCache()
        with press(model):
            model(input_ids=ids, past_key_values=real, use_cache=True, logits_to_keep=1)
        same = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(replayed.layers, real.layers))
        real_masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
        same_masks = all((a is None and b is None) or all(torch.equal(x, y) for x, y in zip(a, b))
                         for a, b in zip(masks, real_masks))
        checks.append({"press": name, "equal_cache": same, "equal_masks": same_masks})
        print(f"replay check {name}: cache {'equal' if same else 'DIFFERENT'}, masks {'equal' if same_masks else 'DIFFERENT'}")
    clear_masks(model)
    return checks


def run(args) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    exported = json.loads(args.prompts.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvpress  # noqa: F401  (patches the attention functions for masked presses)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    folder = real_model_folder(exported["model_key"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stop = {tokenizer.eos_token_id}
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    prompts = [p for p in exported["prompts"] if p["task"] in args.tasks and p["sample"] < args.samples]
    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else None
    results = previous["samples"] if previous else []
    selections = previous["selections"] if previous else []
    done = {quality.sample_key(r) for r in results}
    meta = {
        "benchmark": "quality_kvpress",
        "device": f"CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), **{p: importlib.metadata.version(p)
                                                             for p in ("kvpress", "torch", "transformers")},
                     "vllm_kvcompress_commit": project_commit()},
        "model": exported["model"], "prompts": str(args.prompts), "context_tokens": exported["context_tokens"],
        "command": " ".join(["python", "benchmarks/quality_kvpress.py"] + args.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "replay_check": previous["meta"].get("replay_check") if previous else None,
    }
    if args.check_replay:
        meta["replay_check"] = check_replay(model, torch.tensor([prompts[0]["prompt_ids"]]))

    def save() -> dict:
        meta["runtime_s"] = round(time.perf_counter() - started + (previous["meta"]["runtime_s"] if previous else 0), 1)
        records = quality.aggregate(results, exported["context_tokens"], group)
        data = {"meta": meta, "config": {"presses": args.presses, "budgets": args.budgets, "settings": args.settings,
                                         "tasks": args.tasks, "samples_per_task": args.samples,
                                         "query_heads_per_kv_head": group},
                "records": records, "averages": quality.averages(records), "samples": results,
                "selections": selections}
        write_json(args.out, data)
        return data

    for prompt in prompts:
        ids = torch.tensor([prompt["prompt_ids"]])
        for setting in args.settings:
            todo = [(name, b) for name in [quality.FULL, *args.presses] for b in
                    ([quality.FULL_BUDGET] if name == quality.FULL else args.budgets)
                    if quality.result_key(prompt["task"], prompt["sample"], setting, label(name), b) not in done]
            perplexity = prompt["continuation_ids"] is not None
            if perplexity and setting != args.settings[0]:  # no question: the first setting's results
                copy_perplexity(prompt, args.settings, results, done)
                todo = [t for t in todo if quality.result_key(prompt["task"], prompt["sample"], setting, label(t[0]), t[1])
                        not in done]
            if not todo:
                continue
            if setting == quality.AGNOSTIC and not perplexity:
                n = prompt["context_len"]
                question = ids[:, n:]
            else:
                n, question = ids.shape[1], None
            t0 = time.perf_counter()
            base = prefill(model, ids[:, :n])
            prefill_s = time.perf_counter() - t0
            kvzip = None
            for name, budget in todo:
                t0 = time.perf_counter()
                ratio = 1.0 - budget
                if name == quality.FULL:
                    clear_masks(model)
                    cache = clone_cache(base.cache)
                elif name == "KVzipPress":
                    kvzip = kvzip or KVzipScores(model, ids[:, :n])
                    cache = kvzip.apply(model, ratio)
                else:
                    cache = replay(model, make_press(name, ratio), base)
                result = {"task": prompt["task"], "sample": prompt["sample"], "seed": prompt["seed"],
                          "depth": prompt["depth"], "setting": setting, "policy": label(name), "budget_fraction": budget,
                          "prompt_tokens": ids.shape[1], "compressed_tokens": n,
                          "retained_fraction": retained_fraction(model, cache, n)}
                if perplexity:
                    continuation = torch.tensor([prompt["continuation_ids"]])
                    _, nll = answer(model, cache, base.logits, n, None, 1, stop, continuation)
                    result.update(score=math.exp(-nll), nll=nll)
                else:
                    tokens, nll = answer(model, cache, base.logits, n, question, prompt["max_new_tokens"], stop,
                                         torch.tensor([prompt["answer_ids"]]))
                    output = tokenizer.decode(tokens, skip_special_tokens=True)
                    sample = synthetic.Sample(prompt["task"], "", "", tuple(prompt["answers"]))
                    result.update(score=synthetic.score(sample, output), answer_nll=nll, output=output[:300])
                if name in COMPARED and prompt["sample"] == 0:
                    theirs = kept_positions(model, base, cache)
                    obs = observations(model, base, KVPRESS_WINDOW)
                    tokens_per_head = n_kept(n, ratio)
                    for ours in COMPARED[name]:
                        retained = our_policy(ours, tokens_per_head).compress(obs)
                        selections.append({"task": prompt["task"], "sample": prompt["sample"], "setting": setting,
                                           "press": name, "ours": ours, "budget_fraction": budget,
                                           "tokens_per_head": tokens_per_head, **agreement(theirs, retained)})
                clear_masks(model)
                result["seconds"] = round(time.perf_counter() - t0, 3)
                result["prefill_seconds"] = round(prefill_s, 3)
                results.append(result)
                done.add(quality.sample_key(result))
                print(f"{prompt['task']} #{prompt['sample']} {setting} {label(name)} @{budget}: "
                      f"score {result['score']:.3f} ({result['seconds']:.0f}s)", flush=True)
            save()
    return save()


def copy_perplexity(prompt: dict, settings, results: list, done: set) -> None:
    """Perplexity's results of the first setting, recorded under the others too (no question: the
    same computation)."""
    first, *others = settings
    for r in [r for r in results if (r["task"], r["sample"], r["setting"]) == (prompt["task"], prompt["sample"], first)]:
        for setting in others:
            twin = dict(r, setting=setting)
            if quality.sample_key(twin) not in done:
                results.append(twin)
                done.add(quality.sample_key(twin))


def label(name: str) -> str:
    return name if name == quality.FULL else f"kvpress:{name}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, required=True, help="benchmarks/quality.py --export-prompts's JSON")
    parser.add_argument("--out", type=Path, required=True, help="the records' JSON (merge it with quality.py --plot --merge)")
    parser.add_argument("--presses", nargs="+", default=list(PRESS_NAMES), choices=PRESS_NAMES)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2],
                        help="kept fractions of the compressed tokens (compression_ratio = 1 - budget)")
    parser.add_argument("--settings", nargs="+", choices=quality.SETTINGS, default=list(quality.SETTINGS))
    parser.add_argument("--tasks", nargs="+", default=list(synthetic.TASKS) + [quality.PERPLEXITY])
    parser.add_argument("--samples", type=int, default=1, help="samples per task (of those exported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-replay", action="store_true",
                        help="first compare the replayed caches with real prefills under each press")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return args


if __name__ == "__main__":
    run(parse_args())
