// lowmem/kernels/quant.hpp — inner loops of the quantizers (see lowmem/quant.hpp for the formats,
// layouts and policies). Raw pointers, templated on the xsimd Arch, no validation, no allocation:
// every public entry in quant.hpp validates first and then calls into here.
//
// Building blocks:
//  * byte <-> int32 lane moves (store_bytes / load_u8 / load_s8), one intrinsic per arch where
//    xsimd 8.1 has no narrowing/widening conversion, a portable loop otherwise;
//  * block reductions: max of |x| as integer bit patterns (NaN and Inf compare above every finite
//    value, so one integer max both finds the absmax and flags a non-finite block);
//  * affine block quantize (RNE or stochastic) / dequantize, 4-bit codebook (NF4, FP4) block
//    quantize / dequantize, FP8 e4m3 / e5m2 array conversions.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../core/random.hpp"
#include "../simd/simd.hpp"
#include "random.hpp"

namespace lowmem::quant::kernels {

// ---- codebooks ---------------------------------------------------------------------------------

/// NF4 levels (QLoRA, bitsandbytes' table; code k -> nf4_levels[k], ascending).
alignas(64) inline constexpr float nf4_levels[16] = {-1.0f,
                                                     -0.6961928009986877f,
                                                     -0.5250730514526367f,
                                                     -0.39491748809814453f,
                                                     -0.28444138169288635f,
                                                     -0.18477343022823334f,
                                                     -0.09105003625154495f,
                                                     0.0f,
                                                     0.07958029955625534f,
                                                     0.16093020141124725f,
                                                     0.24611230194568634f,
                                                     0.33791524171829224f,
                                                     0.44070982933044434f,
                                                     0.5626170039176941f,
                                                     0.7229568362236023f,
                                                     1.0f};

/// FP4 e2m1 (OCP MX) levels divided by 6 (the largest magnitude), so absmax scaling maps the
/// block onto [-1, 1] like NF4: code s.ee.m -> (-1)^s · {0, 0.5, 1, 1.5, 2, 3, 4, 6}[ee.m] / 6.
alignas(64) inline constexpr float fp4_levels[16] = {
    0.0f,         0.5f / 6.0f,  1.0f / 6.0f,  1.5f / 6.0f,  2.0f / 6.0f,  3.0f / 6.0f,
    4.0f / 6.0f,  1.0f,         -0.0f,        -0.5f / 6.0f, -1.0f / 6.0f, -1.5f / 6.0f,
    -2.0f / 6.0f, -3.0f / 6.0f, -4.0f / 6.0f, -1.0f};

/// Identity levels 0..15: affine int4 dequantization reuses the codebook path.
alignas(64) inline constexpr float int4_levels[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                      8, 9, 10, 11, 12, 13, 14, 15};

/// Symmetric int4 as a codebook: code c -> c − 8 (offset binary), so dequantization is level·s.
alignas(64) inline constexpr float int4_sym_levels[16] = {-8, -7, -6, -5, -4, -3, -2, -1,
                                                          0,  1,  2,  3,  4,  5,  6,  7};

/// A 4-bit codebook prepared for quantization: levels sorted ascending (`sorted`), their codes
/// (`code_of`), and the 15 decision thresholds (midpoints) between consecutive sorted levels.
struct codebook4 {
  const float* levels; // code -> value (16 entries)
  float sorted[16];
  std::uint8_t code_of[16];
  float mid[15];
  bool identity;       // sorted order == code order (NF4)
  bool sign_magnitude; // code = sign << 3 | magnitude index, levels[k + 8] == -levels[k] (FP4)
  float mag_mid[7];    // thresholds between consecutive magnitudes (sign_magnitude only)
  // Cell table of the AVX-512 packed path: [-1, 1] cut into 32 cells of width 1/16; cell j
  // starts at lo_j = -1 + j/16. cell_base[j] = #{t : mid[t] < lo_j}; when every cell holds at
  // most one threshold and none lies within 1e-6 of a cell edge (cells_ok; true for NF4, whose
  // thresholds are >= 0.08 apart), the sorted index of v in cell j is
  // cell_base[j] + (v > mid[cell_base[j]]): one lookup and one compare instead of 15.
  bool cells_ok;
  alignas(64) std::int32_t cell_base[32];
  alignas(64) float mid16[16];         // mid, then +inf (vector lookups)
  alignas(64) std::int32_t code32[16]; // code_of widened to int32 lanes
  alignas(64) float mag16[16];         // mag_mid, then +inf (sign-magnitude vector path)
  // Magnitude cell table (sign-magnitude books, FP4): |v| cut into 16 cells of width 1/16
  // centred on j/16, cell j = min(floor(16·|v| + 1/2), 15) covers [(j − 1/2)/16, (j + 1/2)/16)
  // (cell 15 extends to +inf); mag_base[j] = #{t : mag_mid[t] < (j − 1/2)/16}. FP4's magnitude
  // thresholds {1, 3, 5, 7, 10, 14, 20}/24 sit at 16·t + 1/2 = 1.17, 2.5, 3.83, ... : one per cell
  // at most and >= 1/6 cell from every edge (the half-cell offset keeps 1/8 = 3/24 off an edge),
  // so the magnitude index is mag_base[j] + (|v| > mag_mid[mag_base[j]]) (mag_cells_ok).
  bool mag_cells_ok;
  alignas(64) std::int32_t mag_base[16];
  // Byte-table cells of the fused AVX-512 block kernel (codebook_blocks64). The value u (NF4: v;
  // sign-magnitude FP4: |v|) lands in cell j = trunc(lut_scale·u + lut_offset): NF4 16·v + 15.5,
  // 32 cells, j in [0, 31] for |v| <= 1 with no clamp (cell 0 also takes (-1/16, 0) of the
  // argument, which truncates to 0); FP4 15·|v| + 0.3, 16 cells, j in [0, 15]. Every cell holds
  // at most one threshold, lut_t[j] (+inf if none), and none lies within 1e-4 of a cell edge in
  // the scaled coordinate (rounding moves the argument by <= 2^-19), so the count of thresholds
  // below u is base_j + (u > lut_t[j]). lut_code maps the byte index j + 32·(v > lut_t[j]) (NF4)
  // or j + 16·(|v| > lut_t[j]) + 32·(v < 0) (FP4) straight to the code (one vpermb for 64 values).
  bool lut_ok;
  float lut_scale, lut_offset;
  alignas(64) float lut_t[32];
  alignas(64) std::uint8_t lut_code[64];
};

/// Fills the byte-table cells of cb (see codebook4::lut_ok) for sorted thresholds t[0, nt),
/// `cells` cells of the argument scale·u + offset. base_j = #{t : scale·t + offset < j} and the
/// threshold inside cell j; returns false when a cell holds two thresholds or one lies within 1e-4
/// of a cell edge (then the kernel cannot use the table).
inline bool make_cell_lut(codebook4& cb, const float* t, int nt, int cells, float scale,
                          float offset, int* base) {
  bool ok = true;
  for (int j = 0; j < cells; ++j) {
    const double lo = j == 0 ? -HUGE_VAL : j, hi = j == cells - 1 ? HUGE_VAL : j + 1;
    int below = 0, inside = 0;
    cb.lut_t[j] = std::numeric_limits<float>::infinity();
    for (int k = 0; k < nt; ++k) {
      const double y = double(scale) * double(t[k]) + double(offset);
      below += y < lo;
      if (y >= lo && y < hi) ++inside, cb.lut_t[j] = t[k];
      ok = ok && std::fabs(y - std::nearbyint(y)) > 1e-4;
    }
    base[j] = below;
    ok = ok && inside <= 1;
  }
  cb.lut_scale = scale, cb.lut_offset = offset;
  return ok;
}

inline codebook4 make_codebook4(const float* levels) noexcept {
  codebook4 cb{};
  cb.levels = levels;
  // insertion sort of 16 (value, code) pairs; -0 sorts next to +0 (FP4) and is never chosen,
  // because ties go to the first (lower) entry, which is -0 < +0 only by code order: we keep +0
  // by sorting equal values with the smaller code first.
  for (int k = 0; k < 16; ++k) {
    int j = k;
    while (j > 0 && (cb.sorted[j - 1] > levels[k] ||
                     (cb.sorted[j - 1] == levels[k] && cb.code_of[j - 1] > k))) {
      cb.sorted[j] = cb.sorted[j - 1];
      cb.code_of[j] = cb.code_of[j - 1];
      --j;
    }
    cb.sorted[j] = levels[k];
    cb.code_of[j] = std::uint8_t(k);
  }
  for (int k = 0; k < 15; ++k) cb.mid[k] = 0.5f * (cb.sorted[k] + cb.sorted[k + 1]);
  cb.identity = true;
  for (int k = 0; k < 16; ++k) cb.identity = cb.identity && cb.code_of[k] == k;
  cb.sign_magnitude = true;
  for (int k = 0; k < 8; ++k) cb.sign_magnitude = cb.sign_magnitude && levels[k + 8] == -levels[k];
  for (int k = 0; k < 7; ++k) {
    cb.sign_magnitude = cb.sign_magnitude && levels[k] >= 0 && levels[k] < levels[k + 1];
    cb.mag_mid[k] = 0.5f * (levels[k] + levels[k + 1]);
  }
  cb.cells_ok = true;
  for (int j = 0; j < 32; ++j) {
    const double lo = -1.0 + j / 16.0, hi = lo + 1.0 / 16.0;
    int base = 0, inside = 0;
    for (int t = 0; t < 15; ++t) {
      base += double(cb.mid[t]) < lo;
      inside += double(cb.mid[t]) >= lo && double(cb.mid[t]) < hi;
      // a threshold this close to an edge could land in the neighbouring cell after rounding
      const double d = std::fabs(double(cb.mid[t]) - lo);
      cb.cells_ok = cb.cells_ok && d > 1e-6 && std::fabs(double(cb.mid[t]) - hi) > 1e-6;
    }
    cb.cell_base[j] = base;
    cb.cells_ok = cb.cells_ok && inside <= 1;
  }
  for (int k = 0; k < 15; ++k) cb.mid16[k] = cb.mid[k];
  cb.mid16[15] = std::numeric_limits<float>::infinity();
  for (int k = 0; k < 16; ++k) cb.code32[k] = cb.code_of[k];
  for (int k = 0; k < 16; ++k)
    cb.mag16[k] = k < 7 ? cb.mag_mid[k] : std::numeric_limits<float>::infinity();
  cb.mag_cells_ok = cb.sign_magnitude && !cb.identity;
  for (int j = 0; j < 16; ++j) {
    const double lo = (j - 0.5) / 16.0, hi = j == 15 ? HUGE_VAL : lo + 1.0 / 16.0;
    int base = 0, inside = 0;
    for (int t = 0; t < 7; ++t) {
      const double m = cb.mag_mid[t];
      base += m < lo;
      inside += m >= lo && m < hi;
      cb.mag_cells_ok = cb.mag_cells_ok && std::fabs(m - lo) > 1e-6 && std::fabs(m - hi) > 1e-6;
    }
    cb.mag_base[j] = base;
    cb.mag_cells_ok = cb.mag_cells_ok && inside <= 1;
  }
  int base[32] = {};
  if (cb.identity || !cb.sign_magnitude) { // NF4: signed cells, code of sorted index base + m
    cb.lut_ok = make_cell_lut(cb, cb.mid, 15, 32, 16.0f, 15.5f, base);
    for (int i = 0; i < 64; ++i) {
      const int k = base[i % 32] + (i / 32);
      cb.lut_code[i] = cb.code_of[k < 15 ? k : 15];
    }
  } else { // FP4: magnitude cells; code = 8·(v < 0) + magnitude index base + m
    cb.lut_ok = make_cell_lut(cb, cb.mag_mid, 7, 16, 15.0f, 0.3f, base);
    for (int i = 0; i < 64; ++i) {
      const int k = base[i % 16] + (i / 16) % 2;
      cb.lut_code[i] = std::uint8_t((i / 32) * 8 + (k < 7 ? k : 7));
    }
  }
  return cb;
}

inline const codebook4& nf4_codebook() noexcept {
  static const codebook4 cb = make_codebook4(nf4_levels);
  return cb;
}
inline const codebook4& fp4_codebook() noexcept {
  static const codebook4 cb = make_codebook4(fp4_levels);
  return cb;
}

// ---- byte <-> lane moves -----------------------------------------------------------------------

/// Stores the low byte of each int32 lane of v to dst[0..W).
template <class Arch> inline void store_bytes(std::uint8_t* dst, const simd::ibatch<Arch>& v) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(v));
    return;
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    const __m256i m = _mm256_and_si256(v, _mm256_set1_epi32(0xFF));
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(p16, p16));
    return;
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    const __m128i m = _mm_and_si128(v, _mm_set1_epi32(0xFF));
    const __m128i p16 = _mm_packs_epi32(m, m); // values <= 255: signed saturation is exact
    const int w = _mm_cvtsi128_si32(_mm_packus_epi16(p16, p16));
    std::memcpy(dst, &w, 4);
    return;
  } else
