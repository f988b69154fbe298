#!/usr/bin/env bash
# Compression-quality runs on one H200 (device tool), from the repo root.
# Small models leave most of the GPU idle, so several trainings (and
# evaluations) run side by side as separate processes.
#
#   bench/gpu_quality.sh train BIN MODEL DATA OUT SECONDS NAME=FLAGS...
#       one `train` per NAME, all at once, each for SECONDS (STEPS steps at
#       most, the length of the learning-rate schedule); adaptors in
#       $KEEP/NAME.safetensors, checkpoints in $KEEP/NAME.ckpt (each call
#       resumes from there), logs in OUT/NAME.train.log; FLAGS with --weights
#       replace the default data mix (qa, text, synth 2,1,2) with their own
#       --data DATA/train/... flags (DATA/ = the prepared data's directory)
#   bench/gpu_quality.sh needle BIN MODEL HAYSTACK OUT ITEMS RATIOS METHODS NAME...
#       the needle test of each NAME's adaptor (all at once) -> OUT/needle-NAME/;
#       NAME `none` runs each of BASE_METHODS (default: every training-free
#       method) at BASE_RATIOS (default RATIOS) in a process of its own ->
#       OUT/needle-none-METHOD/; EVAL_LIMIT_S bounds each run
#   bench/gpu_quality.sh squad BIN MODEL SQUAD OUT QUESTIONS RATIOS METHODS NAME...
#       SQuAD v1.1 dev for each NAME's adaptor -> OUT/squad-NAME/
#
# DATA holds train/{qa,text,synth} from `kvd-data prepare`. KEEP (default
# /root/keep) holds adaptors between calls.
set -uo pipefail
PHASE=$1 BIN=$2 MODEL=$3 SRC=$4 OUT=$5
shift 5
KEEP=${KEEP:-/root/keep}
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
mkdir -p "$OUT" "$KEEP"
pids=()
case $PHASE in
  train)
    SECONDS_LIMIT=$1; shift
    for spec in "$@"; do
      name=${spec%%=*} flags=${spec#*=}
      # An arm may bring its own data mix (`--data DATA/train/multiqa ...
      # --weights ...`; DATA/ is the prepared data's directory).
      flags=${flags//DATA\//file://$SRC/}
      data=(--data "file://$SRC/train/qa" --data "file://$SRC/train/text" --data "file://$SRC/train/synth" --weights 2,1,2)
      [[ " $flags " == *" --weights "* ]] && data=()
      # Every micro-batch has another shape: expandable segments keep the
      # caching allocator from fragmenting (three jobs share one card).
      # shellcheck disable=SC2086
      PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
      "$BIN" --log-format json train --model "$MODEL" --device cuda --dtype bf16 \
        "${data[@]}" --steps "${STEPS:-100000}" --global-batch 32 --micro-batch "${MICRO:-32}" --max-len 1024 --save-every 50 \
        --text-suffix 64 --seed 0 --data-threads 4 --no-verify-data --skip-bad-rows \
        --log-every 25 --time-limit-s "$SECONDS_LIMIT" --out "$KEEP/$name.safetensors" \
        --resume --checkpoint-dir "$KEEP/$name.ckpt" --keep-last 1 $flags \
        > "$OUT/$name.train.json" 2>> "$OUT/$name.train.log" &
      pids+=($!)
    done
    ;;
  needle|squad)
    ITEMS=$1 RATIOS=$2 METHODS=$3; shift 3
    # NAME `none` becomes one run per training-free method (none-METHOD), so
    # each gets the whole time limit; merge them with bench/merge_eval.py.
    names=()
    for name in "$@"; do
      if [ "$name" = none ]; then
        IFS=, read -ra base <<< "${BASE_METHODS:-random,streaming_llm,key_norm,h2o,snapkv,tova,expected_attention,snapkv_question}"
        for m in "${base[@]}"; do names+=("none-$m"); done
      else
        names+=("$name")
      fi
    done
    for name in "${names[@]}"; do
      # Batches: a needle context is up to 2,048 tokens, SQuAD's ~200; at
      # 100 needle items a batch, 22 runs side by side (needle and SQuAD, every
      # baseline in its own process) ran the H200 out of memory (fifteenth
      # session; `eval` now retries such a batch in halves, at a cost in time).
      if [ "$PHASE" = needle ]; then
        task=(--task needle --haystack "$SRC" --max-new-tokens 32 --batch "${BATCH:-32}")
      else
        task=(--task squad --squad "$SRC" --max-new-tokens 24 --batch "${BATCH:-100}")
      fi
      adaptor=() methods=$METHODS ratios=$RATIOS
      if [[ "$name" == none-* ]]; then
        # One training-free method alone (at BASE_RATIOS).
        methods=${name#none-}
        ratios=${BASE_RATIOS:-$RATIOS}
      else
        adaptor=(--adaptor "$KEEP/$name.safetensors")
      fi
      limit=()
      [ -n "${EVAL_LIMIT_S:-}" ] && limit=(--time-limit-s "$EVAL_LIMIT_S")
      # EVAL_PHASES=1: seconds per stage in each results.json (synchronized, slower).
      [ -n "${EVAL_PHASES:-}" ] && limit+=(--phases)
      "$BIN" eval --model "$MODEL" --device cuda --dtype bf16 "${adaptor[@]}" "${task[@]}" "${limit[@]}" \
        --questions "$ITEMS" --seed 0 --per-item --ratios "$ratios" --methods "$methods" \
        --out-dir "$OUT/$PHASE-$name" > "$OUT/$PHASE-$name.md" 2> "$OUT/$PHASE-$name.log" &
      pids+=($!)
    done
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader || true
exit $status
