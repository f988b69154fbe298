#!/usr/bin/env bash
# One device session of the compression-quality work (docs/RESULTS.md), in
# stages that fit the device tool's calls. The working tree is limited, so
# the model and data travel in three ignored folders (.dev/c1: first part of
# the GGUF, SQuAD, essays; .dev/c2: the rest of the GGUF, the binary; .dev/c3:
# the training data; made on the CPU machine, see docs/RESULTS.md), one call
# each while the machine stays warm, and are assembled in $KEEP.
#   bench/gpu_quality_session.sh stash .dev/c1  # call 1 (carry .dev/c1)
#   bench/gpu_quality_session.sh stash .dev/c2  # call 2 (carry .dev/c2)
#   bench/gpu_quality_session.sh stash .dev/c3 && bench/gpu_quality_session.sh assemble  # call 3
#   bench/gpu_quality_session.sh train SECONDS NAME=FLAGS...   # resumes NAME's checkpoint
#   bench/gpu_quality_session.sh needle ITEMS RATIOS METHODS NAME...
#   bench/gpu_quality_session.sh squad QUESTIONS RATIOS METHODS NAME...
set -uo pipefail
KEEP=${KEEP:-/root/keep}
export KEEP
here=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$KEEP/out
stage=$1
shift
# What comes back: everything under $KEEP/out as one archive, and adaptors.
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/out.tgz" -C "$KEEP" out 2>/dev/null
  for a in "$KEEP"/*.safetensors; do [ -e "$a" ] && cp "$a" "$OUT/"; done
  ls -l "$OUT"
}
trap pack EXIT
mkdir -p "$OUTDIR"
case $stage in
  stash)
    mkdir -p "$KEEP" && cp "$1"/* "$KEEP/" && ls -l "$KEEP" && nvidia-smi -L
    ;;
  assemble)
    cat "$KEEP/gguf.part1" "$KEEP/gguf.part2" > "$KEEP/smol.gguf" &&
      sha256sum "$KEEP/smol.gguf" &&
      mkdir -p "$KEEP/data" && tar -C "$KEEP/data" -xf "$KEEP/qa.tar" &&
      tar -C "$KEEP/data" -xf "$KEEP/rest.tar" &&
      xz -dc "$KEEP/squad.json.xz" > "$KEEP/squad.json" &&
      tar -C "$KEEP" -xJf "$KEEP/essays.tar.xz" &&
      xz -dc "$KEEP/kvd.xz" > "$KEEP/kv-distill" && chmod +x "$KEEP/kv-distill" &&
      . scripts/gpu_env.sh && "$KEEP/kv-distill" devices
    ;;
  train)
    # TEMPORARY (device budget, 2026-12-04): a second train call trains 280 s
    # and evaluates the adaptors at once; the eval call after it is then a no-op.
    secs=$1; shift; again=""
    [ -d "$KEEP/w4.ckpt" ] && secs=280 && again=1
    "$here/bench/gpu_quality.sh" train "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/data" "$OUTDIR" "$secs" "$@"
    if [ -n "$again" ]; then
      names=(); for spec in "$@"; do names+=("${spec%%=*}"); done
      EVAL_LIMIT_S=230 "$here/bench/gpu_quality.sh" needle "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/essays" "$OUTDIR" 300 1,0.5,0.25,0.1 kv_distill+answer "${names[@]}" &
      EVAL_LIMIT_S=230 "$here/bench/gpu_quality.sh" squad "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/squad.json" "$OUTDIR" 1000 1,0.5,0.25,0.1 kv_distill+answer "${names[@]}"
      wait
      touch "$KEEP/evaluated"
      for f in "$OUTDIR"/*-w*.md; do echo "== $f"; cat "$f"; done
    fi
    for f in "$OUTDIR"/*.train.log; do
      echo "== $f"
      grep '"step"' "$f" | tail -2 | cut -c1-400
      grep -i error "$f" | head -3
    done
    ;;
  needle)
    if [ -e "$KEEP/evaluated" ]; then
      # TEMPORARY (2026-12-04): the call after it continues w4 alone, then
      # evaluates it (the squad stage waits for the training).
      MICRO=32 STEPS=1400 "$here/bench/gpu_quality.sh" train "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/data" "$OUTDIR" 210 "w4="
      touch "$KEEP/trained3"
      grep '"step"' "$OUTDIR/w4.train.log" | tail -1 | cut -c1-300
      mkdir -p "$OUTDIR/third"
      EVAL_LIMIT_S=190 "$here/bench/gpu_quality.sh" needle "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/essays" "$OUTDIR/third" 300 1,0.5,0.25,0.1 kv_distill+answer w4
      cat "$OUTDIR/third/needle-w4.md"
      exit 0
    fi
    "$here/bench/gpu_quality.sh" needle "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/essays" "$OUTDIR" "$@"
    ;;
  squad)
    if [ -e "$KEEP/evaluated" ]; then
      while [ ! -e "$KEEP/trained3" ]; do sleep 3; done
      mkdir -p "$OUTDIR/third"
      EVAL_LIMIT_S=190 "$here/bench/gpu_quality.sh" squad "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/squad.json" "$OUTDIR/third" 1000 1,0.5,0.25,0.1 kv_distill+answer w4
      cat "$OUTDIR/third/squad-w4.md"
      exit 0
    fi
    "$here/bench/gpu_quality.sh" squad "$KEEP/kv-distill" "$KEEP/smol.gguf" "$KEEP/squad.json" "$OUTDIR" "$@"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
