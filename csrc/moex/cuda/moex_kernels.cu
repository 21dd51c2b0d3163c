// MoE-X on CUDA: router statistics, sparsity-aware routing, ReLU experts with a sparse
// down-projection. Straightforward kernels with the CPU kernels' semantics
// (python/moeops/reference.py, MoE-X section); no host synchronisation anywhere.
//
//   stats   one thread per (expert, input column): mean and population variance over the D
//           rows, two passes, fp64 accumulation; one block per expert for the mean bias.
//   route   one block per token: warps compute the M dot products (x . mu_j, (x*x) . var_j),
//           lane 0 the density Phi(mu_h / sigma_h); thread 0 runs the selection shared with
//           the CPU kernel (moex/moex_types.h::moex_select_token).
//   experts per slot (token, k), no grouping: (1) up: one warp per (slot, unit), h = ReLU(x .
//           w_enc[e, i] + b), active[slot] += (h != 0); (2) down: one thread per (slot, output
//           column) walks the D units in order and skips those with h == 0 (the test is
//           uniform across the block: the decoder rows of inactive units are never read);
//           `dense` reads them all. Skipping a zero term leaves an fp32 FMA chain unchanged, so
//           both give the same bits. (3) combine: fp32, slot order.
//
// Only CUDA headers and moex/moex_types.h here (project rule: no torch in .cu files).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_common.cuh"
#include "moex/cuda/moex_launch.h"
#include "moex/moex_types.h"

namespace moeops::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxExperts = 512;

struct DevErfc {
  __device__ float operator()(float v) const { return erfcf(v); }
};
struct DevExp {
  __device__ float operator()(float v) const { return expf(v); }
};

// ------------------------------------------------------------------ stats

template <class W>
__global__ void stats_kernel(const W* __restrict__ w, int64_t D, int64_t d, float* __restrict__ mu,
                             float* __restrict__ var) {
  const int64_t e = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  const W* we = w + e * D * d + c;
  double s = 0.0;
  for (int64_t i = 0; i < D; ++i) s += to_float(we[i * d]);
  const double m = s / static_cast<double>(D);
  double q = 0.0;
  for (int64_t i = 0; i < D; ++i) {
    const double v = static_cast<double>(to_float(we[i * d])) - m;
    q += v * v;
  }
  mu[e * d + c] = static_cast<float>(m);
  var[e * d + c] = static_cast<float>(q / static_cast<double>(D));
}

__global__ void bias_mean_kernel(const float* __restrict__ b, int64_t D, float* __restrict__ bmean) {
  __shared__ double part[256];
  const int64_t e = blockIdx.x;
  double s = 0.0;
  if (b != nullptr)
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += b[e * D + i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.x) < off) part[threadIdx.x] += part[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) bmean[e] = static_cast<float>(part[0] / static_cast<double>(D));
}

// ------------------------------------------------------------------ route

constexpr int kRouteThreads = 128;

__global__ void __launch_bounds__(kRouteThreads) route_kernel(const MoexRouteParams p) {
  __shared__ float s_score[kMaxExperts];
  __shared__ float s_w[kMaxExperts];
  __shared__ int32_t s_ids[kMaxExperts];
  __shared__ uint8_t s_tier[kMaxExperts];
  const int64_t t = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  const int nwarps = kRouteThreads / kWarp;
  const float* x = p.x + t * p.d;
  for (int e = warp; e < p.M; e += nwarps) {
    const float* mu = p.mu + static_cast<int64_t>(e) * p.d;
    const float* var = p.var + static_cast<int64_t>(e) * p.d;
    float a = 0.f, b = 0.f;
    for (int64_t c = lane; c < p.d; c += kWarp) {
      const float xv = x[c];
      a = fmaf(xv, mu[c], a);
      b = fmaf(xv * xv, var[c], b);
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      const float dens = moex_density_value(a + p.bmean[e], b, DevErfc{});
      if (p.density != nullptr) p.density[t * p.M + e] = dens;
      s_score[e] = p.densest ? dens : -dens;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    moex_select_token(s_score, p.M, p.k, p.mask ? p.mask + t * p.mask_stride : nullptr,
                      p.forced ? p.forced + t * p.forced_stride : nullptr, p.mask_mode, s_tier, s_ids, s_w,
                      DevExp{});
  }
  __syncthreads();
  for (int j = threadIdx.x; j < p.k; j += kRouteThreads) {
    p.ids[t * p.k + j] = s_ids[j];
    p.weights[t * p.k + j] = s_w[j];
  }
}

// ------------------------------------------------------------------ experts

constexpr int kUpWarps = 8;

template <class TH, class TE>
__global__ void __launch_bounds__(kUpWarps * kWarp) up_kernel(const MoexExpertsParams p) {
  const int64_t s = blockIdx.x;  // slot
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kUpWarps + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int32_t e = p.ids[s];
  if (e < 0 || e >= p.M || i >= p.D) return;  // ids outside [0, M) are empty slots on CUDA
  const TH* x = static_cast<const TH*>(p.hidden) + (s / p.K) * p.hidden_stride;
  const TE* w = static_cast<const TE*>(p.w_enc) + (static_cast<int64_t>(e) * p.D + i) * p.d;
  float acc = 0.f;
  for (int64_t c = lane; c < p.d; c += kWarp) acc = fmaf(to_float(x[c]), to_float(w[c]), acc);
  acc = warp_sum(acc);
  if (lane == 0) {
    const float u = acc + (p.b_enc ? p.b_enc[static_cast<int64_t>(e) * p.D + i] : 0.f);
    const float h = (u > 0.f || u != u) ? u : 0.f;  // ReLU, NaN kept
    p.h[s * p.D + i] = h;
    if (h != 0.f) atomicAdd(p.active + s, 1);
  }
}

constexpr int kColThreads = 128;

template <class TD>
__global__ void __launch_bounds__(kColThreads) down_kernel(const MoexExpertsParams p) {
  const int64_t s = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  const int32_t e = p.ids[s];
  if (e < 0 || e >= p.M || c >= p.d) return;
  const float* h = p.h + s * p.D;
  const TD* w = static_cast<const TD*>(p.w_dec) + static_cast<int64_t>(e) * p.D * p.d + c;
  float acc = 0.f;
  if (p.dense) {
    for (int64_t i = 0; i < p.D; ++i) acc = fmaf(h[i], to_float(w[i * p.d]), acc);
  } else {
    for (int64_t i = 0; i < p.D; ++i) {
      const float a = h[i];  // same for every thread of the block: no divergence
      if (a != 0.f) acc = fmaf(a, to_float(w[i * p.d]), acc);
    }
  }
  p.y[s * p.d + c] = acc + (p.b_dec ? p.b_dec[static_cast<int64_t>(e) * p.d + c] : 0.f);
}

template <class TH>
__global__ void __launch_bounds__(kColThreads) combine_kernel(const MoexExpertsParams p) {
  const int64_t t = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColThreads + threadIdx.x;
  if (c >= p.d) return;
  float acc = 0.f;
  for (int k = 0; k < p.K; ++k) {
    const int64_t s = t * p.K + k;
    const int32_t e = p.ids[s];
    if (e < 0 || e >= p.M) continue;
    acc = fmaf(p.weights[s], p.y[s * p.d + c], acc);
  }
  static_cast<TH*>(p.out)[t * p.d + c] = from_float<TH>(acc);
}

template <class F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("moeops::cuda: unknown dtype");
  }
}

