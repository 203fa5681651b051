#!/usr/bin/env bash
# The whole test suite, after installing what it needs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -n 2 --dist loadfile "$@"
