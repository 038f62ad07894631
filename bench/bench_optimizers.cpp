// bench_optimizers: one optimizer step over `tensors` tensors of `size` fp32 parameters
// (default 100 × 1M = 100M parameters; smoke 4 × 64K).
//  * adamw/lowmem: fused fp32 AdamW (28 bytes/param moved: p r/w, g r, m r/w, v r/w);
//    adamw/naive: the same math as plain Eigen array expressions per tensor (one pass each);
//  * adamw8bit, adamw4bit, lion, lion8bit, sgd (momentum): lowmem only; their bytes counter uses
//    the bytes they actually move (p r/w + g + state r/w);
//  * projected methods on one 4096×4096 matrix (smoke 512²): GaLore / APOLLO / FRUGAL at r = 128,
//    APOLLO-Mini at r = 1, step time without the projection refresh, the GaLore randomized-SVD
//    refresh timed alone (amortised over T = 200 steps in practice), fused AdamW on the same
//    matrix; counter state_MiB.
//  * adamw8bit_part/<part> (AVX512-VBMI builds): the pieces of one 8-bit AdamW group step on
//    one L1-resident group of 2048 values, so the step's compute can be split without a profiler
//    (this VM exposes no PMU): encode_signed / encode_unsigned (encode256, m and v codes),
//    decode (decode256), update (adam_span, the fp32 AdamW arithmetic incl. vsqrtps / vdivps);
//    items/s counts values.
// Counters: bytes/s (SetBytesProcessed), peak_MiB (heap growth inside the timed loop).
#include "bench_support.hpp"

#include <Eigen/Core>
#include <lowmem/core/eigen.hpp>
#include <lowmem/optimizers.hpp>

#include <memory>
#include <vector>

namespace {

struct model {
  std::vector<std::vector<float>> p, g;
  model(std::size_t tensors, std::size_t size) {
    for (std::size_t t = 0; t < tensors; ++t) {
      p.emplace_back(size);
      g.emplace_back(size);
      const lowmem::random::stream s{1, t};
      lowmem::random::fill_uniform(s, 0, p.back().data(), size);
      lowmem::random::fill_uniform(s, size, g.back().data(), size);
    }
  }
};

void shapes(benchmark::internal::Benchmark* b, bool threads2 = true) {
  b->ArgNames({"tensors", "size", "threads"});
  if (lowmem::bench::smoke()) {
    b->Args({4, 1 << 16, 1});
  } else {
    b->Args({100, 1 << 20, 1});
    if (threads2) b->Args({100, 1 << 20, 2});
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}
void shapes1(benchmark::internal::Benchmark* b) { shapes(b, false); }

void finish(benchmark::State& state, double bytes_per_param) {
  const double n = double(state.range(0)) * double(state.range(1));
  state.SetBytesProcessed(std::int64_t(double(state.iterations()) * n * bytes_per_param));
}

void BM_adamw_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  const int threads = int(state.range(2));
  model md(T, N);
  std::vector<std::vector<float>> m(T, std::vector<float>(N, 0.f)), v = m;
  std::int64_t step = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    ++step;
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::adamw_step(md.p[t].data(), md.g[t].data(), m[t].data(), v[t].data(), N, step,
                                {}, threads);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 28);
}

void BM_adamw_naive(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  model md(T, N);
  std::vector<std::vector<float>> m(T, std::vector<float>(N, 0.f)), v = m;
  const lowmem::optim::adamw_config c;
  std::int64_t step = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    ++step;
    const double bc1 = 1 - std::pow(c.beta1, double(step)),
                 bc2 = 1 - std::pow(c.beta2, double(step));
    const float decay = float(1 - c.lr * c.weight_decay), step_size = float(c.lr / bc1),
                isb = float(1 / std::sqrt(bc2)), b1 = float(c.beta1), b2 = float(c.beta2),
                eps = float(c.eps);
    for (std::size_t t = 0; t < T; ++t) {
      Eigen::Map<Eigen::ArrayXf> p(md.p[t].data(), Eigen::Index(N)),
          mm(m[t].data(), Eigen::Index(N)), vv(v[t].data(), Eigen::Index(N));
      Eigen::Map<const Eigen::ArrayXf> g(md.g[t].data(), Eigen::Index(N));
      // PyTorch's single-tensor sequence, one Eigen expression per torch op group
      p *= decay;
      mm = b1 * mm + (1 - b1) * g;
      vv = b2 * vv + (1 - b2) * g.square();
      p -= step_size * mm / (vv.sqrt() * isb + eps);
    }
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 28);
}

template <int Bits> void BM_adamwq_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  const int threads = int(state.range(2));
  model md(T, N);
  std::vector<std::unique_ptr<lowmem::optim::quantized_state>> s;
  std::size_t state_bytes = 0;
  for (std::size_t t = 0; t < T; ++t) {
    s.push_back(std::make_unique<lowmem::optim::quantized_state>(N, Bits, 2));
    state_bytes += s.back()->bytes();
  }
  std::int64_t step = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    ++step;
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::adamw_step(md.p[t].data(), md.g[t].data(), *s[t], N, step, {}, threads);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  const double per_param = double(state_bytes) / double(T * N);
  state.counters["state_B_per_param"] = per_param;
  finish(state, 12 + 2 * per_param);
}

