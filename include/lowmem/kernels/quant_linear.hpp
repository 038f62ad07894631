// lowmem/kernels/quant_linear.hpp — inner loops of the quantized linear layer (quant/linear.hpp):
// dequantize one row segment of a quantized weight, and the fused batch-1 dot products.
//
// Fused GEMV (AVX-512 only; other archs dequantize a row into L1 and take a dot product):
//  * int8: bytes widened to int32 lanes (vpmovsxbd / vpmovzxbd), converted, fma with x; one fma
//    per block applies its scale; 4 rows per pass share the x loads, and each row stream is
//    software-prefetched 2 KiB ahead, into the next pass's rows (int8_gemv_pass);
//  * 4-bit (int4, NF4, FP4): the 16 levels sit in one zmm register and vpermps looks codes up
//    (it reads only the low 4 bits of each index lane: a right shift selects the nibble, no mask).
//    When the block is a multiple of 64 (nib_gemv_pass), each 64-byte load of a row (128 codes)
//    gives 8 index vectors by 7 immediate shifts (the first is the load itself); the products of
//    a chunk are summed, then scaled lane-wise by its two blocks' scales (one fma), so per 128
//    weights the loop issues 7 shifts, 8 vpermps, 8 fmas, one blend and one fma; the index
//    vectors hold elements in a fixed interleaved order, and x is permuted once per call to
//    match (x_split). The next pass's rows are prefetched (hardware prefetchers stop at 4 KiB
//    pages).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "../simd/simd.hpp"
#include "quant.hpp"
#include "quant_int8gemm.hpp"

namespace lowmem::quant::kernels {

/// What a quantized weight's codes mean (mirrors quant::weight_format).
struct qw_desc {
  int kind;            // 0 int8, 1 4-bit
  bool is_signed;      // int8 stored two's complement (symmetric int8)
  const float* levels; // 4-bit levels (int4: 0..15, NF4, FP4)
  const pair_lut* pairs;
  float sym_zero; // implicit zero for symmetric formats (int4: 8), else 0
  bool has_zeros; // asymmetric: per-block zero points
};

/// Dequantizes W[row, k0 : k0 + len) into out, where row has `cols` elements, `block` divides cols
/// and k0; scales/zeros are per block of the flat tensor.
template <class Arch>
inline void dequant_segment(const qw_desc& d, const std::uint8_t* codes, const float* scales,
                            const float* zeros, std::size_t cols, std::size_t block,
                            std::size_t row, std::size_t k0, std::size_t len, float* out) {
  const std::size_t base = row * cols + k0;
  for (std::size_t c = 0; c < len; c += block) {
    const std::size_t b = (base + c) / block;
    const std::size_t m = len - c < block ? len - c : block;
    const float s = scales[b];
    const float z = d.has_zeros ? zeros[b] : d.sym_zero;
    if (d.kind == 0)
      affine_dequant8<Arch>(codes + base + c, m, d.is_signed, s, z, out + c);
    else
      codebook_dequant<Arch>(codes, base + c, m, d.levels, *d.pairs, s, 0.0f - z * s, out + c);
  }
}

/// Dot product of n floats (vectorized, float accumulation in W·2 lanes).
template <class Arch> inline float dot(const float* a, const float* b, std::size_t n) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  F acc0(0.0f), acc1(0.0f);
  std::size_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = simd::fma<Arch>(F::load_unaligned(a + i), F::load_unaligned(b + i), acc0);
    acc1 = simd::fma<Arch>(F::load_unaligned(a + i + W), F::load_unaligned(b + i + W), acc1);
  }
  float s = simd::reduce_add(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/// y += alpha·x, n floats.
template <class Arch> inline void axpy(float alpha, const float* x, float* y, std::size_t n) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F a(alpha);
  std::size_t i = 0;
  for (; i + W <= n; i += W)
    simd::fma<Arch>(a, F::load_unaligned(x + i), F::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// True when the fused AVX-512 GEMV applies (arch, and block a multiple of the chunk).
template <class Arch> inline bool fused_gemv_available(const qw_desc& d, std::size_t block) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value)
    return d.kind == 0 ? block % 16 == 0 : block % 32 == 0;
#endif
  (void)d, (void)block;
  return false;
}

