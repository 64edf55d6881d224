"""Every monkeypatch of vLLM, in one place. Applied in every process by :func:`apply` (idempotent).

Patched (vLLM 0.26.0, ``vllm/engine/arg_utils.py``):

* ``EngineArgs.add_cli_args`` (staticmethod) -- adds the ``KV compression`` argument group
  (``--kv-compression``, ``--kv-budget``, ``--kv-compression-config``, and the request rules
  ``--kv-request-overrides``, ``--kv-request-policies``, ``--kv-request-budget``). General plugins
  receive no parser, so wrapping this is the only way in; ``AsyncEngineArgs.add_cli_args`` looks it
  up on ``EngineArgs`` at call time, after it has loaded the plugins.
* ``EngineArgs.from_cli_args`` (classmethod) -- keeps only dataclass fields, so our values are
  merged into ``additional_config["kv_compression"]`` (and ``["kv_request_rules"]``) here, validated
  (ValueError before any engine process starts).
* ``EngineArgs.create_engine_config`` -- when a policy other than ``none`` is requested: complete
  the engine arguments (worker, connector, prefix caching off, block size), build the config, then
  refuse what cannot run. Same path for ``vllm serve``, ``LLM(...)`` and ``AsyncLLM`` (its
  ``usage_context`` tells the offline ``LLM`` apart: its default request rules differ).

Without compression requested the wrappers call the originals unchanged (only the flags appear).

``vllm serve --api-server-count N`` (N > 1) spawns API-server processes that rebuild their engine
args with ``from_cli_args`` *before* they load plugins (``v1/utils.py:run_api_server_worker_proc``
-> ``api_server.py:build_async_engine_client``), so our wrapper does not run there and the flags'
values would be lost: such a process would serve as plain vLLM's front end (no validation of
per-request options -- a ``kv_compression_config`` text then reached the worker and killed the
engine --, no rules, no compression metrics). The parent's ``from_cli_args`` leaves them in
:data:`CLI_ENV`, and ``create_engine_config`` puts them back in an API-server process
(``_api_process_count`` > 1) whose engine args lack them.

On a vLLM other than ``VLLM_VERSION`` (or one whose wrapped methods changed, ``EXPECTED``) the
plugin is inert: a warning, the flags still listed, and a request for compression refused at
start-up with a message naming the supported version; plain vLLM runs untouched.
``vllm/compat.py`` pins the signatures (``tests/vllm/test_compat.py``); ``tests/vllm/test_vllm_plugin.py``
tests both modes.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os

from vllm_kvcompress.policies.budget import Budget
from vllm_kvcompress.policies.config import PRESET_NAMES, CompressionConfig
from vllm_kvcompress.policies.registry import KINDS
from vllm_kvcompress.vllm import compat, settings

VLLM_VERSION = compat.VLLM_VERSION
# the wrapped methods' signatures, as compat pins them (checked in every vLLM process)
EXPECTED = {name: compat.PINNED[f"vllm.engine.arg_utils:EngineArgs.{name}"]
            for name in ("add_cli_args", "from_cli_args", "create_engine_config")}
ORIGINALS: dict[str, object] = {}  # name -> the unwrapped function
CLI_ENV = "VLLM_KVC_CLI_OPTIONS"  # JSON: what from_cli_args merged into additional_config (see above)
# why the plugin is inert in this process (an unsupported vLLM), or None when it is active
INACTIVE: str | None = None

logger = logging.getLogger("vllm.kv_compression")


def config_help() -> str:
    """``--kv-compression-config``'s help: the config's fields and the registry's parts."""
    parts = "; ".join(f"{kind} ({', '.join(registry.names)}) with {kind}_options" for kind, registry in KINDS.items())
    fields = ", ".join(name for name in CompressionConfig.field_names() if not name.endswith("_options"))
    return (f"further compression options as a JSON object: {fields}; the parts in place of the policy's: {parts} "
            '(the part\'s own options, e.g. {"allocator_options": {"beta": 10}}; see vllm_kvcompress.policies.config)')


