// SHiRA, SLTrain, the Kronecker adapter and the initialisations (kaiming, PiSSA): dense double
// references, finite differences, sparse kernels on every arch, supports, merges, bad input.
#include <catch2/catch.hpp>
#include <lowmem/adapters.hpp>
#include <lowmem/core/memory.hpp>

#include <Eigen/SVD>
#include <algorithm>
#include <vector>

#include "reference/adapters_reference.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"
#include "support/rel_error.hpp"

using namespace lowmem;
using test::rel;
using test::relv;
using Map = Eigen::Map<RowMatrixXf>;

namespace {

struct support_data {
  std::vector<std::int64_t> row_ptr;
  std::vector<std::int32_t> col;
  csr_support view(index_t out, index_t in) const { return {out, in, row_ptr.data(), col.data()}; }
};
support_data random_support(index_t out, index_t in, double density, std::uint64_t id) {
  const index_t k = sparse_support_per_row(in, density);
  support_data s{std::vector<std::int64_t>(out + 1), std::vector<std::int32_t>(out * k)};
  sparse_support_random(out, in, density, random::stream{11, id}, s.row_ptr.data(), s.col.data());
  return s;
}
struct shape {
  index_t rows, in, out;
};
const shape shapes[] = {{7, 13, 11}, {1, 17, 5}, {70, 40, 24}, {130, 19, 21}};
} // namespace

LOWMEM_ARCH_TEST_CASE("sparse panel kernels match scalar loops", "[adapters][sparse][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  constexpr std::size_t P = adapters::kernels::panel;
  const index_t out = 9, in = 14;
  const auto s = random_support(out, in, 0.3, 1);
  const auto val = ref::uniform_data(s.col.size(), 2);
  const auto xt = ref::uniform_data(in * P, 3), yt0 = ref::uniform_data(out * P, 4);
  auto yt = yt0;
  adapters::kernels::csr_times_panel<Arch>(s.row_ptr.data(), s.col.data(), val.data(), out,
                                           xt.data(), yt.data());
  auto xt2 = xt;
  adapters::kernels::csr_transpose_times_panel<Arch>(s.row_ptr.data(), s.col.data(), val.data(),
                                                     out, yt0.data(), xt2.data());
  std::vector<float> g(s.col.size(), 1.f);
  adapters::kernels::sddmm_panel<Arch>(s.row_ptr.data(), s.col.data(), out, yt0.data(), xt.data(),
                                       g.data());
  std::vector<double> yr(yt0.begin(), yt0.end()), xr(xt.begin(), xt.end()), gr(g.size(), 1.0);
  for (index_t j = 0; j < out; ++j)
    for (std::int64_t k = s.row_ptr[j]; k < s.row_ptr[j + 1]; ++k)
      for (std::size_t t = 0; t < P; ++t) {
        yr[j * P + t] += double(val[k]) * xt[s.col[k] * P + t];
        xr[s.col[k] * P + t] += double(val[k]) * yt0[j * P + t];
        gr[k] += double(yt0[j * P + t]) * xt[s.col[k] * P + t];
      }
  CHECK(relv(yt, yr) < 1e-6);
  CHECK(relv(xt2, xr) < 1e-6);
  CHECK(relv(g, gr) < 1e-5);
}

