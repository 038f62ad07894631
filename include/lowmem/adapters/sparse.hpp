// lowmem/adapters/sparse.hpp — sparse adapters on a fixed CSR support:
//  * SHiRA (arXiv:2406.13175): trainable values S on ~1–2% of W's entries, y = x·(W + S)ᵀ;
//    the gradient lives on the support only (SDDMM: dS_k = Σ_rows dy[:, j]·x[:, c_k]); merge is
//    a scatter-add into W.
//  * SLTrain (arXiv:2406.02214): W = s·B·A + S for training from scratch, applied without forming
//  W.
//
// Supports are CSR (row_ptr [out + 1] int64, col [nnz] int32, sorted in each row), chosen at
// random from a seed (exactly k = round(density·in) entries per row, selection sampling over the
// counter RNG, so any row can be regenerated alone) or by magnitude (the k largest |W_jc| of each
// row). The sparse products run on panels of 32 rows of x transposed into the workspace, so every
// inner loop is a contiguous 32-wide SIMD axpy or dot (kernels/adapters.hpp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/threading.hpp"
#include "../kernels/adapters.hpp"
#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

/// A CSR sparsity pattern of a [rows, cols] matrix (non-owning view).
struct csr_support {
  index_t rows = 0;                      ///< rows of the sparse matrix (= out)
  index_t cols = 0;                      ///< columns (= in)
  const std::int64_t* row_ptr = nullptr; ///< rows + 1 offsets, row_ptr[0] = 0
  const std::int32_t* col = nullptr;     ///< nnz column indices, increasing within a row
  index_t nnz() const noexcept { return rows > 0 && row_ptr ? index_t(row_ptr[rows]) : 0; }
};

