// QAT (fake-quant + STE, LSQ) and Hadamard rotation.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/formats.hpp>
#include <lowmem/quant/hadamard.hpp>
#include <lowmem/quant/kivi.hpp>
#include <lowmem/quant/qat.hpp>

#include <cmath>
#include <vector>

#include "reference/common.hpp"
#include "reference/quant_reference.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"

using namespace lowmem;
using namespace lowmem::quant;
using std::size_t;

LOWMEM_ARCH_TEST_CASE("fake-quant forward equals quantize-then-dequantize", "[quant][qat]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (size_t cols : test::tail_sizes<Arch>()) {
    const index_t rows = 3;
    const size_t n = size_t(rows) * cols;
    const auto x = ref::uniform_data(n, cols, -3.f, 2.f);
    std::vector<float> y(n), z(n);
    for (int bits : {8, 4})
      for (bool sym : {true, false})
        for (granularity g : {granularity::per_tensor, granularity::per_row}) {
          const affine_format f{bits, sym, g, 0};
          const index_t nb = affine_num_blocks(rows, index_t(cols), f);
          std::vector<std::uint8_t> codes(affine_code_bytes(rows, index_t(cols), f));
          std::vector<float> sc{}, zr{};
          sc.resize(size_t(nb)), zr.resize(size_t(nb));
          affine_quantize<Arch>(x.data(), rows, index_t(cols), f, codes.data(), sc.data(),
                                zr.data());
          affine_dequantize<Arch>(codes.data(), sc.data(), zr.data(), rows, index_t(cols), f,
                                  z.data());
          fake_quant_affine_forward<Arch>(x.data(), rows, index_t(cols), f, y.data());
          CHECK(ref::max_rel_error(y.data(), z.data(), n) <= 1e-7);
        }
    std::vector<std::uint8_t> packed((n + 1) / 2), c8(n);
    std::vector<float> am(fourbit_num_blocks(n, 64));
    for (fourbit t : {fourbit::nf4, fourbit::fp4}) {
      fourbit_quantize<Arch>(x.data(), n, t, 64, packed.data(), am.data());
      fourbit_dequantize<Arch>(packed.data(), am.data(), n, t, 64, z.data());
      fake_quant_fourbit_forward<Arch>(x.data(), n, t, 64, y.data());
      CHECK(ref::bitwise_equal(y.data(), z.data(), n));
    }
    for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
      fp8_quantize<Arch>(x.data(), n, f, 64, c8.data(), am.data());
      fp8_dequantize<Arch>(c8.data(), am.data(), n, f, 64, z.data());
      fake_quant_fp8_forward<Arch>(x.data(), n, f, 64, y.data());
      CHECK(ref::bitwise_equal(y.data(), z.data(), n));
    }
  }
}

LOWMEM_ARCH_TEST_CASE("fake-quant STE backward: identity on finite x, accumulates",
                      "[quant][qat]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const size_t n = 203;
  auto x = ref::uniform_data(n, 1);
  x[5] = std::nanf("");
  x[77] = -INFINITY;
  const auto dy = ref::uniform_data(n, 2);
  std::vector<float> dx(n, 0.5f);
  fake_quant_backward<Arch>(x.data(), dy.data(), n, dx.data());
  for (size_t i = 0; i < n; ++i) REQUIRE(dx[i] == (std::isfinite(x[i]) ? 0.5f + dy[i] : 0.5f));
  // STE surrogate: L(x) = Σ dy·(x + r), r = fq(x0) − x0 frozen; its FD gradient is the STE one
  auto xs = ref::uniform_data(n, 3);
  std::vector<float> fq(n), g(n, 0.f);
  fake_quant_fourbit_forward<Arch>(xs.data(), n, fourbit::nf4, 64, fq.data());
  std::vector<double> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = double(fq[i]) - xs[i];
  fake_quant_backward<Arch>(xs.data(), dy.data(), n, g.data());
  auto loss = [&] {
    double l = 0;
    for (size_t i = 0; i < n; ++i) l += double(dy[i]) * (double(xs[i]) + r[i]);
    return l;
  };
  test::gradcheck(loss, xs.data(), n, g.data(), "STE dL/dx");
}

