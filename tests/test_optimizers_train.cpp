// Every optimizer trains a real small model: a 784-128-10 ReLU MLP on a Fashion-MNIST subset
// (Debian's dataset-fashion-mnist; 6000 train / 2000 test images, 3 epochs, batch 100), and
// reaches the stated margin of fp32 AdamW's test accuracy.
#include <catch2/catch.hpp>
#include <common/fashion_mnist.hpp>
#include <common/optimizers_mlp.hpp> // the 784-128-10 MLP, shared with optimizers_compare
#include <lowmem/optimizers.hpp>

#include <cmath>
#include <functional>
#include <memory>
#include <vector>

using namespace lowmem;
using namespace lowmem::examples::optimizers_mlp;

namespace {

// An optimizer = a function applied to the model after each backward, step t >= 1.
using stepper = std::function<void(mlp&, std::int64_t)>;

double train(const data::image_set& tr, const data::image_set& te, const stepper& step) {
  mlp net(11);
  const std::size_t batch = 100;
  std::int64_t t = 0;
  for (int epoch = 0; epoch < 3; ++epoch)
    for (std::size_t b = 0; b + batch <= tr.count; b += batch) {
      net.backward(tr, b, batch);
      step(net, ++t);
    }
  return net.accuracy(te);
}

// fp32 AdamW on each tensor (the baseline, and the small tensors of the projected methods)
struct adamw_all {
  optim::adamw_config cfg;
  std::vector<std::vector<float>> m, v;
  explicit adamw_all(optim::adamw_config c) : cfg(c) {}
  void operator()(std::vector<float>& p, const std::vector<float>& g, std::size_t i,
                  std::int64_t t) {
    if (m.size() <= i) m.resize(i + 1), v.resize(i + 1);
    if (m[i].empty()) m[i].assign(p.size(), 0.f), v[i].assign(p.size(), 0.f);
    optim::adamw_step(p.data(), g.data(), m[i].data(), v[i].data(), p.size(), t, cfg);
  }
};

} // namespace

