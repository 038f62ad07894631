// Zeroth-order optimizers on real data: softmax (multinomial logistic) regression on a
// Fashion-MNIST subset (Debian's dataset-fashion-mnist), images 2×2 average-pooled to 14×14 and
// centred, 10×196 weights + 10 biases in two registered spans. Only forward passes (the loss)
// are used. MeZO must lower the training loss and reach a stated test accuracy in a stated number
// of steps; ZO-Adam, ZO-Sign, ZO-Cons, Sparse MeZO and q-SPSA must each lower the loss.
#include <catch2/catch.hpp>
#include <common/zo_fmnist.hpp>
#include <lowmem/zeroth_order.hpp>

#include <algorithm>
#include <cstdio>
#include <vector>

using namespace lowmem;
using namespace lowmem::examples::zo_fmnist;

namespace {

struct model {
  std::vector<float> w = std::vector<float>(classes * features, 0.f),
                     b = std::vector<float>(classes, 0.f);

  // mean cross-entropy over rows [begin, begin + count) of d (wrapping), and accuracy
  double loss(const dataset& d, std::size_t begin, std::size_t count, double* acc = nullptr) const {
    return mean_xent(
        d, begin, count,
        [&](const float* x, float* logits) {
          for (std::size_t c = 0; c < classes; ++c)
            logits[c] = dot(w.data() + c * features, x, features) + b[c];
        },
        acc);
  }
};

struct fixture {
  dataset train, test;
  fixture() {
    auto tr = data::load_fashion_mnist("train", 4000);
    auto te = data::load_fashion_mnist("t10k", 1000);
    const auto raw = pooled(tr);
    const auto mean = feature_mean(raw);
    train = pooled(tr, 0.f, &mean);
    test = pooled(te, 0.f, &mean);
  }
};
const fixture& data_once() {
  static fixture f;
  return f;
}

struct run_result {
  double loss0, loss1, test_acc;
};

// Trains `steps` ZO steps on minibatches of 256 (the same minibatch for every loss of a step).
run_result train(zo::options o, int steps, double keep_fraction = 1.0) {
  const auto& d = data_once();
  model m;
  zo::parameters params;
  params.add(0, m.w.data(), m.w.size());
  params.add(1, m.b.data(), m.b.size());
  zo::optimizer opt(params, o);
  const std::size_t batch = 256;
  run_result r{};
  r.loss0 = m.loss(d.train, 0, d.train.n);
  for (int t = 0; t < steps; ++t) {
    if (keep_fraction < 1 && t % 50 == 0) // Sparse MeZO: refresh the threshold now and then
      params.set_threshold(
          0, std::max(1e-4f, zo::magnitude_threshold(m.w.data(), m.w.size(), keep_fraction)));
    const std::size_t begin = std::size_t(t) * batch;
    opt.step([&] { return m.loss(d.train, begin, batch); });
  }
  r.loss1 = m.loss(d.train, 0, d.train.n);
  m.loss(d.test, 0, d.test.n, &r.test_acc);
  return r;
}

} // namespace

TEST_CASE("MeZO trains softmax regression on Fashion-MNIST with forward passes only",
          "[zo][real]") {
  zo::options o;
  o.lr = 2e-2f;
  o.epsilon = 1e-3f;
  o.seed = 1;
  const int steps = 2000;
  const auto r = train(o, steps);
  std::printf("MeZO: train loss %.4f -> %.4f, test accuracy %.3f after %d steps\n", r.loss0,
              r.loss1, r.test_acc, steps);
  // measured: 2.303 -> 0.73, test accuracy 0.75 (first-order logistic regression reaches ~0.80)
  CHECK(r.loss1 < 0.4 * r.loss0);
  CHECK(r.test_acc >= 0.72); // chance is 0.10
}

TEST_CASE("ZO-Adam, ZO-Sign, ZO-Cons, Sparse MeZO and q-SPSA each lower the loss", "[zo][real]") {
  struct variant {
    const char* name;
    zo::method rule;
    float lr;
    int q;
    double keep;
    int steps;
  };
  for (const variant v : {variant{"ZO-Adam", zo::method::adam, 2e-2f, 1, 1.0, 600},
                          variant{"ZO-Sign", zo::method::sign, 8e-3f, 1, 1.0, 600},
                          variant{"ZO-Cons", zo::method::cons, 4e-2f, 1, 1.0, 400},
                          variant{"ZO-momentum", zo::method::momentum, 4e-3f, 1, 1.0, 600},
                          variant{"Sparse MeZO", zo::method::sgd, 8e-2f, 1, 0.5, 600},
                          variant{"q-SPSA q=4", zo::method::sgd, 8e-2f, 4, 1.0, 300}}) {
    zo::options o;
    o.rule = v.rule;
    o.lr = v.lr;
    o.q = v.q;
    o.seed = 2;
    const auto r = train(o, v.steps, v.keep);
    std::printf("%s: train loss %.4f -> %.4f, test accuracy %.3f after %d steps\n", v.name, r.loss0,
                r.loss1, r.test_acc, v.steps);
    INFO(v.name);
    CHECK(r.loss1 < 0.7 * r.loss0);
    CHECK(r.test_acc >= 0.55);
  }
}