namespace {
// LSQ surrogate loss in double: Σ dy·s·(clamp(x/s) + r) with r = rne(clamp(v0)) − clamp(v0)
// frozen at the base point; its exact gradient is LSQ's estimator (before the gradient scale).
struct lsq_surrogate {
  const std::vector<float>& x0;
  const std::vector<float>& s0;
  const std::vector<float>& dy;
  index_t g;
  float qn, qp;
  std::vector<double> r;
  lsq_surrogate(const std::vector<float>& x, const std::vector<float>& s,
                const std::vector<float>& d, index_t group, float n_, float p_)
      : x0(x), s0(s), dy(d), g(group), qn(n_), qp(p_), r(x.size()) {
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = std::min(std::max(double(x[i] / s[i / size_t(g)]), double(-qn)), double(qp));
      r[i] = std::nearbyint(v) - v;
    }
  }
  double operator()(const std::vector<float>& x, const std::vector<float>& s) const {
    double l = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const double sb = s[i / size_t(g)];
      const double v = std::min(std::max(double(x[i]) / sb, double(-qn)), double(qp));
      l += double(dy[i]) * sb * (v + r[i]);
    }
    return l;
  }
};
} // namespace

LOWMEM_ARCH_TEST_CASE("LSQ forward definition and gradients (surrogate finite differences)",
                      "[quant][qat][lsq]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (lsq_format f : {lsq_format{4, true, 0}, lsq_format{3, false, 16}, lsq_format{8, true, 32}}) {
    const index_t rows = 3, cols = 64;
    const size_t n = size_t(rows * cols);
    auto x = ref::uniform_data(n, 10, f.is_signed ? -1.f : 0.f, 1.f);
    const index_t ns = lsq_num_steps(rows, cols, f);
    std::vector<float> step(static_cast<size_t>(ns));
    lsq_init_steps(x.data(), rows, cols, f, step.data());
    for (auto& s : step) s *= 0.7f; // some elements clip
    const index_t gg = f.group == 0 ? cols : f.group;
    for (size_t i = 0; i < n; ++i) { // keep finite differences away from the clamp kinks
      const float s = step[i / size_t(gg)], v = x[i] / s;
      if (std::fabs(v + f.qn()) < 0.05f || std::fabs(v - f.qp()) < 0.05f) x[i] += 0.1f * s;
    }
    std::vector<float> y(n);
    lsq_forward<Arch>(x.data(), step.data(), rows, cols, f, y.data());
    const index_t g = f.group == 0 ? cols : f.group;
    for (size_t i = 0; i < n; ++i) {
      const double s = step[i / size_t(g)];
      const double v = std::min(
          std::max(double(x[i] * (1.0f / step[i / size_t(g)])), double(-f.qn())), double(f.qp()));
      REQUIRE(y[i] == float(std::nearbyint(v) * s));
    }
    const auto dy = ref::uniform_data(n, 11);
    std::vector<float> dx(n, 0.f), ds(size_t(ns), 0.f);
    lsq_backward<Arch>(x.data(), step.data(), dy.data(), rows, cols, f, dx.data(), ds.data());
    lsq_surrogate L(x, step, dy, g, f.qn(), f.qp());
    test::gradcheck([&] { return L(x, step); }, x.data(), n, dx.data(), "LSQ dL/dx");
    const double gscale = 1.0 / std::sqrt(double(g) * f.qp());
    std::vector<float> ds_unscaled(ds.size());
    for (size_t b = 0; b < ds.size(); ++b) ds_unscaled[b] = float(ds[b] / gscale);
    test::gradcheck([&] { return L(x, step); }, step.data(), step.size(), ds_unscaled.data(),
                    "LSQ dL/ds");
    // accumulation
    std::vector<float> dx2 = dx, ds2 = ds;
    lsq_backward<Arch>(x.data(), step.data(), dy.data(), rows, cols, f, dx2.data(), ds2.data());
    for (size_t i = 0; i < n; ++i) REQUIRE(dx2[i] == 2 * dx[i]);
    for (size_t b = 0; b < ds.size(); ++b) REQUIRE(ds2[b] == Approx(2 * ds[b]));
  }
}

TEST_CASE("LSQ bad input throws before writing", "[quant][qat][lsq][errors]") {
  std::vector<float> x(64, 0.3f), y(64, 9.f), step = {0.1f, -0.1f}, dx(64, 9.f), ds(2, 9.f);
  const lsq_format f{4, true, 32};
  CHECK_THROWS_AS(lsq_forward(x.data(), step.data(), 1, 64, f, y.data()), lowmem::invalid_argument);
  step[1] = std::nanf("");
  CHECK_THROWS_AS(lsq_backward(x.data(), step.data(), x.data(), 1, 64, f, dx.data(), ds.data()),
                  lowmem::invalid_argument);
  step[1] = 0.1f;
  CHECK_THROWS_AS(lsq_forward(x.data(), step.data(), 1, 64, lsq_format{4, true, 48}, y.data()),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(lsq_forward(x.data(), step.data(), 1, 64, lsq_format{1, true, 32}, y.data()),
                  lowmem::invalid_argument);
  CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == 9.f; }));
  CHECK(std::all_of(dx.begin(), dx.end(), [](float v) { return v == 9.f; }));
  CHECK(std::all_of(ds.begin(), ds.end(), [](float v) { return v == 9.f; }));
}

