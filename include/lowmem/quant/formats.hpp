// lowmem/quant/formats.hpp — storage formats: affine int8/int4, NF4/FP4 with double quantization,
// FP8 e4m3/e5m2. See lowmem/quant.hpp for the family overview and the papers.
//
// Common conventions
//  * Element order is the row-major flat index of the tensor. Scales are per block of consecutive
//    elements: per-tensor (one block), per-row (block = cols, a PyTorch weight [out, in] gets one
//    scale per output channel), per-group (block = g along the input dim, g must divide cols).
//  * 4-bit packing (int4, NF4, FP4), bitsandbytes-compatible: element i lives in byte i/2, even i
//  in
//    the HIGH nibble, odd i in the LOW nibble; n elements take ceil(n/2) bytes, and for odd n the
//    last low nibble is 0.
//  * Non-finite input policy (no per-element checks; the block's absmax is computed anyway): a
//    block containing NaN or ±Inf gets scale = NaN and the zero code for every element, so its
//    dequantization is NaN for the whole block (corruption stays visible and local; the other
//    blocks are unaffected). Double quantization of the scales, which has a cheap pre-pass, instead
//    throws lowmem::invalid_argument on a non-finite absmax before writing.
//  * Every function validates its arguments and throws lowmem::invalid_argument before writing.
//    Quantize / dequantize allocate nothing and run single-threaded (bandwidth-bound).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/random.hpp"
#include "../kernels/quant.hpp"
#include "../simd/simd.hpp"

