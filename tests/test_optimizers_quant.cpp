// 8-bit and 4-bit optimizer state: codebooks against the published construction, nearest-code
// lookup against brute force on every arch, each step against a double reference of the same
// algorithm (dequantize, update, requantize) over 100 steps, state bytes per parameter, bitwise
// 1 vs 2 threads, no allocation, bad input.
#include <catch2/catch.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/optimizers/fused.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "reference/common.hpp"
#include "reference/optimizers_reference.hpp"
#include "support/arch.hpp"

using namespace lowmem;
namespace k = lowmem::optim::kernels;

TEST_CASE("codebooks match bitsandbytes / torchao constructions", "[optimizers][quant]") {
  struct spec {
    const k::codebook* cb;
    bool is_signed;
    int e, bits;
  };
  for (const spec& s :
       {spec{&k::signed_dynamic8(), true, 7, 8}, spec{&k::unsigned_dynamic8(), false, 7, 8},
        spec{&k::signed_dynamic4(), true, 3, 4}}) {
    const auto want = ref::dynamic_map(s.is_signed, s.e, s.bits);
    REQUIRE(s.cb->size == int(want.size()));
    REQUIRE(s.cb->size == (1 << s.bits));
    double err = 0;
    for (int i = 0; i < s.cb->size; ++i)
      err = std::max(err, std::fabs(s.cb->values[i] - want[std::size_t(i)]) /
                              std::max(1e-30, std::fabs(want[std::size_t(i)])));
    CHECK(err < 1e-6);                     // float rounding of the published double construction
    CHECK(s.cb->max_mids_per_bucket <= 2); // the scalar two-compare lookup is exact
  }
  // values printed by bitsandbytes' create_dynamic_map (torch float32 construction)
  const auto& s8 = k::signed_dynamic8();
  CHECK(s8.values[0] == Approx(-0.992968738079071).epsilon(1e-6));
  CHECK(s8.values[1] == Approx(-0.9789062142372131).epsilon(1e-6));
  CHECK(s8.values[126] == Approx(-5.500000384017767e-07).epsilon(1e-6));
  CHECK(s8.values[127] == 0.0f);
  CHECK(s8.values[129] == Approx(3.250000190746505e-06).epsilon(1e-6));
  CHECK(s8.values[255] == 1.0f);
  const auto& u8 = k::unsigned_dynamic8();
  CHECK(u8.values[0] == 0.0f);
  CHECK(u8.values[1] == Approx(3.2500003044333425e-07).epsilon(1e-6));
  CHECK(u8.values[3] == Approx(2.1249998098937795e-06).epsilon(1e-6));
  CHECK(u8.values[254] == Approx(0.9964843988418579).epsilon(1e-6));
  const auto& s4 = k::signed_dynamic4();
  const double s4_published[16] = {-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325,
                                   -0.0055, 0.0,     0.0055,  0.0325,  0.0775,  0.2125,
                                   0.4375,  0.6625,  0.8875,  1.0};
  for (int i = 0; i < 16; ++i) CHECK(s4.values[i] == Approx(s4_published[i]).epsilon(1e-6));
  const auto& u4 = k::unsigned_linear4();
  for (int i = 0; i < 16; ++i) CHECK(u4.values[i] == float((i + 1) / 16.0)); // no zero
}

