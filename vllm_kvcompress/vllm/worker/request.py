"""One request as the worker sees it: its phase, its heads' rows and blocks, what it observed.

Lifecycle (every transition is a method of :class:`Request`; nothing else writes its fields):

* ``FULL``: no policy (``none``, or a resumed request whose policy is gone): never compressed;
* ``OBSERVING``: its prefill runs, and the backend stashes what the policy will score it on
  (:meth:`Request.observe`: the latest window queries per layer and the prefill signals its scorer observes);
  once a step takes it to ``compress_at`` tokens it is due for its prefill compression
  (:meth:`Request.count_prefill_chunk` answers that);
* ``COMPRESSED`` (:meth:`Request.compressed_to`): it decodes over its retained rows; its decode
  queries go to a ring (:meth:`Request.ring_slots`) and, with ``decode_slack`` set, it is
  recompressed on the worker's fixed cadence (:meth:`Request.on_cadence`): every ``decode_slack``
  engine steps, whatever request it is, every head over its budget is brought back to it
  (:meth:`Compressor.recompress`). All requests on one cadence come due in the same step and
  go through the policy together (:class:`~.compressor.Compressor`), so the cost of a policy call
  is paid once per ``decode_slack`` steps, not once per request.

Finishing, preemption and resumption are the :class:`~.state.WorkerState`'s: they give the table
row back and start a new :class:`Request`.

Block bookkeeping: ``lens`` (int64 [L, all KV heads], host) the rows every head of the model
holds, ``num_blocks`` (int64 [L, H], host) the blocks assigned to each of this worker's heads --
the request's row of the worker's :class:`HeadCounts`, so that a step appends to every scheduled
request in one tensor operation instead of one per request;
``spare`` the block ids the scheduler gave the request that no head uses yet. Under tensor
parallelism (:class:`~vllm_kvcompress.policies.tensor_parallel.HeadShards`) every rank tracks the lengths
of every rank's heads, which all ranks know the same (the budgets are allocated over all heads),
and gives each of its head *slots* the blocks of the longest head in that slot on any rank
(:attr:`Request.slot_lens`): the scheduler's block ids then mean the same slot on every rank, and
its one count of a request's blocks is exact for each.
"""
from __future__ import annotations

import enum

import torch

from vllm_kvcompress.policies.observation import add_chunk
from vllm_kvcompress.policies.policy import Policy
from vllm_kvcompress.policies.tensor_parallel import HeadShards


class Phase(enum.Enum):
    FULL = "full"
    OBSERVING = "observing"
    COMPRESSED = "compressed"


