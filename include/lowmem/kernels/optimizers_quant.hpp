// lowmem/kernels/optimizers_quant.hpp — block-wise quantized optimizer state (8-bit and 4-bit).
//
// Codebooks (sorted, K = 256 or 16 values in [-1, 1]):
//  * dynamic map (Dettmers et al., arXiv:2110.02861; bitsandbytes `create_dynamic_map(signed,
//    max_exponent_bits, total_bits)`): for decade i = 0..E-1 the means of consecutive points of
//    linspace(0.1, 1, F_i) scaled by 10^(i-E+1), F_i = 2^(i+N-E)+1 (signed, mirrored to negative)
//    or 2^(i+N-E+1)+1 (unsigned), N = total_bits-1; plus 0 and 1. 8-bit: E = 7; 4-bit signed
//    (torchao's 4-bit m map, no zero padding): E = 3.
//  * linear map without zero (torchao's 4-bit v map): k / 16, k = 1..16.
// Quantization picks the nearest code: code = number of decision boundaries ("midpoints") below
// x, so ties go to the lower code.
//  * 256-code dynamic maps: each decade i holds codes equally spaced by c1 = 0.9·10^(i-E+1)/(F-1),
//    so the boundary between its codes j-1 and j is fma(c1, j, c0) with c0 = 0.1·10^(i-E+1),
//    evaluated in float (the reference `nearest` and the vector encoder use this same float); the
//    boundary between two decades (and around the codes 0 and 1) is the float mean of its two
//    codes. The AVX-512 encoder finds the segment (decade) from the float's exponent (a 32-entry
//    in-register table of "segments below this binade" plus the one decade boundary a binade can
//    hold, decades being 10× apart), estimates the in-decade index with one fmsub and floor, and
//    corrects it with one compare-and-adjust against the next boundary (the estimate is biased
//    low by 2^-10, far above its float error, so it is exact or one short): about 30 vector
//    instructions per 16 values, no gathers, no table in memory.
//    Negative inputs of the signed map use their magnitude nudged up by one ulp, which turns
//    "boundaries below x" into "magnitude boundaries <= |x|" (the mirrored count).
//  * 16-code maps (4-bit): a 4-step binary search over the 15 boundaries held in one register;
//    the linear map k/16 by arithmetic (clamp(ceil(16x − 1.5), 0, 15), exact).
//  * The scalar path (other archs, tails) counts boundaries with a bucket table indexed by the
//    float's sign, exponent and top 6 mantissa bits (at most two boundaries per bucket, checked at
//    construction) plus two compares: the same function, bit for bit.
// Decoding an 8-bit code is a 256-entry table lookup: with AVX512-VBMI, 64 codes at a time as four
// byte planes (two vpermi2b and a blend each) re-interleaved into floats; else 16-register
// vpermt2ps trees. NaN policy: NaN state maps to some valid code (unspecified; a NaN moment means
// the run diverged); ±inf clamp to the extreme codes.
//
// Scales (two levels, so that the scales cost < 0.02 bytes/param): a group of 2048 elements keeps
// one fp32 scale S = max |x| over the group; each block (256 elements for 8-bit, 128 for 4-bit)
// keeps one byte k with block scale S · 2^(-k/8) >= the block's absmax, k as large as possible
// (so the block's values use at least 92% of the code range; k saturates at 255 for blocks
// 2^-32 below their group's max). State bytes/param per moment: 8-bit 1 + 1/256 + 4/2048,
// 4-bit 0.5 + 1/128 + 4/2048.
//
// A step dequantizes one group of each moment into an L1-resident stack buffer (16 KiB), runs the
// same fp32 update kernel as the unquantized optimizer, and requantizes: no full-size temporaries.
// 8-bit and 4-bit AdamW and Lion with fp32 parameters and gradients on AVX512-VBMI run the same
// arithmetic in two passes per group (adamw_quant_full_groups, quant_full_groups: decode +
// update + block absmax, then encode), fetching the next group's parameters and gradients during
// the encode pass; other steps prefetch too.
// Cost (8-bit AdamW, Zen 4, measured per 16 parameters with L2-resident data): both encoders
// ~60% (m ~4.2 ns, v ~3.3 ns), decoding ~12%, the update ~25%. The step is issue-bound (about
// two 512-bit operations per cycle), not divider-bound: vsqrtps + vdivps occupy the divider
// ~2.3 ns per 16 beside the other work, so replacing them by rsqrt14/rcp14 + Newton steps (10
// more operations) measured 8-12% slower and is not done. On the Intel (SPR-class) machine of
// Dec 2026 the divider is slower (vsqrtps zmm ~5.5 ns, vdivps zmm ~4.6 ns per instruction) and
// bench_optimizers' adamw8bit_part cases give per 16 values, L1-resident: encode m 9.7 ns,
// encode v 7.2, decode 2.9 per moment, update 9.9 (divider-bound): ~32 ns = 2.0 ns/param, the
// in-cache step time; rsqrt14/rcp14 without Newton steps (a lower bound) took the update to
// ~6.3-8 ns in one noisy run.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../simd/simd.hpp"
#include "optimizers.hpp" // adam_coeffs

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace lowmem::optim::kernels {

/// A sorted codebook with its nearest-code lookup tables.
struct codebook {
  static constexpr int rows = 26, cols = 64; // exponent rows (2^-23 .. 2), 6 mantissa bits
  int size = 0;
  alignas(64) float values[256] = {};
  alignas(64) float mid[258] = {}; // decision boundaries, sorted; +inf padded
  alignas(64) std::int32_t bucket[2 * rows * cols] = {};
  // Byte planes of values (plane p = byte p of each float's bits) for the VBMI decoder.
  alignas(64) std::uint8_t planes[4][256] = {};
  int max_mids_per_bucket = 0;

  // Segment encoder of the 256-code dynamic maps (empty for other books). The magnitude axis is
  // cut into segments (the code 0, one per decade, the code 1) by the boundaries between them;
  // segment d holds seg_n[d] codes starting at magnitude index seg_off[d], inner boundaries
  // fma(seg_c1[d], j, seg_c0[d]), j = 1 .. seg_n[d] - 1. Binade e (magnitudes in
  // [2^(e-31), 2^(e-30)), e = 0..31, smaller magnitudes clamped into e = 0, larger into 31)
  // starts in segment bin_seg[e] and contains at most the one segment boundary bin_bound[e].
  bool segmented = false, is_signed = false;
  bool linear16 = false; // the 16-code map k/16, k = 1..16 (boundaries (c + 1.5)/16)
  alignas(64) std::int32_t bin_seg[32] = {};
  alignas(64) float bin_bound[32] = {};
  alignas(64) float seg_c0[16] = {}, seg_c1[16] = {}, seg_r1[16] = {}, seg_c0r1[16] = {},
                    seg_nmax[16] = {}, seg_off[16] = {};

  /// Builds mid[] (from values[] unless the segment construction already set it), bucket[] and
  /// the decoder planes from values[0..size) (sorted ascending).
  void finalize() {
    const float inf = std::numeric_limits<float>::infinity();
    if (!segmented)
      for (int k = 0; k < 258; ++k)
        mid[k] = k + 1 < size ? 0.5f * (values[k] + values[k + 1]) : inf;
    for (int k = size - 1; k < 258; ++k) mid[k] = inf;
    for (int c = 0; c < 256; ++c) {
      std::uint32_t u;
      std::memcpy(&u, &values[c], 4);
      for (int p = 0; p < 4; ++p) planes[p][c] = std::uint8_t(u >> (8 * p));
    }
    for (int s = 0; s < 2; ++s)
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
          double lo, hi; // magnitude range [lo, hi)
          if (r == 0)
            lo = 0, hi = std::ldexp(1.0, -23);
          else if (r == rows - 1)
            lo = 2, hi = inf;
          else
            lo = std::ldexp(1.0 + c / 64.0, r - 24), hi = std::ldexp(1.0 + (c + 1) / 64.0, r - 24);
          // values x in the bucket: [lo, hi) if positive, (-hi, -lo] if negative
          const double xmin = s ? -hi : lo, xmax = s ? -lo : hi;
          int below = 0, inside = 0;
          for (int k = 0; k + 1 < size; ++k) {
            const double m = mid[k];
            if (s ? m <= xmin : m < xmin)
              ++below;
            else if (m <= xmax)
              ++inside;
          }
          bucket[(s * rows + r) * cols + c] = below;
          max_mids_per_bucket = std::max(max_mids_per_bucket, inside);
        }
  }

  /// Nearest code index of x (scalar; same result as the vector path).
  int nearest(float x) const noexcept {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    const int sign = int(u >> 31), e = std::clamp(int((u >> 23) & 0xFF) - 103, 0, rows - 1);
    const int col = int((u >> 17) & 63);
    const int base = bucket[(sign * rows + e) * cols + col];
    return base + (x > mid[base]) + (x > mid[base + 1]);
  }
};