void BM_lion_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  model md(T, N);
  std::vector<std::vector<float>> m(T, std::vector<float>(N, 0.f));
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::lion_step(md.p[t].data(), md.g[t].data(), m[t].data(), N, {},
                               int(state.range(2)));
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 20);
}

void BM_lion8_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  model md(T, N);
  std::vector<std::unique_ptr<lowmem::optim::quantized_state>> s;
  for (std::size_t t = 0; t < T; ++t)
    s.push_back(std::make_unique<lowmem::optim::quantized_state>(N, 8, 1));
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::lion_step(md.p[t].data(), md.g[t].data(), *s[t], N, {}, int(state.range(2)));
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 14);
}

void BM_sgd_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  model md(T, N);
  std::vector<std::vector<float>> b(T, std::vector<float>(N, 0.f));
  std::int64_t step = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    ++step;
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::sgd_step(md.p[t].data(), md.g[t].data(), b[t].data(), N, step,
                              {1e-2, 0.9, 0.0, 0.0, false}, int(state.range(2)));
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 20);
}

void BM_adamw_bf16_lowmem(benchmark::State& state) {
  const std::size_t T = std::size_t(state.range(0)), N = std::size_t(state.range(1));
  model md(T, N);
  std::vector<std::vector<lowmem::bf16>> pb(T, std::vector<lowmem::bf16>(N));
  for (std::size_t t = 0; t < T; ++t) lowmem::to_bf16(md.p[t].data(), pb[t].data(), N);
  md.p.clear();
  md.p.shrink_to_fit();
  std::vector<std::vector<float>> m(T, std::vector<float>(N, 0.f)), v = m;
  std::int64_t step = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    ++step;
    for (std::size_t t = 0; t < T; ++t)
      lowmem::optim::adamw_step(pb[t].data(), md.g[t].data(), m[t].data(), v[t].data(), N, step, {},
                                lowmem::random::stream{7, std::uint64_t(step) * T + t},
                                int(state.range(2)));
    benchmark::ClobberMemory();
  }
  peak.report(state);
  finish(state, 24);
}

#if defined(__AVX512VBMI__)
// part: 0 encode_signed, 1 encode_unsigned, 2 decode, 3 update
void BM_adamw8bit_part(benchmark::State& state, int part) {
  namespace k = lowmem::optim::kernels;
  constexpr std::size_t G = k::group_size;
  alignas(64) static float m[G], v[G], p[G], g[G], out[G];
  alignas(64) static std::uint8_t codes[G];
  const lowmem::random::stream s{3, 0};
  lowmem::random::fill_uniform(s, 0, m, G); // [0, 1)
  lowmem::random::fill_uniform(s, G, v, G);
  lowmem::random::fill_uniform(s, 2 * G, g, G);
  for (std::size_t i = 0; i < G; ++i) { // m, g in [-1, 1); v = u^4 spans several decades
    m[i] = 2 * m[i] - 1, g[i] = 2 * g[i] - 1, v[i] *= v[i] * v[i] * v[i], p[i] = 0.5f;
  }
  const k::codebook &sm = k::signed_dynamic8(), &um = k::unsigned_dynamic8();
  const k::avx512::encode256 enc_m(sm), enc_v(um);
  const k::avx512::decode256 dec(sm);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (std::size_t j = 0; j < G; j += 64) enc_m.store64<true>(m + j, one, codes + j);
  const auto c = lowmem::optim::detail::adam_coeffs(1e-3, 0.9, 0.999, 1e-8, 0.01, true, 10);
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    if (part == 0) {
      for (std::size_t j = 0; j < G; j += 64) enc_m.store64<true>(m + j, one, codes + j);
    } else if (part == 1) {
      for (std::size_t j = 0; j < G; j += 64) enc_v.store64<false>(v + j, one, codes + j);
    } else if (part == 2) {
      for (std::size_t j = 0; j < G; j += 64) {
        __m512 o[4];
        dec.get(codes + j, one, o);
        for (int r = 0; r < 4; ++r) _mm512_store_ps(out + j + 16 * r, o[r]);
      }
    } else {
      // p, m, v drift by ~1e-3 per call; the values stay finite and normal for any run length
      k::adam_span<lowmem::simd::default_arch, false>(p, g, m, v, G, c);
    }
    benchmark::DoNotOptimize(codes);
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(G));
}
BENCHMARK_CAPTURE(BM_adamw8bit_part, encode_signed, 0)
    ->Name("BM_optimizers_adamw8bit_part/lowmem/encode_signed");
BENCHMARK_CAPTURE(BM_adamw8bit_part, encode_unsigned, 1)
    ->Name("BM_optimizers_adamw8bit_part/lowmem/encode_unsigned");
