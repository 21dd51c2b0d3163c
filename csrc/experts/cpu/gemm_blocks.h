// Register-blocked GEMM building blocks for the CPU expert kernels (fp32 accumulation).
//
// dot form   C[m, n] = sum_k A[m, k] * B[n, k]   B = weight rows [N, K] (nn.Linear / HF layout)
// axpy form  C[m, n] = sum_k A[m, k] * B[k, n]   B = transposed weights [K, N]
//
// A is always fp32 (rows are gathered and widened once per call); B is float, c10::Half or
// c10::BFloat16 and is widened to fp32 in registers. Each block has an AVX2/FMA version
// (target attribute, chosen at run time) and a portable version with the same loop structure.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vec.h"

namespace moeops::cpu {

// ------------------------------------------------------------------ dot form, portable
template <int MR, int NR, class W>
inline void dot_block_portable(const float* A, int64_t lda, const W* B, int64_t ldb, int64_t K, float* C,
                               int64_t ldc, bool accumulate) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    float b[NR];
    for (int n = 0; n < NR; ++n) b[n] = to_f32(B[n * ldb + k]);
    for (int m = 0; m < MR; ++m) {
      const float a = A[m * lda + k];
      for (int n = 0; n < NR; ++n) acc[m][n] += a * b[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) C[m * ldc + n] = accumulate ? C[m * ldc + n] + acc[m][n] : acc[m][n];
}

#ifdef MOEOPS_HAS_AVX2_PATH
MOEOPS_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// The sums of the 8 lanes of a, b, c and d, as one vector, each by hsum8's tree: lanes i and
// i+4 first, then (0+2) + (1+3). A 4x4 transpose puts the four trees side by side, so each
// output gets the same bits whether it is reduced with three others or alone.
MOEOPS_AVX2 inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m128 r0 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  __m128 r1 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
  __m128 r2 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
  __m128 r3 = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_i = lane i of a, b, c, d
  return _mm_add_ps(_mm_add_ps(r0, r2), _mm_add_ps(r1, r3));
}

// MR x NR accumulators of 8 lanes each; K in steps of 8, scalar tail.
// `prefetch`: the next weight panel (NR rows, stride ldb), pulled into L2 during this block's
// k-loop so that its memory reads overlap this panel's arithmetic; null for none. With
// pf_parts > 1 the block takes only the lines l with l % pf_parts == pf_part (the panel's row
// blocks share the prefetch).
template <int MR, int NR, class W>
MOEOPS_AVX2 inline void dot_block_avx2(const float* A, int64_t lda, const W* B, int64_t ldb, int64_t K, float* C,
                                       int64_t ldc, bool accumulate, const W* prefetch = nullptr, int pf_part = 0,
                                       int pf_parts = 1) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per 64-byte line
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  // the k of this block's next prefetched line (its share: every pf_parts-th line); past K: none
  int64_t pf_k = prefetch ? pf_part * kLine : K;
  const int64_t pf_step = pf_parts * kLine;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k == pf_k) {
      pf_k += pf_step;
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(prefetch + n * ldb + k), _MM_HINT_T1);
    }
    __m256 a[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[m] = _mm256_loadu_ps(A + m * lda + k);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __m256 b = load8(B + n * ldb + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm256_fmadd_ps(a[m], b, acc[m][n]);
    }
  }
  if constexpr (NR % 4 == 0) {
    if (k == K) {  // four outputs at a time, the accumulators never leave the registers
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
        for (int n = 0; n < NR; n += 4) {
          float* c = C + m * ldc + n;
          __m128 s = hsum8x4(acc[m][n], acc[m][n + 1], acc[m][n + 2], acc[m][n + 3]);
          if (accumulate) s = _mm_add_ps(_mm_loadu_ps(c), s);
          _mm_storeu_ps(c, s);
        }
      return;
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) {
      float s = hsum8(acc[m][n]);
      for (int64_t kk = k; kk < K; ++kk) s += A[m * lda + kk] * to_f32(B[n * ldb + kk]);
      C[m * ldc + n] = accumulate ? C[m * ldc + n] + s : s;
    }
  }
}

template <class W>
MOEOPS_AVX2 inline void widen_row_avx2(const W* src, float* dst, int64_t K) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
  for (; k < K; ++k) dst[k] = to_f32(src[k]);
}
#endif

// ------------------------------------------------------------------ dot form, 512-bit (AVX512 tier)
#ifdef MOEOPS_HAS_AVX2_PATH
#define MOEOPS_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))

