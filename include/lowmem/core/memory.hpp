// lowmem/core/memory.hpp — memory accounting: peak heap bytes inside a region, and proof that a
// region allocates nothing.
//
// Counting needs hooks on the process's allocator. A header-only library cannot install them by
// itself, so exactly one translation unit of the program (the test main, a benchmark main, an
// example) includes <lowmem/core/memory_hooks.hpp>, which replaces the global operator new/delete
// and, in non-sanitizer builds on glibc, malloc/calloc/realloc/free/aligned_alloc/posix_memalign
// (Eigen allocates through malloc). Without the hooks, `tracking_enabled()` is false and regions
// report zero: callers that assert on them must check it first.
//
//   lowmem::memory::region r;            // starts counting
//   kernel(...);
//   r.peak_bytes();                      // max over the region of (live heap bytes - at start)
//   r.allocations();                     // number of allocation calls inside the region
//
// Byte counts are the allocator's usable sizes (malloc_usable_size), so they can exceed the
// requested sizes by a few bytes per block. Counters are process-wide atomics: allocations by
// other threads during the region count too (that is what a peak-memory claim must include).
// One region at a time (a second concurrent region throws). The OpenMP runtime allocates its
// thread team on first use: call lowmem::warm_up_threads() before a region that runs threads.
//
// `ledger` is the other kind of accounting: bytes a trainer *declares* per category (parameters,
// gradients, optimizer state, activations), with a running total and peak, independent of hooks.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>

#include "errors.hpp"

namespace lowmem::memory {

namespace detail {
struct counters {
  std::atomic<std::int64_t> live{0};        // bytes currently allocated through the hooks
  std::atomic<std::int64_t> peak{0};        // max of live since the last region start
  std::atomic<std::int64_t> allocations{0}; // allocation calls since process start
  std::atomic<bool> hooks_installed{false};
  std::atomic<bool> malloc_hooked{false}; // malloc/free themselves are counted (not under ASan)
  std::atomic<bool> region_open{false};
};
inline counters& global() noexcept {
  static counters c; // constant-initialised: safe to use from the very first allocation
  return c;
}
/// Called by the hooks after a successful allocation of `bytes` usable bytes.
inline void on_allocate(std::int64_t bytes) noexcept {
  auto& c = global();
  c.allocations.fetch_add(1, std::memory_order_relaxed);
  const std::int64_t now = c.live.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  std::int64_t p = c.peak.load(std::memory_order_relaxed);
  while (now > p && !c.peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
  }
}
inline void on_free(std::int64_t bytes) noexcept {
  global().live.fetch_sub(bytes, std::memory_order_relaxed);
}
} // namespace detail

/// True when the program installed <lowmem/core/memory_hooks.hpp>.
inline bool tracking_enabled() noexcept { return detail::global().hooks_installed.load(); }

/// True when malloc/free are counted too (not only operator new/delete): false in sanitizer
/// builds, where Eigen's and C-library allocations are invisible to regions.
inline bool tracking_malloc() noexcept { return detail::global().malloc_hooked.load(); }

/// Bytes currently live on the heap (allocated through the hooks).
inline std::int64_t live_bytes() noexcept { return detail::global().live.load(); }

/// A measuring region: peak heap growth and allocation count between construction and the query.
class region {
public:
  region() {
    auto& c = detail::global();
    bool expected = false;
    if (!c.region_open.compare_exchange_strong(expected, true))
      throw std::logic_error("lowmem::memory::region: another region is already open");
    start_live_ = c.live.load();
    c.peak.store(start_live_);
    start_allocs_ = c.allocations.load();
  }
  ~region() { detail::global().region_open.store(false); }
  region(const region&) = delete;
  region& operator=(const region&) = delete;

  /// Max over the region of live heap bytes minus the live bytes at its start (>= 0).
  std::int64_t peak_bytes() const noexcept {
    const std::int64_t p = detail::global().peak.load() - start_live_;
    return p > 0 ? p : 0;
  }
  double peak_mib() const noexcept { return double(peak_bytes()) / (1024.0 * 1024.0); }
  /// Allocation calls made inside the region (any thread).
  std::int64_t allocations() const noexcept {
    return detail::global().allocations.load() - start_allocs_;
  }
  /// Live bytes now minus at the start (negative if the region freed older blocks).
  std::int64_t net_bytes() const noexcept { return detail::global().live.load() - start_live_; }

private:
  std::int64_t start_live_ = 0;
  std::int64_t start_allocs_ = 0;
};

/// Declared-bytes accounting for trainers: add/release bytes by category; total and peak.
class ledger {
public:
  void add(const std::string& category, std::int64_t bytes) {
    require_non_negative("memory::ledger::add", "bytes", bytes);
    by_category_[category] += bytes;
    total_ += bytes;
    if (total_ > peak_) peak_ = total_;
  }
  void release(const std::string& category, std::int64_t bytes) {
    auto it = by_category_.find(category);
    const std::int64_t have = it == by_category_.end() ? 0 : it->second;
    require_in_closed("memory::ledger::release", "bytes", std::int64_t(0), have, bytes);
    it->second -= bytes;
    total_ -= bytes;
  }
  std::int64_t bytes(const std::string& category) const {
    auto it = by_category_.find(category);
    return it == by_category_.end() ? 0 : it->second;
  }
  std::int64_t total() const noexcept { return total_; }
  std::int64_t peak() const noexcept { return peak_; }
  const std::map<std::string, std::int64_t>& categories() const noexcept { return by_category_; }

private:
  std::map<std::string, std::int64_t> by_category_;
  std::int64_t total_ = 0;
  std::int64_t peak_ = 0;
};

} // namespace lowmem::memory
