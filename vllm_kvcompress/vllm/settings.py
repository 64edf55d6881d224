"""Where the compression settings live in vLLM's config, and what they require of it.

Settings travel as ``VllmConfig.additional_config["kv_compression"]`` (a dict of
:class:`~vllm_kvcompress.policies.config.CompressionConfig` options; part of the config hash and pickled to
the EngineCore and workers); what a request may change of them as
``additional_config["kv_request_rules"]`` (:mod:`vllm_kvcompress.vllm.frontend.request_rules`, read in the front end only). A
policy other than ``none`` turns the plugin on: :func:`complete_engine_args` fills in the engine
arguments it needs (before vLLM builds its config) and :func:`check_vllm_config` refuses
configurations it cannot serve, with a message that says why (after). Nothing here falls back silently to an uncompressed cache.
"""
from __future__ import annotations

import logging
import os

from vllm_kvcompress.policies.config import CompressionConfig

# under vLLM's "vllm" logger, whose handlers print it in every process (with the process's prefix);
# a logger of our own package name printed nothing in a server's log
logger = logging.getLogger("vllm.kv_compression")

KEY = "kv_compression"
RULES_KEY = "kv_request_rules"
BLOCK_SIZE = 16
CONNECTOR = "KVCompressConnector"
CONNECTOR_MODULE = "vllm_kvcompress.vllm.scheduler.connector"
# kv_cache_dtype values compression serves: the model's dtype, or e4m3 with vLLM's per-tensor scales
# (one float32 scale for K and one for V per layer: the checkpoint's, calculate_kv_scales', or 1.0)
FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3")
CACHE_DTYPES = ("auto", *FP8_CACHE_DTYPES)
# Triton converts to and from float8_e4m3fn from sm89 (Ada) on, but continued prefill chunks over
# an fp8 pool run FlashAttention 3's fp8 path, which needs sm90 (Hopper): refused below it at start-up
# rather than failing at a request's second chunk
FP8_CAPABILITY = 90
WORKERS = {"cpu": "vllm_kvcompress.vllm.worker.worker.KVCompressCPUWorker",
           "cuda": "vllm_kvcompress.vllm.worker.worker.KVCompressGPUWorker"}


def read(additional_config) -> CompressionConfig | None:
    """The requested config, or None when compression is off (absent, or policy ``none``).

    ``additional_config[KEY]`` may be a dict or its JSON text. ValueError names the problem."""
    raw = (additional_config or {}).get(KEY) if isinstance(additional_config, dict) else None
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = CompressionConfig.from_json(raw).to_dict()
    config = CompressionConfig.from_dict(dict(raw))
    return None if config.policy == "none" else config


def check_rules_need_compression(additional_config) -> None:
    """Request rules without compression would be ignored: refuse them (the plain-vLLM path, so
    nothing is imported for it)."""
    if isinstance(additional_config, dict) and RULES_KEY in additional_config:
        raise ValueError(f"the kv request rules (--kv-request-overrides, --kv-request-policies, --kv-request-budget; "
                         f"additional_config[{RULES_KEY!r}]) govern per-request compression options: they need "
                         "compression on (--kv-compression POLICY, not none)")


def check_policy_builds(config: CompressionConfig) -> None:
    """Build the policy once in the front end: a headkv score file that does not load fails here,
    at start-up, not in the worker mid-request. Warns when a token budget leaves the policy no
    choice (every head keeps its protected window and sinks, whatever the scores)."""
    from vllm_kvcompress.policies.presets import build_policy

    policy = build_policy(config)
    kept_anyway = policy.window + policy.sink
    if config.budget.tokens is not None and config.budget.tokens <= kept_anyway:
        logger.warning("kv compression: a budget of %d tokens per head is at or below the %d every head keeps "
                       "anyway (window %d + sink %d), so %s keeps exactly those in every head and its scores "
                       "choose nothing; give a larger budget (or a smaller window) for the policy to matter",
                       config.budget.tokens, kept_anyway, policy.window, policy.sink, config.policy)


