"""A KV connector used only as the worker -> scheduler channel for released head-blocks.

Worker side: ``wait_for_save`` runs right after the model forward (``_get_kv_connector_output``),
so it compresses the requests whose prefill completed in this step; ``build_connector_worker_meta``
then carries the released blocks in ``ModelRunnerOutput``. Scheduler side:
``update_connector_output`` gives them back to vLLM's BlockPool through the HeadBlockManager.
The compression counters ride the connector's stats channel to ``/metrics`` (:mod:`.metrics`).
"""
from __future__ import annotations

from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.compat import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorWorkerMetadata
from vllm_kvcompress.vllm.scheduler.metrics import KVCompressPromMetrics, KVCompressStats


class KVCompressMetadata(KVConnectorMetadata):
    """Nothing travels scheduler -> worker through the connector (block ids come in block_ids)."""


class KVCompressWorkerMetadata(KVConnectorWorkerMetadata):
    def __init__(self, reports: dict):
        self.reports = reports  # req_id -> (released block ids, T, lens [L][H])

    def aggregate(self, other: "KVCompressWorkerMetadata") -> "KVCompressWorkerMetadata":
        """Another tensor-parallel rank's reports (vLLM's KVOutputAggregator folds every rank's into
        the first's): every rank releases the same block ids at the same lengths, since all size
        their blocks by the same slot rows. Anything else would free blocks a rank still uses."""
        if other.reports != self.reports:
            raise RuntimeError("kv compression: tensor-parallel ranks released different head-blocks "
                               f"({self.reports} != {other.reports}); accounting bug")
        return self


class KVCompressConnector(KVConnectorBase_V1):
    # ---- worker side -------------------------------------------------------------------------
    def start_load_kv(self, forward_context, **kwargs) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        pass

    def wait_for_save(self) -> None:
        state = runtime.WORKER_STATE
        if state is not None:
            state.flush_graph_queries()  # recompression below reads the rings
            runtime.COMPRESSOR.after_forward()

    def build_connector_worker_meta(self):
        state = runtime.WORKER_STATE
        with runtime.TIMER.host("report_ms"):
            reports = state.take_reports() if state is not None else {}
        return KVCompressWorkerMetadata(reports) if reports else None

    def get_kv_connector_stats(self) -> KVCompressStats | None:
        # vLLM also asks the scheduler-side connector (Scheduler.update_from_output); with the `uni`
        # executor it shares the worker's process, so only the worker side takes the counters
        # under tensor parallelism the first rank's counters stand for all (the same compressions)
        if self.role != KVConnectorRole.WORKER or runtime.TENSOR_PARALLEL_RANK:
            return None
        return KVCompressStats.taken()

    # ---- front end (stat loggers) -------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data=None) -> KVCompressStats:
        return KVCompressStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVCompressPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens) -> None:
        pass

    def build_connector_meta(self, scheduler_output):
        return KVCompressMetadata()

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        manager = runtime.MANAGER
        if meta is None:
            return
        if manager is None:
            raise RuntimeError("kv compression: a head-block report reached a scheduler without HeadBlockManager")
        returned = []
        for rid, (released, T, lens) in meta.reports.items():
            freed = manager.apply_report(rid, released, T, lens)
            if freed:
                returned.append(dict(req_id=rid, freed=freed))
        if returned:
            runtime.events("blocks_returned", [dict(record, free=manager.block_pool.get_num_free_blocks())
                                               for record in returned])
