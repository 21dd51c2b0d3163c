#pragma once
#include <cuda_runtime.h>
#include "moex/moex_types.h"

namespace moeops::cuda {
// MoE-X launchers (python/moeops/reference.py, MoE-X section). No host synchronisation.
void launch_moex_router_stats(const MoexStatsParams& p, cudaStream_t stream);
void launch_moex_route(const MoexRouteParams& p, cudaStream_t stream);
// p.active must be zeroed by the caller; p.h / p.y are scratch of [T*K, D] / [T*K, d] floats.
void launch_moex_experts(const MoexExpertsParams& p, cudaStream_t stream);
}  // namespace moeops::cuda
