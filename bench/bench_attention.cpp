// bench_attention: tiled attention (lowmem) vs a plain Eigen implementation that materialises S
// and P (naive), forward and forward+backward. B = 1, Hq = 8, d in {64, 128}, N in {512 .. 8192},
// causal and not, GQA 8:2. Counters: flops (4·N²·d·Hq for the forward, half when causal; the
// backward counts 2.5× that, so fwd+bwd = 3.5×), peak_MiB (heap growth inside the timed loop).
// The naive path reuses one N × N S and one dP per head (2·N² floats; the full-batch tensors
// PyTorch builds are Hq times that). Naive cases are registered up to N = 4096.
// BM_attention_fwdbwd_deterministic runs the two-pass backward (opt.deterministic).
// Thread-scaling diagnostics of the lowmem cases: cpu_all_ms, the CPU time of every thread of the
// process per iteration, and par_eff = cpu_all_ms / (threads · real time). On a quiet machine,
// par_eff < 1 is time a thread sat idle (waiting for the others, or starting late), and
// cpu_all_ms(2 threads) / cpu_all_ms(1 thread) > 1 is work that got slower on two cores. Under
// load, descheduled time also lowers par_eff. OpenMP threads spin for a while at barriers, which
// counts as busy: run with OMP_WAIT_POLICY=passive to count only work.
#include "bench_support.hpp"

#include <Eigen/Core>
#include <lowmem/attention.hpp>
#include <lowmem/core/eigen.hpp>
#include <lowmem/core/random.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <vector>

namespace {
using lowmem::RowMatrixXf;
constexpr long H = 8;

struct inputs {
  long N, d, hkv;
  std::vector<float> q, k, v, o, dout, lse, dq, dk, dv;
  inputs(long n, long dim, long kv) : N(n), d(dim), hkv(kv) {
    const auto fill = [](std::vector<float>& x, std::size_t cnt, std::uint64_t id) {
      x.resize(cnt);
      const lowmem::random::stream s{11, id};
      lowmem::random::fill_uniform(s, 0, x.data(), cnt);
      for (auto& e : x) e = 2 * e - 1;
    };
    fill(q, std::size_t(H * N * d), 1);
    fill(k, std::size_t(hkv * N * d), 2);
    fill(v, std::size_t(hkv * N * d), 3);
    fill(dout, std::size_t(H * N * d), 4);
    o.assign(q.size(), 0.f);
    lse.assign(std::size_t(H * N), 0.f);
    dq.assign(q.size(), 0.f);
    dk.assign(k.size(), 0.f);
    dv.assign(k.size(), 0.f);
  }
};

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double fwd_flops(long N, long d, bool causal) {
  return 4.0 * double(N) * double(N) * double(d) * H * (causal ? 0.5 : 1.0);
}

void BM_lowmem(benchmark::State& state, bool backward, bool deterministic = false) {
  const long N = state.range(0), d = state.range(1), hkv = state.range(3);
  const bool causal = state.range(2) != 0;
  inputs in(N, d, hkv);
  lowmem::attention_options opt;
  opt.causal = causal;
  opt.threads = int(state.range(4));
  opt.deterministic = deterministic;
  using lowmem::attention_bhnd;
  const auto Q = attention_bhnd<const float>(in.q.data(), 1, H, N, d);
  const auto K = attention_bhnd<const float>(in.k.data(), 1, hkv, N, d);
  const auto V = attention_bhnd<const float>(in.v.data(), 1, hkv, N, d);
  const auto O = attention_bhnd(in.o.data(), 1, H, N, d);
  lowmem::bench::peak_memory peak; // includes the workspace, allocated per iteration
  const double cpu0 = process_cpu_seconds();
  const auto wall0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    lowmem::owned_workspace ws(lowmem::attention_workspace_bytes(d, opt.threads));
    lowmem::attention_forward(Q, K, V, O, in.lse.data(), opt, ws.get());
    if (backward)
      lowmem::attention_backward(Q, K, V, lowmem::attention_tensor<const float>(O),
                                 attention_bhnd<const float>(in.dout.data(), 1, H, N, d),
                                 in.lse.data(), attention_bhnd(in.dq.data(), 1, H, N, d),
                                 attention_bhnd(in.dk.data(), 1, hkv, N, d),
                                 attention_bhnd(in.dv.data(), 1, hkv, N, d), opt, ws.get());
    benchmark::ClobberMemory();
  }
  const double cpu = process_cpu_seconds() - cpu0,
               wall =
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  peak.report(state);
  lowmem::bench::set_flops(state, fwd_flops(N, d, causal) * (backward ? 3.5 : 1.0));
  const double iters = double(std::max<benchmark::IterationCount>(state.iterations(), 1));
  state.counters["cpu_all_ms"] = 1e3 * cpu / iters;
  state.counters["par_eff"] = wall > 0 ? cpu / (wall * double(std::max(opt.threads, 1))) : 0.0;
}

