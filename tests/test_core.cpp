// Foundation tests: errors and validation, views, workspace, threading, bf16, memory accounting.
#include <catch2/catch.hpp>
#include <common/fashion_mnist.hpp>
#include <lowmem/core.hpp>
#include <lowmem/core/tensor.hpp>
#include <unsupported/Eigen/CXX11/Tensor>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "reference/common.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"

using namespace lowmem;

TEST_CASE("invalid_argument names function, argument, expected and actual", "[core][errors]") {
  try {
    require_equal("attention_forward", "K.cols", 64, 32);
    FAIL("no throw");
  } catch (const lowmem::invalid_argument& e) {
    CHECK(std::string(e.what()) ==
          "lowmem::attention_forward: argument 'K.cols' expected 64, got 32");
  }
  CHECK_THROWS_AS(require_positive("f", "lr", -1.0), lowmem::invalid_argument);
  CHECK_THROWS_AS(require_positive("f", "lr", std::nan("")), lowmem::invalid_argument);
  CHECK_THROWS_AS(require_positive("f", "eps", std::numeric_limits<double>::infinity()),
                  lowmem::invalid_argument);
  CHECK_NOTHROW(require_positive("f", "lr", 1e-3));
  CHECK_THROWS_WITH(require_in_half_open("adamw", "beta1", 0.0, 1.0, 1.0),
                    "lowmem::adamw: argument 'beta1' expected in [0, 1), got 1");
  CHECK_THROWS_WITH(require_multiple_of("quantize", "n", 64, 100),
                    "lowmem::quantize: argument 'n' expected a multiple of 64, got 100");
  CHECK_THROWS_AS(require_multiple_of("quantize", "block", 0, 100), lowmem::invalid_argument);
  CHECK_THROWS_AS(require_data("f", "x", nullptr, 3), lowmem::invalid_argument);
  CHECK_NOTHROW(require_data("f", "x", nullptr, 0));
  // it is a std::invalid_argument too
  CHECK_THROWS_AS(require_non_negative("f", "n", -1), std::invalid_argument);
}

TEST_CASE("row-major views map Eigen matrices without copies", "[core][eigen]") {
  RowMatrixXf m(3, 5);
  for (int i = 0; i < 15; ++i) m.data()[i] = float(i);
  auto v = view_of(m);
  CHECK(v.data == m.data());
  CHECK(v.ld == 5);
  CHECK(v(2, 1) == 11.f);
  RowRef<float> block = m.block(1, 1, 2, 3);
  auto bv = view_of<float>(block);
  CHECK(bv.data == &m(1, 1));
  CHECK(bv.ld == 5);
  CHECK(bv(1, 2) == m(2, 3));
  auto e = as_eigen(bv);
  CHECK(e(0, 0) == m(1, 1));
  CHECK_THROWS_WITH(require_shape("f", "W", v, 3, 4),
                    "lowmem::f: argument 'W' expected shape [3, 4], got [3, 5]");
  auto bad = make_view<float>(m.data(), 3, 5, 4);
  CHECK_THROWS_AS(require_view("f", "W", bad), lowmem::invalid_argument);
}

TEST_CASE("workspace carves aligned blocks, planner and kernel agree", "[core][workspace]") {
  auto carve = [](auto& ws, std::size_t n) {
    ws.template take<float>(n);
    ws.template take<double>(3);
    ws.template take<std::uint8_t>(n + 1);
  };
  for (std::size_t n : {0u, 1u, 17u, 1000u}) {
    workspace_planner p;
    carve(p, n);
    owned_workspace owned(p.bytes());
    // the planner's bound holds at any base alignment, so also from an offset start
    for (std::size_t offset : {0u, 1u, 7u, 63u}) {
      std::vector<unsigned char> raw(p.bytes() + offset);
      workspace ws(raw.data() + offset, p.bytes());
      CHECK_NOTHROW(carve(ws, n));
      CHECK(ws.used() <= p.bytes());
    }
    workspace ws = owned.get();
    float* f = ws.take<float>(n);
    CHECK(reinterpret_cast<std::uintptr_t>(f) % workspace_alignment == 0);
  }
  { // a carving that takes nothing needs no bytes, and an empty workspace serves it
    workspace_planner p;
    p.take<float>(0);
    CHECK(p.bytes() == 0);
    workspace empty;
    CHECK_NOTHROW(empty.take<float>(0));
  }
  std::vector<unsigned char> small(16);
  workspace ws(small.data(), small.size());
  CHECK_THROWS_AS(ws.take<float>(100), lowmem::invalid_argument);
  CHECK_THROWS_AS(require_workspace("f", ws, 1000), lowmem::invalid_argument);
}

