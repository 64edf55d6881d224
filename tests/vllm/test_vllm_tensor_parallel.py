"""Compression under tensor parallelism in a real engine: vLLM's CPU build with
``tensor_parallel_size=2`` (two worker processes, one KV head of the tiny model's two on each,
gathering scores through vLLM's own tensor-parallel group) gives the HF oracle's greedy tokens and
per-head lengths for every preset -- the same oracle the single-worker engine matches
(``test_vllm_engine.py``), so TP=2 equals TP=1 -- and every head-block comes back.

One engine start for the module (~1 minute on 2 cores). The rank logic in isolation, with the
ranks' heads checked row for row: ``test_tensor_parallel.py``.
"""
import os

import pytest
import torch
from test_vllm_engine import (  # noqa: F401 - prompts, vocab: fixtures
    BASE, DECODE_SLACK, DECODE_TOKENS, ENGINE, MAX_TOKENS, POOL_BLOCKS, events, generate,
                              generate_outputs, greedy, plugin_llm, prompts, shutdown, vocab)

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import PRESET_NAMES, CompressionConfig
from vllm_kvcompress.policies.presets import build_policy
from vllm_kvcompress.vllm import runtime

pytestmark = pytest.mark.slow

SIZE = 2


def _config(compress_config, preset):
    return CompressionConfig.from_dict({**compress_config, "policy": preset})


@pytest.fixture(scope="module")
def compress_config(head_scores_path):
    return {**BASE, "headkv_scores": head_scores_path}


PRESETS = [p for p in PRESET_NAMES if p != "none"]


@pytest.fixture(scope="module")
def events_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp-events") / "events.jsonl")


@pytest.fixture(scope="module")
def tp_llm(tiny_model_dir, events_path, compress_config):
    # one OpenMP thread per worker, each on its own core (vLLM's CPU workers bind by rank)
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        engine = plugin_llm(tiny_model_dir, events_path, compress_config, num_gpu_blocks_override=POOL_BLOCKS,
                            tensor_parallel_size=SIZE, distributed_executor_backend="mp", **ENGINE)
    finally:
        if previous is None:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def prefill_runs(tp_llm, prompts, events_path):
    """{preset: tokens per prompt}, {(preset, prompt index): its compression event}: one generate."""
    presets = PRESETS
    since = len(events(events_path))
    params = [greedy(extra={"kv_compression": p}) for p in presets for _ in prompts]
    outs = generate_outputs(tp_llm, [q for _ in presets for q in prompts], params)
    order = {o.request_id: i for i, o in enumerate(outs)}
    compressed = {}
    for e in events(events_path, "compressed", since):
        index = order[e["req_id"].rsplit("-", 1)[0]]
        compressed[presets[index // len(prompts)], index % len(prompts)] = e
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    return {p: tokens[i * len(prompts):(i + 1) * len(prompts)] for i, p in enumerate(presets)}, compressed


def test_two_ranks_match_the_hf_oracle(prefill_runs, prompts, hf_model, compress_config):
    runs, compressed = prefill_runs
    assert len(compressed) == len(runs) * len(prompts)
    for preset, tokens in runs.items():
        policy = build_policy(_config(compress_config, preset))
        for i, (prompt, got) in enumerate(zip(prompts, tokens)):
            want = hf.generate(hf_model, torch.tensor(prompt), policy, max_new_tokens=MAX_TOKENS)
            assert got == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"
            # every head of the model, both ranks' (rank 0 logs what every rank knows)
            assert compressed[preset, i]["lens"] == want.retained_per_layer.tolist(), preset
            assert compressed[preset, i]["blocks_after"] < compressed[preset, i]["blocks_before"]


def test_decode_recompression_on_two_ranks_matches_the_hf_oracle(tp_llm, prompts, hf_model, compress_config,
                                                                 events_path):
    presets = ["snapkv", "ems", "adakv", "headkv-r2", "windowkv", "zigzag"]
    since = len(events(events_path))
    params = [greedy(DECODE_TOKENS, {"kv_compression": p, "kv_compression_config": {"decode_slack": DECODE_SLACK}})
              for p in presets for _ in prompts]
    outs = generate_outputs(tp_llm, [q for _ in presets for q in prompts], params)
    found = events(events_path, "compressed", since)
    assert sum(e["what"] == "decode" for e in found) >= len(outs)
    phases = runtime.recompression_phases(found, [o.request_id for o in outs], DECODE_SLACK)
    for i, (out, phase) in enumerate(zip(outs, phases)):
        preset, prompt = presets[i // len(prompts)], prompts[i % len(prompts)]
        want = hf.generate(hf_model, torch.tensor(prompt), build_policy(_config(compress_config, preset)),
                           max_new_tokens=DECODE_TOKENS, recompress_slack=DECODE_SLACK, recompress_phase=phase)
        assert list(out.outputs[0].token_ids) == want.tokens, f"{preset}, prompt of {len(prompt)} tokens"


def test_every_head_block_comes_back(tp_llm, prompts, events_path):
    generate(tp_llm, prompts[:1], greedy(max_tokens=1))  # one more step: the scheduler logs the pool state
    initial = events(events_path, "manager_init")[0]["free"]
    steps = events(events_path, "step")
    assert min(s["free"] for s in steps) < initial
    idle = [s for s in steps if s["requests"] == 0]
    assert idle and idle[-1]["free"] == initial
    # only rank 0's worker logs (the other compresses the same requests to the same lengths)
    assert len({e["pid"] for e in events(events_path, "compressed")}) == 1
