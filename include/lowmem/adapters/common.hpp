// lowmem/adapters/common.hpp — shared pieces of the adapter family: scaling, dropout options,
// entry validation, and the row blocking used where a full-size temporary must be avoided.
//
// Conventions (PyTorch / peft, so users bring weights as they are):
//   W [out, in] row-major, y = x·Wᵀ (+ b), x [rows, in], y [rows, out],
//   A [r, in], B [out, r], scaling s = alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/random.hpp"
#include "../core/workspace.hpp"

namespace lowmem {

/// LoRA scaling: s = alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv:2312.03732), which keeps
/// the adapter's output scale rank-independent. Preconditions: r >= 1, alpha finite.
inline float lora_scale(float alpha, index_t r, bool rslora = false) {
  require_positive("lora_scale", "r", r);
  require(std::isfinite(alpha), "lora_scale", "alpha", "finite", alpha);
  return rslora ? alpha / std::sqrt(float(r)) : alpha / float(r);
}

/// Dropout on the adapter input (peft's lora_dropout): element (i, c) of x is kept when
/// `stream.uniform(i * in + c) >= p` and scaled by 1 / (1 - p). Backward regenerates the same
/// mask from (stream, i, c): nothing is stored. Use a new stream id (or seed) per step.
struct adapter_dropout {
  float p = 0.0f;          ///< drop probability in [0, 1); 0 disables dropout
  random::stream stream{}; ///< mask source
};

namespace adapters::detail {

/// Rows per block where a method must stream over x or dy to avoid a rows×in or rows×out
/// temporary (dropout masks, DoRA's scaled dy). 128 rows keeps the block GEMMs efficient.
inline constexpr index_t row_block = 128;

/// Shape check of an Eigen argument: core's require_shape on its raw view (extents, leading
/// dimension, data present).
template <class M>
inline void require_dims(const char* fn, const char* arg, const M& m, index_t rows, index_t cols) {
  require_shape(fn, arg, matrix_view<const float>{m.data(), m.rows(), m.cols(), m.outerStride()},
                rows, cols);
}

/// Rank r must satisfy 1 <= r <= min(in, out).
inline void require_rank(const char* fn, index_t r, index_t in, index_t out) {
  const index_t hi = in < out ? in : out;
  if (r < 1 || r > hi) // message built only on failure: the passing path must not allocate
    lowmem::detail::throw_invalid(fn, "rank",
                                  "in [1, min(in, out) = " + lowmem::detail::to_text(hi) + "]",
                                  lowmem::detail::to_text(r));
}

inline void require_dropout(const char* fn, const adapter_dropout& d) {
  require_in_half_open(fn, "dropout.p", 0.0f, 1.0f, d.p);
}

inline void require_scale(const char* fn, float s) {
  require(std::isfinite(s), fn, "scale", "finite", s);
}

} // namespace adapters::detail
} // namespace lowmem
