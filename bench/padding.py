#!/usr/bin/env python3
"""Share of real (unpadded) context positions when the prepared training data
(`kvd-data prepare`: train/qa, train/synth, train/text, weights 2,2,1) is cut
into batches, with and without ordering by length (`train --bucket-by-length`).
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
              f"--bucket-by-length {efficiency(ordered):.3f}")


if __name__ == "__main__":
    main()
