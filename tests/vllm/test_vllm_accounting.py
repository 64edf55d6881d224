"""Step 2: HeadBlockSpec / HeadBlockManager against a real vLLM BlockPool, and WorkerState."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vllm.v1.core.block_pool import BlockPool

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.vllm.worker import scheduled
from vllm_kvcompress.vllm.scheduler.spec import HeadBlockManager, HeadBlockSpec, HeadLengths
from vllm_kvcompress.vllm.worker.state import LAG_TOKENS, WorkerState, request_config

L, H, BS, D = 2, 2, 16, 8


def spec():
    return HeadBlockSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.float32, num_layers=L)


def manager(num_blocks=200):
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=BS)
    return HeadBlockManager(spec(), block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                            scheduler_block_size=BS)


def allocate(mgr, rid, num_tokens):
    n = mgr.get_num_blocks_to_allocate(rid, num_tokens, [], 0, 0, num_tokens)
    return n, mgr.allocate_new_blocks(rid, num_tokens, num_tokens)


def test_spec_sizes():
    s = spec()
    assert s.page_size_bytes == 2 * BS * D * 4
    assert s.blocks_per_request(100) == L * H * 7
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=100))
    assert s.max_memory_usage_bytes(config) == L * H * 7 * s.page_size_bytes


@pytest.mark.parametrize("model_dtype, ratio", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
def test_an_fp8_pool_holds_more_head_blocks_in_the_same_bytes(model_dtype, ratio):
    """vLLM reports an fp8 cache's dtype as its storage, uint8 (``STR_DTYPE_TO_TORCH_DTYPE``): a
    head-block of an fp8 pool is one byte a value, so vLLM's own sizing of the one-layer group puts
    2x a bf16 pool's head-blocks (4x a float32 one's) in the same KV bytes; a request needs as many."""
    from vllm.v1.core.kv_cache_utils import get_num_blocks

    plain, fp8 = (HeadBlockSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=dtype, num_layers=L)
                  for dtype in (model_dtype, torch.uint8))
    assert fp8.page_size_bytes == 2 * BS * D and plain.page_size_bytes == ratio * fp8.page_size_bytes
    config = SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks_override=None))
    kv_bytes = 1000 * plain.page_size_bytes
    assert get_num_blocks(config, 1, kv_bytes, fp8.page_size_bytes) == ratio * get_num_blocks(
        config, 1, kv_bytes, plain.page_size_bytes) == ratio * 1000
    assert fp8.blocks_per_request(100) == plain.blocks_per_request(100)


def test_uncompressed_request_counts_every_head():
    mgr = manager()
    free = mgr.block_pool.get_num_free_blocks()
    n, blocks = allocate(mgr, "a", 40)  # 3 blocks per head
    assert n == len(blocks) == L * H * 3
    assert allocate(mgr, "a", 48) == (0, [])  # still 3 per head
    assert allocate(mgr, "a", 49)[0] == L * H
    mgr.free("a")
    assert mgr.block_pool.get_num_free_blocks() == free


def test_report_returns_blocks_and_changes_the_need():
    mgr = manager()
    free = mgr.block_pool.get_num_free_blocks()
    _, blocks = allocate(mgr, "a", 100)  # 7 per head = 28
    released = [b.block_id for b in blocks[8:]]  # worker keeps 8 (2 per head)
    assert mgr.apply_report("a", released, 100, [[20, 30], [10, 32]]) == 20
    assert mgr.block_pool.get_num_free_blocks() == free - 8
    # next token: lens + 1 -> cdiv([21, 31, 11, 33], 16) = 2+2+1+3 = 8 held... need 8, hold 8
    assert mgr.need("a", 101) == 2 + 2 + 1 + 3
    assert allocate(mgr, "a", 101)[0] == 0
    assert allocate(mgr, "a", 110)[0] == (2 + 3 + 2 + 3) - 8
    mgr.free("a")
    assert mgr.block_pool.get_num_free_blocks() == free and "a" not in mgr.reports


@pytest.mark.parametrize("reserve", [False, True])
def test_admission_keeps_the_running_requests_growth_free_with_reserve_decode_growth(monkeypatch, reserve):
    # reserve_decode_growth: a new request is admitted only with room left for every compressed
    # request running to grow decode_slack rows a head; a running request's own growth asks no more
    from vllm_kvcompress.vllm.frontend import params
    from vllm_kvcompress.vllm.frontend.request_rules import RequestRules

    config = CompressionConfig(policy="snapkv", budget=32, decode_slack=20, reserve_decode_growth=reserve)
    monkeypatch.setenv(params.CONFIG_ENV, "")
    monkeypatch.setenv(params.RULES_ENV, "")
    params.publish_server_config(config, RequestRules())
    mgr = manager()
    # b's heads at [20, 30, 10, 32] rows grow 20 more: cdiv([40, 50, 30, 52], 16) = 13 blocks; it holds 8
    growth = 13 - 8 if reserve else 0
    assert allocate(mgr, "a", 40)[0] == L * H * 3  # nothing compressed runs yet: no reserve
    _, blocks = allocate(mgr, "b", 100)
    mgr.apply_report("b", [b.block_id for b in blocks[8:]], 100, [[20, 30], [10, 32]])  # b compressed
    assert mgr.admission_reserve() == growth
    assert mgr.get_num_blocks_to_allocate("c", 40, [], 0, 0, 40) == L * H * 3 + growth  # admitting c
    assert mgr.get_num_blocks_to_allocate("b", 120, [], 0, 0, 120) == mgr.need("b", 120) - 8 == 5  # b grows
    assert mgr.get_num_blocks_to_allocate("a", 60, [], 0, 0, 60) == L * H  # a (uncompressed) grows
    assert allocate(mgr, "b", 110)[0] == 2  # cdiv([30, 40, 20, 42], 16) = 10 blocks
    assert mgr.admission_reserve() == (13 - 10 if reserve else 0)  # what b took counts against its growth
    free = mgr.block_pool.get_num_free_blocks()
    assert mgr.apply_report("b", [], 110, [[16, 16], [16, 16]]) == 0  # recompressed; its blocks stay its spares
    assert len(mgr.req_to_blocks["b"]) == 10 and mgr.block_pool.get_num_free_blocks() == free
    assert mgr.need("b", 111) == 2 * L * H  # sized from the new lengths
    assert mgr.admission_reserve() == (3 * L * H - 10 if reserve else 0)  # cdiv(16 + 20, 16) = 3 a head
    mgr.free("b")
    assert mgr.admission_reserve() == 0  # b finished: nothing to keep free for it


def test_report_after_finish_is_ignored_and_foreign_blocks_are_an_error():
    mgr = manager()
    _, blocks = allocate(mgr, "a", 32)
    _, other = allocate(mgr, "b", 32)
    with pytest.raises(RuntimeError, match="disagree"):
        mgr.apply_report("a", [other[0].block_id], 32, [[1, 1], [1, 1]])
    mgr.free("a")
    assert mgr.apply_report("a", [blocks[0].block_id], 32, [[1, 1], [1, 1]]) == 0


def state(policy="snapkv"):
    return WorkerState(L, H, BS, {"l0": 0, "l1": 1}, CompressionConfig(policy=policy, budget=16, window=4))


def test_widening_the_block_tables_keeps_the_query_ring():
    """A head that outgrows the tables' columns widens them; the ring of recent queries (one row
    per table row, not per column) stays the same tensor -- copying it allocated the whole ring
    again mid-step (an OOM at 256 requests of Llama-3-8B on an H100)."""
    ws = state()
    ws.reserve_rows(2, window=4, num_q_heads=2 * H, head_dim=D, dtype=torch.float32)
    ring, columns = ws.recent, ws.tables.shape[3]
    blocks = 2 * L * H * (columns + 1)
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", BS * (columns + 1), list(range(blocks)))]))
    ws.append("a", BS * (columns + 1))  # one block per head more than the tables have columns
    assert ws.tables.shape[3] > columns and ws.recent is ring
    assert ws.head_blocks("a", L - 1, H - 1)[-1] == L * H * (columns + 1) - 1


def test_worker_assigns_blocks_per_head_in_order():
    ws = state()
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", 20, list(range(100, 108)))]))
    slots = ws.append("a", 20)  # [L, 20, H]: 2 blocks per head
    assert slots.shape == (L, 20, H)
    assert [[ws.head_blocks("a", l, h) for h in range(H)] for l in range(L)] == [[[100, 101], [102, 103]], [[104, 105], [106, 107]]]
    assert slots[0, 0, 1] == 102 * BS and slots[1, 17, 0] == 105 * BS + 1
    assert ws.reqs["a"].compress_at == 20 and ws.reqs["a"].observing
    with pytest.raises(RuntimeError, match="under-allocated"):
        ws.append("a", 13)  # 33 rows need a third block per head


@pytest.mark.parametrize("reserve", [False, True])
def test_compaction_and_reports_keep_lag_spares(reserve):
    """After a compaction the request keeps the spares its heads can take in the next LAG_TOKENS
    rows -- with ``reserve_decode_growth`` also in the ``decode_slack`` rows before its next
    recompression -- and reports the rest with its new lengths; a compaction that frees nothing
    is still reported (the scheduler sizes the request from the lengths it was told)."""
    config = CompressionConfig(policy="snapkv", budget=16, window=4, decode_slack=20, reserve_decode_growth=reserve)
    ws = WorkerState(L, H, BS, {"l0": 0, "l1": 1}, config)
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", 64, list(range(16)))]))
    ws.append("a", 64)  # 4 blocks per head
    for l in range(L):
        for h in range(H):
            ws.compacted("a", l, h, 17 if h == 0 else 5)  # 2 and 1 blocks kept
    ws.reqs["a"].compressed_to(torch.full((L, H), 5))
    reports = ws.take_reports()
    released, T, lens = reports["a"]
    assert T == 64 and lens == [[17, 5], [17, 5]]
    # 16 - 6 assigned = 10 spares; the next LAG tokens need none (17+2 <= 32, 5+2 <= 16); with the
    # reserve 20 more rows need one more block a head (cdiv(17+22, 16) = 3, cdiv(5+22, 16) = 2)
    kept = L * H if reserve else 0
    assert LAG_TOKENS == 2 and len(released) == 10 - kept and len(ws.reqs["a"].spare) == kept
    assert ws.take_reports() == {}
    ws.compacted("a", 0, 0, 16)  # a tick that frees no whole block
    assert ws.take_reports() == {"a": ([], 64, [[16, 5], [17, 5]])}
    assert ws.take_reports() == {}


@pytest.mark.parametrize("reserve", [False, True])
def test_with_reserve_decode_growth_a_compacted_head_keeps_the_blocks_it_refills(reserve):
    """A compressed request's compaction (its decode budget known, as at every tick) with
    ``reserve_decode_growth`` leaves in each head's own table the blocks its rows fill in the next
    LAG_TOKENS + decode_slack rows, and releases the rest: its heads then grow until the next tick
    with no spare taken and no block moved. Without it the tail goes to the spares as before."""
    config = CompressionConfig(policy="snapkv", budget=16, window=4, decode_slack=20, reserve_decode_growth=reserve)
    ws = WorkerState(L, H, BS, {"l0": 0, "l1": 1}, config)
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", 64, list(range(16)))]))
    ws.append("a", 64)  # 4 blocks per head
    before = [[ws.head_blocks("a", l, h) for h in range(H)] for l in range(L)]
    ws.reqs["a"].compressed_to(torch.full((L, H), 5))
    ws.compacted_heads("a", torch.tensor([[17, 5], [17, 5]]))
    # kept: cdiv(17 + 2 + 20, 16) = 3 and cdiv(5 + 22, 16) = 2 blocks with the reserve, else 2 and 1
    kept = [3, 2] if reserve else [2, 1]
    assert [[ws.head_blocks("a", l, h) for h in range(H)] for l in range(L)] == \
        [[before[l][h][:kept[h]] for h in range(H)] for l in range(L)]
    released, T, lens = ws.take_reports()["a"]
    assert lens == [[17, 5], [17, 5]] and len(released) + len(ws.reqs["a"].spare) == 16 - L * sum(kept)
    if reserve:
        assert ws.reqs["a"].spare == [] and len(released) == 6  # nothing else to hold
        ws.append("a", 22)  # LAG_TOKENS + decode_slack rows: room in the heads' own blocks
        assert [[len(ws.head_blocks("a", l, h)) for h in range(H)] for l in range(L)] == [kept] * L
        with pytest.raises(RuntimeError, match="under-allocated"):
            ws.append("a", 10)  # 49 rows need a fourth block in head 0: a spare the scheduler grants


def test_reserved_rows_and_ring_are_not_reallocated_while_that_many_requests_run():
    """The worker makes the table rows and the ring of recent queries for ``max_num_seqs``
    requests at start-up (before vLLM's profiling run sizes the pool): requests up to that many
    take rows of them, and their compression seeds the same ring."""
    config = CompressionConfig(policy="snapkv", budget=16, window=4, decode_slack=20)
    ws = WorkerState(L, H, BS, {"l0": 0, "l1": 1}, config)
    ws.reserve_rows(5, window=4, num_q_heads=2 * H, head_dim=D, dtype=torch.float32)
    ring, tables = ws.recent, ws.tables
    assert ring.shape == (L, 5, 4, 2 * H, D) and tables.shape[0] == 5
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request(f"r{i}", 8, [2 * L * H * i + j for j in range(L * H)])
                                              for i in range(5)]))
    ws.ensure_recent(4, 2 * H, D, torch.float32)  # what a request's first compression asks for
    assert ws.recent is ring and ws.tables.shape[0] == 5 and sorted(r.row for r in ws.reqs.values()) == list(range(5))
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("r5", 8, list(range(200, 200 + L * H)))]))
    assert ws.recent.shape[1] == ws.tables.shape[0] >= 6  # beyond them: both grow, as before
    assert torch.equal(ws.recent[:, :5], ring)


def test_finish_preempt_resume():
    ws = state()
    ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", 8, [1, 2, 3, 4]), scheduled.new_request("b", 8, [5, 6, 7, 8], {"kv_compression": "none"})]))
    assert ws.reqs["b"].policy is None and not ws.reqs["b"].observing
    ws.ingest(scheduled.scheduler_output(finished=["b"], preempted=["a"]))
    assert ws.reqs == {}
    cached = scheduled.cached_requests(["a"], [[9, 10, 11, 12]], resumed={"a"}, all_token_ids={"a": list(range(10))})
    ws.ingest(scheduled.scheduler_output(cached=cached))
    assert ws.reqs["a"].spare == [9, 10, 11, 12] and ws.reqs["a"].compress_at == 10


def test_request_overrides():
    base = CompressionConfig(policy="snapkv", budget=64)
    assert request_config(base, None) is base
    cfg = request_config(base, {"kv_compression": "ems", "kv_budget": 0.5, "kv_compression_config": {"window": 8}})
    assert (cfg.policy, cfg.budget.fraction, cfg.window) == ("ems", 0.5, 8)
    with pytest.raises(ValueError, match="budget"):
        request_config(base, {"kv_budget": 0})


@given(st.integers(1, 32), st.lists(st.integers(0, 120), min_size=1, max_size=12), st.integers(-60, 200),
       st.booleans())
def test_reported_need_matches_the_sum_over_heads(block_size, lens, grow, as_lists):
    """The scheduler's O(1) need after a report equals sum cdiv(lens + N - T, bs) over the heads
    (heads shrunk to 0 rows at most, for N < T), for a report's [L][H] lists or a tensor."""
    lens = torch.tensor(lens).reshape(1, -1)
    T = int(lens.max())
    want = int(((lens + grow).clamp(min=0) + block_size - 1).div(block_size, rounding_mode="floor").sum())
    assert HeadLengths(T, lens.tolist() if as_lists else lens, block_size).need(T + grow) == want


def test_packed_upload_returns_every_tensor_unchanged():
    """The one-copy upload (pinned memory on CUDA) packs and unpacks shapes, dtypes and values."""
    ws = state()
    ws.pack_uploads = True
    host = {"a": torch.arange(6, dtype=torch.int32).view(2, 3), "b": torch.tensor([7, -1]),
            "empty": torch.zeros(0, dtype=torch.int64), "c": torch.ones(2, 2, 2, dtype=torch.int64)}
    out = ws.upload(host)
    assert list(out) == list(host)
    for name, t in host.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t)


def test_step_layout_is_the_same_through_the_packed_upload():
    plain, packed = state(), state()
    packed.pack_uploads = True
    for ws in (plain, packed):
        ws.ingest(scheduled.scheduler_output(new=[scheduled.new_request("a", 20, list(range(100, 108))), scheduled.new_request("b", 5, list(range(200, 204)))]))
    one, two = plain.prepare_step(["a", "b"], [20, 5]), packed.prepare_step(["a", "b"], [20, 5])
    for field_ in ("rows", "slots", "tables", "lens"):
        assert torch.equal(getattr(one, field_), getattr(two, field_)), field_
