// Projected optimizers (GaLore, APOLLO, APOLLO-Mini, FRUGAL) against a double reference of the
// same algorithm given the projection the optimizer used, over 100 steps in both orientations;
// the randomized SVD against an exact SVD; state bytes; bad input; the LISA sampler.
#include <catch2/catch.hpp>
#include <lowmem/optimizers/lisa.hpp>
#include <lowmem/optimizers/projected.hpp>

#include <Eigen/SVD>

#include <cmath>
#include <set>
#include <vector>

#include "reference/common.hpp"
#include "support/random_matrix.hpp"

using namespace lowmem;
using optim::projection_method;
using Md = Eigen::MatrixXd;
using lowmem::test::random_matrix;

namespace {

// Double reference of one projected step on the d×D orientation (What, Ghat), given P [d, r].
struct projected_ref {
  optim::projected_config c;
  Md M, V;
  double prev = 0;
  std::int64_t t = 0;
  void step(Md& W, const Md& G, const Md& P) {
    ++t;
    const double bc1 = 1 - std::pow(c.beta1, double(t)), bc2 = 1 - std::pow(c.beta2, double(t));
    const double ss = c.lr * std::sqrt(bc2) / bc1;
    if (M.size() == 0) M = Md::Zero(P.cols(), G.cols()), V = M;
    W *= 1 - c.lr * c.weight_decay;
    const Md R = P.transpose() * G;
    M = c.beta1 * M + (1 - c.beta1) * R;
    V = (c.beta2 * V.array() + (1 - c.beta2) * R.array().square()).matrix();
    const Md N = (M.array() / (V.array().sqrt() + c.eps)).matrix();
    if (c.method == projection_method::galore || c.method == projection_method::frugal) {
      if (c.method == projection_method::frugal) {
        const Md res = G - P * R;
        W -= c.lr_free * res.unaryExpr([](double x) { return double((x > 0) - (x < 0)); });
      }
      W -= ss * c.alpha * P * N;
      return;
    }
    Eigen::VectorXd s(G.cols());
    if (c.method == projection_method::apollo) {
      for (index_t j = 0; j < G.cols(); ++j) s(j) = N.col(j).norm() / (R.col(j).norm() + 1e-8);
    } else {
      s.setConstant(N.norm() / (R.norm() + 1e-8));
    }
    Md S = G * s.asDiagonal();
    double sn = S.norm();
    if (t > 1) {
      const double lim = std::max(sn / (prev + 1e-8), c.limiter) / c.limiter;
      S /= lim;
      sn /= lim;
    }
    prev = sn;
    W -= ss * std::sqrt(c.scale) * S;
  }
};

std::int64_t run_against_reference(index_t rows, index_t cols, optim::projected_config cfg) {
  optim::projected_adam opt(rows, cols, cfg);
  RowMatrixXf W = random_matrix(rows, cols, 1);
  const bool tr = rows > cols;
  Md Wd = tr ? Md(W.cast<double>().transpose()) : Md(W.cast<double>());
  projected_ref ref{cfg, {}, {}, 0, 0};
  double worst = 0;
  for (std::int64_t t = 1; t <= 100; ++t) {
    // low-rank-ish gradients with a slowly rotating dominant subspace plus noise
    RowMatrixXf G = random_matrix(rows, 3, 100 + std::uint64_t(t) / 25) *
                        random_matrix(3, cols, 200 + std::uint64_t(t) / 25) +
                    random_matrix(rows, cols, 300 + std::uint64_t(t), 0.05f);
    opt.step(W, G);
    const Md Gd = tr ? Md(G.cast<double>().transpose()) : Md(G.cast<double>());
    ref.step(Wd, Gd, opt.dequantized_projection().cast<double>()); // int8 P: as dequantized
    const Md Wf = tr ? Md(W.cast<double>().transpose()) : Md(W.cast<double>());
    worst = std::max(worst, (Wf - Wd).cwiseAbs().maxCoeff() / Wd.cwiseAbs().maxCoeff());
  }
  INFO("rows=" << rows << " cols=" << cols << " method=" << int(cfg.method));
  CHECK(worst < 2e-5); // float vs double over 100 steps (sign steps of FRUGAL are exact)
  return opt.refreshes();
}

} // namespace

