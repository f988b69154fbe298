#!/usr/bin/env python3
"""Markdown tables of a bench/gpu_job.sh run: the step benchmark per method and
shape (tokens/s, memory, phases), each job setting (median step, examples/s,
tokens/s, share of the step benchmark's tokens/s at the median shape) and its
phase split.

    bench/summarize_job.py DIR    # DIR: job.tgz unpacked

Standard library only.
"""
import glob
import json
import os
import statistics
import sys


def log_fields(path, message):
    out = []
    with open(path) as f:
        for line in f:
            try:
                v = json.loads(line)
            except json.JSONDecodeError:
                continue
            if v.get("fields", {}).get("message") == message:
                out.append(v["fields"])
    return out


def phase_text(phases):
    return ", ".join(f"{k} {v * 1000:.0f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]) if v > 0)


def main():
    d = sys.argv[1]
    benches = [json.loads(l) for l in open(os.path.join(d, "bench.jsonl")) if l.strip()]
    print("| method | model | span + suffix x batch | recompute / graphs | median step | tokens/s | device memory | operators | phases (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference_tps = None
    def split_text(b):
        if b.get("micro_batches", 1) <= 1:
            return ""
        # Lines written before --launch-threads was removed may name threads.
        threads = b.get("launch_threads", 1)
        return f" {b['micro_batches']} micro-batches" + (f" x {threads} threads" if threads > 1 else "")

    for b in benches:
        ph = b.get("phases_s") or {}
        model = "narrow" if "narrow" in b.get("model", "") else ""
        ops = b.get("ops") or {}
        op_text = (
            f"{ops['top_level']:,} + {ops['backward_ops']:,} in {ops['backward']:,} backward nodes" if ops else ""
        )
        print(
            f"| {b.get('method', 'reference')} | {model} | {b['span']} + {b['suffix']} x {b['batch']} | "
            f"{'recompute' if b.get('recompute_encoder') else ''}{' graphs' if b.get('cuda_graphs') else ''}{split_text(b)} | {b['median_s']:.3f} s | "
            f"{b['tokens_per_s']:,.0f} | {b['device_memory_gib']:.1f} GiB | {op_text} | {phase_text(ph)} |"
        )
        if b.get("method") == "train" and not ph and not model and b["batch"] == 64 and reference_tps is None:
            reference_tps = b["tokens_per_s"]
    names = {}
    if os.path.exists(os.path.join(d, "jobs.txt")):
        for line in open(os.path.join(d, "jobs.txt")):
            n, flags = line.split(":", 1)
            names[n.split()[1]] = flags.strip()
    print()
    print("| job | median step | examples/s | total tokens/s | supervised tokens/s | of bench-step --method train | phases (ms per step) |")
    print("|---|---|---|---|---|---|---|")
    for log in sorted(glob.glob(os.path.join(d, "job-*.log"))):
        n = os.path.basename(log)[4:-4]
        if n.endswith("-phases"):
            continue
        steps = log_fields(log, "step")
        if len(steps) < 2:
            print(f"| {names.get(n, n)} | failed or too short ({len(steps)} logged steps) | | | | | |")
            continue
        median = statistics.median(s["seconds"] for s in steps[1:])
        started = log_fields(log, "training")
        batch = json.loads(started[0]["job"])["global_batch"] if started else 64
        last = steps[-1]
        share = f"{last['total_tok_per_s'] / reference_tps:.0%}" if reference_tps else ""
        ph_path = os.path.join(d, f"job-{n}-phases.log")
        ph = {}
        if os.path.exists(ph_path):
            rows = [json.loads(p["phases_s"]) for p in log_fields(ph_path, "step phases")[1:]]
            for r in rows:
                for k, v in r.items():
                    ph[k] = ph.get(k, 0.0) + v / len(rows)
        print(
            f"| `{names.get(n, n)}` | {median:.3f} s | {batch / median:.0f} | {last['total_tok_per_s']:,.0f} | "
            f"{last['tok_per_s']:,.0f} | {share} | {phase_text(ph)} |"
        )


if __name__ == "__main__":
    main()
