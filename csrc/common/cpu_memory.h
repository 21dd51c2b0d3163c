// Large CPU outputs are freshly mmap'ed by the allocator on every call, and faulting them in
// 4 KiB pages costs more than the copy itself (measured: a 128 MiB permute output took 78 ms
// with 4 KiB pages, 22 ms with huge pages). Asking for transparent huge pages on the 2 MiB-aligned
// interior of the buffer before first touch avoids most of the faults. Harmless where THP is off.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moeops::cpu {

inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Bound on the fp32 scratch one fused-experts call allocates (gathered rows, up-projection
// output, per-slot expert outputs: (2H + N_up) * 4 bytes per slot). A call that needs more runs
// in token chunks, each a complete gather -> up -> down -> combine pass; results are the same
// bit for bit (every output element's arithmetic is independent of the chunking), and at large T
// the extra weight reads are a few percent at most. Default 1 GiB; the environment variable
// MOEOPS_CPU_WORKSPACE_MB sets it at load time, moeops._C.set_cpu_workspace_limit at run time.
inline std::atomic<int64_t>& workspace_limit_ref() {
  static std::atomic<int64_t> limit = [] {
    const char* env = std::getenv("MOEOPS_CPU_WORKSPACE_MB");
    const long long mb = env ? std::atoll(env) : 0;
    return static_cast<int64_t>(mb > 0 ? mb : 1024) << 20;
  }();
  return limit;
}
inline int64_t workspace_limit_bytes() { return workspace_limit_ref().load(std::memory_order_relaxed); }
// Returns the previous limit; bytes < 1 is rejected by the caller.
inline int64_t set_workspace_limit_bytes(int64_t bytes) { return workspace_limit_ref().exchange(bytes); }

}  // namespace moeops::cpu