namespace adapters::detail {

inline void require_density(const char* fn, double density) {
  require(density > 0.0 && density <= 1.0, fn, "density", "in (0, 1]", density);
}

/// Validates a support against the expected shape: O(rows + nnz), at entry only.
inline void require_support(const char* fn, const csr_support& s, index_t rows, index_t cols) {
  require_equal(fn, "support.rows", rows, s.rows);
  require_equal(fn, "support.cols", cols, s.cols);
  require_data(fn, "support.row_ptr", s.row_ptr, std::size_t(rows + 1));
  if (rows == 0) return;
  require_equal(fn, "support.row_ptr[0]", std::int64_t(0), s.row_ptr[0]);
  require_data(fn, "support.col", s.col, std::size_t(s.row_ptr[rows]));
  for (index_t j = 0; j < rows; ++j) {
    if (s.row_ptr[j + 1] < s.row_ptr[j])
      lowmem::detail::throw_invalid(fn, "support.row_ptr", "non-decreasing",
                                    "a decrease at row " + lowmem::detail::to_text(j));
    for (std::int64_t k = s.row_ptr[j]; k < s.row_ptr[j + 1]; ++k)
      if (s.col[k] < 0 || s.col[k] >= cols || (k > s.row_ptr[j] && s.col[k] <= s.col[k - 1]))
        lowmem::detail::throw_invalid(
            fn, "support.col",
            "increasing indices in [0, " + lowmem::detail::to_text(cols) + ") within each row",
            "col[" + lowmem::detail::to_text(k) + "] = " + lowmem::detail::to_text(s.col[k]));
  }
}

template <class WS> struct sparse_scratch { float *xt, *yt, *dxt; };
template <class WS>
sparse_scratch<WS> carve_sparse(WS& ws, index_t in, index_t out, bool backward) {
  constexpr index_t P = index_t(adapters::kernels::panel);
  sparse_scratch<WS> s{};
  s.xt = ws.template take<float>(std::size_t(in * P));
  s.yt = ws.template take<float>(std::size_t(out * P));
  if (backward) s.dxt = ws.template take<float>(std::size_t(in * P));
  return s;
}

/// Copies rows [i0, i0 + nb) of m transposed into a column panel [m.cols, P], zero padded.
/// Threads split the columns (a column: nb floats read, P written).
inline void to_panel(const ConstRowRef<float>& m, index_t i0, index_t nb, float* panel) {
  constexpr index_t P = index_t(adapters::kernels::panel);
  const float* src = m.data() + i0 * m.outerStride();
  parallel_for(0, m.cols(), item_work{nb + P}, [&](index_t b, index_t e, int) {
    adapters::kernels::rows_to_panel(src + b, std::size_t(m.outerStride()), std::size_t(nb),
                                     std::size_t(e - b), panel + b * P);
  });
}

/// m.middleRows(i0, nb) += the first nb columns of the column panel [m.cols, P], transposed.
inline void add_panel(const float* panel, index_t i0, index_t nb, RowRef<float>& m) {
  constexpr index_t P = index_t(adapters::kernels::panel);
  float* dst = m.data() + i0 * m.outerStride();
  // a column: nb floats of the panel read, nb of m read and written
  parallel_for(0, m.cols(), item_work{3 * nb}, [&](index_t b, index_t e, int) {
    adapters::kernels::panel_add_to_rows(panel + b * P, std::size_t(nb), std::size_t(e - b),
                                         dst + b, std::size_t(m.outerStride()));
  });
}

/// y += x·Sᵀ, S the CSR matrix (support, values).
template <class Arch>
void sparse_forward_add(const ConstRowRef<float>& x, const csr_support& S, const float* values,
                        RowRef<float>& y, float* xt, float* yt) {
  constexpr index_t P = index_t(adapters::kernels::panel);
  const index_t rows = x.rows(), in = x.cols(), out = S.rows;
  // a row of S: its entries (nnz / out on average) times the panel's P columns, P floats stored
  const item_work row_work{P + S.nnz() * P / std::max<index_t>(out, 1)};
  for (index_t i0 = 0; i0 < rows; i0 += P) {
    const index_t nb = rows - i0 < P ? rows - i0 : P;
    to_panel(x, i0, nb, xt);
    Eigen::Map<RowMatrixXf> Yt(yt, out, P);
    Yt.setZero();
    parallel_for(0, out, row_work, [&](index_t b, index_t e, int) {
      adapters::kernels::csr_times_panel<Arch>(S.row_ptr + b, S.col, values, std::size_t(e - b), xt,
                                               yt + b * P);
    });
    add_panel(yt, i0, nb, y);
  }
  (void)in;
}

/// dvalues += SDDMM(dy, x) on the support; dx += dy·S when dx is non-empty.
template <class Arch>
void sparse_backward(const ConstRowRef<float>& x, const ConstRowRef<float>& dy,
                     const csr_support& S, const float* values, float* dvalues, RowRef<float>& dx,
                     float* xt, float* yt, float* dxt) {
  constexpr index_t P = index_t(adapters::kernels::panel);
  const index_t rows = x.rows(), in = x.cols(), out = S.rows;
  const bool want_dx = dx.size() != 0;
  // a row of S (SDDMM): its entries times P; a column of dx: the entries in it (nnz / in) times P
  const item_work row_work{P + S.nnz() * P / std::max<index_t>(out, 1)};
  const item_work col_work{P + S.nnz() * P / std::max<index_t>(in, 1)};
  for (index_t i0 = 0; i0 < rows; i0 += P) {
    const index_t nb = rows - i0 < P ? rows - i0 : P;
    to_panel(x, i0, nb, xt);
    to_panel(dy, i0, nb, yt);
    parallel_for(0, out, row_work, [&](index_t b, index_t e, int) {
      adapters::kernels::sddmm_panel<Arch>(S.row_ptr + b, S.col, std::size_t(e - b), yt + b * P, xt,
                                           dvalues);
    });
    if (!want_dx) continue;
    Eigen::Map<RowMatrixXf> dXt(dxt, in, P);
    dXt.setZero();
    parallel_for(0, in, col_work, [&](index_t b, index_t e, int) {
      adapters::kernels::csr_transpose_times_panel<Arch>(S.row_ptr, S.col, values, std::size_t(out),
                                                         yt, dxt, std::int32_t(b), std::int32_t(e));
    });
    add_panel(dxt, i0, nb, dx);
  }
}

} // namespace adapters::detail

