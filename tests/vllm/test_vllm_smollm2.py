"""The plugin on a real model: SmolLM2-135M through vLLM's CPU build gives the same greedy tokens
as the HF reference path (``hf.generate``) for a subset of presets, on needle prompts longer
than the budget -- the agreement the quality benchmark's HF numbers rely on."""
import os

import pytest
import torch

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.tools.demo import SHIPPED_HEAD_SCORES
from vllm_kvcompress.tools.models import load_smollm2, smollm2_hf_folder
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.tools.synthetic import make_sample

pytestmark = pytest.mark.slow

PRESETS = ("snapkv", "ems", "headkv-r2")
CONFIG = {"budget": 0.1, "decode_slack": 16, "headkv_scores": str(SHIPPED_HEAD_SCORES)}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    _, tokenizer = load_smollm2()
    return [make_sample("niah_single", tokenizer, 1200, seed=seed, depth=0.4).prompt_ids(tokenizer)[0].tolist()
            for seed in (500, 501)]


@pytest.fixture(scope="module")
def vllm_tokens(tmp_path_factory, prompts):
    """{preset: (tokens, recompression phase) per prompt}."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_kvcompress.vllm import runtime

    folder = smollm2_hf_folder(os.environ.get("KVC_SMOLLM2_HF", tmp_path_factory.mktemp("smollm2")))
    events = str(tmp_path_factory.mktemp("events") / "smollm2.jsonl")
    os.environ[runtime.EVENTS_ENV] = events  # the engine's processes inherit it
    try:
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, seed=0, max_model_len=2048,
                  max_num_seqs=4, gpu_memory_utilization=0.15,
                  additional_config={"kv_compression": {"policy": "snapkv", **CONFIG}})
        params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                 extra_args={"kv_compression": p}) for p in PRESETS for _ in prompts]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for _ in PRESETS for p in prompts], params,
                            use_tqdm=False)
        llm.llm_engine.engine_core.shutdown()
    finally:
        del os.environ[runtime.EVENTS_ENV]
    phases = runtime.recompression_phases(runtime.read_events(events), [o.request_id for o in outs], CONFIG["decode_slack"])
    runs = [(list(o.outputs[0].token_ids), phase) for o, phase in zip(outs, phases)]
    return {p: runs[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(PRESETS)}


@pytest.mark.parametrize("preset", PRESETS)
def test_plugin_matches_hf_on_smollm2(preset, prompts, vllm_tokens):
    model, _ = load_smollm2()
    policy = build_policy(CompressionConfig.from_dict({**CONFIG, "policy": preset}))
    for prompt, (got, phase) in zip(prompts, vllm_tokens[preset]):
        want = hf.generate(model, torch.tensor(prompt), policy, max_new_tokens=MAX_TOKENS,
                           recompress_slack=CONFIG["decode_slack"], recompress_phase=phase)
        assert want.recompressions > 0
        assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"
