// THE registration file: every moeops op schema, its CPU and CUDA kernels, and the tensor-free
// pybind11 module `moeops._C` that reports build facts. Fakes and autograd: python/moeops/ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "build_info.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "ops.h"

TORCH_LIBRARY(moeops, m) {
  // logits [T,E] -> weights [T,k] f32, ids [T,k] i32 (-1 empty), probs [T,E] or [0], counts [E] or [0]
  m.def(
      "topk_gating(Tensor logits, int k, str scoring=\"softmax\", bool renormalize=False, "
      "float routed_scaling_factor=1.0, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "Tensor? mask=None, str mask_mode=\"reroute\", Tensor? forced=None, bool return_probs=False, "
      "bool return_counts=False) -> (Tensor weights, Tensor ids, Tensor probs, Tensor counts)");
  // ids [T,K] i32 -> offsets [E+1] i32, sorted_slots [T*K] i32, inverse [T*K] i32
  m.def("route_plan(Tensor ids, int num_experts) -> (Tensor offsets, Tensor sorted_slots, Tensor inverse)");
  // hidden [T,H], sorted_slots [R] -> rows [R,H]
  m.def("permute(Tensor hidden, Tensor sorted_slots, int top_k, Tensor? slot_scale=None) -> Tensor");
  // expert_out [R,H], weights [T,K] f32, inverse [T*K] -> out [T,H]
  m.def("combine(Tensor expert_out, Tensor weights, Tensor inverse) -> Tensor");
  // x [R,K], w [E,N,K] (or [E,K,N] if w_transposed), offsets [E+1] i32 -> [R,N]
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor offsets, bool w_transposed=False) -> Tensor");
  // hidden [T,H], ids [T,K] i32, weights [T,K] f32, w_up [E,N_up,H], w_down [E,H,I] -> [T,H]
  // (+ shared_gate[t] * shared_out[t] in the combine)
  m.def(
      "fused_experts(Tensor hidden, Tensor ids, Tensor weights, Tensor w_up, Tensor w_down, "
      "Tensor? b_up=None, Tensor? b_down=None, str activation=\"silu\", bool gated=True, "
      "Tensor? gain=None, Tensor? shared_out=None, Tensor? shared_gate=None) -> Tensor");
  // fused_experts over per-expert weight lists (transformers 4.x): w_gate[e], w_up[e] [I,H], w_down[e] [H,I]
  m.def(
      "fused_experts_list(Tensor hidden, Tensor ids, Tensor weights, Tensor[] w_gate, Tensor[] w_up, "
      "Tensor[] w_down, str activation=\"silu\", Tensor? shared_out=None, Tensor? shared_gate=None) -> Tensor");
  // fused_experts plus output statistics computed by the kernel after the down projection:
  // slot_norms [T,K] f32 (L2 norm of each slot's unweighted expert output), per expert max |y|
  // [E] f32 and its channel [E] i64 (-1: no rows), max |down input| [E] f32, non-zero down inputs [E] i64
  m.def(
      "fused_experts_stats(Tensor hidden, Tensor ids, Tensor weights, Tensor w_up, Tensor w_down, "
      "Tensor? b_up=None, Tensor? b_down=None, str activation=\"silu\", bool gated=True, "
      "Tensor? gain=None, Tensor? shared_out=None, Tensor? shared_gate=None) -> (Tensor out, "
      "Tensor slot_norms, Tensor out_absmax, Tensor out_absmax_channel, Tensor in_absmax, Tensor active_units)");
  // MoE-X: w_enc [M,D,d], b_enc [M,D] -> mu [M,d], var [M,d] (population, over D), bias_mean [M]
  m.def("moex_router_stats(Tensor w_enc, Tensor? b_enc=None) -> (Tensor mu, Tensor var, Tensor bias_mean)");
  // x [T,d] -> weights [T,k] f32 (softmax over the selected scores), ids [T,k] i32, density [T,M] or [0]
  m.def(
      "moex_route(Tensor x, Tensor mu, Tensor var, Tensor bias_mean, int k, str select=\"sparsest\", "
      "Tensor? mask=None, str mask_mode=\"reroute\", Tensor? forced=None, bool return_density=False) "
      "-> (Tensor weights, Tensor ids, Tensor density)");
  // ReLU experts, decoder unit-major: w_enc, w_dec [M,D,d] -> out [T,d], active [T,K] i32 or [0]
  m.def(
      "moex_experts(Tensor hidden, Tensor ids, Tensor weights, Tensor w_enc, Tensor? b_enc, Tensor w_dec, "
      "Tensor? b_dec=None, str down=\"auto\", bool return_active=False) -> (Tensor out, Tensor active)");
  // wide code z [T, M*D] as CSR: indptr [T+1] i64, indices [nnz] i64 (j*D+i), values [nnz] f32, l0 [T] i32
  m.def(
      "moex_code(Tensor hidden, Tensor ids, Tensor weights, Tensor w_enc, Tensor? b_enc=None) "
      "-> (Tensor indptr, Tensor indices, Tensor values, Tensor l0)");
  // internal (benchmarks): MoE-X down-projection alone, h [R,D] f32 grouped by offsets [M+1] -> y [R,d]
  m.def("_moex_down(Tensor h, Tensor offsets, Tensor w_dec, str down=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(moeops, CPU, m) {
  m.impl("topk_gating", &moeops::topk_gating_cpu);
  m.impl("route_plan", &moeops::route_plan_cpu);
  m.impl("permute", &moeops::permute_cpu);
  m.impl("combine", &moeops::combine_cpu);
  m.impl("grouped_gemm", &moeops::grouped_gemm_cpu);
  m.impl("fused_experts", &moeops::fused_experts_cpu);
  m.impl("fused_experts_list", &moeops::fused_experts_list_cpu);
  m.impl("fused_experts_stats", &moeops::fused_experts_stats_cpu);
  m.impl("moex_router_stats", &moeops::moex_router_stats_cpu);
  m.impl("moex_route", &moeops::moex_route_cpu);
  m.impl("moex_experts", &moeops::moex_experts_cpu);
  m.impl("moex_code", &moeops::moex_code_cpu);
  m.impl("_moex_down", &moeops::moex_down_cpu);
}

