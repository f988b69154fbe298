#!/usr/bin/env bash
# Makes the three carry folders of a quality session on the device tool
# (bench/gpu_quality_session.sh): each must fit the tool's 64 MiB working tree
# beside the repository, so the model, data and binary are split.
#   .dev/c1: the first 49,200,000 bytes of the SmolLM2 GGUF
#   .dev/c2: the next 49,200,000 (for SmolLM2, the rest)
#   .dev/c3: the prepared training data (train/qa; train/text, train/synth,
#            train/multiqa), the release kv-distill (xz), SQuAD v1.1 dev (xz)
#            and the essays (tar.xz): all beside the training data, since the
#            repository's ~13 MB leave the GGUF's folders little room
#   .dev/c4: with CKPT=DIR, the checkpoint parts ckpt-NAME.tar.partNN that an
#            earlier session's `PACK_CKPT=NAME` brought back (stash it before
#            c3; `assemble` restores them and `train` resumes them)
#   .dev/c5, c6, ...: with a larger GGUF=FILE (Gemma-3-270m's is 253 MB), the
#            rest of it in 49.2 MB parts, one call each (stash them before c3)
# Needs `make build` (release binaries) and the assets of `make setup`; runs
# `kvd-data prepare` when the data is missing. Usage: bench/device_carry.sh
# (SmolLM2), GGUF=~/.cache/kv-distill/assets/gemma3/gemma-3-270m-q4_k_m.gguf
# bench/device_carry.sh (another model; the prepared data is the same).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KVD_CACHE:-$HOME/.cache/kv-distill}
bin=${CARGO_TARGET_DIR:-$cache/target}/release
assets=$cache/assets
data=${DATA:-$cache/data}
gguf=${GGUF:-$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
limit=$((64 * 1024 * 1024))
# SQuAD v1.1 dev: BIG-bench's, or the substitute of scripts/fetch_assets.sh.
squad=$assets/bigbench/squad_shifts/squaddev_v1.1.json
[ -f "$squad" ] || squad=$assets/qa-substitute/squad_shifts/squaddev_v1.1.json
for f in "$gguf" "$bin/kv-distill" "$bin/kvd-data" "$squad"; do
  [ -e "$f" ] || { echo "device_carry: missing $f (run make build)" >&2; exit 1; }
done
[ -f "$data/train/multiqa/manifest.json" ] ||
  "$bin/kvd-data" prepare --assets "$assets" --out "file://$data"
out=$here/.dev
rm -rf "$out"/c[0-9]*
mkdir -p "$out/c1" "$out/c2" "$out/c3"
folders="c1 c2 c3"
if [ -n "${CKPT:-}" ]; then
  mkdir -p "$out/c4"
  cp "$CKPT"/ckpt-*.tar.part* "$out/c4/"
  folders="$folders c4"
fi
# gguf.part1 (c1), gguf.part2 (c2), gguf.part3.. (c5..):
# `assemble` concatenates gguf.part* in order.
part() { # part N OFFSET BYTES DIR: bytes OFFSET.. of the GGUF as DIR/gguf.partN
  dd if="$gguf" of="$4/gguf.part$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none
}
# Parts of 49.2 MB: with the repository's ~16.5 MB each stays under the
# tool's 64 MiB (SmolLM2's 98.4 MB GGUF is two parts).
P=49200000
part 1 0 $P "$out/c1"
part 2 $P $P "$out/c2"
size=$(stat -c %s "$gguf")
offset=$((2 * P)) n=3
while [ "$offset" -lt "$size" ]; do
  c=$out/c$((n + 2))
  mkdir -p "$c"
  part $n $offset $P "$c"
  folders="$folders c$((n + 2))"
  offset=$((offset + P)) n=$((n + 1))
done
xz -9e -T2 -c "$squad" > "$out/c3/squad.json.xz"
tar -C "$assets" -cJf "$out/c3/essays.tar.xz" essays
xz -9e -T2 -c "$bin/kv-distill" > "$out/c3/kvd.xz"
tar -C "$data" -cf "$out/c3/qa.tar" train/qa
tar -C "$data" -cf "$out/c3/rest.tar" train/text train/synth train/multiqa
repo=$(cd "$here" && git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for c in $folders; do
  size=$(du -cb "$out/$c" | tail -1 | cut -f1)
  echo "$out/$c: $size bytes (+ repository $repo; limit $limit)"
  if [ $((size + repo)) -gt "$limit" ]; then
    echo "device_carry: $c is over the device tool's limit" >&2
    exit 1
  fi
done
