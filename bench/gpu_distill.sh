#!/usr/bin/env bash
# The KV-Distill acceptance run on one H200 (device tool), from the repo root:
#   bench/gpu_distill.sh sanity BIN MODEL DATA SQUAD OUT   # 20 steps + 16 questions
#   bench/gpu_distill.sh train  BIN MODEL DATA SQUAD OUT   # the real training run
#   bench/gpu_distill.sh eval   BIN MODEL DATA SQUAD OUT   # 1,000 SQuAD dev questions
# DATA holds train/qa and train/text from `kvd-data prepare`; SQUAD is
# squaddev_v1.1.json; ADAPTOR (default /root/keep/adaptor.safetensors) is
# written by `train` and read by `eval`. Settings are the ones in docs/RESULTS.md.
set -euo pipefail
PHASE=$1 BIN=$2 MODEL=$3 DATA=$4 SQUAD=$5 OUT=$6
ADAPTOR=${ADAPTOR:-/root/keep/adaptor.safetensors}
STEPS=${STEPS:-2000}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-420}
EVAL_LIMIT_S=${EVAL_LIMIT_S:-480}
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
mkdir -p "$OUT" "$(dirname "$ADAPTOR")"
train() { # steps limit out
  "$BIN" --log-format json train --model "$MODEL" --device cuda --dtype bf16 \
    --data "file://$DATA/train/qa" --data "file://$DATA/train/text" --weights 3,1 \
    --steps "$1" --global-batch 32 --micro-batch 16 --max-len 1024 --text-suffix 128 \
    --lr 1e-3 --warmup 50 --ratios 0.02,0.05,0.1,0.25,0.5 --seed 0 --data-threads 6 --no-verify-data --skip-bad-rows \
    --log-every 20 --save-every 100 --time-limit-s "$2" --out "$3"
}
evaluate() { # questions limit adaptor dir
  "$BIN" eval --model "$MODEL" --device cuda --dtype bf16 --adaptor "$3" --squad "$SQUAD" \
    --questions "$1" --seed 0 --batch 128 --time-limit-s "$2" --out-dir "$4"
}
case $PHASE in
  sanity)
    "$BIN" devices
    train 20 120 "$OUT/sanity_adaptor.safetensors" 2> "$OUT/sanity_train.log" | tail -20
    tail -3 "$OUT/sanity_train.log"
    evaluate 16 120 "$OUT/sanity_adaptor.safetensors" "$OUT/sanity_eval" 2> "$OUT/sanity_eval.log" | head -20
    ;;
  train)
    start=$(date +%s)
    train "$STEPS" "$TRAIN_LIMIT_S" "$ADAPTOR" 2> "$OUT/train.log" | tee "$OUT/train_summary.json"
    echo "train wall seconds: $(( $(date +%s) - start ))"
    grep '"step"' "$OUT/train.log" | tail -5
    cp "$ADAPTOR" "$OUT/"
    ;;
  eval)
    start=$(date +%s)
    evaluate 1000 "$EVAL_LIMIT_S" "$ADAPTOR" "$OUT/eval" 2> "$OUT/eval.log"
    echo "eval wall seconds: $(( $(date +%s) - start ))"
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