LOWMEM_ARCH_TEST_CASE("sparse transposed product split by columns equals the whole; panel "
                      "transposes round-trip",
                      "[adapters][sparse][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  constexpr std::size_t P = adapters::kernels::panel;
  const index_t out = 23, in = 37;
  const auto s = random_support(out, in, 0.4, 2);
  const auto val = ref::uniform_data(s.col.size(), 5);
  const auto yt = ref::uniform_data(out * P, 6), xt0 = ref::uniform_data(in * P, 7);
  auto whole = xt0, split = xt0;
  adapters::kernels::csr_transpose_times_panel<Arch>(s.row_ptr.data(), s.col.data(), val.data(),
                                                     out, yt.data(), whole.data());
  for (std::int32_t c0 : {0, 5, 6, 20}) { // ranges [0,5) [5,6) [6,20) [20,37)
    const std::int32_t c1 = c0 == 0 ? 5 : c0 == 5 ? 6 : c0 == 6 ? 20 : std::int32_t(in);
    adapters::kernels::csr_transpose_times_panel<Arch>(s.row_ptr.data(), s.col.data(), val.data(),
                                                       out, yt.data(), split.data(), c0, c1);
  }
  CHECK(ref::bitwise_equal(whole.data(), split.data(), whole.size()));
  // SDDMM against the scalar loop
  std::vector<float> g(s.col.size(), 0.5f);
  adapters::kernels::sddmm_panel<Arch>(s.row_ptr.data(), s.col.data(), out, yt.data(), xt0.data(),
                                       g.data());
  std::vector<double> gr(g.size(), 0.5);
  for (index_t j = 0; j < out; ++j)
    for (std::int64_t k = s.row_ptr[j]; k < s.row_ptr[j + 1]; ++k)
      for (std::size_t t = 0; t < P; ++t) gr[k] += double(yt[j * P + t]) * xt0[s.col[k] * P + t];
  CHECK(relv(g, gr) < 1e-5);
  // rows_to_panel / panel_add_to_rows on odd sizes with a row stride (ld > ncols)
  for (std::size_t nb : {std::size_t(1), P - 1, P})
    for (std::size_t ncols : {std::size_t(1), std::size_t(17), std::size_t(35)}) {
      const std::size_t ld = ncols + 3;
      const auto m = ref::uniform_data(nb * ld, 8);
      std::vector<float> pan(ncols * P, 9.f);
      adapters::kernels::rows_to_panel(m.data(), ld, nb, ncols, pan.data());
      bool ok = true;
      for (std::size_t c = 0; c < ncols; ++c)
        for (std::size_t t = 0; t < P; ++t)
          ok = ok && pan[c * P + t] == (t < nb ? m[t * ld + c] : 0.0f);
      CHECK(ok);
      auto dst = ref::uniform_data(nb * ld, 10);
      const auto dst0 = dst;
      adapters::kernels::panel_add_to_rows(pan.data(), nb, ncols, dst.data(), ld);
      for (std::size_t t = 0; t < nb; ++t)
        for (std::size_t c = 0; c < ld; ++c)
          ok = ok &&
               dst[t * ld + c] == (c < ncols ? dst0[t * ld + c] + m[t * ld + c] : dst0[t * ld + c]);
      CHECK(ok);
    }
}

TEST_CASE("sparse supports: random and magnitude", "[adapters][sparse]") {
  const index_t out = 20, in = 300;
  const auto s = random_support(out, in, 0.02, 5);
  const index_t k = sparse_support_per_row(in, 0.02);
  CHECK(k == 6);
  for (index_t j = 0; j < out; ++j) {
    CHECK(s.row_ptr[j + 1] - s.row_ptr[j] == k);
    for (std::int64_t q = s.row_ptr[j] + 1; q < s.row_ptr[j + 1]; ++q)
      CHECK(s.col[q] > s.col[q - 1]);
  }
  CHECK(random_support(out, in, 0.02, 5).col == s.col); // a pure function of the stream
  CHECK(random_support(out, in, 0.02, 6).col != s.col); // another stream, another pattern
  // columns are spread: every tenth of the columns gets some entries
  std::vector<int> decile(10, 0);
  for (auto c : s.col) decile[std::size_t(c) * 10 / std::size_t(in)]++;
  for (int n : decile) CHECK(n > 0);
  CHECK(sparse_support_per_row(in, 1.0) == in);

  const auto W = ref::uniform_data(out * in, 7);
  std::vector<std::int64_t> rp(out + 1);
  std::vector<std::int32_t> col(out * k);
  owned_workspace ws(sparse_support_magnitude_workspace_bytes(in));
  sparse_support_magnitude(Map(const_cast<float*>(W.data()), out, in), 0.02, rp.data(), col.data(),
                           ws.get());
  for (index_t j = 0; j < out; ++j) {
    std::vector<float> a(W.begin() + j * in, W.begin() + (j + 1) * in);
    for (auto& v : a) v = std::fabs(v);
    std::vector<float> sorted = a;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    for (std::int64_t q = rp[j]; q < rp[j + 1]; ++q) CHECK(a[col[q]] >= sorted[k - 1]);
  }
  std::vector<std::int64_t> rp2(out + 1, 9);
  CHECK_THROWS_AS(sparse_support_random(out, in, 0.0, {}, rp2.data(), col.data()),
                  invalid_argument);
  CHECK_THROWS_AS(sparse_support_random(out, in, 1.5, {}, rp2.data(), col.data()),
                  invalid_argument);
  CHECK(rp2[0] == 9);
}

