// MoE-X on CPU: router statistics, sparsity-aware routing, ReLU experts with a sparse
// down-projection, and the wide-code export. Semantics: python/moeops/reference.py (MoE-X).
//
// Sparse down-projection. After the up-projection + bias + ReLU, row r of expert e has the
// active units A_r = {i : h[r, i] > 0}. y[r] = sum_{i in A_r} h[r, i] * w_dec[e, i, :], and the
// decoder is stored unit-major ([M, D, d]) so unit i is one contiguous row. Rows of an expert
// are cut into tiles of up to 6 rows; each tile runs one of three paths over a list of units:
//   rows   each row alone over its own active list (the gather path of small T: decoder
//          traffic proportional to nnz * d);
//   union  the units active in at least one row of the tile (a unit that is zero for the whole
//          tile is skipped: the block skip of the large-T case, at single-unit granularity);
//   dense  every unit 0..D-1, the tile's rows register-blocked.
// Every tile path accumulates each output element in fp32 over its units in increasing unit
// order, one FMA per term (AVX2) or one multiply-add (portable), so skipping a unit whose h is
// +0 adds exactly nothing: the three give bit-identical results (finite weights). When an
// expert's estimated sparse cost exceeds a dense GEMM's (high density), the whole expert goes
// through torch's GEMM instead (fp32 decoders; `down="dense"` always does): equal to fp32
// rounding. The tests check both.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/cpu_combine.h"
#include "common/cpu_memory.h"
#include "experts/cpu/gemm_blocks.h"
#include "moex/moex_prepare.h"
#include "ops.h"

namespace moeops {
namespace {

// ------------------------------------------------------------------ router statistics

template <class W>
void stats_kernel(const MoexStatsParams& p) {
  const W* w = static_cast<const W*>(p.w);
  constexpr int64_t kCols = 64;
  const int64_t nchunks = (p.d + kCols - 1) / kCols;
  at::parallel_for(0, p.M * nchunks, 1, [&](int64_t b, int64_t end) {
    std::vector<double> s(kCols), q(kCols);
    for (int64_t it = b; it < end; ++it) {
      const int64_t e = it / nchunks, c0 = (it % nchunks) * kCols, c1 = std::min(p.d, c0 + kCols);
      const int64_t nc = c1 - c0;
      const W* we = w + e * p.D * p.d;
      std::fill(s.begin(), s.end(), 0.0);
      for (int64_t i = 0; i < p.D; ++i)
        for (int64_t c = 0; c < nc; ++c) s[c] += cpu::to_f32(we[i * p.d + c0 + c]);
      for (int64_t c = 0; c < nc; ++c) s[c] /= static_cast<double>(p.D);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t i = 0; i < p.D; ++i)
        for (int64_t c = 0; c < nc; ++c) {
          const double v = cpu::to_f32(we[i * p.d + c0 + c]) - s[c];
          q[c] += v * v;
        }
      for (int64_t c = 0; c < nc; ++c) {
        p.mu[e * p.d + c0 + c] = static_cast<float>(s[c]);
        p.var[e * p.d + c0 + c] = static_cast<float>(q[c] / static_cast<double>(p.D));
      }
    }
  });
  for (int64_t e = 0; e < p.M; ++e) {
    double sb = 0.0;
    if (p.b)
      for (int64_t i = 0; i < p.D; ++i) sb += p.b[e * p.D + i];
    p.bmean[e] = static_cast<float>(sb / static_cast<double>(p.D));
  }
}

// ------------------------------------------------------------------ routing

void route_kernel(const MoexRouteParams& p) {
  const int64_t d = p.d;
  const int M = p.M;
  constexpr int64_t kTokBlock = 32;
  const int64_t nblocks = (p.T + kTokBlock - 1) / kTokBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b, int64_t end) {
    std::vector<float> x2(kTokBlock * d), mh(kTokBlock * M), s2(kTokBlock * M), s(M), w(p.k);
    std::vector<uint8_t> tier(M);
    std::vector<int32_t> ids(p.k);
    for (int64_t blk = b; blk < end; ++blk) {
      const int64_t t0 = blk * kTokBlock, nt = std::min(kTokBlock, p.T - t0);
      const float* x = p.x + t0 * d;
      for (int64_t i = 0; i < nt * d; ++i) x2[i] = x[i] * x[i];
      cpu::gemm_dot(x, d, nt, p.mu, d, M, d, mh.data(), M);
      cpu::gemm_dot(x2.data(), d, nt, p.var, d, M, d, s2.data(), M);
      for (int64_t r = 0; r < nt; ++r) {
        const int64_t t = t0 + r;
        for (int e = 0; e < M; ++e) {
          const float dens = moex_density_value(mh[r * M + e] + p.bmean[e], s2[r * M + e],
                                                [](float v) { return std::erfc(v); });
          if (p.density) p.density[t * M + e] = dens;
          s[e] = p.densest ? dens : -dens;
        }
        moex_select_token(s.data(), M, p.k, p.mask ? p.mask + t * p.mask_stride : nullptr,
                          p.forced ? p.forced + t * p.forced_stride : nullptr, p.mask_mode, tier.data(),
                          p.ids + t * p.k, p.weights + t * p.k, [](float v) { return std::exp(v); });
      }
    }
  });
}

