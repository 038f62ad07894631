// lowmem/adapters/vera.hpp — VeRA (arXiv:2310.11454): ΔW = diag(b)·B·diag(d)·A with frozen random
// A [r, in], B [out, r] that are never stored: they are regenerated from a seed (counter RNG)
// into the workspace on every call, and only d [r] and b [out] are trained.
//
// A and B follow peft's init (kaiming-uniform, a = √5): A_kc = (2·U − 1)/√in from stream
// (seed, 0) at value k·in + c, B_jk = (2·U − 1)/√r from stream (seed, 1) at value j·r + k.
// d and b are folded into B' = diag(b)·B·diag(d) (out×r), so the forward is LoRA's two thin GEMMs
// and the backward needs G = dyᵀ·u [out, r] for the vector gradients:
//   db_j += s·Σ_k B_jk·d_k·G_jk,   dd_k += s·Σ_j b_j·B_jk·G_jk,   du = s·dy·B',
//   dx += dy·W + du·A.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../kernels/random.hpp"
#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

namespace adapters::detail {
template <class WS> struct vera_scratch { float *A, *B, *Bp, *G, *du, *mask, *tmp; };
template <class WS>
vera_scratch<WS> carve_vera(WS& ws, index_t rows, index_t in, index_t out, index_t r, bool backward,
                            const adapter_dropout& drop = {}) {
  vera_scratch<WS> s{};
  s.A = ws.template take<float>(std::size_t(r * in));
  s.B = ws.template take<float>(std::size_t(out * r));
  s.Bp = ws.template take<float>(std::size_t(out * r));
  if (backward) {
    s.G = ws.template take<float>(std::size_t(out * r));
    s.du = ws.template take<float>(std::size_t(rows * r));
  }
  if (drop.p > 0) { // forward: one dropped row block of x; backward: mask + dropped block
    s.mask = ws.template take<float>(std::size_t(row_block * in));
    if (backward) s.tmp = ws.template take<float>(std::size_t(row_block * in));
  }
  return s;
}

template <class Arch>
void vera_generate(std::uint64_t seed, index_t in, index_t out, index_t r, float* A, float* B) {
  random::fill_uniform<Arch>(random::stream{seed, 0}, 0, A, std::size_t(r * in));
  random::fill_uniform<Arch>(random::stream{seed, 1}, 0, B, std::size_t(out * r));
  const float ba = 1.0f / std::sqrt(float(in)), bb = 1.0f / std::sqrt(float(r));
  for (index_t i = 0; i < r * in; ++i) A[i] = (2.0f * A[i] - 1.0f) * ba;
  for (index_t i = 0; i < out * r; ++i) B[i] = (2.0f * B[i] - 1.0f) * bb;
}

inline void validate_vera(const char* fn, const ConstRowRef<float>& x, const ConstRowRef<float>& W,
                          const ConstVecRef& d, const ConstVecRef& b, float s) {
  require_dims(fn, "W", W, W.rows(), x.cols());
  require_rank(fn, index_t(d.size()), x.cols(), W.rows());
  require_equal(fn, "b.size", W.rows(), index_t(b.size()));
  require_scale(fn, s);
}
} // namespace adapters::detail

/// Scratch bytes of vera_forward: (r·in + 2·out·r) floats.
inline std::size_t vera_forward_workspace_bytes(index_t in, index_t out, index_t r) {
  workspace_planner p;
  adapters::detail::carve_vera(p, 0, in, out, r, false);
  return p.bytes();
}
/// Scratch bytes of vera_backward: (r·in + 3·out·r + rows·r) floats.
inline std::size_t vera_backward_workspace_bytes(index_t rows, index_t in, index_t out, index_t r) {
  workspace_planner p;
  adapters::detail::carve_vera(p, rows, in, out, r, true);
  return p.bytes();
}

