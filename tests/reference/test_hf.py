"""The HF reference path (vllm_kvcompress.reference.hf.generate) on random-weight Llamas and on SmolLM2.

References it is held to:

* ``hf_greedy`` -- plain HF greedy decoding with HF's own ``DynamicCache`` and SDPA attention;
  the ``none`` policy must match it bit for bit (tokens and logits).
* ``masked_greedy`` -- HF's own full ``DynamicCache``, with an attention function that lets each KV
  head see only the prompt positions the policy kept (plus every decoded token) and that runs at
  the positions HF itself assigns. An evicting policy's compacted per-head cache must give the
  same logits up to float rounding; that checks the per-head lengths, the padding masks, the GQA
  grouping and the decode positions at once.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from vllm_kvcompress.reference import hf
from vllm_kvcompress.policies.config import PRESET_NAMES, PRESETS
from vllm_kvcompress.policies.tensor_parallel import SINGLE
from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.tools.models import load_smollm2, tiny_llama
from vllm_kvcompress.policies.presets import build_policy

COMPRESSING = tuple(p for p in PRESET_NAMES if p != "none")
HEAD_ADAPTIVE = ("adakv", "ems", "headkv", "headkv-r2")  # budgets may differ between heads of a layer
LAYER_ADAPTIVE = ("pyramidkv", "zigzag", "zigzag-lmbo", "windowkv", "windowkv-tuned")  # heads of a layer share the layer's budget
UNIFORM = ("streamingllm", "snapkv", "ems-tuned")  # one budget for every head
WHOLE_WINDOWS = ("windowkv", "windowkv-tuned")  # a head keeps whole windows: up to window - 1 tokens below its budget
WINDOWKV_WINDOW = 8
MERGING = tuple(p for p in COMPRESSING if PRESETS[p].reducer == "ems-merge")  # EMS's evict-then-merge
EVICTING = tuple(p for p in COMPRESSING if p not in MERGING)  # retained rows are original rows
assert set(HEAD_ADAPTIVE + LAYER_ADAPTIVE + UNIFORM) == set(COMPRESSING)

# (num query heads, num KV heads): GQA 4:1, MHA 1:1, SmolLM2's 3:1 and MQA 8:1
TINY_SHAPES = {"gqa4": (8, 2), "mha": (4, 4), "gqa3": (9, 3), "mqa": (8, 1)}
TINY_LAYERS = 4
PROMPT_LEN = 96
BUDGET = 40  # per head, well below PROMPT_LEN
WINDOW = 8


# ---------------------------------------------------------------------------------------------
# builders and recorders
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny(shape: str):
    """A shared random-weight Llama of ``TINY_SHAPES[shape]`` (tests never change its weights)."""
    num_heads, num_kv_heads = TINY_SHAPES[shape]
    return tiny_llama(num_layers=TINY_LAYERS, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=16)


def random_prompt(length: int = PROMPT_LEN, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """int64 [1, length] random token ids."""
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def write_head_scores(path, num_layers: int, num_kv_heads: int, seed: int = 0) -> str:
    """A HeadKV scores file of random (distinct) scores for a model of this shape."""
    gen = torch.Generator().manual_seed(seed)
    retrieval, reasoning = (torch.rand(num_layers, num_kv_heads, generator=gen).tolist() for _ in range(2))
    HeadScores("test-model", retrieval, reasoning, {"made_by": "tests/reference/test_hf.py"}).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_scores(tmp_path_factory) -> dict[str, str]:
    """shape name -> head-scores file for that tiny model."""
    folder = tmp_path_factory.mktemp("head_scores")
    return {
        name: write_head_scores(folder / f"{name}.json", TINY_LAYERS, kv, seed=i)
        for i, (name, (_, kv)) in enumerate(TINY_SHAPES.items())
    }


def make_policy(preset: str, scores_path: str | None, **options):
    """build_policy(preset, **options), with the head-scores file for the headkv presets."""
    if preset.startswith("headkv"):
        options["headkv_scores"] = scores_path
    return build_policy(preset, **options)


class RecordingAllocator:
    """Delegates to ``inner`` and keeps every budget tensor it returned."""

    def __init__(self, inner):
        self.inner, self.budgets = inner, []

    def allocate(self, inp):
        budgets = self.inner.allocate(inp)
        self.budgets.append(budgets.clone())
        return budgets


class RecordingReducer:
    """Delegates to ``inner`` and keeps (observations, retained layers, protected) of every call."""

    def __init__(self, inner, calls=None):
        self.inner, self.calls = inner, [] if calls is None else calls

    def __getattr__(self, name):  # the reducer's flags (heads_independent, ranks_query_heads, ...)
        return getattr(self.inner, name)

    def for_request(self, observations, window, shards=SINGLE):
        window, inner = self.inner.for_request(observations, window, shards)
        return window, self if inner is self.inner else RecordingReducer(inner, self.calls)

    def reduce(self, observations, scores, budgets, protected):
        retained = self.inner.reduce(observations, scores, budgets, protected)
        self.calls.append((observations, retained, protected))
        return retained

    def reduce_heads(self, obs, scores, budgets, protected):
        retained = self.inner.reduce_heads(obs, scores, budgets, protected)
        self.calls.append(([obs], [retained], protected))
        return retained


def recorded(policy):
    """``policy`` whose allocator and reducer record what they produce."""
    return dataclasses.replace(
        policy, allocator=RecordingAllocator(policy.allocator), reducer=RecordingReducer(policy.reducer)
    )


class ForwardRecorder:
    """For every forward of ``model`` inside the ``with``: the position ids it was given (None when
    the caller let HF derive them) and the last row of its logits (float [vocab])."""

    def __init__(self, model):
        self.model, self.positions, self.logits = model, [], []

    def __enter__(self):
        self._hooks = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def _before(self, module, args, kwargs):
        positions = kwargs.get("position_ids")
        self.positions.append(None if positions is None else positions.clone())

    def _after(self, module, args, output):
        self.logits.append(output.logits[0, -1].clone())

    @property
    def logit_rows(self) -> torch.Tensor:
        """float [num_forwards, vocab]."""
        return torch.stack(self.logits)


@torch.no_grad()
def hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain HF greedy decoding with its own DynamicCache: (tokens, logits float [max_new_tokens, vocab])."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, cache=cache, use_cache=True).logits[0, -1]
    tokens, rows = [int(logits.argmax())], [logits]
    for _ in range(max_new_tokens - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1]
        tokens.append(int(logits.argmax()))
        rows.append(logits)
    return tokens, torch.stack(rows)


# -- the masked full-cache reference -------------------------------------------------------------

MASKED_ATTENTION = "kvcompress-test-masked"
_VISIBLE_PROMPT: dict[int, torch.Tensor] = {}  # layer -> bool [num_kv_heads, prompt_len], set per run


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over HF's full cache. query [1, Hq, q_len, d]; key/value [1, Hkv, kv_len, d].
    Prefill is causal; at decode each KV head sees its layer's ``_VISIBLE_PROMPT`` row plus every
    token decoded so far."""
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = (query.double() @ keys.double().transpose(-1, -2)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > 1:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril()[None, None]
    else:
        prompt_visible = _VISIBLE_PROMPT[module.layer_idx]
        decoded = torch.ones(prompt_visible.shape[0], kv_len - prompt_visible.shape[1], dtype=torch.bool)
        visible = torch.cat([prompt_visible, decoded], 1).repeat_interleave(group, 0)[None, :, None, :]
    output = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ values.double()
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED_ATTENTION, _masked_attention)
AttentionMaskInterface.register(MASKED_ATTENTION, lambda *args, **kwargs: None)  # it masks by itself


