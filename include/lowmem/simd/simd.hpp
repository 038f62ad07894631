// lowmem/simd/simd.hpp — the one place that knows xsimd 8.1's quirks.
//
// Kernels are templated on an xsimd architecture tag `Arch` and use only what is here plus the
// plain xsimd batch API (load/store, + - * /, min/max, select, comparisons). Public entries call
// kernels with `default_arch` (the consumer's compile flags choose the instruction set: lowmem
// never adds -m flags); tests instantiate every compiled arch (see `test_archs`).
//
// xsimd 8.1 (Debian) pitfalls handled here:
//  * horizontal sum is `xsimd::hadd` (renamed `reduce_add` in 9.0): use `simd::reduce_add`;
//  * AVX-512F has no native fma in 8.1 (it falls back to mul+add, and whether that contracts
//    depends on -ffp-contract): `simd::fma` emits vfmadd on AVX-512 explicitly;
//  * float `hadd` on AVX-512 needs AVX512DQ (the avx512bw tag inherits dq; -march=x86-64-v4 has
//    it, -mavx512f alone does not);
//  * `supported_architectures` lists compiled archs best first; `available_architectures()` checks
//    CPUID only (not OS support for the register state), which is fine on Linux.
//  * no 32x32->64 high multiply for uint32 batches: `simd::mul_hi_lo` provides it (Philox).
#pragma once

#include <xsimd/xsimd.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace lowmem::simd {

using default_arch = xsimd::default_arch;
template <class T, class Arch = default_arch> using batch = xsimd::batch<T, Arch>;
template <class Arch> using fbatch = xsimd::batch<float, Arch>;
template <class Arch> using ubatch = xsimd::batch<std::uint32_t, Arch>;
template <class Arch> using ibatch = xsimd::batch<std::int32_t, Arch>;

/// Number of floats in one register of Arch.
template <class Arch> inline constexpr std::size_t width = xsimd::batch<float, Arch>::size;

// ---- arithmetic --------------------------------------------------------------------------------

/// a*b + c with one rounding where the arch has FMA (explicit on AVX-512, see above).
template <class Arch>
inline fbatch<Arch> fma(const fbatch<Arch>& a, const fbatch<Arch>& b, const fbatch<Arch>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_fmadd_ps(a, b, c));
  } else
#endif
  {
    return xsimd::fma(a, b, c);
  }
}

/// Horizontal sum of the lanes (xsimd 8.1 `hadd`).
template <class T, class Arch> inline T reduce_add(const xsimd::batch<T, Arch>& v) {
  return xsimd::hadd(v);
}

/// Horizontal max of the lanes.
template <class Arch> inline float reduce_max(const fbatch<Arch>& v) {
  alignas(64) float lanes[width<Arch>];
  v.store_aligned(lanes);
  float m = lanes[0];
  for (std::size_t i = 1; i < width<Arch>; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}

/// e^x, xsimd's vectorized exp (max rel. error ~1 ulp in float over the normal range).
template <class Arch> inline fbatch<Arch> exp(const fbatch<Arch>& x) { return xsimd::exp(x); }
template <class Arch> inline fbatch<Arch> log(const fbatch<Arch>& x) { return xsimd::log(x); }
template <class Arch> inline fbatch<Arch> tanh(const fbatch<Arch>& x) { return xsimd::tanh(x); }

/// Lanes (lo, hi) of the 64-bit products a[i] * m for uint32 lanes: the Philox round primitive.
template <class Arch>
inline void mul_hi_lo(const ubatch<Arch>& a, std::uint32_t m, ubatch<Arch>& hi, ubatch<Arch>& lo) {
  lo = a * ubatch<Arch>(m);
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i even = _mm512_mul_epu32(a, vm);                       // lanes 0,2,4,.. (64-bit)
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), vm); // lanes 1,3,5,..
    // high halves: even products' high dword to even lanes, odd products' high dword stays odd.
    hi = ubatch<Arch>(_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd));
    return;
  }
#endif
#if XSIMD_WITH_AVX2
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    const __m256i vm = _mm256_set1_epi32(static_cast<int>(m));
    const __m256i even = _mm256_mul_epu32(a, vm);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), vm);
    hi = ubatch<Arch>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
    return;
  }
#endif
#if XSIMD_WITH_SSE2
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    const __m128i vm = _mm_set1_epi32(static_cast<int>(m));
    const __m128i even = _mm_mul_epu32(a, vm);
    const __m128i odd = _mm_mul_epu32(_mm_srli_epi64(a, 32), vm);
    // SSE2 has no dword blend: mask and or.
    const __m128i odd_mask = _mm_set_epi32(-1, 0, -1, 0);
    hi = ubatch<Arch>(_mm_or_si128(_mm_andnot_si128(odd_mask, _mm_srli_epi64(even, 32)),
                                   _mm_and_si128(odd_mask, odd)));
    return;
  }
