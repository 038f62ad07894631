// lowmem/optimizers/projected.hpp — low-rank projected Adam for matrix parameters: GaLore
// (arXiv:2403.03507), APOLLO and APOLLO-Mini (arXiv:2412.05270), FRUGAL (arXiv:2411.07837).
//
// For a weight W [m, n] (row-major) with gradient G, let d = min(m, n), D = max(m, n), and Ĝ the
// d×D orientation of G (Ĝ = G if m <= n, else Gᵀ — no copy: a row-major m×n matrix is a
// column-major n×m one). A projection P [d, r] maps Ĝ to R = Pᵀ Ĝ [r, D]; Adam moments M, V [r, D]
// live in that space (2·r·D floats instead of 2·m·n):
//   M ← β1 M + (1−β1) R;  V ← β2 V + (1−β2) R²;  N = M / (sqrt(V) + eps)   (authors' form)
//   step_size = lr · sqrt(1−β2^t) / (1−β1^t)
// then, with decoupled weight decay first (W ← W·(1 − lr·wd)):
//  * GaLore: P = top-r left singular vectors of Ĝ (randomized SVD: Gaussian sketch of r+p columns,
//    q power iterations with re-orthonormalisation, exact eigen-decomposition of the small
//    sketch Gram matrix), refreshed every T steps (at t = 1, 1+T, ...);
//    W ← W − step_size · α · P N.
//  * APOLLO: P [d, r] Gaussian N(0, 1/r), regenerated from (seed, refresh index) and never stored;
//    channel-wise scale s_j = ‖N[:, j]‖ / (‖R[:, j]‖ + 1e-8) for each of the D channels
//    (APOLLO-Mini: r = 1 and one tensor-wise s = ‖N‖ / (‖R‖ + 1e-8)); the raw gradient is scaled,
//    S = Ĝ·diag(s), then the norm-growth limiter (Fira): if ‖S‖ > 1.01·‖S_prev‖, S is rescaled to
//    1.01·‖S_prev‖; W ← W − step_size · sqrt(scale) · S (scale = 1 for APOLLO, 128 for Mini, as the
//    authors' code applies it).
//  * FRUGAL (GaLore's projection, state-full on the subspace, state-free on the residual):
//    W ← W − step_size·α·P N − lr_free · sign(Ĝ − P Pᵀ Ĝ).
//
// Q-GaLore (arXiv:2407.08296), GaLore options: `projection_bits = 8` stores P as int8 with one
// fp32 scale per column (symmetric absmax, round to nearest even; 1 byte per entry instead of 4)
// and projects through 64-row blocks of P dequantized into a small scratch, never a full fp32 P;
// `subspace_threshold > 0` makes the refresh lazy per layer: at each refresh the cosine
// similarity of the new and previous projections (mean over columns of |cos|, singular vectors
// being defined up to sign) is compared with the threshold, and after `subspace_patience`
// consecutive refreshes above it the refresh period doubles (up to `max_update_gap`), skipping
// SVDs while the subspace is stable. (Q-GaLore's int8 weights with stochastic rounding are not
// here: the weight W stays fp32.)
//
// Memory: state 2·r·D floats (+ P [d, r] for GaLore/FRUGAL: floats, or int8 + r scales); the object
// allocates its state and scratch once at construction. Steps allocate nothing themselves; Eigen's
// GEMM may allocate its packing buffers for large products (bounded by its blocking sizes, not by
// m·n), and the SVD refresh uses Eigen's SelfAdjointEigenSolver on an (r+p)² matrix.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"
#include "../core/random.hpp"
#include "../kernels/random.hpp"