#endif
  {
    alignas(64) std::int32_t tmp[simd::width<Arch>];
    v.store_aligned(tmp);
    for (std::size_t i = 0; i < simd::width<Arch>; ++i) dst[i] = std::uint8_t(tmp[i]);
  }
}

/// Loads W bytes as unsigned int32 lanes.
template <class Arch> inline simd::ibatch<Arch> load_u8(const std::uint8_t* src) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    int w;
    std::memcpy(&w, src, 4);
    const __m128i z = _mm_setzero_si128();
    return _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(w), z), z);
  } else
#endif
  {
    alignas(64) std::int32_t tmp[simd::width<Arch>];
    for (std::size_t i = 0; i < simd::width<Arch>; ++i) tmp[i] = src[i];
    return simd::ibatch<Arch>::load_aligned(tmp);
  }
}

/// Loads W bytes as signed (two's complement int8) int32 lanes.
template <class Arch> inline simd::ibatch<Arch> load_s8(const std::uint8_t* src) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
  {
    // sign-extend: (u ^ 0x80) - 0x80
    const simd::ibatch<Arch> u = load_u8<Arch>(src);
    return (u ^ simd::ibatch<Arch>(0x80)) - simd::ibatch<Arch>(0x80);
  }
}

/// Horizontal max of int32 lanes.
template <class Arch> inline std::int32_t reduce_max_i32(const simd::ibatch<Arch>& v) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return _mm512_reduce_max_epi32(v);
  } else
#endif
  {
    alignas(64) std::int32_t lanes[simd::width<Arch>];
    v.store_aligned(lanes);
    std::int32_t m = lanes[0];
    for (std::size_t i = 1; i < simd::width<Arch>; ++i) m = lanes[i] > m ? lanes[i] : m;
    return m;
  }
}
template <class Arch> inline float reduce_min_f32(const simd::fbatch<Arch>& v) {
  alignas(64) float lanes[simd::width<Arch>];
  v.store_aligned(lanes);
  float m = lanes[0];
  for (std::size_t i = 1; i < simd::width<Arch>; ++i) m = lanes[i] < m ? lanes[i] : m;
  return m;
}

inline constexpr std::int32_t inf_bits = 0x7F800000;

/// max_i bits(|x_i|) over n floats: the absmax's bit pattern, >= inf_bits iff a NaN/Inf is present.
template <class Arch> inline std::int32_t absmax_bits(const float* x, std::size_t n) {
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const I mask(0x7FFFFFFF);
  I m0(0), m1(0);
  std::size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    m0 = xsimd::max(m0, xsimd::bitwise_cast<I>(simd::fbatch<Arch>::load_unaligned(x + i)) & mask);
    m1 = xsimd::max(m1,
                    xsimd::bitwise_cast<I>(simd::fbatch<Arch>::load_unaligned(x + i + W)) & mask);
  }
  std::int32_t m = reduce_max_i32<Arch>(xsimd::max(m0, m1));
  for (; i < n; ++i) {
    std::int32_t b;
    std::memcpy(&b, x + i, 4);
    b &= 0x7FFFFFFF;
    m = b > m ? b : m;
  }
  return m;
}

/// min and max of n >= 1 finite floats.
template <class Arch> inline void min_max(const float* x, std::size_t n, float& lo, float& hi) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  std::size_t i = 0;
  lo = x[0], hi = x[0];
  if (n >= W) {
    F vlo = F::load_unaligned(x), vhi = vlo;
    for (i = W; i + W <= n; i += W) {
      const F v = F::load_unaligned(x + i);
      vlo = xsimd::min(vlo, v);
      vhi = xsimd::max(vhi, v);
    }
    lo = reduce_min_f32<Arch>(vlo);
    hi = simd::reduce_max<Arch>(vhi);
  }
  for (; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
}

