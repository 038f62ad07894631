// QLoRA composition: an NF4 base (quant::qlinear_forward / qlinear_backward) plus the adapters
// family's base-free LoRA terms (lora_adapter_forward / lora_adapter_backward) equals, in forward
// and backward, the double reference y = x·deq(W)ᵀ + s·drop(x)·Aᵀ·Bᵀ and its gradients; the
// gradients also pass central finite differences. GEMV (M < 8) and tiled GEMM (M >= 8) batches,
// with and without adapter dropout.
#include <catch2/catch.hpp>
#include <lowmem/adapters/lora.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/linear.hpp>

#include <algorithm>
#include <vector>

#include "reference/common.hpp"
#include "support/gradcheck.hpp"
#include "support/random_matrix.hpp"

using namespace lowmem;
using namespace lowmem::quant;
using lowmem::test::random_matrix;

namespace {
// y = x·Dᵀ + s·drop(x)·Aᵀ·Bᵀ in double, D = deq(W) (exact floats), drop from the documented mask.
std::vector<double> qlora_ref(const RowMatrixXf& x, const RowMatrixXf& D, const RowMatrixXf& A,
                              const RowMatrixXf& B, double s, const adapter_dropout& drop) {
  const index_t M = x.rows(), in = x.cols(), out = D.rows(), r = A.rows();
  std::vector<double> y(std::size_t(M * out), 0.0);
  for (index_t i = 0; i < M; ++i) {
    std::vector<double> xd(static_cast<std::size_t>(in)), u(static_cast<std::size_t>(r), 0.0);
    for (index_t c = 0; c < in; ++c) {
      const bool keep = drop.p == 0 || drop.stream.uniform(std::uint64_t(i * in + c)) >= drop.p;
      xd[std::size_t(c)] = keep ? double(x(i, c)) / (1.0 - double(drop.p)) : 0.0;
    }
    for (index_t k = 0; k < r; ++k)
      for (index_t c = 0; c < in; ++c) u[std::size_t(k)] += double(A(k, c)) * xd[std::size_t(c)];
    for (index_t o = 0; o < out; ++o) {
      double acc = 0;
      for (index_t c = 0; c < in; ++c) acc += double(x(i, c)) * double(D(o, c));
      for (index_t k = 0; k < r; ++k) acc += s * double(B(o, k)) * u[std::size_t(k)];
      y[std::size_t(i * out + o)] = acc;
    }
  }
  return y;
}

struct qlora_layer { // the composition under test
  const qweight W;
  float s;
  adapter_dropout drop;
  owned_workspace ws;
  qlora_layer(const qweight& w, index_t M, index_t r, float scale, adapter_dropout d)
      : W(w), s(scale), drop(d),
        ws(std::max({qlinear_workspace_bytes(w, M), lora_forward_workspace_bytes(w.cols, d),
                     lora_backward_workspace_bytes(M, w.cols, r, d)})) {}
  void forward(const RowMatrixXf& x, const RowMatrixXf& A, const RowMatrixXf& B, RowMatrixXf& y,
               RowMatrixXf& u) {
    qlinear_forward(x, W, y, ws.get());
    lora_adapter_forward(x, A, B, s, drop, y, u, ws.get()); // y += s·drop(x)·Aᵀ·Bᵀ
  }
  void backward(const RowMatrixXf& x, const RowMatrixXf& A, const RowMatrixXf& B,
                const RowMatrixXf& u, const RowMatrixXf& dy, RowMatrixXf& dx, RowMatrixXf& dA,
                RowMatrixXf& dB) {
    qlinear_backward(dy, W, dx, ws.get());
    lora_adapter_backward(x, A, B, u, dy, s, drop, dx, dA, dB, ws.get());
  }
};
} // namespace