TEST_CASE("every optimizer trains an MLP on Fashion-MNIST close to fp32 AdamW",
          "[optimizers][train][real-data]") {
  const auto tr = data::load_fashion_mnist("train", 6000);
  const auto te = data::load_fashion_mnist("t10k", 2000);
  const optim::adamw_config acfg{2e-3, 0.9, 0.999, 1e-8, 1e-2};

  auto fp32 = std::make_shared<adamw_all>(acfg);
  const double base = train(tr, te, [&](mlp& n, std::int64_t t) {
    (*fp32)(n.w1, n.gw1, 0, t), (*fp32)(n.b1, n.gb1, 1, t), (*fp32)(n.w2, n.gw2, 2, t),
        (*fp32)(n.b2, n.gb2, 3, t);
  });
  INFO("fp32 AdamW accuracy " << base);
  CHECK(base > 0.78);

  auto quantized = [&](int bits) {
    auto st = std::make_shared<std::vector<optim::quantized_state>>();
    return train(tr, te, [st, bits, acfg](mlp& n, std::int64_t t) {
      std::vector<float>* ps[] = {&n.w1, &n.b1, &n.w2, &n.b2};
      const std::vector<float>* gs[] = {&n.gw1, &n.gb1, &n.gw2, &n.gb2};
      if (st->empty())
        for (auto* p : ps) st->emplace_back(p->size(), bits, 2);
      for (std::size_t i = 0; i < 4; ++i)
        optim::adamw_step(ps[i]->data(), gs[i]->data(), (*st)[i], ps[i]->size(), t, acfg);
    });
  };
  const double q8 = quantized(8), q4 = quantized(4);
  INFO("8-bit " << q8 << " 4-bit " << q4);
  CHECK(q8 > base - 0.02); // stated margins: 2 points for 8-bit, 3 points for 4-bit
  CHECK(q4 > base - 0.03);

  // bf16 parameters (stochastic rounding), fp32 state
  {
    std::vector<std::vector<bf16>> pb;
    adamw_all st(acfg);
    const double acc = train(tr, te, [&](mlp& n, std::int64_t t) {
      std::vector<float>* ps[] = {&n.w1, &n.b1, &n.w2, &n.b2};
      const std::vector<float>* gs[] = {&n.gw1, &n.gb1, &n.gw2, &n.gb2};
      if (pb.empty())
        for (auto* p : ps) {
          pb.emplace_back(p->size());
          to_bf16(p->data(), pb.back().data(), p->size());
        }
      for (std::size_t i = 0; i < 4; ++i) {
        if (st.m.size() <= i) st.m.resize(i + 1), st.v.resize(i + 1);
        if (st.m[i].empty()) st.m[i].assign(ps[i]->size(), 0.f), st.v[i].assign(ps[i]->size(), 0.f);
        optim::adamw_step(pb[i].data(), gs[i]->data(), st.m[i].data(), st.v[i].data(),
                          ps[i]->size(), t, acfg, random::stream{99, std::uint64_t(4 * t) + i});
        to_float(pb[i].data(), ps[i]->data(), ps[i]->size()); // the model computes in fp32
      }
    });
    INFO("bf16 AdamW " << acc);
    CHECK(acc > base - 0.03);
  }

  // Lion (lr 3-10× smaller and wd 3-10× larger than AdamW, as its paper recommends), SGD Nesterov
  {
    std::vector<std::vector<float>> m;
    const double acc = train(tr, te, [&](mlp& n, std::int64_t) {
      std::vector<float>* ps[] = {&n.w1, &n.b1, &n.w2, &n.b2};
      const std::vector<float>* gs[] = {&n.gw1, &n.gb1, &n.gw2, &n.gb2};
      if (m.empty())
        for (auto* p : ps) m.emplace_back(p->size(), 0.f);
      for (std::size_t i = 0; i < 4; ++i)
        optim::lion_step(ps[i]->data(), gs[i]->data(), m[i].data(), ps[i]->size(),
                         {6e-4, 0.9, 0.99, 0.03});
    });
    INFO("Lion " << acc);
    CHECK(acc > base - 0.04);
  }
  {
    std::vector<std::vector<float>> buf;
    const double acc = train(tr, te, [&](mlp& n, std::int64_t t) {
      std::vector<float>* ps[] = {&n.w1, &n.b1, &n.w2, &n.b2};
      const std::vector<float>* gs[] = {&n.gw1, &n.gb1, &n.gw2, &n.gb2};
      if (buf.empty())
        for (auto* p : ps) buf.emplace_back(p->size(), 0.f);
      for (std::size_t i = 0; i < 4; ++i)
        optim::sgd_step(ps[i]->data(), gs[i]->data(), buf[i].data(), ps[i]->size(), t,
                        {0.05, 0.9, 0.0, 0.0, true});
    });
    INFO("SGD Nesterov " << acc);
    CHECK(acc > base - 0.04);
  }

  // projected methods on W1 [784, 128] (the other tensors with fp32 AdamW, as GaLore does)
  auto projected = [&](optim::projected_config pc) {
    auto opt = std::make_shared<optim::projected_adam>(index_t(in_dim), index_t(hid), pc);
    auto rest = std::make_shared<adamw_all>(acfg);
    return train(tr, te, [opt, rest](mlp& n, std::int64_t t) {
      Eigen::Map<RowMatrixXf> w(n.w1.data(), index_t(in_dim), index_t(hid));
      Eigen::Map<const RowMatrixXf> g(n.gw1.data(), index_t(in_dim), index_t(hid));
      opt->step(w, g);
      (*rest)(n.b1, n.gb1, 1, t), (*rest)(n.w2, n.gw2, 2, t), (*rest)(n.b2, n.gb2, 3, t);
    });
  };
  optim::projected_config pc;
  pc.lr = 2e-3, pc.rank = 32, pc.update_gap = 50, pc.alpha = 1.0;
  const double galore = projected(pc);
  pc.method = optim::projection_method::apollo_mini, pc.rank = 1, pc.scale = 128;
  pc.lr = 1e-3; // the authors pair scale 128 with a smaller lr
  const double mini = projected(pc);
  INFO("GaLore r=32 " << galore << " APOLLO-Mini " << mini);
  CHECK(galore > base - 0.05);
  CHECK(mini > base - 0.05);
}