LOWMEM_ARCH_TEST_CASE("nearest-code lookup equals brute force", "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const k::codebook* cb : {&k::signed_dynamic8(), &k::unsigned_dynamic8(),
                                &k::signed_dynamic4(), &k::unsigned_linear4()}) {
    std::vector<float> x;
    const random::stream s{5, 1};
    for (std::size_t i = 0; i < 20000; ++i) {
      x.push_back(2 * s.uniform(i) - 1); // uniform
      x.push_back((s.uniform(i + (1u << 20)) < 0.5f ? -1 : 1) * (1 + s.uniform(i + (3u << 20))) *
                  std::ldexp(1.0f, -int(30 * s.uniform(i + (2u << 20))))); // log-uniform
      x.push_back(std::ldexp(1.0f, -int(i % 30)));                         // powers of two
    }
    for (int j = 0; j + 1 < cb->size; ++j) // just around every midpoint
      for (float d : {-1.0f, 1.0f}) x.push_back(std::nextafter(cb->mid[j], d * 10.0f));
    x.push_back(0.0f);
    x.push_back(-0.0f);
    x.push_back(1.0f);
    x.push_back(-1.0f);
    x.push_back(1e-30f);
    std::vector<std::int32_t> q(x.size());
    k::nearest_codes<Arch>(*cb, x.data(), 1.0f, x.size(), q.data());
    std::size_t bad = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const int want = ref::nearest_code(cb->values, cb->size, x[i]);
      // ties: the decision boundary is a float (fma(c1, j, c0) or a float mean, within 2 ulp of
      // the exact midpoint of the two float codes), so x that close to a midpoint may take either
      const bool ok = q[std::size_t(i)] == want ||
                      std::fabs(std::fabs(x[i] - cb->values[q[i]]) -
                                std::fabs(x[i] - cb->values[want])) <= 6e-7 * std::fabs(x[i]);
      if (!ok) ++bad;
      if (cb->nearest(x[i]) != q[i]) ++bad; // scalar and vector agree
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("decision boundaries lie between their codes, near the exact midpoints",
          "[optimizers][quant]") {
  for (const k::codebook* cb : {&k::signed_dynamic8(), &k::unsigned_dynamic8(),
                                &k::signed_dynamic4(), &k::unsigned_linear4()}) {
    double worst = 0;
    bool ordered = true;
    for (int j = 0; j + 1 < cb->size; ++j) {
      ordered = ordered && cb->values[j] < cb->mid[j] && cb->mid[j] < cb->values[j + 1];
      const double exact = 0.5 * (double(cb->values[j]) + double(cb->values[j + 1]));
      worst = std::max(worst, std::fabs(cb->mid[j] - exact) / std::fabs(exact));
    }
    CHECK(ordered);
    CHECK(worst < 3e-7); // float rounding of c0 + c1·j (or of the mean)
  }
  CHECK(k::signed_dynamic8().segmented);
  CHECK(k::unsigned_dynamic8().segmented);
}

namespace {
// Encoder inputs: a strided sweep of float bit patterns over [0, 2) of both signs, the
// boundaries and their float neighbours, the codes, and the edge cases.
std::vector<float> encoder_inputs(const k::codebook& cb, std::uint32_t stride) {
  std::vector<float> x;
  for (std::uint32_t u = 0; u < 0x40000000u; u += stride)
    for (std::uint32_t sgn : {0u, 0x80000000u}) {
      const std::uint32_t b = u | sgn;
      float f;
      std::memcpy(&f, &b, 4);
      x.push_back(f);
    }
  for (int j = 0; j + 1 < cb.size; ++j)
    for (float v : {cb.mid[j], cb.values[j]})
      for (float to : {-10.0f, 10.0f}) {
        x.push_back(v);
        x.push_back(-v);
        x.push_back(std::nextafter(v, to));
        x.push_back(std::nextafter(std::nextafter(v, to), to));
      }
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, std::nextafter(1.0f, 2.0f), 2.0f, 1e30f,
                  std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), 1e-40f, inf})
    for (float s : {1.0f, -1.0f}) x.push_back(s * v);
  return x;
}
} // namespace

LOWMEM_ARCH_TEST_CASE("vector encoder equals the scalar boundary count bit for bit",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const k::codebook* cb : {&k::signed_dynamic8(), &k::unsigned_dynamic8()}) {
    const auto x = encoder_inputs(*cb, 4099);
    std::vector<std::int32_t> q(x.size());
    k::nearest_codes<Arch>(*cb, x.data(), 1.0f, x.size(), q.data());
    std::size_t bad = 0;
    for (std::size_t i = 0; i < x.size(); ++i) bad += q[i] != cb->nearest(x[i]);
    CHECK(bad == 0);
    // NaN: some valid code (a NaN moment means the run diverged)
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::uint32_t nb = 0xFFFFFFFFu;
    float neg_nan;
    std::memcpy(&neg_nan, &nb, 4);
    std::vector<float> nans(16, nan);
    nans[3] = -nan;
    nans[7] = neg_nan;
    k::nearest_codes<Arch>(*cb, nans.data(), 1.0f, nans.size(), q.data());
    bool valid = true;
    for (std::size_t i = 0; i < nans.size(); ++i) valid = valid && q[i] >= 0 && q[i] < 256;
    CHECK(valid);
  }
}

