// LoRA on real data (Fashion-MNIST, Debian's dataset-fashion-mnist): a 784-64-10 MLP pretrained on
// classes 0-4 is fine-tuned on all 10 classes, once with full fine-tuning of every weight and once
// with frozen weights plus rank-4 LoRA adapters on both layers (biases trainable in both). The
// LoRA run must reach a training loss within a stated margin of full fine-tuning.
#include <catch2/catch.hpp>
#include <common/fashion_mnist.hpp>
#include <lowmem/adapters.hpp>

#include <cmath>
#include <vector>

using namespace lowmem;
using Mat = RowMatrixXf;

namespace {
struct adam {
  std::vector<float> m, v;
  int t = 0;
  void step(float* p, const float* g, std::size_t n, float lr) {
    if (m.size() != n) m.assign(n, 0.f), v.assign(n, 0.f);
    ++t;
    const float b1 = 0.9f, b2 = 0.999f, c1 = 1 - std::pow(b1, float(t)),
                c2 = 1 - std::pow(b2, float(t));
    for (std::size_t i = 0; i < n; ++i) {
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      p[i] -= lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8f);
    }
  }
};
template <class M> void adam_step(adam& a, M& p, const M& g, float lr) {
  a.step(p.data(), g.data(), std::size_t(p.size()), lr);
}

/// mean softmax cross-entropy; writes dlogits = (softmax - onehot) / n
double softmax_ce(const Mat& logits, const std::vector<std::uint8_t>& labels, Mat& dlogits) {
  const index_t n = logits.rows();
  dlogits.resize(n, logits.cols());
  double loss = 0;
  for (index_t i = 0; i < n; ++i) {
    const float mx = logits.row(i).maxCoeff();
    const Eigen::RowVectorXf e = (logits.row(i).array() - mx).exp().matrix();
    const float z = e.sum();
    loss += -(std::log(e[labels[i]] / z));
    dlogits.row(i) = e / (z * float(n));
    dlogits(i, labels[i]) -= 1.0f / float(n);
  }
  return loss / double(n);
}

struct mlp {
  Mat W1, W2;
  Eigen::RowVectorXf b1, b2;
};

struct dataset {
  Mat x;
  std::vector<std::uint8_t> y;
};

double eval_loss(const mlp& m, const dataset& d) {
  Mat pre = d.x * m.W1.transpose();
  pre.rowwise() += m.b1;
  Mat logits = pre.cwiseMax(0.f) * m.W2.transpose();
  logits.rowwise() += m.b2;
  Mat dl;
  return softmax_ce(logits, d.y, dl);
}

/// full fine-tuning of every weight; returns the final training loss
double train_full(mlp& m, const dataset& d, int steps, float lr) {
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
    Eigen::RowVectorXf db2 = dl.colwise().sum();
    dh = (dl * m.W2).cwiseProduct((pre.array() > 0.f).cast<float>().matrix());
    dW1 = dh.transpose() * d.x;
    Eigen::RowVectorXf db1 = dh.colwise().sum();
    adam_step(a1, m.W1, dW1, lr);
    adam_step(a2, m.W2, dW2, lr);
    adam_step(a3, m.b1, db1, lr);
    adam_step(a4, m.b2, db2, lr);
  }
  return loss;
}

