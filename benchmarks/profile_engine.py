"""cProfile of vLLM's engine core with the plugin, in process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
where a step's host time goes. Prints the top functions by cumulative and by own time.

    python benchmarks/profile_engine.py --policy snapkv --budget 0.1 --prompt 16384 --output 64 --requests 6
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.dirname(__file__))
from dummy_model import make_dummy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", default="profile.txt")
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = make_dummy("/tmp/kvc-dummy-model")
    extra = {} if args.policy == "plain" else {
        "additional_config": {"kv_compression": {"policy": args.policy, "budget": float(args.budget)}}}
    llm = LLM(model, load_format="dummy", max_model_len=args.prompt + args.output + 64, enable_prefix_caching=False,
              max_num_batched_tokens=args.prompt + args.output + 64, gpu_memory_utilization=args.gpu_memory_utilization,
              **extra)
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 300) for _ in range(args.prompt)])
               for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output, ignore_eos=True, temperature=0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    profile = cProfile.Profile()
    start = time.time()
    profile.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profile.disable()
    seconds = time.time() - start
    with open(args.out, "w") as f:
        f.write(f"{args} {seconds:.1f} s\n")
        stats = pstats.Stats(profile, stream=f)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
    print(f"{seconds:.1f} s; profile in {args.out}")


if __name__ == "__main__":
    main()