namespace lowmem::quant {

/// How values between two representable levels are rounded.
enum class rounding {
  nearest_even, ///< q = rne(x / scale): deterministic, |error| <= scale / 2
  stochastic    ///< q = floor(x / scale + u), u ~ U[0,1) from the core RNG: E[q·scale] = x
};

/// Scale granularity of an affine format.
enum class granularity { per_tensor, per_row, per_group };

/// Affine integer format: bits (8 or 4), symmetric or asymmetric, granularity (group along the
/// input dim, i.e. consecutive elements of a row).
///  * symmetric int8: code q in [−127, 127] stored as a two's-complement byte, x ≈ q·s,
///    s = absmax/127;
///  * symmetric int4: q in [−7, 7] stored offset-binary as q + 8 in a nibble, x ≈ (c − 8)·s,
///    s = absmax/7;
///  * asymmetric int8/int4: c in [0, 2^b − 1], x ≈ (c − z)·s with s = (max' − min')/(2^b − 1),
///    min' = min(min x, 0), max' = max(max x, 0) (so 0 is exact), z = rne(−min'/s) stored as a
///    float holding an integer (the `zeros` array).
struct affine_format {
  int bits = 8;
  bool symmetric = true;
  granularity gran = granularity::per_group;
  index_t group = 64; ///< elements per scale for per_group (32, 64, 128 typical)
};

namespace detail {
/// Validates an affine format for a rows × cols tensor; returns the block length.
inline index_t affine_block_len(const char* fn, index_t rows, index_t cols,
                                const affine_format& f) {
  require_non_negative(fn, "rows", rows);
  require_non_negative(fn, "cols", cols);
  require(f.bits == 8 || f.bits == 4, fn, "format.bits", "8 or 4", f.bits);
  switch (f.gran) {
  case granularity::per_tensor:
    return rows * cols > 0 ? rows * cols : 1;
  case granularity::per_row:
    return cols > 0 ? cols : 1;
  case granularity::per_group:
    require_positive(fn, "format.group", f.group);
    require_multiple_of(fn, "cols (per-group format)", f.group, cols);
    return f.group;
  }
  lowmem::detail::throw_invalid(fn, "format.gran", "per_tensor, per_row or per_group",
                                lowmem::detail::to_text(int(f.gran)));
}
/// Output driver of the dequantizers: f(first, len, out) writes elements [first, first + len) of
/// x to out[0, len). Small outputs: one call, f(0, n, x). Outputs of at least
/// simd::stream_min_bytes: calls for pieces of up to 1 KiB, out in a simd::stream_writer that
/// writes x with streaming stores, so the fp32 lines are not read from DRAM first (~8.5 -> ~4.5
/// B/value of traffic with int8 / NF4 codes). Pieces may cut blocks (kernels take any range).
template <class Arch, class Fn> inline void dequant_out(std::size_t n, float* x, Fn&& f) {
  if (n * sizeof(float) < simd::stream_min_bytes) {
    f(std::size_t(0), n, x);
    return;
  }
  using W = simd::stream_writer<Arch, float>;
  W w(x);
  for (std::size_t e = 0; e < n; e += W::max_piece) {
    const std::size_t m = std::min(n - e, W::max_piece);
    f(e, m, w.next(m));
    w.advance(m);
  }
  w.finish();
}

/// Output driver of the block quantizers: f(b, k, out) quantizes blocks [b, b + k) and writes
/// their codes (bpb bytes per block) to out. Small outputs: one call, f(0, nb, codes). Outputs of
/// at least simd::stream_min_bytes: the blocks are visited as kernels::for_interleaved_parts lays
/// them out (4 contiguous parts taken in turn, which keeps 4 input streams in flight), in pieces of
/// up to 1 KiB of codes, each part written through its own simd::stream_writer so the code lines
/// are not read from DRAM before being written (int8: 6 -> 5 B/value of traffic); the last part's
/// writer also writes the rest. Used for int8 only: 100M floats, int8 block-64 quantize 44 -> 41
/// ms (streaming stores alone), but NF4 / FP4 (0.5 B/value of codes, more compute per value) and
/// FP8 encode measured no better or worse with streaming stores (FP4 44 -> 48 ms).
template <class Arch, class Fn>
inline void quant_blocks_out(std::size_t nb, std::size_t bpb, std::uint8_t* codes, Fn&& f) {
  using W = simd::stream_writer<Arch, std::uint8_t>;
  constexpr std::size_t S = kernels::interleave_parts;
  static_assert(S == 4, "one writer per part below");
  const std::size_t per = bpb <= W::max_piece ? W::max_piece / bpb : 0; // blocks per piece
  const std::size_t part = per ? nb / S / per * per : 0; // for_interleaved_parts' part length
  if (nb * bpb < simd::stream_min_bytes || part == 0) {
    f(std::size_t(0), nb, codes);
    return;
  }
  W w0(codes), w1(codes + part * bpb), w2(codes + 2 * part * bpb), w3(codes + 3 * part * bpb);
  W* w[S] = {&w0, &w1, &w2, &w3};
  kernels::for_interleaved_parts(nb, per, 0, [&](std::size_t b, std::size_t count) {
    W& wk = *w[std::min(b / part, S - 1)]; // the rest [4·part, nb) continues part 3's output
    for (const std::size_t end = b + count; b < end; b += per) {
      const std::size_t k = std::min(per, end - b);
      f(b, k, wk.next(k * bpb));
      wk.advance(k * bpb);
    }
  });
  for (W* wk : w) wk->finish();
}
} // namespace detail

/// Number of scales (and zero points) of an affine format on a rows × cols tensor.
inline index_t affine_num_blocks(index_t rows, index_t cols, const affine_format& f) {
  const index_t b = detail::affine_block_len("affine_num_blocks", rows, cols, f);
  return (rows * cols + b - 1) / b;
}

/// Bytes of code storage: n for int8, ceil(n/2) for int4 (n = rows·cols).
inline std::size_t affine_code_bytes(index_t rows, index_t cols, const affine_format& f) {
  detail::affine_block_len("affine_code_bytes", rows, cols, f);
  const std::size_t n = std::size_t(rows * cols);
  return f.bits == 8 ? n : (n + 1) / 2;
}

/// Affine quantization of x [rows, cols] (row-major, contiguous):
///   per block b: s_b, z_b as in affine_format; code_i = clamp(round(x_i·(1/s_b)) + z_b, range).
/// Outputs: codes (affine_code_bytes bytes, layout above), scales[affine_num_blocks], zeros[...]
/// (asymmetric only; may be nullptr for symmetric, which has implicit zero 0 / 8).
/// Rounding: nearest_even (|x − deq(x)| <= s/2 + 1 ulp) or stochastic with u_i =
/// s.uniform(offset + i) (reproducible, unbiased inside the range).
/// Memory: none (a 256-byte stack buffer). Preconditions: bits 8|4, group > 0 dividing cols,
/// non-null buffers. Non-finite block: scale NaN (see the header).
template <class Arch = simd::default_arch>
inline void affine_quantize(const float* x, index_t rows, index_t cols, const affine_format& f,
                            std::uint8_t* codes, float* scales, float* zeros,
                            rounding r = rounding::nearest_even, random::stream s = {},
                            std::uint64_t offset = 0) {
  const char* fn = "affine_quantize";
  const index_t B = detail::affine_block_len(fn, rows, cols, f);
  const std::size_t n = std::size_t(rows * cols);
  const std::size_t nb = (n + std::size_t(B) - 1) / std::size_t(B);
  require_data(fn, "x", x, n);
  require_data(fn, "codes", codes, n);
  require_data(fn, "scales", scales, nb);
  if (!f.symmetric) require_data(fn, "zeros", zeros, nb);
  if constexpr (kernels::has_sym8_blocks_path<Arch>()) {
    if (f.bits == 8 && f.symmetric && r == rounding::nearest_even && B % 64 == 0 &&
        n % std::size_t(B) == 0) { // fused one-pass kernel, bitwise the same codes and scales
      detail::quant_blocks_out<Arch>(
          nb, std::size_t(B), codes, [&](std::size_t b, std::size_t k, std::uint8_t* out) {
            kernels::affine_sym8_blocks<Arch>(x + b * std::size_t(B), k, std::size_t(B), out,
                                              scales + b);
          });
      return;
    }
  }
  alignas(64) std::uint8_t tmp[256];
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t begin = b * std::size_t(B);
    const std::size_t len = std::min<std::size_t>(std::size_t(B), n - begin);
    const kernels::affine_block blk =
        kernels::affine_choose<Arch>(x + begin, len, f.bits, f.symmetric);
    scales[b] = blk.scale;
    if (!f.symmetric) zeros[b] = float(blk.zero);
    for (std::size_t c = 0; c < len; c += 256) {
      const std::size_t m = std::min<std::size_t>(256, len - c);
      std::uint8_t* dst = f.bits == 8 ? codes + begin + c : tmp;
      if (!blk.finite)
        std::memset(dst, blk.zero & 0xFF, m);
      else if (r == rounding::nearest_even)
        kernels::affine_codes_rne<Arch>(x + begin + c, m, blk, dst);
      else
        kernels::affine_codes_stochastic<Arch>(x + begin + c, m, blk, s, offset + begin + c, dst);
      if (f.bits == 4) kernels::pack_nibbles(tmp, m, codes, begin + c);
    }
  }
}

