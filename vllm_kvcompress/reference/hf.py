"""HF transformers reference path: greedy generation with a policy applied after prefill.

    from vllm_kvcompress.reference.hf import generate
    from vllm_kvcompress.policies.presets import build_policy
    result = generate(model, input_ids, build_policy("ems", budget=128), max_new_tokens=32)
    result.tokens, result.retained_per_layer

Works with any HF causal LM whose attention goes through transformers' AttentionInterface
(Llama, Mistral, Qwen2/3 families; GQA included). Batch size 1: each request is compressed on its
own, as in the paged cache. During the call, the model's attention implementation is switched to
``"kvcompress"``, which (a) runs prefill exactly like SDPA while recording each layer's
observation, (b) decodes over a :class:`HeadwiseLayer` cache with per-head lengths. Positions
keep counting from the true sequence length after compression.

With ``recompress_slack`` set, decode-time recompression runs on the vLLM worker's cadence: after
every ``recompress_slack``-th token (when the cache holds ``n`` tokens with ``n % recompress_slack
== recompress_phase``), every head longer than its budget is compressed back to it, scored by its
most recent ``window`` queries. The worker's clock is its step count, shared by all requests, so a
request's phase is where its length stood when the worker's clock ticked (the vLLM tests read it
off the engine's events); the default phase ticks every ``recompress_slack`` generated tokens.

Prefill once, compress many times (benchmarks compare policies on the same prompt)::

    from vllm_kvcompress.reference.hf import prefill, generate_from_prefill, continuation_logprobs
    prefilled = prefill(model, input_ids, window=32, signals=PREFILL_SIGNALS)  # serves every policy
    for policy in policies:
        generate_from_prefill(model, prefilled, policy, max_new_tokens=16)
        continuation_logprobs(model, prefilled, policy, continuation_ids)   # teacher-forced

fp8 caches (vLLM's ``--kv-cache-dtype fp8``), emulated: ``generate(..., kv_cache_dtype="fp8",
k_scale=..., v_scale=...)`` (and the same keywords of :func:`prefill`) store every K/V row as the
engine's cache does -- e4m3 with one K and one V scale per layer, read back as stored * scale
(:class:`FP8Cache`) -- so what the policies score and what decode attends over are the
dequantized rows, and rows a policy writes (EMS's merged rows, recompressed heads) are stored
again. What the engine computes from the fresh K/V stays exact: the prefill's attention and its
signals (EMS's column mass) and the observation window's queries.

Question-agnostic compression (compress a context, then ask; what prefix reuse needs): prefill the
whole prompt once with ``context_len``, compress ``prefilled.context`` (the first ``context_len``
tokens, observed by their own last ``window`` queries) and feed the rest of the prompt uncompressed::

    prefilled = prefill(model, prompt_ids, window=32, context_len=n)
    question = prompt_ids[:, n:]
    generate_from_prefill(model, prefilled.context, policy, uncompressed_ids=question)
    continuation_logprobs(model, prefilled.context, policy, answer_ids, uncompressed_ids=question)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from vllm_kvcompress.paged import reference as paged
from vllm_kvcompress.reference.headwise_cache import HeadwiseLayer
from vllm_kvcompress.policies.observation import PREFILL_SIGNALS, LayerObservation, add_chunk, check_signals, observe_prefill
from vllm_kvcompress.policies.policy import Policy

ATTENTION_NAME = "kvcompress"
CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # as the vLLM plugin takes them


@dataclass(frozen=True)
class FP8Cache:
    """An fp8 KV cache as vLLM's ``--kv-cache-dtype fp8`` keeps it: float8_e4m3fn rows with one
    float32 scale for K and one for V per layer (k_scales / v_scales: [num_layers], or one element
    for every layer), read back as stored * scale (:func:`vllm_kvcompress.paged.reference.quantize`
    and ``dequantize``, the engine's rule)."""

    k_scales: torch.Tensor
    v_scales: torch.Tensor

    @classmethod
    def of(cls, kv_cache_dtype: str, k_scale=1.0, v_scale=1.0) -> "FP8Cache | None":
        """The cache of ``kv_cache_dtype`` (None: ``auto``, rows kept as computed). k_scale /
        v_scale: a float for every layer, or one per layer (vLLM's default is 1.0)."""
        if kv_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported (supported: {', '.join(CACHE_DTYPES)})")
        if kv_cache_dtype == "auto":
            return None
        return cls(*(torch.tensor(s, dtype=torch.float32).reshape(-1) for s in (k_scale, v_scale)))

    def stored(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache gives back for rows ``keys`` / ``values`` of ``layer`` (any shape; same
        dtype and device)."""
        def round_trip(x, scales):
            scale = scales[layer if scales.numel() > 1 else 0].to(x.device)
            return paged.dequantize(paged.quantize(x, scale, torch.float8_e4m3fn), scale).to(x.dtype)

        return round_trip(keys, self.k_scales), round_trip(values, self.v_scales)


@dataclass
class _Session:
    policy: Policy | None
    window: int
    prefill: bool = True
    # the prefill signals observed (PREFILL_SIGNALS); None: what the policy's scorer asks for
    signals: frozenset[str] | None = None
    observations: dict[int, LayerObservation] = field(default_factory=dict)
    context_len: int | None = None  # prefill: also observe the first context_len tokens alone
    context_observations: dict[int, LayerObservation] = field(default_factory=dict)
    layers: dict[int, HeadwiseLayer] = field(default_factory=dict)
    recent_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # [num_q_heads, <=window, d]
    teacher_forced: bool = False  # decode may feed a whole block (continuation_logprobs)
    keep_block: bool = False  # a block fed at decode is appended to the cache (uncompressed_ids)
    fp8: FP8Cache | None = None  # the cache stores rows in fp8 (None: as computed)
    chunk_start: int = 0  # prefill: the position of the chunk running (0: the first, or the whole prompt)


    def __post_init__(self) -> None:
        if self.signals is None:
            self.signals = self.policy.observes if self.policy is not None else frozenset()
        check_signals(self.signals)

    def stored(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as the cache holds them (an fp8 cache's round trip; else the rows themselves)."""
        return (keys, values) if self.fp8 is None else self.fp8.stored(layer, keys, values)


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("kvcompress_session", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, q_len, d]; key/value [1, Hkv, q_len, d] (fresh tokens; no HF cache is used)."""
    session = _SESSION.get()
    if session is None:
        raise RuntimeError("the 'kvcompress' attention runs only inside vllm_kvcompress.reference.hf.generate")
    if query.shape[0] != 1:
        raise ValueError("the HF reference path compresses one request at a time (batch size 1)")
    layer_idx = module.layer_idx
    if session.prefill and session.chunk_start:
        return _continued_chunk(session, layer_idx, query[0], key[0], value[0], scaling), None
    if session.prefill:
        output, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, **kwargs)
        q, k, v = query[0], key[0], value[0]
        n = session.context_len
        # the signals come from the fresh keys (as the engine's prefill computes them); the policy
        # compresses the rows the cache holds
        cached_k, cached_v = session.stored(layer_idx, k, v)
        if n is None:
            observed = observe_prefill(session.signals, q, k)
        else:  # the context's queries see only the context: its signals, plus the rest's
            context_observed = observe_prefill(session.signals, q[:, :n], k[:, :n])
            observed = add_chunk(context_observed, observe_prefill(session.signals, q[:, n:], k, start=n))
            session.context_observations[layer_idx] = LayerObservation(
                q[:, n - session.window : n], cached_k[:, :n], cached_v[:, :n], layer_idx=layer_idx, **context_observed
            )
        session.observations[layer_idx] = LayerObservation(q[:, -session.window :], cached_k, cached_v,
                                                           layer_idx=layer_idx, **observed)
        session.recent_queries[layer_idx] = q[:, -session.window :]
        return output, None
    if query.shape[2] != 1:
        if not session.teacher_forced:
            raise ValueError("decode feeds one token at a time")
        layer = session.layers[layer_idx]
        key, value = session.stored(layer_idx, key, value)  # the block is written, then attended over
        output = _block_attention(layer, query, key, value, scaling)
        if session.keep_block:
            for t in range(key.shape[2]):
                layer.append(key[0, :, t], value[0, :, t])
            session.recent_queries[layer_idx] = torch.cat([session.recent_queries[layer_idx], query[0]], 1)[
                :, -session.window :
            ]
        return output
    layer = session.layers[layer_idx]
    layer.append(*session.stored(layer_idx, key[0, :, 0], value[0, :, 0]))
    session.recent_queries[layer_idx] = torch.cat([session.recent_queries[layer_idx], query[0]], 1)[
        :, -session.window :
    ]
    if layer.uniform:  # same call plain HF makes, so `none` is bit-identical to it
        return sdpa_attention_forward(
            module, query, layer.keys[None], layer.values[None], None, dropout=0.0, scaling=scaling, **kwargs
        )
    group = query.shape[1] // layer.keys.shape[0]
    mask = layer.valid_mask().repeat_interleave(group, 0)[None, :, None, :]
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        repeat_kv(layer.keys[None], group),
        repeat_kv(layer.values[None], group),
        attn_mask=mask,
        scale=scaling,
    )
    return output.transpose(1, 2).contiguous(), None


def _continued_chunk(session: _Session, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
    """A later chunk of a chunked prefill (``prefill(chunk_lens=...)``), as the engine runs it: the
    chunk's rows go to the cache, its queries attend causally over every row the cache holds (an
    fp8 cache's stored rows, in float32), and its prefill signals, computed over those rows, add to
    the earlier chunks'. query [Hq, q_len, d], key/value [Hkv, q_len, d]; returns [1, q_len, Hq, d]."""
    earlier = session.observations[layer_idx]
    cached_k, cached_v = session.stored(layer_idx, key, value)
    keys, values = torch.cat([earlier.keys, cached_k], 1), torch.cat([earlier.values, cached_v], 1)
    start, q_len, seq_len = session.chunk_start, query.shape[1], keys.shape[1]
    visible = torch.arange(seq_len, device=query.device)[None, :] <= torch.arange(start, seq_len, device=query.device)[:, None]
    q = query if session.fp8 is None else query.float()
    output = torch.nn.functional.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible,
                                                              scale=scaling, enable_gqa=True).to(query.dtype)
    signals = {name: getattr(earlier, name) for name in session.signals}
    observed = add_chunk(signals, observe_prefill(session.signals, query, keys, start=start))
    queries = torch.cat([earlier.window_queries, query], 1)[:, -session.window :]
    session.observations[layer_idx] = LayerObservation(queries, keys, values, layer_idx=layer_idx, **observed)
    session.recent_queries[layer_idx] = queries
    return output.transpose(0, 1)[None].contiguous()


def _block_attention(layer: HeadwiseLayer, query, key, value, scaling):
    """Attention of a block of new tokens over the compressed cache plus the block itself (causal),
    without changing the cache: a one-shot teacher-forced pass (no decode-time recompression).

    query [1, Hq, m, d]; key/value [1, Hkv, m, d] (the block's own K/V). Returns [1, m, Hq, d]."""
    block = query.shape[2]
    group = query.shape[1] // layer.keys.shape[0]
    keys = torch.cat([layer.keys, key[0].to(layer.keys.dtype)], 1)
    values = torch.cat([layer.values, value[0].to(layer.values.dtype)], 1)
    cached = layer.valid_mask()[:, None, :].expand(-1, block, -1)  # [Hkv, m, width]
    causal = torch.ones(block, block, dtype=torch.bool, device=query.device).tril()
    mask = torch.cat([cached, causal.expand(cached.shape[0], -1, -1)], -1).repeat_interleave(group, 0)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        repeat_kv(keys[None], group).to(query.dtype),
        repeat_kv(values[None], group).to(query.dtype),
        attn_mask=mask[None],
        scale=scaling,
    )
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # _attention builds its own masks: causal at prefill, per-head lengths at decode


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def _attention_switched(model):
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class GenerationResult:
    """tokens: generated ids (prompt excluded); prompt_len: tokens in the prompt;
    retained_per_layer: int64 [num_layers, num_kv_heads] lengths right after prefill compression;
    final_per_layer: the same at the end; recompressions: decode-time head compressions run."""

    tokens: list[int]
    prompt_len: int
    retained_per_layer: torch.Tensor
    final_per_layer: torch.Tensor
    recompressions: int = 0

    @property
    def retained_fraction(self) -> float:
        return float(self.retained_per_layer.float().mean()) / self.prompt_len