/// Scratch bytes of vera_forward with adapter dropout: the above plus 128·in floats when p > 0.
inline std::size_t vera_forward_workspace_bytes(index_t in, index_t out, index_t r,
                                                const adapter_dropout& drop) {
  workspace_planner p;
  adapters::detail::carve_vera(p, 0, in, out, r, false, drop);
  return p.bytes();
}
/// Scratch bytes of vera_backward with adapter dropout: the above plus 2·128·in floats when p > 0.
inline std::size_t vera_backward_workspace_bytes(index_t rows, index_t in, index_t out, index_t r,
                                                 const adapter_dropout& drop) {
  workspace_planner p;
  adapters::detail::carve_vera(p, rows, in, out, r, true, drop);
  return p.bytes();
}

/// The frozen VeRA projections of `seed` (A [r, in], B [out, r], overwritten): what the kernels
/// regenerate internally, exposed for inspection, merging and tests. No allocation.
template <class Arch = simd::default_arch>
void vera_projections(std::uint64_t seed, RowRef<float> A, RowRef<float> B) {
  const char* fn = "vera_projections";
  const index_t r = A.rows(), in = A.cols(), out = B.rows();
  adapters::detail::require_rank(fn, r, in, out);
  adapters::detail::require_dims(fn, "B", B, out, r);
  require(A.outerStride() == in && B.outerStride() == r, fn, "A, B", "contiguous", "strided");
  adapters::detail::vera_generate<Arch>(seed, in, out, r, A.data(), B.data());
}

/// VeRA forward: y = x·Wᵀ + b_bias + s·u·(diag(b)·B·diag(d))ᵀ, u = drop(x)·Aᵀ kept for the
/// backward.
///
/// Shapes: x [rows, in], W [out, in] (frozen), bias [out] or nullptr, d [r], b [out], y
/// [rows, out], u [rows, r]. A, B come from `seed` (see the header comment). Dropout (p > 0)
/// masks the adapter input only (peft's vera_dropout), regenerated by vera_backward. Memory:
/// vera_forward_workspace_bytes(in, out, r, drop) = O(r·(in + out)) (+ 128·in floats with
/// dropout). Preconditions: 1 <= r <= min(in, out), s finite (peft's VeRA uses s = 1), p in [0, 1).
template <class Arch = simd::default_arch>
void vera_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias, std::uint64_t seed,
                  ConstVecRef d, ConstVecRef b, float scale, const adapter_dropout& drop,
                  RowRef<float> y, RowRef<float> u, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "vera_forward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows(), r = d.size();
  validate_vera(fn, x, W, d, b, scale);
  require_dropout(fn, drop);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, r);
  require_workspace(fn, ws, vera_forward_workspace_bytes(in, out, r, drop));
  auto s = carve_vera(ws, rows, in, out, r, false, drop);
  vera_generate<Arch>(seed, in, out, r, s.A, s.B);
  const Eigen::Map<const RowMatrixXf> A(s.A, r, in), B(s.B, out, r);
  Eigen::Map<RowMatrixXf> Bp(s.Bp, out, r);
  Bp.noalias() = b.asDiagonal() * B * d.asDiagonal();
  project<Arch>(x, A, drop, u, s.mask);
  y.noalias() = x * W.transpose();
  y.noalias() += (scale * u) * Bp.transpose();
  add_bias(y, bias);
}

/// VeRA forward without dropout (the overload above with p = 0); scratch
/// vera_forward_workspace_bytes(in, out, r).
template <class Arch = simd::default_arch>
void vera_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias, std::uint64_t seed,
                  ConstVecRef d, ConstVecRef b, float scale, RowRef<float> y, RowRef<float> u,
                  workspace ws = {}) {
  vera_forward<Arch>(x, W, bias, seed, d, b, scale, adapter_dropout{}, y, u, ws);
}

