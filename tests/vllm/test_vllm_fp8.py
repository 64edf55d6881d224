"""``--kv-cache-dtype fp8`` with compression, in the CPU engine, on the tiny random Llama.

An engine with an fp8 pool and vLLM's ``calculate_kv_scales`` (per-layer scales from the first
forward, so not 1.0 and not alike). Every request must equal the HF oracle's fp8 emulation
(``hf.generate(kv_cache_dtype="fp8", k_scale=..., v_scale=...)`` with the scales the worker
logged) token for token (as far as the oracle itself is determined: :func:`assert_matches_oracle`)
and head for head, after prefill compression, with decode-time recompression and with chunked
prefill (a second engine, whose decode steps run in the CUDA-graph buffers); and the pool of the
same KV bytes holds 4x the head-blocks of the float32 model's (2x a bf16 model's: one byte a value
instead of two).
"""
import pytest
import torch

from test_vllm_engine import (BASE, ENGINE, MAX_TOKENS, PROMPT_LENS, events, generate_outputs, greedy, plugin_llm,
                              prompt_ids, shutdown)

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.reference import hf
from vllm_kvcompress.tools.models import TINY_LLAMA_CONFIG
from vllm_kvcompress.vllm import runtime

pytestmark = pytest.mark.slow

PRESETS = ("none", "snapkv", "ems", "pyramidkv", "adakv", "streamingllm")
DECODE_PRESETS = ("snapkv", "ems")
DECODE_SLACK, DECODE_TOKENS = 3, 24
HEAD_DIM = TINY_LLAMA_CONFIG["head_dim"]
FP8_BLOCKS = 1280  # head-blocks of the fp8 pool
KV_BYTES = FP8_BLOCKS * 2 * 16 * HEAD_DIM  # K and V of 16 rows of one head, one byte a value


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    import json
    import os

    vocab = json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]
    return [prompt_ids(n, 20 + seed, vocab) for seed, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module")
def events_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("events") / "fp8.jsonl")


@pytest.fixture(scope="module")
def fp8_llm(tiny_model_dir, events_path):
    engine = {**ENGINE, "kv_cache_memory_bytes": KV_BYTES}
    llm = plugin_llm(tiny_model_dir, events_path, BASE, kv_cache_dtype="fp8", calculate_kv_scales=True, **engine)
    yield llm
    if llm.llm_engine is not None:  # (the chunked engine's fixture may have shut it down already)
        shutdown(llm)


def shut_down_first(llm):
    """Shut the module's first engine down before starting another (two CPU engines share 2 cores)."""
    if llm.llm_engine is not None:
        shutdown(llm)
        llm.llm_engine = None


@pytest.fixture(scope="module")
def scales(fp8_llm, prompts, events_path):
    """The per-layer (k, v) scales the worker stores the pool with (logged at its first forward)."""
    generate_outputs(fp8_llm, prompts[:1], greedy(max_tokens=1))
    found = events(events_path, "fp8_scales")
    assert len(found) == 1
    return found[0]["k"], found[0]["v"]


def test_the_scales_are_vllm_calculated_ones(scales):
    k_scales, v_scales = scales
    assert len(k_scales) == len(v_scales) == TINY_LLAMA_CONFIG["num_hidden_layers"]
    assert all(s > 0 and s != 1.0 for s in k_scales + v_scales)
    assert len(set(k_scales)) > 1 and len(set(v_scales)) > 1


def test_an_fp8_pool_holds_a_head_block_per_byte_budget(fp8_llm, events_path):
    """At the same KV bytes the fp8 pool has one byte a value: 4x the head-blocks of this float32
    model's pool (2x a bf16 model's)."""
    pool = events(events_path, "manager_init")[0]
    assert pool["num_blocks"] == FP8_BLOCKS == KV_BYTES // (2 * 16 * HEAD_DIM)
    float32_blocks = KV_BYTES // (2 * 16 * HEAD_DIM * 4)
    assert pool["num_blocks"] == 4 * float32_blocks


