"""Decode-time recompression of several requests in one batch equals recompressing them one by one."""
import dataclasses

import benchmark_modules
import pytest
import torch

from vllm_kvcompress.policies.scoring import KeyDiffScorer
from vllm_kvcompress.vllm.worker import compressor

host = benchmark_modules.load("host_overhead")


def heads_content(ws, rid):
    """Every (layer, head)'s retained keys and values, in row order: {(l, h): (K, V)}."""
    st = ws.reqs[rid]
    out = {}
    for layer in range(ws.L):
        for head in range(ws.H):
            n = int(st.lens[layer, head])
            table = ws.tables[st.row, layer, head][None]
            out[layer, head] = tuple(compressor.reference.gather_heads(cache, table, n)[0] for cache in ws.pool)
    return out


@pytest.mark.parametrize("policy", ["snapkv", "adakv", "ems", "windowkv", "streamingllm"])
def test_recompressing_requests_together_equals_one_by_one(policy):
    together, alone = host.due_requests(policy, 40, num_requests=3), host.due_requests(policy, 40, num_requests=3)
    # one request falls due with fewer rows in a few heads (another length group) and one is not due
    for ws in (together, alone):
        ws.reqs["r1"].lens[0, :3] -= 5
        ws.reqs["r2"].decode_budget += 1000
    assert compressor.Compressor(together).recompress(["r0", "r1", "r2"]) == ["r0", "r1"]
    assert [compressor.Compressor(alone).recompress([rid]) for rid in ("r0", "r1", "r2")] == [["r0"], ["r1"], []]
    for rid in ("r0", "r1", "r2"):
        assert torch.equal(together.reqs[rid].lens, alone.reqs[rid].lens)
        assert torch.equal(together.reqs[rid].num_blocks, alone.reqs[rid].num_blocks)
        assert together.reqs[rid].spare == alone.reqs[rid].spare  # the freed blocks, in the same order
        assert together.reqs[rid].max_len == alone.reqs[rid].max_len
        got, want = heads_content(together, rid), heads_content(alone, rid)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert (together.reqs["r0"].lens == together.reqs["r0"].decode_budget).all()


@pytest.mark.parametrize("policy", ["snapkv", "ems", "pyramidkv", "streamingllm"])
def test_heads_of_different_lengths_go_through_the_policy_in_one_call(policy, monkeypatch):
    """Padded (``Reducer.pads_heads``): every head due, whatever its length, in one policy call,
    with the same rows as the equal-length grouping (one call per distinct length)."""
    states = {}
    for name, pads in (("padded", True), ("by_length", False)):
        ws = host.due_requests(policy, 40, num_requests=2)
        for r, rid in enumerate(("r0", "r1")):
            ws.append(rid, 30)  # 135 rows a head, then up to 29 fewer in some: all still over 40 + 64
            ws.reqs[rid].lens.sub_(torch.randint(0, 30, ws.reqs[rid].lens.shape, generator=torch.Generator().manual_seed(r)))
        reducer = type(ws.reqs["r0"].policy.reducer)
        monkeypatch.setattr(reducer, "pads_heads", pads)
        calls = []  # policy calls: select_heads (reducers that select rows) or recompress_heads
        for method in ("recompress_heads", "select_heads"):
            original = getattr(type(ws.reqs["r0"].policy), method)
            monkeypatch.setattr(type(ws.reqs["r0"].policy), method,
                                lambda self, *a, _original=original, **k: calls.append(1) or _original(self, *a, **k))
        assert compressor.Compressor(ws).recompress(["r0", "r1"]) == ["r0", "r1"]
        states[name] = ws, len(calls)
        monkeypatch.undo()
    (padded, padded_calls), (by_length, by_length_calls) = states["padded"], states["by_length"]
    assert padded_calls == 1 < by_length_calls
    for rid in ("r0", "r1"):
        assert torch.equal(padded.reqs[rid].lens, by_length.reqs[rid].lens)
        got, want = heads_content(padded, rid), heads_content(by_length, rid)
        for key in want:
            torch.testing.assert_close(got[key], want[key])