// Every float bit pattern (4 × 2^32 encodes; a few seconds in Release): run by hand with
// `test_optimizers_quant "[.exhaustive]"`.
TEST_CASE("vector encoder equals the scalar count on every float", "[.exhaustive]") {
  using Arch = simd::default_arch;
  std::vector<float> x(1 << 20);
  std::vector<std::int32_t> q(x.size());
  for (const k::codebook* cb : {&k::signed_dynamic8(), &k::unsigned_dynamic8()}) {
    std::size_t bad = 0;
    for (std::uint64_t base = 0; base < (std::uint64_t(1) << 32); base += x.size()) {
      for (std::size_t i = 0; i < x.size(); ++i) {
        const std::uint32_t b = std::uint32_t(base + i);
        std::memcpy(&x[i], &b, 4);
      }
      k::nearest_codes<Arch>(*cb, x.data(), 1.0f, x.size(), q.data());
      for (std::size_t i = 0; i < x.size(); ++i)
        bad += !std::isnan(x[i]) && q[i] != cb->nearest(x[i]);
    }
    CHECK(bad == 0);
  }
}

LOWMEM_ARCH_TEST_CASE("quantize_group stores the nearest codes and dequantizes them exactly",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (int bits : {8, 4}) {
    for (int mo = 0; mo < 2; ++mo) {
      const std::size_t n = 2 * k::group_size + 77;
      optim::quantized_state st(n, bits, 2);
      k::qmoment_view q = st.view(mo);
      auto x = ref::uniform_data(n, 60 + std::uint64_t(mo), mo ? 0.f : -1.f, 1.f);
      for (std::size_t i = 0; i < n; i += 3) x[i] *= 1e-4f; // small values in every block
      std::vector<float> back(n);
      std::size_t bad = 0;
      for (std::size_t b = 0; b < n; b += k::group_size) {
        const std::size_t len = std::min(k::group_size, n - b);
        if (bits == 8)
          k::quantize_group<Arch, 8>(x.data() + b, b, len, q);
        else
          k::quantize_group<Arch, 4>(x.data() + b, b, len, q);
        if (bits == 8)
          k::dequantize_group<Arch, 8>(q, b, len, back.data() + b);
        else
          k::dequantize_group<Arch, 4>(q, b, len, back.data() + b);
        const std::size_t B = bits == 8 ? 256 : 128;
        for (std::size_t i = b; i < b + len; ++i) {
          const float s = q.group_scale[i / k::group_size] * k::pow2_eighths()[q.block_exp[i / B]];
          const int want = q.cb->nearest(x[i] * (1.0f / s));
          bad += back[i] != q.cb->values[want] * s;
        }
      }
      INFO("bits=" << bits << " moment=" << mo);
      CHECK(bad == 0);
    }
  }
}

namespace {

// One step of the quantized algorithm in double from the state as stored: dequantize (same float
// scale), AdamW/Lion update in double, and the exact (unquantized) new moments.
struct step_check {
  double p_err = 0, state_err = 0, code_mismatch = 0;
};

void check_block_scales(const k::qmoment_view& q, std::size_t n, int bits, const float* newval,
                        bool& ok) {
  const std::size_t B = bits == 8 ? 256 : 128;
  const float* t = k::pow2_eighths();
  for (std::size_t b = 0; b * B < n; ++b) {
    double amax = 0;
    for (std::size_t j = b * B; j < std::min(n, (b + 1) * B); ++j)
      amax = std::max(amax, std::fabs(double(newval[j])));
    const double S = q.group_scale[b * B / k::group_size];
    const double s = double(float(S * t[q.block_exp[b]]));
    // the block scale covers the block's absmax and uses at least 2^(-1/8) of the range
    // (amax from the double reference: allow float rounding of the kernel's absmax)
    if (amax > 0 && !(s >= amax * (1 - 1e-6) &&
                      (q.block_exp[b] == 255 || s * std::exp2(-1.0 / 8) < amax * (1 + 1e-6))))
      ok = false;
  }
}

} // namespace