def oracle(hf_model, prompt, preset, scales, max_tokens, **decode):
    policy = None if preset == "none" else build_policy(CompressionConfig.from_dict({**BASE, "policy": preset}))
    k_scales, v_scales = scales
    return hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=max_tokens, kv_cache_dtype="fp8",
                       k_scale=k_scales, v_scale=v_scales, **decode)


def next_float32(values):
    return [float(torch.nextafter(torch.tensor(x), torch.tensor(float("inf")))) for x in values]


def assert_matches_oracle(got, hf_model, prompt, preset, scales, max_tokens, **decode):
    """The engine's tokens are the HF fp8 oracle's as far as the oracle itself is determined: an fp8
    cache turns a float32 rounding difference at an e4m3 rounding midpoint into a whole e4m3 step,
    and EMS merges re-store thousands of values at every recompression, so a long enough run of
    some prompts depends on the last bit of the computation (the engine's batched kernels round
    differently from HF's). Its horizon: the first token where the oracle changes when every scale
    moves by one float32 ulp. Up to it the tokens must be equal. Returns the oracle's result and the
    horizon (:func:`assert_most_tokens_compared` keeps the test from passing on short horizons)."""
    want = oracle(hf_model, prompt, preset, scales, max_tokens, **decode)
    nudged = oracle(hf_model, prompt, preset, [next_float32(s) for s in scales], max_tokens, **decode).tokens
    horizon = next((i for i, (a, b) in enumerate(zip(want.tokens, nudged)) if a != b), len(want.tokens))
    assert got[:horizon] == want.tokens[:horizon], f"{preset}, prompt of {len(prompt)} tokens (horizon {horizon})"
    return want, horizon


def assert_most_tokens_compared(horizons: list[int], max_tokens: int) -> None:
    compared = sum(horizons) / (len(horizons) * max_tokens)
    print(f"tokens compared with the oracle: {compared:.0%} (horizons {horizons})")
    assert compared >= 0.75


