// examples/common/layers.hpp — generic training layers for the demos, written by hand in the
// llm.c manner: forward and backward over row-major float buffers, no autograd, no allocation.
//
// Conventions (the same as lowmem's kernels):
//   * row-major everywhere: x[M, K] is M rows of K floats;
//   * parameter order inputs, outputs, (saved / workspace), shapes;
//   * every backward ACCUMULATES (+=) into its gradient outputs (dx, dW, db, ...), so the caller
//     zeroes them once per step and branches (residuals, Q/K/V) simply add up; a null gradient
//     pointer means "not needed" and skips that work (frozen weights, network inputs);
//   * numerics: fp32 storage, fp32 accumulation (Eigen GEMMs; row reductions in float), which is
//     what a trainer of this size needs; the finite-difference tests bound the error.
//
// These are user-side helpers, not part of the installed library. The attention here is the
// naive reference (it materialises the N×N scores); it sits behind `attention_backend` so that
// lowmem's tiled attention replaces it with one line (see naive_attention()).
#pragma once

#include <lowmem/core/eigen.hpp>
#include <lowmem/core/threading.hpp>
#include <lowmem/simd/simd.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

namespace demo {

using lowmem::index_t;
using MatMap = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using CMatMap =
    Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

/// parallel_for work of one row of a row-wise LayerNorm pass over `cols` floats (the row read
/// twice, the output written): tiny shapes (tests) stay serial, big ones split over the threads.
inline lowmem::item_work row_work(index_t cols) { return {3 * cols}; }
/// parallel_for work of one GELU element (x read, y written, an exp).
inline constexpr lowmem::item_work gelu_work{4};

// ---- linear ------------------------------------------------------------------------------------

/// y = x·Wᵀ + b.  x[M, K], W[N, K] (PyTorch's nn.Linear layout), b[N] or null, y[M, N]
/// (overwritten). No allocation beyond Eigen's GEMM blocking buffers.
inline void linear_forward(const float* x, const float* W, const float* b, float* y, index_t M,
                           index_t K, index_t N) {
  MatMap Y(y, M, N);
  Y.noalias() = CMatMap(x, M, K) * CMatMap(W, N, K).transpose();
  if (b) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(b, N);
}

/// Backward of linear_forward, accumulating: dx += dy·W, dW += dyᵀ·x, db += Σ_rows dy.
/// Any of dx, dW, db may be null (skipped). Shapes as in linear_forward; dy[M, N].
inline void linear_backward(const float* x, const float* W, const float* dy, float* dx, float* dW,
                            float* db, index_t M, index_t K, index_t N) {
  CMatMap DY(dy, M, N);
  if (dx) MatMap(dx, M, K).noalias() += DY * CMatMap(W, N, K);
  if (dW) MatMap(dW, N, K).noalias() += DY.transpose() * CMatMap(x, M, K);
  if (db) Eigen::Map<Eigen::RowVectorXf>(db, N) += DY.colwise().sum();
}

// ---- LayerNorm ---------------------------------------------------------------------------------

/// y = (x − μ)·rstd ⊙ γ + β per row, μ = mean(x), rstd = 1/sqrt(var(x) + eps) (biased variance,
/// as PyTorch). x, y [M, C]; gamma, beta [C]; mean, rstd [M] are saved for the backward.
inline void layernorm_forward(const float* x, const float* gamma, const float* beta, float* y,
                              float* mean, float* rstd, index_t M, index_t C, float eps = 1e-5f) {
  lowmem::parallel_for(0, M, row_work(C), [&](index_t r0, index_t r1, int) {
    for (index_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      float m = 0;
      for (index_t c = 0; c < C; ++c) m += xr[c];
      m /= float(C);
      float v = 0;
      for (index_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
      const float s = 1.0f / std::sqrt(v / float(C) + eps);
      float* yr = y + r * C;
      for (index_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * s * gamma[c] + beta[c];
      mean[r] = m;
      rstd[r] = s;
    }
  });
}

/// Backward of layernorm_forward, accumulating dx, dgamma, dbeta (dgamma/dbeta may be null):
///   x̂ = (x−μ)·rstd, g = dy⊙γ,  dx += rstd·(g − mean(g) − x̂·mean(g⊙x̂)),
///   dγ += Σ_rows dy⊙x̂,  dβ += Σ_rows dy.
/// dgamma/dbeta are reduced serially (rows in order) so results do not depend on threads.
inline void layernorm_backward(const float* x, const float* gamma, const float* mean,
                               const float* rstd, const float* dy, float* dx, float* dgamma,
                               float* dbeta, index_t M, index_t C) {
  if (dx)
    lowmem::parallel_for(0, M, row_work(C), [&](index_t r0, index_t r1, int) {
      for (index_t r = r0; r < r1; ++r) {
        const float* xr = x + r * C;
        const float* dyr = dy + r * C;
        const float m = mean[r], s = rstd[r];
        float mg = 0, mgx = 0;
        for (index_t c = 0; c < C; ++c) {
          const float g = dyr[c] * gamma[c];
          mg += g;
          mgx += g * (xr[c] - m) * s;
        }
        mg /= float(C);
        mgx /= float(C);
        float* dxr = dx + r * C;
        for (index_t c = 0; c < C; ++c) {
          const float xh = (xr[c] - m) * s;
          dxr[c] += s * (dyr[c] * gamma[c] - mg - xh * mgx);
        }
      }
    });
  if (dgamma || dbeta)
    for (index_t r = 0; r < M; ++r) {
      const float* xr = x + r * C;
      const float* dyr = dy + r * C;
      const float m = mean[r], s = rstd[r];
      for (index_t c = 0; c < C; ++c) {
        if (dgamma) dgamma[c] += dyr[c] * (xr[c] - m) * s;
        if (dbeta) dbeta[c] += dyr[c];
      }
    }
}

// ---- GELU (tanh approximation, as GPT-2 / llm.c) ----------------------------------------------

namespace detail {
constexpr float gelu_k = 0.7978845608028654f; // sqrt(2/π)
}

namespace detail {
/// out[i] = body(x[i], dy[i], out[i]) over [b, e) in SIMD batches (dy may be null: zeros), the
/// tail through lowmem::simd's partial loads/stores, so every element takes the same vector math.
template <class Body>
inline void gelu_blocks(const float* x, const float* dy, float* out, index_t b, index_t e,
                        Body&& body) {
  using A = lowmem::simd::default_arch;
  using B = lowmem::simd::fbatch<A>;
  constexpr index_t W = index_t(lowmem::simd::width<A>);
  const B zero(0.0f);
  index_t i = b;
  for (; i + W <= e; i += W)
    body(B::load_unaligned(x + i), dy ? B::load_unaligned(dy + i) : zero,
         B::load_unaligned(out + i))
        .store_unaligned(out + i);
  if (i < e) {
    const std::size_t n = std::size_t(e - i);
    lowmem::simd::store_partial<A>(out + i,
                                   body(lowmem::simd::load_partial<A>(x + i, n),
                                        dy ? lowmem::simd::load_partial<A>(dy + i, n) : zero,
                                        lowmem::simd::load_partial<A>(out + i, n)),
                                   n);
  }
}
} // namespace detail

/// y = ½x(1 + tanh(√(2/π)(x + 0.044715x³))), elementwise over n values (y may alias x).
/// Computed as x·σ(2u) = x / (1 + e^(−2u)) with u = √(2/π)(x + 0.044715x³) — the same function,
/// since ½(1 + tanh u) = σ(2u) — in SIMD batches (lowmem::simd::exp): the scalar libm tanh was
/// more than half of the demo's MeZO time (perf, 2 Dec 2026).
inline void gelu_forward(const float* x, float* y, index_t n) {
  using B = lowmem::simd::fbatch<lowmem::simd::default_arch>;
  lowmem::parallel_for(0, n, gelu_work, [&](index_t b, index_t e, int) {
    detail::gelu_blocks(x, nullptr, y, b, e, [](const B& v, const B&, const B&) {
      const B m2u = B(-2.0f * detail::gelu_k) * (v + B(0.044715f) * v * v * v);
      return B(v / (B(1.0f) + lowmem::simd::exp(m2u)));
    });
  });
}

/// dx += dy · gelu'(x), with the exact derivative of the tanh approximation. dx must not alias dy.
/// With σ = σ(2u), t = tanh u = 2σ − 1: gelu' = ½(1 + t) + ½x(1 − t²)u' = σ + 2xσ(1 − σ)u',
/// u' = √(2/π)(1 + 3·0.044715x²).
inline void gelu_backward(const float* x, const float* dy, float* dx, index_t n) {
  using B = lowmem::simd::fbatch<lowmem::simd::default_arch>;
  lowmem::parallel_for(0, n, gelu_work, [&](index_t b, index_t e, int) {
    detail::gelu_blocks(x, dy, dx, b, e, [](const B& v, const B& g, const B& acc) {
      const B v2 = v * v;
      const B m2u = B(-2.0f * detail::gelu_k) * (v + B(0.044715f) * v2 * v);
      const B sg = B(1.0f) / (B(1.0f) + lowmem::simd::exp(m2u));
      const B du = B(detail::gelu_k) * (B(1.0f) + B(3.0f * 0.044715f) * v2);
      return B(acc + g * (sg + B(2.0f) * v * sg * (B(1.0f) - sg) * du));
    });
  });
}

// ---- softmax + cross-entropy -------------------------------------------------------------------

/// probs = softmax(logits) per row; returns L = −(1/B) Σ_b log probs[b, label_b] (computed in
/// double). logits, probs [B, C]; labels[B] in [0, C). Max-subtracted, so no overflow.
inline double softmax_xent_forward(const float* logits, const std::uint8_t* labels, float* probs,
                                   index_t B, index_t C) {
  double loss = 0;
  for (index_t b = 0; b < B; ++b) {
    const float* z = logits + b * C;
    float* p = probs + b * C;
    const float mx = *std::max_element(z, z + C);
    double s = 0;
    for (index_t c = 0; c < C; ++c) s += (p[c] = std::exp(z[c] - mx));
    for (index_t c = 0; c < C; ++c) p[c] = float(p[c] / s);
    loss -= double(z[labels[b]] - mx) - std::log(s);
  }
  return B > 0 ? loss / double(B) : 0.0;
}

/// dlogits += (probs − onehot(label)) / B: the gradient of the mean loss above.
inline void softmax_xent_backward(const float* probs, const std::uint8_t* labels, float* dlogits,
                                  index_t B, index_t C) {
  const float inv = 1.0f / float(B);
  for (index_t b = 0; b < B; ++b)
    for (index_t c = 0; c < C; ++c)
      dlogits[b * C + c] += (probs[b * C + c] - (c == labels[b] ? 1.0f : 0.0f)) * inv;
}

// ---- residual add and mean-pool ----------------------------------------------------------------

/// y = a + b elementwise (y may alias a or b).
inline void residual_forward(const float* a, const float* b, float* y, index_t n) {
  for (index_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}
/// da += dy, db += dy (either may be null).
inline void residual_backward(const float* dy, float* da, float* db, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    if (da) da[i] += dy[i];
    if (db) db[i] += dy[i];
  }
}

/// y[b, c] = (1/N) Σ_t x[b, t, c].  x [B, N, C], y [B, C].
inline void meanpool_forward(const float* x, float* y, index_t B, index_t N, index_t C) {
  const float inv = 1.0f / float(N);
  for (index_t b = 0; b < B; ++b) {
    float* yb = y + b * C;
    std::fill(yb, yb + C, 0.0f);
    for (index_t t = 0; t < N; ++t)
      for (index_t c = 0; c < C; ++c) yb[c] += x[(b * N + t) * C + c];
    for (index_t c = 0; c < C; ++c) yb[c] *= inv;
  }
}
/// dx[b, t, c] += dy[b, c] / N.
inline void meanpool_backward(const float* dy, float* dx, index_t B, index_t N, index_t C) {
  const float inv = 1.0f / float(N);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < N; ++t)
      for (index_t c = 0; c < C; ++c) dx[(b * N + t) * C + c] += dy[b * C + c] * inv;
}

// ---- head split / merge ------------------------------------------------------------------------

/// Splits qkv [B, N, 3·H·d] (PyTorch's fused in_proj order: all of Q, then K, then V) into
/// q, k, v [B, H, N, d].
inline void split_heads(const float* qkv, float* q, float* k, float* v, index_t B, index_t N,
                        index_t H, index_t d) {
  const index_t C = H * d;
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < N; ++t) {
      const float* row = qkv + (b * N + t) * 3 * C;
      for (index_t h = 0; h < H; ++h) {
        const index_t o = ((b * H + h) * N + t) * d;
        std::memcpy(q + o, row + h * d, sizeof(float) * std::size_t(d));
        std::memcpy(k + o, row + C + h * d, sizeof(float) * std::size_t(d));
        std::memcpy(v + o, row + 2 * C + h * d, sizeof(float) * std::size_t(d));
      }
    }
}
/// Adjoint of split_heads, accumulating: dqkv += merge(dq, dk, dv).
inline void split_heads_backward(const float* dq, const float* dk, const float* dv, float* dqkv,
                                 index_t B, index_t N, index_t H, index_t d) {
  const index_t C = H * d;
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < N; ++t) {
      float* row = dqkv + (b * N + t) * 3 * C;
      for (index_t h = 0; h < H; ++h) {
        const index_t o = ((b * H + h) * N + t) * d;
        for (index_t j = 0; j < d; ++j) {
          row[h * d + j] += dq[o + j];
          row[C + h * d + j] += dk[o + j];
          row[2 * C + h * d + j] += dv[o + j];
        }
      }
    }
}
/// y [B, N, H·d] = o [B, H, N, d] with heads concatenated per token.
inline void merge_heads(const float* o, float* y, index_t B, index_t N, index_t H, index_t d) {
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < N; ++t)
        std::memcpy(y + (b * N + t) * H * d + h * d, o + ((b * H + h) * N + t) * d,
                    sizeof(float) * std::size_t(d));
}
/// Adjoint of merge_heads, accumulating: do += split(dy).
inline void merge_heads_backward(const float* dy, float* d_o, index_t B, index_t N, index_t H,
                                 index_t d) {
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < N; ++t) {
        const float* src = dy + (b * N + t) * H * d + h * d;
        float* dst = d_o + ((b * H + h) * N + t) * d;
        for (index_t j = 0; j < d; ++j) dst[j] += src[j];
      }
}

