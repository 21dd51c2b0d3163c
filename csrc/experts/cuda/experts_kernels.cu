// Grouped GEMM over expert-grouped rows on CUDA (semantics: python/moeops/reference.py
// grouped_gemm; the fused-experts epilogues are documented in experts_launch.h).
//
// Three kernels share one tile schedule and one epilogue:
//   * tensor cores (sm_80+: mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate): CTA tile 64 rows
//     x 128 weight rows x 32 K, 4 warps of 32 x 64, cp.async double buffering into padded shared
//     memory (row stride 40 halves: the fragment loads are bank-conflict free). For GatedAct the
//     CTA's 128 weight rows are 64 gate rows and the matching 64 up rows, laid out so that each
//     thread holds a gate accumulator and its up partner in registers: the SwiGLU epilogue needs
//     no shared memory and the intermediate [R, 2I] never exists.
//   * decode (rows per expert <= 16): one warp per output column of one expert reads that weight
//     row once (16-byte loads where aligned, several in flight per lane) for all of the expert's
//     rows; no 64-row padding, and blocks only for experts with rows.
//   * SIMT fallback (fp32, mixed dtypes, [E, K, N] weights, unaligned shapes): 64 x 64 tiles.
// Tile schedule: tile_start[e] = sum over experts before e of ceil(rows / 64), computed by one
// block (cub::BlockScan) on the device; GEMM CTAs walk tiles grid-stride and find their expert by
// binary search, so nothing waits for the host and experts without rows launch no tile work.
// All row and element offsets are 64-bit.
//
// Only CUDA/CUB headers and the launch header here (project rule: no torch in .cu files).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/launch_types.h"
#include "common/cuda_common.cuh"
#include "experts/cuda/experts_launch.h"

namespace moeops::cuda {
namespace {

constexpr int kTileRows = 64;  // rows per tile in both tiled kernels (the schedule's unit)
constexpr int kDecodeRows = 4;  // rows per pass of the decode kernel (sets its register use)
constexpr int kDecodeThreads = 256;     // 8 warps
constexpr int kDecodeUnroll = 4;         // weight vectors in flight per lane and row
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float activate(int act, float x) {
  switch (act) {
    case 0: return x / (1.f + expf(-x));
    case 1: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case 2: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case 3: return x > 0.f ? x : 0.f;
    case 4: return x > 0.f ? x * x : 0.f;
  }
  return x;
}

// Rows [lo, hi) of expert e, offsets clamped to [0, R].
__device__ __forceinline__ void expert_rows(const GroupedGemmParams& p, int e, int64_t& lo, int64_t& hi) {
  lo = min(max(static_cast<int64_t>(p.offsets[e]), int64_t{0}), p.R);
  hi = min(max(static_cast<int64_t>(p.offsets[e + 1]), lo), p.R);
}

// The value written for output column c (see Epilogue); g = acc of weight row c, u = acc of row
// gated_half + c (GatedAct only).
__device__ __forceinline__ float epilogue_value(const GroupedGemmParams& p, int e, int64_t c, float g, float u) {
  const float* b = p.bias ? p.bias + static_cast<int64_t>(e) * p.N_w : nullptr;
  switch (p.epilogue) {
    case Epilogue::Store: return g + (b ? b[c] : 0.f);
    case Epilogue::Act: return activate(p.activation, g + (b ? b[c] : 0.f));
    case Epilogue::GatedAct:
      return activate(p.activation, g + (b ? b[c] : 0.f)) * (u + (b ? b[p.gated_half + c] : 0.f));
  }
  return g;
}

template <class TO>
__device__ __forceinline__ void store_out(const GroupedGemmParams& p, int64_t row, int64_t c, float v) {
  static_cast<TO*>(p.out)[row * p.N_out + c] = from_float<TO>(v);
}

// ---------------------------------------------------------------- tile schedule
__global__ void __launch_bounds__(1024) tile_start_kernel(GroupedGemmParams p, int32_t* tile_start) {
  using Scan = cub::BlockScan<int, 1024>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < p.E; base += 1024) {
    const int e = base + static_cast<int>(threadIdx.x);
    int n = 0;
    if (e < p.E) {
      int64_t lo, hi;
      expert_rows(p, e, lo, hi);
      n = static_cast<int>((hi - lo + kTileRows - 1) / kTileRows);
    }
    int excl, total;
    Scan(tmp).ExclusiveSum(n, excl, total);
    if (e < p.E) tile_start[e] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) tile_start[p.E] = carry;
}

// Expert owning tile `tile`: the last e with tile_start[e] <= tile (experts with no tiles share
// their start with the next one, so the last match is the owner).
__device__ __forceinline__ int tile_expert(const int32_t* tile_start, int E, int tile) {
  int lo = 0, hi = E + 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tile_start[mid] <= tile) lo = mid + 1;
    else hi = mid;
  }
  return lo - 1;
}

