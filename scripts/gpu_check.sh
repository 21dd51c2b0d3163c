#!/usr/bin/env bash
# One-command GPU check for any CUDA machine with torch, nvcc, cmake and ninja but no network.
# Order, most important results first: install the wheel prebuilt for this exact source
# (scripts/prebuild_gpu_wheel.sh, folder prebuilt/) or else build from the checkout; the
# CUDA/Triton tests; compute-sanitizer memcheck on small cases of every CUDA op; the grouped-GEMM
# and fused-layer benchmarks; racecheck; then a compact table. Each step is time-capped and
# no step starts after $MOEOPS_GPU_DEADLINE (default 465 s), so the script ends within 8 min.
# Full logs go to $MOEOPS_GPU_OUT (default ./gpu_out); with MOEOPS_GPU_PACK=1 they end up in one
# file there, gpu_check_logs.tar.gz (the device tool brings back at most 8 files).
# Wheels in ./wheels (e.g. nvidia-cutlass for the headers) are installed first, offline.
# A rerun after a fix (15 minutes of device time leave room for a short one): MOEOPS_GPU_STEPS
# names the steps to run after the install (e.g. "tests,memcheck"), and MOEOPS_GPU_TESTS the
# pytest targets of the tests step (default: tests, i.e. every test marked cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${MOEOPS_GPU_OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
declare -A status
DEADLINE=${MOEOPS_GPU_DEADLINE:-465}  # seconds for the whole script (the table included)
ONLY=${MOEOPS_GPU_STEPS:-}
step() {  # step NAME CAP CMD...: run for at most CAP s (less near the deadline), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - (t0 - T0) - 5 ))
  case " wheels prebuilt build " in
    *" $name "*) ;;  # installing: always, with its own cap (nothing else can run without it)
    *) if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
       if (( left < 15 )); then status[$name]="skipped (deadline)"; echo "[$name] skipped: deadline"; return 124; fi
       (( limit > left )) && limit=$left ;;
  esac
  local args=("${@//@STOP@/$(( limit * 7 / 10 ))}")  # @STOP@: a benchmark's own --deadline
  timeout "$limit" "${args[@]}" > "$OUT/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc $(( $(date +%s) - t0 ))s"
  echo "[$name] ${status[$name]} (at $(( $(date +%s) - T0 ))s)"
  return $rc
}

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
{ git rev-parse HEAD 2>/dev/null || echo "no git"; bash scripts/source_hash.sh; } > "$OUT/commit.txt"
if ls wheels/*.whl > /dev/null 2>&1; then
  step wheels 120 $PY -m pip install --no-index --no-deps wheels/*.whl
fi
PYTAG=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
installed=""
if ls prebuilt/moeops-*-"$PYTAG"-*.whl > /dev/null 2>&1 \
   && [ "$(cat prebuilt/SOURCE_HASH 2>/dev/null)" = "$(bash scripts/source_hash.sh)" ]; then
  step prebuilt 120 bash -c "$PY -m pip install --no-index --no-deps --force-reinstall prebuilt/moeops-*-$PYTAG-*.whl \
    && cd /tmp && $PY -c 'import moeops; assert moeops._C.with_cuda; print(moeops._C.cuda_archs)'" && installed=1
fi
if [ -z "$installed" ]; then
  export MOEOPS_CUDA=ON MOEOPS_CUDA_ARCHS=${MOEOPS_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  step build 360 $PY -m pip install -v --no-build-isolation --no-deps . || { tail -50 "$OUT/build.log"; exit 1; }
fi
(cd /tmp && $PY -m moeops.info) > "$OUT/info.log" 2>&1
export PYTHONUNBUFFERED=1
XDIST=""
$PY -c "import xdist" 2> /dev/null && XDIST="-n ${MOEOPS_GPU_XDIST:-4}"  # pytest workers (Triton compiles on the CPU)
PERTEST=""  # one hung test must not eat the step: pytest-timeout where installed
$PY -c "import pytest_timeout" 2> /dev/null && PERTEST="--timeout 100"
# -v: every test's outcome is in the log as it finishes, so a step cut by its cap still says
# which tests passed and failed
step tests 180 $PY -m pytest -v -rfE -m cuda ${MOEOPS_GPU_TESTS:-tests} -p no:cacheprovider $XDIST $PERTEST --junitxml="$OUT/tests.xml"
step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py
step bench_gemm 90 $PY -m moeops bench --suite gemm --device cuda --time-budget 0.3 --repeats 20 --quiet \
  --deadline @STOP@ --json "$OUT/bench_gemm.json"
step bench 120 $PY -m moeops bench --device cuda --min-runs 3 --repeats 10 --time-budget 0.3 --quiet \
  --deadline @STOP@ --json "$OUT/bench.json"
step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py
# then, if time is left: whole layers with the grouped GEMMs forced onto mma.sync / CUTLASS sm_90a
# at 16-128 rows per expert on average (Qwen3-30B-A3B: T / 16), where auto switches (kSm90MinAvgRows)
PATHS=moeops,moeops-mma
$PY -c "import moeops, torch; assert moeops._C.sm90_grouped_gemm and torch.cuda.get_device_capability()[0] == 9" \
  2> /dev/null && PATHS=$PATHS,moeops-sm90
step bench_paths 60 $PY -m moeops bench --device cuda --models qwen3-30b-a3b --dtypes bf16 \
  --tokens 256,512,1024,2048 --peers $PATHS --min-runs 3 --repeats 10 --time-budget 0.2 --quiet \
  --deadline @STOP@ --json "$OUT/bench_paths.json"
# last, only if time is left: the Triton autotuner's choices on two prefill shapes (for _CANDIDATES)
step triton_tune 60 $PY -m moeops bench --suite gemm --device cuda --peers triton,triton-tuned,torch \
  --models qwen3-30b-a3b,mixtral-8x7b --tokens 512,4096 --time-budget 0.2 --repeats 10 --quiet \
  --deadline @STOP@ --json "$OUT/bench_triton_tune.json"

# the benchmark tables first, then the status, tests and sanitizer lines: the device tool keeps
# the last 12,000 characters of the output, so what matters most is printed last
for s in bench_gemm bench bench_paths triton_tune; do
  if [ -f "$OUT/$s.log" ]; then cat "$OUT/$s.log"; fi
done
echo "================ moeops GPU check ($(head -c 10 "$OUT/commit.txt"), $(( $(date +%s) - T0 ))s) ================"
grep -m1 -E "NVIDIA H|NVIDIA A|NVIDIA B" "$OUT/nvidia-smi.log" || true
grep -E "^(torch|cuda_kernels_built|cuda_archs|sm90_grouped_gemm|triton) " "$OUT/info.log"
for s in wheels prebuilt build tests bench_gemm bench memcheck racecheck bench_paths triton_tune; do
  [ -n "${status[$s]:-}" ] && printf "%-10s %s\n" "$s" "${status[$s]}"
done
if [ -f "$OUT/tests.log" ]; then
  tail -1 "$OUT/tests.log"
  echo "tests passed: $(grep -c " PASSED" "$OUT/tests.log"), failed: $(grep -c " FAILED" "$OUT/tests.log"), skipped: $(grep -c " SKIPPED" "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -30
  grep -qE "^(FAILED|ERROR) " "$OUT/tests.log" || grep -E " (FAILED|ERROR) " "$OUT/tests.log" | head -30
fi
# (compute-sanitizer refuses the device on some machines, e.g. under gVisor: "Device not supported")
grep -HE "ERROR SUMMARY|RACECHECK SUMMARY|mismatches|not supported" "$OUT/memcheck.log" "$OUT/racecheck.log" 2> /dev/null \
  | sed "s|^$OUT/||"
if [ -n "${MOEOPS_GPU_PACK:-}" ]; then
  pack=$(mktemp) && tar czf "$pack" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$pack" "$OUT/gpu_check_logs.tar.gz"
fi