#ifdef MOEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(moeops, CUDA, m) {
  m.impl("topk_gating", &moeops::topk_gating_cuda);
  m.impl("route_plan", &moeops::route_plan_cuda);
  m.impl("permute", &moeops::permute_cuda);
  m.impl("combine", &moeops::combine_cuda);
  m.impl("grouped_gemm", &moeops::grouped_gemm_cuda);
  m.impl("fused_experts", &moeops::fused_experts_cuda);
  m.impl("fused_experts_stats", &moeops::fused_experts_stats_cuda);
  m.impl("moex_router_stats", &moeops::moex_router_stats_cuda);
  m.impl("moex_route", &moeops::moex_route_cuda);
  m.impl("moex_experts", &moeops::moex_experts_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "moeops compiled extension: registers torch.ops.moeops.* and reports build facts";
#ifdef MOEOPS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = MOEOPS_BUILD_CUDA_ARCHS;
#ifdef MOEOPS_WITH_SM90
  m.attr("sm90_grouped_gemm") = true;
#else
  m.attr("sm90_grouped_gemm") = false;
#endif
  m.attr("sm90_skip_reason") = MOEOPS_BUILD_SM90_REASON;
#ifdef MOEOPS_WITH_CUDA
  m.def("set_cuda_gemm_path", &moeops::set_cuda_gemm_path, pybind11::arg("name"),
        "Kernel for 16-bit grouped GEMMs on Hopper: 'auto', 'sm90' (CUTLASS) or 'mma'. Returns it.");
  m.def("cuda_gemm_path", &moeops::cuda_gemm_path, "The CUDA grouped GEMM path in use");
  m.def("cuda_workspace_limit", &moeops::cuda_workspace_limit,
        "Bytes of device scratch one CUDA fused-experts call may allocate before it runs in token chunks");
  m.def("set_cuda_workspace_limit", &moeops::set_cuda_workspace_limit, pybind11::arg("bytes"),
        "Set the CUDA fused-experts scratch bound (bytes); returns the previous one.");
#endif
  m.attr("cuda_compiler_version") = MOEOPS_BUILD_NVCC_VERSION;
  m.attr("cuda_skip_reason") = MOEOPS_BUILD_CUDA_REASON;
  m.attr("built_with_torch") = MOEOPS_BUILD_TORCH_VERSION;
  m.attr("cxx_compiler") = __VERSION__;
  m.def("cpu_supports_avx2", &moeops::cpu::cpu_supports_avx2, "CPU has AVX2 + FMA + F16C");
  m.def("cpu_supports_avx512bf16", &moeops::cpu::cpu_supports_avx512bf16,
        "CPU has the AVX2 tier plus AVX512 F/BW/VL and AVX512_BF16");
  m.def("cpu_isa", [] { return std::string(moeops::cpu::isa_name(moeops::cpu::active_isa())); },
        "CPU code path the kernels use now: 'avx512bf16', 'avx2' or 'portable'");
  m.def("set_cpu_isa", &moeops::cpu::set_isa, pybind11::arg("name"),
        "Choose the CPU code path: 'auto', 'avx512bf16', 'avx2' or 'portable'. Returns the active one.");
  m.def("cpu_workspace_limit", &moeops::cpu::workspace_limit_bytes,
        "Bytes of fp32 scratch one CPU fused-experts call may allocate before it runs in token chunks");
  m.def(
      "set_cpu_workspace_limit",
      [](int64_t bytes) {
        if (bytes < 1) throw pybind11::value_error("moeops: set_cpu_workspace_limit: bytes must be >= 1");
        return moeops::cpu::set_workspace_limit_bytes(bytes);
      },
      pybind11::arg("bytes"), "Set the CPU fused-experts scratch bound (bytes); returns the previous one.");
}
