// lowmem/adapters/lora.hpp — LoRA (arXiv:2106.09685) fused forward/backward around a frozen W,
// with rsLoRA scaling (arXiv:2312.03732), adapter dropout from the counter RNG, and blocked
// in-place merge/unmerge.
//
// Memory model: the only activation kept between forward and backward is the r-wide u = drop(x)·Aᵀ
// (rows×r); the backward needs rows×r scratch for du; dropout adds two row blocks of x
// (2·128·in floats). No out×in or rows×in temporary is formed: the adapter is applied as two
// thin GEMMs, never as B·A.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstring>

#include "../core/random.hpp"
#include "../core/threading.hpp"
#include "../kernels/adapters.hpp"
#include "../kernels/random.hpp"
#include "common.hpp"

namespace lowmem {

namespace adapters::detail {

template <class WS> float* carve_lora_forward(WS& ws, index_t in, const adapter_dropout& d) {
  return d.p > 0 ? ws.template take<float>(std::size_t(row_block * in)) : nullptr;
}
template <class WS> struct lora_bwd_scratch {
  float* du;
  float* mask;
  float* tmp;
};
template <class WS>
lora_bwd_scratch<WS> carve_lora_backward(WS& ws, index_t rows, index_t in, index_t r,
                                         const adapter_dropout& d) {
  lora_bwd_scratch<WS> s{};
  s.du = ws.template take<float>(std::size_t(rows * r));
  if (d.p > 0) {
    s.mask = ws.template take<float>(std::size_t(row_block * in));
    s.tmp = ws.template take<float>(std::size_t(row_block * in));
  }
  return s;
}

/// Shapes shared by the adapter-only pair (no W): A [r, in], B [out, r], 1 <= r <= min(in, out).
inline void validate_adapter(const char* fn, index_t in, index_t out, const ConstRowRef<float>& A,
                             const ConstRowRef<float>& B, float scale,
                             const adapter_dropout& drop) {
  require_rank(fn, A.rows(), in, out);
  require_dims(fn, "A", A, A.rows(), in);
  require_dims(fn, "B", B, out, A.rows());
  require_scale(fn, scale);
  require_dropout(fn, drop);
}

/// Shapes shared by LoRA forward and backward.
inline void validate_lora(const char* fn, index_t rows, index_t in, index_t out,
                          const ConstRowRef<float>& W, const ConstRowRef<float>& A,
                          const ConstRowRef<float>& B, float scale, const adapter_dropout& drop) {
  require_dims(fn, "W", W, out, in);
  validate_adapter(fn, in, out, A, B, scale, drop);
  (void)rows;
}

/// y.row(i) += bias for every row (nothing when bias is null); split by rows over threads (a row
/// reads and writes cols floats; small shapes stay serial, see core/threading.hpp).
inline void add_bias(RowRef<float>& y, const float* bias) {
  if (!bias) return;
  const Eigen::Map<const Eigen::RowVectorXf> b(bias, y.cols());
  parallel_for(0, y.rows(), item_work{2 * y.cols()}, [&](index_t i0, index_t i1, int) {
    for (index_t i = i0; i < i1; ++i) y.row(i) += b;
  });
}

/// u = drop(x)·Aᵀ; xd is row_block×in scratch when dropout is on.
template <class Arch>
void project(const ConstRowRef<float>& x, const ConstRowRef<float>& A, const adapter_dropout& drop,
             RowRef<float>& u, float* xd) {
  const index_t rows = x.rows(), in = x.cols();
  if (drop.p == 0) {
    u.noalias() = x * A.transpose();
    return;
  }
  const float keep_scale = 1.0f / (1.0f - drop.p);
  for (index_t i0 = 0; i0 < rows; i0 += row_block) {
    const index_t nb = rows - i0 < row_block ? rows - i0 : row_block;
    random::fill_uniform<Arch>(drop.stream, std::uint64_t(i0 * in), xd, std::size_t(nb * in));
    for (index_t t = 0; t < nb; ++t)
      adapters::kernels::dropout_apply<Arch>(x.row(i0 + t).data(), xd + t * in, std::size_t(in),
                                             drop.p, keep_scale);
    const Eigen::Map<const RowMatrixXf> xb(xd, nb, in);
    u.middleRows(i0, nb).noalias() = xb * A.transpose();
  }
}

/// The adapter-input half of every low-rank backward: dA += duᵀ·drop(x), and when want_dx,
/// dx += drop'(du·A) (same mask, same 1/(1-p) scale). mask and tmp are row_block×in scratch,
/// used only with dropout (the mask is regenerated from the stream, never stored).
template <class Arch, class DU>
void input_backward(const ConstRowRef<float>& x, const ConstRowRef<float>& A, const DU& du,
                    const adapter_dropout& drop, bool want_dx, RowRef<float>& dA, RowRef<float>& dx,
                    float* mask, float* tmp) {
  const index_t rows = x.rows(), in = x.cols();
  if (drop.p == 0) {
    dA.noalias() += du.transpose() * x;
    if (want_dx) dx.noalias() += du * A;
    return;
  }
  const float keep_scale = 1.0f / (1.0f - drop.p);
  for (index_t i0 = 0; i0 < rows; i0 += row_block) {
    const index_t nb = rows - i0 < row_block ? rows - i0 : row_block;
    random::fill_uniform<Arch>(drop.stream, std::uint64_t(i0 * in), mask, std::size_t(nb * in));
    // tmp = drop(x) block; the uniforms stay in mask for the dx term
    std::memcpy(tmp, mask, std::size_t(nb * in) * sizeof(float));
    for (index_t t = 0; t < nb; ++t)
      adapters::kernels::dropout_apply<Arch>(x.row(i0 + t).data(), tmp + t * in, std::size_t(in),
                                             drop.p, keep_scale);
    const Eigen::Map<const RowMatrixXf> xb(tmp, nb, in);
    dA.noalias() += du.middleRows(i0, nb).transpose() * xb;
    if (!want_dx) continue;
    Eigen::Map<RowMatrixXf> g(tmp, nb, in);
    g.noalias() = du.middleRows(i0, nb) * A;
    for (index_t t = 0; t < nb; ++t)
      adapters::kernels::dropout_accumulate<Arch>(
          mask + t * in, tmp + t * in, dx.row(i0 + t).data(), std::size_t(in), drop.p, keep_scale);
  }
}

/// The adapter half of the LoRA forward (validated by the caller): u = drop(x)·Aᵀ,
/// y += s·u·Bᵀ. xd: row_block×in scratch with dropout.
template <class Arch>
void adapter_forward(const ConstRowRef<float>& x, const ConstRowRef<float>& A,
                     const ConstRowRef<float>& B, float scale, const adapter_dropout& drop,
                     RowRef<float>& y, RowRef<float>& u, float* xd) {
  project<Arch>(x, A, drop, u, xd);
  y.noalias() += (scale * u) * B.transpose();
}

/// The adapter half of the LoRA backward (validated by the caller): du = s·dy·B,
/// dB += s·dyᵀ·u, dA += duᵀ·drop(x), dx += drop'(du·A) when dx is non-empty.
template <class Arch, class WS>
void adapter_backward(const ConstRowRef<float>& x, const ConstRowRef<float>& A,
                      const ConstRowRef<float>& B, const ConstRowRef<float>& u,
                      const ConstRowRef<float>& dy, float scale, const adapter_dropout& drop,
                      RowRef<float>& dx, RowRef<float>& dA, RowRef<float>& dB, WS& ws) {
  const index_t rows = x.rows(), in = x.cols(), r = A.rows();
  const auto s = carve_lora_backward(ws, rows, in, r, drop);
  Eigen::Map<RowMatrixXf> du(s.du, rows, r);
  du.noalias() = (scale * dy) * B;
  dB.noalias() += (scale * dy.transpose()) * u;
  input_backward<Arch>(x, A, du, drop, dx.size() != 0, dA, dx, s.mask, s.tmp);
}

} // namespace adapters::detail

/// Scratch bytes of lora_forward / lora_project: 0 without dropout, 128·in floats with it.
inline std::size_t lora_forward_workspace_bytes(index_t in, const adapter_dropout& drop = {}) {
  workspace_planner p;
  adapters::detail::carve_lora_forward(p, in, drop);
  return p.bytes();
}

/// Scratch bytes of lora_backward: rows·r floats for du, plus 2·128·in floats with dropout.
inline std::size_t lora_backward_workspace_bytes(index_t rows, index_t in, index_t r,
                                                 const adapter_dropout& drop = {}) {
  workspace_planner p;
  adapters::detail::carve_lora_backward(p, rows, in, r, drop);
  return p.bytes();
}

/// u = drop(x)·Aᵀ alone: recomputes the saved activation (the "recompute instead of keep"
/// option: call it before lora_backward instead of keeping u from the forward).
/// Shapes: x [rows, in], A [r, in], u [rows, r]. Memory: workspace of
/// lora_forward_workspace_bytes(in, drop); no heap allocation of its own.
template <class Arch = simd::default_arch>
void lora_project(ConstRowRef<float> x, ConstRowRef<float> A, const adapter_dropout& drop,
                  RowRef<float> u, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "lora_project";
  require_dims(fn, "A", A, A.rows(), x.cols());
  require_positive(fn, "A.rows", A.rows());
  require_dims(fn, "u", u, x.rows(), A.rows());
  require_dropout(fn, drop);
  require_workspace(fn, ws, lora_forward_workspace_bytes(x.cols(), drop));
  float* xd = carve_lora_forward(ws, x.cols(), drop);
  project<Arch>(x, A, drop, u, xd);
}

/// LoRA forward: y = x·Wᵀ + b + s·u·Bᵀ with u = drop(x)·Aᵀ kept for the backward.
///
/// Shapes (row-major): x [rows, in], W [out, in] (frozen), bias [out] or nullptr, A [r, in],
/// B [out, r], y [rows, out] (overwritten), u [rows, r] (overwritten; pass it to lora_backward).
/// s = lora_scale(alpha, r, rslora). Dropout (p > 0) masks the adapter input only, as peft does.
/// Memory: lora_forward_workspace_bytes(in, drop) of scratch; the GEMMs are Eigen's (which may
/// allocate its packing buffers, O(cache) bytes, for large shapes). fp32 accumulation.
/// Preconditions: 1 <= r <= min(in, out), s finite, p in [0, 1); y must not alias x.
template <class Arch = simd::default_arch>
void lora_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                  ConstRowRef<float> A, ConstRowRef<float> B, float scale,
                  const adapter_dropout& drop, RowRef<float> y, RowRef<float> u,
                  workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "lora_forward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows();
  validate_lora(fn, rows, in, out, W, A, B, scale, drop);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, A.rows());
  require_workspace(fn, ws, lora_forward_workspace_bytes(in, drop));
  float* xd = carve_lora_forward(ws, in, drop);
  y.noalias() = x * W.transpose();
  adapter_forward<Arch>(x, A, B, scale, drop, y, u, xd);
  add_bias(y, bias);
}

