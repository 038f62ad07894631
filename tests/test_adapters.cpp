// LoRA and DoRA: forward, dx and every adapter gradient against the dense double reference,
// central finite differences, odd shapes on every arch, merge/unmerge round trips, bad input,
// and no allocation in the hot path.
#include <catch2/catch.hpp>
#include <lowmem/adapters.hpp>
#include <lowmem/core/memory.hpp>

#include <cstring>
#include <vector>

#include "reference/adapters_reference.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"
#include "support/rel_error.hpp"

using namespace lowmem;
using test::minus;
using test::rel;
using Map = Eigen::Map<RowMatrixXf>;

namespace {

struct shape {
  index_t rows, in, out, r;
};
const shape shapes[] = {{7, 13, 11, 3}, {1, 17, 5, 1}, {33, 40, 24, 8}, {130, 19, 21, 4}};

struct lora_data {
  index_t rows, in, out, r;
  std::vector<float> x, W, A, B, bias, dy;
  lora_data(const shape& s, std::uint64_t seed)
      : rows(s.rows), in(s.in), out(s.out), r(s.r), x(ref::uniform_data(rows * in, seed)),
        W(ref::uniform_data(out * in, seed + 1, -0.5f, 0.5f)),
        A(ref::uniform_data(r * in, seed + 2, -0.5f, 0.5f)),
        B(ref::uniform_data(out * r, seed + 3, -0.5f, 0.5f)),
        bias(ref::uniform_data(out, seed + 4)), dy(ref::uniform_data(rows * out, seed + 5)) {}
};

} // namespace

LOWMEM_ARCH_TEST_CASE("LoRA forward and backward match the dense double reference",
                      "[adapters][lora]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const shape& sh : shapes) {
    for (float p : {0.0f, 0.3f}) {
      lora_data d(sh, 100 + std::uint64_t(sh.rows));
      const float s = lora_scale(2.0f, d.r, p > 0);
      const adapter_dropout drop{p, random::stream{77, std::uint64_t(sh.in)}};
      std::vector<float> y(d.rows * d.out), u(d.rows * d.r);
      owned_workspace ws(std::max(lora_forward_workspace_bytes(d.in, drop),
                                  lora_backward_workspace_bytes(d.rows, d.in, d.r, drop)));
      Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
          Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r),
          dym(d.dy.data(), d.rows, d.out);
      lora_forward<Arch>(xm, Wm, d.bias.data(), Am, Bm, s, drop, ym, um, ws.get());
      // gradients accumulate onto non-zero buffers
      auto dx0 = ref::uniform_data(d.rows * d.in, 9), dA0 = ref::uniform_data(d.r * d.in, 10),
           dB0 = ref::uniform_data(d.out * d.r, 11);
      auto dx = dx0, dA = dA0, dB = dB0;
      Map dxm(dx.data(), d.rows, d.in), dAm(dA.data(), d.r, d.in), dBm(dB.data(), d.out, d.r);
      lora_backward<Arch>(xm, Wm, Am, Bm, um, dym, s, drop, dxm, dAm, dBm, ws.get());

      const ref::Md mask = ref::dropout_factors(drop.stream, p, d.rows, d.in);
      const auto g =
          ref::lora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in), d.bias.data(),
                    ref::dense(d.A, d.r, d.in), ref::dense(d.B, d.out, d.r), s,
                    p > 0 ? &mask : nullptr, ref::dense(d.dy, d.rows, d.out));
      INFO("rows " << sh.rows << " in " << sh.in << " out " << sh.out << " r " << sh.r << " p "
                   << p);
      CHECK(rel(y, g.y) < 1e-5);
      CHECK(rel(minus(dx, dx0), g.dx) < 1e-5);
      CHECK(rel(minus(dA, dA0), g.dA) < 1e-5);
      CHECK(rel(minus(dB, dB0), g.dB) < 1e-5);

      // recompute option: lora_project gives the same u
      std::vector<float> u2(u.size());
      Map u2m(u2.data(), d.rows, d.r);
      lora_project<Arch>(xm, Am, drop, u2m, ws.get());
      CHECK(ref::bitwise_equal(u.data(), u2.data(), u.size()));
    }
  }
}

