// lowmem/adapters/init.hpp — adapter initialisations:
//  * peft's default: A kaiming-uniform (a = √5, bound 1/√in), B = 0, so the adapted layer starts
//    equal to the frozen one;
//  * PiSSA (arXiv:2404.02948): A, B from the top-r singular triplets of W, the residual written
//    back to W, so s·B·A + W_res = W. The SVD is randomized (Halko–Martinsson–Tropp range finder:
//    Y = W·Ω, q power iterations with re-orthonormalisation, then an exact SVD of the small
//    (r + p)×in matrix Qᵀ·W): O(out·in·(r + p)·(2q + 2)) work instead of a full SVD's
//    O(out·in·min(out, in));
//  * LoRA-GA (arXiv:2407.05000): A, B from the SVD of a gradient estimate G = ∂L/∂W [out, in]
//    (accumulated over a few batches with the model frozen), with the same randomized SVD: the
//    first step of (A, B) then moves s·B·A along the best rank-2r approximation of −G
//    ("ArB2r": A from the top-r right singular vectors, B from the next r left ones), and W is
//    offset by −s·B·A so the initial output is unchanged. G is given densely or, never formed, as
//    the batch factors G = dyᵀ·x.
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

namespace adapters::detail {

/// Randomized SVD (Halko–Martinsson–Tropp) of an implicit out×in matrix M known only through
/// mul(Ω) = M·Ω [out, k] and tmul(Q) = Mᵀ·Q [in, k]: range finder with k = nsv + oversample
/// columns, `power_iters` re-orthonormalised power iterations, then an exact SVD of the small
/// k×in matrix Qᵀ·M. Fills U [out, nsv], S [nsv], V [in, nsv]. ALLOCATES O((out + in)·k) floats.
///
/// The small SVD: Mᵀ·Q = Q₂·R (thin Householder QR, R [k, k] upper triangular), then a one-sided
/// Jacobi SVD of the square Rᵀ = U_R·Σ·V_Rᵀ, so Qᵀ·M = U_R·Σ·(Q₂·V_R)ᵀ. Both steps are backward
/// stable (Jacobi is accurate to full relative precision on the k×k factor; BDCSVD also hands
/// blocks this small to Jacobi). Why not BDCSVD on the k×in matrix: its divide-and-conquer code
/// was profiled at ≈ 51 s of the ASan+UBSan compile of each test using it (test_adapters_multi,
/// test_adapters_sparse), for k ≤ a few dozen.
template <class Mul, class TMul>
void randomized_svd(index_t out, index_t in, index_t nsv, index_t oversample, index_t power_iters,
                    const random::stream& stream, const Mul& mul, const TMul& tmul,
                    Eigen::MatrixXf& U, Eigen::VectorXf& S, Eigen::MatrixXf& V) {
  using Mat = Eigen::MatrixXf;
  const index_t mn = in < out ? in : out;
  const index_t k = nsv + oversample < mn ? nsv + oversample : mn;
  Mat omega(in, k);
  random::fill_normal(stream, 0, omega.data(), std::size_t(in * k));
  auto orthonormal = [](const Mat& M) -> Mat {
    Eigen::HouseholderQR<Mat> qr(M);
    return qr.householderQ() * Mat::Identity(M.rows(), M.cols());
  };
  Mat Q = orthonormal(mul(omega)); // [out, k]
  for (index_t it = 0; it < power_iters; ++it) {
    const Mat Z = orthonormal(tmul(Q)); // [in, k]
    Q = orthonormal(mul(Z));
  }
  const Eigen::HouseholderQR<Mat> qr(tmul(Q)); // Mᵀ·Q = Q₂·R, [in, k]
  const Mat Rt = qr.matrixQR().topRows(k).triangularView<Eigen::Upper>().transpose();
  // Rᵀ is square: Jacobi needs no QR preconditioner (one fewer decomposition to instantiate).
  const Eigen::JacobiSVD<Mat, Eigen::NoQRPreconditioner> svd(Rt, Eigen::ComputeFullU |
                                                                     Eigen::ComputeFullV);
  U = Q * svd.matrixU().leftCols(nsv);
  S = svd.singularValues().head(nsv);
  Mat VR = Mat::Zero(in, nsv); // [V_R; 0]: Q₂·V_R = (full Householder Q)·[V_R; 0]
  VR.topRows(k) = svd.matrixV().leftCols(nsv);
  V = qr.householderQ() * VR;
}

} // namespace adapters::detail

