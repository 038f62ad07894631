// lowmem/adapters/init.hpp — adapter initialisations:
//  * peft's default: A kaiming-uniform (a = √5, bound 1/√in), B = 0, so the adapted layer starts
//    equal to the frozen one;
//  * PiSSA (arXiv:2404.02948): A, B from the top-r singular triplets of W, the residual written
//    back to W, so s·B·A + W_res = W. The SVD is randomized (Halko–Martinsson–Tropp range finder:
//    Y = W·Ω, q power iterations with re-orthonormalisation, then an exact SVD of the small
//    (r + p)×in matrix Qᵀ·W with Eigen's BDCSVD): O(out·in·(r + p)·(2q + 2)) work instead of a
//    full SVD's O(out·in·min(out, in)).
#pragma once

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <cmath>
#include <cstdint>

#include "../kernels/random.hpp"
#include "common.hpp"
#include "lora.hpp"

namespace lowmem {

/// peft default init: A_kc = (2·U − 1)/√in with U = stream.uniform(k·in + c), B = 0.
/// Shapes: A [r, in] (contiguous rows not required), B [out, r]. No allocation.
inline void lora_init_kaiming(const random::stream& stream, RowRef<float> A, RowRef<float> B) {
  const char* fn = "lora_init_kaiming";
  const index_t r = A.rows(), in = A.cols();
  adapters::detail::require_rank(fn, r, in, B.rows());
  adapters::detail::require_dims(fn, "B", B, B.rows(), r);
  const float bound = 1.0f / std::sqrt(float(in));
  for (index_t k = 0; k < r; ++k) {
    float* a = A.row(k).data();
    random::fill_uniform(stream, std::uint64_t(k * in), a, std::size_t(in));
    for (index_t c = 0; c < in; ++c) a[c] = (2.0f * a[c] - 1.0f) * bound;
  }
  B.setZero();
}

/// Options of the randomized SVD behind pissa_init.
struct pissa_options {
  index_t oversample = 8;  ///< p: extra range-finder columns (accuracy of the top-r space)
  index_t power_iters = 2; ///< q: power iterations (sharpen a slowly decaying spectrum)
  random::stream stream{}; ///< source of the Gaussian test matrix Ω
};

/// PiSSA init. With the top-r approximation W ≈ U_r·Σ_r·V_rᵀ from the randomized SVD:
///   A = diag(√(Σ_r / s))·V_rᵀ,  B = U_r·diag(√(Σ_r / s)),  W ← W − s·B·A   (peft's convention,
/// so the layer's output is unchanged: W_res + s·B·A = W up to fp32 rounding).
/// Shapes: W [out, in] (in/out: becomes the residual), A [r, in], B [out, r] (overwritten),
/// sigma (optional, nullptr or r floats: the estimated singular values). s > 0.
/// Memory: ALLOCATES (initialisation, not a hot path): O((out + in)·(r + p)) floats for the range
/// finder plus Eigen's small SVD; never an out×in temporary (the subtraction is lora_unmerge).
/// Numerics: float QR/GEMMs, the small SVD in float; see the tests for the reconstruction error.
inline void pissa_init(RowRef<float> W, float scale, const pissa_options& opt, RowRef<float> A,
                       RowRef<float> B, float* sigma = nullptr) {
  const char* fn = "pissa_init";
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  adapters::detail::require_rank(fn, r, in, out);
  adapters::detail::require_dims(fn, "A", A, r, in);
  adapters::detail::require_dims(fn, "B", B, out, r);
  require_positive(fn, "scale", scale);
  require_non_negative(fn, "oversample", opt.oversample);
  require_non_negative(fn, "power_iters", opt.power_iters);
  const index_t mn = in < out ? in : out;
  const index_t k = r + opt.oversample < mn ? r + opt.oversample : mn;

  using Mat = Eigen::MatrixXf;
  Mat omega(in, k);
  random::fill_normal(opt.stream, 0, omega.data(), std::size_t(in * k));
  Mat Y = W * omega; // [out, k]
  auto orthonormal = [](const Mat& M) -> Mat {
    Eigen::HouseholderQR<Mat> qr(M);
    return qr.householderQ() * Mat::Identity(M.rows(), M.cols());
  };
  Mat Q = orthonormal(Y);
  for (index_t it = 0; it < opt.power_iters; ++it) {
    const Mat Z = orthonormal(W.transpose() * Q); // [in, k]
    Q = orthonormal(W * Z);
  }
  const Mat small = Q.transpose() * W; // [k, in]
  Eigen::BDCSVD<Mat> svd(small, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Mat U = Q * svd.matrixU().leftCols(r); // [out, r]
  const auto& S = svd.singularValues();
  const auto V = svd.matrixV().leftCols(r); // [in, r]
  for (index_t j = 0; j < r; ++j) {
    const float root = std::sqrt(S[j] / scale);
    A.row(j) = root * V.col(j).transpose();
    B.col(j) = root * U.col(j);
    if (sigma) sigma[j] = S[j];
  }
  lora_unmerge(W, A, B, scale);
}

} // namespace lowmem