inline float bits_to_float(std::int32_t b) noexcept {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// ---- affine integer quantization ---------------------------------------------------------------

/// Parameters of one affine block: x ≈ (code − zero) · scale, code in [lo, hi] (int32 values;
/// for signed int8 the stored byte is the two's-complement code).
struct affine_block {
  float scale = 0, inv = 0; // inv = 1/scale (0 when scale is 0)
  std::int32_t zero = 0, lo = 0, hi = 0;
  bool finite = true;
};

/// Chooses scale and zero of a block. bits 8 or 4; symmetric: codes in [−(2^(b−1)−1), 2^(b−1)−1]
/// around `sym_zero` (0 for int8 stored signed, 8 for int4 stored offset-binary); asymmetric:
/// codes in [0, 2^b − 1] with zero = rne(−min(min x, 0)/scale).
template <class Arch>
inline affine_block affine_choose(const float* x, std::size_t n, int bits, bool symmetric) {
  affine_block b;
  const std::int32_t amax_bits = n ? absmax_bits<Arch>(x, n) : 0;
  if (amax_bits >= inf_bits) {
    b.finite = false;
    b.scale = std::numeric_limits<float>::quiet_NaN();
    b.zero = symmetric && bits == 4 ? 8 : 0;
    b.lo = b.hi = b.zero;
    return b;
  }
  if (symmetric) {
    const std::int32_t qmax = bits == 8 ? 127 : 7;
    b.zero = bits == 8 ? 0 : 8;
    b.lo = b.zero - qmax, b.hi = b.zero + qmax;
    b.scale = bits_to_float(amax_bits) / float(qmax);
  } else {
    const std::int32_t qmax = bits == 8 ? 255 : 15;
    b.lo = 0, b.hi = qmax;
    float lo = 0, hi = 0;
    if (n) min_max<Arch>(x, n, lo, hi);
    lo = lo < 0 ? lo : 0.0f;
    hi = hi > 0 ? hi : 0.0f;
    b.scale = (hi - lo) / float(qmax);
    if (b.scale > 0) {
      const float z = std::nearbyint(-lo * (1.0f / b.scale));
      b.zero = std::int32_t(z < 0 ? 0 : (z > float(qmax) ? float(qmax) : z));
    }
  }
  b.inv = b.scale > 0 ? 1.0f / b.scale : 0.0f;
  return b;
}

/// codes[i] = clamp(rne(x[i]·inv) + zero, lo, hi) (one byte per element), i < n.
template <class Arch>
inline void affine_codes_rne(const float* x, std::size_t n, const affine_block& b,
                             std::uint8_t* codes) {
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F inv(b.inv);
  const I z(b.zero), lo(b.lo), hi(b.hi);
  std::size_t i = 0;
  if (b.zero == 0 && b.lo == -b.hi) {
    // symmetric int8: |x·inv| <= qmax·(1 + 2^-23) rounds to at most qmax, no clamp needed
    for (; i + 2 * W <= n; i += 2 * W) {
      store_bytes<Arch>(codes + i, xsimd::nearbyint_as_int(F::load_unaligned(x + i) * inv));
      store_bytes<Arch>(codes + i + W, xsimd::nearbyint_as_int(F::load_unaligned(x + i + W) * inv));
    }
  }
  for (; i + W <= n; i += W) {
    const I q = xsimd::nearbyint_as_int(F::load_unaligned(x + i) * inv) + z;
    store_bytes<Arch>(codes + i, xsimd::min(xsimd::max(q, lo), hi));
  }
  for (; i < n; ++i) {
    std::int32_t q = std::int32_t(std::nearbyint(x[i] * b.inv)) + b.zero;
    q = q < b.lo ? b.lo : (q > b.hi ? b.hi : q);
    codes[i] = std::uint8_t(q);
  }
}

/// Stochastic rounding: codes[i] = clamp(floor(x[i]·inv + u_i) + zero, lo, hi) with
/// u_i = s.uniform(offset + i) in [0, 1): E[code − zero] = x·inv inside the range (unbiased).
template <class Arch>
inline void affine_codes_stochastic(const float* x, std::size_t n, const affine_block& b,
                                    const random::stream& s, std::uint64_t offset,
                                    std::uint8_t* codes) {
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  alignas(64) float u[64];
  const F inv(b.inv);
  const I z(b.zero), lo(b.lo), hi(b.hi);
  for (std::size_t c = 0; c < n; c += 64) {
    const std::size_t len = n - c < 64 ? n - c : 64;
    random::kernels::fill<Arch, random::kernels::distribution::uniform>(s, offset + c, u, len);
    std::size_t i = 0;
    for (; i + W <= len; i += W) {
      const F v = simd::fma<Arch>(F::load_unaligned(x + c + i), inv, F::load_aligned(u + i));
      const I q = xsimd::batch_cast<std::int32_t>(xsimd::floor(v)) + z;
      store_bytes<Arch>(codes + c + i, xsimd::min(xsimd::max(q, lo), hi));
    }
    for (; i < len; ++i) {
      std::int32_t q = std::int32_t(std::floor(std::fma(x[c + i], b.inv, u[i]))) + b.zero;
      q = q < b.lo ? b.lo : (q > b.hi ? b.hi : q);
      codes[c + i] = std::uint8_t(q);
    }
  }
}

/// out[i] = (code_i − zero)·scale for int8 codes (signed bytes when `is_signed`), i < n.
template <class Arch>
inline void affine_dequant8(const std::uint8_t* codes, std::size_t n, bool is_signed, float scale,
                            float zero, float* out) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F s(scale), m(-zero * scale);
  std::size_t i = 0;
  if (is_signed) {
    for (; i + W <= n; i += W)
      simd::fma<Arch>(xsimd::batch_cast<float>(load_s8<Arch>(codes + i)), s, m)
          .store_unaligned(out + i);
    for (; i < n; ++i) out[i] = std::fma(float(std::int8_t(codes[i])), scale, -zero * scale);
  } else {
    for (; i + W <= n; i += W)
      simd::fma<Arch>(xsimd::batch_cast<float>(load_u8<Arch>(codes + i)), s, m)
          .store_unaligned(out + i);
    for (; i < n; ++i) out[i] = std::fma(float(codes[i]), scale, -zero * scale);
  }
}

#if XSIMD_WITH_AVX512BW
/// AVX-512: 4 int32 vectors (values fitting int8) -> 64 bytes in element order: two vpackssdw, one
/// vpacksswb (exact: no value saturates), then one vpermd undoes the per-128-bit-lane interleave.
inline __m512i pack4_epi32_epi8(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
  // dword 4L + t of `bytes` holds lanes 4L..4L+3 of input t
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(order, bytes);
}
#endif

/// Software prefetch distance of the block quantizers' fp32 input. One thread streaming 400 MB
/// does not keep enough reads in flight with the hardware prefetchers alone (a plain read loop
/// runs at ~10 GB/s here, triad_nt at 14.6 GiB/s); prefetcht0 of the lines 6 KiB ahead took
/// block-64 quantize of 100M floats from 49 to 44 ms (int8) and 52 to 42 ms (NF4) (1 KiB: ~no
/// gain; prefetcht1 (L2): worse than t0).
inline constexpr std::size_t quant_prefetch_bytes = 6144;

/// Prefetches (into L1) the 64 floats quant_prefetch_bytes after p: 4 lines, one per 16 floats,
/// for loops that read 64 floats per step. Prefetch never faults, so it may run past the end.
inline void prefetch_ahead(const float* p) noexcept {
  const char* c = reinterpret_cast<const char*>(p) + quant_prefetch_bytes;
  simd::prefetch<3>(c), simd::prefetch<3>(c + 64), simd::prefetch<3>(c + 128);
  simd::prefetch<3>(c + 192);
}

/// Interleaved reading of large inputs: one thread streaming one contiguous array reads ~9.4 GiB/s
/// here (BM_machine_read), 4 streams ~11.6 (12.7 with the prefetch above): the L2 streamers
/// track a few lines ahead per stream, so more streams keep more lines in flight. Quantizers of
/// at least interleave_min_bytes of input run their loop over 4 equal contiguous parts, one step
/// of each in turn (outputs are independent per element / block, so the results are the same).
inline constexpr std::size_t interleave_parts = 4;
inline constexpr std::size_t interleave_min_bytes = simd::stream_min_bytes;

/// Calls f(first, count) to cover [0, n) once: n < min_n: f(0, n); otherwise interleave_parts
/// contiguous parts of part = n / 4 rounded down to `step`, steps of `step` taken from each part in
/// turn, then the rest [4·part, n) in one call.
template <class Fn>
inline void for_interleaved_parts(std::size_t n, std::size_t step, std::size_t min_n, Fn&& f) {
  const std::size_t part = n / interleave_parts / step * step;
  if (n < min_n || part == 0) {
    f(std::size_t(0), n);
    return;
  }
  for (std::size_t c = 0; c < part; c += step)
    for (std::size_t k = 0; k < interleave_parts; ++k) f(k * part + c, step);
  if (interleave_parts * part < n) f(interleave_parts * part, n - interleave_parts * part);
}

#if XSIMD_WITH_AVX512BW
/// AVX-512: absmax_bits of B floats, B % 64 == 0 (the largest |x| as integer bits, two running
/// integer maxima of the masked bits; >= inf_bits when the block holds a NaN or an Inf). The loop
/// head of the one-pass block quantizers (affine_sym8_blocks, codebook_blocks64).
inline std::int32_t absmax_bits64(const float* x, std::size_t B) noexcept {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m0 = _mm512_setzero_si512(), m1 = m0;
  for (std::size_t k = 0; k < B; k += 64) {
    prefetch_ahead(x + k);
    m0 = _mm512_max_epi32(m0, _mm512_and_si512(_mm512_loadu_si512(x + k), absmask));
    m1 = _mm512_max_epi32(m1, _mm512_and_si512(_mm512_loadu_si512(x + k + 16), absmask));
    m0 = _mm512_max_epi32(m0, _mm512_and_si512(_mm512_loadu_si512(x + k + 32), absmask));
    m1 = _mm512_max_epi32(m1, _mm512_and_si512(_mm512_loadu_si512(x + k + 48), absmask));
  }
  return _mm512_reduce_max_epi32(_mm512_max_epi32(m0, m1));
}
#endif

/// True when Arch takes this file's AVX-512 fast paths: an AVX-512 arch in a build with AVX512BW.
template <class Arch> inline constexpr bool has_avx512_path() {
#if XSIMD_WITH_AVX512BW
  return std::is_base_of<xsimd::avx512f, Arch>::value;
#else
  return false;
#endif
}

/// True when affine_sym8_blocks has a fast path for Arch (AVX-512).
template <class Arch> inline constexpr bool has_sym8_blocks_path() {
  return has_avx512_path<Arch>();
}

