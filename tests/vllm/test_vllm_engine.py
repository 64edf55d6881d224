"""Steps 3-5: the plugin inside a real vLLM engine (CPU, multiprocess), on the tiny random Llama.

Two engine starts for the whole module: stock vLLM (CPU_ATTN) and one engine with the plugin on
(snapkv by default; other presets and ``none`` per request through ``SamplingParams.extra_args``).
The plugin's engine has a pool of 1280 head-blocks: one uncompressed 2k-token request
(4 layers * 2 heads * 128 blocks = 1024) fits, two do not.
"""
import gc
import os
import random

import pytest
import torch

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import PRESET_NAMES, CompressionConfig
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.vllm import runtime

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
PROMPT_LENS = (150, 230, 310)
BASE = {"policy": "snapkv", "budget": 64, "window": 16, "decode_slack": None}
POOL_BLOCKS = 1280
ENGINE = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=2304, max_num_batched_tokens=4096,
              max_num_seqs=8, gpu_memory_utilization=0.15)


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]  # no <unk>/<s>/</s>


@pytest.fixture(scope="module")
def vocab(tiny_model_dir):
    import json

    return json.load(open(os.path.join(tiny_model_dir, "config.json")))["vocab_size"]


@pytest.fixture(scope="module")
def prompts(vocab):
    return [prompt_ids(n, seed, vocab) for seed, n in enumerate(PROMPT_LENS)]


def greedy(max_tokens=MAX_TOKENS, extra=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)


def generate_outputs(llm, prompts, params):
    """vLLM's RequestOutputs of ``prompts`` (in order)."""
    from vllm.inputs import TokensPrompt

    if not isinstance(params, list):
        params = [params] * len(prompts)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def generate(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in generate_outputs(llm, prompts, params)]


def plugin_llm(model_dir: str, events_path: str, config: dict, **engine):
    """An LLM with the plugin on (``config``: kv_compression options) whose EngineCore and worker
    processes log their events to ``events_path`` (they inherit the variable at start)."""
    from vllm import LLM

    os.environ[runtime.EVENTS_ENV] = events_path
    try:
        return LLM(model=model_dir, additional_config={"kv_compression": config}, **engine)
    finally:
        del os.environ[runtime.EVENTS_ENV]


def shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def stock_tokens(tiny_model_dir, prompts):
    """Greedy tokens of stock vLLM (no kv_compression), then the engine is shut down."""
    from vllm import LLM

    llm = LLM(model=tiny_model_dir, **ENGINE)
    tokens = generate(llm, prompts, greedy())
    shutdown(llm)
    return tokens


@pytest.fixture(scope="module")
def events_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("events") / "events.jsonl")


@pytest.fixture(scope="module")
def compress_config(head_scores_path):
    return {**BASE, "headkv_scores": head_scores_path}


@pytest.fixture(scope="module")
def llm(tiny_model_dir, stock_tokens, events_path, compress_config):
    """The plugin's engine (starts after the stock one is gone); its processes log events."""
    engine = plugin_llm(tiny_model_dir, events_path, compress_config, num_gpu_blocks_override=POOL_BLOCKS, **ENGINE)
    yield engine
    shutdown(engine)


def events(path, kind=None, since=0):
    return [e for e in runtime.read_events(path)[since:] if kind is None or e["kind"] == kind]


# ---- (a) policy none through our backend == stock vLLM --------------------------------------------
def test_none_equals_stock_vllm(llm, prompts, stock_tokens):
    assert generate(llm, prompts, greedy(extra={"kv_compression": "none"})) == stock_tokens