/// PiSSA init. With the top-r approximation W ≈ U_r·Σ_r·V_rᵀ from the randomized SVD:
///   A = diag(√(Σ_r / s))·V_rᵀ,  B = U_r·diag(√(Σ_r / s)),  W ← W − s·B·A   (peft's convention,
/// so the layer's output is unchanged: W_res + s·B·A = W up to fp32 rounding).
/// Shapes: W [out, in] (in/out: becomes the residual), A [r, in], B [out, r] (overwritten),
/// sigma (optional, nullptr or r floats: the estimated singular values). s > 0.
/// Memory: ALLOCATES (initialisation, not a hot path): O((out + in)·(r + p)) floats for the range
/// finder plus Eigen's small SVD; never an out×in temporary (the subtraction is lora_unmerge).
/// Numerics: float QR/GEMMs, the small SVD in float; see the tests for the reconstruction error.
template <class = void> // instantiated only when called: see README, "Compile time"
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
  using Mat = Eigen::MatrixXf;
  Mat U, V;
  Eigen::VectorXf S;
  adapters::detail::randomized_svd(
      out, in, r, opt.oversample, opt.power_iters, opt.stream,
      [&](const Mat& M) -> Mat { return W * M; },
      [&](const Mat& Q) -> Mat { return W.transpose() * Q; }, U, S, V);
  for (index_t j = 0; j < r; ++j) {
    const float root = std::sqrt(S[j] / scale);
    A.row(j) = root * V.col(j).transpose();
    B.col(j) = root * U.col(j);
    if (sigma) sigma[j] = S[j];
  }
  lora_unmerge(W, A, B, scale);
}

/// Scaling of the LoRA-GA factors (paper §3.3).
enum class lora_ga_scaling {
  stable, ///< A, B multiplied by out^{1/4}/√γ: the paper's default, rank- and width-stable
  unit    ///< orthonormal rows of A and columns of B, no extra factor
};

/// Options of lora_ga_init.
struct lora_ga_options {
  index_t oversample = 8;  ///< randomized SVD: extra range-finder columns
  index_t power_iters = 4; ///< randomized SVD: power iterations (torch.svd_lowrank's niter = 4)
  random::stream stream{}; ///< source of the Gaussian test matrix
  lora_ga_scaling scaling = lora_ga_scaling::stable;
  float gamma = 16.0f; ///< γ of the stable scaling (the paper's default 16)
};

namespace adapters::detail {
inline void validate_lora_ga(const char* fn, index_t out, index_t in, const RowRef<float>& A,
                             const RowRef<float>& B, float scale, const lora_ga_options& opt) {
  const index_t r = A.rows();
  require_rank(fn, r, in, out);
  // the top 2r singular triplets are used
  require(2 * r <= (in < out ? in : out), fn, "rank", "2·r <= min(in, out)", r);
  require_dims(fn, "A", A, r, in);
  require_dims(fn, "B", B, out, r);
  require_positive(fn, "scale", scale);
  require_positive(fn, "gamma", opt.gamma);
  require_non_negative(fn, "oversample", opt.oversample);
  require_non_negative(fn, "power_iters", opt.power_iters);
}

/// A = c·V[:, 0:r]ᵀ, B = c·U[:, r:2r], W ← W − s·B·A.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void lora_ga_assign(RowRef<float>& W, float scale, const lora_ga_options& opt,
                           const Eigen::MatrixXf& U, const Eigen::VectorXf& S,
                           const Eigen::MatrixXf& V, RowRef<float>& A, RowRef<float>& B,
                           float* sigma) {
  const index_t r = A.rows(), out = W.rows();
  const float c = opt.scaling == lora_ga_scaling::stable
                      ? std::pow(float(out), 0.25f) / std::sqrt(opt.gamma)
                      : 1.0f;
  for (index_t j = 0; j < r; ++j) {
    A.row(j) = c * V.col(j).transpose();
    B.col(j) = c * U.col(r + j);
  }
  if (sigma)
    for (index_t j = 0; j < 2 * r; ++j) sigma[j] = S[j];
  lora_unmerge(W, A, B, scale);
}
} // namespace adapters::detail

