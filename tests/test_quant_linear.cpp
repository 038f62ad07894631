// Quantized linear layer: forward / backward against dequantize-then-GEMM in double, every arch
// (fused AVX-512 GEMV and the generic paths), GEMV and tiled GEMM batches, gradient check, memory.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/linear.hpp>
#include <lowmem/quant/llm_int8.hpp>

#include <cmath>
#include <vector>

#include "reference/common.hpp"
#include "reference/quant_reference.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"
#include "support/random_matrix.hpp"

using namespace lowmem;
using namespace lowmem::quant;
using lowmem::test::random_matrix;

namespace {
const weight_format all_formats[] = {weight_format::int8_sym, weight_format::int8_asym,
                                     weight_format::int4_sym, weight_format::int4_asym,
                                     weight_format::nf4,      weight_format::fp4};
} // namespace

LOWMEM_ARCH_TEST_CASE("qlinear forward/backward equal dequantize-then-GEMM in double",
                      "[quant][linear]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  struct shape {
    index_t out, in, block;
  };
  // rows not a multiple of the int8 GEMV's 4-row pass; blocks with 64 | block and with 32- and
  // 16-code tails (96, 80); for the 4-bit GEMV's 128-code chunks: a last 64-code segment
  // (64, 192, 320 columns) and block 192, whose blocks begin mid-chunk
  const shape shapes[] = {{37, 128, 64}, {5, 256, 32},  {9, 128, 128}, {6, 96, 16},
                          {3, 130, 130}, {4, 512, 256}, {7, 192, 64},  {5, 192, 96},
                          {6, 160, 80},  {5, 320, 64},  {3, 576, 192}, {4, 64, 64}};
  for (weight_format f : all_formats)
    for (const shape& sh : shapes)
      for (index_t M : {1, 3, 8, 21}) {
        INFO("format " << int(f) << " out " << sh.out << " in " << sh.in << " block " << sh.block
                       << " M " << M);
        const RowMatrixXf Wd = random_matrix(sh.out, sh.in, 1 + std::uint64_t(sh.in));
        const auto q = qweight_storage::quantize<Arch>(Wd, f, sh.block);
        const qweight W = q.view();
        RowMatrixXf deq(sh.out, sh.in);
        dequantize_weight<Arch>(W, deq);
        // dequantize_weight agrees with the format's own dequantizer
        RowMatrixXf deq2(sh.out, sh.in);
        if (f == weight_format::nf4 || f == weight_format::fp4) {
          fourbit_dequantize<Arch>(q.codes.data(), q.scales.data(), std::size_t(Wd.size()),
                                   f == weight_format::nf4 ? fourbit::nf4 : fourbit::fp4, sh.block,
                                   deq2.data());
        } else {
          const int bits = (f == weight_format::int8_sym || f == weight_format::int8_asym) ? 8 : 4;
          const bool sym = f == weight_format::int8_sym || f == weight_format::int4_sym;
          affine_dequantize<Arch>(q.codes.data(), q.scales.data(), q.view().zeros, sh.out, sh.in,
                                  {bits, sym, granularity::per_group, sh.block}, deq2.data());
        }
        REQUIRE(ref::bitwise_equal(deq.data(), deq2.data(), std::size_t(deq.size())));
        CHECK(ref::nmse(deq.data(), Wd.data(), std::size_t(Wd.size())) < 0.05);

        const RowMatrixXf x = random_matrix(M, sh.in, 100 + std::uint64_t(M));
        const RowMatrixXf dy = random_matrix(M, sh.out, 200 + std::uint64_t(M));
        owned_workspace ws(qlinear_workspace_bytes(W, M));
        RowMatrixXf y(M, sh.out);
        qlinear_forward<Arch>(x, W, y, ws.get());
        const auto yr = ref::matmul_xwt(x.data(), deq.data(), std::size_t(M), std::size_t(sh.out),
                                        std::size_t(sh.in));
        CHECK(ref::max_rel_error(y.data(), yr.data(), yr.size()) < 2e-6);
        RowMatrixXf dx = random_matrix(M, sh.in, 300);
        const RowMatrixXf dx0 = dx;
        qlinear_backward<Arch>(dy, W, dx, ws.get());
        auto dxr = ref::matmul_dyw(dy.data(), deq.data(), std::size_t(M), std::size_t(sh.out),
                                   std::size_t(sh.in));
        for (std::size_t i = 0; i < dxr.size(); ++i) dxr[i] += dx0.data()[i]; // accumulates
        CHECK(ref::max_rel_error(dx.data(), dxr.data(), dxr.size()) < 2e-6);
      }
}

