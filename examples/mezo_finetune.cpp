// mezo_finetune: trains a small MLP (196 → 64 → 10, ReLU) on Fashion-MNIST (Debian's
// dataset-fashion-mnist, images 2×2 average-pooled to 14×14) with MeZO — forward passes only —
// and prints loss, test accuracy and the peak heap of a training step next to the peak heap of
// inference alone. The trainer owns the model and the loss; lowmem::zo owns perturbing,
// restoring and updating the registered parameter spans.
//
//   build/examples/mezo_finetune [steps=3000]
#include <common/zo_fmnist.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/memory_hooks.hpp>
#include <lowmem/zeroth_order.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

using lowmem::examples::zo_fmnist::dataset;
using lowmem::examples::zo_fmnist::dot;
constexpr std::size_t in = lowmem::examples::zo_fmnist::features, hidden = 64,
                      classes = lowmem::examples::zo_fmnist::classes;

struct mlp {
  std::vector<float> w1, b1, w2, b2;
  mlp() : w1(hidden * in), b1(hidden, 0.f), w2(classes * hidden), b2(classes, 0.f) {
    // He-style init from the library's counter RNG (any seeded init would do)
    lowmem::random::fill_normal(lowmem::random::stream{2024, 1}, 0, w1.data(), w1.size());
    lowmem::random::fill_normal(lowmem::random::stream{2024, 2}, 0, w2.data(), w2.size());
    for (auto& v : w1) v *= std::sqrt(2.0f / in);
    for (auto& v : w2) v *= std::sqrt(2.0f / hidden);
  }
  std::size_t parameter_count() const { return w1.size() + b1.size() + w2.size() + b2.size(); }

  // Inference: mean cross-entropy (and accuracy) over rows [begin, begin+count) of d. Allocates
  // its activations like a plain inference would (one hidden buffer for the batch).
  double loss(const dataset& d, std::size_t begin, std::size_t count, double* acc = nullptr) const {
    std::vector<float> h(count * hidden);
    std::size_t r = 0;
    return lowmem::examples::zo_fmnist::mean_xent(
        d, begin, count,
        [&](const float* x, float* logits) {
          float* hr = h.data() + (r++) * hidden;
          for (std::size_t u = 0; u < hidden; ++u)
            hr[u] = std::max(0.f, dot(w1.data() + u * in, x, in) + b1[u]);
          for (std::size_t c = 0; c < classes; ++c)
            logits[c] = dot(w2.data() + c * hidden, hr, hidden) + b2[c];
        },
        acc);
  }
};

} // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 3000;
  using lowmem::examples::zo_fmnist::pooled;
  const dataset train = pooled(lowmem::data::load_fashion_mnist("train", 10000), 0.3f);
  const dataset test = pooled(lowmem::data::load_fashion_mnist("t10k", 2000), 0.3f);
  mlp model;

  lowmem::zo::parameters params; // spans registered once, each with a stable id
  params.add(0, model.w1.data(), model.w1.size());
  params.add(1, model.b1.data(), model.b1.size());
  params.add(2, model.w2.data(), model.w2.size());
  params.add(3, model.b2.data(), model.b2.size());
  lowmem::zo::options opt;
  opt.lr = 1e-2f;
  opt.epsilon = 1e-3f;
  opt.seed = 42;
  lowmem::zo::optimizer mezo(params, opt);

  const std::size_t batch = 256;
  std::printf("MLP %zu-%zu-%zu, %zu parameters (%.1f KiB), MeZO lr %g eps %g, batch %zu\n", in,
              hidden, classes, model.parameter_count(), model.parameter_count() * 4 / 1024.0,
              double(opt.lr), double(opt.epsilon), batch);

  // Inference-only peak heap: one forward over a batch.
  std::int64_t inference_peak = 0;
  {
    lowmem::memory::region r;
    model.loss(train, 0, batch);
    inference_peak = r.peak_bytes();
  }

  double acc = 0;
  double loss0 = model.loss(train, 0, train.n, &acc);
  model.loss(test, 0, test.n, &acc);
  std::printf("step %5d  train loss %.4f  test accuracy %.3f\n", 0, loss0, acc);
  std::int64_t train_peak = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 1; t <= steps; ++t) {
    const std::size_t begin = std::size_t(t) * batch;
    {
      lowmem::memory::region r; // a whole MeZO step: two forwards + three sweeps
      mezo.step([&] { return model.loss(train, begin, batch); });
      train_peak = std::max<std::int64_t>(train_peak, r.peak_bytes());
    }
    if (t % 500 == 0 || t == steps) {
      const double l = model.loss(train, 0, train.n);
      model.loss(test, 0, test.n, &acc);
      std::printf("step %5d  train loss %.4f  test accuracy %.3f\n", t, l, acc);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%d MeZO steps in %.2f s (%.2f ms/step, two forwards each)\n", steps, secs,
              1e3 * secs / steps);
  std::printf("peak heap during a training step: %.1f KiB; inference only: %.1f KiB; optimizer "
              "state: %zu bytes\n",
              train_peak / 1024.0, inference_peak / 1024.0, mezo.state_bytes());
  std::printf("(backprop + Adam would add gradients %.1f KiB, Adam state %.1f KiB and stored "
              "activations)\n",
              model.parameter_count() * 4 / 1024.0, model.parameter_count() * 8 / 1024.0);
  return train_peak <= inference_peak ? 0 : 1;
}
