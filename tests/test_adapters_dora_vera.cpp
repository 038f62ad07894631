// DoRA (norm-constant and exact gradients) and VeRA against the dense double reference, with
// finite differences, odd shapes, bad input and no allocation.
#include <catch2/catch.hpp>
#include <lowmem/adapters.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/threading.hpp>

#include <vector>

#include "reference/adapters_reference.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"
#include "support/rel_error.hpp"

using namespace lowmem;
using test::minus;
using test::rel;
using test::relv;
using Map = Eigen::Map<RowMatrixXf>;
using VMap = Eigen::Map<Eigen::VectorXf>;

namespace {
struct shape {
  index_t rows, in, out, r;
};
const shape shapes[] = {{7, 13, 11, 3}, {1, 17, 5, 1}, {33, 40, 24, 8}, {130, 19, 21, 4}};

ref::Vd vec(const std::vector<float>& v) {
  ref::Vd r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[Eigen::Index(i)] = v[i];
  return r;
}

struct dora_data {
  index_t rows, in, out, r;
  std::vector<float> x, W, A, B, bias, m, dy;
  dora_data(const shape& s, std::uint64_t seed)
      : rows(s.rows), in(s.in), out(s.out), r(s.r), x(ref::uniform_data(rows * in, seed)),
        W(ref::uniform_data(out * in, seed + 1, -0.5f, 0.5f)),
        A(ref::uniform_data(r * in, seed + 2, -0.5f, 0.5f)),
        B(ref::uniform_data(out * r, seed + 3, -0.5f, 0.5f)),
        bias(ref::uniform_data(out, seed + 4)), m(ref::uniform_data(out, seed + 5, 0.5f, 2.0f)),
        dy(ref::uniform_data(rows * out, seed + 6)) {}
};

struct dora_out {
  std::vector<float> y, u, norms, dx, dA, dB, dm;
};
dora_out run_dora(dora_data& d, float s, bool exact, bool with_bias) {
  dora_out o{std::vector<float>(d.rows * d.out), std::vector<float>(d.rows * d.r),
             std::vector<float>(d.out),          ref::uniform_data(d.rows * d.in, 9),
             ref::uniform_data(d.r * d.in, 10),  ref::uniform_data(d.out * d.r, 11),
             ref::uniform_data(d.out, 12)};
  owned_workspace ws(std::max(dora_forward_workspace_bytes(d.out, d.r),
                              dora_backward_workspace_bytes(d.rows, d.out, d.r, exact)));
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
      Bm(d.B.data(), d.out, d.r), ym(o.y.data(), d.rows, d.out), um(o.u.data(), d.rows, d.r),
      dym(d.dy.data(), d.rows, d.out);
  VMap mm(d.m.data(), d.out), nm(o.norms.data(), d.out);
  const float* b = with_bias ? d.bias.data() : nullptr;
  dora_forward(xm, Wm, b, Am, Bm, mm, s, ym, um, nm, ws.get());
  dora_backward(xm, Wm, b, Am, Bm, mm, um, nm, ym, dym, s, exact, Map(o.dx.data(), d.rows, d.in),
                Map(o.dA.data(), d.r, d.in), Map(o.dB.data(), d.out, d.r), VMap(o.dm.data(), d.out),
                ws.get());
  return o;
}
} // namespace

