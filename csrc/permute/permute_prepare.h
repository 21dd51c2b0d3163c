// Validation and allocation for route_plan / permute / combine, shared by CPU and CUDA.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <limits>
#include "common/checks.h"

namespace moeops {

inline void check_plan_args(const Tensor& ids, int64_t num_experts) {
  check_dim(ids, 2, "ids", "[T, K]");
  check_dtype(ids, at::kInt, "ids");
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts < std::numeric_limits<int32_t>::max(),
                    "moeops: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK_VALUE(ids.numel() < std::numeric_limits<int32_t>::max(),
                    "moeops: T*K must be < 2^31 slots, got ", ids.numel());
}

// Returns the hidden tensor with a unit inner stride and checks the slot map.
inline Tensor check_permute_args(const Tensor& hidden, const Tensor& sorted_slots, int64_t top_k,
                                 const std::optional<Tensor>& slot_scale) {
  check_dim(hidden, 2, "hidden", "[T, H]");
  to_dtype(hidden, "hidden");
  check_dim(sorted_slots, 1, "sorted_slots", "[R]");
  check_dtype(sorted_slots, at::kInt, "sorted_slots");
  check_same_device(sorted_slots, hidden, "sorted_slots", "hidden");
  TORCH_CHECK_VALUE(top_k >= 1, "moeops: top_k must be >= 1, got ", top_k);
  if (slot_scale.has_value()) {
    check_dim(*slot_scale, 1, "slot_scale", "[T*K]");
    check_dtype(*slot_scale, at::kFloat, "slot_scale");
    check_same_device(*slot_scale, hidden, "slot_scale", "hidden");
    TORCH_CHECK_VALUE(slot_scale->size(0) == hidden.size(0) * top_k, "moeops: slot_scale must have T*K=",
                      hidden.size(0) * top_k, " entries, got ", slot_scale->size(0));
  }
  return hidden.stride(1) == 1 ? hidden : hidden.contiguous();
}

inline void check_combine_args(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse) {
  check_dim(expert_out, 2, "expert_out", "[R, H]");
  to_dtype(expert_out, "expert_out");
  check_dim(weights, 2, "weights", "[T, K]");
  check_dtype(weights, at::kFloat, "weights");
  check_dim(inverse, 1, "inverse", "[T*K]");
  check_dtype(inverse, at::kInt, "inverse");
  check_same_device(weights, expert_out, "weights", "expert_out");
  check_same_device(inverse, expert_out, "inverse", "expert_out");
  TORCH_CHECK_VALUE(inverse.size(0) == weights.numel(), "moeops: inverse must have T*K=", weights.numel(),
                    " entries (weights is ", weights.sizes(), "), got ", inverse.size(0));
}

}  // namespace moeops
