// Storage formats: affine int8/int4 (RNE + stochastic), NF4/FP4 + double quantization, FP8.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>
#include <lowmem/quant/formats.hpp>

#include <cmath>
#include <vector>

#include "reference/common.hpp"
#include "reference/quant_reference.hpp"
#include "support/arch.hpp"

using namespace lowmem;
using namespace lowmem::quant;

namespace {
std::vector<affine_format> all_affine_formats() {
  std::vector<affine_format> v;
  for (int bits : {8, 4})
    for (bool sym : {true, false}) {
      v.push_back({bits, sym, granularity::per_tensor, 0});
      v.push_back({bits, sym, granularity::per_row, 0});
      for (index_t g : {32, 64, 128}) v.push_back({bits, sym, granularity::per_group, g});
    }
  return v;
}
// A tensor with a spread of magnitudes and some exact zeros.
std::vector<float> test_data(std::size_t n, std::uint64_t id) {
  auto v = ref::uniform_data(n, id, -2.f, 3.f);
  for (std::size_t i = 0; i < n; i += 7) v[i] *= 0.01f;
  for (std::size_t i = 3; i < n; i += 29) v[i] = 0.f;
  return v;
}
} // namespace

LOWMEM_ARCH_TEST_CASE("affine RNE codes equal the reference; error <= half a step",
                      "[quant][affine]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (const affine_format& f : all_affine_formats()) {
    std::vector<std::pair<index_t, index_t>> shapes = {{1, 128}, {3, 384}, {2, 256}};
    if (f.gran != granularity::per_group)
      for (std::size_t c : test::tail_sizes<Arch>()) shapes.push_back({3, index_t(c)});
    for (auto [rows, cols] : shapes) {
      const std::size_t n = static_cast<std::size_t>(rows * cols);
      const auto x = test_data(n, std::uint64_t(cols));
      const index_t nb = affine_num_blocks(rows, cols, f);
      const std::size_t B = n ? (n + nb - 1) / static_cast<std::size_t>(nb) : 1;
      std::vector<std::uint8_t> codes(affine_code_bytes(rows, cols, f) + 1, 0xAB);
      std::vector<float> scales(static_cast<std::size_t>(nb)), zeros(static_cast<std::size_t>(nb)),
          y(n);
      affine_quantize<Arch>(x.data(), rows, cols, f, codes.data(), scales.data(), zeros.data());
      CHECK(codes.back() == 0xAB); // nothing written past the end
      affine_dequantize<Arch>(codes.data(), scales.data(), zeros.data(), rows, cols, f, y.data());
      const auto r = ref::affine_quantize_ref(x.data(), n, B, f.bits, f.symmetric);
      INFO("bits " << f.bits << " sym " << f.symmetric << " gran " << int(f.gran) << " group "
                   << f.group << " shape " << rows << "x" << cols);
      for (std::size_t b = 0; b < static_cast<std::size_t>(nb); ++b) {
        REQUIRE(scales[b] == r.scale[b]);
        if (!f.symmetric) REQUIRE(zeros[b] == r.zero[b]);
      }
      for (std::size_t i = 0; i < n; ++i) {
        std::int32_t q;
        if (f.bits == 8)
          q = f.symmetric ? std::int32_t(std::int8_t(codes[i])) : std::int32_t(codes[i]);
        else
          q = ref::nibble(codes.data(), i);
        q -= f.symmetric ? (f.bits == 8 ? 0 : 8) : std::int32_t(zeros[i / B]);
        REQUIRE(q == r.q[i]);
        const double s = scales[i / B];
        REQUIRE(std::fabs(double(y[i]) - x[i]) <= 0.5 * s * (1 + 1e-5) + 1e-7 * std::fabs(x[i]));
      }
      if (f.bits == 4 && n % 2 == 1) CHECK((codes[n / 2] & 0x0F) == 0); // odd length padding
    }
  }
}