LOWMEM_ARCH_TEST_CASE("SHiRA forward, backward and merge match the dense reference",
                      "[adapters][shira]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const shape& sh : shapes) {
    const index_t rows = sh.rows, in = sh.in, out = sh.out;
    const auto sup = random_support(out, in, 0.2, std::uint64_t(in));
    const csr_support S = sup.view(out, in);
    auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
         val = ref::uniform_data(sup.col.size(), 3), dy = ref::uniform_data(rows * out, 4),
         bias = ref::uniform_data(out, 5);
    std::vector<float> y(rows * out), dx(rows * in, 0.f), dval(val.size(), 0.f);
    owned_workspace ws(shira_backward_workspace_bytes(in, out));
    Map xm(x.data(), rows, in), Wm(W.data(), out, in), dym(dy.data(), rows, out);
    shira_forward<Arch>(xm, Wm, bias.data(), S, val.data(), Map(y.data(), rows, out), ws.get());
    shira_backward<Arch>(xm, Wm, S, val.data(), dym, Map(dx.data(), rows, in), dval.data(),
                         ws.get());
    const ref::Md Weff =
        ref::dense(W, out, in) + ref::csr_dense(out, in, sup.row_ptr, sup.col, val);
    const ref::Md X = ref::dense(x, rows, in), DY = ref::dense(dy, rows, out);
    INFO("rows " << rows << " in " << in << " out " << out);
    CHECK(rel(y, ref::linear(X, Weff, bias.data())) < 1e-5);
    CHECK(rel(dx, DY * Weff) < 1e-5);
    CHECK(relv(dval, ref::csr_gather(DY.transpose() * X, sup.row_ptr, sup.col)) < 1e-5);
    // merge: the merged dense layer equals the adapter; unmerge restores W
    const auto W0 = W;
    shira_merge(Wm, S, val.data());
    CHECK(rel(W, Weff) < 1e-6);
    shira_merge(Wm, S, val.data(), -1.0f);
    double worst = 0;
    for (std::size_t i = 0; i < W.size(); ++i)
      worst = std::max(worst, double(std::fabs(W[i] - W0[i])));
    CHECK(worst <= 2.5e-7);
  }
}

