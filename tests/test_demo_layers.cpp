// Finite-difference gradient checks of the demo's hand-written layers (examples/common/layers.hpp)
// and of the whole ViT (examples/common/vit.hpp), on tiny shapes.
//
// Each check uses a random linear functional of the layer's output, L = Σ r ⊙ y (r fixed), so the
// analytic gradient is the layer's backward with dy = r. Forwards are fp32: with eps = 1e-2 on
// O(1) values the central difference's rounding error (~ulp(L)/h ≈ 1e-5·|L|/1e-2) stays far
// below rtol = 2e-2 of the gradients checked here.
#include <catch2/catch.hpp>

#include <common/lowmem_attention.hpp>
#include <common/vit.hpp>
#include <common/vit_methods.hpp>

#include "reference/common.hpp"
#include "support/gradcheck.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

using demo::index_t;

namespace {

std::vector<float> randn(std::size_t n, std::uint64_t id, float scale = 1.0f) {
  const lowmem::random::stream z{42, id};
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = scale * z.normal(i);
  return v;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
  return s;
}

lowmem::test::gradcheck_options fd_options() {
  lowmem::test::gradcheck_options o;
  o.eps = 1e-2;
  o.rtol = 2e-2;
  o.atol = 2e-3;
  return o;
}

} // namespace

TEST_CASE("linear backward matches finite differences and accumulates", "[demo][layers]") {
  const index_t M = 5, K = 7, N = 3;
  auto x = randn(M * K, 1), W = randn(N * K, 2), b = randn(N, 3), r = randn(M * N, 4);
  std::vector<float> y(M * N);
  auto loss = [&] {
    demo::linear_forward(x.data(), W.data(), b.data(), y.data(), M, K, N);
    return dot(y, r);
  };
  std::vector<float> dx(M * K, 0.5f), dW(N * K, 0.5f), db(N, 0.5f); // non-zero: backward adds
  demo::linear_backward(x.data(), W.data(), r.data(), dx.data(), dW.data(), db.data(), M, K, N);
  for (auto* g : {&dx, &dW, &db})
    for (auto& v : *g) v -= 0.5f;
  const auto o = fd_options();
  lowmem::test::gradcheck(loss, x.data(), x.size(), dx.data(), "dx", o);
  lowmem::test::gradcheck(loss, W.data(), W.size(), dW.data(), "dW", o);
  lowmem::test::gradcheck(loss, b.data(), b.size(), db.data(), "db", o);
}

TEST_CASE("layernorm backward matches finite differences", "[demo][layers]") {
  const index_t M = 4, C = 9;
  auto x = randn(M * C, 5), g = randn(C, 6), be = randn(C, 7), r = randn(M * C, 8);
  for (auto& v : g) v += 1.0f;
  std::vector<float> y(M * C), mean(M), rstd(M);
  auto loss = [&] {
    demo::layernorm_forward(x.data(), g.data(), be.data(), y.data(), mean.data(), rstd.data(), M,
                            C);
    return dot(y, r);
  };
  loss();
  // The saved statistics are the row mean and 1/sqrt(biased var + eps).
  double m0 = 0, v0 = 0;
  for (index_t c = 0; c < C; ++c) m0 += x[std::size_t(c)];
  m0 /= double(C);
  for (index_t c = 0; c < C; ++c) v0 += (x[std::size_t(c)] - m0) * (x[std::size_t(c)] - m0);
  CHECK(mean[0] == Approx(m0).epsilon(1e-5));
  CHECK(rstd[0] == Approx(1.0 / std::sqrt(v0 / double(C) + 1e-5)).epsilon(1e-4));
  std::vector<float> dx(M * C), dg(C), db(C);
  demo::layernorm_backward(x.data(), g.data(), mean.data(), rstd.data(), r.data(), dx.data(),
                           dg.data(), db.data(), M, C);
  const auto o = fd_options();
  lowmem::test::gradcheck(loss, x.data(), x.size(), dx.data(), "dx", o);
  lowmem::test::gradcheck(loss, g.data(), g.size(), dg.data(), "dgamma", o);
  lowmem::test::gradcheck(loss, be.data(), be.size(), db.data(), "dbeta", o);
}