// ---------------------------------------------------------------- tensor-core kernel
constexpr int kTcBN = 128, kTcBK = 32, kTcLds = kTcBK + 8;  // smem row stride in halves

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an arch without mma.sync bf16/f16 (< sm_80): fail loudly, never zeros
#endif
}

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// grid.x: column tiles (128 weight rows, or 64 gate + 64 up rows for GatedAct); grid.y strides
// over the row tiles of all experts.
template <class T, class TO>
__global__ void __launch_bounds__(128) grouped_gemm_tc_kernel(GroupedGemmParams p, const int32_t* tile_start) {
  __shared__ __align__(16) uint16_t As[2][kTileRows * kTcLds];
  __shared__ __align__(16) uint16_t Bs[2][kTcBN * kTcLds];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // warp tile: rows 32*wm.., weight rows below
  const int grp = lane >> 2, tig = lane & 3;
  const bool gated = p.epilogue == Epilogue::GatedAct;
  const T* A = static_cast<const T*>(p.a);
  const T* W = static_cast<const T*>(p.w);
  const int64_t K = p.K;
  const int nk = static_cast<int>((K + kTcBK - 1) / kTcBK);
  const int total = tile_start[p.E];
  // shared-memory row of the warp's n-tile ni (8 weight rows each)
  auto smem_n = [&](int ni) { return gated ? (ni < 4 ? wn * 32 + ni * 8 : 64 + wn * 32 + (ni - 4) * 8) : wn * 64 + ni * 8; };

  for (int tile = blockIdx.y; tile < total; tile += gridDim.y) {
    const int e = tile_expert(tile_start, p.E, tile);
    int64_t lo, hi;
    expert_rows(p, e, lo, hi);
    const int64_t row0 = lo + static_cast<int64_t>(tile - tile_start[e]) * kTileRows;
    const T* We = W + static_cast<int64_t>(e) * p.N_w * K;

    auto load_stage = [&](int stage, int kt) {
      const int64_t k0 = static_cast<int64_t>(kt) * kTcBK;
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // A: 64 rows x 4 chunks of 8 halves
        const int c = tid + i * 128, r = c >> 2, ch = c & 3;
        const int64_t row = row0 + r, k = k0 + ch * 8;
        const bool ok = row < hi && k < K;
        cp_async16(&As[stage][r * kTcLds + ch * 8], ok ? A + row * p.lda + k : A, ok);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // B: 128 weight rows x 4 chunks
        const int c = tid + i * 128, r = c >> 2, ch = c & 3;
        int64_t n;
        bool ok;
        if (gated) {
          const int64_t g = static_cast<int64_t>(blockIdx.x) * 64 + (r & 63);
          ok = g < p.gated_half;
          n = r < 64 ? g : p.gated_half + g;
        } else {
          n = static_cast<int64_t>(blockIdx.x) * kTcBN + r;
          ok = n < p.N_w;
        }
        const int64_t k = k0 + ch * 8;
        ok = ok && k < K;
        cp_async16(&Bs[stage][r * kTcLds + ch * 8], ok ? We + n * K + k : W, ok);
      }
      cp_async_commit();
    };

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;

    load_stage(0, 0);
    for (int kt = 0; kt < nk; ++kt) {
      if (kt + 1 < nk) {
        load_stage((kt + 1) & 1, kt + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const uint16_t* as = As[kt & 1];
      const uint16_t* bs = Bs[kt & 1];
#pragma unroll
      for (int ks = 0; ks < kTcBK; ks += 16) {
        uint32_t af[2][4], bf[8][2];
        const int col = ks + tig * 2;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = wm * 32 + mi * 16 + grp;
          af[mi][0] = lds32(as + r * kTcLds + col);
          af[mi][1] = lds32(as + (r + 8) * kTcLds + col);
          af[mi][2] = lds32(as + r * kTcLds + col + 8);
          af[mi][3] = lds32(as + (r + 8) * kTcLds + col + 8);
        }
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          const int n = smem_n(ni) + grp;
          bf[ni][0] = lds32(bs + n * kTcLds + col);
          bf[ni][1] = lds32(bs + n * kTcLds + col + 8);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 8; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
      }
      __syncthreads();  // the next iteration's loads overwrite this stage
    }

    // epilogue: c0,c1 -> (row grp, cols 2*tig, 2*tig+1), c2,c3 -> row grp + 8
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + wm * 32 + mi * 16 + grp + h * 8;
        if (row >= hi) continue;
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            if (gated) {
              if (ni >= 4) continue;
              const int64_t c = static_cast<int64_t>(blockIdx.x) * 64 + wn * 32 + ni * 8 + tig * 2 + j;
              if (c < p.N_out)
                store_out<TO>(p, row, c, epilogue_value(p, e, c, acc[mi][ni][h * 2 + j], acc[mi][ni + 4][h * 2 + j]));
            } else {
              const int64_t c = static_cast<int64_t>(blockIdx.x) * kTcBN + wn * 64 + ni * 8 + tig * 2 + j;
              if (c < p.N_out) store_out<TO>(p, row, c, epilogue_value(p, e, c, acc[mi][ni][h * 2 + j], 0.f));
            }
          }
      }
  }
}