/// Entries per row of a random SHiRA support: k = max(1, round(density·in)).
inline index_t sparse_support_per_row(index_t in, double density) {
  adapters::detail::require_density("sparse_support_per_row", density);
  require_positive("sparse_support_per_row", "in", in);
  const index_t k = index_t(std::llround(density * double(in)));
  return k < 1 ? 1 : (k > in ? in : k);
}

/// Random support: row j keeps exactly k = sparse_support_per_row(in, density) columns, chosen
/// by selection sampling (Knuth's Algorithm S) on values j·in + c of `stream`, so the pattern is
/// a pure function of (stream, out, in, density). Writes row_ptr [out + 1] and col [out·k]
/// (increasing in each row). No allocation. Preconditions: density in (0, 1].
inline void sparse_support_random(index_t out, index_t in, double density,
                                  const random::stream& stream, std::int64_t* row_ptr,
                                  std::int32_t* col) {
  const char* fn = "sparse_support_random";
  adapters::detail::require_density(fn, density);
  require_positive(fn, "out", out);
  const index_t k = sparse_support_per_row(in, density);
  require_data(fn, "row_ptr", row_ptr, std::size_t(out + 1));
  require_data(fn, "col", col, std::size_t(out * k));
  row_ptr[0] = 0;
  for (index_t j = 0; j < out; ++j) {
    index_t chosen = 0;
    std::int32_t* cj = col + j * k;
    for (index_t c = 0; c < in && chosen < k; ++c) {
      const double u = stream.uniform(std::uint64_t(j * in + c));
      if (double(in - c) * u < double(k - chosen)) cj[chosen++] = std::int32_t(c);
    }
    row_ptr[j + 1] = row_ptr[j] + k;
  }
}

/// Scratch bytes of sparse_support_magnitude: `in` int32 indices.
inline std::size_t sparse_support_magnitude_workspace_bytes(index_t in) {
  workspace_planner p;
  p.take<std::int32_t>(std::size_t(in));
  return p.bytes();
}

/// Magnitude support (SHiRA-WM): row j keeps the k = sparse_support_per_row(in, density) columns
/// of largest |W_jc| (ties to the lower column). Writes row_ptr [out + 1], col [out·k].
/// Memory: sparse_support_magnitude_workspace_bytes(in). O(out·in) time (nth_element per row).
template <class = void> // instantiated only when called: see README, "Compile time"
inline void sparse_support_magnitude(ConstRowRef<float> W, double density, std::int64_t* row_ptr,
                                     std::int32_t* col, workspace ws) {
  const char* fn = "sparse_support_magnitude";
  adapters::detail::require_density(fn, density);
  const index_t out = W.rows(), in = W.cols();
  require_positive(fn, "W.rows", out);
  const index_t k = sparse_support_per_row(in, density);
  require_data(fn, "row_ptr", row_ptr, std::size_t(out + 1));
  require_data(fn, "col", col, std::size_t(out * k));
  require_workspace(fn, ws, sparse_support_magnitude_workspace_bytes(in));
  std::int32_t* idx = ws.take<std::int32_t>(std::size_t(in));
  row_ptr[0] = 0;
  for (index_t j = 0; j < out; ++j) {
    const float* w = W.row(j).data();
    for (index_t c = 0; c < in; ++c) idx[c] = std::int32_t(c);
    auto larger = [w](std::int32_t a, std::int32_t b) {
      const float fa = std::fabs(w[a]), fb = std::fabs(w[b]);
      return fa > fb || (fa == fb && a < b);
    };
    std::nth_element(idx, idx + (k - 1), idx + in, larger);
    std::sort(idx, idx + k);
    std::copy(idx, idx + k, col + j * k);
    row_ptr[j + 1] = row_ptr[j] + k;
  }
}