TEST_CASE("parallel_for covers every item once with thread-independent chunks", "[core][threads]") {
  for (std::ptrdiff_t n : {0, 1, 7, 1000, 100003}) {
    for (std::ptrdiff_t units : {std::ptrdiff_t(1), std::ptrdiff_t(100), min_chunk_work}) {
      for (int threads : {1, 2, 3}) {
        std::vector<int> hits(std::size_t(n), 0);
        std::vector<std::ptrdiff_t> sizes(std::size_t(threads), 0);
        parallel_for(
            0, n, item_work{units},
            [&](std::ptrdiff_t b, std::ptrdiff_t e, int t) {
              for (std::ptrdiff_t i = b; i < e; ++i) hits[std::size_t(i)] += 1;
              sizes[std::size_t(t)] = e - b;
            },
            threads);
        for (int h : hits) REQUIRE(h == 1);
        // as many chunks as chunk_count says, each of at least min_chunk_work when split
        const std::ptrdiff_t chunks = chunk_count(n, item_work{units}, threads);
        INFO("n " << n << " units " << units << " threads " << threads);
        for (std::ptrdiff_t c = 0; c < threads; ++c) {
          CHECK((sizes[std::size_t(c)] > 0) == (c < chunks));
          if (chunks > 1 && c < chunks) CHECK(sizes[std::size_t(c)] * units >= min_chunk_work);
        }
      }
    }
  }
  // chunks = min(threads, n / ceil(min_chunk_work / units)), at least 1
  CHECK(items_per_chunk(item_work{min_chunk_work}) == 1);
  CHECK(items_per_chunk(item_work{10 * min_chunk_work}) == 1);
  CHECK(items_per_chunk(item_work{0}) == min_chunk_work);
  CHECK(items_per_chunk(item_work{3}) == (min_chunk_work + 2) / 3);
  CHECK(chunk_count(1000, item_work{min_chunk_work}, 2) == 2);
  CHECK(chunk_count(1000, item_work{min_chunk_work}, 2000) == 1000);
  CHECK(chunk_count(5, item_work{min_chunk_work / 10}, 2) == 1);
  CHECK(chunk_count(0, item_work{min_chunk_work}, 2) == 0);
  // a region needs two chunks' work: 2·min_chunk_work in total
  CHECK(chunk_count(2 * min_chunk_work / 16 - 1, item_work{16}, 8) == 1);
  CHECK(chunk_count(2 * min_chunk_work / 16, item_work{16}, 8) == 2);
  CHECK(max_threads() >= 1);
}

TEST_CASE("a small parallel_for opens no OpenMP region and allocates nothing on any thread budget",
          "[core][threads][memory]") {
  // No warm_up_threads() here: the OpenMP runtime allocates its team on the first region, so in
  // this fresh process (ctest runs each test case alone) a region would show as allocations.
  REQUIRE(memory::tracking_enabled());
#if defined(_OPENMP)
  const int omp0 = omp_get_max_threads();
  omp_set_num_threads(4);
#endif
  // 48 rows of 64 floats updated in place (the shape of yesterday's adapters test): 6K units
  std::vector<float> y(48 * 64, 1.0f);
  int calls = 0;
  bool inside_region = false;
  {
    memory::region r;
    for (int threads : {0, 2, 4, 64}) {
      parallel_for(
          0, 48, item_work{2 * 64},
          [&](std::ptrdiff_t b, std::ptrdiff_t e, int t) {
            ++calls;
            inside_region = inside_region || in_parallel() || t != 0;
            for (std::ptrdiff_t i = b * 64; i < e * 64; ++i) y[std::size_t(i)] += 1.0f;
          },
          threads);
    }
    CHECK(r.allocations() == 0);
  }
  CHECK(calls == 4); // one serial call per parallel_for
  CHECK_FALSE(inside_region);
  for (float v : y) REQUIRE(v == 5.0f);
#if defined(_OPENMP)
  // the same mechanism does open a region once there are two chunks' work (and 2 threads)
  const std::ptrdiff_t n = 2 * items_per_chunk(item_work{2 * 64});
  int parallel_calls = 0;
  parallel_for(
      0, n, item_work{2 * 64},
      [&](std::ptrdiff_t, std::ptrdiff_t, int) {
        if (in_parallel()) {
#pragma omp atomic
          ++parallel_calls;
        }
      },
      2);
  CHECK(parallel_calls == 2);
  omp_set_num_threads(omp0);
#endif
}

