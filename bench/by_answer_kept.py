#!/usr/bin/env python3
"""Per-item results of `kv-distill eval --per-item` grouped by how much of the
answer's context tokens a method kept: none, part, all. For each group and
method: items, F1, containment and the answer's NLL, beside the uncompressed
model (`full`) on the same items.

The question it answers: when the answer's tokens were all dropped, does a
method still find the answer (its content carried into the kept tokens, as
KV-Distill's adaptors on K and V at every position are meant to do)? Compare
`kv_distill` with `kv_distill_select` (the same selection read by the frozen
model) in the "none" group.

    bench/by_answer_kept.py results.json [RATIO]

Standard library only.
"""
import json
import sys


def group(kept):
    if kept is None:
        return None
    if kept <= 0.0:
        return "none"
    if kept >= 1.0:
        return "all"
    return "part"


def main():
    path = sys.argv[1]
    ratio = float(sys.argv[2]) if len(sys.argv) > 2 else None
    with open(path) as f:
        report = json.load(f)
    items = report.get("items") or []
    if not items:
        sys.exit(f"{path}: no per-item results (run eval with --per-item)")
    full = {it["id"]: it for it in items if it["method"] == "full"}
    ratios = sorted({it["ratio"] for it in items if it["method"] != "full"}, reverse=True)
    if ratio is not None:
        ratios = [r for r in ratios if abs(r - ratio) < 1e-9]
    methods = [m for m in dict.fromkeys(it["method"] for it in items) if m != "full"]
    print(f"{path}: {len(full)} questions\n")
    for r in ratios:
        print(f"r = {r}\n")
        print("| method | answer kept | items | F1 | containment % | answer NLL | full on them: F1 / NLL |")
        print("|---|---|---|---|---|---|---|")
        for m in methods:
            rows = [it for it in items if it["method"] == m and abs(it["ratio"] - r) < 1e-9]
            for g in ("none", "part", "all"):
                sel = [it for it in rows if group(it.get("answer_kept")) == g]
                if not sel:
                    continue
                n = len(sel)
                f1 = sum(it["f1"] for it in sel) / n
                con = 100.0 * sum(bool(it["contains"]) for it in sel) / n
                nll = sum(it["answer_nll"] for it in sel) / n
                ref = [full[it["id"]] for it in sel if it["id"] in full]
                ref_txt = ""
                if ref:
                    ref_txt = "{:.1f} / {:.3f}".format(
                        sum(x["f1"] for x in ref) / len(ref),
                        sum(x["answer_nll"] for x in ref) / len(ref))
                print(f"| {m} | {g} | {n} | {f1:.1f} | {con:.1f} | {nll:.3f} | {ref_txt} |")
        print()


if __name__ == "__main__":
    main()
