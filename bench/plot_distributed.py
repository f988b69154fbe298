"""Plots for docs/BENCHMARKS.md from docs/results/distributed/*.json(l):
all-reduce bus bandwidth (torch.distributed vs the Rust worker, 2 and 4
H200s) and step-throughput scaling. Needs matplotlib.

    python bench/plot_distributed.py docs/results/distributed
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def jsonl(p):
    return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]


def main():
    d = Path(sys.argv[1])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for gpus, style in [(2, "-"), (4, "--")]:
        for who, color in [("torch", "tab:blue"), ("rust", "tab:orange")]:
            rows = [r for r in jsonl(d / f"allreduce_{who}_{gpus}gpu.jsonl") if r["case"] == "flat"]
            label = {"torch": "torch.distributed", "rust": "Rust worker"}[who]
            ax1.plot([r["bytes"] / 2**20 for r in rows], [r["bus_gb_s"] for r in rows], style,
                     color=color, marker="o", label=f"{label}, {gpus} GPUs")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("buffer (MiB, float32)")
    ax1.set_ylabel("bus bandwidth (GB/s)")
    ax1.set_title("NCCL all-reduce on H200s (NVLink)")
    ax1.legend(fontsize=8)
    res = json.loads((d / "results_4gpu.json").read_text())["scaling"]
    for label, color in [("uniform", "tab:green"), ("qa", "tab:purple")]:
        runs = res.get(label, {})
        ns = sorted(int(n) for n in runs if runs[n])
        ax2.plot(ns, [runs[str(n)]["efficiency"] * 100 for n in ns], marker="o", color=color,
                 label=f"{label} data")
    ax2.axhline(95, color="gray", ls=":", label="target 95%")
    ax2.set_ylim(70, 105)
    ax2.set_xticks([1, 2, 4])
    ax2.set_xlabel("GPUs (32 examples each per step)")
    ax2.set_ylabel("scaling efficiency (%)")
    ax2.set_title("SmolLM2-135M KV-Distill step, bf16")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "distributed.png", dpi=110)


if __name__ == "__main__":
    main()
