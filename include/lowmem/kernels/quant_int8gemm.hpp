// lowmem/kernels/quant_int8gemm.hpp — C = A·Bᵀ for int8 A [M, K], B [N, K] with exact int32
// accumulation. AVX512-VNNI (vpdpbusd: u8 × s8, 4 products per int32 lane) where compiled in:
// A is offset to unsigned (a + 128) and the offset removed with the row sums of B,
// C = Σ (a+128)·b − 128·Σ b; 4×4 register blocks over (m, n), 64 k per step. Portable scalar
// loop otherwise (the compiler vectorizes it). K tails are handled exactly in both.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOWMEM_QUANT_HAVE_VNNI 1
#else
#define LOWMEM_QUANT_HAVE_VNNI 0
#endif

namespace lowmem::quant::kernels {

/// Σ_k b[n][k] for every row (the VNNI offset correction). b row stride ldb.
inline void int8_row_sums(const std::int8_t* b, std::size_t N, std::size_t K, std::size_t ldb,
                          std::int32_t* sums) noexcept {
  for (std::size_t n = 0; n < N; ++n) {
    std::int32_t s = 0;
    for (std::size_t k = 0; k < K; ++k) s += b[n * ldb + k];
    sums[n] = s;
  }
}

/// Portable reference kernel: C[m][n] = Σ_k a[m][k]·b[n][k].
inline void int8_gemm_scalar(const std::int8_t* a, const std::int8_t* b, std::size_t M,
                             std::size_t N, std::size_t K, std::int32_t* c) noexcept {
  for (std::size_t m = 0; m < M; ++m)
    for (std::size_t n = 0; n < N; ++n) {
      std::int32_t s = 0;
      for (std::size_t k = 0; k < K; ++k)
        s += std::int32_t(a[m * K + k]) * std::int32_t(b[n * K + k]);
      c[m * N + n] = s;
    }
}

inline constexpr bool int8_gemm_has_vnni = LOWMEM_QUANT_HAVE_VNNI != 0;

#if LOWMEM_QUANT_HAVE_VNNI
/// VNNI kernel (see the header). bsum[n] = Σ_{k < K/64·64} b[n][k] (int8_row_sums over the
/// vectorized part of K). a, b contiguous rows of K.
inline void int8_gemm_vnni(const std::int8_t* a, const std::int8_t* b, const std::int32_t* bsum,
                           std::size_t M, std::size_t N, std::size_t K, std::int32_t* c) noexcept {
  const std::size_t K64 = K / 64 * 64;
  const __m512i flip = _mm512_set1_epi8(char(0x80)); // a ^ 0x80 == a + 128 as unsigned
  auto tail = [&](std::size_t m, std::size_t n) {
    std::int32_t s = 0;
    for (std::size_t k = K64; k < K; ++k)
      s += std::int32_t(a[m * K + k]) * std::int32_t(b[n * K + k]);
    return s;
  };
  auto dot1 = [&](std::size_t m, std::size_t n) {
    __m512i acc = _mm512_setzero_si512();
    for (std::size_t k = 0; k < K64; k += 64)
      acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(a + m * K + k), flip),
                                _mm512_loadu_si512(b + n * K + k));
    return _mm512_reduce_add_epi32(acc) - 128 * bsum[n] + tail(m, n);
  };
  std::size_t m = 0;
  for (; m + 4 <= M; m += 4) {
    std::size_t n = 0;
    for (; n + 4 <= N; n += 4) {
      __m512i acc[4][4];
      for (auto& r : acc)
        for (auto& v : r) v = _mm512_setzero_si512();
      for (std::size_t k = 0; k < K64; k += 64) {
        __m512i av[4], bv[4];
        for (std::size_t i = 0; i < 4; ++i)
          av[i] = _mm512_xor_si512(_mm512_loadu_si512(a + (m + i) * K + k), flip);
        for (std::size_t j = 0; j < 4; ++j) bv[j] = _mm512_loadu_si512(b + (n + j) * K + k);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[i], bv[j]);
      }
      for (std::size_t i = 0; i < 4; ++i)
        for (std::size_t j = 0; j < 4; ++j)
          c[(m + i) * N + n + j] =
              _mm512_reduce_add_epi32(acc[i][j]) - 128 * bsum[n + j] + tail(m + i, n + j);
    }
    for (; n < N; ++n)
      for (std::size_t i = 0; i < 4; ++i) c[(m + i) * N + n] = dot1(m + i, n);
  }
  for (; m < M; ++m)
    for (std::size_t n = 0; n < N; ++n) c[m * N + n] = dot1(m, n);
}
#endif

} // namespace lowmem::quant::kernels