// The sums of the 16 lanes of a, b, c and d, as one vector: lanes i and i+8 first, then
// adjacent pairs twice, then the two 128-bit halves. Every output gets this same tree whether it
// is reduced with three others or alone (d = c = b = a), so results do not depend on the block.
MOEOPS_AVX512BF16 inline __m128 hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
  const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
  const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The two operand kinds of the 512-bit dot kernels. Bf16Ops: bf16 x bf16, 32 per step,
// vdpbf16ps (lane i adds the products of the pair k = 2i, 2i+1). F32Ops<W>: fp32 activations
// times fp32/fp16/bf16 weights widened in registers, 16 per step, FMA. Tails are masked loads
// (nothing read past the row).
struct Bf16Ops {
  using TA = c10::BFloat16;
  using TB = c10::BFloat16;
  using V = __m512i;
  static constexpr int kStep = 32;
  MOEOPS_AVX512BF16 static V load_a(const TA* p) { return _mm512_loadu_si512(p); }
  MOEOPS_AVX512BF16 static V load_b(const TB* p) { return _mm512_loadu_si512(p); }
  MOEOPS_AVX512BF16 static V load_a_tail(const TA* p, int64_t n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << n) - 1), p);
  }
  MOEOPS_AVX512BF16 static V load_b_tail(const TB* p, int64_t n) { return load_a_tail(p, n); }
  MOEOPS_AVX512BF16 static __m512 madd(__m512 acc, V a, V b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};