def test_calls_split_heads_longest_first_within_the_row_limit():
    lengths = torch.tensor([10, 40, 25, 40, 12])
    assert compressor._calls(lengths, None) == [None] and compressor._calls(lengths, 200) == [None]
    parts = compressor._calls(lengths, 80)  # 2 heads of 40, then 25 + 12 + 10 (3 x 25 <= 80)
    assert [p.tolist() for p in parts] == [[1, 3], [2, 4, 0]]
    assert [p.tolist() for p in compressor._calls(lengths, 30)] == [[1], [3], [2], [4, 0]]  # 40 > 30: alone


def test_emss_merge_through_its_kernels_holds_more_rows_per_call(monkeypatch):
    """On CUDA EMS's merge has no [rows, kept rows] similarities nor float32 copies of the rows
    (its kernels), so a tick's policy call holds more rows of the same workspace: fewer calls."""
    ws = host.due_requests("ems", 40, num_requests=2)
    ws.workspace_bytes = 10_000_000
    policy = ws.reqs["r0"].policy
    reference_rows = compressor._max_rows(ws, policy, 32, 269, 204)
    monkeypatch.setattr(compressor, "runs_on", lambda where: True)
    kernel_rows = compressor._max_rows(ws, policy, 32, 269, 204)
    head_dim, itemsize = ws.pool.shape[-1], ws.pool.element_size()
    assert kernel_rows == ws.workspace_bytes // (4 * head_dim * itemsize + compressor.PAGED_ROW_BYTES
                                                 + compressor.MERGE_ROW_BYTES)
    assert kernel_rows > 2 * reference_rows


def test_a_workspace_too_small_for_one_call_splits_it_with_the_same_rows():
    states = {}
    for name, workspace in (("one_call", 0), ("split", 300_000)):
        ws = host.due_requests("snapkv", 40, num_requests=2)
        ws.workspace_bytes = workspace
        for r, rid in enumerate(("r0", "r1")):
            ws.append(rid, 30)
            ws.reqs[rid].lens.sub_(torch.randint(0, 30, ws.reqs[rid].lens.shape, generator=torch.Generator().manual_seed(r)))
        if workspace:
            heads_due = int(sum((ws.reqs[rid].lens > 104).sum() for rid in ("r0", "r1")))
            assert len(compressor._calls(torch.full((heads_due,), 135), compressor._max_rows(ws, ws.reqs["r0"].policy, 32, 135, 40))) > 2
        assert compressor.Compressor(ws).recompress(["r0", "r1"]) == ["r0", "r1"]
        states[name] = ws
    for rid in ("r0", "r1"):
        assert torch.equal(states["split"].reqs[rid].lens, states["one_call"].reqs[rid].lens)
        got, want = heads_content(states["split"], rid), heads_content(states["one_call"], rid)
        for key in want:
            torch.testing.assert_close(got[key], want[key])


@pytest.mark.parametrize("policy", ["snapkv", "streamingllm", "pyramidkv"])
def test_paged_selection_keeps_the_rows_the_dense_path_keeps(policy, monkeypatch):
    """Reducers that only select rows are scored from the pages and compacted in place
    (PagedHeads, compact_rows); the dense path (gather, recompress_heads, write back) keeps the same
    rows, bit for bit, for heads of different lengths and rings at different positions."""
    states = {}
    for name, paged in (("paged", True), ("dense", False)):
        ws = host.due_requests(policy, 40, num_requests=2, layer_lengths=True)
        monkeypatch.setattr(type(ws.reqs["r0"].policy.reducer), "selects_rows", paged)
        assert compressor.Compressor(ws).recompress(["r0", "r1"]) == ["r0", "r1"]
        states[name] = ws
        monkeypatch.undo()
    for rid in ("r0", "r1"):
        assert torch.equal(states["paged"].reqs[rid].lens, states["dense"].reqs[rid].lens)
        got, want = heads_content(states["paged"], rid), heads_content(states["dense"], rid)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["snapkv", "adakv", "pyramidkv", "streamingllm"])
def test_paged_prefill_compression_keeps_the_rows_the_dense_path_keeps(policy, monkeypatch):
    """After the prefill, reducers that only select rows score every head of the request from its
    pages in one observation and compact in place; the per-layer dense path keeps the same rows."""
    states = {}
    for name, paged in (("paged", True), ("dense", False)):
        ws, _ = host.prefilled_requests(policy, 120, 40)
        monkeypatch.setattr(type(ws.reqs["r0"].policy.reducer), "selects_rows", paged)
        compressor.Compressor(ws).compress_prefill("r0")
        states[name] = ws
        monkeypatch.undo()
    paged, dense = states["paged"].reqs["r0"], states["dense"].reqs["r0"]
    assert torch.equal(paged.lens, dense.lens) and int(paged.lens.float().mean().round()) == 40
    got, want = heads_content(states["paged"], "r0"), heads_content(states["dense"], "r0")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("policy,options", [("ems", {}), ("ems", {"merge_threshold": 0.0}), ("ems-tuned", {}),
                                            ("adakv", {"selects_rows": False}),
                                            ("snapkv", {"scorer": KeyDiffScorer()})])