/// x permuted to match the fused 4-bit GEMV's code order (cols % 32 == 0). With block % 64 == 0
/// (nib_gemv_pass): per 128-element chunk (the first cols − cols % 128 elements), vector k
/// (k = 0..7) holds in lane j nibble k of dword j of the chunk's 64 bytes, i.e. element
/// 8j + 2⌊k/2⌋ + 1 for even k (a low nibble) and 8j + 2⌊k/2⌋ for odd k (a high nibble); for a
/// last 64-element segment (cols % 128 == 64), vector k (k = 0..3) holds in lanes j < 8 the low
/// nibble of byte 4j + k (element 8j + 2k + 1) and in lanes 8 + j its high nibble (element
/// 8j + 2k). Otherwise per 32-element chunk: 16 odd elements (low nibbles of bytes 0..15), then
/// the 16 even ones.
inline void split_for_nibbles(const float* x, std::size_t cols, std::size_t block,
                              float* x_split) noexcept {
  if (block % 64 == 0) {
    const std::size_t c128 = cols - cols % 128;
    for (std::size_t c = 0; c < c128; c += 128)
      for (std::size_t k = 0; k < 8; ++k)
        for (std::size_t j = 0; j < 16; ++j)
          x_split[c + 16 * k + j] = x[c + 8 * j + 2 * (k / 2) + 1 - k % 2];
    for (std::size_t c = c128; c < cols; c += 64)
      for (std::size_t k = 0; k < 4; ++k)
        for (std::size_t j = 0; j < 8; ++j) {
          x_split[c + 16 * k + j] = x[c + 8 * j + 2 * k + 1]; // low nibble of byte 4j + k
          x_split[c + 16 * k + 8 + j] = x[c + 8 * j + 2 * k]; // its high nibble
        }
  } else {
    for (std::size_t c = 0; c < cols; c += 32)
      for (std::size_t j = 0; j < 16; ++j) {
        x_split[c + j] = x[c + 2 * j + 1];
        x_split[c + 16 + j] = x[c + 2 * j];
      }
  }
}

#if XSIMD_WITH_AVX512BW
/// Prefetch distance of the fused int8 GEMV, in bytes of each row's stream (see int8_gemv_pass).
inline constexpr std::size_t int8_gemv_prefetch_bytes = 2048;

