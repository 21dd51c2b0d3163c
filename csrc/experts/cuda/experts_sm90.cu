// Hopper grouped GEMM for expert-grouped rows, on CUTLASS 3 (headers from the nvidia-cutlass
// package; see docs/design.md for why CUTLASS here and hand-written mma.sync elsewhere).
//
// Two kernels per (input dtype, output dtype), CUTLASS's pointer-array grouped GEMM with 2 x 1
// clusters, TMA loads multicast across the cluster, wgmma and a TMA-store epilogue:
//   * wide: the warp-specialized cooperative schedule, two consumer warpgroups on one 128 x 256
//     x 64 CTA tile, for groups of more than 128 rows on average with N > 128;
//   * narrow: the ping-pong schedule, two consumer warpgroups alternating on 64 x 128 x 128
//     tiles, for fewer rows per group (e.g. DeepSeek-V3's 256 experts at 4k tokens: ~128 rows,
//     where 128-row tiles would leave much of a group's last tile empty) or narrow N.
// The split is the one torch._grouped_mm makes on sm_90. Both are persistent: one CTA per SM walks
// the tiles of every group, so a group of zero rows costs one comparison. The problem list (M_e, N,
// K), the per-group base pointers and the strides are written by setup_kernel from the device
// offsets, so nothing here waits for the host and the launch can be captured in a CUDA graph. Row
// offsets live in the per-group base pointers (64-bit), so long prompts do not overflow 32-bit
// element offsets.
//
// Compiled for sm_90a only (CMakeLists.txt); no torch headers.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include "common/cuda_common.cuh"
#include "experts/cuda/experts_sm90.h"

namespace moeops::cuda {
namespace {

using namespace cute;

// The two tile configurations (see the top of the file).
struct WideTiles {
  using TileShape = Shape<_128, _256, _64>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct NarrowTiles {
  using TileShape = Shape<_64, _128, _128>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// Narrow tiles for <= 128 rows per expert on average or N <= 128 (the host knows R and E, not
// the per-expert counts, which stay on the device).
bool use_narrow_tiles(const GroupedGemmParams& p) { return p.R <= 128 * static_cast<int64_t>(p.E) || p.N_w <= 128; }

template <class TIn_, class TOut_, class Tiles>
struct Sm90Gemm {
  using TIn = TIn_;
  using TOut = TOut_;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
  using LayoutA = cutlass::layout::RowMajor;     // rows [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // w[e] is [N, K]: B = w[e]^T, K-major
  using LayoutD = cutlass::layout::RowMajor;     // out [M, N]
  static constexpr int kAlignIn = 16 / sizeof(TIn);
  static constexpr int kAlignOut = 16 / sizeof(TOut);
  using TileShape = typename Tiles::TileShape;
  using ClusterShape = Shape<_2, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignOut,  // no source operand C
      TOut, LayoutD*, kAlignOut, typename Tiles::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<TOut, float, void, float>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TIn, LayoutA*, kAlignIn, TIn, LayoutB*, kAlignIn, float,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Tiles::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Problem = typename ProblemShape::UnderlyingProblemShape;
};

void check(cutlass::Status st, const char* what) {
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("moeops: CUTLASS ") + what + " failed: " + cutlassGetStatusString(st));
}

constexpr size_t kAlign = 256;
size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The device arrays CUTLASS reads, carved from the caller's workspace in this order.
template <class G>
struct Arrays {
  typename G::Problem* problems;
  const void** ptr_a;
  const void** ptr_b;
  void** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  void* cutlass_ws;

