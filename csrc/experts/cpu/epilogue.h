// The up projection's epilogue for the CPU expert kernels: bias, activation, the gated product
// and (bf16 path) the rounding of the down projection's input, over one row of an item.
//
// Every element goes through the same arithmetic whatever its column: the AVX2 tier runs the
// tail of a row through the same 8-wide code (padded copies), so results do not depend on how a
// batch is cut into items (the fused op's rows do not depend on the batch).
#pragma once
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"
#include "experts/experts_prepare.h"

namespace moeops::cpu {

inline float act_fn(Act a, float x) {
  switch (a) {
    case Act::Silu: return x / (1.f + std::exp(-x));
    case Act::Gelu: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    case Act::GeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case Act::Relu: return x > 0.f ? x : 0.f;
    case Act::Relu2: return x > 0.f ? x * x : 0.f;
  }
  return x;
}

#ifdef MOEOPS_HAS_AVX2_PATH
// e^x in 8 lanes, at most 1 ulp from the correctly rounded value where that is a normal float
// (checked against double-precision exp at 35M points of [-86, 88.72], 2026-12-04): x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two so n ln2 is exact), e^r by a
// degree-7 polynomial (the classic single-precision minimax coefficients), times 2^n built in
// the exponent field (as 2^(n-1) * 2, so that n = 128 still fits). Above ln(FLT_MAX): +inf.
// Below -86 it returns e^-86 (about 4.5e-38); callers here only add it to 1. NaN lanes return
// a number; the callers' other operand carries the NaN.
MOEOPS_AVX2 inline __m256 exp8_avx2(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-86.f)), _mm256_set1_ps(88.7228394f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.f));
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ));
}

// act(x) in 8 lanes. SiLU and the ReLUs are vector code with the scalar version's results on
// NaN, +-0 and +-inf (the ReLUs map NaN to 0, as act_fn does); the GELUs go lane by lane
// through act_fn (erf / tanh).
MOEOPS_AVX2 inline __m256 act8_avx2(Act a, __m256 x) {
  switch (a) {
    case Act::Silu:
      return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    case Act::Relu: return _mm256_max_ps(x, _mm256_setzero_ps());  // max(NaN, 0) = 0
    case Act::Relu2: {
      const __m256 p = _mm256_max_ps(x, _mm256_setzero_ps());
      return _mm256_mul_ps(p, p);
    }
    default: {
      alignas(32) float v[8];
      _mm256_store_ps(v, x);
      for (float& f : v) f = act_fn(a, f);
      return _mm256_load_ps(v);
    }
  }
}

// One 8-wide step of act_epilogue (see there) at g, u, bg, bu, ob (each already offset).
MOEOPS_AVX2 inline void act_epilogue8_avx2(Act a, float* g, const float* u, const float* bg, const float* bu,
                                           c10::BFloat16* ob) {
  __m256 v = act8_avx2(a, _mm256_add_ps(_mm256_loadu_ps(g), bg ? _mm256_loadu_ps(bg) : _mm256_setzero_ps()));
  if (u) v = _mm256_mul_ps(v, _mm256_add_ps(_mm256_loadu_ps(u), bu ? _mm256_loadu_ps(bu) : _mm256_setzero_ps()));
  if (ob) {
    store8(ob, v);
    v = load8(ob);
  }
  _mm256_storeu_ps(g, v);
}

MOEOPS_AVX2 inline void act_epilogue_avx2(Act a, float* g, const float* u, const float* bg, const float* bu,
                                          c10::BFloat16* ob, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    act_epilogue8_avx2(a, g + j, u ? u + j : nullptr, bg ? bg + j : nullptr, bu ? bu + j : nullptr,
                       ob ? ob + j : nullptr);
  if (j == n) return;
  // the tail through the same code, in padded copies
  const int64_t t = n - j;
  float tg[8] = {}, tu[8] = {}, tbg[8] = {}, tbu[8] = {};
  c10::BFloat16 tob[8];
  std::memcpy(tg, g + j, t * sizeof(float));
  if (u) std::memcpy(tu, u + j, t * sizeof(float));
  if (bg) std::memcpy(tbg, bg + j, t * sizeof(float));
  if (bu) std::memcpy(tbu, bu + j, t * sizeof(float));
  act_epilogue8_avx2(a, tg, u ? tu : nullptr, bg ? tbg : nullptr, bu ? tbu : nullptr, ob ? tob : nullptr);
  std::memcpy(g + j, tg, t * sizeof(float));
  if (ob) std::memcpy(ob + j, tob, t * sizeof(c10::BFloat16));
}
#endif

// In place over j in [0, n): g[j] = act(g[j] + bg[j]) * (u[j] + bu[j]), where u == nullptr means
// no product (plain experts) and a null bias adds 0 (so -0 becomes +0 either way). ob (optional):
// the result is rounded to bf16 and stored there, and g keeps the rounded value.
inline void act_epilogue(Act a, float* g, const float* u, const float* bg, const float* bu, c10::BFloat16* ob,
                         int64_t n) {
#ifdef MOEOPS_HAS_AVX2_PATH
  if (use_avx2()) {
    act_epilogue_avx2(a, g, u, bg, bu, ob, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    float v = act_fn(a, g[j] + (bg ? bg[j] : 0.f));
    if (u) v *= u[j] + (bu ? bu[j] : 0.f);
    if (ob) {
      ob[j] = c10::BFloat16(v);
      v = static_cast<float>(ob[j]);
    }
    g[j] = v;
  }
}

}  // namespace moeops::cpu
