"""Tensor parallelism's rank logic without vLLM's engine: a model's KV heads split over two ranks,
each a :class:`WorkerState` of its own in a thread of its own, gathering through a fake group
(``all_gather`` concatenates the ranks' tensors in rank order, as vLLM's group does), compress a
request as ONE state holding every head does: the same rows in every head, the same lengths known
on every rank, and the same block ids released by both ranks (what the scheduler's one count of
the request's blocks needs). The engine itself under tensor parallelism: ``test_vllm_tensor_parallel.py``."""
import functools
import threading

import benchmark_modules
import pytest
import torch

from vllm_kvcompress.policies.config import PRESET_NAMES
from vllm_kvcompress.policies.tensor_parallel import SINGLE, HeadShards
from vllm_kvcompress.vllm.worker import compressor
from vllm_kvcompress.vllm.worker.state import WorkerState

host = benchmark_modules.load("host_overhead")
L, H, BS, GROUP = host.L, host.H, host.BS, host.GROUP
RANKS = 2
PROMPT, BUDGET, GROWTH = 120, 40, 65


class ThreadGroup:
    """vLLM's tensor-parallel ``all_gather`` for ranks that are threads of one process."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.parts: list[torch.Tensor | None] = [None] * size

    def all_gather(self, rank: int, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        self.parts[rank] = tensor
        self.barrier.wait()
        gathered = torch.cat(self.parts, dim)
        self.barrier.wait()  # nobody overwrites a part before every rank has read them all
        return gathered

    def shards(self, rank: int) -> HeadShards:
        return HeadShards(len(self.parts), rank, H // len(self.parts), functools.partial(self.all_gather, rank))


def on_every_rank(states: list[WorkerState], work, group: "ThreadGroup") -> list:
    """``work(state)`` on every rank at once (each in its thread); a failure on one fails the test
    instead of leaving the others waiting in a gather."""
    results, errors = [None] * len(states), []

    def run(rank):
        try:
            results[rank] = work(states[rank])
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(states))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def head_rows(ws: WorkerState, rid: str, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values (layer, head) of this worker holds, in row order."""
    n = int(ws.reqs[rid].local_lens[layer, head])
    table = ws.tables[ws.reqs[rid].row, layer, head][None]
    return tuple(compressor.reference.gather_heads(cache, table, n)[0] for cache in ws.pool)


