"""Chunked prefill: prompts longer than the step's token budget are prefilled over several steps
(continued chunks attend over the head-blocks, window queries are stashed across chunks, EMS's
column mass is accumulated chunk by chunk) and must still match the HF oracle token for token."""
import pytest
import torch

from test_vllm_engine import MAX_TOKENS, events, generate, greedy, plugin_llm, prompt_ids, shutdown

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.presets import build_policy

pytestmark = pytest.mark.slow

STEP_TOKENS = 96  # 150 = 96 + 54, 230 = 96 + 96 + 38, 310 = 3 * 96 + 22 (last chunk < window)
CONFIG = {"policy": "snapkv", "budget": 48, "window": 32, "decode_slack": None}
PRESETS = ("snapkv", "ems", "pyramidkv", "streamingllm")


@pytest.fixture(scope="module")
def chunked_runs(tiny_model_dir, tmp_path_factory):
    import json
    import os


    vocab = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]
    prompts = [prompt_ids(n, 10 + i, vocab) for i, n in enumerate((150, 230, 310))]
    path = str(tmp_path_factory.mktemp("events") / "chunked.jsonl")
    llm = plugin_llm(tiny_model_dir, path, CONFIG, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
                     max_num_batched_tokens=STEP_TOKENS, max_num_seqs=4, gpu_memory_utilization=0.15)
    try:
        runs = {p: generate(llm, prompts, greedy(extra={"kv_compression": p})) for p in PRESETS}
    finally:
        shutdown(llm)
    return prompts, runs, events(path, "compressed")


def test_prefills_were_chunked(chunked_runs):
    prompts, runs, compressed = chunked_runs
    assert len(compressed) == len(PRESETS) * len(prompts)
    assert all(e["chunks"] > 1 for e in compressed)


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_prefill_matches_hf_oracle(preset, chunked_runs, hf_model):
    prompts, runs, _ = chunked_runs
    policy = build_policy(CompressionConfig.from_dict({**CONFIG, "policy": preset}))
    for prompt, got in zip(prompts, runs[preset]):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=MAX_TOKENS)
        assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"