/// AVX-512: symmetric int8 quantization of nb whole blocks of B floats (B % 64 == 0), fused in
/// one pass per block: absmax as integer bits (NaN/Inf flag the block), s = absmax/127, inv = 1/s
/// (0 for s = 0), codes rne(x·inv) (vcvtps2dq under the default rounding mode, as
/// nearbyint_as_int), 64 at a time packed to bytes with one 64-byte store. Bitwise the same as
/// affine_choose + affine_codes_rne; a non-finite block gets scale NaN and codes 0.
template <class Arch>
inline void affine_sym8_blocks(const float* x, std::size_t nb, std::size_t B, std::uint8_t* codes,
                               float* scales) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    for (std::size_t b = 0; b < nb; ++b, x += B, codes += B) {
      const std::int32_t bits = absmax_bits64(x, B);
      if (bits >= inf_bits) {
        scales[b] = std::numeric_limits<float>::quiet_NaN();
        std::memset(codes, 0, B);
        continue;
      }
      const float scale = bits_to_float(bits) / 127.0f;
      scales[b] = scale;
      const __m512 inv = _mm512_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
      for (std::size_t k = 0; k < B; k += 64) {
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 16), inv));
        const __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 32), inv));
        const __m512i q3 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k + 48), inv));
        _mm512_storeu_si512(codes + k, pack4_epi32_epi8(q0, q1, q2, q3));
      }
    }
    return;
  }
#endif
  (void)x, (void)nb, (void)B, (void)codes, (void)scales;
}

// ---- 4-bit packing -----------------------------------------------------------------------------
// Layout (bitsandbytes-compatible): element i lives in byte i/2; even i in the HIGH nibble, odd i
// in the LOW nibble. A tensor of n elements takes ceil(n/2) bytes; for odd n the last low nibble
// is 0.

/// Writes n 4-bit codes (one per byte in `codes`) to packed storage starting at element `first`.
inline void pack_nibbles(const std::uint8_t* codes, std::size_t n, std::uint8_t* packed,
                         std::size_t first) noexcept {
  std::size_t i = 0;
  if (n == 0) return;
  if (first & 1) { // starts in a low nibble: keep the high one
    std::uint8_t& b = packed[first >> 1];
    b = std::uint8_t((b & 0xF0) | (codes[0] & 0x0F));
    i = 1;
  }
  std::uint8_t* dst = packed + ((first + i) >> 1);
  for (; i + 2 <= n; i += 2) *dst++ = std::uint8_t((codes[i] << 4) | (codes[i + 1] & 0x0F));
  if (i < n) *dst = std::uint8_t(codes[i] << 4); // last high nibble; low nibble 0 (or next block)
}

/// Reads n 4-bit codes starting at element `first` into one byte each.
inline void unpack_nibbles(const std::uint8_t* packed, std::size_t first, std::size_t n,
                           std::uint8_t* codes) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t e = first + i;
    const std::uint8_t b = packed[e >> 1];
    codes[i] = (e & 1) ? (b & 0x0F) : (b >> 4);
  }
}

// ---- 4-bit codebooks (NF4, FP4) ----------------------------------------------------------------

/// Code of the level nearest to v (the scalar contract of codebook_codes).
inline std::uint8_t codebook_code_scalar(float v, const codebook4& cb) noexcept {
  if (cb.identity || !cb.sign_magnitude) {
    int k = 0;
    for (int t = 0; t < 15; ++t) k += v > cb.mid[t];
    return cb.code_of[k];
  }
  const float a = std::fabs(v);
  int k = v < 0 ? 8 : 0;
  for (int t = 0; t < 7; ++t) k += a > cb.mag_mid[t];
  return std::uint8_t(k);
}

/// codes[i] = code of the level nearest to x[i]·inv (ties to the lower level; for sign-magnitude
/// books ties to the smaller magnitude), i < n.
template <class Arch>
inline void codebook_codes(const float* x, std::size_t n, float inv, const codebook4& cb,
                           std::uint8_t* codes) {
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F vinv(inv), one(1.0f), zero(0.0f);
  std::size_t i = 0;
  if (cb.identity) {
    for (; i + W <= n; i += W) {
      const F v = F::load_unaligned(x + i) * vinv;
      F k(0.0f);
      for (int t = 0; t < 15; ++t) k += xsimd::select(v > F(cb.mid[t]), one, zero);
      store_bytes<Arch>(codes + i, xsimd::batch_cast<std::int32_t>(k));
    }
  } else if (cb.sign_magnitude) {
    for (; i + W <= n; i += W) {
      const F v = F::load_unaligned(x + i) * vinv;
      const F a = xsimd::abs(v);
      F k = xsimd::select(v < zero, F(8.0f), zero);
      for (int t = 0; t < 7; ++t) k += xsimd::select(a > F(cb.mag_mid[t]), one, zero);
      store_bytes<Arch>(codes + i, xsimd::batch_cast<std::int32_t>(k));
    }
  }
  (void)sizeof(I);
  for (; i < n; ++i) codes[i] = codebook_code_scalar(x[i] * inv, cb);
}

/// True when codebook_blocks64 applies: AVX-512 and a codebook with a cell table (NF4: cells_ok;
/// FP4: mag_cells_ok).
template <class Arch> inline bool has_codebook_blocks_path(const codebook4& cb) {
#if XSIMD_WITH_AVX512BW
  return std::is_base_of<xsimd::avx512f, Arch>::value && (cb.cells_ok || cb.mag_cells_ok);
#else
  (void)cb;
  return false;
#endif
}

#if XSIMD_WITH_AVX512BW
/// AVX-512 code of 16 values v = x·inv (|v| <= 1 up to rounding, or ±inf/NaN when inv = inf) by
/// the cell table of a codebook with cb.cells_ok (NF4): cell j = min(floor(16·v + 16), 31) holds
/// at most one threshold, so the sorted index is cell_base[j] + (v > that threshold), then its
/// code. v >= −1 − 2^-23 makes 16·v + 16 > −1, which truncates to 0 at worst (no clamp at 0);
/// the upper clamp is in float, so +inf lands in cell 31, and −inf / NaN truncate to 0x80000000,
/// whose low 5 bits pick cell 0 — the scalar codes of ±inf and NaN (codebook_code_scalar).
struct cell_code {
  __m512 tm, sixteen, cap;
  __m512i tc, base_lo, base_hi, one;
  bool identity;
  explicit cell_code(const codebook4& cb)
      : tm(_mm512_load_ps(cb.mid16)), sixteen(_mm512_set1_ps(16.0f)), cap(_mm512_set1_ps(31.5f)),
        tc(_mm512_load_si512(cb.code32)), base_lo(_mm512_load_si512(cb.cell_base)),
        base_hi(_mm512_load_si512(cb.cell_base + 16)), one(_mm512_set1_epi32(1)),
        identity(cb.identity) {}
  __m512i operator()(__m512 v) const {
    const __m512i j = _mm512_cvttps_epi32(_mm512_min_ps(cap, _mm512_fmadd_ps(v, sixteen, sixteen)));
    const __m512i base = _mm512_permutex2var_epi32(base_lo, j, base_hi);
    const __m512 t = _mm512_permutexvar_ps(base, tm);
    const __m512i idx =
        _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), base, one);
    return identity ? idx : _mm512_permutexvar_epi32(idx, tc);
  }
};

/// AVX-512 code of 16 values by the magnitude cell table of a sign-magnitude codebook with
/// cb.mag_cells_ok (FP4): magnitude index mag_base[j] + (|v| > mag_mid[mag_base[j]]) with
/// j = min(floor(16·|v| + 1/2), 15), plus 8 when v < 0 — the sign-magnitude contract of
/// codebook_code_scalar (ties to the smaller magnitude on both signs; −0 -> code 0; NaN
/// truncates to 0x80000000, low bits 0, and compares false: code 0).
struct mag_cell_code {
  __m512 tmag, sixteen, half, cap, zero;
  __m512i mbase, one, eight;
  explicit mag_cell_code(const codebook4& cb)
      : tmag(_mm512_load_ps(cb.mag16)), sixteen(_mm512_set1_ps(16.0f)), half(_mm512_set1_ps(0.5f)),
        cap(_mm512_set1_ps(15.5f)), zero(_mm512_setzero_ps()),
        mbase(_mm512_load_si512(cb.mag_base)), one(_mm512_set1_epi32(1)),
        eight(_mm512_set1_epi32(8)) {}
  __m512i operator()(__m512 v) const {
    const __m512 a = _mm512_abs_ps(v);
    const __m512i j = _mm512_cvttps_epi32(_mm512_min_ps(cap, _mm512_fmadd_ps(a, sixteen, half)));
    const __m512i base = _mm512_permutexvar_epi32(j, mbase);
    const __m512 t = _mm512_permutexvar_ps(base, tmag);
    const __m512i m = _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), base, one);
    return _mm512_mask_add_epi32(m, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), m, eight);
  }
};

/// The block loop of codebook_blocks64 for one code function (16 floats v -> 16 int32 codes), on
/// AVX-512 without VBMI (or a codebook without the byte table).
template <class Code>
inline void codebook_blocks64_cells(const float* x, std::size_t nb, std::size_t B,
                                    std::uint8_t zero_code, Code code, std::uint8_t* packed,
                                    float* absmax) {
  const __m512i pair_weights = _mm512_set1_epi16(0x0110); // bytes (16, 1)
  for (std::size_t b = 0; b < nb; ++b, x += B, packed += B / 2) {
    const std::int32_t bits = absmax_bits64(x, B);
    if (bits >= inf_bits) {
      absmax[b] = std::numeric_limits<float>::quiet_NaN();
      std::memset(packed, (zero_code << 4) | zero_code, B / 2);
      continue;
    }
    const float am = bits_to_float(bits);
    absmax[b] = am;
    const __m512 inv = _mm512_set1_ps(am > 0 ? 1.0f / am : 0.0f);
    for (std::size_t k = 0; k < B; k += 64) {
      const __m512i c0 = code(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));
      const __m512i c1 = code(_mm512_mul_ps(_mm512_loadu_ps(x + k + 16), inv));
      const __m512i c2 = code(_mm512_mul_ps(_mm512_loadu_ps(x + k + 32), inv));
      const __m512i c3 = code(_mm512_mul_ps(_mm512_loadu_ps(x + k + 48), inv));
      const __m512i pairs = _mm512_maddubs_epi16(pack4_epi32_epi8(c0, c1, c2, c3), pair_weights);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + k / 2), _mm512_cvtepi16_epi8(pairs));
    }
  }
}

