// Fused fp32-state optimizers (AdamW, Adam, SGD momentum/Nesterov/dampening, Lion) against
// double references of PyTorch's update step by step over 100 steps, on every compiled arch and
// at tail sizes; bf16 parameters with unbiased stochastic rounding; bitwise 1 vs 2 threads;
// no allocation; bad input throws before any write.
#include <catch2/catch.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/optimizers/fused.hpp>

#include <cmath>
#include <vector>

#include "reference/common.hpp"
#include "reference/optimizers_reference.hpp"
#include "support/arch.hpp"

using namespace lowmem;

namespace {

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

} // namespace

LOWMEM_ARCH_TEST_CASE("AdamW and Adam match a double reference of PyTorch step by step",
                      "[optimizers][adam]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (bool decoupled : {true, false}) {
    for (std::size_t n : test::tail_sizes<Arch>()) {
      auto p = ref::uniform_data(n, 1);
      std::vector<float> m(n, 0.f), v(n, 0.f);
      const double lr = 1e-2, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.1;
      double worst_p = 0, worst_m = 0, worst_v = 0, worst_dp = 0;
      for (std::int64_t t = 1; t <= 100; ++t) {
        const auto g = ref::uniform_data(n, 1000 + std::uint64_t(t), -2.f, 2.f);
        // reference from the current float state (step-by-step comparison)
        auto rp = to_double(p), rm = to_double(m), rv = to_double(v);
        const auto p0 = rp;
        ref::adam_step(rp.data(), g.data(), rm.data(), rv.data(), n, t,
                       {lr, b1, b2, eps, wd, decoupled});
        if (decoupled)
          optim::adamw_step<Arch>(p.data(), g.data(), m.data(), v.data(), n, t,
                                  {lr, b1, b2, eps, wd});
        else
          optim::adam_step<Arch>(p.data(), g.data(), m.data(), v.data(), n, t,
                                 {lr, b1, b2, eps, wd});
        // error relative to each array's scale: max |reference|, at least the scale of the
        // terms it is summed from ((1-β1)|g|max, (1-β2)g²max), so a cancelling sum of one
        // element (n = 1) is not divided by its own tiny value
        worst_p = std::max(worst_p, ref::max_rel_error(p.data(), rp.data(), n));
        worst_m = std::max(worst_m, ref::max_rel_error(m.data(), rm.data(), n, (1 - b1) * 2));
        worst_v = std::max(worst_v, ref::max_rel_error(v.data(), rv.data(), n, (1 - b2) * 4));
        // the update itself, relative to the update scale (limited by one ulp of p)
        for (std::size_t i = 0; i < n; ++i) {
          const double dp = double(p[i]) - p0[i], dr = rp[i] - p0[i];
          const double ulp = std::ldexp(1.0, std::ilogb(std::fabs(rp[i]) + 1e-30) - 23);
          worst_dp = std::max(worst_dp, (std::fabs(dp - dr) - 2 * ulp) /
                                            lr); // p·decay and the fma round once each
        }
      }
      INFO("n=" << n << " decoupled=" << decoupled);
      CHECK(worst_p < 1e-6);
      CHECK(worst_m < 1e-6);
      CHECK(worst_v < 1e-6);
      CHECK(worst_dp < 1e-6);
    }
  }
}

LOWMEM_ARCH_TEST_CASE("AdamW with bf16 gradients matches the reference and the widened fp32 path",
                      "[optimizers][adam][bf16]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (std::size_t n : test::tail_sizes<Arch>()) {
    auto p = ref::uniform_data(n, 11), p2 = p;
    std::vector<bf16> pb(n), pb2(n);
    for (std::size_t i = 0; i < n; ++i) pb[i] = pb2[i] = to_bf16(p[i]);
    std::vector<float> m(n, 0.f), v(n, 0.f), m2 = m, v2 = v, mb = m, vb = v, mb2 = m, vb2 = v;
    const optim::adamw_config cfg{1e-2, 0.9, 0.99, 1e-8, 0.1};
    double worst_p = 0;
    bool same = true;
    for (std::int64_t t = 1; t <= 100; ++t) {
      const auto g32 = ref::uniform_data(n, 1500 + std::uint64_t(t), -2.f, 2.f);
      std::vector<bf16> g(n);
      std::vector<float> gw(n); // the bf16 gradient widened
      for (std::size_t i = 0; i < n; ++i) g[i] = to_bf16(g32[i]), gw[i] = to_float(g[i]);
      auto rp = to_double(p), rm = to_double(m), rv = to_double(v);
      ref::adam_step(rp.data(), gw.data(), rm.data(), rv.data(), n, t,
                     {cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, true});
      optim::adamw_step<Arch>(p.data(), g.data(), m.data(), v.data(), n, t, cfg);
      optim::adamw_step<Arch>(p2.data(), gw.data(), m2.data(), v2.data(), n, t, cfg);
      worst_p = std::max(worst_p, ref::max_rel_error(p.data(), rp.data(), n));
      same = same && ref::bitwise_equal(p.data(), p2.data(), n) &&
             ref::bitwise_equal(m.data(), m2.data(), n) &&
             ref::bitwise_equal(v.data(), v2.data(), n);
      // bf16 parameters too (same rounding stream: same bits)
      const random::stream rs{4, std::uint64_t(t)};
      optim::adamw_step<Arch>(pb.data(), g.data(), mb.data(), vb.data(), n, t, cfg, rs);
      optim::adamw_step<Arch>(pb2.data(), gw.data(), mb2.data(), vb2.data(), n, t, cfg, rs);
      for (std::size_t i = 0; i < n; ++i) same = same && pb[i].bits == pb2[i].bits;
    }
    INFO("n=" << n);
    CHECK(worst_p < 1e-6);
    CHECK(same);
  }
}