TEST_CASE("LoRA gradients pass central finite differences", "[adapters][lora][gradcheck]") {
  for (float p : {0.0f, 0.25f}) {
    lora_data d({5, 9, 7, 2}, 300);
    const float s = lora_scale(4.0f, d.r);
    const adapter_dropout drop{p, random::stream{5, 6}};
    const auto G = ref::dense(d.dy, d.rows, d.out);
    const ref::Md mask = ref::dropout_factors(drop.stream, p, d.rows, d.in);
    auto loss = [&] {
      return ref::inner(G, ref::lora(ref::dense(d.x, d.rows, d.in), ref::dense(d.W, d.out, d.in),
                                     d.bias.data(), ref::dense(d.A, d.r, d.in),
                                     ref::dense(d.B, d.out, d.r), s, p > 0 ? &mask : nullptr, G)
                               .y);
    };
    std::vector<float> y(d.rows * d.out), u(d.rows * d.r), dx(d.rows * d.in), dA(d.r * d.in),
        dB(d.out * d.r);
    owned_workspace ws(lora_backward_workspace_bytes(d.rows, d.in, d.r, drop) +
                       lora_forward_workspace_bytes(d.in, drop));
    Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
        Bm(d.B.data(), d.out, d.r), um(u.data(), d.rows, d.r), dym(d.dy.data(), d.rows, d.out);
    lora_forward(xm, Wm, d.bias.data(), Am, Bm, s, drop, Map(y.data(), d.rows, d.out), um,
                 ws.get());
    lora_backward(xm, Wm, Am, Bm, um, dym, s, drop, Map(dx.data(), d.rows, d.in),
                  Map(dA.data(), d.r, d.in), Map(dB.data(), d.out, d.r), ws.get());
    test::gradcheck(loss, d.A.data(), d.A.size(), dA.data(), "dA");
    test::gradcheck(loss, d.B.data(), d.B.size(), dB.data(), "dB");
    test::gradcheck(loss, d.x.data(), d.x.size(), dx.data(), "dx");
  }
}

TEST_CASE("LoRA merge then unmerge returns W; the merged layer equals the adapter",
          "[adapters][lora][merge]") {
  for (const shape& sh : shapes) {
    lora_data d(sh, 500);
    const float s = lora_scale(8.0f, d.r, true);
    const auto W0 = d.W;
    Map Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in), Bm(d.B.data(), d.out, d.r);
    lora_merge(Wm, Am, Bm, s);
    const ref::Md merged =
        ref::dense(W0, d.out, d.in) + s * ref::dense(d.B, d.out, d.r) * ref::dense(d.A, d.r, d.in);
    CHECK(rel(d.W, merged) < 1e-6);
    lora_unmerge(Wm, Am, Bm, s);
    // fp32 rounding of |W| + |sBA| per element: two roundings of values of size <= ~2
    double worst = 0;
    for (std::size_t i = 0; i < W0.size(); ++i)
      worst = std::max(worst, std::fabs(double(d.W[i]) - W0[i]));
    CHECK(worst < 4 * 2.0 * 6e-8 * std::max<double>(1.0, double(d.r)));
  }
}

