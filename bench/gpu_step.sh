#!/usr/bin/env bash
# The step benchmark of the performance issue on one H200 (device tool), from
# the repo root:  bench/gpu_step.sh KV_DISTILL OUT
# Makes a random-weight Llama-3.2-1B-shaped HF checkpoint (bf16, seed 0), then
# for each shape runs the Rust step (`kv-distill bench-step --dump`) and the
# PyTorch reference (bench/kvdistill_ref.py) eager and with torch.compile on the
# same weights, adaptor init and batch; one JSON line each in OUT/results.jsonl.
set -euo pipefail
BIN=$1 OUT=$2
SHAPES=${SHAPES:-"4096:1 4096:4 16384:1"}   # span:batch
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
PY=${KVD_PYTHON:-/opt/torch/.venv/bin/python}
mkdir -p "$OUT"
M=${MODEL_DIR:-/tmp/llama-1b-random}
if [ ! -f "$M/config.json" ]; then
  "$PY" - "$M" <<'PYEOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], safe_serialization=True)
PYEOF
fi
for shape in $SHAPES; do
  span=${shape%:*} batch=${shape#*:}
  d="$OUT/dump-$span-$batch"
  echo "== span $span batch $batch"
  "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" --batch "$batch" \
    --suffix 256 --ratio 0.1 --iters 5 --dump "$d" 2> "$d.rust.log" | sed 's/^/{"impl":"rust",/; s/^{"impl":"rust",{/{"impl":"rust",/' | tee -a "$OUT/results.jsonl"
  for c in "" "--compile"; do
    "$PY" "$here/bench/kvdistill_ref.py" --model "$M" --dump "$d" --device cuda --dtype bf16 $c \
      2> "$d.py$c.log" | sed "s/^{/{\"impl\":\"pytorch${c:+ compile}\",\"span\":$span,\"batch\":$batch,/" \
      | tee -a "$OUT/results.jsonl" || tail -5 "$d.py$c.log"
  done
done