@torch.no_grad()
def masked_greedy(model, input_ids, retained, tokens: list[int], position_shift: int = 0):
    """Teacher-force ``tokens`` through the masked full-cache reference whose heads see the prompt
    positions in ``retained[layer].keep_idx``. Decode positions are HF's own (the true ones) plus
    ``position_shift``. Returns (logits float [len(tokens), vocab], the reference's argmax tokens)."""
    prompt_len = input_ids.shape[1]
    for layer, kept in enumerate(retained):
        visible = torch.zeros(kept.keep_idx.shape[0], prompt_len + 1, dtype=torch.bool)
        visible.scatter_(1, torch.where(kept.keep_idx >= 0, kept.keep_idx, prompt_len), True)
        _VISIBLE_PROMPT[layer] = visible[:, :prompt_len]
    previous = model.config._attn_implementation
    model.set_attn_implementation(MASKED_ATTENTION)
    try:
        cache = DynamicCache(config=model.config)
        rows = [model(input_ids=input_ids, cache=cache, use_cache=True).logits[0, -1]]
        for step, token in enumerate(tokens[:-1]):
            position = torch.tensor([[prompt_len + step + position_shift]])
            out = model(input_ids=torch.tensor([[token]]), position_ids=position, cache=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    finally:
        model.set_attn_implementation(previous)
        _VISIBLE_PROMPT.clear()
    logits = torch.stack(rows)
    return logits, logits.argmax(-1).tolist()


def check_compressed_run(result, policy, recorder, preset, budget, max_new_tokens, num_kv_heads):
    """What every compressed run promises: budgets as allocated, the total as asked, the
    head/layer adaptivity of its allocator, decoded tokens appended to every head, finite logits."""
    allocated = policy.allocator.budgets[0]
    num_layers = allocated.shape[0]
    assert len(result.tokens) == max_new_tokens
    assert result.retained_per_layer.shape == (num_layers, num_kv_heads)
    assert int(allocated.sum()) == budget * num_layers * num_kv_heads
    if preset in WHOLE_WINDOWS:
        kept = result.retained_per_layer
        assert bool((kept <= allocated).all() and (kept > allocated - WINDOWKV_WINDOW).all())
    else:
        assert torch.equal(result.retained_per_layer, allocated)
    assert int(result.retained_per_layer.min()) >= policy.floor(result.prompt_len)
    assert int(result.retained_per_layer.max()) <= result.prompt_len
    # the last generated token is never fed back, so each head grew by max_new_tokens - 1
    assert torch.equal(result.final_per_layer, result.retained_per_layer + max_new_tokens - 1)
    assert result.recompressions == 0
    assert torch.isfinite(recorder.logit_rows).all()

    spread_in_layer = result.retained_per_layer.max(1).values - result.retained_per_layer.min(1).values
    if preset in UNIFORM:
        assert (result.retained_per_layer == budget).all()
    elif preset in LAYER_ADAPTIVE:
        assert int(spread_in_layer.max()) <= 1  # a layer's budget split evenly (remainder to low heads)
    # not ems here: a random-weight model attends almost uniformly, so EMS's global term (causal
    # column sums) is the same early-first profile in every head and Ada-KV's competition ties
    if preset in HEAD_ADAPTIVE and preset != "ems" and num_kv_heads > 1:
        assert int(spread_in_layer.max()) > 0, f"{preset} gave every head of each layer the same budget"
    if preset == "pyramidkv":
        per_layer = result.retained_per_layer.sum(1)
        assert (per_layer[1:] <= per_layer[:-1]).all() and per_layer[0] > per_layer[-1]
    if preset.startswith("headkv"):
        # a more important head never gets less: every head keeps the same share of its own
        # (A - A // beta), the pool follows the scores
        scores = policy.allocator.inner.head_scores.reshape(-1)
        kept = result.retained_per_layer.reshape(-1)
        more_important = scores[:, None] > scores[None, :]
        assert (kept[:, None] >= kept[None, :])[more_important].all()
        assert kept.unique().numel() > 1


# ---------------------------------------------------------------------------------------------
# `none` is plain HF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_none_is_bit_identical_to_hf_greedy(shape):
    model = tiny(shape)
    ids = random_prompt()
    expected_tokens, expected_logits = hf_greedy(model, ids, 12)
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, ids, None, max_new_tokens=12)
    assert result.tokens == expected_tokens
    assert torch.equal(recorder.logit_rows, expected_logits)
    assert (result.retained_per_layer == PROMPT_LEN).all()
    assert (result.final_per_layer == PROMPT_LEN + 11).all()
    assert result.retained_fraction == 1.0
    # HF's generate() takes the same greedy path
    hf_out = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert hf_out[0, PROMPT_LEN:].tolist() == expected_tokens[: hf_out.shape[1] - PROMPT_LEN]