TEST_CASE("LoRA rejects bad input before writing", "[adapters][lora][errors]") {
  lora_data d({4, 6, 5, 2}, 700);
  std::vector<float> y(d.rows * d.out, 42.f), u(d.rows * d.r, 42.f);
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
      Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r);
  const auto y0 = y, u0 = u;
  auto unchanged = [&] { return y == y0 && u == u0; };
  // rank 0
  RowMatrixXf A0(0, d.in), B0(d.out, 0), u00(d.rows, 0);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, A0, B0, 1.f, {}, ym, u00), invalid_argument);
  CHECK(unchanged());
  // rank > min(in, out)
  RowMatrixXf A6 = RowMatrixXf::Ones(6, d.in), B6 = RowMatrixXf::Ones(d.out, 6);
  RowMatrixXf u6(d.rows, 6);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, A6, B6, 1.f, {}, ym, u6), invalid_argument);
  // mismatched shapes
  RowMatrixXf Abad = RowMatrixXf::Ones(d.r, d.in + 1);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, Abad, Bm, 1.f, {}, ym, um), invalid_argument);
  RowMatrixXf ybad(d.rows, d.out + 1);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, Am, Bm, 1.f, {}, ybad, um), invalid_argument);
  // dropout p outside [0, 1), non-finite scale, too small a workspace
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, Am, Bm, 1.f, {1.0f, {}}, ym, um), invalid_argument);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, Am, Bm, NAN, {}, ym, um), invalid_argument);
  CHECK_THROWS_AS(lora_forward(xm, Wm, nullptr, Am, Bm, 1.f, {0.5f, {}}, ym, um),
                  invalid_argument); // dropout needs a workspace
  CHECK(unchanged());
  std::vector<float> dA(d.r * d.in, 3.f), dB(d.out * d.r, 3.f);
  const auto dA0 = dA, dB0 = dB;
  RowMatrixXf dybad(d.rows + 1, d.out), nodx(0, 0);
  owned_workspace ws(lora_backward_workspace_bytes(d.rows + 1, d.in, d.r));
  CHECK_THROWS_AS(lora_backward(xm, Wm, Am, Bm, um, dybad, 1.f, {}, nodx, Map(dA.data(), d.r, d.in),
                                Map(dB.data(), d.out, d.r), ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(lora_backward(xm, Wm, Am, Bm, um, Map(d.dy.data(), d.rows, d.out), 1.f, {}, nodx,
                                Map(dA.data(), d.r, d.in), Map(dB.data(), d.out, d.r)),
                  invalid_argument); // no workspace for du
  CHECK((dA == dA0 && dB == dB0));
  const auto W0 = d.W;
  CHECK_THROWS_AS(lora_merge(Wm, Abad, Bm, 1.f), invalid_argument);
  CHECK(d.W == W0);
}

TEST_CASE("LoRA forward and backward allocate nothing given a workspace",
          "[adapters][lora][memory]") {
  if (!memory::tracking_enabled()) return;
  for (float p : {0.0f, 0.2f}) {
    // small enough that Eigen's GEMM packing buffers live on the stack
    lora_data d({48, 40, 36, 4}, 900);
    const adapter_dropout drop{p, random::stream{1, 1}};
    std::vector<float> y(d.rows * d.out), u(d.rows * d.r), dx(d.rows * d.in), dA(d.r * d.in),
        dB(d.out * d.r);
    owned_workspace ws(lora_backward_workspace_bytes(d.rows, d.in, d.r, drop));
    Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), Am(d.A.data(), d.r, d.in),
        Bm(d.B.data(), d.out, d.r), ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r),
        dym(d.dy.data(), d.rows, d.out), dxm(dx.data(), d.rows, d.in), dAm(dA.data(), d.r, d.in),
        dBm(dB.data(), d.out, d.r);
    memory::region region;
    lora_forward(xm, Wm, d.bias.data(), Am, Bm, 0.5f, drop, ym, um, ws.get());
    lora_backward(xm, Wm, Am, Bm, um, dym, 0.5f, drop, dxm, dAm, dBm, ws.get());
    lora_merge(Wm, Am, Bm, 0.5f);
    CHECK(region.allocations() == 0);
  }
}

LOWMEM_ARCH_TEST_CASE("dropout kernels match the scalar rule at tail sizes", "[adapters][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (std::size_t n : test::tail_sizes<Arch>()) {
    const auto x = ref::uniform_data(n, 1), u = ref::uniform_data(n, 2, 0.f, 1.f);
    auto io = u;
    io.push_back(7.f);
    adapters::kernels::dropout_apply<Arch>(x.data(), io.data(), n, 0.4f, 2.5f);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(io[i] == (u[i] >= 0.4f ? x[i] * 2.5f : 0.0f));
    CHECK(io[n] == 7.f);
    auto dst = ref::uniform_data(n + 1, 3);
    const auto dst0 = dst;
    adapters::kernels::dropout_accumulate<Arch>(u.data(), x.data(), dst.data(), n, 0.4f, 2.5f);
    for (std::size_t i = 0; i < n; ++i)
      REQUIRE(std::fabs(dst[i] - (u[i] >= 0.4f ? dst0[i] + x[i] * 2.5f : dst0[i])) <= 1e-6f);
    CHECK(dst[n] == dst0[n]);
  }
}