def test_prefill_reduced_over_many_layers_per_call_keeps_the_rows_of_one_layer_per_call(policy, options, monkeypatch):
    """Reducers that decide each head alone (EMS's merges -- threshold 0 merges every relevant row
    of these random caches; a top-k here made to go the dense way, with page scores or with
    KeyDiff's, which reads the keys) are scored and reduced many layers per call, as many as the
    workspace holds: all heads in one call, several calls, and the per-layer path keep the same
    rows, bit for bit."""
    states, calls = {}, {}
    for name, apart, workspace in (("one_call", True, 0), ("split", True, None), ("per_layer", False, 0)):
        ws, _ = host.prefilled_requests(policy, 160, 60)
        request = ws.reqs["r0"]
        policy_type = type(request.policy)
        if "merge_threshold" in options:
            request.policy = dataclasses.replace(
                request.policy, reducer=dataclasses.replace(request.policy.reducer, **options))
        if "scorer" in options:  # one that reads the keys: scored from the dense rows, call by call
            request.policy = dataclasses.replace(request.policy, scorer=options["scorer"])
        reducer = request.policy.reducer
        monkeypatch.setattr(type(reducer), "selects_rows", options.get("selects_rows", reducer.selects_rows))
        monkeypatch.setattr(policy_type, "compresses_heads_apart", property(lambda self, _apart=apart: _apart))
        # room for a few layers' heads and the reducer's blocks: several calls
        ws.workspace_bytes = reducer.block_bytes + 5_000_000 if workspace is None else workspace
        original = policy_type.reduce_prefill_heads
        counted = []
        monkeypatch.setattr(policy_type, "reduce_prefill_heads",
                            lambda self, *a, **k: counted.append(a[0].num_kv_heads) or original(self, *a, **k))
        compressor.Compressor(ws).compress_prefill("r0")
        states[name], calls[name] = ws, counted
        monkeypatch.undo()
    heads = states["one_call"].L * states["one_call"].H
    assert calls["one_call"] == [heads] and calls["per_layer"] == []
    assert 2 < len(calls["split"]) < states["split"].L and sum(calls["split"]) == heads
    assert len(set(calls["split"][:-1])) == 1 and calls["split"][0] % states["split"].H == 0  # whole layers
    want = states["per_layer"].reqs["r0"]
    assert int(want.lens.float().mean().round()) == 60  # compressed: every head holds 160 rows before
    for name in ("one_call", "split"):
        assert torch.equal(states[name].reqs["r0"].lens, want.lens)
        got, expected = heads_content(states[name], "r0"), heads_content(states["per_layer"], "r0")
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


# ---- fp8 pools: the policies see dequantized rows, written rows are quantized with their layer's scales ----
def as_fp8_and_values(states, seed=0):
    """Turn two equal WorkerStates into an fp8 one (float8_e4m3fn pool, every layer its own K and V
    scales, all different: a wrong one shows) and one holding exactly the values the fp8 one stands
    for (float32). Returns each block's scales, float32 [2, num_blocks] (its layer's)."""
    fp8, values = states
    gen = torch.Generator().manual_seed(seed)
    scales = 0.002 + 0.02 * torch.rand(2, fp8.L, generator=gen)
    layer_of_block = torch.zeros(fp8.pool.shape[1], dtype=torch.int64)
    for request in fp8.reqs.values():
        held = torch.arange(fp8.host_tables.shape[3]) < request.num_blocks[..., None]  # [L, H, columns]
        blocks = fp8.host_tables[request.row].long()
        layer_of_block[blocks[held]] = torch.arange(fp8.L)[:, None, None].expand_as(blocks)[held]
    block_scales = scales[:, layer_of_block]
    stored = compressor.reference.quantize(fp8.pool, block_scales[..., None, None], torch.float8_e4m3fn)
    fp8.pool, values.pool = stored, compressor.reference.dequantize(stored, block_scales[..., None, None])
    fp8.layer_scales = {layer: (scales[0, layer], scales[1, layer]) for layer in range(fp8.L)}
    return block_scales


