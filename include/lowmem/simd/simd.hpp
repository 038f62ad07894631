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

/// -(a*b) - c with one rounding where the arch has FMA.
template <class Arch>
inline fbatch<Arch> fnms(const fbatch<Arch>& a, const fbatch<Arch>& b, const fbatch<Arch>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_fnmsub_ps(a, b, c));
  } else
#endif
  {
    return xsimd::fnms(a, b, c);
  }
}

/// c - a*b with one rounding where the arch has FMA (one vfnmadd; fma(-a, b, c) costs a negation
/// on top).
template <class Arch>
inline fbatch<Arch> fnma(const fbatch<Arch>& a, const fbatch<Arch>& b, const fbatch<Arch>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_fnmadd_ps(a, b, c));
  } else
#endif
  {
    return xsimd::fnma(a, b, c);
  }
}

/// a*b - c with one rounding where the arch has FMA.
template <class Arch>
inline fbatch<Arch> fms(const fbatch<Arch>& a, const fbatch<Arch>& b, const fbatch<Arch>& c) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_fmsub_ps(a, b, c));
  } else
#endif
  {
    return xsimd::fms(a, b, c);
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

/// Lanes (lo, hi) of the 64-bit products a[i] * m for uint32 lanes. Both halves come from the two
/// widening multiplies (even and odd lanes) instead of a separate 32-bit low multiply: vpmulld is
/// 2 uops / 10-cycle latency on Intel, and the low halves are already in the wide products.
template <class Arch>
inline void mul_hi_lo(const ubatch<Arch>& a, std::uint32_t m, ubatch<Arch>& hi, ubatch<Arch>& lo) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __m512i vm = _mm512_set1_epi32(static_cast<int>(m));
    const __m512i even = _mm512_mul_epu32(a, vm); // products of lanes 0,2,4,.. (64-bit)
    const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), vm); // 1,3,5,..
    // one masked in-pair swap each: hi takes the even products' high dwords into the even lanes,
    // lo takes the odd products' low dwords into the odd lanes.
    hi = ubatch<Arch>(_mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB));
    lo = ubatch<Arch>(_mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB));
    return;
  }
#endif
#if XSIMD_WITH_AVX2
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    const __m256i vm = _mm256_set1_epi32(static_cast<int>(m));
    const __m256i even = _mm256_mul_epu32(a, vm);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), vm);
    hi = ubatch<Arch>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
    lo = ubatch<Arch>(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));
    return;
  }
#endif
#if XSIMD_WITH_SSE2
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    const __m128i vm = _mm_set1_epi32(static_cast<int>(m));
    const __m128i even = _mm_mul_epu32(a, vm);
    const __m128i odd = _mm_mul_epu32(_mm_srli_epi64(a, 32), vm);
    // SSE2 has no dword blend: gather the halves with dword shuffles and unpack.
    const __m128i ev = _mm_shuffle_epi32(even, _MM_SHUFFLE(3, 1, 2, 0)); // lo0 lo2 hi0 hi2
    const __m128i od = _mm_shuffle_epi32(odd, _MM_SHUFFLE(3, 1, 2, 0));  // lo1 lo3 hi1 hi3
    lo = ubatch<Arch>(_mm_unpacklo_epi32(ev, od));
    hi = ubatch<Arch>(_mm_unpackhi_epi32(ev, od));
    return;
  }
#endif
  alignas(64) std::uint32_t in[ubatch<Arch>::size], h[ubatch<Arch>::size];
  a.store_aligned(in);
  for (std::size_t i = 0; i < ubatch<Arch>::size; ++i)
    h[i] = static_cast<std::uint32_t>((std::uint64_t(in[i]) * m) >> 32);
  hi = ubatch<Arch>::load_aligned(h);
  lo = a * ubatch<Arch>(m);
}

// ---- 64-bit-lane helpers (the Philox kernel keeps one block per 64-bit lane) ------------------

