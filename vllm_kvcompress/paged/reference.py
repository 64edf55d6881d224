"""Plain-PyTorch references of the paged-cache operations (the kernels are tested against these).

Layout and names: see :mod:`vllm_kvcompress.paged.layout`. All math is done in float32.

fp8 caches (vLLM's ``--kv-cache-dtype fp8``): the cache holds float8_e4m3fn rows and each layer has
one float32 scale for K and one for V (tensors of one element, read on the device: no host sync).
:func:`quantize` and :func:`dequantize` are the one rule every operation follows; an operation
given no scale treats its cache as holding the values themselves (a bf16 / fp16 / fp32 cache).
Operations on heads that may come from several layers (write_tokens, gather_heads,
gather_heads_padded, paged_window_scores) also take one scale per head, float32 [num_heads].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vllm_kvcompress.paged.layout import cdiv
from vllm_kvcompress.paged.query_ring import QueryRing, dense_queries


def quantize(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What a cache of ``dtype`` stores for the values ``x``.

    scale None: x cast to dtype. scale (float32, one element or broadcasting against x, as
    :func:`per_head` shapes it): x / scale in float32, saturated to dtype's largest finite value
    (+-448 for float8_e4m3fn, as vLLM's ``scaled_convert`` does: a plain cast turns an overflow
    into NaN, the format has no inf), rounded to nearest even.
    """
    if scale is None:
        return x.to(dtype)
    bound = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-bound, bound).to(dtype)


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The values cache rows ``stored`` stand for: the rows themselves when scale is None, else
    float32 stored * scale (scale: float32, as for :func:`quantize`)."""
    if scale is None:
        return stored
    return stored.float() * scale


def per_head(scale: torch.Tensor | None, trailing_dims: int) -> torch.Tensor | None:
    """A scale of one element or one per head, viewed to broadcast over a head dim followed by
    ``trailing_dims`` more dims."""
    return None if scale is None else scale.view(-1, *[1] * trailing_dims)


def write_tokens(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter fresh K/V rows into head-blocks, one slot per (token, head).

    key, value:   [num_tokens, num_kv_heads, head_dim]
    slot_mapping: int64 [num_tokens, num_kv_heads]; -1 skips the row (an evicted token).
    key_cache, value_cache: [num_head_blocks, block_size, head_dim], written in place.
    k_scale, v_scale: float32 [1] or [num_kv_heads] for fp8 caches (rows stored by :func:`quantize`),
                  else None.

    Serves both the prefill write of retained tokens and the one-token-per-head decode append.
    """
    head_dim = key.shape[-1]
    slots = slot_mapping.reshape(-1)
    keep = slots >= 0
    for rows, scale, cache in ((key, k_scale, key_cache), (value, v_scale, value_cache)):
        stored = quantize(rows, per_head(scale, 1), cache.dtype)
        cache.view(-1, head_dim)[slots[keep]] = stored.reshape(-1, head_dim)[keep]


