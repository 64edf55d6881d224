"""Front-end validation of per-request compression options (``vllm_xargs`` -> ``SamplingParams.extra_args``).

vLLM checks every request in the front-end process before it reaches the engine
(``InputProcessor._validate_params`` -> ``SamplingParams.verify`` -> ``_validate_logits_processors``
-> ``validate_params`` of each custom logits processor). :class:`KVCompressParams` is registered as
such a processor (``settings.complete_engine_args``); it leaves logits untouched and exists for its
``validate_params``, which runs the worker's own :func:`~vllm_kvcompress.vllm.worker.state.request_config` against the server's
configuration, so a request the worker would refuse fails with HTTP 400 (``VLLMValidationError``,
mapped by ``entrypoints/serve/utils/error_response.py:create_error_response``) and the server keeps
serving. Streamed requests are validated when the stream starts: vLLM sends the same error (code 400)
as an SSE ``data:`` event of a 200 response, as for its own parameter errors.

The operator's rules (:mod:`.request_rules`: what a request may change, the budgets it may ask for)
are checked here too, after the options are found valid and before a ``headkv_scores`` file is
opened: a refused override answers HTTP 400 naming the server's rule. Every refusal counts in
``vllm:kv_compression_refused_requests_total{reason}`` (:func:`vllm_kvcompress.vllm.scheduler.metrics.count_refusal`).

The server's configuration and rules: ``validate_params`` sees only the sampling params, so
``complete_engine_args`` publishes both in the environment (:data:`CONFIG_ENV`, :data:`RULES_ENV`)
of the front-end process, which also reaches API-server processes spawned from it
(``--api-server-count``; each of them rebuilds both from the same flags, which
:func:`vllm_kvcompress.vllm.patches._restore_cli_options` gives back to them).

Not covered: a server started without compression does not load this processor (that would make the
plugin active for every vLLM user: custom logits processors turn off vLLM's V2 model runner), so there
``kv_*`` keys of ``vllm_xargs`` are ignored, like any other unused extra argument.
"""
from __future__ import annotations

import functools
import json
import os

import torch
from vllm_kvcompress.vllm.compat import LogitsProcessor, VLLMValidationError

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.vllm.scheduler import metrics
from vllm_kvcompress.vllm.frontend.request_rules import RequestRules
from vllm_kvcompress.vllm.worker.state import OVERRIDE_KEYS, request_config

CONFIG_ENV = "VLLM_KVC_SERVER_CONFIG"  # JSON of the server's CompressionConfig (set by complete_engine_args)
RULES_ENV = "VLLM_KVC_REQUEST_RULES"  # JSON of the server's RequestRules (idem)
PROCESSOR = "vllm_kvcompress.vllm.frontend.params:KVCompressParams"  # the FQCN vLLM loads it by
CONFIG_KEY = "kv_compression_config"
VALID_KEYS = (*OVERRIDE_KEYS, CONFIG_KEY)
PREFIX = "kv_"


def publish_server_config(config: CompressionConfig, rules: RequestRules) -> None:
    """Make ``config`` the base that per-request options are validated against, and ``rules`` what
    they may change, in this process (and in the processes it starts)."""
    os.environ[CONFIG_ENV] = json.dumps(config.to_dict())
    os.environ[RULES_ENV] = json.dumps(rules.to_dict())


def server_config() -> CompressionConfig | None:
    """The configuration published by :func:`publish_server_config`, or None."""
    text = os.environ.get(CONFIG_ENV)
    return _parse_config(text) if text else None


def server_rules() -> RequestRules:
    """The rules published by :func:`publish_server_config` (none published: the defaults)."""
    return _parse_rules(os.environ.get(RULES_ENV) or "{}")


@functools.lru_cache(maxsize=4)
def _parse_config(text: str) -> CompressionConfig:  # once per published config, not per request
    return CompressionConfig.from_json(text)


@functools.lru_cache(maxsize=4)
def _parse_rules(text: str) -> RequestRules:
    return RequestRules.from_dict(json.loads(text))


