"""GPU timings of the cache-side kernels: window scores, compaction, merge.

``run_all(device)`` returns one dict per measurement (benchmarks/bench_decode_attention.py writes them to JSON);
``python benchmarks/bench_cache_ops.py`` prints them as a table. Times are medians of
``triton.testing.do_bench``; every buffer is far larger than L2 where bandwidth is reported.

* window_scores: Llama-3-8B shape (32 q / 8 kv heads, head_dim 128, window 32, bf16) against the
  causal prefill attention it follows (torch SDPA, flash backend) over the same prompt:
  ``prefill_frac`` = window-score GPU time (CUDA-graph replay of its 3 launches: in a model's
  forward the CPU queues them while the GPU still runs attention) / prefill-attention time, one
  layer each; ``prefill_frac_eager`` uses the eager time, launch gaps included.
* compaction: Triton and CUDA, ``compaction_bw_frac`` = (kept rows read + written, K and V) per
  second / device-to-device copy bandwidth measured in the same run.
* column_mass: EMS's global score of one layer (every prompt query's softmax summed down the key
  columns), Triton two-pass kernel against the PyTorch reference it replaced on the GPU
  (``speedup``) and against the layer's causal prefill attention (``prefill_frac``).
* merge: EMS merge of K and V, ``bw_frac`` from the bytes of K, V read once and the fp32 outputs
  written once over the launcher's GPU time (graph replay, its sort included); ``kernel_bw_frac``
  over the kernel alone (segments precomputed; eager, so one launch gap included).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from vllm_kvcompress.paged import compaction as dispatch
from vllm_kvcompress.triton_kernels import compaction as triton_compaction
from vllm_kvcompress.triton_kernels import merge as triton_merge
from vllm_kvcompress.triton_kernels.column_mass import column_mass
from vllm_kvcompress.triton_kernels.window_scores import window_scores


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def prefill_attention_ms(q, k, v) -> tuple[float, str]:
    """Causal prefill attention of one layer: flash SDPA (K/V expanded to the query heads, which
    costs flash attention no extra FLOPs), else whatever SDPA picks with GQA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return bench(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)), "sdpa_flash"
    except RuntimeError:
        return bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), "sdpa_gqa"


