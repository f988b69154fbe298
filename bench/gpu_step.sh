#!/usr/bin/env bash
# The step benchmark of the performance issue on one H200 (device tool), from
# the repo root:  bench/gpu_step.sh KV_DISTILL OUT
# Makes random-weight HF checkpoints (bf16, seed 0) of the Llama-3.2-1B shape
# and of the SmolLM2-135M shape, then for each shape runs the Rust step
# (`kv-distill bench-step --dump`) and the PyTorch reference
# (bench/kvdistill_ref.py) eager and with torch.compile on the same weights,
# adaptor init and batch; one JSON line each in OUT/results.jsonl.
# MODELS picks the models, SHAPES_1b / SHAPES_smol the span:batch shapes,
# REF="eager compile" the reference variants (REF_<model>_<span>_<batch> overrides
# for one shape): eager and compile are the legacy reference (host selection,
# hooks; compile = torch.compile of the LlamaModel body); fast, fast-compile,
# fast-ro and fast-max the fast one (`--impl fast`: no host sync, fused AdamW)
# eager and with torch.compile of the whole step in mode default,
# reduce-overhead (CUDA graphs) and max-autotune; fast-nofused-compile the
# fast one compiled with its unfused AdamW (see bench/kvdistill_ref.py);
# PHASES=1 adds per-phase times of the Rust step
# (OUT/*.rust-phases.json), PROFILE=1 kernel tables of the reference
# (torch.profiler, OUT/*.prof.txt) and of the Rust step (`--profile`, eager and
# with graphs, OUT/*.rust*.prof.md); REF_TIMEOUT bounds each reference run (s);
# ABLATE="teacher_thread fill_cache deferred_loss" times the Rust step without each speed-up
# (KVD_ABLATE), alternating with the full step, twice each; GRAPHS=1 times the
# step with CUDA graphs (`--cuda-graphs`) the same way, on two batches used in
# turn (summarize_step.py checks that every graph step replayed and that its
# losses follow the eager step's).
set -euo pipefail
BIN=$1 OUT=$2
MODELS=${MODELS:-"1b smol"}
SHAPES_1b=${SHAPES_1b:-"4096:1 4096:4 16384:1"}
SHAPES_smol=${SHAPES_smol:-"4096:1 4096:4"}
REF=${REF-"eager compile"}
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
PY=${KVD_PYTHON:-/opt/torch/.venv/bin/python}
mkdir -p "$OUT"
for model in $MODELS; do
  M=/tmp/random-$model
  if [ ! -f "$M/config.json" ]; then
    "$PY" - "$M" "$model" <<'PYEOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
shapes = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
               rope_theta=500000.0),
    "smol": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                 rope_theta=100000.0),
}
cfg = LlamaConfig(head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, **shapes[sys.argv[2]])
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], safe_serialization=True)
PYEOF
  fi
  shapes_var=SHAPES_$model
  for shape in ${!shapes_var}; do
    span=${shape%:*} batch=${shape#*:}
    d="$OUT/dump-$model-$span-$batch"
    tag="\"shape\":\"$model\",\"span\":$span,\"batch\":$batch"
    echo "== $model span $span batch $batch"
    "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" --batch "$batch" \
      --suffix 256 --ratio 0.1 --iters 5 --dump "$d" 2> "$d.rust.log" \
      | sed "s/^{/{\"impl\":\"rust\",$tag,/" | tee -a "$OUT/results.jsonl" || tail -5 "$d.rust.log"
    if [ -n "${PHASES:-}" ]; then   # per-phase device times (synchronized), separately
      KVD_STEP_PHASES=1 "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" \
        --batch "$batch" --suffix 256 --ratio 0.1 --iters 3 > "$d.rust-phases.json" 2>> "$d.rust.log" || true
    fi
    if [ -n "${PROFILE:-}" ]; then   # kernel tables of the Rust step, eager and with graphs
      for g in "" 1; do
        "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" --batch "$batch" \
          --suffix 256 --ratio 0.1 --iters 3 ${g:+--cuda-graphs} \
          --profile "$d.rust${g:+-graphs}.prof.md" > /dev/null 2>> "$d.rust.log" || true
      done
    fi
    for a in ${ABLATE:-}; do   # the step without one speed-up, alternating with the full step
      for rep in 1 2; do
        for v in "$a" ""; do
          name="rust"; [ -n "$v" ] && name="rust without $v"; name="$name ($rep)"
          KVD_ABLATE=$v "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" \
            --batch "$batch" --suffix 256 --ratio 0.1 --iters 10 2>> "$d.rust.log" \
            | sed "s/^{/{\"impl\":\"$name\",$tag,/" | tee -a "$OUT/results.jsonl" || true
        done
      done
    done
    if [ -n "${GRAPHS:-}" ]; then   # with CUDA graphs, alternating with the eager step
      for rep in 1 2; do
        for g in 1 ""; do
          name="rust"; [ -n "$g" ] && name="rust graphs"; name="$name ($rep)"
          "$BIN" bench-step --model "$M" --device cuda --dtype bf16 --span "$span" \
            --batch "$batch" --suffix 256 --ratio 0.1 --iters 10 --batches 2 ${g:+--cuda-graphs} 2>> "$d.rust.log" \
            | sed "s/^{/{\"impl\":\"$name\",$tag,/" | tee -a "$OUT/results.jsonl" || tail -5 "$d.rust.log"
        done
      done
    fi
    ref_var=REF_${model}_${span}_${batch}
    for v in ${!ref_var-$REF}; do
      case $v in
        eager) c="" ;;
        compile) c="--compile" ;;
        fast) c="--impl fast" ;;
        fast-compile) c="--impl fast --compile default" ;;
        fast-ro) c="--impl fast --compile reduce-overhead" ;;
        fast-max) c="--impl fast --compile max-autotune" ;;
        fast-nofused-compile) c="--impl fast --no-fused --compile default" ;;
        *) echo "unknown REF value $v" >&2; continue ;;
      esac
      timeout "${REF_TIMEOUT:-400}" "$PY" "$here/bench/kvdistill_ref.py" --model "$M" --dump "$d" --device cuda --dtype bf16 $c \
        ${PROFILE:+--profile "$d.py-$v.prof.txt"} 2> "$d.py-$v.log" \
        | sed "s/^{/{\"impl\":\"pytorch $v\",$tag,/" | tee -a "$OUT/results.jsonl" || tail -5 "$d.py-$v.log"
    done
  done
done