TEST_CASE("GELU backward matches finite differences and the reference values", "[demo][layers]") {
  auto x = randn(33, 9, 2.0f), r = randn(33, 10);
  std::vector<float> y(33);
  auto loss = [&] {
    demo::gelu_forward(x.data(), y.data(), 33);
    return dot(y, r);
  };
  loss();
  // GELU_tanh(1) = 0.841192 (PyTorch gelu(approximate='tanh')), GELU(0) = 0.
  float one = 1.0f, g1 = 0, zero = 0, g0 = 1;
  demo::gelu_forward(&one, &g1, 1);
  demo::gelu_forward(&zero, &g0, 1);
  CHECK(g1 == Approx(0.841192).epsilon(1e-5));
  CHECK(g0 == 0.0f);
  std::vector<float> dx(33);
  demo::gelu_backward(x.data(), r.data(), dx.data(), 33);
  lowmem::test::gradcheck(loss, x.data(), x.size(), dx.data(), "dx", fd_options());
}

TEST_CASE("softmax cross-entropy: loss value and gradient", "[demo][layers]") {
  const index_t B = 3, C = 5;
  auto z = randn(B * C, 11, 3.0f);
  const std::uint8_t labels[B] = {0, 4, 2};
  std::vector<float> p(B * C);
  auto loss = [&] { return demo::softmax_xent_forward(z.data(), labels, p.data(), B, C); };
  const double L = loss();
  double ref = 0; // −mean log softmax, in double
  for (index_t b = 0; b < B; ++b) {
    double s = 0;
    for (index_t c = 0; c < C; ++c) s += std::exp(double(z[std::size_t(b * C + c)]));
    ref -= double(z[std::size_t(b * C + labels[b])]) - std::log(s);
  }
  CHECK(L == Approx(ref / double(B)).epsilon(1e-6));
  std::vector<float> dz(B * C);
  demo::softmax_xent_backward(p.data(), labels, dz.data(), B, C);
  lowmem::test::gradcheck(loss, z.data(), z.size(), dz.data(), "dlogits", fd_options());
}

TEST_CASE("residual add and mean-pool backward match finite differences", "[demo][layers]") {
  const index_t B = 2, N = 3, C = 4;
  auto a = randn(B * N * C, 12), b = randn(B * N * C, 13), r = randn(B * C, 14);
  std::vector<float> s(B * N * C), y(B * C);
  auto loss = [&] {
    demo::residual_forward(a.data(), b.data(), s.data(), B * N * C);
    demo::meanpool_forward(s.data(), y.data(), B, N, C);
    return dot(y, r);
  };
  std::vector<float> ds(B * N * C), da(B * N * C), db(B * N * C);
  demo::meanpool_backward(r.data(), ds.data(), B, N, C);
  demo::residual_backward(ds.data(), da.data(), db.data(), B * N * C);
  const auto o = fd_options();
  lowmem::test::gradcheck(loss, a.data(), a.size(), da.data(), "da", o);
  lowmem::test::gradcheck(loss, b.data(), b.size(), db.data(), "db", o);
}

TEST_CASE("naive attention: forward against a direct softmax, backward by finite differences",
          "[demo][layers][attention]") {
  const demo::attention_shape s{2, 2, 5, 3, 1.0f / std::sqrt(3.0f)};
  const std::size_t n = std::size_t(s.qkv_floats());
  auto q = randn(n, 15), k = randn(n, 16), v = randn(n, 17), r = randn(n, 18);
  const demo::attention_backend att = demo::naive_attention();
  std::vector<float> o(n), saved(att.saved_floats(s)), ws(att.workspace_floats(s));
  auto loss = [&] {
    att.forward(s, q.data(), k.data(), v.data(), o.data(), saved.data());
    return dot(o, r);
  };
  loss();
  { // row 1 of head (b=1, h=0), column 2, computed directly in double
    const index_t bh = 2, i = 1, j = 2, N = s.N, d = s.d;
    double w[5], sum = 0, out = 0;
    for (index_t t = 0; t < N; ++t) {
      double sc = 0;
      for (index_t c = 0; c < d; ++c)
        sc += double(q[std::size_t((bh * N + i) * d + c)]) * k[std::size_t((bh * N + t) * d + c)];
      w[t] = std::exp(sc * s.scale);
      sum += w[t];
    }
    for (index_t t = 0; t < N; ++t) out += w[t] / sum * v[std::size_t((bh * N + t) * d + j)];
    CHECK(o[std::size_t((bh * N + i) * d + j)] == Approx(out).epsilon(1e-5));
  }
  std::vector<float> dq(n), dk(n), dv(n);
  att.backward(s, q.data(), k.data(), v.data(), o.data(), r.data(), saved.data(), dq.data(),
               dk.data(), dv.data(), ws.data());
  const auto op = fd_options();
  lowmem::test::gradcheck(loss, q.data(), n, dq.data(), "dq", op);
  lowmem::test::gradcheck(loss, k.data(), n, dk.data(), "dk", op);
  lowmem::test::gradcheck(loss, v.data(), n, dv.data(), "dv", op);
}

