// Routing plan, permute and combine (python/moeops/reference.py) on CUDA.
//
// route_plan: keys[s] = ids[s] (or E for -1 / out-of-range ids), values[s] = s; a stable
//   cub::DeviceRadixSort::SortPairs over the low bits(E) bits; offsets[e] = lower_bound(keys, e)
//   for e = 0..E; then sorted_slots[r] = key < E ? slot : -1 and inverse[slot] = key < E ? r : -1.
//   Deterministic, no host synchronisation; all scratch lives in the caller's workspace.
//   Small plans (decode: n_slots <= kSmallPlanSlots, E < kSmallPlanExperts) take one kernel
//   instead of four: one block counts the keys in shared memory, scans the counts into offsets,
//   and places slot s at offsets[key] + (number of earlier slots with its key), which is the
//   stable sort's position, so both paths give identical plans.
// permute / combine: a 256-thread block handles 256/tpr rows, tpr (a power of two) threads per
//   row striding over 16/8/4/elem-byte vectors of the row (the widest the sizes and pointers
//   allow); grid-stride over rows, 64-bit row offsets.
//
// Only CUDA/CUB headers and common/launch_types.h here (project rule: no torch in .cu files).
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_common.cuh"
#include "common/launch_types.h"
#include "permute/cuda/permute_launch.h"

namespace moeops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this
constexpr size_t kAlign = 256;

unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  int64_t b = (work_items + items_per_block - 1) / items_per_block;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

// ------------------------------------------------------------------------------------------
// route_plan
// ------------------------------------------------------------------------------------------

// Number of bits needed to represent the largest key, E (E >= 1).
int key_bits(int E) {
  int bits = 0;
  for (uint32_t v = static_cast<uint32_t>(E); v != 0; v >>= 1) ++bits;
  return bits;
}

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

struct PlanLayout {
  size_t keys_a = 0, keys_b = 0, vals_a = 0, vals_b = 0, temp = 0;  // byte offsets
  size_t temp_bytes = 0;
  size_t total = 0;
};

PlanLayout plan_layout(int64_t n, int E) {
  PlanLayout L;
  if (n <= 0) return L;
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> vals(nullptr, nullptr);
  size_t temp_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, vals, static_cast<int>(n), 0,
                                             key_bits(E)),
             "cub::DeviceRadixSort::SortPairs (workspace query)");
  const size_t arr = align_up(static_cast<size_t>(n) * 4);
  L.keys_a = 0;
  L.keys_b = L.keys_a + arr;
  L.vals_a = L.keys_b + arr;
  L.vals_b = L.vals_a + arr;
  L.temp = L.vals_b + arr;
  L.temp_bytes = temp_bytes;
  L.total = L.temp + align_up(temp_bytes > 0 ? temp_bytes : 1);
  return L;
}

__global__ void plan_keys_kernel(const int32_t* __restrict__ ids, int64_t n, uint32_t E,
                                 uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t id = ids[i];
    keys[i] = (id >= 0 && static_cast<uint32_t>(id) < E) ? static_cast<uint32_t>(id) : E;
    vals[i] = static_cast<int32_t>(i);
  }
}

constexpr int64_t kSmallPlanSlots = 1024;
constexpr int kSmallPlanExperts = 4096;
constexpr int kSmallPlanThreads = 1024;

bool small_plan(int64_t n_slots, int E) { return n_slots <= kSmallPlanSlots && E < kSmallPlanExperts; }

