// Plain types shared by the MoE-X CPU kernels, CUDA launchers (.cu) and their entry points.
// No torch headers here: .cu files include this. Semantics: python/moeops/reference.py (MoE-X).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/launch_types.h"

#if defined(__CUDACC__)
#define MOEOPS_HD __host__ __device__ __forceinline__
#else
#define MOEOPS_HD inline
#endif

namespace moeops {

// moex_router_stats: w [M, D, d] (dtype w_dtype, contiguous), b [M, D] fp32 or null.
struct MoexStatsParams {
  const void* w = nullptr;
  DType w_dtype = DType::F32;
  const float* b = nullptr;
  int64_t M = 0, D = 0, d = 0;
  float* mu = nullptr;     // [M, d] out
  float* var = nullptr;    // [M, d] out (population variance over the D rows)
  float* bmean = nullptr;  // [M] out (0 when b is null)
};

// moex_route: x [T, d] fp32 contiguous; mu, var [M, d], bmean [M] fp32 contiguous.
struct MoexRouteParams {
  const float* x = nullptr;
  int64_t T = 0;
  int64_t d = 0;
  int M = 0;
  int k = 0;
  const float* mu = nullptr;
  const float* var = nullptr;
  const float* bmean = nullptr;
  bool densest = false;           // select="densest" (score +density) instead of "sparsest"
  const bool* mask = nullptr;     // [T, M] with row stride mask_stride (0 for an [M] mask) or null
  int64_t mask_stride = 0;
  MaskMode mask_mode = MaskMode::Reroute;
  const bool* forced = nullptr;   // like mask
  int64_t forced_stride = 0;
  float* weights = nullptr;       // [T, k] out
  int32_t* ids = nullptr;         // [T, k] out
  float* density = nullptr;       // [T, M] out or null
};

// moex_experts (CUDA launcher): per-slot scratch h [T*K, D] and y [T*K, d] fp32.
struct MoexExpertsParams {
  const void* hidden = nullptr;   // [T, d], row stride hidden_stride, column stride 1
  DType hidden_dtype = DType::F32;
  int64_t hidden_stride = 0;
  const int32_t* ids = nullptr;   // [T, K] contiguous
  const float* weights = nullptr; // [T, K] contiguous
  int64_t T = 0;
  int K = 0;
  int M = 0;
  int64_t D = 0, d = 0;
  const void* w_enc = nullptr;    // [M, D, d] contiguous
  DType enc_dtype = DType::F32;
  const float* b_enc = nullptr;   // [M, D] or null
  const void* w_dec = nullptr;    // [M, D, d] contiguous
  DType dec_dtype = DType::F32;
  const float* b_dec = nullptr;   // [M, d] or null
  bool dense = false;             // read every decoder row (no zero skipping)
  float* h = nullptr;             // [T*K, D] scratch
  float* y = nullptr;             // [T*K, d] scratch
  int32_t* active = nullptr;      // [T*K] out (zeroed by the caller)
  void* out = nullptr;            // [T, d] contiguous, dtype hidden_dtype
};

// Predicted active fraction Phi(mu_h / sigma_h) with the sigma_h == 0 limit (docs/moex.md).
template <class Erfc>
MOEOPS_HD float moex_density_value(float mu_h, float s2, Erfc erfc_fn) {
  if (mu_h != mu_h || s2 != s2) return mu_h + s2;  // NaN in, NaN out
  float z;
  if (s2 > 0.f) {
    z = mu_h / sqrtf(s2);
  } else {
    const float inf = INFINITY;
    z = mu_h > 0.f ? inf : (mu_h < 0.f ? -inf : 0.f);
  }
  return 0.5f * erfc_fn(-z * 0.70710678118654752f);
}

// Selection + softmax of one token (python/moeops/reference.py::moex_route), shared by the CPU
// kernel and the CUDA kernel (one thread). s[M] scores (NaN = not selectable); tier[M] scratch.
// Writes ids[k] and w[k].
template <class Exp>
MOEOPS_HD void moex_select_token(const float* s, int M, int k, const bool* mask, const bool* forced,
                                 MaskMode mode, uint8_t* tier, int32_t* ids, float* w, Exp exp_fn) {
  const bool reroute = mode == MaskMode::Reroute;
  for (int e = 0; e < M; ++e) {
    const bool nan = s[e] != s[e];
    const bool f = forced != nullptr && forced[e] && !nan;
    const bool avail = !nan && !(reroute && mask != nullptr && mask[e]);
    tier[e] = f ? 2 : (avail ? 1 : 0);
  }
  int n = 0;
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < M; ++e) {
      if (tier[e] == 0) continue;
      if (best < 0 || tier[e] > tier[best] || (tier[e] == tier[best] && s[e] > s[best])) best = e;
    }
    if (best < 0) break;
    ids[n++] = best;
    tier[best] = 0;  // taken
  }
  for (int j = n; j < k; ++j) { ids[j] = -1; w[j] = 0.f; }
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = s[ids[j]] > mx ? s[ids[j]] : mx;
  float sum = 0.f;
  for (int j = 0; j < n; ++j) { w[j] = exp_fn(s[ids[j]] - mx); sum += w[j]; }
  for (int j = 0; j < n; ++j) w[j] = w[j] / sum;
  if (mask != nullptr && !reroute) {
    float before = 0.f, after = 0.f;
    for (int j = 0; j < k; ++j) before += w[j];
    for (int j = 0; j < k; ++j) {
      const int e = ids[j];
      if (e >= 0 && mask[e] && !(forced != nullptr && forced[e])) { ids[j] = -1; w[j] = 0.f; }
      after += w[j];
    }
    if (mode == MaskMode::DropRenorm && after > 0.f)
      for (int j = 0; j < k; ++j) w[j] = w[j] / after * before;
  }
}

}  // namespace moeops