def add_kv_compression_args(parser):
    group = parser.add_argument_group("KV compression", "Per-head KV-cache compression (vllm-kvcompress)")
    group.add_argument("--kv-compression", metavar="POLICY", default=None,
                       help=f"compression policy: {', '.join(PRESET_NAMES)} (none = full cache, plugin inactive)")
    group.add_argument("--kv-budget", metavar="N|FRACTION", default=None,
                       help="retained tokens per KV head (256) or fraction of the prompt (0.1)")
    group.add_argument("--kv-compression-config", metavar="JSON", default=None, help=config_help())
    group.add_argument("--kv-request-overrides", metavar="off|budget|policy|all", default=None,
                       help="what a request's vllm_xargs may change: nothing; its budget (the default); its budget "
                            "and policy (one of --kv-request-policies); any option but the server options "
                            "(cuda_graphs*). Offline LLM(...) default: all")
    group.add_argument("--kv-request-policies", metavar="POLICY,...", default=None,
                       help="the policies a request may switch to (with --kv-request-overrides policy)")
    group.add_argument("--kv-request-budget", metavar="LOW:HIGH[,LOW:HIGH]", default=None,
                       help="the budgets a request may ask for, token counts (16:256) and/or fractions (:0.1), or any; "
                            "default: the server budget's kind, no more than it (with overrides all: any)")
    return parser


RULE_FLAGS = {"overrides": "kv_request_overrides", "policies": "kv_request_policies", "budget": "kv_request_budget"}


def options_from_cli(args: argparse.Namespace) -> dict | None:
    """The compression options the three flags ask for (validated), or None when none was given."""
    policy, budget, text = (getattr(args, n, None) for n in ("kv_compression", "kv_budget", "kv_compression_config"))
    if policy is None and budget is None and text is None:
        return None
    options = CompressionConfig.from_json(text).to_dict() if text is not None else {}
    if policy is not None:
        options["policy"] = policy
    if budget is not None:
        parsed = Budget.parse(budget)  # ValueError: "budget must be a positive number ..." etc.
        options["budget"] = parsed.tokens if parsed.tokens is not None else parsed.fraction
    return CompressionConfig.from_dict(options).to_dict()


def rules_from_cli(args: argparse.Namespace) -> dict | None:
    """The request rules the three ``--kv-request-*`` flags give (validated, not yet against the
    server's config), or None when none was given."""
    given = {rule: getattr(args, name) for rule, name in RULE_FLAGS.items() if getattr(args, name, None) is not None}
    if not given:
        return None
    from vllm_kvcompress.vllm.frontend.request_rules import RequestRules  # only when a flag is given: nothing new for plain vLLM

    RequestRules.from_dict(given)
    return given


def _add_cli_args(parser):
    parser = ORIGINALS["add_cli_args"](parser)
    return add_kv_compression_args(parser)


def _refuse_if_inactive() -> None:
    if INACTIVE is not None:
        raise RuntimeError(f"kv compression was requested, but vllm-kvcompress supports vLLM {VLLM_VERSION} only: "
                           f"{INACTIVE}. Install vllm=={VLLM_VERSION}, or run without --kv-compression "
                           "(plain vLLM works as usual with this package installed)")


def _from_cli_args(cls, args):
    engine_args = ORIGINALS["from_cli_args"](cls, args)
    ours = {key: value for key, value in ((settings.KEY, options_from_cli(args)),
                                          (settings.RULES_KEY, rules_from_cli(args))) if value is not None}
    if ours:
        _refuse_if_inactive()
        _merge_into_additional_config(engine_args, ours)
        os.environ[CLI_ENV] = json.dumps(ours)
    else:  # nothing stale for the API-server processes of a plain server
        os.environ.pop(CLI_ENV, None)
    return engine_args


def _merge_into_additional_config(engine_args, ours: dict) -> None:
    extra = engine_args.additional_config
    if isinstance(extra, str):
        extra = json.loads(extra)
    engine_args.additional_config = {**(extra or {}), **ours}


def _restore_cli_options(engine_args) -> None:
    """In an API-server process of ``--api-server-count`` > 1: put back the flags' values its
    unwrapped ``from_cli_args`` dropped (module docstring). Nowhere else: a plain ``LLM(...)`` in a
    process that once parsed our flags stays plain."""
    text = os.environ.get(CLI_ENV)
    extra = engine_args.additional_config
    ours_missing = not (isinstance(extra, dict) and (settings.KEY in extra or settings.RULES_KEY in extra))
    if text and getattr(engine_args, "_api_process_count", 1) > 1 and ours_missing:
        _merge_into_additional_config(engine_args, json.loads(text))


