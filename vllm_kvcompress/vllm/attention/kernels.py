"""Which implementation of the paged-cache operations the vLLM backend calls on a device.

CUDA: the Triton kernels (``vllm_kvcompress.triton_kernels``), tested against the PyTorch
references in ``tests/triton_kernels``. CPU: the PyTorch references (``paged/reference.py``); the
Triton interpreter would be far slower there. Shapes: see :mod:`vllm_kvcompress.paged.layout`.

fp8 pools (``--kv-cache-dtype fp8``): the caches are float8_e4m3fn views and every operation on
them takes the layer's ``k_scale`` / ``v_scale`` (vLLM's ``layer._k_scale`` / ``_v_scale``, float32
one element, on the device), following :func:`~vllm_kvcompress.paged.reference.quantize` /
``dequantize``; without scales the caches hold the values themselves, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.observation import causal_column_mass
from vllm_kvcompress.paged import reference
from vllm_kvcompress.triton_kernels import runs_on

FP8_DTYPE = torch.float8_e4m3fn  # what an fp8 pool holds (vLLM allocates it as uint8)


def check_head_size(head_size: int, device: torch.device | str) -> None:
    """The Triton kernels tile the head dimension in one power-of-two block: refuse other sizes at
    start-up on a GPU rather than at the first request (the CPU path takes any size)."""
    if runs_on(device) and (head_size & (head_size - 1) or head_size < 16):
        raise ValueError(f"kv compression's GPU kernels need a power-of-two head size >= 16; this model's "
                         f"attention heads have {head_size}")


def write_tokens(key, value, slot_mapping, key_cache, value_cache, k_scale=None, v_scale=None) -> None:
    """key/value [T, H, D] -> pool rows ``slot_mapping`` int64 [T, H] (-1 skips); fp8 caches
    quantized with k_scale / v_scale, float32 one element or [H] (each head its own layer's)."""
    if runs_on(key_cache):
        from vllm_kvcompress.triton_kernels.write_tokens import write_tokens as triton_write

        triton_write(key, value, slot_mapping, key_cache, value_cache, k_scale, v_scale)
    else:
        reference.write_tokens(key, value, slot_mapping, key_cache, value_cache, k_scale, v_scale)


def gather_heads_padded(key_cache, value_cache, head_block_table, lengths, width, k_scale=None, v_scale=None):
    """K and V rows of heads (table [n, blocks], lengths int [n] on the device) right-aligned in
    ``width`` columns, zeros before: :func:`reference.gather_heads_padded` of each cache; fp8
    caches dequantized (float32) with k_scale / v_scale, one element or [n]. Returns (keys, values)."""
    if runs_on(key_cache):
        from vllm_kvcompress.triton_kernels.gather_rows import gather_heads_padded as triton_gather

        return triton_gather(key_cache, value_cache, head_block_table, lengths, width, k_scale, v_scale)
    return tuple(reference.gather_heads_padded(cache, head_block_table, lengths, width, cache_scale)
                 for cache, cache_scale in ((key_cache, k_scale), (value_cache, v_scale)))


def decode_attention(query, key_cache, value_cache, head_block_table, retained_len, scale, out=None, k_scale=None,
                     v_scale=None):
    """query [S, Q, Hq, D] over each head's pages (table int32 [S, H, W], lens int32 [S, H]);
    written into ``out`` (query's shape, last dim contiguous) when given; fp8 caches read with
    k_scale / v_scale (float32, one element). Returns the result."""
    if runs_on(query):
        from vllm_kvcompress.triton_kernels.decode_attention import decode_attention as triton_decode

        # the kernel takes any strides but the last dim's; tables and lengths are contiguous slices
        return triton_decode(query, key_cache, value_cache, head_block_table, retained_len, scale=scale, out=out,
                             k_scale=k_scale, v_scale=v_scale)
    result = padded_decode_attention(query, key_cache, value_cache, head_block_table, retained_len, scale, k_scale,
                                     v_scale)
    return result if out is None else out.copy_(result)


def padded_decode_attention(query, key_cache, value_cache, head_block_table, retained_len, scale, k_scale=None,
                            v_scale=None):
    """:func:`reference.decode_attention` for all rows and heads at once (the reference loops over
    them in Python, seconds per step on the CPU): every head's pages are gathered up to the longest
    head's and the rows past a head's length are masked out. Same shapes and semantics."""
    num_seqs, num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = head_block_table.shape[1], key_cache.shape[1]
    group = num_q_heads // num_kv_heads
    width = -(-int(retained_len.max()) // block_size)
    blocks = head_block_table[:, :, :width].long()  # [S, H, W]
    keys, values = (reference.dequantize(cache[blocks], cache_scale).reshape(num_seqs, num_kv_heads, -1, head_dim).float()
                    for cache, cache_scale in ((key_cache, k_scale), (value_cache, v_scale)))
    q = query.float().reshape(num_seqs, num_queries, num_kv_heads, group, head_dim)
    logits = torch.einsum("sqhgd,shld->shqgl", q, keys) * scale
    # query t of n sees the cached rows up to length - n + t
    last = retained_len.long()[:, :, None] - num_queries + torch.arange(num_queries, device=query.device)
    visible = torch.arange(width * block_size, device=query.device) <= last[..., None]  # [S, H, Q, rows]
    logits = logits.masked_fill(~visible[:, :, :, None], float("-inf"))
    out = torch.einsum("shqgl,shld->sqhgd", logits.softmax(-1), values)
    return out.reshape(query.shape).to(query.dtype)


def prefill_attention(query, key, value, seq_lens: list[int], scale: float, cu_seqlens: torch.Tensor | None = None,
                      return_lse: bool = False):
    """Causal attention of whole prompts over their own fresh K/V, several prompts packed.

    query [T, Hq, D], key/value [T, H, D] with T = sum(seq_lens) (GQA: Hq a multiple of H)
    returns [T, Hq, D], and with ``return_lse`` also each row's log-sum-exp float32 [Hq, T] (natural
    log; None on the CPU, whose column mass computes its own). cu_seqlens: int32 [len(seq_lens) + 1]
    on the device when the caller has uploaded it (else it is made here: a copy that waits for the
    device). CUDA: vLLM's FlashAttention varlen (FA3 on Hopper); CPU: SDPA per prompt."""
    if runs_on(query):
        return _flash_varlen(query, key, value, seq_lens, seq_lens, scale, cu_seqlens, cu_seqlens, return_lse)
    out, start = torch.empty_like(query), 0
    for n in seq_lens:
        q, k, v = (x[start:start + n].transpose(0, 1) for x in (query, key, value))
        out[start:start + n] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
        start += n
    return (out, None) if return_lse else out


@dataclass
class ChunkLayout:
    """The continued prefill chunks of one step (the metadata builder makes it once for all
    layers). rows: int64 [S] the chunk requests' rows in the step; starts / q_lens: host lists,
    each chunk's first token and length; q_index: int64 [sum(q_lens) * H], for every (request,
    KV head, token) in that order the row ``token * H + head`` of the step's queries viewed as
    [T * H, group, D]; cu_q_lens: int32 [S * H + 1] those sequences' offsets; max_len: the
    longest request (keys)."""

    rows: torch.Tensor
    starts: list[int]
    q_lens: list[int]
    q_index: torch.Tensor | None
    cu_q_lens: torch.Tensor | None
    max_len: int

    @staticmethod
    def host_index(starts: list[int], q_lens: list[int], num_kv_heads: int) -> dict[str, torch.Tensor]:
        """The host tensors of :attr:`q_index` and :attr:`cu_q_lens` (to upload with the step)."""
        tokens = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, q_lens)])
        heads = torch.arange(num_kv_heads)
        index = torch.cat([(torch.arange(a, a + n)[None, :] * num_kv_heads + heads[:, None]).flatten()
                           for a, n in zip(starts, q_lens)]) if len(tokens) else tokens
        per_sequence = torch.tensor(q_lens, dtype=torch.int32).repeat_interleave(num_kv_heads)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), per_sequence.cumsum(0, dtype=torch.int32)])
        return {"chunk_q_index": index, "chunk_cu_q_lens": cu}


