// lowmem/adapters/dora.hpp — DoRA (arXiv:2402.09353): W' = diag(m / n) · V, V = W + s·B·A,
// n_j = ‖V_j‖ over `in` (row-wise, the peft convention), m [out] the trainable magnitude.
//
// peft forms B·A (out×in) to get the norms; here they come from r-sized pieces only:
//   n_j² = ‖W_j‖² + 2s·B_j·P_j + s²·B_j·G·B_jᵀ,   P = A·Wᵀ [r, out],  G = A·Aᵀ [r, r],
// one GEMM of r·in·out multiply-adds (the cost of one LoRA thin GEMM). The forward is LoRA's
// followed by a per-column scale c = m / n. The backward treats n as a constant (the paper's
// recommendation, and what peft does by detaching the norm) or, on request, differentiates
// through n; the extra terms again only need P, G and r-sized products:
//   e_j = -h_j / n_j²,  h_j = Σ_rows dy ⊙ (y - b)   (so dm_j = h_j / m_j)
//   dB += s·diag(e)·(Pᵀ + s·B·G),   dA += s·(diag(e)B)ᵀ·W + s²·((diag(e)B)ᵀ·B)·A.
// The scaled gradient dy ⊙ c is formed 128 rows at a time (no rows×out temporary).
//
// Threads (OpenMP, core/threading.hpp): the GEMMs on full operands are Eigen's (threaded by
// Eigen); everything else is split by lowmem::parallel_for so that no serial pass over a
// rows×out or out×in operand remains: row norms (by rows of W), the column scale of y (by rows),
// h (by 64-column blocks), and the 128-row blocks of the backward (by blocks, one D buffer per
// thread: each block's GEMMs D·W and D·B are the same serial Eigen calls whatever the thread
// count); each pass states its work per item, so small shapes stay serial. Each output element is
// computed by the same operations for any thread count, so these passes are bitwise identical on 1
// and N threads (Eigen's own threaded GEMMs aside).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../core/threading.hpp"
#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

namespace adapters::detail {

template <class WS> struct dora_scratch {
  float *P, *G, *BG, *c, *h, *du, *D, *Be, *K, *mask, *tmp;
};
/// Carves DoRA's scratch; the backward's `threads` D blocks (128×out each) come last, in one piece.
template <class WS>
dora_scratch<WS> carve_dora(WS& ws, index_t rows, index_t out, index_t r, bool backward, bool exact,
                            index_t in = 0, const adapter_dropout& drop = {}, int threads = 1) {
  dora_scratch<WS> s{};
  s.P = ws.template take<float>(std::size_t(r * out));
  s.G = ws.template take<float>(std::size_t(r * r));
  s.BG = ws.template take<float>(std::size_t(out * r));
  if (drop.p > 0) { // forward: one dropped row block of x; backward: mask + dropped block
    s.mask = ws.template take<float>(std::size_t(row_block * in));
    if (backward) s.tmp = ws.template take<float>(std::size_t(row_block * in));
  }
  if (!backward) return s;
  s.c = ws.template take<float>(std::size_t(out));
  s.h = ws.template take<float>(std::size_t(out));
  s.du = ws.template take<float>(std::size_t(rows * r));
  if (exact) {
    s.Be = ws.template take<float>(std::size_t(out * r));
    s.K = ws.template take<float>(std::size_t(r * r));
  }
  s.D = ws.template take<float>(std::size_t(threads) * std::size_t(row_block * out));
  return s;
}

/// n_j = ‖W_j + s(BA)_j‖ without B·A; fills P = A·Wᵀ, G = A·Aᵀ, BG = B·G as by-products.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void dora_norms_impl(const ConstRowRef<float>& W, const ConstRowRef<float>& A,
                            const ConstRowRef<float>& B, float s, float* norms, float* Pd,
                            float* Gd, float* BGd) {
  const index_t out = W.rows(), r = A.rows();
  Eigen::Map<RowMatrixXf> P(Pd, r, out), G(Gd, r, r), BG(BGd, out, r);
  P.noalias() = A * W.transpose();
  G.noalias() = A * A.transpose();
  BG.noalias() = B * G;
  // ‖W_j‖² reads all of W: split by rows (each row is one thread's, same code for any split);
  // a row reads `in` floats and does 2r multiply-adds
  parallel_for(0, out, item_work{W.cols() + 2 * r}, [&](index_t j0, index_t j1, int) {
    for (index_t j = j0; j < j1; ++j) {
      double n2 = double(W.row(j).squaredNorm());
      double cross = 0, quad = 0;
      for (index_t k = 0; k < r; ++k) {
        cross += double(B(j, k)) * double(P(k, j));
        quad += double(BG(j, k)) * double(B(j, k));
      }
      n2 += 2.0 * double(s) * cross + double(s) * double(s) * quad;
      norms[j] = float(std::sqrt(n2 > 0 ? n2 : 0.0));
    }
  });
}

