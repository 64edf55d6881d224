"""What a compression policy sees of one attention layer once the prompt has been processed, and
the one observer both engines (the HF reference, the vLLM backend) run during prefill for it."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class LayerObservation:
    """One layer of one request, dense (the engine gathers it from its own cache).

    window_queries:   [num_q_heads, window, head_dim] post-RoPE queries of the last ``window``
                      prompt tokens (or of the most recent decode steps when recompressing).
    keys, values:     [num_kv_heads, seq_len, head_dim] the layer's cached K (post-RoPE) and V.
    global_attention: float32 [num_kv_heads, seq_len] or None -- attention mass each key received
                      from every prompt query (column sums of the causal softmax, summed over the
                      query heads of its group); a prefill signal (:data:`PREFILL_SIGNALS`),
                      observed only for scorers that ask for it.
    layer_idx:        index of the layer in the model.
    lengths:          int64 [num_kv_heads] or None -- heads of different lengths in one
                      observation (decode-time recompression): head h's rows are the LAST
                      ``lengths[h]`` positions, the ones before them padding (so the recent
                      window lines up at the end for every head). None: every head holds seq_len.
    """

    window_queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    layer_idx: int = 0
    global_attention: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        num_q_heads, _, head_dim = self.window_queries.shape
        num_kv_heads, _, key_dim = self.keys.shape
        if key_dim != head_dim or self.values.shape[:2] != self.keys.shape[:2]:
            raise ValueError(
                f"shape mismatch: queries {tuple(self.window_queries.shape)}, "
                f"keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
            )
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV-head groups")

    @property
    def padding(self) -> torch.Tensor | None:
        """bool [num_kv_heads, seq_len], True at the padding rows before each head's own (None: none)."""
        if self.lengths is None:
            return None
        start = self.seq_len - self.lengths.to(self.keys.device)
        return torch.arange(self.seq_len, device=self.keys.device)[None, :] < start[:, None]

    def window_mass(self, power: int = 1) -> torch.Tensor:
        """float32 [num_kv_heads, seq_len]: the attention each key receives from the window queries
        (softmax probabilities to ``power``, summed over the window and the group; padding 0)."""
        from vllm_kvcompress.paged.reference import window_scores

        return window_scores(self.window_queries, self.keys, self.scale, power=power, padding=self.padding)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def seq_len(self) -> int:
        return self.keys.shape[1]

    @property
    def window(self) -> int:
        return self.window_queries.shape[1]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.keys.shape[-1])


def causal_row_lse(query: torch.Tensor, key: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Each causal query row's log-sum-exp (natural log) of its scaled logits, float32 [num_q_heads,
    q_len] -- what FlashAttention returns with a prefill's output (and the column mass kernels take
    instead of computing it). Shapes as :func:`causal_column_mass`; the whole logits in memory
    (tests and references only)."""
    group = query.shape[0] // key.shape[0]
    logits = torch.einsum("hqd,hld->hql", query.float(), key.float().repeat_interleave(group, 0))
    logits = logits / math.sqrt(query.shape[-1])
    rows = start + torch.arange(query.shape[1], device=query.device)
    hidden = torch.arange(key.shape[1], device=query.device)[None, :] > rows[:, None]
    return logits.masked_fill(hidden, float("-inf")).logsumexp(-1)


def causal_column_mass(query: torch.Tensor, key: torch.Tensor, start: int = 0, chunk: int | None = None) -> torch.Tensor:
    """Attention mass each key receives from causal queries, summed over each GQA group.

    query: [num_q_heads, q_len, head_dim] at positions ``start .. start+q_len-1``;
    key: [num_kv_heads, seq_len, head_dim] at positions ``0 .. seq_len-1`` (seq_len >= start + q_len)
    returns float32 [num_kv_heads, seq_len]. Summed over the chunks of a chunked prefill it equals the
    mass of the whole prompt. Chunked over queries (``chunk`` queries per step; default: about 64 MiB
    of logits) so memory stays bounded at any length.
    """
    num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, seq_len, _ = key.shape
    group = num_q_heads // num_kv_heads
    if chunk is None:
        chunk = max(1, (1 << 24) // (num_q_heads * seq_len))
    scale = 1.0 / math.sqrt(head_dim)
    k = key.float()
    mass = torch.zeros(num_kv_heads, seq_len, device=key.device)
    columns = torch.arange(seq_len, device=key.device)
    for lo in range(0, q_len, chunk):
        hi = min(q_len, lo + chunk)
        q = query[:, lo:hi].float().reshape(num_kv_heads, group * (hi - lo), head_dim)
        logits = torch.einsum("hqd,hld->hql", q, k) * scale
        q_pos = torch.arange(start + lo, start + hi, device=key.device).repeat(group)
        logits.masked_fill_(columns[None, :] > q_pos[:, None], float("-inf"))
        mass += logits.softmax(-1).sum(1)
    return mass


# ---- what the engines observe during prefill ------------------------------------------------------
#: Signals a scorer may ask the engines to observe while a prompt is prefilled (``Scorer.observes``),
#: besides the window's queries and the cache itself, with their reference implementation
#: ``(queries [Hq, q_len, D] at positions start.., keys [H, seq_len, D], start) -> float32 [H, seq_len]``.
#: Each is a :class:`LayerObservation` field of per-key values that add up over prefill chunks. Both
#: engines observe through :func:`observe_prefill`, so a new signal is one entry here, its field,
#: and the scorer that asks for it.
PREFILL_SIGNALS: dict[str, Callable[..., torch.Tensor]] = {"global_attention": causal_column_mass}


def check_signals(signals: Iterable[str]) -> None:
    unknown = sorted(set(signals) - set(PREFILL_SIGNALS))
    if unknown:
        raise ValueError(f"unknown prefill signal(s) {unknown}; valid: {', '.join(PREFILL_SIGNALS)}")


def observe_prefill(signals: Iterable[str], queries: torch.Tensor, keys: torch.Tensor, start: int = 0,
                    kernels: dict[str, Callable[..., torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The prefill ``signals`` of one chunk: ``queries`` [Hq, q_len, D] at positions ``start ..
    start+q_len-1`` over ``keys`` [H, seq_len, D] at ``0 .. seq_len-1``; name -> float32 [H, seq_len].
    ``kernels``: implementations to run instead of the references (the vLLM backend's, on a GPU)."""
    kernels = kernels or {}
    return {name: kernels.get(name, PREFILL_SIGNALS[name])(queries, keys, start=start) for name in signals}


def add_chunk(earlier: dict[str, torch.Tensor], chunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The signals of a prompt's prefix plus its next chunk's (which cover more keys: the prefix's
    keys add up, in place in ``chunk``'s tensors)."""
    for name, values in chunk.items():
        old = earlier.get(name)
        if old is not None:
            values[:, : old.shape[1]] += old
    return chunk