  static size_t bytes(int E) {
    const size_t e = static_cast<size_t>(E);
    return round_up(e * sizeof(typename G::Problem)) + 3 * round_up(e * sizeof(void*)) +
           round_up(e * sizeof(typename G::StrideA)) + round_up(e * sizeof(typename G::StrideB)) +
           round_up(e * sizeof(typename G::StrideD));
  }
  Arrays(void* ws, int E) {
    char* p = static_cast<char*>(ws);
    const size_t e = static_cast<size_t>(E);
    auto take = [&](size_t n) { char* q = p; p += round_up(n); return q; };
    problems = reinterpret_cast<typename G::Problem*>(take(e * sizeof(typename G::Problem)));
    ptr_a = reinterpret_cast<const void**>(take(e * sizeof(void*)));
    ptr_b = reinterpret_cast<const void**>(take(e * sizeof(void*)));
    ptr_d = reinterpret_cast<void**>(take(e * sizeof(void*)));
    stride_a = reinterpret_cast<typename G::StrideA*>(take(e * sizeof(typename G::StrideA)));
    stride_b = reinterpret_cast<typename G::StrideB*>(take(e * sizeof(typename G::StrideB)));
    stride_d = reinterpret_cast<typename G::StrideD*>(take(e * sizeof(typename G::StrideD)));
    cutlass_ws = p;
  }
};

// One thread per expert: rows [lo, hi) of expert e (offsets clamped to [0, R] as in
// launch_grouped_gemm) become the group (hi - lo, N, K) with base pointers at row lo.
template <class G>
__global__ void setup_kernel(const int32_t* offsets, int E, int64_t R, int N, int K, int64_t lda,
                             const typename G::TIn* a, const typename G::TIn* w, typename G::TOut* out, Arrays<G> arr) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= E) return;
  const int64_t lo = min(max(static_cast<int64_t>(offsets[e]), int64_t{0}), R);
  const int64_t hi = min(max(static_cast<int64_t>(offsets[e + 1]), lo), R);
  arr.problems[e] = typename G::Problem(static_cast<int>(hi - lo), N, K);
  arr.ptr_a[e] = a + lo * lda;
  arr.ptr_b[e] = w + static_cast<int64_t>(e) * N * K;
  arr.ptr_d[e] = out + lo * N;
  typename G::StrideA sa{};
  get<0>(sa) = lda;
  arr.stride_a[e] = sa;
  typename G::StrideB sb{};
  get<0>(sb) = K;
  arr.stride_b[e] = sb;
  typename G::StrideD sd{};
  get<0>(sd) = N;
  arr.stride_d[e] = sd;
}

// SM count and cluster occupancy per device, queried once (host API calls, not stream work).
template <class G>
cutlass::KernelHardwareInfo hw_info(int device) {
  static std::mutex mu;
  static std::array<cutlass::KernelHardwareInfo, 64> cache{};
  static std::array<bool, 64> have{};
  if (device < 0 || device >= 64) throw std::invalid_argument("moeops: device index out of range");
  std::lock_guard<std::mutex> lock(mu);
  if (!have[device]) {
    check_cuda(cudaGetLastError(), "a CUDA call before the sm90 grouped GEMM");  // not ours to drop
    cache[device] = cutlass::KernelHardwareInfo::make_kernel_hardware_info<typename G::Kernel>(device);
    // CUTLASS's cluster-occupancy query reports a failure only by returning 0 clusters and leaves
    // the CUDA error pending, where the next launch check would blame it on the setup kernel.
    (void)cudaGetLastError();
    have[device] = true;
  }
  return cache[device];
}

template <class G>
typename G::Gemm::Arguments make_args(const Arrays<G>& arr, int E, int device) {
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {E, arr.problems, nullptr},  // problem sizes on the device only
      {reinterpret_cast<const typename G::Mainloop::ElementA**>(arr.ptr_a), arr.stride_a,
       reinterpret_cast<const typename G::Mainloop::ElementB**>(arr.ptr_b), arr.stride_b},
      {{}, nullptr, nullptr, reinterpret_cast<typename G::Epilogue::ElementD**>(arr.ptr_d), arr.stride_d},
      hw_info<G>(device)};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

template <class G>
size_t workspace_bytes_for(int E, int device) {
  Arrays<G> arr(nullptr, E);  // null-based layout: only the sizes matter here
  return Arrays<G>::bytes(E) + G::Gemm::get_workspace_size(make_args<G>(arr, E, device));
}

template <class G>
void run(const GroupedGemmParams& p, int device, void* workspace, cudaStream_t stream) {
  using TIn = typename G::TIn;
  using TOut = typename G::TOut;
  const Arrays<G> arr(workspace, p.E);
  setup_kernel<G><<<(p.E + 127) / 128, 128, 0, stream>>>(
      p.offsets, p.E, p.R, static_cast<int>(p.N_w), static_cast<int>(p.K), p.lda, static_cast<const TIn*>(p.a),
      static_cast<const TIn*>(p.w), static_cast<TOut*>(p.out), arr);
  check_cuda(cudaGetLastError(), "sm90 grouped GEMM setup launch");
  typename G::Gemm gemm;
  const auto args = make_args<G>(arr, p.E, device);
  check(gemm.can_implement(args), "grouped GEMM can_implement");
  check(gemm.initialize(args, arr.cutlass_ws, stream), "grouped GEMM initialize");
  check(gemm.run(stream), "grouped GEMM run");
  check_cuda(cudaGetLastError(), "sm90 grouped GEMM launch");
}

// Calls f.template operator()<G>() with the kernel for p's dtypes and tile configuration.
template <class F>
void dispatch(const GroupedGemmParams& p, F&& f) {
  const bool narrow = use_narrow_tiles(p);
  auto pick = [&]<class TIn, class TOut>() {
    if (narrow) return f.template operator()<Sm90Gemm<TIn, TOut, NarrowTiles>>();
    return f.template operator()<Sm90Gemm<TIn, TOut, WideTiles>>();
  };
  const DType in = p.a_dtype, out = p.out_dtype;
  if (in == DType::BF16 && out == DType::BF16) return pick.template operator()<cutlass::bfloat16_t, cutlass::bfloat16_t>();
  if (in == DType::BF16 && out == DType::F32) return pick.template operator()<cutlass::bfloat16_t, float>();
  if (in == DType::F16 && out == DType::F16) return pick.template operator()<cutlass::half_t, cutlass::half_t>();
  if (in == DType::F16 && out == DType::F32) return pick.template operator()<cutlass::half_t, float>();
  throw std::invalid_argument("moeops: sm90 grouped GEMM: unsupported dtype combination");
}

}  // namespace

