"""HF transformers reference path: greedy generation with a policy applied after prefill.

    from vllm_kvcompress.hf import generate
    from vllm_kvcompress.presets import build_policy
    result = generate(model, input_ids, build_policy("ems", budget=128), max_new_tokens=32)
    result.tokens, result.retained_per_layer

Works with any HF causal LM whose attention goes through transformers' AttentionInterface
(Llama, Mistral, Qwen2/3 families; GQA included). Batch size 1: each request is compressed on its
own, as in the paged cache. During the call, the model's attention implementation is switched to
``"kvcompress"``, which (a) runs prefill exactly like SDPA while recording each layer's
observation, (b) decodes over a :class:`HeadwiseLayer` cache with per-head lengths. Positions
keep counting from the true sequence length after compression.

With ``recompress_slack`` set, a head whose length exceeds its budget by more than the slack
during decode is compressed back to its budget, scored by its most recent ``window`` queries.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from .headwise_cache import HeadwiseLayer
from .observation import LayerObservation, causal_column_mass
from .policy import Policy
from .reduction import protected_positions

ATTENTION_NAME = "kvcompress"


@dataclass
class _Session:
    policy: Policy | None
    window: int
    prefill: bool = True
    observations: dict[int, LayerObservation] = field(default_factory=dict)
    layers: dict[int, HeadwiseLayer] = field(default_factory=dict)
    recent_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # [num_q_heads, <=window, d]


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("kvcompress_session", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, q_len, d]; key/value [1, Hkv, q_len, d] (fresh tokens; no HF cache is used)."""
    session = _SESSION.get()
    if session is None:
        raise RuntimeError("the 'kvcompress' attention runs only inside vllm_kvcompress.hf.generate")
    if query.shape[0] != 1:
        raise ValueError("the HF reference path compresses one request at a time (batch size 1)")
    layer_idx = module.layer_idx
    if session.prefill:
        output, _ = sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, **kwargs)
        q, k, v = query[0], key[0], value[0]
        global_attention = None
        if session.policy is not None and session.policy.needs_global_attention:
            global_attention = causal_column_mass(q, k)
        session.observations[layer_idx] = LayerObservation(
            q[:, -session.window :], k, v, layer_idx=layer_idx, global_attention=global_attention
        )
        session.recent_queries[layer_idx] = q[:, -session.window :]
        return output, None
    if query.shape[2] != 1:
        raise ValueError("decode feeds one token at a time")
    layer = session.layers[layer_idx]
    layer.append(key[0, :, 0], value[0, :, 0])
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


def _layers_from_prefill(session: _Session, dtype: torch.dtype) -> tuple[list[HeadwiseLayer], torch.Tensor | None]:
    """The per-head cache after prefill, and the per-head budgets (None without a policy)."""
    observations = [session.observations[i] for i in sorted(session.observations)]
    if session.policy is None:
        return [HeadwiseLayer.full(o.keys, o.values) for o in observations], None
    retained = session.policy.compress(observations)
    # each head keeps exactly its allocated budget, so the lengths are the budgets
    return [HeadwiseLayer.from_retained(r, dtype) for r in retained], torch.stack([r.lengths for r in retained])


def _recompress_layer(policy: Policy, layer: HeadwiseLayer, queries: torch.Tensor, budgets: torch.Tensor, slack: int) -> int:
    """Bring every head of ``layer`` that exceeds ``budget + slack`` back to its budget. Returns the
    number of heads compressed. queries: [num_q_heads, <=window, d], the layer's recent queries."""
    group = queries.shape[0] // layer.keys.shape[0]
    done = 0
    for h in range(layer.keys.shape[0]):
        budget = int(budgets[h])
        if int(layer.lengths[h]) <= budget + slack:
            continue
        keys, values = layer.head(h)
        obs = LayerObservation(queries[h * group : (h + 1) * group], keys[None], values[None])
        scores = policy.scorer.score(obs)
        protected = protected_positions(keys.shape[0], min(policy.window, queries.shape[1]), policy.sink, keys.device)
        kept = policy.reducer.reduce_layer(obs, scores, torch.tensor([budget]), protected)
        layer.replace_head(h, kept.keys[0, :budget], kept.values[0, :budget])
        done += 1
    return done


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    policy: Policy | None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    recompress_slack: int | None = None,
) -> GenerationResult:
    """Greedy decoding of one prompt with ``policy`` applied after prefill (None = full cache).

    input_ids: int [1, prompt_len] or [prompt_len].
    """
    input_ids = input_ids.reshape(1, -1).to(model.device)
    prompt_len = input_ids.shape[1]
    window = policy.window if policy is not None else 1
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    session = _Session(policy, window)
    token = _SESSION.set(session)
    recompressions = 0
    try:
        with _attention_switched(model):
            positions = torch.arange(prompt_len, device=model.device)[None]
            logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits[:, -1]
            layers, budgets = _layers_from_prefill(session, next(model.parameters()).dtype)
            session.observations.clear()  # free the full prompt K/V
            session.layers = dict(enumerate(layers))
            session.prefill = False
            retained = torch.stack([layer.lengths.clone() for layer in layers])
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
                if recompress_slack is not None and budgets is not None:
                    for i, layer in session.layers.items():
                        recompressions += _recompress_layer(
                            policy, layer, session.recent_queries[i], budgets[i], recompress_slack
                        )
    finally:
        _SESSION.reset(token)
    final = torch.stack([session.layers[i].lengths.clone() for i in sorted(session.layers)])
    return GenerationResult(tokens, prompt_len, retained, final, recompressions)
