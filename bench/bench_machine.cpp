// bench_machine: this machine's fp32 FMA peak and STREAM-triad bandwidth, 1 and 2 threads, so
// every other report can say "% of peak".
//
// FMA peak: 12 independent accumulator registers (enough to cover FMA latency × throughput on
// current x86: 4-cycle latency × 2 ports = 8 in flight), each updated with a vector FMA in a loop
// that touches no memory: flops = 2 · width · 12 per iteration of the inner loop.
// Triad: a[i] = b[i] + s·c[i] over arrays of 3 × 64 MiB (far beyond cache), 64-byte aligned and
// first touched by the thread that later streams them; bytes counted as STREAM does, 3 × 4 bytes
// per element (read b, read c, write a; the write-allocate read of a is not counted). `triad_nt`
// writes a with streaming (non-temporal) stores, which skip that write-allocate read: the figure
// STREAM reports on most x86 builds.
// Read: s += b[i] over one 256 MiB array (4 vector accumulators, no stores): this core's pure read
// bandwidth, the bound of a kernel that reads fp32 and writes much less (quantize, FP8 encode);
// `read_4parts` reads 4 contiguous quarters in turn (4 streams: more lines in flight per core).
//
// Each case is timed twice: `/real_time` (wall clock: what a dedicated machine shows) and
// `/manual_time` = the largest per-thread CPU time of the iteration (CLOCK_THREAD_CPUTIME_ID).
// On a machine shared with other jobs the wall figures under-report the hardware by the share the
// other jobs take; the CPU-time figures do not (checked against a hand-written intrinsics FMA
// loop and STREAM triad: within 2% for FMA, 10% for triad on a shared 2-core Zen 4 VM).
#include "bench_support.hpp"

#include <lowmem/core/threading.hpp>
#include <lowmem/simd/simd.hpp>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <vector>

namespace {
using Arch = lowmem::simd::default_arch;
using F = lowmem::simd::fbatch<Arch>;
constexpr int accumulators = 12;

double thread_cpu_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
#else
  return double(std::clock()) / CLOCKS_PER_SEC;
#endif
}

/// Runs body(b, e) on `threads` contiguous chunks of [0, n); returns the largest per-thread CPU
/// time (seconds) of the chunks.
template <class Body> double timed_parallel(std::ptrdiff_t n, int threads, Body&& body) {
  std::vector<double> cpu(std::size_t(threads), 0.0);
  lowmem::parallel_for(
      0, n, lowmem::item_work{lowmem::min_chunk_work}, // every item a chunk: `threads` chunks
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int t) {
        const double t0 = thread_cpu_seconds();
        body(b, e);
        cpu[std::size_t(t)] = thread_cpu_seconds() - t0;
      },
      threads);
  return *std::max_element(cpu.begin(), cpu.end());
}

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
  std::vector<float> sink(std::size_t(threads), 0.f);
  for (auto _ : state) {
    const double cpu = timed_parallel(threads, threads, [&](std::ptrdiff_t b, std::ptrdiff_t e) {
      for (std::ptrdiff_t t = b; t < e; ++t) sink[std::size_t(t)] += fma_kernel(iters, float(t));
    });
    state.SetIterationTime(cpu); // used by the /manual_time variant only
  }
  benchmark::DoNotOptimize(sink.data());
  lowmem::bench::set_flops(state, 2.0 * double(lowmem::simd::width<Arch>) * accumulators *
                                      double(iters) * threads);
  state.SetLabel(Arch::name());
}
BENCHMARK(BM_machine_fma_peak)->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_machine_fma_peak)->Arg(1)->Arg(2)->UseManualTime()->Unit(benchmark::kMillisecond);

struct free_deleter {
  void operator()(float* p) const noexcept { std::free(p); }
};
using buffer = std::unique_ptr<float[], free_deleter>;
buffer aligned_floats(std::size_t n) {
  return buffer(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64)));
}

/// Streaming (non-temporal) store of a full register to 64-byte aligned p; a plain store on
/// archs without one.
template <class A> void stream_store(float* p, const xsimd::batch<float, A>& v) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, A>::value) {
    _mm512_stream_ps(p, v);
    return;
  }
#endif
#if XSIMD_WITH_AVX
  if constexpr (std::is_base_of<xsimd::avx, A>::value) {
    _mm256_stream_ps(p, v);
    return;
  }
#endif
#if XSIMD_WITH_SSE2
  if constexpr (std::is_base_of<xsimd::sse2, A>::value) {
    _mm_stream_ps(p, v);
    return;
  }
#endif
  v.store_aligned(p);
}