/// bitsandbytes' create_dynamic_map(signed, max_exponent_bits, total_bits) without zero padding,
/// evaluated in double and rounded once to float.
inline codebook make_dynamic_map(bool is_signed, int max_exponent_bits, int total_bits) {
  std::vector<double> data;
  const int nsb = total_bits - 1;
  const int additional = (1 << (nsb - max_exponent_bits)) - 1;
  auto add_means = [&](int items, int i) {
    const double scale = std::pow(10.0, -(max_exponent_bits - 1) + i);
    for (int k = 0; k + 1 < items; ++k) {
      const double b0 = 0.1 + 0.9 * k / (items - 1), b1 = 0.1 + 0.9 * (k + 1) / (items - 1);
      data.push_back(scale * (b0 + b1) / 2);
      if (is_signed) data.push_back(-scale * (b0 + b1) / 2);
    }
  };
  int i = 0;
  for (i = 0; i < max_exponent_bits; ++i)
    add_means(is_signed ? (1 << (i + nsb - max_exponent_bits)) + 1
                        : (1 << (i + nsb - max_exponent_bits + 1)) + 1,
              i);
  if (additional > 0) add_means(additional + 1, i - 1);
  data.push_back(0.0);
  data.push_back(1.0);
  std::sort(data.begin(), data.end());
  codebook cb;
  cb.size = int(data.size());
  for (int k = 0; k < cb.size; ++k) cb.values[k] = float(data[std::size_t(k)]);
  if (cb.size == 256 && additional == 0) {
    // Segment boundaries: magnitude codes (signed: the non-negative half) in segments {0},
    // decade 0 .. E-1, {1}; inner boundaries fma(c1, j, c0) (float), outer ones float means.
    cb.segmented = true;
    cb.is_signed = is_signed;
    const float* mag = cb.values + (is_signed ? 127 : 0); // magnitude codes, ascending
    float mags_mid[256];
    int nmid = 0, off = 0, nseg = 0;
    float bounds[16];
    auto add_segment = [&](int n, float c0, float c1) {
      if (nseg > 0) bounds[nseg - 1] = mags_mid[nmid++] = 0.5f * (mag[off - 1] + mag[off]);
      cb.seg_c0[nseg] = c0, cb.seg_c1[nseg] = c1, cb.seg_r1[nseg] = 1.0f / c1;
      // biased by 2^-10 so that floor(a·r1 − c0r1) undershoots the in-segment count plus one by
      // at most 1 (its float error is ~1e-5), and one compare against the boundary it names
      // finishes; the "plus one" (the − 1) saves an add per vector
      cb.seg_c0r1[nseg] = c0 * cb.seg_r1[nseg] + 0x1p-10f - 1.0f;
      cb.seg_nmax[nseg] = float(n - 1), cb.seg_off[nseg] = float(off);
      for (int j = 1; j < n; ++j) mags_mid[nmid++] = std::fma(c1, float(j), c0);
      off += n, ++nseg;
    };
    add_segment(1, 0.0f, 1.0f);
    for (int d = 0; d < max_exponent_bits; ++d) {
      const int items = is_signed ? (1 << (d + nsb - max_exponent_bits)) + 1
                                  : (1 << (d + nsb - max_exponent_bits + 1)) + 1;
      const double scale = std::pow(10.0, -(max_exponent_bits - 1) + d);
      add_segment(items - 1, float(0.1 * scale), float(0.9 * scale / (items - 1)));
    }
    add_segment(1, 0.0f, 1.0f);
    for (int k = 0; k < 258; ++k) cb.mid[k] = std::numeric_limits<float>::infinity();
    if (is_signed) {
      for (int k = 0; k < 127; ++k) cb.mid[k] = -mags_mid[126 - k];
      for (int k = 0; k < nmid; ++k) cb.mid[127 + k] = mags_mid[k];
    } else {
      for (int k = 0; k < nmid; ++k) cb.mid[k] = mags_mid[k];
    }
    for (int e = 0; e < 32; ++e) {
      const float lo = std::ldexp(1.0f, e - 31), hi = std::ldexp(1.0f, e - 30);
      cb.bin_seg[e] = 0;
      cb.bin_bound[e] = std::numeric_limits<float>::infinity();
      for (int b = 0; b + 1 < nseg; ++b) {
        if (bounds[b] < lo) ++cb.bin_seg[e];
        if (bounds[b] >= lo && bounds[b] < hi) cb.bin_bound[e] = bounds[b]; // at most one
      }
    }
  }
  cb.finalize();
  return cb;
}

