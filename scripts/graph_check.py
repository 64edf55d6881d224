"""GPU check of ``cuda_graphs``: the same greedy requests through an engine that captures and
replays full CUDA graphs of its decode steps and through one that runs the same path eagerly
(``enforce_eager``), on the test suite's tiny random Llama in bf16, with decode-time recompression.

    python scripts/graph_check.py            # on the device machine, after the vLLM bundle

Prints, per preset, how many of the sequences are identical and where the first difference is.
The two engines run the same kernels on the same buffers; a replayed graph that read stale
metadata would diverge at once. (Matrix products padded to a captured batch size may round
differently, so a late single-token divergence is not by itself a bug; an early one is.)
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))
import kvc_tiny_model  # noqa: E402

PRESETS = ("snapkv", "ems", "windowkv", "adakv")
CONFIG = {"policy": "snapkv", "budget": 48, "window": 16, "decode_slack": 3, "cuda_graphs": True}
PROMPT_LENS = (97, 150, 230, 310, 180, 260)
TOKENS = 32


def run(model_dir: str, prompts: list[list[int]], eager: bool) -> dict[str, list[list[int]]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=eager, seed=0, max_model_len=512,
              max_num_batched_tokens=512, max_num_seqs=8, gpu_memory_utilization=0.3,
              additional_config={"kv_compression": CONFIG})
    out = {}
    for preset in PRESETS:
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True,
                                extra_args={"kv_compression": preset})
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        out[preset] = [list(r.outputs[0].token_ids) for r in results]
    llm.llm_engine.engine_core.shutdown()
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> int:
    model_dir = kvc_tiny_model.build(os.path.join(tempfile.mkdtemp(), "tiny-llama"))
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]
    graphs, eager = run(model_dir, prompts, eager=False), run(model_dir, prompts, eager=True)
    print(f"{'preset':10} identical  first differences (token index)")
    worst = TOKENS
    for preset in PRESETS:
        diffs = [first_difference(a, b) for a, b in zip(graphs[preset], eager[preset])]
        same = sum(d is None for d in diffs)
        worst = min([worst] + [d for d in diffs if d is not None])
        print(f"{preset:10} {same}/{len(prompts)}       {[d for d in diffs if d is not None]}")
    print("OK" if worst >= TOKENS // 2 else f"FAILED: a sequence diverged at token {worst}")
    return 0 if worst >= TOKENS // 2 else 1


if __name__ == "__main__":
    sys.exit(main())
