// Argument checks for grouped_gemm / fused_experts, shared by every backend's entry point.
#pragma once
#include <ATen/core/Tensor.h>
#include <limits>
#include <optional>
#include <string_view>

#include "common/checks.h"

namespace moeops {
using at::Tensor;

enum class Act : int { Silu = 0, Gelu = 1, GeluTanh = 2, Relu = 3, Relu2 = 4 };

inline Act parse_activation(std::string_view a) {
  if (a == "silu") return Act::Silu;
  if (a == "gelu") return Act::Gelu;
  if (a == "gelu_tanh") return Act::GeluTanh;
  if (a == "relu") return Act::Relu;
  if (a == "relu2") return Act::Relu2;
  TORCH_CHECK_VALUE(false, "moeops: activation must be one of silu, gelu, gelu_tanh, relu, relu2; got '",
                    std::string(a), "'");
}

inline void check_grouped_gemm_args(const Tensor& x, const Tensor& w, const Tensor& offsets, bool w_transposed) {
  check_dim(x, 2, "x", "[R, K]");
  to_dtype(x, "x");
  check_dim(w, 3, "w", w_transposed ? "[E, K, N]" : "[E, N, K]");
  to_dtype(w, "w");
  check_dim(offsets, 1, "offsets", "[E+1]");
  check_dtype(offsets, at::kInt, "offsets");
  check_same_device(w, x, "w", "x");
  check_same_device(offsets, x, "offsets", "x");
  const int64_t K = w_transposed ? w.size(1) : w.size(2);
  TORCH_CHECK_VALUE(x.size(1) == K, "moeops: x has K=", x.size(1), " columns but w ", w.sizes(),
                    (w_transposed ? " ([E, K, N])" : " ([E, N, K])"), " expects K=", K);
  TORCH_CHECK_VALUE(offsets.size(0) == w.size(0) + 1, "moeops: offsets must have E+1=", w.size(0) + 1,
                    " entries, got ", offsets.size(0));
}

// hidden [T, H] float, ids [T, K] int32, weights [T, K] float32, on one device.
inline void check_routed_tokens(const Tensor& hidden, const Tensor& ids, const Tensor& weights) {
  check_dim(hidden, 2, "hidden", "[T, H]");
  to_dtype(hidden, "hidden");
  check_dim(ids, 2, "ids", "[T, K]");
  check_dtype(ids, at::kInt, "ids");
  check_dim(weights, 2, "weights", "[T, K]");
  check_dtype(weights, at::kFloat, "weights");
  check_same_device(ids, hidden, "ids", "hidden");
  check_same_device(weights, hidden, "weights", "hidden");
  TORCH_CHECK_VALUE(ids.size(0) == hidden.size(0), "moeops: ids must have T=", hidden.size(0),
                    " rows (hidden is ", hidden.sizes(), "), got ", ids.sizes());
  TORCH_CHECK_VALUE(weights.sizes() == ids.sizes(), "moeops: weights must have the shape of ids ", ids.sizes(),
                    ", got ", weights.sizes());
}

struct ExpertsDims {
  int64_t T, H, K, E, I, n_up;
  Act act;
};

inline ExpertsDims check_fused_experts_args(const Tensor& hidden, const Tensor& ids, const Tensor& weights,
                                            const Tensor& w_up, const Tensor& w_down,
                                            const std::optional<Tensor>& b_up,
                                            const std::optional<Tensor>& b_down, std::string_view activation,
                                            bool gated, const std::optional<Tensor>& gain) {
  check_routed_tokens(hidden, ids, weights);
  check_dim(w_up, 3, "w_up", "[E, N_up, H]");
  to_dtype(w_up, "w_up");
  check_dim(w_down, 3, "w_down", "[E, H, I]");
  to_dtype(w_down, "w_down");
  check_same_device(w_up, hidden, "w_up", "hidden");
  check_same_device(w_down, hidden, "w_down", "hidden");
  ExpertsDims d{};
  d.T = hidden.size(0);
  d.H = hidden.size(1);
  d.K = ids.size(1);
  d.E = w_up.size(0);
  d.I = w_down.size(2);
  d.n_up = w_up.size(1);
  d.act = parse_activation(activation);
  TORCH_CHECK_VALUE(w_up.size(2) == d.H, "moeops: w_up must be [E, N_up, H] with H=", d.H, ", got ", w_up.sizes());
  TORCH_CHECK_VALUE(w_down.size(0) == d.E && w_down.size(1) == d.H, "moeops: w_down must be [E, H, I] = [", d.E,
                    ", ", d.H, ", I], got ", w_down.sizes());
  TORCH_CHECK_VALUE(d.n_up == (gated ? 2 * d.I : d.I), "moeops: w_up must have N_up = ", gated ? "2*I = " : "I = ",
                    gated ? 2 * d.I : d.I, " rows for ", gated ? "gated" : "non-gated", " experts (w_down has I=",
                    d.I, "), got ", w_up.sizes());
  TORCH_CHECK_VALUE(d.T * d.K < std::numeric_limits<int32_t>::max(), "moeops: T*K must be < 2^31, got ",
                    d.T * d.K);
  if (b_up.has_value()) {
    check_same_device(*b_up, hidden, "b_up", "hidden");
    to_dtype(*b_up, "b_up");
    TORCH_CHECK_VALUE(b_up->dim() == 2 && b_up->size(0) == d.E && b_up->size(1) == d.n_up,
                      "moeops: b_up must be [E, N_up] = [", d.E, ", ", d.n_up, "], got ", b_up->sizes());
  }
  if (b_down.has_value()) {
    check_same_device(*b_down, hidden, "b_down", "hidden");
    to_dtype(*b_down, "b_down");
    TORCH_CHECK_VALUE(b_down->dim() == 2 && b_down->size(0) == d.E && b_down->size(1) == d.H,
                      "moeops: b_down must be [E, H] = [", d.E, ", ", d.H, "], got ", b_down->sizes());
  }
  if (gain.has_value()) {
    check_same_device(*gain, hidden, "gain", "hidden");
    to_dtype(*gain, "gain");
    TORCH_CHECK_VALUE(gain->dim() == 1 && gain->size(0) == d.E, "moeops: gain must be [E] = [", d.E, "], got ",
                      gain->sizes());
  }
  return d;
}

// A shared expert's output [T, H] (any float dtype) and its gate [T] or [T, 1], added in the combine.
inline void check_shared_args(const Tensor& shared, const std::optional<Tensor>& gate, const Tensor& hidden) {
  check_same_device(shared, hidden, "shared_out", "hidden");
  to_dtype(shared, "shared_out");
  TORCH_CHECK_VALUE(shared.sizes() == hidden.sizes(), "moeops: shared_out must have the shape of hidden ",
                    hidden.sizes(), ", got ", shared.sizes());
  if (gate.has_value()) {
    check_same_device(*gate, hidden, "shared_gate", "hidden");
    to_dtype(*gate, "shared_gate");
    TORCH_CHECK_VALUE(gate->numel() == hidden.size(0) && (gate->dim() == 1 || (gate->dim() == 2 && gate->size(1) == 1)),
                      "moeops: shared_gate must be [T] or [T, 1] with T=", hidden.size(0), ", got ", gate->sizes());
  }
}

// Per-expert weight lists (transformers 4.x ModuleLists): w_gate[e], w_up[e] [I, H], w_down[e]
// [H, I], each contiguous, one dtype per list, all on hidden's device. Gated experts.
inline ExpertsDims check_experts_list_args(const Tensor& hidden, const Tensor& ids, const Tensor& weights,
                                           at::TensorList w_gate, at::TensorList w_up, at::TensorList w_down,
                                           std::string_view activation) {
  check_routed_tokens(hidden, ids, weights);
  ExpertsDims d{};
  d.T = hidden.size(0);
  d.H = hidden.size(1);
  d.K = ids.size(1);
  d.E = static_cast<int64_t>(w_down.size());
  d.I = w_gate.size() > 0 && w_gate[0].dim() == 2 ? w_gate[0].size(0) : 0;
  d.n_up = 2 * d.I;
  d.act = parse_activation(activation);
  const std::pair<at::TensorList, const char*> lists[] = {{w_gate, "w_gate"}, {w_up, "w_up"}, {w_down, "w_down"}};
  for (const auto& [list, name] : lists) {
    const bool down = std::string_view(name) == "w_down";
    for (size_t e = 0; e < list.size(); ++e) {
      const Tensor& t = list[e];
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == (down ? d.H : d.I) && t.size(1) == (down ? d.I : d.H),
                        "moeops: ", name, "[", e, "] must be ", down ? "[H, I] = [" : "[I, H] = [",
                        down ? d.H : d.I, ", ", down ? d.I : d.H, "], got ", t.sizes());
      TORCH_CHECK_VALUE(t.is_contiguous(), "moeops: ", name, "[", e, "] must be contiguous");
      TORCH_CHECK_TYPE(t.scalar_type() == list[0].scalar_type(), "moeops: ", name, "[", e, "] is ", t.scalar_type(),
                       " but ", name, "[0] is ", list[0].scalar_type());
      to_dtype(t, name);
      check_same_device(t, hidden, name, "hidden");
    }
  }
  TORCH_CHECK_TYPE(w_gate[0].scalar_type() == w_up[0].scalar_type(), "moeops: w_gate and w_up must share a dtype");
  TORCH_CHECK_VALUE(d.T * d.K < std::numeric_limits<int32_t>::max(), "moeops: T*K must be < 2^31");
  return d;
}

}  // namespace moeops