/// torchao's 4-bit second-moment map: linspace(0, 1, 2^bits + 1) without its zero.
inline codebook make_linear_map_nozero(int bits) {
  codebook cb;
  cb.size = 1 << bits;
  for (int k = 0; k < cb.size; ++k) cb.values[k] = float(double(k + 1) / cb.size);
  cb.linear16 = bits == 4;
  cb.finalize();
  return cb;
}

inline const codebook& signed_dynamic8() {
  static const codebook cb = make_dynamic_map(true, 7, 8);
  return cb;
}
inline const codebook& unsigned_dynamic8() {
  static const codebook cb = make_dynamic_map(false, 7, 8);
  return cb;
}
inline const codebook& signed_dynamic4() {
  static const codebook cb = make_dynamic_map(true, 3, 4);
  return cb;
}
inline const codebook& unsigned_linear4() {
  static const codebook cb = make_linear_map_nozero(4);
  return cb;
}

/// 2^(-k/8), k = 0..255: the block-scale byte's meaning.
inline const float* pow2_eighths() {
  static const std::array<float, 256> t = [] {
    std::array<float, 256> a{};
    for (int k = 0; k < 256; ++k) a[std::size_t(k)] = float(std::exp2(-k / 8.0));
    return a;
  }();
  return t.data();
}

inline constexpr std::size_t group_size = 2048;
template <int Bits> inline constexpr std::size_t block_size = Bits == 8 ? 256 : 128;

/// One quantized moment of one tensor.
struct qmoment_view {
  std::uint8_t* codes = nullptr;     // 8-bit: one byte per element; 4-bit: element 2j in the low
                                     // nibble of byte j, 2j+1 in the high nibble
  std::uint8_t* block_exp = nullptr; // per block: scale = group_scale · 2^(-k/8)
  float* group_scale = nullptr;      // per group of 2048 elements
  const codebook* cb = nullptr;
};

/// Block scale byte for a block with absmax a in a group with scale S (>= a): the largest k with
/// S·2^(-k/8) >= a.
inline std::uint8_t block_exponent(float S, float a) noexcept {
  if (!(a > 0.0f) || !(S > 0.0f)) return 255;
  const float* t = pow2_eighths();
  // estimate 8·log2(S/a) from the float's bits (exponent + linear mantissa, within 0.7 of the
  // truth), then the exact compares below settle it
  const float r = S / a;
  std::uint32_t u;
  std::memcpy(&u, &r, 4);
  int k = std::clamp(int((u >> 23) & 0xFF) - 127, 0, 32) * 8 + int((u & 0x7FFFFF) >> 20);
  k = std::clamp(k, 0, 255);
  while (k > 0 && S * t[k] < a) --k;
  while (k < 255 && S * t[k + 1] >= a) ++k;
  return std::uint8_t(k);
}