def _reject(message: str, parameter: str, reason: str = "invalid"):
    """VLLMValidationError: vLLM answers it with HTTP 400, ``param`` = ``parameter``; counted under
    ``reason`` (:data:`vllm_kvcompress.vllm.scheduler.metrics.REFUSAL_REASONS`)."""
    metrics.count_refusal(reason)
    raise VLLMValidationError(f"kv compression: {message}", parameter=parameter)


def _normalise_options(extra: dict) -> None:
    """``kv_compression_config`` arrives over HTTP as JSON text (vllm_xargs values are
    str | int | float | list, ``entrypoints/openai/*/protocol.py``); it is parsed here, once, and the
    dict replaces the text in ``extra`` so the worker's ``request_config`` receives the dict it takes."""
    raw = extra.get(CONFIG_KEY)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            _reject(f"{CONFIG_KEY} is not valid JSON: {error}", f"vllm_xargs.{CONFIG_KEY}")
    if raw is not None and not isinstance(raw, dict):
        _reject(f"{CONFIG_KEY} must be a JSON object, got {type(raw).__name__}", f"vllm_xargs.{CONFIG_KEY}")
    if raw is not None:
        extra[CONFIG_KEY] = raw


@functools.lru_cache(maxsize=64)
def _check_builds(config_json: str) -> None:
    """Build the request's policy once per distinct config: a per-request ``headkv_scores`` file that
    does not load fails here (400), not in the worker mid-step. (Its shape is checked against the
    model only for the server's own file, at start-up.)"""
    from vllm_kvcompress.policies.presets import build_policy

    build_policy(CompressionConfig.from_dict(json.loads(config_json)))


def check_request(extra_args: dict | None, base: CompressionConfig | None,
                  rules: RequestRules = RequestRules()) -> CompressionConfig | None:
    """The request's effective config (None: the request sets no ``kv_*`` key), if it is valid and
    ``rules`` allow it (the defaults unless given). Raises VLLMValidationError naming the problem or
    the rule; ``extra_args`` gets its ``kv_compression_config`` parsed."""
    extra = extra_args or {}
    keys = sorted(k for k in extra if isinstance(k, str) and k.startswith(PREFIX))
    if not keys:
        return None
    if base is None:
        _reject(f"compression is not enabled on this server (got {', '.join(keys)})", f"vllm_xargs.{keys[0]}")
    unknown = [k for k in keys if k not in VALID_KEYS]
    if unknown:
        _reject(f"unknown per-request key(s) {', '.join(unknown)}; valid keys: {', '.join(VALID_KEYS)}",
                f"vllm_xargs.{unknown[0]}")
    _normalise_options(extra)
    try:
        config = request_config(base, extra)
    except (ValueError, TypeError) as error:
        _reject(str(error), _culprit(base, extra))
    refused = rules.refusal(base, config)
    if refused is not None:
        _reject(refused.message, _param(refused.field, extra), refused.reason)
    try:  # after the rules: a request may not make the server open a file it is not allowed to name
        _check_builds(json.dumps(config.to_dict(), sort_keys=True))
    except (ValueError, TypeError, OSError) as error:
        _reject(str(error), _culprit(base, extra))
    return config


def _param(field: str, extra: dict) -> str:
    """The key that carried ``field`` in the request (its own key, else kv_compression_config)."""
    key = next((k for k, f in OVERRIDE_KEYS.items() if f == field), None)
    return f"vllm_xargs.{key if key in extra else CONFIG_KEY}"


def _culprit(base: CompressionConfig, extra: dict) -> str:
    """The key to name in the error's ``param``: the first override that fails on its own."""
    for key in OVERRIDE_KEYS:
        if key in extra:
            try:
                request_config(base, {key: extra[key]})
            except (ValueError, TypeError):
                return f"vllm_xargs.{key}"
    return f"vllm_xargs.{CONFIG_KEY}" if CONFIG_KEY in extra else "vllm_xargs"


class KVCompressParams(LogitsProcessor):
    """Identity logits processor whose :meth:`validate_params` refuses bad per-request options."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check_request(sampling_params.extra_args, server_config(), server_rules())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # identity: vLLM may skip it for greedy requests

    def update_state(self, batch_update) -> None:
        pass