/// One pass of the fused int8 GEMV over R rows cur[i] (i < R): out[i] = Σ_b s_i,b ·
/// Σ_{k∈b} w_i,k·x_k (without the zero-point term). Per 16 codes: vpmovsxbd / vpmovzxbd,
/// vcvtdq2ps, one fma; the R rows share each x load; per block one partial sum, then one fma by
/// the block scale. Every row's arithmetic is the same for every
/// R, so a row's result does not depend on how rows are grouped into passes (bitwise identical for
/// any thread count).
///
/// Prefetch: W is streamed once, and the hardware prefetchers stop at 4 KiB pages — a 4096-column
/// int8 row is exactly one page, so each new row would start with demand misses. Row slot i reads
/// cur[i], then in the next pass nxt[i]; it prefetches D = min(2048, cols) bytes ahead in that
/// stream, running into nxt[i] near the end of cur[i]. Measured (4096×4096, AMD EPYC, loaded
/// machine, min of 25): no prefetch and 2 rows per pass 1565–1818 µs; 4 rows, next pass at the
/// same column (D = cols) 884–1013 µs; D = 1024..3072 644–932 µs.
/// The shift-based alternative (64 codes per zmm, bytes extracted by vpslld/vpsrad, x permuted to
/// match) was measured slower on this AMD EPYC (AVX-512; its L1D of 48 KiB and AVX512_VP2INTERSECT
/// suggest Zen 5) with W cache-resident (256×1024: 10.6–11.1 µs vs 6.8–7.6 µs with vpmovsxbd;
/// per 16 codes it issues 1.75 shifts where this issues one widening move).
template <bool Signed, bool Block64, std::size_t... I>
inline void int8_gemv_pass(std::index_sequence<I...>, const std::uint8_t* const* cur,
                           const std::uint8_t* const* nxt, const float* const* s, std::size_t cols,
                           std::size_t block, const float* x, float* out) {
  // Every per-row statement is a fold over I, so the R rows' registers are distinct scalars
  // whatever the optimization level (a rolled loop over the rows at -O2 kept a0/a1 in memory:
  // measured 1.4× slower).
  constexpr std::size_t R = sizeof...(I);
  const std::size_t nbr = cols / block;
  const std::size_t D = cols < int8_gemv_prefetch_bytes ? cols : int8_gemv_prefetch_bytes;
  auto cvt = [](const std::uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (Signed)
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    else
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  };
  auto prefetch = [&](std::size_t i, std::size_t p) { // byte p of slot i's stream cur, nxt
    simd::prefetch(p < cols ? cur[i] + p : nxt[i] + (p - cols));
  };
  // t: the block's partial sum Σ_k w·x (one chain per row: the block end then needs a single
  // fma by the scale, where two partial sums cost one more add per row and block). With
  // Block64 the block's first line starts t with a multiply (no zeroing copies).
  __m512 acc[R], t[R];
  ((acc[I] = _mm512_setzero_ps()), ...);
  auto line = [&](std::size_t k, auto first) { // one cache line (64 codes) per row
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    const __m512 x2 = _mm512_loadu_ps(x + k + 32), x3 = _mm512_loadu_ps(x + k + 48);
    if constexpr (decltype(first)::value)
      ((prefetch(I, k + D), t[I] = _mm512_mul_ps(cvt(cur[I] + k), x0)), ...);
    else
      ((prefetch(I, k + D), t[I] = _mm512_fmadd_ps(cvt(cur[I] + k), x0, t[I])), ...);
    ((t[I] = _mm512_fmadd_ps(cvt(cur[I] + k + 16), x1, t[I]),
      t[I] = _mm512_fmadd_ps(cvt(cur[I] + k + 32), x2, t[I]),
      t[I] = _mm512_fmadd_ps(cvt(cur[I] + k + 48), x3, t[I])),
     ...);
  };
  for (std::size_t b = 0; b < nbr; ++b) {
    const std::size_t k0 = b * block, k1 = k0 + block;
    std::size_t k = k0;
    if constexpr (Block64) {
      line(k, std::true_type());
      k += 64;
    } else {
      ((t[I] = _mm512_setzero_ps()), ...);
    }
    for (; k + 64 <= k1; k += 64) line(k, std::false_type());
    if constexpr (!Block64) { // partial lines (block % 64 != 0)
      if (k + 32 <= k1) {
        const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        ((prefetch(I, k + D), t[I] = _mm512_fmadd_ps(cvt(cur[I] + k), x0, t[I]),
          t[I] = _mm512_fmadd_ps(cvt(cur[I] + k + 16), x1, t[I])),
         ...);
        k += 32;
      }
      if (k < k1) { // block % 32 == 16
        const __m512 x0 = _mm512_loadu_ps(x + k);
        ((prefetch(I, k + D), t[I] = _mm512_fmadd_ps(cvt(cur[I] + k), x0, t[I])), ...);
      }
    }
    ((acc[I] = _mm512_fmadd_ps(t[I], _mm512_set1_ps(s[I][b]), acc[I])), ...);
  }
  ((out[I] = _mm512_reduce_add_ps(acc[I])), ...);
}

/// Fused int8 GEMV rows [r0, r1) (AVX-512, block % 16 == 0): 4 rows per pass (int8_gemv_pass),
/// the remaining r1 − r0 mod 4 rows one at a time with the same per-row arithmetic; asymmetric
/// codes add −Σ_b z_b·s_b·xsum_b. Each pass prefetches into the next one (rows clamped to r1 − 1).
template <bool Signed>
inline void int8_gemv_rows(const std::uint8_t* codes, const float* scales, const float* zeros,
                           bool has_zeros, std::size_t cols, std::size_t block, const float* x,
                           const float* xsum, std::size_t r0, std::size_t r1, float* y) {
  constexpr int R = 4;
  const std::size_t nbr = cols / block;
  auto finish = [&](std::size_t r, float v) {
    float off = 0;
    if (has_zeros)
      for (std::size_t b = 0; b < nbr; ++b)
        off -= zeros[r * nbr + b] * scales[r * nbr + b] * xsum[b];
    y[r] = v + off;
  };
  auto row = [&](std::size_t r) { return codes + (r < r1 ? r : r1 - 1) * cols; };
  std::size_t r = r0;
  for (; r + R <= r1; r += R) {
    const float* s[R];
    const std::uint8_t *cur[R], *nxt[R];
    for (int i = 0; i < R; ++i)
      s[i] = scales + (r + i) * nbr, cur[i] = row(r + i), nxt[i] = row(r + R + i);
    float out[R];
    if (block % 64 == 0)
      int8_gemv_pass<Signed, true>(std::make_index_sequence<R>(), cur, nxt, s, cols, block, x, out);
    else
      int8_gemv_pass<Signed, false>(std::make_index_sequence<R>(), cur, nxt, s, cols, block, x,
                                    out);
    for (int i = 0; i < R; ++i) finish(r + i, out[i]);
  }
  for (; r < r1; ++r) {
    const float* s[1] = {scales + r * nbr};
    const std::uint8_t *cur[1] = {row(r)}, *nxt[1] = {row(r + 1)};
    float out[1];
    if (block % 64 == 0)
      int8_gemv_pass<Signed, true>(std::make_index_sequence<1>(), cur, nxt, s, cols, block, x, out);
    else
      int8_gemv_pass<Signed, false>(std::make_index_sequence<1>(), cur, nxt, s, cols, block, x,
                                    out);
    finish(r, out[0]);
  }
}
#endif