// ------------------------------------------------------------------ sparse down-projection blocks

// C[m, 0:8*NV] = sum over units idx[0..n) of A[m*lda + i] * B[i*ldb + 0:8*NV], MR rows.
#ifdef MOEOPS_HAS_AVX2_PATH
template <int MR, int NV, class W>
MOEOPS_AVX2 void down_block_avx2(const float* A, int64_t lda, const int32_t* idx, int64_t n, const W* B,
                                 int64_t ldb, float* C, int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  constexpr int64_t kAhead = 8;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = idx[j];
    const W* b = B + i * ldb;
    if (j + kAhead < n) _mm_prefetch(reinterpret_cast<const char*>(B + idx[j + kAhead] * ldb), _MM_HINT_T0);
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = cpu::load8(b + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m * lda + i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(a, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + m * ldc + 8 * v, acc[m][v]);
}

// One row, 8*NV columns (NV <= 12): each weight vector is loaded and used at once, so NV can be
// large and a unit's decoder row is read in long contiguous pieces (NV = 12: 384 bytes).
template <int NV, class W>
MOEOPS_AVX2 void down_row_avx2(const float* A, const int32_t* idx, int64_t n, const W* B, int64_t ldb, float* C) {
  __m256 acc[NV];
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  constexpr int64_t kAhead = 8;  // software prefetch: gathered rows defeat the hardware prefetcher
  constexpr int kLines = (NV * 8 * static_cast<int>(sizeof(W)) + 63) / 64;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = idx[j];
    const W* b = B + i * ldb;
    if (j + kAhead < n) {
      const char* pf = reinterpret_cast<const char*>(B + idx[j + kAhead] * ldb);
#pragma GCC unroll 12
      for (int l = 0; l < kLines; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
    }
    const __m256 a = _mm256_broadcast_ss(A + i);
#pragma GCC unroll 12
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(a, cpu::load8(b + 8 * v), acc[v]);
  }
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + 8 * v, acc[v]);
}

// Column tail (< 8 columns): scalar FMAs in the same unit order.
template <class W>
MOEOPS_AVX2 void down_tail_avx2(const float* A, int64_t lda, int64_t MR, const int32_t* idx, int64_t n,
                                const W* B, int64_t ldb, int64_t ncols, float* C, int64_t ldc) {
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t c = 0; c < ncols; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc = std::fma(A[m * lda + idx[j]], cpu::to_f32(B[idx[j] * ldb + c]), acc);
      C[m * ldc + c] = acc;
    }
}

template <int NV, class W>
MOEOPS_AVX2 void down_rows_dispatch(const float* A, int64_t lda, int64_t MR, const int32_t* idx, int64_t n,
                                    const W* B, int64_t ldb, float* C, int64_t ldc) {
  switch (MR) {
    case 1: return down_block_avx2<1, NV>(A, lda, idx, n, B, ldb, C, ldc);
    case 2: return down_block_avx2<2, NV>(A, lda, idx, n, B, ldb, C, ldc);
    case 3: return down_block_avx2<3, NV>(A, lda, idx, n, B, ldb, C, ldc);
    case 4: return down_block_avx2<4, NV>(A, lda, idx, n, B, ldb, C, ldc);
    case 5: return down_block_avx2<5, NV>(A, lda, idx, n, B, ldb, C, ldc);
    default: return down_block_avx2<6, NV>(A, lda, idx, n, B, ldb, C, ldc);
  }
}
#endif

template <class W>
void down_portable(const float* A, int64_t lda, int64_t MR, const int32_t* idx, int64_t n, const W* B, int64_t ldb,
                   int64_t ncols, float* C, int64_t ldc) {
  constexpr int64_t kC = 16;
  float acc[6][kC];
  for (int64_t c0 = 0; c0 < ncols; c0 += kC) {
    const int64_t nc = std::min(kC, ncols - c0);
    for (int64_t m = 0; m < MR; ++m)
      for (int64_t c = 0; c < nc; ++c) acc[m][c] = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = idx[j];
      const W* b = B + i * ldb + c0;
      for (int64_t m = 0; m < MR; ++m) {
        const float a = A[m * lda + i];
        for (int64_t c = 0; c < nc; ++c) acc[m][c] += a * cpu::to_f32(b[c]);
      }
    }
    for (int64_t m = 0; m < MR; ++m)
      for (int64_t c = 0; c < nc; ++c) C[m * ldc + c0 + c] = acc[m][c];
  }
}