def paged_chunk_attention(query, out, key_cache, value_cache, head_block_table, retained_len, chunk: ChunkLayout,
                          scale: float, k_scale=None, v_scale=None, q_scale=None) -> None:
    """Continued prefill chunks of several requests, each attending causally over its heads' pages.

    query / out [T, Hq, D]: the step's queries and attention output, of which the chunks' tokens
    (``chunk``) are read and written; head_block_table int32 [S, H, W] and retained_len int32
    [S, H] of the S chunk requests (rows each head holds, this chunk's last; their K/V are
    already written). CUDA: one FlashAttention varlen call over the pages, each (request, KV head)
    a sequence of its own with one KV head and its group of query heads; nothing is gathered.
    CPU: each request's heads gathered, then SDPA.

    fp8 caches (k_scale / v_scale, float32 one element): the CPU gathers them dequantized (float32)
    and attends in float32. CUDA: FlashAttention 3's fp8 path, as vLLM's own backend runs it: the
    chunk's queries quantized with the layer's ``q_scale``, every operand descaled inside."""
    num_seqs, num_kv_heads, width = head_block_table.shape
    head_dim = query.shape[-1]
    group = query.shape[1] // num_kv_heads
    if runs_on(query):
        from vllm_kvcompress.vllm.compat import flash_attn_varlen_func

        rows = query.reshape(-1, group, head_dim)[chunk.q_index]  # [(s, h, t), group, D]
        pool = (key_cache.unsqueeze(2), value_cache.unsqueeze(2))  # [blocks, bs, 1 KV head, D]
        descale = {}
        if k_scale is not None:  # FA3 takes fp8 queries with fp8 pages; a descale per (request, head) sequence
            rows = reference.quantize(rows, q_scale, key_cache.dtype)
            sequences = (num_seqs * num_kv_heads, 1)
            descale = {f"{x}_descale": s.reshape(1, 1).expand(sequences) for x, s in zip("qkv", (q_scale, k_scale, v_scale))}
        attended = flash_attn_varlen_func(
            rows, *pool, max(chunk.q_lens), chunk.cu_q_lens, chunk.max_len,
            seqused_k=retained_len.reshape(-1), block_table=head_block_table.reshape(-1, width),
            softmax_scale=scale, causal=True, fa_version=_fa_version(query), **descale)
        out.view(-1, group, head_dim)[chunk.q_index] = attended
        return
    for s, (start, q_len) in enumerate(zip(chunk.starts, chunk.q_lens)):
        lens = retained_len[s].tolist()
        if len(set(lens)) != 1:
            raise NotImplementedError("the CPU chunk path takes heads of equal lengths (a prefill) only")
        keys, values = (reference.gather_heads(cache, head_block_table[s], lens[0], cache_scale).transpose(0, 1)
                        for cache, cache_scale in ((key_cache, k_scale), (value_cache, v_scale)))
        rows = query[start:start + q_len]
        out[start:start + q_len] = chunk_attention(rows if k_scale is None else rows.float(), keys, values, scale)


