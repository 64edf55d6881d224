"""Serve a dummy-weight model with ``vllm serve --kv-compression ...``, send OpenAI requests, and
report what compression did (pages freed, retained fraction) from the server's own log, metrics
and the plugin's event log. Used on the GPU machine (device tool) and on the CPU.

    python scripts/serve_check.py --shape llama3-8b --policy ems --budget 0.1 --prompt-tokens 6000 \
        --requests 8 --out results/   [extra vllm serve args after --]
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from dummy_model import make_dummy  # noqa: E402


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_ready(base: str, proc: subprocess.Popen, limit: float) -> None:
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/v1/models", timeout=2)
            return
        except Exception:
            time.sleep(2)
    raise TimeoutError("server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--model-dir", default="/tmp/kvc-dummy-model")
    parser.add_argument("--policy", default="ems")
    parser.add_argument("--budget", default="0.1")
    parser.add_argument("--prompt-tokens", type=int, default=6000, help="approximate prompt length (words)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", default=".")
    parser.add_argument("--ready-timeout", type=float, default=600)
    args, serve_extra = parser.parse_known_args()
    os.makedirs(args.out, exist_ok=True)
    model = make_dummy(args.model_dir, args.shape)
    log_path, events = os.path.join(args.out, "serve.log"), os.path.join(args.out, "events.jsonl")
    env = dict(os.environ, VLLM_KVC_EVENTS=events, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "DEBUG"))
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(args.port), "--kv-compression", args.policy,
           "--kv-budget", args.budget, "--kv-request-overrides", "all",  # its requests switch policy
           *[a for a in serve_extra if a != "--"]]
    print("$", " ".join(cmd), flush=True)
    base = f"http://127.0.0.1:{args.port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary: dict = {"command": cmd}
    try:
        wait_ready(base, proc, args.ready_timeout)
        rng = random.Random(0)
        words = "the quick brown fox jumps over lazy dog secret code is needle haystack city river".split()
        prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_tokens)) for _ in range(args.requests)]
        start = time.time()
        with futures.ThreadPoolExecutor(args.requests) as pool:
            done = list(pool.map(lambda p: post(base + "/v1/completions", {
                "model": model, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True}), prompts))
        summary["completions"] = {"seconds": round(time.time() - start, 2),
                                  "status": [s for s, _ in done],
                                  "usage": [b.get("usage") for _, b in done]}
        status, chat = post(base + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 16})
        summary["chat"] = {"status": status, "usage": chat.get("usage")}
        status, bad = post(base + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4,
                                                      "vllm_xargs": {"kv_budget": 0}})
        summary["bad_request"] = {"status": status, "message": str(bad)[:300]}
        status, override = post(base + "/v1/completions", {"model": model, "prompt": prompts[1], "max_tokens": 8,
                                                           "vllm_xargs": {"kv_compression": "snapkv", "kv_budget": 256}})
        summary["override_snapkv_256"] = {"status": status}
        with urllib.request.urlopen(base + "/metrics") as r:
            summary["metrics"] = [line for line in r.read().decode().splitlines()
                                  if "kv_compression" in line and not line.startswith("#")]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(log_path) as f:
        lines = f.read().splitlines()
    summary["compression_log"] = [l[:300] for l in lines if "kv compression (" in l][:12]
    summary["errors"] = [l[:300] for l in lines if "Error" in l or "ERROR" in l][-12:]
    summary["kv_cache_log"] = [l[:300] for l in lines if "KV cache size" in l or "Available KV cache" in l][:4]
    if os.path.exists(events):
        evs = [json.loads(l) for l in open(events)]
        init = next((e for e in evs if e["kind"] == "manager_init"), None)
        comp = [e for e in evs if e["kind"] == "compressed"]
        summary["pool_head_blocks"] = init and init["num_blocks"]
        summary["compressions"] = len(comp)
        summary["head_blocks_before_after"] = [(e["blocks_before"], e["blocks_after"]) for e in comp[:args.requests]]
        summary["head_blocks_returned"] = sum(e["freed"] for e in evs if e["kind"] == "blocks_returned")
        summary["peak_requests"] = max((e["peak"] for e in evs if e["kind"] == "peak_requests"), default=0)
    with open(os.path.join(args.out, "serve_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
