#!/usr/bin/env bash
# Two kv-distill builds side by side on the step benchmark (one device call):
#   bench/gpu_step_ab.sh OLD NEW OUT
# Makes the random-weight checkpoints of bench/gpu_step.sh (MODELS, SHAPES_1b,
# SHAPES_smol as there; its other settings, e.g. REF, PROFILE, PHASES, GRAPHS,
# apply to that first run, which uses OLD), then runs `bench-step` of OLD and
# NEW in turn, eager and with --cuda-graphs, REPS times (default 2), on the
# same weights, adaptor and batches: one JSON line each in OUT/ab.jsonl
# ("build": "old" or "new"; "graphs": true or false).
set -euo pipefail
OLD=$1 NEW=$2 OUT=$3
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/bench/gpu_step.sh" "$OLD" "$OUT"
. "$here/scripts/gpu_env.sh"
MODELS=${MODELS:-"1b smol"}
SHAPES_1b=${SHAPES_1b:-"4096:1 4096:4 16384:1"}
SHAPES_smol=${SHAPES_smol:-"4096:1 4096:4"}
for model in $MODELS; do
  shapes_var=SHAPES_$model
  for shape in ${!shapes_var}; do
    span=${shape%:*} batch=${shape#*:}
    tag="\"shape\":\"$model\",\"span\":$span,\"batch\":$batch"
    for rep in $(seq "${REPS:-2}"); do
      for build in old new; do
        bin=$OLD; [ $build = new ] && bin=$NEW
        for g in "" 1; do
          graphs=false; [ -n "$g" ] && graphs=true
          "$bin" bench-step --model "/tmp/random-$model" --device cuda --dtype bf16 --span "$span" \
            --batch "$batch" --suffix 256 --ratio 0.1 --iters 10 --batches 2 ${g:+--cuda-graphs} \
            2>> "$OUT/ab.log" \
            | sed "s/^{/{\"build\":\"$build\",\"graphs\":$graphs,\"rep\":$rep,$tag,/" \
            | tee -a "$OUT/ab.jsonl" || tail -5 "$OUT/ab.log"
        done
      done
    done
  done
done
