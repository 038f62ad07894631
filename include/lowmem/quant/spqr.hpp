// lowmem/quant/spqr.hpp — SpQR (arXiv:2306.03078): small-group low-bit weights with bilevel
// (themselves quantized) group statistics, plus the few weights whose quantization error matters
// most kept in fp32 in a compressed sparse row (CSR) layout.
//
// Format of a W [rows, cols] (row-major, cols a multiple of `group`):
//  * first level: every `group` (β1, default 16) consecutive elements of a row share an asymmetric
//    scale s_g and zero z_g; codes c ∈ [0, 2^bits − 1] (bits 2..4), packed two per byte, high
//    nibble first (the int4 layout of formats.hpp; 2/3-bit codes also take a nibble);
//  * second level: the flat arrays of first-level scales and of zeros are each quantized to 3-bit
//    codes in chunks of `stat_group` (β2, default 16) consecutive groups, min-max asymmetric:
//    ŝ_g = min_c + q_g·step_c (q_g ∈ [0, 7], one byte each), the same for the zeros; per chunk
//    two fp32 values (min, step) per statistic;
//  * outliers: CSR (row_ptr [rows + 1], col_idx, values) holding r_ij = w_ij − deq(c_ij), so that
//    deq(W) = Q + S reconstructs an outlier to w_ij within one rounding.
// Dequantization: deq(c) = fma(c, ŝ_g, o_g) with o_g = −ẑ_g·ŝ_g rounded to float.
// Quantization (two passes, as SpQR's outlier detection):
//  1. outliers by SpQR's leave-one-out sensitivity: with group statistics s = (max' − min')/
//     (2^bits − 1), z = −min'/s (min' = min(min, 0), max' = max(max, 0), so z ∈ [0, 2^bits − 1])
//     and RTN codes, E_g = Σ_k h_k·(w_k − deq(c_k))² is a group's error, h the diagonal of the
//     layer's input Hessian XᵀX (SpQR's 1/[H⁻¹]_kk for a diagonal H; h = 1 when not given);
//     ω_i = E_g − E_g∖i is what the group gains when w_i leaves its statistics (and is kept in
//     fp32); outlier iff ω_i > τ·mean over all elements of the plain per-element error;
//  2. statistics over the non-outliers only, bilevel quantized, RTN codes c = clamp(rne(w/ŝ + ẑ))
//     against the stored ŝ, ẑ, and the outlier residuals.
// SpQR's GPTQ-style error feedback between columns is not applied (plain RTN inside a group).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/workspace.hpp"
#include "../kernels/quant.hpp"
#include "../kernels/quant_linear.hpp"

namespace lowmem::quant {

/// SpQR hyper-parameters (defaults: the paper's 3-bit weights, β1 = β2 = 16).
struct spqr_config {
  int bits = 3;                        // weight bits, 2..4
  index_t group = 16;                  // β1: elements per first-level group (divides cols)
  index_t stat_group = 16;             // β2: first-level groups per second-level chunk
  float outlier_tau = 8.0f;            // τ: outlier when ω > τ·mean(ω); +inf keeps no outliers
  const float* hessian_diag = nullptr; // h [cols] >= 0, or nullptr for h = 1
};

/// An SpQR-quantized weight (owning; build once with spqr_weight::quantize, outside loops).
struct spqr_weight {
  index_t rows = 0, cols = 0, group = 16, stat_group = 16;
  int bits = 3;
  std::vector<std::uint8_t> codes;            // ceil(rows·cols / 2), nibbles
  std::vector<std::uint8_t> scale_q, zero_q;  // 3-bit codes, one per group (one byte each)
  std::vector<float> scale_stats, zero_stats; // {min, step} per chunk of stat_group groups
  std::vector<std::int32_t> row_ptr, col_idx; // CSR outliers
  std::vector<float> values;                  // r = w − deq(code) at the outliers

  /// Number of first-level groups.
  std::size_t num_groups() const noexcept {
    return group > 0 ? std::size_t(rows) * std::size_t(cols) / std::size_t(group) : 0;
  }
  /// ŝ_g and ẑ_g (the dequantized second-level values).
  float scale(std::size_t g) const noexcept {
    const std::size_t c = g / std::size_t(stat_group);
    return std::fma(float(scale_q[g]), scale_stats[2 * c + 1], scale_stats[2 * c]);
  }
  float zero(std::size_t g) const noexcept {
    const std::size_t c = g / std::size_t(stat_group);
    return std::fma(float(zero_q[g]), zero_stats[2 * c + 1], zero_stats[2 * c]);
  }
  std::size_t outliers() const noexcept { return values.size(); }

