// lowmem/quant/qat.hpp — quantization-aware training: fake-quantize forward (quantize then
// dequantize in one pass, nothing stored) with straight-through-estimator backward, and LSQ
// (learned step size, arXiv:1902.08153) with its step-size gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../kernels/quant.hpp"
#include "formats.hpp"

namespace lowmem::quant {

/// Fake-quantize with an affine format: y = deq(q(x)) exactly as affine_quantize followed by
/// affine_dequantize (same scales, rounding and non-finite policy), without storing codes.
/// Shapes: x, y [rows, cols] row-major contiguous (y may alias x). Memory: none (stack chunk).
template <class Arch = simd::default_arch>
inline void fake_quant_affine_forward(const float* x, index_t rows, index_t cols,
                                      const affine_format& f, float* y,
                                      rounding r = rounding::nearest_even, random::stream s = {},
                                      std::uint64_t offset = 0) {
  const char* fn = "fake_quant_affine_forward";
  const index_t B = detail::affine_block_len(fn, rows, cols, f);
  const std::size_t n = std::size_t(rows * cols);
  require_data(fn, "x", x, n);
  require_data(fn, "y", y, n);
  alignas(64) std::uint8_t tmp[256];
  const bool is_signed = f.bits == 8 && f.symmetric;
  for (std::size_t begin = 0; begin < n; begin += std::size_t(B)) {
    const std::size_t len = std::min<std::size_t>(std::size_t(B), n - begin);
    const kernels::affine_block blk =
        kernels::affine_choose<Arch>(x + begin, len, f.bits, f.symmetric);
    for (std::size_t c = 0; c < len; c += 256) {
      const std::size_t m = std::min<std::size_t>(256, len - c);
      if (!blk.finite)
        std::memset(tmp, blk.zero & 0xFF, m);
      else if (r == rounding::nearest_even)
        kernels::affine_codes_rne<Arch>(x + begin + c, m, blk, tmp);
      else
        kernels::affine_codes_stochastic<Arch>(x + begin + c, m, blk, s, offset + begin + c, tmp);
      if (f.bits == 4 && f.symmetric) { // offset-binary nibble -> signed level, as the dequantizer
        for (std::size_t i = 0; i < m; ++i) tmp[i] = std::uint8_t(tmp[i] - 8);
        kernels::affine_dequant8<Arch>(tmp, m, true, blk.scale, 0.0f, y + begin + c);
      } else {
        kernels::affine_dequant8<Arch>(tmp, m, is_signed, blk.scale, float(blk.zero),
                                       y + begin + c);
      }
    }
  }
}

/// Fake-quantize with a 4-bit codebook (NF4 / FP4, block absmax): y = deq(q(x)), as
/// fourbit_quantize + fourbit_dequantize. Shapes: x, y [n] (may alias). Memory: none.
template <class Arch = simd::default_arch>
inline void fake_quant_fourbit_forward(const float* x, std::size_t n, fourbit t, index_t block,
                                       float* y) {
  const char* fn = "fake_quant_fourbit_forward";
  fourbit_num_blocks(n, block);
  require_data(fn, "x", x, n);
  require_data(fn, "y", y, n);
  const kernels::codebook4& cb =
      t == fourbit::nf4 ? kernels::nf4_codebook() : kernels::fp4_codebook();
  const float* levels = fourbit_levels(t);
  alignas(64) std::uint8_t codes[256], packed[128];
  for (std::size_t begin = 0; begin < n; begin += std::size_t(block)) {
    const std::size_t len = std::min<std::size_t>(std::size_t(block), n - begin);
    const std::int32_t bits = kernels::absmax_bits<Arch>(x + begin, len);
    const bool finite = bits < kernels::inf_bits;
    const float am =
        finite ? kernels::bits_to_float(bits) : std::numeric_limits<float>::quiet_NaN();
    const float inv = finite && am > 0 ? 1.0f / am : 0.0f;
    for (std::size_t c = 0; c < len; c += 256) {
      const std::size_t m = std::min<std::size_t>(256, len - c);
      if (finite)
        kernels::codebook_codes<Arch>(x + begin + c, m, inv, cb, codes);
      else
        std::memset(codes, kernels::codebook_code_scalar(0.0f, cb), m);
      kernels::pack_nibbles(codes, m, packed, 0);
      kernels::codebook_dequant<Arch>(
          packed, 0, m, levels, t == fourbit::nf4 ? kernels::nf4_pairs() : kernels::fp4_pairs(), am,
          0.0f, y + begin + c);
    }
  }
}

/// Fake-quantize through block-scaled FP8: y = fp8_dequantize(fp8_quantize(x)). Memory: none.
template <class Arch = simd::default_arch>
inline void fake_quant_fp8_forward(const float* x, std::size_t n, fp8_format f, index_t block,
                                   float* y) {
  const char* fn = "fake_quant_fp8_forward";
  fourbit_num_blocks(n, block);
  require_data(fn, "x", x, n);
  require_data(fn, "y", y, n);
  alignas(64) std::uint8_t codes[256];
  for (std::size_t begin = 0; begin < n; begin += std::size_t(block)) {
    const std::size_t len = std::min<std::size_t>(std::size_t(block), n - begin);
    const std::int32_t bits = kernels::absmax_bits<Arch>(x + begin, len);
    const float am = kernels::bits_to_float(bits);
    const bool finite = bits < kernels::inf_bits;
    const float sc =
        !finite ? std::numeric_limits<float>::quiet_NaN() : (am > 0 ? am / fp8_max(f) : 1.0f);
    for (std::size_t c = 0; c < len; c += 256) {
      const std::size_t m = std::min<std::size_t>(256, len - c);
      if (!finite) {
        for (std::size_t i = 0; i < m; ++i) y[begin + c + i] = sc;
      } else if (f == fp8_format::e4m3) {
        kernels::fp8_encode_array<Arch, 3>(x + begin + c, m, 1.0f / sc, true, codes);
        kernels::fp8_decode_array<Arch, 3>(codes, m, sc, y + begin + c);
      } else {
        kernels::fp8_encode_array<Arch, 2>(x + begin + c, m, 1.0f / sc, true, codes);
        kernels::fp8_decode_array<Arch, 2>(codes, m, sc, y + begin + c);
      }
    }
  }
}

/// Straight-through backward of every fake-quant forward above: dx += dy (ACCUMULATES).
/// Why identity: their scales come from the block's own absmax / range, so no element is ever
/// clipped, and the STE treats round() as the identity (the scale's dependence on x is not
/// differentiated, as in QLoRA/torchao QAT). Elements with non-finite x get no gradient.
/// Shapes: x, dy, dx [n]. Memory: none.
template <class Arch = simd::default_arch>
inline void fake_quant_backward(const float* x, const float* dy, std::size_t n, float* dx) {
  const char* fn = "fake_quant_backward";
  require_data(fn, "x", x, n);
  require_data(fn, "dy", dy, n);
  require_data(fn, "dx", dx, n);
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  std::size_t i = 0;
  const I absmask(0x7FFFFFFF), inf(kernels::inf_bits);
  for (; i + W <= n; i += W) {
    const I a = xsimd::bitwise_cast<I>(F::load_unaligned(x + i)) & absmask;
    const I g = xsimd::bitwise_cast<I>(F::load_unaligned(dy + i));
    const F gm = xsimd::bitwise_cast<F>(xsimd::select(a < inf, g, I(0)));
    (F::load_unaligned(dx + i) + gm).store_unaligned(dx + i);
  }
  if (i < n) { // tail through the same vector code on a zero-padded copy
    const std::size_t rem = n - i;
    const F xt = simd::load_partial<Arch>(x + i, rem), gt = simd::load_partial<Arch>(dy + i, rem);
    const I a = xsimd::bitwise_cast<I>(xt) & absmask;
    const F gm = xsimd::bitwise_cast<F>(xsimd::select(a < inf, xsimd::bitwise_cast<I>(gt), I(0)));
    simd::store_partial<Arch>(dx + i, simd::load_partial<Arch>(dx + i, rem) + gm, rem);
  }
}

// ---- LSQ ---------------------------------------------------------------------------------------

/// LSQ quantizer range: signed b-bit: [−2^(b−1), 2^(b−1) − 1]; unsigned: [0, 2^b − 1].
struct lsq_format {
  int bits = 4;
  bool is_signed = true;
  index_t group = 0; ///< elements per step along a row (0 = per row, i.e. per output channel)
  float qn() const { return is_signed ? std::ldexp(1.0f, bits - 1) : 0.0f; }
  float qp() const {
    return is_signed ? std::ldexp(1.0f, bits - 1) - 1 : std::ldexp(1.0f, bits) - 1;
  }
};

namespace detail {
inline index_t lsq_group(const char* fn, index_t rows, index_t cols, const lsq_format& f,
                         const float* step) {
  require_non_negative(fn, "rows", rows);
  require_non_negative(fn, "cols", cols);
  require_in_closed(fn, "format.bits", 2, 16, f.bits);
  require_non_negative(fn, "format.group", f.group);
  const index_t g = f.group == 0 ? cols : f.group;
  if (cols > 0) require_multiple_of(fn, "cols (per-group LSQ)", g, cols);
  const index_t ns = g > 0 ? rows * cols / g : 0;
  require_data(fn, "step", step, std::size_t(ns));
  for (index_t b = 0; b < ns; ++b) require_positive(fn, "step", step[b]);
  return g;
}
} // namespace detail

/// Number of step sizes of an LSQ format on rows × cols.
inline index_t lsq_num_steps(index_t rows, index_t cols, const lsq_format& f) {
  const index_t g = f.group == 0 ? cols : f.group;
  return g > 0 ? rows * cols / g : 0;
}

/// Suggested LSQ initial step per group (paper §2.1): 2·mean|x| / sqrt(Qp). Writes step[...].
inline void lsq_init_steps(const float* x, index_t rows, index_t cols, const lsq_format& f,
                           float* step) {
  const char* fn = "lsq_init_steps";
  require_in_closed(fn, "format.bits", 2, 16, f.bits);
  const index_t g = f.group == 0 ? cols : f.group;
  require_positive(fn, "group", g);
  require_multiple_of(fn, "cols", g, cols);
  require_data(fn, "x", x, std::size_t(rows * cols));
  for (index_t b = 0; b < rows * cols / g; ++b) {
    double s = 0;
    for (index_t k = 0; k < g; ++k) s += std::fabs(double(x[b * g + k]));
    const double v = 2.0 * s / double(g) / std::sqrt(double(f.qp()));
    step[b] = float(v > 0 ? v : 1e-8);
  }
}

/// LSQ forward: v = x / s_b, y = rne(clamp(v, −Qn, Qp))·s_b, one step s_b per group of `group`
/// consecutive elements of a row (per output channel when group = 0 = cols).
/// Shapes: x, y [rows, cols] row-major contiguous, step [lsq_num_steps]. Memory: none.
/// Preconditions: every step finite and > 0 (checked before writing).
template <class Arch = simd::default_arch>
inline void lsq_forward(const float* x, const float* step, index_t rows, index_t cols,
                        const lsq_format& f, float* y) {
  const char* fn = "lsq_forward";
  const index_t g = detail::lsq_group(fn, rows, cols, f, step);
  require_data(fn, "x", x, std::size_t(rows * cols));
  require_data(fn, "y", y, std::size_t(rows * cols));
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F lo(-f.qn()), hi(f.qp());
  const std::size_t G = std::size_t(g);
  for (index_t b = 0; b < lsq_num_steps(rows, cols, f); ++b) {
    const float s = step[b], inv = 1.0f / s;
    const float* xb = x + std::size_t(b) * G;
    float* yb = y + std::size_t(b) * G;
    std::size_t i = 0;
    for (; i + W <= G; i += W) {
      const F v = xsimd::min(xsimd::max(F::load_unaligned(xb + i) * F(inv), lo), hi);
      (xsimd::nearbyint(v) * F(s)).store_unaligned(yb + i);
    }
    for (; i < G; ++i) yb[i] = std::nearbyint(std::min(std::max(xb[i] * inv, -f.qn()), f.qp())) * s;
  }
}

/// LSQ backward (ACCUMULATES into dx and dstep), the paper's estimator:
///   dx_i    += dy_i · 1[−Qn <= v_i <= Qp]
///   dstep_b += gscale_b · Σ_{i in b} dy_i · (−Qn if v_i < −Qn; Qp if v_i > Qp; rne(v_i) − v_i)
/// with v = x/s and gradient scale gscale_b = 1/sqrt(N_b·Qp), N_b = elements sharing the step
/// (pass grad_scale > 0 to override). Memory: none. Numerics: the step sum accumulates in double.
template <class Arch = simd::default_arch>
inline void lsq_backward(const float* x, const float* step, const float* dy, index_t rows,
                         index_t cols, const lsq_format& f, float* dx, float* dstep,
                         float grad_scale = 0.0f) {
  const char* fn = "lsq_backward";
  const index_t g = detail::lsq_group(fn, rows, cols, f, step);
  const std::size_t n = std::size_t(rows * cols);
  require_data(fn, "x", x, n);
  require_data(fn, "dy", dy, n);
  require_data(fn, "dx", dx, n);
  require_data(fn, "dstep", dstep, std::size_t(lsq_num_steps(rows, cols, f)));
  require_non_negative(fn, "grad_scale", grad_scale);
  const float qn = f.qn(), qp = f.qp();
  const std::size_t G = std::size_t(g);
  const double gs = grad_scale > 0 ? grad_scale : 1.0 / std::sqrt(double(G) * double(qp));
  for (index_t b = 0; b < lsq_num_steps(rows, cols, f); ++b) {
    const float inv = 1.0f / step[b];
    double acc = 0;
    for (std::size_t i = std::size_t(b) * G; i < std::size_t(b + 1) * G; ++i) {
      const float v = x[i] * inv;
      if (v < -qn) {
        acc -= double(dy[i]) * qn;
      } else if (v > qp) {
        acc += double(dy[i]) * qp;
      } else {
        dx[i] += dy[i];
        acc += double(dy[i]) * (double(std::nearbyint(v)) - double(v));
      }
    }
    dstep[b] += float(gs * acc);
  }
}

} // namespace lowmem::quant
