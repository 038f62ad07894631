// Tiled attention (lowmem/attention.hpp): forward and backward against the naive double
// reference for every option and their combinations, odd sizes, every arch; finite differences;
// determinism across thread counts; no allocation; bad input.
#include <catch2/catch.hpp>
#include <lowmem/attention.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/tensor.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "reference/attention_reference.hpp"
#include "reference/common.hpp"
#include "support/arch.hpp"
#include "support/gradcheck.hpp"

using namespace lowmem;

namespace {

struct shape {
  long B, Hq, Hkv, Nq, Nk, d;
  bool token_major = false;
};

/// Inputs, outputs and gradients of one attention problem, in [B,H,N,d] or [B,N,H,d].
template <class T = float> struct problem_data {
  shape s;
  std::vector<T> q, k, v, o, dout;
  std::vector<float> lse, dq, dk, dv;

  explicit problem_data(const shape& sh, std::uint64_t seed = 1) : s(sh) {
    const auto fill = [&](std::vector<T>& x, std::size_t n, std::uint64_t id, float amp) {
      const auto f = ref::uniform_data(n, seed * 100 + id, -amp, amp);
      x.resize(n);
      for (std::size_t i = 0; i < n; ++i) x[i] = conv(f[i]);
    };
    fill(q, nq_elems(), 1, 1.5f);
    fill(k, nk_elems(), 2, 1.5f);
    fill(v, nk_elems(), 3, 1.f);
    fill(dout, nq_elems(), 4, 1.f);
    o.assign(nq_elems(), conv(0.f));
    lse.assign(std::size_t(s.B * s.Hq * s.Nq), 0.f);
    dq.assign(nq_elems(), 0.f);
    dk.assign(nk_elems(), 0.f);
    dv.assign(nk_elems(), 0.f);
  }
  static T conv(float x) {
    if constexpr (std::is_same<T, bf16>::value)
      return to_bf16(x);
    else
      return x;
  }
  std::size_t nq_elems() const { return std::size_t(s.B * s.Hq * s.Nq * s.d); }
  std::size_t nk_elems() const { return std::size_t(s.B * s.Hkv * s.Nk * s.d); }
  template <class U> attention_tensor<U> tq(U* p, long H, long N) const {
    return s.token_major ? attention_bnhd(p, s.B, N, H, s.d) : attention_bhnd(p, s.B, H, N, s.d);
  }
  attention_tensor<const T> Q() const { return tq<const T>(q.data(), s.Hq, s.Nq); }
  attention_tensor<const T> K() const { return tq<const T>(k.data(), s.Hkv, s.Nk); }
  attention_tensor<const T> V() const { return tq<const T>(v.data(), s.Hkv, s.Nk); }
  attention_tensor<T> O() { return tq<T>(o.data(), s.Hq, s.Nq); }
  attention_tensor<const T> Oc() const { return tq<const T>(o.data(), s.Hq, s.Nq); }
  attention_tensor<const T> dO() const { return tq<const T>(dout.data(), s.Hq, s.Nq); }
  attention_tensor<float> dQ() { return tq<float>(dq.data(), s.Hq, s.Nq); }
  attention_tensor<float> dK() { return tq<float>(dk.data(), s.Hkv, s.Nk); }
  attention_tensor<float> dV() { return tq<float>(dv.data(), s.Hkv, s.Nk); }

  /// Element (b,h,n,c) of a kernel-layout array, in packed [B,H,N,d] order.
  template <class U> std::vector<double> packed(const std::vector<U>& x, long H, long N) const {
    std::vector<double> out(std::size_t(s.B * H * N * s.d));
    const auto t = tq<const U>(x.data(), H, N);
    for (long b = 0; b < s.B; ++b)
      for (long h = 0; h < H; ++h)
        for (long n = 0; n < N; ++n)
          for (long c = 0; c < s.d; ++c)
            out[std::size_t(((b * H + h) * N + n) * s.d + c)] = double(attention_kernels::load(
                t.data + b * t.stride_batch + h * t.stride_head + n * t.stride_seq + c));
    return out;
  }
};

/// Gradient-check setup: the loss L = Σ w ∘ O (w uniform, stream 555), so dO = w; runs forward and
/// backward of P under opt (gradients in P.dq, P.dk, P.dv and opt.bias) and returns L as a function
/// of the current inputs, through the double reference (what the finite differences perturb).
std::function<double()> weighted_output_loss(problem_data<>& P, const attention_options& opt) {
  const auto w = ref::uniform_data(P.nq_elems(), 555);
  P.dout.assign(w.begin(), w.end());
  attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt);
  attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(), P.dV(),
                     opt);
  return [&P, &opt, w] {
    const auto r = ref::attention<float>(P.Q(), P.K(), P.V(), opt);
    double l = 0;
    for (std::size_t i = 0; i < r.o.size(); ++i) l += w[i] * r.o[i];
    return l;
  };
}