/// Per 64-bit lane: the full 64-bit product of the lane's low dword and m (vpmuludq). The lane's
/// high dword is ignored.
template <class Arch> inline ubatch<Arch> mul_wide_u32(const ubatch<Arch>& a, std::uint32_t m) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return ubatch<Arch>(_mm512_mul_epu32(a, _mm512_set1_epi32(static_cast<int>(m))));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return ubatch<Arch>(_mm256_mul_epu32(a, _mm256_set1_epi32(static_cast<int>(m))));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    return ubatch<Arch>(_mm_mul_epu32(a, _mm_set1_epi32(static_cast<int>(m))));
  } else
#endif
  {
    alignas(64) std::uint32_t v[ubatch<Arch>::size];
    a.store_aligned(v);
    for (std::size_t i = 0; i + 1 < ubatch<Arch>::size; i += 2) {
      const std::uint64_t p = std::uint64_t(v[i]) * m;
      v[i] = std::uint32_t(p);
      v[i + 1] = std::uint32_t(p >> 32);
    }
    return ubatch<Arch>::load_aligned(v);
  }
}

/// Per 64-bit lane: the high dword moved to the low dword, high dword zeroed (vpsrlq 32).
template <class Arch> inline ubatch<Arch> high_to_low_u64(const ubatch<Arch>& a) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return ubatch<Arch>(_mm512_srli_epi64(a, 32));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return ubatch<Arch>(_mm256_srli_epi64(a, 32));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    return ubatch<Arch>(_mm_srli_epi64(a, 32));
  } else
#endif
  {
    alignas(64) std::uint32_t v[ubatch<Arch>::size];
    a.store_aligned(v);
    for (std::size_t i = 0; i + 1 < ubatch<Arch>::size; i += 2) v[i] = v[i + 1], v[i + 1] = 0;
    return ubatch<Arch>::load_aligned(v);
  }
}

/// Per 64-bit lane: the high dword copied to the low dword; the high dword keeps its value (for
/// callers that treat it as scratch, like the Philox kernel). vpshufd 0xF5 instead of vpsrlq:
/// the same low dwords, but on Intel cores 512-bit shifts issue only on port 0 and vpshufd only on
/// port 5; vpmuludq takes either on the Sapphire Rapids-class core measured (2 per cycle), so the
/// shuffles keep port 0 free for multiplies and FMAs (see kernels/random.hpp).
template <class Arch> inline ubatch<Arch> high_to_low_u64_dirty(const ubatch<Arch>& a) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return ubatch<Arch>(_mm512_shuffle_epi32(a, _MM_PERM_DDBB));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return ubatch<Arch>(_mm256_shuffle_epi32(a, 0xF5));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    return ubatch<Arch>(_mm_shuffle_epi32(a, 0xF5));
  } else
#endif
  {
    return high_to_low_u64<Arch>(a);
  }
}

/// The low (High = false) or high dwords of the 64-bit lanes of a and b, interleaved per 128-bit
/// lane: [a0, a2, b0, b2 | a4, a6, b4, b6 | ...] (dword indices; shufps 0x88), or
/// [a1, a3, b1, b3 | ...] (shufps 0xDD).
template <class Arch, bool High = false>
inline ubatch<Arch> pack_u64(const ubatch<Arch>& a, const ubatch<Arch>& b) {
  constexpr int imm = High ? 0xDD : 0x88;
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return ubatch<Arch>(_mm512_castps_si512(
        _mm512_shuffle_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), imm)));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return ubatch<Arch>(_mm256_castps_si256(
        _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), imm)));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    return ubatch<Arch>(
        _mm_castps_si128(_mm_shuffle_ps(_mm_castsi128_ps(a), _mm_castsi128_ps(b), imm)));
  } else
#endif
  {
    constexpr std::size_t n = ubatch<Arch>::size, o = High ? 1 : 0;
    alignas(64) std::uint32_t va[n], vb[n], r[n];
    a.store_aligned(va);
    b.store_aligned(vb);
    for (std::size_t i = 0; i < n; i += 4) {
      r[i] = va[i + o], r[i + 1] = va[i + 2 + o], r[i + 2] = vb[i + o], r[i + 3] = vb[i + 2 + o];
    }
    return ubatch<Arch>::load_aligned(r);
  }
}

