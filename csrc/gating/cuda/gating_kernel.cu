// Fused top-k gating (python/moeops/reference.py::topk_gating) on CUDA.
//
// Design: one warp per token (kWarpsPerBlock warps per block, grid-stride over tokens). A
// warp keeps its token's scores, selection keys (sel) and per-expert flags in shared memory
// (dynamic, sized for E and n_group). Expert e is owned by lane e % 32: only that lane writes
// the per-expert data, so the few cross-lane reads are fenced by __syncwarp.
//
//   1. scores: softmax (max ignoring NaN, e = expf(x - m), sum, e / sum) or sigmoid
//      1 / (1 + expf(-x)), fp32, accurate expf (never __expf / fast-math).
//   2. sel = score + bias, flags (available / forced / masked).
//   3. n_group > 1: group score = sum of the two largest available sel (-inf when fewer than
//      two, NaN -> -inf); keep the topk_group best groups (ties: lower group index).
//   4. forced (and not NaN) experts become available, tier = forced + available.
//   5. k rounds of a warp arg-max over a packed 64-bit key (tier, sel, -index): the larger
//      key wins, which is exactly the reference order (tier desc, sel desc, index asc). Each
//      lane caches the best key among its own experts and rescans only when it loses one.
//   6. weights, renormalize, scale, drop / drop_renorm, counts.
//
// Only CUDA headers and common/launch_types.h here (project rule: no torch in .cu files).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_common.cuh"
#include "common/launch_types.h"
#include "gating/cuda/gating_launch.h"

namespace moeops::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kMaxExperts = 512;  // the packed key keeps 10 index bits
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = 65535;

// Per-expert flag bits.
constexpr uint8_t kAvail = 1;      // selectable (after masks, groups and forcing)
constexpr uint8_t kForcedRaw = 2;  // forced[t, e] as given
constexpr uint8_t kMaskedRaw = 4;  // mask[t, e] as given
constexpr uint8_t kIsForced = 8;   // forced and sel not NaN (tier 2)
constexpr uint8_t kTaken = 16;     // already placed in a slot

// Byte offsets of the per-warp shared-memory arrays; every array starts 16-byte aligned.
struct SmemLayout {
  int off_score;   // float[E]  scores
  int off_sel;     // float[E]  sel; reused as the slot weights float[k] after selection
  int off_ids;     // int32[E]  slot ids (k <= E)
  int off_gscore;  // float[n_group] group scores
  int off_flags;   // uint8[E]
  int off_gkeep;   // uint8[n_group]
  int warp_bytes;  // bytes per warp
};

constexpr int align16(int x) { return (x + 15) & ~15; }

SmemLayout make_layout(int E, int n_group) {
  SmemLayout L{};
  int off = 0;
  L.off_score = off;
  off += align16(E * 4);
  L.off_sel = off;
  off += align16(E * 4);
  L.off_ids = off;
  off += align16(E * 4);
  L.off_gscore = off;
  off += align16(n_group > 1 ? n_group * 4 : 0);
  L.off_flags = off;
  off += align16(E);
  L.off_gkeep = off;
  off += align16(n_group > 1 ? n_group : 0);
  L.warp_bytes = off;
  return L;
}