// C[0:MR, 0:ncols] = A[0:MR, units] . B[units, 0:ncols], MR <= 6. Columns in blocks of 96 or
// 32 (MR == 1: 12 or 4 accumulators, one broadcast per unit) or 16 (MR > 1: 2*MR accumulators).
template <class W>
void down_rows(const float* A, int64_t lda, int64_t MR, const int32_t* idx, int64_t n, const W* B, int64_t ldb,
               int64_t ncols, float* C, int64_t ldc) {
#ifdef MOEOPS_HAS_AVX2_PATH
  if (cpu::use_avx2()) {
    int64_t c = 0;
    if (MR == 1) {
      for (; c + 96 <= ncols; c += 96) down_row_avx2<12>(A, idx, n, B + c, ldb, C + c);
      for (; c + 32 <= ncols; c += 32) down_row_avx2<4>(A, idx, n, B + c, ldb, C + c);
    }
    for (; c + 16 <= ncols; c += 16) down_rows_dispatch<2>(A, lda, MR, idx, n, B + c, ldb, C + c, ldc);
    for (; c + 8 <= ncols; c += 8) down_rows_dispatch<1>(A, lda, MR, idx, n, B + c, ldb, C + c, ldc);
    if (c < ncols) down_tail_avx2(A, lda, MR, idx, n, B + c, ldb, ncols - c, C + c, ldc);
    return;
  }
#endif
  down_portable(A, lda, MR, idx, n, B, ldb, ncols, C, ldc);
}

// ------------------------------------------------------------------ experts

constexpr int64_t kTileRows = 6;
enum class TilePath : uint8_t { Dense = 0, Union = 1, Rows = 2 };

struct Tile {
  int32_t e;
  int64_t r0, r1;       // rows of U / Y
  TilePath path;
  int64_t list_off;     // Union: offset of its unit list in the union buffer
  int64_t list_n;
  double cost = 0.0;    // estimated unit-rows of the chosen path
};

struct DownItem {
  int32_t tile;  // group of tiles (index into `groups`)
  int64_t c0, c1;
};

struct UpItem {
  int32_t e;
  int64_t m0, m1, n0, n1;
};

constexpr int64_t kUpRowBlock = 48;

int64_t up_column_block(int64_t rows, int64_t N) {
  const int64_t threads = at::get_num_threads();
  int64_t nb = 64;
  while (nb > 4 && rows * ((N + nb - 1) / nb) < 4 * threads) nb /= 2;
  return std::max<int64_t>(4, nb / 4 * 4);
}

// Per-slot plan (counting sort by expert, slot order within an expert) like fused_experts.
struct Plan {
  std::vector<int32_t> off, row_slot, inverse;
};

Plan make_plan(const int32_t* idp, int64_t T, int64_t K, int64_t M) {
  Plan pl;
  pl.off.assign(M + 1, 0);
  pl.inverse.assign(T * K, -1);
  for (int64_t s = 0; s < T * K; ++s) {
    const int32_t e = idp[s];
    TORCH_CHECK_VALUE(e >= -1 && e < M, "moeops: ids must be in [-1, M=", M, "), got ", e, " at token ", s / K,
                      ", slot ", s % K);
    if (e >= 0) ++pl.off[e + 1];
  }
  for (int64_t e = 0; e < M; ++e) pl.off[e + 1] += pl.off[e];
  pl.row_slot.resize(pl.off[M]);
  std::vector<int32_t> cursor(pl.off.begin(), pl.off.end() - 1);
  for (int64_t s = 0; s < T * K; ++s) {
    const int32_t e = idp[s];
    if (e < 0) continue;
    const int32_t r = cursor[e]++;
    pl.row_slot[r] = static_cast<int32_t>(s);
    pl.inverse[s] = r;
  }
  return pl;
}