/// Per uint32 lane: (a & 0xFF) << 24 | (b & 0xFF) << 16 | (c & 0xFF) << 8 (the Box–Muller angle
/// word made of three words' low bytes, core/random.hpp). AVX-512VBMI: one two-source byte
/// permute (zero-masked) and one merge-masked vpshufb; AVX-512BW: three masked vpshufb. Both
/// replace 3 shifts (port 0 only on Intel) + 2 masks + 1 merge: 6 uops -> 2 (3). Elsewhere shifts
/// and masks.
template <class Arch>
inline ubatch<Arch> low_bytes_to_top24(const ubatch<Arch>& a, const ubatch<Arch>& b,
                                       const ubatch<Arch>& c) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512bw, Arch>::value) {
    // byte k of each dword (mask bit 4 j + k): 3 <- a's byte 0, 2 <- b's, 1 <- c's, 0 <- zero
    constexpr __mmask64 m3 = 0x8888888888888888ull, m2 = 0x4444444444444444ull,
                        m1 = 0x2222222222222222ull;
#if defined(__AVX512VBMI__)
    // vpermt2b, index bit 6 selecting b: byte 4 j + 3 <- a[4 j], byte 4 j + 2 <- b[4 j]
    alignas(64) static constexpr std::uint32_t idx[16] = {
        0x00400000, 0x04440000, 0x08480000, 0x0C4C0000, 0x10500000, 0x14540000,
        0x18580000, 0x1C5C0000, 0x20600000, 0x24640000, 0x28680000, 0x2C6C0000,
        0x30700000, 0x34740000, 0x38780000, 0x3C7C0000};
    const __m512i ab = _mm512_maskz_permutex2var_epi8(m3 | m2, a, _mm512_load_si512(idx), b);
#else
    // vpshufb indices are per 128-bit lane: byte 4 j + k <- byte 4 j (j < 4), the same in each
    const __m512i ia =
        _mm512_broadcast_i32x4(_mm_set_epi32(0x0C000000, 0x08000000, 0x04000000, 0x00000000));
    const __m512i ib =
        _mm512_broadcast_i32x4(_mm_set_epi32(0x000C0000, 0x00080000, 0x00040000, 0x00000000));
    const __m512i ab = _mm512_mask_shuffle_epi8(_mm512_maskz_shuffle_epi8(m3, a, ia), m2, b, ib);
#endif
    const __m512i ic =
        _mm512_broadcast_i32x4(_mm_set_epi32(0x00000C00, 0x00000800, 0x00000400, 0x00000000));
    return ubatch<Arch>(_mm512_mask_shuffle_epi8(ab, m1, c, ic));
  } else
#endif
  {
    using U = ubatch<Arch>;
    const U bc = ((b << 16) & U(0xFFFF0000u)) | ((c << 8) & U(0x0000FFFFu)); // vpternlogd
    return (a << 24) | (bc & U(0x00FFFFFFu));
  }
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

/// Lanes where bit `Bit` of v is set take a, the others b (vptestmd + blend on AVX-512, blendv on
/// the sign bit on SSE4.1/AVX, and/andnot on SSE2).
template <class Arch, int Bit>
inline fbatch<Arch> select_by_bit(const ubatch<Arch>& v, const fbatch<Arch>& a,
                                  const fbatch<Arch>& b) {
  static_assert(Bit >= 0 && Bit < 32, "bit index");
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const __mmask16 m = _mm512_test_epi32_mask(v, _mm512_set1_epi32(int(1u << Bit)));
    return fbatch<Arch>(_mm512_mask_blend_ps(m, b, a));
  } else
#endif
#if XSIMD_WITH_AVX
      if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
    const ubatch<Arch> top = v << (31 - Bit);
    return fbatch<Arch>(_mm256_blendv_ps(b, a, _mm256_castsi256_ps(top)));
  } else
#endif
#if XSIMD_WITH_SSE4_1
      if constexpr (std::is_base_of<xsimd::sse4_1, Arch>::value) {
    const ubatch<Arch> top = v << (31 - Bit);
    return fbatch<Arch>(_mm_blendv_ps(b, a, _mm_castsi128_ps(top)));
  } else
