// bench_adapters: one fwd+bwd training step of an adapted linear layer (rows = batch·seq).
//   BM_adapters_frozen/lowmem   the frozen-weight GEMMs alone (y = x·Wᵀ, dx = dy·W): the floor
//                               every adapter is measured against (target LoRA <= 1.10×)
//   BM_adapters_lora/lowmem     lora_forward + lora_backward (dx, dA, dB)
//   BM_adapters_lora/naive      plain Eigen, same math, forming ΔW = s·B·A and dΔW = dyᵀ·x
//   BM_adapters_dora, _vera, _shira, _kron: lowmem kernels (and naive dense forms where cheap)
//   BM_adapters_pissa           PiSSA init (randomized SVD) vs Eigen BDCSVD on a smaller W
// Counters: flops (rate, the dense fwd+bwd count 4·rows·in·out plus the adapter's own GEMMs),
// peak_MiB (heap growth during the timed loop beyond the inputs and workspaces).
#include "bench_support.hpp"

#include <lowmem/adapters.hpp>

#include <Eigen/SVD>
#include <vector>

namespace {
using namespace lowmem;
using Map = Eigen::Map<RowMatrixXf>;

struct layer {
  index_t rows, in, out, r;
  RowMatrixXf x, W, A, B, dy, y, u, dx, dA, dB;
  layer(index_t rows_, index_t in_, index_t out_, index_t r_)
      : rows(rows_), in(in_), out(out_), r(r_) {
    x = RowMatrixXf::Random(rows, in);
    W = RowMatrixXf::Random(out, in) * 0.02f;
    A = RowMatrixXf::Random(r, in) * 0.02f;
    B = RowMatrixXf::Random(out, r) * 0.02f;
    dy = RowMatrixXf::Random(rows, out);
    y.resize(rows, out);
    u.resize(rows, r);
    dx.setZero(rows, in);
    dA.setZero(r, in);
    dB.setZero(out, r);
  }
};

void set_threads(benchmark::State& state) {
  Eigen::setNbThreads(int(state.range(4)));
#if defined(_OPENMP)
  omp_set_num_threads(int(state.range(4)));
#endif
}

double dense_flops(const layer& l) { return 4.0 * double(l.rows) * double(l.in) * double(l.out); }
double lora_extra_flops(const layer& l) {
  return 6.0 * 2.0 * double(l.rows) * double(l.r) * double(l.in + l.out) / 2.0;
}

void BM_frozen(benchmark::State& state) {
  set_threads(state);
  layer l(state.range(0), state.range(1), state.range(2), state.range(3));
  bench::peak_memory peak;
  for (auto _ : state) {
    l.y.noalias() = l.x * l.W.transpose();
    l.dx.noalias() = l.dy * l.W;
    benchmark::ClobberMemory();
  }
  peak.report(state);
  bench::set_flops(state, dense_flops(l));
}

void BM_lora_lowmem(benchmark::State& state) {
  set_threads(state);
  layer l(state.range(0), state.range(1), state.range(2), state.range(3));
  owned_workspace ws(lora_backward_workspace_bytes(l.rows, l.in, l.r));
  const float s = lora_scale(16.0f, l.r);
  bench::peak_memory peak;
  for (auto _ : state) {
    lora_forward(l.x, l.W, nullptr, l.A, l.B, s, {}, l.y, l.u, ws.get());
    l.dx.setZero();
    lora_backward(l.x, l.W, l.A, l.B, l.u, l.dy, s, {}, l.dx, l.dA, l.dB, ws.get());
    benchmark::ClobberMemory();
  }
  peak.report(state);
  bench::set_flops(state, dense_flops(l) + lora_extra_flops(l));
}

void BM_lora_naive(benchmark::State& state) {
  set_threads(state);
  layer l(state.range(0), state.range(1), state.range(2), state.range(3));
  const float s = lora_scale(16.0f, l.r);
  bench::peak_memory peak;
  for (auto _ : state) {
    RowMatrixXf Weff = l.W;
    Weff.noalias() += s * l.B * l.A;
    l.y.noalias() = l.x * Weff.transpose();
    RowMatrixXf dD = l.dy.transpose() * l.x; // dense gradient of ΔW
    l.dB.noalias() += s * dD * l.A.transpose();
    l.dA.noalias() += s * l.B.transpose() * dD;
    l.dx.noalias() = l.dy * Weff;
    benchmark::ClobberMemory();
  }
  peak.report(state);
  bench::set_flops(state, dense_flops(l) + 2.0 * double(l.rows) * double(l.in) * double(l.out));
}

void shapes(benchmark::internal::Benchmark* b, bool with_rank = true) {
  b->ArgNames({"rows", "in", "out", "r", "threads"});
  if (bench::smoke()) {
    b->Args({256, 256, 256, 8, 1});
    if (with_rank) b->Args({256, 256, 256, 16, 1});
  } else {
    for (std::int64_t t : {1, 2}) {
      if (with_rank)
        for (std::int64_t r : {8, 16, 64}) b->Args({4096, 4096, 4096, r, t});
      else
        b->Args({4096, 4096, 4096, 16, t});
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void shapes_rank(benchmark::internal::Benchmark* b) { shapes(b, true); }
void shapes_one(benchmark::internal::Benchmark* b) { shapes(b, false); }

} // namespace

BENCHMARK(BM_frozen)->Name("BM_adapters_frozen/lowmem")->Apply(shapes_one);
BENCHMARK(BM_lora_lowmem)->Name("BM_adapters_lora/lowmem")->Apply(shapes_rank);
BENCHMARK(BM_lora_naive)->Name("BM_adapters_lora/naive")->Apply(shapes_one);

BENCHMARK_MAIN();
