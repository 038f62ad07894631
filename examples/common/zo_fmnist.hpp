// examples/common/zo_fmnist.hpp — the Fashion-MNIST pieces that examples/mezo_finetune.cpp and
// tests/test_zeroth_order_fmnist.cpp share: images 2×2 average-pooled to 14×14 (196 features),
// an fp32 dot product, and the mean softmax cross-entropy (with accuracy) of a model that maps one
// pooled image to logits. Plain loops over std::vector; not part of the library.
//
//   pooled x[r, c] = (sum of the 2×2 block of pixels at (2r, 2c)) / 4 − offset[r, c]
//   loss = mean over rows of log Σ_c exp(logit_c) − logit_label
#pragma once

#include <common/fashion_mnist.hpp>
#include <lowmem/simd/simd.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lowmem::examples::zo_fmnist {

constexpr std::size_t side = 14, features = side * side, classes = 10;

struct dataset {
  std::vector<float> x; // n × features, row-major
  std::vector<std::uint8_t> y;
  std::size_t n = 0;
};

/// The images of s pooled 2×2 to 14×14, minus `shift` and (when given) the per-feature `mean`.
inline dataset pooled(const data::image_set& s, float shift = 0.f,
                      const std::vector<float>* mean = nullptr) {
  dataset d;
  d.n = s.count;
  d.y = s.labels;
  d.x.resize(d.n * features);
  for (std::size_t i = 0; i < d.n; ++i)
    for (std::size_t r = 0; r < side; ++r)
      for (std::size_t c = 0; c < side; ++c) {
        const float* im = s.images.data() + i * 784;
        const float v = im[(2 * r) * 28 + 2 * c] + im[(2 * r) * 28 + 2 * c + 1] +
                        im[(2 * r + 1) * 28 + 2 * c] + im[(2 * r + 1) * 28 + 2 * c + 1];
        d.x[i * features + r * side + c] = 0.25f * v - shift - (mean ? (*mean)[r * side + c] : 0.f);
      }
  return d;
}

/// Per-feature mean over the rows of d.
inline std::vector<float> feature_mean(const dataset& d) {
  std::vector<float> m(features, 0.f);
  for (std::size_t i = 0; i < d.n; ++i)
    for (std::size_t f = 0; f < features; ++f) m[f] += d.x[i * features + f];
  for (auto& v : m) v /= float(d.n);
  return m;
}

/// Σ a[i]·b[i], fp32 (SIMD lanes, then the tail).
inline float dot(const float* a, const float* b, std::size_t n) {
  using Arch = simd::default_arch;
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  F acc(0.f);
  const std::size_t full = n - n % W;
  for (std::size_t i = 0; i < full; i += W)
    acc = simd::fma<Arch>(F::load_unaligned(a + i), F::load_unaligned(b + i), acc);
  float s = simd::reduce_add(acc);
  for (std::size_t i = full; i < n; ++i) s += a[i] * b[i];
  return s;
}

/// Mean softmax cross-entropy over rows [begin, begin + count) of d (wrapping at d.n), and the
/// accuracy when `acc` is given. logits(x, out) writes the `classes` logits of one pooled image.
template <class Logits>
double mean_xent(const dataset& d, std::size_t begin, std::size_t count, Logits&& logits,
                 double* acc = nullptr) {
  double total = 0;
  std::size_t correct = 0;
  for (std::size_t r = 0; r < count; ++r) {
    const std::size_t i = (begin + r) % d.n;
    float l[classes];
    logits(d.x.data() + i * features, l);
    float mx = l[0];
    std::size_t arg = 0;
    for (std::size_t c = 1; c < classes; ++c)
      if (l[c] > mx) mx = l[c], arg = c;
    double se = 0;
    for (float v : l) se += std::exp(double(v - mx));
    total += std::log(se) + mx - l[d.y[i]];
    correct += arg == d.y[i];
  }
  if (acc) *acc = double(correct) / double(count);
  return total / double(count);
}

} // namespace lowmem::examples::zo_fmnist