def test_none_ignores_recompress_slack():
    model = tiny("gqa4")
    ids = random_prompt()
    plain = hf.generate(model, ids, None, max_new_tokens=8)
    slack = hf.generate(model, ids, None, max_new_tokens=8, recompress_slack=1)
    assert slack.tokens == plain.tokens and slack.recompressions == 0
    assert torch.equal(slack.final_per_layer, plain.final_per_layer)


def test_a_slack_below_one_is_refused():
    with pytest.raises(ValueError, match="recompress_slack must be >= 1"):
        hf.generate(tiny("gqa4"), random_prompt(), build_policy("snapkv", budget=24, window=WINDOW),
                    max_new_tokens=4, recompress_slack=0)


def cadence(prompt_len: int, start: int, budget: int, slack: int, phase: int | None, decode_steps: int):
    """The recompression schedule of one head, worked out step by step: it starts with ``start``
    rows, gains one per decode forward, and after a forward that leaves the cache at ``n`` tokens
    with ``n % slack == phase`` (default ``prompt_len % slack``) it is cut back to ``budget`` if
    longer. Returns (rows before each forward, recompressions, rows at the end)."""
    phase = prompt_len % slack if phase is None else phase
    rows, before, recompressions = start, [], 0
    for step in range(decode_steps):
        before.append(rows)
        rows += 1
        if (prompt_len + step + 1) % slack == phase and rows > budget:
            rows, recompressions = budget, recompressions + 1
    return before, recompressions, rows