  /// Logical storage in bits per weight: bits + 2·3/β1 + 2·2·32/(β1·β2) + outliers·(32 value +
  /// 32 column index)/n + 32·(rows + 1)/n (the quantity SpQR reports; 3-bit codes take a nibble
  /// and one byte per statistic in this container, see bytes()).
  double bits_per_param() const noexcept {
    const double n = double(rows) * double(cols);
    if (n == 0) return 0;
    const double ng = double(num_groups());
    const double nc = double(scale_stats.size() / 2);
    return (double(bits) * n + 2 * 3 * ng + 2 * 2 * 32 * nc + 64 * double(outliers()) +
            32 * double(rows + 1)) /
           n;
  }
  /// Bytes actually held.
  std::size_t bytes() const noexcept {
    return codes.size() + scale_q.size() + zero_q.size() +
           4 * (scale_stats.size() + zero_stats.size() + row_ptr.size() + col_idx.size() +
                values.size());
  }

  /// SpQR quantization of W [rows, cols] (contiguous row-major) — see the file comment.
  /// Memory: allocates the result plus O(rows·cols) bytes of scratch (sensitivities, outlier
  /// mask); not for hot paths. Preconditions: bits 2..4, group > 0 dividing cols, stat_group > 0,
  /// τ > 0 (may be +inf), finite W, h finite and >= 0. Throws lowmem::invalid_argument before
  /// anything is built.
  template <class Arch = simd::default_arch>
  static spqr_weight quantize(ConstRowRef<float> W, const spqr_config& cfg = {}) {
    const char* fn = "spqr_weight::quantize";
    require(cfg.bits >= 2 && cfg.bits <= 4, fn, "cfg.bits", "2..4", cfg.bits);
    require_positive(fn, "cfg.group", cfg.group);
    require_positive(fn, "cfg.stat_group", cfg.stat_group);
    require_multiple_of(fn, "W.cols", cfg.group, index_t(W.cols()));
    require(cfg.outlier_tau > 0, fn, "cfg.outlier_tau", "> 0", cfg.outlier_tau);
    require_equal(fn, "W.outerStride (contiguous)", index_t(W.cols()), index_t(W.outerStride()));
    const std::size_t n = std::size_t(W.rows()) * std::size_t(W.cols());
    for (std::size_t i = 0; i < n; ++i)
      require(std::isfinite(W.data()[i]), fn, "W", "finite values", W.data()[i]);
    if (cfg.hessian_diag)
      for (index_t j = 0; j < W.cols(); ++j)
        require(std::isfinite(cfg.hessian_diag[j]) && cfg.hessian_diag[j] >= 0, fn,
                "cfg.hessian_diag", "finite and >= 0", cfg.hessian_diag[j]);

    spqr_weight q;
    q.rows = W.rows(), q.cols = W.cols(), q.group = cfg.group, q.stat_group = cfg.stat_group;
    q.bits = cfg.bits;
    const std::size_t ng = q.num_groups();
    const std::size_t nc = (ng + std::size_t(cfg.stat_group) - 1) / std::size_t(cfg.stat_group);
    q.codes.assign((n + 1) / 2, 0);
    q.scale_q.assign(ng, 0), q.zero_q.assign(ng, 0);
    q.scale_stats.assign(2 * nc, 0.f), q.zero_stats.assign(2 * nc, 0.f);
    const float* w = W.data();
    std::vector<std::uint8_t> is_out(n, 0);
    std::vector<float> s(ng), z(ng);

    // outliers by SpQR's leave-one-out sensitivity, then the statistics without them
    if (std::isfinite(cfg.outlier_tau)) q.select_outliers(w, cfg, is_out.data());
    q.first_level(w, is_out.data(), s.data(), z.data());
    q.second_level(s.data(), q.scale_q.data(), q.scale_stats.data());
    q.second_level(z.data(), q.zero_q.data(), q.zero_stats.data());
    q.encode(w);
    // outlier residuals against the final codes
    q.row_ptr.assign(std::size_t(q.rows) + 1, 0);
    std::vector<float> row(std::size_t(q.cols));
    for (index_t r = 0; r < q.rows; ++r) {
      q.dequantize_row<Arch>(std::size_t(r), row.data(), false);
      for (index_t j = 0; j < q.cols; ++j) {
        const std::size_t i = std::size_t(r) * std::size_t(q.cols) + std::size_t(j);
        if (!is_out[i]) continue;
        q.col_idx.push_back(std::int32_t(j));
        q.values.push_back(w[i] - row[std::size_t(j)]);
      }
      q.row_ptr[std::size_t(r) + 1] = std::int32_t(q.values.size());
    }
    return q;
  }