// The whole plan in one block (small_plan): shared keys [n] and per-key counts [E + 1], turned
// into group starts by an exclusive scan; then each slot's rank among earlier slots of its key.
__global__ void __launch_bounds__(kSmallPlanThreads)
    plan_small_kernel(const int32_t* __restrict__ ids, int n, uint32_t E, int32_t* __restrict__ offsets,
                      int32_t* __restrict__ sorted_slots, int32_t* __restrict__ inverse) {
  using Scan = cub::BlockScan<int, kSmallPlanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int carry;
  extern __shared__ int smem[];
  int* keys = smem;       // [n]
  int* start = smem + n;  // [E + 1]: counts, then group starts
  const int tid = static_cast<int>(threadIdx.x);
  const int groups = static_cast<int>(E) + 1;
  for (int e = tid; e < groups; e += kSmallPlanThreads) start[e] = 0;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int s = tid; s < n; s += kSmallPlanThreads) {
    const int32_t id = ids[s];
    const int key = (id >= 0 && static_cast<uint32_t>(id) < E) ? id : static_cast<int>(E);
    keys[s] = key;
    atomicAdd(&start[key], 1);  // counts: the same whatever the order of the additions
  }
  __syncthreads();
  for (int base = 0; base < groups; base += kSmallPlanThreads) {
    const int e = base + tid;
    const int c = e < groups ? start[e] : 0;
    int excl = 0, total = 0;
    Scan(tmp).ExclusiveSum(c, excl, total);
    const int before = carry;
    if (e < groups) {
      start[e] = before + excl;
      offsets[e] = before + excl;  // offsets[E] = the non-empty slots
    }
    __syncthreads();  // every thread has read carry and tmp
    if (tid == 0) carry = before + total;
    __syncthreads();
  }
  for (int s = tid; s < n; s += kSmallPlanThreads) {
    const int key = keys[s];
    int rank = 0;
    for (int j = 0; j < s; ++j) rank += keys[j] == key;
    const int r = start[key] + rank;
    const bool valid = key < static_cast<int>(E);
    sorted_slots[r] = valid ? s : -1;
    inverse[s] = valid ? r : -1;
  }
}

// offsets[e] = number of sorted keys < e, for e = 0..E (offsets[E] = non-empty slots).
__global__ void plan_offsets_kernel(const uint32_t* __restrict__ sorted_keys, int64_t n, int64_t E,
                                    int32_t* __restrict__ offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= E; e += stride) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(sorted_keys[mid]) < e) lo = mid + 1;
      else hi = mid;
    }
    offsets[e] = static_cast<int32_t>(lo);
  }
}

__global__ void plan_finalize_kernel(const uint32_t* __restrict__ sorted_keys,
                                     const int32_t* __restrict__ sorted_vals, int64_t n, uint32_t E,
                                     int32_t* __restrict__ sorted_slots, int32_t* __restrict__ inverse) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    const bool valid = sorted_keys[r] < E;
    const int32_t slot = sorted_vals[r];  // a permutation of 0..n-1: every inverse[] written once
    sorted_slots[r] = valid ? slot : -1;
    inverse[slot] = valid ? static_cast<int32_t>(r) : -1;
  }
}

// ------------------------------------------------------------------------------------------
// permute / combine
// ------------------------------------------------------------------------------------------

// Row r of out = hidden[slot / top_k] (* slot_scale[slot]), zero when slot is -1 (or out of range).
// nvec = H / N vectors per row; hidden_stride in elements (a multiple of N).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    permute_kernel(const T* __restrict__ hidden, int64_t T_rows, int64_t hidden_stride,
                   const int32_t* __restrict__ sorted_slots, int64_t R, int top_k,
                   const float* __restrict__ slot_scale, T* __restrict__ out, int64_t H, int64_t nvec,
                   int tpr_log2) {
  using V = Pack<T, N>;
  const int tpr = 1 << tpr_log2;
  const int rows_per_block = kThreads >> tpr_log2;
  const int tx = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int ty = static_cast<int>(threadIdx.x) >> tpr_log2;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + ty; r < R; r += row_stride) {
    V* dst = reinterpret_cast<V*>(out + r * H);
    const int32_t slot = sorted_slots[r];
    const int64_t tok = slot >= 0 ? static_cast<int64_t>(slot) / top_k : -1;
    if (tok < 0 || tok >= T_rows) {
      V z;
#pragma unroll
      for (int i = 0; i < N; ++i) z.v[i] = from_float<T>(0.0f);
      for (int64_t v = tx; v < nvec; v += tpr) dst[v] = z;
      continue;
    }
    const V* src = reinterpret_cast<const V*>(hidden + tok * hidden_stride);
    if (slot_scale != nullptr) {
      const float s = slot_scale[slot];
      for (int64_t v = tx; v < nvec; v += tpr) {
        V x = src[v];
#pragma unroll
        for (int i = 0; i < N; ++i) x.v[i] = from_float<T>(__fmul_rn(to_float(x.v[i]), s));
        dst[v] = x;
      }
    } else {
      for (int64_t v = tx; v < nvec; v += tpr) dst[v] = src[v];
    }
  }
}

