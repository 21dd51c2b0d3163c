// CPU grouped GEMM and fused experts. Semantics: python/moeops/reference.py.
//
// Work is cut into items (expert, row block, column block) run with at::parallel_for, so a
// decode step (a few rows per expert) splits each selected expert's weight columns across the
// cores and reads every weight row once, while a prefill step keeps an item's weight panel hot
// in cache across all of that expert's rows (gemm_blocks.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_combine.h"
#include "common/cpu_memory.h"
#include "experts/cpu/epilogue.h"
#include "experts/cpu/gemm_blocks.h"
#include "experts/experts_prepare.h"
#include "ops.h"

namespace moeops {
namespace {

struct Item {
  int32_t e;
  int64_t m0, m1, n0, n1;
};

constexpr int64_t kRowBlock = 48;  // rows of A per item: 48 x 2048 fp32 = 384 KiB stays in L2
// bf16 rows (gemm_dot_bf16): 96 x 2048 bf16 = 384 KiB per K pass of kBf16KChunk
constexpr int64_t kRowBlockBf16 = 96;

// Items covering rows offsets[e]..offsets[e+1] x columns [0, N) for every expert with rows.
std::vector<Item> make_items(const int32_t* off, int64_t E, int64_t N, int64_t col_block,
                             int64_t row_block = kRowBlock) {
  std::vector<Item> items;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m0 = off[e]; m0 < off[e + 1]; m0 += row_block)
      for (int64_t n0 = 0; n0 < N; n0 += col_block)
        items.push_back({static_cast<int32_t>(e), m0, std::min<int64_t>(m0 + row_block, off[e + 1]), n0,
                         std::min(n0 + col_block, N)});
  return items;
}

// Column block: enough items for every thread, weight panels of at most 64 rows.
int64_t column_block(int64_t total_rows_of_work, int64_t N, int64_t align) {
  const int64_t threads = at::get_num_threads();
  int64_t nb = 64;
  while (nb > align && total_rows_of_work * ((N + nb - 1) / nb) < 4 * threads) nb /= 2;
  return std::max<int64_t>(align, nb / align * align);
}


Tensor to_f32_contig(const Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous(); }

}  // namespace