// ---------------------------------------------------------------- SIMT fallback
constexpr int kSimtBN = 64, kSimtBK = 16;

template <class TW>
__device__ __forceinline__ float weight_at(const GroupedGemmParams& p, const TW* We, int64_t n, int64_t k) {
  return to_float(p.w_transposed ? We[k * p.N_w + n] : We[n * p.K + k]);
}

// 256 threads, 64 rows x 64 output columns, 4 x 4 per thread; GatedAct keeps a second
// accumulator for the up rows.
template <class TA, class TW, class TO>
__global__ void __launch_bounds__(256) grouped_gemm_simt_kernel(GroupedGemmParams p, const int32_t* tile_start) {
  __shared__ float As[kSimtBK][kTileRows + 1];
  __shared__ float Bg[kSimtBK][kSimtBN + 1];
  __shared__ float Bu[kSimtBK][kSimtBN + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const bool gated = p.epilogue == Epilogue::GatedAct;
  const TA* A = static_cast<const TA*>(p.a);
  const TW* W = static_cast<const TW*>(p.w);
  const int total = tile_start[p.E];
  for (int tile = blockIdx.y; tile < total; tile += gridDim.y) {
    const int e = tile_expert(tile_start, p.E, tile);
    int64_t lo, hi;
    expert_rows(p, e, lo, hi);
    const int64_t row0 = lo + static_cast<int64_t>(tile - tile_start[e]) * kTileRows;
    const TW* We = W + static_cast<int64_t>(e) * p.N_w * p.K;
    float acc[4][4] = {}, accu[4][4] = {};
    for (int64_t k0 = 0; k0 < p.K; k0 += kSimtBK) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int idx = threadIdx.x + i * 256, r = idx >> 4, kk = idx & 15;
        const int64_t row = row0 + r, k = k0 + kk;
        As[kk][r] = (row < hi && k < p.K) ? to_float(A[row * p.lda + k]) : 0.f;
        const int64_t c = static_cast<int64_t>(blockIdx.x) * kSimtBN + r;
        const bool ok = c < p.N_out && k < p.K;
        Bg[kk][r] = ok ? weight_at(p, We, c, k) : 0.f;
        if (gated) Bu[kk][r] = ok ? weight_at(p, We, p.gated_half + c, k) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSimtBK; ++kk) {
        float a[4], b[4], bu[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = As[kk][ty * 4 + i];
          b[i] = Bg[kk][tx * 4 + i];
          bu[i] = gated ? Bu[kk][tx * 4 + i] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            accu[i][j] = fmaf(a[i], bu[j], accu[i][j]);
          }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + ty * 4 + i;
      if (row >= hi) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = static_cast<int64_t>(blockIdx.x) * kSimtBN + tx * 4 + j;
        if (c < p.N_out) store_out<TO>(p, row, c, epilogue_value(p, e, c, acc[i][j], accu[i][j]));
      }
    }
  }
}

