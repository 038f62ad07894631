// Several LoRA adapters on one W in one pass (against the sum of dense double references, with
// finite differences, per-adapter dropout, bad input and no allocation), and the LoRA-GA init
// (output unchanged, subspaces and first-step direction against a double SVD of the gradient).
#include <catch2/catch.hpp>
#include <lowmem/adapters.hpp>
#include <lowmem/core/memory.hpp>

#include <Eigen/SVD>
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

/// A list of adapters with their own storage, ranks, scales and dropout.
struct multi_data {
  index_t rows, in, out;
  std::vector<index_t> ranks;
  std::vector<std::vector<float>> A, B, dA, dB;
  std::vector<float> x, W, bias, dy;
  std::vector<lora_adapter> list;
  std::vector<lora_adapter_grads> grads;
  index_t R = 0;
  multi_data(index_t rows_, index_t in_, index_t out_, std::vector<index_t> ranks_,
             const std::vector<float>& p, std::uint64_t seed)
      : rows(rows_), in(in_), out(out_), ranks(std::move(ranks_)),
        x(ref::uniform_data(rows * in, seed)), W(ref::uniform_data(out * in, seed + 1, -.5f, .5f)),
        bias(ref::uniform_data(out, seed + 2)), dy(ref::uniform_data(rows * out, seed + 3)) {
    for (std::size_t k = 0; k < ranks.size(); ++k) {
      const index_t r = ranks[k];
      A.push_back(ref::uniform_data(r * in, seed + 10 + k, -.5f, .5f));
      B.push_back(ref::uniform_data(out * r, seed + 20 + k, -.5f, .5f));
      dA.push_back(ref::uniform_data(r * in, seed + 30 + k)); // accumulate onto non-zero
      dB.push_back(ref::uniform_data(out * r, seed + 40 + k));
      R += r;
    }
    for (std::size_t k = 0; k < ranks.size(); ++k) {
      const index_t r = ranks[k];
      list.push_back({make_view<const float>(A[k].data(), r, in),
                      make_view<const float>(B[k].data(), out, r),
                      lora_scale(1.0f + float(k), r, k % 2 == 1),
                      adapter_dropout{p[k], random::stream{500 + k, std::uint64_t(in)}}});
      grads.push_back({make_view(dA[k].data(), r, in), make_view(dB[k].data(), out, r)});
    }
  }
};

/// Dense double reference: the sum of single-adapter LoRA references on the shared W.
struct multi_ref {
  ref::Md y, dx;
  std::vector<ref::Md> dA, dB;
};
multi_ref multi_reference(const multi_data& d, const ref::Md& dy) {
  const ref::Md x = ref::dense(d.x, d.rows, d.in), W = ref::dense(d.W, d.out, d.in);
  multi_ref o;
  o.y = ref::linear(x, W, d.bias.data());
  o.dx = dy * W;
  const ref::Md Wzero = ref::Md::Zero(d.out, d.in);
  for (std::size_t k = 0; k < d.list.size(); ++k) {
    const lora_adapter& a = d.list[k];
    const ref::Md mask = ref::dropout_factors(a.drop.stream, a.drop.p, d.rows, d.in);
    const auto g = ref::lora(x, Wzero, nullptr, ref::dense(d.A[k], d.ranks[k], d.in),
                             ref::dense(d.B[k], d.out, d.ranks[k]), a.scale,
                             a.drop.p > 0 ? &mask : nullptr, dy);
    o.y += g.y;
    o.dx += g.dx;
    o.dA.push_back(g.dA);
    o.dB.push_back(g.dB);
  }
  return o;
}

template <class Arch> void run_multi(multi_data& d, std::vector<float>& y, std::vector<float>& dx) {
  std::vector<float> u(d.rows * d.R);
  owned_workspace ws(std::max(
      multi_lora_forward_workspace_bytes(d.in, d.out, d.list.data(), d.list.size()),
      multi_lora_backward_workspace_bytes(d.rows, d.in, d.out, d.list.data(), d.list.size())));
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), um(u.data(), d.rows, d.R);
  multi_lora_forward<Arch>(xm, Wm, d.bias.data(), d.list.data(), d.list.size(),
                           Map(y.data(), d.rows, d.out), um, ws.get());
  multi_lora_backward<Arch>(xm, Wm, d.list.data(), d.list.size(), um,
                            Map(d.dy.data(), d.rows, d.out), Map(dx.data(), d.rows, d.in),
                            d.grads.data(), ws.get());
}

} // namespace