#endif
  {
    const ubatch<Arch> m =
        xsimd::bitwise_cast<ubatch<Arch>>(xsimd::bitwise_cast<ibatch<Arch>>(v << (31 - Bit)) >> 31);
    return as_float<Arch>((as_uint<Arch>(a) & m) | (as_uint<Arch>(b) & ~m));
  }
}

/// Lanes where v & mask has any bit set take a, the others b (per-lane masks: one bit per lane
/// expands a packed bit field). AVX-512: vptestmd + blend, because xsimd 8.1's 32-bit integer
/// `==` does not compile on avx512bw; elsewhere and + compare + select (in the integer domain).
template <class Arch>
inline fbatch<Arch> select_by_mask(const ubatch<Arch>& v, const ubatch<Arch>& mask,
                                   const fbatch<Arch>& a, const fbatch<Arch>& b) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_mask_blend_ps(_mm512_test_epi32_mask(v, mask), b, a));
  } else
#endif
  {
    return as_float<Arch>(
        xsimd::select((v & mask) == ubatch<Arch>(0u), as_uint<Arch>(b), as_uint<Arch>(a)));
  }
}

// ---- fast vector math (float; for kernels that need a few ulp, not xsimd's generic paths) -------

namespace detail {
template <class Arch> inline fbatch<Arch> horner(const fbatch<Arch>& x, float c0) {
  (void)x;
  return fbatch<Arch>(c0);
}
/// c0 + x (c1 + x (c2 + ...)) with FMAs.
template <class Arch, class... C>
inline fbatch<Arch> horner(const fbatch<Arch>& x, float c0, float c1, C... rest) {
  return fma<Arch>(horner<Arch>(x, c1, rest...), x, fbatch<Arch>(c0));
}
} // namespace detail

/// Approximate 1/sqrt(x) for positive normal x: rsqrt14 on AVX-512 (rel. error <= 2^-14),
/// rsqrtps elsewhere (<= 1.5 * 2^-12). Refine with a Newton step (see sqrt_fast).
template <class Arch> inline fbatch<Arch> rsqrt_approx(const fbatch<Arch>& x) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return fbatch<Arch>(_mm512_rsqrt14_ps(x));
  } else
#endif
#if XSIMD_WITH_AVX
      if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
    return fbatch<Arch>(_mm256_rsqrt_ps(x));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    return fbatch<Arch>(_mm_rsqrt_ps(x));
  } else
#endif
  {
    return fbatch<Arch>(1.0f) / xsimd::sqrt(x);
  }
}

/// K * sqrt(x) with K = 1 or 2 (`twice`), for finite x >= 0 (0 gives 0): approximate reciprocal
/// square root plus one Newton step. Relative error ~1e-8 on AVX-512, <= 3e-7 on SSE/AVX (a few
/// ulp); 3 multiplies/FMAs instead of vsqrtps (~10-20 cycles per 512-bit vector on current cores).
/// `twice` saves the multiply by 1/2 of the Newton step, for callers that fold the 1/2 elsewhere.
template <class Arch, bool twice = false> inline fbatch<Arch> sqrt_fast(const fbatch<Arch>& x) {
  using F = fbatch<Arch>;
  // max() keeps rsqrt finite at x = 0, so s0 = x * y = 0 and the result is exactly 0.
  const F y = rsqrt_approx<Arch>(xsimd::max(x, F(1.17549435e-38f)));
  const F s0 = x * y;                     // sqrt(x) (1 + e0)
  const F e = fnma<Arch>(s0, y, F(3.0f)); // 3 - x y^2 = 2 - 2 e0 + O(e0^2)
  if constexpr (twice) {
    return s0 * e; // 2 sqrt(x) (1 + O(e0^2))
  } else {
    return (s0 * F(0.5f)) * e;
  }
}