#if XSIMD_WITH_AVX512F
namespace avx512 {
/// t[idx] for a table of 16·R floats held in R registers (R = 1, 2, 4, 8 or 16), idx < 16·R.
template <int R> inline __m512 lut(const __m512* t, __m512i idx) noexcept {
  if constexpr (R == 1) {
    return _mm512_permutexvar_ps(idx, t[0]);
  } else if constexpr (R == 2) {
    return _mm512_permutex2var_ps(t[0], idx, t[1]);
  } else {
    const __m512 lo = lut<R / 2>(t, idx), hi = lut<R / 2>(t + R / 2, idx);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(8 * R)), lo, hi);
  }
}
/// Nearest code of 16 values x (already divided by the block scale) for a segmented 256-code book
/// (see the header comment): segment from the exponent, in-decade index from one fmsub + floor,
/// then one compare-and-adjust against the boundaries on each side.
struct encode256 {
  __m512i seg_lo, seg_hi;
  __m512 bound_lo, bound_hi, c0, c1, r1, c0r1, nmax, off;
  bool is_signed;
  explicit encode256(const codebook& cb) noexcept : is_signed(cb.is_signed) {
    seg_lo = _mm512_loadu_si512(cb.bin_seg);
    seg_hi = _mm512_loadu_si512(cb.bin_seg + 16);
    bound_lo = _mm512_loadu_ps(cb.bin_bound);
    bound_hi = _mm512_loadu_ps(cb.bin_bound + 16);
    c0 = _mm512_loadu_ps(cb.seg_c0), c1 = _mm512_loadu_ps(cb.seg_c1);
    r1 = _mm512_loadu_ps(cb.seg_r1), c0r1 = _mm512_loadu_ps(cb.seg_c0r1);
    nmax = _mm512_loadu_ps(cb.seg_nmax), off = _mm512_loadu_ps(cb.seg_off);
  }
  __m512i operator()(__m512 x) const noexcept { return is_signed ? enc<true>(x) : enc<false>(x); }
  /// Codes as int32. Packed: the caller saturates to [0, 255] (store64's unsigned packs), so the
  /// signed map's missing code −1 may come out as −1 instead of 0.
  template <bool Signed, bool Packed = false> __m512i enc(__m512 x) const noexcept {
    const __m512i xb = _mm512_castps_si512(x);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512i ab;
    if constexpr (Signed) {
      // |x|, plus one ulp for negative x: "boundaries < |x|+" = "boundaries <= |x|"; as integers
      // |x| + 1 = bits(x) − 0x7FFFFFFF for negative x (−0 -> the smallest denormal)
      ab = _mm512_mask_sub_epi32(xb, _mm512_movepi32_mask(xb), xb, _mm512_set1_epi32(0x7FFFFFFF));
    } else {
      ab = xb; // negative x (and -NaN) are negative integers: the clamp below takes them to 2^-31
    }
    // clamp to [2^-31, 1] (+NaN -> 1): binades 0..31 by the low 5 bits of the exponent field
    ab = _mm512_max_epi32(ab, _mm512_set1_epi32(0x30000000)); // 2^-31
    ab = _mm512_castps_si512(_mm512_min_ps(_mm512_castsi512_ps(ab), one));
    const __m512 a = _mm512_castsi512_ps(ab);
    const __m512i e = _mm512_srli_epi32(ab, 23);
    __m512i d = _mm512_permutex2var_epi32(seg_lo, e, seg_hi);
    const __m512 bnd = _mm512_permutex2var_ps(bound_lo, e, bound_hi);
    d = _mm512_mask_add_epi32(d, _mm512_cmp_ps_mask(a, bnd, _CMP_GT_OQ), d, _mm512_set1_epi32(1));
    const __m512 sc0 = _mm512_permutexvar_ps(d, c0), sc1 = _mm512_permutexvar_ps(d, c1);
    const __m512 t =
        _mm512_fmsub_ps(a, _mm512_permutexvar_ps(d, r1), _mm512_permutexvar_ps(d, c0r1));
    // kf1 is the count of inner boundaries below a, plus one or plus zero: compare with boundary
    // kf1 (the boundary index is 1-based)
    const __m512 kf1 = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 j = _mm512_mask_sub_ps(
        kf1, _mm512_cmp_ps_mask(a, _mm512_fmadd_ps(sc1, kf1, sc0), _CMP_LE_OQ), kf1, one);
    // j >= 0 already (every segment's boundary below lies above its c0); decades can reach nmax+1
    const __m512 cnt = _mm512_min_ps(j, _mm512_permutexvar_ps(d, nmax));
    __m512 q = _mm512_add_ps(cnt, _mm512_permutexvar_ps(d, off));
    if constexpr (Signed) {
      // 127 ± magnitude index (q | sign of x, one vpternlogd), the missing -1 code clamped to 0
      q = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(q), xb,
                                                        _mm512_set1_epi32(int(0x80000000u)), 0xF8));
      q = _mm512_add_ps(q, _mm512_set1_ps(127.0f));
      if constexpr (!Packed) q = _mm512_max_ps(q, _mm512_setzero_ps());
    }
    return _mm512_cvttps_epi32(q);
  }
  /// out[0..64) = codes of x[0..64) · inv: four encodes packed with saturating packs (codes fit
  /// a byte; a NaN's code saturates to 0) and one dword permute back into element order.
  void store64(const float* x, __m512 inv, std::uint8_t* out) const noexcept {
    is_signed ? store64<true>(x, inv, out) : store64<false>(x, inv, out);
  }
  template <bool Signed>
  void store64(const float* x, __m512 inv, std::uint8_t* out) const noexcept {
    const __m512i a = enc<Signed, true>(_mm512_mul_ps(_mm512_loadu_ps(x), inv)),
                  b = enc<Signed, true>(_mm512_mul_ps(_mm512_loadu_ps(x + 16), inv)),
                  c = enc<Signed, true>(_mm512_mul_ps(_mm512_loadu_ps(x + 32), inv)),
                  d = enc<Signed, true>(_mm512_mul_ps(_mm512_loadu_ps(x + 48), inv));
    // per 128-bit lane l: bytes a[4l..4l+4), b[..], c[..], d[..]
    const __m512i packed =
        _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d));
    const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi32(perm, packed));
  }
};

/// Codes of 16 values of a 16-code book (mids = its 15 boundaries, mid[15] = +inf): the linear
/// map k/16 by arithmetic, any other map by a binary search over the boundaries.
inline __m512i code16(bool linear16, __m512 mids, __m512 xv) noexcept {
  if (linear16) {
    // boundaries (c + 1.5)/16: count = clamp(ceil(16x − 1.5), 0, 15), exact in float (16x is
    // exact and 16x − 1.5 is exact wherever it is positive); NaN -> 0
    const __m512 y = _mm512_sub_ps(_mm512_mul_ps(xv, _mm512_set1_ps(16.0f)), _mm512_set1_ps(1.5f));
    __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_setzero_ps()), _mm512_set1_ps(15.0f));
    return _mm512_cvttps_epi32(t);
  }
  // binary search for the count of boundaries below x (sorted, so it is the count 15 compares
  // would give): 4 steps of permute + compare + masked add
  __m512i qv = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step /= 2) {
    const __m512 probe =
        _mm512_permutexvar_ps(_mm512_add_epi32(qv, _mm512_set1_epi32(step - 1)), mids);
    qv = _mm512_mask_add_epi32(qv, _mm512_cmp_ps_mask(xv, probe, _CMP_GT_OQ), qv,
                               _mm512_set1_epi32(step));
  }
  return qv;
}
/// 16 codes (< 16) nibble-packed into 8 bytes: element 2j in the low nibble of byte j.
inline void store_nibbles(__m512i qv, std::uint8_t* out) noexcept {
  const __m128i pair = _mm_set1_epi16(0x1001); // byte 2j + 16 · byte 2j+1
  const __m128i bytes = _mm512_cvtepi32_epi8(qv);
  const __m128i packed = _mm_packus_epi16(_mm_maddubs_epi16(bytes, pair), bytes);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), packed);
}
/// 16 nibble-packed codes at c -> table values × s.
inline __m512 decode16(const std::uint8_t* c, __m512 table, __m512 s) noexcept {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c));
  const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s);
}