#if XSIMD_WITH_AVX512BW
/// One pass of the fused 4-bit GEMV (block % 64 == 0, x_split as split_for_nibbles) over R rows
/// cur[i] (packed codes of row i, i < R): out[i] = Σ_k level(code_i,k)·s_i,blk(k)·x_k (without the
/// zero-point term). vpermps looks the 16 levels up and reads only the low 4 bits of each index
/// lane, so a right shift selects a nibble, with no mask. Per row and 128-code chunk: one 64-byte
/// load; vector k (k = 0..7) of lookup indices is the load shifted right by 4k (k = 0: the load
/// itself), so 8 lookups take 7 shifts; lanes 0-7 hold codes of the chunk's first 64 elements and
/// lanes 8-15 of its last 64, so the 8 products are summed into t (one chain per row) and t is
/// scaled lane-wise by S = (s of the first half's block ×8, s of the second half's ×8): per 128
/// weights 7 shifts, 8 vpermps, 8 fmas, one blend and one fma, where a 64-code segment per
/// 32-byte broadcast (the last segment when cols % 128 == 64) takes 4 shifts, 4 vpermps, 4 fmas
/// and one fma. The R rows share the x loads. Row slot i prefetches, per chunk, the line at the
/// same column of nxt[i] (the next pass's row: hardware prefetchers stop at 4 KiB pages).
/// Every row's arithmetic is the same for every R (bitwise identical for any thread count).
template <std::size_t... I>
inline void nib_gemv_pass(std::index_sequence<I...>, __m512 lut, const std::uint8_t* const* cur,
                          const std::uint8_t* const* nxt, const float* const* s, std::size_t cols,
                          std::size_t block, const float* xs, float* out) {
  constexpr std::size_t R = sizeof...(I);
  const std::size_t c128 = cols - cols % 128;
  __m512 acc[R], t[R];
  __m512i v[R];
  ((acc[I] = _mm512_setzero_ps()), ...);
  // blocks of the chunk's two 64-code halves, counted without divisions: half h is in block
  // h / hpb; `pos` is the next half's position in its block
  const std::size_t hpb = block / 64;
  std::size_t b = 0, pos = 0;
  auto next_half = [&] { // block of the next half, then advance
    const std::size_t bh = b;
    if (++pos == hpb) pos = 0, ++b;
    return bh;
  };
  for (std::size_t c = 0; c < c128; c += 128) {
    const std::size_t b0 = next_half(), b1 = next_half();
    ((simd::prefetch(nxt[I] + c / 2), v[I] = _mm512_loadu_si512(cur[I] + c / 2),
      t[I] = _mm512_mul_ps(_mm512_permutexvar_ps(v[I], lut), _mm512_loadu_ps(xs + c))),
     ...);
    // k = 1..7 (immediate shifts: one statement per k)
    auto step = [&](auto k) {
      const __m512 xk = _mm512_loadu_ps(xs + c + 16 * decltype(k)::value);
      ((t[I] = _mm512_fmadd_ps(
            _mm512_permutexvar_ps(_mm512_srli_epi32(v[I], 4 * decltype(k)::value), lut), xk, t[I])),
       ...);
    };
    step(std::integral_constant<unsigned, 1>()), step(std::integral_constant<unsigned, 2>());
    step(std::integral_constant<unsigned, 3>()), step(std::integral_constant<unsigned, 4>());
    step(std::integral_constant<unsigned, 5>()), step(std::integral_constant<unsigned, 6>());
    step(std::integral_constant<unsigned, 7>());
    ((acc[I] = _mm512_fmadd_ps(t[I],
                               _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(s[I][b0]),
                                                    _mm512_set1_ps(s[I][b1])),
                               acc[I])),
     ...);
  }
  if (c128 < cols) { // cols % 128 == 64: one 64-code segment, 32 bytes broadcast to both halves
    const std::size_t c = c128, bl = next_half();
    // vector k: dwords shifted right by 8k in lanes 0-7 (low nibbles of bytes 4j + k), by
    // 8k + 4 in lanes 8-15 (their high nibbles)
    auto shifts = [](unsigned k) {
      return _mm512_mask_blend_epi32(__mmask16(0xFF00), _mm512_set1_epi32(int(8 * k)),
                                     _mm512_set1_epi32(int(8 * k + 4)));
    };
    ((v[I] = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cur[I] + c / 2))),
      t[I] = _mm512_setzero_ps()),
     ...);
    for (unsigned k = 0; k < 4; ++k) {
      const __m512i sh = shifts(k);
      const __m512 xk = _mm512_loadu_ps(xs + c + 16 * k);
      ((t[I] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srlv_epi32(v[I], sh), lut), xk, t[I])),
       ...);
    }
    ((acc[I] = _mm512_fmadd_ps(t[I], _mm512_set1_ps(s[I][bl]), acc[I])), ...);
  }
  ((out[I] = _mm512_reduce_add_ps(acc[I])), ...);
}