TEST_CASE("AdamW free-running 100 steps stays within 1e-5 of the double trajectory",
          "[optimizers][adam]") {
  const std::size_t n = 4099;
  auto p = ref::uniform_data(n, 2);
  std::vector<float> m(n, 0.f), v(n, 0.f);
  auto rp = to_double(p);
  std::vector<double> rm(n, 0.0), rv(n, 0.0);
  for (std::int64_t t = 1; t <= 100; ++t) {
    const auto g = ref::uniform_data(n, 2000 + std::uint64_t(t));
    optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, t, {});
    ref::adam_step(rp.data(), g.data(), rm.data(), rv.data(), n, t,
                   {1e-3, 0.9, 0.999, 1e-8, 1e-2, true});
  }
  CHECK(ref::max_rel_error(p.data(), rp.data(), n) < 1e-5); // fp32 rounding of p accumulates
  CHECK(ref::max_rel_error(m.data(), rm.data(), n) < 1e-5);
  CHECK(ref::max_rel_error(v.data(), rv.data(), n) < 1e-5);
}

LOWMEM_ARCH_TEST_CASE("SGD (momentum, dampening, Nesterov, weight decay) matches PyTorch's rule",
                      "[optimizers][sgd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const optim::sgd_config cfgs[] = {{0.05, 0.0, 0.0, 0.0, false},
                                    {0.05, 0.9, 0.0, 0.01, false},
                                    {0.05, 0.9, 0.3, 0.0, false},
                                    {0.05, 0.9, 0.0, 0.01, true}};
  for (const auto& cfg : cfgs) {
    for (std::size_t n : test::tail_sizes<Arch>()) {
      auto p = ref::uniform_data(n, 3);
      std::vector<float> buf(n, 0.f);
      double worst_p = 0, worst_b = 0;
      for (std::int64_t t = 1; t <= 100; ++t) {
        const auto g = ref::uniform_data(n, 3000 + std::uint64_t(t));
        auto rp = to_double(p), rb = to_double(buf);
        ref::sgd_step(rp.data(), g.data(), rb.data(), n, t,
                      {cfg.lr, cfg.momentum, cfg.dampening, cfg.weight_decay, cfg.nesterov});
        optim::sgd_step<Arch>(p.data(), g.data(), buf.data(), n, t, cfg);
        worst_p = std::max(worst_p, ref::max_rel_error(p.data(), rp.data(), n));
        worst_b = std::max(worst_b, ref::max_rel_error(buf.data(), rb.data(), n, 1.0));
      }
      INFO("n=" << n << " momentum=" << cfg.momentum << " nesterov=" << cfg.nesterov);
      CHECK(worst_p < 1e-6);
      CHECK(worst_b < 1e-6);
    }
  }
}

LOWMEM_ARCH_TEST_CASE("Lion matches the reference update", "[optimizers][lion]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (std::size_t n : test::tail_sizes<Arch>()) {
    auto p = ref::uniform_data(n, 4);
    std::vector<float> m(n, 0.f);
    double worst_p = 0, worst_m = 0;
    std::size_t sign_flips = 0;
    for (std::int64_t t = 1; t <= 100; ++t) {
      const auto g = ref::uniform_data(n, 4000 + std::uint64_t(t));
      auto rp = to_double(p), rm = to_double(m);
      ref::lion_step(rp.data(), g.data(), rm.data(), n, 1e-3, 0.9, 0.99, 0.1);
      const auto before = p;
      optim::lion_step<Arch>(p.data(), g.data(), m.data(), n, {1e-3, 0.9, 0.99, 0.1});
      for (std::size_t i = 0; i < n; ++i) {
        // a sign decided differently (|c| within rounding of 0) would move p by 2·lr
        if (std::fabs(double(p[i]) - rp[i]) > 1e-4)
          ++sign_flips;
        else
          worst_p = std::max(worst_p, std::fabs(double(p[i]) - rp[i]));
      }
      (void)before;
      worst_m = std::max(worst_m, ref::max_rel_error(m.data(), rm.data(), n, 0.01));
    }
    CHECK(sign_flips == 0);
    CHECK(worst_p < 1e-6);
    CHECK(worst_m < 1e-6);
  }
}

