// lowmem/core/eigen.hpp — row-major Eigen aliases and raw views.
//
// lowmem is row-major everywhere (PyTorch's convention, so users bring weights as they are).
// Public functions take these aliases or a raw view; kernels below them take raw pointers.
// Pitfall guarded here: a row-major matrix passed to Eigen::Ref<const Eigen::MatrixXf> (which is
// column-major) is silently copied to the heap. Use the Row* aliases, or static-assert with
// LOWMEM_ASSERT_ROW_MAJOR.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "errors.hpp"

namespace lowmem {

using index_t = std::ptrdiff_t;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixXf = RowMatrix<float>;
using RowMatrixXd = RowMatrix<double>;

/// Map of a dense row-major matrix whose rows may be padded (outer stride = leading dimension).
template <class T> using RowMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstRowMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Ref to a row-major matrix with unit inner stride and any outer stride: binds to RowMatrix,
/// RowMap, row blocks — never copies (the const version would copy a column-major argument,
/// which the row-major static assert in callers prevents).
template <class T> using RowRef = Eigen::Ref<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T> using ConstRowRef = Eigen::Ref<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

using VecRef = Eigen::Ref<Eigen::VectorXf>;
using ConstVecRef = Eigen::Ref<const Eigen::VectorXf>;

#define LOWMEM_ASSERT_ROW_MAJOR(MatrixType)                                                        \
  static_assert(static_cast<int>(std::decay_t<MatrixType>::Flags) & Eigen::RowMajorBit ||          \
                    std::decay_t<MatrixType>::ColsAtCompileTime == 1,                              \
                "lowmem: row-major layout required (a column-major argument would be copied)")

/// A raw row-major 2-D view: rows × cols, row r starts at data + r * ld (ld >= cols).
template <class T> struct matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t ld = 0;

  T* row(index_t r) const noexcept { return data + r * ld; }
  T& operator()(index_t r, index_t c) const noexcept { return data[r * ld + c]; }
  bool empty() const noexcept { return rows == 0 || cols == 0; }
};

template <class T> matrix_view<T> make_view(T* data, index_t rows, index_t cols, index_t ld = -1) {
  return {data, rows, cols, ld < 0 ? cols : ld};
}

/// View of an Eigen row-major matrix expression that has direct access (Matrix, Map, Ref, Block).
template <class Derived> auto view_of(Eigen::PlainObjectBase<Derived>& m) {
  LOWMEM_ASSERT_ROW_MAJOR(Derived);
  using T = typename Derived::Scalar;
  return matrix_view<T>{m.data(), m.rows(), m.cols(), m.outerStride()};
}
template <class T> matrix_view<T> view_of(RowRef<T> m) {
  return {m.data(), m.rows(), m.cols(), m.outerStride()};
}
template <class T> matrix_view<const T> view_of(const ConstRowRef<T>& m) {
  return {m.data(), m.rows(), m.cols(), m.outerStride()};
}

/// Eigen map over a raw view (no copy).
template <class T> RowMap<T> as_eigen(const matrix_view<T>& v) {
  return RowMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld));
}
template <class T> ConstRowMap<T> as_eigen(const matrix_view<const T>& v) {
  return ConstRowMap<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld));
}

/// Validates a view at a public entry: non-negative extents, ld >= cols, data present.
template <class T>
inline void require_view(const char* function, const char* argument, const matrix_view<T>& v) {
  require_non_negative(function, argument, v.rows);
  require_non_negative(function, argument, v.cols);
  if (v.ld < v.cols) // message built only on failure: passing checks allocate nothing
    detail::throw_invalid(function, argument,
                          "leading dimension >= cols (" + detail::to_text(v.cols) + ")",
                          detail::to_text(v.ld));
  require_data(function, argument, v.data, static_cast<std::size_t>(v.rows * v.cols));
}

/// Validates a view's shape at a public entry.
template <class T>
inline void require_shape(const char* function, const char* argument, const matrix_view<T>& v,
                          index_t rows, index_t cols) {
  if (v.rows != rows || v.cols != cols)
    detail::throw_invalid(function, argument,
                          "shape [" + detail::to_text(rows) + ", " + detail::to_text(cols) + "]",
                          "[" + detail::to_text(v.rows) + ", " + detail::to_text(v.cols) + "]");
  require_view(function, argument, v);
}

} // namespace lowmem