/// max |a - ref| / max(max |ref|, floor). The floor matters where the exact gradient is ~0 by
/// cancellation (one visible key per row: P = 1, dS = dP - D = 0): there fp32 leaves ~1e-7.
double rel_err(const std::vector<double>& a, const std::vector<double>& ref, double floor = 1e-2) {
  return ref::max_rel_error(a.data(), ref.data(), a.size(), floor);
}
double lse_err(const std::vector<float>& a, const std::vector<double>& ref) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(ref[i])) {
      if (!(std::isinf(a[i]) && a[i] < 0)) return 1e30;
      continue;
    }
    e = std::max(e, std::fabs(double(a[i]) - ref[i]) / std::max(1.0, std::fabs(ref[i])));
  }
  return e;
}

/// Runs forward + backward on Arch (both backward schedules: the default on one thread, which
/// takes the single pass when d is a multiple of the SIMD width, and the deterministic two-pass
/// one) and compares with the reference.
template <class Arch>
void check_against_reference(const shape& sh, const attention_options& opt_in, const char* what,
                             double tol_o = 1e-5, double tol_g = 1e-4) {
  INFO(what << " B=" << sh.B << " Hq=" << sh.Hq << " Hkv=" << sh.Hkv << " Nq=" << sh.Nq
            << " Nk=" << sh.Nk << " d=" << sh.d << " token_major=" << sh.token_major);
  problem_data<> P(sh);
  ref::attention_grads g;
  const auto dO = P.dO();
  const auto r = ref::attention<float>(P.Q(), P.K(), P.V(), opt_in, &dO, &g);
  for (bool deterministic : {false, true}) {
    INFO("deterministic " << deterministic);
    attention_options opt = opt_in;
    opt.deterministic = deterministic;
    opt.threads = deterministic ? 0 : 1;
    std::fill(P.dq.begin(), P.dq.end(), 0.f);
    std::fill(P.dk.begin(), P.dk.end(), 0.f);
    std::fill(P.dv.begin(), P.dv.end(), 0.f);
    attention_forward<Arch>(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt);
    attention_backward<Arch>(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(),
                             P.dV(), opt);
    CHECK(rel_err(P.packed(P.o, sh.Hq, sh.Nq), r.o) <= tol_o);
    CHECK(lse_err(P.lse, r.lse) <= tol_o);
    CHECK(rel_err(P.packed(P.dq, sh.Hq, sh.Nq), g.dq) <= tol_g);
    CHECK(rel_err(P.packed(P.dk, sh.Hkv, sh.Nk), g.dk) <= tol_g);
    CHECK(rel_err(P.packed(P.dv, sh.Hkv, sh.Nk), g.dv) <= tol_g);
  }
}

} // namespace

LOWMEM_ARCH_TEST_CASE("attention matches the reference: plain, causal, GQA, odd sizes",
                      "[attention]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  attention_options plain, causal;
  causal.causal = true;
  for (const attention_options* opt : {&plain, &causal}) {
    const char* name = opt->causal ? "causal" : "plain";
    check_against_reference<Arch>({2, 2, 2, 37, 37, 16}, *opt, name);
    check_against_reference<Arch>({1, 1, 1, 1, 1, 8}, *opt, name);          // N = 1
    check_against_reference<Arch>({1, 2, 1, 70, 130, 33}, *opt, name);      // Nq < Nk, d odd
    check_against_reference<Arch>({1, 2, 2, 130, 70, 5}, *opt, name);       // Nq > Nk
    check_against_reference<Arch>({1, 4, 2, 128, 128, 64}, *opt, name);     // GQA, tile multiple
    check_against_reference<Arch>({2, 3, 1, 65, 65, 24, true}, *opt, name); // MQA, token-major
    check_against_reference<Arch>({1, 1, 1, 1, 200, 7}, *opt, name);        // decode row
    check_against_reference<Arch>({1, 2, 1, 70, 70, 80}, *opt, name);       // d = 80
    check_against_reference<Arch>({1, 2, 2, 40, 50, 48}, *opt, name);       // d = 48
    check_against_reference<Arch>({1, 1, 1, 65, 65, 256}, *opt, name);      // d = 256
  }
}