TEST_CASE("qlinear backward is the gradient of forward (finite differences)", "[quant][linear]") {
  for (weight_format f : {weight_format::nf4, weight_format::int8_asym, weight_format::int4_sym})
    for (index_t M : {1, 9}) {
      const RowMatrixXf Wd = random_matrix(7, 64, 5);
      const auto q = qweight_storage::quantize(Wd, f, 32);
      const qweight W = q.view();
      RowMatrixXf x = random_matrix(M, 64, 6);
      const RowMatrixXf g = random_matrix(M, 7, 7);
      owned_workspace ws(qlinear_workspace_bytes(W, M));
      RowMatrixXf y(M, 7), dx = RowMatrixXf::Zero(M, 64);
      qlinear_backward(g, W, dx, ws.get());
      auto loss = [&]() {
        qlinear_forward(x, W, y, ws.get());
        return (y.cast<double>().array() * g.cast<double>().array()).sum();
      };
      test::gradcheck_options opt;
      opt.eps = 1e-2; // the loss is linear in x: no truncation error, less float rounding noise
      test::gradcheck(loss, x.data(), std::size_t(x.size()), dx.data(), "dL/dx", opt);
    }
}

TEST_CASE("qlinear: GEMV path allocates nothing; GEMM path never holds an fp32 W",
          "[quant][linear][memory]") {
  REQUIRE(memory::tracking_enabled());
  const index_t out = 2048, in = 2048;
  const RowMatrixXf Wd = random_matrix(out, in, 9);
  for (weight_format f : {weight_format::nf4, weight_format::int8_sym, weight_format::int4_asym}) {
    const auto q = qweight_storage::quantize(Wd, f, 64);
    const qweight W = q.view();
    {
      const RowMatrixXf x = random_matrix(1, in, 1);
      RowMatrixXf y(1, out), dx = RowMatrixXf::Zero(1, in);
      owned_workspace ws(qlinear_workspace_bytes(W, 1));
      memory::region r;
      qlinear_forward(x, W, y, ws.get());
      qlinear_backward(y, W, dx, ws.get());
      CHECK(r.allocations() == 0);
    }
    {
      const index_t M = 64;
      const RowMatrixXf x = random_matrix(M, in, 2);
      RowMatrixXf y(M, out), dx = RowMatrixXf::Zero(M, in);
      owned_workspace ws(qlinear_workspace_bytes(W, M));
      CHECK(ws.capacity() <= std::size_t(out * in * 4) / 4 + 4096); // tile <= a quarter of W
      memory::region r;
      qlinear_forward(x, W, y, ws.get());
      qlinear_backward(y, W, dx, ws.get());
      // Eigen's GEMM packing buffers only: far below the 2 MiB an fp32 copy of W would take
      CHECK(r.peak_bytes() < std::int64_t(out * in * 4) / 4);
    }
  }
}

TEST_CASE("qlinear bad input throws before writing", "[quant][linear][errors]") {
  const RowMatrixXf Wd = random_matrix(8, 64, 3);
  const auto q = qweight_storage::quantize(Wd, weight_format::nf4, 64);
  qweight W = q.view();
  const RowMatrixXf x = random_matrix(2, 64, 4);
  RowMatrixXf y = RowMatrixXf::Constant(2, 8, 7.f);
  owned_workspace ws(qlinear_workspace_bytes(W, 2));
  const RowMatrixXf bad_x = random_matrix(2, 63, 4);
  CHECK_THROWS_AS(qlinear_forward(bad_x, W, y, ws.get()), lowmem::invalid_argument);
  W.block = 48; // does not divide 64
  CHECK_THROWS_AS(qlinear_forward(x, W, y, ws.get()), lowmem::invalid_argument);
  W.block = 0;
  CHECK_THROWS_AS(qlinear_forward(x, W, y, ws.get()), lowmem::invalid_argument);
  W = q.view();
  owned_workspace small(16);
  CHECK_THROWS_AS(qlinear_forward(x, W, y, small.get()), lowmem::invalid_argument);
  CHECK((y.array() == 7.f).all());
  CHECK_THROWS_AS(qweight_storage::quantize(Wd, weight_format::int4_sym, 48),
                  lowmem::invalid_argument);
}

