"""Every vLLM internal the plugin relies on, named in one place and pinned to vLLM 0.26.0.

The integration modules take vLLM's classes and functions from here (``from .compat import X``,
resolved on first use, so that importing this module loads nothing of vLLM), and
:data:`PINNED` lists each private method, attribute or signature the plugin overrides, calls or
reads. An upgrade of vLLM is: run ``tests/vllm/test_compat.py``, which checks every entry against
the installed vLLM and names what moved; mend those; change :data:`VLLM_VERSION`.

The three ``EngineArgs`` methods wrapped in every vLLM process are checked at start-up too
(:func:`~.patches.incompatibility`); the rest only matter once compression is on.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os

VLLM_VERSION = "0.26.0"

# name -> (module, attribute): what the integration imports from vLLM
SYMBOLS = {
    # attention backend (backend.py, worker.py)
    "AttentionBackend": ("vllm.v1.attention.backend", "AttentionBackend"),
    "AttentionCGSupport": ("vllm.v1.attention.backend", "AttentionCGSupport"),
    "AttentionImpl": ("vllm.v1.attention.backend", "AttentionImpl"),
    "AttentionMetadataBuilder": ("vllm.v1.attention.backend", "AttentionMetadataBuilder"),
    "AttentionType": ("vllm.v1.attention.backend", "AttentionType"),
    "CommonAttentionMetadata": ("vllm.v1.attention.backend", "CommonAttentionMetadata"),
    "AttentionBackendEnum": ("vllm.v1.attention.backends.registry", "AttentionBackendEnum"),
    "register_backend": ("vllm.v1.attention.backends.registry", "register_backend"),
    # KV-cache specs and the scheduler's manager (spec.py, worker.py)
    "AttentionSpec": ("vllm.v1.kv_cache_interface", "AttentionSpec"),
    "FullAttentionSpec": ("vllm.v1.kv_cache_interface", "FullAttentionSpec"),
    "SingleTypeKVCacheManager": ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager"),
    "KVCacheSpecRegistry": ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry"),
    "cdiv": ("vllm.utils.math_utils", "cdiv"),
    "get_dtype_size": ("vllm.utils.torch_utils", "get_dtype_size"),
    # the model runner's own block table, made inert (worker.py)
    "BlockTable": ("vllm.v1.worker.block_table", "BlockTable"),
    "SlotMappingMode": ("vllm.v1.worker.block_table", "SlotMappingMode"),
    # the KV connector: the worker -> scheduler channel and the metrics (connector.py, metrics.py)
    "KVConnectorBase_V1": ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorBase_V1"),
    "KVConnectorMetadata": ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorMetadata"),
    "KVConnectorRole": ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorRole"),
    "KVConnectorWorkerMetadata": ("vllm.distributed.kv_transfer.kv_connector.v1.base", "KVConnectorWorkerMetadata"),
    "KVConnectorPromMetrics": ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorPromMetrics"),
    "KVConnectorStats": ("vllm.distributed.kv_transfer.kv_connector.v1.metrics", "KVConnectorStats"),
    "create_metric_per_engine": ("vllm.v1.metrics.utils", "create_metric_per_engine"),
    # front-end validation of per-request options (params.py)
    "VLLMValidationError": ("vllm.exceptions", "VLLMValidationError"),
    "LogitsProcessor": ("vllm.v1.sample.logits_processor", "LogitsProcessor"),
    # configuration (patches.py, settings.py)
    "EngineArgs": ("vllm.engine.arg_utils", "EngineArgs"),
    "CUDAGraphMode": ("vllm.config", "CUDAGraphMode"),
    "current_platform": ("vllm.platforms", "current_platform"),
    "UsageContext": ("vllm.usage.usage_lib", "UsageContext"),
    # tensor parallelism: each rank's heads, the scores gathered across ranks (worker.py)
    "get_tp_group": ("vllm.distributed.parallel_state", "get_tp_group"),
}

# Imported only where they run: the CPU worker monkeypatches torch on import (a GPU process must
# never load it), and FlashAttention's extension exists on CUDA builds only.
LAZY_SYMBOLS = {
    "CPUWorker": ("vllm.v1.worker.cpu_worker", "CPUWorker"),
    "GPUWorker": ("vllm.v1.worker.gpu_worker", "Worker"),
    "flash_attn_varlen_func": ("vllm.vllm_flash_attn", "flash_attn_varlen_func"),
}

_S = "collections.abc.Sequence[vllm.v1.core.kv_cache_utils.KVCacheBlock]"
# "module:Qualified.name" -> the signature the plugin is written against; None: must exist
PINNED: dict[str, str | None] = {
    # patches.py wraps these in every vLLM process
    "vllm.engine.arg_utils:EngineArgs.add_cli_args":
        "(parser: vllm.utils.argparse_utils.FlexibleArgumentParser) -> vllm.utils.argparse_utils.FlexibleArgumentParser",
    "vllm.engine.arg_utils:EngineArgs.from_cli_args": "(cls, args: argparse.Namespace)",
    "vllm.engine.arg_utils:EngineArgs.create_engine_config":
        "(self, usage_context: typing.Any | None = None, headless: bool = False) -> vllm.config.vllm.VllmConfig",
    # worker.py: the runner subclass overrides these
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._is_uniform_decode":
        "(max_num_scheduled_tokens: int, uniform_decode_query_len: int, num_tokens: int, num_reqs: int, "
        "force_uniform_decode: bool | None = None) -> bool",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.may_reinitialize_input_batch":
        "(self, kv_cache_config: vllm.v1.kv_cache_interface.KVCacheConfig, kernel_block_sizes: list[int]) -> None",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_kv_cache_spec":
        "(self) -> dict[str, vllm.v1.kv_cache_interface.KVCacheSpec]",
    "vllm.v1.worker.block_table:BlockTable.append_row": "(self, block_ids: list[int], row_idx: int) -> None",
    "vllm.v1.worker.block_table:SlotMappingMode.NONE": None,
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.CUSTOM": None,
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_ATTN": None,
    # backend.py: the builder and the layer's forward
    "vllm.v1.attention.backend:AttentionMetadataBuilder.build":
        "(self, common_prefix_len: int, common_attn_metadata: vllm.v1.attention.backend.CommonAttentionMetadata, "
        "fast_build: bool = False) -> ~M",
    "vllm.v1.attention.backend:AttentionMetadataBuilder.build_for_cudagraph_capture":
        "(self, common_attn_metadata: vllm.v1.attention.backend.CommonAttentionMetadata) -> ~M",
    "vllm.v1.attention.backend:AttentionImpl.forward":
        "(self, layer: vllm.v1.attention.backend.AttentionLayer, query: torch.Tensor, key: torch.Tensor, "
        "value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: ~T, output: torch.Tensor, "
        "output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None) -> torch.Tensor",
    # spec.py: the scheduler's manager
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.get_num_blocks_to_allocate":
        f"(self, request_id: str, num_tokens: int, new_computed_blocks: {_S}, total_computed_tokens: int, "
        "num_local_computed_tokens: int, num_tokens_main_model: int, apply_admission_cap: bool = False) -> int",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.allocate_new_blocks":
        "(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> "
        "list[vllm.v1.core.kv_cache_utils.KVCacheBlock]",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.pop_blocks_for_free":
        "(self, request_id: str) -> list[vllm.v1.core.kv_cache_utils.KVCacheBlock]",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.new_step_starts": "(self) -> None",
    "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.get_num_common_prefix_blocks":
        "(self, running_request_id: str) -> int",
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered": "(cls, vllm_config=None) -> None",
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register":
        "(cls, kvcache_spec_cls: type['KVCacheSpec'], manager_class: type['SingleTypeKVCacheManager'] | None = None, "
        "uniform_type_base_spec: type['KVCacheSpec'] | None = None) -> None",
    # connector.py: the methods vLLM calls on a KV connector
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1.wait_for_save": "(self)",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1.build_connector_worker_meta":
        "(self) -> vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorWorkerMetadata | None",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1.update_connector_output":
        "(self, connector_output: vllm.v1.outputs.KVConnectorOutput)",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1.get_kv_connector_stats":
        "(self) -> 'KVConnectorStats | None'",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1.build_prom_metrics":
        "(cls, vllm_config: 'VllmConfig', metric_types: dict[type['PromMetric'], type['PromMetricT']], "
        "labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> 'KVConnectorPromMetrics | None'",
    "vllm.v1.outputs:KVConnectorOutput.kv_connector_worker_meta": None,
    # worker.py: the tensor-parallel group the prefill compression gathers scores through
    "vllm.distributed.parallel_state:get_tp_group": "() -> vllm.distributed.parallel_state.GroupCoordinator",
    "vllm.distributed.parallel_state:GroupCoordinator.all_gather":
        "(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor",
    "vllm.distributed.parallel_state:GroupCoordinator.rank_in_group": None,
    "vllm.distributed.parallel_state:GroupCoordinator.world_size": None,
    "vllm.v1.worker.gpu_input_batch:InputBatch.req_ids": None,
    # backend.py: an fp8 pool is read and written with the scales this registers on every attention
    # layer (LAYER_SCALES); calculate_kv_scales and checkpoint scales change them in place
    "vllm.model_executor.layers.attention.attention:set_default_quant_scales":
        "(layer: torch.nn.modules.module.Module, register_buffer: bool = False) -> None",
}
# the per-tensor fp8 scales the backend reads off vLLM's attention layer (float32 tensors on the device)
LAYER_SCALES = ("_k_scale", "_v_scale", "_q_scale")
# dataclass fields the plugin reads: "module:Class" -> field names
PINNED_FIELDS = {
    "vllm.v1.attention.backend:CommonAttentionMetadata": (
        "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens", "max_query_len", "_seq_lens_cpu"),
}
# keyword arguments the plugin passes to FlashAttention (kernels.py), read from its source: the
# extension it wraps is not there on a CPU build
FLASH_ATTENTION = ("vllm.vllm_flash_attn.flash_attn_interface", "flash_attn_varlen_func",
                   ("cu_seqlens_k", "seqused_k", "softmax_scale", "causal", "block_table", "return_softmax_lse",
                    "fa_version", "q_descale", "k_descale", "v_descale"))


def __getattr__(name: str):
    """``from .compat import X``: vLLM's ``X``, imported on first use."""
    where = SYMBOLS.get(name) or LAZY_SYMBOLS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not a vLLM symbol the plugin uses)")
    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value
    return value