TEST_CASE("int4 packing: element 2i in the high nibble, odd lengths, blocks straddling bytes",
          "[quant][affine][packing]") {
  // per-row with odd cols: blocks start in the middle of a byte
  const index_t rows = 3, cols = 5;
  std::vector<float> x(15);
  const float row[5] = {-2.f, -0.9f, 0.f, 1.2f, 2.f};
  for (int i = 0; i < 15; ++i) x[static_cast<std::size_t>(i)] = row[i % 5];
  affine_format f{4, true, granularity::per_row, 0};
  std::vector<std::uint8_t> codes(8, 0xFF);
  std::vector<float> scales(3);
  affine_quantize(x.data(), rows, cols, f, codes.data(), scales.data(), nullptr);
  // row scale = 2/7; codes = rne(v·3.5) + 8 = {1, 5 (−3.15), 8, 12 (4.2), 15}
  const int expect_row[5] = {1, 5, 8, 12, 15};
  for (std::size_t i = 0; i < 15; ++i) CHECK(ref::nibble(codes.data(), i) == expect_row[i % 5]);
  CHECK(codes[0] == ((1 << 4) | 5));
  CHECK((codes[7] & 0x0F) == 0);
  // a round trip at every odd length up to 41 (per-tensor)
  for (index_t n = 1; n <= 41; n += 2) {
    auto v = ref::uniform_data(static_cast<std::size_t>(n), std::uint64_t(n));
    std::vector<std::uint8_t> c(static_cast<std::size_t>((n + 1) / 2));
    float s;
    affine_format ft{4, false, granularity::per_tensor, 0};
    float z;
    affine_quantize(v.data(), 1, n, ft, c.data(), &s, &z);
    std::vector<float> y(static_cast<std::size_t>(n));
    affine_dequantize(c.data(), &s, &z, 1, n, ft, y.data());
    for (index_t i = 0; i < n; ++i)
      REQUIRE(std::fabs(y[static_cast<std::size_t>(i)] - v[static_cast<std::size_t>(i)]) <=
              0.5f * s * 1.0001f);
  }
}

LOWMEM_ARCH_TEST_CASE("stochastic rounding is unbiased and picks a neighbour", "[quant][affine]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const index_t cols = 64 + 3;
  const auto x = test_data(static_cast<std::size_t>(cols), 11);
  for (int bits : {8, 4}) {
    affine_format f{bits, true, granularity::per_row, 0};
    const int trials = 4000;
    std::vector<double> mean(static_cast<std::size_t>(cols), 0.0);
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(cols));
    std::vector<float> y(static_cast<std::size_t>(cols));
    float s = 0;
    for (int t = 0; t < trials; ++t) {
      affine_quantize<Arch>(x.data(), 1, cols, f, codes.data(), &s, nullptr, rounding::stochastic,
                            random::stream{77, std::uint64_t(t)});
      affine_dequantize<Arch>(codes.data(), &s, nullptr, 1, cols, f, y.data());
      for (index_t i = 0; i < cols; ++i) {
        REQUIRE(std::fabs(y[static_cast<std::size_t>(i)] - x[static_cast<std::size_t>(i)]) <
                s * 1.0001f);
        mean[static_cast<std::size_t>(i)] += y[static_cast<std::size_t>(i)] / trials;
      }
    }
    // per-element variance <= s²/4: 5 sigma bound on the mean
    for (index_t i = 0; i < cols; ++i)
      CHECK(std::fabs(mean[static_cast<std::size_t>(i)] - x[static_cast<std::size_t>(i)]) <=
            5 * 0.5 * s / std::sqrt(double(trials)) + 1e-6);
  }
}

TEST_CASE("NF4 levels match the QLoRA construction from normal quantiles", "[quant][nf4]") {
  // bitsandbytes create_normal_map(offset = 0.9677083): 8 positive quantiles of
  // linspace(offset, 0.5, 9)[:-1], 7 negative of linspace(offset, 0.5, 8)[:-1], and 0, over max.
  auto ppf = [](double p) { // inverse standard normal CDF by bisection on erfc
    double lo = -10, hi = 10;
    for (int it = 0; it < 200; ++it) {
      const double mid = 0.5 * (lo + hi);
      (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
  };
  const double offset = 0.9677083;
  std::vector<double> v;
  for (int k = 0; k < 8; ++k) v.push_back(ppf(offset + (0.5 - offset) * k / 8.0));
  for (int k = 0; k < 7; ++k) v.push_back(-ppf(offset + (0.5 - offset) * k / 7.0));
  v.push_back(0.0);
  std::sort(v.begin(), v.end());
  const double mx = v.back();
  for (int k = 0; k < 16; ++k)
    CHECK(std::fabs(v[static_cast<std::size_t>(k)] / mx - kernels::nf4_levels[k]) < 2e-6);
  // FP4 e2m1: the 8 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} from (exponent, mantissa), bias 1
  for (int c = 0; c < 16; ++c) {
    const int e = (c >> 1) & 3, m = c & 1;
    const double mag = e == 0 ? 0.5 * m : std::ldexp(1.0 + 0.5 * m, e - 1);
    CHECK(kernels::fp4_levels[c] == float(((c & 8) ? -mag : mag) / 6.0));
  }
}

LOWMEM_ARCH_TEST_CASE("NF4/FP4 codes are the nearest level; round trip; tails and odd blocks",
                      "[quant][nf4]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  for (fourbit t : {fourbit::nf4, fourbit::fp4}) {
    const float* levels = fourbit_levels(t);
    for (index_t block : {64, 128, 32, 7}) {
      for (std::size_t n : test::tail_sizes<Arch>(1000 + 1)) {
        auto x = test_data(n, n + 5);
        const std::size_t nb = fourbit_num_blocks(n, block);
        std::vector<std::uint8_t> packed((n + 1) / 2 + 1, 0xCD);
        std::vector<float> absmax(nb), y(n);
        fourbit_quantize<Arch>(x.data(), n, t, block, packed.data(), absmax.data());
        CHECK(packed.back() == 0xCD);
        fourbit_dequantize<Arch>(packed.data(), absmax.data(), n, t, block, y.data());
        INFO("type " << int(t) << " block " << block << " n " << n);
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t b = i / static_cast<std::size_t>(block);
          double am = 0;
          for (std::size_t k = b * block; k < std::min(n, (b + 1) * block); ++k)
            am = std::max(am, std::fabs(double(x[k])));
          REQUIRE(absmax[b] == float(am));
          const int code = ref::nibble(packed.data(), i);
          const double v = am > 0 ? double(x[i]) / am : 0.0;
          REQUIRE(std::fabs(double(levels[code]) - ref::nearest_level(v, levels)) < 1e-7);
          REQUIRE(y[i] == levels[code] * absmax[b]);
        }
        if (n % 2) CHECK((packed[n / 2] & 0x0F) == 0);
      }
    }
  }
}