#if defined(__AVX512VBMI__)
template <class Arch>
inline void codebook_codes_packed(const float* x, std::size_t n, float inv, const codebook4& cb,
                                  std::uint8_t* dst);

/// Byte-table cell index of 16 values x·inv of a codebook with cb.lut_ok (see codebook4): NF4
/// j + 32·(v > lut_t[j]), FP4 j + 16·(|v| > lut_t[j]) + 32·(v < 0), v = x·inv rounded as the
/// scalar path rounds it. Valid for |v| <= 1 (finite inv; inv = inf takes codebook_codes_packed).
struct lut_index {
  __m512 inv, scale, offset, t_lo, t_hi;
  __m512i k16, k32;
  explicit lut_index(const codebook4& cb, float inv_)
      : inv(_mm512_set1_ps(inv_)), scale(_mm512_set1_ps(cb.lut_scale)),
        offset(_mm512_set1_ps(cb.lut_offset)), t_lo(_mm512_load_ps(cb.lut_t)),
        t_hi(_mm512_load_ps(cb.lut_t + 16)), k16(_mm512_set1_epi32(16)),
        k32(_mm512_set1_epi32(32)) {}
  __m512i signed_cells(__m512 x) const { // NF4: 32 cells of v
    const __m512 v = _mm512_mul_ps(x, inv);
    const __m512i j = _mm512_cvttps_epi32(_mm512_fmadd_ps(v, scale, offset));
    const __m512 t = _mm512_permutex2var_ps(t_lo, j, t_hi);
    return _mm512_mask_add_epi32(j, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), j, k32);
  }
  __m512i magnitude_cells(__m512 x) const { // FP4: 16 cells of |v|, plus the sign of v
    const __m512 v = _mm512_mul_ps(x, inv);
    const __m512 a = _mm512_abs_ps(v);
    __m512i j = _mm512_cvttps_epi32(_mm512_fmadd_ps(a, scale, offset));
    const __m512 t = _mm512_permutexvar_ps(j, t_lo);
    j = _mm512_mask_add_epi32(j, _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), j, k16);
    return _mm512_mask_add_epi32(j, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), j, k32);
  }
};

/// Byte order of codebook_blocks64's packing: 4 vectors of 16 int32 lanes (elements 16r + i)
/// through vpackssdw ×2 and vpacksswb hold element 16r + 4L + q in byte 16L + 4r + q (128-bit
/// lane L); vpmaddubsw by (16, 1) fuses bytes (2w, 2w + 1) into word w; this vpermb index picks
/// the low byte of the word holding elements (2p, 2p + 1) for output byte p < 32.
inline __m512i nibble_pair_order() noexcept {
  alignas(64) std::uint8_t idx[64] = {};
  for (int p = 0; p < 32; ++p) {
    const int r = p / 8, i = 2 * (p % 8); // element 16r + i (even) and its odd neighbour
    const int byte = 16 * (i / 4) + 4 * r + i % 4;
    idx[p] = std::uint8_t(byte & ~1); // word byte/2, low byte
  }
  return _mm512_load_si512(idx);
}

/// The block loop of codebook_blocks64: per block absmax (absmax_bits64), inv, then 64 values at a
/// time: 4 × 16 byte-table indices (lut_index, `signed_cells` for NF4 or `magnitude_cells` for
/// FP4) -> bytes (vpackssdw ×2, vpacksswb: exact, indices < 64) -> codes (one vpermb through
/// lut_code) -> nibble pairs code_even·16 + code_odd (vpmaddubsw by (16, 1)) -> 32 bytes in
/// element order (vpermb nibble_pair_order). 1/absmax = inf (absmax < 2^-128) goes through
/// codebook_codes_packed, which gives the scalar codes of ±inf/NaN.
template <bool Signed>
inline void codebook_blocks64_lut(const float* x, std::size_t nb, std::size_t B,
                                  const codebook4& cb, std::uint8_t* packed, float* absmax) {
  const std::uint8_t zc = codebook_code_scalar(0.0f, cb);
  const __m512i pair_weights = _mm512_set1_epi16(0x0110); // bytes (16, 1)
  const __m512i lut = _mm512_load_si512(cb.lut_code), order = nibble_pair_order();
  // software-pipelined: block b + 1's absmax is issued before block b's codes, so its loads and
  // reduction overlap the codes instead of waiting behind them in the scheduler
  std::int32_t next = nb ? absmax_bits64(x, B) : 0;
  for (std::size_t b = 0; b < nb; ++b, x += B, packed += B / 2) {
    const std::int32_t bits = next;
    if (b + 1 < nb) next = absmax_bits64(x + B, B);
    if (bits >= inf_bits) {
      absmax[b] = std::numeric_limits<float>::quiet_NaN();
      std::memset(packed, (zc << 4) | zc, B / 2);
      continue;
    }
    const float am = bits_to_float(bits);
    absmax[b] = am;
    const float inv = am > 0 ? 1.0f / am : 0.0f;
    if (!(inv <= std::numeric_limits<float>::max())) {
      codebook_codes_packed<xsimd::avx512bw>(x, B, inv, cb, packed);
      continue;
    }
    const lut_index li(cb, inv);
    auto idx = [&](const float* p) {
      const __m512 v = _mm512_loadu_ps(p);
      return Signed ? li.signed_cells(v) : li.magnitude_cells(v);
    };
    for (std::size_t k = 0; k < B; k += 64) {
      const __m512i i0 = idx(x + k), i1 = idx(x + k + 16), i2 = idx(x + k + 32),
                    i3 = idx(x + k + 48);
      const __m512i bytes =
          _mm512_packs_epi16(_mm512_packs_epi32(i0, i1), _mm512_packs_epi32(i2, i3));
      const __m512i pairs = _mm512_maddubs_epi16(_mm512_permutexvar_epi8(bytes, lut), pair_weights);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + k / 2),
                          _mm512_castsi512_si256(_mm512_permutexvar_epi8(order, pairs)));
    }
  }
}
#endif // __AVX512VBMI__
#endif

/// AVX-512, has_codebook_blocks_path: 4-bit quantization of nb whole blocks of B floats
/// (B % 64 == 0) fused in one pass per block: absmax (integer max of |x| bits; NaN/Inf: absmax
/// NaN and the code of 0 everywhere), inv = 1/absmax (0 for an all-zero block), then per value
/// its code by the cell table (cell_code for cb.cells_ok, NF4; mag_cell_code for
/// cb.mag_cells_ok, FP4: the same code functions as codebook_codes_packed), then 64 codes -> 64
/// bytes (pack4_epi32_epi8) -> 32 packed bytes (vpmaddubsw by (16, 1) fuses each pair into
/// code_even·16 + code_odd, vpmovwb narrows). ±inf and NaN from 1/absmax = inf (absmax < 2^-128)
/// get the scalar codes too. Bitwise the same as absmax_bits + codebook_code_scalar.
template <class Arch>
inline void codebook_blocks64(const float* x, std::size_t nb, std::size_t B, const codebook4& cb,
                              std::uint8_t* packed, float* absmax) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
#if defined(__AVX512VBMI__)
    if (cb.lut_ok) { // the table's kind follows make_codebook4: signed cells unless FP4-like
      if (cb.identity || !cb.sign_magnitude)
        codebook_blocks64_lut<true>(x, nb, B, cb, packed, absmax);
      else
        codebook_blocks64_lut<false>(x, nb, B, cb, packed, absmax);
      return;
    }
#endif
    const std::uint8_t zc = codebook_code_scalar(0.0f, cb);
    if (cb.cells_ok)
      codebook_blocks64_cells(x, nb, B, zc, cell_code(cb), packed, absmax);
    else
      codebook_blocks64_cells(x, nb, B, zc, mag_cell_code(cb), packed, absmax);
    return;
  }
#endif
  (void)x, (void)nb, (void)B, (void)cb, (void)packed, (void)absmax;
}

/// True when codebook_codes_packed has a fast path for Arch (AVX-512).
template <class Arch> inline constexpr bool has_packed_codebook_path() {
  return has_avx512_path<Arch>();
}

