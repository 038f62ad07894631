// Naive references for the zeroth-order optimizers: plain loops that store every perturbation z
// of every span in full (what a straightforward implementation does), with the same RNG values
// (a whole-span random::fill_* call) and the same operation order (std::fma where the kernels
// fma), so results are comparable bit for bit on archs with FMA. EGGROLL: double-accumulating
// forward that forms W + E_j explicitly.
#pragma once

#include <lowmem/core/random.hpp>
#include <lowmem/kernels/random.hpp>
#include <lowmem/zeroth_order.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace lowmem::ref {

struct zo_span {
  std::uint64_t id;
  std::vector<float>* data;
  float threshold = INFINITY;
  bool active = true;
};

inline std::vector<float> zo_noise(zo::noise d, std::uint64_t seed, std::uint64_t id,
                                   std::size_t n) {
  std::vector<float> z(n);
  if (d == zo::noise::gaussian)
    random::fill_normal(random::stream{seed, id}, 0, z.data(), n);
  else
    random::fill_rademacher(random::stream{seed, id}, 0, z.data(), n);
  return z;
}

/// One ZO step (sgd / sign / momentum / adam, two- or one-sided, q >= 1, sparse masks) on spans,
/// mirroring lowmem::zo::optimizer's sweeps. `loss` evaluates at the current values. `m`, `v` are
/// the state of each span (sized like it) for momentum / adam. Returns mean ĝ.
inline double zo_step(std::vector<zo_span>& spans, const zo::options& o, std::uint64_t step,
                      const std::function<double()>& loss,
                      std::vector<std::vector<float>>* m = nullptr,
                      std::vector<std::vector<float>>* v = nullptr) {
  const int q = o.q;
  const float eps = o.epsilon;
  // z[j][k]: every perturbation of every span, stored in full
  std::vector<std::vector<std::vector<float>>> z(static_cast<std::size_t>(q));
  for (int j = 0; j < q; ++j)
    for (auto& s : spans)
      z[std::size_t(j)].push_back(
          zo_noise(o.dist, zo::step_seed(o.seed, step, std::uint64_t(j)), s.id, s.data->size()));
  auto for_each = [&](auto&& f) {
    for (std::size_t k = 0; k < spans.size(); ++k) {
      if (!spans[k].active) continue;
      auto& th = *spans[k].data;
      for (std::size_t i = 0; i < th.size(); ++i) f(k, i, th[i]);
    }
  };
  auto keep = [&](std::size_t k, float t) { return std::fabs(t) < spans[k].threshold; };
  auto clip = [&](double x) {
    const double c = o.grad_clip;
    return c > 0 ? std::min(c, std::max(-c, x)) : x;
  };
  std::vector<double> g(static_cast<std::size_t>(q), 0.0);
  float off = 0;
  double base = 0;
  if (o.est == zo::estimator::one_sided) base = loss();
  for (int j = 0; j < q; ++j) {
    const auto& zj = z[std::size_t(j)];
    if (j == 0) {
      for_each([&](std::size_t k, std::size_t i, float& th) {
        if (keep(k, th)) th = std::fma(eps, zj[k][i], th);
      });
    } else {
      const auto& zp = z[std::size_t(j - 1)];
      for_each([&](std::size_t k, std::size_t i, float& th) {
        const float t = std::fma(-off, zp[k][i], th);
        if (keep(k, t)) th = std::fma(eps, zj[k][i], t);
      });
    }
    off = eps;
    const double lp = loss();
    if (o.est == zo::estimator::two_sided) {
      for_each([&](std::size_t k, std::size_t i, float& th) {
        const float t = std::fma(-off, zj[k][i], th);
        if (keep(k, t)) th = std::fma(-eps, zj[k][i], t);
      });
      off = -eps;
      const double lm = loss();
      g[std::size_t(j)] = clip((lp - lm) / (2 * double(eps)));
    } else {
      g[std::size_t(j)] = clip((lp - base) / double(eps));
    }
  }
  const double t_step = double(step + 1);
  const float a = float(1.0 - double(o.lr) * o.weight_decay);
  const float b1m = o.rule == zo::method::adam ? float(1.0 - o.beta1) : 1.f;
  const float b2m = float(1.0 - o.beta2);
  const float step_size = float(double(o.lr) / (1.0 - std::pow(double(o.beta1), t_step)));
  const float ibc2 = float(1.0 / std::sqrt(1.0 - std::pow(double(o.beta2), t_step)));
  const auto& zl = z[std::size_t(q - 1)];
  for_each([&](std::size_t k, std::size_t i, float& th) {
    const float t = std::fma(-off, zl[k][i], th);
    float gv;
    if (q == 1) {
      gv = float(g[0]) * zl[k][i];
    } else {
      gv = float(g[0] / q) * z[0][k][i];
      for (int j = 1; j < q; ++j)
        gv = std::fma(float(g[std::size_t(j)] / q), z[std::size_t(j)][k][i], gv);
    }
    if (!keep(k, t)) return;
    switch (o.rule) {
    case zo::method::sign: {
      const float sg = gv > 0 ? 1.f : (gv < 0 ? -1.f : 0.f);
      th = std::fma(a, t, -o.lr * sg);
      break;
    }
    case zo::method::momentum: {
      float& mm = (*m)[k][i];
      mm = std::fma(o.beta1, mm, b1m * gv);
      th = std::fma(a, t, -o.lr * mm);
      break;
    }
    case zo::method::adam: {
      float& mm = (*m)[k][i];
      float& vv = (*v)[k][i];
      mm = std::fma(o.beta1, mm, b1m * gv);
      vv = std::fma(o.beta2, vv, b2m * (gv * gv));
      const float den = std::fma(std::sqrt(vv), ibc2, o.adam_eps);
      th = std::fma(a, t, -step_size * (mm / den));
      break;
    }
    default:
      th = std::fma(a, t, -o.lr * gv);
      break;
    }
    th = std::max(th, o.lower_bound);
  });
  double s = 0;
  for (double x : g) s += x;
  return s / q;
}

/// EGGROLL factors of member j as the library defines them (see zo::eggroll_factors), in double.
/// y[p, :] for member j rows: x_p · (W + σ B_j A_jᵀ)ᵀ with E_j formed explicitly, double sums.
inline std::vector<double> eggroll_forward_explicit(const std::vector<float>& x,
                                                    const std::vector<float>& w,
                                                    std::size_t population, std::size_t rows,
                                                    std::size_t in, std::size_t out, float sigma,
                                                    std::size_t rank, std::uint64_t seed,
                                                    std::uint64_t matrix_id) {
  std::vector<double> y(population * rows * out);
  std::vector<float> a(in * rank), b(out * rank);
  std::vector<double> e(out * in);
  for (std::size_t j = 0; j < population; ++j) {
    zo::eggroll_factors(seed, matrix_id, j, in, out, rank, a.data(), b.data());
    for (std::size_t o = 0; o < out; ++o)
      for (std::size_t k = 0; k < in; ++k) {
        double s = 0;
        for (std::size_t c = 0; c < rank; ++c) s += double(b[o * rank + c]) * a[k * rank + c];
        e[o * in + k] = double(w[o * in + k]) + double(sigma) * s;
      }
    for (std::size_t p = 0; p < rows; ++p) {
      const float* xp = x.data() + (j * rows + p) * in;
      for (std::size_t o = 0; o < out; ++o) {
        double s = 0;
        for (std::size_t k = 0; k < in; ++k) s += double(xp[k]) * e[o * in + k];
        y[(j * rows + p) * out + o] = s;
      }
    }
  }
  return y;
}

} // namespace lowmem::ref
