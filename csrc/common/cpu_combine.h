// Deterministic weighted combine of one token's expert rows (fp32 accumulation in slot order),
// shared by the combine op and the fused experts op.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cpu_vec.h"

namespace moeops::cpu {

// out[t] = sum_k w[t,k] * x[inv[t,k]] accumulated in fp32 in slot order.
template <class Tin, class Tout>
void combine_token_portable(const Tin* x, int64_t H, const float* w, const int32_t* inv, int K,
                            float* acc, Tout* out) {
  std::fill(acc, acc + H, 0.f);
  for (int k = 0; k < K; ++k) {
    if (inv[k] < 0) continue;
    const Tin* row = x + static_cast<int64_t>(inv[k]) * H;
    const float wk = w[k];
    for (int64_t h = 0; h < H; ++h) acc[h] += wk * to_f32(row[h]);
  }
  for (int64_t h = 0; h < H; ++h) out[h] = from_f32<Tout>(acc[h]);
}

#ifdef MOEOPS_HAS_AVX2_PATH
// 32 columns at a time in registers, all K rows streamed into them, then one store.
template <class Tin, class Tout>
MOEOPS_AVX2 void combine_token_avx2(const Tin* x, int64_t H, const float* w, const int32_t* inv, int K,
                                    float* acc, Tout* out) {
  int64_t h = 0;
  for (; h + 32 <= H; h += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; ++k) {
      if (inv[k] < 0) continue;
      const Tin* row = x + static_cast<int64_t>(inv[k]) * H + h;
      const __m256 wk = _mm256_set1_ps(w[k]);
      a0 = _mm256_fmadd_ps(wk, load8(row), a0);
      a1 = _mm256_fmadd_ps(wk, load8(row + 8), a1);
      a2 = _mm256_fmadd_ps(wk, load8(row + 16), a2);
      a3 = _mm256_fmadd_ps(wk, load8(row + 24), a3);
    }
    store8(out + h, a0);
    store8(out + h + 8, a1);
    store8(out + h + 16, a2);
    store8(out + h + 24, a3);
  }
  if (h < H) {  // tail: same fp32 slot-order accumulation, scalar
    const int64_t n = H - h;
    std::fill(acc, acc + n, 0.f);
    for (int k = 0; k < K; ++k) {
      if (inv[k] < 0) continue;
      const Tin* row = x + static_cast<int64_t>(inv[k]) * H + h;
      for (int64_t i = 0; i < n; ++i) acc[i] = std::fma(w[k], to_f32(row[i]), acc[i]);
    }
    for (int64_t i = 0; i < n; ++i) out[h + i] = from_f32<Tout>(acc[i]);
  }
}
#endif

// out[0:H] = sum_k w[k] * x[inv[k]] over k with inv[k] >= 0; x rows of length H.
template <class Tin, class Tout>
inline void combine_token(bool avx2, const Tin* x, int64_t H, const float* w, const int32_t* inv, int K,
                          float* acc, Tout* out) {
#ifdef MOEOPS_HAS_AVX2_PATH
  if (avx2) return combine_token_avx2(x, H, w, inv, K, acc, out);
#endif
  combine_token_portable(x, H, w, inv, K, acc, out);
}

}  // namespace moeops::cpu