/// Affine dequantization: x_i = (code_i − z_b)·s_b, inverse of affine_quantize (same arguments).
/// Memory: none. Numerics: one fma per element (exact up to the final rounding).
template <class Arch = simd::default_arch>
inline void affine_dequantize(const std::uint8_t* codes, const float* scales, const float* zeros,
                              index_t rows, index_t cols, const affine_format& f, float* x) {
  const char* fn = "affine_dequantize";
  const index_t B = detail::affine_block_len(fn, rows, cols, f);
  const std::size_t n = std::size_t(rows * cols);
  const std::size_t nb = (n + std::size_t(B) - 1) / std::size_t(B);
  require_data(fn, "codes", codes, n);
  require_data(fn, "scales", scales, nb);
  if (!f.symmetric) require_data(fn, "zeros", zeros, nb);
  require_data(fn, "x", x, n);
  if (f.bits == 8) { // (a separate instantiation: sharing one with int4 cost ~30% L2-resident)
    const float* z = f.symmetric ? nullptr : zeros;
    const bool is_signed = f.symmetric;
    const std::size_t Bs = std::size_t(B);
    detail::dequant_out<Arch>(n, x, [=](std::size_t first, std::size_t len, float* out) {
      kernels::affine_dequant8_range<Arch>(codes, scales, z, is_signed, Bs, first, len, out);
    });
    return;
  }
  detail::dequant_out<Arch>(n, x, [&](std::size_t first, std::size_t len, float* out) {
    kernels::for_block_pieces(
        first, len, std::size_t(B), out,
        [&](std::size_t b, std::size_t e, std::size_t m, float* o) {
          if (f.symmetric) // (c − 8)·s through the signed table: the same bits as qlinear's path
            kernels::codebook_dequant<Arch>(codes, e, m, kernels::int4_sym_levels,
                                            kernels::int4_sym_pairs(), scales[b], 0.0f, o);
          else
            kernels::codebook_dequant<Arch>(codes, e, m, kernels::int4_levels,
                                            kernels::int4_pairs(), scales[b],
                                            0.0f - zeros[b] * scales[b], o);
        });
  });
}