#if defined(__AVX512VBMI__)
/// 64 codes -> 64 floats × s: the 256-entry table as four byte planes (vpermi2b on each 128-entry
/// half, blended by the code's top bit), re-interleaved with unpacks. The codes are first permuted
/// (4×4 dword transpose) so that the in-lane unpacks leave the floats in natural order.
struct decode256 {
  __m512i t[4][4];
  explicit decode256(const codebook& cb) noexcept {
    for (int p = 0; p < 4; ++p)
      for (int r = 0; r < 4; ++r) t[p][r] = _mm512_loadu_si512(cb.planes[p] + 64 * r);
  }
  void operator()(const std::uint8_t* c, __m512 s, float* out) const noexcept {
    __m512 r[4];
    get(c, s, r);
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(out + 16 * k, r[k]);
  }
  /// out[r] = the floats of codes c[16r .. 16r + 16) times s.
  void get(const std::uint8_t* c, __m512 s, __m512 (&out)[4]) const noexcept {
    const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __m512i codes = _mm512_permutexvar_epi32(perm, _mm512_loadu_si512(c));
    const __mmask64 hi = _mm512_movepi8_mask(codes);
    __m512i P[4];
    for (int p = 0; p < 4; ++p)
      P[p] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(t[p][0], codes, t[p][1]),
                                    _mm512_permutex2var_epi8(t[p][2], codes, t[p][3]));
    const __m512i a = _mm512_unpacklo_epi8(P[0], P[1]), b = _mm512_unpackhi_epi8(P[0], P[1]);
    const __m512i c2 = _mm512_unpacklo_epi8(P[2], P[3]), d = _mm512_unpackhi_epi8(P[2], P[3]);
    const __m512i R[4] = {_mm512_unpacklo_epi16(a, c2), _mm512_unpackhi_epi16(a, c2),
                          _mm512_unpacklo_epi16(b, d), _mm512_unpackhi_epi16(b, d)};
    for (int r = 0; r < 4; ++r) out[r] = _mm512_mul_ps(_mm512_castsi512_ps(R[r]), s);
  }
};
#endif
} // namespace avx512
#endif

/// out[0..len) = dequantized codes of one block (codes at byte `c`, 4-bit: nibble-packed from
/// element 0 of the block), scale s. AVX-512: 8-bit codes by gather, 4-bit codes by an in-register
/// 16-entry permute; the rest scalar.
template <class Arch, int Bits>
inline void dequantize_block(const codebook& cb, const std::uint8_t* c, float s, std::size_t len,
                             float* out) noexcept {
  std::size_t j = 0;
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __m512 vs = _mm512_set1_ps(s);
    if constexpr (Bits == 8) {
      __m512 table[16];
      for (int r = 0; r < 16; ++r) table[r] = _mm512_loadu_ps(cb.values + 16 * r);
      for (; j + 16 <= len; j += 16) {
        const __m512i idx =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
        _mm512_storeu_ps(out + j, _mm512_mul_ps(avx512::lut<16>(table, idx), vs));
      }
    } else {
      const __m512 table = _mm512_loadu_ps(cb.values);
      for (; j + 16 <= len; j += 16)
        _mm512_storeu_ps(out + j, avx512::decode16(c + j / 2, table, vs));
    }
  }
#endif
  for (; j < len; ++j) {
    const unsigned code = Bits == 8 ? c[j] : (c[j / 2] >> (4 * (j & 1))) & 15u;
    out[j] = cb.values[code] * s;
  }
}

/// out[0..n) = dequantized elements [begin, begin + n) of q (begin a multiple of group_size).
template <class Arch, int Bits>
inline void dequantize_group(const qmoment_view& q, std::size_t begin, std::size_t n,
                             float* out) noexcept {
  constexpr std::size_t B = block_size<Bits>;
  const float S = q.group_scale[begin / group_size];
  const float* t = pow2_eighths();
#if XSIMD_WITH_AVX512F && defined(__AVX512VBMI__)
  if constexpr (Bits == 8 && std::is_base_of<xsimd::avx512bw, Arch>::value) {
    const avx512::decode256 decode(*q.cb);
    for (std::size_t b = 0; b * B < n; ++b) {
      const std::size_t j0 = b * B, len = std::min(n, j0 + B) - j0;
      const float s = S * t[q.block_exp[begin / B + b]];
      const __m512 vs = _mm512_set1_ps(s);
      std::size_t j = 0;
      for (; j + 64 <= len; j += 64) decode(q.codes + begin + j0 + j, vs, out + j0 + j);
      if (j < len)
        dequantize_block<Arch, Bits>(*q.cb, q.codes + begin + j0 + j, s, len - j, out + j0 + j);
    }
    return;
  }
#endif
  for (std::size_t b = 0; b * B < n; ++b) {
    const std::size_t j0 = b * B, len = std::min(n, j0 + B) - j0;
    const std::uint8_t* c = q.codes + (Bits == 8 ? begin + j0 : (begin + j0) / 2);
    dequantize_block<Arch, Bits>(*q.cb, c, S * t[q.block_exp[begin / B + b]], len, out + j0);
  }
}

/// q_out[j] = nearest code of x[j]·inv, j < n: bucket lookup + two gathers + two compares.
/// xsimd 8.1's gather and integer min/max on AVX-512 fall back to slow generic code, so the
/// AVX-512 and AVX2 paths use intrinsics; other archs (and tails) run codebook::nearest, which
/// computes the same function.
template <class Arch>
inline void nearest_codes(const codebook& cb, const float* x, float inv, std::size_t n,
                          std::int32_t* q_out) noexcept {
  std::size_t i = 0;
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __m512 vinv = _mm512_set1_ps(inv);
    if (cb.segmented) {
      const avx512::encode256 encode(cb);
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512(q_out + i, encode(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv)));
    }
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    const __m512i lo = _mm512_set1_epi32(103), top = _mm512_set1_epi32(codebook::rows - 1);
    const __m512i sign_stride = _mm512_set1_epi32(codebook::rows * codebook::cols);
    const __m512i m8 = _mm512_set1_epi32(0xFF), m6 = _mm512_set1_epi32(63);
    for (; i + 16 <= n; i += 16) {
      const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
      const __m512i bits = _mm512_castps_si512(xv);
      const __m512i sign = _mm512_srli_epi32(bits, 31);
      const __m512i ex = _mm512_and_si512(_mm512_srli_epi32(bits, 23), m8);
      const __m512i e = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(ex, lo), zero), top);
      const __m512i col = _mm512_and_si512(_mm512_srli_epi32(bits, 17), m6);
      const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(sign, sign_stride),
                                           _mm512_add_epi32(_mm512_slli_epi32(e, 6), col));
      const __m512i base = _mm512_i32gather_epi32(idx, cb.bucket, 4);
      const __m512 m0 = _mm512_i32gather_ps(base, cb.mid, 4);
      const __m512 m1 = _mm512_i32gather_ps(_mm512_add_epi32(base, one), cb.mid, 4);
      __m512i q = _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask(xv, m0, _CMP_GT_OQ), base, one);
      q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(xv, m1, _CMP_GT_OQ), q, one);
      _mm512_storeu_si512(q_out + i, q);
    }
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
    const __m256i lo = _mm256_set1_epi32(103), top = _mm256_set1_epi32(codebook::rows - 1);
    const __m256i sign_stride = _mm256_set1_epi32(codebook::rows * codebook::cols);
    const __m256i m8 = _mm256_set1_epi32(0xFF), m6 = _mm256_set1_epi32(63);
    for (; i + 8 <= n; i += 8) {
      const __m256 xv = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
      const __m256i bits = _mm256_castps_si256(xv);
      const __m256i sign = _mm256_srli_epi32(bits, 31);
      const __m256i ex = _mm256_and_si256(_mm256_srli_epi32(bits, 23), m8);
      const __m256i e = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(ex, lo), zero), top);
      const __m256i col = _mm256_and_si256(_mm256_srli_epi32(bits, 17), m6);
      const __m256i idx = _mm256_add_epi32(_mm256_mullo_epi32(sign, sign_stride),
                                           _mm256_add_epi32(_mm256_slli_epi32(e, 6), col));
      const __m256i base = _mm256_i32gather_epi32(cb.bucket, idx, 4);
      const __m256 m0 = _mm256_i32gather_ps(cb.mid, base, 4);
      const __m256 m1 = _mm256_i32gather_ps(cb.mid, _mm256_add_epi32(base, one), 4);
      // compare masks are all-ones (-1) where x > mid: subtracting adds 1
      __m256i q = _mm256_sub_epi32(base, _mm256_castps_si256(_mm256_cmp_ps(xv, m0, _CMP_GT_OQ)));
      q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(xv, m1, _CMP_GT_OQ)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q_out + i), q);
    }
  } else
