#!/usr/bin/env bash
# Interleaved A/B of the CPU expert GEMM (csrc/experts/cpu/gemm_blocks.h, gemm_dot): the
# working tree's csrc (or revision MOEOPS_AB_NEW's) against revision BASE's (default HEAD), both
# compiled into one process; base and new alternate on the same data for 21 rounds, the order
# flipping every round, and each case prints both medians in GFLOP/s, their ratio, and whether
# the outputs are bit-equal (exit 1 if not). Made for this project's noisy 2-core machines,
# where whole-layer runs in separate processes drift by 2x. Functions and loops are aligned to
# 64 bytes in both copies: without that, two copies of the same source differed by up to 15%
# (code placement; 2026-12-03, Zen 3). Run it on an otherwise idle machine; it uses one thread.
#   bash scripts/kernel_ab.sh [BASE] ["M N K E fp32|bf16|bf16x" ...]
# Default cases: Qwen3-30B-A3B's up (N=1536, K=2048) and down (N=2048, K=768) projections with 16
# and 48 rows against each of E=8 experts (fp32 weights; bf16 weights widened), and one row
# (decode). "bf16x" times gemm_dot_bf16 (bf16 activations and weights, the bf16 layer's GEMM on
# AVX512-BF16 CPUs; needs MOEOPS_AB_ISA=avx512bf16). MOEOPS_AB_ISA picks the tier (avx2, the default; avx512bf16 where the CPU has it;
# portable); MOEOPS_AB_FLAGS adds compiler flags. Needs git, a C++ compiler and torch (headers,
# libc10) in $PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD}
shift || true
PY=${PYTHON:-python}
CXX_BIN=${CXX:-c++}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
case "${MOEOPS_AB_ISA:=avx2}" in
  avx2 | portable) ;;
  avx512bf16) grep -qw avx512_bf16 /proc/cpuinfo || { echo "this CPU has no AVX512-BF16" >&2; exit 2; } ;;
  *) echo "MOEOPS_AB_ISA must be avx2, avx512bf16 or portable, not '$MOEOPS_AB_ISA'" >&2; exit 2 ;;
esac
mkdir -p "$OUT/base"
git archive "$BASE" csrc | tar -x -C "$OUT/base"
NEW_SRC=csrc
if [ -n "${MOEOPS_AB_NEW:-}" ]; then
  mkdir -p "$OUT/new"
  git archive "$MOEOPS_AB_NEW" csrc | tar -x -C "$OUT/new"
  NEW_SRC="$OUT/new/csrc"
fi
TORCH=$($PY -c "import os, torch; print(os.path.dirname(torch.__file__))")
FLAGS=(-O3 -std=gnu++20 -falign-functions=64 -falign-loops=64 -I"$TORCH/include" ${MOEOPS_AB_FLAGS:-})
$CXX_BIN "${FLAGS[@]}" -I"$OUT/base/csrc" -DMOEOPS_AB_NS=cpu_base -c bench/kernel_ab/gemm_tu.cpp -o "$OUT/base.o"
$CXX_BIN "${FLAGS[@]}" -I"$NEW_SRC" -DMOEOPS_AB_NS=cpu_new -c bench/kernel_ab/gemm_tu.cpp -o "$OUT/new.o"
$CXX_BIN "${FLAGS[@]}" bench/kernel_ab/main.cpp "$OUT/base.o" "$OUT/new.o" -o "$OUT/ab" \
  -L"$TORCH/lib" -lc10 -Wl,-rpath,"$TORCH/lib"
if [ $# -eq 0 ]; then
  set -- "16 1536 2048 8 fp32" "48 1536 2048 8 fp32" "16 2048 768 8 fp32" "16 1536 2048 8 bf16" \
         "1 1536 2048 8 fp32" "1 1536 2048 8 bf16"
fi
NEW_NAME="working tree"
[ -n "${MOEOPS_AB_NEW:-}" ] && NEW_NAME=$(git rev-parse --short "$MOEOPS_AB_NEW")
echo "base: $(git rev-parse --short "$BASE"), new: $NEW_NAME; tier: $MOEOPS_AB_ISA; $(date -u +%FT%TZ)"
status=0
for c in "$@"; do
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 MOEOPS_AB_ISA=$MOEOPS_AB_ISA "$OUT/ab" $c || status=1
done
exit $status