def _layers_from_prefill(session: _Session, dtype: torch.dtype, retained=None
                         ) -> tuple[list[HeadwiseLayer], torch.Tensor | None]:
    """The per-head cache after prefill, and the per-head budgets (None without a policy).
    retained: the policy's compression of the observations when already computed."""
    observations = [session.observations[i] for i in sorted(session.observations)]
    if session.policy is None:
        return [HeadwiseLayer.full(o.keys, o.values) for o in observations], None
    if retained is None:
        retained = session.policy.compress(observations)
    layers = [HeadwiseLayer.from_retained(r, dtype) for r in retained]
    for i, layer in enumerate(layers):  # decode writes into its layers; `retained` may be reused (Prefilled.compressed)
        # (a copy either way; an fp8 cache stores merged rows anew, kept rows come back unchanged)
        layer.keys, layer.values = session.stored(i, layer.keys.clone(), layer.values.clone())
    # each head keeps exactly its allocated budget, so the lengths are the budgets
    return layers, torch.stack([r.lengths for r in retained])


def _recompress_layer(session: _Session, layer_idx: int, queries: torch.Tensor, budgets: torch.Tensor) -> int:
    """Bring every head of layer ``layer_idx`` longer than its budget back to it (the rows a policy
    writes stored as the cache stores them). Returns the number of heads compressed. queries:
    [num_q_heads, <=window, d], the layer's recent queries."""
    policy, layer = session.policy, session.layers[layer_idx]
    group = queries.shape[0] // layer.keys.shape[0]
    done = 0
    for h in range(layer.keys.shape[0]):
        budget = int(budgets[h])
        if int(layer.lengths[h]) <= budget:
            continue
        keys, values = layer.head(h)
        kept = policy.recompress_head(queries[h * group : (h + 1) * group], keys, values, budget)
        layer.replace_head(h, *session.stored(layer_idx, *kept))
        done += 1
    return done


