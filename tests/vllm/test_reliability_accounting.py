"""Page-accounting invariants of head-block compression (issue #6), through the simulated scheduler +
worker pair of ``benchmarks/reliability.py``: the real HeadBlockManager over vLLM's BlockPool and
the real WorkerState, driven by (a) the randomized 10,000-request driver, (b) a hypothesis state
machine whose rules are the individual scheduler / worker events, (c) corrupted reports."""
import random

import benchmark_modules
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule



rel = benchmark_modules.load("reliability")
HEADS = [(l, h) for l in range(rel.L) for h in range(rel.H)]


# ---- (a) the randomized driver ----------------------------------------------------------------
def _assert_stressed(counts: dict, num_requests: int) -> None:
    assert counts["pages_leaked"] == 0
    assert counts["requests"] == num_requests == counts["finished"] + counts["aborts"]
    for key in ("aborts", "preemptions", "compressions", "decode_recompressions", "chunked_prefills", "reports",
                "blocks_released"):
        assert counts[key] > 0, f"the run never exercised {key}"
    assert counts["max_concurrent"] > 1
    assert counts["faults_injected"] == counts["aborts"] + counts["preemptions"]


@pytest.mark.slow
def test_ten_thousand_requests_leak_nothing():
    counts = rel.run_accounting(10_000, seed=0)
    _assert_stressed(counts, 10_000)


@pytest.mark.parametrize("seed, num_blocks, p_delay", [(1, 121, 0.5), (2, 61, 1.0), (3, 161, 0.0)])
def test_other_seeds_and_pools(seed, num_blocks, p_delay):
    """Smaller runs: a tight pool (constant preemption), reports always one step late / never late;
    every step's slots are checked too."""
    counts = rel.run_accounting(300, seed, num_blocks=num_blocks, max_prompt=120, p_delay=p_delay,
                                p_abort=0.05, p_recompress=0.2, verify_slots=True)
    _assert_stressed(counts, 300)


def _under_allocate(monkeypatch):
    need = rel.HeadBlockManager.need
    monkeypatch.setattr(rel.HeadBlockManager, "need", lambda self, rid, n: max(need(self, rid, n) - 1, 0))


def _leak_on_report(monkeypatch):
    apply = rel.HeadBlockManager.apply_report
    monkeypatch.setattr(rel.HeadBlockManager, "apply_report",
                        lambda self, rid, released, T, lens: apply(self, rid, released[1:], T, lens))


def _keep_stale_report(monkeypatch):
    base = rel.HeadBlockManager.__mro__[1].pop_blocks_for_free  # vLLM's: leaves self.reports alone
    monkeypatch.setattr(rel.HeadBlockManager, "pop_blocks_for_free", base)


def _worker_ignores_preemption(monkeypatch):
    ingest = rel.WorkerState.ingest

    def deaf(self, so):
        so.preempted_req_ids = set()
        return ingest(self, so)

    monkeypatch.setattr(rel.WorkerState, "ingest", deaf)


def _skip_report_checks(monkeypatch):
    """take_reports looks only at requests flagged since the last check; forget compaction's flag."""
    compacted = rel.WorkerState.compacted_heads

    def forgetful(self, rid, keep):
        compacted(self, rid, keep)
        self.reqs[rid].report_due = False

    monkeypatch.setattr(rel.WorkerState, "compacted_heads", forgetful)


@pytest.mark.parametrize("sabotage, error", [
    (_under_allocate, "under-allocated"),
    (_skip_report_checks, "spares kept"),
    (_leak_on_report, "worker accounts for"),
    (_keep_stale_report, "under-allocated"),
    (_worker_ignores_preemption, "worker state of released requests"),
])
def test_the_driver_catches_broken_accounting(monkeypatch, sabotage, error):
    """The checks have teeth: each deliberate accounting bug makes a short run fail."""
    sabotage(monkeypatch)
    with pytest.raises((AssertionError, RuntimeError), match=error):
        rel.run_accounting(200, seed=0, max_prompt=120, num_blocks=121)


def test_merge_keeps_other_sections(tmp_path):
    path = tmp_path / "reliability.json"
    rel.merge_results(path, "load", {"load_clients": 8, "load_errors": 0, "requests": 50})
    data = rel.merge_results(path, "accounting", {"requests": 10, "pages_leaked": 0, "faults_injected": 3})
    assert data["load"]["load_clients"] == 8 and data["accounting"]["faults_injected"] == 3
    assert (data["requests"], data["faults_injected"], data["load_clients"]) == (60, 3, 8)
    assert data["bad_inputs_tried"] is None  # no section measured it yet
    data = rel.merge_results(path, "accounting", {"requests": 20, "pages_leaked": 1, "faults_injected": 4})
    assert (data["requests"], data["pages_leaked"], data["load_errors"]) == (70, 1, 0)