// ---------------------------------------------------------------- decode
// V consecutive elements as one load, kept packed in registers until used.
template <class T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, V>*>(ptr);
}

// The expert of decode block `y` when the grid has fewer rows than experts (gridDim.y < E): the
// y-th expert with rows (-1 when fewer than y + 1 have any). Every thread tests experts t,
// t + 256, ...; a block scan ranks them. One round of offset loads for E <= 256.
__device__ __forceinline__ int nth_expert_with_rows(const GroupedGemmParams& p, int y) {
  using Scan = cub::BlockScan<int, kDecodeThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int found;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  int before = 0;  // experts with rows in the earlier rounds (block-uniform)
  for (int e0 = 0; e0 < p.E; e0 += kDecodeThreads) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    int has = 0;
    if (e < p.E) {
      int64_t lo, hi;
      expert_rows(p, e, lo, hi);
      has = hi > lo;
    }
    int rank, total;
    Scan(scan_tmp).ExclusiveSum(has, rank, total);
    if (has && before + rank == y) found = e;
    before += total;
    __syncthreads();  // `found` visible; scan_tmp free for the next round
    if (before > y) break;
  }
  return found;
}

// Output columns per decode block: a warp streams two weight rows at once, the gate and up rows
// of one column (GatedAct) or two columns (otherwise), and makes two such passes.
__host__ __device__ constexpr int decode_cols_per_block(bool gated) {
  return (kDecodeThreads / 32) * (gated ? 1 : 2) * 2;
}