template <class W>
struct F32Ops {
  using TA = float;
  using TB = W;
  using V = __m512;
  static constexpr int kStep = 16;
  MOEOPS_AVX512BF16 static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  MOEOPS_AVX512BF16 static V load_a(const float* p) { return _mm512_loadu_ps(p); }
  MOEOPS_AVX512BF16 static V load_a_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  MOEOPS_AVX512BF16 static V load_b(const W* p) {
    if constexpr (std::is_same_v<W, float>) return _mm512_loadu_ps(p);
    else if constexpr (std::is_same_v<W, c10::Half>)
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  MOEOPS_AVX512BF16 static V load_b_tail(const W* p, int64_t n) {
    if constexpr (std::is_same_v<W, float>) return _mm512_maskz_loadu_ps(mask(n), p);
    else if constexpr (std::is_same_v<W, c10::Half>) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
    else return widen(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  MOEOPS_AVX512BF16 static V widen(__m256i bf16) {  // bf16 -> fp32: a 16-bit shift
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
  }
  MOEOPS_AVX512BF16 static __m512 madd(__m512 acc, V a, V b) { return _mm512_fmadd_ps(a, b, acc); }
};

// MR x NR accumulators of 16 fp32 lanes over K, a masked step for the tail, one horizontal sum
// tree per output: each output's arithmetic is the same whatever block it falls in, so results
// do not depend on how many rows an expert has. `prefetch`: the next weight panel (NR rows,
// stride ldb), pulled into L2 during this block's k-loop so that its memory reads overlap this
// panel's arithmetic; null for none.
template <int MR, int NR, class Ops>
MOEOPS_AVX512BF16 inline void dot_block_512(const typename Ops::TA* A, int64_t lda, const typename Ops::TB* B,
                                            int64_t ldb, int64_t K, float* C, int64_t ldc, bool accumulate,
                                            const typename Ops::TB* prefetch = nullptr, int pf_part = 0,
                                            int pf_parts = 1) {
  using TB = typename Ops::TB;
  constexpr int S = Ops::kStep;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    if (prefetch && (k * static_cast<int64_t>(sizeof(TB))) % 64 == 0 &&
        (k * static_cast<int64_t>(sizeof(TB)) / 64) % pf_parts == pf_part)  // one prefetch per line
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(prefetch + n * ldb + k), _MM_HINT_T1);
    typename Ops::V a[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[m] = Ops::load_a(A + m * lda + k);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const typename Ops::V b = Ops::load_b(B + n * ldb + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = Ops::madd(acc[m][n], a[m], b);
    }
  }
  if (k < K) {
    typename Ops::V a[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[m] = Ops::load_a_tail(A + m * lda + k, K - k);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const typename Ops::V b = Ops::load_b_tail(B + n * ldb + k, K - k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = Ops::madd(acc[m][n], a[m], b);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float* c = C + m * ldc;
    if constexpr (NR % 4 == 0) {
#pragma GCC unroll 8
      for (int n = 0; n < NR; n += 4) {
        __m128 s = hsum16x4(acc[m][n], acc[m][n + 1], acc[m][n + 2], acc[m][n + 3]);
        if (accumulate) s = _mm_add_ps(s, _mm_loadu_ps(c + n));
        _mm_storeu_ps(c + n, s);
      }
    } else {
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) {
        const float s = _mm_cvtss_f32(hsum16x4(acc[m][n], acc[m][n], acc[m][n], acc[m][n]));
        c[n] = accumulate ? c[n] + s : s;
      }
    }
  }
}

// C[0:M, 0:N] (+)= A[0:M, :] . B[0:N, :]^T with dot_block_512: a 4-row weight panel stays in L1
// while the rows stream past it 6 at a time (24 accumulators); the row blocks share the
// prefetch of the next panel (each a slice of its lines), so its memory reads spread over the
// whole panel's arithmetic. `after` (optional): the weights of the caller's next call (same
// ldb), prefetched during the last panel so that a new expert's first panel is not a cold start.
// Decode (M == 1) streams 8 weight rows at a time.
template <class Ops>
void dot_512(const typename Ops::TA* A, int64_t lda, int64_t M, const typename Ops::TB* B, int64_t ldb, int64_t N,
             int64_t K, float* C, int64_t ldc, bool accumulate, const typename Ops::TB* after = nullptr) {
  using TB = typename Ops::TB;
  if (M == 1) {
    int64_t n = 0;
    for (; n + 8 <= N; n += 8)
      dot_block_512<1, 8, Ops>(A, lda, B + n * ldb, ldb, K, C + n, ldc, accumulate,
                               N - n >= 16 ? B + (n + 8) * ldb : after);
    for (; n < N; ++n) dot_block_512<1, 1, Ops>(A, lda, B + n * ldb, ldb, K, C + n, ldc, accumulate);
    return;
  }
  for (int64_t n = 0; n < N; n += 4) {
    const TB* Bn = B + n * ldb;
    float* Cn = C + n;
    if (N - n >= 4) {
      const TB* pf = N - n >= 8 ? Bn + 4 * ldb : after;
      const int parts = static_cast<int>(M / 6 + (M % 6 ? 1 : 0));  // row blocks sharing the prefetch
      int64_t m = 0;
      for (; m + 6 <= M; m += 6)
        dot_block_512<6, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf,
                                 static_cast<int>(m / 6), parts);
      const int part = parts - 1;
      switch (M - m) {
        case 5:
          dot_block_512<3, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf, part, parts);
          dot_block_512<2, 4, Ops>(A + (m + 3) * lda, lda, Bn, ldb, K, Cn + (m + 3) * ldc, ldc, accumulate);
          break;
        case 4: dot_block_512<4, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf, part, parts); break;
        case 3: dot_block_512<3, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf, part, parts); break;
        case 2: dot_block_512<2, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf, part, parts); break;
        case 1: dot_block_512<1, 4, Ops>(A + m * lda, lda, Bn, ldb, K, Cn + m * ldc, ldc, accumulate, pf, part, parts); break;
        default: break;
      }
    } else {
      for (int64_t j = 0; j < N - n; ++j) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          dot_block_512<4, 1, Ops>(A + m * lda, lda, Bn + j * ldb, ldb, K, Cn + m * ldc + j, ldc, accumulate);
        for (; m < M; ++m)
          dot_block_512<1, 1, Ops>(A + m * lda, lda, Bn + j * ldb, ldb, K, Cn + m * ldc + j, ldc, accumulate);
      }
    }
  }
}

#endif