/// Scratch bytes of shira_forward / sltrain_forward: 32·(in + out) floats (two row panels).
inline std::size_t shira_forward_workspace_bytes(index_t in, index_t out) {
  workspace_planner p;
  adapters::detail::carve_sparse(p, in, out, false);
  return p.bytes();
}
/// Scratch bytes of shira_backward: 32·(2·in + out) floats.
inline std::size_t shira_backward_workspace_bytes(index_t in, index_t out) {
  workspace_planner p;
  adapters::detail::carve_sparse(p, in, out, true);
  return p.bytes();
}

/// SHiRA forward: y = x·Wᵀ + b + x·Sᵀ, S = CSR(support, values) [out, in].
/// Shapes: x [rows, in], W [out, in] (frozen), bias [out] or nullptr, values [nnz], y [rows, out].
/// Memory: shira_forward_workspace_bytes(in, out); no dense S. fp32 accumulation.
/// Preconditions: support valid for [out, in] (checked, O(nnz)).
template <class Arch = simd::default_arch>
void shira_forward(ConstRowRef<float> x, ConstRowRef<float> W, const float* bias,
                   const csr_support& support, const float* values, RowRef<float> y, workspace ws) {
  using namespace adapters::detail;
  const char* fn = "shira_forward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows();
  require_dims(fn, "W", W, out, in);
  require_dims(fn, "y", y, rows, out);
  require_support(fn, support, out, in);
  require_data(fn, "values", values, std::size_t(support.nnz()));
  require_workspace(fn, ws, shira_forward_workspace_bytes(in, out));
  auto s = carve_sparse(ws, in, out, false);
  y.noalias() = x * W.transpose();
  add_bias(y, bias);
  sparse_forward_add<Arch>(x, support, values, y, s.xt, s.yt);
}

/// SHiRA backward; ACCUMULATES (+=) into dvalues [nnz] and dx:
///   dvalues_k += Σ_rows dy[:, j]·x[:, c_k] (SDDMM, only on the support), dx += dy·W + dy·S.
/// dx may be empty (0×0) to skip. Memory: shira_backward_workspace_bytes(in, out).
template <class Arch = simd::default_arch>
void shira_backward(ConstRowRef<float> x, ConstRowRef<float> W, const csr_support& support,
                    const float* values, ConstRowRef<float> dy, RowRef<float> dx, float* dvalues,
                    workspace ws) {
  using namespace adapters::detail;
  const char* fn = "shira_backward";
  const index_t rows = x.rows(), in = x.cols(), out = W.rows();
  require_dims(fn, "W", W, out, in);
  require_dims(fn, "dy", dy, rows, out);
  if (dx.size() != 0) require_dims(fn, "dx", dx, rows, in);
  require_support(fn, support, out, in);
  require_data(fn, "values", values, std::size_t(support.nnz()));
  require_data(fn, "dvalues", dvalues, std::size_t(support.nnz()));
  require_workspace(fn, ws, shira_backward_workspace_bytes(in, out));
  auto s = carve_sparse(ws, in, out, true);
  if (dx.size() != 0) dx.noalias() += dy * W;
  sparse_backward<Arch>(x, dy, support, values, dvalues, dx, s.xt, s.yt, s.dxt);
}

/// SHiRA merge: W[j, c_k] += sign·values[k] (scatter-add; sign = -1 unmerges exactly up to one
/// fp32 rounding per touched entry). No allocation.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void shira_merge(RowRef<float> W, const csr_support& support, const float* values,
                        float sign = 1.0f) {
  const char* fn = "shira_merge";
  adapters::detail::require_support(fn, support, W.rows(), W.cols());
  require_data(fn, "values", values, std::size_t(support.nnz()));
  for (index_t j = 0; j < W.rows(); ++j)
    for (std::int64_t k = support.row_ptr[j]; k < support.row_ptr[j + 1]; ++k)
      W(j, support.col[k]) += sign * values[k];
}

/// Scratch bytes of sltrain_forward.
inline std::size_t sltrain_forward_workspace_bytes(index_t in, index_t out) {
  return shira_forward_workspace_bytes(in, out);
}
/// Scratch bytes of sltrain_backward: rows·r (du) + the sparse panels.
inline std::size_t sltrain_backward_workspace_bytes(index_t rows, index_t in, index_t out,
                                                    index_t r) {
  workspace_planner p;
  p.take<float>(std::size_t(rows * r));
  adapters::detail::carve_sparse(p, in, out, true);
  return p.bytes();
}

