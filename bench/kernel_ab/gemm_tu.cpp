// One copy of the CPU expert GEMM (csrc/experts/cpu/gemm_blocks.h) for scripts/kernel_ab.sh.
// Compiled twice, against two source trees, with MOEOPS_AB_NS naming the namespace each copy
// lives in (the header's `moeops::cpu` becomes `moeops::<ns>`), so one process holds both.
#define cpu MOEOPS_AB_NS
#include <cstdlib>
#include <cstring>

#include "experts/cpu/gemm_blocks.h"

namespace moeops::MOEOPS_AB_NS {
// the tier both copies run: MOEOPS_AB_ISA=avx2 (default) | avx512bf16 | portable
Isa active_isa() {
  static const Isa isa = [] {
    const char* s = std::getenv("MOEOPS_AB_ISA");
    if (s && !std::strcmp(s, "avx512bf16")) return Isa::Avx512Bf16;
    if (s && !std::strcmp(s, "portable")) return Isa::Portable;
    return Isa::Avx2;
  }();
  return isa;
}
}  // namespace moeops::MOEOPS_AB_NS

#define AB_CAT2(a, b) a##b
#define AB_CAT(a, b) AB_CAT2(a, b)
void AB_CAT(gemm_f32_, MOEOPS_AB_NS)(const float* A, int64_t lda, int64_t M, const float* B, int64_t N, int64_t K,
                                     float* C) {
  moeops::MOEOPS_AB_NS::gemm_dot<float>(A, lda, M, B, K, N, K, C, N, false);
}
void AB_CAT(gemm_bf16w_, MOEOPS_AB_NS)(const float* A, int64_t lda, int64_t M, const c10::BFloat16* B, int64_t N,
                                       int64_t K, float* C) {
  moeops::MOEOPS_AB_NS::gemm_dot<c10::BFloat16>(A, lda, M, B, K, N, K, C, N, false);
}
void AB_CAT(gemm_bf16x_, MOEOPS_AB_NS)(const c10::BFloat16* A, int64_t lda, int64_t M, const c10::BFloat16* B,
                                       int64_t N, int64_t K, float* C) {
  moeops::MOEOPS_AB_NS::gemm_dot_bf16(A, lda, M, B, K, N, K, C, N, false);
}