Tensor grouped_gemm_cpu(const Tensor& x_in, const Tensor& w_in, const Tensor& offsets_in, bool w_transposed) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "moeops: grouped_gemm_cpu got x on ", x_in.device());
  check_grouped_gemm_args(x_in, w_in, offsets_in, w_transposed);
  const Tensor offsets = offsets_in.contiguous();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t R = x_in.size(0), E = w_in.size(0);
  const int64_t K = w_transposed ? w_in.size(1) : w_in.size(2);
  const int64_t N = w_transposed ? w_in.size(2) : w_in.size(1);
  TORCH_CHECK_VALUE(off[0] >= 0, "moeops: offsets[0] must be >= 0, got ", off[0]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(off[e + 1] >= off[e], "moeops: offsets must be non-decreasing, got offsets[", e, "]=", off[e],
                      " > offsets[", e + 1, "]=", off[e + 1]);
  TORCH_CHECK_VALUE(off[E] <= R, "moeops: offsets[E]=", off[E], " exceeds the number of rows of x (", R, ")");

  // bf16 x bf16 on AVX512-BF16: dot products of the bf16 values as given (no widening pass)
  const bool bf16_dot = cpu::use_avx512bf16() && !w_transposed && x_in.scalar_type() == at::kBFloat16 &&
                        w_in.scalar_type() == at::kBFloat16;
  const Tensor x = bf16_dot ? x_in.contiguous() : to_f32_contig(x_in);
  const Tensor w = w_in.contiguous();
  const bool direct = x_in.scalar_type() == at::kFloat;
  Tensor out32 = direct ? at::empty({R, N}, x_in.options()) : at::empty({R, N}, x_in.options().dtype(at::kFloat));
  cpu::advise_huge_pages(out32.data_ptr(), out32.nbytes());
  float* C = out32.data_ptr<float>();
  std::fill(C, C + static_cast<int64_t>(off[0]) * N, 0.f);  // rows no expert owns are zero
  if (off[E] < R) std::fill(C + off[E] * N, C + R * N, 0.f);
  const auto items = make_items(off, E, N, column_block(off[E], N, w_transposed ? 16 : 4),
                                bf16_dot ? kRowBlockBf16 : kRowBlock);
  if (bf16_dot) {
    const auto* A = static_cast<const c10::BFloat16*>(x.data_ptr());
    const auto* B = static_cast<const c10::BFloat16*>(w.data_ptr());
    auto panel = [&](const Item& it) { return B + (it.e * N + it.n0) * K; };
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const Item& it = items[i];
        cpu::gemm_dot_bf16(A + it.m0 * K, K, it.m1 - it.m0, panel(it), K, it.n1 - it.n0, K, C + it.m0 * N + it.n0,
                           N, false, i + 1 < end ? panel(items[i + 1]) : nullptr);
      }
    });
    return out32.to(x_in.scalar_type());
  }
  const float* A = x.data_ptr<float>();
  cpu::dispatch_float(to_dtype(w, "w"), [&](auto tag) {
    using W = decltype(tag);
    const W* B = static_cast<const W*>(w.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const Item& it = items[i];
        const W* Be = B + it.e * N * K;
        if (w_transposed)
          cpu::gemm_axpy(A + it.m0 * K, K, it.m1 - it.m0, Be + it.n0, N, it.n1 - it.n0, K, C + it.m0 * N + it.n0, N);
        else
          cpu::gemm_dot(A + it.m0 * K, K, it.m1 - it.m0, Be + it.n0 * K, K, it.n1 - it.n0, K, C + it.m0 * N + it.n0,
                        N, false, i + 1 < end ? B + (items[i + 1].e * N + items[i + 1].n0) * K : nullptr);
      }
    });
  });
  return direct ? out32 : out32.to(x_in.scalar_type());
}

namespace {

// Per-expert weight base pointers: the stacked Hugging Face layout ([E, N_up, H] / [E, H, I])
// and a list of per-expert tensors (transformers 4.x ModuleLists) share one kernel.
struct ExpertPtrs {
  DType up_dtype, down_dtype;
  std::vector<const void*> gate, up, down;  // up is unused for non-gated experts
};

// Optional statistics of the expert outputs (fused_experts_stats), filled by the kernel after
// each chunk's down projection from the rows it just computed: slot_norms [T*K] f32, per expert
// out_absmax [E] f32, out_channel [E] i64, in_absmax [E] f32, active [E] i64. The caller
// initialises them (0, channel -1); chunks accumulate in token order.
struct ExpertStats {
  float* slot_norms;
  float* out_absmax;
  int64_t* out_channel;
  float* in_absmax;
  int64_t* active;
};

Tensor fused_experts_core(const Tensor& hidden_in, const Tensor& ids, const Tensor& rw, const ExpertsDims& d,
                          const ExpertPtrs& wp_, const Tensor& b_up, const Tensor& b_down, const Tensor& gain,
                          bool gated, const Tensor& shared, const Tensor& shared_gate,
                          const ExpertStats* stats = nullptr);

// The shared-expert term joins the combine as one more slot: rows [T, H] widened to fp32 and
// gates [T] in fp32 (1 when no gate is given); undefined tensors when there is no shared expert.
std::pair<Tensor, Tensor> prepare_shared(const std::optional<Tensor>& shared, const std::optional<Tensor>& gate,
                                         const Tensor& hidden) {
  if (!shared.has_value()) {
    TORCH_CHECK_VALUE(!gate.has_value(), "moeops: shared_gate given without shared_out");
    return {Tensor(), Tensor()};
  }
  check_shared_args(*shared, gate, hidden);
  Tensor g = gate.has_value() ? to_f32_contig(gate->reshape({-1}))
                              : at::ones({hidden.size(0)}, hidden.options().dtype(at::kFloat));
  return {to_f32_contig(*shared), g};
}

}  // namespace