BENCHMARK_CAPTURE(BM_adamw8bit_part, decode, 2)->Name("BM_optimizers_adamw8bit_part/lowmem/decode");
BENCHMARK_CAPTURE(BM_adamw8bit_part, update, 3)->Name("BM_optimizers_adamw8bit_part/lowmem/update");
#endif

// ---- projected methods on one matrix [m, n] ------------------------------------------------

lowmem::optim::projected_config projected_cfg(int method, std::int64_t rank) {
  lowmem::optim::projected_config c;
  c.method = lowmem::optim::projection_method(method);
  c.rank = rank;
  c.update_gap = std::int64_t(1) << 40; // refresh only at step 1 (timed separately below)
  if (c.method == lowmem::optim::projection_method::apollo_mini) c.scale = 128;
  return c;
}

// args: m, n, rank; method chosen by the registration
template <int Method> void BM_projected_step(benchmark::State& state) {
  const lowmem::index_t m = state.range(0), n = state.range(1);
  lowmem::RowMatrixXf W(m, n), G(m, n);
  lowmem::random::fill_uniform({3, 0}, 0, W.data(), std::size_t(W.size()));
  lowmem::random::fill_normal({3, 1}, 0, G.data(), std::size_t(G.size()));
  lowmem::optim::projected_adam opt(m, n, projected_cfg(Method, state.range(2)));
  opt.step(W, G); // step 1: projection refresh
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    opt.step(W, G);
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.counters["state_MiB"] = double(opt.state_bytes()) / (1 << 20);
}

template <int Method> void BM_projected_refresh(benchmark::State& state) {
  const lowmem::index_t m = state.range(0), n = state.range(1);
  lowmem::RowMatrixXf G(m, n);
  lowmem::random::fill_normal({3, 1}, 0, G.data(), std::size_t(G.size()));
  lowmem::optim::projected_adam opt(m, n, projected_cfg(Method, state.range(2)));
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    opt.refresh(G);
    benchmark::ClobberMemory();
  }
  peak.report(state); // amortised per step: this time / T (T = 200 by default)
}

void BM_adamw_matrix(benchmark::State& state) {
  const std::size_t N = std::size_t(state.range(0) * state.range(1));
  std::vector<float> p(N), g(N), m(N, 0.f), v(N, 0.f);
  lowmem::random::fill_uniform({3, 0}, 0, p.data(), N);
  lowmem::random::fill_normal({3, 1}, 0, g.data(), N);
  std::int64_t t = 0;
  lowmem::bench::peak_memory peak;
  for (auto _ : state) {
    lowmem::optim::adamw_step(p.data(), g.data(), m.data(), v.data(), N, ++t, {});
    benchmark::ClobberMemory();
  }
  peak.report(state);
  state.counters["state_MiB"] = double(8 * N) / (1 << 20);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(N) * 28);
}

void matrix_shapes(benchmark::internal::Benchmark* b, std::int64_t rank) {
  b->ArgNames({"m", "n", "rank"});
  if (lowmem::bench::smoke())
    b->Args({512, 512, rank <= 1 ? rank : 32});
  else
    b->Args({4096, 4096, rank});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

} // namespace

BENCHMARK(BM_adamw_matrix)->Name("BM_optimizers_adamw_matrix/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 0);
});
BENCHMARK(BM_projected_step<0>)->Name("BM_optimizers_galore/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 128);
});
BENCHMARK(BM_projected_refresh<0>)->Name("BM_optimizers_galore_refresh/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 128);
});
BENCHMARK(BM_projected_step<1>)->Name("BM_optimizers_apollo/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 128);
});
BENCHMARK(BM_projected_step<2>)->Name("BM_optimizers_apollomini/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 1);
});
BENCHMARK(BM_projected_step<3>)->Name("BM_optimizers_frugal/lowmem")->Apply([](auto* b) {
  matrix_shapes(b, 128);
});

BENCHMARK(BM_adamw_lowmem)->Name("BM_optimizers_adamw/lowmem")->Apply([](auto* b) { shapes(b); });
BENCHMARK(BM_adamw_naive)->Name("BM_optimizers_adamw/naive")->Apply(shapes1);
BENCHMARK(BM_adamwq_lowmem<8>)->Name("BM_optimizers_adamw8bit/lowmem")->Apply([](auto* b) {
  shapes(b);
});
BENCHMARK(BM_adamwq_lowmem<4>)->Name("BM_optimizers_adamw4bit/lowmem")->Apply([](auto* b) {
  shapes(b);
});
BENCHMARK(BM_adamw_bf16_lowmem)->Name("BM_optimizers_adamwbf16/lowmem")->Apply(shapes1);
BENCHMARK(BM_lion_lowmem)->Name("BM_optimizers_lion/lowmem")->Apply(shapes1);
BENCHMARK(BM_lion8_lowmem)->Name("BM_optimizers_lion8bit/lowmem")->Apply(shapes1);
BENCHMARK(BM_sgd_lowmem)->Name("BM_optimizers_sgd/lowmem")->Apply(shapes1);

BENCHMARK_MAIN();
