// optimizers_compare: trains the same 784-128-10 ReLU MLP on Fashion-MNIST (Debian's
// dataset-fashion-mnist; 10000 train / 10000 test images, 3 epochs, batch 100) with fp32 AdamW,
// 8-bit AdamW, 4-bit AdamW, GaLore (r = 32 on the 784×128 layer) and APOLLO-Mini (r = 1), and
// prints test accuracy, optimizer-state bytes and mean optimizer-step time side by side.
//
//   build/examples/optimizers_compare [train_limit]
#include <common/fashion_mnist.hpp>
#include <common/optimizers_mlp.hpp> // the 784-128-10 MLP, shared with test_optimizers_train
#include <lowmem/optimizers.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

using namespace lowmem;
using namespace lowmem::examples::optimizers_mlp;

namespace {

struct result {
  double accuracy, step_ms;
};

// the optimizer: called after each backward with step t; returns nothing, timed by the caller
result run(const data::image_set& tr, const data::image_set& te,
           const std::function<void(mlp&, std::int64_t)>& step) {
  mlp net(11);
  std::int64_t t = 0;
  double seconds = 0;
  for (int epoch = 0; epoch < 3; ++epoch)
    for (std::size_t b = 0; b + 100 <= tr.count; b += 100) {
      net.backward(tr, b, 100);
      const auto t0 = std::chrono::steady_clock::now();
      step(net, ++t);
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  return {net.accuracy(te), 1e3 * seconds / double(t)};
}

// fp32 AdamW over a subset of the tensors, state created on first use
struct adamw_fp32 {
  optim::adamw_config cfg;
  std::vector<std::vector<float>> m, v;
  std::size_t bytes = 0;
  void operator()(mlp& n, std::size_t i, std::int64_t t) {
    if (m.size() <= i) m.resize(4), v.resize(4);
    auto& p = *n.params(i);
    if (m[i].empty()) m[i].assign(p.size(), 0.f), v[i].assign(p.size(), 0.f), bytes += 8 * p.size();
    optim::adamw_step(p.data(), n.grads(i)->data(), m[i].data(), v[i].data(), p.size(), t, cfg);
  }
};

} // namespace

int main(int argc, char** argv) {
  const std::size_t limit = argc > 1 ? std::size_t(std::atol(argv[1])) : 10000;
  const auto tr = data::load_fashion_mnist("train", limit);
  const auto te = data::load_fashion_mnist("t10k", 10000);
  const optim::adamw_config cfg{2e-3, 0.9, 0.999, 1e-8, 1e-2};
  std::printf("Fashion-MNIST MLP 784-128-10 (%zu params), %zu train / %zu test, 3 epochs\n",
              in_dim * hid + hid + hid * classes + classes, tr.count, te.count);
  std::printf("%-22s %10s %14s %14s\n", "optimizer", "accuracy", "state bytes", "step ms");

  {
    adamw_fp32 opt{cfg, {}, {}, 0};
    const auto r = run(tr, te, [&](mlp& n, std::int64_t t) {
      for (std::size_t i = 0; i < 4; ++i) opt(n, i, t);
    });
    std::printf("%-22s %10.4f %14zu %14.3f\n", "AdamW fp32", r.accuracy, opt.bytes, r.step_ms);
  }
  for (int bits : {8, 4}) {
    std::vector<std::unique_ptr<optim::quantized_state>> st;
    std::size_t bytes = 0;
    const auto r = run(tr, te, [&](mlp& n, std::int64_t t) {
      if (st.empty())
        for (std::size_t i = 0; i < 4; ++i) {
          st.push_back(std::make_unique<optim::quantized_state>(n.params(i)->size(), bits, 2));
          bytes += st.back()->bytes();
        }
      for (std::size_t i = 0; i < 4; ++i)
        optim::adamw_step(n.params(i)->data(), n.grads(i)->data(), *st[i], n.params(i)->size(), t,
                          cfg);
    });
    std::printf("%-22s %10.4f %14zu %14.3f\n", bits == 8 ? "AdamW 8-bit" : "AdamW 4-bit",
                r.accuracy, bytes, r.step_ms);
  }
  for (int method : {0, 2}) {
    optim::projected_config pc;
    pc.lr = cfg.lr, pc.weight_decay = cfg.weight_decay;
    if (method == 0)
      pc.rank = 32, pc.update_gap = 50, pc.alpha = 1.0;
    else
      pc.method = optim::projection_method::apollo_mini, pc.rank = 1, pc.scale = 128, pc.lr = 1e-3;
    optim::projected_adam proj(index_t(in_dim), index_t(hid), pc);
    adamw_fp32 rest{cfg, {}, {}, 0};
    const auto r = run(tr, te, [&](mlp& n, std::int64_t t) {
      Eigen::Map<RowMatrixXf> w(n.w1.data(), index_t(in_dim), index_t(hid));
      Eigen::Map<const RowMatrixXf> g(n.gw1.data(), index_t(in_dim), index_t(hid));
      proj.step(w, g);
      for (std::size_t i = 1; i < 4; ++i) rest(n, i, t);
    });
    std::printf("%-22s %10.4f %14zu %14.3f\n",
                method == 0 ? "GaLore r=32 (W1)" : "APOLLO-Mini (W1)", r.accuracy,
                proj.state_bytes() + rest.bytes, r.step_ms);
  }
  return 0;
}