namespace {

// fused_experts over the stacked Hugging Face layout (w_up [E, N_up, H], w_down [E, H, I]),
// with statistics when `st` is given (fused_experts_stats).
Tensor fused_experts_stacked(const Tensor& hidden_in, const Tensor& ids_in, const Tensor& weights_in,
                             const Tensor& w_up_in, const Tensor& w_down_in, const std::optional<Tensor>& b_up_in,
                             const std::optional<Tensor>& b_down_in, const ExpertsDims& d, bool gated,
                             const std::optional<Tensor>& gain_in, const std::optional<Tensor>& shared_out,
                             const std::optional<Tensor>& shared_gate, const ExpertStats* st) {
  const Tensor w_up = w_up_in.contiguous(), w_down = w_down_in.contiguous();
  ExpertPtrs p{to_dtype(w_up, "w_up"), to_dtype(w_down, "w_down"), {}, {}, {}};
  const int64_t eu = w_up.element_size(), ed = w_down.element_size();
  for (int64_t e = 0; e < d.E; ++e) {
    const char* base = static_cast<const char*>(w_up.data_ptr()) + e * d.n_up * d.H * eu;
    p.gate.push_back(base);
    p.up.push_back(base + d.I * d.H * eu);
    p.down.push_back(static_cast<const char*>(w_down.data_ptr()) + e * d.H * d.I * ed);
  }
  const auto shared = prepare_shared(shared_out, shared_gate, hidden_in);
  return fused_experts_core(hidden_in, ids_in.contiguous(), weights_in.contiguous(), d, p,
                            b_up_in.has_value() ? to_f32_contig(*b_up_in) : Tensor(),
                            b_down_in.has_value() ? to_f32_contig(*b_down_in) : Tensor(),
                            gain_in.has_value() ? to_f32_contig(*gain_in) : Tensor(), gated, shared.first,
                            shared.second, st);
}

}  // namespace