// ---- NF4 / FP4 (QLoRA) -------------------------------------------------------------------------

/// 4-bit codebooks with absmax block scaling: x ≈ level[code]·absmax_b.
///  * nf4: the 16 NormalFloat levels of QLoRA / bitsandbytes (kernels::nf4_levels);
///  * fp4: OCP MX e2m1 {0, .5, 1, 1.5, 2, 3, 4, 6}/6 with a sign bit (code s.ee.m). This is the
///    standard e2m1 encoding, NOT bitsandbytes' FP4 (which uses its own code assignment).
enum class fourbit { nf4, fp4 };

inline const float* fourbit_levels(fourbit t) noexcept {
  return t == fourbit::nf4 ? kernels::nf4_levels : kernels::fp4_levels;
}

/// Blocks of a 4-bit tensor of n elements (the last block may be partial, as in bitsandbytes).
inline std::size_t fourbit_num_blocks(std::size_t n, index_t block) {
  require_positive("fourbit_num_blocks", "block", block);
  return (n + std::size_t(block) - 1) / std::size_t(block);
}

/// Blockwise 4-bit quantization of x[0, n): absmax_b = max |x| over block b (of `block`
/// consecutive elements), code_i = nearest level to x_i / absmax_b (ties to the lower level;
/// for FP4 to the smaller magnitude; an all-zero block gives absmax 0 and the code of 0).
/// Outputs: packed codes (ceil(n/2) bytes, high nibble first), absmax[fourbit_num_blocks].
/// Memory: none. Preconditions: block > 0 (64 is QLoRA's), non-null buffers. Non-finite block:
/// absmax NaN.
template <class Arch = simd::default_arch>
inline void fourbit_quantize(const float* x, std::size_t n, fourbit t, index_t block,
                             std::uint8_t* packed, float* absmax) {
  const char* fn = "fourbit_quantize";
  const std::size_t nb = fourbit_num_blocks(n, block);
  require_data(fn, "x", x, n);
  require_data(fn, "packed", packed, (n + 1) / 2);
  require_data(fn, "absmax", absmax, nb);
  const kernels::codebook4& cb =
      t == fourbit::nf4 ? kernels::nf4_codebook() : kernels::fp4_codebook();
  const std::uint8_t zero_code = kernels::codebook_code_scalar(0.0f, cb);
  std::size_t b0 = 0;
  if (block % 64 == 0 && kernels::has_codebook_blocks_path<Arch>(cb)) {
    // whole blocks through the fused one-pass kernel (bitwise the same), the partial last one below
    b0 = n / std::size_t(block);
    const std::size_t B = std::size_t(block);
    // large inputs: 4 interleaved parts (kernels::for_interleaved_parts), 4 KiB+ steps
    kernels::for_interleaved_parts(b0, (1023 + B) / B, kernels::interleave_min_bytes / (4 * B),
                                   [&](std::size_t b, std::size_t k) {
                                     kernels::codebook_blocks64<Arch>(
                                         x + b * B, k, B, cb, packed + b * B / 2, absmax + b);
                                   });
  }
  alignas(64) std::uint8_t tmp[256];
  for (std::size_t b = b0; b < nb; ++b) {
    const std::size_t begin = b * std::size_t(block);
    const std::size_t len = std::min<std::size_t>(std::size_t(block), n - begin);
    const std::int32_t bits = kernels::absmax_bits<Arch>(x + begin, len);
    const bool finite = bits < kernels::inf_bits;
    const float am =
        finite ? kernels::bits_to_float(bits) : std::numeric_limits<float>::quiet_NaN();
    absmax[b] = am;
    const float inv = finite && am > 0 ? 1.0f / am : 0.0f;
    std::size_t done = 0;
    if constexpr (kernels::has_packed_codebook_path<Arch>()) {
      if (finite && begin % 2 == 0) { // whole groups of 16 straight to packed bytes
        done = len / 16 * 16;
        kernels::codebook_codes_packed<Arch>(x + begin, done, inv, cb, packed + begin / 2);
      }
    }
    for (std::size_t c = done; c < len; c += 256) {
      const std::size_t m = std::min<std::size_t>(256, len - c);
      if (finite)
        kernels::codebook_codes<Arch>(x + begin + c, m, inv, cb, tmp);
      else
        std::memset(tmp, zero_code, m);
      kernels::pack_nibbles(tmp, m, packed, begin + c);
    }
  }
}