@dataclass
class Prefilled:
    """One prompt after prefill, before any compression: reusable by any number of policies.

    observations: one :class:`LayerObservation` per layer -- full keys/values
        [num_kv_heads, prompt_len, head_dim], the last ``window`` queries, and the causal column
        mass (``global_attention``) and any other prefill signal it was prefilled with (``signals``);
    logits: float [1, vocab], the prediction after the last prompt token (full-cache prefill, as
        in serving: compression happens after it); prompt_len: tokens in the prompt;
    context: with ``prefill(..., context_len=n)``, the same for the prompt's first n tokens alone
        (keys/values are views of the full ones; window queries, column mass and logits its own):
        what a prefill of the context alone gives, for question-agnostic compression;
    fp8: the fp8 cache the rows are stored in (the observations' keys/values are its rows), or None.
    """

    observations: list[LayerObservation]
    logits: torch.Tensor
    prompt_len: int
    window: int
    context: "Prefilled | None" = None
    fp8: FP8Cache | None = None
    _last: tuple | None = field(default=None, repr=False, compare=False)  # (policy, its compression)

    def compressed(self, policy: Policy) -> list:
        """``policy.compress`` of these observations (as ``policy`` sees them), computed once for
        the last policy asked: generating with a policy and scoring a continuation with the same
        policy object compress once (EMS's or ZigZag-LMBO's compression of 8k tokens takes
        seconds). Only the last one is kept: a compressed cache per policy would add up."""
        if self._last is None or self._last[0] is not policy:
            self._last = (policy, policy.compress(self.observations_for(policy)))
        return self._last[1]

    def observations_for(self, policy: Policy | None) -> list[LayerObservation]:
        """The observations as ``policy`` would have seen them from its own prefill (its window)."""
        if policy is None:
            return self.observations
        if policy.window > self.window:
            raise ValueError(f"prefilled with window={self.window}, but the policy observes {policy.window} queries")
        missing = sorted(name for name in policy.observes if getattr(self.observations[0], name) is None)
        if missing:
            raise ValueError(f"the policy's scorer observes {missing} during prefill: prefill with signals={missing} "
                             f"(or PREFILL_SIGNALS)")
        return [dataclasses.replace(o, window_queries=o.window_queries[:, -policy.window :]) for o in self.observations]


