#!/usr/bin/env bash
# The foundation's GPU check, run on an H200 machine (device tool) from the repo root:
#   bench/gpu_foundation.sh BIN_DIR MODEL.gguf OUT_DIR
# 1. CUDA is usable from the binary built on the CPU machine;
# 2. SmolLM2 logits on CUDA (f32, bf16) against the CPU f32 logits (the CPU path
#    matches transformers to < 1e-3 in `make test`);
# 3. greedy chat answer on CUDA;
# 4. forward (prefill) tokens/s at 4096 tokens, bf16: SmolLM2 and a random-weight
#    Llama-3.2-1B-shaped model.
set -euo pipefail
BIN=$1/kv-distill
MODEL=$2
OUT=$3
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
PY=${KVD_PYTHON:-python3}
PROMPT="The quick brown fox jumps over the lazy dog. In 1969, the first humans landed on the Moon. Rust is a systems programming language that"

echo "== devices"; "$BIN" devices | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/devices.txt"
for cfg in "cpu f32" "cuda f32" "cuda bf16"; do
  set -- $cfg
  "$BIN" logits --model "$MODEL" --device "$1" --dtype "$2" --prompt "$PROMPT" --out "$OUT/logits_$1_$2.safetensors"
done
"$PY" - "$OUT" <<'PY' | tee "$OUT/parity.txt"
import sys, torch
from safetensors.torch import load_file
d = sys.argv[1]
ref = load_file(f"{d}/logits_cpu_f32.safetensors")["logits"].double()
for name in ["cuda_f32", "cuda_bf16"]:
    x = load_file(f"{d}/logits_{name}.safetensors")["logits"].double()
    diff = (x - ref).abs()
    rel = (x - ref).norm() / ref.norm()
    agree = (x.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}: max_abs_diff={diff.max().item():.3e} rel_l2={rel.item():.3e} argmax_agreement={agree:.4f}")
PY
echo "== chat on cuda"
"$BIN" generate --model "$MODEL" --device cuda --chat --prompt "What is the capital of France?" --max-new-tokens 32 | tee "$OUT/chat.txt"
echo "== forward throughput, bf16, 4096 tokens"
{
  "$BIN" bench-forward --model "$MODEL" --device cuda --dtype bf16 --tokens 4096 --iters 20
  "$BIN" bench-forward --preset llama-3.2-1b --device cuda --dtype bf16 --tokens 4096 --iters 20
} | tee "$OUT/bench.txt"