LOWMEM_ARCH_TEST_CASE("4-bit packed codes equal the scalar nearest-level count at every threshold "
                      "and cell edge",
                      "[quant][nf4]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  CHECK(kernels::nf4_codebook().cells_ok);     // NF4 takes the one-compare cell path
  CHECK(kernels::fp4_codebook().mag_cells_ok); // FP4 its magnitude-cell path
  CHECK(kernels::nf4_codebook().lut_ok);       // and both the byte-table path (AVX512-VBMI)
  CHECK(kernels::fp4_codebook().lut_ok);
  for (const kernels::codebook4* cb : {&kernels::nf4_codebook(), &kernels::fp4_codebook()}) {
    // values around every threshold and every 1/16 cell edge, a few ulps either side, plus ±1
    std::vector<float> v;
    auto around = [&](float c) {
      float a = c, b = c;
      for (int k = 0; k < 4; ++k) {
        v.push_back(a), v.push_back(b);
        a = std::nextafter(a, 2.f), b = std::nextafter(b, -2.f);
      }
    };
    for (int t = 0; t < 15; ++t) around(cb->mid[t]);
    for (int j = 0; j <= 32; ++j) around(float(-1.0 + j / 16.0));
    for (int j = 0; j <= 16; ++j) { // FP4's magnitude cell edges (j - 1/2)/16, both signs
      around(float((j - 0.5) / 16.0));
      around(float(-(j - 0.5) / 16.0));
    }
    for (int j = 0; j <= 32; ++j) { // byte-table cell edges (j - offset)/scale, both signs
      around((float(j) - cb->lut_offset) / cb->lut_scale);
      around(-(float(j) - cb->lut_offset) / cb->lut_scale);
    }
    v.push_back(-0.f); // sign-magnitude: -0 takes the code of +0
    auto r = ref::uniform_data(997, 77, -1.f, 1.f);
    v.insert(v.end(), r.begin(), r.end());
    for (float& e : v) e = std::min(1.f, std::max(-1.f, e));
    while (v.size() % 16) v.push_back(0.f);
    std::vector<std::uint8_t> packed(v.size() / 2), codes(v.size());
    if constexpr (kernels::has_packed_codebook_path<Arch>())
      kernels::codebook_codes_packed<Arch>(v.data(), v.size(), 1.0f, *cb, packed.data());
    else
      for (std::size_t i = 0; i < v.size(); i += 2)
        packed[i / 2] = std::uint8_t(kernels::codebook_code_scalar(v[i], *cb) << 4 |
                                     kernels::codebook_code_scalar(v[i + 1], *cb));
    kernels::codebook_codes<Arch>(v.data(), v.size(), 1.0f, *cb, codes.data());
    for (std::size_t i = 0; i < v.size(); ++i) {
      INFO("v " << v[i]);
      REQUIRE(ref::nibble(packed.data(), i) == kernels::codebook_code_scalar(v[i], *cb));
      REQUIRE(codes[i] == kernels::codebook_code_scalar(v[i], *cb));
    }
    // the fused block kernel (whole blocks of 64): 63 values and a 1 per block, so absmax = 1
    // and the kernel sees exactly v
    if (kernels::has_codebook_blocks_path<Arch>(*cb)) {
      std::vector<float> xb;
      for (std::size_t i = 0; i < v.size(); ++i) {
        xb.push_back(v[i]);
        if (xb.size() % 64 == 63) xb.push_back(1.f);
      }
      while (xb.size() % 64) xb.push_back(xb.size() % 64 == 63 ? 1.f : 0.f);
      std::vector<std::uint8_t> pb(xb.size() / 2);
      std::vector<float> am(xb.size() / 64);
      kernels::codebook_blocks64<Arch>(xb.data(), am.size(), 64, *cb, pb.data(), am.data());
      for (std::size_t i = 0; i < xb.size(); ++i) {
        INFO("fused, v " << xb[i]);
        REQUIRE(am[i / 64] == 1.f);
        REQUIRE(ref::nibble(pb.data(), i) == kernels::codebook_code_scalar(xb[i], *cb));
      }
    }
  }
}

