// bench_zeroth_order: one full zeroth-order step (perturb +ε, perturb −2ε, restore + update) on
// 100M fp32 parameters in 100 spans of 1M, lowmem (seed-regenerated z, fused sweeps, 0 bytes of
// heap) vs naive (what a straightforward C++ implementation does: std::mt19937 +
// std::normal_distribution filling a stored z, then three plain loops), 1 and 2 threads; q-SPSA
// q = 8 on 10M; EGGROLL batched forward for population 64 on a 4096² matrix, rank 1, vs forming
// each W + E_j explicitly (Eigen), and the low-rank update.
// Counters: bytes/s = parameter bytes the step must move (read + write θ in each sweep:
// 8 bytes × sweeps × n), peak_MiB (heap growth during the timed loop).
#include "bench_support.hpp"

#include <Eigen/Core>
#include <lowmem/zeroth_order.hpp>

#include <random>
#include <vector>

namespace {

using lowmem::index_t;

struct param_store {
  std::vector<std::vector<float>> spans;
  param_store(std::int64_t n, std::int64_t count) {
    for (std::int64_t k = 0; k < count; ++k) spans.emplace_back(std::size_t(n / count), 0.01f);
  }
};

void BM_step_lowmem(benchmark::State& state) {
  const std::int64_t n = state.range(0), count = state.range(1);
  const int threads = int(state.range(2)), q = int(state.range(3));
  const bool rademacher = state.range(4) != 0;
  param_store p(n, count);
  lowmem::zo::parameters params;
  for (std::int64_t k = 0; k < count; ++k)
    params.add(std::uint64_t(k), p.spans[std::size_t(k)].data(), p.spans[std::size_t(k)].size());
  lowmem::zo::options o;
  o.lr = 1e-6f;
  o.q = q;
  o.threads = threads;
  o.dist = rademacher ? lowmem::zo::noise::rademacher : lowmem::zo::noise::gaussian;
  lowmem::zo::optimizer opt(params, o);
  const float* probe = p.spans[0].data();
  auto loss = [&] { return double(probe[0]) + double(probe[1]); }; // the user's forward
  opt.step(loss);                                                  // warm-up
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    opt.step(loss);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * n * 8 * (2 * q + 1));
}

// What a straightforward implementation does: draw z into a stored buffer with the standard
// library's generator, then perturb / perturb / restore+update with plain loops.
void BM_step_naive(benchmark::State& state) {
  const std::int64_t n = state.range(0), count = state.range(1);
  param_store p(n, count);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  const float eps = 1e-3f, lr = 1e-6f;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    std::vector<std::vector<float>> z(p.spans.size());
    for (std::size_t k = 0; k < p.spans.size(); ++k) {
      z[k].resize(p.spans[k].size());
      for (auto& v : z[k]) v = normal(gen);
    }
    for (std::size_t k = 0; k < p.spans.size(); ++k)
      for (std::size_t i = 0; i < z[k].size(); ++i) p.spans[k][i] += eps * z[k][i];
    const double lp = p.spans[0][0] + p.spans[0][1];
    for (std::size_t k = 0; k < p.spans.size(); ++k)
      for (std::size_t i = 0; i < z[k].size(); ++i) p.spans[k][i] -= 2 * eps * z[k][i];
    const double lm = p.spans[0][0] + p.spans[0][1];
    const float g = float((lp - lm) / (2 * eps));
    for (std::size_t k = 0; k < p.spans.size(); ++k)
      for (std::size_t i = 0; i < z[k].size(); ++i) p.spans[k][i] += (eps - lr * g) * z[k][i];
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * n * 8 * 3);
}

void step_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "spans", "threads", "q", "rademacher"});
  const bool smoke = lowmem::bench::smoke();
  const std::int64_t n = smoke ? 2'000'000 : 100'000'000, spans = smoke ? 4 : 100;
  b->Args({n, spans, 1, 1, 0})->Args({n, spans, 2, 1, 0})->Args({n, spans, 1, 1, 1});
  b->Args({n / 10, spans, 1, 8, 0});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void naive_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "spans", "threads", "q", "rademacher"});
  const bool smoke = lowmem::bench::smoke();
  const std::int64_t n = smoke ? 2'000'000 : 100'000'000, spans = smoke ? 4 : 100;
  b->Args({n, spans, 1, 1, 0});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

// ---- EGGROLL ------------------------------------------------------------------------------

struct eggroll_data {
  index_t pop, rows, in, out, rank;
  std::vector<float> x, w, y;
  explicit eggroll_data(benchmark::State& s)
      : pop(s.range(0)), rows(s.range(1)), in(s.range(2)), out(s.range(3)), rank(s.range(4)),
        x(std::size_t(pop * rows * in)), w(std::size_t(out * in)),
        y(std::size_t(pop * rows * out)) {
    lowmem::random::fill_normal(lowmem::random::stream{1, 1}, 0, x.data(), x.size());
    lowmem::random::fill_normal(lowmem::random::stream{1, 2}, 0, w.data(), w.size());
  }
  double flops() const { return 2.0 * double(pop * rows) * double(in) * double(out); }
};

