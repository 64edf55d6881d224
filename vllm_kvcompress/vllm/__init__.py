"""vLLM 0.26 (V1 engine) integration: per-head KV-cache compression as a general plugin.

Design: ``docs/vllm-integration.md``. Modules, one concept each:

* :mod:`.plugin`    -- the ``vllm.general_plugins`` entry point (idempotent, inert unless enabled)
* :mod:`.patches`   -- every monkeypatch of vLLM (EngineArgs CLI flags and config completion)
* :mod:`.settings`  -- reading ``additional_config["kv_compression"]``, completion, start-up refusals
* :mod:`.request_rules` -- what a request may change of the server's compression (operator rules)
* :mod:`.params`    -- front-end validation of per-request options (HTTP 400)
* :mod:`.spec`      -- scheduler side: HeadBlockSpec + HeadBlockManager (head-block accounting)
* :mod:`.state`     -- worker side: which pool blocks each (request, layer, head) owns
* :mod:`.backend`   -- the attention backend over the head-block pool
* :mod:`.compressor`-- compression after the last prefill chunk with the policy library
* :mod:`.worker`    -- worker_cls (CPU and GPU) wiring state, runner spec and backend
* :mod:`.connector` -- KV connector used as the worker -> scheduler channel for freed blocks
* :mod:`.runtime`   -- per-process handles and the optional event log
"""