Tensor fused_experts_cpu(const Tensor& hidden_in, const Tensor& ids_in, const Tensor& weights_in,
                         const Tensor& w_up_in, const Tensor& w_down_in, const std::optional<Tensor>& b_up_in,
                         const std::optional<Tensor>& b_down_in, std::string_view activation, bool gated,
                         const std::optional<Tensor>& gain_in, const std::optional<Tensor>& shared_out,
                         const std::optional<Tensor>& shared_gate) {
  TORCH_CHECK_VALUE(hidden_in.device().is_cpu(), "moeops: fused_experts_cpu got hidden on ", hidden_in.device());
  const ExpertsDims d = check_fused_experts_args(hidden_in, ids_in, weights_in, w_up_in, w_down_in, b_up_in,
                                                 b_down_in, activation, gated, gain_in);
  return fused_experts_stacked(hidden_in, ids_in, weights_in, w_up_in, w_down_in, b_up_in, b_down_in, d, gated,
                               gain_in, shared_out, shared_gate, nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_experts_stats_cpu(
    const Tensor& hidden_in, const Tensor& ids_in, const Tensor& weights_in, const Tensor& w_up_in,
    const Tensor& w_down_in, const std::optional<Tensor>& b_up_in, const std::optional<Tensor>& b_down_in,
    std::string_view activation, bool gated, const std::optional<Tensor>& gain_in,
    const std::optional<Tensor>& shared_out, const std::optional<Tensor>& shared_gate) {
  TORCH_CHECK_VALUE(hidden_in.device().is_cpu(), "moeops: fused_experts_stats_cpu got hidden on ", hidden_in.device());
  const ExpertsDims d = check_fused_experts_args(hidden_in, ids_in, weights_in, w_up_in, w_down_in, b_up_in,
                                                 b_down_in, activation, gated, gain_in);
  auto f32 = hidden_in.options().dtype(at::kFloat);
  auto i64 = hidden_in.options().dtype(at::kLong);
  Tensor norms = at::zeros({d.T, d.K}, f32), out_max = at::zeros({d.E}, f32), in_max = at::zeros({d.E}, f32);
  Tensor channel = at::full({d.E}, -1, i64), active = at::zeros({d.E}, i64);
  const ExpertStats st{norms.data_ptr<float>(), out_max.data_ptr<float>(), channel.data_ptr<int64_t>(),
                       in_max.data_ptr<float>(), active.data_ptr<int64_t>()};
  Tensor out = fused_experts_stacked(hidden_in, ids_in, weights_in, w_up_in, w_down_in, b_up_in, b_down_in, d,
                                     gated, gain_in, shared_out, shared_gate, &st);
  return {out, norms, out_max, channel, in_max, active};
}

Tensor fused_experts_list_cpu(const Tensor& hidden, const Tensor& ids, const Tensor& weights, at::TensorList w_gate,
                              at::TensorList w_up, at::TensorList w_down, std::string_view activation,
                              const std::optional<Tensor>& shared_out, const std::optional<Tensor>& shared_gate) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "moeops: fused_experts_list_cpu got hidden on ", hidden.device());
  const int64_t E = static_cast<int64_t>(w_down.size());
  TORCH_CHECK_VALUE(E >= 1 && static_cast<int64_t>(w_gate.size()) == E && static_cast<int64_t>(w_up.size()) == E,
                    "moeops: w_gate, w_up and w_down must list the same number (>= 1) of experts, got ",
                    w_gate.size(), ", ", w_up.size(), ", ", w_down.size());
  const ExpertsDims d = check_experts_list_args(hidden, ids, weights, w_gate, w_up, w_down, activation);
  ExpertPtrs p{to_dtype(w_gate[0], "w_gate"), to_dtype(w_down[0], "w_down"), {}, {}, {}};
  for (int64_t e = 0; e < E; ++e) {
    p.gate.push_back(w_gate[e].data_ptr());
    p.up.push_back(w_up[e].data_ptr());
    p.down.push_back(w_down[e].data_ptr());
  }
  const auto shared = prepare_shared(shared_out, shared_gate, hidden);
  return fused_experts_core(hidden, ids.contiguous(), weights.contiguous(), d, p, Tensor(), Tensor(), Tensor(), true,
                            shared.first, shared.second);
}

