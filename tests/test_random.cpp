// Counter-based RNG: Philox known answers, the value mapping, vectorized fills on every arch and
// at tail sizes, bitwise equality of whole vs pieces vs threads, and statistical sanity.
#include <catch2/catch.hpp>
#include <lowmem/core.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "reference/common.hpp"
#include "support/arch.hpp"

using namespace lowmem;
using random::stream;

TEST_CASE("Philox4x32-10 known-answer vectors (Random123 kat_vectors)", "[random]") {
  using random::philox4x32;
  CHECK(philox4x32({0, 0, 0, 0}, {0, 0}) ==
        random::counter_t{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  CHECK(philox4x32({0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                   {0xffffffffu, 0xffffffffu}) ==
        random::counter_t{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  CHECK(philox4x32({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
                   {0xa4093822u, 0x299f31d0u}) ==
        random::counter_t{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
}

TEST_CASE("value i maps to (block, word) as documented", "[random]") {
  const stream s{0x0123456789abcdefull, 0xfedcba9876543210ull};
  for (std::uint64_t i : {0ull, 1ull, 15ull, 16ull, 63ull, 64ull, 1000003ull, (1ull << 40) + 77}) {
    const std::uint64_t g = i / 64, w = (i % 64) / 16, l = i % 16;
    const auto x = random::philox4x32(s.counter(16 * g + l), s.key());
    CHECK(s.bits(i) == x[w]);
  }
  CHECK(s.key() == random::key_t{0x89abcdefu, 0x01234567u});
  CHECK(s.counter(5) == random::counter_t{5u, 0u, 0x76543210u, 0xfedcba98u});
  // different streams and seeds give different bits
  CHECK(stream{1, 0}.bits(0) != stream{1, 1}.bits(0));
  CHECK(stream{1, 0}.bits(0) != stream{2, 0}.bits(0));
}

LOWMEM_ARCH_TEST_CASE("vectorized fills equal the scalar stream at tail sizes and offsets",
                      "[random][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const stream s{42, 7};
  // 1001 and 1300 cover partial + full + partial normal groups (256 values) and a full chunk
  std::vector<std::size_t> sizes = test::tail_sizes<Arch>();
  sizes.push_back(1300);
  for (std::size_t n : sizes) {
    for (std::uint64_t begin :
         {0ull, 1ull, 63ull, 64ull, 100ull, 255ull, 256ull, 300ull, (1ull << 33) + 5}) {
      std::vector<float> out(n + 2, 123.f);
      random::fill_uniform<Arch>(s, begin, out.data() + 1, n);
      for (std::size_t k = 0; k < n; ++k) REQUIRE(out[k + 1] == s.uniform(begin + k));
      CHECK(out[0] == 123.f);
      CHECK(out[n + 1] == 123.f); // nothing written outside [0, n)
      random::fill_rademacher<Arch>(s, begin, out.data() + 1, n);
      for (std::size_t k = 0; k < n; ++k) REQUIRE(out[k + 1] == s.rademacher(begin + k));
      random::fill_normal<Arch>(s, begin, out.data() + 1, n);
      for (std::size_t k = 0; k < n; ++k) {
        const float ref = s.normal(begin + k);
        // vector log/sin/cos vs double evaluation: a few ulp of max(|z|, 1)
        REQUIRE(std::fabs(out[k + 1] - ref) <= 4e-6f * std::max(1.0f, std::fabs(ref)));
      }
      CHECK(out[n + 1] == 123.f);
    }
  }
}

TEST_CASE("normal i is Box–Muller on 24-bit uniforms, 4 normals from 3 words, as documented",
          "[random]") {
  const stream s{0x0123456789abcdefull, 0xfedcba9876543210ull};
  const double pi = 3.14159265358979323846;
  // every position of a normal group (k = 0..255), in group 0, a far group, and across the
  // 2^32-block boundary (block 16 (3 N + t) + l: hi32 changes at N ~ 2^28 / 3)
  for (std::uint64_t N : {0ull, 12345ull, (1ull << 28) / 3})
    for (std::uint64_t k = 0; k < 256; ++k) {
      const std::uint64_t i = 256 * N + k, m = k / 64, q = (k / 16) % 4, l = k % 16;
      const std::uint64_t j = 192 * N + 48 * m + l;
      const std::uint32_t a = s.bits(j), b = s.bits(j + 16), c = s.bits(j + 32);
      const std::uint32_t d = (a & 0xFFu) << 24 | (b & 0xFFu) << 16 | (c & 0xFFu) << 8;
      const std::uint32_t radius = q < 2 ? a : c, angle = q < 2 ? b : d;
      const double r = std::sqrt(-2 * std::log(((radius >> 8) + 1.0) / 16777216.0));
      const double phi = pi / 2 * (((angle >> 8) & 0x3FFFFFu) + 0.5) / 4194304.0;
      const double sign = ((angle >> (q % 2 ? 30 : 31)) & 1u) ? -1 : 1;
      const double ref = sign * r * (q % 2 ? std::sin(phi) : std::cos(phi));
      REQUIRE(std::fabs(s.normal(i) - ref) <= 1e-6 * std::max(1.0, std::fabs(ref)));
    }
}

TEST_CASE("Rademacher sign i is bit i mod 32 of word i / 32", "[random]") {
  const stream s{0x0123456789abcdefull, 0xfedcba9876543210ull};
  for (std::uint64_t j : {0ull, 1ull, 63ull, 64ull, 12345ull, (1ull << 34) + 3})
    for (unsigned b = 0; b < 32; ++b)
      REQUIRE(s.rademacher(32 * j + b) == (((s.bits(j) >> b) & 1u) ? -1.f : 1.f));
}

LOWMEM_ARCH_TEST_CASE("Rademacher fills equal the scalar signs across word and group edges",
                      "[random][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  const stream s{42, 9};
  // a group of 16 Philox blocks is 2048 signs; the last begin crosses a 2^32-block boundary
  // (hi32(block) changes at word 2^36, value 2^41)
  for (std::uint64_t begin :
       {0ull, 1ull, 31ull, 32ull, 33ull, 2047ull, 2048ull, 5000ull, (1ull << 41) - 3000})
    for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(31), std::size_t(32),
                          std::size_t(33), std::size_t(2049), std::size_t(20000)}) {
      std::vector<float> out(n + 2, 123.f);
      random::fill_rademacher<Arch>(s, begin, out.data() + 1, n);
      for (std::size_t k = 0; k < n; ++k) REQUIRE(out[k + 1] == s.rademacher(begin + k));
      CHECK(out[0] == 123.f);
      CHECK(out[n + 1] == 123.f);
    }
}

LOWMEM_ARCH_TEST_CASE("the angle word of three words' low bytes equals the scalar formula",
                      "[random][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const stream src{8, 9};
  alignas(64) std::uint32_t a[W], b[W], c[W], d[W];
  for (std::uint64_t rep = 0; rep < 200; ++rep) {
    for (std::size_t l = 0; l < W; ++l)
      a[l] = src.bits(rep * 96 + l), b[l] = src.bits(rep * 96 + 32 + l),
      c[l] = src.bits(rep * 96 + 64 + l);
    if (rep == 0) a[0] = b[0] = c[0] = 0xFFFFFFFFu, a[W - 1] = b[W - 1] = c[W - 1] = 0;
    simd::low_bytes_to_top24<Arch>(U::load_aligned(a), U::load_aligned(b), U::load_aligned(c))
        .store_aligned(d);
    for (std::size_t l = 0; l < W; ++l)
      REQUIRE(d[l] == ((a[l] & 0xFFu) << 24 | (b[l] & 0xFFu) << 16 | (c[l] & 0xFFu) << 8));
  }
}

LOWMEM_ARCH_TEST_CASE("Philox building blocks equal scalar 32x32->64 products", "[random][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const stream src{5, 6};
  alignas(64) std::uint32_t a[W], b[W], hi[W], lo[W], out[W];
  for (std::uint64_t rep = 0; rep < 200; ++rep) {
    for (std::size_t l = 0; l < W; ++l)
      a[l] = src.bits(rep * 64 + l), b[l] = src.bits(rep * 64 + 32 + l);
    if (rep == 0) a[0] = 0xFFFFFFFFu, a[W - 1] = 0; // extremes
    const std::uint32_t m = rep % 2 ? random::philox_m0 : random::philox_m1;
    U h, lw;
    simd::mul_hi_lo<Arch>(U::load_aligned(a), m, h, lw);
    h.store_aligned(hi);
    lw.store_aligned(lo);
    simd::mul_wide_u32<Arch>(U::load_aligned(a), m).store_aligned(out);
    for (std::size_t l = 0; l < W; ++l) {
      const std::uint64_t p = std::uint64_t(a[l]) * m;
      REQUIRE(hi[l] == std::uint32_t(p >> 32));
      REQUIRE(lo[l] == std::uint32_t(p));
      if (l % 2 == 0) { // 64-bit lanes: full product of the low dword
        REQUIRE(out[l] == std::uint32_t(p));
        REQUIRE(out[l + 1] == std::uint32_t(p >> 32));
      }
    }
    simd::high_to_low_u64<Arch>(U::load_aligned(a)).store_aligned(out);
    for (std::size_t l = 0; l < W; l += 2) CHECK((out[l] == a[l + 1] && out[l + 1] == 0));
    simd::pack_u64<Arch>(U::load_aligned(a), U::load_aligned(b)).store_aligned(out);
    simd::pack_u64<Arch, true>(U::load_aligned(a), U::load_aligned(b)).store_aligned(hi);
    for (std::size_t l = 0; l < W; l += 4) {
      CHECK((out[l] == a[l] && out[l + 1] == a[l + 2] && out[l + 2] == b[l] &&
             out[l + 3] == b[l + 2]));
      CHECK((hi[l] == a[l + 1] && hi[l + 1] == a[l + 3] && hi[l + 2] == b[l + 1] &&
             hi[l + 3] == b[l + 3]));
    }
  }
  // the wide Philox group evaluation equals the scalar generator, across a 2^32-block boundary
  const stream s{0x0123456789abcdefull, 0xfedcba9876543210ull};
  for (std::uint64_t g : {0ull, 1ull, 12345ull, (1ull << 28) - 1, 1ull << 28}) {
    U w[4][random::kernels::regs_per_word<Arch>];
    random::kernels::philox_group<Arch>(s, g, w);
    for (std::size_t r = 0; r < random::kernels::regs_per_word<Arch>; ++r)
      for (int k = 0; k < 4; ++k) {
        w[k][r].store_aligned(out);
        for (std::size_t l = 0; l < W; ++l) REQUIRE(out[l] == s.bits(64 * g + 16 * k + r * W + l));
      }
  }
}

LOWMEM_ARCH_TEST_CASE("fast vector log, sqrt and sincos over the Box–Muller input domain",
                      "[random][simd]") {
  using Arch = TestType;
  LOWMEM_SKIP_IF_UNSUPPORTED();
  using F = simd::fbatch<Arch>;
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  alignas(64) float x[W], y[W], c[W];
  alignas(64) std::uint32_t t[W];
  // -ln(X 2^-24) for X in [1, 2^24] (u1 of Box–Muller): both ends, every power-of-two boundary
  // neighbourhood, and a stride through the rest; relative error (exact 0 at X = 2^24)
  std::vector<std::uint32_t> xs = {1, 2, 3, (1u << 24) - 1, 1u << 24};
  for (std::uint32_t e = 1; e < 24; ++e)
    for (std::int32_t d = -3; d <= 3; ++d) xs.push_back(std::uint32_t(std::int64_t(1) << e) + d);
  for (std::uint32_t X = 5; X < (1u << 24); X += 4099) xs.push_back(X);
  double log_err = 0, sqrt_err = 0;
  for (std::size_t i = 0; i < xs.size(); i += W) {
    for (std::size_t l = 0; l < W; ++l) x[l] = float(xs[std::min(i + l, xs.size() - 1)]);
    const F L = simd::log_fast<Arch, true>(F::load_aligned(x), 24);
    L.store_aligned(y);
    simd::sqrt_fast<Arch>(L).store_aligned(c);
    for (std::size_t l = 0; l < W; ++l) {
      const double ref = -std::log(double(x[l]) * 0x1p-24);
      if (ref == 0) {
        REQUIRE(y[l] == 0.f);
        REQUIRE(c[l] == 0.f);
        continue;
      }
      log_err = std::max(log_err, std::fabs(y[l] - ref) / ref);
      sqrt_err =
          std::max(sqrt_err, std::fabs(c[l] - std::sqrt(double(y[l]))) / std::sqrt(double(y[l])));
    }
  }
  CHECK(log_err < 4e-7);
  CHECK(sqrt_err < 4e-7);
  // plain ln over a few decades
  double ln_err = 0;
  for (float v = 1e-30f; v < 1e30f; v *= 1.37f) {
    simd::log_fast<Arch>(F(v)).store_aligned(y);
    ln_err = std::max(ln_err, std::fabs(y[0] - std::log(double(v))) /
                                  std::max(1.0, std::fabs(std::log(double(v)))));
  }
  CHECK(ln_err < 4e-7);
  // sin, cos of 2 pi (b >> 8) 2^-24: quadrant boundaries (with any low 8 bits) and a stride
  std::vector<std::uint32_t> ts;
  for (std::uint32_t q = 0; q < 8; ++q)
    for (std::int32_t d = -2; d <= 2; ++d)
      ts.push_back((q << 29) + std::uint32_t(d * 256) + (q * 37 & 0xFF));
  ts.push_back(0xFFFFFFFFu);
  for (std::uint32_t b = 77; b < 0xFFFFFF00u; b += 104729 * 13) ts.push_back(b);
  double sc_err = 0;
  for (std::size_t i = 0; i < ts.size(); i += W) {
    for (std::size_t l = 0; l < W; ++l) t[l] = ts[std::min(i + l, ts.size() - 1)];
    F sn, cs;
    simd::sincos_turns<Arch>(U::load_aligned(t), sn, cs, 2.0f);
    sn.store_aligned(y);
    cs.store_aligned(c);
    for (std::size_t l = 0; l < W; ++l) {
      const double a = 6.283185307179586 * double(t[l] >> 8) * 0x1p-24;
      sc_err =
          std::max({sc_err, std::fabs(y[l] - 2 * std::sin(a)), std::fabs(c[l] - 2 * std::cos(a))});
    }
  }
  CHECK(sc_err < 2 * 2e-7);
  // sin, cos of pi/2 t for |t| < 1/2 (the Box–Muller angle inside a quadrant, centred)
  double sq_err = 0;
  for (int k = -(1 << 16); k <= (1 << 16); k += W) {
    for (std::size_t l = 0; l < W; ++l) x[l] = float(k + int(l)) * 0x1p-17f; // exact
    F sn, cs;
    simd::sincos_quarter<Arch>(F::load_aligned(x), sn, cs);
    sn.store_aligned(y);
    cs.store_aligned(c);
    for (std::size_t l = 0; l < W; ++l) {
      const double a = 1.5707963267948966 * double(x[l]);
      sq_err = std::max({sq_err, std::fabs(y[l] - std::sin(a)), std::fabs(c[l] - std::cos(a))});
    }
  }
  CHECK(sq_err < 1.5e-7); // measured 1.13e-7: about one float ulp near 1 (1.2e-7)
}

TEST_CASE("a range filled whole, in pieces, and on 2 threads is bitwise identical", "[random]") {
  const stream s{2024, 3};
  const std::size_t n = 300001;
  const std::uint64_t begin = 17;
  std::vector<float> whole(n), pieces(n), threaded(n);
  random::fill_normal(s, begin, whole.data(), n);
  // pieces of awkward sizes, filled in reverse order
  std::vector<std::size_t> cuts = {0, 1, 64, 65, 1000, 4097, 150000, 299999, n};
  for (std::size_t c = cuts.size() - 1; c > 0; --c)
    random::fill_normal(s, begin + cuts[c - 1], pieces.data() + cuts[c - 1], cuts[c] - cuts[c - 1]);
  CHECK(ref::bitwise_equal(whole.data(), pieces.data(), n));
  random::fill_normal(s, begin, threaded.data(), n, /*parallel=*/true);
  CHECK(ref::bitwise_equal(whole.data(), threaded.data(), n));
  // explicit 2-thread split through parallel_for (works with or without OpenMP)
  std::vector<float> split(n);
  parallel_for(
      0, std::ptrdiff_t(n), item_work{min_chunk_work}, // every item a chunk: 2 chunks
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        random::fill_normal(s, begin + std::uint64_t(b), split.data() + b, std::size_t(e - b));
      },
      2);
  CHECK(ref::bitwise_equal(whole.data(), split.data(), n));
  // Rademacher (32 signs per word): the same cuts split words and groups
  random::fill_rademacher(s, begin, whole.data(), n);
  for (std::size_t c = cuts.size() - 1; c > 0; --c)
    random::fill_rademacher(s, begin + cuts[c - 1], pieces.data() + cuts[c - 1],
                            cuts[c] - cuts[c - 1]);
  CHECK(ref::bitwise_equal(whole.data(), pieces.data(), n));
  random::fill_rademacher(s, begin, threaded.data(), n, /*parallel=*/true);
  CHECK(ref::bitwise_equal(whole.data(), threaded.data(), n));
}

namespace {
double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }
// Kolmogorov–Smirnov statistic of a sample against a CDF.
template <class Cdf> double ks_statistic(std::vector<float> v, Cdf cdf) {
  std::sort(v.begin(), v.end());
  const double n = double(v.size());
  double d = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double f = cdf(double(v[i]));
    d = std::max({d, f - double(i) / n, double(i + 1) / n - f});
  }
  return d;
}
} // namespace

TEST_CASE("statistical sanity of uniform, normal and Rademacher fills", "[random][stats]") {
  const std::size_t n = 1 << 20;
  std::vector<float> v(n);
  const stream s{99, 1};
  // KS critical value at alpha = 1e-3 is 1.95 / sqrt(n); the seeds are fixed, so this is a
  // deterministic check that would catch a wrong transform or a broken mapping.
  const double ks_crit = 1.95 / std::sqrt(double(n));

  random::fill_uniform(s, 0, v.data(), n);
  double mean = 0, var = 0;
  for (float x : v) {
    REQUIRE((x >= 0.f && x < 1.f));
    mean += x;
  }
  mean /= n;
  for (float x : v) var += (x - mean) * (x - mean);
  var /= n;
  CHECK(std::fabs(mean - 0.5) < 5 * std::sqrt(1.0 / 12 / n));
  CHECK(std::fabs(var - 1.0 / 12) < 1e-3);
  CHECK(ks_statistic(v, [](double x) { return x; }) < ks_crit);
  // chi-square over 256 equal bins: 255 dof, mean 255, sd 22.6; 5 sd bound
  std::vector<double> bins(256, 0);
  for (float x : v) bins[std::size_t(x * 256)] += 1;
  double chi2 = 0;
  for (double b : bins) chi2 += (b - n / 256.0) * (b - n / 256.0) / (n / 256.0);
  CHECK(chi2 < 255 + 5 * 22.6);

  random::fill_normal(s, 0, v.data(), n);
  mean = 0, var = 0;
  double m3 = 0, m4 = 0;
  for (float x : v) mean += x;
  mean /= n;
  for (float x : v) {
    const double d = x - mean;
    var += d * d, m3 += d * d * d, m4 += d * d * d * d;
  }
  var /= n, m3 /= n, m4 /= n;
  CHECK(std::fabs(mean) < 5 / std::sqrt(double(n)));
  CHECK(std::fabs(var - 1) < 5 * std::sqrt(2.0 / n));
  CHECK(std::fabs(m3) < 5 * std::sqrt(15.0 / n));
  CHECK(std::fabs(m4 - 3) < 5 * std::sqrt(96.0 / n));
  CHECK(ks_statistic(v, normal_cdf) < ks_crit);

  // lag-1 correlation of consecutive normals (catches reuse of a word within a block)
  double c = 0;
  for (std::size_t i = 0; i + 1 < n; ++i) c += v[i] * v[i + 1];
  CHECK(std::fabs(c / n) < 5 / std::sqrt(double(n)));
  // the Box–Muller partners (rows 4 m, 4 m + 1 and 4 m + 2, 4 m + 3 of a word triple) and the
  // two pairs of a triple (pair 2's angle takes the low bytes of pair 1's words) are uncorrelated,
  // also in absolute value (a shared radius would correlate |z|)
  for (std::size_t lag : {std::size_t(16), std::size_t(32), std::size_t(48)})
    for (std::size_t first : {std::size_t(0), std::size_t(16)}) {
      if (first + lag >= 64) continue;
      double ca = 0, cabs = 0;
      std::size_t pairs = 0;
      for (std::size_t i = first; i + lag < n; i += 64, ++pairs) {
        ca += v[i] * v[i + lag];
        cabs += (std::fabs(v[i]) - 0.7978845608) * (std::fabs(v[i + lag]) - 0.7978845608);
      }
      CHECK(std::fabs(ca / pairs) < 5 / std::sqrt(double(pairs)));
      CHECK(std::fabs(cabs / pairs) < 5 * 0.3634 / std::sqrt(double(pairs))); // var |z| = 1 - 2/pi
    }

  random::fill_rademacher(s, 0, v.data(), n);
  double sum = 0;
  for (float x : v) {
    REQUIRE((x == 1.f || x == -1.f));
    sum += x;
  }
  CHECK(std::fabs(sum) < 5 * std::sqrt(double(n)));
  // 32 signs share a word: consecutive signs (lag 1, and lag 32 = the same bit of the next word)
  // are uncorrelated, and the 256 patterns of 8 consecutive signs are uniform (chi-square, 255 dof)
  for (std::size_t lag : {std::size_t(1), std::size_t(32)}) {
    c = 0;
    for (std::size_t i = 0; i + lag < n; ++i) c += v[i] * v[i + lag];
    CHECK(std::fabs(c / n) < 5 / std::sqrt(double(n)));
  }
  std::fill(bins.begin(), bins.end(), 0.0);
  for (std::size_t i = 0; i + 8 <= n; i += 8) {
    std::size_t p = 0;
    for (std::size_t b = 0; b < 8; ++b) p = 2 * p + (v[i + b] < 0);
    bins[p] += 1;
  }
  const double per_bin = double(n / 8) / 256;
  chi2 = 0;
  for (double b : bins) chi2 += (b - per_bin) * (b - per_bin) / per_bin;
  CHECK(chi2 < 255 + 5 * 22.6);
}

TEST_CASE("normal tails to 5 sigma", "[random][stats]") {
  // 2^24 normals: counts beyond 3, 4, 4.5 and 5 sigma against 2 P(Z > t) n, within 5 Poisson sd
  // (+1); the largest |z| the 24-bit radius allows is sqrt(48 ln 2) = 5.77
  const std::size_t n = std::size_t(1) << 24;
  std::vector<float> v(n);
  random::fill_normal(stream{7, 3}, 0, v.data(), n, /*parallel=*/true);
  const double ts[] = {3.0, 4.0, 4.5, 5.0};
  std::size_t counts[4] = {0, 0, 0, 0};
  float zmax = 0;
  for (float z : v) {
    const float a = std::fabs(z);
    zmax = std::max(zmax, a);
    for (int k = 0; k < 4; ++k) counts[k] += a > ts[k];
  }
  for (int k = 0; k < 4; ++k) {
    const double expect = double(n) * std::erfc(ts[k] / std::sqrt(2.0));
    INFO("t = " << ts[k] << ": " << counts[k] << " beyond, expected " << expect);
    CHECK(std::fabs(double(counts[k]) - expect) < 5 * std::sqrt(expect) + 1);
  }
  CHECK(zmax > 5.0f);
  CHECK(zmax <= 5.7686f);
}

TEST_CASE("fills allocate nothing", "[random][memory]") {
  std::vector<float> v(100000);
  memory::region r;
  random::fill_normal(stream{1, 2}, 5, v.data(), v.size());
  random::fill_uniform(stream{1, 2}, 5, v.data(), v.size());
  random::fill_rademacher(stream{1, 2}, 5, v.data(), v.size());
  CHECK(r.allocations() == 0);
}