TEST_CASE("bf16 AdamW: stochastic rounding is unbiased and lands on a bf16 neighbour",
          "[optimizers][bf16]") {
  const std::size_t n = 64 * 3 + 5, trials = 4000;
  const auto p32 = ref::uniform_data(n, 5);
  std::vector<bf16> p0(n);
  for (std::size_t i = 0; i < n; ++i) p0[i] = to_bf16(p32[i]);
  const auto g = ref::uniform_data(n, 6);
  const optim::adamw_config cfg{1e-3, 0.9, 0.999, 1e-8, 0.1};
  // exact fp32 update of the bf16 value, in double
  std::vector<double> exact(n), rm(n, 0.0), rv(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) exact[i] = to_float(p0[i]);
  ref::adam_step(exact.data(), g.data(), rm.data(), rv.data(), n, 1,
                 {1e-3, 0.9, 0.999, 1e-8, 0.1, true});
  std::vector<double> mean(n, 0.0);
  bool neighbours = true;
  for (std::size_t k = 0; k < trials; ++k) {
    std::vector<bf16> p = p0;
    std::vector<float> m(n, 0.f), v(n, 0.f);
    optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1, cfg, random::stream{77, k});
    for (std::size_t i = 0; i < n; ++i) {
      const double x = to_float(p[i]);
      mean[i] += x / trials;
      // x must be one of the two bf16 values around the exact result
      const float lo = to_float(bf16{std::uint16_t(float_bits(float(exact[i])) >> 16)});
      const double ulp = std::ldexp(1.0, std::ilogb(exact[i]) - 7);
      neighbours =
          neighbours && std::fabs(x - exact[i]) <= ulp && (x == lo || std::fabs(x - lo) <= ulp);
    }
  }
  CHECK(neighbours);
  // mean of Bernoulli rounding: sd <= ulp / (2 sqrt(trials)); 5 sd bound per element
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double ulp = std::ldexp(1.0, std::ilogb(exact[i]) - 7);
    if (std::fabs(mean[i] - exact[i]) > 5 * ulp / (2 * std::sqrt(double(trials)))) ++bad;
  }
  CHECK(bad == 0);
}

TEST_CASE("bf16 AdamW equals the fp32 update rounded with the documented bits",
          "[optimizers][bf16]") {
  const std::size_t n = 1000;
  const auto p32 = ref::uniform_data(n, 8);
  std::vector<bf16> pb(n);
  std::vector<float> pf(n);
  for (std::size_t i = 0; i < n; ++i) pb[i] = to_bf16(p32[i]), pf[i] = to_float(pb[i]);
  std::vector<float> m1(n, 0.f), v1(n, 0.f), m2(n, 0.f), v2(n, 0.f);
  const random::stream s{3, 9};
  for (std::int64_t t = 1; t <= 3; ++t) {
    const auto g = ref::uniform_data(n, 9000 + std::uint64_t(t));
    optim::adamw_step(pb.data(), g.data(), m1.data(), v1.data(), n, t, {}, s);
    optim::adamw_step(pf.data(), g.data(), m2.data(), v2.data(), n, t, {});
    bool same = true;
    for (std::size_t i = 0; i < n; ++i) {
      same = same && pb[i].bits == to_bf16_stochastic(pf[i], s, i).bits;
      pf[i] = to_float(pb[i]);
    }
    CHECK(same);
    CHECK(ref::bitwise_equal(m1.data(), m2.data(), n));
  }
}