TEST_CASE("DoRA forward and backward match the dense double reference", "[adapters][dora]") {
  for (const shape& sh : shapes)
    for (bool exact : {false, true})
      for (bool with_bias : {false, true}) {
        dora_data d(sh, 40 + std::uint64_t(sh.in));
        const float s = lora_scale(2.0f, d.r);
        const auto o = run_dora(d, s, exact, with_bias);
        const auto g = ref::dora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in),
                                 with_bias ? d.bias.data() : nullptr, ref::dense(d.A, d.r, d.in),
                                 ref::dense(d.B, d.out, d.r), vec(d.m), s, exact,
                                 ref::dense(d.dy, d.rows, d.out));
        INFO("rows " << sh.rows << " in " << sh.in << " out " << sh.out << " r " << sh.r
                     << " exact " << exact << " bias " << with_bias);
        CHECK(relv(o.norms, g.norms) < 1e-5);
        CHECK(rel(o.y, g.y) < 1e-5);
        CHECK(rel(minus(o.dx, ref::uniform_data(d.rows * d.in, 9)), g.dx) < 1e-5);
        CHECK(rel(minus(o.dA, ref::uniform_data(d.r * d.in, 10)), g.dA) < 1e-4);
        CHECK(rel(minus(o.dB, ref::uniform_data(d.out * d.r, 11)), g.dB) < 1e-4);
        CHECK(relv(minus(o.dm, ref::uniform_data(d.out, 12)), g.dm) < 1e-4);
      }
}

TEST_CASE("DoRA norms never form B·A and match the dense norms", "[adapters][dora]") {
  dora_data d({1, 50, 30, 6}, 3);
  std::vector<float> n(d.out);
  owned_workspace ws(dora_forward_workspace_bytes(d.out, d.r));
  dora_norms(Map(d.W.data(), d.out, d.in), Map(d.A.data(), d.r, d.in), Map(d.B.data(), d.out, d.r),
             0.7f, VMap(n.data(), d.out), ws.get());
  const ref::Md V =
      ref::dense(d.W, d.out, d.in) + 0.7 * ref::dense(d.B, d.out, d.r) * ref::dense(d.A, d.r, d.in);
  CHECK(relv(n, ref::Vd(V.rowwise().norm())) < 1e-6);
}

TEST_CASE("DoRA exact gradient passes central finite differences", "[adapters][dora][gradcheck]") {
  dora_data d({5, 9, 7, 2}, 77);
  const float s = 1.5f;
  const auto G = ref::dense(d.dy, d.rows, d.out);
  auto loss = [&] {
    return ref::inner(G, ref::dora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in),
                                   d.bias.data(), ref::dense(d.A, d.r, d.in),
                                   ref::dense(d.B, d.out, d.r), vec(d.m), s, true, G)
                             .y);
  };
  auto o = run_dora(d, s, true, true);
  const auto dA = minus(o.dA, ref::uniform_data(d.r * d.in, 10));
  const auto dB = minus(o.dB, ref::uniform_data(d.out * d.r, 11));
  const auto dm = minus(o.dm, ref::uniform_data(d.out, 12));
  const auto dx = minus(o.dx, ref::uniform_data(d.rows * d.in, 9));
  test::gradcheck(loss, d.A.data(), d.A.size(), dA.data(), "dA");
  test::gradcheck(loss, d.B.data(), d.B.size(), dB.data(), "dB");
  test::gradcheck(loss, d.m.data(), d.m.size(), dm.data(), "dm");
  test::gradcheck(loss, d.x.data(), d.x.size(), dx.data(), "dx");
}