TEST_CASE("GaLore, APOLLO, APOLLO-Mini and FRUGAL match a double reference over 100 steps",
          "[optimizers][projected]") {
  for (auto shape : {std::pair<index_t, index_t>{24, 40}, {40, 24}}) {
    optim::projected_config c;
    c.lr = 1e-2, c.rank = 4, c.update_gap = 10, c.weight_decay = 0.1, c.seed = 5;
    c.method = projection_method::galore;
    run_against_reference(shape.first, shape.second, c);
    c.method = projection_method::frugal;
    c.lr_free = 1e-3;
    run_against_reference(shape.first, shape.second, c);
    c.method = projection_method::apollo;
    run_against_reference(shape.first, shape.second, c);
    c.method = projection_method::apollo_mini;
    c.rank = 1, c.scale = 128;
    run_against_reference(shape.first, shape.second, c);
  }
}

TEST_CASE("Q-GaLore: int8 projection and lazy refresh match the double reference",
          "[optimizers][projected][qgalore]") {
  for (auto shape : {std::pair<index_t, index_t>{24, 40}, {40, 24}, {130, 70}}) {
    optim::projected_config c;
    c.lr = 1e-2, c.rank = 4, c.update_gap = 10, c.weight_decay = 0.1, c.seed = 5;
    c.projection_bits = 8; // d = 70 > 64: two row blocks of P
    CHECK(run_against_reference(shape.first, shape.second, c) == 10);
    // lazy: the test gradients' dominant subspace only changes every 25 steps
    c.subspace_threshold = 0.6, c.subspace_patience = 1; // rank 4 > 3: one column is noise
    CHECK(run_against_reference(shape.first, shape.second, c) < 10);
    c.projection_bits = 32;
    CHECK(run_against_reference(shape.first, shape.second, c) < 10);
  }
}

TEST_CASE("Q-GaLore: int8 projection within half a step of the fp32 one; lazy period",
          "[optimizers][projected][qgalore]") {
  const index_t m = 96, n = 48, r = 6;
  optim::projected_config c;
  c.rank = r, c.update_gap = 4, c.seed = 3;
  optim::projected_adam f32(m, n, c);
  c.projection_bits = 8;
  optim::projected_adam i8(m, n, c);
  CHECK(i8.state_bytes() == std::size_t(2 * r * m * 4 + n * r + 4 * r) + sizeof(double));
  RowMatrixXf W1 = random_matrix(m, n, 1), W2 = W1;
  const RowMatrixXf G = random_matrix(m, n, 2);
  f32.step(W1, G);
  i8.step(W2, G);
  const Md P = f32.projection().cast<double>(), Q = i8.dequantized_projection().cast<double>();
  bool within = true;
  for (index_t j = 0; j < r; ++j) {
    const double half = P.col(j).cwiseAbs().maxCoeff() / 254.0;
    within = within && (P.col(j) - Q.col(j)).cwiseAbs().maxCoeff() <= half * 1.0001 + 1e-9;
  }
  CHECK(within);
  // lazy refresh: a fixed rank-r gradient keeps the subspace -> the period doubles
  // (patience 2: after every two similar refreshes); fresh noise each step keeps it
  optim::projected_config lz = c;
  lz.subspace_threshold = 0.9, lz.subspace_patience = 2, lz.max_update_gap = 16;
  optim::projected_adam stable(m, n, lz), noisy(m, n, lz);
  const RowMatrixXf L = random_matrix(m, r, 4) * random_matrix(r, n, 5);
  for (std::int64_t t = 1; t <= 60; ++t) {
    stable.step(W1, L + random_matrix(m, n, 600 + std::uint64_t(t), 1e-3f));
    noisy.step(W2, random_matrix(m, n, 700 + std::uint64_t(t)));
  }
  CHECK(stable.update_gap() == 16);
  CHECK(stable.last_similarity() > 0.9);
  CHECK(stable.refreshes() < 15);
  CHECK(noisy.update_gap() == 4);
  CHECK(noisy.refreshes() == 15);
}

