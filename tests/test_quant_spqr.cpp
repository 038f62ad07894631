// SpQR (arXiv:2306.03078): bilevel group statistics + CSR fp32 outliers. Decoding, forward and
// backward against a double reference built from the documented layout; codes are RTN against
// the stored statistics; outliers (by the sensitivity criterion) reconstruct exactly and lower the
// error of data with planted outliers; bad input; no allocation; finite differences.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/spqr.hpp>

#include <cmath>
#include <limits>
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
// weights in [-0.1, 0.1] with planted large entries (every 37th element, |w| in [0.8, 1])
RowMatrixXf planted(index_t r, index_t c, std::uint64_t id) {
  RowMatrixXf m = random_matrix(r, c, id, 0.1f);
  for (index_t i = 5; i < m.size(); i += 37)
    m.data()[i] = std::copysign(0.8f + 2.f * std::fabs(m.data()[i]), m.data()[i]);
  return m;
}
std::vector<double> decode_ref(const spqr_weight& q) {
  return ref::spqr_decode_ref(std::size_t(q.rows), std::size_t(q.cols), std::size_t(q.group),
                              std::size_t(q.stat_group), q.codes.data(), q.scale_q.data(),
                              q.zero_q.data(), q.scale_stats.data(), q.zero_stats.data(),
                              q.row_ptr.data(), q.col_idx.data(), q.values.data());
}
double nmse_vs(const RowMatrixXf& W, const RowMatrixXf& D) {
  return ref::nmse(D.data(), W.data(), std::size_t(W.size()));
}
} // namespace

LOWMEM_ARCH_TEST_CASE("SpQR decode, forward and backward equal the double reference",
                      "[quant][spqr]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  struct shape {
    index_t out, in;
    spqr_config cfg;
  };
  const shape shapes[] = {{24, 64, {3, 16, 16, 4.f, nullptr}},
                          {7, 48, {2, 16, 5, 4.f, nullptr}},
                          {5, 30, {4, 10, 3, 2.f, nullptr}},
                          {9, 33, {3, 11, 16, std::numeric_limits<float>::infinity(), nullptr}}};
  for (const shape& sh : shapes)
    for (index_t M : {1, 5}) {
      INFO("out " << sh.out << " in " << sh.in << " bits " << sh.cfg.bits << " group "
                  << sh.cfg.group << " M " << M);
      const RowMatrixXf Wd = planted(sh.out, sh.in, 1 + std::uint64_t(sh.in));
      const spqr_weight q = spqr_weight::quantize<Arch>(Wd, sh.cfg);
      if (std::isfinite(sh.cfg.outlier_tau))
        CHECK(q.outliers() > 0);
      else
        CHECK(q.outliers() == 0);
      const auto want = decode_ref(q);
      RowMatrixXf D(sh.out, sh.in);
      spqr_dequantize<Arch>(q, D);
      CHECK(ref::max_rel_error(D.data(), want.data(), want.size()) < 1e-6);

      const RowMatrixXf x = random_matrix(M, sh.in, 2), dy = random_matrix(M, sh.out, 3);
      RowMatrixXf y(M, sh.out), dx = RowMatrixXf::Constant(M, sh.in, 1.f);
      owned_workspace ws(spqr_workspace_bytes(q));
      spqr_forward<Arch>(x, q, y, ws.get());
      spqr_backward<Arch>(dy, q, dx, ws.get());
      std::vector<double> y_ref(std::size_t(M * sh.out), 0.0), dx_ref(std::size_t(M * sh.in), 1.0);
      for (index_t m = 0; m < M; ++m)
        for (index_t o = 0; o < sh.out; ++o)
          for (index_t k = 0; k < sh.in; ++k) {
            const double w = want[std::size_t(o * sh.in + k)];
            y_ref[std::size_t(m * sh.out + o)] += double(x(m, k)) * w;
            dx_ref[std::size_t(m * sh.in + k)] += double(dy(m, o)) * w; // accumulates onto 1
          }
      CHECK(ref::max_rel_error(y.data(), y_ref.data(), y_ref.size()) < 1e-5);
      CHECK(ref::max_rel_error(dx.data(), dx_ref.data(), dx_ref.size()) < 1e-5);
    }
}

