// Run-time choice of the CPU code path. No -march=native: AVX2/FMA/F16C and AVX512-BF16 kernels
// are compiled with target attributes and picked when the CPU has them; a portable path exists
// otherwise. The tiers are ordered: avx512bf16 runs the AVX2 kernels elsewhere, and the expert
// GEMMs on 512-bit registers: bf16 x bf16 dot products (vdpbf16ps) when activations and weights
// are both bf16, 512-bit FMAs otherwise.
#pragma once
#include <string>

namespace moeops::cpu {

enum class Isa { Portable = 0, Avx2 = 1, Avx512Bf16 = 2 };

bool cpu_supports_avx2();        // AVX2 + FMA + F16C present on this CPU
bool cpu_supports_avx512bf16();  // AVX2 tier + AVX512 F/BW/VL + AVX512_BF16
Isa active_isa();                // what kernels use now
inline bool use_avx2() { return active_isa() >= Isa::Avx2; }
inline bool use_avx512bf16() { return active_isa() == Isa::Avx512Bf16; }
const char* isa_name(Isa isa);
// "auto" (best supported), "avx512bf16" / "avx2" (error if unsupported) or "portable". Also
// read once from the MOEOPS_CPU_ISA environment variable. Returns the active ISA's name.
std::string set_isa(const std::string& name);

}  // namespace moeops::cpu