def gather_heads(cache: torch.Tensor, head_block_table: torch.Tensor, length: int,
                 cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` rows of several heads, [num_heads, length, head_dim], from their block
    tables [num_heads, >= cdiv(length, block_size)]. With the cache's ``cache_scale`` (fp8; float32
    [1], or [num_heads] for heads of several layers) the rows come back as values
    (:func:`dequantize`, float32); without it, as stored."""
    blocks = head_block_table[:, : cdiv(length, cache.shape[1])].long()
    rows = cache[blocks].reshape(blocks.shape[0], -1, cache.shape[-1])[:, :length]
    return dequantize(rows, per_head(cache_scale, 2))


def gather_heads_padded(cache: torch.Tensor, head_block_table: torch.Tensor, lengths: torch.Tensor,
                        width: int | None = None, cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of heads of different lengths, each right-aligned: [num_heads, width, head_dim] (width
    defaults to max(lengths)), head i's ``lengths[i]`` rows last, zeros before them -- the layout of
    :attr:`~vllm_kvcompress.policies.observation.LayerObservation.lengths`. lengths: int [num_heads].
    cache_scale: as in :func:`gather_heads`."""
    from vllm_kvcompress.paged.layout import slots_for_positions

    width = int(lengths.max()) if width is None else width
    device = head_block_table.device
    positions = torch.arange(width, device=device)[None, :] - (width - lengths.to(device))[:, None]
    slots = slots_for_positions(head_block_table, positions, cache.shape[1])  # -1 before each head's rows
    # one row gather (index_select) and the padding zeroed in place: a tick's dense copy is GBs
    rows = cache.flatten(0, 1).index_select(0, slots.clamp(min=0).flatten()).view(*slots.shape, cache.shape[-1])
    return dequantize(rows, per_head(cache_scale, 2)).masked_fill_((slots < 0)[..., None], 0)


def gather_head(cache: torch.Tensor, block_ids: torch.Tensor, length: int,
                cache_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``length`` rows of one head, [length, head_dim], from its block list (cache_scale:
    as in :func:`gather_heads`)."""
    return gather_heads(cache, block_ids[None], length, cache_scale)[0]


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    retained_len: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of a few new query tokens per request over each KV head's own pages.

    query:            [num_seqs, num_queries, num_q_heads, head_dim] (the newest tokens, already
                      appended to the cache; query t of n sees all but the last n-1-t cached rows)
    head_block_table: int32 [num_seqs, num_kv_heads, max_blocks]
    retained_len:     int32 [num_seqs, num_kv_heads]
    scale:            softmax scale (default 1 / sqrt(head_dim))
    k_scale, v_scale: float32 [1] of fp8 caches (K and V read through :func:`dequantize`), else None
    returns           [num_seqs, num_queries, num_q_heads, head_dim] in query.dtype

    Query head q uses KV head q // (num_q_heads // num_kv_heads) (GQA groups are contiguous).
    """
    num_seqs, num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads = head_block_table.shape[1]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for s in range(num_seqs):
        for h in range(num_kv_heads):
            length = int(retained_len[s, h])
            k = gather_head(key_cache, head_block_table[s, h], length, k_scale).float()
            v = gather_head(value_cache, head_block_table[s, h], length, v_scale).float()
            q = query[s, :, h * group : (h + 1) * group].float()  # [num_queries, group, d]
            logits = torch.einsum("tgd,ld->tgl", q, k) * scale
            visible = torch.arange(length, device=query.device)[None, :] <= (
                length - num_queries + torch.arange(num_queries, device=query.device)[:, None]
            )  # [num_queries, length]
            logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
            out[s, :, h * group : (h + 1) * group] = torch.einsum("tgl,ld->tgd", logits.softmax(-1), v)
    return out.to(query.dtype)


def window_scores(
    window_query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None = None,
    power: int = 1,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass each key receives from the observation window, summed over window and group.

    window_query: [num_q_heads, window, head_dim] -- the last ``window`` queries of the prompt
    key:          [num_kv_heads, seq_len, head_dim]
    power:        1 sums softmax probabilities (SnapKV); 2 sums their squares (KV-Compress)
    padding:      bool [num_kv_heads, seq_len] or None -- keys no query sees (they get 0)
    returns       float32 [num_kv_heads, seq_len]

    Window query i sits at position seq_len - window + i and sees keys up to it (causal).
    """
    num_q_heads, window, head_dim = window_query.shape
    num_kv_heads, seq_len, _ = key.shape
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q = window_query.float().reshape(num_kv_heads, group * window, head_dim)
    logits = torch.einsum("hqd,hld->hql", q, key.float()) * scale
    query_pos = (seq_len - window + torch.arange(window, device=key.device)).repeat(group)
    hidden = (torch.arange(seq_len, device=key.device)[None, :] > query_pos[:, None])[None]  # [1, q, seq]
    if padding is not None:
        hidden = hidden | padding[:, None, :]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    return probs.pow(power).sum(1)


def paged_window_scores(queries: torch.Tensor | QueryRing, key_cache: torch.Tensor, head_block_table: torch.Tensor,
                        lengths: torch.Tensor, width: int, scale: float | None = None, power: int = 1,
                        k_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`window_scores` of many heads from their pages, right-aligned (decode-time recompression).

    queries [n, group, count, D] (or a :class:`QueryRing`, copied out): head i's query heads'
    ``count`` most recent queries, the newest at its last row; key_cache [num_blocks, block_size,
    D]; head_block_table int [n, max_blocks];
    lengths int [n] (rows each head holds, >= count); k_scale: float32 [1] or [n] of an fp8 key
    cache (the keys read through :func:`dequantize`), else None; returns float32 [n, width]: head
    i's scores in its last ``lengths[i]`` columns, 0 before them."""
    queries = dense_queries(queries)
    n, group, count, head_dim = queries.shape
    keys = gather_heads_padded(key_cache, head_block_table, lengths, width, k_scale)
    padding = torch.arange(width, device=keys.device)[None, :] < (width - lengths.to(keys.device))[:, None]
    return window_scores(queries.reshape(n * group, count, head_dim), keys, scale, power, padding)


def max_pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Same-length 1-D max pooling along the last dim (odd kernel; kernel 1 = identity)."""
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    return F.max_pool1d(scores.unsqueeze(-2), kernel, stride=1, padding=kernel // 2).squeeze(-2)


def compact(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
    old_len: torch.Tensor,
) -> list[torch.Tensor]:
    """Move each head's kept rows to the front of its own pages, in place.

    key_cache, value_cache: [num_head_blocks, block_size, head_dim], any dtype: rows move as they
               are stored (an fp8 cache's rows keep their layer's scale, so none is needed here)
    head_block_table: int32 [num_heads, max_blocks] (one row per (request, layer, head))
    keep_idx:  int [num_heads, max_keep], strictly increasing row indices, padded past keep_len
    keep_len:  int [num_heads];  old_len: int [num_heads] (rows held before compaction)
    returns    per head, the int64 block ids that no longer hold a retained row (to free)
    """
    block_size = key_cache.shape[1]
    freed = []
    for h in range(head_block_table.shape[0]):
        n_keep, n_old = int(keep_len[h]), int(old_len[h])
        blocks = head_block_table[h]
        for cache in (key_cache, value_cache):
            rows = gather_head(cache, blocks, n_old)[keep_idx[h, :n_keep].long()].clone()
            flat = cache.view(-1, cache.shape[-1])
            pos = torch.arange(n_keep, device=cache.device)
            flat[blocks[pos // block_size].long() * block_size + pos % block_size] = rows
        freed.append(blocks[cdiv(n_keep, block_size) : cdiv(n_old, block_size)].long().clone())
    return freed


def compact_rows(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    head_block_table: torch.Tensor,
    keep_idx: torch.Tensor,
    keep_len: torch.Tensor,
) -> None:
    """:func:`compact` of all heads at once, without the freed block ids: every kept row is read
    before any is written, so the moves may overlap. keep_idx past keep_len is ignored."""
    from vllm_kvcompress.paged.layout import slots_for_positions

    block_size = key_cache.shape[1]
    width = keep_idx.shape[1]
    kept = torch.arange(width, device=keep_idx.device)[None, :] < keep_len.to(keep_idx.device)[:, None]
    source = slots_for_positions(head_block_table, torch.where(kept, keep_idx, -1), block_size)[kept]
    target = slots_for_positions(head_block_table, torch.where(kept, torch.arange(width, device=kept.device), -1),
                                 block_size)[kept]
    for cache in (key_cache, value_cache):
        flat = cache.view(-1, cache.shape[-1])
        flat[target] = flat[source]


def merge_by_class(
    x: torch.Tensor,
    weight: torch.Tensor,
    assign: torch.Tensor,
    num_classes: int,
    cache_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean of the rows of each class -- EMS's merge, batched over heads ("zero class").

    x:      [num_heads, seq_len, head_dim]
    weight: [num_heads, seq_len], >= 0 (the tokens' importance scores)
    assign: int [num_heads, seq_len] in [0, num_classes]; class 0 is the zero class: its rows are
            dropped. Classes 1..num_classes are the retained slots, so heads with different
            budgets share one scatter: a head with budget b simply leaves classes b+1.. empty.
    returns float32 [num_heads, num_classes, head_dim]; row c-1 is
            sum_{t in c} w_t x_t / sum_{t in c} w_t (plain mean where the weights sum to 0, the
            row itself for a class of one, zeros for an empty class).
    cache_scale: float32 [1] when x holds fp8 cache rows: x is read through :func:`dequantize`, the
            mean taken in float32 and stored back by :func:`quantize` with the same scale: rows of
            x.dtype, ready to be written to the cache.
    """
    if cache_scale is not None:
        merged = merge_by_class(dequantize(x, cache_scale), weight, assign, num_classes)
        return quantize(merged, cache_scale, x.dtype)
    num_heads, _, head_dim = x.shape
    w = weight.float()
    index = assign.long()
    total = torch.zeros(num_heads, num_classes + 1, head_dim, device=x.device)
    total.scatter_add_(1, index[..., None].expand(-1, -1, head_dim), x.float() * w[..., None])
    mass = torch.zeros(num_heads, num_classes + 1, device=x.device).scatter_add_(1, index, w)
    count = torch.zeros(num_heads, num_classes + 1, device=x.device).scatter_add_(1, index, torch.ones_like(w))
    plain = torch.zeros_like(total).scatter_add_(1, index[..., None].expand(-1, -1, head_dim), x.float())
    # a class of one row is that row exactly (w * x / w can be one rounding step off)
    out = torch.where(
        ((mass > 0) & (count > 1))[..., None],
        total / mass.clamp(min=torch.finfo(torch.float32).tiny)[..., None],
        plain / count.clamp(min=1)[..., None],
    )
    return out[:, 1:]
