#!/usr/bin/env bash
# A hash of everything a moeops wheel is built from (run from the repository root). A wheel
# built ahead of time (scripts/prebuild_gpu_wheel.sh) records it; scripts/gpu_check.sh installs
# that wheel only when the checkout still hashes the same.
set -euo pipefail
cd "$(dirname "$0")/.."
find CMakeLists.txt pyproject.toml cmake csrc python -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
  ! -name '_build.json' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
