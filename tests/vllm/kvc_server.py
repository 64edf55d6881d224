"""The server tests' side of :mod:`vllm_kvcompress.tools.openai_server` (the server process, its
flags and the tiny model's recipe live there): the plugin's flags of the tests, a server that does
not start failing the test, and one server start shared by several test modules.

A plain module, not a package: an ``__init__.py`` in tests/vllm would make pytest import these
files as ``vllm.*`` and shadow vLLM.

:func:`shared_server` lets several test modules use ONE server start (each costs ~1-2 min on 2 CPU
cores): the first module that asks starts it, and it stops after the last module of the session
that uses the same fixture name.
"""
from __future__ import annotations

import pytest

from vllm_kvcompress.tools.openai_server import Server, ServerError, start_tiny

PLUGIN_FLAGS = ["--kv-compression", "snapkv", "--kv-budget", "32"]


def start_server(model_dir: str, flags: list[str], log_path: str, chat_template: str | None, **options) -> Server:
    """:func:`~vllm_kvcompress.tools.openai_server.start_tiny` (``options``: its keyword arguments);
    a server that does not start fails the test (pytest.fail, not an error) with its log's tail."""
    try:
        return start_tiny(model_dir, flags, log_path, chat_template, **options)
    except ServerError as error:
        pytest.fail(str(error))


# ---- one server for several test modules ------------------------------------------------------------
_SHARED: dict[str, Server] = {}


def shared_server(request, start) -> Server:
    """The server of the calling module-scoped fixture (``request``), started by ``start()`` unless a
    module before already started it under the same fixture name. It stops when the last module of
    the session that uses that fixture name is done (and at the end of the session in any case)."""
    name = request.fixturename
    server = _SHARED.get(name)
    if server is None or not server.alive():
        server = _SHARED[name] = start()
        request.config.add_cleanup(server.stop)

    def release() -> None:
        items = request.session.items
        mine = [i for i, item in enumerate(items) if getattr(item, "module", None) is request.module]
        later = items[max(mine) + 1:] if mine else []
        if not any(name in getattr(item, "fixturenames", ()) for item in later):
            _SHARED.pop(name, None)
            server.stop()

    request.addfinalizer(release)
    return server