/// LoRA adapter terms alone, for a base layer applied by the caller (a quantized W as in
/// QLoRA, a sharded or fused base): y += s·u·Bᵀ with u = drop(x)·Aᵀ (overwritten; keep it for
/// lora_adapter_backward). ACCUMULATES into y. lora_forward is y = x·Wᵀ, then this, then + b.
/// Shapes: x [rows, in], A [r, in], B [out, r], y [rows, out], u [rows, r].
/// Memory: lora_forward_workspace_bytes(in, drop). Preconditions as lora_forward.
template <class Arch = simd::default_arch>
void lora_adapter_forward(ConstRowRef<float> x, ConstRowRef<float> A, ConstRowRef<float> B,
                          float scale, const adapter_dropout& drop, RowRef<float> y,
                          RowRef<float> u, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "lora_adapter_forward";
  const index_t rows = x.rows(), in = x.cols(), out = B.rows();
  validate_adapter(fn, in, out, A, B, scale, drop);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, A.rows());
  require_workspace(fn, ws, lora_forward_workspace_bytes(in, drop));
  float* xd = carve_lora_forward(ws, in, drop);
  adapter_forward<Arch>(x, A, B, scale, drop, y, u, xd);
}

/// LoRA backward; ACCUMULATES (+=) into dx, dA, dB:
///   du = s·dy·B,  dB += s·dyᵀ·u,  dA += duᵀ·drop(x),  dx += dy·W + drop'(du·A)
/// (drop' applies the same mask and 1/(1-p) scale as the forward). W is frozen: no dW.
///
/// Shapes: x, W, A, B, scale, drop as in lora_forward; u [rows, r] from the forward (or
/// lora_project); dy [rows, out]; dx [rows, in] or an empty (0×0) matrix to skip the input
/// gradient (first layer); dA [r, in]; dB [out, r].
/// Memory: lora_backward_workspace_bytes(rows, in, r, drop) of scratch (rows·r floats for du).
/// Numerics: fp32 GEMMs (Eigen). Preconditions as lora_forward.
template <class Arch = simd::default_arch>
void lora_backward(ConstRowRef<float> x, ConstRowRef<float> W, ConstRowRef<float> A,
                   ConstRowRef<float> B, ConstRowRef<float> u, ConstRowRef<float> dy, float scale,
                   const adapter_dropout& drop, RowRef<float> dx, RowRef<float> dA,
                   RowRef<float> dB, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "lora_backward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows(), r = A.rows();
  validate_lora(fn, rows, in, out, W, A, B, scale, drop);
  require_dims(fn, "u", u, rows, r);
  require_dims(fn, "dy", dy, rows, out);
  const bool want_dx = dx.size() != 0;
  if (want_dx) require_dims(fn, "dx", dx, rows, in);
  require_dims(fn, "dA", dA, r, in);
  require_dims(fn, "dB", dB, out, r);
  require_workspace(fn, ws, lora_backward_workspace_bytes(rows, in, r, drop));
  if (want_dx) dx.noalias() += dy * W;
  adapter_backward<Arch>(x, A, B, u, dy, scale, drop, dx, dA, dB, ws);
}

