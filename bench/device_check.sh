#!/usr/bin/env bash
# GPU check of issue #10 (aotcache on the GPU), for the device machine (one H200, torch 2.11+cu130, Triton 3.6).
#
# Runs, each stage under its own time limit so that the whole stays within about 8 minutes and every stage
# leaves its output under $OUT even when a later one runs out of time:
#   1. the `cuda` tests (tests/compilers/test_cuda.py)                                   ~3 min
#   2. bench/warmstart.py --device cuda on DEVICE_CHECK_MODELS (default llama_tiny)      ~4.5 min
#   3. (optional, DEVICE_CHECK_COLD_S > 0) bench/cold_profile.py --device cuda on DEVICE_CHECK_COLD_MODELS
#      (default llama_tiny): where the cold compile time goes, ours vs torch.compile      ~2 min per model
# Results (at most 8 files, as the device tool returns): $OUT/env.txt, compat_tests.log, cuda_tests.log, warmstart.log,
# warmstart_cuda.json. Copy warmstart_cuda.json to bench/results/ afterwards.
#
# The machine has no zstandard and no redis-py and cannot reach a registry: they travel as wheels.
#   here, once:   bash bench/device_check.sh --prepare          (downloads them into .whl/, which git ignores)
#   device tool:  run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=560)
# Knobs: DEVICE_CHECK_MODELS (comma list; the zoo models plus llama_tiny), DEVICE_CHECK_MODES (bench rows, in
# order), DEVICE_CHECK_TEST_S (default 220), DEVICE_CHECK_BENCH_S (default 260), DEVICE_CHECK_COLD_S (default 0:
# step 3 skipped; e.g. DEVICE_CHECK_TEST_S=0 DEVICE_CHECK_BENCH_S=0 DEVICE_CHECK_COLD_S=400 runs only step 3),
# DEVICE_CHECK_COLD_MODELS, DEVICE_CHECK_COLD_SIDES (default tc,ours,ours_nowarm: the last is ours without the
# early worker-pool start, i.e. before that fix). Results of step 3: $OUT/cold_profile.log, cold_profile_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
if [[ "${1:-}" == "--prepare" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" zstandard==0.25.0 redis==7.1.0
    exit $?
fi

OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODELS=${DEVICE_CHECK_MODELS:-llama_tiny}
TEST_S=${DEVICE_CHECK_TEST_S:-220}
BENCH_S=${DEVICE_CHECK_BENCH_S:-260}
COLD_S=${DEVICE_CHECK_COLD_S:-0}
COLD_MODELS=${DEVICE_CHECK_COLD_MODELS:-llama_tiny}
COLD_SIDES=${DEVICE_CHECK_COLD_SIDES:-tc,ours,ours_nowarm}
# most telling rows first: the JSON is rewritten after every row, so a run cut short keeps what it measured
MODES=${DEVICE_CHECK_MODES:-tc_cold,tc_warm,aot_inductor_cold,aot_inductor_warm,aot_cold,aot_warm,dynamo_floor,backend_cold,backend_warm}

# 0. what the machine lacks, from the carried wheels; the environment, for the record
if ! python3 -c "import zstandard, redis" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: run 'bash bench/device_check.sh --prepare' here and carry .whl" | tee "$OUT/env.txt"
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import sys, importlib.metadata as md, torch, aotcache
versions = {}
for name in ('triton', 'transformers', 'zstandard', 'redis'):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, versions)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0),
          'count', torch.cuda.device_count())
print('aotcache', aotcache.__file__)" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# 0b. every private torch name aotcache uses resolves in this torch (docs/compat.md): seconds, and it names a
#     missing one before a long compile would trip over it
if (( TEST_S > 0 )); then
    timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_torch_compat.py 2>&1 | tail -25 \
        | tee "$OUT/compat_tests.log"
fi

# 1. the cuda tests (each compiles for real: Inductor, AOTInductor, Triton)
if (( TEST_S > 0 )); then
    timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider -m cuda -rs --durations=10 \
        tests/compilers/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
    echo "cuda tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/cuda_tests.log"
fi

# 2. the warm-start benchmark on the GPU: fresh processes, aotcache's warm side with empty Inductor and Triton
#    caches (NOTE [GPU runs] in bench/warmstart.py)
if (( BENCH_S > 0 )); then
    timeout "$BENCH_S" python3 bench/warmstart.py --device cuda --models "$MODELS" --modes "$MODES" --timeout 150 \
        --output "$OUT/warmstart_cuda.json" 2>&1 | tee "$OUT/warmstart.log"
    echo "warmstart exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/warmstart.log"
fi

# 3. the cold-compile profile (stage -> seconds, ours vs torch.compile; docs/compilers.md "Where the cold time goes")
if (( COLD_S > 0 )); then
    timeout "$COLD_S" python3 bench/cold_profile.py --device cuda --models "$COLD_MODELS" --sides "$COLD_SIDES" \
        --timeout 200 --output "$OUT/cold_profile_cuda.json" 2>&1 | tee "$OUT/cold_profile.log"
    echo "cold_profile exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/cold_profile.log"
fi
ls -la "$OUT"
