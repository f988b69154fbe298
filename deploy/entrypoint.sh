#!/bin/sh
# kv-distill container entrypoint (the image's ENTRYPOINT; plain POSIX sh).
#
#   entrypoint.sh coordinator [FLAGS...]   -> exec coordinator FLAGS...
#   entrypoint.sh worker [FLAGS...]        -> exec kv-distill worker FLAGS...
#   entrypoint.sh kv-distill|kvd-data [ARGS...]  -> exec that binary (debugging,
#                                             data preparation)
#
# Before exec it makes the environment the binaries need (shared/GPU.md):
#   - a directory whose libnccl.so links to torch's own NCCL
#     (<site-packages>/nvidia/nccl/lib/libnccl.so.2) comes FIRST on
#     LD_LIBRARY_PATH, followed by torch's lib directory. cudarc dlopens
#     `libnccl.so`; found anywhere else (a system NCCL) it would be a second
#     NCCL beside the one libtorch_cuda loaded, and every collective fails.
#   - NCCL_NVLS_ENABLE=0 unless it is set.
#   - workers: KVD_RANK from JOB_COMPLETION_INDEX (set by Kubernetes in the pods
#     of an Indexed Job) when KVD_RANK is unset.
#
# Environment:
#   KVD_TORCH_SITE_PACKAGES  site-packages holding torch/ and nvidia/
#                            (default: the image's, below; on a dev machine e.g.
#                            ~/.cache/kv-distill/venv/lib/python3.11/site-packages)
#   KVD_TORCH_LIB            torch's lib directory (default: $KVD_TORCH_SITE_PACKAGES/torch/lib)
#   KVD_NCCL_DIR             where the libnccl.so link lives (default: the image's
#                            /opt/kvd/nccl when it is already right, else
#                            ${TMPDIR:-/tmp}/kvd-nccl-<uid>)
#   KVD_BIN_DIR              directory of the binaries (default: found on PATH),
#                            e.g. ~/.cache/kv-distill/target/release
# Everything else (KVD_COORDINATOR, KVD_TOKEN_FILE, AWS_*, ...) is left to the binaries.
set -eu

# Keep in sync with TORCH_SITE_PACKAGES in deploy/Dockerfile (make test-deploy checks).
image_site_packages=/opt/torch/.venv/lib/python3.11/site-packages
image_nccl_dir=/opt/kvd/nccl

die() {
    echo "entrypoint.sh: $*" >&2
    exit 2
}
warn() {
    echo "entrypoint.sh: warning: $*" >&2
}

[ $# -ge 1 ] || die "usage: entrypoint.sh coordinator|worker|kv-distill|kvd-data [ARGS...]"
role=$1
shift
case $role in
coordinator) bin_name=coordinator ;;
worker | kv-distill) bin_name=kv-distill ;;
kvd-data) bin_name=kvd-data ;;
*) die "unknown role '$role' (expected coordinator, worker, kv-distill or kvd-data)" ;;
esac

# --- torch's libraries and NCCL ---------------------------------------------------
site_packages=${KVD_TORCH_SITE_PACKAGES:-$image_site_packages}
torch_lib=${KVD_TORCH_LIB:-$site_packages/torch/lib}
nccl_so2=$site_packages/nvidia/nccl/lib/libnccl.so.2

# True when $1/libnccl.so is a link to exactly torch's libnccl.so.2.
nccl_link_ok() {
    [ -L "$1/libnccl.so" ] && [ "$(readlink "$1/libnccl.so")" = "$nccl_so2" ]
}
# Make $1/libnccl.so -> torch's libnccl.so.2, atomically (several processes may
# start at once on one machine): a new link beside it, renamed over the old one.
make_nccl_link() {
    mkdir -p "$1" 2>/dev/null || return 1
    tmp_link=$1/.libnccl.so.$$
    rm -f "$tmp_link"
    ln -s "$nccl_so2" "$tmp_link" 2>/dev/null || return 1
    mv -f "$tmp_link" "$1/libnccl.so" 2>/dev/null || {
        rm -f "$tmp_link"
        return 1
    }
}

nccl_dir=
if [ -e "$nccl_so2" ]; then
    if [ -n "${KVD_NCCL_DIR:-}" ]; then
        nccl_dir=$KVD_NCCL_DIR
    elif nccl_link_ok "$image_nccl_dir"; then
        nccl_dir=$image_nccl_dir
    else
        nccl_dir=${TMPDIR:-/tmp}/kvd-nccl-$(id -u)
    fi
    if ! nccl_link_ok "$nccl_dir" && ! make_nccl_link "$nccl_dir"; then
        fallback=${TMPDIR:-/tmp}/kvd-nccl-$(id -u)
        warn "cannot write $nccl_dir/libnccl.so; using $fallback"
        nccl_dir=$fallback
        make_nccl_link "$nccl_dir" || die "cannot create $nccl_dir/libnccl.so"
    fi
elif [ "$role" = worker ]; then
    warn "no torch NCCL at $nccl_so2 (set KVD_TORCH_SITE_PACKAGES); multi-GPU collectives will fail"
fi
if [ ! -d "$torch_lib" ] && [ "$bin_name" = kv-distill ]; then
    warn "no torch lib directory at $torch_lib (set KVD_TORCH_SITE_PACKAGES or KVD_TORCH_LIB)"
fi

# LD_LIBRARY_PATH = nccl_dir : torch_lib : the rest (without those two and
# without empty entries, which would mean the current directory).
rest=
old_ifs=$IFS
IFS=:
set -f # split on ':' only, no globbing
for entry in ${LD_LIBRARY_PATH:-}; do
    case $entry in
    "" | "$nccl_dir" | "$torch_lib") ;;
    *) rest=${rest:+$rest:}$entry ;;
    esac
done
set +f
IFS=$old_ifs
new_path=$torch_lib${rest:+:$rest}
[ -z "$nccl_dir" ] || new_path=$nccl_dir:$new_path
LD_LIBRARY_PATH=$new_path
export LD_LIBRARY_PATH

NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export NCCL_NVLS_ENABLE

# --- rank -------------------------------------------------------------------------
if [ "$role" = worker ] && [ -z "${KVD_RANK:-}" ] && [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
    case $JOB_COMPLETION_INDEX in
    *[!0-9]*) die "JOB_COMPLETION_INDEX is not a number: '$JOB_COMPLETION_INDEX'" ;;
    esac
    KVD_RANK=$JOB_COMPLETION_INDEX
    export KVD_RANK
fi

# --- the binary -------------------------------------------------------------------
if [ -n "${KVD_BIN_DIR:-}" ]; then
    bin=$KVD_BIN_DIR/$bin_name
    [ -x "$bin" ] || die "no executable $bin (KVD_BIN_DIR=$KVD_BIN_DIR)"
else
    bin=$(command -v "$bin_name") || die "$bin_name not found on PATH (set KVD_BIN_DIR)"
fi

if [ "$role" = worker ]; then
    exec "$bin" worker "$@"
fi
exec "$bin" "$@"