LOWMEM_ARCH_TEST_CASE("multi-LoRA forward and backward match the sum of dense references",
                      "[adapters][multi]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  struct shape {
    index_t rows, in, out;
  };
  for (const shape& sh : {shape{7, 13, 11}, shape{1, 17, 6}, shape{130, 19, 21}})
    for (const std::vector<float>& p :
         {std::vector<float>{0.f, 0.f, 0.f}, std::vector<float>{0.f, 0.3f, 0.f},
          std::vector<float>{0.2f, 0.f, 0.4f}}) {
      multi_data d(sh.rows, sh.in, sh.out, {1, 3, 2}, p, 11 + std::uint64_t(sh.in));
      const auto dA0 = d.dA, dB0 = d.dB;
      std::vector<float> y(d.rows * d.out), dx0 = ref::uniform_data(d.rows * d.in, 3), dx = dx0;
      run_multi<Arch>(d, y, dx);
      const auto g = multi_reference(d, ref::dense(d.dy, d.rows, d.out));
      INFO("rows " << sh.rows << " in " << sh.in << " out " << sh.out << " p " << p[0] << " "
                   << p[1] << " " << p[2]);
      CHECK(rel(y, g.y) < 1e-5);
      CHECK(rel(minus(dx, dx0), g.dx) < 1e-5);
      for (std::size_t k = 0; k < d.list.size(); ++k) {
        INFO("adapter " << k);
        CHECK(rel(minus(d.dA[k], dA0[k]), g.dA[k]) < 1e-5);
        CHECK(rel(minus(d.dB[k], dB0[k]), g.dB[k]) < 1e-5);
      }
    }
}

TEST_CASE("multi-LoRA gradients pass central finite differences", "[adapters][multi][gradcheck]") {
  multi_data d(5, 9, 7, {2, 1}, {0.f, 0.25f}, 70);
  for (auto& v : d.dA) std::fill(v.begin(), v.end(), 0.f);
  for (auto& v : d.dB) std::fill(v.begin(), v.end(), 0.f);
  std::vector<float> y(d.rows * d.out), dx(d.rows * d.in, 0.f);
  run_multi<simd::default_arch>(d, y, dx);
  const auto G = ref::dense(d.dy, d.rows, d.out);
  auto loss = [&] { return ref::inner(G, multi_reference(d, G).y); };
  test::gradcheck(loss, d.A[0].data(), d.A[0].size(), d.dA[0].data(), "dA[0]");
  test::gradcheck(loss, d.B[0].data(), d.B[0].size(), d.dB[0].data(), "dB[0]");
  test::gradcheck(loss, d.A[1].data(), d.A[1].size(), d.dA[1].data(), "dA[1] (dropout)");
  test::gradcheck(loss, d.B[1].data(), d.B[1].size(), d.dB[1].data(), "dB[1] (dropout)");
  test::gradcheck(loss, d.x.data(), d.x.size(), dx.data(), "dx");
}