// X [R, d] fp32 rows gathered from hidden; U [R, D] = ReLU(X . w_enc[e]^T + b_enc[e]).
void up_projection(const Tensor& hidden, const Plan& pl, int64_t K, int64_t M, int64_t D, int64_t d,
                   const Tensor& w_enc, const float* benc, float* Xp, float* Up) {
  const int64_t R = pl.off[M];
  cpu::dispatch_float(to_dtype(hidden, "hidden"), [&](auto tag) {
    using TH = decltype(tag);
    const TH* hp = static_cast<const TH*>(hidden.data_ptr());
    const int64_t hs = hidden.stride(0);
    at::parallel_for(0, R, 64, [&](int64_t b, int64_t end) {
      for (int64_t r = b; r < end; ++r) {
        const TH* src = hp + (pl.row_slot[r] / K) * hs;
        for (int64_t h = 0; h < d; ++h) Xp[r * d + h] = cpu::to_f32(src[h]);
      }
    });
  });
  std::vector<UpItem> items;
  const int64_t cb = up_column_block(R, D);
  for (int64_t e = 0; e < M; ++e)
    for (int64_t m0 = pl.off[e]; m0 < pl.off[e + 1]; m0 += kUpRowBlock)
      for (int64_t n0 = 0; n0 < D; n0 += cb)
        items.push_back({static_cast<int32_t>(e), m0, std::min<int64_t>(m0 + kUpRowBlock, pl.off[e + 1]), n0,
                         std::min(n0 + cb, D)});
  cpu::dispatch_float(to_dtype(w_enc, "w_enc"), [&](auto tag) {
    using W = decltype(tag);
    const W* wp = static_cast<const W*>(w_enc.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const UpItem& it = items[i];
        const int64_t rows = it.m1 - it.m0, nb = it.n1 - it.n0;
        float* C = Up + it.m0 * D + it.n0;
        cpu::gemm_dot(Xp + it.m0 * d, d, rows, wp + (it.e * D + it.n0) * d, d, nb, d, C, D);
        const float* be = benc ? benc + it.e * D + it.n0 : nullptr;
        for (int64_t m = 0; m < rows; ++m) {
          float* row = C + m * D;
          for (int64_t j = 0; j < nb; ++j) {
            const float u = row[j] + (be ? be[j] : 0.f);
            row[j] = u > 0.f ? u : 0.f;  // NaN -> 0 would hide it: keep NaN (u > 0 is false)
            if (u != u) row[j] = u;
          }
        }
      }
    });
  });
}