TEST_CASE("bf16 round-to-nearest-even and special values", "[core][bf16]") {
  // exact values survive
  for (float f : {0.f, -0.f, 1.f, -2.5f, 65280.f, 1.0f / 128}) CHECK(to_float(to_bf16(f)) == f);
  // ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even mantissa)
  CHECK(to_float(to_bf16(1.0f + 0x1p-8f)) == 1.0f);
  // 1 + 3·2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even) -> 1 + 2^-6
  CHECK(to_float(to_bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);
  // just above halfway rounds up
  CHECK(to_float(to_bf16(1.0f + 0x1p-8f + 0x1p-20f)) == 1.0f + 0x1p-7f);
  CHECK(std::isinf(to_float(to_bf16(std::numeric_limits<float>::infinity()))));
  CHECK(std::isnan(to_float(to_bf16(std::nanf("")))));
  // a NaN whose payload is only in the low 16 bits must stay NaN, not become Inf
  CHECK(std::isnan(to_float(to_bf16(bits_float(0x7F800001u)))));
  CHECK(std::isinf(to_float(to_bf16(std::numeric_limits<float>::max())))); // overflow rounds up
  // against a double reference of RNE over many random floats
  random::stream s{3, 0};
  for (std::uint64_t i = 0; i < 20000; ++i) {
    const float f = bits_float(s.bits(i) & 0xBFFFFFFFu); // finite, |exp| bounded
    const float r = to_float(to_bf16(f));
    const std::uint32_t u = float_bits(f);
    const float lo = bits_float(u & 0xFFFF0000u), hi = bits_float((u & 0xFFFF0000u) + 0x10000u);
    const double dlo = std::fabs(double(f) - lo), dhi = std::fabs(double(hi) - f);
    const float expect = dlo < dhi ? lo : dhi < dlo ? hi : (((u >> 16) & 1u) ? hi : lo);
    REQUIRE(float_bits(r) == float_bits(expect));
  }
}

TEST_CASE("bf16 stochastic rounding is unbiased and reproducible", "[core][bf16]") {
  random::stream s{11, 5};
  const float x = 1.0f + 0x1p-9f; // a quarter of the way from 1 to 1 + 2^-7
  const std::size_t n = 200000;
  std::vector<float> in(n, x);
  std::vector<bf16> out(n), again(n);
  to_bf16_stochastic(in.data(), out.data(), n, s, 0);
  to_bf16_stochastic(in.data(), again.data(), n, s, 0);
  double mean = 0;
  std::size_t ups = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const float r = to_float(out[i]);
    REQUIRE((r == 1.0f || r == 1.0f + 0x1p-7f));
    ups += r > 1.0f;
    mean += r;
    REQUIRE(out[i].bits == again[i].bits);
  }
  mean /= double(n);
  // P(up) = 1/4: binomial sd = sqrt(n p (1-p)) = 194 ups; allow 5 sd.
  CHECK(std::fabs(double(ups) - 0.25 * n) < 5 * 194);
  CHECK(std::fabs(mean - double(x)) < 5 * 194.0 / n * 0x1p-7);
  CHECK(std::isinf(to_float(to_bf16_stochastic(std::numeric_limits<float>::infinity(), 0xFFFFu))));
  CHECK(std::isnan(to_float(to_bf16_stochastic(std::nanf(""), 0xFFFFu))));
  CHECK(to_float(to_bf16_stochastic(-3.0f, 0xFFFFu)) == -3.0f); // exact values never move
}