LOWMEM_ARCH_TEST_CASE("4-bit quantize: blocks with absmax < 2^-128 (1/absmax = inf) follow the "
                      "scalar contract",
                      "[quant][nf4]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  // x·(1/absmax) is ±inf for nonzero x and NaN for zeros: every path must give the scalar codes
  const float tiny = std::numeric_limits<float>::denorm_min();
  for (fourbit t : {fourbit::nf4, fourbit::fp4}) {
    const kernels::codebook4& cb =
        t == fourbit::nf4 ? kernels::nf4_codebook() : kernels::fp4_codebook();
    for (index_t block : {64, 32}) {
      const std::size_t n = 256;
      std::vector<float> x(n);
      for (std::size_t i = 0; i < n; ++i) x[i] = i % 3 == 0 ? 0.f : (i % 3 == 1 ? tiny : -tiny);
      std::vector<std::uint8_t> packed(n / 2);
      std::vector<float> absmax(n / std::size_t(block));
      fourbit_quantize<Arch>(x.data(), n, t, block, packed.data(), absmax.data());
      const float inv = 1.0f / tiny;
      REQUIRE(std::isinf(inv));
      for (std::size_t i = 0; i < n; ++i) {
        INFO("type " << int(t) << " block " << block << " i " << i);
        REQUIRE(absmax[i / std::size_t(block)] == tiny);
        REQUIRE(ref::nibble(packed.data(), i) == kernels::codebook_code_scalar(x[i] * inv, cb));
      }
    }
  }
}

TEST_CASE("double quantization: <= 4.13 bits/param, bounded absmax error, NaN absmax throws",
          "[quant][nf4][double_quant]") {
  const std::size_t n = static_cast<std::size_t>(4096) * 4096;
  CHECK(fourbit_bits_per_param(n, 64, true) <= 4.13);
  CHECK(fourbit_bits_per_param(n, 64, false) == Approx(4.5));
  // a real tensor: NF4 of 64·1000+17 normals, then double-quantized scales
  const std::size_t m = 64 * 1000 + 17;
  std::vector<float> x(m);
  random::fill_normal(random::stream{3, 4}, 0, x.data(), m);
  const std::size_t nb = fourbit_num_blocks(m, 64);
  std::vector<std::uint8_t> packed((m + 1) / 2), qa(nb);
  std::vector<float> absmax(nb), gs(dq_num_groups(nb)), back(nb), y(m), y2(m);
  fourbit_quantize(x.data(), m, fourbit::nf4, 64, packed.data(), absmax.data());
  float mean = 0;
  double_quantize_absmax(absmax.data(), nb, qa.data(), gs.data(), &mean);
  double_dequantize_absmax(qa.data(), gs.data(), mean, nb, back.data());
  double s = 0;
  for (float a : absmax) s += a;
  CHECK(mean == Approx(s / double(nb)).epsilon(1e-6));
  for (std::size_t b = 0; b < nb; ++b) {
    const double dev = std::fabs(double(absmax[b]) - mean);
    const double g = gs[b / static_cast<std::size_t>(dq_group)];
    REQUIRE(std::fabs(double(back[b]) - absmax[b]) <=
            dev * 0.0625 + g * std::ldexp(1.0, -10) + 1e-6);
  }
  // the double-quantized tensor stays close to the single-quantized one (NMSE vs x)
  fourbit_dequantize(packed.data(), absmax.data(), m, fourbit::nf4, 64, y.data());
  fourbit_dequantize(packed.data(), back.data(), m, fourbit::nf4, 64, y2.data());
  const double e1 = ref::nmse(y.data(), x.data(), m), e2 = ref::nmse(y2.data(), x.data(), m);
  CHECK(e1 < 0.012); // NF4 on Gaussian data: ~0.01 NMSE
  CHECK(e2 < e1 * 1.05);
  // NaN absmax: throws before writing
  absmax[5] = std::nanf("");
  std::vector<std::uint8_t> qa2(nb, 0x11);
  std::vector<float> gs2(gs.size(), 9.f);
  float mean2 = 42.f;
  CHECK_THROWS_AS(double_quantize_absmax(absmax.data(), nb, qa2.data(), gs2.data(), &mean2),
                  lowmem::invalid_argument);
  CHECK(mean2 == 42.f);
  CHECK(std::all_of(qa2.begin(), qa2.end(), [](std::uint8_t c) { return c == 0x11; }));
  CHECK(std::all_of(gs2.begin(), gs2.end(), [](float c) { return c == 9.f; }));
}