LOWMEM_ARCH_TEST_CASE("LoRA adapter-only pair (no base W) matches the reference over a zero base",
                      "[adapters][lora]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const shape& sh : shapes) {
    for (float p : {0.0f, 0.3f}) {
      lora_data d(sh, 1100 + std::uint64_t(sh.rows));
      const float s = lora_scale(2.0f, d.r);
      const adapter_dropout drop{p, random::stream{78, std::uint64_t(sh.in)}};
      owned_workspace ws(lora_backward_workspace_bytes(d.rows, d.in, d.r, drop));
      Map xm(d.x.data(), d.rows, d.in), Am(d.A.data(), d.r, d.in), Bm(d.B.data(), d.out, d.r),
          dym(d.dy.data(), d.rows, d.out);
      // y, dx, dA, dB accumulate onto non-zero buffers (y stands for the caller's base output)
      const auto y0 = ref::uniform_data(d.rows * d.out, 8),
                 dx0 = ref::uniform_data(d.rows * d.in, 9), dA0 = ref::uniform_data(d.r * d.in, 10),
                 dB0 = ref::uniform_data(d.out * d.r, 11);
      auto y = y0, dx = dx0, dA = dA0, dB = dB0;
      std::vector<float> u(d.rows * d.r);
      Map um(u.data(), d.rows, d.r);
      lora_adapter_forward<Arch>(xm, Am, Bm, s, drop, Map(y.data(), d.rows, d.out), um, ws.get());
      lora_adapter_backward<Arch>(xm, Am, Bm, um, dym, s, drop, Map(dx.data(), d.rows, d.in),
                                  Map(dA.data(), d.r, d.in), Map(dB.data(), d.out, d.r), ws.get());
      const ref::Md mask = ref::dropout_factors(drop.stream, p, d.rows, d.in);
      const auto g = ref::lora(ref::dense(d.x, d.rows, d.in), ref::Md::Zero(d.out, d.in), nullptr,
                               ref::dense(d.A, d.r, d.in), ref::dense(d.B, d.out, d.r), s,
                               p > 0 ? &mask : nullptr, ref::dense(d.dy, d.rows, d.out));
      INFO("rows " << sh.rows << " in " << sh.in << " out " << sh.out << " p " << p);
      CHECK(rel(minus(y, y0), g.y) < 1e-5);
      CHECK(rel(minus(dx, dx0), g.dx) < 1e-5);
      CHECK(rel(minus(dA, dA0), g.dA) < 1e-5);
      CHECK(rel(minus(dB, dB0), g.dB) < 1e-5);

      // the full pair is the base GEMMs plus this pair: same u, and dA, dB bitwise
      std::vector<float> yf(d.rows * d.out), uf(u.size()), dAf = dA0, dBf = dB0;
      RowMatrixXf nodx(0, 0);
      Map Wm(d.W.data(), d.out, d.in), ufm(uf.data(), d.rows, d.r);
      lora_forward<Arch>(xm, Wm, nullptr, Am, Bm, s, drop, Map(yf.data(), d.rows, d.out), ufm,
                         ws.get());
      lora_backward<Arch>(xm, Wm, Am, Bm, ufm, dym, s, drop, nodx, Map(dAf.data(), d.r, d.in),
                          Map(dBf.data(), d.out, d.r), ws.get());
      CHECK(ref::bitwise_equal(u.data(), uf.data(), u.size()));
      CHECK(ref::bitwise_equal(dA.data(), dAf.data(), dA.size()));
      CHECK(ref::bitwise_equal(dB.data(), dBf.data(), dB.size()));
    }
  }
}