# ---------------------------------------------------------------------------------------------
# a budget that covers the prompt keeps it as it is
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [0, 50], ids=["budget=prompt", "budget>prompt"])
@pytest.mark.parametrize("preset", COMPRESSING)
def test_budget_covering_the_prompt_matches_none(preset, over, tiny_scores):
    model = tiny("gqa4")
    ids = random_prompt()
    with ForwardRecorder(model) as plain:
        expected = hf.generate(model, ids, None, max_new_tokens=10)
    policy = recorded(make_policy(preset, tiny_scores["gqa4"], budget=PROMPT_LEN + over, window=WINDOW))
    with ForwardRecorder(model) as ours:
        result = hf.generate(model, ids, policy, max_new_tokens=10)

    assert (result.retained_per_layer == PROMPT_LEN).all()
    observations, retained, protected = policy.reducer.calls[0]
    everything = torch.arange(PROMPT_LEN).expand(2, -1)
    for obs, kept in zip(observations, retained):
        assert torch.equal(kept.keep_idx, everything)
        # the very same rows: EMS merges nothing when nothing is evicted (each token its own class,
        # and a class of one is its row exactly)
        assert torch.equal(kept.keys, obs.keys) and torch.equal(kept.values, obs.values)
        if preset in MERGING:
            classes = policy.reducer.inner.classes(obs, kept.keep_idx, protected)
            assert torch.equal(classes, everything + 1)
    assert result.tokens == expected.tokens
    assert torch.equal(ours.logit_rows, plain.logit_rows)


# ---------------------------------------------------------------------------------------------
# every preset compresses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("preset", COMPRESSING)
def test_every_preset_compresses_a_tiny_llama(preset, shape, tiny_scores):
    model = tiny(shape)
    policy = recorded(make_policy(preset, tiny_scores[shape], budget=BUDGET, window=WINDOW))
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, random_prompt(), policy, max_new_tokens=6)
    check_compressed_run(result, policy, recorder, preset, BUDGET, 6, TINY_SHAPES[shape][1])
    if preset not in WHOLE_WINDOWS:
        assert result.retained_fraction == pytest.approx(BUDGET / PROMPT_LEN)