#endif
  alignas(64) std::uint32_t in[ubatch<Arch>::size], h[ubatch<Arch>::size];
  a.store_aligned(in);
  for (std::size_t i = 0; i < ubatch<Arch>::size; ++i)
    h[i] = static_cast<std::uint32_t>((std::uint64_t(in[i]) * m) >> 32);
  hi = ubatch<Arch>::load_aligned(h);
}

/// Reinterprets the bits of a uint32 batch as floats and back (xsimd 8.1 wants the batch type,
/// not the scalar type, as bitwise_cast's template argument).
template <class Arch> inline fbatch<Arch> as_float(const ubatch<Arch>& v) {
  return xsimd::bitwise_cast<fbatch<Arch>>(v);
}
template <class Arch> inline ubatch<Arch> as_uint(const fbatch<Arch>& v) {
  return xsimd::bitwise_cast<ubatch<Arch>>(v);
}

/// uint32 lanes < 2^24 to float, exactly (via int32: xsimd 8.1 has no uint32 -> float cast).
template <class Arch> inline fbatch<Arch> small_uint_to_float(const ubatch<Arch>& v) {
  return xsimd::batch_cast<float>(xsimd::bitwise_cast<ibatch<Arch>>(v));
}

// ---- tails -------------------------------------------------------------------------------------

/// Loads n < width lanes from p, zero-filling the rest (reads only p[0..n)).
template <class Arch, class T>
inline xsimd::batch<T, Arch> load_partial(const T* p, std::size_t n) {
  alignas(64) T tmp[xsimd::batch<T, Arch>::size] = {};
  std::memcpy(tmp, p, n * sizeof(T));
  return xsimd::batch<T, Arch>::load_aligned(tmp);
}

/// Stores the first n < width lanes of v to p (writes only p[0..n)).
template <class Arch, class T>
inline void store_partial(T* p, const xsimd::batch<T, Arch>& v, std::size_t n) {
  alignas(64) T tmp[xsimd::batch<T, Arch>::size];
  v.store_aligned(tmp);
  std::memcpy(p, tmp, n * sizeof(T));
}

// ---- architectures -----------------------------------------------------------------------------

/// True when this CPU can run code compiled for Arch (CPUID).
template <class Arch> inline bool cpu_supports() noexcept {
  const auto av = xsimd::available_architectures();
  if constexpr (std::is_same<Arch, xsimd::generic>::value) return true;
#if XSIMD_WITH_AVX512BW
  else if constexpr (std::is_same<Arch, xsimd::avx512bw>::value)
    return av.avx512bw && av.avx512dq;
#endif
#if XSIMD_WITH_FMA3_AVX2
  else if constexpr (std::is_same<Arch, xsimd::fma3<xsimd::avx2>>::value)
    return av.fma3_avx2;
#endif
#if XSIMD_WITH_AVX2
  else if constexpr (std::is_same<Arch, xsimd::avx2>::value)
    return av.avx2;
#endif
#if XSIMD_WITH_SSE2
  else if constexpr (std::is_same<Arch, xsimd::sse2>::value)
    return av.sse2;
#endif
  else
    return Arch::available();
}

/// Human-readable name of an arch tag ("sse2", "fma3<avx2>", "avx512bw").
template <class Arch> inline const char* arch_name() noexcept { return Arch::name(); }

namespace detail {
template <class... Ts> struct type_list {};
template <class L, class T> struct push_front;
template <class... Ts, class T> struct push_front<std::tuple<Ts...>, T> {
  using type = std::tuple<T, Ts...>;
};
} // namespace detail

/// The archs every kernel test runs on, as a std::tuple of tags (Catch2 TEMPLATE_LIST_TEST_CASE):
/// sse2, fma3<avx2> and avx512bw where compiled in (with -march=native on an AVX-512 machine,
/// all three). Tests skip the ones the CPU lacks via cpu_supports<Arch>().
using test_archs = std::tuple<
#if XSIMD_WITH_AVX512BW
    xsimd::avx512bw,
#endif
#if XSIMD_WITH_FMA3_AVX2
    xsimd::fma3<xsimd::avx2>,
#endif
#if XSIMD_WITH_SSE2
    xsimd::sse2
#else
    default_arch
#endif
    >;

} // namespace lowmem::simd