/// Inverse of fourbit_quantize: x_i = level[code_i]·absmax_b. Memory: none.
template <class Arch = simd::default_arch>
inline void fourbit_dequantize(const std::uint8_t* packed, const float* absmax, std::size_t n,
                               fourbit t, index_t block, float* x) {
  const char* fn = "fourbit_dequantize";
  const std::size_t nb = fourbit_num_blocks(n, block);
  require_data(fn, "packed", packed, (n + 1) / 2);
  require_data(fn, "absmax", absmax, nb);
  require_data(fn, "x", x, n);
  const float* levels = fourbit_levels(t);
  const kernels::pair_lut& pairs = t == fourbit::nf4 ? kernels::nf4_pairs() : kernels::fp4_pairs();
  detail::dequant_out<Arch>(n, x, [&](std::size_t first, std::size_t len, float* out) {
    kernels::codebook_dequant_range<Arch>(packed, absmax, std::size_t(block), first, len, levels,
                                          pairs, out);
  });
}

// ---- FP8 ---------------------------------------------------------------------------------------

/// OCP 8-bit floating point formats.
///  * e4m3 ("E4M3FN"): bias 7, no Inf, NaN = S.1111.111, max ±448, min subnormal 2^-9;
///  * e5m2: bias 15, IEEE-like, ±Inf = S.11111.00, NaN = S.11111.{01,10,11}, max ±57344.
/// Encoding rounds to nearest even. saturate = true (default): finite overflow and ±Inf give
/// ±max (CUDA's __NV_SATFINITE); saturate = false: overflow gives NaN (e4m3) or ±Inf (e5m2), and
/// Inf gives NaN (e4m3) or Inf (e5m2). NaN gives S.1111.111 (e4m3) / S.11111.10 (e5m2).
enum class fp8_format { e4m3, e5m2 };

inline float fp8_max(fp8_format f) noexcept { return f == fp8_format::e4m3 ? 448.0f : 57344.0f; }

/// Scalar fp32 -> fp8 code.
inline std::uint8_t to_fp8(float x, fp8_format f, bool saturate = true) noexcept {
  return f == fp8_format::e4m3 ? kernels::fp8_encode<3>(x, saturate)
                               : kernels::fp8_encode<2>(x, saturate);
}
/// Scalar fp8 code -> fp32 (exact).
inline float from_fp8(std::uint8_t c, fp8_format f) noexcept {
  return f == fp8_format::e4m3 ? kernels::fp8_decode<3>(c) : kernels::fp8_decode<2>(c);
}

/// Array conversion out_i = fp8(x_i / scale) (scale 1: plain conversion). Vectorized, bitwise
/// equal to to_fp8 element by element. Memory: none. Precondition: scale finite and > 0.
template <class Arch = simd::default_arch>
inline void fp8_encode(const float* x, std::size_t n, fp8_format f, std::uint8_t* out,
                       float scale = 1.0f, bool saturate = true) {
  const char* fn = "fp8_encode";
  require_positive(fn, "scale", scale);
  require_data(fn, "x", x, n);
  require_data(fn, "out", out, n);
  const float inv = 1.0f / scale;
  // large inputs: 4 interleaved parts (kernels::for_interleaved_parts), steps of 1024 values
  kernels::for_interleaved_parts(
      n, 1024, kernels::interleave_min_bytes / 4, [&](std::size_t i, std::size_t m) {
        if (f == fp8_format::e4m3)
          kernels::fp8_encode_array<Arch, 3>(x + i, m, inv, saturate, out + i);
        else
          kernels::fp8_encode_array<Arch, 2>(x + i, m, inv, saturate, out + i);
      });
}

