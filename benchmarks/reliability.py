"""Reliability benchmark, accounting section: page-accounting invariants of head-block compression.

A simulated scheduler + worker pair drives the real scheduler-side :class:`HeadBlockManager` (over
vLLM's own ``BlockPool``) and the real worker-side :class:`WorkerState` the way vLLM 0.26 does,
through thousands of requests with random prompt / output lengths and

* FCFS admission while the manager can allocate, chunked prefill with random chunk sizes;
* compression at the end of every prefill (random per-head ``keep`` <= rows held; a few requests
  opt out) and decode-time recompression of random heads at random steps;
* head-block reports (``take_reports`` -> ``apply_report``) applied right away or one step late, as
  with async scheduling: the scheduler plans step ``t`` with the reports of steps <= ``t - 2`` only;
* random aborts at any point (waiting, prefill, decode, preempted) and forced preemption when an
  allocation fails (the latest running request loses all its blocks and is recomputed from scratch
  once it is resumed).

After every step :meth:`Cluster.check` asserts: free + held head-blocks == the pool, no block is
held twice or both held and free, and every request's scheduler blocks are exactly the worker's
assigned + spare blocks + blocks released in reports not yet applied + blocks not yet streamed to
the worker. After every step's reports it also asserts that no compressed request keeps spares the
next LAG_TOKENS rows cannot use (nothing withheld from the scheduler). At the end every block must
be free again.

    python benchmarks/reliability.py --requests 10000 --seed 0

prints a table and merges its ``accounting`` section into ``benchmarks/results/reliability.json``
(see :func:`merge_results`: other sections -- bad inputs, load -- are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import vllm
from vllm.v1.core.block_pool import BlockPool

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.vllm.frontend import params
from vllm_kvcompress.vllm.worker import scheduled
from vllm_kvcompress.vllm.scheduler.spec import HeadBlockManager, HeadBlockSpec
from vllm_kvcompress.vllm.worker.state import WorkerState

L, H, BS = 2, 2, 16  # layers, KV heads, tokens per head-block: small, so the pool runs full
RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
# Top-level fields of the result file: each is the sum over the sections that report it (None
# while no section does), so every benchmark writes only its own section.
TOP_LEVEL = ("requests", "pages_leaked", "faults_injected", "bad_inputs_tried", "load_clients", "load_errors")


@dataclass(eq=False)
class Req:
    """One simulated request, as the scheduler sees it."""

    rid: str
    prompt_len: int
    output_len: int
    compress: bool = True   # False: the request opts out (``kv_compression="none"``)
    generated: int = 0      # sampled output tokens
    computed: int = 0       # tokens whose K/V the worker holds (vLLM's num_computed_tokens)
    status: str = "waiting"  # waiting | running | finished | aborted
    seen: bool = False      # the worker holds (or held, before a preemption) a state for it
    resumed: bool = False   # preempted: its next scheduling resumes it (recompute from scratch)
    compressed: bool = False  # compressed since it was last (re)started
    steps: int = 0          # steps of the current prefill (chunked when > 1)

    @property
    def remaining(self) -> int:
        """Known tokens whose K/V is not cached yet (1 while decoding)."""
        return self.prompt_len + self.generated - self.computed


def head_block_manager(num_blocks: int, config: CompressionConfig) -> HeadBlockManager:
    """A HeadBlockManager over a fresh vLLM BlockPool of ``num_blocks`` (block 0 is vLLM's null block),
    of a server started with ``config`` (which it reads from the published server config, as in an
    engine: published here for its start-up only, whatever an earlier engine of this process left)."""
    spec = HeadBlockSpec(block_size=BS, num_kv_heads=H, head_size=8, dtype=torch.float32, num_layers=L)
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=BS)
    with mock.patch.dict(os.environ, {params.CONFIG_ENV: json.dumps(config.to_dict())}):
        return HeadBlockManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                                scheduler_block_size=BS)


class Cluster:
    """Scheduler side (HeadBlockManager + queues) and worker side (WorkerState) of one engine.

    A step is built by :meth:`schedule` / :meth:`preempt` / :meth:`abort` calls and run by
    :meth:`execute`; :meth:`compress`, :meth:`collect_reports`, :meth:`deliver` and :meth:`finish`
    follow it. The primitives enforce only what vLLM guarantees (no resume in the step that
    preempted, reports at most one step late), so any order of calls is a legal schedule.
    """

    def __init__(self, num_blocks: int, seed: int = 0, verify_slots: bool = False):
        self.num_blocks = num_blocks
        self.verify_slots = verify_slots
        config = CompressionConfig(policy="snapkv", budget=16, window=4)
        self.mgr = head_block_manager(num_blocks, config)
        self.pool = self.mgr.block_pool
        self.ws = WorkerState(L, H, BS, {f"layer.{l}.attn": l for l in range(L)}, config)
        self.rng = random.Random(seed)
        self.running: list[Req] = []  # admission order: FCFS preempts the last one
        self.waiting: deque[Req] = deque()
        self.step_no = 0
        self.plan: dict[str, tuple[Req, int]] = {}  # step being built: rid -> (request, tokens)
        self.unsent: dict[str, list[int]] = {}     # allocated block ids the worker has not seen yet
        self.finished_ids: set[str] = set()        # for the next scheduler output
        self.preempted_ids: set[str] = set()       # idem (requests the worker has seen)
        self.preempted_now: set[str] = set()       # preempted in the step being built: not resumable in it
        self.in_flight: list[tuple[int, dict]] = []  # (step, reports) taken but not applied yet
        self.counts = Counter()
        self.max_concurrent = 0

    # ---- scheduler side -----------------------------------------------------------------------
    def submit(self, rid: str, prompt_len: int, output_len: int, compress: bool = True) -> Req:
        req = Req(rid, prompt_len, output_len, compress)
        self.waiting.append(req)
        self.counts["requests"] += 1
        return req

    def schedule(self, req: Req, num_tokens: int) -> bool:
        """Allocate for ``num_tokens`` more tokens of ``req`` in the step being built, as
        ``KVCacheManager.allocate_slots`` does; False (nothing changed) when the pool is short."""
        assert req.status in ("waiting", "running") and 0 < num_tokens <= req.remaining
        assert req.rid not in self.plan and req.rid not in self.preempted_now
        # async scheduling: step t is planned with the reports of steps <= t - 2 applied
        self.deliver(upto=self.step_no - 2)
        rid, total = req.rid, req.computed + num_tokens
        self.mgr.remove_skipped_blocks(rid, req.computed)  # a no-op for full attention, as in vLLM
        missing = self.mgr.get_num_blocks_to_allocate(rid, total, [], req.computed, req.computed, total)
        if missing > self.pool.get_num_free_blocks():
            return False
        new = self.mgr.allocate_new_blocks(rid, total, total)
        self.unsent.setdefault(rid, []).extend(b.block_id for b in new)
        self.plan[rid] = (req, num_tokens)
        if req.status == "waiting":
            self.waiting.remove(req)
            self.running.append(req)
            req.status = "running"
        return True

    def _drop(self, req: Req) -> None:
        """The scheduler forgets ``req``'s blocks (finish, abort, preemption)."""
        self.mgr.free(req.rid)  # what vLLM's KVCacheManager.free does for our single group
        self.plan.pop(req.rid, None)
        self.unsent.pop(req.rid, None)
        if req.status == "running":
            self.running.remove(req)
        elif req.status == "waiting":
            self.waiting.remove(req)

    def preempt(self, req: Req) -> None:
        """Recompute preemption: free every block, requeue at the front of the waiting queue."""
        assert req.status == "running"
        self._drop(req)
        req.status, req.computed, req.compressed, req.steps = "waiting", 0, False, 0
        self.waiting.appendleft(req)
        self.preempted_now.add(req.rid)
        if req.seen:
            req.resumed = True
            self.preempted_ids.add(req.rid)
        self.counts["preemptions"] += 1

    def abort(self, req: Req) -> None:
        assert req.status in ("waiting", "running")
        self._drop(req)
        req.status = "aborted"
        self.finished_ids.add(req.rid)
        self.counts["aborts"] += 1

    def finish(self, req: Req) -> None:
        self._drop(req)
        req.status = "finished"
        self.finished_ids.add(req.rid)
        self.counts["finished"] += 1

    def deliver(self, upto: int | None = None) -> None:
        """Apply the in-flight reports of steps <= ``upto`` (all when None), oldest first."""
        while self.in_flight and (upto is None or self.in_flight[0][0] <= upto):
            _, reports = self.in_flight.pop(0)
            for rid, (released, T, lens) in reports.items():
                # 0 for requests finished or preempted meanwhile
                self.counts["blocks_released"] += self.mgr.apply_report(rid, released, T, lens)
                self.counts["reports"] += 1

    # ---- the step: scheduler output -> worker ------------------------------------------------
    def scheduler_output(self):
        """This step's plan as the fields of vLLM's SchedulerOutput that WorkerState.ingest reads."""
        new, cached_ids, new_block_ids, resumed, all_tokens = [], [], [], set(), {}
        for rid, (req, _) in self.plan.items():
            ids = self.unsent.get(rid) or None
            if not req.seen:
                extra = None if req.compress else {"kv_compression": "none"}
                new.append(scheduled.new_request(rid, req.prompt_len, ids or [], extra))
                continue
            cached_ids.append(rid)
            new_block_ids.append(ids)
            if req.resumed:
                resumed.add(rid)
                all_tokens[rid] = [0] * (req.prompt_len + req.generated)
        return scheduled.scheduler_output(new, scheduled.cached_requests(cached_ids, new_block_ids, resumed, all_tokens),
                                          self.finished_ids, self.preempted_ids)

    def execute(self) -> list[Req]:
        """Run the step: the worker ingests the scheduler output and lays out every scheduled token
        (``prepare_step``, as the attention backend does); a request whose known tokens are all
        cached samples one more. Returns the requests whose (re)computed prefill completed in this
        step and that want compression."""
        self.ws.ingest(self.scheduler_output())
        if self.plan:
            rids = list(self.plan)
            q_lens = [n for _, n in self.plan.values()]
            layout = self.ws.prepare_step(rids, q_lens)  # RuntimeError if the scheduler under-allocated
            if self.verify_slots:
                self._check_slots(rids, q_lens, layout.slots)
        prefilled = []
        for req, n in self.plan.values():
            req.seen, req.resumed = True, False
            req.computed += n
            req.steps += 1
            if req.remaining == 0:
                req.generated += 1
                if not req.compressed and req.compress:
                    prefilled.append(req)
        self.max_concurrent = max(self.max_concurrent, len(self.plan))
        self.plan, self.unsent = {}, {}
        self.finished_ids, self.preempted_ids, self.preempted_now = set(), set(), set()
        self.step_no += 1
        return prefilled

    def _check_slots(self, rids: list[str], q_lens: list[int], slots: torch.Tensor) -> None:
        """The step's slots (int64 [L, T, H]) are distinct and each lies in a block of its own head."""
        assert slots.unique().numel() == slots.numel(), "two new rows share a slot"
        start = 0
        for rid, n in zip(rids, q_lens):
            blocks = slots[:, start:start + n, :] // BS  # [L, n, H]
            for l in range(L):
                for h in range(H):
                    own = set(self.ws.head_blocks(rid, l, h))
                    assert set(blocks[l, :, h].tolist()) <= own, f"{rid} ({l}, {h}) writes outside its blocks"
            start += n

    def compress(self, req: Req, heads: list[tuple[int, int]] | None = None, keep=None) -> None:
        """Shrink heads of ``req`` (all when None) to ``keep(rows) <= rows`` rows (random by default),
        as the compressor does; the worker reports the surplus at :meth:`collect_reports`."""
        keep = keep or (lambda rows: self.rng.randint(0, rows))
        lens = self.ws.retained_lens(req.rid)
        kept = torch.tensor(lens, dtype=torch.int64)
        for l, h in heads if heads is not None else [(l, h) for l in range(L) for h in range(H)]:
            kept[l, h] = keep(lens[l][h])
            assert 0 <= kept[l, h] <= lens[l][h], "compression only shrinks"
        self.ws.compacted_heads(req.rid, kept)  # what the compressor calls
        if not self.ws.reqs[req.rid].compressed:
            self.ws.reqs[req.rid].compressed_to(None)
        self.counts["decode_recompressions" if req.compressed else "compressions"] += 1
        self.counts["chunked_prefills"] += not req.compressed and req.steps > 1
        req.compressed = True

    def collect_reports(self) -> None:
        """The worker's reports of the step just run (the connector's worker metadata)."""
        reports = self.ws.take_reports()
        if reports:
            self.in_flight.append((self.step_no - 1, reports))
        for rid, st in self.ws.reqs.items():  # nothing the next LAG tokens cannot use is withheld
            assert not st.compressed or len(st.spare) <= self.ws.spares_needed(st), (
                f"{rid}: {len(st.spare)} spares kept, {self.ws.spares_needed(st)} needed")

    def live(self) -> list[Req]:
        return [*self.running, *self.waiting]

    # ---- invariants ---------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the accounting invariants (O(pool)); AssertionError says which one broke."""
        free = {b.block_id for b in self.pool.free_block_queue.get_all_free_blocks()}
        assert len(free) == self.pool.get_num_free_blocks(), "free queue length != its free count"
        held: dict[int, str] = {}
        for rid, blocks in self.mgr.req_to_blocks.items():
            for b in blocks:
                assert b.block_id not in held, f"block {b.block_id} held by {held.get(b.block_id)} and {rid}"
                assert b.ref_cnt == 1 and not b.is_null, f"block {b.block_id} of {rid}: ref_cnt {b.ref_cnt}"
                held[b.block_id] = rid
        both = free & held.keys()
        assert not both, f"blocks both free and held: {sorted(both)[:8]}"
        assert len(free) + len(held) == self.num_blocks - 1, (
            f"free {len(free)} + held {len(held)} != pool {self.num_blocks - 1}")
        released: dict[str, list[int]] = {}
        for _, reports in self.in_flight:
            for rid, (ids, _, _) in reports.items():
                released.setdefault(rid, []).extend(ids)
        for rid, blocks in self.mgr.req_to_blocks.items():
            worker = released.get(rid, []) + self.unsent.get(rid, [])
            if rid in self.ws.reqs:
                worker += self.ws.assigned_blocks(rid) + self.ws.spare_blocks(rid)
            assert len(worker) == len(set(worker)), f"{rid}: the worker uses a block twice"
            assert set(worker) == {b.block_id for b in blocks}, (
                f"{rid}: scheduler holds {len(blocks)} blocks, worker accounts for {len(worker)}")
        stale = self.ws.reqs.keys() - self.mgr.req_to_blocks.keys()
        assert stale <= self.finished_ids | self.preempted_ids, f"worker state of released requests {stale}"

    def drain(self) -> int:
        """Abort what is left, run one last step (the worker drops the finished requests), apply
        every report; returns the head-blocks still not free (leaked). Raises AssertionError if
        any state is left on either side."""
        for req in self.live():
            self.abort(req)
        self.execute()
        self.deliver()
        leaked = self.num_blocks - 1 - self.pool.get_num_free_blocks()
        self.check()
        assert not self.ws.reqs and not self.mgr.req_to_blocks and not self.mgr.reports
        return leaked


def schedule_step(cluster: Cluster, rng: random.Random, token_budget: int, max_running: int,
                  max_chunk: int) -> None:
    """vLLM's FCFS policy: running requests first (decode 1 token, prefill a random chunk), the
    latest running request preempted while an allocation fails; then waiting requests in order,
    unless something was preempted in this step."""
    for req in list(cluster.running):
        if req.status != "running" or req.rid in cluster.plan or token_budget == 0:
            continue  # preempted earlier in this loop, or already scheduled
        n = min(req.remaining, token_budget, rng.randint(1, max_chunk))
        while not cluster.schedule(req, n):
            victim = cluster.running[-1]
            cluster.preempt(victim)
            if victim is req:
                break
        else:
            token_budget -= n
    while not cluster.preempted_now and cluster.waiting and token_budget > 0 and len(cluster.running) < max_running:
        req = cluster.waiting[0]
        n = min(req.remaining, token_budget, rng.randint(1, max_chunk))
        if not cluster.schedule(req, n):
            break
        token_budget -= n


def run_accounting(num_requests: int, seed: int, num_blocks: int = 401, max_prompt: int = 300,
                   max_output: int = 16, token_budget: int = 256, max_chunk: int = 128, max_running: int = 16,
                   p_abort: float = 0.02, p_delay: float = 0.5, p_recompress: float = 0.05,
                   p_uncompressed: float = 0.1, check: bool = True, verify_slots: bool = False) -> dict:
    """Drive ``num_requests`` random requests through a :class:`Cluster` of ``num_blocks`` head-blocks
    (``L*H = 4`` per 16 tokens uncompressed; one request of ``max_prompt + max_output`` tokens
    must fit) and return the counts: requests, finished, aborts, preemptions, compressions,
    decode_recompressions, chunked_prefills, reports, blocks_released (head-blocks reports gave
    back), steps, max_concurrent, pages_leaked, faults_injected (aborts + preemptions).
    ``check`` runs :meth:`Cluster.check` after every step (a broken invariant raises
    AssertionError naming the step and seed), ``verify_slots`` also checks every step's slots.

    Per step: a few arrivals keep ~8 requests waiting; with ``p_abort`` a random live request is
    aborted; FCFS scheduling (:func:`schedule_step`); the worker runs the step, compresses the
    completed prefills (``p_uncompressed`` of the requests opt out) and, with ``p_recompress`` per
    compressed decoding request, recompresses random heads; its reports are applied right away or,
    with ``p_delay``, one step late; requests with all their output tokens finish.
    """
    assert L * H * -(-(max_prompt + max_output) // BS) < num_blocks, "a lone request must fit in the pool"
    rng = random.Random(seed)
    cluster = Cluster(num_blocks, seed, verify_slots)
    submitted = 0
    while submitted < num_requests or cluster.running or cluster.waiting:
        while submitted < num_requests and len(cluster.waiting) < 8:
            cluster.submit(f"r{submitted}", rng.randint(1, max_prompt), rng.randint(1, max_output),
                           compress=rng.random() >= p_uncompressed)
            submitted += 1
        if rng.random() < p_abort:
            cluster.abort(rng.choice(cluster.live()))
        schedule_step(cluster, rng, token_budget, max_running, max_chunk)
        decoding = [req for req, _ in cluster.plan.values() if req.compressed]
        for req in cluster.execute():
            cluster.compress(req)
        for req in decoding:
            if req.status == "running" and rng.random() < p_recompress:
                cluster.compress(req, [(l, h) for l in range(L) for h in range(H) if rng.random() < 0.5])
        cluster.collect_reports()
        if rng.random() >= p_delay:
            cluster.deliver()
        for req in [r for r in cluster.running if r.generated >= r.output_len]:
            cluster.finish(req)
        if check:
            try:
                cluster.check()
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, step {cluster.step_no}: {e}") from e
    leaked = cluster.drain()
    c = cluster.counts
    return dict(requests=c["requests"], finished=c["finished"], aborts=c["aborts"], preemptions=c["preemptions"],
                compressions=c["compressions"], decode_recompressions=c["decode_recompressions"],
                chunked_prefills=c["chunked_prefills"], reports=c["reports"],
                blocks_released=c["blocks_released"], steps=cluster.step_no,
                max_concurrent=cluster.max_concurrent, pages_leaked=leaked,
                faults_injected=c["aborts"] + c["preemptions"])


def merge_results(path: Path, section: str, payload: dict) -> dict:
    """Put ``payload`` under ``section`` of the JSON at ``path``, keeping every other section, and
    recompute the top-level fields (:data:`TOP_LEVEL`) as sums over the sections reporting them.
    Written atomically (tmp + rename); returns the whole document."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = payload
    for key in TOP_LEVEL:
        values = [v[key] for v in data.values() if isinstance(v, dict) and isinstance(v.get(key), (int, float))]
        data[key] = sum(values) if values else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=401, help="head-blocks in the pool (incl. vLLM's null block)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = run_accounting(args.requests, args.seed, num_blocks=args.blocks)
    seconds = time.perf_counter() - start
    for key, value in counts.items():
        print(f"{key:>22}  {value}")
    print(f"{'seconds':>22}  {seconds:.1f}")
    payload = dict(counts, seed=args.seed, pool_blocks=args.blocks, layers=L, kv_heads=H, block_size=BS,
                   seconds=round(seconds, 2), python=platform.python_version(), torch=torch.__version__,
                   vllm=vllm.__version__, date=time.strftime("%Y-%m-%d"))
    merge_results(args.out, "accounting", payload)
    print(f"wrote {args.out}")
    sys.exit(0 if counts["pages_leaked"] == 0 else 1)


if __name__ == "__main__":
    main()