// out[t] = sum_k w[t,k] * expert_out[inverse[t*K+k]] in fp32, k ascending, exactly as the
// reference: acc = acc + (w * x) with separate roundings (no FMA contraction); one rounding to
// TO (the input dtype, or a 16-bit dtype for fp32 input: the fused layer's final cast).
template <typename T, typename TO, int N>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* __restrict__ expert_out, int64_t R, const float* __restrict__ weights,
                   const int32_t* __restrict__ inverse, int64_t T_rows, int K, TO* __restrict__ out,
                   int64_t H, int64_t nvec, int tpr_log2) {
  using V = Pack<T, N>;
  using VO = Pack<TO, N>;
  const int tpr = 1 << tpr_log2;
  const int rows_per_block = kThreads >> tpr_log2;
  const int tx = static_cast<int>(threadIdx.x) & (tpr - 1);
  const int ty = static_cast<int>(threadIdx.x) >> tpr_log2;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * rows_per_block + ty; t < T_rows; t += row_stride) {
    const int32_t* inv = inverse + t * K;
    const float* w = weights + t * K;
    VO* dst = reinterpret_cast<VO*>(out + t * H);
    for (int64_t v = tx; v < nvec; v += tpr) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.0f;
      for (int kk = 0; kk < K; ++kk) {
        const int32_t r = inv[kk];
        if (r < 0 || r >= R) continue;  // empty slot: the reference adds +0, a no-op (acc is never -0)
        const float wk = w[kk];
        const V x = reinterpret_cast<const V*>(expert_out + static_cast<int64_t>(r) * H)[v];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(wk, to_float(x.v[i])));
      }
      VO o;
#pragma unroll
      for (int i = 0; i < N; ++i) o.v[i] = from_float<TO>(acc[i]);
      dst[v] = o;
    }
  }
}

int elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

bool ptr_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest vector (bytes) dividing the row length and every row start.
int pick_vec_bytes(int es, int64_t H, int64_t stride_a, const void* a, const void* b) {
  for (int vb : {16, 8, 4}) {
    if (vb < es) break;
    if ((H * es) % vb == 0 && (stride_a * es) % vb == 0 && ptr_aligned(a, vb) && ptr_aligned(b, vb)) return vb;
  }
  return es;
}

// threads per row: the smallest power of two >= nvec, at most kThreads.
int tpr_log2_for(int64_t nvec) {
  int l = 0;
  while ((int64_t{1} << l) < nvec && (1 << l) < kThreads) ++l;
  return l;
}

template <typename T, int N>
void launch_permute_typed(const void* hidden, int64_t T_rows, int64_t H, int64_t hidden_stride,
                          const int32_t* sorted_slots, int64_t R, int top_k, const float* slot_scale,
                          void* out, cudaStream_t stream) {
  const int64_t nvec = H / N;
  const int l = tpr_log2_for(nvec);
  const unsigned grid = grid_for(R, kThreads >> l);
  permute_kernel<T, N><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(hidden), T_rows, hidden_stride,
                                                      sorted_slots, R, top_k, slot_scale, static_cast<T*>(out),
                                                      H, nvec, l);
}

