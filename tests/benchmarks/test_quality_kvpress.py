"""The parts of benchmarks/quality_kvpress.py that need no kvpress (it runs in its own environment,
which CI does not install): the average-pooling scorer, our policies at kvpress's settings, the
selection agreement and perplexity's one computation for both settings."""
import benchmark_modules
import pytest
import torch

from vllm_kvcompress.policies.observation import LayerObservation
from vllm_kvcompress.policies.reduction import RetainedLayer

side = benchmark_modules.load("quality_kvpress")


def _observation(scores_row: torch.Tensor, window: int) -> LayerObservation:
    """One KV head, one query head, whose window attention sums to ``scores_row`` on the prefix:
    the window queries attend through keys that are one-hot in a wide head dimension."""
    n = scores_row.shape[0]
    keys = torch.eye(n)[None] * 50.0  # key j = 50 * e_j
    logits = torch.log(scores_row.clamp(min=1e-30)) / 50.0  # q . k_j = log(score_j)
    queries = logits[None, None].expand(1, window, n).clone() * (n ** 0.5)  # undo the 1/sqrt(d) scale
    return LayerObservation(queries, keys, keys.clone(), layer_idx=0)


def test_avg_pool_scorer_averages_neighbours_with_zero_padding():
    obs = _observation(torch.tensor([0.0, 0.0, 6.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0]), window=3)
    scores = side.AvgPoolSnapKVScorer(pool_kernel=3).score(obs)
    probabilities = obs.window_mass(power=1)[0, :7]  # the prefix: 7 tokens
    expected = torch.nn.functional.avg_pool1d(probabilities[None, None], 3, stride=1, padding=1)[0, 0]
    expected[-1] = (probabilities[-2] + probabilities[-1]) / 3  # the window beyond is zero, not pooled in
    torch.testing.assert_close(scores[0, :7], expected)
    assert torch.all(scores[0, 7:] == 0)  # the window scores 0 (always kept)
    # by hand: position 3 averages positions 2, 3, 4
    torch.testing.assert_close(scores[0, 3], probabilities[2:5].sum() / 3)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "snapkv-avgpool", "adakv-avgpool", "streamingllm"])
def test_our_policies_at_kvpress_settings(name):
    policy = side.our_policy(name, tokens_per_head=100)
    assert policy.budget.tokens == 100
    if name == "streamingllm":
        assert policy.sink == 4
        return
    assert policy.window == side.KVPRESS_WINDOW == 64
    assert policy.scorer.pool_kernel == side.KVPRESS_KERNEL == 5
    assert isinstance(policy.scorer, side.AvgPoolSnapKVScorer) == name.endswith("-avgpool")


def test_agreement_is_the_share_of_their_positions_we_keep():
    theirs = [[{0, 1, 2, 3}, {4, 5}], [{7}, {1, 2}]]
    keep = torch.tensor([[0, 1, 2, 9], [4, 5, -1, -1]])
    lengths = torch.tensor([4, 2])
    ours = [RetainedLayer(keep, torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), lengths),
            RetainedLayer(torch.tensor([[8, -1], [1, 2]]), torch.zeros(2, 2, 1), torch.zeros(2, 2, 1),
                          torch.tensor([1, 2]))]
    result = side.agreement(theirs, ours)
    assert result == {"mean": round((3 / 4 + 1 + 0 + 1) / 4, 4), "min": 0.0, "heads_with_other_length": 0, "heads": 4}
    shorter = [RetainedLayer(keep, torch.zeros(2, 4, 1), torch.zeros(2, 4, 1), torch.tensor([3, 2]))]
    assert side.agreement(theirs[:1], shorter)["heads_with_other_length"] == 1


def test_perplexity_is_recorded_once_per_setting():
    prompt = {"task": "perplexity", "sample": 0}
    results = [{"task": "perplexity", "sample": 0, "setting": "question-aware", "policy": "none",
                "budget_fraction": 1.0, "nll": 2.0}]
    done = {side.quality.sample_key(r) for r in results}
    side.copy_perplexity(prompt, list(side.quality.SETTINGS), results, done)
    side.copy_perplexity(prompt, list(side.quality.SETTINGS), results, done)  # twice: nothing doubles
    assert [r["setting"] for r in results] == list(side.quality.SETTINGS)
    assert results[1]["nll"] == 2.0


def test_unknown_press_lists_the_valid_ones():
    with pytest.raises(SystemExit, match="SnapKVPress"):
        side.make_press("NoSuchPress", 0.5)