namespace lowmem::optim {

enum class projection_method { galore, apollo, apollo_mini, frugal };

/// Hyper-parameters of the projected optimizers (defaults: GaLore's paper; APOLLO-Mini uses
/// rank 1 and scale 128).
struct projected_config {
  projection_method method = projection_method::galore;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  index_t rank = 128;
  std::int64_t update_gap = 200; // T: projection refresh period
  double alpha = 0.25;           // GaLore / FRUGAL scale of the projected-back update
  double scale = 1;              // APOLLO's scale (sqrt applied, as the authors' code); Mini: 128
  double limiter = 1.01;         // norm-growth limiter γ (APOLLO)
  double lr_free = 1e-3;         // FRUGAL's signSGD learning rate on the residual
  int projection_bits = 32;      // Q-GaLore: 8 = int8 P (GaLore only), 32 = fp32 P
  double subspace_threshold = 0; // Q-GaLore lazy refresh: 0 = off, else |cos| threshold in (0, 1]
  int subspace_patience = 2;     // consecutive similar refreshes before the period doubles
  std::int64_t max_update_gap = 1 << 16; // lazy refresh cap (at least update_gap)
  int power_iterations = 2;              // randomized SVD
  int oversample = 8;
  std::uint64_t seed = 0;
};

/// Projected Adam state for one matrix parameter [rows, cols].
template <class = void> class basic_projected_adam {
public:
  using ColMatrix = Eigen::MatrixXf;

  /// Validates the configuration (throws lowmem::invalid_argument: rank in [1, min(rows, cols)],
  /// Mini needs rank 1, lr >= 0, betas in [0, 1), eps >= 0, update_gap >= 1) and allocates the
  /// state and scratch once.
  basic_projected_adam(index_t rows, index_t cols, const projected_config& cfg)
      : rows_(rows), cols_(cols), cfg_(cfg), eig_(sketch_size(rows, cols, cfg)) {
    const char* fn = "optim::projected_adam";
    require_positive(fn, "rows", rows);
    require_positive(fn, "cols", cols);
    d_ = std::min(rows, cols);
    D_ = std::max(rows, cols);
    require(cfg.rank >= 1 && cfg.rank <= d_, fn, "rank",
            "in [1, min(rows, cols) = " + lowmem::detail::to_text(d_) + "]", cfg.rank);
    if (cfg.method == projection_method::apollo_mini)
      require_equal(fn, "rank (APOLLO-Mini)", index_t(1), cfg.rank);
    require_non_negative(fn, "lr", cfg.lr);
    require_in_half_open(fn, "beta1", 0.0, 1.0, cfg.beta1);
    require_in_half_open(fn, "beta2", 0.0, 1.0, cfg.beta2);
    require_non_negative(fn, "eps", cfg.eps);
    require_non_negative(fn, "weight_decay", cfg.weight_decay);
    require(cfg.update_gap >= 1, fn, "update_gap", ">= 1", cfg.update_gap);
    require_positive(fn, "alpha", cfg.alpha);
    require_positive(fn, "scale", cfg.scale);
    require(cfg.limiter >= 1.0, fn, "limiter", ">= 1", cfg.limiter);
    require_non_negative(fn, "lr_free", cfg.lr_free);
    require_non_negative(fn, "power_iterations", cfg.power_iterations);
    require_non_negative(fn, "oversample", cfg.oversample);
    require(cfg.projection_bits == 32 || cfg.projection_bits == 8, fn, "projection_bits", "8 or 32",
            cfg.projection_bits);
    if (cfg.projection_bits == 8)
      require(cfg.method == projection_method::galore, fn, "projection_bits",
              "32 unless method is galore", cfg.projection_bits);
    require_in_closed(fn, "subspace_threshold", 0.0, 1.0, cfg.subspace_threshold);
    require(cfg.subspace_patience >= 1, fn, "subspace_patience", ">= 1", cfg.subspace_patience);
    gap_ = cfg.update_gap;
    const index_t r = cfg.rank;
    k_ = std::min<index_t>(d_, r + cfg.oversample);
    M_.setZero(r, D_);
    V_.setZero(r, D_);
    R_.resize(r, D_);
    if (quantized_projection()) {
      Pq_.setZero(d_, r);
      pscale_.setZero(r);
      Pb_.resize(std::min<index_t>(d_, block_rows), r);
    } else {
      P_.resize(d_, r);
    }
    if (stores_projection()) {
      Y_.resize(d_, k_);
      Z_.resize(D_, k_);
      C_.resize(k_, k_);
      B_.resize(k_, D_);
    }
    colscale_.resize(D_);
    colbuf_.resize(d_);
  }

  index_t rows() const noexcept { return rows_; }
  index_t cols() const noexcept { return cols_; }
  std::int64_t steps() const noexcept { return t_; }
  /// Persistent optimizer state in bytes (moments, stored projection, limiter scalar).
  std::size_t state_bytes() const noexcept {
    std::size_t b = std::size_t(M_.size() + V_.size()) * sizeof(float) + sizeof(double);
    if (quantized_projection())
      b += std::size_t(Pq_.size()) + std::size_t(pscale_.size()) * sizeof(float);
    else if (stores_projection())
      b += std::size_t(P_.size()) * sizeof(float);
    return b;
  }
  /// Current refresh period (grows under Q-GaLore's lazy refresh) and refreshes so far.
  std::int64_t update_gap() const noexcept { return gap_; }
  std::int64_t refreshes() const noexcept { return refreshes_; }
  /// Mean |cos| between the last two projections (lazy refresh only; 0 before).
  double last_similarity() const noexcept { return last_similarity_; }
  /// The projection in use as fp32 [d, r] (int8 P dequantized; allocates: tests, checkpoints).
  ColMatrix dequantized_projection() const {
    if (!quantized_projection()) return P_;
    return Pq_.cast<float>() * pscale_.asDiagonal();
  }
  /// The projection in use [d, r] (GaLore/FRUGAL: stored; APOLLO: regenerated from the seed;
  /// empty with projection_bits = 8: see dequantized_projection()).
  const ColMatrix& projection() const noexcept { return P_; }

  /// One step: W ← update(W, G) as in the header comment; t increments first (t = 1 at the first
  /// call), the projection refreshes when (t − 1) % T == 0 (lazy refresh: T grows as described
  /// in the header comment, the next refresh coming T steps after the last).
  /// Shapes: W and G [rows, cols] row-major. Preconditions: shapes match (throws before writing).
  void step(RowRef<float> W, ConstRowRef<float> G) {
    const char* fn = "optim::projected_adam::step";
    require_equal(fn, "W.rows", rows_, index_t(W.rows()));
    require_equal(fn, "W.cols", cols_, index_t(W.cols()));
    require_equal(fn, "G.rows", rows_, index_t(G.rows()));
    require_equal(fn, "G.cols", cols_, index_t(G.cols()));
    ++t_;
    const bool refresh = t_ == next_refresh_;
    if (refresh) next_refresh_ = advance(t_, gap_); // gap_ may grow inside the refresh (lazy)
    if (rows_ <= cols_) {
      Eigen::Map<RowMatrixXf, 0, Eigen::OuterStride<>> w(W.data(), rows_, cols_,
                                                         Eigen::OuterStride<>(W.outerStride()));
      Eigen::Map<const RowMatrixXf, 0, Eigen::OuterStride<>> g(
          G.data(), rows_, cols_, Eigen::OuterStride<>(G.outerStride()));
      if (refresh) refresh_projection(g, true);
      apply(w, g);
    } else { // the transposed view: a row-major m×n block is a column-major n×m one
      Eigen::Map<ColMatrix, 0, Eigen::OuterStride<>> w(W.data(), cols_, rows_,
                                                       Eigen::OuterStride<>(W.outerStride()));
      Eigen::Map<const ColMatrix, 0, Eigen::OuterStride<>> g(G.data(), cols_, rows_,
                                                             Eigen::OuterStride<>(G.outerStride()));
      if (refresh) refresh_projection(g, true);
      apply(w, g);
    }
    if (refresh) ++refreshes_;
  }

  /// Recomputes the projection from G without updating W (for timing the SVD refresh alone).
  void refresh(ConstRowRef<float> G) {
    require_equal("optim::projected_adam::refresh", "G.rows", rows_, index_t(G.rows()));
    require_equal("optim::projected_adam::refresh", "G.cols", cols_, index_t(G.cols()));
    if (rows_ <= cols_) {
      refresh_projection(Eigen::Map<const RowMatrixXf, 0, Eigen::OuterStride<>>(
                             G.data(), rows_, cols_, Eigen::OuterStride<>(G.outerStride())),
                         false);
    } else {
      refresh_projection(Eigen::Map<const ColMatrix, 0, Eigen::OuterStride<>>(
                             G.data(), cols_, rows_, Eigen::OuterStride<>(G.outerStride())),
                         false);
    }
  }

private:
  // Columns of the randomized-SVD sketch (0 when the projection is not an SVD). The eigen-solver
  // is sized in the initializer list: copy-assigning a size-constructed Eigen solver reads its
  // uninitialised `info` member (UBSan: invalid enum load).
  static index_t sketch_size(index_t rows, index_t cols, const projected_config& c) noexcept {
    if (c.method != projection_method::galore && c.method != projection_method::frugal) return 0;
    const index_t d = std::min(rows, cols);
    return std::max<index_t>(0, std::min<index_t>(d, c.rank + c.oversample));
  }
  static std::int64_t advance(std::int64_t t, std::int64_t gap) noexcept { // t + gap, saturated
    return gap > std::numeric_limits<std::int64_t>::max() - t
               ? std::numeric_limits<std::int64_t>::max()
               : t + gap;
  }
  static constexpr index_t block_rows = 64; // int8 P dequantized 64 rows at a time
  bool quantized_projection() const noexcept { return cfg_.projection_bits == 8; }
  bool stores_projection() const noexcept {
    return cfg_.method == projection_method::galore || cfg_.method == projection_method::frugal;
  }

  /// Orthonormalises the columns of Y in place (modified Gram–Schmidt, applied twice).
  static void orthonormalize(ColMatrix& Y) {
    for (int pass = 0; pass < 2; ++pass)
      for (index_t j = 0; j < Y.cols(); ++j) {
        for (index_t i = 0; i < j; ++i) Y.col(j) -= Y.col(i).dot(Y.col(j)) * Y.col(i);
        const float nrm = Y.col(j).norm();
        if (nrm > 0) Y.col(j) /= nrm;
      }
  }

  template <class GMap> void refresh_projection(const GMap& g, bool from_step) {
    const index_t r = cfg_.rank;
    // (t − 1) / T while T is fixed
    const std::uint64_t refresh_index = std::uint64_t(refreshes_);
    const random::stream s{cfg_.seed, refresh_index};
    if (!stores_projection()) {
      // APOLLO: N(0, 1/r) entries regenerated from (seed, refresh index)
      random::fill_normal(s, 0, P_.data(), std::size_t(P_.size()));
      P_ *= float(1.0 / std::sqrt(double(r)));
      return;
    }
    // randomized range finder on Ĝ [d, D]: Y = Ĝ Ω, Ω [D, k] Gaussian (in Z's storage)
    random::fill_normal(s, 0, Z_.data(), std::size_t(Z_.size()));
    Y_.noalias() = g * Z_;
    orthonormalize(Y_);
    for (int q = 0; q < cfg_.power_iterations; ++q) {
      Z_.noalias() = g.transpose() * Y_;
      orthonormalize(Z_);
      Y_.noalias() = g * Z_;
      orthonormalize(Y_);
    }
    B_.noalias() = Y_.transpose() * g;  // [k, D]
    C_.noalias() = B_ * B_.transpose(); // [k, k] = Yᵀ Ĝ Ĝᵀ Y
    eig_.compute(C_);                   // ascending eigenvalues
    // the new P [d, r] in Z_'s storage (D·k >= d·r floats), so the old one is still there
    Eigen::Map<ColMatrix> Pnew(Z_.data(), d_, r);
    Pnew.noalias() = Y_ * eig_.eigenvectors().rightCols(r).rowwise().reverse();
    if (from_step && cfg_.subspace_threshold > 0 && refreshes_ >= 1) {
      // Q-GaLore: mean over columns of |cos(old, new)|; stable for `patience` refreshes in a
      // row -> the period doubles
      double sim = 0;
      for (index_t j = 0; j < r; ++j) {
        double dot = 0, no = 0, nn = 0;
        for (index_t i = 0; i < d_; ++i) {
          const double o =
              quantized_projection() ? double(Pq_(i, j)) * pscale_(j) : double(P_(i, j));
          dot += o * double(Pnew(i, j));
          no += o * o;
          nn += double(Pnew(i, j)) * double(Pnew(i, j));
        }
        sim += std::fabs(dot) / (std::sqrt(no * nn) + 1e-30);
      }
      last_similarity_ = sim / double(r);
      stable_ = last_similarity_ >= cfg_.subspace_threshold ? stable_ + 1 : 0;
      if (stable_ >= cfg_.subspace_patience) {
        const std::int64_t cap = std::max(cfg_.max_update_gap, cfg_.update_gap);
        gap_ = gap_ > cap / 2 ? cap : 2 * gap_;
        next_refresh_ = advance(t_, gap_);
        stable_ = 0;
      }
    }
    if (!quantized_projection()) {
      P_ = Pnew;
      return;
    }
    // int8, symmetric per column: code = round-to-nearest-even(P / s), s = max |P| / 127
    for (index_t j = 0; j < r; ++j) {
      const float amax = Pnew.col(j).cwiseAbs().maxCoeff();
      const float sc = amax > 0 ? amax / 127.0f : 1.0f, inv = 1.0f / sc;
      pscale_(j) = sc;
      for (index_t i = 0; i < d_; ++i)
        Pq_(i, j) = std::int8_t(std::clamp(std::nearbyint(Pnew(i, j) * inv), -127.0f, 127.0f));
    }
  }

  /// Pb_ rows [0, nb) = dequantized rows [b, b + nb) of the int8 projection.
  void dequantize_rows(index_t b, index_t nb) {
    for (index_t j = 0; j < Pq_.cols(); ++j)
      for (index_t i = 0; i < nb; ++i) Pb_(i, j) = float(Pq_(b + i, j)) * pscale_(j);
  }

  template <class WMap, class GMap> void apply(WMap& w, const GMap& g) {
    const double b1 = cfg_.beta1, b2 = cfg_.beta2;
    const double bc1 = 1 - std::pow(b1, double(t_)), bc2 = 1 - std::pow(b2, double(t_));
    const float step_size = float(cfg_.lr * std::sqrt(bc2) / bc1);
    if (cfg_.weight_decay > 0) w *= float(1 - cfg_.lr * cfg_.weight_decay);
    if (quantized_projection()) { // Q-GaLore: R = Pᵀ Ĝ and W −= c·P N by 64-row blocks of P
      R_.setZero();
      for (index_t b = 0; b < d_; b += block_rows) {
        const index_t nb = std::min(block_rows, d_ - b);
        dequantize_rows(b, nb);
        R_.noalias() += Pb_.topRows(nb).transpose() * g.middleRows(b, nb);
      }
      M_.array() = float(b1) * M_.array() + float(1 - b1) * R_.array();
      V_.array() = float(b2) * V_.array() + float(1 - b2) * R_.array().square();
      R_.array() = M_.array() / (V_.array().sqrt() + float(cfg_.eps));
      for (index_t b = 0; b < d_; b += block_rows) {
        const index_t nb = std::min(block_rows, d_ - b);
        dequantize_rows(b, nb);
        w.middleRows(b, nb).noalias() -= (step_size * float(cfg_.alpha)) * (Pb_.topRows(nb) * R_);
      }
      return;
    }
    R_.noalias() = P_.transpose() * g; // [r, D]
    M_.array() = float(b1) * M_.array() + float(1 - b1) * R_.array();
    V_.array() = float(b2) * V_.array() + float(1 - b2) * R_.array().square();
    if (cfg_.method == projection_method::galore || cfg_.method == projection_method::frugal) {
      // N overwrites R after R has been used (FRUGAL needs P Pᵀ Ĝ = P R first)
      if (cfg_.method == projection_method::frugal && cfg_.lr_free > 0) {
        // residual sign step, one column block at a time through Z_'s storage is not needed:
        // (Ĝ − P R)_ij computed per column
        const float lr_free = float(cfg_.lr_free);
        for (index_t j = 0; j < g.cols(); ++j) {
          colbuf_.noalias() = P_ * R_.col(j);
          for (index_t i = 0; i < g.rows(); ++i) {
            const float res = g(i, j) - colbuf_(i);
            w(i, j) -= lr_free * float((res > 0) - (res < 0));
          }
        }
      }
      R_.array() = M_.array() / (V_.array().sqrt() + float(cfg_.eps));
      w.noalias() -= (step_size * float(cfg_.alpha)) * (P_ * R_);
      return;
    }
    // APOLLO / Mini: scale the raw gradient by ‖N‖/‖R‖ (channel-wise or tensor-wise)
    double gnorm2 = 0;
    if (cfg_.method == projection_method::apollo) {
      for (index_t j = 0; j < R_.cols(); ++j) {
        double n2 = 0, r2 = 0;
        for (index_t i = 0; i < R_.rows(); ++i) {
          const double nij = M_(i, j) / (std::sqrt(double(V_(i, j))) + cfg_.eps);
          n2 += nij * nij;
          r2 += double(R_(i, j)) * R_(i, j);
        }
        colscale_(j) = float(std::sqrt(n2) / (std::sqrt(r2) + 1e-8));
      }
    } else {
      double n2 = 0, r2 = 0;
      for (index_t j = 0; j < R_.cols(); ++j)
        for (index_t i = 0; i < R_.rows(); ++i) {
          const double nij = M_(i, j) / (std::sqrt(double(V_(i, j))) + cfg_.eps);
          n2 += nij * nij;
          r2 += double(R_(i, j)) * R_(i, j);
        }
      colscale_.setConstant(float(std::sqrt(n2) / (std::sqrt(r2) + 1e-8)));
    }
    // ‖Ĝ·diag(s)‖ in one pass over Ĝ in its storage order
    gnorm2 = double((g.array().rowwise() * colscale_.transpose().array()).square().sum());
    double snorm = std::sqrt(gnorm2), lim = 1;
    if (t_ > 1) {
      lim = std::max(snorm / (prev_norm_ + 1e-8), cfg_.limiter) / cfg_.limiter;
      snorm /= lim;
    }
    prev_norm_ = snorm;
    const float c = float(double(step_size) * std::sqrt(cfg_.scale) / lim);
    w.array() -= c * (g.array().rowwise() * colscale_.transpose().array());
  }

  index_t rows_, cols_, d_ = 0, D_ = 0, k_ = 0;
  projected_config cfg_;
  std::int64_t t_ = 0;
  std::int64_t gap_ = 1, next_refresh_ = 1, refreshes_ = 0;
  int stable_ = 0;
  double last_similarity_ = 0;
  double prev_norm_ = 0;
  ColMatrix M_, V_, R_, P_, Y_, Z_, C_, B_, Pb_;
  Eigen::Matrix<std::int8_t, Eigen::Dynamic, Eigen::Dynamic> Pq_;
  Eigen::VectorXf pscale_;
  Eigen::VectorXf colscale_, colbuf_;
  Eigen::SelfAdjointEigenSolver<ColMatrix> eig_;
};

/// The class to use. A class template behind an alias only so that a translation unit which never
/// creates one does not compile its Eigen eigensolver and GEMMs (README, "Compile time").
using projected_adam = basic_projected_adam<>;

} // namespace lowmem::optim