class HeadCounts:
    """The rows and blocks of every request's heads, one row per row of ``WorkerState.tables``
    (host): ``lens`` int64 [rows, L, all KV heads], the rows each head of the model holds;
    ``blocks`` int64 [rows, L, H], the blocks assigned to each of this worker's heads. A request
    reads and writes its own row (:class:`Request`); a step's append writes the rows of all its
    requests at once (:meth:`append`)."""

    def __init__(self, num_layers: int, shards: HeadShards, rows: int = 0):
        self.lens = torch.zeros(rows, num_layers, shards.total, dtype=torch.int64)
        self.blocks = torch.zeros(rows, num_layers, shards.local, dtype=torch.int64)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` requests (the tables grew); the rows held so far keep their values."""
        for name in ("lens", "blocks"):
            old = getattr(self, name)
            new = old.new_zeros(rows, *old.shape[1:])
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def append(self, rows: torch.Tensor, num_new: torch.Tensor, blocks: torch.Tensor) -> None:
        """``num_new`` int64 [R] more rows in every head of table rows ``rows`` int64 [R], whose
        heads now have ``blocks`` int64 [R, L, H]."""
        self.lens[rows] += num_new[:, None, None]
        self.blocks[rows] = blocks

    def compacted(self, rows: torch.Tensor, lens: torch.Tensor, blocks: torch.Tensor) -> None:
        """The heads of table rows ``rows`` int64 [R] now hold ``lens`` int64 [R, L, all KV heads]
        rows in ``blocks`` int64 [R, L, H] blocks."""
        self.lens[rows] = lens
        self.blocks[rows] = blocks


class Request:
    """row: the request's row of ``WorkerState.tables`` (and of ``counts``, where its heads' rows
    and blocks are); compress_at: the length at which its prefill completes (None: never
    compressed); decode_slack: the cadence of decode-time recompression in engine steps (None:
    never); decode_budget: int64 [L, H] the rows decode-time recompression brings heads back to
    (set by the prefill compression). ``shards``: which of the model's KV heads this worker holds
    (all of them without tensor parallelism)."""

    def __init__(self, counts: HeadCounts, shards: HeadShards, policy: Policy | None, compress_at: int | None,
                 decode_slack: int | None, row: int):
        self.counts = counts
        self.policy = policy
        self.compress_at = compress_at if policy is not None else None
        self.decode_slack = decode_slack
        self.row = row
        self.phase = Phase.OBSERVING if self.compress_at is not None else Phase.FULL
        self.spare: list[int] = []
        self.report_due = False  # spares added or heads compacted since the last check (take_reports)
        self.lengths_due = False  # heads compacted since the last report: the scheduler's lengths are old
        self.num_tokens = 0  # tokens whose K/V went through the cache
        self.max_len = 0  # rows of its longest head
        self.prefill_ends: list[int] = []  # where each step of the observed prefill ended (chunked when > 1)
        self.shards = shards
        self.lens.zero_()  # its row of counts: whatever an earlier request left there
        self.num_blocks.zero_()
        self.queries: dict[int, torch.Tensor] = {}  # layer -> [Hq, <=window, D] latest prefill queries
        self.signals: dict[int, dict[str, torch.Tensor]] = {}  # layer -> prefill signal -> float32 [H, n]
        self.decode_budget: torch.Tensor | None = None
        self.recent_count = 0  # queries written to the ring of recent queries

    # ---- phases -----------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        """True while the prefill runs for a request that will be compressed at its end."""
        return self.phase is Phase.OBSERVING

    @property
    def compressed(self) -> bool:
        return self.phase is Phase.COMPRESSED

    def observes_step(self) -> bool:
        """Whether this step's tokens are prefill tokens the policy must observe."""
        return self.observing and self.num_tokens < self.compress_at

    def count_prefill_chunk(self, seq_len_after: int) -> bool:
        """One more observed prefill step, ending at ``seq_len_after`` tokens; True when it completes
        the prefill (the request is then compressed after this step's forward)."""
        self.prefill_ends.append(seq_len_after)
        return seq_len_after >= self.compress_at

    @property
    def prefill_chunks(self) -> int:
        """Steps the observed prefill took (chunked prefill when > 1)."""
        return len(self.prefill_ends)

    def observe(self, layer: int, queries: torch.Tensor, window: int, signals: dict[str, torch.Tensor] | None = None,
                accumulate: bool = False) -> None:
        """Stash a prefill step's queries [Hq, q_len, D] of ``layer`` (the latest ``window`` are kept)
        and its prefill signals (name -> float32 [H, seq_len], :func:`~vllm_kvcompress.policies.observation.observe_prefill`;
        added to the earlier chunks' when ``accumulate``)."""
        previous = self.queries.get(layer)
        stacked = queries if previous is None else torch.cat([previous, queries], 1)
        self.queries[layer] = stacked[:, -window:].clone()
        if signals:
            self.signals[layer] = add_chunk(self.signals.get(layer, {}) if accumulate else {}, signals)

    def compressed_to(self, decode_budget: torch.Tensor | None) -> None:
        """The prefill compression ran: decode from here, recompressed down to ``decode_budget``
        (int64 [L, H]; None: never recompressed). The stashed observation is dropped."""
        self.phase = Phase.COMPRESSED
        self.decode_budget = decode_budget if self.decode_slack is not None else None
        self.recent_count = next(iter(self.queries.values())).shape[1] if self.queries else 0
        self.queries.clear()
        self.signals.clear()

    # ---- decode -----------------------------------------------------------------------------
    def ring_slots(self, count: int, ring_width: int) -> list[int]:
        """Flat ring indices (row * ring_width + slot) for the request's next ``count`` decode queries."""
        first = self.recent_count
        self.recent_count += count
        return [self.row * ring_width + (first + i) % self.policy.window for i in range(count)]

    @property
    def records_queries(self) -> bool:
        """Whether its decode queries are kept for decode-time recompression."""
        return self.decode_budget is not None

    def on_cadence(self, step: int) -> bool:
        """Whether decode-time recompression looks at it in engine step ``step`` (it takes the heads
        over their budgets: :meth:`Compressor.recompress`)."""
        return self.decode_budget is not None and step % self.decode_slack == 0

    def recent_queries(self) -> int:
        """Queries in its ring (at most the policy's window)."""
        return min(self.recent_count, self.policy.window)

    # ---- rows and blocks --------------------------------------------------------------------
    @property
    def lens(self) -> torch.Tensor:
        """int64 [L, all KV heads]: the rows every head of the model holds (a view of ``counts``)."""
        return self.counts.lens[self.row]

    @property
    def num_blocks(self) -> torch.Tensor:
        """int64 [L, H]: the blocks assigned to this worker's heads (a view of ``counts``)."""
        return self.counts.blocks[self.row]

    @property
    def local_lens(self) -> torch.Tensor:
        """int64 [L, H]: the rows this worker's heads hold."""
        return self.shards.mine(self.lens)

    @property
    def slot_lens(self) -> torch.Tensor:
        """int64 [L, H]: per head slot, the rows of the longest head in it on any rank (the rows its
        blocks are sized for; :meth:`~vllm_kvcompress.policies.tensor_parallel.HeadShards.slot_rows`)."""
        return self.shards.slot_rows(self.lens)

    def add_spares(self, block_ids: list[int]) -> None:
        if block_ids:
            self.spare.extend(block_ids)
            self.report_due = True

    def take_spares(self, count: int, rid: str) -> list[int]:
        if count > len(self.spare):
            raise RuntimeError(f"request {rid}: {count} head-blocks needed, {len(self.spare)} spare "
                               "(scheduler under-allocated; accounting bug)")
        taken = self.spare[:count]
        del self.spare[:count]
        return taken

    def appended(self, num_new: int) -> None:
        """``num_new`` rows went into every head (their counts: :meth:`HeadCounts.append`)."""
        self.max_len += num_new
        self.num_tokens += num_new

    def compacted(self, max_len: int, freed: list[int]) -> None:
        """Its heads were compacted (their counts: :meth:`HeadCounts.compacted`), the longest to
        ``max_len`` rows; ``freed`` are spare."""
        self.spare.extend(freed)
        self.max_len = max_len
        self.report_due = True  # with or without a tail: spares held before may now be surplus
        self.lengths_due = True

    def take_surplus(self, need: int) -> tuple[list[int], bool]:
        """The spares beyond ``need``, released, and whether a report is due: something released or
        the heads compacted since the last report (the scheduler then sizes the request from stale
        lengths, and would hand it blocks it still holds as spares)."""
        due = self.lengths_due
        self.report_due = self.lengths_due = False
        released, self.spare = self.spare[need:], self.spare[:need]
        return released, due or bool(released)