// ---- attention backends ------------------------------------------------------------------------

/// Shape of one multi-head attention call: Q, K, V, O are [B, H, N, d] row-major; scale is
/// usually 1/√d.
struct attention_shape {
  index_t B = 0, H = 0, N = 0, d = 0;
  float scale = 1.0f;
  index_t qkv_floats() const { return B * H * N * d; }
};

/// The plug point for attention implementations: O = softmax(scale·Q·Kᵀ)·V per (batch, head),
/// non-causal. `saved_floats` is what forward keeps for backward (the model's activation arena
/// holds it and counts it); `workspace_floats` is backward scratch (shared by all layers).
/// Forward overwrites O and the saved state; backward ACCUMULATES into dQ, dK, dV.
/// A tiled (flash) backend saves only the per-row log-sum-exp (B·H·N floats) instead of the
/// N×N probabilities, which is the whole point of lowmem's attention family.
struct attention_backend {
  std::string name;
  std::function<std::size_t(const attention_shape&)> saved_floats;
  std::function<std::size_t(const attention_shape&)> workspace_floats;
  std::function<void(const attention_shape&, const float* q, const float* k, const float* v,
                     float* o, float* saved)>
      forward;
  std::function<void(const attention_shape&, const float* q, const float* k, const float* v,
                     const float* o, const float* d_o, const float* saved, float* dq, float* dk,
                     float* dv, float* workspace)>
      backward;
};