namespace {

Tensor fused_experts_core(const Tensor& hidden_in, const Tensor& ids, const Tensor& rw, const ExpertsDims& d,
                          const ExpertPtrs& wptr, const Tensor& b_up, const Tensor& b_down, const Tensor& gain,
                          bool gated, const Tensor& shared, const Tensor& shared_gate, const ExpertStats* stats) {
  const int64_t T = d.T, H = d.H, K = d.K, E = d.E, I = d.I, NU = d.n_up;
  const float* gp = gain.defined() ? gain.data_ptr<float>() : nullptr;
  const int32_t* idp = ids.data_ptr<int32_t>();
  for (int64_t s = 0; s < T * K; ++s)
    TORCH_CHECK_VALUE(idp[s] >= -1 && idp[s] < E, "moeops: ids must be in [-1, E=", E, "), got ", idp[s],
                      " at token ", s / K, ", slot ", s % K);
  Tensor out = at::empty({T, H}, hidden_in.options());
  if (T == 0 || H == 0) return out;

  // bf16 hidden and bf16 weights on an AVX512-BF16 CPU: both GEMMs take bf16 operands
  // (vdpbf16ps, fp32 accumulation); the gathered rows stay bf16 and the activation is rounded to
  // bf16 before the down projection, as Hugging Face's experts and the CUDA tensor-core path do.
  const bool bf16_dot = cpu::use_avx512bf16() && hidden_in.scalar_type() == at::kBFloat16 &&
                        wptr.up_dtype == DType::BF16 && wptr.down_dtype == DType::BF16;

  // Scratch per chunk of tokens, reused across chunks: X [R, H] gathered rows (fp32; bf16 on the
  // bf16 path), U [R, NU] up projection (+ Ub [R, I], its bf16 activation, on the bf16 path),
  // Y [R (+ tokens), H] per-slot outputs (+ the shared expert's rows). The chunk is as many
  // tokens as fit the workspace limit (cpu_memory.h), at least one.
  const bool has_shared = shared.defined();
  const int64_t bytes_per_token =
      4 * (K * (H + NU) + (has_shared ? H : 0)) + K * (bf16_dot ? 2 * (H + I) : 4 * H);
  const int64_t tc = std::clamp<int64_t>(cpu::workspace_limit_bytes() / bytes_per_token, 1, T);
  auto f32 = hidden_in.options().dtype(at::kFloat);
  auto b16 = hidden_in.options().dtype(at::kBFloat16);
  Tensor X = at::empty({tc * K, H}, bf16_dot ? b16 : f32), U = at::empty({tc * K, NU}, f32),
         Ub = at::empty({bf16_dot ? tc * K : 0, I}, b16), Y = at::empty({tc * K + (has_shared ? tc : 0), H}, f32);
  for (Tensor* t : {&X, &U, &Ub, &Y}) cpu::advise_huge_pages(t->data_ptr(), t->nbytes());
  float *Up = U.data_ptr<float>(), *Yp = Y.data_ptr<float>();
  float* Xp = bf16_dot ? nullptr : X.data_ptr<float>();
  auto* Xb = bf16_dot ? static_cast<c10::BFloat16*>(X.data_ptr()) : nullptr;
  auto* Ubp = bf16_dot ? static_cast<c10::BFloat16*>(Ub.data_ptr()) : nullptr;
  const Tensor hidden = hidden_in.stride(1) == 1 ? hidden_in : hidden_in.contiguous();
  const float* bup = b_up.defined() ? b_up.data_ptr<float>() : nullptr;
  const float* bdn = b_down.defined() ? b_down.data_ptr<float>() : nullptr;
  const float* sg = has_shared ? shared_gate.data_ptr<float>() : nullptr;
  const int64_t KS = K + (has_shared ? 1 : 0);
  const float* wp = rw.data_ptr<float>();
  const bool avx2 = cpu::use_avx2();
  std::vector<int32_t> off(E + 1), row_slot, inverse;

  for (int64_t t0 = 0; t0 < T; t0 += tc) {
    const int64_t t1 = std::min(T, t0 + tc), nt = t1 - t0;
    // 1. plan: counting sort of the chunk's non-empty slots by expert (slot order within an
    //    expert); experts with gain 0 are skipped entirely. Rows and inverse are chunk-local.
    std::fill(off.begin(), off.end(), 0);
    for (int64_t s = t0 * K; s < t1 * K; ++s)
      if (idp[s] >= 0 && !(gp && gp[idp[s]] == 0.f)) ++off[idp[s] + 1];
    for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
    const int64_t R = off[E];
    row_slot.resize(R);
    inverse.assign(nt * K, -1);
    {
      std::vector<int32_t> cursor(off.begin(), off.end() - 1);
      for (int64_t s = t0 * K; s < t1 * K; ++s) {
        const int32_t e = idp[s];
        if (e < 0 || (gp && gp[e] == 0.f)) continue;
        const int32_t r = cursor[e]++;
        row_slot[r] = static_cast<int32_t>(s - t0 * K);
        inverse[s - t0 * K] = r;
      }
    }

    // 2. gather the rows, widened to fp32 (copied as bf16 on the bf16 path)
    if (bf16_dot) {
      const auto* hp = static_cast<const c10::BFloat16*>(hidden.data_ptr());
      const int64_t hs = hidden.stride(0);
      at::parallel_for(0, R, 64, [&](int64_t b, int64_t end) {
        for (int64_t r = b; r < end; ++r)
          std::memcpy(Xb + r * H, hp + (t0 + row_slot[r] / K) * hs, sizeof(c10::BFloat16) * H);
      });
    } else cpu::dispatch_float(to_dtype(hidden, "hidden"), [&](auto tag) {
      using TH = decltype(tag);
      const TH* hp = static_cast<const TH*>(hidden.data_ptr());
      const int64_t hs = hidden.stride(0);
      at::parallel_for(0, R, 64, [&](int64_t b, int64_t end) {
        for (int64_t r = b; r < end; ++r) {
          const TH* src = hp + (t0 + row_slot[r] / K) * hs;
          for (int64_t h = 0; h < H; ++h) Xp[r * H + h] = cpu::to_f32(src[h]);
        }
      });
    });

    // 3. up projection with the bias and activation in the epilogue. Gated experts: an item owns
    //    gate columns [n0, n1) and the matching up columns [I+n0, I+n1), and writes act(g)*u over
    //    the gate columns of U, which the down projection then reads (lda = NU).
    const int64_t row_block = bf16_dot ? kRowBlockBf16 : kRowBlock;
    const auto up_items = make_items(off.data(), E, I, column_block(R, I, 4), row_block);
    cpu::dispatch_float(wptr.up_dtype, [&](auto tag) {
      using W = decltype(tag);
      at::parallel_for(0, static_cast<int64_t>(up_items.size()), 1, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          const Item& it = up_items[i];
          const W* G = static_cast<const W*>(wptr.gate[it.e]);
          const W* Uw = static_cast<const W*>(wptr.up[it.e]);
          const int64_t M = it.m1 - it.m0, nb = it.n1 - it.n0;
          float* Cg = Up + it.m0 * NU;
          // each GEMM call prefetches the weights of the next: this item's up, the next item's gate
          const W* next_gate =
              i + 1 < end ? static_cast<const W*>(wptr.gate[up_items[i + 1].e]) + up_items[i + 1].n0 * H : nullptr;
          const W* after_gate = gated ? Uw + it.n0 * H : next_gate;
          if constexpr (std::is_same_v<W, c10::BFloat16>) {
            if (bf16_dot) {
              cpu::gemm_dot_bf16(Xb + it.m0 * H, H, M, G + it.n0 * H, H, nb, H, Cg + it.n0, NU, false, after_gate);
              if (gated)
                cpu::gemm_dot_bf16(Xb + it.m0 * H, H, M, Uw + it.n0 * H, H, nb, H, Cg + I + it.n0, NU, false, next_gate);
            }
          }
          if (!bf16_dot) {
            cpu::gemm_dot(Xp + it.m0 * H, H, M, G + it.n0 * H, H, nb, H, Cg + it.n0, NU, false, after_gate);
            if (gated) cpu::gemm_dot(Xp + it.m0 * H, H, M, Uw + it.n0 * H, H, nb, H, Cg + I + it.n0, NU, false, next_gate);
          }
          const float* bu = bup ? bup + it.e * NU : nullptr;
          for (int64_t m = 0; m < M; ++m) {  // on the bf16 path Ub is the down projection's input
            float* row = Cg + m * NU;
            cpu::act_epilogue(d.act, row + it.n0, gated ? row + I + it.n0 : nullptr, bu ? bu + it.n0 : nullptr,
                              bu && gated ? bu + I + it.n0 : nullptr, bf16_dot ? Ubp + (it.m0 + m) * I + it.n0 : nullptr,
                              nb);
          }
        }
      });
    });

