"""vLLM 0.26 (V1 engine) integration: per-head KV-cache compression as a general plugin.

Design: ``docs/vllm-integration.md``. Modules, one concept each, by the process side they run on:

* :mod:`.plugin`   -- the ``vllm.general_plugins`` entry point (idempotent, inert unless enabled)
* :mod:`.compat`   -- every vLLM internal the plugin touches, named and pinned to 0.26.0
* :mod:`.patches`  -- every monkeypatch of vLLM (EngineArgs CLI flags and config completion)
* :mod:`.settings` -- reading ``additional_config["kv_compression"]``, completion, start-up refusals
* :mod:`.runtime`  -- per-process handles and the optional event log
* ``frontend/``    -- API server: ``request_rules`` (what a request may change: the operator's rules),
  ``params`` (per-request options checked in the front end: HTTP 400)
* ``scheduler/``   -- EngineCore: ``spec`` (HeadBlockSpec + HeadBlockManager: head-block accounting),
  ``connector`` (the worker -> scheduler channel for freed blocks), ``metrics`` (``/metrics`` counters)
* ``worker/``      -- ``worker`` (worker_cls hooks wiring state, runner spec and backend), ``state``
  (which pool blocks each (request, layer, head) owns), ``request`` (one request's phase and rows),
  ``compressor`` (compression with the policy library), ``graphs`` (CUDA-graph decode buffers),
  ``scheduled`` (the scheduler output the state reads, for drivers without vLLM's scheduler)
* ``attention/``   -- ``backend`` (attention over the head-block pool), ``kernels`` (which
  implementation a device runs)
"""