/// AVX-512: quantizes n (a multiple of 16) values x·inv to their nearest codes and writes them
/// packed (high nibble first) to dst[0, n/2), 16 codes per 8-byte store (pairs of 32-bit lanes
/// fused into bytes, vpmovqb). The code comes from the cell table when the codebook has one
/// (cell_code for cb.cells_ok, NF4; mag_cell_code for cb.mag_cells_ok, FP4: the functions of
/// codebook_blocks64, for blocks that are not a multiple of 64); otherwise from a binary search
/// over the thresholds with vpermps lookups (the magnitude for sign-magnitude books, 3 steps
/// over 7 thresholds, plus the sign; else the sorted index, 4 steps over 15, then its code).
/// Identical to codebook_codes when |x·inv| <= 1 up to rounding (inv = 1/absmax of x's block)
/// or x·inv is ±inf/NaN (inv = inf).
template <class Arch>
inline void codebook_codes_packed(const float* x, std::size_t n, float inv, const codebook4& cb,
                                  std::uint8_t* dst) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __m512 vinv = _mm512_set1_ps(inv);
    auto store16 = [&](std::size_t i, __m512i c) { // 16 codes in int32 lanes -> 8 packed bytes
      const __m512i pair = _mm512_or_si512(_mm512_slli_epi32(c, 4), _mm512_srli_epi64(c, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i / 2), _mm512_cvtepi64_epi8(pair));
    };
    auto run = [&](const auto& code) {
      for (std::size_t i = 0; i < n; i += 16)
        store16(i, code(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)));
    };
    if (cb.cells_ok) {
      run(cell_code(cb));
      return;
    }
    if (cb.mag_cells_ok) {
      run(mag_cell_code(cb));
      return;
    }
    if (!cb.identity && cb.sign_magnitude) {
      // search the magnitude (ties to the smaller magnitude on both signs, as the scalar
      // contract says), then add the sign bit: 3 steps over the 7 magnitude thresholds.
      const __m512 tmag = _mm512_load_ps(cb.mag16);
      const __m512 zero = _mm512_setzero_ps();
      run([&](__m512 v) {
        const __m512 a = _mm512_abs_ps(v);
        __m512i idx = _mm512_setzero_si512();
        for (int step = 4; step >= 1; step /= 2) {
          const __m512 t =
              _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), tmag);
          idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), idx,
                                      _mm512_set1_epi32(step));
        }
        return _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), idx,
                                     _mm512_set1_epi32(8));
      });
      return;
    }
    const __m512 tm = _mm512_load_ps(cb.mid16);
    const __m512i tc = _mm512_load_si512(cb.code32);
    run([&](__m512 v) {
      __m512i idx = _mm512_setzero_si512();
      for (int step = 8; step >= 1; step /= 2) {
        const __m512 t =
            _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), tm);
        idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), idx,
                                    _mm512_set1_epi32(step));
      }
      return cb.identity ? idx : _mm512_permutexvar_epi32(idx, tc);
    });
    return;
  }
#endif
  (void)x, (void)n, (void)inv, (void)cb, (void)dst;
}

/// 256-entry tables: byte -> (value of high-nibble code, value of low-nibble code).
struct pair_lut {
  alignas(64) float v[256][2];
};
inline pair_lut make_pair_lut(const float* levels) noexcept {
  pair_lut t{};
  for (int b = 0; b < 256; ++b) t.v[b][0] = levels[b >> 4], t.v[b][1] = levels[b & 15];
  return t;
}
inline const pair_lut& nf4_pairs() noexcept {
  static const pair_lut t = make_pair_lut(nf4_levels);
  return t;
}
inline const pair_lut& int4_pairs() noexcept {
  static const pair_lut t = make_pair_lut(int4_levels);
  return t;
}
inline const pair_lut& int4_sym_pairs() noexcept {
  static const pair_lut t = make_pair_lut(int4_sym_levels);
  return t;
}
inline const pair_lut& fp4_pairs() noexcept {
  static const pair_lut t = make_pair_lut(fp4_levels);
  return t;
}

/// out[i] = levels[code of element first+i]·scale + offset for i < n (packed 4-bit input).
template <class Arch>
inline void codebook_dequant(const std::uint8_t* packed, std::size_t first, std::size_t n,
                             const float* levels, const pair_lut& pairs, float scale, float offset,
                             float* out) {
  std::size_t i = 0;
  if (n == 0) return;
  if (first & 1) {
    out[0] = std::fma(levels[packed[first >> 1] & 15], scale, offset);
    i = 1;
  }
  const std::uint8_t* src = packed + ((first + i) >> 1);
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    // 32 bytes -> 64 codes: split nibbles, interleave (hi, lo) per byte, then 4 LUT permutes.
    const __m512 lut = _mm512_loadu_ps(levels);
    const __m512 vs = _mm512_set1_ps(scale), vo = _mm512_set1_ps(offset);
    const __m256i lowmask = _mm256_set1_epi8(0x0F);
    for (; i + 64 <= n; i += 64, src += 32) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), lowmask);
      const __m256i lo = _mm256_and_si256(b, lowmask);
      // unpack interleaves within 128-bit lanes: a = bytes 0-7 & 16-23, c = bytes 8-15 & 24-31
      const __m256i a = _mm256_unpacklo_epi8(hi, lo);
      const __m256i c = _mm256_unpackhi_epi8(hi, lo);
      const __m256i c0 = _mm256_permute2x128_si256(a, c, 0x20); // codes 0..31
      const __m256i c1 = _mm256_permute2x128_si256(a, c, 0x31); // codes 32..63
      const __m128i q[4] = {_mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1),
                            _mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1)};
      for (int k = 0; k < 4; ++k)
        _mm512_storeu_ps(
            out + i + 16 * k,
            _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q[k]), lut), vs, vo));
    }
  }
#endif
  {
    using F = simd::fbatch<Arch>;
    constexpr std::size_t W = simd::width<Arch>;
    const F vs(scale), vo(offset);
    for (; i + W <= n; i += W, src += W / 2) {
      alignas(64) float tmp[W];
      for (std::size_t j = 0; j < W / 2; ++j) std::memcpy(tmp + 2 * j, pairs.v[src[j]], 8);
      simd::fma<Arch>(F::load_aligned(tmp), vs, vo).store_unaligned(out + i);
    }
    for (; i + 2 <= n; i += 2, ++src) {
      out[i] = std::fma(pairs.v[*src][0], scale, offset);
      out[i + 1] = std::fma(pairs.v[*src][1], scale, offset);
    }
    if (i < n) out[i] = std::fma(levels[*src >> 4], scale, offset);
  }
}

// ---- block ranges (the dequantizers' loops over many blocks)

// The range kernels below are not inlined into their callers: inlined into the public
// dequantizers (validation, stream driver, several formats), GCC 12 kept the block loop's
// pointers on the stack, two extra stores per block that compete for store-buffer entries with
// the output's L1-missing stores: int8 dequantize of 256K floats (L2-resident) ran ~35% slower.
#if defined(__GNUC__)
#define LOWMEM_QUANT_NOINLINE __attribute__((noinline))
#else
#define LOWMEM_QUANT_NOINLINE
#endif
// -------------------------------------

/// Calls g(b, e, m, out + (e − first)) for the pieces of [first, first + len) cut at multiples of
/// B (block b holds [b·B, (b + 1)·B)): one division, then increments.
template <class G>
inline void for_block_pieces(std::size_t first, std::size_t len, std::size_t B, float* out, G&& g) {
  if (len == 0) return;
  const std::size_t end = first + len;
  std::size_t b = first / B, e = first, stop = std::min((b + 1) * B, end);
  for (;;) {
    g(b, e, stop - e, out + (e - first));
    if (stop == end) return;
    e = stop, ++b, stop = std::min(stop + B, end);
  }
}

/// Elements [first, first + len) of an int8 affine tensor with blocks of B: out[i] =
/// (code − zero_b)·scale_b by affine_dequant8 per block piece (zeros nullptr: zero 0).
template <class Arch>
LOWMEM_QUANT_NOINLINE void affine_dequant8_range(const std::uint8_t* codes, const float* scales,
                                                 const float* zeros, bool is_signed, std::size_t B,
                                                 std::size_t first, std::size_t len, float* out) {
  for_block_pieces(first, len, B, out, [&](std::size_t b, std::size_t e, std::size_t m, float* o) {
    affine_dequant8<Arch>(codes + e, m, is_signed, scales[b], zeros ? zeros[b] : 0.0f, o);
  });
}

/// Elements [first, first + len) of a 4-bit codebook tensor with blocks of B: out[i] =
/// levels[code]·scale_b as codebook_dequant (offset 0), bitwise the same. AVX-512, B and first
/// multiples of 64: one loop over the blocks with the table in a register.
template <class Arch>
LOWMEM_QUANT_NOINLINE void codebook_dequant_range(const std::uint8_t* packed, const float* scales,
                                                  std::size_t B, std::size_t first, std::size_t len,
                                                  const float* levels, const pair_lut& pairs,
                                                  float* out) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    if (B % 64 == 0 && first % 64 == 0) {
      const __m512 lut = _mm512_loadu_ps(levels);
      const __m256i lowmask = _mm256_set1_epi8(0x0F);
      const std::size_t len64 = len - len % 64;
      std::size_t b = first / B, in_block = first % B;
      for (std::size_t i = 0; i < len64; i += 64) { // the codebook_dequant AVX-512 body
        const __m512 vs = _mm512_set1_ps(scales[b]);
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (first + i) / 2));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lowmask);
        const __m256i lo = _mm256_and_si256(v, lowmask);
        const __m256i a = _mm256_unpacklo_epi8(hi, lo), c = _mm256_unpackhi_epi8(hi, lo);
        const __m256i c0 = _mm256_permute2x128_si256(a, c, 0x20);
        const __m256i c1 = _mm256_permute2x128_si256(a, c, 0x31);
        const __m128i q[4] = {_mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1),
                              _mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1)};
        for (int k = 0; k < 4; ++k) // fma with offset 0, as codebook_dequant
          _mm512_storeu_ps(out + i + 16 * k,
                           _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q[k]), lut),
                                           vs, _mm512_setzero_ps()));
        if ((in_block += 64) == B) in_block = 0, ++b;
      }
      first += len64, out += len64, len -= len64;
    }
  }