# ---- (b) + (c) every preset through LLM.generate, token for token against the HF oracle -----------
@pytest.fixture(scope="module")
def preset_runs(llm, prompts, compress_config, events_path):
    """{preset: tokens per prompt} from ONE generate call mixing all presets and prompts."""
    presets = [p for p in PRESET_NAMES if p != "none"]
    since = len(runtime.read_events(events_path))
    params = [greedy(extra={"kv_compression": p}) for p in presets for _ in prompts]
    tokens = generate(llm, [q for _ in presets for q in prompts], params)
    runs = {p: tokens[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(presets)}
    # LLM.generate numbers its requests "<counter>-<suffix>" in submission order
    found = events(events_path, "compressed", since)
    first = min(int(e["req_id"].split("-")[0]) for e in found)
    compressed = {}
    for e in found:
        index = int(e["req_id"].split("-")[0]) - first
        compressed[presets[index // len(prompts)], index % len(prompts)] = e
    return runs, compressed


def test_every_preset_compresses(preset_runs, prompts):
    runs, compressed = preset_runs
    assert len(compressed) == len(runs) * len(prompts)
    for e in compressed.values():
        assert e["blocks_after"] < e["blocks_before"]  # every prompt is longer than the budget
    for tokens in runs.values():
        assert all(len(t) == MAX_TOKENS for t in tokens)


@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "none"])
def test_preset_matches_hf_oracle(preset, preset_runs, prompts, hf_model, compress_config):
    runs, compressed = preset_runs
    policy = build_policy(CompressionConfig.from_dict({**compress_config, "policy": preset}))
    for i, (prompt, got) in enumerate(zip(prompts, runs[preset])):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=MAX_TOKENS)
        assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"
        # per-head lengths after compression agree with the oracle's as well
        assert compressed[preset, i]["lens"] == want.retained_per_layer.tolist()


# ---- decode-time recompression (decode_slack) against the HF oracle's recompress_slack -------------
DECODE_SLACK, DECODE_TOKENS = 3, 24


@pytest.fixture(scope="module")
def decode_runs(llm, prompts, events_path):
    """{preset: (tokens, recompression phase) per prompt} with heads recompressed every
    DECODE_SLACK engine steps, and the decode-time compression events."""
    presets = [p for p in PRESET_NAMES if p != "none"]
    since = len(runtime.read_events(events_path))
    params = [greedy(DECODE_TOKENS, {"kv_compression": p, "kv_compression_config": {"decode_slack": DECODE_SLACK}})
              for p in presets for _ in prompts]
    outs = generate_outputs(llm, [q for _ in presets for q in prompts], params)
    found = events(events_path, "compressed", since)
    phases = runtime.recompression_phases(found, [o.request_id for o in outs], DECODE_SLACK)
    runs = [(list(o.outputs[0].token_ids), phase) for o, phase in zip(outs, phases)]
    decoded = [e for e in found if e["what"] == "decode"]
    return {p: runs[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(presets)}, decoded


@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "none"])
def test_decode_recompression_matches_hf_oracle(preset, decode_runs, prompts, hf_model, compress_config):
    runs, decoded = decode_runs
    assert len(decoded) >= len(runs) * len(prompts)  # every request was recompressed while decoding
    # requests decoding together were recompressed together: fewer distinct steps than recompressions
    assert len({e["step"] for e in decoded}) < len(decoded)
    policy = build_policy(CompressionConfig.from_dict({**compress_config, "policy": preset}))
    for prompt, (got, phase) in zip(prompts, runs[preset]):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=DECODE_TOKENS,
                           recompress_slack=DECODE_SLACK, recompress_phase=phase)
        assert want.recompressions > 0
        assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"