TEST_CASE("FP8 e4m3/e5m2: all 256 codes decode per the OCP definition and re-encode exactly",
          "[quant][fp8]") {
  for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
    const int eb = f == fp8_format::e4m3 ? 4 : 5, mb = 7 - eb;
    for (int c = 0; c < 256; ++c) {
      const double ref_v = ref::fp8_value_ref(std::uint8_t(c), eb, mb);
      const float v = from_fp8(std::uint8_t(c), f);
      INFO("format e" << eb << "m" << mb << " code " << c);
      if (std::isnan(ref_v)) {
        CHECK(std::isnan(v));
        CHECK(std::isnan(from_fp8(to_fp8(v, f), f)));
        continue;
      }
      CHECK(double(v) == ref_v);
      if (std::isinf(ref_v)) {
        CHECK(to_fp8(v, f, false) == c); // Inf stays Inf without saturation
        CHECK(from_fp8(to_fp8(v, f, true), f) == std::copysign(57344.f, v)); // saturates
        continue;
      }
      CHECK(to_fp8(v, f) == c); // exact values re-encode to themselves (incl. -0 and subnormals)
    }
    CHECK(fp8_max(f) == float(ref::fp8_value_ref(f == fp8_format::e4m3 ? 0x7E : 0x7B, eb, mb)));
  }
  // e4m3 has no Inf: overflow saturates to 448 or gives NaN
  CHECK(to_fp8(1e6f, fp8_format::e4m3) == 0x7E);
  CHECK(to_fp8(-INFINITY, fp8_format::e4m3) == 0xFE);
  CHECK(to_fp8(1e6f, fp8_format::e4m3, false) == 0x7F);
  CHECK(to_fp8(INFINITY, fp8_format::e4m3, false) == 0x7F);
  CHECK(to_fp8(1e6f, fp8_format::e5m2, false) == 0x7C);
  CHECK(to_fp8(std::nanf(""), fp8_format::e4m3) == 0x7F);
}

TEST_CASE("FP8 rounding: nearest, ties to even, between every pair of neighbours", "[quant][fp8]") {
  for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
    const int maxc = f == fp8_format::e4m3 ? 0x7E : 0x7B;
    for (int c = 0; c < maxc; ++c) {
      const double a = from_fp8(std::uint8_t(c), f), b = from_fp8(std::uint8_t(c + 1), f);
      const double mid = 0.5 * (a + b);
      const int even = (c % 2 == 0) ? c : c + 1;
      CHECK(to_fp8(float(mid), f) == even);
      CHECK(to_fp8(float(-mid), f) == (even | 0x80));
      CHECK(to_fp8(std::nextafter(float(mid), 0.f), f) == c);
      CHECK(to_fp8(std::nextafter(float(mid), 1e30f), f) == c + 1);
    }
    // above max: the tie between max and the next (nonexistent) step rounds per saturate
    const double mx = fp8_max(f);
    CHECK(to_fp8(float(mx * 1.03), f, true) == maxc);
  }
}

LOWMEM_ARCH_TEST_CASE("FP8 array conversions equal the scalar ones on every arch", "[quant][fp8]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  // every code's value, midpoints, specials, random data over a wide range
  for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
    std::vector<float> x;
    for (int c = 0; c < 256; ++c) {
      x.push_back(from_fp8(std::uint8_t(c), f));
      x.push_back(0.5f *
                  (from_fp8(std::uint8_t(c), f) + from_fp8(std::uint8_t((c + 1) & 0xFF), f)));
    }
    for (float v : {INFINITY, -INFINITY, 1e30f, -1e30f, 1e-30f, 1e-45f, 0.f, -0.f}) x.push_back(v);
    const auto r = ref::uniform_data(1001, 9);
    for (std::size_t i = 0; i < r.size(); ++i) x.push_back(std::ldexp(r[i], int(i % 50) - 25));
    for (bool sat : {true, false}) {
      std::vector<std::uint8_t> codes(x.size());
      fp8_encode<Arch>(x.data(), x.size(), f, codes.data(), 1.0f, sat);
      for (std::size_t i = 0; i < x.size(); ++i) {
        INFO("x = " << x[i] << " sat " << sat);
        REQUIRE(int(codes[i]) == int(to_fp8(x[i], f, sat)));
      }
      std::vector<float> y(x.size());
      fp8_decode<Arch>(codes.data(), codes.size(), f, y.data());
      for (std::size_t i = 0; i < x.size(); ++i) {
        const float e = from_fp8(codes[i], f);
        REQUIRE((std::isnan(e) ? std::isnan(y[i]) : std::memcmp(&e, &y[i], 4) == 0));
      }
    }
    // block-scaled: relative error <= 2^-(m+1) for values in the normal range of the block
    for (std::size_t n : test::tail_sizes<Arch>()) {
      const auto v = test_data(n, 21 + n);
      std::vector<std::uint8_t> c(n);
      std::vector<float> s(fourbit_num_blocks(n, 64)), y(n);
      fp8_quantize<Arch>(v.data(), n, f, 64, c.data(), s.data());
      fp8_dequantize<Arch>(c.data(), s.data(), n, f, 64, y.data());
      const double rel = f == fp8_format::e4m3 ? 0.0625 : 0.125;
      const double tiny = f == fp8_format::e4m3 ? std::ldexp(1.0, -9) : std::ldexp(1.0, -16);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE(std::fabs(y[i] - v[i]) <= rel * std::fabs(v[i]) + tiny * s[i / 64]);
    }
  }
}