@pytest.mark.parametrize("preset", EVICTING)
def test_compressed_decode_matches_masked_full_cache(preset, tiny_scores):
    """The compacted per-head cache attends exactly like the full cache with the evicted
    positions masked out, per head, at the true positions."""
    model = tiny("gqa4")
    ids = random_prompt()
    policy = recorded(make_policy(preset, tiny_scores["gqa4"], budget=BUDGET, window=WINDOW))
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, ids, policy, max_new_tokens=8)
    _, retained, _ = policy.reducer.calls[0]
    expected, expected_tokens = masked_greedy(model, ids, retained, result.tokens)
    torch.testing.assert_close(recorder.logit_rows, expected, rtol=1e-4, atol=1e-5)
    assert result.tokens == expected_tokens


def test_decode_positions_count_from_the_true_length():
    model = tiny("gqa4")
    ids = random_prompt()
    policy = recorded(build_policy("snapkv", budget=BUDGET, window=WINDOW))
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, ids, policy, max_new_tokens=8)
    assert torch.equal(recorder.positions[0], torch.arange(PROMPT_LEN)[None])
    assert [p.tolist() for p in recorder.positions[1:]] == [[[PROMPT_LEN + step]] for step in range(7)]

    # The logits do depend on those positions: the reference at HF's true positions agrees (above
    # and in test_compressed_decode_matches_masked_full_cache), one whose positions restart at the
    # retained length (BUDGET) clearly does not.
    _, retained, _ = policy.reducer.calls[0]
    true_positions, _ = masked_greedy(model, ids, retained, result.tokens)
    restarted, _ = masked_greedy(model, ids, retained, result.tokens, position_shift=BUDGET - PROMPT_LEN)
    torch.testing.assert_close(recorder.logit_rows, true_positions, rtol=1e-4, atol=1e-5)
    assert float((recorder.logit_rows[1:] - restarted[1:]).abs().max()) > 100 * 1e-5


# ---------------------------------------------------------------------------------------------
# decode-time recompression
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", COMPRESSING)
@pytest.mark.parametrize("phase", [None, 1])
def test_recompression_keeps_each_head_within_budget_plus_slack(preset, tiny_scores, phase):
    model = tiny("gqa4")
    slack, new_tokens, budget = 4, 28, 24
    policy = recorded(make_policy(preset, tiny_scores["gqa4"], budget=budget, window=WINDOW))
    lengths_before_step = []  # per decode step: int64 [num_layers, num_kv_heads]

    def record_lengths(module, args):
        layers = hf._SESSION.get().layers  # empty during prefill
        if layers:
            lengths_before_step.append(torch.stack([layers[i].lengths.clone() for i in sorted(layers)]))

    hook = model.register_forward_pre_hook(record_lengths)
    try:
        with ForwardRecorder(model) as recorder:
            result = hf.generate(model, random_prompt(), policy, max_new_tokens=new_tokens, recompress_slack=slack,
                                 recompress_phase=phase)
    finally:
        hook.remove()

    budgets = result.retained_per_layer  # what decode-time recompression holds each head to
    decode_steps = new_tokens - 1
    assert len(result.tokens) == new_tokens and torch.isfinite(recorder.logit_rows).all()
    if preset not in WHOLE_WINDOWS:
        assert torch.equal(budgets, policy.allocator.budgets[0])
    assert len(lengths_before_step) == decode_steps
    # every head grows by one a step and is cut back to its budget on the cadence (budget 0 here
    # stands for each head's own budget: the heads start at it)
    before, per_head, final = cadence(PROMPT_LEN, 0, 0, slack, phase, decode_steps)
    for lengths, over in zip(lengths_before_step, before):
        assert torch.equal(lengths, budgets + over) and over <= slack
    assert result.recompressions == budgets.numel() * per_head > 0
    assert torch.equal(result.final_per_layer, budgets + final)


