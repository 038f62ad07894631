// lowmem/kernels/adapters.hpp — inner loops of the adapter family (no Eigen here).
//
// Two groups of kernels, templated on the xsimd Arch:
//  * adapter dropout: keep element i when uniform(i) >= p and scale it by 1/(1-p); the uniforms
//    come from the counter RNG, so backward regenerates the identical mask;
//  * sparse (CSR) products on a panel of `panel` rows stored transposed ("column panels": the
//    value of row t of feature c sits at xt[c * panel + t]). Transposing a panel of 32 rows of x
//    turns the gather x[t, col_k] into a contiguous 32-wide axpy, so the sparse product, the
//    SDDMM gradient and the transposed product are all SIMD loops over the panel.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../simd/simd.hpp"

namespace lowmem::adapters::kernels {

/// Panel width of the sparse kernels: a multiple of every SIMD width (16 floats on AVX-512).
/// 32 rows keep a panel of 4096 features at 512 KiB, so the randomly indexed panel rows are L2
/// hits (64 rows = 1 MiB spilled to L3 and cost SHiRA ~2× in its sparse part, measured on Zen 4).
inline constexpr std::size_t panel = 32;

/// io[i] <- (io[i] >= p) ? x[i] * scale : 0, where io holds uniforms in [0, 1) on entry.
template <class Arch>
inline void dropout_apply(const float* x, float* io, std::size_t n, float p, float scale) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F vp(p), vs(scale), zero(0.0f);
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F u = F::load_unaligned(io + i);
    const F v = F::load_unaligned(x + i) * vs;
    xsimd::select(u >= vp, v, zero).store_unaligned(io + i);
  }
  for (; i < n; ++i) io[i] = io[i] >= p ? x[i] * scale : 0.0f;
}

/// dst[i] += (u[i] >= p) ? src[i] * scale : 0 (the dropout backward, u regenerated).
template <class Arch>
inline void dropout_accumulate(const float* u, const float* src, float* dst, std::size_t n, float p,
                               float scale) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F vp(p), vs(scale), zero(0.0f);
  std::size_t i = 0;
  for (; i + W <= n; i += W) {
    const F uu = F::load_unaligned(u + i);
    const F d = F::load_unaligned(dst + i);
    const F v = simd::fma<Arch>(F::load_unaligned(src + i), vs, d);
    xsimd::select(uu >= vp, v, d).store_unaligned(dst + i);
  }
  for (; i < n; ++i)
    if (u[i] >= p) dst[i] += src[i] * scale;
}

/// Column-panel transpose: panel[c*panel + t] = src[t*ld + c] for t < nb, c < ncols, and 0 for
/// nb <= t < panel. Blocked over 16 columns: each source line is read once and the 16 panel lines
/// being written stay in L1. (A plain column-by-column transpose reads `nb` rows ld floats apart;
/// with ld a multiple of 1024 they all map to one L1 set and every read misses.)
inline void rows_to_panel(const float* src, std::size_t ld, std::size_t nb, std::size_t ncols,
                          float* out) noexcept {
  constexpr std::size_t C = 16;
  for (std::size_t c0 = 0; c0 < ncols; c0 += C) {
    const std::size_t ce = c0 + C < ncols ? c0 + C : ncols;
    for (std::size_t t = 0; t < nb; ++t) {
      const float* s = src + t * ld;
      for (std::size_t c = c0; c < ce; ++c) out[c * panel + t] = s[c];
    }
    for (std::size_t c = c0; c < ce; ++c)
      for (std::size_t t = nb; t < panel; ++t) out[c * panel + t] = 0.0f;
  }
}