/// LoRA adapter gradients alone (no base W; the caller adds the base's dy·W, e.g. from a
/// quantized weight); ACCUMULATES (+=) into dx, dA, dB:
///   du = s·dy·B,  dB += s·dyᵀ·u,  dA += duᵀ·drop(x),  dx += drop'(du·A).
/// lora_backward is dx += dy·W, then this. Shapes as lora_backward without W (out = B.rows());
/// dx may be empty (0×0) to skip. Memory: lora_backward_workspace_bytes(rows, in, r, drop).
template <class Arch = simd::default_arch>
void lora_adapter_backward(ConstRowRef<float> x, ConstRowRef<float> A, ConstRowRef<float> B,
                           ConstRowRef<float> u, ConstRowRef<float> dy, float scale,
                           const adapter_dropout& drop, RowRef<float> dx, RowRef<float> dA,
                           RowRef<float> dB, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "lora_adapter_backward";
  const index_t rows = x.rows(), in = x.cols(), out = B.rows(), r = A.rows();
  validate_adapter(fn, in, out, A, B, scale, drop);
  require_dims(fn, "u", u, rows, r);
  require_dims(fn, "dy", dy, rows, out);
  if (dx.size() != 0) require_dims(fn, "dx", dx, rows, in);
  require_dims(fn, "dA", dA, r, in);
  require_dims(fn, "dB", dB, out, r);
  require_workspace(fn, ws, lora_backward_workspace_bytes(rows, in, r, drop));
  adapter_backward<Arch>(x, A, B, u, dy, scale, drop, dx, dA, dB, ws);
}

