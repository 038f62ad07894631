// lowmem/adapters/multi_lora.hpp — several LoRA adapters on one frozen W, applied in one pass:
//   y = x·Wᵀ + b + Σ_k s_k·(drop_k(x)·A_kᵀ)·B_kᵀ,   A_k [r_k, in], B_k [out, r_k].
//
// Why one pass: calling lora_forward once per adapter re-runs the frozen GEMM x·Wᵀ and re-reads
// x and dy for every adapter. Here the adapters are stacked into A_cat = [A_1; …; A_K]
// [R, in] and B_cat = [s_1·B_1, …, s_K·B_K] [out, R] (R = Σ r_k, copied into the workspace:
// O(R·(in + out)) floats), so the whole list costs one frozen GEMM per direction plus four thin
// GEMMs of width R — the same work as one LoRA of rank R:
//   forward   u = x·A_catᵀ (the r_k columns of an adapter with dropout are recomputed from its
//             own masked x), y = x·Wᵀ + u·B_catᵀ
//   backward  du = dy·B_cat, G = dyᵀ·u → dB_k += s_k·G[:, cols_k], dA_cat = duᵀ·x → dA_k,
//             dx += dy·W + du·A_cat (an adapter with dropout takes its masked path instead).
// Each adapter keeps its own dropout (p_k, stream_k), as peft's per-adapter lora_dropout.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstring>

#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

/// One adapter of a multi-LoRA list (read-only). A: r×in, B: out×r row-major views (any leading
/// dimension); scale s = lora_scale(alpha, r, rslora); drop: this adapter's dropout.
struct lora_adapter {
  matrix_view<const float> A;
  matrix_view<const float> B;
  float scale = 1.0f;
  adapter_dropout drop{};
};

/// Gradient buffers of one adapter of the list: dA r×in, dB out×r (accumulated into).
struct lora_adapter_grads {
  matrix_view<float> dA;
  matrix_view<float> dB;
};

namespace adapters::detail {

struct multi_lora_scratch {
  float *Acat, *Bcat, *du, *G, *dAcat, *mask, *tmp;
};
template <class WS>
multi_lora_scratch carve_multi_lora(WS& ws, index_t rows, index_t in, index_t out, index_t R,
                                    bool any_drop, bool backward) {
  multi_lora_scratch s{};
  s.Acat = ws.template take<float>(std::size_t(R * in));
  s.Bcat = ws.template take<float>(std::size_t(out * R));
  if (backward) {
    s.du = ws.template take<float>(std::size_t(rows * R));
    s.G = ws.template take<float>(std::size_t(out * R));
    s.dAcat = ws.template take<float>(std::size_t(R * in));
  }
  if (any_drop) {
    s.mask = ws.template take<float>(std::size_t(row_block * in));
    if (backward) s.tmp = ws.template take<float>(std::size_t(row_block * in));
  }
  return s;
}

/// Validates the list; returns R = Σ r_k and whether any adapter uses dropout.
inline index_t validate_multi_lora(const char* fn, index_t in, index_t out,
                                   const lora_adapter* adapters, std::size_t count,
                                   bool* any_drop) {
  require_positive(fn, "count", count);
  require_data(fn, "adapters", adapters, count);
  index_t R = 0;
  *any_drop = false;
  for (std::size_t k = 0; k < count; ++k) {
    const lora_adapter& a = adapters[k];
    require_rank(fn, a.A.rows, in, out);
    require_shape(fn, "adapters[k].A", a.A, a.A.rows, in);
    require_shape(fn, "adapters[k].B", a.B, out, a.A.rows);
    require_scale(fn, a.scale);
    require_dropout(fn, a.drop);
    R += a.A.rows;
    *any_drop = *any_drop || a.drop.p > 0;
  }
  return R;
}

/// A_cat = [A_1; …], B_cat = [s_1·B_1, …] into the workspace.
inline void stack_adapters(const lora_adapter* adapters, std::size_t count, index_t in, index_t out,
                           index_t R, float* Acat, float* Bcat) {
  index_t off = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const lora_adapter& a = adapters[k];
    const index_t r = a.A.rows;
    for (index_t i = 0; i < r; ++i)
      std::memcpy(Acat + (off + i) * in, a.A.row(i), std::size_t(in) * sizeof(float));
    for (index_t j = 0; j < out; ++j)
      for (index_t c = 0; c < r; ++c) Bcat[j * R + off + c] = a.scale * a.B(j, c);
    off += r;
  }
}

} // namespace adapters::detail

