"""Where a compression's time goes, in process, without vLLM: a prefill step's compressions and a
decode-time recompression tick of Llama-3-8B's cache shape (32 layers x 8 KV heads, head_dim 128,
16-token head-blocks), on random pages, per policy.

* ``prefill``: the compressions of the prompts one step completes (default four 2k prompts: an
  8k-token step of the served long-gen workload), ``Compressor.compress_prefills``, at ``--budget``;
* ``tick``: one tick of ``--requests`` requests, every head ``decode_slack + 1`` rows over its
  budget of ``--budget`` x ``--prompt`` rows (long-gen's tick: 256 requests, heads of 269 rows back
  to 204), ``Compressor.recompress``.

For each: the wall time of the call (the device synchronized after it; median of ``--repeat``
fresh states after one warm-up), the host's waits for the device by line (PyTorch's sync debug
mode), and torch.profiler's tables by host and by device time. On a CPU it runs too (slowly: the
shapes are the real ones), for a check of the script.

    python benchmarks/profile_compression.py --policies ems,snapkv --what prefill,tick --out /tmp/compression.txt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead  # noqa: E402
from profile_engine import host_waits, pageable_copies, torch_profiler, write_tables, write_waits  # noqa: E402


def served_workspace(state, max_model_len: int) -> None:
    """Give ``state`` the compression workspace a served worker of ``max_model_len`` reserves
    (it decides how many heads one policy call takes)."""
    from vllm_kvcompress.vllm.worker.worker import workspace_for

    page = state.bs * state.pool.shape[-1] * state.pool.element_size()  # one head-block of K or V
    state.workspace_bytes = workspace_for(2 * state.L * state.H * -(-max_model_len // state.bs) * page)


def prefill_case(policy: str, prompts: list[int], budget: float, device: str, max_model_len: int):
    """A state whose requests' prompts just completed, and the call that compresses them."""
    from vllm_kvcompress.vllm.worker.compressor import Compressor

    state, _ = host_overhead.prefilled_requests(policy, prompts, budget, device=device)
    served_workspace(state, max_model_len)
    rids = list(state.reqs)

    def call():
        Compressor(state).compress_prefills(rids)
        if any(bool((state.reqs[rid].lens >= state.reqs[rid].num_tokens).all()) for rid in rids):
            raise RuntimeError("a prefill compression kept every row")
    return call


def tick_case(policy: str, rows: int, requests: int, device: str, max_model_len: int):
    """A state of ``requests`` compressed requests, every head due, and the tick that recompresses them."""
    from vllm_kvcompress.vllm.worker.compressor import Compressor

    state = host_overhead.due_requests(policy, rows, requests, device=device)
    served_workspace(state, max_model_len)
    rids = list(state.reqs)

    def call():
        if len(Compressor(state).recompress(rids)) != len(rids):
            raise RuntimeError("a request had no head over its budget")
    return call


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(make, device: str, repeat: int, out, what: str) -> dict:
    """Wall ms of ``make()()`` over fresh states (after a warm-up); then one more under the
    profilers, whose tables go to ``out``."""
    times = []
    for _ in range(repeat + 1):  # the first compiles the kernels
        call = make()
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        del call
    call = make()
    synchronize(device)
    with host_waits() if device.startswith("cuda") else contextlib.nullcontext([]) as caught, torch_profiler() as prof:
        call()
        synchronize(device)
    write_waits(out, caught, what)
    write_tables(out, prof, what)
    waits = sum("synchroniz" in str(w.message) for w in caught)
    return dict(what=what, first_ms=round(times[0], 2), wall_ms=round(statistics.median(times[1:]), 2), waits=waits,
                pageable_copies=pageable_copies(prof))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="ems,snapkv")
    parser.add_argument("--what", default="prefill,tick")
    parser.add_argument("--prompts", default="2048,2048,2048,2048", help="prefill: the prompt lengths of one step")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--prompt", type=int, default=2048, help="tick: the prompt length whose budget the heads hold")
    parser.add_argument("--requests", type=int, default=256, help="tick: requests due")
    parser.add_argument("--max-model-len", type=int, default=10240,
                        help="sizes the compression workspace as a served worker's (default: long-gen's 2k + 8k)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compression-profile.txt"))
    args = parser.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    rows = int(args.budget * args.prompt)
    summary = []
    with args.out.open("w") as out:
        for policy in args.policies.split(","):
            for what in args.what.split(","):
                if what == "prefill":
                    label = f"{policy} prefill of {len(prompts)} prompts {args.prompts} at {args.budget}"
                    make = lambda: prefill_case(policy, prompts, args.budget, args.device, args.max_model_len)  # noqa: E731
                elif what == "tick":
                    label = f"{policy} tick of {args.requests} requests, heads of {rows + 65} rows back to {rows}"
                    make = lambda: tick_case(policy, rows, args.requests, args.device, args.max_model_len)  # noqa: E731
                else:
                    raise SystemExit(f"unknown --what {what!r}: prefill or tick")
                row = dict(policy=policy, **measure(make, args.device, args.repeat, out, label))
                print(json.dumps(row), flush=True)
                summary.append(row)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        out.write("\n# summary\n" + "\n".join(json.dumps(row) for row in summary) + "\n")


if __name__ == "__main__":
    main()
