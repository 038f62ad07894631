// bench_machine: this machine's fp32 FMA peak and STREAM-triad bandwidth, 1 and 2 threads, so
// every other report can say "% of peak".
//
// FMA peak: 12 independent accumulator registers (enough to cover FMA latency × throughput on
// current x86: 4-cycle latency × 2 ports = 8 in flight), each updated with a vector FMA in a loop
// that touches no memory: flops = 2 · width · 12 per iteration of the inner loop.
// Triad: a[i] = b[i] + s·c[i] over arrays of 3 × 64 MiB (far beyond cache): bytes counted as
// STREAM does, 3 × 4 bytes per element (read b, read c, write a; the write-allocate read of a is
// not counted, as in STREAM).
#include "bench_support.hpp"

#include <lowmem/core/threading.hpp>
#include <lowmem/simd/simd.hpp>

#include <vector>

namespace {
using Arch = lowmem::simd::default_arch;
using F = lowmem::simd::fbatch<Arch>;
constexpr int accumulators = 12;

float fma_kernel(std::int64_t iters, float seed) {
  F acc[accumulators];
  for (int k = 0; k < accumulators; ++k) acc[k] = F(seed + float(k));
  const F a(0.999999f), b(1e-7f);
  for (std::int64_t i = 0; i < iters; ++i) {
    for (int k = 0; k < accumulators; ++k) acc[k] = lowmem::simd::fma<Arch>(acc[k], a, b);
  }
  F s = acc[0];
  for (int k = 1; k < accumulators; ++k) s += acc[k];
  return lowmem::simd::reduce_add(s);
}

void BM_machine_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  const std::int64_t iters = 1 << 20;
  float sink = 0;
  for (auto _ : state) {
    lowmem::parallel_for(
        0, threads, 1,
        [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
          for (std::ptrdiff_t t = b; t < e; ++t) {
            float r = fma_kernel(iters, float(t));
            benchmark::DoNotOptimize(r);
            sink += 0 * r;
          }
        },
        threads);
  }
  benchmark::DoNotOptimize(sink);
  lowmem::bench::set_flops(state, 2.0 * double(lowmem::simd::width<Arch>) * accumulators *
                                      double(iters) * threads);
  state.SetLabel(Arch::name());
}
BENCHMARK(BM_machine_fma_peak)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_machine_triad(benchmark::State& state) {
  const int threads = int(state.range(0));
  const std::size_t n = lowmem::bench::smoke() ? (1 << 20) : (16u << 20); // 64 MiB per array
  std::vector<float> a(n, 0.f), b(n, 1.f), c(n, 2.f);
  const float s = 3.f;
  auto triad = [&](std::ptrdiff_t lo, std::ptrdiff_t hi, int) {
    float* __restrict pa = a.data();
    const float* __restrict pb = b.data();
    const float* __restrict pc = c.data();
    for (std::ptrdiff_t i = lo; i < hi; ++i) pa[i] = pb[i] + s * pc[i];
  };
  lowmem::parallel_for(0, std::ptrdiff_t(n), 1 << 16, triad, threads); // first touch by owners
  for (auto _ : state) {
    lowmem::parallel_for(0, std::ptrdiff_t(n), 1 << 16, triad, threads);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n) * 12);
}
BENCHMARK(BM_machine_triad)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
} // namespace

BENCHMARK_MAIN();