def assert_fp8_holds_the_values(fp8, values, block_scales):
    """Every row of the fp8 pool, dequantized, is the values pool's row as an fp8 cache stores it
    (rows kept, merged and left behind alike), and the heads' lengths agree."""
    for rid in fp8.reqs:
        assert torch.equal(fp8.reqs[rid].lens, values.reqs[rid].lens)
    scale = block_scales[..., None, None]
    expected = compressor.reference.dequantize(compressor.reference.quantize(values.pool, scale, torch.float8_e4m3fn),
                                               scale)
    torch.testing.assert_close(compressor.reference.dequantize(fp8.pool, scale), expected, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["snapkv", "ems", "pyramidkv", "adakv", "windowkv"])
def test_fp8_prefill_compression_equals_compressing_the_values(policy):
    """Prefill compression of an fp8 pool keeps what the same policy keeps from the values the pool
    stands for, and stores merged rows (EMS) quantized with the layer's scales; prompts of several
    lengths compressed in one step (together where the policy only selects rows)."""
    states = [host.prefilled_requests(policy, [120, 90], 40)[0] for _ in range(2)]
    block_scales = as_fp8_and_values(states)
    for ws in states:
        compressor.Compressor(ws).compress_prefills(["r0", "r1"])
    assert_fp8_holds_the_values(*states, block_scales)


@pytest.mark.parametrize("policy", ["snapkv", "ems", "streamingllm", "adakv", "windowkv"])
def test_fp8_recompression_equals_recompressing_the_values(policy):
    """Decode-time recompression (paged scoring and compaction, or the dense path with a merge) of
    heads of several layers and requests in one call reads and writes each head with its own
    layer's scales."""
    states = [host.due_requests(policy, 40, num_requests=2, layer_lengths=True) for _ in range(2)]
    block_scales = as_fp8_and_values(states)
    for ws in states:
        assert compressor.Compressor(ws).recompress(["r0", "r1"]) == ["r0", "r1"]
    assert_fp8_holds_the_values(*states, block_scales)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only a GPU can be waited for (gpu_session.sh kernels runs this)")
