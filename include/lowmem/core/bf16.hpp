// lowmem/core/bf16.hpp — bfloat16 storage and fp32 <-> bf16 conversion.
//
// bf16 is the top 16 bits of an IEEE fp32 (1 sign, 8 exponent, 7 mantissa bits).
//  * to_bf16: round to nearest, ties to even; NaN stays NaN (quiet bit forced so a NaN whose
//    payload lives in the low bits does not become Inf); overflow rounds to ±Inf as IEEE does.
//  * to_bf16_stochastic: adds 16 uniform random bits below the cut and truncates, so
//    E[to_float(result)] = x exactly for finite x whose bf16 neighbours are finite (unbiased);
//    the bits come from the core counter RNG, value `index` of `stream`, so results are
//    reproducible and independent of threading.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

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

/// Array conversions (n elements). RNE; stochastic from values [offset, offset + n) of `s`.
inline void to_bf16(const float* in, bf16* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_bf16(in[i]);
}
inline void to_float(const bf16* in, float* out, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_float(in[i]);
}
inline void to_bf16_stochastic(const float* in, bf16* out, std::size_t n, const random::stream& s,
                               std::uint64_t offset = 0) noexcept {
  for (std::size_t i = 0; i < n; ++i) out[i] = to_bf16_stochastic(in[i], s, offset + i);
}

} // namespace lowmem
