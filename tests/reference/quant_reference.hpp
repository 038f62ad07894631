// Naive references for the quantizers: plain scalar loops implementing the documented contracts
// (scales in float exactly as documented, everything else in double), no SIMD, no packing tricks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lowmem::ref {

/// Affine quantization of n elements in blocks of B, one code per element (unpacked, int32).
struct affine_ref_result {
  std::vector<std::int32_t> q; // code - zero (the signed integer level)
  std::vector<float> scale, zero;
};

inline affine_ref_result affine_quantize_ref(const float* x, std::size_t n, std::size_t B, int bits,
                                             bool symmetric) {
  affine_ref_result r;
  r.q.resize(n);
  for (std::size_t b0 = 0; b0 < n; b0 += B) {
    const std::size_t len = std::min(B, n - b0);
    float amax = 0, lo = 0, hi = 0;
    for (std::size_t i = 0; i < len; ++i) {
      amax = std::max(amax, std::fabs(x[b0 + i]));
      lo = std::min(lo, x[b0 + i]);
      hi = std::max(hi, x[b0 + i]);
    }
    float s, z = 0;
    std::int32_t qlo, qhi;
    if (symmetric) {
      const int qmax = bits == 8 ? 127 : 7;
      s = amax / float(qmax);
      qlo = -qmax, qhi = qmax;
    } else {
      const int qmax = bits == 8 ? 255 : 15;
      s = (hi - lo) / float(qmax);
      if (s > 0) z = std::min(std::max(std::nearbyint(-lo * (1.0f / s)), 0.0f), float(qmax));
      qlo = -std::int32_t(z), qhi = qmax - std::int32_t(z);
    }
    const float inv = s > 0 ? 1.0f / s : 0.0f;
    r.scale.push_back(s);
    r.zero.push_back(z);
    for (std::size_t i = 0; i < len; ++i) {
      std::int32_t q = std::int32_t(std::nearbyint(x[b0 + i] * inv));
      r.q[b0 + i] = std::min(std::max(q, qlo), qhi);
    }
  }
  return r;
}

/// Nearest level (by |v - level| in double) among 16; returns the level value.
inline double nearest_level(double v, const float* levels) {
  double best = levels[0], d = std::fabs(v - levels[0]);
  for (int k = 1; k < 16; ++k)
    if (std::fabs(v - levels[k]) < d) d = std::fabs(v - levels[k]), best = levels[k];
  return best;
}

/// Reads nibble i of a packed 4-bit array (high nibble first).
inline int nibble(const std::uint8_t* packed, std::size_t i) {
  return (i & 1) ? (packed[i / 2] & 15) : (packed[i / 2] >> 4);
}

/// The value of an FP8 code from its definition (sign, exponent, mantissa, bias), in double.
inline double fp8_value_ref(std::uint8_t c, int ebits, int mbits) {
  const int bias = (1 << (ebits - 1)) - 1;
  const int s = c >> 7, e = (c >> mbits) & ((1 << ebits) - 1), m = c & ((1 << mbits) - 1);
  const double sign = s ? -1.0 : 1.0;
  if (ebits == 4 && e == 15 && m == 7) return std::nan("");
  if (ebits == 5 && e == 31) return m == 0 ? sign * INFINITY : std::nan("");
  if (e == 0) return sign * std::ldexp(double(m), 1 - bias - mbits);
  return sign * std::ldexp(1.0 + double(m) / double(1 << mbits), e - bias);
}

/// Dense x · Wᵀ in double: x [M, K], W [N, K] -> [M, N].
inline std::vector<double> matmul_xwt(const float* x, const float* W, std::size_t M, std::size_t N,
                                      std::size_t K) {
  std::vector<double> y(M * N, 0.0);
  for (std::size_t m = 0; m < M; ++m)
    for (std::size_t o = 0; o < N; ++o) {
      double acc = 0;
      for (std::size_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * double(W[o * K + k]);
      y[m * N + o] = acc;
    }
  return y;
}

/// Dense dy · W in double: dy [M, N], W [N, K] -> [M, K].
inline std::vector<double> matmul_dyw(const float* dy, const float* W, std::size_t M, std::size_t N,
                                      std::size_t K) {
  std::vector<double> dx(M * K, 0.0);
  for (std::size_t m = 0; m < M; ++m)
    for (std::size_t o = 0; o < N; ++o) {
      const double g = dy[m * N + o];
      for (std::size_t k = 0; k < K; ++k) dx[m * K + k] += g * double(W[o * K + k]);
    }
  return dx;
}

/// Dynamic int8 GEMV (qlinear_forward_int8_dynamic's contract): x [cols] quantized per group of g
/// with affine_quantize_ref (symmetric int8), y[r] = Σ_j sw[r, j·g/block]·sx[j]·Σ_k w·xq in double.
/// w: signed int8 codes [rows, cols]; sw: one scale per block of a row.
inline std::vector<double> dyn_int8_gemv_ref(const float* x, const std::int8_t* w, const float* sw,
                                             std::size_t rows, std::size_t cols, std::size_t block,
                                             std::size_t g) {
  const affine_ref_result xr = affine_quantize_ref(x, cols, g, 8, true);
  std::vector<double> y(rows, 0.0);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t j = 0; j * g < cols; ++j) {
      double d = 0;
      for (std::size_t k = j * g; k < (j + 1) * g; ++k) d += double(w[r * cols + k]) * xr.q[k];
      y[r] += double(sw[r * (cols / block) + j * g / block]) * double(xr.scale[j]) * d;
    }
  return y;
}

/// SpQR decode from its documented layout, in double: w = c·ŝ_g + o_g (o_g = float(−ẑ_g·ŝ_g)),
/// ŝ_g = min_c + q·step_c (same for ẑ), plus the CSR residuals. Returns rows·cols values.
inline std::vector<double> spqr_decode_ref(std::size_t rows, std::size_t cols, std::size_t group,
                                           std::size_t stat_group, const std::uint8_t* codes,
                                           const std::uint8_t* scale_q, const std::uint8_t* zero_q,
                                           const float* scale_stats, const float* zero_stats,
                                           const std::int32_t* row_ptr, const std::int32_t* col_idx,
                                           const float* values) {
  std::vector<double> w(rows * cols);
  for (std::size_t i = 0; i < rows * cols; ++i) {
    const std::size_t g = i / group, c = g / stat_group;
    const float sh = std::fma(float(scale_q[g]), scale_stats[2 * c + 1], scale_stats[2 * c]);
    const float zh = std::fma(float(zero_q[g]), zero_stats[2 * c + 1], zero_stats[2 * c]);
    const float o = -zh * sh;
    w[i] = double(nibble(codes, i)) * double(sh) + double(o);
  }
  for (std::size_t r = 0; r < rows; ++r)
    for (std::int32_t k = row_ptr[r]; k < row_ptr[r + 1]; ++k)
      w[r * cols + std::size_t(col_idx[k])] += double(values[k]);
  return w;
}

} // namespace lowmem::ref