LOWMEM_ARCH_TEST_CASE("attention options match the reference", "[attention]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  {
    attention_options o;
    o.window_left = 20, o.window_right = 7;
    check_against_reference<Arch>({1, 2, 2, 150, 150, 16}, o, "window");
    check_against_reference<Arch>({1, 2, 1, 90, 150, 16}, o, "window Nq<Nk");
    o.causal = true;
    check_against_reference<Arch>({2, 4, 2, 150, 150, 16}, o, "causal+GQA+window");
    o.window_left = 0;
    check_against_reference<Arch>({1, 2, 2, 70, 70, 8}, o, "diagonal only");
  }
  {
    const float slopes[4] = {0.5f, 0.25f, 0.125f, 0.0625f};
    attention_options o;
    o.alibi_slopes = slopes;
    check_against_reference<Arch>({1, 4, 2, 80, 100, 16}, o, "alibi");
    o.softcap = 2.f;
    check_against_reference<Arch>({1, 4, 2, 80, 100, 16}, o, "softcap+alibi");
    o.causal = true;
    check_against_reference<Arch>({1, 4, 4, 100, 80, 16}, o, "softcap+alibi+causal");
    attention_options s;
    s.softcap = 1.5f;
    s.scale = 0.7f;
    check_against_reference<Arch>({2, 2, 2, 70, 70, 32}, s, "softcap, explicit scale");
  }
  {
    // bias [B, 1, Nq, Nk] broadcast over heads, with some -inf entries (one fully masked row)
    const long B = 2, Nq = 70, Nk = 90;
    auto bias = ref::uniform_data(std::size_t(B * Nq * Nk), 77, -2.f, 2.f);
    for (long j = 0; j < Nk; ++j) bias[std::size_t(3 * Nk + j)] = -INFINITY;
    for (long i = 0; i < Nq; ++i) bias[std::size_t(i * Nk + (i % Nk))] = -INFINITY;
    attention_options o;
    o.bias = {bias.data(), Nq * Nk, 0, Nk};
    check_against_reference<Arch>({B, 2, 1, Nq, Nk, 16}, o, "bias");
    o.causal = true;
    check_against_reference<Arch>({B, 2, 1, Nq, Nk, 16}, o, "bias+causal");
  }
  {
    // varlen: 4 packed sequences, one empty, one of length 1, one longer than a tile
    const std::int32_t cq[5] = {0, 0, 1, 71, 80}, ck[5] = {0, 3, 4, 104, 104};
    attention_options o;
    o.varlen = {cq, ck, 4};
    check_against_reference<Arch>({1, 2, 1, 80, 104, 16, true}, o, "varlen");
    o.causal = true;
    check_against_reference<Arch>({1, 2, 1, 80, 104, 16, true}, o, "varlen+causal");
    o.window_left = 9;
    check_against_reference<Arch>({1, 2, 2, 80, 104, 16}, o, "varlen+causal+window");
  }
  {
    attention_options o;
    o.dropout = 0.2f;
    o.dropout_rng = random::stream{1234, 9};
    check_against_reference<Arch>({2, 2, 1, 70, 90, 16}, o, "dropout");
    o.causal = true;
    o.softcap = 3.f;
    check_against_reference<Arch>({1, 2, 2, 100, 100, 16}, o, "dropout+causal+softcap");
  }
}

