"""Tables from bench/gpu_distributed.sh's output directory (Markdown on stdout)
and results.json beside the logs.

    python bench/summarize_distributed.py OUT GPUS
"""
import json
import struct
import sys
from datetime import datetime
from pathlib import Path


def events(path):
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        f = e.get("fields", {})
        f["_t"] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        yield f


def steps(path, rank=0):
    return [e for e in events(path) if e.get("message") == "step" and e.get("rank") == rank]


def throughput(path, gb, skip=10):
    s = steps(path)
    s = [e for e in s if e["step"] > skip]
    if len(s) < 2:
        return None
    dt = s[-1]["_t"] - s[0]["_t"]
    n = len(s) - 1
    tokens = sum(e["tokens"] for e in s[1:])
    return {"steps_timed": n, "seconds_per_step": dt / n, "examples_per_s": gb * n / dt,
            "supervised_tokens_per_s": tokens / dt}


def split(path, skip=10):
    """Per rank, the mean seconds per step of each part of the step (workers
    log data_s, compute_s, comm_s, report_s beside the step's seconds)."""
    by = {}
    for e in events(path):
        if e.get("message") == "step" and e.get("step", 0) > skip and "compute_s" in e:
            by.setdefault(e["rank"], []).append(e)
    keys = ("data_s", "compute_s", "comm_s", "report_s", "seconds")
    return {r: {k: sum(e[k] for e in es) / len(es) for k in keys} for r, es in sorted(by.items())}