#endif
  {
  }
  for (; i < n; ++i) q_out[i] = cb.nearest(x[i] * inv);
}

/// Quantizes in[0..n) into elements [begin, begin + n) of q (begin a multiple of group_size).
template <class Arch, int Bits>
inline void quantize_group(const float* in, std::size_t begin, std::size_t n,
                           qmoment_view& q) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, B = block_size<Bits>;
  constexpr std::size_t nb_max = group_size / B;
  float amax[nb_max];
  float S = 0.0f;
  const std::size_t nb = (n + B - 1) / B;
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t j0 = b * B, j1 = std::min(n, j0 + B);
    F acc(0.0f);
    std::size_t j = j0;
    for (; j + W <= j1; j += W) acc = xsimd::max(acc, xsimd::abs(F::load_unaligned(in + j)));
    if (j < j1) acc = xsimd::max(acc, xsimd::abs(simd::load_partial<Arch>(in + j, j1 - j)));
    amax[b] = simd::reduce_max<Arch>(acc);
    S = std::max(S, amax[b]);
  }
  q.group_scale[begin / group_size] = S;
  const float* t = pow2_eighths();
  alignas(64) std::int32_t codes[B];
#if XSIMD_WITH_AVX512F
  // the encoder's tables live in registers across the group's blocks
  std::optional<avx512::encode256> encode;
  if constexpr (Bits == 8 && std::is_base_of<xsimd::avx512f, Arch>::value)
    if (q.cb->segmented) encode.emplace(*q.cb);
#endif
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t j0 = b * B, len = std::min(n, j0 + B) - j0;
    const std::uint8_t k = block_exponent(S, amax[b]);
    q.block_exp[begin / B + b] = k;
    const float s = S * t[k];
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    std::uint8_t* c = q.codes + (Bits == 8 ? begin + j0 : (begin + j0) / 2); // j0, begin even
    std::size_t j = 0;
#if XSIMD_WITH_AVX512F
    if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
      if constexpr (Bits == 4) {
        // 16 codes: count the boundaries below x in registers (no table lookups)
        const __m512 mids = _mm512_loadu_ps(q.cb->mid); // mid[15] = +inf
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; j + 16 <= len; j += 16) {
          const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(in + j0 + j), vinv);
          avx512::store_nibbles(avx512::code16(q.cb->linear16, mids, xv), c + j / 2);
        }
      } else if (q.cb->segmented) {
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; j + 64 <= len; j += 64) encode->store64(in + j0 + j, vinv, c + j);
        for (; j + 16 <= len; j += 16) {
          const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(in + j0 + j), vinv);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_cvtepi32_epi8((*encode)(xv)));
        }
      }
    }
#endif
    if (j < len) {
      nearest_codes<Arch>(*q.cb, in + j0 + j, inv, len - j, codes);
      if constexpr (Bits == 8) {
        for (std::size_t i = 0; i < len - j; ++i) c[j + i] = std::uint8_t(codes[i]);
      } else {
        std::size_t i = 0;
        for (; i + 1 < len - j; i += 2)
          c[(j + i) / 2] = std::uint8_t(codes[i] | (codes[i + 1] << 4));
        if (i < len - j) c[(j + i) / 2] = std::uint8_t(codes[i]);
      }
    }
  }
}