LOWMEM_ARCH_TEST_CASE("8/4-bit AdamW and Lion match the double reference step by step",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (int bits : {8, 4}) {
    for (bool lion : {false, true}) {
      if (lion && bits == 4) continue;
      for (std::size_t n : {std::size_t(4096), std::size_t(2048 * 3 + 131)}) {
        const int moments = lion ? 1 : 2;
        optim::quantized_state st(n, bits, moments);
        REQUIRE(st.quantized());
        auto p = ref::uniform_data(n, 20);
        std::vector<float> m0(n), v0(n), m1(n), v1(n);
        double worst_p = 0, worst_state = 0;
        std::size_t mismatched = 0, total = 0;
        bool scales_ok = true;
        for (std::int64_t t = 1; t <= 100; ++t) {
          auto g = ref::uniform_data(n, 2000 + std::uint64_t(t), -1.f, 1.f);
          for (std::size_t i = 0; i < n; ++i) g[i] *= 1.0f + 100.0f * float(i % 7 == 0); // spread
          st.dequantize(0, m0.data());
          if (!lion) st.dequantize(1, v0.data());
          std::vector<double> rp(p.begin(), p.end()), rm(m0.begin(), m0.end()),
              rv(v0.begin(), v0.end());
          if (lion) {
            ref::lion_step(rp.data(), g.data(), rm.data(), n, 1e-3, 0.9, 0.99, 0.1);
            optim::lion_step<Arch>(p.data(), g.data(), st, n, {1e-3, 0.9, 0.99, 0.1});
          } else {
            ref::adam_step(rp.data(), g.data(), rm.data(), rv.data(), n, t,
                           {1e-2, 0.9, 0.99, 1e-8, 0.1, true});
            optim::adamw_step<Arch>(p.data(), g.data(), st, n, t, {1e-2, 0.9, 0.99, 1e-8, 0.1});
          }
          worst_p = std::max(worst_p, ref::max_rel_error(p.data(), rp.data(), n));
          st.dequantize(0, m1.data());
          if (!lion) st.dequantize(1, v1.data());
          // requantization error: |deq - exact| <= half the largest code gap × block scale
          for (int mo = 0; mo < moments; ++mo) {
            const auto& q = st.view(mo);
            const std::vector<double>& exact = mo == 0 ? rm : rv;
            const float* deq = mo == 0 ? m1.data() : v1.data();
            std::vector<float> ex(exact.begin(), exact.end());
            check_block_scales(q, n, bits, ex.data(), scales_ok);
            double gap = 0;
            for (int j = 0; j + 1 < q.cb->size; ++j)
              gap = std::max(gap, double(q.cb->values[j + 1] - q.cb->values[j]));
            const std::size_t B = bits == 8 ? 256 : 128;
            for (std::size_t i = 0; i < n; ++i) {
              const double s =
                  q.group_scale[i / k::group_size] * k::pow2_eighths()[q.block_exp[i / B]];
              // 4-bit v: codes start at 1/16, so values below s/32 round up to s/16
              const double bound =
                  (mo == 1 && bits == 4 ? std::max(gap / 2, 1.0 / 16) : gap / 2) * s;
              worst_state =
                  std::max(worst_state, std::fabs(deq[i] - exact[i]) / (bound * 1.0001 + 1e-30));
              // and the code is the nearest one to the exact value (ties/rounding aside)
              // (the scalar lookup, checked against brute force above)
              const int want = q.cb->nearest(s > 0 ? float(exact[i] / s) : 0.0f);
              const int got = q.cb->nearest(s > 0 ? float(deq[i] / s) : 0.0f);
              mismatched += want != got;
              ++total;
            }
          }
        }
        INFO("bits=" << bits << " lion=" << lion << " n=" << n);
        CHECK(worst_p < 1e-6);     // the update is exact on the dequantized state
        CHECK(worst_state <= 1.0); // stored state within half a code gap of the exact state
        CHECK(scales_ok);
        CHECK(double(mismatched) / double(total) < 1e-3); // nearest code but float/double ties
      }
    }
  }
}

