// Error of a float result against a double reference, relative to the reference's scale:
//   rel(a, B) = max_i |a_i − b_i| / max_i |b_i|   (b = B flattened row-major, as lowmem stores it),
// and the accumulated part of a `+=` gradient (backwards accumulate into their outputs).
// Shared by the adapter tests, which compare against tests/reference/adapters_reference.hpp.
#pragma once

#include <cstddef>
#include <vector>

#include "reference/adapters_reference.hpp"

namespace lowmem::test {

/// max-abs error of the row-major data of `a` (anything with data()) against the matrix `b`,
/// relative to max |b|.
template <class V> double rel(const V& a, const ref::Md& b) {
  const auto f = ref::flat(b);
  return ref::max_rel_error(a.data(), f.data(), f.size());
}

/// The same for vectors: `b` is an Eigen::VectorXd or a std::vector<double>.
template <class V, class R> double relv(const V& a, const R& b) {
  return ref::max_rel_error(a.data(), b.data(), std::size_t(b.size()));
}

/// a − a0: what a backward added to a gradient buffer that held a0.
inline std::vector<float> minus(const std::vector<float>& a, const std::vector<float>& a0) {
  std::vector<float> d(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - a0[i];
  return d;
}

} // namespace lowmem::test