// grid (column blocks, min(E, R)): block y takes expert y when the grid covers every expert, else
// the y-th expert with rows (a decode step uses a few of many experts, and blocks of unused experts
// would still cost their scheduling). Each warp streams two weight rows per pass
// (decode_cols_per_block) and reads them once per kDecodeRows rows of that expert (a further pass
// over the same rows is served by L2: at H = 7168, 16 warps' rows are ~450 KB, more than L1). V
// elements per load (16 bytes when K, lda and the pointers allow it); each lane issues
// kDecodeUnroll loads of each row before using them, so a warp has 2 x kDecodeUnroll x 32 x 16
// bytes of weights in flight: the kernel is bound by memory latency x bytes in flight, not by
// arithmetic. Two blocks per SM: 4 rows per pass keep every instantiation at <= 124 registers
// without spills (ptxas -v, sm_80 and sm_90a: bf16 124, fp16 114, fp32 104, scalar V = 1 79; 8 rows
// needed 164, one block). Offsets must not decrease: with min(E, R) grid rows, overlapping ranges
// would leave experts beyond the R-th with rows uncomputed.
// The products of one lane are summed in the order k = lane V, lane V + 32 V, ... whatever the
// unroll or the rows per pass.
template <class TA, class TW, class TO, int V>
__global__ void __launch_bounds__(kDecodeThreads, 2) grouped_gemm_decode_kernel(GroupedGemmParams p) {
  const int e = static_cast<int>(gridDim.y) >= p.E ? static_cast<int>(blockIdx.y)
                                                   : nth_expert_with_rows(p, static_cast<int>(blockIdx.y));
  if (e < 0) return;
  int64_t lo, hi;
  expert_rows(p, e, lo, hi);
  if (hi <= lo) return;
  constexpr int kWarps = kDecodeThreads / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool gated = p.epilogue == Epilogue::GatedAct;
  const TA* A = static_cast<const TA*>(p.a);
  const TW* We = static_cast<const TW*>(p.w) + static_cast<int64_t>(e) * p.N_w * p.K;
  const int64_t cols = decode_cols_per_block(gated);
  const int64_t c_end = min(p.N_out, static_cast<int64_t>(blockIdx.x + 1) * cols);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * cols + warp; c < c_end; c += gated ? kWarps : 2 * kWarps) {
    const int64_t c2 = c + kWarps;          // the pass's second column (not gated)
    const bool two = gated || c2 < c_end;   // warp-uniform: a second weight row to stream
    const TW* w0 = We + c * p.K;
    const TW* w1 = We + (gated ? p.gated_half + c : (two ? c2 : c)) * p.K;
    for (int64_t m0 = lo; m0 < hi; m0 += kDecodeRows) {
      const int nr = static_cast<int>(min(static_cast<int64_t>(kDecodeRows), hi - m0));
      const TA* arow[kDecodeRows];  // GEMM row m0 + m: row m0 + m of a, or its slot's token
#pragma unroll
      for (int m = 0; m < kDecodeRows; ++m) {
        const int64_t r = m0 + min(m, nr - 1);
        arow[m] = A + (p.a_slots ? static_cast<int64_t>(p.a_slots[r]) / p.a_slot_div : r) * p.lda;
      }
      float acc0[kDecodeRows], acc1[kDecodeRows];
#pragma unroll
      for (int m = 0; m < kDecodeRows; ++m) acc0[m] = acc1[m] = 0.f;
      for (int64_t k0 = static_cast<int64_t>(lane) * V; k0 < p.K; k0 += 32 * V * kDecodeUnroll) {
        Pack<TW, V> b0[kDecodeUnroll], b1[kDecodeUnroll];
#pragma unroll
        for (int j = 0; j < kDecodeUnroll; ++j) {  // all loads first: they overlap
          const int64_t k = k0 + j * 32 * V;
          if (k < p.K) {
            b0[j] = load_pack<TW, V>(w0 + k);
            if (two) b1[j] = load_pack<TW, V>(w1 + k);
          }
        }
#pragma unroll
        for (int j = 0; j < kDecodeUnroll; ++j) {
          const int64_t k = k0 + j * 32 * V;
          if (k >= p.K) break;
#pragma unroll
          for (int m = 0; m < kDecodeRows; ++m) {
            if (m >= nr) break;
            const Pack<TA, V> a = load_pack<TA, V>(arow[m] + k);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              const float ai = to_float(a.v[i]);
              acc0[m] = fmaf(ai, to_float(b0[j].v[i]), acc0[m]);
              if (two) acc1[m] = fmaf(ai, to_float(b1[j].v[i]), acc1[m]);
            }
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kDecodeRows; ++m) {
        if (m >= nr) break;
        const float s0 = warp_sum(acc0[m]);
        const float s1 = two ? warp_sum(acc1[m]) : 0.f;
        if (lane == 0) {
          if (gated) {
            store_out<TO>(p, m0 + m, c, epilogue_value(p, e, c, s0, s1));
          } else {
            store_out<TO>(p, m0 + m, c, epilogue_value(p, e, c, s0, 0.f));
            if (two) store_out<TO>(p, m0 + m, c2, epilogue_value(p, e, c2, s1, 0.f));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch
// The dtype combinations instantiated (each kernel is compiled once per combination, so the
// list is kept short; the host casts other mixes of activations to fp32):
//   a == w (out a's dtype or fp32), or fp32 a with 16-bit w (out fp32).
template <class F>
void dispatch_types(const GroupedGemmParams& p, F&& f) {
  const DType a = p.a_dtype, w = p.w_dtype, o = p.out_dtype;
  if (a == DType::F32 && w == DType::F32 && o == DType::F32) return f.template operator()<float, float, float>();
  if (a == DType::F16 && w == DType::F16 && o == DType::F16) return f.template operator()<__half, __half, __half>();
  if (a == DType::F16 && w == DType::F16 && o == DType::F32) return f.template operator()<__half, __half, float>();
  if (a == DType::BF16 && w == DType::BF16 && o == DType::BF16)
    return f.template operator()<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>();
  if (a == DType::BF16 && w == DType::BF16 && o == DType::F32)
    return f.template operator()<__nv_bfloat16, __nv_bfloat16, float>();
  if (a == DType::F32 && w == DType::F16 && o == DType::F32) return f.template operator()<float, __half, float>();
  if (a == DType::F32 && w == DType::BF16 && o == DType::F32) return f.template operator()<float, __nv_bfloat16, float>();
  throw std::invalid_argument("moeops::cuda::launch_grouped_gemm: unsupported dtype combination (a, w, out) = (" +
                              std::to_string(static_cast<int>(a)) + ", " + std::to_string(static_cast<int>(w)) +
                              ", " + std::to_string(static_cast<int>(o)) + ")");
}

int elem_bytes(DType dt) { return dt == DType::F32 ? 4 : 2; }

}  // namespace

size_t grouped_gemm_workspace_bytes(int E) { return sizeof(int32_t) * (static_cast<size_t>(E) + 1); }

bool grouped_gemm_uses_tensor_cores(const GroupedGemmParams& p, int device_major) {
  return device_major >= 8 && p.a_dtype == p.w_dtype && p.a_dtype != DType::F32 && !p.w_transposed &&
         p.K > 0 && p.K % 8 == 0 && p.lda % 8 == 0 && aligned16(p.a) && aligned16(p.w);
}

bool grouped_gemm_uses_decode(const GroupedGemmParams& p, int64_t max_rows_per_expert) {
  return max_rows_per_expert <= 16 && !p.w_transposed && p.E <= kMaxGridY;
}

void launch_grouped_gemm(const GroupedGemmParams& p, int64_t max_rows_per_expert, int device_major, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  if (p.E < 1 || p.R <= 0 || p.N_out <= 0) return;
  if (p.epilogue == Epilogue::GatedAct && (p.N_out != p.gated_half || p.N_w < 2 * p.gated_half))
    throw std::invalid_argument(
        "moeops::cuda::launch_grouped_gemm: GatedAct needs N_out == gated_half and N_w >= 2 * gated_half");
  if (workspace == nullptr || workspace_bytes < grouped_gemm_workspace_bytes(p.E))
    throw std::invalid_argument("moeops::cuda::launch_grouped_gemm: workspace too small");

  // decode: few rows per expert, [E, N, K] weights, E fits grid.y
  if (grouped_gemm_uses_decode(p, max_rows_per_expert)) {
    // at most R experts have rows: a decode step launches blocks for those, not for all E
    const int64_t cols = decode_cols_per_block(p.epilogue == Epilogue::GatedAct);
    const dim3 grid(static_cast<unsigned>((p.N_out + cols - 1) / cols),
                    static_cast<unsigned>(std::min<int64_t>(p.E, p.R)));
    const int ea = elem_bytes(p.a_dtype);
    const bool vec = p.a_dtype == p.w_dtype && p.K % (16 / ea) == 0 && p.lda % (16 / ea) == 0 && aligned16(p.a) &&
                     aligned16(p.w);
    dispatch_types(p, [&]<class TA, class TW, class TO>() {
      if constexpr (std::is_same_v<TA, TW>) {
        if (vec) {
          grouped_gemm_decode_kernel<TA, TW, TO, 16 / sizeof(TA)><<<grid, kDecodeThreads, 0, stream>>>(p);
          return;
        }
      }
      grouped_gemm_decode_kernel<TA, TW, TO, 1><<<grid, kDecodeThreads, 0, stream>>>(p);
    });
    check_cuda(cudaGetLastError(), "grouped_gemm decode kernel launch");
    return;
  }

  if (p.a_slots)
    throw std::invalid_argument("moeops::cuda::launch_grouped_gemm: a_slots needs the decode kernel");
  int32_t* tile_start = static_cast<int32_t*>(workspace);
  tile_start_kernel<<<1, 1024, 0, stream>>>(p, tile_start);
  check_cuda(cudaGetLastError(), "grouped_gemm tile schedule launch");
  // each expert with rows adds at most one partial tile, and at most min(E, R) experts have rows
  const int64_t tiles_bound = (p.R + kTileRows - 1) / kTileRows + std::min<int64_t>(p.E, p.R);
  const unsigned gy = static_cast<unsigned>(std::min<int64_t>(tiles_bound, kMaxGridY));
  const bool gated = p.epilogue == Epilogue::GatedAct;
  const bool tc = grouped_gemm_uses_tensor_cores(p, device_major);
  dispatch_types(p, [&]<class TA, class TW, class TO>() {
    if constexpr (std::is_same_v<TA, TW> && !std::is_same_v<TA, float>) {
      if (tc) {
        const int64_t cols = gated ? (p.gated_half + 63) / 64 : (p.N_w + kTcBN - 1) / kTcBN;
        grouped_gemm_tc_kernel<TA, TO><<<dim3(static_cast<unsigned>(cols), gy), 128, 0, stream>>>(p, tile_start);
        return;
      }
    }
    const dim3 grid(static_cast<unsigned>((p.N_out + kSimtBN - 1) / kSimtBN), gy);
    grouped_gemm_simt_kernel<TA, TW, TO><<<grid, 256, 0, stream>>>(p, tile_start);
  });
  check_cuda(cudaGetLastError(), "grouped_gemm kernel launch");
}

// ---------------------------------------------------------------- separate activation
// out[r, c] = act(in[r, c]) (* in[r, I + c] when gated) for rows r in [offsets[0], offsets[E])
// (clamped to [0, R]); `kVec` columns per thread (16-byte accesses when I allows).
template <class T, int kVec>
__global__ void expert_activation_kernel(const T* in, int64_t R, int64_t I, bool gated, int act,
                                         const int32_t* offsets, int E, T* out) {
  const int64_t r0 = min(max(static_cast<int64_t>(offsets[0]), int64_t{0}), R);
  const int64_t r1 = min(max(static_cast<int64_t>(offsets[E]), r0), R);
  const int64_t vecs_per_row = I / kVec;
  const int64_t n = (r1 - r0) * vecs_per_row;
  const int64_t in_cols = gated ? 2 * I : I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = r0 + i / vecs_per_row, c = (i % vecs_per_row) * kVec;
    const T* src = in + r * in_cols + c;
    alignas(16) T g[kVec], u[kVec], o[kVec];  // reinterpreted as uint4 below
    if constexpr (kVec * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(src);
      if (gated) *reinterpret_cast<uint4*>(u) = *reinterpret_cast<const uint4*>(src + I);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        g[j] = src[j];
        if (gated) u[j] = src[I + j];
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = activate(act, to_float(g[j]));
      o[j] = from_float<T>(gated ? v * to_float(u[j]) : v);
    }
    T* dst = out + r * I + c;
    if constexpr (kVec * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(o);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) dst[j] = o[j];
    }
  }
}

void launch_expert_activation(const void* in, DType dtype, int64_t R, int64_t I, bool gated, int activation,
                              const int32_t* offsets, int E, void* out, int num_sms, cudaStream_t stream) {
  if (R <= 0 || I <= 0 || E < 1) return;
  const bool vec = I % 8 == 0 && aligned16(in) && aligned16(out);
  const int blocks = std::max(1, num_sms) * 8;
  auto go = [&]<class T>() {
    if (vec)
      expert_activation_kernel<T, 8><<<blocks, 256, 0, stream>>>(static_cast<const T*>(in), R, I, gated, activation,
                                                                 offsets, E, static_cast<T*>(out));
    else
      expert_activation_kernel<T, 1><<<blocks, 256, 0, stream>>>(static_cast<const T*>(in), R, I, gated, activation,
                                                                 offsets, E, static_cast<T*>(out));
  };
  if (dtype == DType::BF16) go.template operator()<__nv_bfloat16>();
  else if (dtype == DType::F16) go.template operator()<__half>();
  else throw std::invalid_argument("moeops::cuda::launch_expert_activation: 16-bit dtypes only");
  check_cuda(cudaGetLastError(), "expert activation kernel launch");
}

// ---------------------------------------------------------------- fused_experts_stats
namespace {
struct MaxAt {  // max |y| and its first channel; NaN never wins (as the CPU loop's `a > mx`)
  float v;
  int64_t i;
};
struct MaxAtOp {
  __device__ __forceinline__ MaxAt operator()(const MaxAt& a, const MaxAt& b) const {
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
  }
};
}  // namespace

template <class TA>
__global__ void __launch_bounds__(256) expert_stats_rows_kernel(ExpertStatsParams p) {
  using Reduce = cub::BlockReduce<float, 256>;
  using ReduceAt = cub::BlockReduce<MaxAt, 256>;
  using ReduceI = cub::BlockReduce<int64_t, 256>;
  __shared__ union {
    typename Reduce::TempStorage f;
    typename ReduceAt::TempStorage at;
    typename ReduceI::TempStorage i;
  } tmp;
  const int64_t rows = min(max(static_cast<int64_t>(p.offsets[p.E]), int64_t{0}), p.R);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* y = p.y + r * p.H;
    float ss = 0.f;
    MaxAt best{-1.f, -1};
    for (int64_t h = threadIdx.x; h < p.H; h += blockDim.x) {
      const float v = y[h], a = fabsf(v);
      ss += v * v;
      if (a > best.v) best = {a, h};  // per thread: ascending h, so the first maximum
    }
    const TA* u = static_cast<const TA*>(p.act) + r * p.I;
    float imx = 0.f;
    int64_t nnz = 0;
    for (int64_t j = threadIdx.x; j < p.I; j += blockDim.x) {
      const float v = to_float(u[j]);
      imx = fmaxf(imx, fabsf(v));
      nnz += v != 0.f;
    }
    const float ss_all = Reduce(tmp.f).Sum(ss);
    __syncthreads();
    const MaxAt best_all = ReduceAt(tmp.at).Reduce(best, MaxAtOp());
    __syncthreads();
    const float imx_all = Reduce(tmp.f).Reduce(imx, [](float a, float b) { return fmaxf(a, b); });
    __syncthreads();
    const int64_t nnz_all = ReduceI(tmp.i).Sum(nnz);
    __syncthreads();
    if (threadIdx.x == 0) {
      p.slot_norms[p.sorted_slots[r]] = sqrtf(ss_all);
      p.row_max[r] = best_all.v;
      p.row_ch[r] = best_all.i;
      p.row_in_max[r] = imx_all;
      p.row_nnz[r] = nnz_all;
    }
  }
}

// One thread per expert, its rows in order: the same first-maximum rule as the CPU kernel.
__global__ void expert_stats_experts_kernel(ExpertStatsParams p) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= p.E) return;
  const int64_t lo = min(max(static_cast<int64_t>(p.offsets[e]), int64_t{0}), p.R);
  const int64_t hi = min(max(static_cast<int64_t>(p.offsets[e + 1]), lo), p.R);
  float mx = p.out_absmax[e], imx = p.in_absmax[e];
  int64_t ch = p.out_channel[e], act = p.active[e];
  for (int64_t r = lo; r < hi; ++r) {
    if (ch < 0 || p.row_max[r] > mx) {
      mx = p.row_max[r];
      ch = p.row_ch[r];
    }
    imx = fmaxf(imx, p.row_in_max[r]);
    act += p.row_nnz[r];
  }
  p.out_absmax[e] = mx;
  p.out_channel[e] = ch;
  p.in_absmax[e] = imx;
  p.active[e] = act;
}

void launch_expert_stats(const ExpertStatsParams& p, int num_sms, cudaStream_t stream) {
  if (p.E < 1) return;
  if (p.R > 0) {
    const int blocks = static_cast<int>(std::min<int64_t>(p.R, std::max(1, num_sms) * 8));
    switch (p.act_dtype) {
      case DType::F32: expert_stats_rows_kernel<float><<<blocks, 256, 0, stream>>>(p); break;
      case DType::F16: expert_stats_rows_kernel<__half><<<blocks, 256, 0, stream>>>(p); break;
      case DType::BF16: expert_stats_rows_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p); break;
    }
    check_cuda(cudaGetLastError(), "expert statistics (rows) kernel launch");
  }
  expert_stats_experts_kernel<<<(p.E + 127) / 128, 128, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "expert statistics (experts) kernel launch");
}

}  // namespace moeops::cuda
