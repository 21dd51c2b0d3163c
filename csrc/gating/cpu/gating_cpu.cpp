// CPU top-k gating: one token per iteration, tokens split across threads with
// at::parallel_for. Semantics: python/moeops/reference.py::topk_gating.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_vec.h"
#include "gating/gating_prepare.h"

namespace moeops {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowScratch {
  std::vector<float> scores, key;
  std::vector<uint8_t> tier;  // 2 forced, 1 available, 0 not selectable
  std::vector<int> order, gorder;
  std::vector<float> gscore;
  std::vector<uint8_t> gkeep;
  explicit RowScratch(int E, int n_group)
      : scores(E), key(E), tier(E), order(E), gorder(n_group), gscore(n_group), gkeep(n_group) {}
};

template <class T>
void load_scores(const GatingParams& p, int64_t t, float* s) {
  const T* row = static_cast<const T*>(p.logits) + t * p.logits_stride;
  const int E = p.E;
  if (p.scoring == Scoring::Softmax) {
    float m = kNegInf;
    for (int e = 0; e < E; ++e) {
      s[e] = cpu::to_f32(row[e]);
      if (s[e] > m) m = s[e];  // NaN never wins the max; it still poisons the sum below
    }
    float sum = 0.f;
    for (int e = 0; e < E; ++e) {
      s[e] = std::exp(s[e] - m);
      sum += s[e];
    }
    for (int e = 0; e < E; ++e) s[e] = s[e] / sum;
  } else {
    for (int e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-cpu::to_f32(row[e])));
  }
}

template <class T>
void gate_token(const GatingParams& p, int64_t t, RowScratch& w) {
  const int E = p.E, K = p.k;
  float* scores = w.scores.data();
  float* key = w.key.data();
  uint8_t* tier = w.tier.data();
  load_scores<T>(p, t, scores);
  if (p.probs) std::copy(scores, scores + E, p.probs + t * E);

  const bool* mask = p.mask ? p.mask + t * p.mask_stride : nullptr;
  const bool* forced = p.forced ? p.forced + t * p.forced_stride : nullptr;
  const bool reroute = p.mask_mode == MaskMode::Reroute;
  for (int e = 0; e < E; ++e) {
    const float sel = p.bias ? scores[e] + p.bias[e] : scores[e];
    const bool avail = !std::isnan(sel) && !(reroute && mask && mask[e]);
    key[e] = avail ? sel : kNegInf;
    tier[e] = avail ? 1 : 0;
  }
  if (p.n_group > 1) {
    const int g = E / p.n_group;
    for (int gi = 0; gi < p.n_group; ++gi) {
      float m1 = kNegInf, m2 = kNegInf;  // key is -inf for unavailable experts
      for (int e = gi * g; e < (gi + 1) * g; ++e) {
        if (key[e] > m1) { m2 = m1; m1 = key[e]; }
        else if (key[e] > m2) m2 = key[e];
      }
      const float s = m1 + m2;
      w.gscore[gi] = std::isnan(s) ? kNegInf : s;
      w.gorder[gi] = gi;
    }
    const float* gs = w.gscore.data();
    std::partial_sort(w.gorder.begin(), w.gorder.begin() + p.topk_group, w.gorder.end(),
                      [gs](int a, int b) { return gs[a] > gs[b] || (gs[a] == gs[b] && a < b); });
    std::fill(w.gkeep.begin(), w.gkeep.end(), 0);
    for (int i = 0; i < p.topk_group; ++i) w.gkeep[w.gorder[i]] = 1;
    for (int e = 0; e < E; ++e)
      if (!w.gkeep[e / g]) { tier[e] = 0; key[e] = kNegInf; }
  }
  if (forced) {
    for (int e = 0; e < E; ++e) {
      const float sel = p.bias ? scores[e] + p.bias[e] : scores[e];
      if (forced[e] && !std::isnan(sel)) { tier[e] = 2; key[e] = sel; }
    }
  }

  // top-k by (tier desc, key desc, index asc)
  int* order = w.order.data();
  auto better = [tier, key](int a, int b) {
    if (tier[a] != tier[b]) return tier[a] > tier[b];
    if (key[a] != key[b]) return key[a] > key[b];
    return a < b;
  };
  if (K <= 32) {
    // one pass keeping the best K sorted: most experts lose to the current K-th at once
    int n = 0;
    for (int e = 0; e < E; ++e) {
      if (n == K && !better(e, order[K - 1])) continue;
      int j = n < K ? n++ : K - 1;
      while (j > 0 && better(e, order[j - 1])) {
        order[j] = order[j - 1];
        --j;
      }
      order[j] = e;
    }
  } else {
    for (int e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order, order + K, order + E, better);
  }

  float* wout = p.weights + t * K;
  int32_t* iout = p.ids + t * K;
  float sum = 0.f;
  for (int j = 0; j < K; ++j) {
    const int e = order[j];
    if (tier[e] > 0) {
      iout[j] = e;
      wout[j] = scores[e];
      sum += scores[e];
    } else {
      iout[j] = -1;
      wout[j] = 0.f;
    }
  }
  if (p.renormalize) {
    const float denom = sum + 1e-20f;
    for (int j = 0; j < K; ++j) wout[j] = wout[j] / denom;
  }
  for (int j = 0; j < K; ++j) wout[j] = wout[j] * p.scale;

  if (mask && p.mask_mode != MaskMode::Reroute) {
    float before = 0.f, after = 0.f;
    for (int j = 0; j < K; ++j) before += wout[j];
    for (int j = 0; j < K; ++j) {
      const int e = iout[j];
      if (e >= 0 && mask[e] && !(forced && forced[e])) {
        iout[j] = -1;
        wout[j] = 0.f;
      }
      after += wout[j];
    }
    if (p.mask_mode == MaskMode::DropRenorm && after > 0.f) {
      // w / after <= 1 first: before / after overflows when the survivors are denormal
      for (int j = 0; j < K; ++j) wout[j] = wout[j] / after * before;
    }
  }
}

template <class T>
void gating_kernel(const GatingParams& p) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max(p.E, 1));
  at::parallel_for(0, p.T, grain, [&](int64_t begin, int64_t end) {
    RowScratch scratch(p.E, p.n_group);
    for (int64_t t = begin; t < end; ++t) gate_token<T>(p, t, scratch);
  });
  if (p.counts) {
    const int64_t n = p.T * p.k;
    for (int64_t i = 0; i < n; ++i)
      if (p.ids[i] >= 0) ++p.counts[p.ids[i]];
  }
}

}  // namespace

GatingOut topk_gating_cpu(MOEOPS_GATING_ARGS) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "moeops: topk_gating_cpu got logits on ", logits.device());
  GatingPrepared g = prepare_gating(logits, k, scoring, renormalize, routed_scaling_factor, bias, n_group,
                                    topk_group, mask, mask_mode, forced, return_probs, return_counts);
  switch (g.p.logits_dtype) {
    case DType::F32: gating_kernel<float>(g.p); break;
    case DType::F16: gating_kernel<c10::Half>(g.p); break;
    case DType::BF16: gating_kernel<c10::BFloat16>(g.p); break;
  }
  return {g.weights, g.ids, g.probs, g.counts};
}

}  // namespace moeops