/// Fused 4-bit GEMV rows [r0, r1), block % 64 == 0: 4 rows per pass (nib_gemv_pass), the last
/// r1 − r0 mod 4 rows one at a time with the same per-row arithmetic; the zero-point term
/// −Σ_b z_b·s_b·xsum_b is added after. Each pass prefetches into the next one (rows clamped to
/// r1 − 1). 4 rows per pass rather than 2: same instructions per weight (llvm-mca), but twice the
/// row streams in flight; measured 1.13–1.22× faster median on 4096×4096 NF4/int4 and
/// 1.03–1.06× with W L2-resident (256×4096), both versions alternating in one process (loaded
/// machine).
inline void nib_gemv_rows(__m512 lut, const std::uint8_t* codes, const float* scales,
                          const float* zeros, bool has_zeros, float sym_zero, std::size_t cols,
                          std::size_t block, const float* xs, const float* xsum, std::size_t r0,
                          std::size_t r1, float* y) {
  constexpr std::size_t R = 4;
  const std::size_t nbr = cols / block;
  const bool zp = has_zeros || sym_zero != 0.0f;
  auto finish = [&](std::size_t r, float v) {
    float off = 0; // zero-point term −Σ_b z_b·s_b·Σx_b
    if (zp)
      for (std::size_t b = 0; b < nbr; ++b) {
        const float z = has_zeros ? zeros[r * nbr + b] : sym_zero;
        if (z != 0.0f) off -= z * scales[r * nbr + b] * xsum[b];
      }
    y[r] = v + off;
  };
  auto row = [&](std::size_t r) { return codes + (r < r1 ? r : r1 - 1) * cols / 2; };
  std::size_t r = r0;
  for (; r + R <= r1; r += R) {
    const float* s[R];
    const std::uint8_t *cur[R], *nxt[R];
    for (std::size_t i = 0; i < R; ++i)
      s[i] = scales + (r + i) * nbr, cur[i] = row(r + i), nxt[i] = row(r + R + i);
    float out[R];
    nib_gemv_pass(std::make_index_sequence<R>(), lut, cur, nxt, s, cols, block, xs, out);
    for (std::size_t i = 0; i < R; ++i) finish(r + i, out[i]);
  }
  for (; r < r1; ++r) {
    const float* s[1] = {scales + r * nbr};
    const std::uint8_t *cur[1] = {row(r)}, *nxt[1] = {row(r + 1)};
    float out[1];
    nib_gemv_pass(std::make_index_sequence<1>(), lut, cur, nxt, s, cols, block, xs, out);
    finish(r, out[0]);
  }
}
#endif