def complete_engine_args(args, config: CompressionConfig, device_type: str, offline: bool = False) -> None:
    """Fill in what compression needs on ``args`` (an EngineArgs) before vLLM builds its config.
    ``offline``: the engine's caller writes every request (``LLM(...)``), which changes the default
    request rules (:func:`vllm_kvcompress.vllm.frontend.request_rules.read`)."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1":
        raise ValueError("kv compression needs vLLM's V1 model runner (its batch rows map to request ids); "
                         "unset VLLM_USE_V2_MODEL_RUNNER")
    if device_type not in WORKERS:
        raise ValueError(f"kv compression supports the cpu and cuda platforms, not {device_type!r}")
    worker = WORKERS[device_type]
    if args.worker_cls not in ("auto", worker):
        raise ValueError(f"kv compression installs its own worker ({worker}); it cannot run with "
                         f"--worker-cls {args.worker_cls}")
    args.worker_cls = worker
    ours = {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both"}
    current = args.kv_transfer_config
    if current is not None:
        name = current.get("kv_connector") if isinstance(current, dict) else getattr(current, "kv_connector", None)
        if name != CONNECTOR:
            raise ValueError(f"kv compression uses the KV connector as its worker->scheduler channel; it cannot "
                             f"run with another kv connector ({name!r})")
    args.kv_transfer_config = ours
    if args.enable_prefix_caching is not False:
        # head-blocks of one request are compacted in place, so no block can be shared by two requests
        logger.warning("kv compression: prefix caching is turned off (compressed head-blocks cannot be shared)")
        args.enable_prefix_caching = False
    if args.block_size is None:
        args.block_size = BLOCK_SIZE
    if device_type == "cuda":
        # CudaPlatform honours the CUSTOM backend; the worker registers our class under that name
        args.attention_backend = "CUSTOM"
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
            # V2 is the CUDA default for dense models in 0.26; the EngineCore and workers inherit this
            logger.warning("kv compression: pinning vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if config.cuda_graphs is None:  # the default: full decode graphs wherever vLLM captures graphs
        config = config.replace(cuda_graphs=captures_decode_graphs(args, device_type))
        logger.info("kv compression: cuda_graphs %s (vLLM %s full CUDA graphs of decode steps here)",
                    config.cuda_graphs, "captures" if config.cuda_graphs else "captures no")
    args.additional_config = {**(args.additional_config or {}), KEY: config.to_dict()}
    # per-request options (vllm_xargs) are checked in the front end, HTTP 400 instead of a worker error
    from vllm_kvcompress.vllm.frontend import params, request_rules

    rules = request_rules.read(args.additional_config, config, offline)
    logger.info("kv compression: %s", rules.describe(config))
    params.publish_server_config(config, rules)
    if params.PROCESSOR not in (args.logits_processors or []):
        args.logits_processors = [*(args.logits_processors or []), params.PROCESSOR]


def captures_decode_graphs(args, device_type: str) -> bool:
    """Whether vLLM will capture full CUDA graphs of decode steps with these engine args: a CUDA
    device, no ``enforce_eager``, and a ``cudagraph_mode`` left to vLLM (FULL_AND_PIECEWISE) or
    one whose decode graphs are full."""
    if device_type != "cuda" or args.enforce_eager:
        return False
    from vllm_kvcompress.vllm.compat import CUDAGraphMode

    mode = getattr(args.compilation_config, "cudagraph_mode", None)
    return mode is None or mode.decode_mode() == CUDAGraphMode.FULL


def refusals(vllm_config) -> list[str]:
    """Why ``vllm_config`` cannot run with head-block compression (empty list: it can)."""
    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    why = []
    if model.use_mla:
        why.append("MLA models (latent KV shared by all heads) have no per-head cache to compress")
    if model.is_encoder_decoder:
        why.append("encoder-decoder models are not supported (cross-attention caches)")
    if model.is_hybrid or model.is_attention_free:
        why.append("hybrid / attention-free models (Mamba state) are not supported")
    if model.get_sliding_window() is not None or _has_sliding_layers(model):
        why.append("sliding-window attention layers evict by position already; compression needs full attention")
    if getattr(model, "runner_type", "generate") != "generate":
        why.append(f"runner {model.runner_type!r}: only text generation is supported")
    for name in ("pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            why.append(f"{name}={getattr(parallel, name)}: not supported (tensor parallelism is: "
                       "--tensor-parallel-size N)")
    why.extend(_tensor_parallel_refusals(vllm_config))
    if vllm_config.speculative_config is not None:
        why.append("speculative decoding is not supported (rejected draft tokens need per-head rollback)")
    why.extend(_cache_dtype_refusals(cache.cache_dtype))
    if getattr(vllm_config, "use_v2_model_runner", False):
        why.append("vLLM's V2 model runner is not supported (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if cache.enable_prefix_caching:
        why.append("prefix caching must be off (compressed head-blocks cannot be shared)")
    why.extend(_head_score_mismatch(vllm_config))
    return why


def _cache_dtype_refusals(cache_dtype: str) -> list[str]:
    """A KV-cache dtype the head-block kernels cannot read or write, or an fp8 cache on a GPU whose
    Triton has no e4m3 conversions."""
    if cache_dtype not in CACHE_DTYPES:
        return [f"kv_cache_dtype={cache_dtype!r} is not supported (supported: {', '.join(CACHE_DTYPES)}; fp8 is "
                "fp8_e4m3 with vLLM's per-tensor scales)"]
    if cache_dtype == "auto":
        return []
    from vllm_kvcompress.vllm.compat import current_platform

    if current_platform.device_type == "cuda" and not current_platform.has_device_capability(FP8_CAPABILITY):
        capability = current_platform.get_device_capability()
        found = "unknown" if capability is None else f"sm{capability.to_int()}"
        return [f"kv_cache_dtype={cache_dtype!r} needs a GPU of compute capability 9.0 or later (sm90+: "
                f"FlashAttention 3's fp8 path for chunked prefill), this one is {found}; use kv_cache_dtype auto"]
    return []


def _tensor_parallel_refusals(vllm_config) -> list[str]:
    """Tensor parallelism needs the model's KV heads split over the ranks (every policy then
    compresses as on one GPU: :mod:`~vllm_kvcompress.policies.tensor_parallel`); with more ranks than KV
    heads vLLM replicates them."""
    size = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)
    total = vllm_config.model_config.get_total_num_kv_heads()
    if size == 1 or total % size == 0:
        return []
    return [f"tensor_parallel_size={size} replicates the model's {total} KV heads over the ranks; "
            f"compression needs them split (a tensor-parallel size dividing {total})"]


def _head_score_mismatch(vllm_config) -> list[str]:
    """A HeadKV scores file calibrated for another model shape, found before any engine process
    starts (the worker checks it again against the layers it actually built)."""
    config = read(getattr(vllm_config, "additional_config", None))
    if config is None or not config.headkv_scores:
        return []
    from vllm_kvcompress.policies.head_scores import HeadScores

    model = vllm_config.model_config
    try:
        HeadScores.load(config.headkv_scores).check_model(
            model.get_num_layers(vllm_config.parallel_config), model.get_total_num_kv_heads(), config.headkv_scores)
    except ValueError as error:
        return [str(error)]
    return []


def _has_sliding_layers(model) -> bool:
    text = getattr(model, "hf_text_config", None)
    return any("sliding" in str(t) for t in (getattr(text, "layer_types", None) or ()))


def check_vllm_config(vllm_config) -> None:
    """ValueError listing every reason ``vllm_config`` cannot run with kv compression."""
    why = refusals(vllm_config)
    if why:
        raise ValueError("kv compression cannot run with this configuration: " + "; ".join(why))

