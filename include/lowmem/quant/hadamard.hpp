// lowmem/quant/hadamard.hpp — randomized Hadamard rotation (the QuaRot / QuIP# idea): rotate rows
// by Q = H·D/sqrt(n) (H the Sylvester–Walsh–Hadamard matrix, D a random ±1 diagonal from a seed)
// before quantizing, which spreads outliers over the whole row; Q is orthogonal, so rotating both
// activations and weights leaves x·Wᵀ unchanged: (xQ)(WQ)ᵀ = x·Wᵀ.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/random.hpp"
#include "../kernels/random.hpp"
#include "../simd/simd.hpp"

namespace lowmem::quant {

namespace kernels {
/// In-place unnormalized Walsh–Hadamard transform of n = 2^k floats (Sylvester order), then ·scale.
template <class Arch> inline void fwht_inplace(float* x, std::size_t n, float scale) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  std::size_t h = 1;
  // small strides (h < 8): scalar radix-8 passes over 8-element chunks
  if (n >= 8) {
    for (std::size_t c = 0; c < n; c += 8) {
      float* p = x + c;
      float a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
      float a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
      const float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
      const float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
      p[0] = b0 + b4, p[4] = b0 - b4, p[1] = b1 + b5, p[5] = b1 - b5;
      p[2] = b2 + b6, p[6] = b2 - b6, p[3] = b3 + b7, p[7] = b3 - b7;
    }
    h = 8;
  }
  for (; h < n; h *= 2) {
    for (std::size_t i = 0; i < n; i += 2 * h) {
      std::size_t j = i;
      if (h >= W) {
        for (; j < i + h; j += W) {
          const F a = F::load_unaligned(x + j), b = F::load_unaligned(x + j + h);
          (a + b).store_unaligned(x + j);
          (a - b).store_unaligned(x + j + h);
        }
      }
      for (; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b, x[j + h] = a - b;
      }
    }
  }
  if (scale != 1.0f) {
    std::size_t i = 0;
    for (; i + W <= n; i += W) (F::load_unaligned(x + i) * F(scale)).store_unaligned(x + i);
    for (; i < n; ++i) x[i] *= scale;
  }
}
} // namespace kernels

inline bool is_power_of_two(index_t n) { return n > 0 && (n & (n - 1)) == 0; }

/// In-place normalized fast Walsh–Hadamard transform: x <- H_n·x / sqrt(n), n a power of two.
/// O(n log n) adds, no allocation. The normalized transform is orthogonal and its own inverse.
template <class Arch = simd::default_arch> inline void fwht(float* x, index_t n) {
  const char* fn = "fwht";
  require(is_power_of_two(n), fn, "n", "a power of two", n);
  require_data(fn, "x", x, std::size_t(n));
  kernels::fwht_inplace<Arch>(x, std::size_t(n), float(1.0 / std::sqrt(double(n))));
}

/// The ±1 sign vector D of a rotation: signs[i] = random::stream{seed, 0x4ad}.rademacher(i).
inline void hadamard_signs(std::uint64_t seed, index_t n, float* signs) {
  require_non_negative("hadamard_signs", "n", n);
  require_data("hadamard_signs", "signs", signs, std::size_t(n));
  random::fill_rademacher(random::stream{seed, 0x4adu}, 0, signs, std::size_t(n));
}

/// Rotates every row of x [rows, cols] in place by the block-diagonal orthogonal matrix
/// Q = diag(H_b, ..., H_b)·D / sqrt(b): forward y = (x ∘ signs)·Q-blocks; `inverse` undoes it
/// (transform, then multiply by the signs). block = cols (a power of two) is the full rotation;
/// for other widths pass a power-of-two block dividing cols (e.g. 11008 = 43·256: block 256) —
/// still orthogonal, with outliers spread within each block. signs [cols] (from hadamard_signs)
/// or nullptr for no sign flips. Memory: none. Preconditions: block a power of two dividing cols.
template <class Arch = simd::default_arch>
inline void hadamard_rotate(float* x, index_t rows, index_t cols, index_t block, const float* signs,
                            bool inverse = false) {
  const char* fn = "hadamard_rotate";
  require_non_negative(fn, "rows", rows);
  require_non_negative(fn, "cols", cols);
  require(is_power_of_two(block), fn, "block", "a power of two", block);
  require_multiple_of(fn, "cols", block, cols);
  require_data(fn, "x", x, std::size_t(rows * cols));
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const float scale = float(1.0 / std::sqrt(double(block)));
  const std::size_t C = std::size_t(cols);
  auto apply_signs = [&](float* row) {
    if (!signs) return;
    std::size_t i = 0;
    for (; i + W <= C; i += W)
      (F::load_unaligned(row + i) * F::load_unaligned(signs + i)).store_unaligned(row + i);
    for (; i < C; ++i) row[i] *= signs[i];
  };
  for (index_t r = 0; r < rows; ++r) {
    float* row = x + std::size_t(r) * C;
    if (!inverse) apply_signs(row);
    for (std::size_t b = 0; b < C; b += std::size_t(block))
      kernels::fwht_inplace<Arch>(row + b, std::size_t(block), scale);
    if (inverse) apply_signs(row);
  }
}

} // namespace lowmem::quant
