"""Oracle: the PyTorch reference of the KV-Distill training step.

Runs bench/kvdistill_ref.py (the reference itself, shared with the benchmarks)
with the given arguments: `--make-tiny DIR` writes a tiny random Llama
checkpoint; `--model DIR --dump DUMP --steps N` prints the losses as one JSON line.
"""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "bench", "kvdistill_ref.py")

sys.argv = [REF] + sys.argv[1:]
runpy.run_path(REF, run_name="__main__")
