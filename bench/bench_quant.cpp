// bench_quant: quantizer throughput (GB/s counted on the fp32 side) and quantized linear kernels.
//  * int8 / NF4 block-64 quantize + dequantize, FP4 (e2m1) block-64 quantize, FP8 e4m3 encode +
//    decode: 100M floats, 1 thread, and 256K floats (L2-resident: the kernel's compute throughput);
//    lowmem vs naive (plain scalar loops / Eigen per block, same math);
//  * FWHT on 4096-length rows (lowmem vs a textbook scalar FWHT);
//  * 4096×4096 W: NF4 / int4 / int8 GEMV (batch 1) and dequant-GEMM (4096 rows) vs fp32 Eigen
//    (BM_quant_gemv_fp32/naive, BM_quant_gemm_fp32/naive); "naive" for a quantized format is
//    dequantize-the-whole-W then Eigen (peak_MiB shows its fp32 copy; lowmem's is ~0);
//    .../threads:2 rows split W's rows over 2 threads (real time is the figure there); GEMVs
//    report bytes/s of W as stored (fp32: 4 bytes per weight; quantized: codes + scales);
//  * BM_quant_gemv_int8dyn: int8 W with the activation quantized per 64-group on the fly
//    (qlinear_forward_int8_dynamic, AVX512-VNNI), 1 and 2 threads; bytes counted on W.
// LOWMEM_BENCH_SMOKE=1 shrinks every shape.
#include "bench_support.hpp"

#include <lowmem/core.hpp>
#include <lowmem/quant.hpp>

#include <cmath>
#include <map>
#include <vector>

namespace {
using namespace lowmem;
using namespace lowmem::quant;

std::size_t big_n() { return bench::smoke() ? (std::size_t(1) << 20) : std::size_t(100000000); }

const std::vector<float>& input(std::size_t n) { // one normal input per size, made once
  static std::map<std::size_t, std::vector<float>> inputs;
  std::vector<float>& x = inputs[n];
  if (x.size() != n) {
    x.resize(n);
    random::fill_normal(random::stream{1, 1}, 0, x.data(), n, true);
  }
  return x;
}

void bytes(benchmark::State& st, std::size_t n) {
  st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(n) * 4);
}

