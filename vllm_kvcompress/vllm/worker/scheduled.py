"""The part of vLLM's ``SchedulerOutput`` that :meth:`~.state.WorkerState.ingest` reads, as plain
objects, for the drivers that run the worker's bookkeeping without vLLM's scheduler (the tests,
``benchmarks/reliability.py``, ``benchmarks/host_overhead.py``). A field ``ingest`` starts to read
is added here, in one place."""
from __future__ import annotations

from types import SimpleNamespace


def new_request(req_id: str, prompt_len: int, block_ids: list[int], extra_args: dict | None = None):
    """A ``NewRequestData``: its prompt (token values are not read), its blocks, its extra_args."""
    return SimpleNamespace(req_id=req_id, prompt_token_ids=[0] * prompt_len, block_ids=(list(block_ids),),
                           sampling_params=SimpleNamespace(extra_args=extra_args))


def cached_requests(req_ids=(), new_block_ids=(), resumed=(), all_token_ids=None):
    """A ``CachedRequestData``: ``new_block_ids[i]`` a list of block ids or None; resumed requests'
    ``all_token_ids`` (prompt + output so far)."""
    return SimpleNamespace(req_ids=list(req_ids), resumed_req_ids=set(resumed),
                           new_block_ids=[None if ids is None else (list(ids),) for ids in new_block_ids],
                           all_token_ids=dict(all_token_ids or {}))


def scheduler_output(new=(), cached=None, finished=(), preempted=(), num_scheduled_tokens=None):
    """A ``SchedulerOutput`` of these requests (``num_scheduled_tokens``: request id -> tokens)."""
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached or cached_requests(),
                           finished_req_ids=set(finished), preempted_req_ids=set(preempted),
                           num_scheduled_tokens=dict(num_scheduled_tokens or {}))