__device__ __forceinline__ float warp_max(float v) {  // inputs never NaN
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Total order key: larger = earlier slot. tier (2 bits) | sel as order-preserving uint32 |
// (1023 - index) so that equal (tier, sel) prefer the lower index. `sel` must not be NaN;
// -0.0 is folded into +0.0 (they compare equal in the reference's sort). Never 0 for tier>=1,
// so 0 means "no candidate".
__device__ __forceinline__ unsigned long long pack_key(int tier, float sel, int idx) {
  const float s = (sel == 0.0f) ? 0.0f : sel;
  uint32_t u = __float_as_uint(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(tier) << 42) | (static_cast<unsigned long long>(u) << 10) |
         static_cast<unsigned long long>(1023 - idx);
}

__device__ __forceinline__ int tier_of(uint8_t f) {
  return ((f & kIsForced) ? 1 : 0) + ((f & kAvail) ? 1 : 0);
}

// Best packed key among the lane's experts that are selectable and not taken yet.
__device__ __forceinline__ unsigned long long lane_best(const float* s_sel, const uint8_t* s_flags,
                                                        int E, int lane) {
  unsigned long long best = 0;
  for (int e = lane; e < E; e += kWarpSize) {
    const uint8_t f = s_flags[e];
    const int tier = tier_of(f);
    if (tier > 0 && !(f & kTaken)) {
      const unsigned long long key = pack_key(tier, s_sel[e], e);
      best = key > best ? key : best;
    }
  }
  return best;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_gating_kernel(const GatingParams p, const SmemLayout L) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  unsigned char* base = smem + static_cast<size_t>(warp) * L.warp_bytes;
  float* s_score = reinterpret_cast<float*>(base + L.off_score);
  float* s_sel = reinterpret_cast<float*>(base + L.off_sel);
  float* s_w = s_sel;  // slot weights, once selection no longer needs sel
  int32_t* s_ids = reinterpret_cast<int32_t*>(base + L.off_ids);
  float* s_gscore = reinterpret_cast<float*>(base + L.off_gscore);
  uint8_t* s_flags = reinterpret_cast<uint8_t*>(base + L.off_flags);
  uint8_t* s_gkeep = reinterpret_cast<uint8_t*>(base + L.off_gkeep);

  const int E = p.E;
  const int k = p.k;
  const int n_group = p.n_group;
  const T* logits = static_cast<const T*>(p.logits);
  const bool reroute = p.mask_mode == MaskMode::Reroute;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < p.T; t += warp_stride) {
    // ---- 1. scores (fp32) ----
    const T* row = logits + t * p.logits_stride;
    if (p.scoring == Scoring::Softmax) {
      float m = -INFINITY;
      for (int e = lane; e < E; e += kWarpSize) {
        const float x = to_float(row[e]);
        s_score[e] = x;
        if (x > m) m = x;  // NaN never becomes the max
      }
      m = warp_max(m);
      float sum = 0.0f;
      for (int e = lane; e < E; e += kWarpSize) {
        const float ex = expf(s_score[e] - m);
        s_score[e] = ex;
        sum += ex;
      }
      sum = warp_sum(sum);
      for (int e = lane; e < E; e += kWarpSize) s_score[e] = s_score[e] / sum;
    } else {
      for (int e = lane; e < E; e += kWarpSize) {
        const float x = to_float(row[e]);
        s_score[e] = 1.0f / (1.0f + expf(-x));
      }
    }

    // ---- 2. sel, flags, probs ----
    const bool* mask_row = p.mask ? p.mask + t * p.mask_stride : nullptr;
    const bool* forced_row = p.forced ? p.forced + t * p.forced_stride : nullptr;
    float* probs_row = p.probs ? p.probs + t * static_cast<int64_t>(E) : nullptr;
    for (int e = lane; e < E; e += kWarpSize) {
      const float sc = s_score[e];
      const float sv = p.bias ? sc + p.bias[e] : sc;
      s_sel[e] = sv;
      if (probs_row) probs_row[e] = sc;
      const bool nan = isnan(sv);
      const bool masked = mask_row != nullptr && mask_row[e];
      const bool forced = forced_row != nullptr && forced_row[e];
      uint8_t f = 0;
      if (!nan && !(masked && reroute)) f |= kAvail;
      if (forced) f |= kForcedRaw;
      if (masked) f |= kMaskedRaw;
      if (forced && !nan) f |= kIsForced;
      s_flags[e] = f;
    }

    // ---- 3. group-limited selection ----
    if (n_group > 1) {
      const int g = E / n_group;
      __syncwarp();
      for (int gi = lane; gi < n_group; gi += kWarpSize) {
        float m1 = -INFINITY, m2 = -INFINITY;  // two largest of where(avail, sel, -inf)
        for (int i = 0; i < g; ++i) {
          const int e = gi * g + i;
          const float v = (s_flags[e] & kAvail) ? s_sel[e] : -INFINITY;
          if (v > m1) {
            m2 = m1;
            m1 = v;
          } else if (v > m2) {
            m2 = v;
          }
        }
        float gs = g >= 2 ? m1 + m2 : -INFINITY;
        if (isnan(gs)) gs = -INFINITY;  // +inf + -inf
        s_gscore[gi] = gs;
      }
      __syncwarp();
      for (int gi = lane; gi < n_group; gi += kWarpSize) {
        const float gs = s_gscore[gi];
        int rank = 0;  // groups ranked before gi: larger score, or equal score and lower index
        for (int j = 0; j < n_group; ++j) {
          const float o = s_gscore[j];
          rank += (o > gs || (o == gs && j < gi)) ? 1 : 0;
        }
        s_gkeep[gi] = rank < p.topk_group ? 1 : 0;
      }
      __syncwarp();
      for (int e = lane; e < E; e += kWarpSize) {
        if (!s_gkeep[e / g]) s_flags[e] = static_cast<uint8_t>(s_flags[e] & ~kAvail);
      }
    }

    // ---- 4. forcing wins over masks and groups ----
    for (int e = lane; e < E; e += kWarpSize) {
      if (s_flags[e] & kIsForced) s_flags[e] = static_cast<uint8_t>(s_flags[e] | kAvail);
    }

    // ---- 5. k rounds of warp arg-max ----
    unsigned long long best = lane_best(s_sel, s_flags, E, lane);
    int nsel = 0;
    for (; nsel < k; ++nsel) {
      const unsigned long long b = warp_max_u64(best);  // same value in every lane
      if (b == 0) break;                                 // nothing selectable is left
      const int idx = 1023 - static_cast<int>(b & 1023ull);
      if (lane == 0) s_ids[nsel] = idx;
      if ((idx & (kWarpSize - 1)) == lane) {
        s_flags[idx] = static_cast<uint8_t>(s_flags[idx] | kTaken);
        best = (nsel + 1 < k) ? lane_best(s_sel, s_flags, E, lane) : 0ull;
      }
    }
    __syncwarp();  // s_ids / s_flags visible to every lane; all reads of s_sel are done

    // ---- 6. weights ----  slot s is handled by lane s % 32 from here on.
    float wsum = 0.0f;
    for (int s = lane; s < k; s += kWarpSize) {
      int id = -1;
      if (s < nsel) id = s_ids[s];
      else s_ids[s] = -1;
      const float w = id >= 0 ? s_score[id] : 0.0f;
      s_w[s] = w;
      wsum += w;
    }
    if (p.renormalize) {
      const float denom = warp_sum(wsum) + 1e-20f;
      for (int s = lane; s < k; s += kWarpSize) s_w[s] = s_w[s] / denom;
    }
    for (int s = lane; s < k; s += kWarpSize) s_w[s] = s_w[s] * p.scale;

    if (p.mask != nullptr && !reroute) {
      float before = 0.0f, after = 0.0f;
      for (int s = lane; s < k; s += kWarpSize) {
        const int id = s_ids[s];
        float w = s_w[s];
        before += w;
        if (id >= 0) {
          const uint8_t f = s_flags[id];
          if ((f & kMaskedRaw) && !(f & kForcedRaw)) {
            w = 0.0f;
            s_w[s] = 0.0f;
            s_ids[s] = -1;
          }
        }
        after += w;
      }
      before = warp_sum(before);
      after = warp_sum(after);
      if (p.mask_mode == MaskMode::DropRenorm && after > 0.0f) {
        // w / after <= 1 first: before / after overflows when the survivors are denormal
        for (int s = lane; s < k; s += kWarpSize) s_w[s] = s_w[s] / after * before;
      }
    }

    // ---- 7. outputs ----
    const int64_t out_base = t * static_cast<int64_t>(k);
    for (int s = lane; s < k; s += kWarpSize) {
      const int id = s_ids[s];
      p.ids[out_base + s] = id;
      p.weights[out_base + s] = s_w[s];
      if (p.counts != nullptr && id >= 0) atomicAdd(p.counts + id, 1);
    }
    __syncwarp();  // the next token overwrites this warp's shared memory
  }
}

