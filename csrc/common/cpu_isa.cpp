#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace moeops::cpu {
namespace {
Isa detect() { return cpu_supports_avx2() ? Isa::Avx2 : Isa::Portable; }

Isa from_env() {
  const char* env = std::getenv("MOEOPS_CPU_ISA");
  if (env == nullptr || std::string(env) == "auto" || std::string(env).empty()) return detect();
  if (std::string(env) == "portable") return Isa::Portable;
  if (std::string(env) == "avx2" && cpu_supports_avx2()) return Isa::Avx2;
  return detect();  // unknown or unsupported value: keep the safe choice
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

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) { return isa == Isa::Avx2 ? "avx2" : "portable"; }

std::string set_isa(const std::string& name) {
  Isa want;
  if (name == "auto") want = detect();
  else if (name == "portable") want = Isa::Portable;
  else if (name == "avx2") {
    if (!cpu_supports_avx2()) throw std::invalid_argument("moeops: this CPU lacks AVX2/FMA/F16C");
    want = Isa::Avx2;
  } else {
    throw std::invalid_argument("moeops: cpu isa must be 'auto', 'avx2' or 'portable', got '" + name + "'");
  }
  current().store(static_cast<int>(want));
  return isa_name(want);
}

}  // namespace moeops::cpu