TEST_CASE("multi-LoRA rejects bad input before writing and allocates nothing",
          "[adapters][multi][errors]") {
  multi_data d(48, 40, 36, {4, 2, 3}, {0.f, 0.2f, 0.f}, 90);
  std::vector<float> y(d.rows * d.out, 4.f), u(d.rows * d.R, 4.f), dx(d.rows * d.in, 0.f);
  const auto y0 = y, u0 = u;
  owned_workspace ws(
      multi_lora_backward_workspace_bytes(d.rows, d.in, d.out, d.list.data(), d.list.size()));
  Map xm(d.x.data(), d.rows, d.in), Wm(d.W.data(), d.out, d.in), ym(y.data(), d.rows, d.out),
      um(u.data(), d.rows, d.R), dym(d.dy.data(), d.rows, d.out), dxm(dx.data(), d.rows, d.in);
  // empty list; an adapter whose B has the wrong rank; u of the wrong width; no workspace
  CHECK_THROWS_AS(multi_lora_forward(xm, Wm, nullptr, d.list.data(), 0, ym, um, ws.get()),
                  invalid_argument);
  auto bad = d.list;
  bad[2].B.cols = 2;
  CHECK_THROWS_AS(multi_lora_forward(xm, Wm, nullptr, bad.data(), bad.size(), ym, um, ws.get()),
                  invalid_argument);
  bad = d.list;
  bad[1].drop.p = 1.0f;
  CHECK_THROWS_AS(multi_lora_forward(xm, Wm, nullptr, bad.data(), bad.size(), ym, um, ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(multi_lora_forward(xm, Wm, nullptr, d.list.data(), d.list.size(), ym,
                                     Map(u.data(), d.rows, d.R - 1), ws.get()),
                  invalid_argument);
  CHECK_THROWS_AS(multi_lora_forward(xm, Wm, nullptr, d.list.data(), d.list.size(), ym, um),
                  invalid_argument);
  CHECK((y == y0 && u == u0));
  auto bad_grads = d.grads;
  bad_grads[0].dA.rows = 3;
  const auto dA0 = d.dA;
  CHECK_THROWS_AS(multi_lora_backward(xm, Wm, d.list.data(), d.list.size(), um, dym, dxm,
                                      bad_grads.data(), ws.get()),
                  invalid_argument);
  CHECK(d.dA == dA0);
  if (!memory::tracking_enabled()) return;
  memory::region region;
  multi_lora_forward(xm, Wm, d.bias.data(), d.list.data(), d.list.size(), ym, um, ws.get());
  multi_lora_backward(xm, Wm, d.list.data(), d.list.size(), um, dym, dxm, d.grads.data(), ws.get());
  CHECK(region.allocations() == 0);
}

// ---- LoRA-GA ----------------------------------------------------------------------------------
namespace {
/// cos(P, Q) over all entries, in double.
double cosine(const ref::Md& P, const ref::Md& Q) {
  return (P.array() * Q.array()).sum() / (P.norm() * Q.norm());
}
/// ‖(I − Π)·M‖ / ‖M‖ with Π the projector on the orthonormal columns of Ub.
double outside(const ref::Md& M, const ref::Md& Ub) {
  return (M - Ub * (Ub.transpose() * M)).norm() / M.norm();
}
} // namespace

TEST_CASE("LoRA-GA: output unchanged, gradient subspaces, first step closer to the full gradient "
          "than Kaiming",
          "[adapters][init][lora_ga]") {
  const index_t n = 96, in = 40, out = 24, r = 3;
  // x with decaying column scales: the gradient G = dyᵀ·x has a decaying, gapped spectrum
  auto x = ref::uniform_data(n * in, 1);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < in; ++c) x[i * in + c] *= float(std::pow(0.8, double(c)));
  const auto dy = ref::uniform_data(n * out, 2), W0 = ref::uniform_data(out * in, 3, -.5f, .5f);
  const ref::Md xd = ref::dense(x, n, in), dyd = ref::dense(dy, n, out);
  const ref::Md G = dyd.transpose() * xd; // dL/dW for L = Σ dy ⊙ y
  std::vector<float> Gf(out * in);
  for (index_t j = 0; j < out; ++j)
    for (index_t c = 0; c < in; ++c) Gf[j * in + c] = float(G(j, c));
  Eigen::JacobiSVD<ref::Md> svd(G, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const ref::Md Vr = svd.matrixV().leftCols(r), Ur2 = svd.matrixU().middleCols(r, r);
  const double best = svd.singularValues().head(2 * r).norm() / svd.singularValues().norm();
  const float s = lora_scale(2.0f, r, true);
  const ref::Md y0 = xd * ref::dense(W0, out, in).transpose();

  // the first-step change of s·B·A (up to −η): s·(dB·A + B·dA), from the kernel's backward
  auto first_step = [&](std::vector<float>& W, std::vector<float>& A, std::vector<float>& B,
                        std::vector<float>* y) {
    std::vector<float> yy(n * out), u(n * r), dA(r * in, 0.f), dB(out * r, 0.f);
    owned_workspace ws(lora_backward_workspace_bytes(n, in, r));
    Map xm(x.data(), n, in), Wm(W.data(), out, in), Am(A.data(), r, in), Bm(B.data(), out, r),
        um(u.data(), n, r);
    RowMatrixXf nodx(0, 0);
    lora_forward(xm, Wm, nullptr, Am, Bm, s, {}, Map(yy.data(), n, out), um, ws.get());
    lora_backward(xm, Wm, Am, Bm, um, Map(const_cast<float*>(dy.data()), n, out), s, {}, nodx,
                  Map(dA.data(), r, in), Map(dB.data(), out, r), ws.get());
    if (y) *y = yy;
    return ref::Md(s * (ref::dense(dB, out, r) * ref::dense(A, r, in) +
                        ref::dense(B, out, r) * ref::dense(dA, r, in)));
  };

  for (bool factored : {false, true}) {
    INFO("factored " << factored);
    auto W = W0;
    std::vector<float> A(r * in), B(out * r), sigma(2 * r);
    lora_ga_options opt;
    opt.stream = random::stream{3, 4};
    if (factored)
      lora_ga_init_from_batch(Map(W.data(), out, in), Map(x.data(), n, in),
                              Map(const_cast<float*>(dy.data()), n, out), s, opt,
                              Map(A.data(), r, in), Map(B.data(), out, r), sigma.data());
    else
      lora_ga_init(Map(W.data(), out, in), Map(Gf.data(), out, in), s, opt, Map(A.data(), r, in),
                   Map(B.data(), out, r), sigma.data());
    // estimated singular values
    for (index_t j = 0; j < 2 * r; ++j)
      CHECK(std::fabs(sigma[j] - svd.singularValues()[j]) < 1e-3 * svd.singularValues()[0]);
    // A spans the top-r right singular vectors, B the next r left ones, with the stable scale
    const ref::Md Ad = ref::dense(A, r, in), Bd = ref::dense(B, out, r);
    CHECK(outside(Ad.transpose(), Vr) < 1e-3);
    CHECK(outside(Bd, Ur2) < 1e-3);
    const double c2 = std::sqrt(double(out)) / 16.0; // (out^{1/4}/√γ)², γ = 16
    CHECK((Ad * Ad.transpose() - c2 * ref::Md::Identity(r, r)).norm() < 1e-5 * c2 * r);
    // output unchanged: x·(W_new + s·B·A)ᵀ = x·W0ᵀ
    std::vector<float> y;
    const ref::Md step = first_step(W, A, B, &y);
    CHECK(rel(y, y0) < 1e-5);
    // the first step follows the best rank-2r approximation of the full gradient
    const double cos_ga = cosine(step, G);
    CHECK(std::fabs(cos_ga - best) < 1e-3);

    // peft's default init reaches only G·AᵀA
    auto Wk = W0;
    std::vector<float> Ak(r * in), Bk(out * r);
    lora_init_kaiming(random::stream{9, 9}, Map(Ak.data(), r, in), Map(Bk.data(), out, r));
    const double cos_kaiming = cosine(first_step(Wk, Ak, Bk, nullptr), G);
    INFO("cos LoRA-GA " << cos_ga << " Kaiming " << cos_kaiming << " best rank-2r " << best);
    CHECK(cos_ga > cos_kaiming + 0.1);
  }
}

TEST_CASE("LoRA-GA rejects bad input before writing", "[adapters][init][lora_ga][errors]") {
  const index_t in = 10, out = 7;
  auto W = ref::uniform_data(out * in, 1), G = ref::uniform_data(out * in, 2);
  const auto W0 = W;
  std::vector<float> A(4 * in, 1.f), B(out * 4, 1.f);
  const auto A0 = A;
  // 2r > min(in, out)
  CHECK_THROWS_AS(lora_ga_init(Map(W.data(), out, in), Map(G.data(), out, in), 1.f, {},
                               Map(A.data(), 4, in), Map(B.data(), out, 4)),
                  invalid_argument);
  // gradient of the wrong shape; non-positive scale; mismatched batch factors
  CHECK_THROWS_AS(lora_ga_init(Map(W.data(), out, in), Map(G.data(), out, in - 1), 1.f, {},
                               Map(A.data(), 2, in), Map(B.data(), out, 2)),
                  invalid_argument);
  CHECK_THROWS_AS(lora_ga_init(Map(W.data(), out, in), Map(G.data(), out, in), 0.f, {},
                               Map(A.data(), 2, in), Map(B.data(), out, 2)),
                  invalid_argument);
  std::vector<float> x(5 * in, 1.f), dy(4 * out, 1.f);
  CHECK_THROWS_AS(lora_ga_init_from_batch(Map(W.data(), out, in), Map(x.data(), 5, in),
                                          Map(dy.data(), 4, out), 1.f, {}, Map(A.data(), 2, in),
                                          Map(B.data(), out, 2)),
                  invalid_argument);
  CHECK((W == W0 && A == A0));
}