LOWMEM_ARCH_TEST_CASE("vectorized bf16 array conversions equal the scalar ones bitwise",
                      "[core][bf16][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  // specials and rounding boundaries first, then random bit patterns (all exponents, NaNs too)
  std::vector<float> in;
  for (std::uint32_t u :
       {0x7F800001u, 0xFF800001u, 0x7FC00000u, 0x7FFFFFFFu, 0x7F800000u, 0xFF800000u, 0x7F7FFFFFu,
        0xFF7FFFFFu, 0x7F7F8000u, 0x00000001u, 0x80000000u, 0x00000000u, 0x3F808000u, 0x3F818000u,
        0x3F808001u, 0x3F80FFFFu, 0x0000FFFFu, 0x00018000u})
    in.push_back(bits_float(u));
  const random::stream src{3, 9};
  for (std::uint64_t i = 0; i < 3000; ++i) in.push_back(bits_float(src.bits(i)));
  const random::stream s{21, 4};
  for (std::size_t n : test::tail_sizes<Arch>(in.size() - 3)) {
    for (std::size_t off : {std::size_t(0), std::size_t(3)}) {
      std::vector<bf16> out(n + 1, bf16{0xABCD});
      to_bf16<Arch>(in.data() + off, out.data(), n);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(out[i].bits == to_bf16(in[off + i]).bits);
      CHECK(out[n].bits == 0xABCD); // nothing written past n
      const std::uint64_t offset = 1000 + 7 * off;
      to_bf16_stochastic<Arch>(in.data() + off, out.data(), n, s, offset);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE(out[i].bits == to_bf16_stochastic(in[off + i], s, offset + i).bits);
      CHECK(out[n].bits == 0xABCD);
      std::vector<float> back(n + 1, 5.f);
      to_float<Arch>(out.data(), back.data(), n);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE(float_bits(back[i]) == float_bits(to_float(out[i])));
      CHECK(back[n] == 5.f);
    }
  }
  // stochastic: a range converted whole equals the same range converted in pieces (the random
  // words are value offset + i of the stream whatever the chunking)
  std::vector<bf16> whole(in.size()), pieces(in.size());
  to_bf16_stochastic<Arch>(in.data(), whole.data(), in.size(), s, 5);
  for (std::size_t b = 0; b < in.size(); b += 700) {
    const std::size_t m = std::min<std::size_t>(700, in.size() - b);
    to_bf16_stochastic<Arch>(in.data() + b, pieces.data() + b, m, s, 5 + b);
  }
  for (std::size_t i = 0; i < in.size(); ++i) REQUIRE(whole[i].bits == pieces[i].bits);
}

TEST_CASE("memory regions measure peak heap bytes and count allocations", "[core][memory]") {
  REQUIRE(memory::tracking_enabled());
  {
    memory::region r;
    std::vector<float> v(1 << 20); // 4 MiB
    v[0] = 1;
    CHECK(r.peak_bytes() >= (4 << 20));
    CHECK(r.allocations() >= 1);
  }
  {
    memory::region r;
    Eigen::MatrixXf m(512, 512); // Eigen allocates through malloc (hooked unless sanitizing)
    m.setZero();
    if (memory::tracking_malloc()) {
      CHECK(r.allocations() >= 1);
      CHECK(r.peak_bytes() >= 512 * 512 * 4);
    } else {
      WARN("malloc is not hooked in this (sanitizer) build: Eigen's allocation is not counted");
    }
  }
  {
    memory::region r;
    float acc = 0;
    for (int i = 0; i < 100; ++i) acc += float(i);
    CHECK(acc == 4950.f);
    CHECK(r.allocations() == 0);
    CHECK(r.peak_bytes() == 0);
  }
  {
    memory::region r;
    CHECK_THROWS_AS(memory::region(), std::logic_error); // one region at a time
  }
}

TEST_CASE("memory ledger tracks declared bytes by category", "[core][memory]") {
  memory::ledger l;
  l.add("parameters", 1000);
  l.add("activations", 500);
  l.release("activations", 500);
  l.add("gradients", 200);
  CHECK(l.total() == 1200);
  CHECK(l.peak() == 1500);
  CHECK(l.bytes("parameters") == 1000);
  CHECK_THROWS_AS(l.release("gradients", 201), lowmem::invalid_argument);
  CHECK_THROWS_AS(l.add("x", -1), lowmem::invalid_argument);
  CHECK(l.total() == 1200); // a throwing call changed nothing
}