/// ln(x * 2^-pow2) (or its negative, `negate`) for positive normal finite x (no checks: 0,
/// negatives, denormals, inf and NaN give garbage). x = 2^k (1 + f) with 1 + f in
/// [sqrt(1/2), sqrt(2)) by integer exponent arithmetic (pow2 folds into k exactly, so ln(u) of a
/// scaled integer u keeps its full relative accuracy near u = 1); ln(1 + f) = f + f^2 Q(f) with a
/// degree-6 minimax Q (rel. error 1.8e-7). Total: ~2.4e-7 relative (measured over all x = 1..2^24).
template <class Arch, bool negate = false>
inline fbatch<Arch> log_fast(const fbatch<Arch>& x, int pow2 = 0) {
  using F = fbatch<Arch>;
  using I = ibatch<Arch>;
  constexpr std::int32_t sqrt_half = 0x3F3504F3; // bits of sqrt(1/2)
  const I ix = xsimd::bitwise_cast<I>(x) - I(sqrt_half + pow2 * (1 << 23));
  const I k = ix >> 23; // arithmetic: the exponent of x relative to sqrt(1/2), minus pow2
  const F m = xsimd::bitwise_cast<F>((ix & I(0x007FFFFF)) + I(sqrt_half));
  const F f = m - F(1.0f); // exact
  const F kf = xsimd::batch_cast<float>(k);
  // Estrin's scheme: the same FMA count as Horner plus one multiply, half the dependency chain
  const F f2 = f * f, f4 = f2 * f2;
  const F q01 = fma<Arch>(F(3.333471445e-01f), f, F(-5.000032355e-01f));
  const F q23 = fma<Arch>(F(1.990690182e-01f), f, F(-2.497122178e-01f));
  const F q45 = fma<Arch>(F(1.618035209e-01f), f, F(-1.724333243e-01f));
  const F q46 = fma<Arch>(F(-1.008181563e-01f), f2, q45);
  const F q = fma<Arch>(q46, f4, fma<Arch>(q23, f2, q01));
  const F l1p = fma<Arch>(f2, q, f); // ln(1 + f)
  const F ln2(0.693147180559945309f);
  if constexpr (negate) {
    return fnms<Arch>(kf, ln2, l1p); // -(k ln2) - ln(1 + f)
  } else {
    return fma<Arch>(kf, ln2, l1p);
  }
}

/// scale * sin(2 pi t) and scale * cos(2 pi t) for t = floor(turns / 2^(32 - Bits)) / 2^Bits:
/// uint32 fixed-point turns truncated to their top Bits <= 24 bits (the Box-Muller angle of a
/// random word uses 24). The reduction is exact: t - q/4 for the nearest quarter turn q comes from
/// the sign-extended low 30 bits, and becomes a float exactly by exponent-bias arithmetic (no
/// convert or multiply); sin and cos on [-1/8, 1/8] turn are minimax polynomials in t (abs. error
/// 1.2e-9 and 2.8e-8), then rotated by q quarter turns with a swap and two sign flips. Absolute
/// error ~1e-7 * scale (measured over all 2^24 inputs).
template <class Arch, int Bits = 24>
inline void sincos_turns(const ubatch<Arch>& turns, fbatch<Arch>& s, fbatch<Arch>& c,
                         float scale = 1.0f) {
  static_assert(Bits >= 3 && Bits <= 24, "the exact float conversion needs |t| 2^Bits < 2^22");
  using F = fbatch<Arch>;
  using U = ubatch<Arch>;
  using I = ibatch<Arch>;
  // turns - 2^30 q (sign-extended low 30 bits), in units of 2^-Bits turns: |r| <= 2^(Bits - 3)
  const I r = xsimd::bitwise_cast<I>(turns << 2) >> (34 - Bits);
  // t = r 2^-Bits exactly: r added to the mantissa of 1.5 * 2^(-1) ... with ulp 2^-Bits
  const float bias = 0.75f; // 1.5 * 2^-1: ulp 2^-24; for Bits < 24 the shift below rescales r
  const F t = xsimd::bitwise_cast<F>((r << (24 - Bits)) + I(0x3F400000)) - F(bias);
  const F t2 = t * t, t4 = t2 * t2; // Estrin: short dependency chains
  const F sn =
      t * fma<Arch>(fma<Arch>(F(-7.524006316e+01f * scale), t2, F(8.158812461e+01f * scale)), t4,
                    fma<Arch>(F(-4.134162804e+01f * scale), t2, F(6.283185220e+00f * scale)));
  const F cs =
      fma<Arch>(fma<Arch>(F(-8.359260962e+01f * scale), t2, F(6.492125284e+01f * scale)), t4,
                fma<Arch>(F(-1.973915223e+01f * scale), t2, F(9.999999724e-01f * scale)));
  // v >> 30 = q mod 4 (the nearest quarter turn; wrap-around is harmless, 4 = 0 mod 4)
  const U v = turns + U(1u << 29);
  const F s1 = select_by_bit<Arch, 30>(v, cs, sn); // odd q: sin and cos swap
  const F c1 = select_by_bit<Arch, 30>(v, sn, cs);
  // sin(q pi/2 + a) is negated for q in {2, 3}, cos for q in {1, 2}: bit 1 of q and of q + 1
  s = as_float<Arch>(as_uint<Arch>(s1) ^ (v & U(0x80000000u)));
  c = as_float<Arch>(as_uint<Arch>(c1) ^ ((v + U(1u << 30)) & U(0x80000000u)));
}