bool sm90_grouped_gemm_built() { return true; }

bool sm90_grouped_gemm_supported(const GroupedGemmParams& p, int device_major) {
  const bool in16 = p.a_dtype == DType::BF16 || p.a_dtype == DType::F16;
  return device_major == 9 && in16 && p.w_dtype == p.a_dtype && (p.out_dtype == p.a_dtype || p.out_dtype == DType::F32) &&
         !p.w_transposed && p.epilogue == Epilogue::Store && p.bias == nullptr && p.a_slots == nullptr &&
         p.E >= 1 && p.K > 0 && p.N_w > 0 && p.K % 8 == 0 && p.N_w % 8 == 0 && p.N_out == p.N_w &&
         p.lda % 8 == 0 && p.lda >= p.K && p.K <= INT_MAX && p.N_w <= INT_MAX && p.R <= INT_MAX &&
         aligned16(p.a) && aligned16(p.w) && aligned16(p.out);
}

size_t sm90_grouped_gemm_workspace_bytes(const GroupedGemmParams& p, int device) {
  size_t bytes = 0;
  dispatch(p, [&]<class G>() { bytes = workspace_bytes_for<G>(p.E, device); });
  return bytes;
}

void launch_sm90_grouped_gemm(const GroupedGemmParams& p, int device, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device query");
  if (!sm90_grouped_gemm_supported(p, major))
    throw std::invalid_argument("moeops: sm90 grouped GEMM does not take this problem");
  if (p.R <= 0) return;
  if (workspace == nullptr || workspace_bytes < sm90_grouped_gemm_workspace_bytes(p, device))
    throw std::invalid_argument("moeops: sm90 grouped GEMM workspace too small");
  dispatch(p, [&]<class G>() { run<G>(p, device, workspace, stream); });
}

}  // namespace moeops::cuda