/// Fused y_o = Σ_k x_k·deq(W)[o, k] for rows [r0, r1). x_split for 4-bit, xsum[kb] = Σ of x over
/// block kb of a row (asymmetric formats: the zero-point term is −z·s·xsum).
template <class Arch>
inline void fused_gemv_rows(const qw_desc& d, const std::uint8_t* codes, const float* scales,
                            const float* zeros, std::size_t cols, std::size_t block, const float* x,
                            const float* x_split, const float* xsum, std::size_t r0, std::size_t r1,
                            float* y) {
#if XSIMD_WITH_AVX512BW
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value) {
    const std::size_t nbr = cols / block; // blocks per row
    if (d.kind == 0) {
      // int8 codes -> fp32 lanes (vpmovsxbd / vpmovzxbd + vcvtdq2ps), fma with x; four rows per
      // pass share the x loads (8 rows per pass measured no faster).
      if (d.is_signed)
        int8_gemv_rows<true>(codes, scales, zeros, d.has_zeros, cols, block, x, xsum, r0, r1, y);
      else
        int8_gemv_rows<false>(codes, scales, zeros, d.has_zeros, cols, block, x, xsum, r0, r1, y);
    } else {
      const __m512 lut = _mm512_loadu_ps(d.levels);
      if (block % 64 == 0) {
        nib_gemv_rows(lut, codes, scales, zeros, d.has_zeros, d.sym_zero, cols, block, x_split,
                      xsum, r0, r1, y);
        return;
      }
      std::size_t r = r0; // block % 32 == 0: 32-code chunks, one byte per lane
      for (; r < r1; ++r) {
        const std::uint8_t* q = codes + r * cols / 2; // cols even: rows start on a byte
        const float* s = scales + r * nbr;
        __m512 acc = _mm512_setzero_ps();
        float off = 0;
        for (std::size_t b = 0; b < nbr; ++b) {
          __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
          const std::size_t k0 = b * block;
          for (std::size_t k = 0; k < block; k += 32) {
            const __m512i v = _mm512_cvtepu8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + k) / 2)));
            const __m512 lo = _mm512_permutexvar_ps(v, lut);
            const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x_split + k0 + k), a0);
            a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x_split + k0 + k + 16), a1);
          }
          const float sb = s[b];
          acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(sb), acc);
          const float z = d.has_zeros ? zeros[r * nbr + b] : d.sym_zero;
          if (z != 0.0f) off -= z * sb * xsum[b];
        }
        y[r] = _mm512_reduce_add_ps(acc) + off;
      }
    }
    return;
  }
#endif
  (void)d, (void)codes, (void)scales, (void)zeros, (void)cols, (void)block, (void)x;
  (void)x_split, (void)xsum, (void)r0, (void)r1, (void)y;
}

// ---- int8 GEMV with dynamically quantized activations (VNNI) ------------------------------------

/// Activation group of the dynamic int8 GEMV: 64 when the weight block is a multiple of 64 (one
/// zmm of int8 codes per group: the VNNI kernel applies), else the weight block itself.
inline std::size_t dyn_group(std::size_t block) noexcept { return block % 64 == 0 ? 64 : block; }

/// True when the VNNI dynamic int8 GEMV kernel is compiled in and applies to `block`.
inline bool dyn_int8_vnni_available(std::size_t block) noexcept {
  return LOWMEM_QUANT_HAVE_VNNI && block % 64 == 0;
}