@pytest.fixture(scope="module")
def preset_runs(fp8_llm, prompts, scales, events_path):
    """{preset: (tokens, prefill compression event or None) per prompt}, one generate call."""
    since = len(runtime.read_events(events_path))
    outs = generate_outputs(fp8_llm, [q for _ in PRESETS for q in prompts],
                            [greedy(extra={"kv_compression": p}) for p in PRESETS for _ in prompts])
    compressed = {e["req_id"].rsplit("-", 1)[0]: e for e in events(events_path, "compressed", since)}
    runs = [(list(o.outputs[0].token_ids), compressed.get(o.request_id)) for o in outs]
    return {p: runs[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(PRESETS)}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_the_hf_fp8_oracle(preset, preset_runs, prompts, hf_model, scales):
    horizons = []
    for prompt, (got, compressed) in zip(prompts, preset_runs[preset]):
        want, horizon = assert_matches_oracle(got, hf_model, prompt, preset, scales, MAX_TOKENS)
        horizons.append(horizon)
        if preset != "none":
            assert compressed["lens"] == want.retained_per_layer.tolist()
    assert_most_tokens_compared(horizons, MAX_TOKENS)


@pytest.mark.parametrize("preset", DECODE_PRESETS)
def test_decode_recompression_matches_the_hf_fp8_oracle(preset, fp8_llm, prompts, hf_model, scales, events_path):
    since = len(runtime.read_events(events_path))
    extra = {"kv_compression": preset, "kv_compression_config": {"decode_slack": DECODE_SLACK}}
    outs = generate_outputs(fp8_llm, prompts, greedy(DECODE_TOKENS, extra))
    found = events(events_path, "compressed", since)
    assert any(e["what"] == "decode" for e in found)
    phases = runtime.recompression_phases(found, [o.request_id for o in outs], DECODE_SLACK)
    horizons = []
    for prompt, out, phase in zip(prompts, outs, phases):
        want, horizon = assert_matches_oracle(list(out.outputs[0].token_ids), hf_model, prompt, preset, scales,
                                              DECODE_TOKENS, recompress_slack=DECODE_SLACK, recompress_phase=phase)
        assert want.recompressions > 0
        horizons.append(horizon)
    assert_most_tokens_compared(horizons, DECODE_TOKENS)


def test_every_head_block_returns_to_the_pool(fp8_llm, prompts, events_path, preset_runs):
    """The accounting is the same over an fp8 pool: after the runs above, an idle engine holds none."""
    generate_outputs(fp8_llm, prompts[:1], greedy(max_tokens=1))  # one more step: the scheduler logs the pool
    initial = events(events_path, "manager_init")[0]["free"]
    steps = events(events_path, "step")
    assert min(s["free"] for s in steps) < initial
    idle = [s for s in steps if s["requests"] == 0]
    assert idle and all(s["free"] == initial for s in idle)


def test_fp8_changes_outputs(preset_runs, prompts, hf_model):
    """The oracle agreement is not vacuous: the fp8 cache changes some greedy continuation against
    the same policies over a float32 cache."""
    changed = sum(got != hf.generate(hf_model, torch.tensor(prompt), None if p == "none" else build_policy(
        CompressionConfig.from_dict({**BASE, "policy": p})), max_new_tokens=MAX_TOKENS).tokens
                  for p in PRESETS for prompt, (got, _) in zip(prompts, preset_runs[p]))
    print(f"fp8 runs differing from float32 ones: {changed} of {len(PRESETS) * len(prompts)}")
    assert changed > 0


# ---- chunked prefill over an fp8 pool: later chunks attend over (and observe) the stored rows; decode
# steps in the CUDA-graph buffers ---------------------------------------------------------------------
CHUNK_TOKENS = 96  # every prompt is prefilled in 2 to 4 steps
CHUNK_PRESETS = ("snapkv", "ems", "pyramidkv")


@pytest.fixture(scope="module")
def chunked_runs(fp8_llm, tiny_model_dir, prompts, tmp_path_factory):
    """(scales, {preset: [(tokens, chunk lengths)] per prompt}) of an fp8 engine whose steps take
    at most CHUNK_TOKENS tokens and whose pure-decode steps run in the graph buffers (started once
    the module's other engine is gone)."""
    shut_down_first(fp8_llm)
    path = str(tmp_path_factory.mktemp("events") / "fp8-chunked.jsonl")
    # cuda_graphs: the pure-decode steps take the graph path (the persistent buffers, run eagerly here)
    engine = {**ENGINE, "max_num_batched_tokens": CHUNK_TOKENS, "max_model_len": 512}
    llm = plugin_llm(tiny_model_dir, path, {**BASE, "cuda_graphs": True}, kv_cache_dtype="fp8",
                     calculate_kv_scales=True, **engine)
    try:
        runs = {}
        for preset in CHUNK_PRESETS:
            since = len(runtime.read_events(path))
            outs = generate_outputs(llm, prompts, greedy(extra={"kv_compression": preset}))
            ends = {e["req_id"].rsplit("-", 1)[0]: e["chunk_ends"] for e in events(path, "compressed", since)}
            runs[preset] = [(list(o.outputs[0].token_ids), [b - a for a, b in zip([0, *ends[o.request_id]],
                                                                                   ends[o.request_id])])
                            for o in outs]
    finally:
        shutdown(llm)
    assert events(path, "graph_forward")  # decode steps went through the graph buffers
    found = events(path, "fp8_scales")
    return (found[0]["k"], found[0]["v"]), runs


@pytest.mark.parametrize("preset", CHUNK_PRESETS)
def test_chunked_prefill_matches_the_hf_fp8_oracle(preset, chunked_runs, prompts, hf_model):
    scales, runs = chunked_runs
    assert all(len(chunks) > 1 for _, chunks in runs[preset])
    horizons = [assert_matches_oracle(got, hf_model, prompt, preset, scales, MAX_TOKENS, prefill_chunks=chunks)[1]
                for prompt, (got, chunks) in zip(prompts, runs[preset])]
    assert_most_tokens_compared(horizons, MAX_TOKENS)