TEST_CASE("DoRA rejects bad input before writing and allocates nothing", "[adapters][dora]") {
  dora_data d({6, 10, 8, 2}, 5);
  std::vector<float> y(d.rows * d.out, 1.f), u(d.rows * d.r, 1.f), n(d.out, 1.f);
  const auto y0 = y, n0 = n;
  owned_workspace ws(dora_backward_workspace_bytes(d.rows, d.out, d.r, true));
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
      Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r);
  auto m0 = d.m;
  m0[3] = 0.f;
  CHECK_THROWS_AS(dora_forward(xm, Wm, nullptr, Am, Bm, VMap(m0.data(), d.out), 1.f, ym, um,
                               VMap(n.data(), d.out), ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(dora_forward(xm, Wm, nullptr, Am, Bm, VMap(d.m.data(), d.out - 1), 1.f, ym, um,
                               VMap(n.data(), d.out), ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(dora_forward(xm, Wm, nullptr, Am, Bm, VMap(d.m.data(), d.out), 1.f, ym, um,
                               VMap(n.data(), d.out)),
                  invalid_argument); // no workspace
  CHECK((y == y0 && n == n0));
  if (memory::tracking_enabled()) {
    std::vector<float> dx(d.rows * d.in), dA(d.r * d.in), dB(d.out * d.r), dm(d.out);
    memory::region region;
    dora_forward(xm, Wm, d.bias.data(), Am, Bm, VMap(d.m.data(), d.out), 1.f, ym, um,
                 VMap(n.data(), d.out), ws.get());
    dora_backward(xm, Wm, d.bias.data(), Am, Bm, VMap(d.m.data(), d.out), um, VMap(n.data(), d.out),
                  ym, Map(d.dy.data(), d.rows, d.out), 1.f, true, Map(dx.data(), d.rows, d.in),
                  Map(dA.data(), d.r, d.in), Map(dB.data(), d.out, d.r), VMap(dm.data(), d.out),
                  ws.get());
    CHECK(region.allocations() == 0);
  }
}

// ---- VeRA
// -----------------------------------------------------------------------------------------
namespace {
struct vera_run {
  std::vector<float> y, u, dx, dd, db;
};
template <class Arch>
vera_run run_vera(index_t rows, index_t in, index_t out, index_t r, std::vector<float>& x,
                  std::vector<float>& W, std::vector<float>& dvec, std::vector<float>& bvec,
                  std::vector<float>& dy, const float* bias, float s) {
  vera_run o{std::vector<float>(rows * out), std::vector<float>(rows * r),
             std::vector<float>(rows * in, 0.f), std::vector<float>(r, 0.f),
             std::vector<float>(out, 0.f)};
  owned_workspace ws(vera_backward_workspace_bytes(rows, in, out, r));
  Map xm(x.data(), rows, in), Wm(W.data(), out, in), um(o.u.data(), rows, r);
  vera_forward<Arch>(xm, Wm, bias, 1234, VMap(dvec.data(), r), VMap(bvec.data(), out), s,
                     Map(o.y.data(), rows, out), um, ws.get());
  vera_backward<Arch>(xm, Wm, 1234, VMap(dvec.data(), r), VMap(bvec.data(), out), um,
                      Map(dy.data(), rows, out), s, Map(o.dx.data(), rows, in),
                      VMap(o.dd.data(), r), VMap(o.db.data(), out), ws.get());
  return o;
}
// dense reference: W_eff = W + s·diag(b)·B·diag(d)·A
struct vera_ref {
  ref::Md y, dx;
  ref::Vd dd, db;
};
vera_ref vera_reference(const ref::Md& x, const ref::Md& W, const ref::Md& A, const ref::Md& B,
                        const ref::Vd& d, const ref::Vd& b, const float* bias, double s,
                        const ref::Md& dy, const ref::Md* mask = nullptr) {
  const ref::Md xd = mask ? ref::Md(x.array() * mask->array()) : x;
  const ref::Md dW = s * b.asDiagonal() * B * d.asDiagonal() * A;
  vera_ref o;
  o.y = ref::linear(x, W, bias) + xd * dW.transpose();
  ref::Md dxa = dy * dW;
  if (mask) dxa = (dxa.array() * mask->array()).matrix();
  o.dx = dy * W + dxa;
  const ref::Md dD = dy.transpose() * xd; // dΔW
  // ΔW_jc = s b_j Σ_k B_jk d_k A_kc
  const ref::Md BA_d = B * d.asDiagonal() * A;
  o.db = s * (dD.array() * BA_d.array()).rowwise().sum();
  const ref::Md M = (b.asDiagonal() * B).transpose() * dD; // [r, in]
  o.dd = s * (M.array() * A.array()).rowwise().sum();
  return o;
}
} // namespace

LOWMEM_ARCH_TEST_CASE("VeRA forward and backward match the dense double reference",
                      "[adapters][vera]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const shape& sh : shapes) {
    const index_t rows = sh.rows, in = sh.in, out = sh.out, r = sh.r;
    auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
         dvec = ref::uniform_data(r, 3), bvec = ref::uniform_data(out, 4),
         dy = ref::uniform_data(rows * out, 5), bias = ref::uniform_data(out, 6);
    const auto o = run_vera<Arch>(rows, in, out, r, x, W, dvec, bvec, dy, bias.data(), 0.8f);
    std::vector<float> A(r * in), B(out * r);
    vera_projections<Arch>(1234, Map(A.data(), r, in), Map(B.data(), out, r));
    // the projections are the documented kaiming-uniform values of the seed's streams
    CHECK(std::fabs(A[1] - (2.0f * random::stream{1234, 0}.uniform(1) - 1.0f) /
                               std::sqrt(float(in))) < 1e-6f);
    CHECK(std::fabs(B[0] - (2.0f * random::stream{1234, 1}.uniform(0) - 1.0f) /
                               std::sqrt(float(r))) < 1e-6f);
    const auto g = vera_reference(ref::dense(x, rows, in), ref::dense(W, out, in),
                                  ref::dense(A, r, in), ref::dense(B, out, r), vec(dvec), vec(bvec),
                                  bias.data(), 0.8, ref::dense(dy, rows, out));
    INFO("rows " << rows << " in " << in << " out " << out << " r " << r);
    CHECK(rel(o.y, g.y) < 1e-5);
    CHECK(rel(o.dx, g.dx) < 1e-5);
    CHECK(relv(o.dd, g.dd) < 1e-5);
    CHECK(relv(o.db, g.db) < 1e-5);
  }
}

TEST_CASE("VeRA gradients pass finite differences; bad input throws", "[adapters][vera]") {
  const index_t rows = 4, in = 9, out = 6, r = 3;
  auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
       dvec = ref::uniform_data(r, 3), bvec = ref::uniform_data(out, 4),
       dy = ref::uniform_data(rows * out, 5);
  std::vector<float> A(r * in), B(out * r);
  vera_projections(1234, Map(A.data(), r, in), Map(B.data(), out, r));
  const auto o =
      run_vera<simd::default_arch>(rows, in, out, r, x, W, dvec, bvec, dy, nullptr, 1.0f);
  const auto G = ref::dense(dy, rows, out);
  auto loss = [&] {
    return ref::inner(G, vera_reference(ref::dense(x, rows, in), ref::dense(W, out, in),
                                        ref::dense(A, r, in), ref::dense(B, out, r), vec(dvec),
                                        vec(bvec), nullptr, 1.0, G)
                             .y);
  };
  test::gradcheck(loss, dvec.data(), dvec.size(), o.dd.data(), "dd");
  test::gradcheck(loss, bvec.data(), bvec.size(), o.db.data(), "db");
  test::gradcheck(loss, x.data(), x.size(), o.dx.data(), "dx");

  std::vector<float> y(rows * out, 5.f), u(rows * r, 5.f);
  const auto y0 = y;
  owned_workspace ws(vera_backward_workspace_bytes(rows, in, out, in + 1));
  std::vector<float> dbig(in + 1, 1.f); // rank > min(in, out)
  CHECK_THROWS_AS(vera_forward(Map(x.data(), rows, in), Map(W.data(), out, in), nullptr, 1,
                               VMap(dbig.data(), in + 1), VMap(bvec.data(), out), 1.f,
                               Map(y.data(), rows, out), Map(u.data(), rows, r), ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(vera_forward(Map(x.data(), rows, in), Map(W.data(), out, in), nullptr, 1,
                               VMap(dvec.data(), r), VMap(bvec.data(), out - 1), 1.f,
                               Map(y.data(), rows, out), Map(u.data(), rows, r), ws.get()),
                  invalid_argument);
  CHECK(y == y0);
  if (memory::tracking_enabled()) {
    std::vector<float> dx(rows * in), dd(r), db(out);
    memory::region region;
    vera_forward(Map(x.data(), rows, in), Map(W.data(), out, in), nullptr, 1, VMap(dvec.data(), r),
                 VMap(bvec.data(), out), 1.f, Map(y.data(), rows, out), Map(u.data(), rows, r),
                 ws.get());
    vera_backward(Map(x.data(), rows, in), Map(W.data(), out, in), 1, VMap(dvec.data(), r),
                  VMap(bvec.data(), out), Map(u.data(), rows, r), Map(dy.data(), rows, out), 1.f,
                  Map(dx.data(), rows, in), VMap(dd.data(), r), VMap(db.data(), out), ws.get());
    CHECK(region.allocations() == 0);
  }
}

// ---- adapter dropout on DoRA and VeRA
// ------------------------------------------------------------
LOWMEM_ARCH_TEST_CASE("DoRA and VeRA with adapter dropout match the dense double reference",
                      "[adapters][dora][vera][dropout]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const shape& sh : shapes) {
    const adapter_dropout drop{0.3f, random::stream{91, std::uint64_t(sh.rows)}};
    const ref::Md mask = ref::dropout_factors(drop.stream, drop.p, sh.rows, sh.in);
    INFO("rows " << sh.rows << " in " << sh.in << " out " << sh.out << " r " << sh.r);
    for (bool exact : {false, true}) {
      dora_data d(sh, 60 + std::uint64_t(sh.in));
      const float s = lora_scale(2.0f, d.r);
      std::vector<float> y(d.rows * d.out), u(d.rows * d.r), n(d.out);
      auto dx = ref::uniform_data(d.rows * d.in, 9), dA = ref::uniform_data(d.r * d.in, 10),
           dB = ref::uniform_data(d.out * d.r, 11), dm = ref::uniform_data(d.out, 12);
      const auto dx0 = dx, dA0 = dA, dB0 = dB, dm0 = dm;
      owned_workspace ws(
          std::max(dora_forward_workspace_bytes(d.in, d.out, d.r, drop),
                   dora_backward_workspace_bytes(d.rows, d.in, d.out, d.r, exact, drop)));
      Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
          Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r);
      VMap mm(d.m.data(), d.out), nm(n.data(), d.out);
      dora_forward<Arch>(xm, Wm, d.bias.data(), Am, Bm, mm, s, drop, ym, um, nm, ws.get());
      dora_backward<Arch>(xm, Wm, d.bias.data(), Am, Bm, mm, um, nm, ym,
                          Map(d.dy.data(), d.rows, d.out), s, exact, drop,
                          Map(dx.data(), d.rows, d.in), Map(dA.data(), d.r, d.in),
                          Map(dB.data(), d.out, d.r), VMap(dm.data(), d.out), ws.get());
      const auto g =
          ref::dora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in), d.bias.data(),
                    ref::dense(d.A, d.r, d.in), ref::dense(d.B, d.out, d.r), vec(d.m), s, exact,
                    ref::dense(d.dy, d.rows, d.out), &mask);
      INFO("DoRA exact " << exact);
      CHECK(rel(y, g.y) < 1e-5);
      CHECK(rel(minus(dx, dx0), g.dx) < 1e-5);
      CHECK(rel(minus(dA, dA0), g.dA) < 1e-4);
      CHECK(rel(minus(dB, dB0), g.dB) < 1e-4);
      CHECK(relv(minus(dm, dm0), g.dm) < 1e-4);
    }
    // VeRA
    const index_t rows = sh.rows, in = sh.in, out = sh.out, r = sh.r;
    auto x = ref::uniform_data(rows * in, 1), W = ref::uniform_data(out * in, 2),
         dvec = ref::uniform_data(r, 3), bvec = ref::uniform_data(out, 4),
         dy = ref::uniform_data(rows * out, 5), bias = ref::uniform_data(out, 6);
    std::vector<float> y(rows * out), u(rows * r), dx(rows * in, 0.f), dd(r, 0.f), db(out, 0.f);
    owned_workspace ws(vera_backward_workspace_bytes(rows, in, out, r, drop));
    REQUIRE(vera_forward_workspace_bytes(in, out, r, drop) <= ws.capacity());
    Map xm(x.data(), rows, in), Wm(W.data(), out, in), um(u.data(), rows, r);
    vera_forward<Arch>(xm, Wm, bias.data(), 77, VMap(dvec.data(), r), VMap(bvec.data(), out), 0.8f,
                       drop, Map(y.data(), rows, out), um, ws.get());
    vera_backward<Arch>(xm, Wm, 77, VMap(dvec.data(), r), VMap(bvec.data(), out), um,
                        Map(dy.data(), rows, out), 0.8f, drop, Map(dx.data(), rows, in),
                        VMap(dd.data(), r), VMap(db.data(), out), ws.get());
    std::vector<float> A(r * in), B(out * r);
    vera_projections<Arch>(77, Map(A.data(), r, in), Map(B.data(), out, r));
    const auto g = vera_reference(ref::dense(x, rows, in), ref::dense(W, out, in),
                                  ref::dense(A, r, in), ref::dense(B, out, r), vec(dvec), vec(bvec),
                                  bias.data(), 0.8, ref::dense(dy, rows, out), &mask);
    CHECK(rel(y, g.y) < 1e-5);
    CHECK(rel(dx, g.dx) < 1e-5);
    CHECK(relv(dd, g.dd) < 1e-5);
    CHECK(relv(db, g.db) < 1e-5);
  }
}