/// VeRA backward; ACCUMULATES (+=) into dx, dd, db (formulas in the header comment; with dropout
/// dx += dy·W + drop'(du·A), the same mask as the forward).
/// Shapes: as vera_forward; u from the forward, dy [rows, out], dx [rows, in] or empty (0×0) to
/// skip, dd [r], db [out]. Memory: vera_backward_workspace_bytes(rows, in, out, r, drop).
template <class Arch = simd::default_arch>
void vera_backward(ConstRowRef<float> x, ConstRowRef<float> W, std::uint64_t seed, ConstVecRef d,
                   ConstVecRef b, ConstRowRef<float> u, ConstRowRef<float> dy, float scale,
                   const adapter_dropout& drop, RowRef<float> dx, VecRef dd, VecRef db,
                   workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "vera_backward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows(), r = d.size();
  validate_vera(fn, x, W, d, b, scale);
  require_dropout(fn, drop);
  require_dims(fn, "u", u, rows, r);
  require_dims(fn, "dy", dy, rows, out);
  const bool want_dx = dx.size() != 0;
  if (want_dx) require_dims(fn, "dx", dx, rows, in);
  require_equal(fn, "dd.size", r, index_t(dd.size()));
  require_equal(fn, "db.size", out, index_t(db.size()));
  require_workspace(fn, ws, vera_backward_workspace_bytes(rows, in, out, r, drop));
  auto s = carve_vera(ws, rows, in, out, r, true, drop);
  vera_generate<Arch>(seed, in, out, r, s.A, s.B);
  const Eigen::Map<const RowMatrixXf> A(s.A, r, in), B(s.B, out, r);
  Eigen::Map<RowMatrixXf> Bp(s.Bp, out, r), G(s.G, out, r), du(s.du, rows, r);
  Bp.noalias() = b.asDiagonal() * B * d.asDiagonal();
  G.noalias() = dy.transpose() * u;
  for (index_t j = 0; j < out; ++j) {
    double acc = 0;
    for (index_t k = 0; k < r; ++k) acc += double(B(j, k)) * d[k] * G(j, k);
    db[j] += scale * float(acc);
  }
  for (index_t k = 0; k < r; ++k) {
    double acc = 0;
    for (index_t j = 0; j < out; ++j) acc += double(b[j]) * B(j, k) * G(j, k);
    dd[k] += scale * float(acc);
  }
  if (!want_dx) return;
  du.noalias() = (scale * dy) * Bp;
  dx.noalias() += dy * W;
  if (drop.p == 0) {
    dx.noalias() += du * A;
    return;
  }
  const float keep_scale = 1.0f / (1.0f - drop.p);
  for (index_t i0 = 0; i0 < rows; i0 += row_block) {
    const index_t nb = rows - i0 < row_block ? rows - i0 : row_block;
    random::fill_uniform<Arch>(drop.stream, std::uint64_t(i0 * in), s.mask, std::size_t(nb * in));
    Eigen::Map<RowMatrixXf> g(s.tmp, nb, in);
    g.noalias() = du.middleRows(i0, nb) * A;
    for (index_t t = 0; t < nb; ++t)
      adapters::kernels::dropout_accumulate<Arch>(s.mask + t * in, s.tmp + t * in,
                                                  dx.row(i0 + t).data(), std::size_t(in), drop.p,
                                                  keep_scale);
  }
}

/// VeRA backward without dropout (the overload above with p = 0); scratch
/// vera_backward_workspace_bytes(rows, in, out, r). ACCUMULATES (+=) into dx, dd, db.
template <class Arch = simd::default_arch>
void vera_backward(ConstRowRef<float> x, ConstRowRef<float> W, std::uint64_t seed, ConstVecRef d,
                   ConstVecRef b, ConstRowRef<float> u, ConstRowRef<float> dy, float scale,
                   RowRef<float> dx, VecRef dd, VecRef db, workspace ws = {}) {
  vera_backward<Arch>(x, W, seed, d, b, u, dy, scale, adapter_dropout{}, dx, dd, db, ws);
}

} // namespace lowmem
