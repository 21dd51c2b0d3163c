// Interleaved A/B of two builds of the CPU expert GEMM in one process (gemm_dot with fp32
// activations and fp32 ("fp32") or bf16 ("bf16") weights; gemm_dot_bf16 with bf16 activations and
// weights ("bf16x", AVX512-BF16 only): rounds alternate base and new on the same data, medians are compared, and the outputs
// must be bit-equal. Run through scripts/kernel_ab.sh.
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string_view>
#include <vector>

using GemmF32 = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
using GemmBf16 = void (*)(const float*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);
void gemm_f32_cpu_base(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
void gemm_f32_cpu_new(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
void gemm_bf16w_cpu_base(const float*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);
void gemm_bf16w_cpu_new(const float*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);
using GemmBf16x = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);
void gemm_bf16x_cpu_base(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);
void gemm_bf16x_cpu_new(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, float*);

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s M N K E fp32|bf16|bf16x [rounds]\n", argv[0]);
    return 2;
  }
  const std::string_view kind = argv[5];
  if (kind != "fp32" && kind != "bf16" && kind != "bf16x") {
    std::fprintf(stderr, "the weight kind must be fp32, bf16 or bf16x, not '%s'\n", argv[5]);
    return 2;
  }
  const char* isa = std::getenv("MOEOPS_AB_ISA");
  const bool bf16x = kind == "bf16x";
  if (bf16x && !(isa && std::string_view(isa) == "avx512bf16")) {
    std::fprintf(stderr, "bf16x (gemm_dot_bf16) needs MOEOPS_AB_ISA=avx512bf16\n");
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), N = std::atoll(argv[2]), K = std::atoll(argv[3]), E = std::atoll(argv[4]);
  const bool bf16 = kind != "fp32";
  const int rounds = argc > 6 ? std::atoi(argv[6]) : 21;
  // E experts' weights, each M rows against one expert (as in a grouped GEMM with M rows per
  // expert); the weights of all E pass once per timed call (E * N * K larger than L3: streamed)
  std::vector<float> A(M * K), Bf(bf16 ? 0 : E * N * K), C[2] = {std::vector<float>(M * N), std::vector<float>(M * N)};
  std::vector<c10::BFloat16> Bb(bf16 ? E * N * K : 0);
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  for (auto& v : A) v = nd(gen);
  for (auto& v : Bf) v = nd(gen);
  for (auto& v : Bb) v = c10::BFloat16(nd(gen));
  std::vector<c10::BFloat16> Ab(bf16x ? M * K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(Ab.size()); ++i) Ab[i] = c10::BFloat16(A[i]);
  const GemmF32 f32[2] = {gemm_f32_cpu_base, gemm_f32_cpu_new};
  const GemmBf16 b16[2] = {gemm_bf16w_cpu_base, gemm_bf16w_cpu_new};
  const GemmBf16x b16x[2] = {gemm_bf16x_cpu_base, gemm_bf16x_cpu_new};
  std::vector<double> t[2];
  bool equal = true;
  for (int r = 0; r <= rounds; ++r)
    for (int i = 0; i < 2; ++i) {
      const int v = (r + i) % 2;  // alternate which build runs first (ABBA)
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t e = 0; e < E; ++e) {
        if (bf16x) b16x[v](Ab.data(), K, M, Bb.data() + e * N * K, N, K, C[v].data());
        else if (bf16) b16[v](A.data(), K, M, Bb.data() + e * N * K, N, K, C[v].data());
        else f32[v](A.data(), K, M, Bf.data() + e * N * K, N, K, C[v].data());
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) t[v].push_back(s);  // round 0 warms up
      if (i == 1) equal = equal && C[0] == C[1];
    }
  for (auto& v : t) std::sort(v.begin(), v.end());
  const double flop = 2.0 * M * N * K * E, base = flop / t[0][t[0].size() / 2] / 1e9,
               now = flop / t[1][t[1].size() / 2] / 1e9;
  std::printf("%-5s M=%-3ld N=%-5ld K=%-5ld E=%-3ld  base %6.1f  new %6.1f GFLOP/s  new/base %.3f  outputs %s\n",
              bf16x ? "bf16x" : bf16 ? "bf16w" : "fp32", static_cast<long>(M), static_cast<long>(N), static_cast<long>(K),
              static_cast<long>(E), base, now, now / base, equal ? "bit-equal" : "DIFFER");
  return equal ? 0 : 1;
}