def _create_engine_config(self, *args, **kwargs):
    _restore_cli_options(self)
    config = settings.read(self.additional_config)  # ValueError for bad options
    if config is None:
        settings.check_rules_need_compression(self.additional_config)
        return ORIGINALS["create_engine_config"](self, *args, **kwargs)
    _refuse_if_inactive()
    from vllm_kvcompress.vllm.compat import UsageContext, current_platform

    usage_context = kwargs.get("usage_context", args[0] if args else None)
    settings.check_policy_builds(config)
    settings.complete_engine_args(self, config, current_platform.device_type,
                                  offline=usage_context == UsageContext.LLM_CLASS)
    vllm_config = ORIGINALS["create_engine_config"](self, *args, **kwargs)
    settings.check_vllm_config(vllm_config)
    return vllm_config


def incompatibility() -> str | None:
    """Why this vLLM cannot run the plugin (another version, or changed wrapped methods); None: it can."""
    import vllm
    from vllm_kvcompress.vllm.compat import EngineArgs

    if vllm.__version__ != VLLM_VERSION:
        return f"found vLLM {vllm.__version__}"
    for name, expected in EXPECTED.items():
        original = ORIGINALS.get(name) or EngineArgs.__dict__.get(name)
        found = str(inspect.signature(getattr(original, "__func__", original))) if original else "missing"
        if found != expected:
            return f"vLLM's EngineArgs.{name} changed: {found} (patched for {expected})"
    return None


def apply() -> bool:
    """Wrap the three EngineArgs methods once per process. Returns whether the plugin is active: on
    an unsupported vLLM it warns and the wrappers only refuse requests for compression."""
    global INACTIVE
    from vllm_kvcompress.vllm.compat import EngineArgs

    if ORIGINALS:
        return INACTIVE is None
    INACTIVE = incompatibility()
    if INACTIVE is not None:
        logger.warning("vllm-kvcompress is inactive: it supports vLLM %s only (%s); plain vLLM is unaffected",
                       VLLM_VERSION, INACTIVE)
        descriptors = (EngineArgs.__dict__.get("add_cli_args"), EngineArgs.__dict__.get("from_cli_args"))
        if not (isinstance(descriptors[0], staticmethod) and isinstance(descriptors[1], classmethod)
                and callable(EngineArgs.__dict__.get("create_engine_config"))):
            return False  # not even the shape we wrap: leave vLLM as it is
    ORIGINALS["add_cli_args"] = EngineArgs.__dict__["add_cli_args"].__func__
    ORIGINALS["from_cli_args"] = EngineArgs.__dict__["from_cli_args"].__func__
    ORIGINALS["create_engine_config"] = EngineArgs.__dict__["create_engine_config"]
    for name, wrapper in _wrappers().items():
        wrapper.__wrapped__ = ORIGINALS[name]  # inspect.signature (compat's pins) sees vLLM's own
    EngineArgs.add_cli_args = staticmethod(_add_cli_args)
    EngineArgs.from_cli_args = classmethod(_from_cli_args)
    EngineArgs.create_engine_config = _create_engine_config
    return INACTIVE is None


def _wrappers() -> dict:
    return {"add_cli_args": _add_cli_args, "from_cli_args": _from_cli_args,
            "create_engine_config": _create_engine_config}


def remove() -> None:
    """Undo :func:`apply` (tests switch between the active and the inert plugin)."""
    global INACTIVE
    from vllm_kvcompress.vllm.compat import EngineArgs

    if not ORIGINALS:
        return
    EngineArgs.add_cli_args = staticmethod(ORIGINALS.pop("add_cli_args"))
    EngineArgs.from_cli_args = classmethod(ORIGINALS.pop("from_cli_args"))
    EngineArgs.create_engine_config = ORIGINALS.pop("create_engine_config")
    for wrapper in _wrappers().values():
        del wrapper.__wrapped__
    INACTIVE = None
