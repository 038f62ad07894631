// Shared helpers for naive double references and comparisons.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <lowmem/core/random.hpp>

namespace lowmem::ref {

/// Deterministic test data: n floats uniform in [lo, hi) from the core RNG (stream `id`).
inline std::vector<float> uniform_data(std::size_t n, std::uint64_t id, float lo = -1.f,
                                       float hi = 1.f) {
  std::vector<float> v(n);
  random::stream s{0x5eedu, id};
  for (std::size_t i = 0; i < n; ++i) v[i] = lo + (hi - lo) * s.uniform(i);
  return v;
}

/// max_i |a_i - b_i| / max(max_i |b_i|, floor): error relative to the reference's scale.
template <class A, class B>
double max_rel_error(const A* a, const B* b, std::size_t n, double floor = 1e-30) {
  double scale = floor, err = 0;
  for (std::size_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(double(b[i])));
  for (std::size_t i = 0; i < n; ++i) err = std::max(err, std::fabs(double(a[i]) - double(b[i])));
  return err / scale;
}

/// Normalised mean squared error Σ(a-b)² / Σb² (0 when both are zero).
template <class A, class B> double nmse(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return den == 0 ? num : num / den;
}

/// Bitwise equality of two float arrays (for contracts that promise identical bits).
inline bool bitwise_equal(const float* a, const float* b, std::size_t n) {
  return std::equal(a, a + n, b,
                    [](float x, float y) { return std::memcmp(&x, &y, sizeof(float)) == 0; });
}

} // namespace lowmem::ref