LOWMEM_ARCH_TEST_CASE("dynamic int8 GEMV equals its int32 definition; close to the exact product",
                      "[quant][linear][int8dyn]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  INFO("VNNI kernel compiled: " << kernels::int8_gemm_has_vnni);
  struct shape {
    index_t out, in, block;
  };
  // block % 64 == 0: VNNI kernel (4-row passes + row tails); otherwise the portable loop
  const shape shapes[] = {{37, 128, 64}, {6, 256, 128}, {9, 96, 32}, {3, 130, 130}, {1, 64, 64}};
  for (const shape& sh : shapes)
    for (index_t M : {1, 3}) {
      INFO("out " << sh.out << " in " << sh.in << " block " << sh.block << " M " << M);
      const RowMatrixXf Wd = random_matrix(sh.out, sh.in, 11 + std::uint64_t(sh.out));
      RowMatrixXf x = random_matrix(M, sh.in, 12);
      x(0, 1) = 0.f; // a zero and an outlier
      x(M - 1, sh.in - 1) = 9.f;
      const auto q = qweight_storage::quantize<Arch>(Wd, weight_format::int8_sym, sh.block);
      const qweight W = q.view();
      RowMatrixXf y(M, sh.out), y2(M, sh.out), deq(sh.out, sh.in);
      owned_workspace ws(qlinear_int8_dynamic_workspace_bytes(W));
      qlinear_forward_int8_dynamic<Arch>(x, W, y, ws.get());
      qlinear_forward_int8_dynamic<Arch>(x, W, y2, ws.get(), 2);
      CHECK((y.array() == y2.array()).all()); // thread count does not change the result
      dequantize_weight<Arch>(W, deq);
      const auto exact = ref::matmul_xwt(x.data(), deq.data(), std::size_t(M), std::size_t(sh.out),
                                         std::size_t(sh.in));
      const std::size_t g = sh.block % 64 == 0 ? 64 : std::size_t(sh.block);
      for (index_t m = 0; m < M; ++m) {
        const auto want = ref::dyn_int8_gemv_ref(
            x.row(m).data(), reinterpret_cast<const std::int8_t*>(q.codes.data()), q.scales.data(),
            std::size_t(sh.out), std::size_t(sh.in), std::size_t(sh.block), g);
        std::vector<double> got(y.row(m).data(), y.row(m).data() + sh.out);
        CHECK(ref::max_rel_error(got.data(), want.data(), got.size()) < 1e-5);
        const std::vector<double> ex(exact.begin() + m * sh.out, exact.begin() + (m + 1) * sh.out);
        CHECK(ref::nmse(got.data(), ex.data(), got.size()) < 1e-3); // activation rounding
      }
    }
}

TEST_CASE("dynamic int8 GEMV: no allocation; bad input throws before writing",
          "[quant][linear][int8dyn][errors]") {
  REQUIRE(memory::tracking_enabled());
  warm_up_threads();
  const RowMatrixXf Wd = random_matrix(256, 512, 5);
  const auto q = qweight_storage::quantize(Wd, weight_format::int8_sym, 64);
  const RowMatrixXf x = random_matrix(2, 512, 6);
  RowMatrixXf y = RowMatrixXf::Constant(2, 256, 7.f);
  owned_workspace ws(qlinear_int8_dynamic_workspace_bytes(q.view()));
  const RowMatrixXf bad_x = random_matrix(2, 500, 4);
  CHECK_THROWS_AS(qlinear_forward_int8_dynamic(bad_x, q.view(), y, ws.get()),
                  lowmem::invalid_argument);
  const auto q4 = qweight_storage::quantize(Wd, weight_format::nf4, 64);
  CHECK_THROWS_AS(qlinear_forward_int8_dynamic(x, q4.view(), y, ws.get()),
                  lowmem::invalid_argument);
  owned_workspace small(16);
  CHECK_THROWS_AS(qlinear_forward_int8_dynamic(x, q.view(), y, small.get()),
                  lowmem::invalid_argument);
  CHECK((y.array() == 7.f).all());
  memory::region r;
  qlinear_forward_int8_dynamic(x, q.view(), y, ws.get());
  qlinear_forward_int8_dynamic(x, q.view(), y, ws.get(), 2);
  CHECK(r.allocations() == 0);
  CHECK(std::isfinite(y(1, 3)));
}