def _check_one_prompt(input_ids: torch.Tensor) -> None:
    if input_ids.dim() not in (1, 2) or (input_ids.dim() == 2 and input_ids.shape[0] != 1):
        raise ValueError(
            f"the HF reference path generates for one prompt at a time (batch size 1), got input_ids of "
            f"shape {tuple(input_ids.shape)}; call generate() once per prompt"
        )


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    window: int = 32,
    signals: Iterable[str] = (),
    context_len: int | None = None,
    used_logits_only: bool = False,
    kv_cache_dtype: str = "auto",
    k_scale: float | list[float] = 1.0,
    v_scale: float | list[float] = 1.0,
    chunk_lens: list[int] | None = None,
) -> Prefilled:
    """Run the prompt once with the full cache and keep what every policy needs to compress it.

    input_ids: int [1, prompt_len] or [prompt_len]; window: the most observation-window queries
    any later policy uses; signals: the prefill signals to observe (``Scorer.observes``: EMS's causal
    column mass ``global_attention``; :data:`PREFILL_SIGNALS` serves every policy);
    context_len: also keep the view of the first ``context_len`` tokens as if prefilled alone
    (``Prefilled.context``; causal attention makes it exact), for question-agnostic compression;
    used_logits_only: compute only the logits rows that are kept (``logits_to_keep``; with
    ``context_len`` always): prompt_len x vocab floats would be 5 GB for 8k tokens of a 152k
    vocabulary. Off by default: the full logits are the plain forward's, bit for bit.
    kv_cache_dtype / k_scale / v_scale: the cache's dtype as vLLM takes it, ``fp8`` with its per-layer
    scales (a float, or one per layer) emulated as :class:`FP8Cache` stores rows (module docstring).
    chunk_lens: prefill the prompt in chunks of these lengths (summing to the prompt's), as the
    engine's chunked prefill does: the first attends over its fresh K/V, each later one over the rows
    the cache holds (:func:`_continued_chunk`; with an fp8 cache, not the fresh ones). Not with
    ``context_len``; logits of the last row only.
    """
    _check_one_prompt(input_ids)
    fp8 = FP8Cache.of(kv_cache_dtype, k_scale, v_scale)
    input_ids = input_ids.reshape(1, -1).to(model.device)
    prompt_len = input_ids.shape[1]
    if context_len is not None and not window <= context_len < prompt_len:
        raise ValueError(f"context_len must be in [window={window}, prompt_len={prompt_len}), got {context_len}")
    session = _Session(None, window, signals=frozenset(signals), context_len=context_len, fp8=fp8)
    token = _SESSION.set(session)
    keep = 0  # every row
    if context_len is not None:
        keep = torch.tensor([context_len - 1, prompt_len - 1], device=model.device)
    elif used_logits_only:
        keep = 1
    if chunk_lens is not None and (sum(chunk_lens) != prompt_len or min(chunk_lens) < 1 or context_len is not None):
        raise ValueError(f"chunk_lens must be positive and sum to the prompt's {prompt_len} tokens (without "
                         f"context_len), got {chunk_lens}")
    try:
        with _attention_switched(model):
            if chunk_lens is None:
                positions = torch.arange(prompt_len, device=model.device)[None]
                logits = model(input_ids=input_ids, position_ids=positions, use_cache=False,
                               logits_to_keep=keep).logits[0]
            else:
                start = 0
                for n in chunk_lens:
                    session.chunk_start = start
                    positions = torch.arange(start, start + n, device=model.device)[None]
                    logits = model(input_ids=input_ids[:, start:start + n], position_ids=positions, use_cache=False,
                                   logits_to_keep=1).logits[0]
                    start += n
    finally:
        _SESSION.reset(token)
    observations = [session.observations[i] for i in sorted(session.observations)]
    context = None
    if context_len is not None:
        contexts = [session.context_observations[i] for i in sorted(session.context_observations)]
        context = Prefilled(contexts, logits[None, -2], context_len, window, fp8=fp8)
    return Prefilled(observations, logits[None, -1], prompt_len, window, context, fp8)


