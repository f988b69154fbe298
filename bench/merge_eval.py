#!/usr/bin/env python3
"""Merges `kv-distill eval` results.json files of one task (e.g. the
baselines' run and an adaptor's run, made side by side on one GPU) into one
JSON, and prints Markdown tables: F1 (with its standard error where per-item
results exist), containment and the share of answer tokens kept.

    bench/merge_eval.py OUT.json LABEL=results.json [LABEL=results.json ...]

A row's method is prefixed with its run's LABEL when several runs have the
method (kv_distill of two adaptors); `full` is taken from the first run.
Standard library only.
"""
import json
import math
import sys


def main():
    out, specs = sys.argv[1], sys.argv[2:]
    runs = []
    for spec in specs:
        label, path = spec.split("=", 1)
        with open(path) as f:
            runs.append((label, json.load(f)))
    counts = {}
    for _, r in runs:
        for row in r["rows"]:
            if row["method"] != "full":
                counts[row["method"]] = counts.get(row["method"], 0) + 1

    def name(label, method):
        return f"{label}:{method}" if counts.get(method, 0) > 1 else method

    merged = {"runs": [], "rows": [], "items": [], "needle": []}
    seen_full = False
    for k, (label, r) in enumerate(runs):
        merged["runs"].append(
            {"label": label, "dataset": r["dataset"], "adaptor": r.get("adaptor"),
             "config": r["config"], "seconds": r["seconds"]})
        if not merged["needle"] and r.get("needle"):
            merged["needle"] = r["needle"]
        for row in r["rows"]:
            if row["method"] == "full":
                if seen_full:
                    continue
                seen_full = True
            row = dict(row, method=name(label, row["method"]) if row["method"] != "full" else "full")
            merged["rows"].append(row)
        for it in r.get("items", []):
            if it["method"] == "full" and k > 0:
                continue
            m = name(label, it["method"]) if it["method"] != "full" else "full"
            merged["items"].append(dict(it, method=m))
    # Standard errors of F1 from per-item results.
    per = {}
    for it in merged["items"]:
        per.setdefault((it["method"], it["ratio"]), []).append(it["f1"])
    for row in merged["rows"]:
        v = per.get((row["method"], row["ratio"]))
        if v and len(v) > 1:
            m = sum(v) / len(v)
            var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
            row["f1_se"] = math.sqrt(var / len(v))
    with open(out, "w") as f:
        # Compact: the per-item rows make these files megabytes, and the
        # repository travels to the device machine beside the model's parts.
        json.dump(merged, f, separators=(",", ":"))

    ratios = sorted({row["ratio"] for row in merged["rows"]}, reverse=True)
    methods = []
    for row in merged["rows"]:
        if row["method"] not in methods:
            methods.append(row["method"])

    def table(title, cell):
        print(f"**{title}**\n")
        print("| method | " + " | ".join(f"r = {r}" for r in ratios) + " |")
        print("|---|" + "---|" * len(ratios))
        for m in methods:
            cells = []
            for r in ratios:
                row = next((x for x in merged["rows"] if x["method"] == m and x["ratio"] == r), None)
                cells.append(cell(row) if row else "")
            print(f"| {m} | " + " | ".join(cells) + " |")
        print()

    table("F1 (%)", lambda x: f"{x['f1']:.1f}" + (f" ± {x['f1_se']:.1f}" if "f1_se" in x else ""))
    table("Containment (%)", lambda x: f"{x.get('contains', 0):.1f}")
    table("Answer tokens kept (%)",
          lambda x: "-" if x.get("answer_kept") is None else f"{100 * x['answer_kept']:.1f}")
    table("KL(teacher || method) on the answer", lambda x: f"{x['kl']:.3f}")
    paired(merged, ratios, methods)


# Question-aware methods and oracles are references, not competitors.
def is_competitor(method):
    base = method.split(":")[-1]
    return not (base.startswith("kv_distill") or base.endswith("+answer")
                or base.endswith("_question") or method == "full")


def paired(merged, ratios, methods):
    """Each adaptor method's F1 minus each question-agnostic baseline's on the
    same questions, with the standard error of the mean paired difference
    (the acceptance's "more than two standard errors")."""
    f1 = {}
    for it in merged["items"]:
        f1.setdefault((it["method"], it["ratio"]), {})[it["id"]] = it["f1"]
    ours = [m for m in methods if m.split(":")[-1].startswith("kv_distill")
            and not m.endswith("+answer")]
    rivals = [m for m in methods if is_competitor(m)]
    lines = []
    for m in ours:
        for r in ratios:
            a = f1.get((m, r))
            if not a:
                continue
            cells = []
            for b_name in rivals:
                b = f1.get((b_name, r))
                ids = sorted(set(a) & set(b or {}))
                if len(ids) < 2:
                    continue
                d = [a[i] - b[i] for i in ids]
                mean = sum(d) / len(d)
                se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
                z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
                cells.append((z, f"{b_name} {mean:+.1f} ± {se:.1f} ({z:+.1f} SE)"))
            if cells:
                worst = min(cells)[1]
                lines.append(f"| {m} | {r} | {worst} | {len(cells)} |")
    if lines:
        print("**F1 minus the closest question-agnostic baseline, paired over the same questions**\n")
        print("| method | r | closest baseline: difference ± SE (in SE) | baselines compared |")
        print("|---|---|---|---|")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()
