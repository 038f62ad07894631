// lora_finetune: fine-tune a small frozen model with LoRA on real data (Fashion-MNIST).
//
// A 784-256-10 MLP is "pretrained" on classes 0-4, frozen, then adapted to all 10 classes with
// rank-8 LoRA adapters on both layers (peft defaults: kaiming A, zero B, s = alpha / r, dropout
// 0.05 on the adapter input; biases trainable). Prints the loss curve, held-out accuracy, the
// trainable-parameter count and the heap growth of one training step.
#include <lowmem/adapters.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/memory_hooks.hpp>

#include <common/adapters_mlp.hpp> // Fashion-MNIST splits, softmax CE, Adam, the MLP

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

using namespace lowmem;
using namespace lowmem::examples::adapters_mlp;

int main() {
  const auto train = data::load_fashion_mnist("train", 12000);
  const auto t10k = data::load_fashion_mnist("t10k", 2000);
  const split pre = take(train, 0, 4000, 4), fine = take(train, 6000, 4000, 9),
              test = take(t10k, 0, 2000, 9);
  const index_t in = 784, hid = 256, cls = 10, r = 8, n = fine.x.rows();

  // --- the "pretrained" model: full training on classes 0-4 only -------------------------------
  mlp model = make_mlp(in, hid, cls);
  train_full(model, pre, 60, 3e-3f);
  Mat &W1 = model.W1, &W2 = model.W2;
  Row &b1 = model.b1, &b2 = model.b2;

  // --- LoRA fine-tuning on all classes: W1, W2 frozen ------------------------------------------
  Mat A1(r, in), B1(hid, r), A2(r, hid), B2(cls, r);
  lora_init_kaiming(random::stream{7, 1}, A1, B1);
  lora_init_kaiming(random::stream{7, 2}, A2, B2);
  const float s = lora_scale(16.0f, r); // alpha = 16
  Mat pre1(n, hid), h(n, hid), u1(n, r), u2(n, r), logits(n, cls), dl, dh(n, hid), dA1(r, in),
      dB1(hid, r), dA2(r, hid), dB2(cls, r), no_dx(0, 0);
  Row db1(hid), db2(cls);
  adapter_dropout drop{0.05f, random::stream{99, 0}};
  owned_workspace ws(std::max({lora_forward_workspace_bytes(in, drop),
                               lora_backward_workspace_bytes(n, in, r, drop),
                               lora_backward_workspace_bytes(n, hid, r, drop)}));
  adam o[6];
  auto evaluate = [&](const split& d, int& correct) { return eval_loss(model, d, &correct); };
  int correct = 0;
  double test_loss = evaluate(test, correct);
  std::printf("before fine-tuning: held-out loss %.4f, accuracy %.1f%%\n", test_loss,
              100.0 * correct / double(test.y.size()));
  std::int64_t step_peak = 0, step_allocs = 0;
  for (int step = 0; step < 150; ++step) {
    drop.stream.id = std::uint64_t(2 * step); // a fresh mask every step, regenerated in backward
    adapter_dropout drop2{drop.p, random::stream{drop.stream.seed, std::uint64_t(2 * step + 1)}};
    memory::region region; // one training step: forward, loss, backward, update
    lora_forward(fine.x, W1, b1.data(), A1, B1, s, drop, pre1, u1, ws.get());
    h = pre1.cwiseMax(0.f);
    lora_forward(h, W2, b2.data(), A2, B2, s, drop2, logits, u2, ws.get());
    const double loss = softmax_ce(logits, fine.y, dl, &correct);
    dA1.setZero(), dB1.setZero(), dA2.setZero(), dB2.setZero(), dh.setZero();
    lora_backward(h, W2, A2, B2, u2, dl, s, drop2, dh, dA2, dB2, ws.get());
    db2 = dl.colwise().sum();
    dh = dh.cwiseProduct((pre1.array() > 0.f).cast<float>().matrix());
    lora_backward(fine.x, W1, A1, B1, u1, dh, s, drop, no_dx, dA1, dB1, ws.get());
    db1 = dh.colwise().sum();
    o[0].step(A1, dA1, 1e-2f), o[1].step(B1, dB1, 1e-2f), o[2].step(A2, dA2, 1e-2f),
        o[3].step(B2, dB2, 1e-2f), o[4].step(b1, db1, 1e-2f), o[5].step(b2, db2, 1e-2f);
    step_peak = std::max<std::int64_t>(step_peak, region.peak_bytes());
    step_allocs = region.allocations();
    if (step % 25 == 0 || step == 149)
      std::printf("step %3d  train loss %.4f  accuracy %.1f%%\n", step, loss,
                  100.0 * correct / double(n));
  }
  // merge the adapters into the frozen weights for inference (no extra latency)
  lora_merge(W1, A1, B1, s);
  lora_merge(W2, A2, B2, s);
  test_loss = evaluate(test, correct);
  std::printf("after fine-tuning: held-out loss %.4f, accuracy %.1f%%\n", test_loss,
              100.0 * correct / double(test.y.size()));
  const double frozen = double(W1.size() + W2.size()),
               trainable =
                   double(A1.size() + B1.size() + A2.size() + B2.size() + b1.size() + b2.size());
  std::printf("trainable parameters %.0f (%.2f%% of the %.0f frozen weights)\n", trainable,
              100.0 * trainable / frozen, frozen);
  std::printf("gradients + Adam moments: %.1f KiB with LoRA vs %.1f KiB for full fine-tuning; "
              "LoRA's own saved activations (u1, u2): %.1f KiB\n",
              3.0 * trainable * 4 / 1024.0,
              3.0 * (frozen + double(b1.size() + b2.size())) * 4 / 1024.0,
              double((u1.size() + u2.size()) * 4) / 1024.0);
  std::printf("heap growth of one training step: peak %.1f KiB, %lld allocations (the example's "
              "own Eigen temporaries; the lowmem calls allocate nothing)\n",
              double(step_peak) / 1024.0, (long long)step_allocs);
  std::printf("workspace %.1f KiB (allocated once)\n", double(ws.capacity()) / 1024.0);
  return 0;
}
