// CUDA entry points of grouped_gemm and fused_experts: checks (experts_prepare.h), allocation,
// then the launchers (experts_kernels.cu, and route_plan / permute / combine for the fused
// layer). No host synchronisation anywhere: every data-dependent size stays on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "experts/cuda/experts_launch.h"
#ifdef MOEOPS_WITH_SM90
#include "experts/cuda/experts_sm90.h"
#endif
#include "experts/experts_prepare.h"
#include "ops.h"

namespace moeops {

static_assert(static_cast<int>(Act::Silu) == 0 && static_cast<int>(Act::Gelu) == 1 &&
                  static_cast<int>(Act::GeluTanh) == 2 && static_cast<int>(Act::Relu) == 3 &&
                  static_cast<int>(Act::Relu2) == 4,
              "experts_kernels.cu's activate() numbers the activations like Act");

namespace {

void check_cuda_tensor(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "moeops: ", name, " must be a CUDA tensor for the CUDA kernel, got one on ",
                    t.device());
}

int device_major(const Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  return major;
}

// Which GEMM kernel takes a 16-bit grouped GEMM on a Hopper GPU (see set_cuda_gemm_path).
enum class GemmPath : int { Auto = 0, Sm90 = 1, Mma = 2 };

GemmPath parse_gemm_path(const std::string& name) {
  if (name == "auto") return GemmPath::Auto;
  if (name == "sm90") return GemmPath::Sm90;
  if (name == "mma") return GemmPath::Mma;
  throw std::invalid_argument("moeops: CUDA GEMM path must be 'auto', 'sm90' or 'mma', got '" + name + "'");
}

std::atomic<int>& gemm_path() {
  static std::atomic<int> path{[] {
    const char* env = std::getenv("MOEOPS_CUDA_GEMM");
    return static_cast<int>(env && *env ? parse_gemm_path(env) : GemmPath::Auto);
  }()};
  return path;
}

// Rows per expert on average from which `auto` takes the CUTLASS sm_90a kernel over the
// mma.sync one. Both use 64-row tiles below 128 rows per expert (experts_sm90.cu), so padding
// is the same and CUTLASS's deeper TMA pipeline should win wherever the GEMM streams weights;
// below 16 the decode kernel runs anyway. A reasoned first value, to be checked on an H200 with
// `moeops bench --suite gemm --device cuda` (it prints sm90 and mma side by side).
constexpr int64_t kSm90MinAvgRows = 16;

// True when the grouped GEMM `p` (Store epilogue, no bias) should run on the sm_90a kernel.
bool want_sm90(const cuda::GroupedGemmParams& p, int64_t max_rows_per_expert, int major) {
#ifdef MOEOPS_WITH_SM90
  const auto path = static_cast<GemmPath>(gemm_path().load(std::memory_order_relaxed));
  if (path == GemmPath::Mma || !cuda::sm90_grouped_gemm_supported(p, major)) return false;
  return path == GemmPath::Sm90 || (max_rows_per_expert > 16 && p.R >= kSm90MinAvgRows * p.E);
#else
  (void)p, (void)max_rows_per_expert, (void)major;
  return false;
#endif
}

// Runs one grouped GEMM: a [R, K] (row stride a.stride(0)) x w -> out [R, N_out]. The kernels
// are instantiated for a and w of one dtype (out: that dtype or fp32) and for fp32 a with 16-bit
// w (out fp32); 16-bit activations with weights of another dtype are widened to fp32 here.
// With `a_slots` (decode only; see GroupedGemmParams::a_slots) GEMM row r reads row
// a_slots[r] / slot_div of a, and the GEMM has a_slots.size(0) rows.
void run_grouped_gemm(cuda::GroupedGemmParams p, const Tensor& a_in, const Tensor& w, const Tensor& offsets,
                      const Tensor& out, int64_t max_rows_per_expert, const Tensor& a_slots = Tensor(),
                      int64_t slot_div = 1) {
  const Tensor a = a_in.scalar_type() != w.scalar_type() && a_in.scalar_type() != at::kFloat
                       ? a_in.to(at::kFloat)
                       : a_in;
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == a.scalar_type(),
              "moeops: internal: grouped GEMM output must be fp32 or the activations' dtype");
  p.a = a.data_ptr();
  p.a_dtype = to_dtype(a, "x");
  p.lda = a.stride(0);
  p.w = w.data_ptr();
  p.w_dtype = to_dtype(w, "w");
  p.offsets = offsets.data_ptr<int32_t>();
  p.E = static_cast<int>(w.size(0));
  p.R = a.size(0);
  if (a_slots.defined()) {
    p.a_slots = a_slots.data_ptr<int32_t>();
    p.a_slot_div = slot_div;
    p.R = a_slots.size(0);
  }
  p.out = out.data_ptr();
  p.out_dtype = to_dtype(out, "out");
  const int major = device_major(a);
#ifdef MOEOPS_WITH_SM90
  if (want_sm90(p, max_rows_per_expert, major)) {
    const int dev = a.get_device();
    const size_t bytes = cuda::sm90_grouped_gemm_workspace_bytes(p, dev);
    Tensor ws = at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
    cuda::launch_sm90_grouped_gemm(p, dev, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream().stream());
    return;
  }
#endif
  const size_t bytes = cuda::grouped_gemm_workspace_bytes(p.E);
  Tensor ws = at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
  cuda::launch_grouped_gemm(p, max_rows_per_expert, major, ws.data_ptr(), bytes,
                            c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

Tensor grouped_gemm_cuda(const Tensor& x_in, const Tensor& w_in, const Tensor& offsets_in, bool w_transposed) {
  check_grouped_gemm_args(x_in, w_in, offsets_in, w_transposed);
  check_cuda_tensor(x_in, "x");
  TORCH_CHECK_VALUE(w_in.size(0) < (int64_t{1} << 31) - 1, "moeops: grouped_gemm: too many experts ",
                    w_in.size(0));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const Tensor w = w_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  const int64_t N = w_transposed ? w.size(2) : w.size(1);
  // rows no expert owns are zero (as on the CPU); mixed dtypes accumulate into fp32 first
  const bool mixed = x.scalar_type() != w.scalar_type();
  Tensor out = at::zeros({R, N}, mixed ? x.options().dtype(at::kFloat) : x.options());
  if (R > 0 && N > 0 && w.size(0) > 0) {
    cuda::GroupedGemmParams p;
    p.w_transposed = w_transposed;
    p.K = K;
    p.N_w = N;
    p.N_out = N;
    run_grouped_gemm(p, x, w, offsets, out, R);
  }
  return mixed ? out.to(x.scalar_type()) : out;
}

namespace {

// The outputs of fused_experts_stats besides `out`, initialised by the caller (0, channel -1).
struct StatsOut {
  Tensor norms, out_max, channel, in_max, active;
};

// Bound on the device scratch of one fused_experts call (see set_cuda_workspace_limit).
std::atomic<int64_t>& cuda_workspace_limit_ref() {
  static std::atomic<int64_t> limit = [] {
    const char* env = std::getenv("MOEOPS_CUDA_WORKSPACE_MB");
    const long long mb = env ? std::atoll(env) : 0;
    return static_cast<int64_t>(mb > 0 ? mb : 4096) << 20;
  }();
  return limit;
}

// Device scratch bytes per token of the fused layer: gathered rows (hidden dtype), gate|up (the
// sm90 path), the activation (fp32 at most), per-slot fp32 outputs, and the token's fp32 sum.
int64_t cuda_layer_bytes_per_token(const ExpertsDims& d, int64_t hidden_bytes) {
  return d.K * (d.H * hidden_bytes + d.n_up * hidden_bytes + d.I * 4 + d.H * 4) + d.H * 4;
}

Tensor fused_experts_cuda_impl(const Tensor& hidden, const Tensor& ids_in, const Tensor& weights_in,
                               const Tensor& w_up_in, const Tensor& w_down_in, const std::optional<Tensor>& b_up,
                               const std::optional<Tensor>& b_down, const ExpertsDims& d, bool gated,
                               const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                               const std::optional<Tensor>& shared_gate, const StatsOut* st);

// fused_experts without statistics: one fused_experts_cuda_impl pass, or token chunks of one
// when the call's scratch would pass the workspace limit (each token's result is computed the
// same way in a chunk, up to which GEMM kernel the chunk's size selects).
Tensor fused_experts_cuda_chunked(const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up,
                                  const Tensor& w_down, const std::optional<Tensor>& b_up,
                                  const std::optional<Tensor>& b_down, const ExpertsDims& d, bool gated,
                                  const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                                  const std::optional<Tensor>& shared_gate) {
  const int64_t per_token = std::max<int64_t>(1, cuda_layer_bytes_per_token(d, hidden.element_size()));
  const int64_t tc = std::clamp<int64_t>(cuda_workspace_limit_ref().load() / per_token, 1, std::max<int64_t>(d.T, 1));
  if (tc >= d.T)
    return fused_experts_cuda_impl(hidden, ids, weights, w_up, w_down, b_up, b_down, d, gated, gain, shared_out,
                                   shared_gate, nullptr);
  check_cuda_tensor(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  Tensor out = at::empty({d.T, d.H}, hidden.options());
  auto rows = [](const std::optional<Tensor>& t, int64_t t0, int64_t n) {  // [T] gates become [T, 1]
    return t.has_value() ? std::optional<Tensor>(t->reshape({t->size(0), -1}).narrow(0, t0, n)) : std::nullopt;
  };
  for (int64_t t0 = 0; t0 < d.T; t0 += tc) {
    const int64_t n = std::min(tc, d.T - t0);
    ExpertsDims dc = d;
    dc.T = n;
    out.narrow(0, t0, n).copy_(fused_experts_cuda_impl(
        hidden.narrow(0, t0, n), ids.narrow(0, t0, n), weights.narrow(0, t0, n), w_up, w_down, b_up, b_down, dc,
        gated, gain, rows(shared_out, t0, n), rows(shared_gate, t0, n), nullptr));
  }
  return out;
}

// fused_experts on CUDA; with `st`, also its statistics, computed from the per-row outputs and
// the down projection's inputs right after the down projection.
Tensor fused_experts_cuda_impl(const Tensor& hidden, const Tensor& ids_in, const Tensor& weights_in,
                               const Tensor& w_up_in, const Tensor& w_down_in, const std::optional<Tensor>& b_up,
                               const std::optional<Tensor>& b_down, const ExpertsDims& d, bool gated,
                               const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                               const std::optional<Tensor>& shared_gate, const StatsOut* st) {
  check_cuda_tensor(hidden, "hidden");
  TORCH_CHECK_VALUE(!shared_gate.has_value() || shared_out.has_value(), "moeops: shared_gate given without shared_out");
  if (shared_out.has_value()) check_shared_args(*shared_out, shared_gate, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = d.T, H = d.H, K = d.K, E = d.E, I = d.I;
  auto f32 = hidden.options().dtype(at::kFloat);

  Tensor out32;  // the routed experts' fp32 sum; zeros when no slot can be routed
  if (T > 0 && H > 0 && K > 0 && E > 0) {  // E == 0: every slot is empty (as on the CPU)
    // 1. slots of gain-0 experts (and ids outside [0, E)) become empty; weights carry the gain
    Tensor ids = ids_in.contiguous();
    Tensor weights = weights_in.contiguous();
    if (gain.has_value()) {
      const Tensor g = gain->to(at::kFloat).contiguous();
      const Tensor valid = ids.ge(0).logical_and(ids.lt(E));
      const Tensor ge = g.index_select(0, ids.clamp(0, E - 1).reshape({-1}).to(at::kLong)).reshape(ids.sizes());
      ids = at::where(valid.logical_and(ge.ne(0)), ids, at::full({}, -1, ids.options())).to(at::kInt).contiguous();
      weights = (weights * ge).contiguous();
    }
    // 2. plan and gather (hidden dtype; empty slots sort last and are never computed). Decode:
    //    the up projection reads each slot's token row of hidden itself (no permute pass), when
    //    hidden is aligned like permute's fresh rows, so the kernel and its results are the same.
    auto [offsets, sorted_slots, inverse] = route_plan_cuda(ids, E);
    const int64_t R = sorted_slots.size(0);
    const Tensor w_up = w_up_in.contiguous(), w_down = w_down_in.contiguous();
    const Tensor bu = b_up.has_value() ? b_up->to(at::kFloat).contiguous() : Tensor();
    const Tensor bd = b_down.has_value() ? b_down->to(at::kFloat).contiguous() : Tensor();

    // 3. up projection with the activation (and the gate * up product) in the epilogue
    cuda::GroupedGemmParams up;
    up.K = H;
    up.N_w = d.n_up;
    up.N_out = I;
    up.epilogue = gated ? cuda::Epilogue::GatedAct : cuda::Epilogue::Act;
    up.activation = static_cast<int>(d.act);
    up.gated_half = gated ? I : 0;
    up.bias = bu.defined() ? bu.data_ptr<float>() : nullptr;
    up.E = static_cast<int>(E);
    const int64_t hes = hidden.element_size();
    const bool gather = cuda::grouped_gemm_uses_decode(up, T) &&
                        gemm_path().load(std::memory_order_relaxed) != static_cast<int>(GemmPath::Sm90) &&
                        hidden.stride(1) == 1 && hidden.stride(0) % (16 / hes) == 0 &&
                        reinterpret_cast<uintptr_t>(hidden.data_ptr()) % 16 == 0;
    const Tensor rows = gather ? hidden : permute_cuda(hidden, sorted_slots, K, std::nullopt);
    // tensor cores take 16-bit operands: the activation is then stored in the hidden dtype (as
    // Hugging Face's experts do); otherwise it stays fp32 (as on the CPU)
    cuda::GroupedGemmParams probe = up;
    probe.a = rows.data_ptr();
    probe.a_dtype = to_dtype(rows, "hidden");
    probe.lda = rows.stride(0);
    probe.w = w_up.data_ptr();
    probe.w_dtype = to_dtype(w_up, "w_up");
    const bool tc = cuda::grouped_gemm_uses_tensor_cores(probe, device_major(hidden)) &&
                    w_down.scalar_type() == hidden.scalar_type();
    Tensor act = at::empty({R, I}, tc ? hidden.options() : f32);
    // prefill on Hopper: the sm_90a GEMM stores gate|up in the hidden dtype, then the activation
    // runs as its own pass (CUTLASS's epilogue does not pair the gate and up columns)
    cuda::GroupedGemmParams up_store = probe;
    up_store.epilogue = cuda::Epilogue::Store;
    up_store.N_out = d.n_up;
    up_store.gated_half = 0;
    up_store.R = R;
    up_store.E = static_cast<int>(E);
    up_store.out_dtype = probe.a_dtype;
    up_store.out = act.data_ptr();  // 16-byte aligned like any fresh allocation
    // (!gather: the path setting may change between its two reads; CUTLASS has no a_slots)
    if (tc && !bu.defined() && !gather && want_sm90(up_store, T, device_major(hidden))) {
      const Tensor gu = at::empty({R, d.n_up}, hidden.options());
      run_grouped_gemm(up_store, rows, w_up, offsets, gu, T);
      int sms = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, hidden.get_device()));
      cuda::launch_expert_activation(gu.data_ptr(), probe.a_dtype, R, I, gated, static_cast<int>(d.act),
                                     offsets.data_ptr<int32_t>(), static_cast<int>(E), act.data_ptr(), sms,
                                     c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (gather) {
      run_grouped_gemm(up, hidden, w_up, offsets, act, T, sorted_slots, K);
    } else {
      run_grouped_gemm(up, rows, w_up, offsets, act, T);
    }

    // 4. down projection (+ bias) into fp32 per-slot rows
    cuda::GroupedGemmParams down;
    down.K = I;
    down.N_w = H;
    down.N_out = H;
    down.bias = bd.defined() ? bd.data_ptr<float>() : nullptr;
    Tensor y = at::empty({R, H}, f32);
    run_grouped_gemm(down, act, w_down, offsets, y, T);

    // 4b. statistics (fused_experts_stats only)
    if (st) {
      Tensor row_f = at::empty({2, R}, f32), row_i = at::empty({2, R}, f32.dtype(at::kLong));
      cuda::ExpertStatsParams sp;
      sp.y = y.data_ptr<float>();
      sp.H = H;
      sp.act = act.data_ptr();
      sp.act_dtype = to_dtype(act, "act");
      sp.I = I;
      sp.offsets = offsets.data_ptr<int32_t>();
      sp.sorted_slots = sorted_slots.data_ptr<int32_t>();
      sp.E = static_cast<int>(E);
      sp.R = R;
      sp.slot_norms = st->norms.data_ptr<float>();
      sp.row_max = row_f.data_ptr<float>();
      sp.row_in_max = row_f.data_ptr<float>() + R;
      sp.row_ch = row_i.data_ptr<int64_t>();
      sp.row_nnz = row_i.data_ptr<int64_t>() + R;
      sp.out_absmax = st->out_max.data_ptr<float>();
      sp.out_channel = st->channel.data_ptr<int64_t>();
      sp.in_absmax = st->in_max.data_ptr<float>();
      sp.active = st->active.data_ptr<int64_t>();
      int sms = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, hidden.get_device()));
      cuda::launch_expert_stats(sp, sms, c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 5. deterministic weighted combine in fp32, slot order, rounded once to the hidden dtype
    //    (in the combine kernel itself unless a shared expert's term is still to be added)
    if (!shared_out.has_value()) return combine_cuda_to(y, weights, inverse, hidden.scalar_type());
    out32 = combine_cuda(y, weights, inverse);
  } else {
    out32 = at::zeros({T, H}, f32);
  }
  if (shared_out.has_value()) {
    const Tensor sg = shared_gate.has_value() ? shared_gate->to(at::kFloat).reshape({T, 1})
                                              : at::ones({T, 1}, f32);
    out32 = out32 + sg * shared_out->to(at::kFloat);
  }
  return out32.to(hidden.scalar_type());
}

}  // namespace

Tensor fused_experts_cuda(const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up,
                          const Tensor& w_down, const std::optional<Tensor>& b_up,
                          const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
                          const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
                          const std::optional<Tensor>& shared_gate) {
  const ExpertsDims d =
      check_fused_experts_args(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain);
  return fused_experts_cuda_chunked(hidden, ids, weights, w_up, w_down, b_up, b_down, d, gated, gain, shared_out,
                                    shared_gate);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_experts_stats_cuda(
    const Tensor& hidden, const Tensor& ids, const Tensor& weights, const Tensor& w_up, const Tensor& w_down,
    const std::optional<Tensor>& b_up, const std::optional<Tensor>& b_down, std::string_view activation, bool gated,
    const std::optional<Tensor>& gain, const std::optional<Tensor>& shared_out,
    const std::optional<Tensor>& shared_gate) {
  const ExpertsDims d =
      check_fused_experts_args(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain);
  check_cuda_tensor(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto f32 = hidden.options().dtype(at::kFloat);
  auto i64 = hidden.options().dtype(at::kLong);
  const StatsOut st{at::zeros({d.T, d.K}, f32), at::zeros({d.E}, f32), at::full({d.E}, -1, i64),
                    at::zeros({d.E}, f32), at::zeros({d.E}, i64)};
  Tensor out = fused_experts_cuda_impl(hidden, ids, weights, w_up, w_down, b_up, b_down, d, gated, gain, shared_out,
                                       shared_gate, &st);
  return {out, st.norms, st.out_max, st.channel, st.in_max, st.active};
}

int64_t cuda_workspace_limit() { return cuda_workspace_limit_ref().load(); }

int64_t set_cuda_workspace_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 1, "moeops: set_cuda_workspace_limit: bytes must be >= 1, got ", bytes);
  return cuda_workspace_limit_ref().exchange(bytes);
}

std::string set_cuda_gemm_path(const std::string& name) {
  gemm_path().store(static_cast<int>(parse_gemm_path(name)));
  return name;
}

std::string cuda_gemm_path() {
  switch (static_cast<GemmPath>(gemm_path().load())) {
    case GemmPath::Sm90: return "sm90";
    case GemmPath::Mma: return "mma";
    default: return "auto";
  }
}

}  // namespace moeops
