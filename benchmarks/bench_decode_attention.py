"""GPU kernel benchmarks: our Triton decode attention vs. vLLM's FlashAttention-3 decode.

Shapes are Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128, bf16, one new token per
request). Both kernels read a paged cache of block size 16 with shuffled block ids; FA3 reads
vLLM's layout [blocks, 16, kv_heads, 128], ours the head-block pool [head_blocks, 16, 128] (the
two views share one buffer, so the memory each case needs is counted once).

Each measurement replays a CUDA graph of the kernel over enough "layers" (distinct caches) that
the data cannot stay in the 50 MB L2, as in a real decode step, and takes the median of
triton.testing.do_bench (which also flushes L2 between replays); the time per layer is reported.
Bandwidth is set against a device-to-device copy measured in the same run.

    python benchmarks/bench_decode_attention.py                 # full grid, JSON (+ PNG if matplotlib) to benchmarks/results/
    python benchmarks/bench_decode_attention.py --quick --tune  # small grid, plus the tile-config / split sweeps
    python benchmarks/bench_decode_attention.py --plot benchmarks/results/kernels-h100.json   # PNG from a JSON (no GPU)

Cases from other kernel benchmarks join the same JSON: if ``benchmarks/bench_cache_ops.py`` exists,
its ``run_all(device) -> list[dict]`` is called and its records are appended.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_BYTES = 50 * 2**20


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    for word in name.lower().replace("-", " ").split():
        if any(c.isdigit() for c in word) and any(c.isalpha() for c in word):
            return word
    return name.lower().replace(" ", "_")


def env_info() -> dict:
    import triton

    info = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001 - a missing vLLM only drops the FA3 comparison
        info["vllm"] = f"unavailable: {e}"
    return info


def bench(fn, rep_ms: int = 60) -> float:
    """Median time of fn() in ms (L2 flushed before each call by do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=15, rep=rep_ms, return_mode="median")


def graph_of(fn, num_layers: int):
    """A replay function of a CUDA graph that runs fn(layer) for every layer once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: compiles and autotunes
        for layer in range(num_layers):
            fn(layer)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(num_layers):
            fn(layer)
    torch.cuda.synchronize()
    return graph.replay, graph


def time_per_layer(fn, num_layers: int) -> float:
    """Microseconds per layer of fn(layer), replayed from a CUDA graph."""
    replay, graph = graph_of(fn, num_layers)
    ms = bench(replay)
    del graph
    return 1e3 * ms / num_layers


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), 1 GiB buffers."""
    n = 2**30 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