def _decode_session(model, prefilled: Prefilled, policy: Policy | None) -> tuple[_Session, torch.Tensor | None]:
    """A decode-ready session holding ``policy``'s compressed cache of ``prefilled``, and the
    per-head budgets (None without a policy). The prefilled tensors are not modified."""
    observations = prefilled.observations_for(policy)
    window = policy.window if policy is not None else 1
    session = _Session(policy, window, prefill=False, observations=dict(enumerate(observations)), fp8=prefilled.fp8)
    retained = None if policy is None else prefilled.compressed(policy)
    layers, budgets = _layers_from_prefill(session, next(model.parameters()).dtype, retained)
    if budgets is not None:
        budgets = policy.decode_budgets(budgets, prefilled.prompt_len)
    session.observations.clear()
    session.layers = dict(enumerate(layers))
    session.recent_queries = {i: o.window_queries[:, -window:] for i, o in enumerate(observations)}
    return session, budgets


def _greedy(model, session: _Session, budgets, logits, prompt_len, max_new_tokens, eos_token_id, recompress_slack,
            recompress_phase=None):
    """Greedy decoding from the prefill's ``logits`` [1, vocab] over ``session``'s cache."""
    policy = session.policy
    if recompress_slack is not None:
        if recompress_slack < 1:
            raise ValueError(f"recompress_slack must be >= 1 (tokens between recompressions), got {recompress_slack}")
        if recompress_phase is None:
            recompress_phase = prompt_len % recompress_slack
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    retained = torch.stack([session.layers[i].lengths.clone() for i in sorted(session.layers)])
    token = _SESSION.set(session)
    recompressions = 0
    try:
        with _attention_switched(model):
            tokens: list[int] = []
            for step in range(max_new_tokens):
                next_token = int(logits.argmax(-1))
                tokens.append(next_token)
                if next_token in stop or step == max_new_tokens - 1:
                    break
                position = torch.tensor([[prompt_len + step]], device=model.device)
                logits = model(
                    input_ids=torch.tensor([[next_token]], device=model.device), position_ids=position, use_cache=False
                ).logits[:, -1]
                cached = prompt_len + step + 1
                if recompress_slack is not None and budgets is not None and cached % recompress_slack == recompress_phase:
                    for i in session.layers:
                        recompressions += _recompress_layer(session, i, session.recent_queries[i], budgets[i])
    finally:
        _SESSION.reset(token)
    final = torch.stack([session.layers[i].lengths.clone() for i in sorted(session.layers)])
    return GenerationResult(tokens, prompt_len, retained, final, recompressions)