/// Naive attention forward: S = scale·Q·Kᵀ, P = softmax_rows(S) (saved, B·H·N·N floats), O = P·V.
inline void naive_attention_forward(const attention_shape& s, const float* q, const float* k,
                                    const float* v, float* o, float* P) {
  const index_t N = s.N, d = s.d;
  const lowmem::item_work head_work{4 * N * N * d}; // a head: 4 N×N×d products
  lowmem::parallel_for(0, s.B * s.H, head_work, [&](index_t b0, index_t b1, int) {
    for (index_t bh = b0; bh < b1; ++bh) {
      const index_t off = bh * N * d;
      MatMap Pm(P + bh * N * N, N, N);
      Pm.noalias() = s.scale * (CMatMap(q + off, N, d) * CMatMap(k + off, N, d).transpose());
      for (index_t i = 0; i < N; ++i) {
        float* row = P + bh * N * N + i * N;
        const float mx = *std::max_element(row, row + N);
        float sum = 0;
        for (index_t j = 0; j < N; ++j) sum += (row[j] = std::exp(row[j] - mx));
        const float inv = 1.0f / sum;
        for (index_t j = 0; j < N; ++j) row[j] *= inv;
      }
      MatMap(o + off, N, d).noalias() = Pm * CMatMap(v + off, N, d);
    }
  });
}