TEST_CASE("attention gradients match central finite differences", "[attention][gradcheck]") {
  const float slopes[2] = {0.3f, 0.1f};
  std::vector<attention_options> opts(3);
  opts[0].causal = true;
  opts[1].softcap = 1.f, opts[1].alibi_slopes = slopes, opts[1].window_left = 3;
  opts[2].dropout = 0.25f, opts[2].dropout_rng = random::stream{5, 6};
  for (const auto& opt : opts) {
    const shape sh{1, 2, 1, 6, 9, 5};
    problem_data<> P(sh, 3);
    const auto loss = weighted_output_loss(P, opt);
    test::gradcheck(loss, P.q.data(), P.q.size(), P.dq.data(), "dQ");
    test::gradcheck(loss, P.k.data(), P.k.size(), P.dk.data(), "dK");
    test::gradcheck(loss, P.v.data(), P.v.size(), P.dv.data(), "dV");
  }
}

TEST_CASE("attention forward and backward are bitwise identical on 1 and 2 threads",
          "[attention][determinism]") {
  attention_options opt;
  opt.causal = true;
  opt.dropout = 0.1f;
  opt.deterministic = true;
  const shape sh{1, 4, 2, 200, 200, 32};
  problem_data<> a(sh), b(sh);
  opt.threads = 1;
  attention_forward(a.Q(), a.K(), a.V(), a.O(), a.lse.data(), opt);
  attention_backward(a.Q(), a.K(), a.V(), a.Oc(), a.dO(), a.lse.data(), a.dQ(), a.dK(), a.dV(),
                     opt);
  opt.threads = 2;
  attention_forward(b.Q(), b.K(), b.V(), b.O(), b.lse.data(), opt);
  attention_backward(b.Q(), b.K(), b.V(), b.Oc(), b.dO(), b.lse.data(), b.dQ(), b.dK(), b.dV(),
                     opt);
  CHECK(ref::bitwise_equal(a.o.data(), b.o.data(), a.o.size()));
  CHECK(ref::bitwise_equal(a.lse.data(), b.lse.data(), a.lse.size()));
  CHECK(ref::bitwise_equal(a.dq.data(), b.dq.data(), a.dq.size()));
  CHECK(ref::bitwise_equal(a.dk.data(), b.dk.data(), a.dk.size()));
  CHECK(ref::bitwise_equal(a.dv.data(), b.dv.data(), a.dv.size()));
  // and across runs (the backward accumulates: a second call doubles the gradients exactly)
  attention_backward(b.Q(), b.K(), b.V(), b.Oc(), b.dO(), b.lse.data(), b.dQ(), b.dK(), b.dV(),
                     opt);
  for (std::size_t i = 0; i < a.dk.size(); ++i) REQUIRE(b.dk[i] == 2 * a.dk[i]);
}

TEST_CASE("the default single-pass backward is bitwise identical on 1 and 2 threads",
          "[attention][determinism]") {
  // B·Hkv = 2 work items: the single-pass schedule for both thread counts
  attention_options opt;
  opt.causal = true;
  const shape sh{1, 4, 2, 150, 150, 32};
  problem_data<> a(sh), b(sh);
  for (int t : {1, 2}) {
    auto& P = t == 1 ? a : b;
    opt.threads = t;
    attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt);
    attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(), P.dV(),
                       opt);
  }
  CHECK(ref::bitwise_equal(a.dq.data(), b.dq.data(), a.dq.size()));
  CHECK(ref::bitwise_equal(a.dk.data(), b.dk.data(), a.dk.size()));
  CHECK(ref::bitwise_equal(a.dv.data(), b.dv.data(), a.dv.size()));
}

TEST_CASE("attention allocates nothing with a caller workspace", "[attention][memory]") {
  if (!memory::tracking_enabled()) return;
  attention_options opt;
  opt.causal = true;
  opt.threads = 2;
  const shape sh{1, 2, 1, 300, 300, 64};
  problem_data<> P(sh);
  owned_workspace ws(attention_workspace_bytes(sh.d, opt.threads));
  // warm-up: the OpenMP runtime allocates its thread team on first use
  attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt, ws.get());
  attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(), P.dV(), opt,
                     ws.get());
  memory::region r;
  attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt, ws.get());
  attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(), P.dV(), opt,
                     ws.get());
  CHECK(r.allocations() == 0);
  // the workspace is O(threads · 64 · d), independent of N
  for (long d : {8L, 64L, 128L, 256L})
    CHECK(attention_workspace_bytes(d, 1) <= std::size_t(768 * 1024));
}