// The down-projection over expert-grouped activation rows U [R, D] (rows off[e]:off[e+1] use
// expert e): Y [R, d] = U . w_dec[e] (+ b_dec[e]); nnz[r] = non-zero units of row r.
void moex_down_projection(const Tensor& U, const std::vector<int32_t>& off, int64_t M, int64_t D, int64_t d,
                          const Tensor& w_dec, const float* bd, MoexDown down, int32_t* nnz, Tensor& Y) {
  const int64_t R = off[M];
  const float* Up = U.data_ptr<float>();
  float* Yp = Y.data_ptr<float>();
  // per-row active lists (units ascending), nnz per row
  std::vector<int32_t> lists(R * D);
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) {
      const float* u = Up + r * D;
      int32_t* l = lists.data() + r * D;
      int32_t n = 0;
      for (int64_t i = 0; i < D; ++i) {
        l[n] = static_cast<int32_t>(i);
        n += u[i] != 0.f;  // NaN counts as active (it must reach the output)
      }
      nnz[r] = n;
    }
  });

  // tiles and their paths
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < M; ++e)
    for (int64_t r0 = off[e]; r0 < off[e + 1]; r0 += kTileRows)
      tiles.push_back({static_cast<int32_t>(e), r0, std::min<int64_t>(r0 + kTileRows, off[e + 1]),
                       TilePath::Dense, 0, 0, static_cast<double>(D) * std::min<int64_t>(kTileRows, off[e + 1] - r0)});
  std::vector<int32_t> iota(D);
  std::iota(iota.begin(), iota.end(), 0);
  std::vector<int64_t> union_off(tiles.size() + 1, 0);
  for (size_t t = 0; t < tiles.size(); ++t) union_off[t + 1] = union_off[t] + D;
  // Dense fallback for fp32 decoders: a whole expert through torch's GEMM (at::mm), chosen by
  // `auto` when its tiles' estimated sparse cost exceeds the GEMM's (which does a unit-row about
  // twice as fast as the register kernel above once an expert has >= 8 rows; measured at
  // MoE-X-S: docs/moex.md), and always by `dense`. Its summation order differs from the
  // sparse paths': results agree to fp32 rounding.
  const bool gemm_ok = w_dec.scalar_type() == at::kFloat && down != MoexDown::Sparse;
  auto gemm_cost = [D](int64_t n) { return (n >= 8 ? 0.5 : 0.9) * static_cast<double>(n * D); };
  // The tiles' union sizes are estimated first as for independent units (expected union of rows
  // with densities p_r: D * (1 - prod(1 - p_r))), so high-density experts go to the GEMM without
  // building any union list.
  std::vector<uint8_t> use_gemm(M, 0);
  if (gemm_ok) {
    for (int64_t e = 0; e < M; ++e) {
      const int64_t n = off[e + 1] - off[e];
      double est = 0.0;
      for (int64_t r0 = off[e]; r0 < off[e + 1]; r0 += kTileRows) {
        const int64_t r1 = std::min<int64_t>(r0 + kTileRows, off[e + 1]);
        double sum_nnz = 0.0, none = 1.0;
        for (int64_t r = r0; r < r1; ++r) {
          sum_nnz += nnz[r];
          none *= 1.0 - static_cast<double>(nnz[r]) / static_cast<double>(D);
        }
        const double c_union = static_cast<double>(D) * (1.0 - none) * static_cast<double>(r1 - r0);
        est += r1 - r0 == 1 ? 1.25 * sum_nnz : std::min(1.25 * sum_nnz, c_union);
      }
      use_gemm[e] = n > 0 && (down == MoexDown::Dense || est > gemm_cost(n));
    }
  }
  std::vector<int32_t> unions(down == MoexDown::Dense ? 0 : union_off.back());
  if (down != MoexDown::Dense) {
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t t = b; t < end; ++t) {
        Tile& tl = tiles[t];
        if (use_gemm[tl.e]) continue;
        const int64_t rows = tl.r1 - tl.r0;
        int64_t sum_nnz = 0;
        for (int64_t r = tl.r0; r < tl.r1; ++r) sum_nnz += nnz[r];
        if (rows == 1) {
          // one row: its own list; dense if it is nearly all active (auto)
          tl.path = (down == MoexDown::Auto && sum_nnz > (D * 7) / 8) ? TilePath::Dense : TilePath::Rows;
          tl.cost = tl.path == TilePath::Dense ? static_cast<double>(D) : 1.25 * static_cast<double>(sum_nnz);
          continue;
        }
        int32_t* ul = unions.data() + union_off[t];
        int64_t n = 0;
        for (int64_t i = 0; i < D; ++i) {
          bool any = false;
          for (int64_t r = tl.r0; r < tl.r1; ++r) any |= Up[r * D + i] != 0.f;
          ul[n] = static_cast<int32_t>(i);
          n += any;
        }
        tl.list_off = union_off[t];
        tl.list_n = n;
        // cost in unit-rows: union runs `rows` rows register-blocked over n units; rows runs
        // each row alone over its nnz units, about 1.25x slower per unit-row (more loads per FMA)
        const double c_union = static_cast<double>(n) * rows, c_rows = 1.25 * static_cast<double>(sum_nnz);
        if (down == MoexDown::Auto && n > (D * 7) / 8 && c_rows >= c_union) tl.path = TilePath::Dense;
        else tl.path = c_rows < c_union ? TilePath::Rows : TilePath::Union;
        tl.cost = tl.path == TilePath::Dense ? static_cast<double>(D * rows) : std::min(c_rows, c_union);
      }
    });
  }

  if (gemm_ok) {  // experts whose tiles' estimated sparse cost exceeds the GEMM's
    std::vector<double> sparse_cost(M, 0.0);
    for (const Tile& tl : tiles) sparse_cost[tl.e] += tl.cost;
    for (int64_t e = 0; e < M; ++e) {
      const int64_t n = off[e + 1] - off[e];
      if (n > 0 && sparse_cost[e] > gemm_cost(n)) use_gemm[e] = 1;
    }
    tiles.erase(std::remove_if(tiles.begin(), tiles.end(), [&](const Tile& tl) { return use_gemm[tl.e] != 0; }),
                tiles.end());
  }

  // items: (group of up to 8 consecutive tiles of one expert, column block). Inside an item the
  // columns go in 96-wide slices, each slice through all the group's tiles, so the slice of the
  // decoder a tile reads is still in cache for the next tile of the same expert.
  constexpr int64_t kGroupTiles = 8, kSlice = 96;
  std::vector<std::pair<int32_t, int32_t>> groups;  // [first tile, end tile)
  for (size_t t = 0; t < tiles.size();) {
    size_t u = t + 1;
    while (u < tiles.size() && u - t < static_cast<size_t>(kGroupTiles) && tiles[u].e == tiles[t].e) ++u;
    groups.push_back({static_cast<int32_t>(t), static_cast<int32_t>(u)});
    t = u;
  }
  int64_t cb = kSlice * 8;
  while (cb > kSlice && static_cast<int64_t>(groups.size()) * ((d + cb - 1) / cb) < 8 * at::get_num_threads()) cb /= 2;
  std::vector<DownItem> items;
  for (size_t gi = 0; gi < groups.size(); ++gi)
    for (int64_t c0 = 0; c0 < d; c0 += cb) items.push_back({static_cast<int32_t>(gi), c0, std::min(c0 + cb, d)});
  cpu::dispatch_float(to_dtype(w_dec, "w_dec"), [&](auto tag) {
    using W = decltype(tag);
    const W* wd = static_cast<const W*>(w_dec.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const DownItem& it = items[i];
        for (int64_t c0 = it.c0; c0 < it.c1; c0 += kSlice) {
          const int64_t nc = std::min(kSlice, it.c1 - c0);
          for (int32_t ti = groups[it.tile].first; ti < groups[it.tile].second; ++ti) {
            const Tile& tl = tiles[ti];
            const W* B = wd + tl.e * D * d + c0;
            const int64_t rows = tl.r1 - tl.r0;
            switch (tl.path) {
              case TilePath::Dense:
                down_rows(Up + tl.r0 * D, D, rows, iota.data(), D, B, d, nc, Yp + tl.r0 * d + c0, d);
                break;
              case TilePath::Union:
                down_rows(Up + tl.r0 * D, D, rows, unions.data() + tl.list_off, tl.list_n, B, d, nc,
                          Yp + tl.r0 * d + c0, d);
                break;
              case TilePath::Rows:
                for (int64_t r = tl.r0; r < tl.r1; ++r)
                  down_rows(Up + r * D, D, 1, lists.data() + r * D, nnz[r], B, d, nc, Yp + r * d + c0, d);
                break;
            }
          }
        }
        for (int32_t ti = groups[it.tile].first; ti < groups[it.tile].second; ++ti) {
          const Tile& tl = tiles[ti];
          if (bd)
            for (int64_t r = tl.r0; r < tl.r1; ++r)
              for (int64_t c = it.c0; c < it.c1; ++c) Yp[r * d + c] += bd[tl.e * d + c];
        }
      }
    });
  });
  for (int64_t e = 0; e < M; ++e) {
    if (!use_gemm[e]) continue;
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    Tensor y = Y.narrow(0, r0, n);
    at::mm_out(y, U.narrow(0, r0, n), w_dec.select(0, e));
    if (bd)
      for (int64_t r = r0; r < r0 + n; ++r)
        for (int64_t c = 0; c < d; ++c) Yp[r * d + c] += bd[e * d + c];
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> moex_router_stats_cpu(const Tensor& w_enc, const std::optional<Tensor>& b_enc) {
  TORCH_CHECK_VALUE(w_enc.device().is_cpu(), "moeops: moex_router_stats_cpu got w_enc on ", w_enc.device());
  MoexStatsPrepared s = prepare_moex_stats(w_enc, b_enc);
  cpu::dispatch_float(s.p.w_dtype, [&](auto tag) { stats_kernel<decltype(tag)>(s.p); });
  return {s.mu, s.var, s.bmean};
}

std::tuple<Tensor, Tensor, Tensor> moex_route_cpu(const Tensor& x, const Tensor& mu, const Tensor& var,
                                                  const Tensor& bias_mean, int64_t k, std::string_view select,
                                                  const std::optional<Tensor>& mask, std::string_view mask_mode,
                                                  const std::optional<Tensor>& forced, bool return_density) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "moeops: moex_route_cpu got x on ", x.device());
  MoexRoutePrepared r = prepare_moex_route(x, mu, var, bias_mean, k, select, mask, mask_mode, forced, return_density);
  route_kernel(r.p);
  return {r.weights, r.ids, r.density};
}