/// Array conversion x_i = fp32(code_i)·scale (exact for scale 1). Memory: none.
template <class Arch = simd::default_arch>
inline void fp8_decode(const std::uint8_t* codes, std::size_t n, fp8_format f, float* x,
                       float scale = 1.0f) {
  const char* fn = "fp8_decode";
  require_data(fn, "codes", codes, n);
  require_data(fn, "x", x, n);
  // one "block" of n elements: the driver only chunks the output for streaming stores
  detail::dequant_out<Arch>(n, x, [&](std::size_t first, std::size_t len, float* out) {
    if (f == fp8_format::e4m3)
      kernels::fp8_decode_array<Arch, 3>(codes + first, len, scale, out);
    else
      kernels::fp8_decode_array<Arch, 2>(codes + first, len, scale, out);
  });
}

/// Blockwise-scaled FP8: scale_b = absmax_b / fp8_max(f) (1 for an all-zero block), code_i =
/// fp8(x_i / scale_b), so every block uses the full range. block = n gives per-tensor scaling;
/// the last block may be partial. Outputs codes[n], scales[ceil(n/block)]. Non-finite block: scale
/// NaN, codes 0. Memory: none.
template <class Arch = simd::default_arch>
inline void fp8_quantize(const float* x, std::size_t n, fp8_format f, index_t block,
                         std::uint8_t* codes, float* scales) {
  const char* fn = "fp8_quantize";
  const std::size_t nb = fourbit_num_blocks(n, block);
  require_data(fn, "x", x, n);
  require_data(fn, "codes", codes, n);
  require_data(fn, "scales", scales, nb);
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t begin = b * std::size_t(block);
    const std::size_t len = std::min<std::size_t>(std::size_t(block), n - begin);
    const std::int32_t bits = kernels::absmax_bits<Arch>(x + begin, len);
    if (bits >= kernels::inf_bits) {
      scales[b] = std::numeric_limits<float>::quiet_NaN();
      std::memset(codes + begin, 0, len);
      continue;
    }
    const float am = kernels::bits_to_float(bits);
    const float s = am > 0 ? am / fp8_max(f) : 1.0f;
    scales[b] = s;
    if (f == fp8_format::e4m3)
      kernels::fp8_encode_array<Arch, 3>(x + begin, len, 1.0f / s, true, codes + begin);
    else
      kernels::fp8_encode_array<Arch, 2>(x + begin, len, 1.0f / s, true, codes + begin);
  }
}

/// Inverse of fp8_quantize: x_i = fp32(code_i)·scale_b. Memory: none.
template <class Arch = simd::default_arch>
inline void fp8_dequantize(const std::uint8_t* codes, const float* scales, std::size_t n,
                           fp8_format f, index_t block, float* x) {
  const char* fn = "fp8_dequantize";
  const std::size_t nb = fourbit_num_blocks(n, block);
  require_data(fn, "codes", codes, n);
  require_data(fn, "scales", scales, nb);
  require_data(fn, "x", x, n);
  detail::dequant_out<Arch>(n, x, [&](std::size_t first, std::size_t len, float* out) {
    kernels::for_block_pieces(first, len, std::size_t(block), out,
                              [&](std::size_t b, std::size_t e, std::size_t m, float* o) {
                                if (f == fp8_format::e4m3)
                                  kernels::fp8_decode_array<Arch, 3>(codes + e, m, scales[b], o);
                                else
                                  kernels::fp8_decode_array<Arch, 2>(codes + e, m, scales[b], o);
                              });
  });
}

// ---- double quantization of the absmax scales (QLoRA) ------------------------------------------

