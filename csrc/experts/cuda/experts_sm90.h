// Hopper (sm_90a) grouped GEMM on CUTLASS 3: TMA loads, wgmma, warp-specialized persistent
// kernel over a device-side problem list (experts_sm90.cu). The prefill path of grouped_gemm and
// fused_experts; launch_grouped_gemm (experts_launch.h) remains the path everywhere else.
// No torch headers here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "experts/cuda/experts_launch.h"

namespace moeops::cuda {

// True when this build compiled the CUTLASS sm_90a kernels (MOEOPS_CUDA_ARCHS holds 90a and the
// CUTLASS headers were found).
bool sm90_grouped_gemm_built();

// True when the sm_90a kernel takes this problem: device major 9, a and w both bf16 or both
// fp16, out of that dtype or fp32, [E, N, K] weights, Store epilogue without bias, K, N and lda
// multiples of 8, a/w/out 16-byte aligned.
bool sm90_grouped_gemm_supported(const GroupedGemmParams& p, int device_major);

// Device scratch for launch_sm90_grouped_gemm: the per-expert problem list, pointer and stride
// arrays, and CUTLASS's own workspace (which depends on the device's SM count).
size_t sm90_grouped_gemm_workspace_bytes(const GroupedGemmParams& p, int device);

// Runs out[rows of e] = a[rows of e] @ w[e]^T for every expert e without a host
// synchronisation: one small kernel turns `offsets` (clamped to [0, R] like
// launch_grouped_gemm) into CUTLASS's problem list on the device, then the persistent kernel
// walks it; experts with no rows get no tiles. Throws std::invalid_argument when
// sm90_grouped_gemm_supported is false, std::runtime_error on a CUDA/CUTLASS failure.
void launch_sm90_grouped_gemm(const GroupedGemmParams& p, int device, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

}  // namespace moeops::cuda
