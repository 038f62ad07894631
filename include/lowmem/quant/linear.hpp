// lowmem/quant/linear.hpp — linear layer over a frozen quantized weight (QLoRA's base layer):
// y = x·deq(W)ᵀ and dx += dy·deq(W), dequantizing a tile at a time and never an fp32 copy of W.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/threading.hpp"
#include "../core/workspace.hpp"
#include "../kernels/quant_linear.hpp"
#include "formats.hpp"

namespace lowmem::quant {

/// Storage format of a quantized linear weight.
enum class weight_format { int8_sym, int8_asym, int4_sym, int4_asym, nf4, fp4 };

/// Non-owning view of a quantized weight W [rows = out, cols = in], row-major flat element order,
/// one scale per `block` consecutive elements of a row (block divides cols; block = cols is
/// per-channel). Codes/scales/zeros exactly as produced by affine_quantize (per_group(block) or
/// per_row) or fourbit_quantize(block): int8 one byte per element, 4-bit formats packed high
/// nibble first; zeros only for the asymmetric formats.
struct qweight {
  weight_format format = weight_format::nf4;
  index_t rows = 0, cols = 0, block = 64;
  const std::uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const float* zeros = nullptr;
};

namespace detail {
inline kernels::qw_desc describe(const qweight& w) {
  kernels::qw_desc d{};
  switch (w.format) {
  case weight_format::int8_sym:
    d = {0, true, nullptr, nullptr, 0.0f, false};
    break;
  case weight_format::int8_asym:
    d = {0, false, nullptr, nullptr, 0.0f, true};
    break;
  case weight_format::int4_sym:
    d = {1, false, kernels::int4_sym_levels, &kernels::int4_sym_pairs(), 0.0f, false};
    break;
  case weight_format::int4_asym:
    d = {1, false, kernels::int4_levels, &kernels::int4_pairs(), 0.0f, true};
    break;
  case weight_format::nf4:
    d = {1, false, kernels::nf4_levels, &kernels::nf4_pairs(), 0.0f, false};
    break;
  case weight_format::fp4:
    d = {1, false, kernels::fp4_levels, &kernels::fp4_pairs(), 0.0f, false};
    break;
  }
  return d;
}

inline void require_qweight(const char* fn, const qweight& w) {
  require_non_negative(fn, "W.rows", w.rows);
  require_non_negative(fn, "W.cols", w.cols);
  require_positive(fn, "W.block", w.block);
  require_multiple_of(fn, "W.cols (a whole number of blocks per row)", w.block, w.cols);
  const std::size_t n = std::size_t(w.rows * w.cols);
  require_data(fn, "W.codes", w.codes, n);
  require_data(fn, "W.scales", w.scales, n);
  const bool asym = w.format == weight_format::int8_asym || w.format == weight_format::int4_asym;
  if (asym) require_data(fn, "W.zeros", w.zeros, n);
}

/// Batches below this use the GEMV path (per row of x), at or above the tiled GEMM path.
inline constexpr index_t qlinear_gemm_min_batch = 8;

/// Rows of W dequantized per GEMM tile: at most ~4 MiB of fp32 and at most a quarter of W's rows
/// (so the tile is never close to an fp32 copy of W), at least 16 rows (Eigen repacks x once per
/// tile: fewer, taller tiles keep that a few percent of the GEMM).
inline index_t qlinear_tile_rows(const qweight& w) {
  const index_t budget = index_t(1) << 20; // floats
  index_t t = w.cols > 0 ? budget / w.cols : w.rows;
  t = std::min<index_t>(t, (w.rows + 3) / 4);
  t = std::max<index_t>(16, t);
  return std::max<index_t>(1, std::min<index_t>(t, w.rows));
}

struct qlinear_scratch {
  float* x_split = nullptr; // GEMV: x split even/odd per 32-chunk (4-bit fused path)
  float* xsum = nullptr;    // GEMV: Σx per block (asymmetric zero-point term)
  float* row = nullptr;     // GEMV: one dequantized row
  float* tile = nullptr;    // GEMM: tile_rows × cols dequantized rows
};

template <class WS> qlinear_scratch carve(WS& ws, const qweight& w, index_t batch) {
  qlinear_scratch s;
  const std::size_t cols = std::size_t(w.cols);
  if (batch < qlinear_gemm_min_batch) {
    s.x_split = ws.template take<float>(cols);
    s.xsum = ws.template take<float>(w.block > 0 ? cols / std::size_t(w.block) : 0);
    s.row = ws.template take<float>(cols);
  } else {
    s.tile = ws.template take<float>(std::size_t(qlinear_tile_rows(w)) * cols);
  }
  return s;
}
} // namespace detail

/// Scratch bytes of qlinear_forward / qlinear_backward for a batch of `batch` rows: 2·in + in/block
/// floats on the GEMV path (batch < 8), tile_rows·in floats (<= ~4 MiB and <= a quarter of W) on
/// the GEMM path.
inline std::size_t qlinear_workspace_bytes(const qweight& w, index_t batch) {
  detail::require_qweight("qlinear_workspace_bytes", w);
  workspace_planner p;
  detail::carve(p, w, batch);
  return p.bytes();
}

/// Quantized linear forward: y = x·deq(W)ᵀ (overwrites y).
/// Shapes: x [M, in], y [M, out], W [out, in] quantized (see qweight). Row-major.
/// Memory: scratch from `ws` (qlinear_workspace_bytes); the GEMV path (M < 8) allocates nothing;
/// the GEMM path dequantizes tile_rows rows of W at a time into the workspace and multiplies with
/// Eigen (whose own packing buffers, O(cache) bytes, come from the heap) — never an fp32 copy of W.
/// Numerics: fp32 accumulation; the fused AVX-512 GEMVs (batch < 8) sum code·x (int8) or
/// level·x (4-bit) over a block, or over the part of a block in one 128-code chunk (4-bit, block
/// % 64 == 0), then multiply by the block scale; the other paths multiply the exactly dequantized
/// weights; |error| vs dequantize-then-GEMM in double ~ 1e-6 rel.
/// Threads: see the overload with `threads`; this one runs on the calling thread only.
template <class Arch = simd::default_arch>
inline void qlinear_forward(ConstRowRef<float> x, const qweight& W, RowRef<float> y, workspace ws,
                            int threads);
template <class Arch = simd::default_arch>
inline void qlinear_forward(ConstRowRef<float> x, const qweight& W, RowRef<float> y, workspace ws) {
  qlinear_forward<Arch>(x, W, y, ws, 1);
}

/// qlinear_forward with the rows of W split over `threads` threads (<= 0: max_threads()) by
/// lowmem::parallel_for: the fused AVX-512 GEMV (batch < 8) and the dequantization of each GEMM
/// tile (Eigen's own GEMM threads under OpenMP as configured). Rows are independent, so the
/// result is bitwise the same for every thread count. Same memory (no per-thread scratch).
template <class Arch>
inline void qlinear_forward(ConstRowRef<float> x, const qweight& W, RowRef<float> y, workspace ws,
                            int threads) {
  const char* fn = "qlinear_forward";
  detail::require_qweight(fn, W);
  require_equal(fn, "x.cols (== W.cols)", W.cols, x.cols());
  require_equal(fn, "y.rows (== x.rows)", x.rows(), y.rows());
  require_equal(fn, "y.cols (== W.rows)", W.rows, y.cols());
  require_workspace(fn, ws, qlinear_workspace_bytes(W, x.rows()));
  const index_t M = x.rows();
  const std::size_t cols = std::size_t(W.cols), block = std::size_t(W.block);
  const kernels::qw_desc d = detail::describe(W);
  const detail::qlinear_scratch s = detail::carve(ws, W, M);
  if (M < detail::qlinear_gemm_min_batch) {
    const bool fused = kernels::fused_gemv_available<Arch>(d, block);
    for (index_t m = 0; m < M; ++m) {
      const float* xr = x.row(m).data();
      float* yr = y.row(m).data();
      if (fused) {
        if (d.kind == 1) kernels::split_for_nibbles(xr, cols, block, s.x_split);
        if (d.has_zeros || d.sym_zero != 0.0f) // only the zero-point term reads Σx per block
          for (std::size_t b = 0; b * block < cols; ++b) {
            float acc = 0;
            for (std::size_t k = 0; k < block; ++k) acc += xr[b * block + k];
            s.xsum[b] = acc;
          }
        // a row of W: cols multiply-adds on decoded codes
        parallel_for(
            0, W.rows, item_work{index_t(cols)},
            [&](std::ptrdiff_t r0, std::ptrdiff_t r1, int) {
              kernels::fused_gemv_rows<Arch>(d, W.codes, W.scales, W.zeros, cols, block, xr,
                                             s.x_split, s.xsum, std::size_t(r0), std::size_t(r1),
                                             yr);
            },
            threads);
      } else {
        for (index_t o = 0; o < W.rows; ++o) {
          kernels::dequant_segment<Arch>(d, W.codes, W.scales, W.zeros, cols, block, std::size_t(o),
                                         0, cols, s.row);
          yr[o] = kernels::dot<Arch>(xr, s.row, cols);
        }
      }
    }
    return;
  }
  const index_t tn = detail::qlinear_tile_rows(W);
  for (index_t o0 = 0; o0 < W.rows; o0 += tn) {
    const index_t t = std::min(tn, W.rows - o0);
    parallel_for(
        0, t, item_work{2 * index_t(cols)}, // a row: cols codes decoded, cols floats stored
        [&](std::ptrdiff_t a, std::ptrdiff_t b, int) {
          for (std::ptrdiff_t o = a; o < b; ++o)
            kernels::dequant_segment<Arch>(d, W.codes, W.scales, W.zeros, cols, block,
                                           std::size_t(o0 + o), 0, cols,
                                           s.tile + std::size_t(o) * cols);
        },
        threads);
    ConstRowMap<float> T(s.tile, t, W.cols, Eigen::OuterStride<>(W.cols));
    y.middleCols(o0, t).noalias() = x * T.transpose();
  }
}

/// Quantized linear backward (input gradient only; W is frozen): dx += dy·deq(W) (ACCUMULATES).
/// Shapes: dy [M, out], dx [M, in]. Memory and numerics as qlinear_forward (GEMV path: one row
/// dequantized at a time, axpy into dx).
template <class Arch = simd::default_arch>
inline void qlinear_backward(ConstRowRef<float> dy, const qweight& W, RowRef<float> dx,
                             workspace ws) {
  const char* fn = "qlinear_backward";
  detail::require_qweight(fn, W);
  require_equal(fn, "dy.cols (== W.rows)", W.rows, dy.cols());
  require_equal(fn, "dx.rows (== dy.rows)", dy.rows(), dx.rows());
  require_equal(fn, "dx.cols (== W.cols)", W.cols, dx.cols());
  require_workspace(fn, ws, qlinear_workspace_bytes(W, dy.rows()));
  const index_t M = dy.rows();
  const std::size_t cols = std::size_t(W.cols), block = std::size_t(W.block);
  const kernels::qw_desc d = detail::describe(W);
  const detail::qlinear_scratch s = detail::carve(ws, W, M);
  if (M < detail::qlinear_gemm_min_batch) {
    for (index_t o = 0; o < W.rows; ++o) {
      kernels::dequant_segment<Arch>(d, W.codes, W.scales, W.zeros, cols, block, std::size_t(o), 0,
                                     cols, s.row);
      for (index_t m = 0; m < M; ++m) {
        const float g = dy(m, o);
        if (g != 0.0f) kernels::axpy<Arch>(g, s.row, dx.row(m).data(), cols);
      }
    }
    return;
  }
  const index_t tn = detail::qlinear_tile_rows(W);
  for (index_t o0 = 0; o0 < W.rows; o0 += tn) {
    const index_t t = std::min(tn, W.rows - o0);
    for (index_t o = 0; o < t; ++o)
      kernels::dequant_segment<Arch>(d, W.codes, W.scales, W.zeros, cols, block,
                                     std::size_t(o0 + o), 0, cols, s.tile + std::size_t(o) * cols);
    ConstRowMap<float> T(s.tile, t, W.cols, Eigen::OuterStride<>(W.cols));
    dx.noalias() += dy.middleCols(o0, t) * T;
  }
}

/// Scratch bytes of qlinear_forward_int8_dynamic: one row's int8 activations (in bytes), their
/// group scales (in/64 or in/block floats) and the VNNI lane offsets (in bytes), 64-byte aligned.
inline std::size_t qlinear_int8_dynamic_workspace_bytes(const qweight& w) {
  detail::require_qweight("qlinear_int8_dynamic_workspace_bytes", w);
  const std::size_t cols = std::size_t(w.cols);
  const std::size_t g = kernels::dyn_group(std::size_t(w.block));
  workspace_planner p;
  p.take<std::int8_t>(cols);
  p.take<float>(g ? cols / g : 0);
  p.take<std::int32_t>(cols / 4);
  return p.bytes();
}

/// Quantized linear forward with dynamically quantized activations (LLM.int8()-style "vector-wise"
/// int8 × int8, for batch-1 decoding): y = x·deq(W)ᵀ computed as
///   y[m, o] = Σ_j sw[o, blk(j)] · sx[m, j] · Σ_{k ∈ group j} w[o, k] · xq[m, k],
/// where each row of x is quantized per group of 64 elements (or of W.block when 64 does not
/// divide it): sx = max|x| / 127 over the group, xq = rne(x / sx) ∈ [−127, 127].
/// Shapes: x [M, in], y [M, out] (overwritten), W [out, in] in weight_format::int8_sym. Row-major.
/// Memory: `ws` (qlinear_int8_dynamic_workspace_bytes), nothing else; no fp32 copy of W.
/// Numerics: exact int32 sums inside a group (AVX512-VNNI vpdpbusd where compiled, else a portable
/// loop), fp32 across groups. NOT the exact product with x: the activation rounding adds an error
/// of at most sx/2 per element (relative error of y ~ 0.3–1% for Gaussian x; use qlinear_forward
/// for the exact product, and for training). A non-finite group makes y NaN.
/// Threads: rows of W split over `threads` (default 1; <= 0 means max_threads()) by
/// lowmem::parallel_for; the result does not depend on the thread count (rows are independent).
/// Preconditions: W int8_sym, x.cols == W.cols, y [x.rows, W.rows], workspace large enough.
template <class Arch = simd::default_arch>
inline void qlinear_forward_int8_dynamic(ConstRowRef<float> x, const qweight& W, RowRef<float> y,
                                         workspace ws, int threads = 1) {
  const char* fn = "qlinear_forward_int8_dynamic";
  detail::require_qweight(fn, W);
  require(W.format == weight_format::int8_sym, fn, "W.format", "int8_sym", "another format");
  require_equal(fn, "x.cols (== W.cols)", W.cols, x.cols());
  require_equal(fn, "y.rows (== x.rows)", x.rows(), y.rows());
  require_equal(fn, "y.cols (== W.rows)", W.rows, y.cols());
  require_workspace(fn, ws, qlinear_int8_dynamic_workspace_bytes(W));
  const std::size_t cols = std::size_t(W.cols), block = std::size_t(W.block);
  const std::size_t g = kernels::dyn_group(block);
  std::int8_t* xq = ws.take<std::int8_t>(cols);
  float* sx = ws.take<float>(cols / g);
  std::int32_t* corr = ws.take<std::int32_t>(cols / 4);
  const bool vnni = kernels::dyn_int8_vnni_available(block);
  for (index_t m = 0; m < x.rows(); ++m) {
    kernels::dyn_quantize_x<Arch>(x.row(m).data(), cols, g, xq, sx, vnni ? corr : nullptr);
    float* yr = y.row(m).data();
    parallel_for(
        0, W.rows, item_work{index_t(cols)}, // a row of W: cols int8 multiply-adds
        [&](std::ptrdiff_t r0, std::ptrdiff_t r1, int) {
#if LOWMEM_QUANT_HAVE_VNNI
          if (vnni) {
            kernels::dyn_int8_gemv_rows_vnni(W.codes, W.scales, cols, block, xq, sx, corr,
                                             std::size_t(r0), std::size_t(r1), yr);
            return;
          }
#endif
          kernels::dyn_int8_gemv_rows_scalar(W.codes, W.scales, cols, block, g, xq, sx,
                                             std::size_t(r0), std::size_t(r1), yr);
        },
        threads);
  }
}

/// Owning quantized weight (allocates; build once, outside training loops): quantizes a dense W
/// [rows, cols] into `format` with the given block (must divide cols) and exposes a qweight view.
struct qweight_storage {
  weight_format format = weight_format::nf4;
  index_t rows = 0, cols = 0, block = 64;
  std::vector<std::uint8_t> codes;
  std::vector<float> scales, zeros;

