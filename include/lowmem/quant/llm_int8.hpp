// lowmem/quant/llm_int8.hpp — int8 × int8 → int32 GEMM (AVX512-VNNI where compiled in) and the
// LLM.int8() mixed-precision decomposition (arXiv:2208.07339): activation columns holding an
// outlier (|x| > threshold anywhere in the batch) are multiplied in fp32, all other columns are
// quantized per row (vector-wise absmax int8) and multiplied in int8 against a per-row int8 weight.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/workspace.hpp"
#include "../kernels/quant_int8gemm.hpp"
#include "linear.hpp"

namespace lowmem::quant {

/// Scratch bytes of int8_gemm for N rows of B.
inline std::size_t int8_gemm_workspace_bytes(index_t N) {
  workspace_planner p;
  p.take<std::int32_t>(std::size_t(std::max<index_t>(N, 0)));
  return p.bytes();
}

/// Exact integer GEMM C = A·Bᵀ: A [M, K], B [N, K] int8 (contiguous rows), C [M, N] int32.
/// AVX512-VNNI kernel when the compiler targets it (vpdpbusd, 4×4 register blocks), portable
/// loop otherwise; both exact (|C| < 2^31 needs K < 2^17). Memory: N int32 from `ws`.
inline void int8_gemm(const std::int8_t* A, const std::int8_t* B, index_t M, index_t N, index_t K,
                      std::int32_t* C, workspace ws) {
  const char* fn = "int8_gemm";
  require_non_negative(fn, "M", M);
  require_non_negative(fn, "N", N);
  require_in_closed(fn, "K", index_t(0), index_t(1) << 17, K);
  require_data(fn, "A", A, std::size_t(M * K));
  require_data(fn, "B", B, std::size_t(N * K));
  require_data(fn, "C", C, std::size_t(M * N));
  require_workspace(fn, ws, int8_gemm_workspace_bytes(N));
  std::int32_t* bsum = ws.take<std::int32_t>(std::size_t(N));
#if LOWMEM_QUANT_HAVE_VNNI
  kernels::int8_row_sums(B, std::size_t(N), std::size_t(K / 64 * 64), std::size_t(K), bsum);
  kernels::int8_gemm_vnni(A, B, bsum, std::size_t(M), std::size_t(N), std::size_t(K), C);
#else
  (void)bsum;
  kernels::int8_gemm_scalar(A, B, std::size_t(M), std::size_t(N), std::size_t(K), C);
#endif
}

namespace detail {
inline constexpr index_t llm_int8_tile_m = 64;
template <class WS> struct llm_int8_scratch {
  std::int8_t* qx;
  float* sx;
  std::uint8_t* outlier;
  std::int32_t* c;
  float* wcol;
  std::int32_t* bsum;
};
template <class WS> llm_int8_scratch<WS> carve_llm_int8(WS& ws, index_t N, index_t K) {
  const std::size_t tm = std::size_t(llm_int8_tile_m);
  llm_int8_scratch<WS> s{};
  s.qx = ws.template take<std::int8_t>(tm * std::size_t(K));
  s.sx = ws.template take<float>(tm);
  s.outlier = ws.template take<std::uint8_t>(std::size_t(K));
  s.c = ws.template take<std::int32_t>(tm * std::size_t(N));
  s.wcol = ws.template take<float>(std::size_t(N));
  s.bsum = ws.template take<std::int32_t>(std::size_t(N));
  return s;
}
} // namespace detail

/// Scratch bytes of llm_int8_forward for W [N, K]: a 64-row tile of int8 activations and int32
/// results, plus O(N + K).
inline std::size_t llm_int8_workspace_bytes(index_t N, index_t K) {
  workspace_planner p;
  detail::carve_llm_int8(p, std::max<index_t>(N, 0), std::max<index_t>(K, 0));
  return p.bytes();
}

/// LLM.int8() forward: y = x·deq(W)ᵀ computed as
///   y[m,n] = sx_m·sw_n·Σ_{k∉O} qx[m,k]·qw[n,k]  +  Σ_{k∈O} x[m,k]·qw[n,k]·sw_n,
/// O = {k : max_m |x[m,k]| > threshold} (outlier feature columns, fp32 path), qx = rne(x/sx_m)
/// with sx_m = max_{k∉O} |x[m,k]| / 127 (vector-wise, per row). W: int8_sym with one scale per row
/// (block == cols: qweight_storage::quantize(W, int8_sym, cols)). Shapes x [M, K], y [M, N].
/// Memory: `ws` (llm_int8_workspace_bytes), nothing else. Numerics: exact int32 sums; the error
/// vs fp32 is the activation rounding (<= sx/2 per element). Backward (frozen W): dx = dy·deq(W)
/// is qlinear_backward on the same weight.
inline void llm_int8_forward(ConstRowRef<float> x, const qweight& W, float threshold,
                             RowRef<float> y, workspace ws) {
  const char* fn = "llm_int8_forward";
  detail::require_qweight(fn, W);
  require(W.format == weight_format::int8_sym, fn, "W.format", "int8_sym", int(W.format));
  require_equal(fn, "W.block (per-row scales)", W.cols, W.block);
  require_equal(fn, "x.cols (== W.cols)", W.cols, index_t(x.cols()));
  require_equal(fn, "y.rows (== x.rows)", index_t(x.rows()), index_t(y.rows()));
  require_equal(fn, "y.cols (== W.rows)", W.rows, index_t(y.cols()));
  require_positive(fn, "threshold", threshold);
  require_workspace(fn, ws, llm_int8_workspace_bytes(W.rows, W.cols));
  const index_t M = x.rows(), N = W.rows, K = W.cols;
  auto s = detail::carve_llm_int8(ws, N, K);
  const auto* qw = reinterpret_cast<const std::int8_t*>(W.codes);
  // outlier columns over the whole batch
  index_t n_out = 0;
  for (index_t k = 0; k < K; ++k) {
    float mx = 0;
    for (index_t m = 0; m < M; ++m) mx = std::max(mx, std::fabs(x(m, k)));
    s.outlier[k] = !(mx <= threshold); // NaN counts as an outlier (fp32 path propagates it)
    n_out += s.outlier[k];
  }
#if LOWMEM_QUANT_HAVE_VNNI
  kernels::int8_row_sums(qw, std::size_t(N), std::size_t(K / 64 * 64), std::size_t(K), s.bsum);
#endif
  for (index_t m0 = 0; m0 < M; m0 += detail::llm_int8_tile_m) {
    const index_t tm = std::min(detail::llm_int8_tile_m, M - m0);
    for (index_t i = 0; i < tm; ++i) {
      float mx = 0;
      for (index_t k = 0; k < K; ++k)
        if (!s.outlier[k]) mx = std::max(mx, std::fabs(x(m0 + i, k)));
      const float sx = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / sx;
      s.sx[i] = sx;
      for (index_t k = 0; k < K; ++k)
        s.qx[i * K + k] =
            s.outlier[k] ? std::int8_t(0) : std::int8_t(std::nearbyint(x(m0 + i, k) * inv));
    }
#if LOWMEM_QUANT_HAVE_VNNI
    kernels::int8_gemm_vnni(s.qx, qw, s.bsum, std::size_t(tm), std::size_t(N), std::size_t(K), s.c);
#else
    kernels::int8_gemm_scalar(s.qx, qw, std::size_t(tm), std::size_t(N), std::size_t(K), s.c);
#endif
    for (index_t i = 0; i < tm; ++i)
      for (index_t n = 0; n < N; ++n)
        y(m0 + i, n) = float(s.c[i * N + n]) * (s.sx[i] * W.scales[n]);
  }
  if (n_out == 0) return;
  for (index_t k = 0; k < K; ++k) {
    if (!s.outlier[k]) continue;
    for (index_t n = 0; n < N; ++n) s.wcol[n] = float(qw[n * K + k]) * W.scales[n];
    for (index_t m = 0; m < M; ++m) {
      const float xv = x(m, k);
      for (index_t n = 0; n < N; ++n) y(m, n) += xv * s.wcol[n];
    }
  }
}

} // namespace lowmem::quant