/// SLTrain forward: y = x·(s·B·A + S)ᵀ + b = s·u·Bᵀ + x·Sᵀ + b with u = x·Aᵀ kept for the
/// backward; W = s·B·A + S is never formed. Shapes: x [rows, in], A [r, in], B [out, r],
/// S = CSR(support, values) [out, in], y [rows, out], u [rows, r].
/// Memory: sltrain_forward_workspace_bytes(in, out). Preconditions: 1 <= r <= min(in, out).
template <class Arch = simd::default_arch>
void sltrain_forward(ConstRowRef<float> x, ConstRowRef<float> A, ConstRowRef<float> B, float scale,
                     const csr_support& support, const float* values, const float* bias,
                     RowRef<float> y, RowRef<float> u, workspace ws) {
  using namespace adapters::detail;
  const char* fn = "sltrain_forward";
  const index_t rows = x.rows(), in = x.cols(), out = B.rows(), r = A.rows();
  require_rank(fn, r, in, out);
  require_dims(fn, "A", A, r, in);
  require_dims(fn, "B", B, out, r);
  require_scale(fn, scale);
  require_dims(fn, "y", y, rows, out);
  require_dims(fn, "u", u, rows, r);
  require_support(fn, support, out, in);
  require_data(fn, "values", values, std::size_t(support.nnz()));
  require_workspace(fn, ws, sltrain_forward_workspace_bytes(in, out));
  auto s = carve_sparse(ws, in, out, false);
  u.noalias() = x * A.transpose();
  y.noalias() = (scale * u) * B.transpose();
  add_bias(y, bias);
  sparse_forward_add<Arch>(x, support, values, y, s.xt, s.yt);
}

/// SLTrain backward; ACCUMULATES (+=) into dA, dB, dvalues and dx:
///   du = s·dy·B, dB += s·dyᵀ·u, dA += duᵀ·x, dvalues += SDDMM(dy, x), dx += du·A + dy·S.
/// dx may be empty (0×0). Memory: sltrain_backward_workspace_bytes(rows, in, out, r).
template <class Arch = simd::default_arch>
void sltrain_backward(ConstRowRef<float> x, ConstRowRef<float> A, ConstRowRef<float> B, float scale,
                      const csr_support& support, const float* values, ConstRowRef<float> u,
                      ConstRowRef<float> dy, RowRef<float> dx, RowRef<float> dA, RowRef<float> dB,
                      float* dvalues, workspace ws) {
  using namespace adapters::detail;
  const char* fn = "sltrain_backward";
  const index_t rows = x.rows(), in = x.cols(), out = B.rows(), r = A.rows();
  require_rank(fn, r, in, out);
  require_dims(fn, "A", A, r, in);
  require_dims(fn, "B", B, out, r);
  require_scale(fn, scale);
  require_dims(fn, "u", u, rows, r);
  require_dims(fn, "dy", dy, rows, out);
  if (dx.size() != 0) require_dims(fn, "dx", dx, rows, in);
  require_dims(fn, "dA", dA, r, in);
  require_dims(fn, "dB", dB, out, r);
  require_support(fn, support, out, in);
  require_data(fn, "values", values, std::size_t(support.nnz()));
  require_data(fn, "dvalues", dvalues, std::size_t(support.nnz()));
  require_workspace(fn, ws, sltrain_backward_workspace_bytes(rows, in, out, r));
  Eigen::Map<RowMatrixXf> du(ws.take<float>(std::size_t(rows * r)), rows, r);
  auto s = carve_sparse(ws, in, out, true);
  du.noalias() = (scale * dy) * B;
  dB.noalias() += (scale * dy.transpose()) * u;
  dA.noalias() += du.transpose() * x;
  if (dx.size() != 0) dx.noalias() += du * A;
  sparse_backward<Arch>(x, dy, support, values, dvalues, dx, s.xt, s.yt, s.dxt);
}

} // namespace lowmem