def chunk_attention(query, key, value, scale: float) -> torch.Tensor:
    """A continued prefill chunk: the last ``q_len`` of ``S`` positions attend causally over all S.

    query [q_len, Hq, D]; key/value [S, H, D] (S >= q_len) -> [q_len, Hq, D]. CUDA: FlashAttention
    varlen (its causal mask is bottom-right aligned); CPU: SDPA with an explicit mask."""
    q_len, seq_len = query.shape[0], key.shape[0]
    if runs_on(query):
        return _flash_varlen(query, key, value, [q_len], [seq_len], scale)
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
    mask = torch.arange(seq_len, device=query.device)[None, :] <= positions[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=True).transpose(0, 1)


def _fa_version(query) -> int:
    """FA3 on Hopper; FA2 elsewhere (the device bundle carries no FA2 build, so Hopper only there)."""
    return 3 if torch.cuda.get_device_capability(query.device)[0] == 9 else 2


def _flash_varlen(query, key, value, query_lens: list[int], key_lens: list[int], scale: float,
                  cu_q: torch.Tensor | None = None, cu_k: torch.Tensor | None = None, return_lse: bool = False):
    """vLLM's FlashAttention varlen, causal (bottom-right aligned), over packed sequences."""
    from vllm_kvcompress.vllm.compat import flash_attn_varlen_func

    def offsets(lens):
        return torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(query.device)

    cu_q = offsets(query_lens) if cu_q is None else cu_q
    cu_k = offsets(key_lens) if cu_k is None else cu_k
    return flash_attn_varlen_func(query, key, value, max(query_lens), cu_q, max(key_lens), cu_seqlens_k=cu_k,
                                  softmax_scale=scale, causal=True, return_softmax_lse=return_lse,
                                  fa_version=_fa_version(query))


