"""Why a policy loses a needle: what each policy keeps of one benchmark prompt, head by head.

For one synthetic prompt of ``benchmarks/quality.py`` (same model, filler, seed and depth), prefilled
once, and each (policy, budget): the share of (layer, KV head) slots that keep every token of the
needle's value (the number the question asks for), the mean share of those tokens kept, where the
kept tokens sit (share in the prompt's second half), the per-layer mean budget, and the gold
answer's likelihood relative to the full cache::

    python benchmarks/quality_diagnose.py --model qwen2.5-coder-0.5b --context-tokens 8192 \\
        --task niah_single --seed 0 --depth 0.1 --budgets 0.05 0.1 --policies snapkv ems windowkv

Writes ``benchmarks/results/quality-<model>-diagnosis.json``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402
from recording import project_commit, write_json  # noqa: E402

from vllm_kvcompress.tools import synthetic# noqa: E402
from vllm_kvcompress.tools.calibrate import token_span  # noqa: E402
from vllm_kvcompress.reference.hf import continuation_logprobs, prefill  # noqa: E402
from vllm_kvcompress.tools.models import REAL_MODELS, load_real_model  # noqa: E402
from vllm_kvcompress.policies.presets import build_policy  # noqa: E402


def value_span(sample: synthetic.Sample, tokenizer) -> tuple[int, int]:
    """[start, end) of the prompt tokens holding the asked value inside its needle."""
    text = sample.prompt_text(tokenizer)
    needle = next(n for n in sample.needles if sample.answers[0] in n)
    start = text.index(needle) + needle.index(sample.answers[0])
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(sample.answers[0])
    covering = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < end and e > start and e > s]
    return covering[0], covering[-1] + 1


def kept_stats(retained: list, span: tuple[int, int], prompt_len: int) -> dict:
    """What the retained layers hold of ``span``: per (layer, head) slot whether it keeps all its
    tokens, the mean share kept, the share of kept tokens in the second half, per-layer budgets."""
    start, end = span
    whole, shares, late, total, per_layer = 0, [], 0, 0, []
    for layer in retained:
        per_layer.append(round(float(layer.lengths.float().mean()), 1))
        for h in range(layer.keep_idx.shape[0]):
            kept = layer.keep_idx[h, : int(layer.lengths[h])]
            inside = ((kept >= start) & (kept < end)).sum().item()
            shares.append(inside / (end - start))
            whole += inside == end - start
            late += (kept >= prompt_len // 2).sum().item()
            total += kept.numel()
    return {"slots_with_whole_value": whole, "slots": len(shares), "mean_value_share": round(sum(shares) / len(shares), 3),
            "kept_in_second_half": round(late / total, 3), "per_layer_budget": per_layer}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(REAL_MODELS), default="qwen2.5-coder-0.5b")
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--task", default="niah_single", choices=[t for t in synthetic.TASKS if t != "common_words"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=float, default=0.1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--policies", nargs="+", default=["snapkv", "pyramidkv", "ems", "ems-tuned", "windowkv",
                                                            "zigzag", "headkv-r2"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    model, tokenizer = load_real_model(args.model)
    scores = quality.head_scores_path(args.model)
    sample = synthetic.make_sample(args.task, tokenizer, args.context_tokens, seed=args.seed, depth=args.depth,
                                   filler="essays")
    ids = sample.prompt_ids(tokenizer)
    span = value_span(sample, tokenizer)
    answer = torch.tensor([tokenizer.encode(", ".join(sample.answers), add_special_tokens=False)])
    policies = {(name, b): build_policy(*quality.policy_spec(name)[:1], budget=b, **quality.policy_spec(name)[1],
                                        **({"headkv_scores": str(scores)} if name.startswith("headkv") else {}))
                for name in args.policies for b in args.budgets}
    prefilled = prefill(model, ids, window=max(p.window for p in policies.values()), used_logits_only=True,
                        signals=set().union(*(p.observes for p in policies.values())))
    full_nll = continuation_logprobs(model, prefilled, None, answer).mean_nll
    rows = []
    for (name, budget), policy in policies.items():
        retained = prefilled.compressed(policy)
        nll = continuation_logprobs(model, prefilled, policy, answer).mean_nll
        rows.append({"policy": name, "budget_fraction": budget, "relative_likelihood": round(math.exp(full_nll - nll), 4),
                     **kept_stats(retained, span, prefilled.prompt_len)})
        r = rows[-1]
        print(f"{name:<14} {budget:>5.0%}  likelihood {r['relative_likelihood']:.3f}  whole value in "
              f"{r['slots_with_whole_value']:>2}/{r['slots']} slots, share {r['mean_value_share']:.2f}, "
              f"second half {r['kept_in_second_half']:.2f}", flush=True)
    data = {"meta": {"command": " ".join(["python", "benchmarks/quality_diagnose.py"] + [str(a) for a in (argv or sys.argv[1:])]),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": project_commit(),
                     "runtime_s": round(time.perf_counter() - started, 1)},
            "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "prompt_tokens": ids.shape[1],
                       "value_span": list(span), "answers": list(sample.answers), "depth_found": sample.depth},
            "rows": rows}
    out = args.out or HERE / "results" / f"quality-{args.model}-diagnosis.json"
    write_json(out, data)
    print(f"wrote {out}")
    return data


if __name__ == "__main__":
    main()