@pytest.mark.parametrize("policy", ["snapkv", "streamingllm"])
def test_compressions_with_budgets_known_on_the_host_never_wait_for_the_gpu(policy):
    """Prefill compressions whose budgets the allocator makes on the host (uniform ones), alone and
    together, and a decode-time recompression tick, only launch work: a wait would hold the host until the step's
    forward is done, and the next step's preparation could not overlap it."""
    prefilled, _ = host.prefilled_requests(policy, [600, 600, 480], 60, head_dim=64, device="cuda")
    due = host.due_requests(policy, 200, num_requests=3, head_dim=64, device="cuda")
    compressor.Compressor(prefilled).compress_prefill("r0")  # first calls compile the kernels
    compressor.Compressor(due).recompress(["r0"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any wait for the device raises
    try:
        compressor.Compressor(prefilled).compress_prefills(["r1", "r2"])  # together, of two lengths
        assert compressor.Compressor(due).recompress(["r1", "r2"]) == ["r1", "r2"]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert prefilled.reqs["r1"].lens.tolist() == prefilled.reqs["r2"].lens.tolist() == [[60] * host.H] * host.L


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only a GPU can be waited for (gpu_session.sh kernels runs this)")
@pytest.mark.parametrize("policy", ["snapkv", "ems"])
def test_compressions_copy_nothing_from_pageable_memory(policy):
    """No prefill compression or recompression tick copies host tensors (e.g. budgets) to the GPU
    from pageable memory: such a copy waits for the step's queued work like a synchronization.
    EMS's tick (budgets known on the host, a few compared rows a head) does not wait at all."""
    prefilled, _ = host.prefilled_requests(policy, [600, 600], 60, head_dim=64, device="cuda")
    due = host.due_requests(policy, 200, num_requests=3, head_dim=64, device="cuda")
    compressor.Compressor(prefilled).compress_prefill("r0")  # first calls compile the kernels
    compressor.Compressor(due).recompress(["r0"])
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        compressor.Compressor(prefilled).compress_prefills(["r1"])
        torch.cuda.set_sync_debug_mode("error")  # any wait for the device raises
        try:
            assert compressor.Compressor(due).recompress(["r1", "r2"]) == ["r1", "r2"]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    assert benchmark_modules.load("profile_engine").pageable_copies(prof) == 0


@pytest.mark.parametrize("policy,two_fit", [("snapkv", False), ("adakv", False), ("pyramidkv", False),
                                             ("streamingllm", False), ("ems", False), ("snapkv", True)])
def test_prefills_compressed_together_equal_prefills_compressed_one_by_one(policy, two_fit, monkeypatch):
    """The prompts a step completes are compressed in one scoring, selection and compaction when
    their policy only selects rows (heads right-aligned to the longest prompt), in one scoring,
    allocation and dense reduction per prompt length when it merges (EMS); each request keeps
    what it would keep alone: rows, kept rows' contents, freed blocks, decode budgets, query rings.
    ``two_fit``: a compression workspace that holds two of the requests' heads: runs of two."""
    prompts, rids = [200, 171, 200, 150], ["r0", "r1", "r2", "r3"]
    together, _ = host.prefilled_requests(policy, prompts, 0.3)
    alone, _ = host.prefilled_requests(policy, prompts, 0.3)
    if two_fit:
        together.workspace_bytes = 2 * host.L * host.H * 200 * compressor.PAGED_ROW_BYTES
    calls = []
    select = type(together.reqs["r0"].policy).select_prefills
    monkeypatch.setattr(type(together.reqs["r0"].policy), "select_prefills",
                        lambda self, heads, lengths, *args: calls.append(lengths) or select(self, heads, lengths, *args))
    reduce_apart = compressor.Compressor._reduce_prefill_apart
    monkeypatch.setattr(compressor.Compressor, "_reduce_prefill_apart", lambda self, requests: calls.append(
        [request.num_tokens for request in requests]) or reduce_apart(self, requests))
    compressor.Compressor(together).compress_prefills(rids)
    monkeypatch.undo()
    selects = together.reqs["r0"].policy.scores_from_pages
    if two_fit:
        assert calls == [prompts[:2], prompts[2:]]
    else:  # EMS's merges: the two prompts of 200 together, each other length alone
        assert calls == ([prompts] if selects else [[200, 200], [171], [150]])
    for rid in rids:
        compressor.Compressor(alone).compress_prefill(rid)
    for rid in rids:
        got, want = together.reqs[rid], alone.reqs[rid]
        assert torch.equal(got.lens, want.lens) and torch.equal(got.decode_budget, want.decode_budget)
        assert got.spare == want.spare and got.max_len == want.max_len
        assert torch.equal(together.recent[:, got.row], alone.recent[:, want.row])
        kept, wanted = heads_content(together, rid), heads_content(alone, rid)
        for key in wanted:
            torch.testing.assert_close(kept[key], wanted[key], rtol=0, atol=0)
    assert int(together.reqs["r3"].lens.float().mean().round()) == 45  # 0.3 of its 150 rows


@pytest.mark.parametrize("policy,varied", [("ems", True), ("ems-tuned", False), ("adakv", True)])
def test_reducers_that_fill_their_budgets_report_the_rows_the_device_kept(policy, varied, monkeypatch):
    """A prefill reduced head by head (EMS's merges) takes each head's kept rows from its budget when
    the reducer fills budgets, without asking the device: the rows the device kept, the same."""
    prompts, lens = [300, 250, 300], {}  # the two of 300 reduced together
    for fills in (True, False):
        ws, _ = host.prefilled_requests(policy, prompts, 0.3)
        policy_of = ws.reqs["r0"].policy
        monkeypatch.setattr(type(policy_of.reducer), "selects_rows", False)  # Ada-KV's top-k the dense way too
        monkeypatch.setattr(type(policy_of.reducer), "fills_budgets", property(lambda self, fills=fills: fills))
        compressor.Compressor(ws).compress_prefills(["r0", "r1", "r2"])
        lens[fills] = [ws.reqs[rid].lens.clone() for rid in ("r0", "r1", "r2")]
        monkeypatch.undo()
    for with_budgets, from_device in zip(lens[True], lens[False]):
        assert torch.equal(with_budgets, from_device)
    # Ada-KV's budgets differ by head (ems-tuned's are uniform)
    assert bool((lens[True][1] == lens[True][1].flatten()[0]).all()) != varied