def write_rows(ws: WorkerState, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """keys / values [L, n, H, D] into the slots [L, n, H] ``ws.append`` gave them."""
    for cache, rows in zip(ws.pool, (keys, values)):
        cache.view(-1, cache.shape[-1])[slots.flatten()] = rows.flatten(0, 2).to(cache.dtype)


def split_over_ranks(full: WorkerState, rid: str, group: ThreadGroup) -> list[WorkerState]:
    """Rank states holding ``full``'s prefilled request: each rank its heads' rows and observation,
    the same block ids from the scheduler."""
    st = full.reqs[rid]
    block_ids = list(st.spare) + full.assigned_blocks(rid)
    local = H // RANKS
    states = []
    for rank in range(RANKS):
        ws = WorkerState(L, local, BS, {}, full.config, shards=group.shards(rank))
        ws.pool = torch.zeros_like(full.pool)
        ws.ingest(host.scheduler_output(rid, PROMPT, block_ids))
        slots = ws.append(rid, PROMPT)
        heads = range(rank * local, (rank + 1) * local)
        rows = [[head_rows(full, rid, layer, head) for head in heads] for layer in range(L)]
        keys = torch.stack([torch.stack([k for k, _ in layer], 1) for layer in rows])  # [L, n, local, D]
        values = torch.stack([torch.stack([v for _, v in layer], 1) for layer in rows])
        write_rows(ws, slots, keys, values)
        mine = ws.reqs[rid]
        for layer in range(L):
            mine.queries[layer] = st.queries[layer][rank * local * GROUP:(rank + 1) * local * GROUP]
            mine.signals[layer] = {name: values[rank * local:(rank + 1) * local] for name, values in st.signals[layer].items()}
        states.append(ws)
    return states


def grow(full: WorkerState, ranks: list[WorkerState], rid: str, seed: int) -> None:
    """GROWTH decode rows into every head, the same on both sides, and their queries in the rings."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(L, GROWTH, H, full.pool.shape[-1], generator=gen) for _ in range(2))
    write_rows(full, full.append(rid, GROWTH), keys, values)
    ring = torch.randn(full.recent[:, full.reqs[rid].row].shape, generator=gen).to(full.recent.dtype)
    full.recent[:, full.reqs[rid].row] = ring
    full.reqs[rid].recent_count += GROWTH
    local = H // RANKS
    for rank, ws in enumerate(ranks):
        heads = slice(rank * local, (rank + 1) * local)
        write_rows(ws, ws.append(rid, GROWTH), keys[:, :, heads], values[:, :, heads])
        ws.recent[:, ws.reqs[rid].row] = ring[:, :, rank * local * GROUP:(rank + 1) * local * GROUP]
        ws.reqs[rid].recent_count += GROWTH


def assert_same_as_one_state(full: WorkerState, ranks: list[WorkerState], rid: str) -> None:
    local = H // RANKS
    for rank, ws in enumerate(ranks):
        assert torch.equal(ws.reqs[rid].lens, full.reqs[rid].lens)  # every rank knows every head's rows
        for layer in range(L):
            for head in range(local):
                got, want = head_rows(ws, rid, layer, head), head_rows(full, rid, layer, rank * local + head)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=0, atol=0)
    # the block ids mean the same slot on every rank, and a slot has the blocks of its longest head
    assert torch.equal(ranks[0].tables, ranks[1].tables) and torch.equal(ranks[0].host_tables, ranks[1].host_tables)
    slots = full.reqs[rid].lens.view(L, RANKS, local).amax(1)
    for ws in ranks:
        assert torch.equal(ws.reqs[rid].num_blocks, -(-slots // BS))
        assert ws.spare_blocks(rid) == ranks[0].spare_blocks(rid)


@pytest.mark.parametrize("policy", [p for p in PRESET_NAMES if p not in ("none", "headkv", "headkv-r2")])
def test_two_ranks_compress_as_one_worker_with_every_head(policy):
    """Every preset (HeadKV's allocator splits by scores as Ada-KV's does, from a scores file):
    WindowKV's shared windows and ZigZag's layer measures gather what couples heads too."""
    full, _ = host.prefilled_requests(policy, PROMPT, BUDGET)
    group = ThreadGroup(RANKS)
    ranks = split_over_ranks(full, "r0", group)
    compressor.Compressor(full).compress_prefill("r0")
    on_every_rank(ranks, lambda ws: compressor.Compressor(ws).compress_prefill("r0"), group)
    assert_same_as_one_state(full, ranks, "r0")
    budgets = full.reqs["r0"].lens
    if policy in ("adakv", "ems"):  # budgets split across heads by their scores: the gather mattered
        assert len(set(budgets.flatten().tolist())) > 1
    reports = [ws.take_reports() for ws in ranks]
    assert reports[0] == reports[1] and reports[0]["r0"][0], "both ranks release the same blocks"
    assert reports[0]["r0"][2] == budgets.view(L, RANKS, -1).amax(1).tolist()  # the slots' rows, for the scheduler
    for ws in ranks:  # the scheduler grants blocks for the growth: the released ones again
        ws.reqs["r0"].add_spares(reports[0]["r0"][0])

    grow(full, ranks, "r0", seed=1)
    assert compressor.Compressor(full).recompress(["r0"]) == ["r0"]
    assert on_every_rank(ranks, lambda ws: compressor.Compressor(ws).recompress(["r0"]), group) == [["r0"], ["r0"]]
    assert_same_as_one_state(full, ranks, "r0")
    reports = [ws.take_reports() for ws in ranks]
    assert reports[0] == reports[1]


def test_a_rank_whose_heads_are_within_budget_still_counts_the_others_brought_back():
    """Decode-time recompression: only rank 1's heads are over budget; rank 0 reduces nothing but
    knows rank 1's heads' new lengths (and sizes their shared slots' blocks by them)."""
    full, _ = host.prefilled_requests("snapkv", PROMPT, BUDGET)
    group = ThreadGroup(RANKS)
    ranks = split_over_ranks(full, "r0", group)
    compressor.Compressor(full).compress_prefill("r0")
    on_every_rank(ranks, lambda ws: compressor.Compressor(ws).compress_prefill("r0"), group)
    grow(full, ranks, "r0", seed=2)
    local = H // RANKS
    for ws in (full, *ranks):
        ws.reqs["r0"].decode_budget[:, :local] += 1000  # rank 0's heads: never over
    assert compressor.Compressor(full).recompress(["r0"]) == ["r0"]
    assert on_every_rank(ranks, lambda ws: compressor.Compressor(ws).recompress(["r0"]), group) == [["r0"], ["r0"]]
    assert_same_as_one_state(full, ranks, "r0")
    lens = full.reqs["r0"].lens
    assert (lens[:, :local] == BUDGET + GROWTH).all() and (lens[:, local:] == BUDGET).all()


@pytest.mark.parametrize("measure", ["lmba", "lmbo"])
def test_zigzag_layer_measures_are_gathered(measure):
    """ZigZag's layer need is the mean of its heads' minima: each rank measures its own heads and
    the minima are gathered. Rank 0's heads attend sharply (few tokens cover the mass), rank 1's
    flatly, so a rank-local mean would differ from the one-GPU mean the ranks must agree on."""
    from vllm_kvcompress.policies.allocation import AllocationInput, ZigZagAllocator
    from vllm_kvcompress.policies.observation import LayerObservation
    from vllm_kvcompress.policies.reduction import protected_positions
    from vllm_kvcompress.policies.scoring import SnapKVScorer

    gen = torch.Generator().manual_seed(3)
    layers, heads, n, d = 3, 4, 96, 16
    observations = []
    for _ in range(layers):
        keys = torch.randn(heads, n, d, generator=gen)
        keys[: heads // 2] *= 6.0  # rank 0: sharp attention
        keys[heads // 2:] *= 0.05  # rank 1: nearly flat
        observations.append(LayerObservation(torch.randn(heads * 2, 8, d, generator=gen), keys,
                                             torch.randn(heads, n, d, generator=gen)))
    scores = [SnapKVScorer().score(o) for o in observations]
    protected = protected_positions(n, 8, 0)
    allocator = ZigZagAllocator(measure=measure)
    one_gpu = AllocationInput(scores, 32, 8, protected, observations)

    group = ThreadGroup(RANKS)
    local = heads // RANKS

    def rank_input(rank):
        shards = HeadShards(RANKS, rank, local, functools.partial(group.all_gather, rank))
        mine = [LayerObservation(o.window_queries[rank * local * 2:(rank + 1) * local * 2],
                                 o.keys[rank * local:(rank + 1) * local], o.values[rank * local:(rank + 1) * local])
                for o in observations]
        return AllocationInput(scores, 32, 8, protected, mine, shards)

    inputs = [rank_input(rank) for rank in range(RANKS)]
    needs = on_every_rank(inputs, allocator.layer_needs, group)
    want = allocator.layer_needs(one_gpu)
    assert all(torch.equal(got, want) for got in needs)
    rank_local = allocator.layer_needs(AllocationInput([s[:local] for s in scores], 32, 8, protected, [
        LayerObservation(o.window_queries[:local * 2], o.keys[:local], o.values[:local]) for o in observations]))
    assert not torch.equal(rank_local, want)  # the gather mattered
    budgets = on_every_rank(inputs, allocator.allocate, group)
    assert all(torch.equal(b, allocator.allocate(one_gpu)) for b in budgets)


def test_shards_of_a_model():
    gathered = torch.arange(2 * 8).view(2, 8)  # [layers, all heads]
    shards = HeadShards(4, 1, 2, lambda t, dim: t)
    assert shards.total == 8 and shards.mine(gathered).tolist() == [[2, 3], [10, 11]]
    assert shards.slot_rows(gathered).tolist() == [[6, 7], [14, 15]]  # the last rank's heads are longest
    for single in (HeadShards(local=8), SINGLE):
        assert single.mine(gathered) is gathered and single.slot_rows(gathered) is gathered
        assert single.gather(gathered) is gathered and single.gather_counts(gathered) is gathered
    with pytest.raises(ValueError, match="need their group's all_gather"):
        HeadShards(2, 0, 4)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        HeadShards(2, 2, 4, lambda t, dim: t)