def test_a_registered_scorer_named_per_request_matches_hf_oracle(llm, prompts, hf_model, compress_config,
                                                                 events_path):
    """KeyDiff, a part added with its registration line alone, named per request as snapkv's scorer:
    the engine scores it from dense keys (it reads them, so not from the pages) at the prefill and
    at decode-time recompression, token for token and head for head against the HF oracle."""
    options = {"scorer": "keydiff", "decode_slack": DECODE_SLACK}
    since = len(runtime.read_events(events_path))
    outs = generate_outputs(llm, prompts, [greedy(DECODE_TOKENS, {"kv_compression_config": options}) for _ in prompts])
    found = events(events_path, "compressed", since)
    phases = runtime.recompression_phases(found, [o.request_id for o in outs], DECODE_SLACK)
    policy = build_policy(CompressionConfig.from_dict({**compress_config, **options}))
    prefill = {e["req_id"]: e["lens"] for e in found if e["what"] == "prefill"}
    for prompt, out, phase in zip(prompts, outs, phases):
        want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=DECODE_TOKENS,
                           recompress_slack=DECODE_SLACK, recompress_phase=phase)
        assert want.recompressions > 0
        assert list(out.outputs[0].token_ids) == want.tokens, f"prompt of {len(prompt)} tokens"
    assert len(prefill) == len(prompts) and any(e["what"] == "decode" for e in found)


def test_compression_changes_outputs(preset_runs, stock_tokens):
    """The oracle agreement above is not vacuous: compression changes the greedy continuation."""
    runs, compressed = preset_runs
    changed = sum(t != s for tokens in runs.values() for t, s in zip(tokens, stock_tokens))
    print(f"runs differing from the full cache: {changed} of {len(runs) * len(stock_tokens)}")
    assert changed >= len(runs)


def test_hf_oracle_without_compression_equals_stock(prompts, hf_model, stock_tokens):
    """Sanity check of the oracle itself on the same weights."""
    got = [hf.generate(hf_model, torch.tensor(p), None, max_new_tokens=MAX_TOKENS).tokens for p in prompts]
    assert got == stock_tokens


# ---- (d) block accounting -----------------------------------------------------------------------
def test_blocks_return_to_the_pool(llm, prompts, events_path):
    since = len(runtime.read_events(events_path))
    engine = llm.llm_engine
    from vllm.inputs import TokensPrompt

    for i, prompt in enumerate(prompts * 2):
        engine.add_request(f"acct-{i}", TokensPrompt(prompt_token_ids=prompt),
                           greedy(max_tokens=1 if i % 3 == 0 else 12))
    for _ in range(4):
        engine.step()
    engine.abort_request(["acct-1", "acct-4"])
    while engine.has_unfinished_requests():
        engine.step()
    generate(llm, prompts[:1], greedy(max_tokens=1))  # one more step: the scheduler logs the pool state
    initial = events(events_path, "manager_init")[0]["free"]
    steps = events(events_path, "step", since)
    assert all(s["free"] <= initial for s in steps)
    assert min(s["free"] for s in steps) < initial  # the batch did hold blocks
    idle = [s for s in steps if s["requests"] == 0]
    assert idle and all(s["free"] == initial for s in idle)
    assert events(events_path, "blocks_returned", since)


def test_runner_block_table_is_one_column(llm, events_path):
    """vLLM's per-request block table is left unused (the worker keeps its own): one column (vLLM
    pads rows to 128 / block_size columns), so no step copies L*H*max_len/bs block ids per request
    to the device (here 4 * 2 * 144 = 1152 columns)."""
    assert [e["columns"] for e in events(events_path, "block_tables")] == [[128 // 16]]


# ---- (e) admission ------------------------------------------------------------------------------
def peak_requests(path, since):
    return max(s["requests"] for s in events(path, "step", since))


def test_compression_admits_more_requests(llm, vocab, events_path):
    long_prompts = [prompt_ids(2000, 100 + i, vocab) for i in range(5)]
    since = len(runtime.read_events(events_path))
    generate(llm, long_prompts, greedy(max_tokens=8, extra={"kv_compression": "none"}))
    full = peak_requests(events_path, since)
    since = len(runtime.read_events(events_path))
    generate(llm, long_prompts, greedy(max_tokens=8, extra={"kv_budget": 128}))
    compressed = peak_requests(events_path, since)
    print(f"peak concurrent requests: uncompressed {full}, budget 128 {compressed}")
    assert full == 1
    assert compressed >= 3 * full