def bench_window_scores(device) -> list[dict]:
    q_heads, kv_heads, head_dim, window = 32, 8, 128, 32
    rows = []
    for seq_len in (4096, 8192, 16384, 32768):
        q = torch.randn(1, q_heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
        # The prefill's own layout: [tokens, heads, head_dim], viewed head-major by the kernel.
        k_tok = torch.randn(seq_len, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        k = k_tok.transpose(0, 1).unsqueeze(0)
        v = torch.randn_like(k)
        prefill_ms, backend = prefill_attention_ms(q, k, v)
        wq = q[0, :, -window:]  # [q_heads, window, head_dim]
        key = k_tok.transpose(0, 1)
        for power in (1, 2):
            ms = bench(lambda: window_scores(wq, key, power=power))
            # GPU time alone (CUDA graph replay: no launch gaps between the 3 kernels).
            graph_ms = triton.testing.do_bench_cudagraph(lambda: window_scores(wq, key, power=power),
                                                         rep=100, return_mode="median")
            rows.append(dict(op="window_scores", seq_len=seq_len, power=power, window=window, ms=ms,
                             graph_ms=graph_ms, prefill_ms=prefill_ms, prefill_backend=backend,
                             prefill_frac=graph_ms / prefill_ms, prefill_frac_eager=ms / prefill_ms))
        if seq_len <= 16384:  # the reference materialises [kv, group * window, seq_len] fp32
            from vllm_kvcompress.paged import reference

            ref_ms = bench(lambda: reference.window_scores(wq, key.contiguous(), power=1))
            rows[-2]["torch_ref_ms"] = ref_ms
    return rows


def bench_column_mass(device) -> list[dict]:
    from vllm_kvcompress.policies.observation import causal_column_mass

    q_heads, kv_heads, head_dim = 32, 8, 128
    rows = []
    for seq_len in (2048, 4096, 16384):  # 2048: long-gen's prompts
        q_tok = torch.randn(seq_len, q_heads, head_dim, device=device, dtype=torch.bfloat16)
        k_tok = torch.randn(seq_len, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
        query, key = q_tok.transpose(0, 1), k_tok.transpose(0, 1)  # the backend's views, no copies
        prefill_ms, backend = prefill_attention_ms(query[None], key[None], key[None])
        ms = bench(lambda: column_mass(query, key))
        # with the rows' log-sum-exp handed over (FlashAttention returns it with the prefill): one pass
        lse = torch.rand(q_heads, seq_len, device=device) + seq_len ** 0.5
        lse_ms = bench(lambda: column_mass(query, key, lse=lse))
        ref_ms = bench(lambda: causal_column_mass(query, key))
        err = ((column_mass(query, key) - causal_column_mass(query, key)).norm()
               / causal_column_mass(query, key).norm()).item()
        rows.append(dict(op="column_mass", seq_len=seq_len, ms=ms, with_lse_ms=lse_ms, torch_ref_ms=ref_ms,
                         speedup=ref_ms / ms,
                         prefill_ms=prefill_ms, prefill_backend=backend, prefill_frac=ms / prefill_ms, rel_err=err))
    return rows


def compaction_case(device, num_heads, old_len, keep_frac, head_dim, block_size=16, dtype=torch.bfloat16):
    """Pool, shuffled tables and a random kept subset (keep_frac of old_len) for every head."""
    max_blocks = math.ceil(old_len / block_size)
    num_blocks = num_heads * max_blocks
    key_cache = torch.randn(num_blocks, block_size, head_dim, device=device, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    table = torch.randperm(num_blocks, device=device).view(num_heads, max_blocks).int()
    n_keep = int(old_len * keep_frac)
    # Random subsets via top-k of random scores, sorted: strictly increasing rows.
    keep_idx = torch.rand(num_heads, old_len, device=device).topk(n_keep, dim=1).indices.sort(dim=1).values
    keep_len = torch.full((num_heads,), n_keep, device=device, dtype=torch.int32)
    old = torch.full((num_heads,), old_len, device=device, dtype=torch.int32)
    return key_cache, value_cache, table, keep_idx, keep_len, old


def bench_compaction(device, copy_bw) -> list[dict]:
    rows = []
    ext = dispatch.cuda_extension()
    for num_heads, old_len, keep_frac, head_dim in ((1024, 4096, 0.5, 128), (1024, 4096, 0.1, 128),
                                                    (2048, 4096, 0.5, 64), (64, 8192, 0.5, 128)):
        k, v, table, keep_idx, keep_len, old = compaction_case(device, num_heads, old_len, keep_frac, head_dim)
        moved_bytes = 2 * 2 * num_heads * keep_idx.shape[1] * head_dim * k.element_size()  # K+V, read+write
        impls = {f"triton_r{r}_w{w}": (lambda r=r, w=w: triton_compaction._compact_kernel[(num_heads,)](
            k.view(torch.int16), v.view(torch.int16), table, keep_idx, keep_len,
            k.stride(0), k.stride(1), table.stride(0), keep_idx.stride(0),
            ROW=head_dim, BLOCK_SIZE=k.shape[1], BLOCK_R=r, BLOCK_D=head_dim, num_warps=w))
                 for r, w in ((64, 4), (128, 4), (128, 8), (256, 8))}
        if ext is not None:
            impls["cuda"] = lambda: ext.compact(k, v, table, keep_idx, keep_len)
        # The full launchers too (kernel + freed-block lists, one host sync).
        impls["triton_launcher"] = lambda: triton_compaction.compact(k, v, table, keep_idx, keep_len, old)
        impls["freed_blocks_only"] = lambda: triton_compaction.freed_blocks(table, keep_len, old, k.shape[1])
        for name, fn in impls.items():
            ms = bench(fn)
            bw = moved_bytes / (ms * 1e-3)
            rows.append(dict(op="compaction", impl=name, num_heads=num_heads, old_len=old_len,
                             keep_frac=keep_frac, head_dim=head_dim, ms=ms, gb_per_s=bw / 1e9,
                             compaction_bw_frac=bw / copy_bw))
        del k, v
    return rows


def bench_merge(device, copy_bw) -> list[dict]:
    rows = []
    for heads, seq_len, head_dim, num_classes in ((8, 32768, 128, 8192), (8, 32768, 128, 512),
                                                  (64, 8192, 128, 2048)):
        key = torch.randn(heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        weight = torch.rand(heads, seq_len, device=device)
        assign = torch.randint(0, num_classes + 1, (heads, seq_len), device=device)
        nbytes = 2 * key.numel() * key.element_size() + 2 * heads * num_classes * head_dim * 4
        ms = bench(lambda: triton_merge.merge_kv_by_class(key, value, weight, assign, num_classes))
        graph_ms = triton.testing.do_bench_cudagraph(
            lambda: triton_merge.merge_kv_by_class(key, value, weight, assign, num_classes), rep=100,
            return_mode="median")
        sort_ms = triton.testing.do_bench_cudagraph(lambda: triton_merge.class_segments(assign, num_classes),
                                                    rep=100, return_mode="median")
        seg = triton_merge.class_segments(assign, num_classes)
        kernel_ms = bench(lambda: triton_merge.merge_kv_by_class(key, value, weight, assign, num_classes,
                                                                 segments=seg))
        from vllm_kvcompress.paged import reference

        ref_ms = bench(lambda: (reference.merge_by_class(key, weight, assign, num_classes),
                                reference.merge_by_class(value, weight, assign, num_classes)))
        rows.append(dict(op="merge", heads=heads, seq_len=seq_len, head_dim=head_dim,
                         num_classes=num_classes, ms=ms, graph_ms=graph_ms, sort_graph_ms=sort_ms,
                         kernel_ms=kernel_ms, torch_ref_ms=ref_ms,
                         bw_frac=nbytes / (graph_ms * 1e-3) / copy_bw,
                         kernel_bw_frac=nbytes / (kernel_ms * 1e-3) / copy_bw))
    return rows


def bench_recompression(device, copy_bw, shapes=((64, 1704, 1640), (256, 269, 205))) -> list[dict]:
    """One tick of decode-time recompression, part by part, at two shapes of Llama-3-8B heads
    (32 layers x 8 KV heads a request, 4 query heads each, a ring of 32 queries):

    * 64 requests at 10 % of 16k: heads of 1,704 rows back to 1,640;
    * ``long-gen``'s tick: 256 requests at 10 % of 2k + 64 rows of decode, heads of 269 rows back
      to 205 (the served benchmark's long-gen workload, where every request comes due at once).

    Parts: the old copy of the queries out of the ring (``gather_ms``, no longer done), the scores
    read from the pages with the queries in place (two reads of the keys), SnapKV's whole selection
    (scores, pooling, two sorts) and the in-place compaction of the kept rows. ``roofline_ms``: the
    keys read twice and the kept K and V rows read and written, at the copy bandwidth."""
    from vllm_kvcompress.paged.heads import PagedHeads
    from vllm_kvcompress.paged.query_ring import QueryRing
    from vllm_kvcompress.policies.presets import build_policy
    from vllm_kvcompress.triton_kernels.paged_window_scores import paged_window_scores

    policy = build_policy("snapkv")
    results = []
    for requests, rows, keep in shapes:  # requests, rows a head holds, rows it keeps
        layers, kv_heads, group, count, head_dim, bs = 32, 8, 4, 32, 128, 16
        heads = requests * layers * kv_heads
        width = -(-rows // bs)
        k = torch.randn(heads * width, bs, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(heads * width, device=device).view(heads, width).int()
        lengths = torch.full((heads,), rows, device=device)
        ring = torch.randn(layers, requests, count, kv_heads * group, head_dim, device=device, dtype=torch.bfloat16)
        index = torch.arange(heads, device=device)
        queries = QueryRing(ring, index // (requests * kv_heads) % layers, index // kv_heads % requests,
                            index % kv_heads, torch.full((heads,), 5 * count + 3, device=device), count, count, group)
        paged = PagedHeads(queries, k, table, lengths, rows)
        budgets = torch.full((heads,), keep).pin_memory()
        gather_ms = bench(queries.dense)
        score_ms = bench(lambda: paged_window_scores(queries, k, table, lengths, rows))
        select_ms = bench(lambda: policy.select_heads(paged, budgets))
        keep_idx = torch.rand(heads, rows, device=device).topk(keep, dim=1).indices.sort(dim=1).values
        keep_len = torch.full((heads,), keep, device=device)
        compact_ms = bench(lambda: triton_compaction.compact_rows(k, v, table, keep_idx, keep_len))
        key_bytes = heads * rows * head_dim * 2
        roofline_ms = (2 * key_bytes + 2 * 2 * heads * keep * head_dim * 2) / copy_bw * 1e3
        results.append(dict(op="recompression_tick", requests=requests, heads=heads, rows=rows, keep=keep,
                            gather_ms=gather_ms, score_ms=score_ms,
                            score_bw_frac=2 * key_bytes / (score_ms * 1e-3) / copy_bw, select_ms=select_ms,
                            compact_ms=compact_ms, roofline_ms=roofline_ms))
        del k, v, table, ring, paged, keep_idx
    return results


def run_all(device="cuda", ops=("window_scores", "column_mass", "compaction", "merge", "recompression")) -> list[dict]:
    """All measurements, each a flat dict; the first is the copy bandwidth they are relative to."""
    device = torch.device(device)
    copy_bw = copy_bandwidth(device)
    rows = [dict(op="copy", gb_per_s=copy_bw / 1e9, device=torch.cuda.get_device_name(device))]
    if "window_scores" in ops:
        rows += bench_window_scores(device)
    if "column_mass" in ops:
        rows += bench_column_mass(device)
    if "compaction" in ops:
        rows += bench_compaction(device, copy_bw)
    if "merge" in ops:
        rows += bench_merge(device, copy_bw)
    if "recompression" in ops:
        rows += bench_recompression(device, copy_bw)
    return rows


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    import sys

    # python benchmarks/bench_cache_ops.py [window_scores] [column_mass] [compaction] [merge]   (default: all)
    print_table(run_all("cuda", *(sys.argv[1:2] and [tuple(sys.argv[1:])])))
