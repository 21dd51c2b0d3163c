// Validation and output allocation for the MoE-X ops, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "common/checks.h"
#include "experts/experts_prepare.h"
#include "moex/moex_types.h"

namespace moeops {

constexpr int64_t kMoexMaxExperts = 512;

inline Tensor moex_f32_contig(const Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

// w_enc [M, D, d] float, b_enc [M, D] float or none.
inline void check_moex_encoder(const Tensor& w_enc, const std::optional<Tensor>& b_enc) {
  check_dim(w_enc, 3, "w_enc", "[M, D, d]");
  to_dtype(w_enc, "w_enc");
  TORCH_CHECK_VALUE(w_enc.size(0) >= 1 && w_enc.size(0) <= kMoexMaxExperts, "moeops: w_enc must have 1..",
                    kMoexMaxExperts, " experts (dim 0), got ", w_enc.sizes());
  TORCH_CHECK_VALUE(w_enc.size(1) >= 1, "moeops: w_enc must have D >= 1 units per expert, got ", w_enc.sizes());
  if (b_enc.has_value()) {
    check_same_device(*b_enc, w_enc, "b_enc", "w_enc");
    to_dtype(*b_enc, "b_enc");
    TORCH_CHECK_VALUE(b_enc->dim() == 2 && b_enc->size(0) == w_enc.size(0) && b_enc->size(1) == w_enc.size(1),
                      "moeops: b_enc must be [M, D] = [", w_enc.size(0), ", ", w_enc.size(1), "], got ",
                      b_enc->sizes());
  }
}

struct MoexStatsPrepared {
  MoexStatsParams p;
  Tensor w, b, mu, var, bmean;
};

inline MoexStatsPrepared prepare_moex_stats(const Tensor& w_enc, const std::optional<Tensor>& b_enc) {
  check_moex_encoder(w_enc, b_enc);
  MoexStatsPrepared s;
  s.w = w_enc.contiguous();
  if (b_enc.has_value()) s.b = moex_f32_contig(*b_enc);
  const int64_t M = w_enc.size(0), D = w_enc.size(1), d = w_enc.size(2);
  auto f32 = w_enc.options().dtype(at::kFloat);
  s.mu = at::empty({M, d}, f32);
  s.var = at::empty({M, d}, f32);
  s.bmean = at::empty({M}, f32);
  MoexStatsParams& p = s.p;
  p.w = s.w.data_ptr();
  p.w_dtype = to_dtype(s.w, "w_enc");
  p.b = s.b.defined() ? s.b.data_ptr<float>() : nullptr;
  p.M = M;
  p.D = D;
  p.d = d;
  p.mu = s.mu.data_ptr<float>();
  p.var = s.var.data_ptr<float>();
  p.bmean = s.bmean.data_ptr<float>();
  return s;
}

struct MoexRoutePrepared {
  MoexRouteParams p;
  Tensor x, mu, var, bmean, mask, forced;
  Tensor weights, ids, density;
};

inline Tensor moex_expert_mask(const std::optional<Tensor>& m, const char* name, int64_t T, int64_t M,
                               const Tensor& x, int64_t* stride) {
  *stride = 0;
  if (!m.has_value()) return Tensor();
  const Tensor& t = *m;
  check_same_device(t, x, name, "x");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, "moeops: ", name, " must be a bool tensor, got ", t.scalar_type());
  const bool per_expert = t.dim() == 1 && t.size(0) == M;
  const bool per_token = t.dim() == 2 && t.size(0) == T && t.size(1) == M;
  TORCH_CHECK_VALUE(per_expert || per_token, "moeops: ", name, " must have shape [M]=[", M, "] or [T, M]=[", T,
                    ", ", M, "], got ", t.sizes());
  *stride = per_token ? M : 0;
  return t.contiguous();
}

inline MoexRoutePrepared prepare_moex_route(const Tensor& x, const Tensor& mu, const Tensor& var,
                                            const Tensor& bias_mean, int64_t k, std::string_view select,
                                            const std::optional<Tensor>& mask, std::string_view mask_mode,
                                            const std::optional<Tensor>& forced, bool return_density) {
  check_dim(x, 2, "x", "[T, d]");
  to_dtype(x, "x");
  check_dim(mu, 2, "mu", "[M, d]");
  check_dtype(mu, at::kFloat, "mu");
  check_dim(var, 2, "var", "[M, d]");
  check_dtype(var, at::kFloat, "var");
  check_dim(bias_mean, 1, "bias_mean", "[M]");
  check_dtype(bias_mean, at::kFloat, "bias_mean");
  check_same_device(mu, x, "mu", "x");
  check_same_device(var, x, "var", "x");
  check_same_device(bias_mean, x, "bias_mean", "x");
  const int64_t T = x.size(0), d = x.size(1), M = mu.size(0);
  TORCH_CHECK_VALUE(M >= 1 && M <= kMoexMaxExperts, "moeops: mu must have 1..", kMoexMaxExperts,
                    " experts (dim 0), got ", mu.sizes());
  TORCH_CHECK_VALUE(mu.size(1) == d, "moeops: mu must be [M, d] with d=", d, " (x is ", x.sizes(), "), got ",
                    mu.sizes());
  TORCH_CHECK_VALUE(var.sizes() == mu.sizes(), "moeops: var must have the shape of mu ", mu.sizes(), ", got ",
                    var.sizes());
  TORCH_CHECK_VALUE(bias_mean.size(0) == M, "moeops: bias_mean must be [M] = [", M, "], got ", bias_mean.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= M, "moeops: k must be in [1, M=", M, "], got k=", k);
  bool densest;
  if (select == "sparsest") densest = false;
  else if (select == "densest") densest = true;
  else TORCH_CHECK_VALUE(false, "moeops: select must be 'sparsest' or 'densest', got '", std::string(select), "'");
  MaskMode mm;
  if (mask_mode == "reroute") mm = MaskMode::Reroute;
  else if (mask_mode == "drop") mm = MaskMode::Drop;
  else if (mask_mode == "drop_renorm") mm = MaskMode::DropRenorm;
  else TORCH_CHECK_VALUE(false, "moeops: mask_mode must be 'reroute', 'drop' or 'drop_renorm', got '",
                         std::string(mask_mode), "'");
  MoexRoutePrepared r;
  MoexRouteParams& p = r.p;
  r.mask = moex_expert_mask(mask, "mask", T, M, x, &p.mask_stride);
  r.forced = moex_expert_mask(forced, "forced", T, M, x, &p.forced_stride);
  r.x = moex_f32_contig(x);
  r.mu = mu.contiguous();
  r.var = var.contiguous();
  r.bmean = bias_mean.contiguous();
  auto f32 = x.options().dtype(at::kFloat);
  r.weights = at::empty({T, k}, f32);
  r.ids = at::empty({T, k}, x.options().dtype(at::kInt));
  r.density = return_density ? at::empty({T, M}, f32) : at::empty({0}, f32);
  p.x = r.x.data_ptr<float>();
  p.T = T;
  p.d = d;
  p.M = static_cast<int>(M);
  p.k = static_cast<int>(k);
  p.mu = r.mu.data_ptr<float>();
  p.var = r.var.data_ptr<float>();
  p.bmean = r.bmean.data_ptr<float>();
  p.densest = densest;
  p.mask = r.mask.defined() ? r.mask.data_ptr<bool>() : nullptr;
  p.mask_mode = mm;
  p.forced = r.forced.defined() ? r.forced.data_ptr<bool>() : nullptr;
  p.weights = r.weights.data_ptr<float>();
  p.ids = r.ids.data_ptr<int32_t>();
  p.density = return_density ? r.density.data_ptr<float>() : nullptr;
  return r;
}

enum class MoexDown : int { Auto = 0, Dense = 1, Sparse = 2 };

struct MoexDims {
  int64_t T, d, K, M, D;
  MoexDown down;
};

// moex_experts' `active [T, K]` when d == 0 (no input features, nothing to compute): a slot of
// expert e has u = b_enc[e], so its count is the number of units with ReLU(b_enc[e]) != 0 (NaN
// counts); 0 for empty slots (ids outside [0, M)) and without b_enc. On ids' device.
inline Tensor moex_active_without_features(const Tensor& ids, const std::optional<Tensor>& b_enc, int64_t M) {
  Tensor active = at::zeros(ids.sizes(), ids.options());
  if (!b_enc.has_value() || M == 0 || ids.numel() == 0) return active;
  const Tensor per_expert = b_enc->to(ids.device(), at::kFloat).relu().ne(0).sum(1, false, at::kInt);  // [M]
  const Tensor valid = ids.ge(0).logical_and(ids.lt(M));
  const Tensor idx = ids.clamp(0, M - 1).reshape({-1}).to(at::kLong);
  return per_expert.index_select(0, idx).reshape(ids.sizes()).masked_fill(valid.logical_not(), 0);
}

// hidden [T, d], ids/weights [T, K], w_enc/w_dec [M, D, d], b_enc [M, D], b_dec [M, d].
inline MoexDims check_moex_experts_args(const Tensor& hidden, const Tensor& ids, const Tensor& weights,
                                        const Tensor& w_enc, const std::optional<Tensor>& b_enc,
                                        const Tensor& w_dec, const std::optional<Tensor>& b_dec,
                                        std::string_view down) {
  check_routed_tokens(hidden, ids, weights);
  check_same_device(w_enc, hidden, "w_enc", "hidden");
  check_moex_encoder(w_enc, b_enc);
  check_dim(w_dec, 3, "w_dec", "[M, D, d]");
  to_dtype(w_dec, "w_dec");
  check_same_device(w_dec, hidden, "w_dec", "hidden");
  MoexDims dm{};
  dm.T = hidden.size(0);
  dm.d = hidden.size(1);
  dm.K = ids.size(1);
  dm.M = w_enc.size(0);
  dm.D = w_enc.size(1);
  TORCH_CHECK_VALUE(w_enc.size(2) == dm.d, "moeops: w_enc must be [M, D, d] with d=", dm.d, " (hidden is ",
                    hidden.sizes(), "), got ", w_enc.sizes());
  TORCH_CHECK_VALUE(w_dec.sizes() == w_enc.sizes(), "moeops: w_dec must be [M, D, d] like w_enc ", w_enc.sizes(),
                    " (the decoder stored unit-major), got ", w_dec.sizes());
  if (b_dec.has_value()) {
    check_same_device(*b_dec, hidden, "b_dec", "hidden");
    to_dtype(*b_dec, "b_dec");
    TORCH_CHECK_VALUE(b_dec->dim() == 2 && b_dec->size(0) == dm.M && b_dec->size(1) == dm.d,
                      "moeops: b_dec must be [M, d] = [", dm.M, ", ", dm.d, "], got ", b_dec->sizes());
  }
  TORCH_CHECK_VALUE(dm.T * dm.K < std::numeric_limits<int32_t>::max(), "moeops: T*K must be < 2^31, got ",
                    dm.T * dm.K);
  if (down == "auto") dm.down = MoexDown::Auto;
  else if (down == "dense") dm.down = MoexDown::Dense;
  else if (down == "sparse") dm.down = MoexDown::Sparse;
  else TORCH_CHECK_VALUE(false, "moeops: down must be 'auto', 'dense' or 'sparse', got '", std::string(down), "'");
  return dm;
}

}  // namespace moeops