/// y.row(i) *= c for every row, split by rows.
inline void scale_columns(RowRef<float>& y, const float* c) {
  const Eigen::Map<const Eigen::RowVectorXf> cv(c, y.cols());
  parallel_for(0, y.rows(), item_work{2 * y.cols()}, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) y.row(i).array() *= cv.array();
  });
}

/// h_j = Σ_i dy_ij·(y_ij − b_j) (b = 0 when bias is null), summed over rows in row order; split
/// by 64-column blocks, so each h_j sees the same operations whatever the thread count.
inline void column_dots(const ConstRowRef<float>& dy, const ConstRowRef<float>& y,
                        const float* bias, float* hd) {
  constexpr index_t cb = 64;
  const index_t rows = dy.rows(), out = dy.cols();
  Eigen::Map<Eigen::RowVectorXf> h(hd, out);
  h.setZero();
  // a block reads cb columns of dy and y over all rows
  parallel_for(0, (out + cb - 1) / cb, item_work{2 * cb * rows}, [&](index_t b0, index_t b1, int) {
    const index_t j0 = b0 * cb, n = (b1 * cb < out ? b1 * cb : out) - j0;
    auto hs = h.segment(j0, n);
    if (bias) {
      const Eigen::Map<const Eigen::RowVectorXf> b(bias + j0, n);
      for (index_t i = 0; i < rows; ++i)
        hs.array() += dy.row(i).segment(j0, n).array() * (y.row(i).segment(j0, n) - b).array();
    } else {
      for (index_t i = 0; i < rows; ++i)
        hs.array() += dy.row(i).segment(j0, n).array() * y.row(i).segment(j0, n).array();
    }
  });
}

inline void validate_dora(const char* fn, const ConstRowRef<float>& x, const ConstRowRef<float>& W,
                          const ConstRowRef<float>& A, const ConstRowRef<float>& B,
                          const ConstVecRef& m, float s) {
  validate_lora(fn, x.rows(), x.cols(), W.rows(), W, A, B, s, {});
  require_equal(fn, "m.size", W.rows(), index_t(m.size()));
  for (index_t j = 0; j < m.size(); ++j)
    if (!(std::isfinite(m[j]) && m[j] != 0.0f))
      lowmem::detail::throw_invalid(fn, "m", "finite, non-zero entries",
                                    "m[" + lowmem::detail::to_text(j) +
                                        "] = " + lowmem::detail::to_text(m[j]));
}

} // namespace adapters::detail

/// Scratch bytes of dora_norms and dora_forward: (2·out + r)·r floats.
inline std::size_t dora_forward_workspace_bytes(index_t out, index_t r) {
  workspace_planner p;
  adapters::detail::carve_dora(p, 0, out, r, false, false);
  return p.bytes();
}