TEST_CASE("SHiRA and SLTrain gradients pass finite differences", "[adapters][gradcheck]") {
  const index_t rows = 5, in = 12, out = 8, r = 2;
  const auto sup = random_support(out, in, 0.25, 3);
  const csr_support S = sup.view(out, in);
  auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
       val = ref::uniform_data(sup.col.size(), 3), dy = ref::uniform_data(rows * out, 4),
       A = ref::uniform_data(r * in, 5), B = ref::uniform_data(out * r, 6);
  const ref::Md G = ref::dense(dy, rows, out);
  owned_workspace ws(sltrain_backward_workspace_bytes(rows, in, out, r));
  {
    std::vector<float> dx(rows * in, 0.f), dval(val.size(), 0.f);
    shira_backward(Map(x.data(), rows, in), Map(W.data(), out, in), S, val.data(),
                   Map(dy.data(), rows, out), Map(dx.data(), rows, in), dval.data(), ws.get());
    auto loss = [&] {
      const ref::Md Weff =
          ref::dense(W, out, in) + ref::csr_dense(out, in, sup.row_ptr, sup.col, val);
      return ref::inner(G, ref::linear(ref::dense(x, rows, in), Weff, nullptr));
    };
    test::gradcheck(loss, val.data(), val.size(), dval.data(), "SHiRA dvalues");
    test::gradcheck(loss, x.data(), x.size(), dx.data(), "SHiRA dx");
  }
  {
    const float s = 0.75f;
    std::vector<float> y(rows * out), u(rows * r), dx(rows * in, 0.f), dA(r * in, 0.f),
        dB(out * r, 0.f), dval(val.size(), 0.f);
    Map xm(x.data(), rows, in), Am(A.data(), r, in), Bm(B.data(), out, r), um(u.data(), rows, r);
    sltrain_forward(xm, Am, Bm, s, S, val.data(), nullptr, Map(y.data(), rows, out), um, ws.get());
    sltrain_backward(xm, Am, Bm, s, S, val.data(), um, Map(dy.data(), rows, out),
                     Map(dx.data(), rows, in), Map(dA.data(), r, in), Map(dB.data(), out, r),
                     dval.data(), ws.get());
    auto weff = [&] {
      return ref::Md(s * ref::dense(B, out, r) * ref::dense(A, r, in) +
                     ref::csr_dense(out, in, sup.row_ptr, sup.col, val));
    };
    CHECK(rel(y, ref::linear(ref::dense(x, rows, in), weff(), nullptr)) < 1e-5);
    auto loss = [&] {
      return ref::inner(G, ref::linear(ref::dense(x, rows, in), weff(), nullptr));
    };
    test::gradcheck(loss, A.data(), A.size(), dA.data(), "SLTrain dA");
    test::gradcheck(loss, B.data(), B.size(), dB.data(), "SLTrain dB");
    test::gradcheck(loss, val.data(), val.size(), dval.data(), "SLTrain dvalues");
    test::gradcheck(loss, x.data(), x.size(), dx.data(), "SLTrain dx");
  }
}

TEST_CASE("SLTrain matches the dense reference at odd shapes", "[adapters][sltrain]") {
  for (const shape& sh : shapes) {
    const index_t rows = sh.rows, in = sh.in, out = sh.out, r = 1 + sh.rows % 3;
    const auto sup = random_support(out, in, 0.1, 8);
    auto x = ref::uniform_data(rows * in, 1), val = ref::uniform_data(sup.col.size(), 3),
         dy = ref::uniform_data(rows * out, 4), A = ref::uniform_data(r * in, 5),
         B = ref::uniform_data(out * r, 6), bias = ref::uniform_data(out, 7);
    std::vector<float> y(rows * out), u(rows * r), dx(rows * in, 0.f), dA(r * in, 0.f),
        dB(out * r, 0.f), dval(val.size(), 0.f);
    owned_workspace ws(sltrain_backward_workspace_bytes(rows, in, out, r));
    Map xm(x.data(), rows, in), Am(A.data(), r, in), Bm(B.data(), out, r), um(u.data(), rows, r);
    sltrain_forward(xm, Am, Bm, 2.f, sup.view(out, in), val.data(), bias.data(),
                    Map(y.data(), rows, out), um, ws.get());
    sltrain_backward(xm, Am, Bm, 2.f, sup.view(out, in), val.data(), um, Map(dy.data(), rows, out),
                     Map(dx.data(), rows, in), Map(dA.data(), r, in), Map(dB.data(), out, r),
                     dval.data(), ws.get());
    const ref::Md X = ref::dense(x, rows, in), DY = ref::dense(dy, rows, out);
    const ref::Md Bd = ref::dense(B, out, r), Ad = ref::dense(A, r, in);
    const ref::Md Weff = 2.0 * Bd * Ad + ref::csr_dense(out, in, sup.row_ptr, sup.col, val);
    const ref::Md dW = DY.transpose() * X;
    CHECK(rel(y, ref::linear(X, Weff, bias.data())) < 1e-5);
    CHECK(rel(dx, DY * Weff) < 1e-5);
    CHECK(rel(dA, 2.0 * Bd.transpose() * dW) < 1e-5);
    CHECK(rel(dB, 2.0 * dW * Ad.transpose()) < 1e-5);
    CHECK(relv(dval, ref::csr_gather(dW, sup.row_ptr, sup.col)) < 1e-5);
  }
}