/// LoRA-GA init (arXiv:2407.05000) from a dense gradient estimate G = Σ_batches ∂L/∂W.
/// With G ≈ U·Σ·Vᵀ (randomized SVD, top 2r triplets):
///   A = c·V[:, 0:r]ᵀ,  B = c·U[:, r:2r],  W ← W − s·B·A,
/// c = out^{1/4}/√γ (stable) or 1 (unit). Then s·B·A + W_new = W (output unchanged up to fp32
/// rounding), and one SGD step on (A, B) changes s·B·A by −η·s²·c²·(U_{0:2r}Σ_{0:2r}V_{0:2r}ᵀ): the
/// best rank-2r approximation of the full-gradient step (Kaiming/zero init only reaches G·AᵀA).
/// Shapes: W [out, in] (in/out: offset), grad [out, in], A [r, in], B [out, r] (overwritten),
/// sigma nullptr or 2r floats (the estimated singular values of G). s = the LoRA scale > 0.
/// Memory: ALLOCATES (initialisation): O((out + in)·(2r + p)) floats; no out×in temporary.
/// Preconditions: 1 <= r, 2r <= min(in, out), s > 0, γ > 0. The overall scale of G is irrelevant.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void lora_ga_init(RowRef<float> W, ConstRowRef<float> grad, float scale,
                         const lora_ga_options& opt, RowRef<float> A, RowRef<float> B,
                         float* sigma = nullptr) {
  const char* fn = "lora_ga_init";
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  adapters::detail::validate_lora_ga(fn, out, in, A, B, scale, opt);
  adapters::detail::require_dims(fn, "grad", grad, out, in);
  using Mat = Eigen::MatrixXf;
  Mat U, V;
  Eigen::VectorXf S;
  adapters::detail::randomized_svd(
      out, in, 2 * r, opt.oversample, opt.power_iters, opt.stream,
      [&](const Mat& M) -> Mat { return grad * M; },
      [&](const Mat& Q) -> Mat { return grad.transpose() * Q; }, U, S, V);
  adapters::detail::lora_ga_assign(W, scale, opt, U, S, V, A, B, sigma);
}

/// LoRA-GA init from the batch factors, G = dyᵀ·x never formed: x [n, in] the layer inputs and
/// dy [n, out] the output gradients of n rows (stack several batches' rows for an accumulated
/// estimate). The randomized SVD only needs G·Ω = dyᵀ·(x·Ω) and Gᵀ·Q = xᵀ·(dy·Q), so the cost is
/// O(n·(in + out)·(2r + p)) per product and the memory O((n + in + out)·(2r + p)) floats
/// (ALLOCATES; initialisation). Result and preconditions as lora_ga_init, plus x.rows = dy.rows.
template <class = void> // instantiated only when called: see README, "Compile time"
inline void lora_ga_init_from_batch(RowRef<float> W, ConstRowRef<float> x, ConstRowRef<float> dy,
                                    float scale, const lora_ga_options& opt, RowRef<float> A,
                                    RowRef<float> B, float* sigma = nullptr) {
  const char* fn = "lora_ga_init_from_batch";
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  adapters::detail::validate_lora_ga(fn, out, in, A, B, scale, opt);
  require_positive(fn, "x.rows", x.rows());
  adapters::detail::require_dims(fn, "x", x, x.rows(), in);
  adapters::detail::require_dims(fn, "dy", dy, x.rows(), out);
  using Mat = Eigen::MatrixXf;
  Mat U, V;
  Eigen::VectorXf S;
  adapters::detail::randomized_svd(
      out, in, 2 * r, opt.oversample, opt.power_iters, opt.stream,
      [&](const Mat& M) -> Mat {
        const Mat t = x * M;
        return dy.transpose() * t;
      },
      [&](const Mat& Q) -> Mat {
        const Mat t = dy * Q;
        return x.transpose() * t;
      },
      U, S, V);
  adapters::detail::lora_ga_assign(W, scale, opt, U, S, V, A, B, sigma);
}

} // namespace lowmem