TEST_CASE("non-finite blocks dequantize to NaN, other blocks untouched", "[quant][policy]") {
  std::vector<float> x = ref::uniform_data(256, 1);
  x[70] = std::nanf("");
  x[200] = INFINITY;
  std::vector<std::uint8_t> codes(256);
  std::vector<float> sc(4), y(256);
  affine_format f{8, true, granularity::per_group, 64};
  affine_quantize(x.data(), 1, 256, f, codes.data(), sc.data(), nullptr);
  affine_dequantize(codes.data(), sc.data(), nullptr, 1, 256, f, y.data());
  for (std::size_t i = 0; i < 256; ++i) {
    const bool bad_block = (i / 64 == 1) || (i / 64 == 3);
    REQUIRE(std::isnan(y[i]) == bad_block);
  }
  std::vector<std::uint8_t> p(128);
  fourbit_quantize(x.data(), 256, fourbit::nf4, 64, p.data(), sc.data());
  fourbit_dequantize(p.data(), sc.data(), 256, fourbit::nf4, 64, y.data());
  for (std::size_t i = 0; i < 256; ++i) REQUIRE(std::isnan(y[i]) == ((i / 64) % 2 == 1));
}

TEST_CASE("bad input throws before writing", "[quant][errors]") {
  std::vector<float> x(96, 1.f), sc(8, -1.f), z(8, -1.f);
  std::vector<std::uint8_t> codes(96, 0x5A);
  auto unchanged = [&] {
    return std::all_of(codes.begin(), codes.end(), [](std::uint8_t c) { return c == 0x5A; }) &&
           std::all_of(sc.begin(), sc.end(), [](float v) { return v == -1.f; });
  };
  CHECK_THROWS_AS(affine_quantize(x.data(), 1, 96, {8, true, granularity::per_group, 0},
                                  codes.data(), sc.data(), z.data()),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(affine_quantize(x.data(), 1, 96, {8, true, granularity::per_group, 64},
                                  codes.data(), sc.data(), z.data()),
                  lowmem::invalid_argument); // 64 does not divide 96
  CHECK_THROWS_AS(affine_quantize(x.data(), 1, 96, {5, true, granularity::per_row, 0}, codes.data(),
                                  sc.data(), z.data()),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(affine_quantize(x.data(), 1, 96, {8, false, granularity::per_row, 0},
                                  codes.data(), sc.data(), nullptr),
                  lowmem::invalid_argument); // asymmetric needs zeros
  CHECK_THROWS_AS(fourbit_quantize(x.data(), 96, fourbit::nf4, 0, codes.data(), sc.data()),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(fp8_encode(x.data(), 96, fp8_format::e4m3, codes.data(), 0.0f),
                  lowmem::invalid_argument);
  CHECK_THROWS_AS(fp8_quantize(x.data(), 96, fp8_format::e4m3, -4, codes.data(), sc.data()),
                  lowmem::invalid_argument);
  CHECK(unchanged());
  try {
    affine_quantize(x.data(), 1, 96, {8, true, granularity::per_group, 64}, codes.data(), sc.data(),
                    z.data());
  } catch (const lowmem::invalid_argument& e) {
    CHECK(std::string(e.what()).find("affine_quantize") != std::string::npos);
    CHECK(std::string(e.what()).find("a multiple of 64") != std::string::npos);
  }
}

TEST_CASE("quantize and dequantize allocate nothing", "[quant][memory]") {
  REQUIRE(memory::tracking_enabled());
  const std::size_t n = 64 * 300;
  auto x = ref::uniform_data(n, 2);
  std::vector<std::uint8_t> codes(n);
  std::vector<float> sc(n / 32), z(n / 32), y(n);
  memory::region r;
  affine_quantize(x.data(), 3, index_t(n / 3), {8, false, granularity::per_group, 64}, codes.data(),
                  sc.data(), z.data(), rounding::stochastic, random::stream{1, 2});
  affine_dequantize(codes.data(), sc.data(), z.data(), 3, index_t(n / 3),
                    {8, false, granularity::per_group, 64}, y.data());
  fourbit_quantize(x.data(), n, fourbit::nf4, 64, codes.data(), sc.data());
  fourbit_dequantize(codes.data(), sc.data(), n, fourbit::nf4, 64, y.data());
  fp8_quantize(x.data(), n, fp8_format::e5m2, 64, codes.data(), sc.data());
  fp8_dequantize(codes.data(), sc.data(), n, fp8_format::e5m2, 64, y.data());
  CHECK(r.allocations() == 0);
}

LOWMEM_ARCH_TEST_CASE("stream_writer: every element lands once, guards untouched, any alignment",
                      "[quant][simd][stream]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  auto run = [](auto tag) {
    using T = decltype(tag);
    using W = simd::stream_writer<Arch, T>;
    for (std::size_t offset : {0, 1, 3, 5, 16, 63}) // elements past a 64-byte line
      for (std::size_t piece : {std::size_t(1), std::size_t(7), std::size_t(16), std::size_t(63),
                                W::max_piece - 1, W::max_piece})
        for (std::size_t n : {0, 1, 15, 64, 65, 1000, 5000}) {
          INFO("sizeof(T) " << sizeof(T) << " offset " << offset << " piece " << piece << " n "
                            << n);
          std::vector<T> store(n + offset + 256, T(0x5A));
          // 64-byte aligned origin inside the vector, then the offset
          const std::size_t lead =
              (64 - reinterpret_cast<std::uintptr_t>(store.data()) % 64) % 64 / sizeof(T);
          T* out = store.data() + lead + offset;
          W w(out);
          for (std::size_t e = 0; e < n; e += piece) {
            const std::size_t m = std::min(piece, n - e);
            T* p = w.next(m);
            for (std::size_t i = 0; i < m; ++i) p[i] = T(e + i + 1);
            w.advance(m);
          }
          w.finish();
          for (std::size_t i = 0; i < store.size(); ++i) {
            const std::ptrdiff_t k = std::ptrdiff_t(i) - std::ptrdiff_t(lead + offset);
            const T want = k >= 0 && std::size_t(k) < n ? T(std::size_t(k) + 1) : T(0x5A);
            REQUIRE(std::memcmp(&store[i], &want, sizeof(T)) == 0);
          }
        }
  };
  run(float{});
  run(std::uint8_t{});
}

LOWMEM_ARCH_TEST_CASE("large outputs (streaming stores) equal the small-output path bitwise, "
                      "unaligned and with tails",
                      "[quant][stream]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  // above the streaming threshold, with a tail that is not a multiple of a line or a block
  const std::size_t n = simd::stream_min_bytes / sizeof(float) + 64 * 3 + 8;
  const std::size_t piece = 64 * 1024; // the reference: small calls (plain stores)
  REQUIRE(piece * sizeof(float) < simd::stream_min_bytes);
  const auto x = test_data(n, 77);
  for (std::size_t shift : {0, 1, 3}) { // output misaligned by 0, 4, 12 bytes
    INFO("shift " << shift);
    std::vector<float> y(n + shift, -7.f), r(n);
    float* out = y.data() + shift;
    auto same = [&](const char* what) {
      INFO(what);
      REQUIRE(std::memcmp(out, r.data(), n * sizeof(float)) == 0);
      for (std::size_t i = 0; i < shift; ++i) REQUIRE(y[i] == -7.f);
    };
    // int8 symmetric and asymmetric, per group 64
    for (bool sym : {true, false}) {
      const affine_format f{8, sym, granularity::per_group, 64};
      std::vector<std::uint8_t> c(n);
      std::vector<float> s(n / 64 + 1), z(n / 64 + 1);
      const std::size_t n64 = n - n % 64; // per-group needs whole groups; the rest stays r's
      std::copy(out + n64, out + n, r.data() + n64);
      affine_quantize<Arch>(x.data(), 1, index_t(n64), f, c.data(), s.data(), z.data());
      affine_dequantize<Arch>(c.data(), s.data(), z.data(), 1, index_t(n64), f, out);
      for (std::size_t e = 0; e < n64; e += piece) // blocks of 64 align with the pieces
        affine_dequantize<Arch>(c.data() + e, s.data() + e / 64, z.data() + e / 64, 1,
                                index_t(std::min(piece, n64 - e)), f, r.data() + e);
      same(sym ? "int8 sym" : "int8 asym");
    }
    // NF4 / FP4, block 64
    for (fourbit t : {fourbit::nf4, fourbit::fp4}) {
      std::vector<std::uint8_t> p((n + 1) / 2);
      std::vector<float> am(fourbit_num_blocks(n, 64));
      fourbit_quantize<Arch>(x.data(), n, t, 64, p.data(), am.data());
      fourbit_dequantize<Arch>(p.data(), am.data(), n, t, 64, out);
      for (std::size_t e = 0; e < n; e += piece)
        fourbit_dequantize<Arch>(p.data() + e / 2, am.data() + e / 64, std::min(piece, n - e), t,
                                 64, r.data() + e);
      same("4-bit");
    }
    // FP8 decode (one block) and blockwise dequantize
    for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
      std::vector<std::uint8_t> c(n);
      std::vector<float> s(fourbit_num_blocks(n, 64));
      fp8_encode<Arch>(x.data(), n, f, c.data(), 0.01f);
      fp8_decode<Arch>(c.data(), n, f, out, 0.01f);
      for (std::size_t e = 0; e < n; e += piece)
        fp8_decode<Arch>(c.data() + e, std::min(piece, n - e), f, r.data() + e, 0.01f);
      same("fp8 decode");
      fp8_quantize<Arch>(x.data(), n, f, 64, c.data(), s.data());
      fp8_dequantize<Arch>(c.data(), s.data(), n, f, 64, out);
      for (std::size_t e = 0; e < n; e += piece)
        fp8_dequantize<Arch>(c.data() + e, s.data() + e / 64, std::min(piece, n - e), f, 64,
                             r.data() + e);
      same("fp8 dequantize");
    }
  }
}

LOWMEM_ARCH_TEST_CASE("large 4-bit quantize and FP8 encode (interleaved parts) equal the "
                      "small-input path bitwise, with tails",
                      "[quant][stream]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  // above kernels::interleave_min_bytes of input; the tail is not a multiple of a step or block
  const std::size_t n = kernels::interleave_min_bytes / sizeof(float) + 64 * 37 + 9;
  const std::size_t piece = 64 * 1024; // the reference: small calls (one contiguous pass)
  REQUIRE(piece * sizeof(float) < kernels::interleave_min_bytes);
  auto x = test_data(n, 79);
  x[n / 3] = NAN, x[n / 2 + 5] = -INFINITY, x[3 * n / 4] = 1e-42f; // special blocks in parts
  for (fourbit t : {fourbit::nf4, fourbit::fp4}) {
    INFO("type " << int(t));
    const std::size_t nb = fourbit_num_blocks(n, 64);
    std::vector<std::uint8_t> p((n + 1) / 2), rp((n + 1) / 2);
    std::vector<float> am(nb), ram(nb);
    fourbit_quantize<Arch>(x.data(), n, t, 64, p.data(), am.data());
    for (std::size_t e = 0; e < n; e += piece)
      fourbit_quantize<Arch>(x.data() + e, std::min(piece, n - e), t, 64, rp.data() + e / 2,
                             ram.data() + e / 64);
    REQUIRE(std::memcmp(p.data(), rp.data(), p.size()) == 0);
    REQUIRE(std::memcmp(am.data(), ram.data(), nb * sizeof(float)) == 0);
  }
  for (fp8_format f : {fp8_format::e4m3, fp8_format::e5m2}) {
    INFO("fp8 " << int(f));
    std::vector<std::uint8_t> c(n), rc(n);
    fp8_encode<Arch>(x.data(), n, f, c.data(), 0.01f);
    for (std::size_t e = 0; e < n; e += piece)
      fp8_encode<Arch>(x.data() + e, std::min(piece, n - e), f, rc.data() + e, 0.01f);
    REQUIRE(std::memcmp(c.data(), rc.data(), n) == 0);
  }
}

LOWMEM_ARCH_TEST_CASE("int8 quantize above the streaming threshold equals the plain-store path, "
                      "unaligned codes",
                      "[quant][stream]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const std::size_t n = simd::stream_min_bytes + 64 * 5; // codes: 1 byte per value
  const std::size_t piece = 64 * 4096;
  const auto x = test_data(n, 78);
  const affine_format f{8, true, granularity::per_group, 64};
  std::vector<std::uint8_t> r(n);
  std::vector<float> s(n / 64), rs(n / 64);
  for (std::size_t e = 0; e < n; e += piece)
    affine_quantize<Arch>(x.data() + e, 1, index_t(std::min(piece, n - e)), f, r.data() + e,
                          rs.data() + e / 64, nullptr);
  for (std::size_t shift : {0, 1, 5}) {
    INFO("shift " << shift);
    std::vector<std::uint8_t> c(n + shift + 1, 0xA5);
    affine_quantize<Arch>(x.data(), 1, index_t(n), f, c.data() + shift, s.data(), nullptr);
    REQUIRE(std::memcmp(c.data() + shift, r.data(), n) == 0);
    REQUIRE(std::memcmp(s.data(), rs.data(), s.size() * sizeof(float)) == 0);
    for (std::size_t i = 0; i < shift; ++i) REQUIRE(c[i] == 0xA5);
    REQUIRE(c[n + shift] == 0xA5);
  }
}