template <typename T>
void launch_typed(const GatingParams& p, const SmemLayout& L, cudaStream_t stream) {
  const int64_t blocks_needed = (p.T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < kMaxBlocks ? blocks_needed : kMaxBlocks);
  const size_t smem = static_cast<size_t>(L.warp_bytes) * kWarpsPerBlock;
  topk_gating_kernel<T><<<blocks, kThreads, smem, stream>>>(p, L);
}

}  // namespace

void launch_topk_gating(const GatingParams& p, cudaStream_t stream) {
  if (p.T <= 0) return;
  if (p.E < 1 || p.E > kMaxExperts || p.k < 1 || p.k > p.E || p.n_group < 1 || p.E % p.n_group != 0 ||
      (p.n_group > 1 && p.E / p.n_group < 2) || p.topk_group < 1 || p.topk_group > p.n_group) {
    throw std::invalid_argument("moeops::cuda::launch_topk_gating: invalid parameters (E=" +
                                std::to_string(p.E) + ", k=" + std::to_string(p.k) + ", n_group=" +
                                std::to_string(p.n_group) + ", topk_group=" + std::to_string(p.topk_group) +
                                ")");
  }
  if (p.logits == nullptr || p.weights == nullptr || p.ids == nullptr) {
    throw std::invalid_argument("moeops::cuda::launch_topk_gating: null logits/weights/ids pointer");
  }
  // At most 4 warps * (3 * 2048 + 1024 + 512 + 256) bytes = 31 KiB (E = 512, n_group = 256):
  // below the 48 KiB default, no opt-in needed.
  const SmemLayout L = make_layout(p.E, p.n_group);
  switch (p.logits_dtype) {
    case DType::F32: launch_typed<float>(p, L, stream); break;
    case DType::F16: launch_typed<__half>(p, L, stream); break;
    case DType::BF16: launch_typed<__nv_bfloat16>(p, L, stream); break;
    default: throw std::invalid_argument("moeops::cuda::launch_topk_gating: unknown logits dtype");
  }
}

}  // namespace moeops::cuda
