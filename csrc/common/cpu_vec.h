// Element conversions for CPU kernels: scalar (portable) and 8-wide AVX2 (fp32 in registers).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

#include "common/launch_types.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moeops::cpu {

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }
template <class T> inline T from_f32(float x) { return static_cast<T>(x); }

// Calls f(T{}) with T the C++ type of a moeops float dtype.
template <class F>
void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(c10::Half{}); break;
    case DType::BF16: f(c10::BFloat16{}); break;
  }
}

#if defined(__x86_64__)
#define MOEOPS_HAS_AVX2_PATH 1
#define MOEOPS_AVX2 __attribute__((target("avx2,fma,f16c")))

MOEOPS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOEOPS_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
MOEOPS_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MOEOPS_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MOEOPS_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// Round to nearest even, NaN -> quiet NaN (same as c10::BFloat16's conversion).
MOEOPS_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(nan));
  r = _mm256_srli_epi32(r, 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

}  // namespace moeops::cpu