TEST_CASE("SpQR quantize: RTN codes against the stored statistics; outliers exact and chosen by "
          "sensitivity; bits per parameter",
          "[quant][spqr]") {
  const index_t out = 32, in = 128;
  const RowMatrixXf Wd = planted(out, in, 7);
  const spqr_weight q = spqr_weight::quantize(Wd, {3, 16, 16, 8.f, nullptr});
  const std::size_t n = std::size_t(Wd.size());
  std::vector<std::uint8_t> is_out(n, 0);
  for (index_t r = 0; r < out; ++r)
    for (std::int32_t k = q.row_ptr[std::size_t(r)]; k < q.row_ptr[std::size_t(r) + 1]; ++k)
      is_out[std::size_t(r * in + q.col_idx[std::size_t(k)])] = 1;
  RowMatrixXf D(out, in);
  spqr_dequantize(q, D);
  std::size_t planted_found = 0, planted_total = 0;
  const float wmax = Wd.cwiseAbs().maxCoeff();
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t g = i / 16;
    const float sh = q.scale(g), zh = q.zero(g);
    REQUIRE(q.scale_q[g] <= 7);
    REQUIRE(q.zero_q[g] <= 7);
    const float inv = sh > 0 ? 1.0f / sh : 0.0f;
    const float t = std::nearbyint(std::fma(Wd.data()[i], inv, zh));
    REQUIRE(ref::nibble(q.codes.data(), i) == int(std::min(7.f, std::max(0.f, t))));
    if (is_out[i]) REQUIRE(std::fabs(D.data()[i] - Wd.data()[i]) <= 1e-6f * wmax); // 1 rounding
    if (i % 37 == 5) ++planted_total, planted_found += is_out[i];
  }
  INFO("outliers " << q.outliers() << " planted found " << planted_found << "/" << planted_total);
  CHECK(planted_found == planted_total); // every planted weight is an outlier
  CHECK(q.outliers() < n / 20);          // and they stay a few percent of W
  CHECK(q.bits_per_param() < 3.0 + 0.375 + 0.5 + 64.0 / 20 + 0.3);

  // without outliers the planted weights stretch their groups: error is much larger
  const spqr_weight plain =
      spqr_weight::quantize(Wd, {3, 16, 16, std::numeric_limits<float>::infinity(), nullptr});
  RowMatrixXf Dp(out, in);
  spqr_dequantize(plain, Dp);
  INFO("NMSE with outliers " << nmse_vs(Wd, D) << " without " << nmse_vs(Wd, Dp));
  CHECK(nmse_vs(Wd, D) * 4 < nmse_vs(Wd, Dp));

  // the Hessian diagonal steers the choice: a heavy input column takes outliers first
  std::vector<float> h(std::size_t(in), 1.f);
  h[3] = 1e4f;
  const spqr_weight qh = spqr_weight::quantize(Wd, {3, 16, 16, 8.f, h.data()});
  std::size_t col3 = 0;
  for (std::int32_t c : qh.col_idx) col3 += c == 3;
  std::size_t col3_plain = 0;
  for (std::int32_t c : q.col_idx) col3_plain += c == 3;
  CHECK(col3 > col3_plain);
}

TEST_CASE("SpQR: no allocation in forward/backward; bad input throws before writing; gradient",
          "[quant][spqr][errors][gradcheck]") {
  REQUIRE(memory::tracking_enabled());
  RowMatrixXf Wd = planted(16, 64, 9);
  const spqr_weight q = spqr_weight::quantize(Wd);
  RowMatrixXf x = random_matrix(3, 64, 4);
  const RowMatrixXf dy = random_matrix(3, 16, 5);
  RowMatrixXf y = RowMatrixXf::Constant(3, 16, 7.f), dx = RowMatrixXf::Zero(3, 64);
  owned_workspace ws(spqr_workspace_bytes(q));
  {
    memory::region r;
    spqr_forward(x, q, y, ws.get());
    spqr_backward(dy, q, dx, ws.get());
    CHECK(r.allocations() == 0);
  }
  y.setConstant(7.f);
  const RowMatrixXf bad_x = random_matrix(3, 60, 4);
  CHECK_THROWS_AS(spqr_forward(bad_x, q, y, ws.get()), lowmem::invalid_argument);
  owned_workspace small(16);
  CHECK_THROWS_AS(spqr_forward(x, q, y, small.get()), lowmem::invalid_argument);
  CHECK((y.array() == 7.f).all());
  CHECK_THROWS_AS(spqr_weight::quantize(Wd, {5, 16, 16, 8.f, nullptr}), lowmem::invalid_argument);
  CHECK_THROWS_AS(spqr_weight::quantize(Wd, {3, 24, 16, 8.f, nullptr}), lowmem::invalid_argument);
  CHECK_THROWS_AS(spqr_weight::quantize(Wd, {3, 16, 0, 8.f, nullptr}), lowmem::invalid_argument);
  CHECK_THROWS_AS(spqr_weight::quantize(Wd, {3, 16, 16, 0.f, nullptr}), lowmem::invalid_argument);
  Wd(2, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(spqr_weight::quantize(Wd), lowmem::invalid_argument);

  // dx = dy·deq(W) is the gradient of L = Σ dy ⊙ (x·deq(W)ᵀ)
  RowMatrixXf D(16, 64);
  spqr_dequantize(q, D);
  dx.setZero();
  spqr_backward(dy, q, dx, ws.get());
  auto loss = [&] {
    double l = 0;
    for (index_t m = 0; m < 3; ++m)
      for (index_t o = 0; o < 16; ++o) {
        double acc = 0;
        for (index_t k = 0; k < 64; ++k) acc += double(x(m, k)) * double(D(o, k));
        l += double(dy(m, o)) * acc;
      }
    return l;
  };
  test::gradcheck(loss, x.data(), std::size_t(x.size()), dx.data(), "dx");
}
