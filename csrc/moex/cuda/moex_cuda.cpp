// CUDA entry points of the MoE-X ops: validation/allocation (moex_prepare.h), then the launchers.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "moex/cuda/moex_launch.h"
#include "moex/moex_prepare.h"
#include "ops.h"

namespace moeops {

std::tuple<Tensor, Tensor, Tensor> moex_router_stats_cuda(const Tensor& w_enc, const std::optional<Tensor>& b_enc) {
  TORCH_CHECK_VALUE(w_enc.is_cuda(), "moeops: moex_router_stats_cuda needs w_enc on CUDA, got ", w_enc.device());
  const c10::cuda::CUDAGuard guard(w_enc.device());
  MoexStatsPrepared s = prepare_moex_stats(w_enc, b_enc);
  cuda::launch_moex_router_stats(s.p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s.mu, s.var, s.bmean};
}

std::tuple<Tensor, Tensor, Tensor> moex_route_cuda(MOEOPS_MOEX_ROUTE_ARGS) {
  TORCH_CHECK_VALUE(x.is_cuda(), "moeops: moex_route_cuda needs x on CUDA, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  MoexRoutePrepared r = prepare_moex_route(x, mu, var, bias_mean, k, select, mask, mask_mode, forced, return_density);
  if (r.p.T > 0) {
    cuda::launch_moex_route(r.p, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {r.weights, r.ids, r.density};
}

std::tuple<Tensor, Tensor> moex_experts_cuda(MOEOPS_MOEX_EXPERTS_ARGS) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "moeops: moex_experts_cuda needs hidden on CUDA, got ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const MoexDims dm = check_moex_experts_args(hidden, ids, weights, w_enc, b_enc, w_dec, b_dec, down);
  const Tensor ids_c = ids.contiguous(), w_c = weights.contiguous();
  const Tensor enc = w_enc.contiguous(), dec = w_dec.contiguous();
  const Tensor be = b_enc.has_value() ? moex_f32_contig(*b_enc) : Tensor();
  const Tensor bd = b_dec.has_value() ? moex_f32_contig(*b_dec) : Tensor();
  const Tensor h_in = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  Tensor out = at::empty({dm.T, dm.d}, hidden.options());
  auto f32 = hidden.options().dtype(at::kFloat);
  Tensor active = at::zeros({dm.T, dm.K}, ids.options());
  if (dm.T == 0) return {out, return_active ? active : at::empty({0}, ids.options())};
  if (dm.d == 0)
    return {out, return_active ? moex_active_without_features(ids_c, b_enc, dm.M) : at::empty({0}, ids.options())};
  // fp32 scratch per slot: the expert's hidden units [D] and its output [d]. Long prompts run in
  // token chunks of at most kMoexScratchBytes of scratch (every token's arithmetic is the same
  // whatever the chunk).
  constexpr int64_t kMoexScratchBytes = int64_t{512} << 20;
  const int64_t per_token = std::max<int64_t>(1, dm.K * (dm.D + dm.d) * 4);
  const int64_t tc = std::clamp<int64_t>(kMoexScratchBytes / per_token, 1, dm.T);
  Tensor hs = at::empty({tc * dm.K, dm.D}, f32), ys = at::empty({tc * dm.K, dm.d}, f32);
  MoexExpertsParams p;
  p.hidden_dtype = to_dtype(h_in, "hidden");
  p.hidden_stride = h_in.stride(0);
  p.K = static_cast<int>(dm.K);
  p.M = static_cast<int>(dm.M);
  p.D = dm.D;
  p.d = dm.d;
  p.w_enc = enc.data_ptr();
  p.enc_dtype = to_dtype(enc, "w_enc");
  p.b_enc = be.defined() ? be.data_ptr<float>() : nullptr;
  p.w_dec = dec.data_ptr();
  p.dec_dtype = to_dtype(dec, "w_dec");
  p.b_dec = bd.defined() ? bd.data_ptr<float>() : nullptr;
  p.dense = dm.down == MoexDown::Dense;
  p.h = hs.data_ptr<float>();
  p.y = ys.data_ptr<float>();
  const int64_t hb = h_in.element_size(), ob = out.element_size();
  for (int64_t t0 = 0; t0 < dm.T; t0 += tc) {
    p.T = std::min(tc, dm.T - t0);
    p.hidden = static_cast<const char*>(h_in.data_ptr()) + t0 * p.hidden_stride * hb;
    p.ids = ids_c.data_ptr<int32_t>() + t0 * dm.K;
    p.weights = w_c.data_ptr<float>() + t0 * dm.K;
    p.active = active.data_ptr<int32_t>() + t0 * dm.K;
    p.out = static_cast<char*>(out.data_ptr()) + t0 * dm.d * ob;
    cuda::launch_moex_experts(p, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, return_active ? active : at::empty({0}, ids.options())};
}

}  // namespace moeops
