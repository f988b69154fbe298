#!/usr/bin/env bash
# One device session of the compression-quality work (docs/RESULTS.md), in
# stages that fit the device tool's calls. The working tree is limited, so
# the model and data travel in three ignored folders (.dev/c1: first part of
# the GGUF; .dev/c2: the rest of the GGUF; .dev/c3: the training data, the
# binary, SQuAD and the essays; a larger GGUF's further parts in .dev/c5, c6, ...; made
# on the CPU machine by bench/device_carry.sh), one call each while the
# machine stays warm, and are assembled in $KEEP (the model as model.gguf).
#   bench/gpu_quality_session.sh stash .dev/c1  # call 1 (carry .dev/c1)
#   bench/gpu_quality_session.sh stash .dev/c2  # call 2 (carry .dev/c2)
#   bench/gpu_quality_session.sh stash .dev/c3 && bench/gpu_quality_session.sh assemble  # call 3
#     (assemble also restores checkpoints carried in as ckpt-NAME.tar.partNN)
#   bench/gpu_quality_session.sh train SECONDS NAME=FLAGS...   # resumes NAME's checkpoint
#   bench/gpu_quality_session.sh needle ITEMS RATIOS METHODS NAME...
#   bench/gpu_quality_session.sh squad QUESTIONS RATIOS METHODS NAME...
#   PACK_CKPT="NAME ..." bench/gpu_quality_session.sh pack   # last in a call
set -uo pipefail
KEEP=${KEEP:-/root/keep}
export KEEP
here=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$KEEP/out
stage=$1
shift
# What comes back: everything under $KEEP/out as one archive, and adaptors;
# with PACK_CKPT="NAME ..." those arms' newest checkpoints instead of their
# adaptors (a checkpoint holds the adaptor and the optimizer state), as
# ckpt-NAME.tar.partNN of 15 MiB (the device tool returns 8 files of at most
# 16 MiB, 64 MiB in all), for a later session to carry in and resume.
pack() {
  [ -n "${OUT:-}" ] || return 0
  # The last invocation of a call decides what comes back (several may pack,
  # e.g. needle and squad run side by side: one at a time, under a lock).
  exec 9> "$KEEP/.pack.lock"
  flock 9
  rm -f "$OUT"/*.safetensors "$OUT"/ckpt-* "$OUT/out.tgz"
  tar -czf "$OUT/out.tgz" -C "$KEEP" out 2>/dev/null
  for a in "$KEEP"/*.safetensors; do
    [ -e "$a" ] || continue
    name=$(basename "$a" .safetensors)
    [[ " ${PACK_CKPT:-} " == *" $name "* ]] || cp "$a" "$OUT/"
  done
  for name in ${PACK_CKPT:-}; do
    step=$(cd "$KEEP/$name.ckpt" 2>/dev/null && ls -d step-* | sort | tail -1)
    [ -n "$step" ] || { echo "pack: no checkpoint of $name" >&2; continue; }
    tar -cf - -C "$KEEP" "$name.ckpt/$step" | split -b 15M -d - "$OUT/ckpt-$name.tar.part"
  done
  ls -l "$OUT"
}
trap pack EXIT
mkdir -p "$OUTDIR"
case $stage in
  stash)
    mkdir -p "$KEEP" && cp "$1"/* "$KEEP/" && ls -l "$KEEP" && nvidia-smi -L
    ;;
  assemble)
    # The model's parts (two for SmolLM2, more for a larger GGUF) in order.
    ls "$KEEP"/gguf.part* | sort -V | xargs cat > "$KEEP/model.gguf" &&
      sha256sum "$KEEP/model.gguf" &&
      mkdir -p "$KEEP/data" && tar -C "$KEEP/data" -xf "$KEEP/qa.tar" &&
      tar -C "$KEEP/data" -xf "$KEEP/rest.tar" &&
      xz -dc "$KEEP/squad.json.xz" > "$KEEP/squad.json" &&
      tar -C "$KEEP" -xJf "$KEEP/essays.tar.xz" &&
      xz -dc "$KEEP/kvd.xz" > "$KEEP/kv-distill" && chmod +x "$KEEP/kv-distill" &&
      for p in "$KEEP"/ckpt-*.tar.part00; do
        # A checkpoint carried from an earlier session: `train` resumes it.
        [ -e "$p" ] || continue
        cat "${p%00}"* | tar -x -C "$KEEP" && echo "restored $(basename "${p%.tar.part00}")"
      done &&
      . scripts/gpu_env.sh && "$KEEP/kv-distill" devices
    ;;
  train)
    "$here/bench/gpu_quality.sh" train "$KEEP/kv-distill" "$KEEP/model.gguf" "$KEEP/data" "$OUTDIR" "$@"
    for f in "$OUTDIR"/*.train.log; do
      echo "== $f"
      grep '"step"' "$f" | tail -2 | cut -c1-400
      grep -i error "$f" | head -3
    done
    ;;
  needle)
    "$here/bench/gpu_quality.sh" needle "$KEEP/kv-distill" "$KEEP/model.gguf" "$KEEP/essays" "$OUTDIR" "$@"
    ;;
  squad)
    "$here/bench/gpu_quality.sh" squad "$KEEP/kv-distill" "$KEEP/model.gguf" "$KEEP/squad.json" "$OUTDIR" "$@"
    ;;
  pack)
    # Nothing but what every stage does on exit: with PACK_CKPT, after the
    # evaluations of a call, to bring the checkpoints back.
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
