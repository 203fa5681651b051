#!/usr/bin/env bash
# Installs everything aotcache and its tests need on a machine that has only Python and gcc:
#   torch==2.13.0 (CPU build) when no torch is importable, redis-server from Debian when missing,
#   then this project in editable mode with its test and bench extras. Safe to run again (a no-op then).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing torch==2.13.0 (pinned: any looser request pulls a CUDA build)"
    "$PY" -m pip install --quiet "torch==2.13.0"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup: installing redis-server from Debian"
    SUDO=""
    if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # The Debian package starts a system-wide server; the tests start their own on a free port.
fi

if ! "$PY" -c "import aotcache, hypothesis, pytest_timeout, xdist, diskcache, transformers, accelerate" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$(ls -d *.egg-info 2>/dev/null | head -n1 || echo pyproject.toml)" ]; then
    echo "setup: installing aotcache with its test and bench extras"
    "$PY" -m pip install --quiet -e ".[test,bench]"
fi
"$PY" -c "import torch; print('setup: torch', torch.__version__)"