class DecodeCase:
    """Per-layer caches of one (batch, context): shared buffer, FA3 and head-block views.

    pool:  [layers, num_blocks, PAGE, KV_HEADS, HEAD_DIM] (FA3's layout per layer);
    ours views layer l as [num_blocks * KV_HEADS, PAGE, HEAD_DIM].
    """

    def __init__(self, batch: int, context: int, gen: torch.Generator):
        self.batch, self.context = batch, context
        blocks_per_seq = math.ceil(context / PAGE)
        self.num_blocks = batch * blocks_per_seq
        layer_bytes = 2 * self.num_blocks * PAGE * KV_HEADS * HEAD_DIM * 2
        self.layers = max(1, min(32, math.ceil(4 * L2_BYTES / layer_bytes)))
        shape = (self.layers, self.num_blocks, PAGE, KV_HEADS, HEAD_DIM)
        self.k = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
        self.v = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
        self.q = torch.randn(batch, 1, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.out = torch.empty_like(self.q)
        perm = torch.randperm(self.num_blocks, device="cuda", generator=gen)
        self.fa3_table = perm.view(batch, blocks_per_seq).int()
        head_perm = torch.randperm(self.num_blocks * KV_HEADS, device="cuda", generator=gen)
        self.table = head_perm.view(batch, KV_HEADS, blocks_per_seq).int()

    def head_blocks(self, layer: int):
        return (self.k[layer].view(-1, PAGE, HEAD_DIM), self.v[layer].view(-1, PAGE, HEAD_DIM))

    def ours(self, lengths: torch.Tensor, **kw):
        """fn(layer) running our kernel with retained lengths [batch, KV_HEADS] (table cut to fit)."""
        from vllm_kvcompress.triton_kernels.decode_attention import decode_attention

        width = math.ceil(int(lengths.max()) / PAGE)
        table = self.table[:, :, :width]
        return lambda layer: decode_attention(self.q, *self.head_blocks(layer), table, lengths, out=self.out, **kw)

    def fa3(self, length: int, num_splits: int):
        """fn(layer) running vLLM's FA3 decode as vLLM calls it (AOT scheduler metadata)."""
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func, get_scheduler_metadata

        q = self.q.view(self.batch, Q_HEADS, HEAD_DIM)
        out = self.out.view_as(q)
        cu_q = torch.arange(self.batch + 1, device="cuda", dtype=torch.int32)
        seqused = torch.full((self.batch,), length, device="cuda", dtype=torch.int32)
        sched = get_scheduler_metadata(
            self.batch, 1, length, Q_HEADS, KV_HEADS, HEAD_DIM, seqused, qkv_dtype=DTYPE,
            cu_seqlens_q=cu_q, page_size=PAGE, causal=True, num_splits=num_splits,
        )
        table = self.fa3_table[:, : math.ceil(length / PAGE)]
        return lambda layer: flash_attn_varlen_func(
            q, self.k[layer], self.v[layer], max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=length,
            seqused_k=seqused, block_table=table, causal=True, out=out, scheduler_metadata=sched,
            num_splits=num_splits, fa_version=3,
        )

    def kv_bytes(self, tokens_per_head: float) -> float:
        return 2 * self.batch * KV_HEADS * tokens_per_head * HEAD_DIM * 2


def check_fa3_agrees(case: DecodeCase) -> float:
    """Relative difference of our output and FA3's on the same data (both must compute the same)."""
    from vllm_kvcompress.triton_kernels.decode_attention import decode_attention

    # FA3's layer 0 [blocks, PAGE, KV, D] as head-blocks [blocks * KV, PAGE, D]: id = block * KV + h.
    k_hb = case.k[0].transpose(1, 2).contiguous().view(-1, PAGE, HEAD_DIM)
    v_hb = case.v[0].transpose(1, 2).contiguous().view(-1, PAGE, HEAD_DIM)
    heads = torch.arange(KV_HEADS, device="cuda")[None, :, None]
    table = (case.fa3_table[:, None, :].long() * KV_HEADS + heads).int()
    lens = torch.full((case.batch, KV_HEADS), case.context, device="cuda", dtype=torch.int32)
    ours = decode_attention(case.q, k_hb, v_hb, table, lens).float()
    case.fa3(case.context, 0)(0)
    theirs = case.out.float()
    return ((ours - theirs).norm() / theirs.norm()).item()


def run_decode(grid, fa3_ok: bool, copy_bw: float, compressed_frac: float = 0.1) -> list[dict]:
    from vllm_kvcompress.triton_kernels.decode_attention import _config, default_num_splits

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for batch, context in grid:
        case = DecodeCase(batch, context, gen)
        full = torch.full((batch, KV_HEADS), context, device="cuda", dtype=torch.int32)
        t_ours = time_per_layer(case.ours(full), case.layers)
        splits = default_num_splits(batch * KV_HEADS, context, _config(HEAD_DIM, DTYPE)["BLOCK_N"], sms)
        rec = dict(kind="decode_attention", batch=batch, context=context, retained=context, layers=case.layers,
                   num_splits=splits, t_ours_us=t_ours)
        bytes_full = case.kv_bytes(context)
        rec["ours_bw_frac"] = bytes_full / (t_ours * 1e-6) / 1e9 / copy_bw
        if fa3_ok:
            # vLLM under full CUDA graphs passes num_splits=32 (its default cap); 0 = FA3's own heuristic.
            t_cg = time_per_layer(case.fa3(context, 32), case.layers)
            t_auto = time_per_layer(case.fa3(context, 0), case.layers)
            t_fa3 = min(t_cg, t_auto)
            rec.update(t_fa3_us=t_fa3, t_fa3_splits32_us=t_cg, t_fa3_auto_us=t_auto, vs_fa3=t_fa3 / t_ours,
                       fa3_bw_frac=bytes_full / (t_fa3 * 1e-6) / 1e9 / copy_bw)
        records.append(rec)

        # The compressed case: each head keeps compressed_frac of the tokens.
        kept = max(1, round(context * compressed_frac))
        lens = torch.full((batch, KV_HEADS), kept, device="cuda", dtype=torch.int32)
        t_c = time_per_layer(case.ours(lens), case.layers)
        # Heads with different budgets (uniform in [0.2, 1.8] x kept): the per-head layout's real load.
        var = (kept * (0.2 + 1.6 * torch.rand(batch, KV_HEADS, device="cuda", generator=gen))).int().clamp(min=1)
        t_v = time_per_layer(case.ours(var), case.layers)
        crec = dict(kind="decode_attention_compressed", batch=batch, context=context, retained=kept,
                    layers=case.layers, t_ours_us=t_c, t_ours_varlen_us=t_v,
                    ours_bw_frac=case.kv_bytes(kept) / (t_c * 1e-6) / 1e9 / copy_bw)
        if fa3_ok:
            crec.update(t_fa3_full_us=rec["t_fa3_us"], speedup_vs_fa3_full=rec["t_fa3_us"] / t_c,
                        speedup_varlen_vs_fa3_full=rec["t_fa3_us"] / t_v)
        records.append(crec)
        print(_row(rec), "|", _row(crec), flush=True)
        del case
        torch.cuda.empty_cache()
    return records


def _row(r: dict) -> str:
    s = f"{r['kind'][:16]:16s} B={r['batch']:4d} ctx={r['context']:6d} kept={r['retained']:6d} ours={r['t_ours_us']:8.1f}us"
    if "t_fa3_us" in r:
        s += f" fa3={r['t_fa3_us']:8.1f}us vs_fa3={r['vs_fa3']:.2f}"
    if "speedup_vs_fa3_full" in r:
        s += f" x{r['speedup_vs_fa3_full']:.2f} (varlen x{r['speedup_varlen_vs_fa3_full']:.2f})"
    return s + f" bw={r['ours_bw_frac']:.2f}"


def run_write_tokens(copy_bw: float) -> list[dict]:
    """write_tokens: a prefill write (16k tokens) and a decode append (256 tokens), 8 KV heads x 128."""
    from vllm_kvcompress.triton_kernels.write_tokens import write_tokens

    records = []
    for tokens in (256, 16384):
        key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        value = torch.randn_like(key)
        num_blocks = math.ceil(tokens * KV_HEADS / PAGE) * 2
        kc = torch.randn(num_blocks, PAGE, HEAD_DIM, device="cuda", dtype=DTYPE)
        vc = torch.randn_like(kc)
        slots = torch.randperm(num_blocks * PAGE, device="cuda")[: tokens * KV_HEADS].view(tokens, KV_HEADS)
        ms = bench(lambda: write_tokens(key, value, slots, kc, vc))
        moved = 2 * 2 * key.numel() * key.element_size() + slots.numel() * 8
        records.append(dict(kind="write_tokens", tokens=tokens, t_us=ms * 1e3,
                            bw_frac=moved / (ms * 1e-3) / 1e9 / copy_bw))
        print(f"write_tokens tokens={tokens:6d} {ms * 1e3:8.1f}us bw={records[-1]['bw_frac']:.2f}", flush=True)
    return records


TUNE_SHAPES = [(1, 32768), (4, 8192), (16, 4096), (64, 2048), (256, 1024), (32, 16384)]


def run_tuning(fa3_ok: bool, shapes=TUNE_SHAPES, warps=(4, 8), stages=(2, 3, 4)) -> list[dict]:
    """Sweep tile configs and split counts of our kernel on a few decode shapes (batch, context)."""
    import itertools

    gen = torch.Generator(device="cuda").manual_seed(1)
    configs = [dict(BLOCK_N=bn, num_warps=w, num_stages=st)
               for bn, w, st in itertools.product((32, 64, 128), warps, stages)]
    records = []
    for batch, context in shapes:
        case = DecodeCase(batch, context, gen)
        full = torch.full((batch, KV_HEADS), context, device="cuda", dtype=torch.int32)
        fa3 = time_per_layer(case.fa3(context, 0), case.layers) if fa3_ok else float("nan")
        best = (float("inf"), None, None)
        for cfg in configs:
            if cfg["BLOCK_N"] == 128 and cfg["num_stages"] == 4:
                continue  # exceeds shared memory at head_dim 128
            for splits in (1, 2, 4, 8, 16, 32, 64):
                if splits * cfg["BLOCK_N"] > context and splits > 1:
                    continue
                try:
                    t = time_per_layer(case.ours(full, num_splits=splits, config=cfg), case.layers)
                except Exception as e:  # noqa: BLE001 - an illegal config is skipped, not fatal
                    print("skip", cfg, splits, type(e).__name__, str(e)[:80])
                    continue
                records.append(dict(kind="tune_decode", batch=batch, context=context, num_splits=splits,
                                    t_ours_us=t, t_fa3_us=fa3, **cfg))
                if t < best[0]:
                    best = (t, cfg, splits)
        print(f"tune B={batch:4d} ctx={context:6d} fa3={fa3:7.1f}us best={best[0]:7.1f}us {best[1]} splits={best[2]}",
              flush=True)
        del case
        torch.cuda.empty_cache()
    return records


def cache_ops_records(device: str) -> list[dict]:
    """Records of the other kernel benchmarks (benchmarks/bench_cache_ops.py), when present."""
    if not (HERE / "bench_cache_ops.py").exists():
        return []
    sys.path.insert(0, str(HERE))
    try:
        import bench_cache_ops

        rows = bench_cache_ops.run_all(device)
    except Exception as e:  # noqa: BLE001 - their failure must not lose the decode results
        print("bench_cache_ops failed:", type(e).__name__, e, flush=True)
        return [dict(kind="cache_ops_error", error=f"{type(e).__name__}: {e}")]
    for row in rows:
        row.setdefault("kind", row.get("op", "cache_ops"))
        row["source"] = "bench_cache_ops"
    return rows


def inspect_kernels(out_dir: Path) -> dict:
    """Registers, spills and shared memory of our compiled decode kernels; their TTGIR to out_dir
    (to check that the K/V gathers became pipelined async copies)."""
    from vllm_kvcompress.triton_kernels import decode_attention as mod

    info, dumps = {}, []
    for fn in (mod._decode_attention_kernel, mod._merge_splits_kernel):
        for dev_cache in fn.device_caches.values():
            for i, kernel in enumerate(dev_cache[0].values()):
                name = f"{fn.__name__}_{i}"
                ttgir = kernel.asm.get("ttgir", "")
                dumps.append(f"// ===== {name}\n{ttgir}")
                info[name] = dict(n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared=kernel.metadata.shared,
                                  async_copies=ttgir.count("async_copy_global_to_local"),
                                  num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)
                print(name, info[name], flush=True)
    (out_dir / "kernels-ttgir.txt").write_text("\n".join(dumps))
    return info


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in result["records"] if r["kind"] == "decode_attention" and "vs_fa3" in r]
    comp = [r for r in result["records"] if r["kind"] == "decode_attention_compressed" and "speedup_vs_fa3_full" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, recs, key, title in (
        (axes[0], dec, "vs_fa3", "equal retained length: our speed / FA3's"),
        (axes[1], comp, "speedup_vs_fa3_full", "ours at 10% of tokens vs FA3 at full length"),
    ):
        for batch in sorted({r["batch"] for r in recs}):
            pts = sorted((r["context"], r[key]) for r in recs if r["batch"] == batch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per request)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("speed ratio (>1: ours faster)")
    fig.suptitle(f"decode attention, Llama-3-8B shapes, bf16 -- {result['env']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print("wrote", png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid")
    ap.add_argument("--tune", action="store_true", help="also sweep tile configs and split counts")
    ap.add_argument("--tune-shapes", help="BxC,BxC,... shapes for --tune (default: a fixed set)")
    ap.add_argument("--tune-small", action="store_true", help="--tune with 4 warps and 2-3 stages only")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode grid")
    ap.add_argument("--no-cache-ops", action="store_true", help="skip benchmarks/bench_cache_ops.py")
    ap.add_argument("--inspect", action="store_true", help="dump compiled-kernel facts (regs, spills, TTGIR)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and PNG")
    ap.add_argument("--plot", type=Path, help="only make the PNG of this JSON (no GPU needed)")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return

    env = env_info()
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable:", e)
        FA3_AVAILABLE = False
    copy_bw = copy_bandwidth()
    env["copy_bw_GBs"] = copy_bw
    print(f"{env['device']}: device-to-device copy {copy_bw:.0f} GB/s; FA3 {'on' if FA3_AVAILABLE else 'off'}", flush=True)

    records = []
    if FA3_AVAILABLE:
        case = DecodeCase(3, 1000, torch.Generator(device="cuda").manual_seed(2))
        env["ours_vs_fa3_output_rel_diff"] = check_fa3_agrees(case)
        print("ours vs FA3 output rel. diff:", env["ours_vs_fa3_output_rel_diff"], flush=True)
        del case
    if args.tune:
        shapes = TUNE_SHAPES
        if args.tune_shapes:
            shapes = [tuple(int(x) for x in s.split("x")) for s in args.tune_shapes.split(",")]
        kw = dict(warps=(4,), stages=(2, 3)) if args.tune_small else {}
        records += run_tuning(FA3_AVAILABLE, shapes, **kw)
    if not args.no_decode:
        batches = (1, 16, 64, 256) if args.quick else (1, 4, 16, 64, 128, 256)
        contexts = (1024, 8192, 32768) if args.quick else (1024, 4096, 16384, 32768)
        # Both caches share one buffer: 8 KB per token per layer; stay under ~34 GB of cache.
        grid = [(b, c) for b in batches for c in contexts if b * c <= 256 * 32768]
        records += run_decode(grid, FA3_AVAILABLE, copy_bw)
    records += run_write_tokens(copy_bw)
    if not args.no_cache_ops:
        records += cache_ops_records("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.inspect:
        env["compiled"] = inspect_kernels(args.out)

    result = {"env": env, "records": records}
    path = args.out / f"kernels-{device_slug(env['device'])}.json"
    path.write_text(json.dumps(result, indent=1))
    print("wrote", path)
    try:
        if any(r["kind"] == "decode_attention" for r in records):
            plot(result, path.with_suffix(".png"))
    except ImportError as e:
        print("no PNG (matplotlib missing):", e)

    print("\n== decode attention, Llama-3-8B shapes, bf16 (times per layer) ==")
    for r in records:
        if r["kind"].startswith("decode_attention"):
            print(_row(r))


if __name__ == "__main__":
    main()
