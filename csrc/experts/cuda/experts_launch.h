// CUDA grouped GEMM over expert-grouped rows (the building block of grouped_gemm and
// fused_experts on the GPU). No torch headers: experts_kernels.cu includes this.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "common/launch_types.h"

namespace moeops::cuda {

// What the GEMM writes for output column c of a row owned by expert e (acc = fp32 dot products):
//   Store:    acc[c] (+ bias[e, c])
//   Act:      act(acc[c] + bias[e, c])
//   GatedAct: act(acc[c] + bias[e, c]) * (acc[gated_half + c] + bias[e, gated_half + c]),
//             c < gated_half: the gate rows [0, I) and up rows [I, 2I) of one weight (SwiGLU).
enum class Epilogue : int { Store = 0, Act = 1, GatedAct = 2 };

struct GroupedGemmParams {
  const void* a = nullptr;  // [R, K] rows grouped by expert, row stride lda (elements)
  DType a_dtype = DType::F32;
  int64_t lda = 0;
  const void* w = nullptr;  // [E, N_w, K] contiguous, or [E, K, N_w] when w_transposed
  DType w_dtype = DType::F32;
  bool w_transposed = false;
  const int32_t* offsets = nullptr;  // [E+1] on the device; rows offsets[e]:offsets[e+1] use expert e
  int E = 0;
  int64_t R = 0, K = 0, N_w = 0;
  int64_t N_out = 0;  // N_w, or gated_half for GatedAct
  Epilogue epilogue = Epilogue::Store;
  int activation = 0;  // moeops::Act: 0 silu, 1 gelu, 2 gelu_tanh, 3 relu, 4 relu2
  int64_t gated_half = 0;
  const float* bias = nullptr;  // [E, N_w] fp32 contiguous, or null
  void* out = nullptr;          // [R, N_out] contiguous, dtype out_dtype; rows of no expert untouched
  DType out_dtype = DType::F32;
  // Decode kernel only: GEMM row r reads row a_slots[r] / a_slot_div of `a` instead of row r
  // (a = the layer's hidden [T, K], a_slots = route_plan's sorted_slots, a_slot_div = top_k: the
  // permute pass folded into the up projection). R then counts GEMM rows (slots), not a's rows.
  const int32_t* a_slots = nullptr;
  int64_t a_slot_div = 1;
};

// Device scratch launch_grouped_gemm needs (the per-expert tile schedule).
size_t grouped_gemm_workspace_bytes(int E);

// True when the launch will run the tensor-core (mma.sync) kernel: a and w both fp16 or both
// bf16, w not transposed, K and lda multiples of 8, a and w 16-byte aligned, device sm_80+.
bool grouped_gemm_uses_tensor_cores(const GroupedGemmParams& p, int device_major);

// True when launch_grouped_gemm runs `p` on the decode kernel (max_rows_per_expert <= 16,
// [E, N, K] weights, E within the grid's y limit); the only kernel that takes a_slots.
bool grouped_gemm_uses_decode(const GroupedGemmParams& p, int64_t max_rows_per_expert);

// Runs the grouped GEMM without a host synchronisation: the tile schedule is computed on the
// device from `offsets`. Offsets are clamped to [0, R] (no host check is possible). Experts
// with no rows cost nothing. `max_rows_per_expert` is a host-side upper bound (e.g. T for a
// fused MoE layer, R when unknown): <= 16 picks the decode kernel, which reads every weight row
// of each used expert once for all of that expert's rows.
void launch_grouped_gemm(const GroupedGemmParams& p, int64_t max_rows_per_expert, int device_major,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The activation as its own pass, for GEMMs whose epilogue cannot apply it (the sm_90a kernel):
// out[r, c] = act(in[r, c]) * in[r, I + c] (gated, in [R, 2I]) or act(in[r, c]) (in [R, I]) for
// the rows [offsets[0], offsets[E]) (clamped to [0, R]); out [R, I]; fp16/bf16, math in fp32.
void launch_expert_activation(const void* in, DType dtype, int64_t R, int64_t I, bool gated, int activation,
                              const int32_t* offsets, int E, void* out, int num_sms, cudaStream_t stream);

// Statistics of fused_experts_stats (semantics: reference.fused_experts_stats), from the per-row
// expert outputs y [R, H] fp32 and the down projection's inputs act [R, I] (fp32 or 16-bit) of
// the rows [0, offsets[E]) (clamped to [0, R]). Per row: the L2 norm of y into
// slot_norms[sorted_slots[r]], max |y| with its first channel, max |act| and act's non-zeros.
// Per expert, over its rows in order: out_absmax / out_channel (first row with the maximum,
// then its first channel), in_absmax, active (sum of non-zeros). The caller initialises the
// outputs (0, channel -1) and gives row scratch for the per-row values (4 arrays of R).
struct ExpertStatsParams {
  const float* y = nullptr;
  int64_t H = 0;
  const void* act = nullptr;
  DType act_dtype = DType::F32;
  int64_t I = 0;
  const int32_t* offsets = nullptr;
  const int32_t* sorted_slots = nullptr;
  int E = 0;
  int64_t R = 0;
  float* slot_norms = nullptr;
  float* row_max = nullptr;
  int64_t* row_ch = nullptr;
  float* row_in_max = nullptr;
  int64_t* row_nnz = nullptr;
  float* out_absmax = nullptr;
  int64_t* out_channel = nullptr;
  float* in_absmax = nullptr;
  int64_t* active = nullptr;
};

void launch_expert_stats(const ExpertStatsParams& p, int num_sms, cudaStream_t stream);

}  // namespace moeops::cuda