/// scale * sin(pi/2 t) and scale * cos(pi/2 t) for |t| <= 1/2 (a quarter turn centred on 0):
/// the minimax polynomials of sincos_turns (|2 pi t'| <= pi/4, t' = t/4 turns) with the argument
/// scaling 4^-k folded exactly into the coefficient of t^k. Absolute error ~3e-8 * scale.
template <class Arch>
inline void sincos_quarter(const fbatch<Arch>& t, fbatch<Arch>& s, fbatch<Arch>& c,
                           float scale = 1.0f) {
  using F = fbatch<Arch>;
  const F t2 = t * t, t4 = t2 * t2; // Estrin
  s = t * fma<Arch>(fma<Arch>(F(-7.524006316e+01f * 0x1p-14f * scale), t2,
                              F(8.158812461e+01f * 0x1p-10f * scale)),
                    t4,
                    fma<Arch>(F(-4.134162804e+01f * 0x1p-6f * scale), t2,
                              F(6.283185220e+00f * 0x1p-2f * scale)));
  c = fma<Arch>(
      fma<Arch>(F(-8.359260962e+01f * 0x1p-12f * scale), t2, F(6.492125284e+01f * 0x1p-8f * scale)),
      t4, fma<Arch>(F(-1.973915223e+01f * 0x1p-4f * scale), t2, F(9.999999724e-01f * scale)));
}

// ---- 16-bit payloads (bf16) ------------------------------------------------------------------

/// Stores the low 16 bits of each uint32 lane (values must be < 2^16) as W uint16 to p.
template <class Arch> inline void store_low_u16(std::uint16_t* p, const ubatch<Arch>& v) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
    return;
  }
#endif
#if XSIMD_WITH_AVX2
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    // sign-extend the 16-bit payload so the signed saturating pack keeps it exactly
    const __m256i t = _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(t, t), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    return;
  }
#endif
#if XSIMD_WITH_SSE2
  if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    const __m128i t = _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(t, t));
    return;
  }
#endif
  alignas(64) std::uint32_t lanes[ubatch<Arch>::size];
  v.store_aligned(lanes);
  for (std::size_t i = 0; i < ubatch<Arch>::size; ++i) p[i] = std::uint16_t(lanes[i]);
}

/// Stores the low 16 bits of the uint32 lanes of a then b (values < 2^16) as 2 W uint16 to p:
/// one two-source word permute (AVX-512BW) or unsigned pack (AVX2) per 2 W values.
template <class Arch>
inline void store_low_u16(std::uint16_t* p, const ubatch<Arch>& a, const ubatch<Arch>& b) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512bw, Arch>::value) {
    const __m512i idx =
        _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                         24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi16(a, idx, b));
    return;
  }
#endif
#if XSIMD_WITH_AVX2
  if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    return;
  }
#endif
  store_low_u16<Arch>(p, a);
  store_low_u16<Arch>(p + ubatch<Arch>::size, b);
}