// C[0:M, 0:N] (+)= A[0:M, :] . B[0:N, :]^T over K (fp32 activations). AVX512 tier: dot_512 with
// 512-bit FMAs. AVX2 tier: the weight panel of 4 (or 8) rows stays in L1 while all M rows
// stream past it; rows are taken 3 at a time (12 accumulators).
// K is not blocked: measured on a Zen 4 (2026-11-28), the 3x4 block reaches ~89 GFLOP/s per core over
// K=2048 and only 54 (K=256) / 82 (K=512) when K is cut, because every block ends with 12
// horizontal sums. On a Zen 3 (2026-12-03) K chunks of 256-1024 with the lanes carried between
// chunks (no extra sums, bit-equal) were still slower: 0.69-0.93x.
// `after`: the next call's weights (same ldb), prefetched during the last panel.
template <class W>
void gemm_dot(const float* A, int64_t lda, int64_t M, const W* B, int64_t ldb, int64_t N, int64_t K,
              float* C, int64_t ldc, bool accumulate = false, const W* after = nullptr) {
#ifdef MOEOPS_HAS_AVX2_PATH
  if (use_avx2()) {
    // Narrow weights with enough rows to reuse them: widen each 4-row panel to fp32 once
    // (L1-sized scratch), so the inner loop is pure fp32 FMAs (widening bf16 in the inner loop
    // costs 2 extra vector ops per load and halves the FMA rate on this CPU).
    if constexpr (!std::is_same_v<W, float>) {
      if (M >= 3) {
        thread_local std::vector<float> panel;
        panel.resize(4 * K);
        for (int64_t n = 0; n < N; n += 4) {
          const int64_t nr = std::min<int64_t>(4, N - n);
          for (int64_t j = 0; j < nr; ++j) widen_row_avx2(B + (n + j) * ldb, panel.data() + j * K, K);
          // the next panel's rows (or the next call's) head for L2 while this one is multiplied
          const W* next = N - n > 4 ? B + (n + 4) * ldb : after;
          if (next)
            for (int64_t j = 0; j < 4; ++j)
              for (int64_t b = 0; b < K * static_cast<int64_t>(sizeof(W)); b += 64)
                _mm_prefetch(reinterpret_cast<const char*>(next + j * ldb) + b, _MM_HINT_T1);
          gemm_dot<float>(A, lda, M, panel.data(), K, nr, K, C + n, ldc, accumulate);
        }
        return;
      }
    }
    if (use_avx512bf16()) {  // 512-bit FMAs (dot_512)
      dot_512<F32Ops<W>>(A, lda, M, B, ldb, N, K, C, ldc, accumulate, after);
      return;
    }
    if (M == 1) {  // decode: stream weights, 8 rows in flight, the next 8 prefetched
      int64_t n = 0;
      for (; n + 8 <= N; n += 8)
        dot_block_avx2<1, 8>(A, lda, B + n * ldb, ldb, K, C + n, ldc, accumulate,
                             N - n >= 16 ? B + (n + 8) * ldb : after);
      for (; n < N; ++n) dot_block_avx2<1, 1>(A, lda, B + n * ldb, ldb, K, C + n, ldc, accumulate);
      return;
    }
    for (int64_t n = 0; n < N; n += 4) {
      const W* Bn = B + n * ldb;
      const int nr = static_cast<int>(std::min<int64_t>(4, N - n));
      int64_t m = 0;
      if (nr == 4) {
        // 3-row blocks; a remainder of 1 row becomes two 2-row blocks (a 1x4 block runs at a
        // third of the FMA rate). The blocks share the prefetch of the next panel (or of the
        // next call's weights).
        const W* next = N - n >= 8 ? Bn + 4 * ldb : after;
        const int64_t m3 = M % 3 == 1 && M >= 4 ? M - 4 : M - M % 3;
        const int parts = static_cast<int>(m3 / 3 + (M - m3) / 2 + (M - m3) % 2);
        int part = 0;
        for (; m < m3; m += 3)
          dot_block_avx2<3, 4>(A + m * lda, lda, Bn, ldb, K, C + m * ldc + n, ldc, accumulate, next, part++, parts);
        for (; m + 2 <= M; m += 2)
          dot_block_avx2<2, 4>(A + m * lda, lda, Bn, ldb, K, C + m * ldc + n, ldc, accumulate, next, part++, parts);
        for (; m < M; ++m)
          dot_block_avx2<1, 4>(A + m * lda, lda, Bn, ldb, K, C + m * ldc + n, ldc, accumulate, next, part++, parts);
      } else {
        for (int j = 0; j < nr; ++j) {
          for (m = 0; m + 3 <= M; m += 3)
            dot_block_avx2<3, 1>(A + m * lda, lda, Bn + j * ldb, ldb, K, C + m * ldc + n + j, ldc, accumulate);
          for (; m < M; ++m)
            dot_block_avx2<1, 1>(A + m * lda, lda, Bn + j * ldb, ldb, K, C + m * ldc + n + j, ldc, accumulate);
        }
      }
    }
    return;
  }
#endif
  for (int64_t n = 0; n < N; n += 4) {
    const W* Bn = B + n * ldb;
    if (N - n >= 4) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)
        dot_block_portable<2, 4>(A + m * lda, lda, Bn, ldb, K, C + m * ldc + n, ldc, accumulate);
      for (; m < M; ++m) dot_block_portable<1, 4>(A + m * lda, lda, Bn, ldb, K, C + m * ldc + n, ldc, accumulate);
    } else {
      for (int64_t j = n; j < N; ++j)
        for (int64_t m = 0; m < M; ++m)
          dot_block_portable<1, 1>(A + m * lda, lda, B + j * ldb, ldb, K, C + m * ldc + j, ldc, accumulate);
    }
  }
}

