#!/usr/bin/env bash
# The distributed acceptance run on a 2-GPU machine (device tool, nvidia-h200-x2),
# from the repo root:  bench/gpu_distributed.sh BIN_DIR MODEL DATA OUT
#   BIN_DIR  holds kv-distill and coordinator (release builds)
#   MODEL    SmolLM2-135M-Instruct GGUF;  DATA: a `kvd-data prepare`d train/qa
# 1. all-reduce: torch.distributed NCCL vs the Rust worker (cudarc NCCL) at the
#    same float32 sizes, plus the bucketed gradient all-reduce of the adaptor;
# 2. step throughput of the same job on 1 and GPUS GPUs (SCALE="1 2 4" for more),
#    32 examples per GPU per step;
# 3. kill -9 of rank 1 mid-step at 2 GPUs: recovery from the last checkpoint.
# Results go to OUT (logs, JSON lines); bench/summarize_distributed.py turns them
# into the tables of docs/BENCHMARKS.md.
set -euo pipefail
BIN=$1 MODEL=$2 DATA=$3 OUT=$4
GPUS=${GPUS:-2}
STEPS=${STEPS:-40}
SIZES=${SIZES:-262144,1048576,4194304,16777216,67108864,268435456}
PHASES=${PHASES:-"allreduce scaling recovery"}   # any subset, and hostload
TAG=${TAG:-}                                      # suffix of the scaling runs' names
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/gpu_env.sh"
mkdir -p "$OUT"
export KVD_TOKEN=bench-token RUST_BACKTRACE=0
"$BIN/kv-distill" devices | tee "$OUT/devices.txt"
nvidia-smi -L | tee -a "$OUT/devices.txt"

PY=${KVD_PYTHON:-/opt/torch/.venv/bin/python}
job() { # name workers global_batch steps [extra worker flags...]
  local name=$1 n=$2 gb=$3 steps=$4; shift 4
  local t0; t0=$(date +%s%N)
  ${PIN:+taskset -c "$PIN"} "$BIN/coordinator" --workers "$n" --listen 127.0.0.1:0 --heartbeat-timeout-s 5 \
    --checkpoint-url "file://$OUT/ckpt-$name" --keep-last 2 --log-format json --spawn-local -- \
    "$BIN/kv-distill" --log-format json worker --model "$MODEL" --device cuda --dtype bf16 \
    --data "file://$DATA" --no-verify-data --skip-bad-rows --steps "$steps" \
    --global-batch "$gb" --micro-batch 16 --max-len 1024 --warmup 5 --data-threads 4 \
    --log-every 1 --checkpoint-every 10 --out "$OUT/adaptor-$name.safetensors" "$@" \
    > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "$name: done in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
}
has() { [[ " $PHASES " == *" $1 "* ]]; }
if has allreduce; then
echo "== torch.distributed reference"
"$PY" -m torch.distributed.run --nproc-per-node "$GPUS" "$here/bench/allreduce_ref.py" "$SIZES" \
  > "$OUT/allreduce_torch.jsonl" 2> "$OUT/allreduce_torch.log" || tail -20 "$OUT/allreduce_torch.log"
cat "$OUT/allreduce_torch.jsonl"

echo "== Rust all-reduce"
job allreduce "$GPUS" 32 1 --bench-allreduce "$SIZES" --bench-out "$OUT/allreduce_rust.jsonl"
cat "$OUT/allreduce_rust.jsonl"
fi
if has scaling; then
echo "== scaling"
for n in ${SCALE:-1 $GPUS}; do
  job "scale$n$TAG" "$n" $((32 * n)) "$STEPS"
done
fi
if has hostload; then
# One GPU: is a host-bound step slowed by other busy cores (as beside other
# workers)? LOADS lists counts of busy-looping processes, one job each;
# PINS lists CPU sets (taskset) to run the job on, e.g. near and far from the GPU.
echo "== host load"
{ lscpu; nvidia-smi topo -m; } > "$OUT/cpu.txt" 2>&1 || true
grep -iE "numa|model name|^cpu\(s\)|mhz" "$OUT/cpu.txt" || true
i=0
for k in ${LOADS:-0 3 8 0}; do
  pids=()
  for _ in $(seq 1 "$k"); do (while :; do :; done) & pids+=($!); done
  job "load${k}_$((i++))" 1 32 "$STEPS"
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}"
done
for cpus in ${PINS:-}; do
  PIN=$cpus job "load0_$((i++))_$cpus" 1 32 "$STEPS"
done
fi
if has recovery; then
echo "== kill -9 of rank 1 at step 25"
KVD_CHAOS=kill:rank=1:step=25:at=step KVD_CHAOS_ONCE="$OUT/chaos-fired" job recovery "$GPUS" $((32 * GPUS)) "$STEPS"
fi
ls -la "$OUT"/ckpt-*/
"$PY" "$here/bench/summarize_distributed.py" "$OUT" "$GPUS" | tee "$OUT/summary.md"