TEST_CASE("attention bad input throws before writing", "[attention][errors]") {
  const shape sh{1, 4, 2, 10, 12, 8};
  problem_data<> P(sh);
  std::fill(P.o.begin(), P.o.end(), 7.f);
  std::fill(P.lse.begin(), P.lse.end(), 7.f);
  std::fill(P.dq.begin(), P.dq.end(), 7.f);
  std::fill(P.dk.begin(), P.dk.end(), 7.f);
  const auto untouched = [&] {
    for (float x : P.o) REQUIRE(x == 7.f);
    for (float x : P.lse) REQUIRE(x == 7.f);
    for (float x : P.dq) REQUIRE(x == 7.f);
    for (float x : P.dk) REQUIRE(x == 7.f);
  };
  const auto fwd = [&](attention_tensor<const float> q, attention_tensor<const float> k,
                       attention_tensor<const float> v, const attention_options& o) {
    attention_forward(q, k, v, P.O(), P.lse.data(), o);
  };
  const attention_options ok;
  auto bad_k = P.K();
  bad_k.heads = 3; // 4 % 3 != 0
  CHECK_THROWS_AS(fwd(P.Q(), bad_k, P.V(), ok), invalid_argument);
  auto bad_v = P.V();
  bad_v.seq = 11;
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), bad_v, ok), invalid_argument);
  auto bad_d = P.K();
  bad_d.dim = 7;
  CHECK_THROWS_AS(fwd(P.Q(), bad_d, P.V(), ok), invalid_argument);
  auto zero_d = P.Q();
  zero_d.dim = 0;
  CHECK_THROWS_AS(fwd(zero_d, P.K(), P.V(), ok), invalid_argument);
  attention_options w;
  w.window_left = -1;
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), P.V(), w), invalid_argument);
  attention_options dr;
  dr.dropout = 1.f;
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), P.V(), dr), invalid_argument);
  attention_options sc;
  sc.softcap = -1.f;
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), P.V(), sc), invalid_argument);
  const std::int32_t bad_cu[3] = {0, 6, 5}, good_q[3] = {0, 4, 10}, good_k[3] = {0, 5, 12};
  attention_options vl;
  vl.varlen = {bad_cu, good_k, 2};
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), P.V(), vl), invalid_argument);
  vl.varlen = {good_q, good_q, 2}; // ends at 10, k.seq is 12
  CHECK_THROWS_AS(fwd(P.Q(), P.K(), P.V(), vl), invalid_argument);
  std::vector<unsigned char> small(64);
  CHECK_THROWS_AS(attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), ok,
                                    workspace(small.data(), small.size())),
                  invalid_argument);
  // backward: dk of the wrong shape
  auto bad_dk = P.dK();
  bad_dk.seq = 5;
  CHECK_THROWS_AS(attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(),
                                     bad_dk, P.dV(), ok),
                  invalid_argument);
  // a bias gradient without the bias
  std::vector<float> dbias(std::size_t(sh.Nq * sh.Nk), 7.f);
  attention_options nobias;
  nobias.bias.grad = dbias.data();
  CHECK_THROWS_AS(attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(),
                                     P.dK(), P.dV(), nobias),
                  invalid_argument);
  for (float x : dbias) REQUIRE(x == 7.f);
  CHECK_THROWS_WITH(fwd(P.Q(), bad_k, P.V(), ok),
                    Catch::Contains("attention_forward") && Catch::Contains("q.heads"));
  untouched();
}

TEST_CASE("attention with bf16 inputs is within bf16 tolerance", "[attention][bf16]") {
  for (bool causal : {false, true}) {
    attention_options opt;
    opt.causal = causal;
    const shape sh{1, 2, 1, 90, 100, 32};
    problem_data<bf16> P(sh);
    attention_forward(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt);
    attention_backward(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(), P.dV(),
                       opt);
    ref::attention_grads g;
    const auto dO = P.dO();
    const auto r = ref::attention<bf16>(P.Q(), P.K(), P.V(), opt, &dO, &g);
    CHECK(rel_err(P.packed(P.o, sh.Hq, sh.Nq), r.o) <= 1e-2); // O is rounded to bf16
    CHECK(lse_err(P.lse, r.lse) <= 1e-5);
    CHECK(rel_err(P.packed(P.dq, sh.Hq, sh.Nq), g.dq) <= 2e-2); // D uses the rounded O
    CHECK(rel_err(P.packed(P.dk, sh.Hkv, sh.Nk), g.dk) <= 2e-2);
    CHECK(rel_err(P.packed(P.dv, sh.Hkv, sh.Nk), g.dv) <= 1e-4);
  }
}