#if XSIMD_WITH_AVX512F && defined(__AVX512VBMI__)
/// Two-pass driver of the one-moment 8-bit / 4-bit steps with fp32 parameters and gradients
/// (AVX512-VBMI; Lion): on the full groups among [g_begin, g_end), the same arithmetic as
/// quantized_groups + the generic span update, bit for bit, in two passes per group instead of
/// five:
///  1. per 64 elements: decode the moment's codes in registers (decode256 / decode16), run
///     `update`, store p and the new moment into an L1 stack buffer, keep each block's absmax;
///  2. group scale, block bytes, encode the moment from the buffer (encode256 / code16), fetching
///     the next group's p and g meanwhile (the update pass then finds them in cache).
/// `update(g, p, m)` gets 16 gradients, 16 parameters and the dequantized moment (updated in
/// place) and returns the new parameters. Returns the first group it did not process (the
/// partial last group, if any, or g_end). AdamW's two-moment kernel below has the same structure.
template <int Bits, class Update>
inline std::size_t quant_full_groups(float* p, const float* g, qmoment_view& q, std::size_t g_begin,
                                     std::size_t g_end, std::size_t n, Update&& update) noexcept {
  constexpr std::size_t G = group_size, B = block_size<Bits>, NB = G / B;
  const std::size_t g_full = std::min(g_end, n / G);
  if (g_begin >= g_full) return g_begin;
  const avx512::decode256 dec(*q.cb);
  const avx512::encode256 enc(*q.cb);
  const __m512 tab = _mm512_loadu_ps(q.cb->values), mids = _mm512_loadu_ps(q.cb->mid);
  const float* t = pow2_eighths();
  alignas(64) float buf[G];
  float amax[NB];
  for (std::size_t gi = g_begin; gi < g_full; ++gi) {
    const std::size_t begin = gi * G;
    float* pp = p + begin;
    const float* gg = g + begin;
    std::uint8_t* codes = q.codes + (Bits == 8 ? begin : begin / 2);
    const float S0 = q.group_scale[gi];
    for (std::size_t b = 0; b < NB; ++b) {
      const __m512 s = _mm512_set1_ps(S0 * t[q.block_exp[begin / B + b]]);
      __m512 am = _mm512_setzero_ps();
      for (std::size_t j = b * B; j < (b + 1) * B; j += 64) {
        __m512 d[4];
        if constexpr (Bits == 8) {
          dec.get(codes + j, s, d);
        } else {
          for (std::size_t r = 0; r < 4; ++r)
            d[r] = avx512::decode16(codes + (j + 16 * r) / 2, tab, s);
        }
        for (std::size_t r = 0; r < 4; ++r) {
          const std::size_t o = j + 16 * r;
          _mm512_storeu_ps(pp + o, update(_mm512_loadu_ps(gg + o), _mm512_loadu_ps(pp + o), d[r]));
          _mm512_store_ps(buf + o, d[r]);
          am = _mm512_range_ps(am, d[r], 0x0B); // vrangeps 0b1011: max(|a|, |b|)
        }
      }
      amax[b] = _mm512_reduce_max_ps(am);
    }
    // the next group's p and g: 2 × 128 lines, 8 requests per encoded 64 elements
    const bool more = begin + G < n;
    const char* next_p = reinterpret_cast<const char*>(pp + G);
    const char* next_g = reinterpret_cast<const char*>(gg + G);
    float S = 0.0f;
    for (std::size_t b = 0; b < NB; ++b) S = std::max(S, amax[b]);
    q.group_scale[gi] = S;
    auto encode = [&](auto is_signed) {
      for (std::size_t b = 0; b < NB; ++b) {
        const std::uint8_t e = block_exponent(S, amax[b]);
        q.block_exp[begin / B + b] = e;
        const float sc = S * t[e];
        const __m512 vinv = _mm512_set1_ps(sc > 0.0f ? 1.0f / sc : 0.0f);
        for (std::size_t j = b * B; j < (b + 1) * B; j += 64) {
          if (more)
            for (int l = 0; l < 4; ++l) {
              simd::prefetch(next_p + 4 * j + 64 * l);
              simd::prefetch(next_g + 4 * j + 64 * l);
            }
          if constexpr (Bits == 8) {
            enc.store64<decltype(is_signed)::value>(buf + j, vinv, codes + j);
          } else {
            for (std::size_t r = j; r < j + 64; r += 16) {
              const __m512 xv = _mm512_mul_ps(_mm512_load_ps(buf + r), vinv);
              avx512::store_nibbles(avx512::code16(q.cb->linear16, mids, xv), codes + r / 2);
            }
          }
        }
      }
    };
    if (q.cb->is_signed)
      encode(std::true_type{});
    else
      encode(std::false_type{});
  }
  return g_full;
}