  /// Row r of deq(W) into out[cols] (with the outlier corrections unless `with_outliers` is
  /// false). Allocates nothing.
  template <class Arch = simd::default_arch>
  void dequantize_row(std::size_t r, float* out, bool with_outliers = true) const {
    const std::size_t G = std::size_t(group), C = std::size_t(cols);
    for (std::size_t j = 0; j < C; j += G) {
      const std::size_t g = (r * C + j) / G;
      const float sh = scale(g), zh = zero(g);
      kernels::codebook_dequant<Arch>(codes.data(), r * C + j, G, kernels::int4_levels,
                                      kernels::int4_pairs(), sh, -zh * sh, out + j);
    }
    if (with_outliers && !row_ptr.empty())
      for (std::int32_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k)
        out[col_idx[std::size_t(k)]] += values[std::size_t(k)];
  }

private:
  // s, z of every group over the elements with is_out == 0 (0, 0 when none or a constant group).
  void first_level(const float* w, const std::uint8_t* is_out, float* s, float* z) const {
    const std::size_t G = std::size_t(group);
    const float qmax = float((1 << bits) - 1);
    for (std::size_t g = 0; g < num_groups(); ++g) {
      float lo = INFINITY, hi = -INFINITY;
      for (std::size_t k = g * G; k < (g + 1) * G; ++k)
        if (!is_out[k]) lo = std::min(lo, w[k]), hi = std::max(hi, w[k]);
      // the range always holds 0 (z in [0, 2^bits − 1], as the affine formats): a constant or
      // one-signed group still reconstructs, and the zeros share a bounded second-level range
      lo = lo < 0 ? lo : 0.0f;
      hi = hi > 0 ? hi : 0.0f;
      s[g] = (hi - lo) / qmax;
      z[g] = s[g] > 0 ? std::min(qmax, -lo / s[g]) : 0.0f;
    }
  }
  // h-weighted squared RTN error of w[k] (k in [b, e), k != skip) under the group statistics of
  // the same elements (range holding 0, as first_level), before the bilevel step.
  double group_error(const float* w, std::size_t b, std::size_t e, std::size_t skip,
                     const float* h) const {
    const float qmax = float((1 << bits) - 1);
    float lo = 0.0f, hi = 0.0f;
    for (std::size_t k = b; k < e; ++k)
      if (k != skip) lo = std::min(lo, w[k]), hi = std::max(hi, w[k]);
    const float sc = (hi - lo) / qmax;
    if (!(sc > 0)) return 0.0;
    const float inv = 1.0f / sc, zz = std::min(qmax, -lo * inv);
    double err = 0;
    for (std::size_t k = b; k < e; ++k) {
      if (k == skip) continue;
      const float c = std::min(qmax, std::max(0.0f, std::nearbyint(std::fma(w[k], inv, zz))));
      const double d = double(w[k]) - double((c - zz) * sc);
      err += d * d * (h ? double(h[k % std::size_t(cols)]) : 1.0);
    }
    return err;
  }
  // SpQR's criterion: ω_i = E_g − E_g∖i, the reduction of its group's h-weighted squared error when
  // w_i leaves the group statistics (kept in fp32 instead); outlier iff ω_i > τ·mean_i(e_i), e_i
  // the per-element error of plain RTN. O(group²) per group.
  void select_outliers(const float* w, const spqr_config& cfg, std::uint8_t* is_out) const {
    const std::size_t G = std::size_t(group), ng = num_groups();
    const std::size_t none = ~std::size_t(0);
    std::vector<double> base(ng);
    double total = 0;
    for (std::size_t g = 0; g < ng; ++g)
      total += base[g] = group_error(w, g * G, (g + 1) * G, none, cfg.hessian_diag);
    const double mean = total / double(ng * G);
    if (!(mean > 0)) return;
    for (std::size_t g = 0; g < ng; ++g)
      for (std::size_t i = g * G; i < (g + 1) * G; ++i) {
        const double omega = base[g] - group_error(w, g * G, (g + 1) * G, i, cfg.hessian_diag);
        is_out[i] = omega > double(cfg.outlier_tau) * mean;
      }
  }
  // 3-bit min-max quantization of v[num_groups] in chunks of stat_group.
  void second_level(const float* v, std::uint8_t* qv, float* stats) const {
    const std::size_t ng = num_groups(), B = std::size_t(stat_group);
    for (std::size_t c = 0; c * B < ng; ++c) {
      const std::size_t b0 = c * B, b1 = std::min(ng, b0 + B);
      float lo = v[b0], hi = v[b0];
      for (std::size_t g = b0; g < b1; ++g) lo = std::min(lo, v[g]), hi = std::max(hi, v[g]);
      const float step = (hi - lo) / 7.0f;
      const float inv = step > 0 ? 1.0f / step : 0.0f;
      stats[2 * c] = lo, stats[2 * c + 1] = step;
      for (std::size_t g = b0; g < b1; ++g) {
        const float t = std::nearbyint((v[g] - lo) * inv);
        qv[g] = std::uint8_t(std::min(7.0f, std::max(0.0f, t)));
      }
    }
  }
  // RTN codes against the dequantized statistics.
  void encode(const float* w) {
    const std::size_t G = std::size_t(group);
    const float qmax = float((1 << bits) - 1);
    std::uint8_t tmp[256];
    for (std::size_t g = 0; g < num_groups(); ++g) {
      const float sh = scale(g), zh = zero(g);
      const float inv = sh > 0 ? 1.0f / sh : 0.0f;
      for (std::size_t k0 = 0; k0 < G; k0 += 256) {
        const std::size_t m = std::min<std::size_t>(256, G - k0);
        for (std::size_t k = 0; k < m; ++k) {
          const float t = std::nearbyint(std::fma(w[g * G + k0 + k], inv, zh));
          tmp[k] = std::uint8_t(std::min(qmax, std::max(0.0f, t)));
        }
        kernels::pack_nibbles(tmp, m, codes.data(), g * G + k0);
      }
    }
  }
};

/// Dequantizes all of W into out [rows, cols] (an fp32 copy by definition; for tests/export).
template <class Arch = simd::default_arch>
inline void spqr_dequantize(const spqr_weight& W, RowRef<float> out) {
  const char* fn = "spqr_dequantize";
  require_equal(fn, "out.rows", W.rows, index_t(out.rows()));
  require_equal(fn, "out.cols", W.cols, index_t(out.cols()));
  require_equal(fn, "out.outerStride (contiguous)", W.cols, index_t(out.outerStride()));
  for (index_t r = 0; r < W.rows; ++r) W.dequantize_row<Arch>(std::size_t(r), out.row(r).data());
}

/// Scratch bytes of spqr_forward / spqr_backward: one dequantized row (cols floats).
inline std::size_t spqr_workspace_bytes(const spqr_weight& W) {
  workspace_planner p;
  p.take<float>(std::size_t(W.cols));
  return p.bytes();
}

/// SpQR linear forward y = x·deq(W)ᵀ = x·Qᵀ + x·Sᵀ (overwrites y): each row of W is dequantized
/// into the workspace (groups of ŝ, ẑ, then the CSR corrections) and dotted with every row of x.
/// Shapes: x [M, in], y [M, out], W [out, in]. Memory: `ws` (spqr_workspace_bytes), no fp32 copy
/// of W, no allocation. Numerics: fp32 dot products of exactly dequantized rows (vs dequantize
/// then GEMM in double: ~1e-6 relative).
template <class Arch = simd::default_arch>
inline void spqr_forward(ConstRowRef<float> x, const spqr_weight& W, RowRef<float> y,
                         workspace ws) {
  const char* fn = "spqr_forward";
  require_equal(fn, "x.cols (== W.cols)", W.cols, index_t(x.cols()));
  require_equal(fn, "y.rows (== x.rows)", index_t(x.rows()), index_t(y.rows()));
  require_equal(fn, "y.cols (== W.rows)", W.rows, index_t(y.cols()));
  require_workspace(fn, ws, spqr_workspace_bytes(W));
  float* row = ws.take<float>(std::size_t(W.cols));
  for (index_t o = 0; o < W.rows; ++o) {
    W.dequantize_row<Arch>(std::size_t(o), row);
    for (index_t m = 0; m < x.rows(); ++m)
      y(m, o) = kernels::dot<Arch>(x.row(m).data(), row, std::size_t(W.cols));
  }
}

/// SpQR linear backward (input gradient; W frozen): dx += dy·deq(W) (ACCUMULATES). Shapes dy
/// [M, out], dx [M, in]. Memory and numerics as spqr_forward.
template <class Arch = simd::default_arch>
inline void spqr_backward(ConstRowRef<float> dy, const spqr_weight& W, RowRef<float> dx,
                          workspace ws) {
  const char* fn = "spqr_backward";
  require_equal(fn, "dy.cols (== W.rows)", W.rows, index_t(dy.cols()));
  require_equal(fn, "dx.rows (== dy.rows)", index_t(dy.rows()), index_t(dx.rows()));
  require_equal(fn, "dx.cols (== W.cols)", W.cols, index_t(dx.cols()));
  require_workspace(fn, ws, spqr_workspace_bytes(W));
  float* row = ws.take<float>(std::size_t(W.cols));
  for (index_t o = 0; o < W.rows; ++o) {
    W.dequantize_row<Arch>(std::size_t(o), row);
    for (index_t m = 0; m < dy.rows(); ++m)
      if (dy(m, o) != 0.0f)
        kernels::axpy<Arch>(dy(m, o), row, dx.row(m).data(), std::size_t(W.cols));
  }
}

} // namespace lowmem::quant
