#!/usr/bin/env bash
# One short lease of a GPU machine, in one command: the machine and its packages, the Pallas
# kernels' tests (tests/ops/test_pallas_gpu.py, whose TestPallasGpu runs the whole shared test
# base on the compiled kernels), then benchmarks/adder_conv_gpu.py with the arguments given.
# Logs, the tests' JUnit XML and the benchmark's JSON go to $OUT (default /tmp/adderjax-gpu).
# Runs from a source checkout without installing it (PYTHONPATH), under the machine's python3.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh --nets resnet20 --rounds 5 --train-rounds 3
#
# Environment: PYTHON (python3), TESTS (the test paths, tests/ops/test_pallas_gpu.py), WORKERS
# (pytest-xdist workers, 8), TEST_TIMEOUT and BENCH_TIMEOUT (seconds for each part, 150 and 270;
# the tests are interrupted, so that pytest still reports), SKIP_TESTS=1 or SKIP_BENCH=1 to run
# one part alone.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adderjax-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# Several test processes share the GPU: no process takes 75% of its memory up front.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 \
  XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  lscpu | grep -m1 'Model name'
  "$PY" -c 'import sys, jax, jaxlib, flax, optax; print(sys.version.split()[0], "jax", jax.__version__,
"jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # shellcheck disable=SC2086  # TESTS is a list of paths
  timeout -s INT -k 20 "${TEST_TIMEOUT:-150}" "$PY" -m pytest ${TESTS:-tests/ops/test_pallas_gpu.py} \
    -p no:cacheprovider -n "${WORKERS:-8}" -rfEs --junitxml="$OUT/tests.xml" 2>&1 \
    | grep -v "PytestBenchmarkWarning\|warner(" | tee "$OUT/tests.log"
  echo "tests: exit ${PIPESTATUS[0]}"
fi

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
timeout "${BENCH_TIMEOUT:-270}" "$PY" benchmarks/adder_conv_gpu.py --json "$OUT/adder_conv_gpu.json" \
  "$@" 2>&1 | tee "$OUT/bench.log"
echo "benchmark: exit ${PIPESTATUS[0]}"