/// Quantizes one activation row per group of g elements: sx[j] = max|x| / 127 over group j,
/// xq = rne(x / sx) in [−127, 127] (0 for an all-zero group; sx NaN for a non-finite group).
/// With `corr` (VNNI, g == 64): corr[16 j + l] = −128·Σ_{k<4} xq[64 j + 4 l + k], the lane-wise
/// offset that cancels vpdpbusd's unsigned (w + 128) operand.
template <class Arch>
inline void dyn_quantize_x(const float* x, std::size_t cols, std::size_t g, std::int8_t* xq,
                           float* sx, std::int32_t* corr) {
  for (std::size_t j = 0; j * g < cols; ++j) {
    const float* xg = x + j * g;
    const std::int32_t bits = absmax_bits<Arch>(xg, g);
    affine_block b;
    b.zero = 0, b.lo = -127, b.hi = 127;
    if (bits >= inf_bits) { // the group's products are NaN through sx; codes 0
      sx[j] = std::numeric_limits<float>::quiet_NaN();
      for (std::size_t k = 0; k < g; ++k) xq[j * g + k] = 0;
    } else {
      b.scale = bits_to_float(bits) / 127.0f;
      b.inv = b.scale > 0 ? 1.0f / b.scale : 0.0f;
      sx[j] = b.scale;
      affine_codes_rne<Arch>(xg, g, b, reinterpret_cast<std::uint8_t*>(xq + j * g));
    }
    if (corr)
      for (std::size_t l = 0; l < g / 4; ++l) {
        const std::int8_t* q = xq + j * g + 4 * l;
        corr[j * (g / 4) + l] = -128 * (std::int32_t(q[0]) + q[1] + q[2] + q[3]);
      }
  }
}

/// Portable dynamic int8 GEMV rows [r0, r1): y_r = Σ_j sw[r, blk(j)]·sx[j]·Σ_{k∈j} w[r,k]·xq[k]
/// (exact int32 group sums, fp32 across groups). Signed int8 codes (int8_sym).
inline void dyn_int8_gemv_rows_scalar(const std::uint8_t* codes, const float* scales,
                                      std::size_t cols, std::size_t block, std::size_t g,
                                      const std::int8_t* xq, const float* sx, std::size_t r0,
                                      std::size_t r1, float* y) noexcept {
  const std::size_t nbr = cols / block;
  for (std::size_t r = r0; r < r1; ++r) {
    const std::int8_t* w = reinterpret_cast<const std::int8_t*>(codes) + r * cols;
    float acc = 0.0f;
    for (std::size_t j = 0; j * g < cols; ++j) {
      std::int32_t d = 0;
      for (std::size_t k = j * g; k < (j + 1) * g; ++k) d += std::int32_t(w[k]) * xq[k];
      acc += float(d) * (scales[r * nbr + j * g / block] * sx[j]);
    }
    y[r] = acc;
  }
}

#if LOWMEM_QUANT_HAVE_VNNI
/// VNNI dynamic int8 GEMV rows [r0, r1) (block % 64 == 0): per 64-element group one vpxord (w ^
/// 0x80 = w + 128, unsigned) and one vpdpbusd against xq starting from the corr lanes (exact
/// int32: Σ w·xq), one convert and one fma by sw·sx into an fp32 accumulator; 4 rows per pass
/// share the xq/corr loads (4 independent streams of W: bandwidth-bound at 1 byte per weight).
inline void dyn_int8_gemv_rows_vnni(const std::uint8_t* codes, const float* scales,
                                    std::size_t cols, std::size_t block, const std::int8_t* xq,
                                    const float* sx, const std::int32_t* corr, std::size_t r0,
                                    std::size_t r1, float* y) noexcept {
  const std::size_t nbr = cols / block, ng = cols / 64, gpb = block / 64;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  std::size_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const std::uint8_t* w0 = codes + r * cols;
    const float* s0 = scales + r * nbr;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (std::size_t j = 0; j < ng; ++j) {
      const __m512i xv = _mm512_loadu_si512(xq + 64 * j);
      const __m512i cv = _mm512_loadu_si512(corr + 16 * j);
      const float sxj = sx[j];
      const std::size_t b = j / gpb;
      for (std::size_t i = 0; i < 4; ++i) {
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w0 + i * cols + 64 * j), flip);
        const __m512i d = _mm512_dpbusd_epi32(cv, wv, xv);
        acc[i] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s0[i * nbr + b] * sxj), acc[i]);
      }
    }
    for (std::size_t i = 0; i < 4; ++i) y[r + i] = _mm512_reduce_add_ps(acc[i]);
  }
  for (; r < r1; ++r) {
    const std::uint8_t* w = codes + r * cols;
    __m512 acc = _mm512_setzero_ps();
    for (std::size_t j = 0; j < ng; ++j) {
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * j), flip);
      const __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 16 * j), wv,
                                            _mm512_loadu_si512(xq + 64 * j));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                            _mm512_set1_ps(scales[r * nbr + j / gpb] * sx[j]), acc);
    }
    y[r] = _mm512_reduce_add_ps(acc);
  }
}
#endif

} // namespace lowmem::quant::kernels