template <typename T, typename TO, int N>
void launch_combine_typed(const void* expert_out, int64_t R, int64_t H, const float* weights,
                          const int32_t* inverse, int64_t T_rows, int K, void* out, cudaStream_t stream) {
  const int64_t nvec = H / N;
  const int l = tpr_log2_for(nvec);
  const unsigned grid = grid_for(T_rows, kThreads >> l);
  combine_kernel<T, TO, N><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(expert_out), R, weights, inverse,
                                                          T_rows, K, static_cast<TO*>(out), H, nvec, l);
}

// Calls f.template operator()<T, N>() for the dtype and a vector of vec_bytes bytes.
template <typename F>
void dispatch_vec(DType dt, int vec_bytes, F&& f) {
  switch (dt) {
    case DType::F32:
      switch (vec_bytes) {
        case 16: f.template operator()<float, 4>(); return;
        case 8: f.template operator()<float, 2>(); return;
        default: f.template operator()<float, 1>(); return;
      }
    case DType::F16:
      switch (vec_bytes) {
        case 16: f.template operator()<__half, 8>(); return;
        case 8: f.template operator()<__half, 4>(); return;
        case 4: f.template operator()<__half, 2>(); return;
        default: f.template operator()<__half, 1>(); return;
      }
    case DType::BF16:
      switch (vec_bytes) {
        case 16: f.template operator()<__nv_bfloat16, 8>(); return;
        case 8: f.template operator()<__nv_bfloat16, 4>(); return;
        case 4: f.template operator()<__nv_bfloat16, 2>(); return;
        default: f.template operator()<__nv_bfloat16, 1>(); return;
      }
  }
  throw std::invalid_argument("moeops::cuda: unknown dtype");
}

}  // namespace

size_t route_plan_workspace_bytes(int64_t n_slots, int E) {
  if (E < 1) throw std::invalid_argument("moeops::cuda::route_plan_workspace_bytes: E must be >= 1");
  return small_plan(n_slots, E) ? 0 : plan_layout(n_slots, E).total;
}

void launch_route_plan(const int32_t* ids, int64_t n_slots, int E, int32_t* offsets, int32_t* sorted_slots,
                       int32_t* inverse, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (E < 1) throw std::invalid_argument("moeops::cuda::launch_route_plan: E must be >= 1");
  if (n_slots < 0 || n_slots >= (int64_t{1} << 31) - 1) {
    throw std::invalid_argument("moeops::cuda::launch_route_plan: n_slots must be in [0, 2^31 - 1)");
  }
  if (n_slots == 0) {  // no slots: every expert is empty
    check_cuda(cudaMemsetAsync(offsets, 0, (static_cast<size_t>(E) + 1) * sizeof(int32_t), stream),
               "cudaMemsetAsync(offsets)");
    return;
  }
  if (small_plan(n_slots, E)) {
    const size_t smem = (static_cast<size_t>(n_slots) + static_cast<size_t>(E) + 1) * sizeof(int);
    plan_small_kernel<<<1, kSmallPlanThreads, smem, stream>>>(ids, static_cast<int>(n_slots),
                                                              static_cast<uint32_t>(E), offsets, sorted_slots,
                                                              inverse);
    check_cuda(cudaGetLastError(), "plan_small_kernel launch");
    return;
  }
  const PlanLayout L = plan_layout(n_slots, E);
  if (workspace == nullptr || workspace_bytes < L.total) {
    throw std::invalid_argument("moeops::cuda::launch_route_plan: workspace too small (" +
                                std::to_string(workspace_bytes) + " bytes, need " + std::to_string(L.total) +
                                ")");
  }
  auto* ws = static_cast<unsigned char*>(workspace);
  cub::DoubleBuffer<uint32_t> keys(reinterpret_cast<uint32_t*>(ws + L.keys_a),
                                   reinterpret_cast<uint32_t*>(ws + L.keys_b));
  cub::DoubleBuffer<int32_t> vals(reinterpret_cast<int32_t*>(ws + L.vals_a),
                                  reinterpret_cast<int32_t*>(ws + L.vals_b));
  const uint32_t uE = static_cast<uint32_t>(E);

  const unsigned grid_n = grid_for(n_slots, kThreads);
  plan_keys_kernel<<<grid_n, kThreads, 0, stream>>>(ids, n_slots, uE, keys.Current(), vals.Current());
  check_cuda(cudaGetLastError(), "plan_keys_kernel launch");

  size_t temp_bytes = L.temp_bytes;
  // Radix sort is stable: equal experts keep slot order. Only the low key_bits(E) bits differ.
  check_cuda(cub::DeviceRadixSort::SortPairs(ws + L.temp, temp_bytes, keys, vals, static_cast<int>(n_slots), 0,
                                             key_bits(E), stream),
             "cub::DeviceRadixSort::SortPairs");

  const unsigned grid_e = grid_for(static_cast<int64_t>(E) + 1, kThreads);
  plan_offsets_kernel<<<grid_e, kThreads, 0, stream>>>(keys.Current(), n_slots, static_cast<int64_t>(E),
                                                       offsets);
  check_cuda(cudaGetLastError(), "plan_offsets_kernel launch");
  plan_finalize_kernel<<<grid_n, kThreads, 0, stream>>>(keys.Current(), vals.Current(), n_slots, uE,
                                                        sorted_slots, inverse);
  check_cuda(cudaGetLastError(), "plan_finalize_kernel launch");
}