namespace {

/// A bias of `elems` floats with strides (sb, sh, si) and its gradient buffer.
struct bias_case {
  const char* what;
  shape sh;
  long sb, sh_, si;
  std::size_t elems;
};

/// Forward + backward with opt.bias.grad set: d(bias) against the reference's (accumulated onto
/// a non-zero start, so += is checked), for both schedules, and bitwise across 1 and 2 threads.
template <class Arch>
void check_bias_grad(const bias_case& c, const attention_options& opt_in, double tol = 1e-4) {
  INFO(c.what << " B=" << c.sh.B << " Hq=" << c.sh.Hq << " Hkv=" << c.sh.Hkv << " Nq=" << c.sh.Nq
              << " Nk=" << c.sh.Nk << " d=" << c.sh.d);
  auto bias = ref::uniform_data(c.elems, 4242, -2.f, 2.f);
  bias[c.elems / 3] = -INFINITY; // a masked entry: its gradient is 0
  attention_options opt = opt_in;
  opt.bias = {bias.data(), c.sb, c.sh_, c.si};
  problem_data<> P(c.sh);
  ref::attention_grads g;
  const auto dO = P.dO();
  const auto r = ref::attention<float>(P.Q(), P.K(), P.V(), opt, &dO, &g);
  g.dbias.resize(c.elems, 0.0);
  std::vector<double> expect(c.elems);
  for (std::size_t i = 0; i < c.elems; ++i) expect[i] = 0.5 + g.dbias[i];
  std::vector<float> first;
  for (int run = 0; run < 3; ++run) {
    INFO("run " << run);
    std::vector<float> db(c.elems, 0.5f);
    opt.bias.grad = db.data();
    opt.deterministic = run == 1;
    opt.threads = run == 2 ? 2 : 1;
    std::fill(P.dq.begin(), P.dq.end(), 0.f);
    std::fill(P.dk.begin(), P.dk.end(), 0.f);
    std::fill(P.dv.begin(), P.dv.end(), 0.f);
    attention_forward<Arch>(P.Q(), P.K(), P.V(), P.O(), P.lse.data(), opt);
    attention_backward<Arch>(P.Q(), P.K(), P.V(), P.Oc(), P.dO(), P.lse.data(), P.dQ(), P.dK(),
                             P.dV(), opt);
    CHECK(rel_err(P.packed(P.o, c.sh.Hq, c.sh.Nq), r.o) <= 1e-5);
    CHECK(rel_err(P.packed(P.dq, c.sh.Hq, c.sh.Nq), g.dq) <= tol);
    CHECK(rel_err(P.packed(P.dk, c.sh.Hkv, c.sh.Nk), g.dk) <= tol);
    CHECK(rel_err(P.packed(P.dv, c.sh.Hkv, c.sh.Nk), g.dv) <= tol);
    CHECK(rel_err(std::vector<double>(db.begin(), db.end()), expect) <= tol);
    if (run == 0)
      first = db;
    else
      CHECK(ref::bitwise_equal(first.data(), db.data(), db.size()));
  }
}

} // namespace