def resolve(pinned: str):
    """The object a :data:`PINNED` key names (AttributeError / ImportError when it is gone)."""
    module, qualified = pinned.split(":")
    obj = importlib.import_module(module)
    for part in qualified.split("."):
        try:
            obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        except AttributeError:
            if inspect.isclass(obj) and part in getattr(obj, "__annotations__", {}):
                return None  # an instance attribute the class declares (a property or a field)
            raise
    return obj


def signature(obj) -> str:
    return str(inspect.signature(getattr(obj, "__func__", obj)))


def mismatches(keys=None) -> list[str]:
    """What differs from the pinned vLLM: one line per moved, renamed or re-typed internal."""
    found = []
    for key in keys if keys is not None else PINNED:
        expected = PINNED[key]
        try:
            obj = resolve(key)
        except (AttributeError, ImportError) as error:
            found.append(f"{key}: gone ({error})")
            continue
        if expected is not None and signature(obj) != expected:
            found.append(f"{key}: {signature(obj)} (pinned: {expected})")
    if keys is None:
        for key, names in PINNED_FIELDS.items():
            fields = {f.name for f in dataclasses.fields(resolve(key))}
            found += [f"{key}.{name}: field gone" for name in names if name not in fields]
        found += flash_attention_mismatches()
        found += layer_scale_mismatches()
    return found


def layer_scale_mismatches() -> list[str]:
    """The layer scales the backend reads must still be the buffers ``set_default_quant_scales``
    registers (read from its source: the attributes exist on layer instances only)."""
    key = "vllm.model_executor.layers.attention.attention:set_default_quant_scales"
    try:
        source = inspect.getsource(resolve(key))
    except (AttributeError, ImportError):
        return []  # reported as gone by the pin itself
    return [f"{key}: registers no {name!r} buffer" for name in LAYER_SCALES
            if f'register_buffer("{name}"' not in source]


def flash_attention_mismatches() -> list[str]:
    module, function, keywords = FLASH_ATTENTION
    # the file, not the module: importing the package needs the CUDA extension
    root = importlib.util.find_spec("vllm").submodule_search_locations[0]
    path = os.path.join(root, *module.split(".")[1:]) + ".py"
    if not os.path.exists(path):
        return [f"{module}: gone"]
    tree = ast.parse(open(path).read())
    found = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function]
    if not found:
        return [f"{module}:{function}: gone"]
    args = {a.arg for a in (*found[0].args.args, *found[0].args.kwonlyargs)}
    return [f"{module}:{function}: no keyword {k!r}" for k in keywords if k not in args]