/// Scratch bytes of dora_backward: rows·r + 128·out·T + O(r·out) floats, T = max_threads() at
/// this call (one 128-row block of dy ⊙ c per thread; dora_backward uses as many threads for its
/// block loop as the workspace has blocks, at least one).
inline std::size_t dora_backward_workspace_bytes(index_t rows, index_t out, index_t r,
                                                 bool exact = false) {
  workspace_planner p;
  adapters::detail::carve_dora(p, rows, out, r, true, exact, 0, {}, max_threads());
  return p.bytes();
}

/// Scratch bytes of dora_forward with adapter dropout: the above plus 128·in floats when p > 0.
inline std::size_t dora_forward_workspace_bytes(index_t in, index_t out, index_t r,
                                                const adapter_dropout& drop) {
  workspace_planner p;
  adapters::detail::carve_dora(p, 0, out, r, false, false, in, drop);
  return p.bytes();
}

/// Scratch bytes of dora_backward with adapter dropout: the above plus 2·128·in floats when p > 0.
inline std::size_t dora_backward_workspace_bytes(index_t rows, index_t in, index_t out, index_t r,
                                                 bool exact, const adapter_dropout& drop) {
  workspace_planner p;
  adapters::detail::carve_dora(p, rows, out, r, true, exact, in, drop, max_threads());
  return p.bytes();
}

/// Row norms n_j = ‖W_j + s·(B·A)_j‖ computed without forming B·A (see the header comment).
/// Use it to initialise the magnitude (peft: m = n at init). Shapes: W [out, in], A [r, in],
/// B [out, r], norms [out] (overwritten). Memory: dora_forward_workspace_bytes(out, r).
/// Numerics: fp32 GEMMs, the per-row combination in double; when the adapter cancels most of
/// W_j the relative error grows like ‖W_j‖² / n_j² · 1e-7.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void dora_norms(ConstRowRef<float> W, ConstRowRef<float> A, ConstRowRef<float> B,
                       float scale, VecRef norms, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "dora_norms";
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  require_rank(fn, r, in, out);
  require_dims(fn, "A", A, r, in);
  require_dims(fn, "B", B, out, r);
  require_scale(fn, scale);
  require_equal(fn, "norms.size", out, index_t(norms.size()));
  require_workspace(fn, ws, dora_forward_workspace_bytes(out, r));
  auto s = carve_dora(ws, 0, out, r, false, false);
  dora_norms_impl(W, A, B, scale, norms.data(), s.P, s.G, s.BG);
}

/// DoRA forward: y = (x·Wᵀ + s·u·Bᵀ) ⊙ (m / n) (per output column) + b, u = drop(x)·Aᵀ.
///
/// Shapes: x [rows, in], W [out, in] (frozen), bias [out] or nullptr, A [r, in], B [out, r],
/// m [out] (magnitude, non-zero), y [rows, out], u [rows, r] and norms [out] (outputs kept for
/// dora_backward). Dropout (p > 0) masks the adapter-path input only, as in lora_forward; the
/// mask comes from drop.stream and is regenerated by dora_backward. (peft additionally feeds the
/// dropped x through (m/n − 1)·W, which costs a second full GEMM; here the frozen path always
/// sees the clean x, the same model at p = 0.)
/// Memory: dora_forward_workspace_bytes(in, out, r, drop) = O(r·out) (+ 128·in floats with
/// dropout); no B·A, no rows×out temporary. Preconditions: as lora_forward, m finite and
/// non-zero (peft initialises m = n).
template <class Arch = simd::default_arch>
void dora_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                  ConstRowRef<float> A, ConstRowRef<float> B, ConstVecRef m, float scale,
                  const adapter_dropout& drop, RowRef<float> y, RowRef<float> u, VecRef norms,
                  workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "dora_forward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows(), r = A.rows();
  validate_dora(fn, x, W, A, B, m, scale);
  require_dropout(fn, drop);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, r);
  require_equal(fn, "norms.size", out, index_t(norms.size()));
  require_workspace(fn, ws, dora_forward_workspace_bytes(in, out, r, drop));
  auto s = carve_dora(ws, rows, out, r, false, false, in, drop);
  dora_norms_impl(W, A, B, scale, norms.data(), s.P, s.G, s.BG);
  project<Arch>(x, A, drop, u, s.mask);
  y.noalias() = x * W.transpose();
  y.noalias() += (scale * u) * B.transpose();
  // column scale c = m / n; s.P is free again and holds c
  for (index_t j = 0; j < out; ++j) s.P[j] = m[j] / norms[j];
  scale_columns(y, s.P);
  add_bias(y, bias);
}

