// CPU routing plan, permute (gather token rows by expert) and weighted combine.
// Semantics: python/moeops/reference.py::{route_plan, permute, combine}.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_combine.h"
#include "common/cpu_isa.h"
#include "common/cpu_memory.h"
#include "common/cpu_vec.h"
#include "ops.h"
#include "permute/permute_prepare.h"

namespace moeops {
namespace {

// ---------------------------------------------------------------- permute
template <class T>
void scale_row_portable(const T* src, float s, T* dst, int64_t H) {
  for (int64_t h = 0; h < H; ++h) dst[h] = cpu::from_f32<T>(cpu::to_f32(src[h]) * s);
}

#ifdef MOEOPS_HAS_AVX2_PATH
template <class T>
MOEOPS_AVX2 void scale_row_avx2(const T* src, float s, T* dst, int64_t H) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) cpu::store8(dst + h, _mm256_mul_ps(cpu::load8(src + h), vs));
  for (; h < H; ++h) dst[h] = cpu::from_f32<T>(cpu::to_f32(src[h]) * s);
}
#endif

template <class T>
void permute_kernel(const Tensor& hidden, const int32_t* slots, int64_t R, int64_t top_k,
                    const float* scale, T* out) {
  const T* src = static_cast<const T*>(hidden.data_ptr());
  const int64_t H = hidden.size(1), stride = hidden.stride(0);
  if (H == 0) return;  // zero-sized rows: out may be null, nothing to copy (UBSan: memcpy(null))
  const bool avx2 = cpu::use_avx2();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* dst = out + r * H;
      const int32_t s = slots[r];
      if (s < 0) {
        std::memset(static_cast<void*>(dst), 0, H * sizeof(T));
        continue;
      }
      const T* row = src + (s / top_k) * stride;
      if (scale == nullptr) {
        std::memcpy(static_cast<void*>(dst), row, H * sizeof(T));
#ifdef MOEOPS_HAS_AVX2_PATH
      } else if (avx2) {
        scale_row_avx2(row, scale[s], dst, H);
#endif
      } else {
        scale_row_portable(row, scale[s], dst, H);
      }
    }
  });
}

template <class T>
void combine_kernel(const Tensor& x, const Tensor& weights, const Tensor& inverse, Tensor& out) {
  const int64_t T_ = weights.size(0), H = x.size(1);
  const int K = static_cast<int>(weights.size(1));
  const T* xp = static_cast<const T*>(x.data_ptr());
  const float* wp = weights.data_ptr<float>();
  const int32_t* ip = inverse.data_ptr<int32_t>();
  T* op = static_cast<T*>(out.data_ptr());
  const bool avx2 = cpu::use_avx2();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(H * K, 1));
  at::parallel_for(0, T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(H);
    for (int64_t t = begin; t < end; ++t) {
      cpu::combine_token(avx2, xp, H, wp + t * K, ip + t * K, K, acc.data(), op + t * H);
    }
  });
}


}  // namespace

PlanOut route_plan_cpu(const Tensor& ids_in, int64_t num_experts) {
  check_plan_args(ids_in, num_experts);
  const Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel();
  const int32_t E = static_cast<int32_t>(num_experts);
  const int32_t* idp = ids.data_ptr<int32_t>();
  auto i32 = ids.options();
  Tensor offsets = at::zeros({num_experts + 1}, i32);
  Tensor sorted_slots = at::empty({n}, i32);
  Tensor inverse = at::empty({n}, i32);
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t s = 0; s < n; ++s) {
    const int32_t e = idp[s];
    TORCH_CHECK_VALUE(e >= -1 && e < E, "moeops: ids must be in [-1, num_experts=", E, "), got ", e,
                      " at slot ", s, " (token ", s / std::max<int64_t>(ids.size(1), 1), ")");
    if (e >= 0) ++off[e + 1];
  }
  for (int32_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int32_t> cursor(off, off + E);
  int32_t* ss = sorted_slots.data_ptr<int32_t>();
  int32_t* inv = inverse.data_ptr<int32_t>();
  for (int64_t s = 0; s < n; ++s) {  // slot order within an expert: stable, deterministic
    const int32_t e = idp[s];
    if (e < 0) {
      inv[s] = -1;
      continue;
    }
    const int32_t r = cursor[e]++;
    ss[r] = static_cast<int32_t>(s);
    inv[s] = r;
  }
  std::fill(ss + off[E], ss + n, -1);
  return {offsets, sorted_slots, inverse};
}

Tensor permute_cpu(const Tensor& hidden_in, const Tensor& sorted_slots_in, int64_t top_k,
                   const std::optional<Tensor>& slot_scale) {
  TORCH_CHECK_VALUE(hidden_in.device().is_cpu(), "moeops: permute_cpu got hidden on ", hidden_in.device());
  const Tensor hidden = check_permute_args(hidden_in, sorted_slots_in, top_k, slot_scale);
  const Tensor slots = sorted_slots_in.contiguous();
  const int64_t R = slots.size(0), T = hidden.size(0);
  const int32_t* sp = slots.data_ptr<int32_t>();
  const int64_t max_slot = T * top_k;
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK_VALUE(sp[r] >= -1 && sp[r] < max_slot, "moeops: sorted_slots[", r, "]=", sp[r],
                      " is out of range [-1, T*top_k=", max_slot, ")");
  Tensor out = at::empty({R, hidden.size(1)}, hidden.options());
  cpu::advise_huge_pages(out.data_ptr(), out.nbytes());
  Tensor scale = slot_scale.has_value() ? slot_scale->contiguous() : Tensor();
  const float* scp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  cpu::dispatch_float(to_dtype(hidden, "hidden"), [&](auto tag) {
    using T_ = decltype(tag);
    permute_kernel<T_>(hidden, sp, R, top_k, scp, static_cast<T_*>(out.data_ptr()));
  });
  return out;
}

Tensor combine_cpu(const Tensor& expert_out_in, const Tensor& weights_in, const Tensor& inverse_in) {
  TORCH_CHECK_VALUE(expert_out_in.device().is_cpu(), "moeops: combine_cpu got expert_out on ",
                    expert_out_in.device());
  check_combine_args(expert_out_in, weights_in, inverse_in);
  const Tensor x = expert_out_in.contiguous(), w = weights_in.contiguous(), inv = inverse_in.contiguous();
  const int64_t R = x.size(0);
  const int32_t* ip = inv.data_ptr<int32_t>();
  for (int64_t s = 0; s < inv.numel(); ++s)
    TORCH_CHECK_VALUE(ip[s] >= -1 && ip[s] < R, "moeops: inverse[", s, "]=", ip[s],
                      " is out of range [-1, R=", R, ")");
  Tensor out = at::empty({w.size(0), x.size(1)}, x.options());
  cpu::advise_huge_pages(out.data_ptr(), out.nbytes());
  cpu::dispatch_float(to_dtype(x, "expert_out"), [&](auto tag) {
    combine_kernel<decltype(tag)>(x, w, inv, out);
  });
  return out;
}

}  // namespace moeops
