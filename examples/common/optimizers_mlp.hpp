// examples/common/optimizers_mlp.hpp — the 784-128-10 ReLU MLP that examples/optimizers_compare.cpp
// and tests/test_optimizers_train.cpp train on Fashion-MNIST with each optimizer. Plain loops over
// std::vector tensors (the optimizers take raw pointers); not part of the library.
//
//   h = ReLU(x·W1 + b1), logits = h·W2 + b2, loss = mean softmax cross-entropy.
//   W1 [784, 128] and W2 [128, 10] are stored input-major (x·W), so the loops skip x_k = 0
//   (background pixels) with one test per row of W1.
#pragma once

#include <common/fashion_mnist.hpp>
#include <lowmem/kernels/random.hpp> // random::stream, random::fill_normal

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace lowmem::examples::optimizers_mlp {

constexpr std::size_t in_dim = 784, hid = 128, classes = 10;

struct mlp {
  std::vector<float> w1, b1, w2, b2;     // W1 [784, 128], W2 [128, 10]
  std::vector<float> gw1, gb1, gw2, gb2; // their gradients (written by backward)
  /// He init (normal · √(2/784)) for W1, normal · √(1/128) for W2 (stream (seed, 0)); zero biases.
  explicit mlp(std::uint64_t seed) {
    w1.resize(in_dim * hid), b1.assign(hid, 0.f), w2.resize(hid * classes), b2.assign(classes, 0.f);
    const random::stream s{seed, 0};
    random::fill_normal(s, 0, w1.data(), w1.size());
    random::fill_normal(s, w1.size(), w2.data(), w2.size());
    for (float& x : w1) x *= std::sqrt(2.0f / in_dim);
    for (float& x : w2) x *= std::sqrt(1.0f / hid);
    gw1.assign(w1.size(), 0.f), gb1.assign(hid, 0.f), gw2.assign(w2.size(), 0.f),
        gb2.assign(classes, 0.f);
  }
  /// Logits of one image x [784]; h [128] receives the hidden activations.
  void forward(const float* x, float* h, float* logits) const {
    for (std::size_t j = 0; j < hid; ++j) h[j] = b1[j];
    for (std::size_t k = 0; k < in_dim; ++k) {
      if (x[k] == 0.f) continue;
      const float* w = w1.data() + k * hid;
      for (std::size_t j = 0; j < hid; ++j) h[j] += x[k] * w[j];
    }
    for (std::size_t j = 0; j < hid; ++j) h[j] = std::max(h[j], 0.f);
    for (std::size_t c = 0; c < classes; ++c) logits[c] = b2[c];
    for (std::size_t j = 0; j < hid; ++j)
      for (std::size_t c = 0; c < classes; ++c) logits[c] += h[j] * w2[j * classes + c];
  }
  /// Gradients (overwritten) of the mean cross-entropy over images [begin, begin + count) of d.
  void backward(const data::image_set& d, std::size_t begin, std::size_t count) {
    std::fill(gw1.begin(), gw1.end(), 0.f), std::fill(gb1.begin(), gb1.end(), 0.f);
    std::fill(gw2.begin(), gw2.end(), 0.f), std::fill(gb2.begin(), gb2.end(), 0.f);
    float h[hid], logits[classes], dl[classes], dh[hid];
    for (std::size_t s = begin; s < begin + count; ++s) {
      const float* x = d.images.data() + s * in_dim;
      forward(x, h, logits);
      float mx = *std::max_element(logits, logits + classes), z = 0;
      for (std::size_t c = 0; c < classes; ++c) z += (dl[c] = std::exp(logits[c] - mx));
      for (std::size_t c = 0; c < classes; ++c)
        dl[c] = (dl[c] / z - (c == d.labels[s] ? 1.f : 0.f)) / float(count);
      for (std::size_t j = 0; j < hid; ++j) {
        float acc = 0;
        for (std::size_t c = 0; c < classes; ++c) {
          gw2[j * classes + c] += h[j] * dl[c];
          acc += w2[j * classes + c] * dl[c];
        }
        dh[j] = h[j] > 0.f ? acc : 0.f;
        gb1[j] += dh[j];
      }
      for (std::size_t c = 0; c < classes; ++c) gb2[c] += dl[c];
      for (std::size_t k = 0; k < in_dim; ++k) {
        if (x[k] == 0.f) continue;
        float* g = gw1.data() + k * hid;
        for (std::size_t j = 0; j < hid; ++j) g[j] += x[k] * dh[j];
      }
    }
  }
  /// Top-1 accuracy on d.
  double accuracy(const data::image_set& d) const {
    float h[hid], logits[classes];
    std::size_t ok = 0;
    for (std::size_t s = 0; s < d.count; ++s) {
      forward(d.images.data() + s * in_dim, h, logits);
      ok += std::size_t(std::max_element(logits, logits + classes) - logits) == d.labels[s];
    }
    return double(ok) / double(d.count);
  }
  /// Tensor i (0: W1, 1: b1, 2: W2, 3: b2) and its gradient.
  std::vector<float>* params(std::size_t i) {
    return i == 0 ? &w1 : i == 1 ? &b1 : i == 2 ? &w2 : &b2;
  }
  std::vector<float>* grads(std::size_t i) {
    return i == 0 ? &gw1 : i == 1 ? &gb1 : i == 2 ? &gw2 : &gb2;
  }
};

} // namespace lowmem::examples::optimizers_mlp