LOWMEM_ARCH_TEST_CASE("8/4-bit AdamW with bf16 gradients equals the widened fp32 path bitwise",
                      "[optimizers][quant][bf16]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (int bits : {8, 4}) {
    const std::size_t n = 2048 * 2 + 131;
    optim::quantized_state a(n, bits, 2), b(n, bits, 2), c(n, bits, 2), d(n, bits, 2);
    auto p = ref::uniform_data(n, 70), p2 = p;
    std::vector<bf16> pb(n), pb2(n);
    for (std::size_t i = 0; i < n; ++i) pb[i] = pb2[i] = to_bf16(p[i]);
    bool same = true;
    for (std::int64_t t = 1; t <= 5; ++t) {
      const auto g32 = ref::uniform_data(n, 7000 + std::uint64_t(t), -1.f, 1.f);
      std::vector<bf16> g(n);
      std::vector<float> gw(n);
      for (std::size_t i = 0; i < n; ++i) g[i] = to_bf16(g32[i]), gw[i] = to_float(g[i]);
      optim::adamw_step<Arch>(p.data(), g.data(), a, n, t, {});
      optim::adamw_step<Arch>(p2.data(), gw.data(), b, n, t, {});
      const random::stream rs{6, std::uint64_t(t)};
      optim::adamw_step<Arch>(pb.data(), g.data(), c, n, t, {}, rs);
      optim::adamw_step<Arch>(pb2.data(), gw.data(), d, n, t, {}, rs);
      same = same && ref::bitwise_equal(p.data(), p2.data(), n);
      for (std::size_t i = 0; i < n; ++i) same = same && pb[i].bits == pb2[i].bits;
    }
    std::vector<float> x(n), y(n);
    for (int mo = 0; mo < 2; ++mo) {
      a.dequantize(mo, x.data());
      b.dequantize(mo, y.data());
      same = same && ref::bitwise_equal(x.data(), y.data(), n);
    }
    INFO("bits=" << bits);
    CHECK(same);
  }
}

