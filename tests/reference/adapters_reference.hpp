// Naive double references for the adapter family: every method is written as a dense linear
// layer with an explicitly formed effective weight W_eff (the thing the kernels must never form),
// and every parameter gradient is derived from the dense dW_eff = dyᵀ·x by the chain rule.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.hpp"

namespace lowmem::ref {

using Md = Eigen::MatrixXd;
using Vd = Eigen::VectorXd;

/// Dense double copy of a row-major float buffer.
inline Md dense(const std::vector<float>& v, std::size_t rows, std::size_t cols) {
  Md m(rows, cols);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < cols; ++j) m(i, j) = v[i * cols + j];
  return m;
}
inline Md dense(const float* v, std::size_t rows, std::size_t cols) {
  Md m(rows, cols);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < cols; ++j) m(i, j) = v[i * cols + j];
  return m;
}
/// Row-major flattening of a double matrix (to compare with the float outputs).
inline std::vector<double> flat(const Md& m) {
  std::vector<double> v(std::size_t(m.size()));
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) v[std::size_t(i * m.cols() + j)] = m(i, j);
  return v;
}

/// y = x·W_effᵀ + b
inline Md linear(const Md& x, const Md& Weff, const float* bias) {
  Md y = x * Weff.transpose();
  if (bias)
    for (Eigen::Index j = 0; j < y.cols(); ++j) y.col(j).array() += bias[j];
  return y;
}

/// Dropout mask as keep·1/(1-p) factors, element (i, c) from stream value i*in + c.
inline Md dropout_factors(const random::stream& s, float p, std::size_t rows, std::size_t in) {
  Md m(rows, in);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t c = 0; c < in; ++c)
      m(i, c) = s.uniform(i * in + c) >= p ? double(1.0f / (1.0f - p)) : 0.0;
  return m;
}

/// Σ G ⊙ y: the scalar loss used by gradient checks (dL/dy = G).
inline double inner(const Md& G, const Md& y) { return (G.array() * y.array()).sum(); }

// ---- LoRA: y = x Wᵀ + b + s (x ⊙ M)(B A)ᵀ ----------------------------------------------------
struct lora_grads {
  Md y, dx, dA, dB;
};
inline lora_grads lora(const Md& x, const Md& W, const float* bias, const Md& A, const Md& B,
                       double s, const Md* mask, const Md& dy) {
  const Md xd = mask ? Md(x.array() * mask->array()) : x;
  const Md D = s * B * A;
  lora_grads g;
  g.y = linear(x, W, bias) + xd * D.transpose();
  const Md dD = dy.transpose() * xd; // dense gradient of the delta: the reference may form it
  g.dB = s * dD * A.transpose();
  g.dA = s * B.transpose() * dD;
  Md dxd = dy * D;
  if (mask) dxd = (dxd.array() * mask->array()).matrix();
  g.dx = dy * W + dxd;
  return g;
}

// ---- DoRA: y = (x Wᵀ + s (x ⊙ M)(B A)ᵀ) diag(m / ‖V‖_row) + b, V = W + s B A ----------------
// (dropout, when a mask is given, acts on the adapter-path input only)
struct dora_grads {
  Md y, dx, dA, dB;
  Vd dm, norms;
};
inline dora_grads dora(const Md& x, const Md& W, const float* bias, const Md& A, const Md& B,
                       const Vd& m, double s, bool exact, const Md& dy, const Md* mask = nullptr) {
  const Md xd = mask ? Md(x.array() * mask->array()) : x;
  const Md BA = B * A; // the reference may form it
  const Md V = W + s * BA;
  dora_grads g;
  g.norms = V.rowwise().norm();
  const Vd c = m.array() / g.norms.array();
  const Md pre = x * W.transpose() + s * xd * BA.transpose(); // [rows, out], before the scale
  g.y = linear(pre * c.asDiagonal(), Md::Identity(pre.cols(), pre.cols()), bias);
  const Md D = dy * c.asDiagonal();
  Md dxa = s * D * BA;
  if (mask) dxa = (dxa.array() * mask->array()).matrix();
  g.dx = D * W + dxa;
  // h_j = Σ_i dy_ij pre_ij: dm_j = h_j / n_j; through the norm dc_j/dV_j = -m_j V_j / n_j³
  const Vd h = (dy.array() * pre.array()).colwise().sum().transpose();
  g.dm = h.cwiseQuotient(g.norms);
  Md dBA = s * D.transpose() * xd; // ∂L/∂(B A)
  if (exact) {
    const Vd e = -(h.array() * m.array()) / g.norms.array().cube();
    dBA += s * e.asDiagonal() * V;
  }
  g.dB = dBA * A.transpose();
  g.dA = B.transpose() * dBA;
  return g;
}

// ---- dense form of a CSR matrix -----------------------------------------------------------------
inline Md csr_dense(std::size_t rows, std::size_t cols, const std::vector<std::int64_t>& row_ptr,
                    const std::vector<std::int32_t>& col, const std::vector<float>& val) {
  Md S = Md::Zero(rows, cols);
  for (std::size_t j = 0; j < rows; ++j)
    for (std::int64_t k = row_ptr[j]; k < row_ptr[j + 1]; ++k) S(j, col[k]) += val[k];
  return S;
}
/// Gradient of the CSR values from a dense gradient: dval_k = dS(j, col_k).
inline std::vector<double> csr_gather(const Md& dS, const std::vector<std::int64_t>& row_ptr,
                                      const std::vector<std::int32_t>& col) {
  std::vector<double> g(col.size());
  for (Eigen::Index j = 0; j < dS.rows(); ++j)
    for (std::int64_t k = row_ptr[j]; k < row_ptr[j + 1]; ++k) g[k] = dS(j, col[k]);
  return g;
}

/// Kronecker product A ⊗ B formed densely.
inline Md kron(const Md& A, const Md& B) {
  Md K(A.rows() * B.rows(), A.cols() * B.cols());
  for (Eigen::Index i = 0; i < A.rows(); ++i)
    for (Eigen::Index j = 0; j < A.cols(); ++j)
      K.block(i * B.rows(), j * B.cols(), B.rows(), B.cols()) = A(i, j) * B;
  return K;
}

} // namespace lowmem::ref