/// Loads W uint16 from p into the high halves of uint32 lanes (lane i = p[i] << 16).
template <class Arch> inline ubatch<Arch> load_u16_high(const std::uint16_t* p) {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    return ubatch<Arch>(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  } else
#endif
#if XSIMD_WITH_AVX2
      if constexpr (std::is_base_of<xsimd::avx2, Arch>::value) {
    return ubatch<Arch>(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return ubatch<Arch>(_mm_unpacklo_epi16(_mm_setzero_si128(), x));
  } else
#endif
  {
    alignas(64) std::uint32_t lanes[ubatch<Arch>::size];
    for (std::size_t i = 0; i < ubatch<Arch>::size; ++i) lanes[i] = std::uint32_t(p[i]) << 16;
    return ubatch<Arch>::load_aligned(lanes);
  }
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

// ---- streaming (non-temporal) stores -----------------------------------------------------------
// A plain store of a line that is not in cache first reads it (read for ownership): a kernel that
// writes 4 B of fp32 per value from 0.5-1 B of codes moves ~8.5 B/value through DRAM instead of
// ~4.5. Non-temporal stores write whole lines straight to memory without that read, but they also
// evict the line: only worth it for outputs far larger than L2 that the caller will not re-read
// from cache right away. Kernels write pieces into an L1-resident buffer (stream_writer).

/// Output size from which kernels use streaming stores: 4x the 2 MiB L2 of the reference
/// machine (chosen, not tuned: below it the output may still be cache-resident for the caller;
/// the 256K-float bench cases, 1 MiB of fp32, keep plain stores). At 100M floats, 1 thread,
/// int8 / NF4 dequantize went from ~58 / ~68 ms to ~36 / ~34 ms with streaming stores.
inline constexpr std::size_t stream_min_bytes = std::size_t(8) << 20;

/// Non-temporal store of v to p, which must be aligned to sizeof(v) bytes (movntps); a plain
/// aligned store on archs without one.
template <class Arch> inline void store_stream(float* p, const fbatch<Arch>& v) noexcept {
#if XSIMD_WITH_AVX512F
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    _mm512_stream_ps(p, v);
    return;
  } else
#endif
#if XSIMD_WITH_AVX
      if constexpr (std::is_base_of<xsimd::avx, Arch>::value) {
    _mm256_stream_ps(p, v);
    return;
  } else
#endif
#if XSIMD_WITH_SSE2
      if constexpr (std::is_base_of<xsimd::sse2, Arch>::value) {
    _mm_stream_ps(p, v);
    return;
  } else
#endif
  {
    v.store_aligned(p);
  }
}

/// Makes earlier streaming stores globally visible before later stores (sfence). Call once after
/// a streaming loop, before the data is handed to anyone (another thread, the caller).
inline void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/// Writes an output array of T through an L1-resident buffer with streaming stores, for kernels
/// that produce it in pieces (a block, a group of blocks): `T* p = w.next(m)` gives room for the
/// next m <= max_piece elements, the kernel writes them to p[0, m), `w.advance(m)` records them;
/// `w.finish()` writes the rest and fences. Every store to the output is a streaming store of a
/// whole aligned 64-byte line (the buffer keeps the partial last line for the next piece), except
/// the first and last partial lines (plain copies). That matters: a plain store that misses cache
/// between streaming stores waits for its line's read from DRAM and holds up the store queue
/// behind it; one such line per 1 KiB piece cost ~40% (100M-float dequantize, 1 thread: 35 ms with
/// line-aligned streaming, ~50 ms with a partial line per piece). The output must be aligned to
/// sizeof(T). No allocation (the buffer is a member: keep the writer on the stack).
template <class Arch, class T, std::size_t Bytes = 1024> class stream_writer {
  static_assert(Bytes % 64 == 0, "whole lines");
  static constexpr std::size_t line = 64 / sizeof(T); // elements per 64-byte line
  static constexpr std::size_t cap = Bytes / sizeof(T);

public:
  static constexpr std::size_t max_piece = cap; ///< largest m for next(m)

  explicit stream_writer(T* out) noexcept
      : skip_(reinterpret_cast<std::uintptr_t>(out) % 64 / sizeof(T)), fill_(skip_),
        dst_(out - skip_) {}
  stream_writer(const stream_writer&) = delete;
  stream_writer& operator=(const stream_writer&) = delete;

  /// Room for the next m <= max_piece elements.
  T* next(std::size_t m) noexcept {
    if (fill_ + m > cap + line) flush(false);
    return buf_ + fill_;
  }
  void advance(std::size_t m) noexcept { fill_ += m; }
  /// Writes everything still buffered and fences (stream_fence). Call once, at the end.
  void finish() noexcept {
    flush(true);
    stream_fence();
  }

private:
  alignas(64) T buf_[cap + line];
  std::size_t skip_; // leading elements of buf_'s first line that precede the output (first line)
  std::size_t fill_; // buf_[0, fill_) maps to dst_[0, fill_)
  T* dst_;           // 64-byte aligned (but may precede the output by skip_ elements)

  void flush(bool last) noexcept {
    using F = fbatch<Arch>;
    constexpr std::size_t vbytes = sizeof(F);
    const std::size_t whole = fill_ / line * line;
    std::size_t i = 0;
    if (skip_ != 0 && whole != 0) { // the output's first line: plain copy of its part
      std::memcpy(dst_ + skip_, buf_ + skip_, (line - skip_) * sizeof(T));
      i = line;
      skip_ = 0;
    }
    char* d = reinterpret_cast<char*>(dst_);
    const char* s = reinterpret_cast<const char*>(buf_);
    for (std::size_t b = i * sizeof(T); b < whole * sizeof(T); b += vbytes)
      store_stream<Arch>(reinterpret_cast<float*>(d + b),
                         F::load_aligned(reinterpret_cast<const float*>(s + b)));
    if (last) { // the partial last line (or the only, partial, line: from skip_)
      const std::size_t from = whole != 0 ? whole : skip_;
      std::memcpy(dst_ + from, buf_ + from, (fill_ - from) * sizeof(T));
      return;
    }
    if (whole == 0) return;
    std::memcpy(buf_, buf_ + whole, (fill_ - whole) * sizeof(T)); // carry the partial line
    dst_ += whole;
    fill_ -= whole;
  }
};

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

/// Software prefetch of the cache line holding p (a hint: never faults, changes no result).
/// Locality as __builtin_prefetch's: 3 -> prefetcht0 (all levels, into L1), 2 -> prefetcht1
/// (L2), 1 -> prefetcht2, 0 -> prefetchnta. On x86 with a GCC-compatible compiler the
/// instruction is inline assembly (`asm volatile`), which the optimizer may not delete: GCC 12.2
/// at -O2 -march=native drops __builtin_prefetch / _mm_prefetch from the fused int8 GEMV
/// (objdump of int8_gemv_rows<true>: 0 prefetches with the builtin, 20 with this; -O3 keeps
/// both), although it keeps them in a plain loop. Elsewhere __builtin_prefetch / _mm_prefetch.
template <int Locality = 3> inline void prefetch(const void* p) noexcept {
  static_assert(Locality >= 0 && Locality <= 3, "prefetch locality is 0..3");
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  const char& c = *static_cast<const char*>(p); // only the address is used: nothing is read
  if constexpr (Locality == 3)
    asm volatile("prefetcht0 %0" : : "m"(c));
  else if constexpr (Locality == 2)
    asm volatile("prefetcht1 %0" : : "m"(c));
  else if constexpr (Locality == 1)
    asm volatile("prefetcht2 %0" : : "m"(c));
  else
    asm volatile("prefetchnta %0" : : "m"(c));
#elif defined(__GNUC__)
  __builtin_prefetch(p, 0, Locality);
#elif defined(__SSE2__)
  _mm_prefetch(static_cast<const char*>(p), Locality == 3   ? _MM_HINT_T0
                                            : Locality == 2 ? _MM_HINT_T1
                                            : Locality == 1 ? _MM_HINT_T2
                                                            : _MM_HINT_NTA);
#else
  (void)p;
#endif
}

/// prefetch<Locality> of every 64-byte cache line of [p, p + bytes).
template <int Locality = 3> inline void prefetch_range(const void* p, std::size_t bytes) noexcept {
  const char* c = static_cast<const char*>(p);
  for (std::size_t o = 0; o < bytes; o += 64) prefetch<Locality>(c + o);
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