/// LoRA fine-tuning: W1, W2 frozen, rank-r adapters on both, biases trainable
/// (the trained adapters are merged into `m` on return, for evaluation)
double train_lora(mlp& m, const dataset& d, index_t r, int steps, float lr) {
  const index_t n = d.x.rows(), hid = m.W1.rows(), in = m.W1.cols(), cls = m.W2.rows();
  Mat A1(r, in), B1(hid, r), A2(r, hid), B2(cls, r);
  lora_init_kaiming(random::stream{1, 1}, A1, B1);
  lora_init_kaiming(random::stream{1, 2}, A2, B2);
  const float s = lora_scale(float(2 * r), r);
  Mat pre(n, hid), h(n, hid), u1(n, r), u2(n, r), logits(n, cls), dl, dh(n, hid), dA1(r, in),
      dB1(hid, r), dA2(r, hid), dB2(cls, r), none(0, 0);
  owned_workspace ws(lora_backward_workspace_bytes(n, in, r));
  adam a1, a2, a3, a4, a5, a6;
  double loss = 0;
  for (int st = 0; st <= steps; ++st) {
    lora_forward(d.x, m.W1, m.b1.data(), A1, B1, s, {}, pre, u1, ws.get());
    h = pre.cwiseMax(0.f);
    lora_forward(h, m.W2, m.b2.data(), A2, B2, s, {}, logits, u2, ws.get());
    loss = softmax_ce(logits, d.y, dl);
    if (st == steps) break;
    dA1.setZero(), dB1.setZero(), dA2.setZero(), dB2.setZero(), dh.setZero();
    lora_backward(h, m.W2, A2, B2, u2, dl, s, {}, dh, dA2, dB2, ws.get());
    Eigen::RowVectorXf db2 = dl.colwise().sum();
    dh = dh.cwiseProduct((pre.array() > 0.f).cast<float>().matrix());
    lora_backward(d.x, m.W1, A1, B1, u1, dh, s, {}, none, dA1, dB1, ws.get());
    Eigen::RowVectorXf db1 = dh.colwise().sum();
    adam_step(a1, A1, dA1, lr);
    adam_step(a2, B1, dB1, lr);
    adam_step(a3, A2, dA2, lr);
    adam_step(a4, B2, dB2, lr);
    adam_step(a5, m.b1, db1, lr);
    adam_step(a6, m.b2, db2, lr);
  }
  lora_merge(m.W1, A1, B1, s);
  lora_merge(m.W2, A2, B2, s);
  return loss;
}

dataset take(const data::image_set& s, std::size_t begin, std::size_t count, int max_label) {
  dataset d;
  std::vector<std::size_t> idx;
  for (std::size_t i = begin; i < s.count && idx.size() < count; ++i)
    if (s.labels[i] <= max_label) idx.push_back(i);
  d.x.resize(index_t(idx.size()), 784);
  for (std::size_t k = 0; k < idx.size(); ++k) {
    for (std::size_t p = 0; p < 784; ++p) d.x(index_t(k), index_t(p)) = s.images[idx[k] * 784 + p];
    d.y.push_back(s.labels[idx[k]]);
  }
  return d;
}
} // namespace

TEST_CASE("LoRA fine-tuning on Fashion-MNIST reaches full fine-tuning's held-out loss within "
          "0.1 nats",
          "[adapters][lora][convergence]") {
  data::image_set train, t10k;
  try {
    train = data::load_fashion_mnist("train", 4000);
    t10k = data::load_fashion_mnist("t10k", 1000);
  } catch (const std::exception& e) {
    WARN("skipping: " << e.what());
    return;
  }
  const dataset pre = take(train, 0, 1000, 4);     // pretraining: classes 0-4 only
  const dataset fine = take(train, 2000, 1000, 9); // fine-tuning: all 10 classes, other images
  const dataset test = take(t10k, 0, 1000, 9);     // held-out
  mlp base;
  const index_t hid = 64;
  base.W1 = Mat::Random(hid, 784) * (1.0f / std::sqrt(784.f)); // std::rand: deterministic
  base.W2 = Mat::Random(10, hid) * (1.0f / std::sqrt(float(hid)));
  base.b1 = Eigen::RowVectorXf::Zero(hid);
  base.b2 = Eigen::RowVectorXf::Zero(10);
  train_full(base, pre, 60, 3e-3f);

  // 80 full-batch Adam steps each; learning rates picked per method from {3e-3, 1e-2, 3e-2}
  mlp full = base, adapted = base;
  const double full_train = train_full(full, fine, 80, 1e-2f);
  const double lora_train = train_lora(adapted, fine, /*r=*/4, 80, 3e-2f);
  const double before = eval_loss(base, test), full_test = eval_loss(full, test),
               lora_test = eval_loss(adapted, test);
  INFO("held-out loss: before " << before << ", full fine-tuning " << full_test << ", LoRA r=4 "
                                << lora_test << " (training: full " << full_train << ", LoRA "
                                << lora_train << ")");
  CHECK(full_test < 0.2 * before);
  CHECK(lora_test < 0.2 * before);
  CHECK(lora_test < full_test + 0.1);
}
