"""The ``vllm.general_plugins`` entry point; vLLM calls it in every process (front end, EngineCore,
workers), possibly several times. Idempotent and inert by itself: it registers the head-block spec
(unused unless our worker reports it) and wraps EngineArgs (the wrappers only add CLI flags unless a
policy other than ``none`` is requested). On an unsupported vLLM it registers nothing and the
wrappers only refuse requests for compression (:func:`.patches.apply`)."""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_kvcompress.vllm import patches

    if patches.apply():
        from vllm_kvcompress.vllm.scheduler.spec import register_spec  # vLLM internals: imported on the supported vLLM only

        register_spec()
    _registered = True
