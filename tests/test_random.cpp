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
  for (std::size_t n : test::tail_sizes<Arch>()) {
    for (std::uint64_t begin : {0ull, 1ull, 63ull, 64ull, 100ull, (1ull << 33) + 5}) {
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
      0, std::ptrdiff_t(n), 1,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        random::fill_normal(s, begin + std::uint64_t(b), split.data() + b, std::size_t(e - b));
      },
      2);
  CHECK(ref::bitwise_equal(whole.data(), split.data(), n));
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
  // and the Box–Muller partners (w, w+16) of the same block are uncorrelated
  c = 0;
  std::size_t pairs = 0;
  for (std::size_t i = 0; i + 16 < n; i += 64, ++pairs) c += v[i] * v[i + 16];
  CHECK(std::fabs(c / pairs) < 5 / std::sqrt(double(pairs)));

  random::fill_rademacher(s, 0, v.data(), n);
  double sum = 0;
  for (float x : v) {
    REQUIRE((x == 1.f || x == -1.f));
    sum += x;
  }
  CHECK(std::fabs(sum) < 5 * std::sqrt(double(n)));
}

TEST_CASE("fills allocate nothing", "[random][memory]") {
  std::vector<float> v(100000);
  memory::region r;
  random::fill_normal(stream{1, 2}, 5, v.data(), v.size());
  random::fill_uniform(stream{1, 2}, 5, v.data(), v.size());
  random::fill_rademacher(stream{1, 2}, 5, v.data(), v.size());
  CHECK(r.allocations() == 0);
}
