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
#include <vector>

#include "../simd/simd.hpp"

namespace lowmem::optim::kernels {

/// A sorted codebook with its nearest-code lookup tables.
struct codebook {
  static constexpr int rows = 26, cols = 64; // exponent rows (2^-23 .. 2), 6 mantissa bits
  int size = 0;
  alignas(64) float values[256] = {};
  alignas(64) float mid[258] = {}; // mid[k] = (values[k] + values[k+1]) / 2, +inf padded
  alignas(64) std::int32_t bucket[2 * rows * cols] = {};
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

/// out[0..n) = dequantized elements [begin, begin + n) of q (begin a multiple of group_size).
template <int Bits>
inline void dequantize_group(const qmoment_view& q, std::size_t begin, std::size_t n,
                             float* out) noexcept {
  constexpr std::size_t B = block_size<Bits>;
  const float S = q.group_scale[begin / group_size];
  const float* t = pow2_eighths();
  const float* vals = q.cb->values;
  for (std::size_t b = 0; b * B < n; ++b) {
    const float s = S * t[q.block_exp[begin / B + b]];
    const std::size_t e = std::min(n, (b + 1) * B);
    if constexpr (Bits == 8) {
      const std::uint8_t* c = q.codes + begin;
      for (std::size_t j = b * B; j < e; ++j) out[j] = vals[c[j]] * s;
    } else {
      const std::uint8_t* c = q.codes + begin / 2;
      for (std::size_t j = b * B; j < e; ++j) out[j] = vals[(c[j / 2] >> (4 * (j & 1))) & 15] * s;
    }
  }
}

/// q_out[j] = nearest code of x[j]·inv, j < n (vector bucket lookup + two gathers).
template <class Arch>
inline void nearest_codes(const codebook& cb, const float* x, float inv, std::size_t n,
                          std::int32_t* q_out) noexcept {
  using F = simd::fbatch<Arch>;
  using I = simd::ibatch<Arch>;
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F vinv(inv), one(1.0f), zero(0.0f);
  auto body = [&](std::size_t i, std::size_t k) {
    const F xv = (k == W ? F::load_unaligned(x + i) : simd::load_partial<Arch>(x + i, k)) * vinv;
    const U bits = simd::as_uint<Arch>(xv);
    const I sign = xsimd::bitwise_cast<I>(bits >> 31);
    const I ex = xsimd::bitwise_cast<I>((bits >> 23) & U(0xFFu));
    const I e = xsimd::min(xsimd::max(ex - I(103), I(0)), I(codebook::rows - 1));
    const I col = xsimd::bitwise_cast<I>((bits >> 17) & U(63u));
    const I idx = sign * I(codebook::rows * codebook::cols) + e * I(codebook::cols) + col;
    const I base = I::gather(cb.bucket, idx);
    const F m0 = F::gather(cb.mid, base), m1 = F::gather(cb.mid, base + I(1));
    const F qf = xsimd::batch_cast<float>(base) + xsimd::select(xv > m0, one, zero) +
                 xsimd::select(xv > m1, one, zero);
    const I q = xsimd::batch_cast<std::int32_t>(qf);
    if (k == W)
      q.store_unaligned(q_out + i);
    else
      simd::store_partial<Arch>(q_out + i, q, k);
  };
  std::size_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, n - i);
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
    nearest_codes<Arch>(*q.cb, in + j0, s > 0.0f ? 1.0f / s : 0.0f, len, codes);
    if constexpr (Bits == 8) {
      std::uint8_t* c = q.codes + begin + j0;
      for (std::size_t j = 0; j < len; ++j) c[j] = std::uint8_t(codes[j]);
    } else {
      std::uint8_t* c = q.codes + (begin + j0) / 2; // j0 and begin are even
      std::size_t j = 0;
      for (; j + 1 < len; j += 2) c[j / 2] = std::uint8_t(codes[j] | (codes[j + 1] << 4));
      if (j < len) c[j / 2] = std::uint8_t(codes[j]);
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
    for (int k = 0; k < count; ++k) dequantize_group<Bits>(moments[k], begin, len, buf[k]);
    update(begin, len, buf[0], buf[1]);
    for (int k = 0; k < count; ++k) quantize_group<Arch, Bits>(buf[k], begin, len, moments[k]);
  }
}

} // namespace lowmem::optim::kernels