@pytest.mark.parametrize(
    "prompt_len, budget, window, new_tokens",
    [(12, 24, 8, 30), (5, 8, 16, 14)],
    ids=["prompt<budget", "prompt<window"],
)
def test_a_prompt_shorter_than_the_budget_grows_to_the_budget(prompt_len, budget, window, new_tokens):
    """The whole short prompt is kept; during decode its heads may grow to the asked budget (at
    least window + sinks) before they are recompressed, not just to the prompt length."""
    model = tiny("gqa4")
    slack = 3
    ids = random_prompt(prompt_len)
    with ForwardRecorder(model) as plain:
        expected = hf.generate(model, ids, None, max_new_tokens=new_tokens)
    policy = build_policy("snapkv", budget=budget, window=window)
    with ForwardRecorder(model) as ours:
        result = hf.generate(model, ids, policy, max_new_tokens=new_tokens, recompress_slack=slack)

    assert (result.retained_per_layer == prompt_len).all()
    asked, decode_steps = max(budget, window), new_tokens - 1
    _, per_head, final = cadence(prompt_len, prompt_len, asked, slack, None, decode_steps)
    assert result.recompressions == per_head * result.retained_per_layer.numel()
    assert (result.final_per_layer == final).all()
    if per_head == 0:  # nothing was ever evicted: exactly the full cache
        assert result.tokens == expected.tokens
        assert torch.equal(ours.logit_rows, plain.logit_rows)
    assert torch.isfinite(ours.logit_rows).all()


# ---------------------------------------------------------------------------------------------
# stopping and misuse
# ---------------------------------------------------------------------------------------------


def test_generation_stops_at_eos():
    model = tiny("gqa4")
    ids = random_prompt()
    free = hf.generate(model, ids, None, max_new_tokens=6)
    stop = free.tokens[1]
    through_first_stop = free.tokens[: free.tokens.index(stop) + 1]
    assert len(through_first_stop) < 6
    for eos in (stop, [511, stop]):
        stopped = hf.generate(model, ids, None, max_new_tokens=6, eos_token_id=eos)
        assert stopped.tokens == through_first_stop


@pytest.mark.parametrize("shape", [(2, 10), (1, 1, 10)])
def test_more_than_one_prompt_is_refused(shape):
    with pytest.raises(ValueError, match="batch size 1"):
        hf.generate(tiny("gqa4"), torch.zeros(shape, dtype=torch.long), None, max_new_tokens=2)


def test_kvcompress_attention_outside_generate_is_refused():
    model = tiny("gqa4")
    previous = model.config._attn_implementation
    model.set_attn_implementation(hf.ATTENTION_NAME)
    try:
        with pytest.raises(RuntimeError, match="only inside vllm_kvcompress.reference.hf.generate"):
            model(input_ids=random_prompt(8), use_cache=False)
    finally:
        model.set_attn_implementation(previous)


def test_failed_generate_restores_the_model(tmp_path):
    model = tiny("gqa4")
    previous = model.config._attn_implementation
    wrong_shape = write_head_scores(tmp_path / "wrong.json", TINY_LAYERS + 1, 2)
    with pytest.raises(ValueError, match="head scores are for"):
        hf.generate(model, random_prompt(), build_policy("headkv", budget=BUDGET, headkv_scores=wrong_shape))
    assert model.config._attn_implementation == previous
    assert hf._SESSION.get() is None


# ---------------------------------------------------------------------------------------------
# fp8 caches, emulated (kv_cache_dtype="fp8"): rows stored as e4m3 with per-layer scales
# ---------------------------------------------------------------------------------------------

FP8_K_SCALES = [0.02, 0.05, 0.01, 0.03]  # one per layer, all different (a wrong layer's shows)
FP8_V_SCALES = [0.01, 0.004, 0.02, 0.008]


def fp8_cache():
    return hf.FP8Cache.of("fp8", FP8_K_SCALES, FP8_V_SCALES)


def assert_stored(fp8, layer, keys, values):
    """The rows are what an fp8 cache holds for that layer: storing them again changes nothing."""
    again = fp8.stored(layer, keys, values)
    assert torch.equal(again[0], keys) and torch.equal(again[1], values)