def print_split(label, sp):
    if not sp:
        return
    print(f"\nTime split of {label}, mean ms per step over steps 11+ (compute: own forward and backward, "
          "device drained; comm: the all-reduce, waiting for the slowest rank included):\n")
    print("| rank | data wait | compute | comm | report | step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, m in sp.items():
        print(f"| {r} | {m['data_s']*1e3:.1f} | {m['compute_s']*1e3:.1f} | {m['comm_s']*1e3:.1f} | "
              f"{m['report_s']*1e3:.1f} | {m['seconds']*1e3:.1f} |")


def tensors(path):
    b = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = struct.unpack(f"<{(e - s) // 4}f", b[8 + n + s:8 + n + e])
    return out


def main():
    out, gpus = Path(sys.argv[1]), int(sys.argv[2])
    res = {"gpus": gpus}
    if (out / "allreduce_torch.jsonl").exists() and (out / "allreduce_rust.jsonl").exists():
        ref = [json.loads(l) for l in (out / "allreduce_torch.jsonl").read_text().splitlines() if l]
        rust = [json.loads(l) for l in (out / "allreduce_rust.jsonl").read_text().splitlines() if l]
        res["allreduce"] = {"torch": ref, "rust": rust}
        print(f"### All-reduce, {gpus} GPUs, float32 sum in place (20 iterations after 5 warm-up)\n")
        print("| buffer | torch.distributed (NCCL) | Rust worker (cudarc NCCL) | Rust / torch |")
        print("| --- | --- | --- | --- |")
        by = {r["elems"]: r for r in ref}
        for r in rust:
            if r["case"] != "flat":
                continue
            t = by.get(r["elems"])
            mb = r["bytes"] / 2**20
            if t:
                print(f"| {mb:.0f} MiB | {t['bus_gb_s']:.1f} GB/s ({t['seconds']*1e6:.0f} us) | "
                      f"{r['bus_gb_s']:.1f} GB/s ({r['seconds']*1e6:.0f} us) | {r['bus_gb_s']/t['bus_gb_s']:.1%} |")
        for r in rust:
            if r["case"] == "adaptor_gradients":
                t = min(ref, key=lambda x: abs(x["elems"] - r["elems"]))
                print(f"\nAdaptor gradients ({r['tensors']} tensors, {r['bytes']/2**20:.2f} MiB, bucketed, "
                      f"packing and unpacking included): {r['seconds']*1e6:.0f} us, bus {r['bus_gb_s']:.1f} GB/s; "
                      f"torch's flat all-reduce of the nearest size ({t['bytes']/2**20:.0f} MiB): {t['seconds']*1e6:.0f} us.")
    runs = {}
    for log in sorted(out.glob("scale*.log")):
        name = log.stem[len("scale"):]
        n, _, tag = name.partition("_")
        runs.setdefault(tag, {})[int(n)] = throughput(log, 32 * int(n))
    res["scaling"] = {}
    for tag, by_n in runs.items():
        one = by_n.get(1)
        label = tag or "qa"
        print(f"\n### Step throughput ({label} data), SmolLM2-135M bf16, 32 examples per GPU per step, max length 1024\n")
        print("| GPUs | s/step | examples/s | supervised tokens/s | scaling efficiency |")
        print("| --- | --- | --- | --- | --- |")
        for n, r in sorted(by_n.items()):
            if not r:
                continue
            eff = r["examples_per_s"] / (n * one["examples_per_s"]) if one else None
            r["efficiency"] = eff
            print(f"| {n} | {r['seconds_per_step']:.3f} | {r['examples_per_s']:.1f} | "
                  f"{r['supervised_tokens_per_s']:.0f} | {eff:.1%} |")
        res["scaling"][label] = by_n
        for n in sorted(by_n):
            sp = split(out / f"scale{n}{'_' + tag if tag else ''}.log")
            if by_n[n]:
                by_n[n]["split"] = sp
            print_split(f"{n} GPU(s), {label}", sp)
    loads = sorted(out.glob("load*.log"))
    if loads:
        print("\n### One GPU beside busy CPU processes (uniform data, same call)\n")
        print("| busy processes | pinned to CPUs | s/step | examples/s |")
        print("| --- | --- | --- | --- |")
        res["hostload"] = []
        for log in loads:
            busy, _, rest = log.stem[len("load"):].partition("_")
            pin = rest.partition("_")[2] or "-"
            r = throughput(log, 32)
            if r:
                r.update(busy=int(busy), pin=pin, split=split(log))
                res["hostload"].append(r)
                print(f"| {busy} | {pin} | {r['seconds_per_step']:.3f} | {r['examples_per_s']:.1f} |")
        for r in res["hostload"]:
            print_split(f"{r['busy']} busy, pinned {r['pin']}", r["split"])
    if not (out / "recovery.log").exists():
        (out / "results.json").write_text(json.dumps(res, indent=1))
        return
    rec = list(events(out / "recovery.log"))
    kill = next((e for e in rec if "chaos" in str(e.get("message", ""))), None)
    if kill:
        dead = next((e for e in rec if "declared dead" in str(e.get("message", "")) and e["_t"] >= kill["_t"]), None)
        resumed = [e for e in rec if e.get("message") == "resumed from checkpoint" and e["_t"] >= kill["_t"]]
        after = [e for e in rec if e.get("message") == "step" and e.get("rank") == 0 and e["_t"] > kill["_t"]
                 and resumed and e["_t"] > resumed[0]["_t"]]
        r = {"killed_at_step": kill.get("step"),
             "detected_s": dead["_t"] - kill["_t"] if dead else None,
             "resumed_from": resumed[0].get("url") if resumed else None,
             "first_step_after_s": after[0]["_t"] - kill["_t"] if after else None,
             "finished": (out / "adaptor-recovery.safetensors").exists()}
        a, b = out / "adaptor-recovery.safetensors", out / f"adaptor-scale{gpus}.safetensors"
        if a.exists() and b.exists():
            ta, tb = tensors(a), tensors(b)
            r["max_abs_diff_vs_uninterrupted"] = max(
                max(abs(x - y) for x, y in zip(ta[k], tb[k])) for k in ta)
        res["recovery"] = r
        print(f"\n### kill -9 of rank 1 at step {r['killed_at_step']} ({gpus} GPUs, heartbeat timeout 5 s)\n")
        for k, v in r.items():
            print(f"- {k}: {v}")
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
