// LoRA on real data (Fashion-MNIST, Debian's dataset-fashion-mnist): a 784-64-10 MLP pretrained on
// classes 0-4 is fine-tuned on all 10 classes, once with full fine-tuning of every weight and once
// with frozen weights plus rank-4 LoRA adapters on both layers (biases trainable in both). The
// LoRA run must reach a training loss within a stated margin of full fine-tuning.
#include <catch2/catch.hpp>
#include <common/adapters_mlp.hpp>
#include <lowmem/adapters.hpp>

#include <cmath>
#include <vector>

using namespace lowmem;
using namespace lowmem::examples::adapters_mlp; // shared with examples/lora_finetune.cpp

namespace {
/// LoRA fine-tuning: W1, W2 frozen, rank-r adapters on both, biases trainable
/// (the trained adapters are merged into `m` on return, for evaluation)
double train_lora(mlp& m, const split& d, index_t r, int steps, float lr) {
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
    a1.step(A1, dA1, lr);
    a2.step(B1, dB1, lr);
    a3.step(A2, dA2, lr);
    a4.step(B2, dB2, lr);
    a5.step(m.b1, db1, lr);
    a6.step(m.b2, db2, lr);
  }
  lora_merge(m.W1, A1, B1, s);
  lora_merge(m.W2, A2, B2, s);
  return loss;
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
  const split pre = take(train, 0, 1000, 4);     // pretraining: classes 0-4 only
  const split fine = take(train, 2000, 1000, 9); // fine-tuning: all 10 classes, other images
  const split test = take(t10k, 0, 1000, 9);     // held-out
  mlp base = make_mlp(784, 64, 10);
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
