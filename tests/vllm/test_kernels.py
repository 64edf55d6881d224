"""The plugin's CPU attention paths against the plain per-head references (random inputs)."""
import pytest
import torch

from vllm_kvcompress.paged import reference
from vllm_kvcompress.vllm.attention import kernels


@pytest.mark.parametrize("num_seqs,num_queries,num_kv_heads,group,block_size,max_len",
                         [(1, 1, 1, 1, 16, 5), (3, 1, 2, 4, 16, 37), (4, 2, 3, 3, 8, 50), (2, 3, 4, 1, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True], ids=["values", "fp8"])
def test_padded_decode_attention_matches_reference(num_seqs, num_queries, num_kv_heads, group, block_size,
                                                   max_len, dtype, fp8):
    gen = torch.Generator().manual_seed(num_seqs * 100 + max_len)
    head_dim, max_blocks = 16, -(-max_len // block_size) + 1
    num_blocks = num_seqs * num_kv_heads * max_blocks + 3
    key_cache, value_cache, k_scale, v_scale = random_caches(num_blocks, block_size, head_dim, dtype, fp8, gen)
    # every head its own shuffled pages and its own length (>= num_queries: the new rows are cached)
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * num_kv_heads * max_blocks]
    table = table.view(num_seqs, num_kv_heads, max_blocks).int()
    lens = torch.randint(num_queries, max_len + 1, (num_seqs, num_kv_heads), generator=gen).int()
    query = torch.randn(num_seqs, num_queries, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    expected = reference.decode_attention(query, key_cache, value_cache, table, lens, 0.3, k_scale, v_scale)
    got = kernels.padded_decode_attention(query, key_cache, value_cache, table, lens, 0.3, k_scale, v_scale)
    assert got.dtype == dtype and got.shape == expected.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def random_caches(num_blocks, block_size, head_dim, dtype, fp8, gen):
    """Random K and V caches of ``dtype``, or with ``fp8`` float8_e4m3fn caches and their scales
    (0-dim float32 tensors, as vLLM's layers hold them; not 1.0, so a forgotten scale shows)."""
    key_cache, value_cache = (torch.randn(num_blocks, block_size, head_dim, generator=gen) for _ in range(2))
    if not fp8:
        return key_cache.to(dtype), value_cache.to(dtype), None, None
    k_scale, v_scale = torch.tensor(0.03), torch.tensor(0.011)
    return (reference.quantize(key_cache, k_scale, kernels.FP8_DTYPE),
            reference.quantize(value_cache, v_scale, kernels.FP8_DTYPE), k_scale, v_scale)


@pytest.mark.parametrize("head_size", [16, 64, 128, 256])
def test_gpu_head_sizes_the_kernels_tile_are_accepted(head_size):
    kernels.check_head_size(head_size, "cuda")
    kernels.check_head_size(head_size, "cpu")


@pytest.mark.parametrize("head_size", [8, 80, 96, 112])
def test_other_head_sizes_are_refused_on_a_gpu_only(head_size):
    with pytest.raises(ValueError, match=f"power-of-two head size >= 16; this model's attention heads have {head_size}"):
        kernels.check_head_size(head_size, "cuda")
    kernels.check_head_size(head_size, "cpu")  # the PyTorch paths take any size


def test_column_mass_on_the_cpu_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(6, 9, 16, generator=gen), torch.randn(2, 30, 16, generator=gen)
    from vllm_kvcompress.policies.observation import causal_column_mass

    torch.testing.assert_close(kernels.column_mass(query, key, start=21), causal_column_mass(query, key, start=21),
                               rtol=0, atol=0)


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_prompt_column_masses_of_a_step_equal_each_prompts_column_mass(path, monkeypatch):
    """The whole prompts a step prefills get their column masses together (one launch a layer on a
    GPU): each prompt's columns hold what :func:`kernels.column_mass` gives it alone. ``kernel``:
    the CUDA branch (natively on a GPU, under Triton's interpreter on the CPU)."""
    on_gpu = path == "kernel" and torch.cuda.is_available()
    if path == "kernel" and not on_gpu:  # tests/conftest.py set TRITON_INTERPRET=1
        monkeypatch.setattr(kernels, "runs_on", lambda where: True)
    from vllm_kvcompress.policies.observation import causal_row_lse as row_lse

    gen = torch.Generator().manual_seed(0)
    lengths, firsts = [19, 33, 1], [2, 22, 56]  # decode tokens between the prompts
    query, key = torch.randn(60, 8, 16, generator=gen), torch.randn(60, 2, 16, generator=gen)
    spans = [(a, 4 + sum(lengths[:i]), sum(lengths[:i]), n) for i, (a, n) in enumerate(zip(firsts, lengths))]
    lse = torch.zeros(8, 4 + sum(lengths))
    for a, column, _, n in spans:
        lse[:, column:column + n] = row_lse(query[a:a + n].transpose(0, 1), key[a:a + n].transpose(0, 1), 0)
    device = "cuda" if on_gpu else "cpu"
    prompts = kernels.prompt_table(spans).to(device) if path == "kernel" else None
    masses = kernels.prompt_column_masses(query.to(device), key.to(device), spans, prompts, lse.to(device)).cpu()
    for a, _, column, n in spans:
        alone = kernels.column_mass(query[a:a + n].transpose(0, 1), key[a:a + n].transpose(0, 1))
        exact = path == "reference"  # the kernel sums in another order
        torch.testing.assert_close(masses[:, column:column + n], alone, rtol=0 if exact else 1e-4,
                                   atol=0 if exact else 1e-5)


def test_warm_up_compiles_every_merge_tile(monkeypatch):
    """The profiling run's warm-up launches EMS's merge at every tile it can pick (a constexpr each:
    one picked first inside a served window compiled there), and its nearest-centre kernel."""
    from vllm_kvcompress.triton_kernels import merge

    if not torch.cuda.is_available():  # tests/conftest.py set TRITON_INTERPRET=1
        monkeypatch.setattr(kernels, "runs_on", lambda where: True)
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **constexprs: launched.append(constexprs["BLOCK_T"])

    monkeypatch.setattr(merge, "_merge_kernel", Recorder())
    monkeypatch.setattr(kernels, "_warmed", set())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels.warm_up(4, 2, 16, torch.float32, device)
    assert sorted(launched) == list(merge.MERGE_BLOCK_TS)
    kernels.warm_up(4, 2, 16, torch.float32, device)  # once per shape
    assert len(launched) == len(merge.MERGE_BLOCK_TS)


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_gather_heads_padded_gives_each_caches_reference_gather(path, monkeypatch):
    """A tick's dense copy of its heads (K and V in one launch on a GPU): each cache's rows as
    :func:`reference.gather_heads_padded` gives them, fp8 pages dequantized with per-head scales."""
    on_gpu = path == "kernel" and torch.cuda.is_available()
    if path == "kernel" and not on_gpu:  # tests/conftest.py set TRITON_INTERPRET=1
        monkeypatch.setattr(kernels, "runs_on", lambda where: True)
    device = "cuda" if on_gpu else "cpu"
    gen = torch.Generator().manual_seed(3)
    for fp8 in (False, True):
        key_cache, value_cache, k_scale, v_scale = random_caches(12, 16, 32, torch.bfloat16, fp8, gen)
        key_cache, value_cache = key_cache.to(device), value_cache.to(device)
        scales = (None, None) if not fp8 else tuple(torch.stack([s, s * 3, s / 2]).flatten().to(device)
                                                   for s in (k_scale, v_scale))
        table = torch.randperm(12, generator=gen)[:9].view(3, 3).int().to(device)
        lengths = torch.tensor([40, 17, 33], device=device)
        got = kernels.gather_heads_padded(key_cache, value_cache, table, lengths, 41, *scales)
        for rows, cache, scale in zip(got, (key_cache, value_cache), scales):
            assert torch.equal(rows, reference.gather_heads_padded(cache, table, lengths, 41, scale))


@pytest.mark.parametrize("q_lens,seq_lens,group", [([5, 17], [40, 17], 4), ([33], [130], 1), ([8, 8, 3], [8, 64, 99], 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True], ids=["values", "fp8"])
def test_paged_chunk_attention_matches_gathered_chunks(q_lens, seq_lens, group, dtype, fp8):
    """Continued prefill chunks over the pages (FlashAttention with per-(request, head) block
    tables on a GPU) against each request's heads gathered and attended densely; the step's other
    tokens (a decode row between the chunks here) are left alone. fp8 pages: gathered dequantized
    (the GPU also quantizes the queries with the layer's q_scale, as vLLM's FlashAttention does)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the CPU path is the reference itself; bf16 is checked where FlashAttention runs")
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("FlashAttention takes fp16 / bf16 (the GPU engine's prefill runs in those)")
    gen = torch.Generator().manual_seed(sum(seq_lens))
    num_kv_heads, head_dim, bs = 2, 64, 16
    widths = [-(-n // bs) for n in seq_lens]
    num_blocks = num_kv_heads * sum(widths) + 5
    key_cache, value_cache, k_scale, v_scale = random_caches(num_blocks, bs, head_dim, dtype, fp8, gen)
    q_scale = torch.tensor(0.02) if fp8 else None
    order = torch.randperm(num_blocks, generator=gen).int()
    table = torch.zeros(len(seq_lens), num_kv_heads, max(widths) + 1, dtype=torch.int32)
    used = 0
    for s, w in enumerate(widths):
        for h in range(num_kv_heads):
            table[s, h, :w] = order[used:used + w]
            used += w
    lens = torch.tensor(seq_lens, dtype=torch.int32)[:, None].expand(-1, num_kv_heads).contiguous()
    starts, t = [], 0
    for n in q_lens:  # each chunk, then one decode token of another request
        starts.append(t)
        t += n + 1
    query = torch.randn(t, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    host = kernels.ChunkLayout.host_index(starts, q_lens, num_kv_heads)
    to = lambda x: x.to(device)  # noqa: E731
    chunk = kernels.ChunkLayout(to(torch.arange(len(q_lens))), starts, q_lens, to(host["chunk_q_index"]),
                                to(host["chunk_cu_q_lens"]), max(seq_lens))
    out = torch.full_like(query, float("nan")).to(device)
    scales = [None if s is None else to(s) for s in (k_scale, v_scale, q_scale)]
    kernels.paged_chunk_attention(to(query), out, to(key_cache), to(value_cache), to(table), to(lens), chunk, 0.125,
                                  *scales)
    out = out.cpu()
    if fp8 and device == "cuda":  # what FlashAttention's fp8 path attends with
        query = reference.dequantize(reference.quantize(query, q_scale, kernels.FP8_DTYPE), q_scale)
    for start, q_len, n, s in zip(starts, q_lens, seq_lens, range(len(q_lens))):
        keys, values = (reference.gather_heads(c, table[s], n, c_scale).transpose(0, 1).float()
                        for c, c_scale in ((key_cache, k_scale), (value_cache, v_scale)))
        want = kernels.chunk_attention(query[start:start + q_len].float(), keys, values, 0.125)
        got = out[start:start + q_len].float()
        if fp8 and device == "cuda":
            # FlashAttention's fp8 path also rounds the probabilities to e4m3 (3 mantissa bits)
            # before multiplying them with V: each by up to 2^-4 of itself, RMS 2^-4/sqrt(3) = 3.6 %,
            # and over random V the output's relative error is about that RMS. So the chunk is
            # compared by its relative norm (METHOD.md) within 5e-2: an H100 measured 0.0216 and
            # 0.0218 (serving-notes.md, 2026-12-07); a wrong scale or index is off by order 1
            assert not got.isnan().any()
            assert float((got - want).norm() / want.norm()) < 5e-2
        else:
            tol = 1e-5 if dtype == torch.float32 and device == "cpu" else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert out[start + q_len].isnan().all()  # the decode token after the chunk: not written


def test_chunk_layout_orders_queries_by_request_head_token():
    """q_index picks, for every (chunk request, KV head, token) in that order, the token's query
    heads of that KV head's group; cu_q_lens are those sequences' offsets."""
    num_kv_heads, group, head_dim = 3, 2, 4
    query = torch.randn(9, num_kv_heads * group, head_dim)
    starts, q_lens = [1, 6], [4, 2]
    host = kernels.ChunkLayout.host_index(starts, q_lens, num_kv_heads)
    rows = query.reshape(-1, group, head_dim)[host["chunk_q_index"]]
    want = torch.cat([query[a:a + n, h * group:(h + 1) * group] for a, n in zip(starts, q_lens)
                      for h in range(num_kv_heads)])
    assert torch.equal(rows, want)
    assert host["chunk_cu_q_lens"].tolist() == [0, 4, 8, 12, 14, 16, 18]
    assert host["chunk_cu_q_lens"].dtype == torch.int32