/// Merge: W <- W + s·B·A in place (unmerge with -s, or lora_unmerge). Blocked over 128 rows of W
/// (each block is one small GEMM B[rows_blk, r]·A), so no out×in temporary exists.
/// Shapes: W [out, in], A [r, in], B [out, r]. Numerics: merge then unmerge returns W within
/// fp32 rounding of |W| + |s·B·A| per element. No allocation beyond Eigen's GEMM packing.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void lora_merge(RowRef<float> W, ConstRowRef<float> A, ConstRowRef<float> B, float scale) {
  using namespace adapters::detail;
  const char* fn = "lora_merge";
  const index_t out = W.rows(), in = W.cols();
  require_rank(fn, A.rows(), in, out);
  require_dims(fn, "A", A, A.rows(), in);
  require_dims(fn, "B", B, out, A.rows());
  require_scale(fn, scale);
  for (index_t i0 = 0; i0 < out; i0 += row_block) {
    const index_t nb = out - i0 < row_block ? out - i0 : row_block;
    W.middleRows(i0, nb).noalias() += (scale * B.middleRows(i0, nb)) * A;
  }
}

/// Unmerge: W <- W - s·B·A in place (the inverse of lora_merge up to fp32 rounding).
template <class = void> // instantiated only when called: see README, "Compile time"
inline void lora_unmerge(RowRef<float> W, ConstRowRef<float> A, ConstRowRef<float> B, float scale) {
  lora_merge(W, A, B, -scale);
}

} // namespace lowmem
