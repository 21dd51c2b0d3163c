// CUDA entry points of route_plan / permute / combine: checks (permute_prepare.h),
// allocation, then the launchers in permute_kernels.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>

#include "common/checks.h"
#include "ops.h"
#include "permute/cuda/permute_launch.h"
#include "permute/permute_prepare.h"

namespace moeops {

namespace {
void check_cuda_tensor(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "moeops: ", name, " must be a CUDA tensor for the CUDA kernel, got one on ",
                    t.device());
}
}  // namespace

PlanOut route_plan_cuda(const Tensor& ids, int64_t num_experts) {
  check_plan_args(ids, num_experts);
  check_cuda_tensor(ids, "ids");
  const c10::cuda::CUDAGuard guard(ids.device());
  const Tensor ids_c = ids.contiguous();
  const int64_t n = ids_c.numel();
  const int E = static_cast<int>(num_experts);
  auto i32 = ids_c.options().dtype(at::kInt);
  Tensor offsets = at::empty({num_experts + 1}, i32);
  Tensor sorted_slots = at::empty({n}, i32);
  Tensor inverse = at::empty({n}, i32);
  const size_t bytes = cuda::route_plan_workspace_bytes(n, E);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, ids_c.options().dtype(at::kByte));
  cuda::launch_route_plan(ids_c.data_ptr<int32_t>(), n, E, offsets.data_ptr<int32_t>(),
                          sorted_slots.data_ptr<int32_t>(), inverse.data_ptr<int32_t>(),
                          bytes > 0 ? workspace.data_ptr() : nullptr, bytes,
                          c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {offsets, sorted_slots, inverse};
}

Tensor permute_cuda(const Tensor& hidden, const Tensor& sorted_slots, int64_t top_k,
                    const std::optional<Tensor>& slot_scale) {
  const Tensor h = check_permute_args(hidden, sorted_slots, top_k, slot_scale);
  check_cuda_tensor(h, "hidden");
  TORCH_CHECK_VALUE(top_k <= std::numeric_limits<int32_t>::max(), "moeops: top_k must fit in int32, got ", top_k);
  const c10::cuda::CUDAGuard guard(h.device());
  const Tensor slots = sorted_slots.contiguous();
  Tensor scale;
  if (slot_scale.has_value()) scale = slot_scale->contiguous();
  const int64_t T = h.size(0), H = h.size(1), R = slots.size(0);
  Tensor out = at::empty({R, H}, h.options());
  if (R > 0 && H > 0) {
    cuda::launch_permute(h.data_ptr(), to_dtype(h, "hidden"), T, H, h.stride(0), slots.data_ptr<int32_t>(), R,
                         static_cast<int>(top_k), scale.defined() ? scale.data_ptr<float>() : nullptr,
                         out.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

Tensor combine_cuda(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse) {
  return combine_cuda_to(expert_out, weights, inverse, expert_out.scalar_type());
}

Tensor combine_cuda_to(const Tensor& expert_out, const Tensor& weights, const Tensor& inverse,
                       at::ScalarType out_dtype) {
  check_combine_args(expert_out, weights, inverse);
  check_cuda_tensor(expert_out, "expert_out");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const Tensor eo = expert_out.contiguous();
  const Tensor w = weights.contiguous();
  const Tensor inv = inverse.contiguous();
  const int64_t R = eo.size(0), H = eo.size(1), T = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(K <= std::numeric_limits<int32_t>::max(), "moeops: K must fit in int32, got ", K);
  Tensor out = at::empty({T, H}, eo.options().dtype(out_dtype));
  if (T > 0 && H > 0) {
    cuda::launch_combine(eo.data_ptr(), to_dtype(eo, "expert_out"), R, H, w.data_ptr<float>(),
                         inv.data_ptr<int32_t>(), T, static_cast<int>(K), out.data_ptr(), to_dtype(out, "out"),
                         c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace moeops
