"""Host-side cost of the plugin's per-step bookkeeping, without a model or a GPU (CPU, 1 thread).

Llama-3-8B's cache shape (32 layers x 8 KV heads, head_dim 128, 16-token head-blocks):

* ``take_reports``: the worker's end-of-step check for surplus spares, 256 running compressed
  requests (ms per step, median of 30);
* ``apply_report``: the scheduler taking back 1k of a request's ~28k head-blocks (ms, median of 10),
  and taking a report that releases none (``apply_report_lengths_only_ms``: a recompression tick
  with ``reserve_decode_growth``, whose freed blocks the request keeps for its regrowth);
* ``recompress``: one decode-time recompression of all 256 heads of a request at 1,665 rows each
  (budget 1,600 + slack 64 + 1), per policy: PyTorch calls counted by torch.profiler. On a GPU each
  call is at least one kernel launch from Python, so the count is what the host pays. Also 8
  requests due in the same step (400-row heads), one by one against together, and one request
  whose layers hold 32 different lengths (PyramidKV's budgets do that), one policy call per
  length against one padded call;
* ``prefill_6k``: one 6,000-token request's prefill compression at a tenth, per policy: PyTorch
  calls (the worker's workspace for that length decides how many layers a dense reduction, EMS's,
  takes per call);
* ``prefill_step``: PyTorch calls of the prefill compressions of one 8k-token step of 2k prompts
  (four requests), one by one against together (``Compressor.compress_prefills``), per policy;
* ``plugin_step``: the plugin's whole host work in a pure-decode step of 64 and 256 requests
  (:func:`plugin_step`): PyTorch calls (views included) and ms on this CPU, where ms also count
  copying the layout's tensors, which on a GPU are kernels; ``plugin_step_reserve_decode_growth``:
  the same with ``reserve_decode_growth``, whose decode steps advance the graph buffers in place
  (``WorkerState.lay_out_decode``);
* ``recompress_requests``: PyTorch calls of one decode-time recompression tick of 1, 8 and 32
  due requests (200-row heads), per policy: the policy's calls are one round whatever the count,
  and the bookkeeping runs over all requests at once;
* ``--assign DEVICE``: only ``WorkerState._assign`` (the decode step's block assignment) for 64,
  128, 134 and 256 requests with 600-row heads of many lengths, ms median, at each
  ``--threads`` count (e.g. ``--assign cuda --threads 16,1`` on a GPU machine);
* ``decode_step``: the metadata of one pure-decode step of 256 running requests (400 rows a head):
  ``WorkerState.prepare_step`` and, with ``cuda_graphs``, the copy into the persistent buffers
  (``DecodeBuffers.fill``): PyTorch calls and ms of a step that assigns no new block. Once a replayed graph takes the 32 per-layer
  attention calls off the host, this and the scheduler are what a decode step still costs it.

    python benchmarks/host_overhead.py                       # table + benchmarks/results/host-overhead-cpu.json

``--label`` names the run (default: the project commit); runs with other labels stay in the JSON,
so two commits can be compared side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import project_commit  # noqa: E402

L, H, BS, D, GROUP = 32, 8, 16, 128, 4
RESULTS = Path(__file__).resolve().parent / "results" / "host-overhead-cpu.json"
NOT_COUNTED = {"aten::empty", "aten::as_strided", "aten::view", "aten::slice", "aten::select", "aten::detach",
               "aten::alias", "aten::unsqueeze", "aten::expand", "aten::reshape", "aten::_reshape_alias"}


def scheduler_output(rid: str, prompt_len: int, block_ids: list[int]):
    from vllm_kvcompress.vllm.worker import scheduled

    return scheduled.scheduler_output([scheduled.new_request(rid, prompt_len, block_ids)])


def take_reports_ms(num_requests: int = 256) -> float:
    from vllm_kvcompress.policies.config import CompressionConfig
    from vllm_kvcompress.vllm.worker.state import WorkerState

    state = WorkerState(L, H, BS, {}, CompressionConfig(policy="snapkv", budget=100))
    gen = torch.Generator().manual_seed(0)
    for r in range(num_requests):
        n = L * H * 8
        state.ingest(scheduler_output(str(r), 100, list(range(r * n, (r + 1) * n))))
        state.append(str(r), 100)
        state.compacted_heads(str(r), torch.randint(40, 100, (L, H), generator=gen))
        state.reqs[str(r)].compressed_to(None)
    state.take_reports()  # the first check releases every request's surplus
    times = []
    for _ in range(30):
        start = time.perf_counter()
        state.take_reports()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def apply_report_ms(release: bool = True) -> tuple[float, int, int]:
    """ms (median of 10) of ``apply_report`` of a request holding ~28k head-blocks that releases
    every 28th of them (``release``) or none; the blocks held and released."""
    from vllm.v1.core.block_pool import BlockPool

    from vllm_kvcompress.vllm.scheduler.spec import HeadBlockManager, HeadBlockSpec

    spec = HeadBlockSpec(block_size=BS, num_kv_heads=H, head_size=D, dtype=torch.bfloat16, num_layers=L)
    pool = BlockPool(num_gpu_blocks=100_000, enable_caching=False, hash_block_size=BS)
    mgr = HeadBlockManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=BS)
    lens = [[1700] * H] * L
    times = []
    for i in range(10):
        rid, tokens = f"r{i}", 1765
        mgr.get_num_blocks_to_allocate(rid, tokens, [], 0, 0, tokens)
        blocks = mgr.allocate_new_blocks(rid, tokens, tokens)
        released = [b.block_id for b in blocks[::28]] if release else []
        start = time.perf_counter()
        mgr.apply_report(rid, released, tokens, lens)
        times.append((time.perf_counter() - start) * 1e3)
        mgr.free(rid)
    return statistics.median(times), len(blocks), len(released)


def counted_calls(prof) -> int:
    """The PyTorch calls a torch.profiler run recorded, views and allocations left out (:data:`NOT_COUNTED`)."""
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in NOT_COUNTED)


def prefilled_requests(policy: str, prompt: int | list[int], budget: int | float, num_requests: int = 1, seed: int = 0,
                       head_dim: int = D, device: str = "cpu", options: dict | None = None):
    """A WorkerState holding ``num_requests`` requests ("r0", ...) whose prompts of ``prompt``
    random rows (a list: one length per request) were prefilled and observed (window queries,
    EMS's column mass), due for their prefill compression at ``budget``; and the generator that
    made them. ``head_dim`` sizes the pool and the queries (a smaller one keeps many requests in
    memory where only counts matter); ``device``: where the pool, the queries and the signals live;
    ``options``: further :class:`CompressionConfig` fields."""
    prompts = [prompt] * num_requests if isinstance(prompt, int) else list(prompt)
    from vllm_kvcompress.policies.config import CompressionConfig
    from vllm_kvcompress.vllm.worker.state import WorkerState

    state = WorkerState(L, H, BS, {}, CompressionConfig(policy=policy, budget=budget, window=32, decode_slack=64,
                                                           **(options or {})),
                        device=device)
    per_request = L * H * ((max(prompts) + 80) // BS + 2)
    gen = torch.Generator(device).manual_seed(seed)  # made where they live: a GPU pool is gigabytes

    def random(*shape, normal=True):
        return (torch.randn if normal else torch.rand)(*shape, generator=gen, device=device)

    state.pool = random(2, per_request * len(prompts), BS, head_dim).to(torch.bfloat16)
    for r, length in enumerate(prompts):
        rid = f"r{r}"
        state.ingest(scheduler_output(rid, length, list(range(r * per_request, (r + 1) * per_request))))
        request = state.reqs[rid]
        state.append(rid, length)
        for layer in range(L):
            request.queries[layer] = random(H * GROUP, 32, head_dim).to(torch.bfloat16)
            request.signals[layer] = {"global_attention": random(H, length, normal=False)}
    return state, gen


def due_requests(policy: str, prompt: int, num_requests: int = 1, seed: int = 0, layer_lengths: bool = False,
                 head_dim: int = D, device: str = "cpu"):
    """A WorkerState holding ``num_requests`` compressed requests ("r0", ...) with random caches and
    query rings, every head of each 65 rows past its budget (budget = prompt): all due for a
    decode-time recompression. ``layer_lengths``: 32 more rows, and layer l's heads l fewer, so
    each layer holds its own length (as PyramidKV's budgets make them)."""
    from vllm_kvcompress.vllm.worker import compressor

    state, gen = prefilled_requests(policy, prompt, prompt, num_requests, seed, head_dim, device)
    for r in range(num_requests):
        rid = f"r{r}"
        request = state.reqs[rid]
        compressor.Compressor(state).compress_prefill(rid)  # budget = prompt: every head keeps all rows
        state.append(rid, 65)  # every head now over budget + slack
        if layer_lengths:
            state.append(rid, L)
            request.lens.sub_(torch.arange(L)[:, None])
        state.recent[:, request.row] = torch.randn(state.recent[:, request.row].shape, generator=gen,
                                                   device=gen.device).to(state.recent)
        request.recent_count += 65 + r  # rings at different positions
    return state


def recompress_calls(policy: str, prompt: int = 1600, num_requests: int = 1, layer_lengths: bool = False,
                     by_length: bool = False) -> int:
    """PyTorch calls of the recompression of ``num_requests`` requests due in the same step.
    ``by_length``: as before padded recompression, one policy call per distinct head length (the
    reducer's ``pads_heads`` off for the measurement)."""
    from vllm_kvcompress.vllm.worker import compressor

    state = due_requests(policy, prompt, num_requests, layer_lengths=layer_lengths)
    reducer = type(state.reqs["r0"].policy.reducer)
    pads = reducer.pads_heads
    reducer.pads_heads = pads and not by_length
    try:
        with torch.profiler.profile() as prof:
            if len(compressor.Compressor(state).recompress(list(state.reqs))) != num_requests:
                raise RuntimeError("a request had no head over its budget")
    finally:
        reducer.pads_heads = pads
    return counted_calls(prof)


def prefill_calls(policy: str, prompt: int = 6000) -> int:
    """PyTorch calls of one request's prefill compression (``prompt`` rows a head, budget a tenth),
    with the compression workspace a worker reserves for that length (it sizes how many layers a
    dense reduction takes per call)."""
    from vllm_kvcompress.vllm.worker import compressor
    from vllm_kvcompress.vllm.worker.worker import workspace_for

    state, _ = prefilled_requests(policy, prompt, prompt // 10)
    state.workspace_bytes = workspace_for(L * H * -(-prompt // BS) * BS * 2 * state.pool.shape[-1] * state.pool.element_size())
    with torch.profiler.profile() as prof:
        compressor.Compressor(state).compress_prefill("r0")
    return counted_calls(prof)


def prefill_step_calls(policy: str, prompts: tuple[int, ...] = (2048, 2048, 1800, 2048)) -> dict[str, int]:
    """PyTorch calls of compressing the prefills one step completes (four prompts of about 2k, as
    an 8k-token step of the long-gen workload does), one by one against together."""
    from vllm_kvcompress.vllm.worker import compressor

    rids = [f"r{r}" for r in range(len(prompts))]
    counts = {}
    for how in ("one_by_one", "together"):
        state, _ = prefilled_requests(policy, list(prompts), 0.1, head_dim=16)
        with torch.profiler.profile() as prof:
            if how == "together":
                compressor.Compressor(state).compress_prefills(rids)
            else:
                for rid in rids:
                    compressor.Compressor(state).compress_prefill(rid)
        counts[how] = counted_calls(prof)
    return counts


def assign_ms(num_requests: int, device: str = "cpu", rows: int = 600, steps: int = 48) -> float:
    """Median ms of ``WorkerState._assign`` for a decode step of ``num_requests`` requests whose
    heads hold between ``rows / 2`` and ``rows`` rows (some cross a block's end every step)."""
    from vllm_kvcompress.policies.config import CompressionConfig
    from vllm_kvcompress.vllm.worker.state import WorkerState

    state = WorkerState(L, H, BS, {}, CompressionConfig(policy="snapkv", budget=rows), device=device)
    per_request = L * H * (-(-(rows + steps + 20) // BS) + 1)
    gen = torch.Generator().manual_seed(0)
    rids = [str(r) for r in range(num_requests)]
    for r, rid in enumerate(rids):
        state.ingest(scheduler_output(rid, rows, list(range(r * per_request, (r + 1) * per_request))))
        state.append(rid, rows)
        state.compacted_heads(rid, torch.randint(rows // 2, rows, (L, H), generator=gen))
    times = []
    for _ in range(steps):
        reqs = [state.reqs[rid] for rid in rids]
        start = time.perf_counter()
        state._assign(reqs, rids, torch.tensor([r.row for r in reqs]), torch.ones(num_requests, dtype=torch.int64))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_step(num_requests: int = 256, rows: int = 400, steps: int = 20) -> dict:
    """PyTorch calls and CPU ms of one pure-decode step's layout, without and with the graph buffers."""
    from vllm_kvcompress.policies.config import CompressionConfig
    from vllm_kvcompress.vllm.worker.graphs import DecodeBuffers
    from vllm_kvcompress.vllm.worker.state import WorkerState

    state = WorkerState(L, H, BS, {}, CompressionConfig(policy="snapkv", budget=rows))
    per_request = L * H * -(-(rows + 2 * steps + 2) // BS)  # room for the measured steps
    rids = [str(r) for r in range(num_requests)]
    for r, rid in enumerate(rids):
        state.ingest(scheduler_output(rid, rows, list(range(r * per_request, (r + 1) * per_request))))
        state.append(rid, rows)
    buffers = DecodeBuffers.allocate(L, H, H * GROUP, D, num_requests, 1088, torch.bfloat16, "cpu")  # 17k tokens
    out = {}
    for name, graph in (("layout", False), ("layout_and_graph_buffers", True)):
        def step():
            layout = state.prepare_step(rids, [1] * num_requests)
            if graph:
                buffers.fill(layout.slots, layout.tables, layout.lens, num_requests)
        step()
        with torch.profiler.profile() as prof:
            step()
        calls = counted_calls(prof)
        times = []
        for _ in range(steps // 2 - 1):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = {"pytorch_calls": calls, "cpu_ms": round(statistics.median(times), 3)}
    return out


def plugin_step(num_requests: int, rows: int = 400, steps: int = 32, graphs: bool = True, head_dim: int = 8,
                policy: str = "adakv", options: dict | None = None, profile=None) -> dict:
    """The plugin's whole host work in one pure-decode step of ``num_requests`` compressed requests
    (Ada-KV at ``rows`` per head of ``2 * rows``-token prompts: heads of many lengths, which cross
    their blocks' ends on different steps; decode-time recompression on its 64-step cadence), as the
    worker runs it around the forward: ``WorkerState.ingest`` of the scheduler
    output, the attention metadata build (``HeadBlockMetadataBuilder.build``; with ``graphs`` the
    persistent CUDA-graph buffers), the recorded queries into the rings, ``Compressor.after_forward``
    (nothing due on most steps) and ``take_reports``. PyTorch calls (views and selects included:
    each is a dispatcher round trip) per step, and host ms per step (median), over ``steps`` steps
    that cross one recompression tick. ``policy`` / ``options`` (e.g. ``reserve_decode_growth``)
    configure the requests; ``profile`` (e.g. a ``cProfile.Profile``) is enabled around the timed steps."""
    from types import SimpleNamespace

    from vllm_kvcompress.vllm.attention import backend
    from vllm_kvcompress.vllm import runtime
    from vllm_kvcompress.vllm.worker import scheduled
    from vllm_kvcompress.vllm.worker.compressor import Compressor
    from vllm_kvcompress.vllm.worker.graphs import DecodeBuffers

    state, gen = prefilled_requests(policy, 2 * rows, rows, num_requests, head_dim=head_dim, options=options)
    rids = list(state.reqs)
    compressor = Compressor(state)
    for rid in rids:
        compressor.compress_prefill(rid)
    state.pack_uploads = True  # the GPU's one packed copy of a step's index tensors
    if graphs:
        state.decode_buffers = DecodeBuffers.allocate(L, H, H * GROUP, head_dim, num_requests,
                                                   -(-(2 * rows + 80) // BS), torch.bfloat16, "cpu")
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=rids))
    builder = backend.HeadBlockMetadataBuilder.__new__(backend.HeadBlockMetadataBuilder)
    saved = runtime.WORKER_STATE, runtime.RUNNER, runtime.COMPRESSOR
    runtime.WORKER_STATE, runtime.RUNNER, runtime.COMPRESSOR = state, runner, compressor
    queries = torch.randn(num_requests, H * GROUP, head_dim, generator=gen).to(torch.bfloat16)
    free = {rid: [] for rid in rids}  # head-blocks each request reported back

    def step():
        seq_lens = [state.reqs[rid].num_tokens + 1 for rid in rids]
        state.ingest(scheduled.scheduler_output(cached=scheduled.cached_requests(rids, [None] * len(rids)),
                                             num_scheduled_tokens={rid: 1 for rid in rids}))
        common = SimpleNamespace(num_reqs=num_requests, num_actual_tokens=num_requests, max_query_len=1,
                             query_start_loc_cpu=torch.arange(num_requests + 1, dtype=torch.int32),
                             _seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32))
        metadata = builder.build(0, common)
        if metadata.graph:
            metadata.step_queries[:, :num_requests].copy_(queries)  # what the forward leaves there
        elif metadata.record is not None:
            tokens, ring_index = metadata.record
            ring = state.recent.view(L, -1, *state.recent.shape[3:])
            ring.index_copy_(1, ring_index, queries[None].expand(L, -1, -1, -1).to(ring.dtype))
        state.flush_graph_queries()
        compressor.after_forward()
        for rid, (released, _, _) in state.take_reports().items():
            free[rid].extend(released)

    def scheduler_grants():  # not measured: what the next rows need, from blocks the request gave back
        for rid in rids:
            request = state.reqs[rid]
            missing = state.spares_needed(request) - len(request.spare)
            if missing > 0:
                request.add_spares(free[rid][:missing])
                del free[rid][:missing]

    try:
        for _ in range(2):
            scheduler_grants()
            step()
        times, calls = [], []
        for _ in range(steps):
            scheduler_grants()
            with torch.profiler.profile() as prof:
                step()
            calls.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
            scheduler_grants()
            if profile is not None:
                profile.enable()
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
            if profile is not None:
                profile.disable()
    finally:
        runtime.WORKER_STATE, runtime.RUNNER, runtime.COMPRESSOR = saved
    return {"pytorch_calls_median": int(statistics.median(calls)), "pytorch_calls_max": max(calls),
            "host_ms_median": round(statistics.median(times), 3), "host_ms_max": round(max(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default=None, help="name of this run (default: the project commit)")
    parser.add_argument("--policies", default="snapkv,adakv,ems,windowkv")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plugin-step-requests", default="64,256",
                        help="request counts of plugin_step (256 needs more than 24 GB of memory)")
    parser.add_argument("--assign", metavar="DEVICE", help="only time the block assignment on DEVICE (printed)")
    parser.add_argument("--threads", default="1", help="with --assign: comma-separated PyTorch thread counts")
    args = parser.parse_args()
    if args.assign:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            print(f"{threads} thread(s), _assign ms by requests:",
                  {n: round(assign_ms(n, args.assign), 3) for n in (64, 128, 134, 256)}, flush=True)
        return
    torch.set_num_threads(1)
    label = args.label or project_commit()
    apply_ms, held, released = apply_report_ms()
    run = {"label": label, "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
           "take_reports_256_requests_ms": round(take_reports_ms(), 3),
           "apply_report_ms": round(apply_ms, 3), "apply_report_blocks_held": held,
           "apply_report_blocks_released": released,
           "apply_report_lengths_only_ms": round(apply_report_ms(release=False)[0], 3),
           "recompress_pytorch_calls": {p: recompress_calls(p) for p in args.policies.split(",")},
           # 8 requests due in the same step (400-row heads): one by one (8 x one) vs. together
           "recompress_8_requests_pytorch_calls": {
               p: {"one_by_one": 8 * recompress_calls(p, 400), "together": recompress_calls(p, 400, 8)}
               for p in args.policies.split(",")},
           # a tick of 1, 8, 32 due requests: as many calls for any count
           "recompress_requests_pytorch_calls": {
               p: {str(n): recompress_calls(p, 200, n) for n in (1, 8, 32)} for p in args.policies.split(",")},
           # one request whose 32 layers hold 32 lengths (PyramidKV): one call per length vs padded
           "recompress_32_lengths_pytorch_calls": {
               p: {"by_length": recompress_calls(p, layer_lengths=True, by_length=True),
                   "padded": recompress_calls(p, layer_lengths=True)}
               for p in args.policies.split(",") if p != "windowkv"},
           # one 6k-token request's prefill compression (on a GPU each call is a launch)
           "prefill_6k_pytorch_calls": {p: prefill_calls(p) for p in args.policies.split(",")},
           # the four prefills an 8k-token step of 2k prompts completes: one by one vs together
           "prefill_step_pytorch_calls": {p: prefill_step_calls(p) for p in args.policies.split(",")},
           "decode_step_256_requests": decode_step(),
           # the plugin's whole host work in a pure-decode step with the graph buffers
           "plugin_step": {n: plugin_step(int(n)) for n in args.plugin_step_requests.split(",")},
           "plugin_step_reserve_decode_growth": {
               n: plugin_step(int(n), options={"reserve_decode_growth": True})
               for n in args.plugin_step_requests.split(",")}}
    runs = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    runs = [r for r in runs if r["label"] != label] + [run]
    args.out.write_text(json.dumps({"benchmark": "host_overhead", "device": "CPU", "runs": runs}, indent=1) + "\n")
    print(f"{'run':<28} {'take_reports ms':>16} {'apply_report ms':>16}  recompress calls")
    for r in runs:
        calls = ", ".join(f"{p} {n}" for p, n in r["recompress_pytorch_calls"].items())
        print(f"{r['label']:<28} {r['take_reports_256_requests_ms']:>16} {r['apply_report_ms']:>16}  {calls}")
        for p, n in r.get("recompress_8_requests_pytorch_calls", {}).items():
            print(f"{'':<28} 8 due requests, {p}: {n['one_by_one']} calls one by one, {n['together']} together")
        for p, n in r.get("recompress_requests_pytorch_calls", {}).items():
            print(f"{'':<28} a tick of 1 / 8 / 32 due requests, {p}: " + " / ".join(str(c) for c in n.values()) + " calls")
        for p, n in r.get("recompress_32_lengths_pytorch_calls", {}).items():
            print(f"{'':<28} 32 head lengths, {p}: {n['by_length']} calls by length, {n['padded']} padded")
        if "prefill_6k_pytorch_calls" in r:
            print(f"{'':<28} prefill compression of a 6k-token request: "
                  + ", ".join(f"{p} {n} calls" for p, n in r["prefill_6k_pytorch_calls"].items()))
        for p, n in r.get("prefill_step_pytorch_calls", {}).items():
            print(f"{'':<28} four 2k prefills of one step, {p}: {n['one_by_one']} calls one by one, "
                  f"{n['together']} together")
        for name, n in r.get("decode_step_256_requests", {}).items():
            print(f"{'':<28} decode step of 256 requests, {name}: {n['pytorch_calls']} calls, {n['cpu_ms']} ms")
        for name, suffix in (("plugin_step", ""), ("plugin_step_reserve_decode_growth", " (reserve_decode_growth)")):
            for requests, n in r.get(name, {}).items():
                print(f"{'':<28} the plugin's host work in a decode step of {requests} requests{suffix}: "
                      f"{n['pytorch_calls_median']} PyTorch calls, {n['host_ms_median']} ms")


if __name__ == "__main__":
    main()
