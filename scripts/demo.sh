#!/usr/bin/env bash
# The main job: a demo of aotcache, after installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m aotcache.demo "$@"