TEST_CASE("sparse adapters reject bad input and allocate nothing", "[adapters][sparse]") {
  const index_t rows = 6, in = 10, out = 7;
  auto sup = random_support(out, in, 0.3, 1);
  auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
       val = ref::uniform_data(sup.col.size(), 3), dy = ref::uniform_data(rows * out, 4);
  std::vector<float> y(rows * out, 3.f), dx(rows * in, 0.f), dval(val.size(), 0.f);
  const auto y0 = y;
  owned_workspace ws(shira_backward_workspace_bytes(in, out));
  Map xm(x.data(), rows, in), Wm(W.data(), out, in), ym(y.data(), rows, out);
  auto bad = sup;
  bad.col[2] = std::int32_t(in); // out of range
  CHECK_THROWS_AS(shira_forward(xm, Wm, nullptr, bad.view(out, in), val.data(), ym, ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(shira_forward(xm, Wm, nullptr, sup.view(out + 1, in), val.data(), ym, ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(shira_forward(xm, Wm, nullptr, sup.view(out, in), val.data(), ym, workspace{}),
                  invalid_argument);
  CHECK(y == y0);
  const auto W0 = W;
  CHECK_THROWS_AS(shira_merge(Wm, bad.view(out, in), val.data()), invalid_argument);
  CHECK(W == W0);
  if (memory::tracking_enabled()) {
    memory::region region;
    shira_forward(xm, Wm, nullptr, sup.view(out, in), val.data(), ym, ws.get());
    shira_backward(xm, Wm, sup.view(out, in), val.data(), Map(dy.data(), rows, out),
                   Map(dx.data(), rows, in), dval.data(), ws.get());
    CHECK(region.allocations() == 0);
  }
}

// ---- Kronecker
// ------------------------------------------------------------------------------------
TEST_CASE("Kronecker adapter matches the dense A⊗B reference", "[adapters][kron]") {
  struct kshape {
    index_t rows, a1, a2, b1, b2;
  };
  for (const kshape& k : {kshape{5, 2, 3, 4, 5}, kshape{1, 1, 1, 3, 7}, kshape{9, 3, 4, 5, 2}}) {
    const index_t out = k.a1 * k.b1, in = k.a2 * k.b2, rows = k.rows;
    auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
         A = ref::uniform_data(k.a1 * k.a2, 3), B = ref::uniform_data(k.b1 * k.b2, 4),
         dy = ref::uniform_data(rows * out, 5), bias = ref::uniform_data(out, 6);
    std::vector<float> y(rows * out), dx(rows * in, 0.f), dA(k.a1 * k.a2, 0.f),
        dB(k.b1 * k.b2, 0.f);
    const float s = 0.6f;
    owned_workspace ws(kron_workspace_bytes(k.a2, k.b1));
    Map xm(x.data(), rows, in), Wm(W.data(), out, in), Am(A.data(), k.a1, k.a2),
        Bm(B.data(), k.b1, k.b2);
    kron_forward(xm, Wm, bias.data(), Am, Bm, s, Map(y.data(), rows, out), ws.get());
    kron_backward(xm, Wm, Am, Bm, Map(dy.data(), rows, out), s, Map(dx.data(), rows, in),
                  Map(dA.data(), k.a1, k.a2), Map(dB.data(), k.b1, k.b2), ws.get());
    const ref::Md G = ref::dense(dy, rows, out);
    auto weff = [&] {
      return ref::Md(ref::dense(W, out, in) +
                     s * ref::kron(ref::dense(A, k.a1, k.a2), ref::dense(B, k.b1, k.b2)));
    };
    const ref::Md X = ref::dense(x, rows, in);
    CHECK(rel(y, ref::linear(X, weff(), bias.data())) < 1e-5);
    CHECK(rel(dx, G * weff()) < 1e-5);
    auto loss = [&] {
      return ref::inner(G, ref::linear(ref::dense(x, rows, in), weff(), nullptr));
    };
    test::gradcheck(loss, A.data(), A.size(), dA.data(), "kron dA");
    test::gradcheck(loss, B.data(), B.size(), dB.data(), "kron dB");
    const auto W0 = W;
    kron_merge(Wm, Am, Bm, s);
    CHECK(rel(W, ref::dense(W0, out, in) +
                     s * ref::kron(ref::dense(A, k.a1, k.a2), ref::dense(B, k.b1, k.b2))) < 1e-6);
    if (memory::tracking_enabled()) {
      memory::region region;
      kron_forward(xm, Wm, nullptr, Am, Bm, s, Map(y.data(), rows, out), ws.get());
      kron_backward(xm, Wm, Am, Bm, Map(dy.data(), rows, out), s, Map(dx.data(), rows, in),
                    Map(dA.data(), k.a1, k.a2), Map(dB.data(), k.b1, k.b2), ws.get());
      CHECK(region.allocations() == 0);
    }
    RowMatrixXf xbad(rows, in + 1);
    CHECK_THROWS_AS(kron_forward(xbad, Wm, nullptr, Am, Bm, s, Map(y.data(), rows, out), ws.get()),
                    invalid_argument);
  }
}

// ---- initialisations
// ------------------------------------------------------------------------------
TEST_CASE("kaiming init: A in its bound, B zero, layer unchanged", "[adapters][init]") {
  RowMatrixXf A(4, 50), B = RowMatrixXf::Ones(30, 4);
  lora_init_kaiming(random::stream{3, 4}, A, B);
  CHECK(B.isZero());
  CHECK(A.cwiseAbs().maxCoeff() <= 1.0f / std::sqrt(50.0f));
  CHECK(A.cwiseAbs().maxCoeff() > 0.8f / std::sqrt(50.0f));
  RowMatrixXf A0(0, 50), B0(30, 0);
  CHECK_THROWS_AS(lora_init_kaiming({}, A0, B0), invalid_argument);
}

TEST_CASE("PiSSA: W_res + s·B·A = W, and B·A is the best rank-r approximation",
          "[adapters][init][pissa]") {
  const index_t out = 120, in = 90, r = 6;
  // W = a rank-10 signal with decaying singular values + small noise
  RowMatrixXf W = RowMatrixXf::Zero(out, in);
  const auto U = ref::uniform_data(out * 10, 1), V = ref::uniform_data(in * 10, 2),
             N = ref::uniform_data(out * in, 3, -1e-3f, 1e-3f);
  for (index_t q = 0; q < 10; ++q)
    for (index_t i = 0; i < out; ++i)
      for (index_t j = 0; j < in; ++j)
        W(i, j) += std::pow(0.6f, float(q)) * U[i * 10 + q] * V[j * 10 + q];
  for (index_t i = 0; i < out * in; ++i) W.data()[i] += N[std::size_t(i)];
  const RowMatrixXf W0 = W;
  RowMatrixXf A(r, in), B(out, r);
  std::vector<float> sigma(r);
  const float s = 2.0f;
  pissa_init(W, s, {}, A, B, sigma.data());
  const ref::Md W0d = W0.cast<double>(), Ad = A.cast<double>(), Bd = B.cast<double>();
  const ref::Md recon = W.cast<double>() + s * Bd * Ad;
  const double rec_err = (recon - W0d).norm() / W0d.norm();
  INFO("reconstruction error " << rec_err);
  CHECK(rec_err < 1e-6);
  Eigen::JacobiSVD<ref::Md> exact(W0d, Eigen::ComputeThinU | Eigen::ComputeThinV);
  for (index_t j = 0; j < r; ++j)
    CHECK(std::fabs(sigma[j] - exact.singularValues()[j]) < 1e-4 * exact.singularValues()[0]);
  // ‖W - s·B·A‖ equals the optimal rank-r error within 1%
  const double opt = exact.singularValues().tail(in - r).norm();
  CHECK((W0d - s * Bd * Ad).norm() < 1.01 * opt);
  RowMatrixXf Abig(in + 1, in), Bbig(out, in + 1);
  CHECK_THROWS_AS(pissa_init(W, s, {}, Abig, Bbig), invalid_argument);
}