#endif
  for_block_pieces(first, len, B, out, [&](std::size_t b, std::size_t e, std::size_t m, float* o) {
    codebook_dequant<Arch>(packed, e, m, levels, pairs, scales[b], 0.0f, o);
  });
}

// ---- FP8 (OCP 8-bit floating point: E4M3 "fn" and E5M2) ----------------------------------------

/// Format constants: mantissa bits M, exponent bias, largest finite code (magnitude bits).
template <int M> struct fp8_traits;
template <> struct fp8_traits<3> { // e4m3: no Inf; S.1111.111 is NaN; max S.1111.110 = 448
  static constexpr int bias = 7;
  static constexpr std::int32_t max_code = 0x7E, nan_code = 0x7F, overflow_code = 0x7F;
  static constexpr float max_value = 448.0f;
};
template <> struct fp8_traits<2> { // e5m2: IEEE-like; Inf S.11111.00, NaN S.11111.{01,10,11}
  static constexpr int bias = 15;
  static constexpr std::int32_t max_code = 0x7B, nan_code = 0x7E, overflow_code = 0x7C;
  static constexpr float max_value = 57344.0f;
};

/// Scalar fp32 -> fp8 (M = 3: e4m3, M = 2: e5m2), round to nearest even. saturate: finite overflow
/// and ±Inf give ±max (CUDA's __NV_SATFINITE); otherwise overflow gives NaN (e4m3) or Inf (e5m2).
/// NaN gives the canonical NaN with the input's sign.
template <int M> inline std::uint8_t fp8_encode(float f, bool saturate) noexcept {
  using T = fp8_traits<M>;
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint32_t sign = (u >> 24) & 0x80u;
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return std::uint8_t(sign | std::uint32_t(T::nan_code));
  std::int32_t c;
  const std::uint32_t min_normal_bits = std::uint32_t(127 - T::bias + 1) << 23;
  if (a < min_normal_bits) {
    // subnormal range: value = m · 2^(1 − bias − M); rne(|x| · 2^(bias − 1 + M)) may reach
    // 2^M, which is exactly the code of the smallest normal.
    c = std::int32_t(std::nearbyint(std::fabs(f) * std::ldexp(1.0f, T::bias - 1 + M)));
  } else {
    const std::uint32_t r = a + ((1u << (22 - M)) - 1u) + ((a >> (23 - M)) & 1u);
    c = std::int32_t(r >> (23 - M)) - ((127 - T::bias) << M);
  }
  if (c > T::max_code || a == 0x7F800000u)
    c = saturate ? T::max_code : (a == 0x7F800000u && M == 2 ? 0x7C : T::overflow_code);
  return std::uint8_t(sign | std::uint32_t(c));
}

/// Scalar fp8 -> fp32 (exact).
template <int M> inline float fp8_decode(std::uint8_t c) noexcept {
  using T = fp8_traits<M>;
  const std::uint32_t a = c & 0x7Fu;
  const float sign = (c & 0x80u) ? -1.0f : 1.0f;
  if (M == 3 && a == 0x7Fu) return std::numeric_limits<float>::quiet_NaN() * sign;
  if (M == 2 && a >= 0x7Cu)
    return a == 0x7Cu ? sign * std::numeric_limits<float>::infinity()
                      : std::numeric_limits<float>::quiet_NaN() * sign;
  const int e = int(a >> M), m = int(a & ((1u << M) - 1u));
  if (e == 0) return sign * std::ldexp(float(m), 1 - T::bias - M);
  return sign * std::ldexp(float((1 << M) | m), e - T::bias - M);
}

/// The |value| every non-saturating overflow is clamped to before encoding: 2^(max exponent + 1),
/// whose code is the overflow code (e4m3: 512 -> 0x80, which the NaN min then maps to 0x7F = NaN;
/// e5m2: 65536 -> 0x7C = Inf), as for every finite value >= the rounding boundary above max.
template <int M> constexpr float fp8_overflow_clamp() { return M == 3 ? 512.0f : 65536.0f; }

/// out[i] = fp8(x[i]·inv_scale), i < n (vectorized fp8_encode).
template <class Arch, int M>
inline void fp8_encode_array(const float* x, std::size_t n, float inv_scale, bool saturate,
                             std::uint8_t* out) {
  using T = fp8_traits<M>;
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F vinv(inv_scale);
  const I absmask(0x7FFFFFFF), inf(inf_bits), min_normal((127 - T::bias + 1) << 23);
  const I bias_adj((127 - T::bias) << M), half((1 << (22 - M)) - 1), one(1);
  const I nanc(T::nan_code);
  const I over_finite(saturate ? T::max_code : T::overflow_code);
  static_assert(T::overflow_code == T::max_code + 1, "overflow code follows the largest finite");
  const F sub_scale(std::ldexp(1.0f, T::bias - 1 + M));
  // vector body over nv = n - n % W elements, then a scalar tail (this loop shape keeps GCC 12's
  // -Waggressive-loop-optimizations quiet, unlike `i + W <= n`)
  auto encode = [&](const float* p) { // W codes (sign | magnitude) in int32 lanes
    const F v = F::load_unaligned(p) * vinv;
    const I u = xsimd::bitwise_cast<I>(v);
    const I a = u & absmask;
    const I sign = (u >> 24) & I(0x80); // arithmetic shift, masked
    const I normal = ((a + half + ((a >> (23 - M)) & one)) >> (23 - M)) - bias_adj;
    const I sub = xsimd::nearbyint_as_int(xsimd::bitwise_cast<F>(a) * sub_scale);
    // overflow: ±Inf encodes as finite overflow does, to max_code or max_code + 1; Inf/NaN
    // inputs give normal > maxc, so one min covers finite overflow and ±Inf (NaN fixed after)
    const I c = xsimd::min(xsimd::select(a < min_normal, sub, normal), over_finite);
    return xsimd::select(a > inf, nanc, c) | sign;
  };
  const std::size_t nv = n - n % W;
  std::size_t i = 0;
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    // Intrinsics, 12 operations per 16 values (the xsimd version above: 16):
    //  * a = min(|v|, clamp) in float: minps returns its second operand when either is NaN, so
    //    NaN stays NaN while ±Inf and every overflow become `clamp`, whose code is max_code
    //    (saturate) or the overflow code (above max: e4m3 NaN, e5m2 Inf);
    //  * normal codes: the rebias folded into the rounding constant (a − ((127 − bias) << 23) is
    //    positive for every normal a, so the shift is exact);
    //  * one unsigned min with nan_code catches NaN lanes (their normal code is larger; a NaN
    //    with its sign bit set is a negative int32, so it takes the subnormal lane, whose vcvtps2dq
    //    gives 0x80000000, larger too) and leaves finite codes (<= max or overflow code) alone;
    //  * the sign joins after the narrowing: signed-saturating packs of the raw bits keep each
    //    value's sign bit in its byte (-0 too), and one vpternlogd merges it into the codes.
    const __m512 vinv_ = _mm512_set1_ps(inv_scale),
                 vsub = _mm512_set1_ps(std::ldexp(1.0f, T::bias - 1 + M));
    const __m512 vclamp = _mm512_set1_ps(saturate ? T::max_value : fp8_overflow_clamp<M>());
    const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF), one_ = _mm512_set1_epi32(1);
    const __m512i round_rebias =
        _mm512_set1_epi32(((1 << (22 - M)) - 1) - std::int32_t(std::uint32_t(127 - T::bias) << 23));
    const __m512i vmin_normal = _mm512_set1_epi32((127 - T::bias + 1) << 23);
    const __m512i vnan = _mm512_set1_epi32(T::nan_code), signbits = _mm512_set1_epi8(-128);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    auto code16 = [&](__m512 v) { // magnitude codes of 16 values (int32 lanes)
      const __m512 af = _mm512_min_ps(vclamp, _mm512_and_ps(v, _mm512_castsi512_ps(absm)));
      const __m512i a = _mm512_castps_si512(af);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 23 - M), one_);
      __m512i c =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(a, round_rebias), odd), 23 - M);
      c = _mm512_mask_cvtps_epi32(c, _mm512_cmplt_epi32_mask(a, vmin_normal),
                                  _mm512_mul_ps(af, vsub));
      return _mm512_min_epu32(c, vnan);
    };
    const std::size_t n64 = n - n % 64;
    for (; i < n64; i += 64) {
      prefetch_ahead(x + i);
      const __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv_);
      const __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 16), vinv_);
      const __m512 v2 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 32), vinv_);
      const __m512 v3 = _mm512_mul_ps(_mm512_loadu_ps(x + i + 48), vinv_);
      const __m512i codes = _mm512_packs_epi16(_mm512_packs_epi32(code16(v0), code16(v1)),
                                               _mm512_packs_epi32(code16(v2), code16(v3)));
      const __m512i signs =
          _mm512_packs_epi16(_mm512_packs_epi32(_mm512_castps_si512(v0), _mm512_castps_si512(v1)),
                             _mm512_packs_epi32(_mm512_castps_si512(v2), _mm512_castps_si512(v3)));
      const __m512i bytes = _mm512_ternarylogic_epi32(codes, signs, signbits, 0xF8); // A | (B & C)
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi32(order, bytes));
    }
  }
#endif
  for (; i < nv; i += W) store_bytes<Arch>(out + i, encode(x + i));
  for (; i < n; ++i) out[i] = fp8_encode<M>(x[i] * inv_scale, saturate);
}

