"""Compression counters on the server's ``/metrics``, through vLLM's KV-connector stats channel.

Path (vLLM 0.26): the worker's connector returns :class:`KVCompressStats` from
``get_kv_connector_stats`` after each forward (``kv_connector_model_runner_mixin.py``) ->
``KVConnectorOutput.kv_connector_stats`` -> ``Scheduler.update_from_output`` -> ``SchedulerStats
.kv_connector_stats`` (its ``data`` dict) -> front end: ``PrometheusStatLogger.record`` ->
``KVConnectorProm.observe`` -> :class:`KVCompressPromMetrics` (built by the connector's
``build_prom_metrics``); ``LoggingStatLogger`` also logs :meth:`KVCompressStats.reduce` as
"KV Transfer metrics". Stats only flow when vLLM logs stats (``vllm serve``; not offline ``LLM``).

Exposed, labelled ``model_name`` and ``engine`` like vLLM's own metrics:

* ``vllm:kv_compression_compressions_total`` (counter): (request, compression) events.
* ``vllm:kv_compression_blocks_freed_total`` (counter): head-blocks returned to the scheduler's pool.
* ``vllm:kv_compression_tokens_before_total`` / ``..._tokens_retained_total`` (counters): KV rows
  (summed over layers and heads) before and after those compressions; ``rate(retained) /
  rate(before)`` is the ratio over any window.
* ``vllm:kv_compression_ratio`` (gauge): retained / before over every compression since the server
  started (NaN until the first one): the share of the prompts' KV the server keeps.

Not through the connector: ``vllm:kv_compression_refused_requests_total{reason}`` (counter),
requests answered HTTP 400 for their compression options, counted where they are validated: the
front-end (API-server) process, in prometheus_client's default registry, which vLLM's ``/metrics``
serves (with ``--api-server-count`` > 1 vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` before spawning the
API servers, so each one's counts land in that directory and ``/metrics`` sums them). Reasons:
``policy``, ``budget``, ``option`` (the operator's rules, :mod:`vllm_kvcompress.vllm.frontend.request_rules`) and ``invalid`` (a
bad value, an unknown key, a server option). Not labelled by engine: a refused request reaches none.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import prometheus_client
from vllm_kvcompress.vllm.compat import KVConnectorPromMetrics, KVConnectorStats, create_metric_per_engine

from vllm_kvcompress.vllm import runtime

FIELDS = tuple(f.name for f in dataclasses.fields(runtime.CompressionStats))
# counter name (prometheus_client appends "_total") -> the data field it adds up
COUNTERS = {
    "vllm:kv_compression_compressions": ("compressions", "Compressions of a request's KV cache (prefill and decode-time)."),
    "vllm:kv_compression_blocks_freed": ("blocks_released", "Head-blocks returned to the KV-cache pool after compression."),
    "vllm:kv_compression_tokens_before": ("tokens_before", "KV rows (summed over layers and KV heads) before compression."),
    "vllm:kv_compression_tokens_retained": ("tokens_retained", "KV rows (summed over layers and KV heads) kept by compression."),
}
RATIO = "vllm:kv_compression_ratio"
REFUSED = "vllm:kv_compression_refused_requests"
REFUSAL_REASONS = ("policy", "budget", "option", "invalid")
_refused: prometheus_client.Counter | None = None  # made by the first refused_requests() of the process


def refused_requests() -> prometheus_client.Counter:
    """The refusal counter, registered in prometheus_client's default registry. vLLM's stat logger
    unregisters every ``vllm:`` collector from it when it starts (``unregister_vllm_metrics``), so
    :class:`KVCompressPromMetrics`, which that logger builds afterwards, calls this again to put the
    counter back; its reasons start at 0, so /metrics lists them before the first refusal."""
    global _refused
    if _refused is None:
        _refused = prometheus_client.Counter(REFUSED, "Requests refused (HTTP 400) for their kv compression options.",
                                             labelnames=["reason"], registry=None)
        for reason in REFUSAL_REASONS:
            _refused.labels(reason=reason)
    try:
        prometheus_client.REGISTRY.register(_refused)
    except ValueError:  # registered already
        pass
    return _refused


def count_refusal(reason: str) -> None:
    (_refused or refused_requests()).labels(reason=reason).inc()


@dataclass
class KVCompressStats(KVConnectorStats):
    """data: {field of runtime.CompressionStats: int} summed over an interval (plain ints, so the dict
    travels as ``SchedulerStats.kv_connector_stats``)."""

    def __post_init__(self) -> None:
        self.data = {name: int(self.data.get(name, 0)) for name in FIELDS}

    @classmethod
    def taken(cls) -> "KVCompressStats | None":
        """The worker's counters since the last call (reset), or None when nothing happened."""
        stats = KVCompressStats(data=dataclasses.asdict(runtime.take_stats()))
        return None if stats.is_empty() else stats

    def reset(self) -> None:
        self.data = dict.fromkeys(FIELDS, 0)

    def aggregate(self, other: KVConnectorStats) -> "KVCompressStats":
        for name in FIELDS:
            self.data[name] += int(other.data.get(name, 0))
        return self

    def reduce(self) -> dict[str, int | float]:
        before = self.data["tokens_before"]
        return {"compressions": self.data["compressions"], "blocks_freed": self.data["blocks_released"],
                "ratio": round(self.data["tokens_retained"] / before, 4) if before else math.nan}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVCompressPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            field: create_metric_per_engine(self._counter_cls(name=name, documentation=doc, labelnames=labelnames),
                                            per_engine_labelvalues)
            for name, (field, doc) in COUNTERS.items()
        }
        gauge = self._gauge_cls(name=RATIO, documentation="Retained / original KV rows over all compressions "
                                "since start (NaN before the first).", multiprocess_mode="mostrecent",
                                labelnames=labelnames)
        self.ratio = create_metric_per_engine(gauge, per_engine_labelvalues)
        for child in self.ratio.values():
            child.set(math.nan)
        self.totals = {idx: KVCompressStats() for idx in per_engine_labelvalues}  # since start, per engine
        refused_requests()  # (re-)register after the stat logger cleared the registry (see there)

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0) -> None:
        stats = KVCompressStats(data=dict(transfer_stats_data))
        for field, counter in self.counters.items():
            if stats.data[field]:
                counter[engine_idx].inc(stats.data[field])
        total = self.totals[engine_idx].aggregate(stats)
        if total.data["tokens_before"]:
            self.ratio[engine_idx].set(total.data["tokens_retained"] / total.data["tokens_before"])
