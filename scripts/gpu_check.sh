#!/usr/bin/env bash
# One-command GPU check for any CUDA machine with torch, nvcc, cmake and ninja but no network:
# build from this checkout, run every CUDA test, compute-sanitizer on small cases of every CUDA
# op, the GPU benchmark, then a compact table. Full logs go to $MOEOPS_GPU_OUT (./gpu_out).
# Wheels placed in ./wheels (e.g. a newer cmake) are installed first, offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${MOEOPS_GPU_OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
declare -A status
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, record status
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc $(( $(date +%s) - t0 ))s"
  echo "[$name] ${status[$name]}"
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
if ls wheels/*.whl > /dev/null 2>&1; then
  step wheels 120 $PY -m pip install --no-index --find-links wheels wheels/*.whl
fi
export MOEOPS_CUDA=ON MOEOPS_CUDA_ARCHS=${MOEOPS_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=16
step build 300 $PY -m pip install -v --no-build-isolation --no-deps . || { tail -50 "$OUT/build.log"; exit 1; }
(cd /tmp && $PY -m moeops.info) > "$OUT/info.log" 2>&1
step tests 300 $PY -m pytest -q -x tests -p no:cacheprovider --junitxml="$OUT/tests.xml"
step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py
step racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py
step bench 300 $PY -m moeops bench --device cuda --repeats 20 --time-budget 1 --json "$OUT/bench.json"

echo "================ moeops GPU check ($(cat "$OUT/commit.txt" 2>/dev/null | cut -c1-10)) ================"
grep -m1 -E "^\|? *[0-9]+ +NVIDIA|NVIDIA H|NVIDIA A" "$OUT/nvidia-smi.log" || true
grep -E "cuda_kernels_built|cuda_archs|torch " "$OUT/info.log"
for s in wheels build tests memcheck racecheck bench; do [ -n "${status[$s]:-}" ] && printf "%-10s %s\n" "$s" "${status[$s]}"; done
tail -1 "$OUT/tests.log"
grep -E "ERROR SUMMARY|mismatches" "$OUT/memcheck.log" "$OUT/racecheck.log"
cat "$OUT/bench.log"
