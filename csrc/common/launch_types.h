// Plain types shared by the CUDA launchers (.cu) and their torch-facing entry points (.cpp).
// No torch headers here: .cu files include this and stay fast to compile.
#pragma once
#include <cstdint>

namespace moeops {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
enum class Scoring : int { Softmax = 0, Sigmoid = 1 };
enum class MaskMode : int { Reroute = 0, Drop = 1, DropRenorm = 2 };

// Everything the top-k gating kernel needs. Semantics: python/moeops/reference.py::topk_gating.
struct GatingParams {
  const void* logits = nullptr;  // [T, E], dtype `logits_dtype`, row stride `logits_stride`
  DType logits_dtype = DType::F32;
  int64_t logits_stride = 0;
  int64_t T = 0;
  int E = 0;
  int k = 0;
  Scoring scoring = Scoring::Softmax;
  bool renormalize = false;
  float scale = 1.0f;            // routed_scaling_factor
  const float* bias = nullptr;   // [E] fp32 or null
  int n_group = 1;
  int topk_group = 1;
  const bool* mask = nullptr;    // [T, E] with row stride mask_stride (0 for an [E] mask) or null
  int64_t mask_stride = 0;
  MaskMode mask_mode = MaskMode::Reroute;
  const bool* forced = nullptr;  // like mask
  int64_t forced_stride = 0;
  float* weights = nullptr;      // [T, k] out
  int32_t* ids = nullptr;        // [T, k] out
  float* probs = nullptr;        // [T, E] out, or null
  int32_t* counts = nullptr;     // [E] out (zeroed by the caller), or null
};

}  // namespace moeops
