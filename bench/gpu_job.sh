#!/usr/bin/env bash
# The training job against its own step on one H200 (issue 17), from the repo
# root, after bench/gpu_quality_session.sh stash/assemble (KEEP holds the
# binary, model.gguf and the prepared data):
#   bench/gpu_job.sh OUT
# 1. bench-step of the job's method (`--method train`) and of the reference's
#    at the job's median shape (train/qa: context ~350 tokens, suffix ~32;
#    SHAPE=span:suffix) with 64 examples, each also with --step-phases;
#    and --method train with --cuda-graphs (the host cost where shapes repeat),
#    and cut into 2 or 4 micro-batches (one after another);
# 2. bench-step --method train at 64 x (1,024 + 256), with and without
#    --recompute-encoder (device memory), and at 32 x (1,000 + 64), the
#    padded shape of the job's micro-batches of 32;
# 3. the operators the job's step dispatches (--count-ops), and the same step
#    on SmolLM2's layers at 1/8 of its widths (--preset smollm2-135m-narrow):
#    its time is the step's host-side dispatch, the cost every micro-batch
#    pays whatever its size;
# 4. `train` on JOB_DATA (default train/qa) for JOB_S seconds (default 60) per setting of JOBS
#    (`;`-separated flag sets, each with its --global-batch, optionally led by
#    NAME=VALUE words for the job's environment), then JOB_S/2
#    more with --step-phases (the phase split per step; the synchronizations
#    slow it, so apart; PHASE_JOBS="1 3" limits those runs to the sets
#    numbered, "" to none; default every set).
# Everything lands in OUT/job.tgz (the device tool returns few files):
# bench.jsonl (one line per bench-step), job-N.log / job-N-phases.log.
# BENCHES (below) replaces parts 1-3 with chosen bench-step runs.
# Summarise with bench/summarize_job.py DIR (DIR: job.tgz unpacked).
set -uo pipefail
KEEP=${KEEP:-/root/keep}
DEST=$1
OUT=$KEEP/job-out
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
B=$KEEP/kv-distill M=$KEEP/model.gguf
SHAPE=${SHAPE:-352:32}
JOB_S=${JOB_S:-60}
# The sets: the fifteenth session's first job, and the fastest measured in
# the sixteenth (length buckets, shapes padded to multiples of 128,
# micro-batches of 128 with the encoder recomputed, expandable segments;
# BENCHMARKS.md), at micro-batches of 128 and 256.
E=PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
FAST="--bucket-by-length --pad-multiple 128 --recompute-encoder"
JOBS=${JOBS:-"--global-batch 64 --micro-batch 32;$E --global-batch 256 --micro-batch 128 $FAST;$E --global-batch 512 --micro-batch 256 $FAST"}
rm -rf "$OUT" && mkdir -p "$OUT" "$DEST"
trap 'tar -czf "$DEST/job.tgz" -C "$OUT" . && ls -l "$DEST"' EXIT
bench() {
  timeout 120 "$B" bench-step --model "$M" --device cuda --dtype bf16 --iters 5 "$@" \
    >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log" || echo "bench-step $* failed" >&2
}
span=${SHAPE%:*} suffix=${SHAPE#*:}
# BENCHES="FLAGS;FLAGS" replaces parts 1-3 with bench-step runs of those flag
# sets (each beside --model/--device/--dtype/--iters 5); BENCHES=none skips them.
if [ -n "${BENCHES:-}" ]; then
  if [ "$BENCHES" != none ]; then
    IFS=';' read -ra bsets <<< "$BENCHES"
    # shellcheck disable=SC2086
    for b in "${bsets[@]}"; do bench $b; done
  fi
else
  for method in train reference; do
    for phases in "" --step-phases; do
      bench --method $method --span "$span" --suffix "$suffix" --batch 64 --ratio 0.25 $phases
    done
  done
  # The step with its work after the selection as a CUDA graph: what the
  # per-micro-batch host cost is worth where shapes repeat.
  bench --method train --span "$span" --suffix "$suffix" --batch 64 --ratio 0.25 --cuda-graphs
  # The batch cut into 2 and 4 micro-batches, run one after the other.
  for mb in 2 4; do
    bench --method train --span "$span" --suffix "$suffix" --batch 64 --ratio 0.25 --micro-batches $mb
  done
  for r in "" --recompute-encoder; do
    bench --method train --span 1024 --suffix 256 --batch 64 --ratio 0.25 $r
  done
  # The shape a micro-batch of 32 train/qa examples pads to (its longest
  # example, often the 1,024-token cap, and a ~64-token suffix): the job's
  # micro-batch against the step at the same padded shape.
  bench --method train --span 1000 --suffix 64 --batch 32 --ratio 0.25 --step-phases
  bench --method train --span "$span" --suffix "$suffix" --batch 64 --ratio 0.25 --count-ops --step-phases
  for batch in 64 16; do
    timeout 120 "$B" bench-step --preset smollm2-135m-narrow --device cuda --dtype bf16 --iters 5 \
      --method train --span "$span" --suffix "$suffix" --batch $batch --ratio 0.25 \
      >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log" || echo "bench-step narrow failed" >&2
  done
fi
IFS=';' read -ra sets <<< "$JOBS"
i=0
for flags in "${sets[@]}"; do
  i=$((i + 1))
  echo "job $i: $flags" >> "$OUT/jobs.txt"
  flags_env="" job_flags=""
  for w in $flags; do
    if [ -z "$job_flags" ] && [[ "$w" =~ ^[A-Z_]+= ]]; then flags_env="$flags_env $w"; else job_flags="$job_flags $w"; fi
  done
  runs=("")
  if [ -z "${PHASE_JOBS+x}" ] || [[ " $PHASE_JOBS " == *" $i "* ]]; then runs+=(--step-phases); fi
  for phases in "${runs[@]}"; do
    secs=$JOB_S log=$OUT/job-$i.log
    [ -n "$phases" ] && secs=$((JOB_S / 2)) log=$OUT/job-$i-phases.log
    # A set may begin with NAME=VALUE words: the job's environment.
    # shellcheck disable=SC2086
    env $flags_env timeout $((secs + 60)) "$B" --log-format json train --model "$M" --device cuda --dtype bf16 \
      --data "file://$KEEP/data/${JOB_DATA:-train/qa}" --max-len 1024 --steps 100000 \
      --time-limit-s "$secs" --seed 0 --data-threads 4 --no-verify-data --skip-bad-rows \
      --log-every 5 --out "$KEEP/job-$i.safetensors" $phases $job_flags \
      > /dev/null 2> "$log" || echo "job $i $phases failed" >&2
    rm -rf "$KEEP/job-$i.safetensors" "$KEEP/job-$i.ckpt"
  done
done