def test_fp8_prefill_observes_fresh_signals_and_stored_rows():
    """The prefill's logits and EMS's column mass come from the fresh K/V (the engine computes
    them there), the window queries are exact, the keys/values the policies see are the stored
    rows: each layer's own scales, and not the rows themselves."""
    model, ids, fp8 = tiny("gqa4"), random_prompt(), fp8_cache()
    plain = hf.prefill(model, ids, WINDOW, signals=["global_attention"])
    stored = hf.prefill(model, ids, WINDOW, signals=["global_attention"], kv_cache_dtype="fp8",
                        k_scale=FP8_K_SCALES, v_scale=FP8_V_SCALES)
    assert torch.equal(stored.logits, plain.logits)
    for layer, (want, got) in enumerate(zip(plain.observations, stored.observations)):
        assert torch.equal(got.global_attention, want.global_attention)
        assert torch.equal(got.window_queries, want.window_queries)
        keys, values = fp8.stored(layer, want.keys, want.values)
        assert torch.equal(got.keys, keys) and torch.equal(got.values, values)
        assert not torch.equal(got.keys, want.keys)
        assert_stored(fp8, layer, got.keys, got.values)
        other = hf.FP8Cache.of("fp8", FP8_K_SCALES[::-1], FP8_V_SCALES[::-1]).stored(layer, want.keys, want.values)
        assert not torch.equal(other[0], keys)


@pytest.mark.parametrize("preset", ["snapkv", "ems"])
def test_fp8_compressed_and_appended_rows_are_stored(preset, tiny_scores):
    """After compression (EMS: merged rows, stored anew), after decode appends and after
    decode-time recompression, every row of the cache is an fp8 cache's row of its layer."""
    model, ids, fp8 = tiny("gqa4"), random_prompt(), fp8_cache()
    policy = make_policy(preset, tiny_scores["gqa4"], budget=BUDGET, window=WINDOW)
    prefilled = hf.prefill(model, ids, WINDOW, policy.observes, kv_cache_dtype="fp8", k_scale=FP8_K_SCALES,
                           v_scale=FP8_V_SCALES)
    session, budgets = hf._decode_session(model, prefilled, policy)
    for layer, cache in session.layers.items():
        assert_stored(fp8, layer, cache.keys, cache.values)
    result = hf._greedy(model, session, budgets, prefilled.logits, PROMPT_LEN, 12, None, recompress_slack=4)
    assert result.recompressions > 0
    for layer, cache in session.layers.items():
        assert_stored(fp8, layer, cache.keys, cache.values)


@pytest.mark.parametrize("preset", [None, "snapkv"])
def test_fp8_decodes_over_the_stored_rows(preset):
    """The prefill's logits are exact; the decode steps' attend over the stored rows, whose
    quantization shows in their logits (coarse scales here), and compression keeps as many rows."""
    model, ids = tiny("gqa4"), random_prompt()
    policy = None if preset is None else build_policy(preset, budget=BUDGET, window=WINDOW)
    with ForwardRecorder(model) as plain_logits:
        plain = hf.generate(model, ids, policy, max_new_tokens=8)
    with ForwardRecorder(model) as fp8_logits:
        coarse = hf.generate(model, ids, policy, max_new_tokens=8, kv_cache_dtype="fp8", k_scale=0.5, v_scale=0.5)
    assert torch.equal(fp8_logits.logit_rows[0], plain_logits.logit_rows[0])
    assert float((fp8_logits.logit_rows[1:] - plain_logits.logit_rows[1:]).abs().amax(-1).min()) > 1e-3
    assert torch.equal(coarse.retained_per_layer, plain.retained_per_layer)


