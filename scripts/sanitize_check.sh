#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer: a CPU-only build in
# build/sanitize (instrumented with -fsanitize=address,undefined -fno-sanitize-recover=all),
# installed to $MOEOPS_SANITIZE_OUT/inst, then the test suite with the ASan runtime preloaded
# (python itself is not instrumented). Any report aborts the run with a non-zero exit code;
# `--capture=sys` leaves file descriptor 2 alone so the report is printed, not swallowed.
# Skipped here: tests marked slow (the > 2^31-element runs need 2x memory under ASan).
# Extra arguments go to pytest. Used by .ci/run; see docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MOEOPS_SANITIZE_OUT:-/tmp/moeops-sanitize}
PY=${PYTHON:-python}
CXX_BIN=${CXX:-c++}
mkdir -p "$OUT"
MOEOPS_CUDA=OFF MOEOPS_SANITIZE=address,undefined \
  $PY -m pip install --no-build-isolation --no-deps -q --upgrade -C build-dir=build/sanitize \
  --target "$OUT/inst" .
export LD_PRELOAD="$($CXX_BIN -print-file-name=libasan.so) $($CXX_BIN -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 MOEOPS_UNDER_ASAN=1
PYTHONPATH="$OUT/inst" $PY -m pytest tests -q -p no:cacheprovider --capture=sys -m "not slow" "$@"