TEST_CASE("QLoRA (NF4 base + LoRA) forward/backward equal the double reference; gradients pass "
          "finite differences",
          "[quant][qlora][gradcheck]") {
  const index_t in = 128, out = 40, r = 4;
  const float alpha = 8.f, s = alpha / float(r);
  const RowMatrixXf Wd = random_matrix(out, in, 1, 0.5f);
  const auto q = qweight_storage::quantize(Wd, weight_format::nf4, 64);
  RowMatrixXf D(out, in);
  dequantize_weight(q.view(), D);
  for (index_t M : {3, 9})
    for (float p : {0.0f, 0.25f}) {
      INFO("M " << M << " dropout " << p);
      const adapter_dropout drop{p, random::stream{7, 1}};
      RowMatrixXf x = random_matrix(M, in, 2), A = random_matrix(r, in, 3, 0.3f),
                  B = random_matrix(out, r, 4, 0.3f); // B != 0: the adapter path is live
      const RowMatrixXf dy = random_matrix(M, out, 5);
      qlora_layer layer(q.view(), M, r, s, drop);
      RowMatrixXf y(M, out), u(M, r);
      layer.forward(x, A, B, y, u);
      const auto want = qlora_ref(x, D, A, B, s, drop);
      CHECK(ref::max_rel_error(y.data(), want.data(), want.size()) < 1e-5);

      // backward accumulates: start from a known non-zero value and subtract it back
      RowMatrixXf dx = RowMatrixXf::Constant(M, in, 0.5f), dA = RowMatrixXf::Constant(r, in, 0.5f),
                  dB = RowMatrixXf::Constant(out, r, 0.5f);
      layer.backward(x, A, B, u, dy, dx, dA, dB);
      dx.array() -= 0.5f, dA.array() -= 0.5f, dB.array() -= 0.5f;

      // L = Σ dy ⊙ y, evaluated in double
      auto loss = [&] {
        const auto yy = qlora_ref(x, D, A, B, s, drop);
        double l = 0;
        for (std::size_t i = 0; i < yy.size(); ++i) l += double(dy.data()[i]) * yy[i];
        return l;
      };
      test::gradcheck_options opt;
      opt.atol = 1e-3;
      test::gradcheck(loss, x.data(), std::size_t(x.size()), dx.data(), "dx", opt);
      test::gradcheck(loss, A.data(), std::size_t(A.size()), dA.data(), "dA", opt);
      test::gradcheck(loss, B.data(), std::size_t(B.size()), dB.data(), "dB", opt);

      // closed form in double: dx = dy·D + s·drop'(dy·B·A), dB = s·dyᵀ·u, dA = s·(dy·B)ᵀ·drop(x)
      std::vector<double> dB_ref(std::size_t(out * r), 0.0);
      for (index_t o = 0; o < out; ++o)
        for (index_t k = 0; k < r; ++k)
          for (index_t i = 0; i < M; ++i)
            dB_ref[std::size_t(o * r + k)] += double(s) * dy(i, o) * double(u(i, k));
      CHECK(ref::max_rel_error(dB.data(), dB_ref.data(), dB_ref.size()) < 1e-4);
    }
}

TEST_CASE("QLoRA base never holds an fp32 W and the NF4 base is ~7x smaller than fp32",
          "[quant][qlora][memory]") {
  REQUIRE(memory::tracking_enabled());
  const index_t in = 1024, out = 1024, M = 1;
  const auto q = qweight_storage::quantize(random_matrix(out, in, 9), weight_format::nf4, 64);
  CHECK(double(q.bytes()) < double(out * in) * 4.0 / 7.0);
  const RowMatrixXf x = random_matrix(M, in, 10);
  RowMatrixXf y(M, out), dx = RowMatrixXf::Zero(M, in);
  owned_workspace ws(qlinear_workspace_bytes(q.view(), M));
  memory::region reg;
  qlinear_forward(x, q.view(), y, ws.get());
  qlinear_backward(y, q.view(), dx, ws.get());
  CHECK(reg.allocations() == 0);
}