def test_a_chunked_prefill_computes_the_whole_prompts_observation():
    """prefill(chunk_lens=...) as the engine's chunked prefill: without fp8, later chunks attend over
    the rows of the earlier ones as they were computed, so the observation and the logits are the
    whole prompt's up to rounding; one chunk is the whole prompt (its rows bit for bit; the logits of
    the last row alone, up to the rounding of a smaller matmul)."""
    model, ids = tiny("gqa4"), random_prompt()
    whole = hf.prefill(model, ids, WINDOW, signals=["global_attention"])
    one = hf.prefill(model, ids, WINDOW, signals=["global_attention"], chunk_lens=[PROMPT_LEN])
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.global_attention, b.global_attention)
               for a, b in zip(one.observations, whole.observations))
    torch.testing.assert_close(one.logits, whole.logits)
    chunked = hf.prefill(model, ids, WINDOW, signals=["global_attention"], chunk_lens=[40, 5, 51])
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for want, got in zip(whole.observations, chunked.observations):
        for name in ("keys", "values", "window_queries", "global_attention"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sum to the prompt's 96 tokens"):
        hf.prefill(model, ids, WINDOW, chunk_lens=[40, 40])


def test_an_fp8_chunked_prefill_attends_over_the_stored_rows():
    """With an fp8 cache a later chunk attends over (and observes) the rows the cache holds: every
    row of every layer is a stored one, the column mass still counts every query's whole attention
    (group x prompt_len per KV head), and the logits move away from the unchunked prefill's."""
    model, ids, fp8 = tiny("gqa4"), random_prompt(), fp8_cache()
    options = dict(signals=["global_attention"], kv_cache_dtype="fp8", k_scale=FP8_K_SCALES, v_scale=FP8_V_SCALES)
    whole = hf.prefill(model, ids, WINDOW, **options)
    chunked = hf.prefill(model, ids, WINDOW, chunk_lens=[48, 48], **options)
    group = TINY_SHAPES["gqa4"][0] // TINY_SHAPES["gqa4"][1]
    for layer, observation in enumerate(chunked.observations):
        assert_stored(fp8, layer, observation.keys, observation.values)
        torch.testing.assert_close(observation.global_attention.sum(-1), torch.full((2,), float(group * PROMPT_LEN)))
    assert float((chunked.logits - whole.logits).abs().max()) > 1e-3


def test_fp8_e5m2_and_other_cache_dtypes_are_refused():
    with pytest.raises(ValueError, match="'fp8_e5m2' is not supported \\(supported: auto, fp8, fp8_e4m3\\)"):
        hf.generate(tiny("gqa4"), random_prompt(), None, max_new_tokens=2, kv_cache_dtype="fp8_e5m2")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (real weights)
# ---------------------------------------------------------------------------------------------

SMOLLM2_BUDGET = 64  # with the default 32-token window


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def smollm2_prompt(smollm2):
    """int64 [1, ~200]: a needle-in-a-haystack prompt in SmolLM2's chat template."""
    from vllm_kvcompress.tools.synthetic import make_sample

    _, tokenizer = smollm2
    return make_sample("niah_single", tokenizer, 200, seed=0).prompt_ids(tokenizer)


@pytest.fixture(scope="module")
def smollm2_scores(tmp_path_factory, smollm2) -> str:
    model, _ = smollm2
    path = tmp_path_factory.mktemp("smollm2") / "random-head-scores.json"
    return write_head_scores(path, model.config.num_hidden_layers, model.config.num_key_value_heads, seed=7)


@pytest.mark.slow
def test_smollm2_none_is_bit_identical_to_hf_greedy(smollm2, smollm2_prompt):
    model, _ = smollm2
    expected_tokens, expected_logits = hf_greedy(model, smollm2_prompt, 6)
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, smollm2_prompt, None, max_new_tokens=6)
    assert result.tokens == expected_tokens
    assert torch.equal(recorder.logit_rows, expected_logits)


@pytest.mark.slow
@pytest.mark.parametrize("preset", COMPRESSING)
def test_every_preset_compresses_smollm2(preset, smollm2, smollm2_prompt, smollm2_scores):
    model, _ = smollm2
    assert smollm2_prompt.shape[1] > 2 * SMOLLM2_BUDGET
    policy = recorded(make_policy(preset, smollm2_scores, budget=SMOLLM2_BUDGET))
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, smollm2_prompt, policy, max_new_tokens=3)
    check_compressed_run(result, policy, recorder, preset, SMOLLM2_BUDGET, 3, model.config.num_key_value_heads)


@pytest.mark.slow
def test_smollm2_recompression_stays_bounded(smollm2, smollm2_prompt):
    model, _ = smollm2
    slack, new_tokens = 3, 12
    policy = recorded(build_policy("ems", budget=SMOLLM2_BUDGET))
    with ForwardRecorder(model) as recorder:
        result = hf.generate(model, smollm2_prompt, policy, max_new_tokens=new_tokens, recompress_slack=slack)
    budgets = policy.allocator.budgets[0]
    assert len(result.tokens) == new_tokens and torch.isfinite(recorder.logit_rows).all()
    assert result.recompressions == budgets.numel() * ((new_tokens - 1) // slack) > 0
    assert (result.final_per_layer <= budgets + slack).all()
