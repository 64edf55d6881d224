"""Per-process handles of the integration and an optional JSON-lines event log.

vLLM runs the front end, the EngineCore (scheduler) and the worker in separate processes (always
on the CPU), so these globals are only ever read in the process that set them: ``MANAGER`` in the
EngineCore, ``WORKER_STATE``, ``COMPRESSOR`` and ``RUNNER`` in the worker.

``VLLM_KVC_EVENTS=/path/file.jsonl`` makes every process append events there (tests and
benchmarks read block counts and peak concurrency from it); unset, ``event`` is a no-op. With it
set, the worker also writes one ``step_time`` event per step (:class:`StepTimer`): where the step's
time went, for the serving benchmark's breakdown. Under tensor parallelism only the first rank's
worker writes events and ships counters (:data:`TENSOR_PARALLEL_RANK`): every rank compresses the
same requests to the same lengths.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

EVENTS_ENV = "VLLM_KVC_EVENTS"

# Under vLLM's "vllm" logger so VLLM_LOGGING_LEVEL and vLLM's handlers apply to our lines too.
logger = logging.getLogger("vllm.kv_compression")

MANAGER = None       # EngineCore process: the HeadBlockManager
WORKER_STATE = None  # worker process: the WorkerState
COMPRESSOR = None    # worker process: the Compressor over WORKER_STATE
RUNNER = None        # worker process: the model runner (rows of input_batch -> request ids)
TENSOR_PARALLEL_RANK = 0  # worker process: its rank in vLLM's tensor-parallel group


@dataclass
class CompressionStats:
    """Worker-process counters since the last :func:`take_stats` (the connector ships them to the
    front end each step, where they become Prometheus metrics)."""

    compressions: int = 0      # (request, compression) events, prefill and decode-time
    tokens_before: int = 0     # rows held by all heads before those compressions (sum over L*H)
    tokens_retained: int = 0   # rows held after them
    blocks_released: int = 0   # head-blocks reported back to the scheduler


STATS = CompressionStats()


def record_compression(tokens_before: int, tokens_retained: int) -> None:
    STATS.compressions += 1
    STATS.tokens_before += tokens_before
    STATS.tokens_retained += tokens_retained


def record_release(num_blocks: int) -> None:
    STATS.blocks_released += num_blocks


def take_stats() -> CompressionStats:
    """The counters since the last call, reset to zero."""
    global STATS
    taken, STATS = STATS, CompressionStats()
    return taken


def event(kind: str, **fields) -> None:
    events(kind, [fields])


def events_enabled() -> bool:
    """Whether :func:`events` writes anything (callers skip building big records otherwise)."""
    return bool(os.environ.get(EVENTS_ENV)) and not TENSOR_PARALLEL_RANK


def events(kind: str, records: list[dict]) -> None:
    """One event of ``kind`` per record, in one write (no-op without :data:`EVENTS_ENV`)."""
    if not events_enabled() or not records:
        return
    path = os.environ[EVENTS_ENV]
    common = dict(kind=kind, pid=os.getpid(), t=round(time.time(), 4))
    with open(path, "a") as f:
        f.write("".join(json.dumps({**fields, **common}) + "\n" for fields in records))


def read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recompression_phases(events: list[dict], request_ids: list[str], slack: int) -> list[int]:
    """Per request (vLLM's external ids), the phase of its decode-time recompression, as the HF
    reference path takes it (``hf.generate(recompress_phase=...)``): the worker recompresses on
    engine steps that are multiples of ``slack``, and a request compressed after its prefill at step
    s with T tokens holds T + (t - s) tokens at a later step t. Raises if a decode-time
    recompression of these requests left that cadence (internal ids are ``external-suffix``)."""
    compressed = [e for e in events if e["kind"] == "compressed" and e["req_id"].rsplit("-", 1)[0] in request_ids]
    external = {e["req_id"]: e["req_id"].rsplit("-", 1)[0] for e in compressed}
    phases = {external[e["req_id"]]: (e["tokens"] - e["step"]) % slack for e in compressed if e["what"] == "prefill"}
    for e in compressed:
        if e["what"] == "decode" and (e["step"] % slack or (e["tokens"] - phases[external[e["req_id"]]]) % slack):
            raise RuntimeError(f"a decode-time recompression off the {slack}-step cadence: {e}")
    return [phases[r] for r in request_ids]


@dataclass
class _StepRecord:
    fields: dict
    device: list = field(default_factory=list)  # (name, start event, end event) on the device


class StepTimer:
    """Where a worker step's time goes: one ``step_time`` event per step, only while events are on.

    ``interval_ms``: host time from this step's start to the next's (the step as the worker paces
    it); ``host(name)`` regions add host ms (``layout_ms``, ``report_ms``); ``device(name)``
    regions add the device time of the work they enqueue (``compress_ms``, ``recompress_ms``),
    measured with CUDA events that are read once they completed -- a step's record is written a
    step or more later, and nothing waits for the device. On the CPU both are host times."""

    def __init__(self):
        self.enabled = bool(os.environ.get(EVENTS_ENV))
        self.current: _StepRecord | None = None
        self.started = 0.0
        self.waiting: list[_StepRecord] = []  # finished steps whose device events may still run

    def step_started(self, **fields) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.current is not None:
            self.current.fields["interval_ms"] = round((now - self.started) * 1e3, 3)
            self.waiting.append(self.current)
        self.current, self.started = _StepRecord({"layout_ms": 0.0, "compress_ms": 0.0, "recompress_ms": 0.0,
                                                  "report_ms": 0.0, "recompressed_requests": 0, **fields}), now
        self._write_completed()

    def note(self, **fields) -> None:
        if self.enabled and self.current is not None:
            self.current.fields.update(fields)

    @contextlib.contextmanager
    def host(self, name: str):
        if not self.enabled or self.current is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current.fields[name] = self.current.fields.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    @contextlib.contextmanager
    def device(self, name: str, on_cuda: bool):
        if not self.enabled or self.current is None or not on_cuda:
            with self.host(name):
                yield
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.current.device.append((name, start, end))

    def _write_completed(self) -> None:
        while self.waiting and all(end.query() for _, _, end in self.waiting[0].device):
            record = self.waiting.pop(0)
            for name, start, end in record.device:
                record.fields[name] = record.fields.get(name, 0.0) + start.elapsed_time(end)
            event("step_time", **{k: round(v, 3) if isinstance(v, float) else v for k, v in record.fields.items()})


TIMER = StepTimer()