TEST_CASE("fp32 optimizers are bitwise identical on 1 and 2 threads", "[optimizers][threads]") {
  const std::size_t n = 700001;
  const auto p0 = ref::uniform_data(n, 10);
  std::vector<float> pa = p0, pb = p0, ma(n, 0.f), mb(n, 0.f), va(n, 0.f), vb(n, 0.f);
  for (std::int64_t t = 1; t <= 3; ++t) {
    const auto g = ref::uniform_data(n, 10000 + std::uint64_t(t));
    optim::adamw_step(pa.data(), g.data(), ma.data(), va.data(), n, t, {}, 1);
    optim::adamw_step(pb.data(), g.data(), mb.data(), vb.data(), n, t, {}, 2);
    optim::lion_step(pa.data(), g.data(), ma.data(), n, {}, 1);
    optim::lion_step(pb.data(), g.data(), mb.data(), n, {}, 2);
    optim::sgd_step(pa.data(), g.data(), va.data(), n, t, {0.01, 0.9, 0, 0, true}, 1);
    optim::sgd_step(pb.data(), g.data(), vb.data(), n, t, {0.01, 0.9, 0, 0, true}, 2);
  }
  CHECK(ref::bitwise_equal(pa.data(), pb.data(), n));
  CHECK(ref::bitwise_equal(ma.data(), mb.data(), n));
  CHECK(ref::bitwise_equal(va.data(), vb.data(), n));
  std::vector<bf16> qa(n), qb(n);
  for (std::size_t i = 0; i < n; ++i) qa[i] = qb[i] = to_bf16(p0[i]);
  const auto g = ref::uniform_data(n, 10100);
  optim::adamw_step(qa.data(), g.data(), ma.data(), va.data(), n, 4, {}, random::stream{1, 4}, 1);
  optim::adamw_step(qb.data(), g.data(), mb.data(), vb.data(), n, 4, {}, random::stream{1, 4}, 2);
  bool same = true;
  for (std::size_t i = 0; i < n; ++i) same = same && qa[i].bits == qb[i].bits;
  CHECK(same);
}

TEST_CASE("fp32 optimizer steps allocate nothing", "[optimizers][memory]") {
  REQUIRE(memory::tracking_enabled());
  const std::size_t n = 100003;
  auto p = ref::uniform_data(n, 11);
  const auto g = ref::uniform_data(n, 12);
  std::vector<float> m(n, 0.f), v(n, 0.f);
  std::vector<bf16> pb(n);
  const std::vector<bf16> gb(n);
  warm_up_threads(2); // the 2-thread step opens a region; libgomp allocates its team on the first
  memory::region r;
  optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1, {}, 2);
  optim::adam_step(p.data(), g.data(), m.data(), v.data(), n, 2, {});
  optim::sgd_step(p.data(), g.data(), m.data(), n, 1, {0.1, 0.9, 0.0, 0.0, false});
  optim::lion_step(p.data(), g.data(), m.data(), n, {});
  optim::adamw_step(pb.data(), g.data(), m.data(), v.data(), n, 3, {}, random::stream{1, 3});
  optim::adamw_step(p.data(), gb.data(), m.data(), v.data(), n, 4, {});
  optim::adamw_step(pb.data(), gb.data(), m.data(), v.data(), n, 5, {}, random::stream{1, 5});
  CHECK(r.allocations() == 0);
}

TEST_CASE("bad optimizer input throws before any write", "[optimizers][errors]") {
  const std::size_t n = 100;
  const auto p0 = ref::uniform_data(n, 13);
  const auto g = ref::uniform_data(n, 14);
  std::vector<float> p = p0, m(n, 0.5f), v(n, 0.25f);
  auto unchanged = [&] {
    bool ok = ref::bitwise_equal(p.data(), p0.data(), n);
    for (std::size_t i = 0; i < n; ++i) ok = ok && m[i] == 0.5f && v[i] == 0.25f;
    return ok;
  };
  using optim::adamw_config;
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1,
                                    adamw_config{-1e-3, 0.9, 0.999, 1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1,
                                    adamw_config{1e-3, 1.0, 0.999, 1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1,
                                    adamw_config{1e-3, 0.9, -0.1, 1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 0, adamw_config{}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), m.data(), nullptr, n, 1, adamw_config{}),
                  invalid_argument);
  const bf16* no_grad = nullptr;
  CHECK_THROWS_AS(optim::adamw_step(p.data(), no_grad, m.data(), v.data(), n, 1, adamw_config{}),
                  invalid_argument);
  const std::vector<bf16> gb(n);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), gb.data(), m.data(), v.data(), n, 1,
                                    adamw_config{1e-3, 0.9, 0.999, -1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adam_step(p.data(), g.data(), m.data(), v.data(), n, 1,
                                   optim::adam_config{1e-3, 0.9, 0.999, -1.0, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::sgd_step(p.data(), g.data(), m.data(), n, 1,
                                  optim::sgd_config{0.1, 0.9, 0.5, 0.0, true}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::sgd_step(p.data(), g.data(), nullptr, n, 1,
                                  optim::sgd_config{0.1, 0.9, 0.0, 0.0, false}),
                  invalid_argument);
  CHECK_THROWS_AS(
      optim::lion_step(p.data(), g.data(), m.data(), n, optim::lion_config{1e-4, 0.9, 1.5, 0.0}),
      invalid_argument);
  try {
    optim::adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1,
                      adamw_config{-1e-3, 0.9, 0.999, 1e-8, 0.0});
  } catch (const invalid_argument& e) {
    CHECK(std::string(e.what()).find("'lr'") != std::string::npos);
  }
  CHECK(unchanged());
}