/// Naive attention backward (accumulating), from the saved P:
///   dV += Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ += scale·dS·K,
///   dK += scale·dSᵀ·Q.  Workspace: B·H·N·N floats (dS for every head, so heads run in parallel).
inline void naive_attention_backward(const attention_shape& s, const float* q, const float* k,
                                     const float* v, const float* /*o*/, const float* d_o,
                                     const float* P, float* dq, float* dk, float* dv, float* ws) {
  const index_t N = s.N, d = s.d;
  const lowmem::item_work head_work{4 * N * N * d}; // a head: 4 N×N×d products
  lowmem::parallel_for(0, s.B * s.H, head_work, [&](index_t b0, index_t b1, int) {
    for (index_t bh = b0; bh < b1; ++bh) {
      const index_t off = bh * N * d;
      CMatMap Pm(P + bh * N * N, N, N), dO(d_o + off, N, d);
      MatMap dS(ws + bh * N * N, N, N);
      MatMap(dv + off, N, d).noalias() += Pm.transpose() * dO;
      dS.noalias() = dO * CMatMap(v + off, N, d).transpose();
      for (index_t i = 0; i < N; ++i) {
        float dot = 0;
        for (index_t j = 0; j < N; ++j) dot += dS(i, j) * Pm(i, j);
        for (index_t j = 0; j < N; ++j) dS(i, j) = Pm(i, j) * (dS(i, j) - dot) * s.scale;
      }
      MatMap(dq + off, N, d).noalias() += dS * CMatMap(k + off, N, d);
      MatMap(dk + off, N, d).noalias() += dS.transpose() * CMatMap(q + off, N, d);
    }
  });
}

/// The reference backend. To use lowmem's tiled attention instead, build an attention_backend
/// whose forward/backward call lowmem's attention_forward/attention_backward and whose
/// saved_floats returns B·H·N (log-sum-exp), then pass it to the model (vit_config::attention).
inline attention_backend naive_attention() {
  attention_backend a;
  a.name = "naive";
  a.saved_floats = [](const attention_shape& s) { return std::size_t(s.B * s.H * s.N * s.N); };
  a.workspace_floats = [](const attention_shape& s) { return std::size_t(s.B * s.H * s.N * s.N); };
  a.forward = naive_attention_forward;
  a.backward = naive_attention_backward;
  return a;
}

} // namespace demo