def column_mass(query, key, start: int = 0, lse: torch.Tensor | None = None) -> torch.Tensor:
    """EMS's global score: the causal attention mass each key receives, summed per GQA group.

    query [Hq, q_len, D] at positions ``start ..``; key [H, seq_len, D] -> float32 [H, seq_len].
    lse: the rows' log-sum-exp [Hq, q_len] (natural log) when the caller has it -- FlashAttention
    returns it with the prefill's output -- which saves the kernel its first pass.
    CUDA: the Triton kernel (nothing q_len x seq_len in memory); CPU: the PyTorch reference
    :func:`~vllm_kvcompress.policies.observation.causal_column_mass`, which the HF path uses too."""
    if runs_on(query):
        from vllm_kvcompress.triton_kernels.column_mass import column_mass as triton_mass

        return triton_mass(query, key, start, lse=lse)
    return causal_column_mass(query, key, start=start)


def prompt_table(spans: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """The ``prompts`` table of :func:`prompt_column_masses` (host, int64 [4, P]) from its spans."""
    return torch.tensor(spans, dtype=torch.int64).T.contiguous()


def prompt_column_masses(query: torch.Tensor, key: torch.Tensor, spans: list[tuple[int, int, int, int]],
                         prompts: torch.Tensor | None, lse: torch.Tensor | None) -> torch.Tensor:
    """:func:`column_mass` of the whole prompts a step prefills, all at once.

    query [tokens, Hq, D], key [tokens, H, D]: the step's tokens; spans: per prompt (first token,
    first column of ``lse``, first column of the result, length), on the host; prompts: the same
    as int64 [4, P] on the device (CUDA); lse: FlashAttention's log-sum-exp of the prefill's rows
    [Hq, ...] (CUDA). Returns float32 [H, total length], each prompt's mass in its columns.
    CUDA: one Triton launch for all (a launch per prompt and layer left most SMs idle at 2k
    tokens); CPU: the reference per prompt, as :func:`column_mass` computes it."""
    width = sum(length for *_, length in spans)
    if runs_on(query):
        from vllm_kvcompress.triton_kernels.column_mass import prompt_column_masses as triton_masses

        return triton_masses(query, key, prompts, max(length for *_, length in spans), width, lse)
    mass = torch.empty(key.shape[1], width, dtype=torch.float32, device=key.device)
    for first, _, column, length in spans:
        mass[:, column:column + length] = causal_column_mass(query[first:first + length].transpose(0, 1),
                                                             key[first:first + length].transpose(0, 1))
    return mass


_warmed: set = set()


def warm_up(num_q_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, device) -> None:
    """Compile the kernels that only some requests reach (EMS's column mass) during vLLM's profiling
    run, once per shape: a kernel that fails to build fails the engine's start, and the first EMS
    request pays no compile."""
    if not runs_on(device) or (num_q_heads, num_kv_heads, head_size, dtype) in _warmed:
        return
    query = torch.randn(num_q_heads, 16, head_size, dtype=dtype, device=device)
    key = torch.randn(num_kv_heads, 16, head_size, dtype=dtype, device=device)
    column_mass(query, key)
    spans = [(0, 0, 0, 16)]
    prompt_column_masses(query.transpose(0, 1), key.transpose(0, 1), spans, prompt_table(spans).to(device),
                         torch.zeros(num_q_heads, 16, device=device))
    _warm_merges(head_size, dtype, device)
    _warmed.add((num_q_heads, num_kv_heads, head_size, dtype))


def _warm_merges(head_size: int, dtype: torch.dtype, device) -> None:
    """EMS's merge picks its tile from the tokens per class (a constexpr, :data:`MERGE_BLOCK_TS`):
    compile every tile, and the nearest-centre kernel, in the model's dtype (an fp8 pool's variants
    compile at their first use)."""
    from vllm_kvcompress.triton_kernels.merge import MERGE_BLOCK_TS, merge_kv_by_class
    from vllm_kvcompress.triton_kernels.redundancy import nearest_centres

    rows = torch.randn(1, 2 * MERGE_BLOCK_TS[-1], head_size, dtype=dtype, device=device)  # one head
    for block_t in MERGE_BLOCK_TS:  # one class of 2 * block_t tokens: block_t of them per step
        tokens = rows[:, : 2 * block_t]
        classes = torch.ones(1, 2 * block_t, dtype=torch.int64, device=device)
        merge_kv_by_class(tokens, tokens, torch.ones(1, 2 * block_t, device=device), classes, 1, out_dtype=dtype)
    keep = torch.tensor([[0, 1]], device=device)  # rows 0 and 1 are the centres, the others compared
    nearest_centres(rows, rows, keep, keep >= 0, torch.arange(2, rows.shape[1], device=device)[None],
                    torch.ones(1, rows.shape[1], dtype=torch.bool, device=device))