// K per pass of gemm_dot_bf16: up to 96 rows x 2048 bf16 (384 KiB) of A stay in L2 while every
// weight panel of the item passes. Longer K (Mixtral's 4096 / 14336) is cut into such passes that
// accumulate into C, so an expert's weights are read from memory once per item, not once per
// 48-row block.
constexpr int64_t kBf16KChunk = 2048;

// C[0:M, 0:N] (+)= A[0:M, :] . B[0:N, :]^T over K with bf16 A and B and fp32 results, on
// AVX512-BF16 (only called when use_avx512bf16()). Like gemm_dot: a 4-row weight panel stays in
// L1 while the rows stream past it, 6 rows at a time (24 accumulators), and the next panel is
// prefetched meanwhile; decode (M == 1) streams 8 weight rows at a time. K beyond kBf16KChunk is
// done in passes (the same passes whatever M is). `after`: as for dot_512 (the next call's B).
inline void gemm_dot_bf16(const c10::BFloat16* A, int64_t lda, int64_t M, const c10::BFloat16* B, int64_t ldb,
                          int64_t N, int64_t K, float* C, int64_t ldc, bool accumulate = false,
                          const c10::BFloat16* after = nullptr) {
#ifdef MOEOPS_HAS_AVX2_PATH
  int64_t k0 = 0;
  do {  // at least one pass: K = 0 writes zeros (or leaves C when accumulating)
    const int64_t k1 = k0 + kBf16KChunk;  // the next pass starts on B's first panel again
    dot_512<Bf16Ops>(A + k0, lda, M, B + k0, ldb, N, std::min(kBf16KChunk, K - k0), C, ldc, accumulate || k0 > 0,
                     k1 < K ? B + k1 : after);
    k0 = k1;
  } while (k0 < K);
#else
  (void)A, (void)lda, (void)M, (void)B, (void)ldb, (void)N, (void)K, (void)C, (void)ldc, (void)accumulate, (void)after;
  throw std::logic_error("moeops: gemm_dot_bf16 needs an x86-64 build");
#endif
}

// ------------------------------------------------------------------ axpy form ([K, N] weights)
#ifdef MOEOPS_HAS_AVX2_PATH
// MR rows x 16 columns: 2*MR accumulators, two weight vectors per k, one broadcast.
template <int MR, class W>
MOEOPS_AVX2 inline void axpy_block16_avx2(const float* A, int64_t lda, const W* B, int64_t ldb, int64_t K,
                                          float* C, int64_t ldc) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m * lda + k);
      acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(C + m * ldc, acc[m][0]);
    _mm256_storeu_ps(C + m * ldc + 8, acc[m][1]);
  }
}
#endif

// C[0:M, 0:N] = A[0:M, :] . B[:, 0:N] with B row-major [K, ldb].
template <class W>
void gemm_axpy(const float* A, int64_t lda, int64_t M, const W* B, int64_t ldb, int64_t N, int64_t K, float* C,
               int64_t ldc) {
  int64_t n = 0;
#ifdef MOEOPS_HAS_AVX2_PATH
  if (use_avx2()) {
    for (; n + 16 <= N; n += 16) {
      int64_t m = 0;
      for (; m + 6 <= M; m += 6) axpy_block16_avx2<6>(A + m * lda, lda, B + n, ldb, K, C + m * ldc + n, ldc);
      for (; m < M; ++m) axpy_block16_avx2<1>(A + m * lda, lda, B + n, ldb, K, C + m * ldc + n, ldc);
    }
  }
#endif
  if (n >= N) return;
  for (int64_t m = 0; m < M; ++m) {  // portable path and the column tail
    float* c = C + m * ldc;
    std::fill(c + n, c + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * lda + k];
      const W* b = B + k * ldb;
      for (int64_t j = n; j < N; ++j) c[j] += a * to_f32(b[j]);
    }
  }
}

}  // namespace moeops::cpu
