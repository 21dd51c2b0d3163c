// Run-time choice of the CPU code path. No -march=native: AVX2/FMA/F16C kernels are compiled
// with target attributes and picked when the CPU has them; a portable path exists otherwise.
#pragma once
#include <string>

namespace moeops::cpu {

enum class Isa { Portable = 0, Avx2 = 1 };

bool cpu_supports_avx2();      // AVX2 + FMA + F16C present on this CPU
Isa active_isa();              // what kernels use now
const char* isa_name(Isa isa);
// "auto" (best supported), "avx2" (error if unsupported) or "portable". Also read once from
// the MOEOPS_CPU_ISA environment variable. Returns the active ISA's name.
std::string set_isa(const std::string& name);

}  // namespace moeops::cpu