TEST_CASE("LoRA adapter-only gradients pass central finite differences",
          "[adapters][lora][gradcheck]") {
  for (float p : {0.0f, 0.25f}) {
    lora_data d({5, 9, 7, 2}, 1300);
    const float s = lora_scale(4.0f, d.r);
    const adapter_dropout drop{p, random::stream{5, 7}};
    const auto G = ref::dense(d.dy, d.rows, d.out);
    const ref::Md mask = ref::dropout_factors(drop.stream, p, d.rows, d.in);
    Map xm(d.x.data(), d.rows, d.in), Am(d.A.data(), d.r, d.in), Bm(d.B.data(), d.out, d.r);
    auto loss = [&] {
      return ref::inner(G, ref::lora(ref::dense(d.x, d.rows, d.in), ref::Md::Zero(d.out, d.in),
                                     nullptr, ref::dense(d.A, d.r, d.in),
                                     ref::dense(d.B, d.out, d.r), s, p > 0 ? &mask : nullptr, G)
                               .y);
    };
    owned_workspace ws(lora_backward_workspace_bytes(d.rows, d.in, d.r, drop));
    std::vector<float> y(d.rows * d.out), u(d.rows * d.r);
    lora_adapter_forward(xm, Am, Bm, s, drop, Map(y.data(), d.rows, d.out),
                         Map(u.data(), d.rows, d.r), ws.get());
    std::vector<float> dx(d.rows * d.in), dA(d.r * d.in), dB(d.out * d.r);
    lora_adapter_backward(xm, Am, Bm, Map(u.data(), d.rows, d.r), Map(d.dy.data(), d.rows, d.out),
                          s, drop, Map(dx.data(), d.rows, d.in), Map(dA.data(), d.r, d.in),
                          Map(dB.data(), d.out, d.r), ws.get());
    test::gradcheck(loss, d.A.data(), d.A.size(), dA.data(), "dA");
    test::gradcheck(loss, d.B.data(), d.B.size(), dB.data(), "dB");
    test::gradcheck(loss, d.x.data(), d.x.size(), dx.data(), "dx");
  }
}

TEST_CASE("LoRA adapter-only pair rejects bad input before writing and allocates nothing",
          "[adapters][lora][errors][memory]") {
  lora_data d({6, 10, 8, 2}, 1500);
  Map xm(d.x.data(), d.rows, d.in), Am(d.A.data(), d.r, d.in), Bm(d.B.data(), d.out, d.r),
      dym(d.dy.data(), d.rows, d.out);
  std::vector<float> y(d.rows * d.out, 4.f), u(d.rows * d.r, 4.f), dA(d.r * d.in, 3.f),
      dB(d.out * d.r, 3.f), dx(d.rows * d.in, 3.f);
  const auto y0 = y, u0 = u, dA0 = dA, dB0 = dB, dx0 = dx;
  Map ym(y.data(), d.rows, d.out), um(u.data(), d.rows, d.r), dAm(dA.data(), d.r, d.in),
      dBm(dB.data(), d.out, d.r), dxm(dx.data(), d.rows, d.in);
  RowMatrixXf Bbad = RowMatrixXf::Ones(d.out, d.r + 1), ybad(d.rows, d.out + 1),
              dybad(d.rows, d.out + 1);
  CHECK_THROWS_AS(lora_adapter_forward(xm, Am, Bbad, 1.f, {}, ym, um), invalid_argument);
  CHECK_THROWS_AS(lora_adapter_forward(xm, Am, Bm, 1.f, {}, ybad, um), invalid_argument);
  CHECK_THROWS_AS(lora_adapter_forward(xm, Am, Bm, 1.f, {0.5f, {}}, ym, um),
                  invalid_argument); // dropout needs a workspace
  CHECK((y == y0 && u == u0));
  CHECK_THROWS_AS(lora_adapter_backward(xm, Am, Bm, um, dym, 1.f, {}, dxm, dAm, dBm),
                  invalid_argument); // no workspace for du
  owned_workspace ws(lora_backward_workspace_bytes(d.rows, d.in, d.r));
  CHECK_THROWS_AS(lora_adapter_backward(xm, Am, Bm, um, dybad, 1.f, {}, dxm, dAm, dBm, ws.get()),
                  invalid_argument);
  CHECK((dA == dA0 && dB == dB0 && dx == dx0));
  if (!memory::tracking_enabled()) return;
  memory::region region;
  lora_adapter_forward(xm, Am, Bm, 0.5f, {}, ym, um, ws.get());
  lora_adapter_backward(xm, Am, Bm, um, dym, 0.5f, {}, dxm, dAm, dBm, ws.get());
  CHECK(region.allocations() == 0);
}