unsigned blocks_for(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

void launch_moex_router_stats(const MoexStatsParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.D <= 0) throw std::invalid_argument("moeops::cuda::launch_moex_router_stats: empty experts");
  if (p.d > 0) {
    const dim3 grid(blocks_for(p.d, 128), static_cast<unsigned>(p.M));
    dispatch(p.w_dtype, [&](auto tag) {
      using W = decltype(tag);
      stats_kernel<W><<<grid, 128, 0, stream>>>(static_cast<const W*>(p.w), p.D, p.d, p.mu, p.var);
    });
  }
  bias_mean_kernel<<<static_cast<unsigned>(p.M), 256, 0, stream>>>(p.b, p.D, p.bmean);
}

void launch_moex_route(const MoexRouteParams& p, cudaStream_t stream) {
  if (p.T <= 0) return;
  if (p.M < 1 || p.M > kMaxExperts || p.k < 1 || p.k > p.M)
    throw std::invalid_argument("moeops::cuda::launch_moex_route: invalid M=" + std::to_string(p.M) +
                                " or k=" + std::to_string(p.k));
  if (p.T > INT_MAX)  // one block per token: gridDim.x < 2^31
    throw std::invalid_argument("moeops::cuda::launch_moex_route: T=" + std::to_string(p.T) + " exceeds 2^31 - 1");
  route_kernel<<<static_cast<unsigned>(p.T), kRouteThreads, 0, stream>>>(p);
}

void launch_moex_experts(const MoexExpertsParams& p, cudaStream_t stream) {
  if (p.T <= 0 || p.d <= 0) return;
  const int64_t S = p.T * p.K;
  if ((p.D + kUpWarps - 1) / kUpWarps > 65535 || (p.d + kColThreads - 1) / kColThreads > 65535)
    throw std::invalid_argument("moeops::cuda::launch_moex_experts: D=" + std::to_string(p.D) + " or d=" +
                                std::to_string(p.d) + " too large for the grid (D <= 524280, d <= 8388480)");
  if (S > 0 && p.D > 0) {
    const dim3 up_grid(static_cast<unsigned>(S), blocks_for(p.D, kUpWarps));
    dispatch(p.hidden_dtype, [&](auto th) {
      dispatch(p.enc_dtype, [&](auto te) {
        up_kernel<decltype(th), decltype(te)><<<up_grid, kUpWarps * kWarp, 0, stream>>>(p);
      });
    });
  }
  if (S > 0) {
    const dim3 down_grid(static_cast<unsigned>(S), blocks_for(p.d, kColThreads));
    dispatch(p.dec_dtype, [&](auto td) { down_kernel<decltype(td)><<<down_grid, kColThreads, 0, stream>>>(p); });
  }
  const dim3 comb_grid(static_cast<unsigned>(p.T), blocks_for(p.d, kColThreads));
  dispatch(p.hidden_dtype, [&](auto th) { combine_kernel<decltype(th)><<<comb_grid, kColThreads, 0, stream>>>(p); });
}

}  // namespace moeops::cuda
