// lowmem/core/bf16.hpp — bfloat16 storage and fp32 <-> bf16 conversion.
//
// bf16 is the top 16 bits of an IEEE fp32 (1 sign, 8 exponent, 7 mantissa bits).
//  * to_bf16: round to nearest, ties to even; NaN stays NaN (quiet bit forced so a NaN whose
//    payload lives in the low bits does not become Inf); overflow rounds to ±Inf as IEEE does.
//  * to_bf16_stochastic: adds 16 uniform random bits below the cut and truncates, so
//    E[to_float(result)] = x exactly for finite x whose bf16 neighbours are finite (unbiased);
//    the bits come from the core counter RNG, value `index` of `stream`, so results are
//    reproducible and independent of threading.
// The array conversions are vectorized on an xsimd arch (default: the consumer's flags) and are
// bitwise equal to the scalar ones (tested on every arch); the stochastic one draws its words
// with the vectorized Philox (random::kernels::fill_words), ~25x faster than word-by-word.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../kernels/random.hpp"
#include "../simd/simd.hpp"
#include "random.hpp"

namespace lowmem {

/// bfloat16 storage type (trivially copyable, 2 bytes).
struct bf16 {
  std::uint16_t bits = 0;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");

inline std::uint32_t float_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// bf16 -> fp32 (exact).
inline float to_float(bf16 h) noexcept { return bits_float(std::uint32_t(h.bits) << 16); }

/// fp32 -> bf16, round to nearest even.
inline bf16 to_bf16(float f) noexcept {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{std::uint16_t((u >> 16) | 0x0040u)}; // NaN
  const std::uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return bf16{std::uint16_t((u + rounding) >> 16)};
}

/// fp32 -> bf16 with stochastic rounding driven by 16 random bits `r` (low 16 bits used).
inline bf16 to_bf16_stochastic(float f, std::uint32_t r) noexcept {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) >= 0x7F800000u) { // Inf stays Inf, NaN stays NaN
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? bf16{std::uint16_t((u >> 16) | 0x0040u)}
                                           : bf16{std::uint16_t(u >> 16)};
  }
  return bf16{std::uint16_t((u + (r & 0xFFFFu)) >> 16)};
}

/// fp32 -> bf16 with stochastic rounding from value `index` of `stream`.
inline bf16 to_bf16_stochastic(float f, const random::stream& s, std::uint64_t index) noexcept {
  return to_bf16_stochastic(f, s.bits(index) >> 16);
}

namespace detail {
/// RNE (or, with r, stochastic) bf16 bits of W floats: the scalar formulas above, lane-wise.
template <class Arch, bool Stochastic>
inline simd::ubatch<Arch> bf16_bits(const simd::ubatch<Arch>& u, const simd::ubatch<Arch>& r) {
  using U = simd::ubatch<Arch>;
  using I = simd::ibatch<Arch>;
  // NaN: |u| > Inf as int32 (the masked value is non-negative)
  const auto nan = xsimd::bitwise_cast<I>(u & U(0x7FFFFFFFu)) > I(0x7F800000);
  const U quiet = (u >> 16) | U(0x0040u);
  U rounded;
  if constexpr (Stochastic) {
    rounded = (u + r) >> 16; // Inf + r < next binade: stays Inf, as the scalar special case
  } else {
    (void)r;
    rounded = (u + U(0x7FFFu) + ((u >> 16) & U(1u))) >> 16;
  }
  return xsimd::bitwise_cast<U>(
      xsimd::select(nan, xsimd::bitwise_cast<I>(quiet), xsimd::bitwise_cast<I>(rounded)));
}
} // namespace detail

/// Array conversions (n elements), vectorized on Arch (the consumer's instruction set by
/// default); bitwise equal to the scalar conversions above. RNE; stochastic from values
/// [offset, offset + n) of `s` (random words generated in L1-sized chunks, no allocation).
template <class Arch = simd::default_arch>
inline void to_bf16(const float* in, bf16* out, std::size_t n) noexcept {
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  static_assert(sizeof(bf16) == sizeof(std::uint16_t), "bf16 is its 16 bits");
  auto* o = reinterpret_cast<std::uint16_t*>(out);
  const std::size_t nv = n - n % (2 * W);
  for (std::size_t i = 0; i < nv; i += 2 * W) {
    const U u0 = simd::as_uint<Arch>(simd::fbatch<Arch>::load_unaligned(in + i));
    const U u1 = simd::as_uint<Arch>(simd::fbatch<Arch>::load_unaligned(in + i + W));
    simd::store_low_u16<Arch>(o + i, detail::bf16_bits<Arch, false>(u0, u0),
                              detail::bf16_bits<Arch, false>(u1, u1));
  }
  for (std::size_t i = nv; i < n; ++i) out[i] = to_bf16(in[i]);
}
template <class Arch = simd::default_arch>
inline void to_float(const bf16* in, float* out, std::size_t n) noexcept {
  constexpr std::size_t W = simd::width<Arch>;
  const auto* p = reinterpret_cast<const std::uint16_t*>(in);
  const std::size_t nv = n - n % W;
  for (std::size_t i = 0; i < nv; i += W)
    simd::as_float<Arch>(simd::load_u16_high<Arch>(p + i)).store_unaligned(out + i);
  for (std::size_t i = nv; i < n; ++i) out[i] = to_float(in[i]);
}
template <class Arch = simd::default_arch>
inline void to_bf16_stochastic(const float* in, bf16* out, std::size_t n, const random::stream& s,
                               std::uint64_t offset = 0) noexcept {
  using U = simd::ubatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, chunk = 512;
  auto* o = reinterpret_cast<std::uint16_t*>(out);
  alignas(64) std::uint32_t words[chunk];
  for (std::size_t c = 0; c < n; c += chunk) {
    const std::size_t m = n - c < chunk ? n - c : chunk;
    random::kernels::fill_words<Arch>(s, offset + c, words, m);
    const std::size_t mv = m - m % (2 * W);
    for (std::size_t i = 0; i < mv; i += 2 * W) {
      const U u0 = simd::as_uint<Arch>(simd::fbatch<Arch>::load_unaligned(in + c + i));
      const U u1 = simd::as_uint<Arch>(simd::fbatch<Arch>::load_unaligned(in + c + i + W));
      const U r0 = U::load_aligned(words + i) >> 16, r1 = U::load_aligned(words + i + W) >> 16;
      simd::store_low_u16<Arch>(o + c + i, detail::bf16_bits<Arch, true>(u0, r0),
                                detail::bf16_bits<Arch, true>(u1, r1));
    }
    for (std::size_t i = mv; i < m; ++i) out[c + i] = to_bf16_stochastic(in[c + i], words[i] >> 16);
  }
}

} // namespace lowmem