/// fp16 bits of every e4m3 magnitude m (0..127) as two byte tables (hi, lo).
struct fp8_half_tables {
  alignas(64) std::uint8_t hi[128];
  alignas(64) std::uint8_t lo[128];
};
inline fp8_half_tables make_e4m3_half_tables() noexcept {
  fp8_half_tables t{};
  for (int m = 0; m < 128; ++m) {
    const int e = m >> 3, f = m & 7;
    std::uint32_t h = 0;
    if (m == 0x7F) {
      h = 0x7E00; // NaN
    } else if (e > 0) {
      h = std::uint32_t((e + 8) << 10 | f << 7); // 2^(e - 7)·1.f: fp16 exponent e - 7 + 15
    } else if (f > 0) { // subnormal f·2^-9 = 2^(k - 9)·(f / 2^k), k = floor(log2 f)
      const int k = f >= 4 ? 2 : (f >= 2 ? 1 : 0);
      h = std::uint32_t((k + 6) << 10 | (f - (1 << k)) << (10 - k));
    }
    t.hi[m] = std::uint8_t(h >> 8), t.lo[m] = std::uint8_t(h & 0xFF);
  }
  return t;
}
inline const fp8_half_tables& e4m3_half_tables() noexcept {
  static const fp8_half_tables t = make_e4m3_half_tables();
  return t;
}

#if XSIMD_WITH_AVX512BW && defined(__F16C__)
/// The two ends of fp8_decode_array's 64-code fp16 step. fp8_load64 permutes qwords so that lane
/// L holds codes 8L..8L+7 in bytes 0-7 and 32+8L..32+8L+7 in bytes 8-15: vpunpck{l,h}bw, which
/// take bytes 0-7 / 8-15 of each 128-bit lane, then give the fp16 words of elements 0..31 (low)
/// and 32..63 (high) in order. fp8_store64_halves makes the words from their low and high bytes,
/// converts them (vcvtph2ps, exact) and stores out[0..64) = value·scale.
inline __m512i fp8_load64(const std::uint8_t* codes) noexcept {
  return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0),
                                  _mm512_loadu_si512(codes));
}
inline void fp8_store64_halves(__m512i lo, __m512i hi, __m512 scale, float* out) noexcept {
  const __m512i w0 = _mm512_unpacklo_epi8(lo, hi), w1 = _mm512_unpackhi_epi8(lo, hi);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(w0)), scale));
  _mm512_storeu_ps(out + 16,
                   _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(w0, 1)), scale));
  _mm512_storeu_ps(out + 32, _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(w1)), scale));
  _mm512_storeu_ps(out + 48,
                   _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(w1, 1)), scale));
}
#endif

/// out[i] = fp32(code[i])·scale, i < n (exact decode, then one multiply).
/// Normal codes: the magnitude bits shifted under the fp32 exponent plus the exponent rebias, in
/// integer arithmetic; subnormal codes (exponent 0): float(mantissa)·2^(1 − bias − M). Both exact,
/// and no fp32 subnormal ever enters an FP operation: the former "shift, then multiply by
/// 2^(127 − bias)" made fp8 subnormals fp32 subnormals first, and each such vector took a
/// microcode assist (~1% of normal data in e4m3: fp8_decode ran at 4.4 GiB/s even L2-resident).
/// AVX-512 with F16C takes both formats through fp16 instead, 64 codes per step (blocks below):
/// L1-resident e5m2 decode 18.0 -> 47.4 GiB/s of fp32 output, the same bits.
template <class Arch, int M>
inline void fp8_decode_array(const std::uint8_t* codes, std::size_t n, float scale, float* out) {
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  using T = fp8_traits<M>;
  constexpr std::int32_t rebias = (127 - T::bias) << 23; // added to the shifted magnitude bits
  constexpr std::int32_t special = M == 3 ? 0x7F : 0x7C; // e4m3 NaN; e5m2 Inf (NaN above)
  const float sub_unit = std::ldexp(1.0f, 1 - T::bias - M);
  const std::size_t nv = n - n % W;
  std::size_t i = 0;
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    // intrinsics: xsimd 8.1's int32 == / select on AVX-512 go through slow generic code
    const __m512 vsub = _mm512_set1_ps(sub_unit), vscale = _mm512_set1_ps(scale);
    const __m512i m7f = _mm512_set1_epi32(0x7F), vrebias = _mm512_set1_epi32(rebias);
    const __m512i min_normal = _mm512_set1_epi32(1 << M), vspecial = _mm512_set1_epi32(special);
    const __m512i qnan = _mm512_set1_epi32(0x7FC00000), inf = _mm512_set1_epi32(inf_bits);
    const __m512i signbit = _mm512_set1_epi32(std::int32_t(0x80000000u));
#if defined(__AVX512VBMI__) && defined(__F16C__)
    if constexpr (M == 3) {
      // e4m3, 64 codes per step: every e4m3 value (2^-9 .. 448, NaN) is a normal fp16 (or
      // zero, NaN), so two 128-entry byte tables (vpermi2b on the 7 magnitude bits) give its fp16
      // high and low bytes, the sign bit joins the high byte, vpunpck{l,h}bw make the words and
      // vcvtph2ps the floats: exact, ~20 vector ops per 64 codes instead of ~56, no fp16 or fp32
      // subnormal on the way. NaN: fp16 0x7E00 -> fp32 0x7FC00000 (| sign), as above.
      const fp8_half_tables& h = e4m3_half_tables();
      const __m512i hi0 = _mm512_load_si512(h.hi), hi1 = _mm512_load_si512(h.hi + 64);
      const __m512i lo0 = _mm512_load_si512(h.lo), lo1 = _mm512_load_si512(h.lo + 64);
      const __m512i sign8 = _mm512_set1_epi8(-128);
      const std::size_t n64 = n - n % 64;
      for (; i < n64; i += 64) {
        const __m512i c = fp8_load64(codes + i);
        const __m512i hb = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c,
                                                     sign8, 0xF8); // A | (B & C)
        fp8_store64_halves(_mm512_permutex2var_epi8(lo0, c, lo1), hb, vscale, out + i);
      }
    }
#endif
#if defined(__F16C__)
    if constexpr (M == 2) {
      // e5m2, 64 codes per step: an e5m2 code is the high byte of the fp16 with the same value
      // (same sign, exponent bias 15 and Inf; the 2 mantissa bits on top of fp16's 10), so a
      // zero low byte (vpunpck{l,h}bw) and vcvtph2ps decode it exactly; fp16 subnormals become
      // normal fp32, no fp32 subnormal on the way. The NaN codes S.11111.{01,10,11} are first
      // replaced by S.11111.10 (fp16 0x7E00 -> fp32 0x7FC00000 | sign, the vector NaN above).
      const __m512i mag8 = _mm512_set1_epi8(0x7F), inf8 = _mm512_set1_epi8(0x7C);
      const __m512i qnan8 = _mm512_set1_epi8(0x7E), sign8 = _mm512_set1_epi8(-128);
      const __m512i zero = _mm512_setzero_si512();
      const std::size_t n64 = n - n % 64;
      for (; i < n64; i += 64) {
        __m512i c = fp8_load64(codes + i);
        const __mmask64 nan = _mm512_cmpgt_epu8_mask(_mm512_and_si512(c, mag8), inf8);
        c = _mm512_mask_blend_epi8(
            nan, c, _mm512_ternarylogic_epi32(c, sign8, qnan8, 0xEA)); // (c & 0x80) | 0x7E
        fp8_store64_halves(zero, c, vscale, out + i);
      }
    }
#endif
    for (; i < nv; i += 16) {
      const __m512i c =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      const __m512i a = _mm512_and_si512(c, m7f);
      __m512i v = _mm512_add_epi32(_mm512_slli_epi32(a, 23 - M), vrebias);
      v = _mm512_mask_mov_epi32(v, _mm512_cmplt_epi32_mask(a, min_normal),
                                _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(a), vsub)));
      if constexpr (M == 3) {
        v = _mm512_mask_mov_epi32(v, _mm512_cmpeq_epi32_mask(a, vspecial), qnan);
      } else {
        v = _mm512_mask_mov_epi32(v, _mm512_cmpeq_epi32_mask(a, vspecial), inf);
        v = _mm512_mask_mov_epi32(v, _mm512_cmpgt_epi32_mask(a, vspecial), qnan);
      }
      // v | (c << 24 & sign bit): ternary logic A | (B & C)
      v = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(c, 24), signbit, 0xF8);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_castsi512_ps(v), vscale));
    }
  }
#endif
  const F vs(scale), vsub(sub_unit);
  const I mag_mask(0x7F);
  for (; i < nv; i += W) {
    const I c = load_u8<Arch>(codes + i);
    const I a = c & mag_mask;
    const I sub = xsimd::bitwise_cast<I>(xsimd::batch_cast<float>(a) * vsub);
    I v = xsimd::select(a < I(1 << M), sub, (a << (23 - M)) + I(rebias));
    if constexpr (M == 3) {
      v = xsimd::select(a == I(special), I(0x7FC00000), v);
    } else {
      v = xsimd::select(a == I(special), I(inf_bits), v);
      v = xsimd::select(a > I(special), I(0x7FC00000), v);
    }
    const I sign = (c & I(0x80)) << 24;
    (xsimd::bitwise_cast<F>(v | sign) * vs).store_unaligned(out + i);
  }
  for (; i < n; ++i) out[i] = fp8_decode<M>(codes[i]) * scale;
}

} // namespace lowmem::quant::kernels