    // 4. down projection (+ bias): Y [R, H] = act(U)[:, :I] . w_down[e]^T
    const auto down_items = make_items(off.data(), E, H, column_block(R, H, 4), row_block);
    cpu::dispatch_float(wptr.down_dtype, [&](auto tag) {
      using W = decltype(tag);
      at::parallel_for(0, static_cast<int64_t>(down_items.size()), 1, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          const Item& it = down_items[i];
          const int64_t M = it.m1 - it.m0, nb = it.n1 - it.n0;
          float* C = Yp + it.m0 * H + it.n0;
          const W* Wd = static_cast<const W*>(wptr.down[it.e]) + it.n0 * I;
          const W* next = i + 1 < end ? static_cast<const W*>(wptr.down[down_items[i + 1].e]) + down_items[i + 1].n0 * I
                                      : nullptr;  // prefetched during this call's last panel
          if constexpr (std::is_same_v<W, c10::BFloat16>) {
            if (bf16_dot) cpu::gemm_dot_bf16(Ubp + it.m0 * I, I, M, Wd, I, nb, I, C, H, false, next);
          }
          if (!bf16_dot) cpu::gemm_dot(Up + it.m0 * NU, NU, M, Wd, I, nb, I, C, H, false, next);
          if (bdn)
            for (int64_t m = 0; m < M; ++m)
              for (int64_t j = 0; j < nb; ++j) C[m * H + j] += bdn[it.e * H + it.n0 + j];
        }
      });
    });

    // 4b. statistics (fused_experts_stats only): one pass over each expert row right after the
    //     down projection wrote it: the slot's L2 norm of the unweighted output y, the row's
    //     max |y| and its first channel, max |h| of the down input h and h's non-zero units;
    //     then a reduction per expert over its contiguous rows. Rows are in slot order within
    //     an expert and chunks in token order, so "first maximum" means slot order, then channel.
    if (stats) {
      std::vector<float> row_max(R), row_in_max(R);
      std::vector<int64_t> row_ch(R), row_nnz(R);
      at::parallel_for(0, R, 16, [&](int64_t b, int64_t end) {
        for (int64_t r = b; r < end; ++r) {
          const float* y = Yp + r * H;
          float ss = 0.f, mx = -1.f;
          int64_t ch = -1;
          for (int64_t h = 0; h < H; ++h) {
            const float v = y[h], a = std::fabs(v);
            ss += v * v;
            if (a > mx) {
              mx = a;
              ch = h;
            }
          }
          const float* u = Up + r * NU;
          float imx = 0.f;
          int64_t nnz = 0;
          for (int64_t j = 0; j < I; ++j) {
            const float a = std::fabs(u[j]);
            imx = a > imx ? a : imx;
            nnz += u[j] != 0.f;
          }
          stats->slot_norms[t0 * K + row_slot[r]] = std::sqrt(ss);
          row_max[r] = mx;
          row_ch[r] = ch;
          row_in_max[r] = imx;
          row_nnz[r] = nnz;
        }
      });
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t r = off[e]; r < off[e + 1]; ++r) {
          if (stats->out_channel[e] < 0 || row_max[r] > stats->out_absmax[e]) {
            stats->out_absmax[e] = row_max[r];
            stats->out_channel[e] = row_ch[r];
          }
          if (row_in_max[r] > stats->in_absmax[e]) stats->in_absmax[e] = row_in_max[r];
          stats->active[e] += row_nnz[r];
        }
      }
    }

    // 5. deterministic weighted combine: slots in order, then the shared expert (rows R + t of
    //    Y with weight shared_gate[t]), fp32, one rounding
    if (has_shared) std::memcpy(Yp + R * H, shared.data_ptr<float>() + t0 * H, sizeof(float) * nt * H);
    cpu::dispatch_float(to_dtype(out, "hidden"), [&](auto tag) {
      using TO = decltype(tag);
      TO* op = static_cast<TO*>(out.data_ptr());
      at::parallel_for(t0, t1, std::max<int64_t>(1, 8192 / std::max<int64_t>(H * KS, 1)), [&](int64_t b, int64_t end) {
        std::vector<float> acc(H), ws(KS);
        std::vector<int32_t> inv(KS);
        for (int64_t t = b; t < end; ++t) {
          for (int64_t k = 0; k < K; ++k) {
            const int32_t e = idp[t * K + k];
            ws[k] = e >= 0 ? wp[t * K + k] * (gp ? gp[e] : 1.f) : 0.f;
            inv[k] = inverse[(t - t0) * K + k];
          }
          if (has_shared) {
            ws[K] = sg[t];
            inv[K] = static_cast<int32_t>(R + t - t0);
          }
          cpu::combine_token(avx2, static_cast<const float*>(Yp), H, ws.data(), inv.data(), static_cast<int>(KS),
                             acc.data(), op + t * H);
        }
      });
    });
  }
  return out;
}

}  // namespace
}  // namespace moeops
