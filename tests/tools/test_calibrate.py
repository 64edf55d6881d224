"""HeadKV calibration: per-step credits on hand-made attention, decoding with attention on a tiny
model, the scores file, the CLI and the shipped SmolLM2 scores."""
import importlib.resources
import subprocess
import sys

import pytest
import torch

from vllm_kvcompress.tools import calibrate as cal
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.reference.hf import generate
from vllm_kvcompress.tools.models import tiny_llama
from vllm_kvcompress.tools.synthetic import make_reasoning_sample, make_sample

SHIPPED = importlib.resources.files("vllm_kvcompress") / "data" / "smollm2-head-scores.json"


@pytest.fixture(scope="module")
def tok():
    return cal.byte_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=512)


def one_hot_rows(positions: list[list[int]], length: int) -> torch.Tensor:
    """float [L, H, length]: head (l, h) puts all its attention on positions[l][h]."""
    rows = torch.zeros(len(positions), len(positions[0]), length)
    for layer, heads in enumerate(positions):
        for head, position in enumerate(heads):
            rows[layer, head, position] = 1.0
    return rows


def test_retrieval_credit_needs_argmax_on_a_matching_needle_token():
    prompt = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 7, 13])
    needle = (3, 7)  # tokens 8 9 10 11
    # layer 0: head 0 on needle token 9 (generated 9: a copy), head 1 on needle token 10 (not the
    # generated one), head 2 on position 8 (outside the needle); layer 1: outside, copy, no match
    attention = one_hot_rows([[4, 5, 8], [1, 4, 3]], length=10)
    credit = cal.retrieval_step_credit(attention, token=9, prompt_ids=prompt, span=needle)
    assert credit.tolist() == [[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]]


def test_retrieval_credit_ignores_a_matching_token_outside_the_needle():
    prompt = torch.tensor([7, 1, 2, 7, 3])
    attention = one_hot_rows([[0, 3]], length=5)
    credit = cal.retrieval_step_credit(attention, token=7, prompt_ids=prompt, span=(2, 5))
    assert credit[0].tolist() == pytest.approx([0.0, 1 / 3])


def test_reasoning_credit_is_top_k_mass_inside_the_evidence():
    # evidence = positions 2..4 (k = 3); the head's top 3 are 7 (0.4), 2 (0.3), 0 (0.2):
    # only position 2 is evidence, so the credit is 0.3 / (k * answer_len) = 0.3 / 6
    row = torch.tensor([0.2, 0.0, 0.3, 0.1, 0.0, 0.0, 0.0, 0.4])
    # a second head's top 3 are 2 (0.5), 3 and 6 (0.25 each): 0.75 of it is on the evidence
    other = torch.tensor([0.0, 0.0, 0.5, 0.25, 0.0, 0.0, 0.25, 0.0])
    attention = torch.stack([row, other])[None]  # [1, 2, 8]
    credit = cal.reasoning_step_credit(attention, span=(2, 5), answer_len=2)
    assert credit[0].tolist() == pytest.approx([0.3 / 6, 0.75 / 6])


def test_reasoning_credit_is_full_when_all_attention_is_on_the_evidence():
    attention = torch.zeros(1, 1, 10)
    attention[0, 0, 4:8] = 0.25
    credit = cal.reasoning_step_credit(attention, span=(4, 8), answer_len=1)
    assert credit.item() == pytest.approx(0.25)  # mass 1 / k, k = 4: a head maxes at 1/k per step


def test_query_heads_are_summed_per_kv_group():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert cal.group_query_heads(scores, num_kv_heads=2).tolist() == [[6.0, 15.0]]
    assert cal.group_query_heads(scores, num_kv_heads=6).tolist() == scores.tolist()
    with pytest.raises(ValueError):
        cal.group_query_heads(scores, num_kv_heads=4)


def test_normalised_sums_to_one_and_keeps_zeros():
    assert cal.normalised(torch.tensor([[1.0, 3.0]])).tolist() == [[0.25, 0.75]]
    assert cal.normalised(torch.zeros(2, 2)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_token_span_covers_the_needle(tok):
    sample = make_sample("niah_single", tok, 800, seed=0, depth=0.5)
    ids, needle, evidence = cal.prompt_with_spans(sample, tok)
    assert tok.decode(ids[needle[0] : needle[1]]) == sample.needles[0]
    assert evidence == needle  # no separate evidence: the needle is the evidence


def test_evidence_span_is_inside_the_reasoning_passage(tok):
    sample = make_reasoning_sample(tok, 800, seed=2)
    ids, needle, evidence = cal.prompt_with_spans(sample, tok)
    assert needle[0] <= evidence[0] < evidence[1] <= needle[1]
    assert tok.decode(ids[evidence[0] : evidence[1]]) == sample.evidence[0]


def test_answer_steps_pick_the_tokens_of_the_answer(tok):
    tokens = tok.encode("It is 1234567.", add_special_tokens=False)
    steps = cal.answer_steps(tok, tokens, "1234567")
    assert steps == list(range(6, 13))
    assert cal.answer_steps(tok, tokens, "7654321") == []


def test_traced_greedy_decodes_like_plain_greedy(tiny):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0))
    before = tiny.config._attn_implementation
    traced = list(cal.traced_greedy(tiny, ids, max_new_tokens=6))
    assert [t for t, _ in traced] == generate(tiny, ids, None, max_new_tokens=6).tokens
    assert tiny.config._attn_implementation == before
    first_attention = traced[0][1]
    assert first_attention.shape == (2, 4, 40)
    # the first query sees only the prompt, so its rows sum to 1; later ones share mass with new tokens
    assert torch.allclose(first_attention.sum(-1), torch.ones(2, 4), atol=1e-5)
    assert (traced[-1][1].sum(-1) < 1 + 1e-5).all()


