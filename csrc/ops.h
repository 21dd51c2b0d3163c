// Declarations of every torch-facing entry point. Schemas live in torch_bindings.cpp.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>
#include <c10/util/ArrayRef.h>

namespace moeops {
using at::Tensor;

using GatingOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using PlanOut = std::tuple<Tensor, Tensor, Tensor>;

#define MOEOPS_GATING_ARGS                                                                     \
  const Tensor &logits, int64_t k, std::string_view scoring, bool renormalize,                 \
      double routed_scaling_factor, const std::optional<Tensor>&bias, int64_t n_group,         \
      int64_t topk_group, const std::optional<Tensor>&mask, std::string_view mask_mode,        \
      const std::optional<Tensor>&forced, bool return_probs, bool return_counts

GatingOut topk_gating_cpu(MOEOPS_GATING_ARGS);
PlanOut route_plan_cpu(const Tensor& ids, int64_t num_experts);
Tensor permute_cpu(const Tensor& hidden, const Tensor& sorted_slots, int64_t top_k,
                   const std::optional<Tensor>& slot_scale);
Tensor combine_cpu(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse);
Tensor grouped_gemm_cpu(const Tensor& x, const Tensor& w, const Tensor& offsets, bool w_transposed);
Tensor fused_experts_cpu(const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up,
                         const Tensor& w_down, const std::optional<Tensor>& b_up,
                         const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
                         const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                         const std::optional<Tensor>& shared_gate);
// fused_experts plus statistics of the expert outputs (down-projection epilogue):
// (out, slot_norms [T,K] f32, out_absmax [E] f32, out_absmax_channel [E] i64, in_absmax [E] f32, active_units [E] i64)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_experts_stats_cpu(
    const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up, const Tensor& w_down,
    const std::optional<Tensor>& b_up, const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
    const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out, const std::optional<Tensor>& shared_gate);
Tensor fused_experts_list_cpu(const Tensor& hidden, const Tensor& ids, const Tensor& weights, at::TensorList w_gate,
                              at::TensorList w_up, at::TensorList w_down, std::string_view activation,
                              const std::optional<Tensor>& shared_out, const std::optional<Tensor>& shared_gate);

#ifdef MOEOPS_WITH_CUDA
GatingOut topk_gating_cuda(MOEOPS_GATING_ARGS);
PlanOut route_plan_cuda(const Tensor& ids, int64_t num_experts);
Tensor permute_cuda(const Tensor& hidden, const Tensor& sorted_slots, int64_t top_k,
                    const std::optional<Tensor>& slot_scale);
Tensor combine_cuda(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse);
// combine_cuda with the result rounded once to out_dtype (expert_out's dtype, or fp16/bf16 for
// fp32 expert_out); internal to the fused layer, not an op.
Tensor combine_cuda_to(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse,
                       at::ScalarType out_dtype);
Tensor grouped_gemm_cuda(const Tensor& x, const Tensor& w, const Tensor& offsets, bool w_transposed);
Tensor fused_experts_cuda(const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up,
                          const Tensor& w_down, const std::optional<Tensor>& b_up,
                          const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
                          const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                          const std::optional<Tensor>& shared_gate);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_experts_stats_cuda(
    const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up, const Tensor& w_down,
    const std::optional<Tensor>& b_up, const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
    const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out, const std::optional<Tensor>& shared_gate);
// The kernel of 16-bit grouped GEMMs on Hopper: "auto", "sm90" (CUTLASS wherever it applies) or
// "mma" (never CUTLASS); initial value from MOEOPS_CUDA_GEMM. Returns the name set.
std::string set_cuda_gemm_path(const std::string& name);
std::string cuda_gemm_path();
// Bound on one CUDA fused_experts call's device scratch (bytes; initial value from
// MOEOPS_CUDA_WORKSPACE_MB, default 4096 MiB): larger calls run in token chunks. The setter
// returns the previous bound.
int64_t cuda_workspace_limit();
int64_t set_cuda_workspace_limit(int64_t bytes);
#endif

// MoE-X (csrc/moex): router statistics, sparsity-aware routing, ReLU experts with a sparse
// down-projection, wide-code export.
std::tuple<Tensor, Tensor, Tensor> moex_router_stats_cpu(const Tensor& w_enc, const std::optional<Tensor>& b_enc);
#define MOEOPS_MOEX_ROUTE_ARGS                                                                          \
  const Tensor &x, const Tensor &mu, const Tensor &var, const Tensor &bias_mean, int64_t k,            \
      std::string_view select, const std::optional<Tensor>&mask, std::string_view mask_mode,           \
      const std::optional<Tensor>&forced, bool return_density
#define MOEOPS_MOEX_EXPERTS_ARGS                                                                        \
  const Tensor &hidden, const Tensor &ids, const Tensor &weights, const Tensor &w_enc,                 \
      const std::optional<Tensor>&b_enc, const Tensor &w_dec, const std::optional<Tensor>&b_dec,       \
      std::string_view down, bool return_active
std::tuple<Tensor, Tensor, Tensor> moex_route_cpu(MOEOPS_MOEX_ROUTE_ARGS);
std::tuple<Tensor, Tensor> moex_experts_cpu(MOEOPS_MOEX_EXPERTS_ARGS);
Tensor moex_down_cpu(const Tensor& h, const Tensor& offsets, const Tensor& w_dec, std::string_view down);
std::tuple<Tensor, Tensor, Tensor, Tensor> moex_code_cpu(const Tensor& hidden, const Tensor& ids,
                                                          const Tensor& weights, const Tensor& w_enc,
                                                          const std::optional<Tensor>& b_enc);
#ifdef MOEOPS_WITH_CUDA
std::tuple<Tensor, Tensor, Tensor> moex_router_stats_cuda(const Tensor& w_enc, const std::optional<Tensor>& b_enc);
std::tuple<Tensor, Tensor, Tensor> moex_route_cuda(MOEOPS_MOEX_ROUTE_ARGS);
std::tuple<Tensor, Tensor> moex_experts_cuda(MOEOPS_MOEX_EXPERTS_ARGS);
#endif

}  // namespace moeops