TEST_CASE("DoRA and VeRA dropout gradients pass finite differences and allocate nothing",
          "[adapters][dora][vera][dropout][gradcheck]") {
  const adapter_dropout drop{0.25f, random::stream{8, 9}};
  {
    dora_data d({5, 9, 7, 2}, 177);
    const float s = 1.5f;
    const auto G = ref::dense(d.dy, d.rows, d.out);
    const ref::Md mask = ref::dropout_factors(drop.stream, drop.p, d.rows, d.in);
    auto loss = [&] {
      return ref::inner(G, ref::dora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in),
                                     d.bias.data(), ref::dense(d.A, d.r, d.in),
                                     ref::dense(d.B, d.out, d.r), vec(d.m), s, true, G, &mask)
                               .y);
    };
    std::vector<float> y(d.rows * d.out), u(d.rows * d.r), n(d.out), dx(d.rows * d.in, 0.f),
        dA(d.r * d.in, 0.f), dB(d.out * d.r, 0.f), dm(d.out, 0.f);
    owned_workspace ws(dora_backward_workspace_bytes(d.rows, d.in, d.out, d.r, true, drop));
    Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
        Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r),
        dym(d.dy.data(), d.rows, d.out), dxm(dx.data(), d.rows, d.in), dAm(dA.data(), d.r, d.in),
        dBm(dB.data(), d.out, d.r);
    VMap mm(d.m.data(), d.out), nm(n.data(), d.out), dmm(dm.data(), d.out);
    {
      memory::region region;
      dora_forward(xm, Wm, d.bias.data(), Am, Bm, mm, s, drop, ym, um, nm, ws.get());
      dora_backward(xm, Wm, d.bias.data(), Am, Bm, mm, um, nm, ym, dym, s, true, drop, dxm, dAm,
                    dBm, dmm, ws.get());
      if (memory::tracking_enabled()) CHECK(region.allocations() == 0);
    }
    test::gradcheck(loss, d.A.data(), d.A.size(), dA.data(), "DoRA dA");
    test::gradcheck(loss, d.B.data(), d.B.size(), dB.data(), "DoRA dB");
    test::gradcheck(loss, d.m.data(), d.m.size(), dm.data(), "DoRA dm");
    test::gradcheck(loss, d.x.data(), d.x.size(), dx.data(), "DoRA dx");
    // a dropout p outside [0, 1) throws before anything is written
    const auto y0 = y;
    CHECK_THROWS_AS(dora_forward(xm, Wm, nullptr, Am, Bm, mm, s, adapter_dropout{1.0f, {}}, ym, um,
                                 nm, ws.get()),
                    invalid_argument);
    CHECK(y == y0);
  }
  {
    const index_t rows = 4, in = 9, out = 6, r = 3;
    auto x = ref::uniform_data(rows * in, 21), W = ref::uniform_data(out * in, 22),
         dvec = ref::uniform_data(r, 23), bvec = ref::uniform_data(out, 24),
         dy = ref::uniform_data(rows * out, 25);
    std::vector<float> A(r * in), B(out * r), y(rows * out), u(rows * r), dx(rows * in, 0.f),
        dd(r, 0.f), db(out, 0.f);
    vera_projections(55, Map(A.data(), r, in), Map(B.data(), out, r));
    const ref::Md mask = ref::dropout_factors(drop.stream, drop.p, rows, in);
    owned_workspace ws(vera_backward_workspace_bytes(rows, in, out, r, drop));
    {
      memory::region region;
      vera_forward(Map(x.data(), rows, in), Map(W.data(), out, in), nullptr, 55,
                   VMap(dvec.data(), r), VMap(bvec.data(), out), 1.0f, drop,
                   Map(y.data(), rows, out), Map(u.data(), rows, r), ws.get());
      vera_backward(Map(x.data(), rows, in), Map(W.data(), out, in), 55, VMap(dvec.data(), r),
                    VMap(bvec.data(), out), Map(u.data(), rows, r), Map(dy.data(), rows, out), 1.0f,
                    drop, Map(dx.data(), rows, in), VMap(dd.data(), r), VMap(db.data(), out),
                    ws.get());
      if (memory::tracking_enabled()) CHECK(region.allocations() == 0);
    }
    const auto G = ref::dense(dy, rows, out);
    auto loss = [&] {
      return ref::inner(G, vera_reference(ref::dense(x, rows, in), ref::dense(W, out, in),
                                          ref::dense(A, r, in), ref::dense(B, out, r), vec(dvec),
                                          vec(bvec), nullptr, 1.0, G, &mask)
                               .y);
    };
    test::gradcheck(loss, dvec.data(), dvec.size(), dd.data(), "VeRA dd");
    test::gradcheck(loss, bvec.data(), bvec.size(), db.data(), "VeRA db");
    test::gradcheck(loss, x.data(), x.size(), dx.data(), "VeRA dx");
  }
}