void BM_eggroll_forward_lowmem(benchmark::State& state) {
  eggroll_data d(state);
  lowmem::owned_workspace ws(
      lowmem::zo::eggroll_forward_workspace_bytes(d.in, d.out, d.rank, d.rows));
  const int threads = int(state.range(5));
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    lowmem::zo::eggroll_forward(
        lowmem::make_view<const float>(d.x.data(), d.pop * d.rows, d.in),
        lowmem::make_view<const float>(d.w.data(), d.out, d.in), d.pop, 0.01f, d.rank, 7, 0,
        lowmem::make_view(d.y.data(), d.pop * d.rows, d.out), ws.get(), threads);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  lowmem::bench::set_flops(state, d.flops());
}

// Naive: form each member's W + E_j = W + σ B_j A_jᵀ explicitly, then y_j = x_j (W + E_j)ᵀ.
void BM_eggroll_forward_naive(benchmark::State& state) {
  eggroll_data d(state);
  using M = lowmem::RowMatrixXf;
  Eigen::Map<const M> X(d.x.data(), d.pop * d.rows, d.in), W(d.w.data(), d.out, d.in);
  Eigen::Map<M> Y(d.y.data(), d.pop * d.rows, d.out);
  M A(d.in, d.rank), B(d.out, d.rank), Wj(d.out, d.in);
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    for (index_t j = 0; j < d.pop; ++j) {
      lowmem::zo::eggroll_factors(7, 0, std::uint64_t(j), std::size_t(d.in), std::size_t(d.out),
                                  std::size_t(d.rank), A.data(), B.data());
      Wj.noalias() = W;
      Wj.noalias() += 0.01f * B * A.transpose();
      Y.middleRows(j * d.rows, d.rows).noalias() =
          X.middleRows(j * d.rows, d.rows) * Wj.transpose();
    }
    benchmark::ClobberMemory();
  }
  peak.report(state);
  lowmem::bench::set_flops(state, d.flops());
}

void BM_eggroll_update_lowmem(benchmark::State& state) {
  eggroll_data d(state);
  std::vector<float> coeff(std::size_t(d.pop), 1e-6f);
  lowmem::owned_workspace ws(
      lowmem::zo::eggroll_update_workspace_bytes(d.in, d.out, d.rank, d.pop));
  const int threads = int(state.range(5));
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    lowmem::zo::eggroll_update(lowmem::make_view(d.w.data(), d.out, d.in), coeff.data(), d.pop,
                               d.rank, 7, 0, ws.get(), threads);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  lowmem::bench::set_flops(state, 2.0 * double(d.pop * d.rank) * double(d.in) * double(d.out));
}

// Naive: W += c_j B_j A_jᵀ one member at a time (one full pass over W per member).
void BM_eggroll_update_naive(benchmark::State& state) {
  eggroll_data d(state);
  using M = lowmem::RowMatrixXf;
  Eigen::Map<M> W(d.w.data(), d.out, d.in);
  M A(d.in, d.rank), B(d.out, d.rank);
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    for (index_t j = 0; j < d.pop; ++j) {
      lowmem::zo::eggroll_factors(7, 0, std::uint64_t(j), std::size_t(d.in), std::size_t(d.out),
                                  std::size_t(d.rank), A.data(), B.data());
      W.noalias() += 1e-6f * B * A.transpose();
    }
    benchmark::ClobberMemory();
  }
  peak.report(state);
  lowmem::bench::set_flops(state, 2.0 * double(d.pop * d.rank) * double(d.in) * double(d.out));
}

void eggroll_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"pop", "rows", "in", "out", "rank", "threads"});
  if (lowmem::bench::smoke())
    b->Args({8, 1, 256, 256, 1, 1});
  else
    b->Args({64, 1, 4096, 4096, 1, 1})->Args({64, 1, 4096, 4096, 1, 2});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void eggroll_naive_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"pop", "rows", "in", "out", "rank", "threads"});
  if (lowmem::bench::smoke())
    b->Args({8, 1, 256, 256, 1, 1});
  else
    b->Args({64, 1, 4096, 4096, 1, 1});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

} // namespace

BENCHMARK(BM_step_lowmem)->Name("BM_zeroth_order_step/lowmem")->Apply(step_shapes);
BENCHMARK(BM_step_naive)->Name("BM_zeroth_order_step/naive")->Apply(naive_shapes);
BENCHMARK(BM_eggroll_forward_lowmem)
    ->Name("BM_zeroth_order_eggroll_forward/lowmem")
    ->Apply(eggroll_shapes);
BENCHMARK(BM_eggroll_forward_naive)
    ->Name("BM_zeroth_order_eggroll_forward/naive")
    ->Apply(eggroll_naive_shapes);
BENCHMARK(BM_eggroll_update_lowmem)
    ->Name("BM_zeroth_order_eggroll_update/lowmem")
    ->Apply(eggroll_shapes);
BENCHMARK(BM_eggroll_update_naive)
    ->Name("BM_zeroth_order_eggroll_update/naive")
    ->Apply(eggroll_naive_shapes);

BENCHMARK_MAIN();
