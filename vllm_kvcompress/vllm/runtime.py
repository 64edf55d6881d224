"""Per-process handles of the integration and an optional JSON-lines event log.

vLLM runs the front end, the EngineCore (scheduler) and the worker in separate processes (always
on the CPU), so these globals are only ever read in the process that set them: ``MANAGER`` in the
EngineCore, ``WORKER_STATE`` and ``RUNNER`` in the worker.

``VLLM_KVC_EVENTS=/path/file.jsonl`` makes every process append events there (tests and
benchmarks read block counts and peak concurrency from it); unset, ``event`` is a no-op.
"""
from __future__ import annotations

import json
import os
import time

EVENTS_ENV = "VLLM_KVC_EVENTS"

MANAGER = None       # EngineCore process: the HeadBlockManager
WORKER_STATE = None  # worker process: the WorkerState
RUNNER = None        # worker process: the model runner (rows of input_batch -> request ids)


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