  qweight_storage() = default;
  template <class Arch = simd::default_arch>
  static qweight_storage quantize(ConstRowRef<float> W, weight_format f, index_t block) {
    const char* fn = "qweight_storage::quantize";
    require_positive(fn, "block", block);
    require_multiple_of(fn, "W.cols", block, index_t(W.cols()));
    require_equal(fn, "W.outerStride (contiguous)", index_t(W.cols()), index_t(W.outerStride()));
    qweight_storage q;
    q.format = f, q.rows = W.rows(), q.cols = W.cols(), q.block = block;
    const std::size_t n = std::size_t(q.rows * q.cols), nb = n / std::size_t(block);
    q.scales.resize(nb);
    if (f == weight_format::nf4 || f == weight_format::fp4) {
      q.codes.resize((n + 1) / 2);
      fourbit_quantize<Arch>(W.data(), n, f == weight_format::nf4 ? fourbit::nf4 : fourbit::fp4,
                             block, q.codes.data(), q.scales.data());
    } else {
      const int bits = (f == weight_format::int8_sym || f == weight_format::int8_asym) ? 8 : 4;
      const bool sym = f == weight_format::int8_sym || f == weight_format::int4_sym;
      if (!sym) q.zeros.resize(nb);
      q.codes.resize(bits == 8 ? n : (n + 1) / 2);
      affine_quantize<Arch>(W.data(), q.rows, q.cols, {bits, sym, granularity::per_group, block},
                            q.codes.data(), q.scales.data(), sym ? nullptr : q.zeros.data());
    }
    return q;
  }
  qweight view() const {
    return {format,
            rows,
            cols,
            block,
            codes.data(),
            scales.data(),
            zeros.empty() ? nullptr : zeros.data()};
  }
  /// Bytes held (codes + scales + zeros).
  std::size_t bytes() const { return codes.size() + 4 * (scales.size() + zeros.size()); }
};

/// Dequantizes the whole weight into out [rows, cols] (for tests and references; allocates
/// nothing, but out is an fp32 copy of W by definition).
template <class Arch = simd::default_arch>
inline void dequantize_weight(const qweight& W, RowRef<float> out) {
  const char* fn = "dequantize_weight";
  detail::require_qweight(fn, W);
  require_equal(fn, "out.rows", W.rows, index_t(out.rows()));
  require_equal(fn, "out.cols", W.cols, index_t(out.cols()));
  const kernels::qw_desc d = detail::describe(W);
  for (index_t o = 0; o < W.rows; ++o)
    kernels::dequant_segment<Arch>(d, W.codes, W.scales, W.zeros, std::size_t(W.cols),
                                   std::size_t(W.block), std::size_t(o), 0, std::size_t(W.cols),
                                   out.row(o).data());
}

} // namespace lowmem::quant
