# Source this before starting any kv-distill binary on a GPU machine:
#   [KVD_TORCH_SITE=/path/to/site-packages] . scripts/gpu_env.sh
# It puts torch's own libtorch and NCCL first on the library path. cudarc
# dlopens `libnccl.so`; if that resolves to a system NCCL while libtorch_cuda has
# already loaded torch's copy, two NCCLs collide ("corrupted comm object").
# The link below makes `libnccl.so` mean torch's libnccl.so.2.
_kvd_sp=${KVD_TORCH_SITE:-}
if [ -z "$_kvd_sp" ]; then
  for _kvd_py in "${KVD_PYTHON:-}" /opt/torch/.venv/bin/python python3; do
    [ -n "$_kvd_py" ] && command -v "$_kvd_py" >/dev/null 2>&1 || continue
    _kvd_sp=$("$_kvd_py" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null) && break
  done
fi
if [ -z "$_kvd_sp" ] || [ ! -d "$_kvd_sp/torch/lib" ]; then
  echo "gpu_env.sh: cannot find torch's site-packages (set KVD_TORCH_SITE)" >&2
  return 1 2>/dev/null || exit 1
fi
KVD_NCCL_DIR=${KVD_NCCL_DIR:-/tmp/kvd-nccl}
mkdir -p "$KVD_NCCL_DIR"
if [ -e "$_kvd_sp/nvidia/nccl/lib/libnccl.so.2" ]; then
  ln -sf "$_kvd_sp/nvidia/nccl/lib/libnccl.so.2" "$KVD_NCCL_DIR/libnccl.so"
fi
export LD_LIBRARY_PATH="$KVD_NCCL_DIR:$_kvd_sp/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
unset _kvd_sp _kvd_py
