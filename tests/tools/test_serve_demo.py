"""The main command (``python -m vllm_kvcompress``): option checks and the arithmetic of its report
without a server, then the command end to end on vLLM's CPU build (slow, ~2 minutes on 2 cores)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvcompress.tools import serve_demo
from vllm_kvcompress.tools.serve_demo import RequestPages

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def nothing_starts(monkeypatch):
    """Make starting anything an error: bad options must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started before checking its options")

    monkeypatch.setattr(serve_demo, "serve_and_ask", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--policy", "nope"], "valid policies"),
    (["--policy", "none"], "--policy none keeps the full cache"),
    (["--budget", "-3"], "budget"),
    (["--context-tokens", "10"], "--context-tokens must be >= 64"),
    (["--port", "70000"], "--port must be 1 to 65535"),
    (["--model", "/no/such/folder"], "not a Hugging Face model folder"),
])
def test_bad_options_are_refused_before_starting(argv, message, nothing_starts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_after_the_separator_go_to_the_server():
    args, _ = serve_demo.parse_args(["--budget", "64", "--", "--max-num-seqs", "4"])
    assert args.budget == "64" and args.server_args == ["--max-num-seqs", "4"]


def events(prefill: int, after: int, finished: int, returned: list[int], other: str = "cmpl-someone-else-0-x"):
    mine = "cmpl-demo-0-1234abcd"
    return [
        {"kind": "manager_init", "num_blocks": 10_000, "free": 9_999, "heads": 90},
        {"kind": "compressed", "what": "prefill", "req_id": other, "blocks_before": 99, "blocks_after": 9},
        {"kind": "compressed", "what": "prefill", "req_id": mine, "blocks_before": prefill, "blocks_after": after},
        *({"kind": "blocks_returned", "req_id": mine, "freed": n} for n in returned),
        {"kind": "blocks_returned", "req_id": other, "freed": 90},
        {"kind": "request_freed", "req_id": mine, "blocks": finished},
    ]


def test_pages_of_one_request_from_the_event_log():
    pages = RequestPages.from_events(events(prefill=2_700, after=450, finished=540, returned=[2_000, 250]), "demo")
    assert (pages.pool, pages.heads, pages.prefill, pages.retained, pages.freed) == (10_000, 90, 2_700, 540, 2_250)
    assert pages.uncompressed(480) == 90 * 30 and pages.uncompressed(481) == 90 * 31
    assert pages.fit_without(480) == 10_000 // 2_700 == 3
    assert pages.fit_with() == 1 + (10_000 - 2_700) // 540 == 14


def test_a_decode_time_recompression_counts_what_was_held_before_it():
    log = events(prefill=2_700, after=450, finished=500, returned=[2_250, 200])
    log.insert(-1, {"kind": "compressed", "what": "decode", "req_id": "cmpl-demo-0-1234abcd",
                    "blocks_before": 700, "blocks_after": 450})
    assert RequestPages.from_events(log, "demo").retained == 700


def test_a_request_without_compression_is_an_error():
    log = [e for e in events(2_700, 450, 540, [2_250]) if e.get("req_id") != "cmpl-demo-0-1234abcd"]
    with pytest.raises(serve_demo.DemoError, match="was it compressed"):
        RequestPages.from_events(log, "demo")


# ---- the command on vLLM's CPU build ---------------------------------------------------------------
def run_command(*argv: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vllm_kvcompress", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def group_members(pgid: int) -> list[int]:
    """Processes still in process group ``pgid`` (the server's: it leads its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                members.append(int(entry.name))
    return members


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_the_main_command_answers_with_compression_and_fits_more_requests():
    """The README's command with its defaults (snapkv, 128 tokens per KV head, SmolLM2, ~1500 tokens):
    the answer is right, compression freed pages (the event log and /metrics agree), more requests fit
    with compression than without, and no process of the server is left."""
    done = run_command()
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr[-3000:]}"
    assert re.search(r"expected \d{7}: right", out), out
    freed = number(r"freed: +([\d,]+)", out)
    assert freed > 0
    assert number(r"kv_compression_blocks_freed_total ([\d,]+)", out) == freed
    assert number(r"with snapkv: +([\d,]+)", out) > number(r"without compression: +([\d,]+)", out) >= 1
    pid = number(r"server stopped \(pid (\d+)\)", out)
    assert group_members(pid) == []


@pytest.mark.slow
def test_a_server_that_does_not_start_shows_its_log():
    done = run_command("--", "--no-such-vllm-flag")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the vLLM server exited with code" in done.stderr
    assert "--no-such-vllm-flag" in done.stderr.split("the last lines of its log", 1)[1]  # vLLM's own complaint
    assert group_members(number(r"server stopped \(pid (\d+)\)", done.stdout)) == []
