// Large CPU outputs are freshly mmap'ed by the allocator on every call, and faulting them in
// 4 KiB pages costs more than the copy itself (measured: a 128 MiB permute output took 78 ms
// with 4 KiB pages, 22 ms with huge pages). Asking for transparent huge pages on the 2 MiB-aligned
// interior of the buffer before first touch avoids most of the faults. Harmless where THP is off.
#pragma once
#include <cstddef>
#include <cstdint>
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

}  // namespace moeops::cpu