// ---- threads
// -------------------------------------------------------------------------------------
TEST_CASE("DoRA on 48 rows with 4 OpenMP threads opens no region and allocates nothing",
          "[adapters][dora][threads][memory]") {
  // No warm_up_threads(): in this fresh process (ctest runs each test case alone) a parallel
  // region would allocate the OpenMP team. lowmem's passes split by work (core/threading.hpp), so
  // 48 rows stay serial whatever the thread budget (with item grains of 16 rows / 64 columns they
  // opened a region). Eigen is held to one thread: its own GEMM threading is not lowmem's.
  if (!memory::tracking_enabled()) return;
  const int omp0 = max_threads(), eigen0 = Eigen::nbThreads();
#if defined(_OPENMP)
  omp_set_num_threads(4);
#endif
  Eigen::setNbThreads(1);
  dora_data d({48, 40, 36, 4}, 77);
  const adapter_dropout drop{0.2f, random::stream{3, 1}};
  std::vector<float> y(d.rows * d.out), u(d.rows * d.r), n(d.out), dx(d.rows * d.in),
      dA(d.r * d.in), dB(d.out * d.r), dm(d.out);
  owned_workspace ws(std::max(dora_forward_workspace_bytes(d.in, d.out, d.r, drop),
                              dora_backward_workspace_bytes(d.rows, d.in, d.out, d.r, true, drop)));
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
      Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r);
  VMap mm(d.m.data(), d.out), nm(n.data(), d.out);
  {
    memory::region region;
    dora_forward(xm, Wm, d.bias.data(), Am, Bm, mm, 0.5f, drop, ym, um, nm, ws.get());
    dora_backward(xm, Wm, d.bias.data(), Am, Bm, mm, um, nm, ym, Map(d.dy.data(), d.rows, d.out),
                  0.5f, true, drop, Map(dx.data(), d.rows, d.in), Map(dA.data(), d.r, d.in),
                  Map(dB.data(), d.out, d.r), VMap(dm.data(), d.out), ws.get());
    CHECK(region.allocations() == 0);
  }