TEST_CASE("Fashion-MNIST loader reads the Debian package and rejects bad paths", "[data]") {
  const auto test = lowmem::data::load_fashion_mnist("t10k", 500);
  REQUIRE(test.count == 500);
  REQUIRE(test.images.size() == 500 * 784);
  int counts[10] = {};
  for (auto l : test.labels) counts[l] += 1;
  for (int c : counts) CHECK(c > 20); // every class present in the first 500
  float mx = 0;
  for (float p : test.images) mx = std::max(mx, p);
  CHECK(mx == 1.0f);
  CHECK_THROWS_WITH(lowmem::data::load_fashion_mnist("t10k", 1, "/nonexistent"),
                    Catch::Contains("cannot open '/nonexistent/t10k-images-idx3-ubyte.gz'"));
}

TEST_CASE("gradcheck accepts a correct gradient and rejects a wrong one", "[core][gradcheck]") {
  // L(x) = Σ x_i³ + x_0·x_1, dL/dx_i = 3x_i² (+ x_1 for i = 0, + x_0 for i = 1)
  std::vector<float> x = {0.5f, -1.25f, 2.0f, 0.0f, 3.5f};
  auto loss = [&] {
    double l = double(x[0]) * x[1];
    for (float v : x) l += double(v) * v * v;
    return l;
  };
  std::vector<float> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) g[i] = 3 * x[i] * x[i];
  g[0] += x[1];
  g[1] += x[0];
  const std::vector<float> before = x;
  CHECK(test::gradcheck(loss, x.data(), x.size(), g.data(), "cubic") <= 1.0);
  CHECK(x == before); // parameters restored
  g[2] *= 1.05f;      // a 5% error in one element must be caught at rtol 1e-2
  const auto r = test::gradcheck_compare(loss, x.data(), x.size(), g.data());
  CHECK(r.worst_ratio > 1.0);
  CHECK(r.worst_index == 2);
}

TEST_CASE("tensor views: dense, token-major, Eigen TensorMap, validation", "[core][tensor]") {
  std::vector<float> buf(2 * 3 * 4 * 5);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = float(i);
  auto dense = dense_view<float, 4>(buf.data(), {2, 3, 4, 5}); // [B, H, N, d]
  CHECK(dense.stride == std::array<index_t, 4>{60, 20, 5, 1});
  CHECK(dense(1, 2, 3, 4) == float(1 * 60 + 2 * 20 + 3 * 5 + 4));
  // the same buffer read as token-major [B, N=3, H=4, d=5]: element (b, h, n, c) at b·60 + n·20 +
  // h·5 + c
  auto tm = token_major_view(buf.data(), 2, 3, 4, 5);
  CHECK(tm.extent == std::array<index_t, 4>{2, 4, 3, 5});
  CHECK(tm(1, 3, 2, 4) == float(1 * 60 + 2 * 20 + 3 * 5 + 4));
  Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>> t(buf.data(), 2, 3, 4, 5);
  auto tv = view_of_tensor(t);
  CHECK(tv.data == buf.data());
  CHECK(tv(1, 2, 3, 4) == t(1, 2, 3, 4));
  CHECK_NOTHROW(require_extents("f", "Q", dense, {2, 3, 4, 5}));
  CHECK_THROWS_WITH(require_extents("attention_forward", "K", dense, {2, 3, 4, 6}),
                    "lowmem::attention_forward: argument 'K.extent[3]' expected 6, got 5");
  auto bad = dense;
  bad.stride[3] = 2;
  CHECK_THROWS_AS(require_tensor("f", "Q", bad), lowmem::invalid_argument);
}

TEST_CASE("passing validation checks allocate nothing", "[core][errors][memory]") {
  RowMatrixXf m(4, 4);
  auto v = view_of(m);
  std::vector<unsigned char> raw(256);
  workspace ws(raw.data(), raw.size());
  memory::region r;
  for (int i = 0; i < 100; ++i) {
    require(i >= 0, "f", "i", "a non-negative index with a long description", i);
    require_equal("f", "n", 4, int(v.rows));
    require_positive("f", "lr", 1e-3);
    require_in_half_open("f", "beta", 0.0, 1.0, 0.9);
    require_multiple_of("f", "n", 4, 64);
    require_shape("f", "W", v, 4, 4);
    require_workspace("f", ws, 128);
  }
  CHECK(r.allocations() == 0);
}