void launch_permute(const void* hidden, DType dtype, int64_t T, int64_t H, int64_t hidden_stride,
                    const int32_t* sorted_slots, int64_t R, int top_k, const float* slot_scale, void* out,
                    cudaStream_t stream) {
  // T == 0 with R > 0 still writes R zero rows (every slot is out of range).
  if (R <= 0 || H <= 0) return;
  if (top_k < 1) throw std::invalid_argument("moeops::cuda::launch_permute: top_k must be >= 1");
  const int es = elem_size(dtype);
  const int vb = pick_vec_bytes(es, H, hidden_stride, hidden, out);
  dispatch_vec(dtype, vb, [&]<typename T_, int N>() {
    launch_permute_typed<T_, N>(hidden, T, H, hidden_stride, sorted_slots, R, top_k, slot_scale, out, stream);
  });
}

void launch_combine(const void* expert_out, DType dtype, int64_t R, int64_t H, const float* weights,
                    const int32_t* inverse, int64_t T, int K, void* out, DType out_dtype, cudaStream_t stream) {
  // K == 0 still writes zeros.
  if (T <= 0 || H <= 0) return;
  if (K < 0) throw std::invalid_argument("moeops::cuda::launch_combine: K must be >= 0");
  if (out_dtype == dtype) {
    const int es = elem_size(dtype);
    const int vb = pick_vec_bytes(es, H, H, expert_out, out);
    dispatch_vec(dtype, vb, [&]<typename T_, int N>() {
      launch_combine_typed<T_, T_, N>(expert_out, R, H, weights, inverse, T, K, out, stream);
    });
    return;
  }
  if (dtype != DType::F32 || out_dtype == DType::F32)
    throw std::invalid_argument("moeops::cuda::launch_combine: out_dtype must be the input dtype, or 16-bit for fp32 input");
  // fp32 in, 16-bit out: N elements per access, 4 N bytes read and 2 N written
  int n = 4;
  while (n > 1 && !(H % n == 0 && ptr_aligned(expert_out, 4 * n) && ptr_aligned(out, 2 * n))) n /= 2;
  auto run = [&]<typename TO>() {
    if (n == 4) return launch_combine_typed<float, TO, 4>(expert_out, R, H, weights, inverse, T, K, out, stream);
    if (n == 2) return launch_combine_typed<float, TO, 2>(expert_out, R, H, weights, inverse, T, K, out, stream);
    launch_combine_typed<float, TO, 1>(expert_out, R, H, weights, inverse, T, K, out, stream);
  };
  if (out_dtype == DType::BF16) run.template operator()<__nv_bfloat16>();
  else run.template operator()<__half>();
}

}  // namespace moeops::cuda