// ---- int8 block-64 -----------------------------------------------------------------------------
void BM_int8_quant_lowmem(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  std::vector<float> s(n / 64);
  bench::peak_memory peak;
  for (auto _ : st) {
    affine_quantize(x.data(), 1, index_t(n), {8, true, granularity::per_group, 64}, q.data(),
                    s.data(), nullptr);
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_int8_quant_naive(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::int8_t> q(n);
  std::vector<float> s(n / 64);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t b = 0; b < n / 64; ++b) {
      Eigen::Map<const Eigen::ArrayXf> xb(x.data() + 64 * b, 64);
      const float sc = xb.abs().maxCoeff() / 127.0f;
      const float inv = sc > 0 ? 1.0f / sc : 0.0f;
      s[b] = sc;
      for (int k = 0; k < 64; ++k)
        q[64 * b + std::size_t(k)] = std::int8_t(std::nearbyint(xb[k] * inv));
    }
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_int8_dequant_lowmem(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  std::vector<float> s(n / 64), y(n);
  const affine_format f{8, true, granularity::per_group, 64};
  affine_quantize(x.data(), 1, index_t(n), f, q.data(), s.data(), nullptr);
  bench::peak_memory peak;
  for (auto _ : st) {
    affine_dequantize(q.data(), s.data(), nullptr, 1, index_t(n), f, y.data());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_int8_dequant_naive(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  std::vector<std::int8_t> q(n, 3);
  std::vector<float> s(n / 64, 0.5f), y(n);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t b = 0; b < n / 64; ++b)
      for (std::size_t k = 0; k < 64; ++k) y[64 * b + k] = float(q[64 * b + k]) * s[b];
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}

// ---- NF4 block-64 ------------------------------------------------------------------------------
void fourbit_quant_lowmem(benchmark::State& st, fourbit t) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n / 2);
  std::vector<float> s(n / 64);
  bench::peak_memory peak;
  for (auto _ : st) {
    fourbit_quantize(x.data(), n, t, 64, q.data(), s.data());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void fourbit_quant_naive(benchmark::State& st, fourbit t) { // nearest of 16 levels by distance
  const float* levels = fourbit_levels(t);
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n / 2);
  std::vector<float> s(n / 64);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t b = 0; b < n / 64; ++b) {
      Eigen::Map<const Eigen::ArrayXf> xb(x.data() + 64 * b, 64);
      const float am = xb.abs().maxCoeff();
      s[b] = am;
      const float inv = am > 0 ? 1.0f / am : 0.0f;
      for (std::size_t k = 0; k < 64; k += 2) {
        int c[2];
        for (int e = 0; e < 2; ++e) {
          const float v = xb[Eigen::Index(k) + e] * inv;
          int best = 0;
          for (int l = 1; l < 16; ++l)
            if (std::fabs(v - levels[l]) < std::fabs(v - levels[best])) best = l;
          c[e] = best;
        }
        q[(64 * b + k) / 2] = std::uint8_t(c[0] << 4 | c[1]);
      }
    }
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_nf4_dequant_lowmem(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n / 2);
  std::vector<float> s(n / 64), y(n);
  fourbit_quantize(x.data(), n, fourbit::nf4, 64, q.data(), s.data());
  bench::peak_memory peak;
  for (auto _ : st) {
    fourbit_dequantize(q.data(), s.data(), n, fourbit::nf4, 64, y.data());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_nf4_dequant_naive(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  std::vector<std::uint8_t> q(n / 2, 0x3A);
  std::vector<float> s(n / 64, 0.5f), y(n);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t i = 0; i < n; i += 2) {
      const float sc = s[i / 64];
      y[i] = kernels::nf4_levels[q[i / 2] >> 4] * sc;
      y[i + 1] = kernels::nf4_levels[q[i / 2] & 15] * sc;
    }
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}

// ---- FP8 ---------------------------------------------------------------------------------------
void BM_fp8_encode_lowmem(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  bench::peak_memory peak;
  for (auto _ : st) {
    fp8_encode(x.data(), n, fp8_format::e4m3, q.data());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_fp8_encode_naive(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t i = 0; i < n; ++i) q[i] = to_fp8(x[i], fp8_format::e4m3);
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_fp8_decode_lowmem(benchmark::State& st) {
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  std::vector<float> y(n);
  fp8_encode(x.data(), n, fp8_format::e4m3, q.data());
  bench::peak_memory peak;
  for (auto _ : st) {
    fp8_decode(q.data(), n, fp8_format::e4m3, y.data());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}
void BM_fp8_decode_naive(benchmark::State& st) { // 256-entry table lookup
  const std::size_t n = std::size_t(st.range(0));
  const auto& x = input(n);
  std::vector<std::uint8_t> q(n);
  std::vector<float> y(n);
  fp8_encode(x.data(), n, fp8_format::e4m3, q.data());
  float lut[256];
  for (int c = 0; c < 256; ++c) lut[c] = from_fp8(std::uint8_t(c), fp8_format::e4m3);
  bench::peak_memory peak;
  for (auto _ : st) {
    for (std::size_t i = 0; i < n; ++i) y[i] = lut[q[i]];
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, n);
}

// ---- FWHT on 4096-length rows ------------------------------------------------------------------
void BM_fwht_lowmem(benchmark::State& st) {
  const index_t rows = st.range(0), len = st.range(1);
  std::vector<float> x(input(std::size_t(rows * len)));
  bench::peak_memory peak;
  for (auto _ : st) {
    for (index_t r = 0; r < rows; ++r) fwht(x.data() + r * len, len);
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, std::size_t(rows * len));
}
void BM_fwht_naive(benchmark::State& st) {
  const index_t rows = st.range(0), len = st.range(1);
  std::vector<float> x(input(std::size_t(rows * len)));
  const float norm = 1.0f / std::sqrt(float(len));
  bench::peak_memory peak;
  for (auto _ : st) {
    for (index_t r = 0; r < rows; ++r) {
      float* p = x.data() + r * len;
      for (index_t h = 1; h < len; h *= 2)
        for (index_t i = 0; i < len; i += 2 * h)
          for (index_t j = i; j < i + h; ++j) {
            const float a = p[j], b = p[j + h];
            p[j] = a + b, p[j + h] = a - b;
          }
      for (index_t i = 0; i < len; ++i) p[i] *= norm;
    }
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bytes(st, std::size_t(rows * len));
}

// ---- quantized linear --------------------------------------------------------------------------
const RowMatrixXf& dense_w(index_t out, index_t in) {
  static RowMatrixXf W;
  if (W.rows() != out || W.cols() != in) {
    W.resize(out, in);
    random::fill_normal(random::stream{2, 2}, 0, W.data(), std::size_t(W.size()), true);
    W *= 0.02f;
  }
  return W;
}

void linear_case(benchmark::State& st, weight_format f, bool lowmem_impl, int threads = 1) {
  const index_t M = st.range(0), out = st.range(1), in = st.range(2);
  const auto q = qweight_storage::quantize(dense_w(out, in), f, 64);
  const qweight W = q.view();
  RowMatrixXf x(M, in), y(M, out);
  random::fill_normal(random::stream{3, 3}, 0, x.data(), std::size_t(x.size()));
  owned_workspace ws(qlinear_workspace_bytes(W, M));
  warm_up_threads(threads);
  bench::peak_memory peak;
  for (auto _ : st) {
    if (lowmem_impl) {
      qlinear_forward(x, W, y, ws.get(), threads);
    } else { // naive: dequantize all of W, then Eigen
      RowMatrixXf Wd(out, in);
      dequantize_weight(W, Wd);
      y.noalias() = x * Wd.transpose();
    }
    benchmark::ClobberMemory();
  }
  peak.report(st);
  st.counters["ws_MiB"] = double(ws.capacity()) / (1 << 20);
  st.counters["W_MiB"] = double(q.bytes()) / (1 << 20);
  if (M < 8) // GEMV: W streamed once per call (bytes/s of W as stored: codes + scales)
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(q.bytes()));
  bench::set_flops(st, 2.0 * double(M) * double(out) * double(in));
}
void fp32_case(benchmark::State& st) {
  const index_t M = st.range(0), out = st.range(1), in = st.range(2);
  const RowMatrixXf& W = dense_w(out, in);
  RowMatrixXf x(M, in), y(M, out);
  random::fill_normal(random::stream{3, 3}, 0, x.data(), std::size_t(x.size()));
  bench::peak_memory peak;
  for (auto _ : st) {
    if (M == 1)
      y.row(0).transpose().noalias() = W * x.row(0).transpose();
    else
      y.noalias() = x * W.transpose();
    benchmark::ClobberMemory();
  }
  peak.report(st);
  st.counters["W_MiB"] = double(W.size()) * 4 / (1 << 20);
  if (M < 8) // GEMV: W streamed once per call
    st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(W.size()) * 4);
  bench::set_flops(st, 2.0 * double(M) * double(out) * double(in));
}

// int8 W with the activation quantized per 64-group on the fly (VNNI int8 x int8 -> int32).
void BM_gemv_int8dyn_lowmem(benchmark::State& st) {
  const index_t M = st.range(0), out = st.range(1), in = st.range(2);
  const int threads = int(st.range(3));
  const auto q = qweight_storage::quantize(dense_w(out, in), weight_format::int8_sym, 64);
  RowMatrixXf x(M, in), y(M, out);
  random::fill_normal(random::stream{3, 3}, 0, x.data(), std::size_t(x.size()));
  owned_workspace ws(qlinear_int8_dynamic_workspace_bytes(q.view()));
  warm_up_threads(threads);
  bench::peak_memory peak;
  for (auto _ : st) {
    qlinear_forward_int8_dynamic(x, q.view(), y, ws.get(), threads);
    benchmark::ClobberMemory();
  }
  peak.report(st);
  st.counters["vnni"] = kernels::int8_gemm_has_vnni ? 1 : 0;
  st.counters["W_MiB"] = double(q.bytes()) / (1 << 20);
  st.SetBytesProcessed(std::int64_t(st.iterations()) * std::int64_t(q.bytes()));
  bench::set_flops(st, 2.0 * double(M) * double(out) * double(in));
}

void BM_int8gemm_lowmem(benchmark::State& st) { // exact int8 x int8 -> int32 (VNNI)
  const index_t M = st.range(0), N = st.range(1), K = st.range(2);
  std::vector<std::int8_t> a(std::size_t(M * K)), b(std::size_t(N * K));
  random::stream s{4, 4};
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::int8_t(s.bits(i) % 255 - 127);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::int8_t(s.bits(i + a.size()) % 255 - 127);
  std::vector<std::int32_t> c(std::size_t(M * N));
  owned_workspace ws(int8_gemm_workspace_bytes(N));
  bench::peak_memory peak;
  for (auto _ : st) {
    int8_gemm(a.data(), b.data(), M, N, K, c.data(), ws.get());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  st.counters["vnni"] = kernels::int8_gemm_has_vnni ? 1 : 0;
  bench::set_flops(st, 2.0 * double(M) * double(N) * double(K));
}
void BM_llm_int8_lowmem(benchmark::State& st) {
  const index_t M = st.range(0), N = st.range(1), K = st.range(2);
  const auto q = qweight_storage::quantize(dense_w(N, K), weight_format::int8_sym, K);
  RowMatrixXf x(M, K), y(M, N);
  random::fill_normal(random::stream{3, 3}, 0, x.data(), std::size_t(x.size()));
  for (index_t m = 0; m < M; m += 7) x(m, 5) = 30.f; // one outlier feature column
  owned_workspace ws(llm_int8_workspace_bytes(N, K));
  bench::peak_memory peak;
  for (auto _ : st) {
    llm_int8_forward(x, q.view(), 6.0f, y, ws.get());
    benchmark::ClobberMemory();
  }
  peak.report(st);
  bench::set_flops(st, 2.0 * double(M) * double(N) * double(K));
}

// 100M floats (DRAM-bound), and 256K floats (1 MiB: L2-resident, so the figure is the kernel's
// own throughput, free of the memory system and of other processes' bandwidth).
void big_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n"})
      ->Arg(std::int64_t(big_n()))
      ->Arg(std::int64_t(1) << 18)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}
void fwht_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "n"})
      ->Args({bench::smoke() ? 64 : 4096, 4096})
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}
void gemv_args(benchmark::internal::Benchmark* b) {
  const std::int64_t d = bench::smoke() ? 512 : 4096;
  b->ArgNames({"M", "out", "in"})->Args({1, d, d})->UseRealTime()->Unit(benchmark::kMicrosecond);
}
void gemm_args(benchmark::internal::Benchmark* b) {
  const std::int64_t d = bench::smoke() ? 256 : 4096;
  b->ArgNames({"M", "out", "in"})->Args({d, d, d})->UseRealTime()->Unit(benchmark::kMillisecond);
}

struct registrar {
  registrar() {
    benchmark::RegisterBenchmark("BM_quant_int8_quantize/lowmem", BM_int8_quant_lowmem)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_int8_quantize/naive", BM_int8_quant_naive)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_int8_dequantize/lowmem", BM_int8_dequant_lowmem)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_int8_dequantize/naive", BM_int8_dequant_naive)
        ->Apply(big_args);
    for (auto [name, t] :
         {std::pair<const char*, fourbit>{"nf4", fourbit::nf4}, {"fp4", fourbit::fp4}}) {
      const fourbit tt = t;
      benchmark::RegisterBenchmark((std::string("BM_quant_") + name + "_quantize/lowmem").c_str(),
                                   [tt](benchmark::State& st) { fourbit_quant_lowmem(st, tt); })
          ->Apply(big_args);
      benchmark::RegisterBenchmark((std::string("BM_quant_") + name + "_quantize/naive").c_str(),
                                   [tt](benchmark::State& st) { fourbit_quant_naive(st, tt); })
          ->Apply(big_args);
    }
    benchmark::RegisterBenchmark("BM_quant_nf4_dequantize/lowmem", BM_nf4_dequant_lowmem)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_nf4_dequantize/naive", BM_nf4_dequant_naive)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_fp8_encode/lowmem", BM_fp8_encode_lowmem)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_fp8_encode/naive", BM_fp8_encode_naive)->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_fp8_decode/lowmem", BM_fp8_decode_lowmem)
        ->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_fp8_decode/naive", BM_fp8_decode_naive)->Apply(big_args);
    benchmark::RegisterBenchmark("BM_quant_fwht/lowmem", BM_fwht_lowmem)->Apply(fwht_args);
    benchmark::RegisterBenchmark("BM_quant_fwht/naive", BM_fwht_naive)->Apply(fwht_args);
    benchmark::RegisterBenchmark("BM_quant_int8gemm/lowmem", BM_int8gemm_lowmem)->Apply(gemm_args);
    benchmark::RegisterBenchmark("BM_quant_llm_int8/lowmem", BM_llm_int8_lowmem)->Apply(gemm_args);
    for (auto [name, f] : {std::pair<const char*, weight_format>{"nf4", weight_format::nf4},
                           {"int4", weight_format::int4_sym}}) {
      const weight_format ff = f;
      const std::int64_t d = bench::smoke() ? 512 : 4096;
      benchmark::RegisterBenchmark((std::string("BM_quant_gemv_") + name + "/lowmem").c_str(),
                                   [ff](benchmark::State& st) { linear_case(st, ff, true, 2); })
          ->ArgNames({"M", "out", "in", "threads"})
          ->Args({1, d, d, 2})
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
    for (std::int64_t th : {1, 2})
      benchmark::RegisterBenchmark("BM_quant_gemv_int8dyn/lowmem", BM_gemv_int8dyn_lowmem)
          ->ArgNames({"M", "out", "in", "threads"})
          ->Args({1, bench::smoke() ? 512 : 4096, bench::smoke() ? 512 : 4096, th})
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    const std::pair<const char*, weight_format> fmts[] = {{"nf4", weight_format::nf4},
                                                          {"int4", weight_format::int4_sym},
                                                          {"int8", weight_format::int8_sym}};
    for (const char* op : {"gemv", "gemm"}) {
      auto args = std::string(op) == "gemv" ? gemv_args : gemm_args;
      benchmark::RegisterBenchmark((std::string("BM_quant_") + op + "_fp32/naive").c_str(),
                                   fp32_case)
          ->Apply(args);
      for (auto [name, f] : fmts) {
        const weight_format ff = f;
        benchmark::RegisterBenchmark(
            (std::string("BM_quant_") + op + "_" + name + "/lowmem").c_str(),
            [ff](benchmark::State& st) { linear_case(st, ff, true); })
            ->Apply(args);
        benchmark::RegisterBenchmark(
            (std::string("BM_quant_") + op + "_" + name + "/naive").c_str(),
            [ff](benchmark::State& st) { linear_case(st, ff, false); })
            ->Apply(args);
      }
    }
  }
} registrar_instance;
} // namespace

BENCHMARK_MAIN();