TEST_CASE("GaLore's randomized SVD finds the top-r singular subspace", "[optimizers][projected]") {
  const index_t m = 60, n = 90, r = 6;
  // G = U diag(sigma) Vᵀ with a spectral gap after r
  Md A = random_matrix(m, m, 7).cast<double>(), B = random_matrix(n, n, 8).cast<double>();
  const Md U = Eigen::HouseholderQR<Md>(A).householderQ() * Md::Identity(m, m);
  const Md Vv = Eigen::HouseholderQR<Md>(B).householderQ() * Md::Identity(n, n);
  Eigen::VectorXd sigma(m);
  for (index_t i = 0; i < m; ++i) sigma(i) = i < r ? 10.0 - i : 0.5 * std::exp(-0.05 * i);
  const RowMatrixXf G = (U * sigma.asDiagonal() * Vv.leftCols(m).transpose()).cast<float>();
  optim::projected_config c;
  c.rank = r;
  optim::projected_adam opt(m, n, c);
  opt.refresh(G);
  const Md P = opt.projection().cast<double>();
  CHECK((P.transpose() * P - Md::Identity(r, r)).norm() < 1e-5); // orthonormal
  const Md Ur = Eigen::JacobiSVD<Md>(G.cast<double>(), Eigen::ComputeThinU).matrixU().leftCols(r);
  CHECK((Ur - P * (P.transpose() * Ur)).norm() < 1e-4); // spans the exact top-r subspace
}

TEST_CASE("projected state bytes and bad input", "[optimizers][projected][errors]") {
  optim::projected_config c;
  c.rank = 8;
  optim::projected_adam galore(64, 256, c);
  CHECK(galore.state_bytes() == (2 * 8 * 256 + 64 * 8) * 4 + sizeof(double));
  c.method = projection_method::apollo;
  optim::projected_adam apollo(256, 64, c);
  CHECK(apollo.state_bytes() == 2 * 8 * 256 * 4 + sizeof(double)); // projection never stored
  c.method = projection_method::apollo_mini;
  c.rank = 1;
  optim::projected_adam mini(256, 64, c);
  CHECK(mini.state_bytes() == 2 * 256 * 4 + sizeof(double));

  c.method = projection_method::galore;
  c.rank = 65;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument); // rank > min(m, n)
  c.rank = 2;
  c.method = projection_method::apollo_mini;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument); // Mini is rank 1
  c.method = projection_method::galore;
  c.lr = -1;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument);
  c.lr = 1e-3, c.beta2 = 1.0;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument);
  c.beta2 = 0.999;
  c.projection_bits = 4;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument);
  c.projection_bits = 8;
  c.method = projection_method::apollo;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument); // int8 P: GaLore only
  c.method = projection_method::galore;
  c.subspace_threshold = 1.5;
  CHECK_THROWS_AS(optim::projected_adam(64, 256, c), invalid_argument);
  c.subspace_threshold = 0, c.projection_bits = 32;
  optim::projected_adam ok(16, 32, c);
  RowMatrixXf W = random_matrix(16, 32, 9), W0 = W;
  const RowMatrixXf G = random_matrix(16, 31, 10);
  CHECK_THROWS_AS(ok.step(W, G), invalid_argument);
  CHECK(W == W0);
  CHECK(ok.steps() == 0);
}

TEST_CASE("LISA samples gamma distinct layers per period, uniformly", "[optimizers][lisa]") {
  optim::lisa_sampler s(12, 3, 5, 42);
  std::vector<int> counts(12, 0);
  std::set<std::vector<int>> distinct_sets;
  for (std::int64_t t = 1; t <= 5000; ++t) {
    const auto a = s.active(t);
    REQUIRE(a.size() == 3);
    REQUIRE(std::is_sorted(a.begin(), a.end()));
    REQUIRE(std::adjacent_find(a.begin(), a.end()) == a.end());
    if (!s.switched(t)) REQUIRE(a == s.active(t - 1)); // constant within a period
    if (s.switched(t)) {
      for (int l : a) ++counts[std::size_t(l)];
      distinct_sets.insert(a);
    }
  }
  // 1000 periods × 3 layers: each layer expected 250 times, sd ≈ 14.4; 5 sd bound
  for (int cnt : counts) CHECK(std::abs(cnt - 250) < 72);
  CHECK(distinct_sets.size() > 100);
  CHECK_THROWS_AS(optim::lisa_sampler(4, 5, 1), invalid_argument);
  CHECK_THROWS_AS(optim::lisa_sampler(4, 2, 0), invalid_argument);
}