#if defined(_OPENMP)
  omp_set_num_threads(omp0);
#endif
  Eigen::setNbThreads(eigen0);
}

TEST_CASE("DoRA's own threaded passes are bitwise identical on 1 and 2 threads",
          "[adapters][dora][threads]") {
  // Eigen is held to one thread so that only lowmem's passes (row norms, the column scale of y,
  // h and dm, the 128-row blocks of the backward) change with the thread count. 300 rows = three
  // row blocks (the last partial), out = 136 = two 64-column blocks of h and a partial one; each
  // pass has at least two chunks' work (lowmem::min_chunk_work), so none of them stays serial
  // (in = 500: the row norms read 136 rows of 500 floats).
  const int omp0 = max_threads(), eigen0 = Eigen::nbThreads();
  const shape sh{300, 500, 136, 3};
  const adapter_dropout drop{0.25f, random::stream{5, 1}};
  struct result {
    std::vector<float> y, u, n, dx, dA, dB, dm;
  };
  auto run = [&](int threads, bool exact, bool small_ws) {
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#endif
    Eigen::setNbThreads(1);
    dora_data d(sh, 321);
    const float s = lora_scale(2.0f, d.r);
    result o{std::vector<float>(d.rows * d.out), std::vector<float>(d.rows * d.r),
             std::vector<float>(d.out),          ref::uniform_data(d.rows * d.in, 9),
             ref::uniform_data(d.r * d.in, 10),  ref::uniform_data(d.out * d.r, 11),
             ref::uniform_data(d.out, 12)};
    std::size_t bwd = dora_backward_workspace_bytes(d.rows, d.in, d.out, d.r, exact, drop);
    if (small_ws) { // sized for one thread: the block loop must fall back to one D block
#if defined(_OPENMP)
      omp_set_num_threads(1);
      bwd = dora_backward_workspace_bytes(d.rows, d.in, d.out, d.r, exact, drop);
      omp_set_num_threads(threads);
#endif
    }
    owned_workspace ws(std::max(dora_forward_workspace_bytes(d.in, d.out, d.r, drop), bwd));
    Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
        Bm(d.B.data(), d.out, d.r), ym(o.y.data(), d.rows, d.out), um(o.u.data(), d.rows, d.r);
    VMap mm(d.m.data(), d.out), nm(o.n.data(), d.out);
    dora_forward(xm, Wm, d.bias.data(), Am, Bm, mm, s, drop, ym, um, nm, ws.get());
    dora_backward(xm, Wm, d.bias.data(), Am, Bm, mm, um, nm, ym, Map(d.dy.data(), d.rows, d.out), s,
                  exact, drop, Map(o.dx.data(), d.rows, d.in), Map(o.dA.data(), d.r, d.in),
                  Map(o.dB.data(), d.out, d.r), VMap(o.dm.data(), d.out), ws.get());
    return o;
  };
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && ref::bitwise_equal(a.data(), b.data(), a.size());
  };
  for (bool exact : {false, true}) {
    const result one = run(1, exact, false);
    for (bool small_ws : {false, true}) {
      INFO("exact " << exact << " workspace for one thread " << small_ws);
      const result two = run(2, exact, small_ws);
      CHECK(same(one.y, two.y));
      CHECK(same(one.u, two.u));
      CHECK(same(one.n, two.n));
      CHECK(same(one.dx, two.dx));
      CHECK(same(one.dA, two.dA));
      CHECK(same(one.dB, two.dB));
      CHECK(same(one.dm, two.dm));
    }
  }
#if defined(_OPENMP)
  omp_set_num_threads(omp0);
#endif
  Eigen::setNbThreads(eigen0);
  (void)omp0;
}
