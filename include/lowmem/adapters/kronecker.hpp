// lowmem/adapters/kronecker.hpp — Kronecker adapter (Compacter / LoKr family, arXiv:2106.04647):
// ΔW = s·(A ⊗ B), A [a1, a2], B [b1, b2], out = a1·b1, in = a2·b2, never formed.
//
// With x_t (one row of x) viewed row-major as X_t [a2, b2] and y_t as Y_t [a1, b1]:
//   (A ⊗ B)·vec(X_t) = vec(A·X_t·Bᵀ)      (row-major vec), so y_t += s·A·(X_t·Bᵀ).
// Backward, with dY_t the row of dy viewed [a1, b1] and T_t = X_t·Bᵀ [a2, b1], M_t = Aᵀ·dY_t:
//   dA += s·Σ_t dY_t·T_tᵀ,   dB += s·Σ_t M_tᵀ·X_t,   dx_t += s·M_t·B   (+ dy·W).
// Cost 2·rows·(a2·b2·b1 + a1·a2·b1) multiply-adds per pass instead of rows·in·out; scratch is
// two a2×b1 matrices.
#pragma once

#include <Eigen/Core>
#include <cstddef>

#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

namespace adapters::detail {
inline void validate_kron(const char* fn, const ConstRowRef<float>& x, const ConstRowRef<float>& W,
                          const ConstRowRef<float>& A, const ConstRowRef<float>& B, float s) {
  require_positive(fn, "A.rows", A.rows());
  require_positive(fn, "A.cols", A.cols());
  require_positive(fn, "B.rows", B.rows());
  require_positive(fn, "B.cols", B.cols());
  require_equal(fn, "x.cols (= A.cols·B.cols)", A.cols() * B.cols(), x.cols());
  require_dims(fn, "W", W, A.rows() * B.rows(), A.cols() * B.cols());
  require_scale(fn, s);
}
} // namespace adapters::detail

/// Scratch bytes of kron_forward / kron_backward: 2·a2·b1 floats.
inline std::size_t kron_workspace_bytes(index_t a2, index_t b1) {
  workspace_planner p;
  p.take<float>(std::size_t(a2 * b1));
  p.take<float>(std::size_t(a2 * b1));
  return p.bytes();
}

/// Kronecker-adapter forward: y = x·Wᵀ + b + s·x·(A ⊗ B)ᵀ, applied row by row as s·A·X_t·Bᵀ.
/// Shapes: x [rows, a2·b2] (rows contiguous), W [a1·b1, a2·b2] (frozen), bias [out] or nullptr,
/// A [a1, a2], B [b1, b2], y [rows, a1·b1]. Memory: kron_workspace_bytes(a2, b1).
template <class = void> // instantiated only when called: see README, "Compile time"
inline void kron_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                         ConstRowRef<float> A, ConstRowRef<float> B, float scale, RowRef<float> y,
                         workspace ws) {
  using namespace adapters::detail;
  const char* fn = "kron_forward";
  validate_kron(fn, x, W, A, B, scale);
  const index_t rows = x.rows(), a1 = A.rows(), a2 = A.cols(), b1 = B.rows(), b2 = B.cols();
  require_dims(fn, "y", y, rows, a1 * b1);
  require_workspace(fn, ws, kron_workspace_bytes(a2, b1));
  Eigen::Map<RowMatrixXf> T(ws.take<float>(std::size_t(a2 * b1)), a2, b1);
  y.noalias() = x * W.transpose();
  add_bias(y, bias);
  for (index_t t = 0; t < rows; ++t) {
    const Eigen::Map<const RowMatrixXf> X(x.row(t).data(), a2, b2);
    Eigen::Map<RowMatrixXf> Y(y.row(t).data(), a1, b1);
    T.noalias() = X * B.transpose();
    Y.noalias() += (scale * A) * T;
  }
}

/// Kronecker-adapter backward; ACCUMULATES (+=) into dx, dA, dB (formulas in the header comment).
/// Shapes: as kron_forward, dy [rows, a1·b1], dx [rows, in] or empty (0×0) to skip, dA [a1, a2],
/// dB [b1, b2]. Memory: kron_workspace_bytes(a2, b1).
template <class = void> // instantiated only when called: see README, "Compile time"
inline void kron_backward(ConstRowRef<float> x, ConstRowRef<float> W, ConstRowRef<float> A,
                          ConstRowRef<float> B, ConstRowRef<float> dy, float scale,
                          RowRef<float> dx, RowRef<float> dA, RowRef<float> dB, workspace ws) {
  using namespace adapters::detail;
  const char* fn = "kron_backward";
  validate_kron(fn, x, W, A, B, scale);
  const index_t rows = x.rows(), a1 = A.rows(), a2 = A.cols(), b1 = B.rows(), b2 = B.cols();
  require_dims(fn, "dy", dy, rows, a1 * b1);
  const bool want_dx = dx.size() != 0;
  if (want_dx) require_dims(fn, "dx", dx, rows, a2 * b2);
  require_dims(fn, "dA", dA, a1, a2);
  require_dims(fn, "dB", dB, b1, b2);
  require_workspace(fn, ws, kron_workspace_bytes(a2, b1));
  Eigen::Map<RowMatrixXf> T(ws.take<float>(std::size_t(a2 * b1)), a2, b1);
  Eigen::Map<RowMatrixXf> M(ws.take<float>(std::size_t(a2 * b1)), a2, b1);
  if (want_dx) dx.noalias() += dy * W;
  for (index_t t = 0; t < rows; ++t) {
    const Eigen::Map<const RowMatrixXf> X(x.row(t).data(), a2, b2), dY(dy.row(t).data(), a1, b1);
    T.noalias() = X * B.transpose();
    dA.noalias() += (scale * dY) * T.transpose();
    M.noalias() = A.transpose() * dY;
    dB.noalias() += (scale * M.transpose()) * X;
    if (want_dx) {
      Eigen::Map<RowMatrixXf> dX(dx.row(t).data(), a2, b2);
      dX.noalias() += (scale * M) * B;
    }
  }
}

/// Merge: W[i·b1 + k, j·b2 + l] += s·A_ij·B_kl in place (sign of s negative to unmerge), no
/// temporary. Shapes: W [a1·b1, a2·b2], A [a1, a2], B [b1, b2].
template <class = void> // instantiated only when called: see README, "Compile time"
inline void kron_merge(RowRef<float> W, ConstRowRef<float> A, ConstRowRef<float> B, float scale) {
  const char* fn = "kron_merge";
  adapters::detail::require_dims(fn, "W", W, A.rows() * B.rows(), A.cols() * B.cols());
  adapters::detail::require_scale(fn, scale);
  const index_t b1 = B.rows(), b2 = B.cols();
  for (index_t i = 0; i < A.rows(); ++i)
    for (index_t j = 0; j < A.cols(); ++j) W.block(i * b1, j * b2, b1, b2) += (scale * A(i, j)) * B;
}

} // namespace lowmem