/// a[i] = b[i] + s c[i] for i in [lo, hi); streaming stores when NT.
template <bool NT>
void triad(float* __restrict a, const float* __restrict b, const float* __restrict c, float s,
           std::ptrdiff_t lo, std::ptrdiff_t hi) {
  constexpr std::ptrdiff_t W = std::ptrdiff_t(lowmem::simd::width<Arch>);
  std::ptrdiff_t i = lo;
  for (; i < hi && (reinterpret_cast<std::uintptr_t>(a + i) % 64) != 0; ++i) a[i] = b[i] + s * c[i];
  const F vs(s);
  for (; i + W <= hi; i += W) {
    const F v = lowmem::simd::fma<Arch>(vs, F::load_unaligned(c + i), F::load_unaligned(b + i));
    if constexpr (NT) {
      stream_store(a + i, v);
    } else {
      v.store_aligned(a + i);
    }
  }
  for (; i < hi; ++i) a[i] = b[i] + s * c[i];
#if XSIMD_WITH_SSE2
  if constexpr (NT) _mm_sfence(); // order the streaming stores before the next iteration's loads
#endif
}

template <bool NT> void BM_machine_triad(benchmark::State& state) {
  const int threads = int(state.range(0));
  const std::size_t n = lowmem::bench::smoke() ? (1 << 20) : (16u << 20); // 64 MiB per array
  const buffer a = aligned_floats(n), b = aligned_floats(n), c = aligned_floats(n);
  // first touch by the thread that owns the chunk (same chunks as below)
  lowmem::parallel_for(
      0, std::ptrdiff_t(n), lowmem::item_work{lowmem::min_chunk_work},
      [&](std::ptrdiff_t lo, std::ptrdiff_t hi, int) {
        std::fill(a.get() + lo, a.get() + hi, 0.f);
        std::fill(b.get() + lo, b.get() + hi, 1.f);
        std::fill(c.get() + lo, c.get() + hi, 2.f);
      },
      threads);
  for (auto _ : state) {
    const double cpu =
        timed_parallel(std::ptrdiff_t(n), threads, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
          triad<NT>(a.get(), b.get(), c.get(), 3.f, lo, hi);
        });
    state.SetIterationTime(cpu);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n) * 12);
}
BENCHMARK_TEMPLATE(BM_machine_triad, false)
    ->Name("BM_machine_triad")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_triad, false)
    ->Name("BM_machine_triad")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_triad, true)
    ->Name("BM_machine_triad_nt")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_triad, true)
    ->Name("BM_machine_triad_nt")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// Sum of b[lo, hi): 4 independent vector accumulators (the adds are not the bottleneck). Parts
/// > 1: [lo, hi) cut into Parts contiguous parts read 4 vectors of each in turn (Parts streams,
/// as the large quantizers read their input: kernels::for_interleaved_parts).
template <int Parts> float read_sum(const float* b, std::ptrdiff_t lo, std::ptrdiff_t hi) {
  constexpr std::ptrdiff_t W = std::ptrdiff_t(lowmem::simd::width<Arch>);
  const std::ptrdiff_t part = (hi - lo) / Parts / (4 * W) * (4 * W);
  F s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  for (std::ptrdiff_t i = 0; i < part; i += 4 * W)
    for (int k = 0; k < Parts; ++k) {
      const float* p = b + lo + k * part + i;
      s0 += F::load_unaligned(p), s1 += F::load_unaligned(p + W);
      s2 += F::load_unaligned(p + 2 * W), s3 += F::load_unaligned(p + 3 * W);
    }
  float s = lowmem::simd::reduce_add((s0 + s1) + (s2 + s3));
  for (std::ptrdiff_t i = lo + Parts * part; i < hi; ++i) s += b[i];
  return s;
}

template <int Parts> void BM_machine_read(benchmark::State& state) {
  const int threads = int(state.range(0));
  const std::size_t n = lowmem::bench::smoke() ? (1 << 20) : (64u << 20); // 256 MiB
  const buffer b = aligned_floats(n);
  lowmem::parallel_for(
      0, std::ptrdiff_t(n), lowmem::item_work{lowmem::min_chunk_work},
      [&](std::ptrdiff_t lo, std::ptrdiff_t hi, int) {
        std::fill(b.get() + lo, b.get() + hi, 1.f);
      },
      threads);
  std::vector<float> sink(std::size_t(threads), 0.f);
  for (auto _ : state) {
    const double cpu =
        timed_parallel(std::ptrdiff_t(n), threads, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
          sink[std::size_t(lo * threads / std::ptrdiff_t(n))] += read_sum<Parts>(b.get(), lo, hi);
        });
    state.SetIterationTime(cpu);
  }
  benchmark::DoNotOptimize(sink.data());
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(n) * 4);
}
BENCHMARK_TEMPLATE(BM_machine_read, 1)
    ->Name("BM_machine_read")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_read, 1)
    ->Name("BM_machine_read")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_read, 4)
    ->Name("BM_machine_read_4parts")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_machine_read, 4)
    ->Name("BM_machine_read_4parts")
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
} // namespace

BENCHMARK_MAIN();
