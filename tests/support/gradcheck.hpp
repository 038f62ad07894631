// Central finite-difference gradient checks, used by every backward's test.
//
// For a scalar loss L(θ) computed in double from float parameters, the numeric gradient is
//   g_i ≈ (L(θ + h e_i) − L(θ − h e_i)) / 2h,   h = eps · max(1, |θ_i|),
// with truncation error O(h²·L''') and rounding error O(ulp(L)/h). The check passes element i when
//   |g_i − a_i| <= atol + rtol · max(|g_i|, |a_i|).
// Losses should be evaluated with a double-accumulating forward (or a float one whose rounding is
// far below h·|g|); eps defaults to 1e-3, a good balance for float parameters.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <sstream>
#include <vector>

namespace lowmem::test {

struct gradcheck_options {
  double eps = 1e-3;
  double rtol = 1e-2;
  double atol = 1e-4;
  std::size_t max_elements = 64; // checks a deterministic subset of large tensors
};

struct gradcheck_result {
  double worst_ratio = 0; // max over checked i of |g - a| / (atol + rtol·max(|g|,|a|))
  std::size_t worst_index = 0;
  double numeric_at_worst = 0;
};

/// Central differences of `loss` w.r.t. params[i] compared with analytic[i] (params restored).
inline gradcheck_result gradcheck_compare(const std::function<double()>& loss, float* params,
                                          std::size_t n, const float* analytic,
                                          const gradcheck_options& opt = {}) {
  gradcheck_result res;
  const std::size_t stride =
      n > opt.max_elements ? (n + opt.max_elements - 1) / opt.max_elements : 1;
  for (std::size_t i = 0; i < n; i += stride) {
    const float saved = params[i];
    const double h = opt.eps * std::max(1.0, std::fabs(double(saved)));
    params[i] = float(saved + h);
    const double hp = double(params[i]) - saved; // the step actually taken in float
    const double lp = loss();
    params[i] = float(saved - h);
    const double hm = saved - double(params[i]);
    const double lm = loss();
    params[i] = saved;
    const double numeric = (lp - lm) / (hp + hm);
    const double a = analytic[i];
    const double ratio =
        std::fabs(numeric - a) / (opt.atol + opt.rtol * std::max(std::fabs(numeric), std::fabs(a)));
    if (ratio > res.worst_ratio) res = {ratio, i, numeric};
  }
  return res;
}

/// Checks analytic[i] against central differences of `loss` w.r.t. params[i] (params are restored).
/// Returns the worst |g - a| / (atol + rtol·max(|g|,|a|)) ratio; CHECKs it to be <= 1.
inline double gradcheck(const std::function<double()>& loss, float* params, std::size_t n,
                        const float* analytic, const char* what,
                        const gradcheck_options& opt = {}) {
  const gradcheck_result r = gradcheck_compare(loss, params, n, analytic, opt);
  INFO(what << ": worst element " << r.worst_index << " numeric " << r.numeric_at_worst
            << " analytic " << (n ? analytic[r.worst_index] : 0.0f) << " (ratio " << r.worst_ratio
            << ")");
  CHECK(r.worst_ratio <= 1.0);
  return r.worst_ratio;
}

} // namespace lowmem::test
