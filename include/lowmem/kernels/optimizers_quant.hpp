// lowmem/kernels/optimizers_quant.hpp — block-wise quantized optimizer state (8-bit and 4-bit).
//
// Codebooks (sorted, K = 256 or 16 values in [-1, 1]):
//  * dynamic map (Dettmers et al., arXiv:2110.02861; bitsandbytes `create_dynamic_map(signed,
//    max_exponent_bits, total_bits)`): for decade i = 0..E-1 the means of consecutive points of
//    linspace(0.1, 1, F_i) scaled by 10^(i-E+1), F_i = 2^(i+N-E)+1 (signed, mirrored to negative)
//    or 2^(i+N-E+1)+1 (unsigned), N = total_bits-1; plus 0 and 1. 8-bit: E = 7; 4-bit signed
//    (torchao's 4-bit m map, no zero padding): E = 3.
//  * linear map without zero (torchao's 4-bit v map): k / 16, k = 1..16.
// Quantization picks the nearest code (ties to the lower code). Instead of a binary search, a
// bucket table indexed by the float's sign, exponent (clamped to 2^-23..2) and top 6 mantissa bits
// gives the number of code midpoints below the bucket; at most two midpoints fall inside one
// bucket for these codebooks (checked at construction), so two vector gathers and compares finish
// the search.
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
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../simd/simd.hpp"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace lowmem::optim::kernels {

/// A sorted codebook with its nearest-code lookup tables.
struct codebook {
  static constexpr int rows = 26, cols = 64; // exponent rows (2^-23 .. 2), 6 mantissa bits
  int size = 0;
  alignas(64) float values[256] = {};
  alignas(64) float mid[258] = {}; // mid[k] = (values[k] + values[k+1]) / 2, +inf padded
  alignas(64) std::int32_t bucket[2 * rows * cols] = {};
  // Binary-search levels for 256-code books: level L (step s = 128 >> L) holds the midpoints
  // mid[j·2s + s − 1], j < 128 / s, so that an 8-step branchless search needs only in-register
  // permutes (AVX-512) instead of gathers.
  alignas(64) float level[8][128] = {};
  int max_mids_per_bucket = 0;

  /// Builds mid[] and bucket[] from values[0..size) (sorted ascending).
  void finalize() {
    const float inf = std::numeric_limits<float>::infinity();
    for (int k = 0; k < 258; ++k) mid[k] = k + 1 < size ? 0.5f * (values[k] + values[k + 1]) : inf;
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
    if (size == 256)
      for (int L = 0; L < 8; ++L) {
        const int st = 128 >> L;
        for (int j = 0; j < 128 / st; ++j) level[L][j] = mid[j * 2 * st + st - 1];
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
  cb.finalize();
  return cb;
}

/// torchao's 4-bit second-moment map: linspace(0, 1, 2^bits + 1) without its zero.
inline codebook make_linear_map_nozero(int bits) {
  codebook cb;
  cb.size = 1 << bits;
  for (int k = 0; k < cb.size; ++k) cb.values[k] = float(double(k + 1) / cb.size);
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
  int k = int(std::floor(8.0 * std::log2(double(S) / double(a))));
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
/// Count of midpoints below x for a 256-code book: 8-step branchless binary search whose
/// per-level midpoint tables live in registers (levels 0..4 one register, 5: 2, 6: 4, 7: 8).
struct search256 {
  __m512 l0, l1, l2, l3, l4, l5[2], l6[4], l7[8];
  explicit search256(const codebook& cb) noexcept {
    l0 = _mm512_set1_ps(cb.level[0][0]);
    l1 = _mm512_loadu_ps(cb.level[1]);
    l2 = _mm512_loadu_ps(cb.level[2]);
    l3 = _mm512_loadu_ps(cb.level[3]);
    l4 = _mm512_loadu_ps(cb.level[4]);
    for (int r = 0; r < 2; ++r) l5[r] = _mm512_loadu_ps(cb.level[5] + 16 * r);
    for (int r = 0; r < 4; ++r) l6[r] = _mm512_loadu_ps(cb.level[6] + 16 * r);
    for (int r = 0; r < 8; ++r) l7[r] = _mm512_loadu_ps(cb.level[7] + 16 * r);
  }
  __m512i operator()(__m512 x) const noexcept {
    __m512i q = _mm512_setzero_si512();
    auto step = [&](__m512 m, int s) {
      q = _mm512_mask_add_epi32(q, _mm512_cmp_ps_mask(x, m, _CMP_GT_OQ), q, _mm512_set1_epi32(s));
    };
    step(l0, 128); // level 0: one midpoint, broadcast
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 7), l1), 64);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 6), l2), 32);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 5), l3), 16);
    step(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), l4), 8);
    step(lut<2>(l5, _mm512_srli_epi32(q, 3)), 4);
    step(lut<4>(l6, _mm512_srli_epi32(q, 2)), 2);
    step(lut<8>(l7, _mm512_srli_epi32(q, 1)), 1);
    return q;
  }
};
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
      const __m128i m4 = _mm_set1_epi8(0x0F);
      for (; j + 16 <= len; j += 16) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j / 2));
        const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
        _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), vs));
      }
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
        // 16 codes: count the midpoints below x in registers (no table lookups)
        __m512 mids[15];
        for (int k = 0; k < 15; ++k) mids[k] = _mm512_set1_ps(q.cb->mid[k]);
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i one = _mm512_set1_epi32(1);
        const __m128i pair = _mm_set1_epi16(0x1001); // byte 2j + 16 · byte 2j+1
        for (; j + 16 <= len; j += 16) {
          const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(in + j0 + j), vinv);
          __m512i qv = _mm512_setzero_si512();
          for (int k = 0; k < 15; ++k)
            qv = _mm512_mask_add_epi32(qv, _mm512_cmp_ps_mask(xv, mids[k], _CMP_GT_OQ), qv, one);
          const __m128i bytes = _mm512_cvtepi32_epi8(qv);
          const __m128i packed = _mm_packus_epi16(_mm_maddubs_epi16(bytes, pair), bytes);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(c + j / 2), packed);
        }
      } else {
        const avx512::search256 search(*q.cb);
        const __m512 vinv = _mm512_set1_ps(inv);
        for (; j + 16 <= len; j += 16) {
          const __m512 xv = _mm512_mul_ps(_mm512_loadu_ps(in + j0 + j), vinv);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_cvtepi32_epi8(search(xv)));
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