/// Double quantization (QLoRA §3): the fp32 absmax of every 4-bit block is stored as an 8-bit float
/// (e4m3) after subtracting their mean, with one fp32 scale per group of dq_group (256) absmax
/// values: absmax_b ≈ mean + fp8(c_b)·s_g, s_g = max_{b in g} |absmax_b − mean| / 448.
/// Storage per parameter with block 64: 4 + 8/64 + 32/(64·256) = 4.127 bits (plus one mean).
inline constexpr index_t dq_group = 256;

inline std::size_t dq_num_groups(std::size_t nblocks) {
  return (nblocks + std::size_t(dq_group) - 1) / std::size_t(dq_group);
}

/// Bits per parameter of a 4-bit tensor of n elements with the given block, with or without
/// double quantization (counts codes, scales and the mean; n > 0).
inline double fourbit_bits_per_param(std::size_t n, index_t block, bool double_quant) {
  const std::size_t nb = fourbit_num_blocks(n, block);
  double bits = 8.0 * double((n + 1) / 2);
  bits +=
      double_quant ? 8.0 * double(nb) + 32.0 * double(dq_num_groups(nb)) + 32.0 : 32.0 * double(nb);
  return bits / double(n);
}

/// Quantizes absmax[nblocks] to codes[nblocks] (e4m3), group_scales[dq_num_groups] and *mean.
/// Throws lowmem::invalid_argument (before writing) if any absmax is NaN, Inf or negative.
/// Memory: none.
template <class Arch = simd::default_arch>
inline void double_quantize_absmax(const float* absmax, std::size_t nblocks, std::uint8_t* codes,
                                   float* group_scales, float* mean) {
  const char* fn = "double_quantize_absmax";
  require_data(fn, "absmax", absmax, nblocks);
  require_data(fn, "codes", codes, nblocks);
  require_data(fn, "group_scales", group_scales, dq_num_groups(nblocks));
  require(mean != nullptr, fn, "mean", "non-null", "nullptr");
  double sum = 0;
  for (std::size_t b = 0; b < nblocks; ++b) {
    if (!(std::isfinite(absmax[b]) && absmax[b] >= 0))
      lowmem::detail::throw_invalid(fn, "absmax", "finite and >= 0 at every block",
                                    lowmem::detail::to_text(absmax[b]) + " at block " +
                                        lowmem::detail::to_text(b));
    sum += absmax[b];
  }
  const float m = nblocks ? float(sum / double(nblocks)) : 0.0f;
  *mean = m;
  alignas(64) float dev[dq_group];
  for (std::size_t g = 0; g * std::size_t(dq_group) < nblocks; ++g) {
    const std::size_t begin = g * std::size_t(dq_group);
    const std::size_t len = std::min<std::size_t>(std::size_t(dq_group), nblocks - begin);
    float mx = 0;
    for (std::size_t k = 0; k < len; ++k) {
      dev[k] = absmax[begin + k] - m;
      mx = std::max(mx, std::fabs(dev[k]));
    }
    const float s = mx > 0 ? mx / 448.0f : 1.0f;
    group_scales[g] = s;
    kernels::fp8_encode_array<Arch, 3>(dev, len, 1.0f / s, true, codes + begin);
  }
}

/// Inverse: absmax_b = mean + fp8(c_b)·s_g (into absmax_out[nblocks]). Memory: none.
template <class Arch = simd::default_arch>
inline void double_dequantize_absmax(const std::uint8_t* codes, const float* group_scales,
                                     float mean, std::size_t nblocks, float* absmax_out) {
  const char* fn = "double_dequantize_absmax";
  require_data(fn, "codes", codes, nblocks);
  require_data(fn, "group_scales", group_scales, dq_num_groups(nblocks));
  require_data(fn, "absmax_out", absmax_out, nblocks);
  for (std::size_t g = 0; g * std::size_t(dq_group) < nblocks; ++g) {
    const std::size_t begin = g * std::size_t(dq_group);
    const std::size_t len = std::min<std::size_t>(std::size_t(dq_group), nblocks - begin);
    kernels::fp8_decode_array<Arch, 3>(codes + begin, len, group_scales[g], absmax_out + begin);
    for (std::size_t k = 0; k < len; ++k) absmax_out[begin + k] += mean;
  }
}

} // namespace lowmem::quant
