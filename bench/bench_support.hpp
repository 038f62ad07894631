// Shared benchmark conventions (see DESIGN.md):
//  * names  BM_<family>_<op>/<impl>/<shape args>, impl = lowmem | naive (plain Eigen, same math);
//  * counters: `flops` as a rate for compute-bound ops, SetBytesProcessed for bandwidth-bound
//    ones, and `peak_MiB`: peak heap bytes allocated during the timed loop beyond its inputs;
//  * every bench_<family>.cpp is one translation unit and includes this header once (it installs
//    the allocator hooks behind peak_MiB);
//  * smoke mode for CI: --benchmark_min_time=0.01 (and LOWMEM_BENCH_SMOKE=1 shrinks shapes).
#pragma once

#include <benchmark/benchmark.h>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/memory_hooks.hpp>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

namespace lowmem::bench {

/// True when LOWMEM_BENCH_SMOKE is set: benchmarks register small shapes only.
inline bool smoke() {
  const char* s = std::getenv("LOWMEM_BENCH_SMOKE");
  return s && *s && std::string(s) != "0";
}

/// Measures the peak heap growth of the timed loop. Construct right before `for (auto _ : state)`,
/// call `report(state)` after it: sets the `peak_MiB` counter.
class peak_memory {
public:
  peak_memory() : region_(std::in_place) {}
  void report(benchmark::State& state) {
    state.counters["peak_MiB"] = region_->peak_mib();
    region_.reset();
  }

private:
  std::optional<memory::region> region_;
};

/// Sets the `flops` counter as a rate (per second), given the flops of one iteration.
inline void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["flops"] = benchmark::Counter(flops_per_iteration * double(state.iterations()),
                                               benchmark::Counter::kIsRate);
}

} // namespace lowmem::bench
