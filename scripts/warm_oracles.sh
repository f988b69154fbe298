#!/usr/bin/env bash
# Runs the slow Python oracles (transformers loading the real GGUF files) into
# the cache that tests/src/env.rs `cached_oracle` reads, so they run while
# cargo compiles instead of after. Same key: sha256(script bytes, "\0"-joined args).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
KVD_CACHE=${KVD_CACHE:-$HOME/.cache/kv-distill}
PY=${KVD_PYTHON:-$KVD_CACHE/venv/bin/python}
A=$KVD_CACHE/assets
warm() { # script args...
  local script=$here/tests/oracle/$1; shift
  local key
  key=$({ cat "$script"; for a in "$@"; do printf '\0%s' "$a"; done; } | sha256sum | cut -d' ' -f1)
  local dir=$KVD_CACHE/oracle/$key
  mkdir -p "$KVD_CACHE/oracle"
  (
    flock 9  # the same lock the Rust side takes (std::fs::File::lock)
    [ -f "$dir/done" ] && exit 0
    rm -rf "$dir" && mkdir -p "$dir"
    HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error "$PY" "$script" "$@" "$dir" > "$dir/stdout.txt" 2> "$dir/stderr.txt"
    printf '%s' "$key" > "$dir/done"
  ) 9> "$KVD_CACHE/oracle/$key.lock"
}
for m in smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gemma3/gemma-3-270m-q4_k_m.gguf; do
  warm gguf_reference.py "$A/$m" "$A/essays/worked.txt"
done
