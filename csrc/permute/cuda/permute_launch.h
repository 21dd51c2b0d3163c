#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>
#include "common/launch_types.h"

namespace moeops::cuda {
// Bytes of device scratch launch_route_plan needs for n_slots slots and E experts.
size_t route_plan_workspace_bytes(int64_t n_slots, int E);
// Routing plan (reference.py::route_plan). ids [n_slots] int32; out: offsets [E+1],
// sorted_slots [n_slots], inverse [n_slots]. Ids outside [0, E) are treated as empty slots.
void launch_route_plan(const int32_t* ids, int64_t n_slots, int E, int32_t* offsets,
                       int32_t* sorted_slots, int32_t* inverse, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);
// out[r] = hidden[sorted_slots[r] / top_k] * (slot_scale ? slot_scale[slot] : 1), zero rows
// for slot -1. hidden [T, H] with row stride `hidden_stride` (elements); out [R, H] contiguous.
void launch_permute(const void* hidden, DType dtype, int64_t T, int64_t H, int64_t hidden_stride,
                    const int32_t* sorted_slots, int64_t R, int top_k, const float* slot_scale,
                    void* out, cudaStream_t stream);
// out[t] = sum_k weights[t,k] * expert_out[inverse[t*K+k]] in fp32, slot order, skipping -1,
// rounded once to out_dtype: dtype, or fp16/bf16 when dtype is fp32 (the fused layer's per-slot
// fp32 rows straight to the hidden dtype). expert_out [R, H] contiguous; weights [T, K] fp32
// contiguous; out [T, H] contiguous.
void launch_combine(const void* expert_out, DType dtype, int64_t R, int64_t H,
                    const float* weights, const int32_t* inverse, int64_t T, int K, void* out,
                    DType out_dtype, cudaStream_t stream);
}  // namespace moeops::cuda