TEST_CASE("lowmem tiled attention backend equals the naive backend (forward and backward)",
          "[demo][layers]") {
  const demo::attention_shape s{2, 4, 16, 16, 0.25f}; // the demo's shape: 16 tokens, head dim 16
  const std::size_t n = std::size_t(s.qkv_floats());
  auto q = randn(n, 21), k = randn(n, 22), v = randn(n, 23), dO = randn(n, 24);
  const demo::attention_backend naive = demo::naive_attention(), tiled = demo::lowmem_attention();
  CHECK(tiled.saved_floats(s) == std::size_t(s.B * s.H * s.N)); // no N×N state
  std::vector<float> o1(n), o2(n), sv1(naive.saved_floats(s)), sv2(tiled.saved_floats(s));
  std::vector<float> ws1(naive.workspace_floats(s)), ws2(tiled.workspace_floats(s));
  naive.forward(s, q.data(), k.data(), v.data(), o1.data(), sv1.data());
  tiled.forward(s, q.data(), k.data(), v.data(), o2.data(), sv2.data());
  CHECK(lowmem::ref::max_rel_error(o2.data(), o1.data(), n) < 1e-5);
  std::vector<float> g1[3] = {std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
  std::vector<float> g2[3] = {std::vector<float>(n), std::vector<float>(n), std::vector<float>(n)};
  naive.backward(s, q.data(), k.data(), v.data(), o1.data(), dO.data(), sv1.data(), g1[0].data(),
                 g1[1].data(), g1[2].data(), ws1.data());
  tiled.backward(s, q.data(), k.data(), v.data(), o2.data(), dO.data(), sv2.data(), g2[0].data(),
                 g2[1].data(), g2[2].data(), ws2.data());
  for (int t = 0; t < 3; ++t)
    CHECK(lowmem::ref::max_rel_error(g2[t].data(), g1[t].data(), n) < 1e-4);
}

TEST_CASE("head split/merge are inverse permutations and their backwards are adjoints",
          "[demo][layers]") {
  const index_t B = 2, N = 3, H = 2, d = 2, C = H * d;
  auto qkv = randn(B * N * 3 * C, 19);
  std::vector<float> q(B * N * C), k(B * N * C), v(B * N * C), back(B * N * 3 * C, 0.0f),
      m(B * N * C);
  demo::split_heads(qkv.data(), q.data(), k.data(), v.data(), B, N, H, d);
  demo::split_heads_backward(q.data(), k.data(), v.data(), back.data(), B, N, H, d);
  CHECK(back == qkv); // pure copies: bitwise
  demo::merge_heads(q.data(), m.data(), B, N, H, d);
  std::vector<float> q2(B * N * C, 0.0f);
  demo::merge_heads_backward(m.data(), q2.data(), B, N, H, d);
  CHECK(q2 == q);
  // Q of token t, head h is qkv[b, t, h·d + j].
  CHECK(q[std::size_t(((1 * H + 1) * N + 2) * d + 1)] ==
        qkv[std::size_t((1 * N + 2) * 3 * C + 1 * d + 1)]);
}

namespace {
// A minimal additive hook (y += x·Aᵀ with a trainable A [out, in]) to prove the plug-in path:
// the model's backward must reach a hook's tensors and its dx.
class additive_hook : public demo::linear_hook {
public:
  std::vector<float> A, dA;
  explicit additive_hook(const demo::linear_slot& s)
      : A(randn(std::size_t(s.in * s.out), 77, 0.1f)), dA(A.size()) {}
  void forward(const demo::linear_slot& s, const float* x, float* y, float*, float*,
               index_t rows) override {
    demo::linear_forward(x, s.W->value.data(), s.b->value.data(), y, rows, s.in, s.out);
    demo::MatMap(y, rows, s.out).noalias() +=
        demo::CMatMap(x, rows, s.in) * demo::CMatMap(A.data(), s.out, s.in).transpose();
  }
  void backward(const demo::linear_slot& s, const float* x, const float* dy, float* dx,
                const float*, float*, index_t rows) override {
    demo::linear_backward(x, s.W->value.data(), dy, dx, nullptr, nullptr, rows, s.in, s.out);
    demo::linear_backward(x, A.data(), dy, dx, dA.data(), nullptr, rows, s.in, s.out);
  }
  std::vector<demo::param_span> params() override {
    return {{"hook.A", A.data(), dA.data(), {index_t(A.size())}, index_t(A.size())}};
  }
};
} // namespace

TEST_CASE("tiny ViT: whole-model backward matches finite differences, with and without a hook",
          "[demo][vit]") {
  // 8×8 images in 4×4 patches: 4 tokens of 16 pixels
  const demo::vit_config c = demo::vit_shape(/*image*/ 8, /*patch*/ 4, /*width*/ 8, /*depth*/ 2,
                                             /*heads*/ 2, /*mlp_ratio*/ 2, /*classes*/ 3);
  demo::vit m(c, 3);
  m.set_all_trainable(true);
  for (auto& p : m.params) // non-trivial LayerNorm affine params and biases
    if (p.shape.size() == 1)
      for (std::size_t i = 0; i < p.value.size(); ++i) p.value[i] += 0.1f * float(int(i % 5) - 2);
  const index_t B = 3;
  auto img = randn(std::size_t(B * 64), 20);
  const std::uint8_t labels[B] = {0, 2, 1};
  // image [B, 784] in the real model; here 8×8 = 64 pixels per image (patchify uses cfg.image).
  demo::vit_activations train = m.plan(B, true), infer = m.plan(B, false);
  CHECK(infer.bytes() < train.bytes()); // inference shares one block's scratch
  auto loss = [&] { return m.forward(train, img.data(), labels, B); };
  const double L = loss();
  // The inference arena computes the same function.
  m.forward(infer, img.data(), nullptr, B);
  for (index_t i = 0; i < B * c.classes; ++i)
    CHECK(infer.at(infer.logits)[i] == Approx(train.at(train.logits)[i]).margin(1e-6));
  m.zero_grad();
  m.backward(train, labels, B);
  CHECK(loss() == L); // backward does not disturb the parameters or the forward
  auto o = fd_options();
  o.max_elements = 24;
  for (auto& p : m.params)
    lowmem::test::gradcheck(loss, p.value.data(), p.value.size(), p.grad.data(), p.name.c_str(), o);

  // A hook on an MLP layer with the base frozen: only the hook's tensor is trained.
  m.set_all_trainable(false);
  demo::linear_slot& fc1 = m.slot("blocks.1.mlp.fc1");
  additive_hook h(fc1);
  fc1.hook = &h;
  train = m.plan(B, true);
  loss();
  m.zero_grad();
  m.backward(train, labels, B);
  CHECK(m.trainable_spans().empty());
  const auto all = m.all_spans(); // what a ZO method perturbs: every tensor, no gradient buffers
  CHECK(all.size() == m.params.size());
  CHECK(std::all_of(all.begin(), all.end(), [](const demo::param_span& s) { return !s.grad; }));
  CHECK(m.gradient_bytes() == index_t(h.A.size() * sizeof(float)));
  lowmem::test::gradcheck(loss, h.A.data(), h.A.size(), h.dA.data(), "hook.A", o);
}

namespace {
demo::vit_config tiny_config() {
  return demo::vit_shape(/*image*/ 8, /*patch*/ 4, /*width*/ 8, /*depth*/ 3, /*heads*/ 2,
                         /*mlp_ratio*/ 2, /*classes*/ 3);
}
} // namespace

TEST_CASE("tiny ViT: activation checkpointing gives the same loss and gradients",
          "[demo][vit][checkpoint]") {
  demo::vit m(tiny_config(), 5);
  m.set_all_trainable(true);
  // a LoRA hook too: its saved state is recomputed with the block
  demo::lora_options lo;
  lo.rank = 2;
  lo.targets = {"blocks.0.mlp.fc1", "blocks.1.attn.qkv"};
  auto hooks = demo::attach_adapters(m, demo::adapter_kind::lora, lo);
  m.set_all_trainable(true); // and every model tensor too
  for (auto& h : hooks)
    for (auto& s : h->params())
      for (index_t i = 0; i < s.numel; ++i) s.data[i] = 0.3f * std::sin(float(i + 1)); // B ≠ 0
  const index_t B = 3;
  auto img = randn(std::size_t(B * 64), 21);
  const std::uint8_t labels[B] = {1, 0, 2};
  auto grads = [&](bool ckpt, double& loss, std::size_t& arena) {
    m.checkpointing = ckpt;
    demo::vit_activations a = m.plan(B, true);
    arena = std::size_t(a.bytes());
    m.zero_grad();
    loss = m.forward(a, img.data(), labels, B);
    m.backward(a, labels, B);
    std::vector<float> g;
    for (auto& p : m.params) g.insert(g.end(), p.grad.begin(), p.grad.end());
    for (auto& h : hooks)
      for (auto& s : h->params()) g.insert(g.end(), s.grad, s.grad + s.numel);
    return g;
  };
  double l0 = 0, l1 = 0;
  std::size_t a0 = 0, a1 = 0;
  const auto g0 = grads(false, l0, a0);
  const auto g1 = grads(true, l1, a1);
  CHECK(l1 == l0);
  CHECK(a1 < a0); // two of three blocks' internals are not kept
  REQUIRE(g0.size() == g1.size());
  // The recomputation runs the same operations on the same inputs: identical up to rounding.
  for (std::size_t i = 0; i < g0.size(); ++i) CHECK(g1[i] == Approx(g0[i]).margin(1e-6));
}

TEST_CASE("tiny ViT: LoRA, DoRA and QLoRA hooks backprop correctly (finite differences)",
          "[demo][vit][adapters]") {
  for (auto kind :
       {demo::adapter_kind::lora, demo::adapter_kind::dora, demo::adapter_kind::qlora}) {
    INFO("adapter kind " << int(kind));
    demo::vit m(tiny_config(), 7);
    demo::lora_options lo;
    lo.rank = 2;
    lo.alpha = 4;
    for (const char* t : {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.attn.proj",
                          "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"})
      lo.targets.push_back(t);
    lo.modules_to_save = {"head"};
    auto hooks = demo::attach_adapters(m, kind, lo);
    for (auto& h : hooks) {
      if (auto* d = dynamic_cast<demo::dora_hook*>(h.get())) d->exact = true;
      auto ps = h->params();
      for (auto& s : ps)
        if (s.name.find("lora_B") != std::string::npos)
          for (index_t i = 0; i < s.numel; ++i) s.data[i] = 0.2f * std::cos(float(3 * i + 1));
    }
    if (kind == demo::adapter_kind::qlora) // the fp32 base weights are released
      CHECK(m.get("blocks.0.attn.qkv.weight").value.empty());
    const index_t B = 2;
    auto img = randn(std::size_t(B * 64), 22);
    const std::uint8_t labels[B] = {2, 1};
    demo::vit_activations a = m.plan(B, true);
    auto loss = [&] { return m.forward(a, img.data(), labels, B); };
    loss();
    m.zero_grad();
    m.backward(a, labels, B);
    auto o = fd_options();
    o.max_elements = 12;
    for (auto& h : hooks)
      for (auto& s : h->params())
        lowmem::test::gradcheck(loss, s.data, std::size_t(s.numel), s.grad, s.name.c_str(), o);
    auto& head = m.get("head.weight");
    lowmem::test::gradcheck(loss, head.value.data(), head.value.size(), head.grad.data(),
                            "head.weight", o);
    // the inference arena computes the same logits
    demo::vit_activations inf = m.plan(B, false);
    m.forward(inf, img.data(), nullptr, B);
    loss();
    for (index_t i = 0; i < B * 3; ++i)
      CHECK(inf.at(inf.logits)[i] == Approx(a.at(a.logits)[i]).margin(1e-5));
  }
}
