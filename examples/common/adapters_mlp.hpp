// examples/common/adapters_mlp.hpp — the small Fashion-MNIST MLP shared by the LoRA example
// (examples/lora_finetune.cpp) and the adapters convergence test: data splits by class, softmax
// cross-entropy, a plain Adam, and full training of a 784-hid-10 ReLU MLP (used to "pretrain" the
// frozen model and as the full fine-tuning baseline). Plain Eigen; not part of the library.
#pragma once

#include <common/fashion_mnist.hpp>
#include <lowmem/core/eigen.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace lowmem::examples::adapters_mlp {

using Mat = RowMatrixXf;
using Row = Eigen::RowVectorXf;

/// Adam (β = 0.9, 0.999, ε = 1e-8, bias-corrected), one state per parameter tensor.
struct adam {
  std::vector<float> m, v;
  int t = 0;
  template <class M, class G> void step(M& p, const G& g, float lr) {
    const std::size_t n = std::size_t(p.size());
    if (m.size() != n) m.assign(n, 0.f), v.assign(n, 0.f);
    ++t;
    const float c1 = 1 - std::pow(0.9f, float(t)), c2 = 1 - std::pow(0.999f, float(t));
    for (std::size_t i = 0; i < n; ++i) {
      const float gi = g.data()[i];
      m[i] = 0.9f * m[i] + 0.1f * gi;
      v[i] = 0.999f * v[i] + 0.001f * gi * gi;
      p.data()[i] -= lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8f);
    }
  }
};

/// Mean softmax cross-entropy; writes dlogits = (softmax − onehot) / n and, when `correct` is
/// given, the count of correct argmaxes.
inline double softmax_ce(const Mat& logits, const std::vector<std::uint8_t>& y, Mat& dl,
                         int* correct = nullptr) {
  const index_t n = logits.rows();
  dl.resize(n, logits.cols());
  double loss = 0;
  int ok = 0;
  for (index_t i = 0; i < n; ++i) {
    index_t arg;
    const float mx = logits.row(i).maxCoeff(&arg);
    ok += arg == index_t(y[std::size_t(i)]);
    dl.row(i) = (logits.row(i).array() - mx).exp().matrix();
    const float z = dl.row(i).sum();
    loss -= std::log(dl(i, y[std::size_t(i)]) / z);
    dl.row(i) /= z * float(n);
    dl(i, y[std::size_t(i)]) -= 1.0f / float(n);
  }
  if (correct) *correct = ok;
  return loss / double(n);
}

/// Images (rows of 784 floats) and labels.
struct split {
  Mat x;
  std::vector<std::uint8_t> y;
};

/// Up to `count` images from index `begin` on whose label is <= max_label.
inline split take(const data::image_set& s, std::size_t begin, std::size_t count, int max_label) {
  split d;
  std::vector<std::size_t> idx;
  for (std::size_t i = begin; i < s.count && idx.size() < count; ++i)
    if (s.labels[i] <= max_label) idx.push_back(i);
  d.x.resize(index_t(idx.size()), 784);
  for (std::size_t k = 0; k < idx.size(); ++k) {
    d.x.row(index_t(k)) = Eigen::Map<const Row>(s.images.data() + idx[k] * 784, 784);
    d.y.push_back(s.labels[idx[k]]);
  }
  return d;
}

/// y = relu(x·W1ᵀ + b1)·W2ᵀ + b2.
struct mlp {
  Mat W1, W2;
  Row b1, b2;
};

/// Uniform(±1/√fan_in) weights from Eigen's Random (std::rand: deterministic), zero biases.
inline mlp make_mlp(index_t in, index_t hid, index_t cls) {
  mlp m;
  m.W1 = Mat::Random(hid, in) * (1.0f / std::sqrt(float(in)));
  m.W2 = Mat::Random(cls, hid) * (1.0f / std::sqrt(float(hid)));
  m.b1 = Row::Zero(hid);
  m.b2 = Row::Zero(cls);
  return m;
}

/// Held-out loss (and correct count) of the model.
inline double eval_loss(const mlp& m, const split& d, int* correct = nullptr) {
  Mat pre = d.x * m.W1.transpose();
  pre.rowwise() += m.b1;
  Mat logits = pre.cwiseMax(0.f) * m.W2.transpose();
  logits.rowwise() += m.b2;
  Mat dl;
  return softmax_ce(logits, d.y, dl, correct);
}

/// Full training of every weight and bias: `steps` full-batch Adam steps; returns the training
/// loss after the last step.
inline double train_full(mlp& m, const split& d, int steps, float lr) {
  adam a1, a2, a3, a4;
  Mat pre, h, logits, dl, dh, dW1, dW2;
  double loss = 0;
  for (int s = 0; s <= steps; ++s) {
    pre = d.x * m.W1.transpose();
    pre.rowwise() += m.b1;
    h = pre.cwiseMax(0.f);
    logits = h * m.W2.transpose();
    logits.rowwise() += m.b2;
    loss = softmax_ce(logits, d.y, dl);
    if (s == steps) break;
    dW2 = dl.transpose() * h;
    const Row db2 = dl.colwise().sum();
    dh = (dl * m.W2).cwiseProduct((pre.array() > 0.f).cast<float>().matrix());
    dW1 = dh.transpose() * d.x;
    const Row db1 = dh.colwise().sum();
    a1.step(m.W1, dW1, lr);
    a2.step(m.W2, dW2, lr);
    a3.step(m.b1, db1, lr);
    a4.step(m.b2, db2, lr);
  }
  return loss;
}

} // namespace lowmem::examples::adapters_mlp