/// DoRA forward without dropout (the overload above with p = 0); scratch
/// dora_forward_workspace_bytes(out, r).
template <class = void> // instantiated only when called: see README, "Compile time"
inline void dora_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                         ConstRowRef<float> A, ConstRowRef<float> B, ConstVecRef m, float scale,
                         RowRef<float> y, RowRef<float> u, VecRef norms, workspace ws = {}) {
  dora_forward(x, W, bias, A, B, m, scale, adapter_dropout{}, y, u, norms, ws);
}

/// DoRA backward; ACCUMULATES (+=) into dx, dA, dB, dm. With exact = false the norm n is a
/// constant (paper §4.3, peft's detach): with D = dy ⊙ (m/n),
///   dm_j += Σ_rows dy ⊙ (y - b) / m_j,  dB += s·Dᵀ·u,  du = s·D·B,  dA += duᵀ·x,
///   dx += D·W + du·A;
/// with exact = true the gradient through n is added (header comment), at O(r·in·out) extra.
///
/// Shapes: as dora_forward; y, u and norms are the forward's outputs (y unmodified), dy
/// [rows, out], dx [rows, in] or empty (0×0) to skip, dA [r, in], dB [out, r], dm [out].
/// With dropout (the same drop as the forward) dA += duᵀ·drop(x) and dx += D·W + drop'(du·A).
/// Memory: dora_backward_workspace_bytes(rows, in, out, r, exact, drop) (sized for max_threads()
/// at that call; a workspace with fewer 128×out blocks runs the block loop on fewer threads).
/// Threads: lowmem's own passes (h, dm, the 128-row blocks) give bitwise the same results on 1
/// and N threads; the full-size GEMMs (dyᵀ·u, duᵀ·x, du·A) are Eigen's, threaded by Eigen.
/// Preconditions: as dora_forward, norms > 0.
template <class Arch = simd::default_arch>
void dora_backward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                   ConstRowRef<float> A, ConstRowRef<float> B, ConstVecRef m, ConstRowRef<float> u,
                   ConstVecRef norms, ConstRowRef<float> y, ConstRowRef<float> dy, float scale,
                   bool exact, const adapter_dropout& drop, RowRef<float> dx, RowRef<float> dA,
                   RowRef<float> dB, VecRef dm, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "dora_backward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows(), r = A.rows();
  validate_dora(fn, x, W, A, B, m, scale);
  require_dims(fn, "u", u, rows, r);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "dy", dy, rows, out);
  require_equal(fn, "norms.size", out, index_t(norms.size()));
  for (index_t j = 0; j < out; ++j) require_positive(fn, "norms", norms[j]);
  const bool want_dx = dx.size() != 0;
  if (want_dx) require_dims(fn, "dx", dx, rows, in);
  require_dims(fn, "dA", dA, r, in);
  require_dims(fn, "dB", dB, out, r);
  require_equal(fn, "dm.size", out, index_t(dm.size()));
  require_dropout(fn, drop);
  // at least one D block; more when the workspace holds them (sized for max_threads())
  const std::size_t need1 = [&] {
    workspace_planner p;
    carve_dora(p, rows, out, r, true, exact, in, drop, 1);
    return p.bytes();
  }();
  require_workspace(fn, ws, need1);
  const std::size_t block_bytes = std::size_t(row_block * out) * sizeof(float);
  const std::size_t spare = (ws.size() - ws.used() - need1) / block_bytes;
  const int threads = int(std::min<std::size_t>(std::size_t(max_threads()), 1 + spare));
  auto s = carve_dora(ws, rows, out, r, true, exact, in, drop, threads);

  Eigen::Map<Eigen::RowVectorXf> c(s.c, out), h(s.h, out);
  column_dots(dy, y, bias, s.h);
  for (index_t j = 0; j < out; ++j) {
    c[j] = m[j] / norms[j];
    dm[j] += h[j] / m[j];
  }
  // dB += s·Dᵀ·u = s·diag(c)·(dyᵀ·u): one full GEMM into BG (free until the exact part)
  Eigen::Map<RowMatrixXf> T(s.BG, out, r);
  T.noalias() = dy.transpose() * u;
  for (index_t j = 0; j < out; ++j) dB.row(j) += (scale * c[j]) * T.row(j);
  // 128-row blocks of D = dy ⊙ c, split by blocks over threads (thread t uses D block t):
  // dx_blk += D·W, du_blk = s·D·B. Inside the parallel region Eigen's GEMMs run serially.
  Eigen::Map<RowMatrixXf> du(s.du, rows, r);
  // a block: D (row_block·out floats), then row_block·out·(in + r) multiply-adds (D·W, D·B)
  const index_t nblocks = (rows + row_block - 1) / row_block;
  parallel_for(
      0, nblocks, item_work{row_block * out * (1 + (want_dx ? in : 0) + r)},
      [&](index_t b0, index_t b1, int t) {
        float* Dd = s.D + std::size_t(t) * std::size_t(row_block * out);
        for (index_t blk = b0; blk < b1; ++blk) {
          const index_t i0 = blk * row_block;
          const index_t nb = rows - i0 < row_block ? rows - i0 : row_block;
          Eigen::Map<RowMatrixXf> D(Dd, nb, out);
          for (index_t k = 0; k < nb; ++k) D.row(k) = dy.row(i0 + k).cwiseProduct(c);
          if (want_dx) dx.middleRows(i0, nb).noalias() += D * W;
          du.middleRows(i0, nb).noalias() = (scale * D) * B;
        }
      },
      threads);
  input_backward<Arch>(x, A, du, drop, want_dx, dA, dx, s.mask, s.tmp);
  if (!exact) return;

  // gradient through the norm: dV = diag(e)·V, e_j = -h_j / n_j²
  Eigen::Map<RowMatrixXf> P(s.P, r, out), G(s.G, r, r), BG(s.BG, out, r), Be(s.Be, out, r),
      K(s.K, r, r);
  P.noalias() = A * W.transpose();
  G.noalias() = A * A.transpose();
  BG.noalias() = B * G;
  for (index_t j = 0; j < out; ++j) {
    const float e = -h[j] / (norms[j] * norms[j]);
    Be.row(j) = e * B.row(j);
    // dB_j += s·e_j·(P[:, j]ᵀ + s·(B·G)_j)
    dB.row(j) += (scale * e) * (P.col(j).transpose() + scale * BG.row(j));
  }
  dA.noalias() += (scale * Be.transpose()) * W;
  K.noalias() = Be.transpose() * B;
  dA.noalias() += (scale * scale * K) * A;
}

/// DoRA backward without dropout (the overload above with p = 0); scratch
/// dora_backward_workspace_bytes(rows, out, r, exact). ACCUMULATES (+=) into dx, dA, dB, dm.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void dora_backward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                          ConstRowRef<float> A, ConstRowRef<float> B, ConstVecRef m,
                          ConstRowRef<float> u, ConstVecRef norms, ConstRowRef<float> y,
                          ConstRowRef<float> dy, float scale, bool exact, RowRef<float> dx,
                          RowRef<float> dA, RowRef<float> dB, VecRef dm, workspace ws = {}) {
  dora_backward(x, W, bias, A, B, m, u, norms, y, dy, scale, exact, adapter_dropout{}, dx, dA, dB,
                dm, ws);
}

} // namespace lowmem
