"""The throughput benchmark's results: records keyed by (model, workload, configuration), their
ratios to plain vLLM, the table on stdout and the PNG next to the JSON (``throughput.py --plot JSON``
redraws both)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_workloads import PLAIN  # noqa: E402

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h")


def record_key(r: dict) -> tuple:
    return (r["model"], r["workload"], r["config"])


def add_ratios(records: list[dict]) -> None:
    """output_tok_s_ratio = output tok/s / plain vLLM's, same model, workload and settings."""
    plain = {(r["model"], r["workload"], json.dumps(r["settings"], sort_keys=True)): r
             for r in records if r["config"] == PLAIN and r.get("output_tok_s")}
    for r in records:
        ref = plain.get((r["model"], r["workload"], json.dumps(r["settings"], sort_keys=True)))
        if ref is None or not r.get("output_tok_s"):
            r["output_tok_s_ratio"], r["ratio_reference"] = None, None
            continue
        r["output_tok_s_ratio"] = round(r["output_tok_s"] / ref["output_tok_s"], 4)
        r["ratio_reference"] = f"{PLAIN} run of {ref['date']} ({ref['status']})"
        if ref.get("peak_concurrency"):
            r["peak_concurrency_ratio"] = round(r["peak_concurrency"] / ref["peak_concurrency"], 3)


def series(record: dict) -> str:
    """A record's line in the plot: its policy, ``+graphs`` when it ran with the plugin's decode graphs."""
    return record["policy"] + ("+graphs" if (record.get("compression") or {}).get("cuda_graphs") else "")


def print_table(records: list[dict]) -> None:
    def f(value, fmt="{:.0f}"):
        return "-" if value is None else fmt.format(value)

    def pct(r, key, p):
        return f((r.get(key) or {}).get(p), "{:.0f}")

    header = (f"{'model':<12} {'wl':<3} {'config':<16} {'budget':>7} {'kept':>6} {'out tok/s':>10} {'ratio':>6} "
              f"{'tot tok/s':>10} {'peak':>5} {'preem':>5} {'kv%':>5} {'TTFT p50/p99 ms':>17} "
              f"{'TPOT p50/p99 ms':>16} {'wall s':>7}  status")
    print("\n" + header)
    print("-" * len(header))
    for r in sorted(records, key=lambda r: (r["model"], r["workload"], r["config"] != PLAIN, r["config"])):
        print(f"{r['model']:<12} {r['workload']:<3} {r['config']:<16} {f(r.get('budget_fraction'), '{:.3f}'):>7} "
              f"{f(r.get('retained_fraction'), '{:.3f}'):>6} {f(r.get('output_tok_s'), '{:.1f}'):>10} "
              f"{f(r.get('output_tok_s_ratio'), '{:.2f}'):>6} {f(r.get('total_tok_s'), '{:.1f}'):>10} "
              f"{f(r.get('peak_concurrency')):>5} {f(r.get('preemptions')):>5} "
              f"{f(None if r.get('kv_usage_peak') is None else 100 * r['kv_usage_peak']):>5} "
              f"{pct(r, 'ttft_ms', 'p50') + '/' + pct(r, 'ttft_ms', 'p99'):>17} "
              f"{pct(r, 'tpot_ms', 'p50') + '/' + pct(r, 'tpot_ms', 'p99'):>16} {f(r.get('wall_s'), '{:.1f}'):>7}  "
              f"{r['status']}")


def plot(data: dict, path: Path) -> None:
    """Per (model, workload) panel: output tok/s ratio vs budget fraction per policy (top) and peak
    concurrently running requests (bottom); plain vLLM dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in data["records"] if r.get("output_tok_s")]
    panels = sorted({(r["model"], r["workload"]) for r in records})
    if not panels:
        return
    policies = sorted({series(r) for r in records if r["policy"] != "none"})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7), squeeze=False)
    colors = plt.get_cmap("tab10")
    for col, (model, workload) in enumerate(panels):
        group = [r for r in records if (r["model"], r["workload"]) == (model, workload)]
        plain = [r for r in group if r["config"] == PLAIN]
        for row, (key, label) in enumerate((("output_tok_s_ratio", "output tok/s / plain vLLM"),
                                            ("peak_concurrency", "peak running requests"))):
            ax = axes[row][col]
            if plain and plain[0].get(key) is not None:
                ax.axhline(plain[0][key], color="black", linestyle="--", linewidth=1, label="plain vLLM")
            for i, policy in enumerate(policies):
                points = sorted((r["budget_fraction"], r[key]) for r in group
                                if series(r) == policy and r.get(key) is not None)
                if points:
                    ax.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)], color=colors(i % 10), label=policy)
                partial = [(r["budget_fraction"], r[key]) for r in group
                           if series(r) == policy and r.get(key) is not None and r["status"] != "ok"]
                if partial:
                    ax.scatter(*zip(*partial), facecolors="none", edgecolors="red", s=120, zorder=5,
                               label="partial (timeout)" if i == 0 else None)
            ax.set_xscale("log")
            ticks = sorted({r["budget_fraction"] for r in group} | {1.0})
            ax.minorticks_off()
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:.0%}" if t >= 0.01 else f"{t:.1%}" for t in ticks], fontsize=8)
            ax.set_ylim(bottom=0, top=max([r.get(key) or 0 for r in group] + [1.0]) * 1.15)
            ax.set_xlabel("KV budget (fraction of the prompt)")
            ax.set_ylabel(label)
            if row == 0:
                wl = group[0]
                pool = wl.get("settings", {}).get("kv_pool_tokens")
                ax.set_title(f"{model}, workload {workload}\n{wl['prompt_len']} prompt / {wl['output_len']} output, "
                             f"{wl['requests']} requests" + (f", KV pool {pool:,} tokens" if pool else ""), fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    meta = data["meta"]
    fixed = any(r.get("settings", {}).get("kv_pool_tokens") for r in data["records"])
    memory = ("same KV pool bytes for both (per panel)" if fixed
              else f"gpu_memory_utilization {meta['settings']['gpu_memory_utilization']}")
    fig.suptitle(f"vllm-kvcompress vs plain vLLM {meta['versions'].get('vllm')}, {meta['device']}, {memory}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