/// Scratch bytes of multi_lora_forward: R·(in + out) floats, plus 128·in with any dropout.
inline std::size_t multi_lora_forward_workspace_bytes(index_t in, index_t out,
                                                      const lora_adapter* adapters,
                                                      std::size_t count) {
  index_t R = 0;
  bool any_drop = false;
  for (std::size_t k = 0; k < count; ++k) {
    R += adapters[k].A.rows;
    any_drop = any_drop || adapters[k].drop.p > 0;
  }
  workspace_planner p;
  adapters::detail::carve_multi_lora(p, 0, in, out, R, any_drop, false);
  return p.bytes();
}

/// Scratch bytes of multi_lora_backward: R·(2·in + 2·out + rows) floats, plus 2·128·in with any
/// dropout.
inline std::size_t multi_lora_backward_workspace_bytes(index_t rows, index_t in, index_t out,
                                                       const lora_adapter* adapters,
                                                       std::size_t count) {
  index_t R = 0;
  bool any_drop = false;
  for (std::size_t k = 0; k < count; ++k) {
    R += adapters[k].A.rows;
    any_drop = any_drop || adapters[k].drop.p > 0;
  }
  workspace_planner p;
  adapters::detail::carve_multi_lora(p, rows, in, out, R, any_drop, true);
  return p.bytes();
}

/// Multi-LoRA forward: y = x·Wᵀ + b + Σ_k s_k·u_k·B_kᵀ with u_k = drop_k(x)·A_kᵀ, all `count`
/// adapters in one pass (see the header comment).
///
/// Shapes: x [rows, in], W [out, in] (frozen), bias [out] or nullptr, adapters[k].A [r_k, in],
/// adapters[k].B [out, r_k], y [rows, out] (overwritten), u [rows, R] with R = Σ r_k
/// (overwritten; columns [off_k, off_k + r_k) hold u_k, off_k = Σ_{j<k} r_j; pass it to
/// multi_lora_backward). Memory: multi_lora_forward_workspace_bytes(in, out, adapters, count),
/// O(R·(in + out)); no out×in temporary. Numerics: fp32 GEMMs; equal to the sum of
/// single-adapter lora_forward deltas up to fp32 summation order.
/// Preconditions: count >= 1, each 1 <= r_k <= min(in, out), s_k finite, p_k in [0, 1).
template <class Arch = simd::default_arch>
void multi_lora_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                        const lora_adapter* adapters, std::size_t count, RowRef<float> y,
                        RowRef<float> u, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "multi_lora_forward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows();
  require_dims(fn, "W", W, out, in);
  bool any_drop = false;
  const index_t R = validate_multi_lora(fn, in, out, adapters, count, &any_drop);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, R);
  require_workspace(fn, ws, multi_lora_forward_workspace_bytes(in, out, adapters, count));
  const auto s = carve_multi_lora(ws, rows, in, out, R, any_drop, false);
  stack_adapters(adapters, count, in, out, R, s.Acat, s.Bcat);
  const Eigen::Map<const RowMatrixXf> Acat(s.Acat, R, in), Bcat(s.Bcat, out, R);
  u.noalias() = x * Acat.transpose();
  index_t off = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const lora_adapter& a = adapters[k];
    const index_t r = a.A.rows;
    if (a.drop.p > 0) { // this adapter sees its own masked x: redo its r columns
      RowRef<float> uk = u.middleCols(off, r);
      project<Arch>(x, as_eigen(a.A), a.drop, uk, s.mask);
    }
    off += r;
  }
  y.noalias() = x * W.transpose();
  y.noalias() += u * Bcat.transpose();
  add_bias(y, bias);
}

