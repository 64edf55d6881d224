"""The demo (python -m vllm_kvcompress.tools.demo): option checks without a model, one short real run."""
import re

import pytest
import torch

from vllm_kvcompress.tools import demo
from vllm_kvcompress.policies.head_scores import HeadScores


@pytest.fixture
def no_model(monkeypatch):
    """Make loading SmolLM2 an error: option problems must be reported before it."""

    def refuse():
        raise AssertionError("the demo loaded the model before checking its options")

    monkeypatch.setattr(demo, "load_smollm2", refuse)


def write_scores(path, num_layers: int, num_kv_heads: int) -> str:
    gen = torch.Generator().manual_seed(0)
    retrieval, reasoning = (torch.rand(num_layers, num_kv_heads, generator=gen).tolist() for _ in range(2))
    HeadScores("test", retrieval, reasoning).save(path)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--policy", "nope"], "valid policies"),
        (["--budget", "-3"], "budget"),
        (["--budget", "lots"], "budget must be a token count"),
        (["--context-tokens", "10"], "--context-tokens must be >= 64"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_options_are_refused_before_loading(argv, message, no_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_headkv_without_scores_names_the_missing_file(tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.setattr(demo, "SHIPPED_HEAD_SCORES", tmp_path / "missing.json")
    with pytest.raises(SystemExit):
        demo.main(["--policy", "headkv-r2"])
    err = capsys.readouterr().err
    assert "missing.json is missing" in err and "--head-scores PATH" in err


def test_headkv_uses_the_shipped_scores_when_present(tmp_path, monkeypatch):
    shipped = write_scores(tmp_path / "shipped.json", 30, 3)
    monkeypatch.setattr(demo, "SHIPPED_HEAD_SCORES", tmp_path / "shipped.json")
    _, config = demo.parse_args(["--policy", "headkv"])
    assert config.headkv_scores == shipped
    own = write_scores(tmp_path / "own.json", 30, 3)
    _, config = demo.parse_args(["--policy", "headkv", "--head-scores", own])
    assert config.headkv_scores == own
    _, config = demo.parse_args(["--policy", "snapkv", "--head-scores", own])  # not a headkv preset
    assert config.headkv_scores is None


@pytest.mark.parametrize(
    "budget, described", [("128", "128 tokens per KV head"), ("0.1", "10% of the prompt per KV head")]
)
def test_budgets_are_described_as_counts_or_fractions(budget, described):
    _, config = demo.parse_args(["--budget", budget])
    assert demo.describe_budget(config) == described


def test_an_unreadable_scores_file_is_refused_before_loading(tmp_path, no_model):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        demo.main(["--policy", "headkv", "--head-scores", str(broken)])


def test_freed_summary_counts_tokens_bytes_and_head_blocks():
    # prompt of 40 tokens: 3 head-blocks of 16 per head, 4 heads -> 12. Kept 3, 16, 17, 40 tokens:
    # 1 + 1 + 2 + 3 = 7 blocks, 160 - 76 = 84 tokens freed, each 2 x 8 values x 2 bytes = 32 bytes
    retained = torch.tensor([[3, 16], [17, 40]])
    assert demo.freed_summary(retained, 40, head_dim=8, bytes_per_value=2) == (
        f"freed: 84 tokens = {84 * 32 / 2**20:.1f} MiB of K/V at 2 bytes a value; 5 of 12 head-blocks of 16 tokens")


def test_retained_table_lists_each_layer_and_the_totals():
    retained = torch.tensor([[3, 5], [4, 4], [10, 2]])
    lines = demo.retained_table(retained, prompt_len=12).splitlines()
    assert lines[0].split() == ["layer", "h0", "h1", "total"]
    assert [line.split() for line in lines[1:4]] == [["0", "3", "5", "8"], ["1", "4", "4", "8"], ["2", "10", "2", "12"]]
    assert lines[4] == "all 3 layers x 2 KV heads: 28 of 72 tokens kept (38.9%)"


# ---------------------------------------------------------------------------------------------
# a short real run on SmolLM2
# ---------------------------------------------------------------------------------------------

ROW = re.compile(r"^\s*(\d+)((?:\s+\d+)+)$")


@pytest.mark.slow
def test_demo_runs_end_to_end(capsys):
    from vllm_kvcompress.tools.models import load_smollm2
    from vllm_kvcompress.tools.synthetic import make_sample

    budget, context, seed = 48, 200, 1
    argv = ["--budget", str(budget), "--context-tokens", str(context), "--max-new-tokens", "6", "--seed", str(seed)]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out

    _, tokenizer = load_smollm2()
    sample = make_sample(demo.TASK, tokenizer, context, seed)
    prompt_len = sample.prompt_ids(tokenizer).shape[1]
    assert f"prompt: {prompt_len} tokens" in out
    assert sample.needles[0] in out and f"expected answer: {sample.answers[0]}" in out
    assert "policy: snapkv (scorer snapkv, allocator uniform, reducer topk)" in out

    # the table: one row per layer, the per-head lengths summing to the row total
    rows = []
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            *heads, total = map(int, match.group(2).split())
            assert sum(heads) == total
            rows.append((int(match.group(1)), heads))
    assert [layer for layer, _ in rows] == list(range(30))
    assert all(heads == [budget] * 3 for _, heads in rows)  # SnapKV: every head the same budget
    kept = sum(sum(heads) for _, heads in rows)
    assert kept == budget * 30 * 3
    assert f"{kept} of {prompt_len * 90} tokens kept ({kept / (prompt_len * 90):.1%})" in out
    assert f"freed: {prompt_len * 90 - kept} tokens = " in out

    # both runs: the text, and a verdict that agrees with it
    for label in ("full cache", f"snapkv ({budget} tokens per KV head)"):
        block = out.split(f"\n{label}:\n", 1)[1]
        output = re.search(r"output: '(.*)'", block).group(1)
        verdict = re.search(r"answer found: (yes|no)  \((\d+) tokens in [\d.]+ s", block)
        assert verdict.group(1) == ("yes" if sample.answers[0] in output else "no")
        assert 1 <= int(verdict.group(2)) <= 6


@pytest.mark.slow
def test_demo_refuses_scores_of_another_model(tmp_path):
    wrong = write_scores(tmp_path / "tiny.json", 4, 2)
    with pytest.raises(SystemExit, match="calibrate"):
        demo.main(["--policy", "headkv", "--head-scores", wrong, "--context-tokens", "100"])


@pytest.mark.slow
def test_the_default_demo_finds_the_number(capsys):
    """README's first command: the default policy and budget answer the default prompt as the full
    cache does."""
    assert demo.main(["--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    verdicts = re.findall(r"answer found: (yes|no)", out)
    assert verdicts == ["yes", "yes"], out
    assert "7427633" in out.split("snapkv (128 tokens per KV head):", 1)[1]