TEST_CASE("qlinear_forward with threads: bitwise equal to one thread; no allocation",
          "[quant][linear][threads]") {
  REQUIRE(memory::tracking_enabled());
  warm_up_threads();
  // 600 x 512: the GEMV rows and the GEMM's 150-row dequantized tiles are each at least two
  // chunks' work (lowmem::min_chunk_work), so both paths really split over the 2 threads
  const RowMatrixXf Wd = random_matrix(600, 512, 21);
  for (weight_format f : {weight_format::nf4, weight_format::int8_sym, weight_format::int4_asym})
    for (index_t M : {1, 3, 16}) {
      INFO("format " << int(f) << " M " << M);
      const auto q = qweight_storage::quantize(Wd, f, 64);
      const RowMatrixXf x = random_matrix(M, 512, 22);
      RowMatrixXf y1(M, 600), y2(M, 600);
      owned_workspace ws(qlinear_workspace_bytes(q.view(), M));
      qlinear_forward(x, q.view(), y1, ws.get());
      memory::region r;
      qlinear_forward(x, q.view(), y2, ws.get(), 2);
      if (M < 8) CHECK(r.allocations() == 0); // the GEMM path's Eigen packing may allocate
      CHECK(ref::bitwise_equal(y1.data(), y2.data(), std::size_t(y1.size())));
    }
}

TEST_CASE("int8 GEMM is exact (VNNI or portable), tails included", "[quant][int8gemm]") {
  INFO("VNNI kernel compiled: " << kernels::int8_gemm_has_vnni);
  for (auto [M, N, K] : {std::tuple<index_t, index_t, index_t>{1, 1, 1},
                         {4, 4, 64},
                         {7, 6, 130},
                         {9, 13, 200},
                         {5, 8, 0}}) {
    std::vector<std::int8_t> a(static_cast<std::size_t>(M * K)), b(static_cast<std::size_t>(N * K));
    random::stream s{9, std::uint64_t(K)};
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::int8_t(s.bits(i) & 0xFF);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::int8_t(s.bits(100000 + i) & 0xFF);
    std::vector<std::int32_t> c(static_cast<std::size_t>(M * N), 7);
    owned_workspace ws(int8_gemm_workspace_bytes(N));
    int8_gemm(a.data(), b.data(), M, N, K, c.data(), ws.get());
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) {
        std::int64_t r = 0;
        for (index_t k = 0; k < K; ++k)
          r += std::int64_t(a[std::size_t(m * K + k)]) * b[std::size_t(n * K + k)];
        REQUIRE(c[std::size_t(m * N + n)] == r);
      }
  }
}

TEST_CASE("LLM.int8 decomposition: equals its definition; outlier columns exact in fp32",
          "[quant][llm_int8]") {
  const index_t M = 70, N = 37, K = 200;
  RowMatrixXf Wd = random_matrix(N, K, 21), x = random_matrix(M, K, 22) * 2.f;
  for (index_t m = 0; m < M; m += 3) x(m, 17) = 25.f, x(m, 150) = -40.f; // outlier features
  const auto q = qweight_storage::quantize(Wd, weight_format::int8_sym, K);
  const qweight W = q.view();
  RowMatrixXf y(M, N), deq(N, K);
  dequantize_weight(W, deq);
  owned_workspace ws(llm_int8_workspace_bytes(N, K));
  memory::region r;
  llm_int8_forward(x, W, 6.0f, y, ws.get());
  CHECK(r.allocations() == 0);
  // reference: the same decomposition in double
  std::vector<double> yr(static_cast<std::size_t>(M * N), 0.0);
  for (index_t m = 0; m < M; ++m) {
    float mx = 0;
    for (index_t k = 0; k < K; ++k)
      if (k != 17 && k != 150) mx = std::max(mx, std::fabs(x(m, k)));
    const float sx = mx / 127.0f, inv = 1.0f / sx;
    for (index_t n = 0; n < N; ++n) {
      double acc = 0;
      for (index_t k = 0; k < K; ++k) {
        if (k == 17 || k == 150)
          acc += double(x(m, k)) * deq(n, k);
        else
          acc += double(std::nearbyint(x(m, k) * inv)) * sx * deq(n, k);
      }
      yr[std::size_t(m * N + n)] = acc;
    }
  }
  CHECK(ref::max_rel_error(y.data(), yr.data(), yr.size()) < 1e-5);
  // and close to the fp32 product with the dequantized weight
  RowMatrixXf y32 = x * deq.transpose();
  CHECK(ref::nmse(y.data(), y32.data(), std::size_t(y.size())) < 1e-4);
  RowMatrixXf y0 = RowMatrixXf::Constant(M, N, 3.f);
  CHECK_THROWS_AS(llm_int8_forward(x, W, -1.f, y0, ws.get()), lowmem::invalid_argument);
  const auto q64 = qweight_storage::quantize(Wd, weight_format::int8_sym, 40);
  CHECK_THROWS_AS(llm_int8_forward(x, q64.view(), 6.f, y0, ws.get()), lowmem::invalid_argument);
  CHECK((y0.array() == 3.f).all());
}