LOWMEM_ARCH_TEST_CASE("quantize_group codes exact boundaries like the scalar lookup",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (int bits : {8, 4}) {
    for (int mo = 0; mo < 2; ++mo) {
      optim::quantized_state st(k::group_size, bits, 2, 0);
      k::qmoment_view q = st.view(mo);
      // block scale 1 (the group max is 1 and every block holds a 1): boundaries, their float
      // neighbours and the codes themselves hit exactly
      std::vector<float> x;
      while (x.size() < k::group_size) {
        if (x.size() % 128 == 0) x.push_back(1.0f);
        for (int j = 0; j + 1 < q.cb->size && x.size() < k::group_size; ++j)
          for (float v : {q.cb->mid[j], std::nextafter(q.cb->mid[j], 2.0f),
                          std::nextafter(q.cb->mid[j], -2.0f), q.cb->values[j]})
            if (x.size() < k::group_size && x.size() % 128 != 0) x.push_back(v);
      }
      if (bits == 8)
        k::quantize_group<Arch, 8>(x.data(), 0, x.size(), q);
      else
        k::quantize_group<Arch, 4>(x.data(), 0, x.size(), q);
      std::size_t bad = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        const unsigned code = bits == 8 ? q.codes[i] : (q.codes[i / 2] >> (4 * (i & 1))) & 15u;
        bad += int(code) != q.cb->nearest(x[i]);
      }
      INFO("bits=" << bits << " moment=" << mo);
      CHECK(q.group_scale[0] == 1.0f);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("quantized state bytes per parameter", "[optimizers][quant][memory]") {
  const std::size_t n = std::size_t(1) << 20;
  optim::quantized_state s8(n, 8, 2), s4(n, 4, 2), l8(n, 8, 1), small(4095, 8, 2);
  CHECK(double(s8.bytes()) / double(n) <= 2.02);
  CHECK(double(s4.bytes()) / double(n) <= 1.02);
  CHECK(double(l8.bytes()) / double(n) <= 1.01);
  CHECK(!small.quantized());
  CHECK(small.bytes() == 4095 * 8); // fp32 AdamW state below bitsandbytes' min_8bit_size
  optim::quantized_state odd(4097, 4, 2);
  CHECK(odd.quantized());
}

TEST_CASE("quantized steps: bitwise 1 vs 2 threads, no allocation", "[optimizers][quant]") {
  REQUIRE(memory::tracking_enabled());
  const std::size_t n = 2048 * 150 + 77;
  for (int bits : {8, 4}) {
    optim::quantized_state a(n, bits, 2), b(n, bits, 2), la(n, 8, 1), lb(n, 8, 1);
    auto pa = ref::uniform_data(n, 30), pb = pa;
    std::vector<bf16> qa(n), qb(n);
    for (std::size_t i = 0; i < n; ++i) qa[i] = qb[i] = to_bf16(pa[i]);
    optim::quantized_state ba(n, bits, 2), bb(n, bits, 2);
    for (std::int64_t t = 1; t <= 3; ++t) {
      const auto g = ref::uniform_data(n, 3000 + std::uint64_t(t));
      memory::region r;
      optim::adamw_step(pa.data(), g.data(), a, n, t, {}, 1);
      optim::adamw_step(pb.data(), g.data(), b, n, t, {}, 2);
      optim::lion_step(pa.data(), g.data(), la, n, {}, 1);
      optim::lion_step(pb.data(), g.data(), lb, n, {}, 2);
      optim::adamw_step(qa.data(), g.data(), ba, n, t, {}, random::stream{2, std::uint64_t(t)}, 1);
      optim::adamw_step(qb.data(), g.data(), bb, n, t, {}, random::stream{2, std::uint64_t(t)}, 2);
      // step 1 may start the OpenMP thread pool (libgomp allocates it on first use)
      if (t > 1) CHECK(r.allocations() == 0);
    }
    CHECK(ref::bitwise_equal(pa.data(), pb.data(), n));
    std::vector<float> x(n), y(n);
    for (int mo = 0; mo < 2; ++mo) {
      a.dequantize(mo, x.data());
      b.dequantize(mo, y.data());
      CHECK(ref::bitwise_equal(x.data(), y.data(), n));
    }
    bool same = true;
    for (std::size_t i = 0; i < n; ++i) same = same && qa[i].bits == qb[i].bits;
    CHECK(same);
  }
}

TEST_CASE("small tensors keep fp32 state and match fp32 AdamW bitwise", "[optimizers][quant]") {
  const std::size_t n = 1000;
  optim::quantized_state s(n, 8, 2);
  auto p = ref::uniform_data(n, 40), p2 = p;
  std::vector<float> m(n, 0.f), v(n, 0.f);
  for (std::int64_t t = 1; t <= 5; ++t) {
    const auto g = ref::uniform_data(n, 4000 + std::uint64_t(t));
    optim::adamw_step(p.data(), g.data(), s, n, t, {});
    optim::adamw_step(p2.data(), g.data(), m.data(), v.data(), n, t, {});
  }
  CHECK(ref::bitwise_equal(p.data(), p2.data(), n));
}

TEST_CASE("quantized optimizers: bad input throws before any write",
          "[optimizers][quant][errors]") {
  const std::size_t n = 5000;
  optim::quantized_state s(n, 8, 2);
  auto p = ref::uniform_data(n, 50);
  const auto p0 = p;
  const auto g = ref::uniform_data(n, 51);
  optim::adamw_step(p.data(), g.data(), s, n, 1, {}); // non-trivial state
  std::vector<float> m_before(n), m_after(n);
  s.dequantize(0, m_before.data());
  const auto p1 = p;
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), s, n - 1, 2, {}), invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), s, n, 2,
                                    optim::adamw_config{-1.0, 0.9, 0.999, 1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::adamw_step(p.data(), g.data(), s, n, 2,
                                    optim::adamw_config{1e-3, 0.9, 1.0, 1e-8, 0.0}),
                  invalid_argument);
  CHECK_THROWS_AS(optim::lion_step(p.data(), g.data(), s, n, {}), invalid_argument); // 2 moments
  CHECK_THROWS_AS(optim::quantized_state(n, 3, 2), invalid_argument);
  s.dequantize(0, m_after.data());
  CHECK(ref::bitwise_equal(p.data(), p1.data(), n));
  CHECK(ref::bitwise_equal(m_before.data(), m_after.data(), n));
}

