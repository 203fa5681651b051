#!/bin/bash
# usage: S13_VARIANT=torch|backend|compile ./run.sh [pytest args]; see conftest.py and bench/README.md
cd "$(dirname "$0")"
export PYTHONPATH=${S13_AOTCACHE_SRC:?set S13_AOTCACHE_SRC to the aotcache checkout}:$PWD/deps:$PWD
export RUN_SLOW=1 S13_CPU_AS_ACCELERATOR=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
FILES="${S13_FILES:-tests/models/llama/test_modeling_llama.py tests/models/gpt2/test_modeling_gpt2.py tests/models/bert/test_modeling_bert.py tests/models/t5/test_modeling_t5.py tests/models/mistral/test_modeling_mistral.py tests/models/qwen2/test_modeling_qwen2.py}"
SEL="${S13_SEL:-(compil or no_recompile) and not export and not Integration and not flash_attn}"
exec timeout 3000 python -m pytest -p no:cacheprovider -q -rA $FILES -k "$SEL" "$@"
