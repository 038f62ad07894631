// Deterministic random test matrices: row-major fp32, entries uniform in [-scale, scale) from the
// core RNG (ref::uniform_data, stream `id`), so every test regenerates the same data.
#pragma once

#include <lowmem/core/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "reference/common.hpp"

namespace lowmem::test {

inline RowMatrixXf random_matrix(index_t rows, index_t cols, std::uint64_t id, float scale = 1.f) {
  RowMatrixXf m(rows, cols);
  const auto v = ref::uniform_data(std::size_t(rows * cols), id, -scale, scale);
  std::copy(v.begin(), v.end(), m.data());
  return m;
}

} // namespace lowmem::test