# ---- (b) hypothesis state machine -------------------------------------------------------------
class AllocatorMachine(RuleBasedStateMachine):
    """Every rule is one event vLLM can produce, in any order vLLM allows; :meth:`Cluster.check`
    runs after each, and the teardown drains the cluster and requires every block back."""

    def __init__(self):
        super().__init__()
        self.cluster = rel.Cluster(num_blocks=81, verify_slots=True)  # 80 usable: allocations fail often
        self.next_id = 0

    def schedulable(self):
        c = self.cluster
        return [r for r in c.live() if r.rid not in c.plan and r.rid not in c.preempted_now]

    def cached(self):
        """Running requests the worker holds with every known token cached (prefill complete)."""
        c = self.cluster
        return [r for r in c.running if r.rid in c.ws.reqs and not r.resumed and r.generated and r.remaining == 1]

    @initialize(prompts=st.lists(st.integers(1, 150), min_size=1, max_size=4))
    def first_requests(self, prompts):
        for prompt in prompts:
            self.add_request(prompt, output=8, compress=True)

    @rule(prompt=st.integers(1, 150), output=st.integers(1, 12), compress=st.booleans())
    def add_request(self, prompt, output, compress):
        self.cluster.submit(f"q{self.next_id}", prompt, output, compress)
        self.next_id += 1

    @precondition(lambda self: self.schedulable())
    @rule(data=st.data())
    def schedule_chunk(self, data):
        """Admit, resume, continue a prefill chunk or decode one request (False: pool too short)."""
        req = data.draw(st.sampled_from(self.schedulable()))
        self.cluster.schedule(req, data.draw(st.just(req.remaining) | st.integers(1, req.remaining)))

    @rule(seed=st.integers(0, 2**16), budget=st.integers(1, 256), chunk=st.integers(1, 160))
    def fcfs_schedule(self, seed, budget, chunk):
        """vLLM's FCFS pass over the queues, preempting the latest running request on failure."""
        rel.schedule_step(self.cluster, random.Random(seed), budget, max_running=8, max_chunk=chunk)

    @rule()
    def step(self):
        """The worker runs the step and reports surplus head-blocks (connector metadata)."""
        self.cluster.execute()
        self.cluster.collect_reports()

    @precondition(lambda self: self.cached())
    @rule(data=st.data())
    def compress(self, data):
        """Prefill-end compression or decode-time recompression of some heads (keep <= rows),
        reported at once, as the connector does after the compressor."""
        req = data.draw(st.sampled_from(self.cached()))
        heads = data.draw(st.lists(st.sampled_from(HEADS), min_size=1, unique=True))
        self.cluster.compress(req, heads, keep=lambda rows: data.draw(st.integers(0, rows)))
        self.cluster.collect_reports()

    @rule()
    def deliver_reports(self):
        """The scheduler applies the reports in flight (else the next-but-one step's plan does)."""
        self.cluster.deliver()

    @precondition(lambda self: self.cluster.live())
    @rule(data=st.data(), roll=st.integers(0, 3))
    def abort(self, data, roll):
        if roll == 0:  # a quarter of the draws, so requests live long enough to compress
            self.cluster.abort(data.draw(st.sampled_from(self.cluster.live())))

    @precondition(lambda self: self.cluster.running)
    @rule(data=st.data())
    def preempt(self, data):
        self.cluster.preempt(data.draw(st.sampled_from(self.cluster.running)))

    @precondition(lambda self: any(r.generated >= r.output_len for r in self.cluster.running))
    @rule(data=st.data())
    def finish(self, data):
        done = [r for r in self.cluster.running if r.generated >= r.output_len]
        self.cluster.finish(data.draw(st.sampled_from(done)))

    @invariant()
    def accounting_holds(self):
        self.cluster.check()

    def teardown(self):
        assert self.cluster.drain() == 0


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=80, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# ---- (c) corrupted reports --------------------------------------------------------------------
def _two_running_requests():
    """A cluster whose requests a and b each hold blocks (prefilled, not compressed)."""
    c = rel.Cluster(num_blocks=81)
    a, b = c.submit("a", 40, 4), c.submit("b", 40, 4)
    assert c.schedule(a, 40) and c.schedule(b, 40)
    c.execute()
    c.check()
    return c, a, b


@pytest.mark.parametrize("bad", ["foreign", "free", "null", "out_of_range", "own_and_foreign", "own_twice"])
def test_corrupted_report_raises_and_changes_nothing(bad):
    c, a, b = _two_running_requests()
    own = [blk.block_id for blk in c.mgr.req_to_blocks["a"]]
    foreign = c.mgr.req_to_blocks["b"][0].block_id
    free = c.pool.free_block_queue.get_all_free_blocks()[0].block_id
    released = {"foreign": [foreign], "free": [free], "null": [0], "out_of_range": [10**6],
                "own_and_foreign": [own[-1], foreign], "own_twice": [own[-1], own[-1]]}[bad]
    def held():
        return c.pool.get_num_free_blocks(), {rid: [x.block_id for x in bl] for rid, bl in c.mgr.req_to_blocks.items()}

    before = held()
    with pytest.raises(RuntimeError, match="twice" if bad == "own_twice" else "disagree"):
        c.mgr.apply_report("a", released, 40, [[1] * rel.H] * rel.L)
    assert held() == before
    assert "a" not in c.mgr.reports  # the bad report's lengths were not taken either
    c.check()
    assert c.drain() == 0


def test_report_for_a_request_finished_meanwhile_is_ignored():
    c, a, b = _two_running_requests()
    c.compress(a, keep=lambda rows: 0)
    c.collect_reports()  # in flight: a's surplus
    c.finish(a)
    free = c.pool.get_num_free_blocks()
    c.deliver()
    assert c.pool.get_num_free_blocks() == free and "a" not in c.mgr.reports
    c.check()
    assert c.drain() == 0