LOWMEM_ARCH_TEST_CASE("FWHT equals the Hadamard matrix product; orthogonal; self-inverse",
                      "[quant][hadamard]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (index_t n = 1; n <= 2048; n *= 2) {
    const auto x = ref::uniform_data(size_t(n), size_t(n));
    std::vector<float> y = x;
    fwht<Arch>(y.data(), n);
    std::vector<double> ref_y(size_t(n), 0.0);
    const double norm = 1.0 / std::sqrt(double(n));
    double nx = 0, ny = 0;
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < n; ++j) // H[i][j] = (-1)^popcount(i & j)
        ref_y[size_t(i)] +=
            (__builtin_popcountll(std::uint64_t(i & j)) & 1 ? -1.0 : 1.0) * x[size_t(j)];
      ref_y[size_t(i)] *= norm;
      nx += double(x[size_t(i)]) * x[size_t(i)];
      ny += double(y[size_t(i)]) * y[size_t(i)];
    }
    INFO("n = " << n);
    CHECK(ref::max_rel_error(y.data(), ref_y.data(), size_t(n)) < 1e-6);
    CHECK(ny == Approx(nx).epsilon(1e-5)); // orthogonal: norm preserved
    fwht<Arch>(y.data(), n);               // normalized H is its own inverse
    CHECK(ref::max_rel_error(y.data(), x.data(), size_t(n)) < 1e-6);
  }
}

LOWMEM_ARCH_TEST_CASE("randomized Hadamard rotation: inverse, x·Wᵀ invariance, blocked",
                      "[quant][hadamard]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (auto [cols, block] : {std::pair<index_t, index_t>{256, 256}, {768, 256}, {96, 32}, {8, 8}}) {
    const index_t rows = 5;
    std::vector<float> signs(static_cast<size_t>(cols));
    hadamard_signs(1234, cols, signs.data());
    for (float s : signs) REQUIRE((s == 1.f || s == -1.f));
    const auto x0 = ref::uniform_data(size_t(rows * cols), 40);
    const auto w0 = ref::uniform_data(size_t(rows * cols), 41);
    auto x = x0, w = w0;
    hadamard_rotate<Arch>(x.data(), rows, cols, block, signs.data());
    hadamard_rotate<Arch>(w.data(), rows, cols, block, signs.data());
    const auto a = ref::matmul_xwt(x0.data(), w0.data(), size_t(rows), size_t(rows), size_t(cols));
    const auto b = ref::matmul_xwt(x.data(), w.data(), size_t(rows), size_t(rows), size_t(cols));
    CHECK(ref::max_rel_error(b.data(), a.data(), a.size()) < 1e-5);
    hadamard_rotate<Arch>(x.data(), rows, cols, block, signs.data(), /*inverse=*/true);
    CHECK(ref::max_rel_error(x.data(), x0.data(), x0.size()) < 1e-6);
  }
  std::vector<float> v(12);
  CHECK_THROWS_AS(fwht(v.data(), 12), lowmem::invalid_argument);
  CHECK_THROWS_AS(hadamard_rotate(v.data(), 1, 12, 8, nullptr), lowmem::invalid_argument);
}

TEST_CASE("Hadamard rotation spreads an outlier: lower int8 error after rotation",
          "[quant][hadamard]") {
  const index_t cols = 512;
  auto x = ref::uniform_data(size_t(cols), 50, -0.1f, 0.1f);
  x[17] = 20.f; // one large outlier dominates the absmax scale: int8 steps of 20/127
  std::vector<float> signs(static_cast<size_t>(cols));
  hadamard_signs(7, cols, signs.data());
  const affine_format f{8, true, granularity::per_row, 0};
  std::vector<float> plain(static_cast<size_t>(cols)), rot = x;
  fake_quant_affine_forward(x.data(), 1, cols, f, plain.data());
  hadamard_rotate(rot.data(), 1, cols, cols, signs.data());
  fake_quant_affine_forward(rot.data(), 1, cols, f, rot.data());
  hadamard_rotate(rot.data(), 1, cols, cols, signs.data(), true);
  double e_plain = 0, e_rot = 0;
  for (index_t i = 0; i < cols; ++i)
    if (i != 17) {
      e_plain += std::pow(plain[size_t(i)] - x[size_t(i)], 2);
      e_rot += std::pow(rot[size_t(i)] - x[size_t(i)], 2);
    }
  CHECK(e_rot < 0.1 * e_plain);
}

