"""Needle-in-a-haystack on SmolLM2-135M, full KV cache against a compressed one, all on the CPU.

    python -m vllm_kvcompress.tools.demo                      # SnapKV, 128 tokens per KV head, ~1500-token prompt
    kvcompress-demo --policy ems --budget 64 --context-tokens 800 --seed 3

Hides a 7-digit "special magic number" in a synthetic haystack (:mod:`vllm_kvcompress.tools.synthetic`),
asks SmolLM2 for it with the full cache and with the chosen policy applied after prefill (through
the HF reference path, :func:`vllm_kvcompress.reference.hf.generate`), and prints the prompt length, the
tokens each KV head retained and what compression freed, both answers, whether each contains the
number, and the timings.

The default (snapkv at 128 tokens per KV head, 8.5 % of the prompt) finds the number, and so does
``--policy ems-tuned``; the seed methods' faithful presets at that budget (ems, windowkv, zigzag,
headkv, headkv-r2) miss a digit or more of it (benchmarks/results/quality-notes.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vllm_kvcompress.policies.config import PRESET_NAMES, PRESETS, CompressionConfig, canonical_preset
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.reference.hf import GenerationResult, generate
from vllm_kvcompress.tools.models import load_smollm2
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.tools.synthetic import Sample, make_sample, score

TASK = "niah_single"
DEFAULT_POLICY = "snapkv"
DEFAULT_BUDGET = "128"
BLOCK_SIZE = 16  # tokens per head-block in the paged cache (vLLM's default block size)
# HeadKV scores for SmolLM2, written by `python -m vllm_kvcompress.tools.calibrate` and shipped with the package
SHIPPED_HEAD_SCORES = Path(__file__).parents[1] / "data" / "smollm2-head-scores.json"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, CompressionConfig]:
    """The options and the validated compression config (argparse exits with a message on bad input)."""
    parser = argparse.ArgumentParser(
        prog="kvcompress-demo",
        description="Needle-in-a-haystack on SmolLM2-135M (CPU): full KV cache vs. a compressed one.",
    )
    parser.add_argument("--policy", default=DEFAULT_POLICY,
                        help=f"compression preset: {', '.join(PRESET_NAMES)} (default: {DEFAULT_POLICY})")
    parser.add_argument(
        "--budget", default=DEFAULT_BUDGET,
        help=f"average tokens kept per KV head, or a fraction of the prompt (default: {DEFAULT_BUDGET})",
    )
    parser.add_argument("--context-tokens", type=int, default=1500, help="prompt length to aim for (default: 1500)")
    # seed 1: SmolLM2 finds this needle with the full cache (seed 0 it misses), so the demo shows
    # what compression keeps or loses of a retrieval the model can do
    parser.add_argument("--seed", type=int, default=1, help="picks the needle, its depth and the haystack (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per run (default: 32)")
    parser.add_argument(
        "--head-scores",
        default=None,
        help="HeadKV scores file for the headkv presets (default: the shipped SmolLM2 scores)",
    )
    args = parser.parse_args(argv)
    if args.context_tokens < 64:
        parser.error(f"--context-tokens must be >= 64, got {args.context_tokens}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        options = {"policy": args.policy, "budget": args.budget}
        if needs_head_scores(args.policy):
            options["headkv_scores"] = resolve_head_scores(args.head_scores)
        config = CompressionConfig.from_dict(options)
    except ValueError as error:
        parser.error(str(error))
    return args, config


def needs_head_scores(policy: str) -> bool:
    """True for the presets whose allocator is HeadKV's (asked before the config is built, since
    the config refuses them without a scores file). ValueError for an unknown preset."""
    name = canonical_preset(policy)
    return name in PRESETS and PRESETS[name].allocator == "headkv"


def resolve_head_scores(path: str | None) -> str:
    """``path`` if given, else the shipped SmolLM2 scores; ValueError when neither exists."""
    if path is not None:
        return path
    if SHIPPED_HEAD_SCORES.exists():
        return str(SHIPPED_HEAD_SCORES)
    raise ValueError(
        f"the headkv presets need head scores and the shipped {SHIPPED_HEAD_SCORES} is missing: pass "
        "--head-scores PATH (make one with `python -m vllm_kvcompress.tools.calibrate`)"
    )


def retained_table(retained: torch.Tensor, prompt_len: int) -> str:
    """A compact table of ``retained`` (int [num_layers, num_kv_heads]): one row per layer with the
    per-head lengths and their sum, then the total and the retained fraction of the full cache."""
    num_layers, num_heads = retained.shape
    width = max(5, len(str(int(retained.max()))))
    heads = " ".join(f"{f'h{h}':>{width}}" for h in range(num_heads))
    lines = [f"layer  {heads}  {'total':>6}"]
    for layer, row in enumerate(retained.tolist()):
        lines.append(f"{layer:>5}  {' '.join(f'{n:>{width}}' for n in row)}  {sum(row):>6}")
    total, full = int(retained.sum()), prompt_len * num_layers * num_heads
    lines.append(f"all {num_layers} layers x {num_heads} KV heads: {total} of {full} tokens kept ({total / full:.1%})")
    return "\n".join(lines)


def freed_summary(retained: torch.Tensor, prompt_len: int, head_dim: int, bytes_per_value: int) -> str:
    """What compression freed of the prompt's cache: tokens, K/V bytes (``bytes_per_value`` per
    number, K and V of ``head_dim`` each) and head-blocks of :data:`BLOCK_SIZE` tokens (the pages
    the vLLM plugin gives back). retained: int [num_layers, num_kv_heads] lengths."""
    freed = retained.numel() * prompt_len - int(retained.sum())
    mib = freed * 2 * head_dim * bytes_per_value / 2**20
    blocks = retained.numel() * -(-prompt_len // BLOCK_SIZE)
    kept_blocks = int((-(-retained // BLOCK_SIZE)).sum())
    return (f"freed: {freed} tokens = {mib:.1f} MiB of K/V at {bytes_per_value} bytes a value; "
            f"{blocks - kept_blocks} of {blocks} head-blocks of {BLOCK_SIZE} tokens")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def describe_budget(config: CompressionConfig) -> str:
    budget = config.budget
    if budget.tokens is not None:
        return f"{budget.tokens} tokens per KV head"
    return f"{budget.fraction:.0%} of the prompt per KV head"


def report_run(label: str, sample: Sample, result: GenerationResult, text: str, seconds: float) -> None:
    """Print one run: its output on one line, whether it holds the answer, its length and time."""
    found = score(sample, text) > 0
    print(f"{label}:")
    print(f"  output: {one_line(text)!r}")
    extra = f", {result.recompressions} decode-time head recompressions" if result.recompressions else ""
    print(f"  answer found: {'yes' if found else 'no'}  ({len(result.tokens)} tokens in {seconds:.1f} s{extra})")


def timed_generate(model, ids, policy, max_new_tokens: int, eos_token_id, slack) -> tuple[GenerationResult, float]:
    """generate() and its wall-clock seconds (prefill, compression and decode)."""
    start = time.perf_counter()
    result = generate(model, ids, policy, max_new_tokens, eos_token_id=eos_token_id, recompress_slack=slack)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    try:  # a bad scores file is reported before the model is loaded
        head_scores = HeadScores.load(config.headkv_scores) if config.headkv_scores else None
    except ValueError as error:
        raise SystemExit(f"kvcompress-demo: error: {error}") from None
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_seconds = time.perf_counter() - start
    if head_scores is not None:
        try:
            head_scores.check_model(
                model.config.num_hidden_layers, model.config.num_key_value_heads, source=config.headkv_scores
            )
        except ValueError as error:
            raise SystemExit(f"kvcompress-demo: error: {error}") from None

    sample = make_sample(TASK, tokenizer, args.context_tokens, args.seed)
    ids = sample.prompt_ids(tokenizer)
    prompt_len = ids.shape[1]
    print(f"SmolLM2-135M-Instruct on the CPU (loaded in {load_seconds:.1f} s)")
    print(f"prompt: {prompt_len} tokens ({TASK}, seed {args.seed})")
    print(f"needle at depth {sample.depth:.2f}: {sample.needles[0]!r}")
    print(f"question: {sample.question}")
    print(
        f"policy: {config.policy} (scorer {config.scorer_name}, allocator {config.allocator_name}, reducer "
        f"{config.reducer_name}), budget {describe_budget(config)}, window {config.effective_window}"
    )
    print()

    def run(policy, slack):
        return timed_generate(model, ids, policy, args.max_new_tokens, tokenizer.eos_token_id, slack)

    full, full_seconds = run(None, slack=None)
    full_text = tokenizer.decode(full.tokens, skip_special_tokens=True)
    policy = build_policy(config)
    if policy is None:  # `none` is the full cache: no second run
        compressed, seconds, text = full, full_seconds, full_text
    else:
        compressed, seconds = run(policy, slack=config.decode_slack)
        text = tokenizer.decode(compressed.tokens, skip_special_tokens=True)

    print("retained tokens per KV head after prefill compression:")
    print(retained_table(compressed.retained_per_layer, prompt_len))
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    print(freed_summary(compressed.retained_per_layer, prompt_len, head_dim, next(model.parameters()).element_size()))
    print()
    print(f"expected answer: {', '.join(sample.answers)}")
    report_run("full cache", sample, full, full_text, full_seconds)
    report_run(f"{config.policy} ({describe_budget(config)})", sample, compressed, text, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
