// CUDA entry point of topk_gating: validation/allocation (gating_prepare.h), then the kernel.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gating/cuda/gating_launch.h"
#include "gating/gating_prepare.h"
#include "ops.h"

namespace moeops {

GatingOut topk_gating_cuda(MOEOPS_GATING_ARGS) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "moeops: topk_gating_cuda needs a CUDA logits tensor, got one on ",
                    logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  GatingPrepared g = prepare_gating(logits, k, scoring, renormalize, routed_scaling_factor, bias, n_group,
                                    topk_group, mask, mask_mode, forced, return_probs, return_counts);
  if (g.p.T > 0) {
    cuda::launch_topk_gating(g.p, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {g.weights, g.ids, g.probs, g.counts};
}

}  // namespace moeops
