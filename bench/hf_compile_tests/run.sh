#!/bin/bash
# usage: S13_VARIANT=torch|backend|compile ./run.sh [pytest args]; see conftest.py and bench/README.md
# S13_MODELS: model names under tests/models/ (default: session 13's six; bench/README.md lists session 14's);
# S13_FILES: test files, instead of S13_MODELS
cd "$(dirname "$0")"
export PYTHONPATH=${S13_AOTCACHE_SRC:?set S13_AOTCACHE_SRC to the aotcache checkout}:$PWD/deps:$PWD
export RUN_SLOW=1 S13_CPU_AS_ACCELERATOR=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
MODELS="${S13_MODELS:-llama gpt2 bert t5 mistral qwen2}"
FILES="${S13_FILES:-$(for m in $MODELS; do printf 'tests/models/%s/test_modeling_%s.py ' "$m" "$m"; done)}"
SEL="${S13_SEL:-(compil or no_recompile) and not export and not Integration and not flash_attn}"
exec timeout 3000 python -m pytest -p no:cacheprovider -q -rA $FILES -k "$SEL" "$@"
