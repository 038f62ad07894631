// lowmem/kernels/random.hpp — vectorized fills from the counter-based generator.
//
// out[k] = f(value begin + k of stream s) for k in [0, n), f = uniform / normal / rademacher /
// bits, with the value -> counter mapping of core/random.hpp. One group of 64 values is 16 Philox
// blocks run side by side in SIMD lanes (16/width registers per Philox word). Ranges that start or
// end inside a group compute that group into a stack buffer and copy the needed part, so any
// slice equals the same slice of a whole-range fill, bit for bit (test: whole vs pieces vs
// threads). No heap allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/random.hpp"
#include "../core/threading.hpp"
#include "../simd/simd.hpp"

namespace lowmem::random {
namespace kernels {

template <class Arch> inline constexpr std::size_t regs_per_word = 16 / simd::width<Arch>;

/// Words [4][16] of the 16 Philox blocks of group g, as registers: w[word][r] holds lanes
/// r*width .. r*width+width-1.
template <class Arch>
inline void philox_group(const stream& s, std::uint64_t g,
                         simd::ubatch<Arch> (&w)[4][regs_per_word<Arch>]) noexcept {
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = regs_per_word<Arch>;
  alignas(64) std::uint32_t lane_ids[16];
  for (std::uint32_t l = 0; l < 16; ++l) lane_ids[l] = l;
  const std::uint64_t block0 = 16 * g; // blocks 16g .. 16g+15: the low word never wraps inside
  const key_t key = s.key();
  for (std::size_t r = 0; r < R; ++r) {
    U c0 = U::load_aligned(lane_ids + r * W) + U(std::uint32_t(block0));
    U c1(std::uint32_t(block0 >> 32));
    U c2(std::uint32_t(s.id));
    U c3(std::uint32_t(s.id >> 32));
    std::uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
      U hi0, lo0, hi1, lo1;
      simd::mul_hi_lo<Arch>(c0, philox_m0, hi0, lo0);
      simd::mul_hi_lo<Arch>(c2, philox_m1, hi1, lo1);
      c0 = hi1 ^ c1 ^ U(k0);
      c1 = lo1;
      c2 = hi0 ^ c3 ^ U(k1);
      c3 = lo0;
      k0 += philox_w0;
      k1 += philox_w1;
    }
    w[0][r] = c0;
    w[1][r] = c1;
    w[2][r] = c2;
    w[3][r] = c3;
  }
}

/// Writes the 64 values of group g as floats (f = uniform, rademacher or normal) to dst[0..64).
enum class distribution { uniform, normal, rademacher };

template <class Arch, distribution D>
inline void group_values(const stream& s, std::uint64_t g, float* dst) noexcept {
  using U = simd::ubatch<Arch>;
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = regs_per_word<Arch>;
  U w[4][R];
  philox_group<Arch>(s, g, w);
  const F scale(0x1p-24f);
  for (std::size_t r = 0; r < R; ++r) {
    if constexpr (D == distribution::uniform) {
      for (int k = 0; k < 4; ++k)
        (simd::small_uint_to_float<Arch>(w[k][r] >> 8) * scale)
            .store_unaligned(dst + 16 * k + r * W);
    } else if constexpr (D == distribution::rademacher) {
      for (int k = 0; k < 4; ++k) {
        // +1.0f is 0x3F800000; OR-ing the top bit of the random word gives -1.0f.
        U sign = w[k][r] & U(0x80000000u);
        U v = sign | U(0x3F800000u);
        simd::as_float<Arch>(v).store_unaligned(dst + 16 * k + r * W);
      }
    } else {
      const F two_pi(6.28318530717958647692f);
      for (int p = 0; p < 2; ++p) {
        const U a = w[2 * p][r], b = w[2 * p + 1][r];
        const F u1 = (simd::small_uint_to_float<Arch>(a >> 8) + F(1.0f)) * scale;
        const F u2 = simd::small_uint_to_float<Arch>(b >> 8) * scale;
        const F rad = xsimd::sqrt(F(-2.0f) * xsimd::log(u1));
        F sn, cs;
        std::tie(sn, cs) = xsimd::sincos(two_pi * u2);
        (rad * cs).store_unaligned(dst + 16 * (2 * p) + r * W);
        (rad * sn).store_unaligned(dst + 16 * (2 * p + 1) + r * W);
      }
    }
  }
}

/// Fills out[0..n) with values [begin, begin + n) of s; serial.
template <class Arch, distribution D>
inline void fill(const stream& s, std::uint64_t begin, float* out, std::size_t n) noexcept {
  if (n == 0) return;
  std::uint64_t i = begin;
  const std::uint64_t end = begin + n;
  alignas(64) float tmp[64];
  // head: partial first group
  if (i % 64 != 0) {
    const std::uint64_t g = i / 64;
    group_values<Arch, D>(s, g, tmp);
    const std::uint64_t stop = end < 64 * (g + 1) ? end : 64 * (g + 1);
    std::memcpy(out, tmp + (i - 64 * g), (stop - i) * sizeof(float));
    out += stop - i;
    i = stop;
  }
  for (; i + 64 <= end; i += 64, out += 64) group_values<Arch, D>(s, i / 64, out);
  if (i < end) {
    group_values<Arch, D>(s, i / 64, tmp);
    std::memcpy(out, tmp, (end - i) * sizeof(float));
  }
}

} // namespace kernels

/// Fills out[k] = s.uniform(begin + k), k < n. Threads over chunks when `parallel`.
template <class Arch = simd::default_arch>
inline void fill_uniform(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                         bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), 1 << 16,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::uniform>(s, begin + b, out + b,
                                                            std::size_t(e - b));
      },
      parallel ? 0 : 1);
}
/// Fills out[k] = s.normal(begin + k) (within vector-math accuracy), k < n.
template <class Arch = simd::default_arch>
inline void fill_normal(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                        bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), 1 << 16,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::normal>(s, begin + b, out + b,
                                                           std::size_t(e - b));
      },
      parallel ? 0 : 1);
}
/// Fills out[k] = s.rademacher(begin + k), k < n.
template <class Arch = simd::default_arch>
inline void fill_rademacher(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                            bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), 1 << 16,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::rademacher>(s, begin + b, out + b,
                                                               std::size_t(e - b));
      },
      parallel ? 0 : 1);
}

} // namespace lowmem::random