/// 8-bit / 4-bit AdamW on the full groups among [g_begin, g_end) (fp32 parameters and gradients;
/// AVX512-VBMI): the same arithmetic as quantized_groups + adam_span<Arch, false>, bit for bit,
/// in two passes per group instead of seven (written out rather than through quant_full_groups
/// generalised to two moments, which measured ~5% slower):
///  1. per 64 elements: decode the m and v codes in registers (decode256 / decode16), the AdamW
///     update, store p and the new m, v into L1 stack buffers, keep the running block absmax;
///  2. group scales, block bytes, encode both moments from the buffers (encode256 / code16),
///     fetching the next group's p and g meanwhile (the update pass then finds them in cache).
/// Returns the first group it did not process (the partial last group, if any, or g_end).
template <int Bits>
inline std::size_t adamw_quant_full_groups(float* p, const float* g, qmoment_view* q,
                                           std::size_t g_begin, std::size_t g_end, std::size_t n,
                                           const adam_coeffs& c) noexcept {
  constexpr std::size_t G = group_size, B = block_size<Bits>, NB = G / B;
  const std::size_t g_full = std::min(g_end, n / G);
  if (g_begin >= g_full) return g_begin;
  const avx512::decode256 dec_m(*q[0].cb), dec_v(*q[1].cb);
  const avx512::encode256 enc_m(*q[0].cb), enc_v(*q[1].cb);
  const __m512 tab_m = _mm512_loadu_ps(q[0].cb->values), tab_v = _mm512_loadu_ps(q[1].cb->values);
  const __m512 mid_m = _mm512_loadu_ps(q[0].cb->mid), mid_v = _mm512_loadu_ps(q[1].cb->mid);
  const float* t = pow2_eighths();
  const __m512 b1 = _mm512_set1_ps(c.beta1), omb1 = _mm512_set1_ps(c.one_minus_beta1),
               b2 = _mm512_set1_ps(c.beta2), omb2 = _mm512_set1_ps(c.one_minus_beta2),
               isb = _mm512_set1_ps(c.inv_sqrt_bc2), eps = _mm512_set1_ps(c.eps),
               nstep = _mm512_set1_ps(-c.step_size), decay = _mm512_set1_ps(c.decay);
  alignas(64) float mb[G], vb[G];
  float am[NB], av[NB];
  for (std::size_t gi = g_begin; gi < g_full; ++gi) {
    const std::size_t begin = gi * G;
    float* pp = p + begin;
    const float* gg = g + begin;
    const std::uint8_t* cm = q[0].codes + (Bits == 8 ? begin : begin / 2);
    const std::uint8_t* cv = q[1].codes + (Bits == 8 ? begin : begin / 2);
    const float Sm0 = q[0].group_scale[gi], Sv0 = q[1].group_scale[gi];
    for (std::size_t b = 0; b < NB; ++b) {
      const __m512 sm = _mm512_set1_ps(Sm0 * t[q[0].block_exp[begin / B + b]]);
      const __m512 sv = _mm512_set1_ps(Sv0 * t[q[1].block_exp[begin / B + b]]);
      __m512 amax_m = _mm512_setzero_ps(), amax_v = _mm512_setzero_ps();
      for (std::size_t j = b * B; j < (b + 1) * B; j += 64) {
        __m512 dm[4], dv[4];
        if constexpr (Bits == 8) {
          dec_m.get(cm + j, sm, dm);
          dec_v.get(cv + j, sv, dv);
        } else {
          for (std::size_t r = 0; r < 4; ++r) {
            dm[r] = avx512::decode16(cm + (j + 16 * r) / 2, tab_m, sm);
            dv[r] = avx512::decode16(cv + (j + 16 * r) / 2, tab_v, sv);
          }
        }
        for (std::size_t r = 0; r < 64; r += 16) {
          const __m512 gv = _mm512_loadu_ps(gg + j + r);
          __m512 pv = _mm512_loadu_ps(pp + j + r);
          const __m512 mv = _mm512_fmadd_ps(b1, dm[r / 16], _mm512_mul_ps(omb1, gv));
          const __m512 vv =
              _mm512_fmadd_ps(b2, dv[r / 16], _mm512_mul_ps(omb2, _mm512_mul_ps(gv, gv)));
          // exact vsqrtps / vdivps: they run in the divider beside the issue-bound rest
          // (rsqrt14 / rcp14 + Newton steps measured slower, see the header comment)
          const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vv), isb, eps);
          pv = _mm512_fmadd_ps(nstep, _mm512_div_ps(mv, denom), _mm512_mul_ps(pv, decay));
          _mm512_storeu_ps(pp + j + r, pv);
          _mm512_store_ps(mb + j + r, mv);
          _mm512_store_ps(vb + j + r, vv);
          // vrangeps 0b1011: max(|a|, |b|) with a cleared sign, one instruction
          amax_m = _mm512_range_ps(amax_m, mv, 0x0B);
          amax_v = _mm512_range_ps(amax_v, vv, 0x0B);
        }
      }
      am[b] = _mm512_reduce_max_ps(amax_m), av[b] = _mm512_reduce_max_ps(amax_v);
    }
    // the next group's p and g: 2 × 128 lines, one request per encoded vector below
    const bool more = begin + G < n;
    const char* next[2] = {reinterpret_cast<const char*>(pp + G),
                           reinterpret_cast<const char*>(gg + G)};
    float Sm = 0.0f, Sv = 0.0f;
    for (std::size_t b = 0; b < NB; ++b) Sm = std::max(Sm, am[b]), Sv = std::max(Sv, av[b]);
    q[0].group_scale[gi] = Sm, q[1].group_scale[gi] = Sv;
    auto encode = [&](int k, float S, const float* buf, const float* amax, auto is_signed) {
      const avx512::encode256& enc = k == 0 ? enc_m : enc_v;
      std::uint8_t* codes = q[k].codes + (Bits == 8 ? begin : begin / 2);
      for (std::size_t b = 0; b < NB; ++b) {
        const std::uint8_t e = block_exponent(S, amax[b]);
        q[k].block_exp[begin / B + b] = e;
        const float s = S * t[e];
        const __m512 vinv = _mm512_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        for (std::size_t j = b * B; j < (b + 1) * B; j += 64) {
          if (more)
            for (int l = 0; l < 4; ++l) simd::prefetch(next[k] + 4 * j + 64 * l);
          if constexpr (Bits == 8) {
            enc.store64<decltype(is_signed)::value>(buf + j, vinv, codes + j);
          } else {
            const __m512 mids = k == 0 ? mid_m : mid_v;
            for (std::size_t r = j; r < j + 64; r += 16) {
              const __m512 xv = _mm512_mul_ps(_mm512_load_ps(buf + r), vinv);
              avx512::store_nibbles(avx512::code16(q[k].cb->linear16, mids, xv), codes + r / 2);
            }
          }
        }
      }
    };
    if (q[0].cb->is_signed)
      encode(0, Sm, mb, am, std::true_type{});
    else
      encode(0, Sm, mb, am, std::false_type{});
    if (q[1].cb->is_signed)
      encode(1, Sv, vb, av, std::true_type{});
    else
      encode(1, Sv, vb, av, std::false_type{});
  }
  return g_full;
}
/// 8-bit / 4-bit Lion on the full groups among [g_begin, g_end) (quant_full_groups with
/// lion_span's arithmetic: the generic path's result bit for bit).
template <int Bits>
inline std::size_t lion_quant_full_groups(float* p, const float* g, qmoment_view* q,
                                          std::size_t g_begin, std::size_t g_end, std::size_t n,
                                          const lion_coeffs& c) noexcept {
  const __m512 decay = _mm512_set1_ps(c.decay), nlr = _mm512_set1_ps(-c.lr),
               b1 = _mm512_set1_ps(c.beta1), omb1 = _mm512_set1_ps(c.one_minus_beta1),
               b2 = _mm512_set1_ps(c.beta2), omb2 = _mm512_set1_ps(c.one_minus_beta2),
               one = _mm512_set1_ps(1.0f), mone = _mm512_set1_ps(-1.0f), zero = _mm512_setzero_ps();
  return quant_full_groups<Bits>(
      p, g, q[0], g_begin, g_end, n, [=](__m512 gv, __m512 pv, __m512& m) {
        const __m512 cv = _mm512_fmadd_ps(b1, m, _mm512_mul_ps(omb1, gv));
        // sign(cv), 0 for 0 and NaN
        __m512 u = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(cv, zero, _CMP_GT_OQ), one);
        u = _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(cv, zero, _CMP_LT_OQ), mone);
        m = _mm512_fmadd_ps(b2, m, _mm512_mul_ps(omb2, gv));
        return _mm512_fmadd_ps(nlr, u, _mm512_mul_ps(pv, decay));
      });
}
#endif

/// For groups [g_begin, g_end) of an n-element tensor: dequantize `count` (1 or 2) moments into
/// stack buffers, call update(begin, len, m_buf, v_buf), requantize.
template <class Arch, int Bits, class Update>
inline void quantized_groups(std::size_t g_begin, std::size_t g_end, std::size_t n,
                             qmoment_view* moments, int count, Update&& update) noexcept {
  alignas(64) float buf[2][group_size];
  for (std::size_t gi = g_begin; gi < g_end; ++gi) {
    const std::size_t begin = gi * group_size, len = std::min(group_size, n - begin);
    for (int k = 0; k < count; ++k) dequantize_group<Arch, Bits>(moments[k], begin, len, buf[k]);
    update(begin, len, buf[0], buf[1]);
    for (int k = 0; k < count; ++k) quantize_group<Arch, Bits>(buf[k], begin, len, moments[k]);
  }
}

} // namespace lowmem::optim::kernels