LOWMEM_ARCH_TEST_CASE("attention bias gradient matches the reference for every broadcast",
                      "[attention][bias]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  attention_options causal, plain, mixed;
  causal.causal = true;
  const float slopes[4] = {0.5f, 0.25f, 0.125f, 0.0625f};
  mixed.softcap = 2.f;
  mixed.alibi_slopes = slopes;
  mixed.window_left = 30;
  mixed.dropout = 0.2f;
  mixed.dropout_rng = random::stream{77, 3};
  {
    const long B = 2, Hq = 4, Nq = 70, Nk = 90; // per-head [Hq, Nq, Nk], broadcast over batch
    const bias_case c{"per-head", {B, Hq, 2, Nq, Nk, 16},   0, Nq * Nk,
                      Nk,         std::size_t(Hq * Nq * Nk)};
    check_bias_grad<Arch>(c, causal);
    check_bias_grad<Arch>(c, mixed);
  }
  {
    const long B = 2, Hq = 2, N = 65; // full [B, Hq, Nq, Nk], MQA, token-major
    const bias_case c{"full", {B, Hq, 1, N, N, 24, true}, Hq * N * N, N * N,
                      N,      std::size_t(B * Hq * N * N)};
    check_bias_grad<Arch>(c, plain);
    check_bias_grad<Arch>(c, mixed);
  }
  {
    const long Nq = 100, Nk = 130; // shared [Nq, Nk] over batch and heads, GQA
    const bias_case c{"shared", {2, 4, 2, Nq, Nk, 32}, 0, 0, Nk, std::size_t(Nq * Nk)};
    check_bias_grad<Arch>(c, causal);
    check_bias_grad<Arch>(c, mixed);
  }
  {
    const long B = 2, Nk = 70; // key padding [B, 1, 1, Nk]: reduced over heads and query rows
    const bias_case c{"key padding", {B, 2, 2, 130, Nk, 8}, Nk, 0, 0, std::size_t(B * Nk)};
    check_bias_grad<Arch>(c, plain);
    check_bias_grad<Arch>(c, causal);
  }
  {
    // varlen: per-head [Hq, total_q, total_k] over 3 packed sequences
    const std::int32_t cq[4] = {0, 1, 71, 80}, ck[4] = {0, 4, 104, 104};
    attention_options o = causal;
    o.varlen = {cq, ck, 3};
    const bias_case c{"varlen", {1, 2, 1, 80, 104, 16},   0, 80 * 104,
                      104,      std::size_t(2 * 80 * 104)};
    check_bias_grad<Arch>(c, o);
  }
}

TEST_CASE("attention bias gradient matches central finite differences",
          "[attention][bias][gradcheck]") {
  const float slopes[2] = {0.3f, 0.1f};
  std::vector<attention_options> opts(2);
  opts[0].causal = true;
  opts[1].softcap = 1.f, opts[1].alibi_slopes = slopes, opts[1].dropout = 0.25f;
  opts[1].dropout_rng = random::stream{5, 6};
  for (const auto& base : opts) {
    const long B = 2, Hq = 2, Nq = 6, Nk = 9;
    // per-head bias [Hq, Nq, Nk] (broadcast over the batch) and a key-padding one [B, 1, 1, Nk]
    for (int kind = 0; kind < 2; ++kind) {
      INFO("kind " << kind << " causal " << base.causal);
      const std::size_t n = kind == 0 ? std::size_t(Hq * Nq * Nk) : std::size_t(B * Nk);
      auto bias = ref::uniform_data(n, 99 + kind, -1.f, 1.f);
      std::vector<float> db(n, 0.f);
      attention_options opt = base;
      opt.bias = kind == 0 ? attention_bias{bias.data(), 0, Nq * Nk, Nk, db.data()}
                           : attention_bias{bias.data(), Nk, 0, 0, db.data()};
      problem_data<> P({B, Hq, 1, Nq, Nk, 5}, 3);
      const auto loss = weighted_output_loss(P, opt);
      test::gradcheck(loss, bias.data(), n, db.data(), "dbias");
      test::gradcheck(loss, P.q.data(), P.q.size(), P.dq.data(), "dQ with bias");
    }
  }
}

TEST_CASE("attention_view takes core tensor views", "[attention][view]") {
  std::vector<float> x(2 * 3 * 5 * 4);
  const auto tm = attention_view(token_major_view(x.data(), 2, 5, 3, 4));
  const auto ref_tm = attention_bnhd(x.data(), 2, 5, 3, 4);
  const auto hm = attention_view(dense_view<float, 4>(x.data(), {2, 3, 5, 4}));
  const auto ref_hm = attention_bhnd(x.data(), 2, 3, 5, 4);
  for (const auto& [a, b] : {std::make_pair(tm, ref_tm), std::make_pair(hm, ref_hm)}) {
    CHECK(a.data == b.data);
    CHECK((a.batch == b.batch && a.heads == b.heads && a.seq == b.seq && a.dim == b.dim));
    CHECK((a.stride_batch == b.stride_batch && a.stride_head == b.stride_head &&
           a.stride_seq == b.stride_seq));
  }
  tensor_view<float, 4> strided{x.data(), {1, 1, 5, 4}, {0, 0, 8, 2}};
  CHECK_THROWS_AS(attention_view(strided), invalid_argument);
}