std::tuple<Tensor, Tensor> moex_experts_cpu(const Tensor& hidden_in, const Tensor& ids_in, const Tensor& weights_in,
                                            const Tensor& w_enc_in, const std::optional<Tensor>& b_enc_in,
                                            const Tensor& w_dec_in, const std::optional<Tensor>& b_dec_in,
                                            std::string_view down, bool return_active) {
  TORCH_CHECK_VALUE(hidden_in.device().is_cpu(), "moeops: moex_experts_cpu got hidden on ", hidden_in.device());
  const MoexDims dm = check_moex_experts_args(hidden_in, ids_in, weights_in, w_enc_in, b_enc_in, w_dec_in, b_dec_in,
                                              down);
  const int64_t T = dm.T, d = dm.d, K = dm.K, M = dm.M, D = dm.D;
  const Tensor ids = ids_in.contiguous(), rw = weights_in.contiguous();
  const Tensor w_enc = w_enc_in.contiguous(), w_dec = w_dec_in.contiguous();
  const Tensor benc = b_enc_in.has_value() ? moex_f32_contig(*b_enc_in) : Tensor();
  const Tensor bdec = b_dec_in.has_value() ? moex_f32_contig(*b_dec_in) : Tensor();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const Plan pl = make_plan(idp, T, K, M);
  const int64_t R = pl.off[M];

  Tensor out = at::empty({T, d}, hidden_in.options());
  Tensor active = return_active ? at::zeros({T, K}, ids.options()) : at::empty({0}, ids.options());
  if (T == 0) return {out, active};
  if (d == 0) return {out, return_active ? moex_active_without_features(ids, b_enc_in, M) : active};

  auto f32 = hidden_in.options().dtype(at::kFloat);
  Tensor X = at::empty({R, d}, f32), U = at::empty({R, D}, f32), Y = at::empty({R, d}, f32);
  for (Tensor* t : {&X, &U, &Y}) cpu::advise_huge_pages(t->data_ptr(), t->nbytes());
  float *Xp = X.data_ptr<float>(), *Up = U.data_ptr<float>(), *Yp = Y.data_ptr<float>();
  const Tensor hidden = hidden_in.stride(1) == 1 ? hidden_in : hidden_in.contiguous();
  up_projection(hidden, pl, K, M, D, d, w_enc, benc.defined() ? benc.data_ptr<float>() : nullptr, Xp, Up);

  // per-row active counts and the sparse down-projection (+ b_dec): Y [R, d]
  std::vector<int32_t> nnz(R);
  moex_down_projection(U, pl.off, M, D, d, w_dec, bdec.defined() ? bdec.data_ptr<float>() : nullptr, dm.down,
                       nnz.data(), Y);
  if (return_active) {
    int32_t* ap = active.data_ptr<int32_t>();
    for (int64_t r = 0; r < R; ++r) ap[pl.row_slot[r]] = nnz[r];
  }

  // deterministic weighted combine (slot order, fp32)
  const float* wp = rw.data_ptr<float>();
  const bool avx2 = cpu::use_avx2();
  cpu::dispatch_float(to_dtype(out, "hidden"), [&](auto tag) {
    using TO = decltype(tag);
    TO* op = static_cast<TO*>(out.data_ptr());
    at::parallel_for(0, T, std::max<int64_t>(1, 8192 / std::max<int64_t>(d * K, 1)), [&](int64_t b, int64_t end) {
      std::vector<float> acc(d), ws(K);
      std::vector<int32_t> inv(K);
      for (int64_t t = b; t < end; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          inv[k] = pl.inverse[t * K + k];
          ws[k] = inv[k] >= 0 ? wp[t * K + k] : 0.f;
        }
        cpu::combine_token(avx2, static_cast<const float*>(Yp), d, ws.data(), inv.data(), static_cast<int>(K),
                           acc.data(), op + t * d);
      }
    });
  });
  return {out, active};
}

