"""Per-process handles of the integration and an optional JSON-lines event log.

vLLM runs the front end, the EngineCore (scheduler) and the worker in separate processes (always
on the CPU), so these globals are only ever read in the process that set them: ``MANAGER`` in the
EngineCore, ``WORKER_STATE`` and ``RUNNER`` in the worker.

``VLLM_KVC_EVENTS=/path/file.jsonl`` makes every process append events there (tests and
benchmarks read block counts and peak concurrency from it); unset, ``event`` is a no-op.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

EVENTS_ENV = "VLLM_KVC_EVENTS"

# Under vLLM's "vllm" logger so VLLM_LOGGING_LEVEL and vLLM's handlers apply to our lines too.
logger = logging.getLogger("vllm.kv_compression")

MANAGER = None       # EngineCore process: the HeadBlockManager
WORKER_STATE = None  # worker process: the WorkerState
RUNNER = None        # worker process: the model runner (rows of input_batch -> request ids)


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
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    fields.update(kind=kind, pid=os.getpid(), t=round(time.time(), 4))
    with open(path, "a") as f:
        f.write(json.dumps(fields) + "\n")


def read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