/// Plain Eigen: S = scale·Q Kᵀ materialised per head, masked, row softmax, O = P V; backward
/// dV = Pᵀ dO, dP = dO Vᵀ, dS = P∘(dP − D), dQ = scale·dS K, dK = scale·dSᵀ Q.
void BM_naive(benchmark::State& state, bool backward) {
  const long N = state.range(0), d = state.range(1), hkv = state.range(3);
  const bool causal = state.range(2) != 0;
  inputs in(N, d, hkv);
  const float scale = 1.f / std::sqrt(float(d));
  using CMap = Eigen::Map<const RowMatrixXf>;
  using MMap = Eigen::Map<RowMatrixXf>;
  Eigen::setNbThreads(1); // one thread, like the lowmem cases it is compared with
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    RowMatrixXf S(N, N), dP;
    if (backward) dP.resize(N, N);
    for (long h = 0; h < H; ++h) {
      const long hk = h / (H / hkv);
      CMap Qh(in.q.data() + h * N * d, N, d), Kh(in.k.data() + hk * N * d, N, d),
          Vh(in.v.data() + hk * N * d, N, d), dOh(in.dout.data() + h * N * d, N, d);
      MMap Oh(in.o.data() + h * N * d, N, d);
      S.noalias() = scale * (Qh * Kh.transpose());
      for (long i = 0; i < N; ++i) {
        auto row = S.row(i);
        if (causal) row.tail(N - i - 1).setConstant(-INFINITY);
        const float m = row.maxCoeff();
        row = (row.array() - m).exp();
        row /= row.sum();
      }
      Oh.noalias() = S * Vh;
      if (!backward) continue;
      MMap dQh(in.dq.data() + h * N * d, N, d), dKh(in.dk.data() + hk * N * d, N, d),
          dVh(in.dv.data() + hk * N * d, N, d);
      dVh.noalias() += S.transpose() * dOh;
      dP.noalias() = dOh * Vh.transpose();
      const Eigen::VectorXf D = (dOh.array() * Oh.array()).rowwise().sum();
      dP = S.array() * (dP.array().colwise() - D.array());
      dQh.noalias() += scale * (dP * Kh);
      dKh.noalias() += scale * (dP.transpose() * Qh);
    }
    benchmark::ClobberMemory();
  }
  peak.report(state);
  lowmem::bench::set_flops(state, fwd_flops(N, d, causal) * (backward ? 3.5 : 1.0));
}

void shapes(benchmark::internal::Benchmark* b, bool naive) {
  b->ArgNames({"N", "d", "causal", "hkv", "threads"});
  const bool smoke = lowmem::bench::smoke();
  for (long N : {512L, 1024L, 2048L, 4096L, 8192L}) {
    if (smoke && N > 512) continue;
    if (naive && N > 4096) continue;
    for (long d : {64L, 128L})
      for (long causal : {0L, 1L}) {
        b->Args({N, d, causal, 8, 1});
        if (d == 64) b->Args({N, d, causal, 2, 1}); // GQA 8:2
      }
    if (!naive)
      for (long causal : {0L, 1L}) b->Args({N, 64, causal, 8, 2}); // 2 threads
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void shapes_lowmem(benchmark::internal::Benchmark* b) { shapes(b, false); }
/// The deterministic (two-pass) backward: N = 2048 and 4096, d = 64, on 1 and 2 threads.
void shapes_det(benchmark::internal::Benchmark* b) {
  b->ArgNames({"N", "d", "causal", "hkv", "threads"});
  for (long N : {2048L, 4096L}) {
    if (lowmem::bench::smoke() && N > 512) N = 512;
    for (long causal : {0L, 1L})
      for (long threads : {1L, 2L}) b->Args({N, 64, causal, 8, threads});
    if (lowmem::bench::smoke()) break;
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void shapes_naive(benchmark::internal::Benchmark* b) { shapes(b, true); }
} // namespace

BENCHMARK_CAPTURE(BM_lowmem, fwd, false)->Name("BM_attention_forward/lowmem")->Apply(shapes_lowmem);
BENCHMARK_CAPTURE(BM_naive, fwd, false)->Name("BM_attention_forward/naive")->Apply(shapes_naive);
BENCHMARK_CAPTURE(BM_lowmem, fwdbwd, true)
    ->Name("BM_attention_fwdbwd/lowmem")
    ->Apply(shapes_lowmem);
BENCHMARK_CAPTURE(BM_naive, fwdbwd, true)->Name("BM_attention_fwdbwd/naive")->Apply(shapes_naive);
BENCHMARK_CAPTURE(BM_lowmem, fwdbwd_det, true, true)
    ->Name("BM_attention_fwdbwd_deterministic/lowmem")
    ->Apply(shapes_det);

BENCHMARK_MAIN();
