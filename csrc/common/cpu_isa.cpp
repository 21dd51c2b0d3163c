#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace moeops::cpu {
namespace {
Isa detect() {
  if (cpu_supports_avx512bf16()) return Isa::Avx512Bf16;
  return cpu_supports_avx2() ? Isa::Avx2 : Isa::Portable;
}

bool supported(Isa isa) {
  switch (isa) {
    case Isa::Portable: return true;
    case Isa::Avx2: return cpu_supports_avx2();
    case Isa::Avx512Bf16: return cpu_supports_avx512bf16();
  }
  return false;
}

bool parse(const std::string& name, Isa& out) {
  if (name == "portable") out = Isa::Portable;
  else if (name == "avx2") out = Isa::Avx2;
  else if (name == "avx512bf16") out = Isa::Avx512Bf16;
  else return false;
  return true;
}

Isa from_env() {
  const char* env = std::getenv("MOEOPS_CPU_ISA");
  Isa want;
  if (env == nullptr || !parse(env, want) || !supported(want)) return detect();  // unknown: safe choice
  return want;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(from_env())};
  return isa;
}
}  // namespace

bool cpu_supports_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_supports_avx512bf16() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return cpu_supports_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

std::string set_isa(const std::string& name) {
  Isa want;
  if (name == "auto") want = detect();
  else if (!parse(name, want))
    throw std::invalid_argument("moeops: cpu isa must be 'auto', 'avx512bf16', 'avx2' or 'portable', got '" + name +
                                "'");
  else if (!supported(want))
    throw std::invalid_argument("moeops: this CPU lacks the instructions of cpu isa '" + name + "'");
  current().store(static_cast<int>(want));
  return isa_name(want);
}

}  // namespace moeops::cpu
