#!/usr/bin/env python3
"""Share of real (unpadded) context positions when the prepared training data
(`kvd-data prepare`: train/qa, train/synth, train/text, weights 2,2,1) is cut
into batches, with and without ordering by length (`train --bucket-by-length`),
and cut by a budget of padded positions (`train --micro-batch-tokens`): the
share of real positions and the micro-batches per step.
Lengths are estimated as characters / 4 + 20 tokens, capped at 1,024.

    bench/padding.py [DATA_DIR]   # default $KVD_CACHE/data

Needs pyarrow (the setup venv has it).
"""
import glob
import os
import random
import sys

import pyarrow.parquet as pq


def lengths(base, name):
    out = []
    for f in sorted(glob.glob(f"{base}/train/{name}/*.parquet")):
        t = pq.read_table(f).to_pydict()
        contexts = t.get("context") or t["text"]  # text rows: one window of the document
        questions = t.get("question") or [""] * len(contexts)
        for c, q in zip(contexts, questions):
            out.append(min(1024, (len(c) + len(q or "")) // 4 + 20))
    return out


def efficiency(batches):
    real = sum(sum(b) for b in batches)
    padded = sum(max(b) * len(b) for b in batches)
    return real / padded


def by_tokens(step, max_examples, budget):
    """The micro-batches of `train_loop::split_by_tokens` (lengths only)."""
    out = []
    for n in sorted(step):
        if out and len(out[-1]) < max_examples and (len(out[-1]) + 1) * max(n, max(out[-1])) <= budget:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.environ.get("KVD_CACHE", os.path.expanduser("~/.cache/kv-distill")), "data")
    qa, synth, text = lengths(base, "qa"), lengths(base, "synth"), lengths(base, "text")
    rng = random.Random(0)
    pools = [qa, qa, text, synth, synth]
    ex = [rng.choice(rng.choice(pools)) for _ in range(64 * 1000)]
    for glob_b, micro in [(32, 32), (64, 16), (64, 8)]:
        steps = [ex[i:i + glob_b] for i in range(0, len(ex), glob_b)]
        plain = [s[j:j + micro] for s in steps for j in range(0, glob_b, micro)]
        ordered = [sorted(s)[j:j + micro] for s in steps for j in range(0, glob_b, micro)]
        print(f"global {glob_b} micro {micro}: real/padded {efficiency(plain):.3f}, "
              f"--bucket-by-length {efficiency(ordered):.3f}, "
              f"micro-batches per step {len(plain) / len(steps):.2f}")
    for glob_b, cap, budget in [(64, 64, 8 * 1024), (64, 64, 16 * 1024), (64, 64, 32 * 1024)]:
        steps = [ex[i:i + glob_b] for i in range(0, len(ex), glob_b)]
        packed = [mb for s in steps for mb in by_tokens(s, cap, budget)]
        print(f"global {glob_b} --micro-batch {cap} --micro-batch-tokens {budget}: "
              f"real/padded {efficiency(packed):.3f}, "
              f"micro-batches per step {len(packed) / len(steps):.2f}")


if __name__ == "__main__":
    main()
