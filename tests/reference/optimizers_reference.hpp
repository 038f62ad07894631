// Naive double references of the optimizer updates, written from PyTorch 1.13's
// torch/optim/{adamw,adam,sgd}.py single-tensor code paths and lion-pytorch, and of the
// block-wise quantizer (brute-force nearest code).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lowmem::ref {

struct adam_ref_config {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled; // AdamW (true) or Adam's L2 (false)
};

/// One step of torch.optim.AdamW / Adam (maximize=False, amsgrad=False) in double, in place.
inline void adam_step(double* p, const float* g, double* m, double* v, std::size_t n,
                      std::int64_t step, const adam_ref_config& c) {
  const double bc1 = 1 - std::pow(c.beta1, double(step));
  const double bc2 = 1 - std::pow(c.beta2, double(step));
  const double step_size = c.lr / bc1, bc2_sqrt = std::sqrt(bc2);
  for (std::size_t i = 0; i < n; ++i) {
    double grad = g[i];
    if (c.decoupled)
      p[i] *= 1 - c.lr * c.weight_decay; // param.mul_(1 - lr * weight_decay)
    else
      grad += c.weight_decay * p[i];                     // grad = grad.add(param, alpha=wd)
    m[i] = m[i] * c.beta1 + (1 - c.beta1) * grad;        // exp_avg.mul_(b1).add_(g, 1-b1)
    v[i] = v[i] * c.beta2 + (1 - c.beta2) * grad * grad; // exp_avg_sq.mul_(b2).addcmul_(g, g)
    const double denom = std::sqrt(v[i]) / bc2_sqrt + c.eps;
    p[i] -= step_size * m[i] / denom; // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
}

struct sgd_ref_config {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

/// One step of torch.optim.SGD in double (buf is the momentum buffer, created at step 1).
inline void sgd_step(double* p, const float* g, double* buf, std::size_t n, std::int64_t step,
                     const sgd_ref_config& c) {
  for (std::size_t i = 0; i < n; ++i) {
    double d = double(g[i]) + c.weight_decay * p[i];
    if (c.momentum != 0) {
      if (step == 1)
        buf[i] = d; // torch.clone(d_p).detach()
      else
        buf[i] = c.momentum * buf[i] + (1 - c.dampening) * d;
      d = c.nesterov ? d + c.momentum * buf[i] : buf[i];
    }
    p[i] -= c.lr * d;
  }
}

/// One Lion step (lion-pytorch) in double.
inline void lion_step(double* p, const float* g, double* m, std::size_t n, double lr, double b1,
                      double b2, double wd) {
  for (std::size_t i = 0; i < n; ++i) {
    p[i] *= 1 - lr * wd;
    const double c = b1 * m[i] + (1 - b1) * g[i];
    p[i] -= lr * double((c > 0) - (c < 0));
    m[i] = b2 * m[i] + (1 - b2) * g[i];
  }
}

/// Nearest code of x among sorted values[0..k) by brute force (ties to the lower code).
inline int nearest_code(const float* values, int k, double x) {
  int best = 0;
  double bd = std::fabs(x - values[0]);
  for (int j = 1; j < k; ++j) {
    const double d = std::fabs(x - values[j]);
    if (d < bd) bd = d, best = j;
  }
  return best;
}

/// bitsandbytes create_dynamic_map, restated from the paper (arXiv:2110.02861 §2, "dynamic tree
/// quantization" with a fixed split per decade): decade i of E covers [0.1, 1]·10^(i-E+1) with
/// 2^i (signed) or 2^(i+1) (unsigned) equal-width bins represented by their centres (8-bit,
/// N = 7 non-sign bits; general: 2^(i+N-E) / 2^(i+N-E+1)), mirrored when signed; plus 0 and 1.
inline std::vector<double> dynamic_map(bool is_signed, int e, int total_bits) {
  std::vector<double> out;
  const int nsb = total_bits - 1;
  for (int i = 0; i < e; ++i) {
    const int bins = is_signed ? (1 << (i + nsb - e)) : (1 << (i + nsb - e + 1));
    const double width = 0.9 / bins, scale = std::pow(10.0, i - e + 1);
    for (int b = 0; b < bins; ++b) {
      const double centre = (0.1 + (b + 0.5) * width) * scale;
      out.push_back(centre);
      if (is_signed) out.push_back(-centre);
    }
  }
  out.push_back(0);
  out.push_back(1);
  std::sort(out.begin(), out.end());
  return out;
}

} // namespace lowmem::ref
