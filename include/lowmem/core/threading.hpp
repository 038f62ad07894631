// lowmem/core/threading.hpp — OpenMP when the consumer compiles with it, serial otherwise.
//
// lowmem never starts threads of its own. `parallel_for` splits [begin, end) into contiguous
// chunks, one chunk per call of `fn(chunk_begin, chunk_end, thread)`. Each item is processed by
// exactly one call: a kernel whose per-item result does not depend on chunking is bitwise
// identical for 1 and N threads.
//
// The split is by work, not by items. The caller states what one item costs (`item_work`, in
// work units: one fp32 value streamed from or to memory, or one multiply-add, whichever the item
// mostly does; an estimate within ~2x is enough) and every chunk gets at least `min_chunk_work`
// units. So:
//   * a call whose total work is below 2·min_chunk_work runs on the calling thread and opens no
//     OpenMP region: no fork/join for a few thousand flops, and nothing allocated (libgomp
//     allocates its team on the first region of a size, which a no-allocation region must not
//     see) — whatever the thread budget;
//   * chunks = min(threads, items / ceil(min_chunk_work / item units)), boundaries
//     begin + n·c / chunks: a function of (begin, end, item_work, threads) only.
// Callers choose items so that the split never changes a result: items are independent (each
// writes its own outputs, with its own reduction order), or aligned the way a documented
// contract needs (the optimizers' 64-element units and 2048-element groups).
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

/// Estimated cost of one parallel_for item in work units (see the header comment): e.g. a row of
/// `cols` floats updated in place is item_work{2 * cols}; a dot product of length k, item_work{k}.
struct item_work {
  std::ptrdiff_t units;
};

/// Least work of one parallel_for chunk, in work units. 32K units ≈ 16K floats updated in place ≈
/// 5–10 µs of one core, against ~1–5 µs (more on a loaded machine) to fork and join a team.
inline constexpr std::ptrdiff_t min_chunk_work = std::ptrdiff_t(1) << 15;

/// Items that make one chunk of at least min_chunk_work: ceil(min_chunk_work / w.units), >= 1.
inline constexpr std::ptrdiff_t items_per_chunk(item_work w) noexcept {
  return w.units >= min_chunk_work ? 1
         : w.units <= 1            ? min_chunk_work
                                   : (min_chunk_work + w.units - 1) / w.units;
}

/// Number of chunks parallel_for uses for n items of work w with the given thread budget:
/// min(threads, n / items_per_chunk(w)), at least 1 (0 when n <= 0).
inline std::ptrdiff_t chunk_count(std::ptrdiff_t n, item_work w, int threads) noexcept {
  if (n <= 0) return 0;
  const std::ptrdiff_t by_work = n / items_per_chunk(w);
  return std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(by_work, threads));
}

/// Calls fn(b, e, t) for contiguous chunks [b, e) of [begin, end), chunk t of chunk_count(...),
/// in parallel under OpenMP when there are two chunks or more (else once, on the calling thread,
/// with no OpenMP region). `threads` <= 0 means max_threads(). Nested calls run serially.
template <class F>
void parallel_for(std::ptrdiff_t begin, std::ptrdiff_t end, item_work work, F&& fn,
                  int threads = 0) {
  const std::ptrdiff_t n = end - begin;
  if (n <= 0) return;
  if (threads <= 0) threads = max_threads();
  if (in_parallel()) threads = 1;
  const std::ptrdiff_t chunks = chunk_count(n, work, threads);
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