def test_trace_prompt_sums_the_step_credits(tiny):
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1))
    trace = cal.trace_prompt(tiny, ids, (5, 12), (8, 10), max_new_tokens=4)
    steps = list(cal.traced_greedy(tiny, ids, max_new_tokens=4))
    assert trace.tokens == [t for t, _ in steps]
    expected = sum(cal.retrieval_step_credit(a, t, ids, (5, 12)) for t, a in steps)
    assert torch.allclose(trace.retrieval, expected)
    assert trace.reasoning_steps.shape == (4, 2, 4)


def test_trace_prompt_stops_when_done(tiny):
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1))
    trace = cal.trace_prompt(tiny, ids, (5, 12), (8, 10), max_new_tokens=10, done=lambda tokens: len(tokens) == 3)
    assert len(trace.tokens) == 3


def test_trace_prompt_rejects_spans_outside_the_prompt(tiny):
    with pytest.raises(ValueError, match="span"):
        cal.trace_prompt(tiny, torch.arange(10), (5, 12), (5, 6), max_new_tokens=1)


def test_calibrate_writes_a_file_of_the_model_shape(tiny, tok, tmp_path):
    scores = cal.calibrate(tiny, tok, "tiny", num_prompts=2, context_tokens=400, seed=3, max_new_tokens=3, log=print)
    assert scores.shape == (2, 2)
    for kind in ("retrieval", "retrieval_reasoning"):
        total = scores.tensor(kind).sum().item()
        assert total == pytest.approx(1.0) or total == 0.0
    # a random model answers nothing: the fallback to all prompts is on record
    assert set(scores.calibration["fallback"]) == {"retrieval", "retrieval_reasoning"}
    assert scores.calibration["num_prompts"] == 2 and scores.calibration["seed"] == 3
    assert 380 <= scores.calibration["prompt_lengths"]["min"] <= scores.calibration["prompt_lengths"]["max"] <= 420
    path = tmp_path / "scores.json"
    scores.save(path)
    loaded = HeadScores.load(path)
    assert loaded == scores
    loaded.check_model(2, 2)


def test_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "vllm_kvcompress.tools.calibrate", "tiny-random", "--out", str(out)]
    cmd += ["--num-prompts", "1", "--context-tokens", "300", "--max-new-tokens", "2", "--seed", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[1/1] retrieval" in done.stderr  # progress goes to stderr
    scores = HeadScores.load(out)
    assert scores.model == "tiny-random" and scores.calibration["seed"] == 5
    scores.check_model(2, 2)


def test_cli_rejects_an_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="neither"):
        cal.main(["no-such-model", "--out", str(tmp_path / "x.json")])


def test_shipped_smollm2_scores_fit_smollm2():
    assert SHIPPED.is_file()
    scores = HeadScores.load(SHIPPED)
    scores.check_model(30, 3)  # SmolLM2-135M: 30 layers, 3 KV heads
    for kind in ("retrieval", "retrieval_reasoning"):
        values = scores.tensor(kind)
        assert values.sum().item() == pytest.approx(1.0)
        assert (values > 0).sum() >= 3  # a calibration that found heads, not an empty file
    assert scores.calibration["correct"]["retrieval"] >= 1
    assert scores.calibration["correct"]["retrieval_reasoning"] >= 1


def test_shipped_scores_build_both_headkv_presets():
    from vllm_kvcompress.policies.presets import build_policy

    for preset in ("headkv", "headkv-r2"):
        policy = build_policy(preset, budget=64, headkv_scores=str(SHIPPED))
        assert tuple(policy.allocator.head_scores.shape) == (30, 3)


@pytest.mark.slow
def test_smollm2_calibration_credits_the_needle():
    from vllm_kvcompress.tools.models import load_smollm2

    model, tokenizer = load_smollm2()
    scores = cal.calibrate(model, tokenizer, "smollm2", num_prompts=1, context_tokens=600, max_new_tokens=24, log=print)
    assert scores.calibration["correct"]["retrieval"] == 1  # it finds a needle at ~600 tokens
    assert (scores.tensor("retrieval") > 0).any()
