// Validation and output allocation for topk_gating, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <string_view>
#include "common/checks.h"
#include "ops.h"

namespace moeops {

constexpr int kMaxExperts = 512;

struct GatingPrepared {
  GatingParams p;
  Tensor logits, bias, mask, forced;  // keep the (possibly converted) inputs alive
  Tensor weights, ids, probs, counts;
};

inline Tensor prepare_expert_mask(const std::optional<Tensor>& m, const char* name, int64_t T,
                                  int64_t E, const Tensor& logits, int64_t* stride) {
  *stride = 0;
  if (!m.has_value()) return Tensor();
  const Tensor& t = *m;
  check_same_device(t, logits, name, "logits");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, "moeops: ", name, " must be a bool tensor, got ",
                   t.scalar_type());
  const bool per_expert = t.dim() == 1 && t.size(0) == E;
  const bool per_token = t.dim() == 2 && t.size(0) == T && t.size(1) == E;
  TORCH_CHECK_VALUE(per_expert || per_token, "moeops: ", name, " must have shape [E]=[", E,
                    "] or [T, E]=[", T, ", ", E, "], got ", t.sizes());
  Tensor c = t.contiguous();
  *stride = per_token ? E : 0;
  return c;
}

inline GatingPrepared prepare_gating(MOEOPS_GATING_ARGS) {
  check_dim(logits, 2, "logits", "[T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  const DType dt = to_dtype(logits, "logits");
  TORCH_CHECK_VALUE(E >= 1 && E <= kMaxExperts, "moeops: logits must have 1..", kMaxExperts,
                    " experts (dim 1), got E=", E);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, "moeops: k must be in [1, E=", E, "], got k=", k);
  Scoring sc;
  if (scoring == "softmax") sc = Scoring::Softmax;
  else if (scoring == "sigmoid") sc = Scoring::Sigmoid;
  else TORCH_CHECK_VALUE(false, "moeops: scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring), "'");
  MaskMode mm;
  if (mask_mode == "reroute") mm = MaskMode::Reroute;
  else if (mask_mode == "drop") mm = MaskMode::Drop;
  else if (mask_mode == "drop_renorm") mm = MaskMode::DropRenorm;
  else TORCH_CHECK_VALUE(false, "moeops: mask_mode must be 'reroute', 'drop' or 'drop_renorm', got '",
                         std::string(mask_mode), "'");
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, "moeops: n_group must divide E=", E,
                    ", got n_group=", n_group);
  TORCH_CHECK_VALUE(n_group == 1 || E / n_group >= 2, "moeops: group-limited selection needs at least 2 "
                    "experts per group (the group score is the sum of its top 2), got E=", E, ", n_group=", n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "moeops: topk_group must be in [1, n_group=",
                    n_group, "], got ", topk_group);
  TORCH_CHECK_VALUE(std::isfinite(routed_scaling_factor), "moeops: routed_scaling_factor must be finite, got ",
                    routed_scaling_factor);

  GatingPrepared g;
  g.logits = logits.stride(1) == 1 ? logits : logits.contiguous();
  if (bias.has_value()) {
    check_same_device(*bias, logits, "bias", "logits");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == E, "moeops: bias must have shape [E]=[", E,
                      "], got ", bias->sizes());
    to_dtype(*bias, "bias");
    g.bias = bias->to(at::kFloat).contiguous();
  }
  GatingParams& p = g.p;
  g.mask = prepare_expert_mask(mask, "mask", T, E, logits, &p.mask_stride);
  g.forced = prepare_expert_mask(forced, "forced", T, E, logits, &p.forced_stride);

  auto f32 = logits.options().dtype(at::kFloat);
  auto i32 = logits.options().dtype(at::kInt);
  g.weights = at::empty({T, k}, f32);
  g.ids = at::empty({T, k}, i32);
  g.probs = return_probs ? at::empty({T, E}, f32) : at::empty({0}, f32);
  g.counts = return_counts ? at::zeros({E}, i32) : at::empty({0}, i32);

  p.logits = g.logits.data_ptr();
  p.logits_dtype = dt;
  p.logits_stride = g.logits.stride(0);
  p.T = T;
  p.E = static_cast<int>(E);
  p.k = static_cast<int>(k);
  p.scoring = sc;
  p.renormalize = renormalize;
  p.scale = static_cast<float>(routed_scaling_factor);
  p.bias = g.bias.defined() ? g.bias.data_ptr<float>() : nullptr;
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.mask = g.mask.defined() ? g.mask.data_ptr<bool>() : nullptr;
  p.mask_mode = mm;
  p.forced = g.forced.defined() ? g.forced.data_ptr<bool>() : nullptr;
  p.weights = g.weights.data_ptr<float>();
  p.ids = g.ids.data_ptr<int32_t>();
  p.probs = return_probs ? g.probs.data_ptr<float>() : nullptr;
  p.counts = return_counts ? g.counts.data_ptr<int32_t>() : nullptr;
  return g;
}

}  // namespace moeops