def _feed_uncompressed(model, session: _Session, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ``ids`` (int [1, m]) at positions ``start..start+m-1`` over ``session``'s compressed
    cache in one block, appending their keys/values whole. Returns the last token's logits [1, vocab]."""
    session.teacher_forced = session.keep_block = True
    token = _SESSION.set(session)
    try:
        with _attention_switched(model):
            positions = torch.arange(start, start + ids.shape[1], device=model.device)[None]
            logits = model(input_ids=ids.to(model.device), position_ids=positions, use_cache=False,
                           logits_to_keep=1).logits[:, -1]
    finally:
        _SESSION.reset(token)
        session.teacher_forced = session.keep_block = False
    return logits


def _as_row(ids: torch.Tensor | None) -> torch.Tensor | None:
    if ids is None:
        return None
    ids = ids.reshape(1, -1)
    return ids if ids.shape[1] else None


@torch.no_grad()
def generate_from_prefill(
    model,
    prefilled: Prefilled,
    policy: Policy | None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    recompress_slack: int | None = None,
    recompress_phase: int | None = None,
    uncompressed_ids: torch.Tensor | None = None,
) -> GenerationResult:
    """:func:`generate` for a prompt already run by :func:`prefill`: compress its cache with
    ``policy`` (None = full cache) and decode greedily. ``prefilled`` stays reusable.

    uncompressed_ids: int [1, m], tokens that follow the compressed prompt (the question of the
    question-agnostic setting): fed after compression and kept whole, then decoding starts.
    ``GenerationResult.prompt_len`` stays the compressed prompt's."""
    session, budgets = _decode_session(model, prefilled, policy)
    logits, position = prefilled.logits, prefilled.prompt_len
    uncompressed_ids = _as_row(uncompressed_ids)
    if uncompressed_ids is None:
        return _greedy(model, session, budgets, logits, position, max_new_tokens, eos_token_id, recompress_slack,
                       recompress_phase)
    retained = torch.stack([session.layers[i].lengths.clone() for i in sorted(session.layers)])
    logits = _feed_uncompressed(model, session, uncompressed_ids, position)
    position += uncompressed_ids.shape[1]
    result = _greedy(model, session, budgets, logits, position, max_new_tokens, eos_token_id,
                     recompress_slack, recompress_phase)
    result.prompt_len, result.retained_per_layer = prefilled.prompt_len, retained  # what compression kept
    return result


@dataclass
class ScoredContinuation:
    """logprobs: float32 [num_tokens], log-probability of each continuation token given the
    compressed prompt and the continuation before it; retained_per_layer: int64
    [num_layers, num_kv_heads] lengths after compression; prompt_len: tokens in the prompt."""

    logprobs: torch.Tensor
    retained_per_layer: torch.Tensor
    prompt_len: int

    @property
    def mean_nll(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def perplexity(self) -> float:
        return float(torch.exp(-self.logprobs.double().mean()))

    @property
    def retained_fraction(self) -> float:
        return float(self.retained_per_layer.float().mean()) / self.prompt_len


@torch.no_grad()
def continuation_logprobs(
    model,
    prefilled: Prefilled,
    policy: Policy | None,
    continuation_ids: torch.Tensor,
    uncompressed_ids: torch.Tensor | None = None,
) -> ScoredContinuation:
    """Teacher-forced scoring of ``continuation_ids`` (int [1, m] or [m]) after the prompt of
    ``prefilled``, whose cache ``policy`` compressed (None = full cache).

    The first token is scored by the prefill's logits (compression happens after prefill); the
    others by one forward of the whole continuation over the compressed cache -- what token-by-
    token decoding gives without decode-time recompression. With ``uncompressed_ids`` (int [1, k],
    see :func:`generate_from_prefill`) those tokens come first, whole, and only the continuation's
    tokens are scored.
    """
    continuation = continuation_ids.reshape(1, -1).to(model.device)
    num_tokens = continuation.shape[1]
    if num_tokens == 0:
        raise ValueError("continuation_ids is empty")
    uncompressed_ids = _as_row(uncompressed_ids)
    if uncompressed_ids is not None:
        given = uncompressed_ids.shape[1]
        scored = continuation_logprobs(model, prefilled, policy, torch.cat([uncompressed_ids.to(model.device),
                                                                            continuation], 1))
        return ScoredContinuation(scored.logprobs[given:], scored.retained_per_layer, scored.prompt_len)
    session, _ = _decode_session(model, prefilled, policy)
    session.teacher_forced = True
    retained = torch.stack([session.layers[i].lengths.clone() for i in sorted(session.layers)])
    logits = prefilled.logits.float()  # [1, vocab]
    if num_tokens > 1:
        token = _SESSION.set(session)
        try:
            with _attention_switched(model):
                positions = torch.arange(prefilled.prompt_len, prefilled.prompt_len + num_tokens - 1, device=model.device)
                block = model(input_ids=continuation[:, :-1], position_ids=positions[None], use_cache=False,
                              logits_to_keep=0).logits[0]
        finally:
            _SESSION.reset(token)
        logits = torch.cat([logits, block.float()])
    logprobs = torch.log_softmax(logits, -1).gather(-1, continuation[0, :, None])[:, 0]
    return ScoredContinuation(logprobs, retained, prefilled.prompt_len)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    policy: Policy | None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    recompress_slack: int | None = None,
    recompress_phase: int | None = None,
    kv_cache_dtype: str = "auto",
    k_scale: float | list[float] = 1.0,
    v_scale: float | list[float] = 1.0,
    prefill_chunks: list[int] | None = None,
) -> GenerationResult:
    """Greedy decoding of one prompt with ``policy`` applied after prefill (None = full cache).

    input_ids: int [1, prompt_len] or [prompt_len]. ``recompress_slack`` / ``recompress_phase``:
    decode-time recompression's cadence; ``kv_cache_dtype="fp8"`` with ``k_scale`` / ``v_scale``
    (a float, or one per layer): an fp8 cache, emulated (module docstring); ``prefill_chunks``:
    the prompt prefilled in chunks of these lengths, as the engine's chunked prefill (:func:`prefill`).
    """
    _check_one_prompt(input_ids)
    window = policy.window if policy is not None else 1
    prefilled = prefill(model, input_ids, window, policy.observes if policy is not None else (),
                        kv_cache_dtype=kv_cache_dtype, k_scale=k_scale, v_scale=v_scale, chunk_lens=prefill_chunks)
    session, budgets = _decode_session(model, prefilled, policy)
    logits, prompt_len = prefilled.logits, prefilled.prompt_len
    del prefilled  # only the compressed cache lives on through decode
    return _greedy(model, session, budgets, logits, prompt_len, max_new_tokens, eos_token_id, recompress_slack,
                   recompress_phase)
