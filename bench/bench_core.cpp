// bench_core: RNG fill throughput, lowmem (vectorized Philox4x32-10) vs the naive baseline
// (std::mt19937 + std::normal_distribution / uniform_real_distribution), 1 and 2 threads.
// Counter: items/s = samples per second. Shape: 1M samples (4 MiB, L2/L3-resident) and 16M.
#include "bench_support.hpp"

#include <lowmem/core.hpp>

#include <random>
#include <vector>

namespace {
using lowmem::random::stream;

template <class Fill> void run_fill(benchmark::State& state, Fill fill) {
  const std::size_t n = std::size_t(state.range(0));
  std::vector<float> out(n);
  std::uint64_t offset = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    fill(offset, out.data(), n);
    offset += n; // fresh values every iteration
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(n));
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n) * 4);
}

void BM_core_normal_lowmem(benchmark::State& state) {
  const bool parallel = state.range(1) > 1;
  run_fill(state, [&](std::uint64_t off, float* out, std::size_t n) {
    lowmem::random::fill_normal(stream{7, 1}, off, out, n, parallel);
  });
}
void BM_core_uniform_lowmem(benchmark::State& state) {
  const bool parallel = state.range(1) > 1;
  run_fill(state, [&](std::uint64_t off, float* out, std::size_t n) {
    lowmem::random::fill_uniform(stream{7, 1}, off, out, n, parallel);
  });
}
void BM_core_rademacher_lowmem(benchmark::State& state) {
  const bool parallel = state.range(1) > 1;
  run_fill(state, [&](std::uint64_t off, float* out, std::size_t n) {
    lowmem::random::fill_rademacher(stream{7, 1}, off, out, n, parallel);
  });
}
void BM_core_normal_naive(benchmark::State& state) {
  std::mt19937 gen(7);
  std::normal_distribution<float> dist;
  run_fill(state, [&](std::uint64_t, float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = dist(gen);
  });
}
void BM_core_uniform_naive(benchmark::State& state) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> dist;
  run_fill(state, [&](std::uint64_t, float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = dist(gen);
  });
}

// Single-thread cases are timed in CPU time (robust when other processes share the core: rates
// are per CPU-second of this thread); the 2-thread case needs wall time and gets its own name.
void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "threads"});
  for (std::int64_t n : {std::int64_t(1) << 20, std::int64_t(1) << 24}) {
    if (lowmem::bench::smoke() && n > (1 << 20)) continue;
    b->Args({n, 1});
  }
  b->Unit(benchmark::kMillisecond);
}
// The 2-thread case twice: wall time (the speed-up a user sees) and process CPU time summed over
// both threads (Google Benchmark suffixes /process_time), whose rate is per CPU-second: on a
// shared machine, wall time also counts the seconds a descheduled thread waits, CPU time does not.
void shapes_threads(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "threads"});
  b->Args({std::int64_t(1) << (lowmem::bench::smoke() ? 20 : 24), 2});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void shapes_threads_cpu(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "threads"});
  b->Args({std::int64_t(1) << (lowmem::bench::smoke() ? 20 : 24), 2});
  b->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}
} // namespace

BENCHMARK(BM_core_normal_lowmem)->Name("BM_core_normal/lowmem")->Apply(shapes);
BENCHMARK(BM_core_normal_lowmem)->Name("BM_core_normal/lowmem")->Apply(shapes_threads);
BENCHMARK(BM_core_normal_lowmem)->Name("BM_core_normal/lowmem")->Apply(shapes_threads_cpu);
BENCHMARK(BM_core_normal_naive)->Name("BM_core_normal/naive")->Apply(shapes);
BENCHMARK(BM_core_uniform_lowmem)->Name("BM_core_uniform/lowmem")->Apply(shapes);
BENCHMARK(BM_core_uniform_lowmem)->Name("BM_core_uniform/lowmem")->Apply(shapes_threads);
BENCHMARK(BM_core_uniform_lowmem)->Name("BM_core_uniform/lowmem")->Apply(shapes_threads_cpu);
BENCHMARK(BM_core_uniform_naive)->Name("BM_core_uniform/naive")->Apply(shapes);
BENCHMARK(BM_core_rademacher_lowmem)->Name("BM_core_rademacher/lowmem")->Apply(shapes);
BENCHMARK(BM_core_rademacher_lowmem)->Name("BM_core_rademacher/lowmem")->Apply(shapes_threads);
BENCHMARK(BM_core_rademacher_lowmem)->Name("BM_core_rademacher/lowmem")->Apply(shapes_threads_cpu);

BENCHMARK_MAIN();