/// The inverse accumulation: dst[t*ld + c] += panel[c*panel + t] for t < nb, c < ncols (blocked
/// as rows_to_panel).
inline void panel_add_to_rows(const float* in, std::size_t nb, std::size_t ncols, float* dst,
                              std::size_t ld) noexcept {
  constexpr std::size_t C = 16;
  for (std::size_t c0 = 0; c0 < ncols; c0 += C) {
    const std::size_t ce = c0 + C < ncols ? c0 + C : ncols;
    for (std::size_t t = 0; t < nb; ++t) {
      float* d = dst + t * ld;
      for (std::size_t c = c0; c < ce; ++c) d[c] += in[c * panel + t];
    }
  }
}

/// Sparse times panel: yt[j*panel + t] += Σ_{k in row j} val[k] * xt[col[k]*panel + t] for the
/// `nrows` CSR rows j. xt, yt: column panels (64-byte aligned not required).
template <class Arch>
inline void csr_times_panel(const std::int64_t* row_ptr, const std::int32_t* col, const float* val,
                            std::size_t nrows, const float* xt, float* yt) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = panel / W;
  for (std::size_t j = 0; j < nrows; ++j) {
    F acc[R];
    for (std::size_t q = 0; q < R; ++q) acc[q] = F::load_unaligned(yt + j * panel + q * W);
    for (std::int64_t k = row_ptr[j]; k < row_ptr[j + 1]; ++k) {
      const F v(val[k]);
      const float* src = xt + std::size_t(col[k]) * panel;
      for (std::size_t q = 0; q < R; ++q)
        acc[q] = simd::fma<Arch>(v, F::load_unaligned(src + q * W), acc[q]);
    }
    for (std::size_t q = 0; q < R; ++q) acc[q].store_unaligned(yt + j * panel + q * W);
  }
}

/// Transposed sparse times panel: xt[col[k]*panel + t] += val[k] * yt[j*panel + t], only for
/// the entries with c_lo <= col[k] < c_hi (threads split the columns, so no two write one row of
/// xt; each row of xt still receives its terms in order of j, whatever the split).
template <class Arch>
inline void csr_transpose_times_panel(const std::int64_t* row_ptr, const std::int32_t* col,
                                      const float* val, std::size_t nrows, const float* yt,
                                      float* xt, std::int32_t c_lo = 0,
                                      std::int32_t c_hi = INT32_MAX) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = panel / W;
  for (std::size_t j = 0; j < nrows; ++j) {
    F g[R];
    for (std::size_t q = 0; q < R; ++q) g[q] = F::load_unaligned(yt + j * panel + q * W);
    const std::int32_t* first = std::lower_bound(col + row_ptr[j], col + row_ptr[j + 1], c_lo);
    for (std::int64_t k = first - col; k < row_ptr[j + 1] && col[k] < c_hi; ++k) {
      const F v(val[k]);
      float* dst = xt + std::size_t(col[k]) * panel;
      for (std::size_t q = 0; q < R; ++q)
        simd::fma<Arch>(v, g[q], F::load_unaligned(dst + q * W)).store_unaligned(dst + q * W);
    }
  }
}

/// SDDMM on the support: grad[k] += Σ_t yt[j*panel + t] * xt[col[k]*panel + t].
/// (Reducing W entries at once with xsimd 8.1's haddp was tried: on avx512 it returns the sums
/// in permuted lanes, and it measured no faster.)
template <class Arch>
inline void sddmm_panel(const std::int64_t* row_ptr, const std::int32_t* col, std::size_t nrows,
                        const float* yt, const float* xt, float* grad) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = panel / W;
  for (std::size_t j = 0; j < nrows; ++j) {
    F g[R];
    for (std::size_t q = 0; q < R; ++q) g[q] = F::load_unaligned(yt + j * panel + q * W);
    for (std::int64_t k = row_ptr[j]; k < row_ptr[j + 1]; ++k) {
      const float* src = xt + std::size_t(col[k]) * panel;
      F acc = g[0] * F::load_unaligned(src);
      for (std::size_t q = 1; q < R; ++q)
        acc = simd::fma<Arch>(g[q], F::load_unaligned(src + q * W), acc);
      grad[k] += simd::reduce_add(acc);
    }
  }
}

} // namespace lowmem::adapters::kernels
