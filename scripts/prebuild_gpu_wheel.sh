#!/usr/bin/env bash
# Builds, on a machine without a GPU, the wheel scripts/gpu_check.sh installs on the GPU machine
# instead of compiling there (minutes of GPU time saved). PYTHON must match the GPU machine's
# Python and torch (there: Python 3.12, torch 2.11.0+cu130; see docs/performance.md), with
# scikit-build-core, pybind11, cmake, ninja and nvidia-cutlass installed. Writes
# prebuilt/moeops-*.whl and prebuilt/SOURCE_HASH; carry the folder `prebuilt` to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:?set PYTHON to a python with the GPU machine\'s version and torch}
rm -rf prebuilt && mkdir -p prebuilt
MOEOPS_CUDA=ON MOEOPS_CUTLASS=ON MOEOPS_CUDA_ARCHS=${MOEOPS_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$PY" -m pip wheel --no-build-isolation --no-deps -w prebuilt .
bash scripts/source_hash.sh > prebuilt/SOURCE_HASH
"$PY" -c "import torch, sys; print(f'built with torch {torch.__version__}, python {sys.version.split()[0]}')" \
  | tee prebuilt/BUILT_WITH
ls -la prebuilt