/// Multi-LoRA backward; ACCUMULATES (+=) into dx and every grads[k].dA, grads[k].dB:
///   du_k = s_k·dy·B_k,  dB_k += s_k·dyᵀ·u_k,  dA_k += du_kᵀ·drop_k(x),
///   dx += dy·W + Σ_k drop_k'(du_k·A_k)
/// computed with one GEMM per term for the whole list (header comment). W is frozen: no dW.
///
/// Shapes: as multi_lora_forward; u [rows, R] from the forward; dy [rows, out]; dx [rows, in] or
/// an empty (0×0) matrix to skip; grads[k].dA [r_k, in], grads[k].dB [out, r_k] (count entries).
/// Memory: multi_lora_backward_workspace_bytes(rows, in, out, adapters, count). Numerics: fp32
/// GEMMs. Preconditions: as multi_lora_forward; the adapters (and their dropout) are the
/// forward's.
template <class Arch = simd::default_arch>
void multi_lora_backward(ConstRowRef<float> x, ConstRowRef<float> W, const lora_adapter* adapters,
                         std::size_t count, ConstRowRef<float> u, ConstRowRef<float> dy,
                         RowRef<float> dx, const lora_adapter_grads* grads, workspace ws = {}) {
  using namespace adapters::detail;
  const char* fn = "multi_lora_backward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows();
  require_dims(fn, "W", W, out, in);
  bool any_drop = false;
  const index_t R = validate_multi_lora(fn, in, out, adapters, count, &any_drop);
  require_dims(fn, "u", u, rows, R);
  require_dims(fn, "dy", dy, rows, out);
  const bool want_dx = dx.size() != 0;
  if (want_dx) require_dims(fn, "dx", dx, rows, in);
  require_data(fn, "grads", grads, count);
  for (std::size_t k = 0; k < count; ++k) {
    require_shape(fn, "grads[k].dA", grads[k].dA, adapters[k].A.rows, in);
    require_shape(fn, "grads[k].dB", grads[k].dB, out, adapters[k].A.rows);
  }
  require_workspace(fn, ws, multi_lora_backward_workspace_bytes(rows, in, out, adapters, count));
  const auto s = carve_multi_lora(ws, rows, in, out, R, any_drop, true);
  stack_adapters(adapters, count, in, out, R, s.Acat, s.Bcat);
  const Eigen::Map<const RowMatrixXf> Acat(s.Acat, R, in), Bcat(s.Bcat, out, R);
  Eigen::Map<RowMatrixXf> du(s.du, rows, R), G(s.G, out, R), dAcat(s.dAcat, R, in);

  du.noalias() = dy * Bcat;
  G.noalias() = dy.transpose() * u;
  if (want_dx) dx.noalias() += dy * W;
  // adapters with dropout: their own masked dA and dx terms, then their du columns are zeroed
  // so the shared GEMMs below skip them
  index_t off = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const lora_adapter& a = adapters[k];
    const index_t r = a.A.rows;
    auto dBk = as_eigen(grads[k].dB);
    dBk.noalias() += a.scale * G.middleCols(off, r);
    if (a.drop.p > 0) {
      RowRef<float> dAk = as_eigen(grads[k].dA);
      input_backward<Arch>(x, as_eigen(a.A), du.middleCols(off, r), a.drop, want_dx, dAk, dx,
                           s.mask, s.tmp);
      du.middleCols(off, r).setZero();
    }
    off += r;
  }
  dAcat.noalias() = du.transpose() * x;
  if (want_dx) dx.noalias() += du * Acat;
  off = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const index_t r = adapters[k].A.rows;
    if (adapters[k].drop.p == 0) as_eigen(grads[k].dA) += dAcat.middleRows(off, r);
    off += r;
  }
}

} // namespace lowmem