/// Six steps of `fused(p, g, state, t)` (a public step: the VBMI two-pass kernel where compiled)
/// against quantized_dispatch's generic dequantize / span / quantize path (span_of(t): the step's
/// span) from the same parameters and state, `moments` 2 (AdamW) or 1 (Lion): true when the
/// parameters, codes, block bytes and group scales are identical after every step (partial last
/// group included).
template <class Arch, class Fused, class SpanOf>
bool fused_matches_generic(int bits, int moments, std::size_t n, std::uint64_t seed, Fused&& fused,
                           SpanOf&& span_of) {
  optim::quantized_state a(n, bits, moments), b(n, bits, moments);
  auto p = ref::uniform_data(n, seed), p2 = p;
  bool same = true;
  for (std::int64_t t = 1; t <= 6; ++t) {
    auto g = ref::uniform_data(n, 100 * seed + std::uint64_t(t), -1.f, 1.f);
    for (std::size_t i = 0; i < n; i += 97) g[i] *= 1e4f; // blocks with different scales
    for (std::size_t i = 5; i < n; i += 89) g[i] = 0.0f;  // Lion: sign(0) = 0 on a zero moment
    fused(p.data(), g.data(), a, t);
    const auto span = span_of(t);
    if (bits == 8)
      optim::detail::quantized_dispatch<Arch, 8>(p2.data(), g.data(), b, n, nullptr, 1, span);
    else
      optim::detail::quantized_dispatch<Arch, 4>(p2.data(), g.data(), b, n, nullptr, 1, span);
    same = same && ref::bitwise_equal(p.data(), p2.data(), n);
    for (int mo = 0; mo < moments; ++mo) {
      const auto &x = a.view(mo), &y = b.view(mo);
      const std::size_t B = bits == 8 ? 256 : 128;
      same = same && std::memcmp(x.codes, y.codes, bits == 8 ? n : (n + 1) / 2) == 0 &&
             std::memcmp(x.block_exp, y.block_exp, (n + B - 1) / B) == 0 &&
             std::memcmp(x.group_scale, y.group_scale, 4 * ((n + 2047) / 2048)) == 0;
    }
  }
  return same;
}

LOWMEM_ARCH_TEST_CASE("8/4-bit AdamW fused two-pass kernel equals the generic group path bitwise",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const optim::adamw_config cfg{1e-2, 0.9, 0.99, 1e-8, 0.1};
  for (int bits : {8, 4})
    for (std::size_t n : {std::size_t(4096), std::size_t(2048 * 3 + 131)}) {
      INFO("bits=" << bits << " n=" << n);
      CHECK(fused_matches_generic<Arch>(
          bits, 2, n, 90,
          [&](float* p, const float* g, optim::quantized_state& s, std::int64_t t) {
            optim::adamw_step<Arch>(p, g, s, n, t, cfg);
          },
          [&](std::int64_t t) {
            const auto c = optim::detail::adam_coeffs(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps,
                                                      cfg.weight_decay, true, t);
            return [c](float* pp, const float* gg, float* mm, float* vv, std::size_t k) {
              k::adam_span<Arch, false>(pp, gg, mm, vv, k, c);
            };
          }));
    }
}

LOWMEM_ARCH_TEST_CASE("8/4-bit Lion fused two-pass kernel equals the generic group path bitwise",
                      "[optimizers][quant]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const optim::lion_config cfg{1e-3, 0.9, 0.99, 0.1};
  k::lion_coeffs c;
  c.decay = float(1 - cfg.lr * cfg.weight_decay), c.lr = float(cfg.lr);
  c.beta1 = float(cfg.beta1), c.one_minus_beta1 = float(1 - cfg.beta1);
  c.beta2 = float(cfg.beta2), c.one_minus_beta2 = float(1 - cfg.beta2);
  const auto span = [&c](float* pp, const float* gg, float* mm, float*, std::size_t kk) {
    k::lion_span<Arch>(pp, gg, mm, kk, c);
  };
  for (int bits : {8, 4})
    for (std::size_t n : {std::size_t(4096), std::size_t(2048 * 3 + 131)}) {
      INFO("bits=" << bits << " n=" << n);
      CHECK(fused_matches_generic<Arch>(
          bits, 1, n, 91,
          [&](float* p, const float* g, optim::quantized_state& s, std::int64_t) {
            optim::lion_step<Arch>(p, g, s, n, cfg);
          },
          [&](std::int64_t) { return span; }));
    }
}