// Internal (benchmarks): the down-projection alone. h [R, D] fp32 rows grouped by expert,
// offsets [M+1] int32, w_dec [M, D, d] -> y [R, d] fp32.
Tensor moex_down_cpu(const Tensor& h_in, const Tensor& offsets_in, const Tensor& w_dec_in, std::string_view down) {
  check_dim(h_in, 2, "h", "[R, D]");
  check_dtype(h_in, at::kFloat, "h");
  check_dim(w_dec_in, 3, "w_dec", "[M, D, d]");
  to_dtype(w_dec_in, "w_dec");
  check_dim(offsets_in, 1, "offsets", "[M+1]");
  check_dtype(offsets_in, at::kInt, "offsets");
  const int64_t M = w_dec_in.size(0), D = w_dec_in.size(1), d = w_dec_in.size(2), R = h_in.size(0);
  TORCH_CHECK_VALUE(h_in.size(1) == D && offsets_in.size(0) == M + 1, "moeops: h must be [R, D=", D,
                    "] and offsets [M+1=", M + 1, "]");
  const Tensor offsets = offsets_in.contiguous();
  std::vector<int32_t> off(offsets.data_ptr<int32_t>(), offsets.data_ptr<int32_t>() + M + 1);
  TORCH_CHECK_VALUE(off[0] == 0 && off[M] == R, "moeops: offsets must start at 0 and end at R=", R);
  for (int64_t e = 0; e < M; ++e) TORCH_CHECK_VALUE(off[e + 1] >= off[e], "moeops: offsets must be non-decreasing");
  MoexDown md = down == "dense" ? MoexDown::Dense : down == "sparse" ? MoexDown::Sparse : MoexDown::Auto;
  TORCH_CHECK_VALUE(down == "dense" || down == "sparse" || down == "auto", "moeops: down must be 'auto', 'dense' or 'sparse'");
  const Tensor h = h_in.contiguous(), w_dec = w_dec_in.contiguous();
  Tensor y = at::empty({R, d}, h.options());
  std::vector<int32_t> nnz(R);
  if (R > 0 && d > 0) moex_down_projection(h, off, M, D, d, w_dec, nullptr, md, nnz.data(), y);
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moex_code_cpu(const Tensor& hidden_in, const Tensor& ids_in,
                                                          const Tensor& weights_in, const Tensor& w_enc_in,
                                                          const std::optional<Tensor>& b_enc_in) {
  TORCH_CHECK_VALUE(hidden_in.device().is_cpu(), "moeops: moex_code_cpu got hidden on ", hidden_in.device());
  check_routed_tokens(hidden_in, ids_in, weights_in);
  check_same_device(w_enc_in, hidden_in, "w_enc", "hidden");
  check_moex_encoder(w_enc_in, b_enc_in);
  const int64_t T = hidden_in.size(0), d = hidden_in.size(1), K = ids_in.size(1);
  const int64_t M = w_enc_in.size(0), D = w_enc_in.size(1);
  TORCH_CHECK_VALUE(w_enc_in.size(2) == d, "moeops: w_enc must be [M, D, d] with d=", d, " (hidden is ",
                    hidden_in.sizes(), "), got ", w_enc_in.sizes());
  const Tensor ids = ids_in.contiguous(), rw = weights_in.contiguous();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const float* wp = rw.data_ptr<float>();
  for (int64_t s = 0; s < T * K; ++s)
    TORCH_CHECK_VALUE(idp[s] >= -1 && idp[s] < M, "moeops: ids must be in [-1, M=", M, "), got ", idp[s],
                      " at token ", s / K, ", slot ", s % K);
  const Tensor x = moex_f32_contig(hidden_in), w_enc = w_enc_in.contiguous();
  const Tensor benc = b_enc_in.has_value() ? moex_f32_contig(*b_enc_in) : Tensor();
  const float* xp = x.data_ptr<float>();
  const float* be = benc.defined() ? benc.data_ptr<float>() : nullptr;
  std::vector<std::vector<int64_t>> idx(T);
  std::vector<std::vector<float>> val(T);
  cpu::dispatch_float(to_dtype(w_enc, "w_enc"), [&](auto tag) {
    using W = decltype(tag);
    const W* wenc = static_cast<const W*>(w_enc.data_ptr());
    at::parallel_for(0, T, 1, [&](int64_t b, int64_t end) {
      std::vector<float> h(D);
      std::vector<std::pair<int32_t, float>> experts;
      for (int64_t t = b; t < end; ++t) {
        experts.clear();  // distinct experts ascending, weights of duplicate slots summed
        for (int64_t k = 0; k < K; ++k)
          if (idp[t * K + k] >= 0) experts.push_back({idp[t * K + k], wp[t * K + k]});
        std::stable_sort(experts.begin(), experts.end(), [](auto& a, auto& c) { return a.first < c.first; });
        for (size_t j = 0; j < experts.size(); ++j) {
          if (j + 1 < experts.size() && experts[j + 1].first == experts[j].first) {
            experts[j + 1].second += experts[j].second;
            continue;
          }
          const int32_t e = experts[j].first;
          const float om = experts[j].second;
          cpu::gemm_dot(xp + t * d, d, 1, wenc + e * D * d, d, D, d, h.data(), D);
          for (int64_t i = 0; i < D; ++i) {
            const float u = h[i] + (be ? be[e * D + i] : 0.f);
            const float z = om * (u > 0.f || u != u ? u : 0.f);
            if (z != 0.f) {
              idx[t].push_back(e * D + i);
              val[t].push_back(z);
            }
          }
        }
      }
    });
  });
  auto i64 = hidden_in.options().dtype(at::kLong);
  Tensor indptr = at::empty({T + 1}, i64), l0 = at::empty({T}, hidden_in.options().dtype(at::kInt));
  int64_t* ip = indptr.data_ptr<int64_t>();
  ip[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    ip[t + 1] = ip[t] + static_cast<int64_t>(idx[t].size());
    l0.data_ptr<int32_t>()[t] = static_cast<int32_t>(idx[t].size());
  }
  Tensor indices = at::empty({ip[T]}, i64), values = at::empty({ip[T]}, hidden_in.options().dtype(at::kFloat));
  for (int64_t t = 0; t < T; ++t) {
    std::copy(idx[t].begin(), idx[t].end(), indices.data_ptr<int64_t>() + ip[t]);
    std::copy(val[t].begin(), val[t].end(), values.data_ptr<float>() + ip[t]);
  }
  return {indptr, indices, values, l0};
}

}  // namespace moeops
