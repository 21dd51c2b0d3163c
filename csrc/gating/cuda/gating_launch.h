#pragma once
#include <cuda_runtime.h>
#include "common/launch_types.h"

namespace moeops::cuda {
// Launches the top-k gating kernel on `stream`. `p.counts`, when set, must be zeroed already.
void launch_topk_gating(const GatingParams& p, cudaStream_t stream);
}  // namespace moeops::cuda