TEST_CASE("QAT ops and rotations allocate nothing", "[quant][qat][memory]") {
  REQUIRE(memory::tracking_enabled());
  const size_t n = 4096;
  auto x = ref::uniform_data(n, 60);
  std::vector<float> y(n), dx(n), signs(n), step(64), ds(64);
  hadamard_signs(1, index_t(n), signs.data());
  const lsq_format f{4, true, 64};
  lsq_init_steps(x.data(), 1, index_t(n), f, step.data());
  memory::region r;
  fake_quant_affine_forward(x.data(), 4, 1024, {4, false, granularity::per_group, 128}, y.data());
  fake_quant_fourbit_forward(x.data(), n, fourbit::nf4, 64, y.data());
  fake_quant_fp8_forward(x.data(), n, fp8_format::e4m3, 64, y.data());
  fake_quant_backward(x.data(), y.data(), n, dx.data());
  lsq_forward(x.data(), step.data(), 1, index_t(n), f, y.data());
  lsq_backward(x.data(), step.data(), y.data(), 1, index_t(n), f, dx.data(), ds.data());
  hadamard_rotate(x.data(), 1, index_t(n), index_t(n), signs.data());
  CHECK(r.allocations() == 0);
}

TEST_CASE("KIVI cache: residual exact, quantized tokens within half a step, layout, memory",
          "[quant][kivi]") {
  for (int bits : {2, 4}) {
    kivi_config c{bits, 64, 16, 32, 200};
    kivi_cache cache(c);
    const size_t d = 64, T = 150;
    auto K = ref::uniform_data(T * d, 70, -1.f, 1.f), V = ref::uniform_data(T * d, 71, -1.f, 1.f);
    for (size_t t = 0; t < T; ++t) K[t * d + 5] *= 20.f;  // a per-channel key outlier
    for (size_t t = 0; t < 16; ++t) K[t * d + 9] = 0.25f; // a constant run
    std::vector<float> Kd(T * d), Vd(T * d);
    memory::region r;
    for (size_t t = 0; t < T; ++t) {
      cache.append(K.data() + t * d, V.data() + t * d);
      const index_t s = index_t(t + 1);
      REQUIRE(cache.quantized_tokens() == std::max<index_t>(0, (s - 32) / 16) * 16);
    }
    cache.dequantize(Kd.data(), Vd.data());
    CHECK(r.allocations() == 0);
    const size_t nq = size_t(cache.quantized_tokens());
    for (size_t i = nq * d; i < T * d; ++i) REQUIRE((Kd[i] == K[i] && Vd[i] == V[i]));
    const double qmax = (1 << bits) - 1;
    for (size_t g = 0; g < nq / 16; ++g) {
      for (size_t ch = 0; ch < d; ++ch) { // keys: per channel over 16 tokens
        double lo = 1e30, hi = -1e30;
        for (size_t t = 0; t < 16; ++t)
          lo = std::min(lo, double(K[(g * 16 + t) * d + ch])),
          hi = std::max(hi, double(K[(g * 16 + t) * d + ch]));
        for (size_t t = 0; t < 16; ++t) {
          const size_t i = (g * 16 + t) * d + ch;
          REQUIRE(std::fabs(Kd[i] - K[i]) <= 0.5 * (hi - lo) / qmax * 1.001 + 1e-6);
        }
      }
      for (size_t t = 0; t < 16; ++t) // values: per token over channel groups of 16
        for (size_t j = 0; j < d / 16; ++j) {
          double lo = 1e30, hi = -1e30;
          const size_t b = (g * 16 + t) * d + j * 16;
          for (size_t k = 0; k < 16; ++k)
            lo = std::min(lo, double(V[b + k])), hi = std::max(hi, double(V[b + k]));
          for (size_t k = 0; k < 16; ++k)
            REQUIRE(std::fabs(Vd[b + k] - V[b + k]) <= 0.5 * (hi - lo) / qmax * 1.001 + 1e-6);
        }
    }
    const size_t residual_bytes = (T - nq) * d * 8;
    CHECK(cache.bytes_used() - residual_bytes < nq * d * 8 / (bits == 2 ? 4 : 2));
  }
  kivi_cache small(kivi_config{4, 32, 16, 16, 2});
  std::vector<float> k(32, 1.f);
  small.append(k.data(), k.data());
  small.append(k.data(), k.data());
  CHECK_THROWS_AS(small.append(k.data(), k.data()), lowmem::invalid_argument);
  CHECK(small.size() == 2);
  CHECK_THROWS_AS(kivi_cache(kivi_config{3, 64, 16, 32, 10}), lowmem::invalid_argument);
  CHECK_THROWS_AS(kivi_cache(kivi_config{2, 64, 16, 24, 10}), lowmem::invalid_argument);
}
