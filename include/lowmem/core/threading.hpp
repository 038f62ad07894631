// lowmem/core/threading.hpp — OpenMP when the consumer compiles with it, serial otherwise.
//
// lowmem never starts threads of its own. `parallel_for` splits [begin, end) into contiguous
// chunks of at least `grain` items, one chunk per call of `fn(chunk_begin, chunk_end, thread)`.
// Chunk boundaries depend only on (begin, end, grain, max_threads()), and each item is processed
// by exactly one call: a kernel whose per-item result does not depend on chunking is bitwise
// identical for 1 and N threads.
#pragma once

#include <algorithm>
#include <cstddef>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace lowmem {

/// Threads lowmem may use: omp_get_max_threads() under OpenMP, else 1.
inline int max_threads() noexcept {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// True when called from inside a lowmem (or any OpenMP) parallel region.
inline bool in_parallel() noexcept {
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

/// Starts the OpenMP thread team (up to `threads`, default max_threads()) so that its one-time
/// allocations happen here and not inside a measured region: the OpenMP runtime allocates its
/// team on the first parallel region of a given size. A no-op without OpenMP.
inline void warm_up_threads(int threads = 0) noexcept {
#if defined(_OPENMP)
  if (threads <= 0) threads = omp_get_max_threads();
  for (int t = 1; t <= threads; ++t) {
#pragma omp parallel num_threads(t)
    { (void)omp_get_thread_num(); }
  }
#else
  (void)threads;
#endif
}

/// Number of chunks parallel_for uses for n items with the given grain and thread budget.
inline std::ptrdiff_t chunk_count(std::ptrdiff_t n, std::ptrdiff_t grain, int threads) noexcept {
  if (n <= 0) return 0;
  grain = std::max<std::ptrdiff_t>(grain, 1);
  std::ptrdiff_t by_grain = (n + grain - 1) / grain;
  return std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(by_grain, threads));
}

/// Calls fn(b, e, t) for contiguous chunks [b, e) of [begin, end), in parallel under OpenMP.
/// `threads` <= 0 means max_threads(). Nested calls run serially.
template <class F>
void parallel_for(std::ptrdiff_t begin, std::ptrdiff_t end, std::ptrdiff_t grain, F&& fn,
                  int threads = 0) {
  const std::ptrdiff_t n = end - begin;
  if (n <= 0) return;
  if (threads <= 0) threads = max_threads();
  if (in_parallel()) threads = 1;
  const std::ptrdiff_t chunks = chunk_count(n, grain, threads);
  if (chunks == 1) {
    fn(begin, end, 0);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(static_cast <int>(chunks)) schedule(static, 1)
#endif
  for (std::ptrdiff_t c = 0; c < chunks; ++c) {
    const std::ptrdiff_t b = begin + n * c / chunks;
    const std::ptrdiff_t e = begin + n * (c + 1) / chunks;
    fn(b, e, static_cast<int>(c));
  }
}

} // namespace lowmem
