// QLoRA-style fine-tuning on Fashion-MNIST: a 784-512-512-10 MLP is pretrained in fp32, then its
// two hidden layers are frozen and fine-tuned with LoRA adapters (rank 8) twice — once over the
// fp32 base weights, once over NF4 copies (lowmem::quant, block absmax + double-quantized scales,
// qlinear_forward / qlinear_backward, never expanding W to fp32). Prints test accuracy and memory
// of both runs side by side.
//   ./build/examples/qlora_finetune [--quick]
#include <common/fashion_mnist.hpp>
#include <lowmem/core.hpp>
#include <lowmem/core/memory_hooks.hpp>
#include <lowmem/quant.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

using namespace lowmem;
using Mat = RowMatrixXf;

namespace {
Mat randn(index_t r, index_t c, float scale, std::uint64_t id) {
  Mat m(r, c);
  random::fill_normal(random::stream{42, id}, 0, m.data(), std::size_t(m.size()));
  return m * scale;
}

// softmax cross-entropy: returns mean loss, writes dlogits (already divided by batch)
float xent(const Mat& logits, const std::uint8_t* labels, Mat& d) {
  d.resize(logits.rows(), logits.cols());
  float loss = 0;
  for (index_t i = 0; i < logits.rows(); ++i) {
    const float m = logits.row(i).maxCoeff();
    auto e = (logits.row(i).array() - m).exp();
    const float z = e.sum();
    d.row(i) = e / z;
    loss += -std::log(d(i, labels[i]) + 1e-12f);
    d(i, labels[i]) -= 1.0f;
  }
  d /= float(logits.rows());
  return loss / float(logits.rows());
}

/// A frozen base linear layer W [out, in] in fp32 or quantized, with a LoRA adapter and a bias.
struct lora_linear {
  std::optional<Mat> W32;                   // fp32 base, or
  std::optional<quant::qweight_storage> Wq; // quantized base
  Mat A, B;                                 // LoRA: A [r, in], B [out, r] (B starts at 0)
  Eigen::RowVectorXf b;
  float scale = 2.0f; // alpha / r
  owned_workspace ws;
  Mat xa; // x·Aᵀ saved for backward

  index_t out() const { return W32 ? W32->rows() : Wq->rows; }
  void forward(const Mat& x, Mat& z) {
    z.resize(x.rows(), out());
    if (W32) {
      z.noalias() = x * W32->transpose();
    } else {
      ws.resize(quant::qlinear_workspace_bytes(Wq->view(), x.rows()));
      quant::qlinear_forward(x, Wq->view(), z, ws.get());
    }
    xa.noalias() = x * A.transpose();
    z.noalias() += scale * xa * B.transpose();
    z.rowwise() += b;
  }
  // dz -> updates A, B, b with SGD; accumulates dx (if non-null)
  void backward_sgd(const Mat& x, const Mat& dz, Mat* dx, float lr) {
    const Mat dzB = scale * dz * B; // [M, r]
    if (dx) {
      dx->setZero(x.rows(), x.cols());
      if (W32)
        dx->noalias() += dz * *W32;
      else
        quant::qlinear_backward(dz, Wq->view(), *dx, ws.get()); // dx += dz·deq(W)
      dx->noalias() += dzB * A;
    }
    B.noalias() -= lr * scale * dz.transpose() * xa;
    A.noalias() -= lr * dzB.transpose() * x;
    b -= lr * dz.colwise().sum();
  }
};

struct mlp {
  Mat W1, W2, W3;
  Eigen::RowVectorXf b1, b2, b3;
};

double accuracy(const data::image_set& s, const std::function<void(const Mat&, Mat&)>& logits_of) {
  std::size_t correct = 0;
  const index_t bs = 500;
  Mat logits;
  for (std::size_t i = 0; i < s.count; i += bs) {
    const index_t m = index_t(std::min<std::size_t>(bs, s.count - i));
    Eigen::Map<const Mat> x(s.images.data() + i * 784, m, 784);
    logits_of(x, logits);
    for (index_t k = 0; k < m; ++k) {
      Eigen::Index arg;
      logits.row(k).maxCoeff(&arg);
      correct += std::size_t(arg) == s.labels[i + std::size_t(k)];
    }
  }
  return double(correct) / double(s.count);
}
} // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const std::size_t n_pre = quick ? 4000 : 20000, n_ft = quick ? 4000 : 20000;
  const auto train = data::load_fashion_mnist("train", n_pre + n_ft);
  const auto test = data::load_fashion_mnist("t10k", quick ? 2000 : 10000);
  const index_t H = 512, bs = 64, rank = 8;
  const float lr = 0.05f;
  auto relu = [](const Mat& z) { return z.cwiseMax(0.0f); };

  // ---- 1. pretrain the fp32 MLP on the first n_pre images ----
  mlp net{randn(H, 784, std::sqrt(2.0f / 784), 1),
          randn(H, H, std::sqrt(2.0f / H), 2),
          randn(10, H, std::sqrt(1.0f / H), 3),
          Eigen::RowVectorXf::Zero(H),
          Eigen::RowVectorXf::Zero(H),
          Eigen::RowVectorXf::Zero(10)};
  Mat h1, h2, logits, d3, d2, d1;
  for (std::size_t i = 0; i + std::size_t(bs) <= n_pre; i += std::size_t(bs)) {
    Eigen::Map<const Mat> x(train.images.data() + i * 784, bs, 784);
    h1 = relu((x * net.W1.transpose()).rowwise() + net.b1);
    h2 = relu((h1 * net.W2.transpose()).rowwise() + net.b2);
    logits = (h2 * net.W3.transpose()).rowwise() + net.b3;
    xent(logits, train.labels.data() + i, d3);
    d2 = (d3 * net.W3).cwiseProduct((h2.array() > 0).cast<float>().matrix());
    d1 = (d2 * net.W2).cwiseProduct((h1.array() > 0).cast<float>().matrix());
    net.W3 -= lr * d3.transpose() * h2, net.b3 -= lr * d3.colwise().sum();
    net.W2 -= lr * d2.transpose() * h1, net.b2 -= lr * d2.colwise().sum();
    net.W1 -= lr * d1.transpose() * x, net.b1 -= lr * d1.colwise().sum();
  }
  const double acc_pre = accuracy(test, [&](const Mat& x, Mat& out) {
    out = (relu((relu((x * net.W1.transpose()).rowwise() + net.b1) * net.W2.transpose()).rowwise() +
                net.b2) *
           net.W3.transpose())
              .rowwise() +
          net.b3;
  });
  std::printf("pretrained fp32 MLP 784-%ld-%ld-10 on %zu images: test accuracy %.4f\n", long(H),
              long(H), n_pre, acc_pre);

  // ---- 2. LoRA fine-tuning over a frozen base: fp32 vs NF4 ----
  struct result {
    double acc, seconds;
    std::size_t base_bytes, trainable_bytes;
    double peak_mib;
  };
  auto finetune = [&](bool nf4) {
    memory::region region; // everything the run allocates: base copies, adapters, temporaries
    const auto t0 = std::chrono::steady_clock::now();
    lora_linear l1, l2;
    std::size_t base_bytes = 0;
    if (nf4) {
      // 784 = 7·112: block 112 for layer 1, QLoRA's block 64 for layer 2
      l1.Wq = quant::qweight_storage::quantize(net.W1, quant::weight_format::nf4, 112);
      l2.Wq = quant::qweight_storage::quantize(net.W2, quant::weight_format::nf4, 64);
      // double quantization of the absmax scales (stored; decoded once for the kernels)
      for (auto* q : {&*l1.Wq, &*l2.Wq}) {
        const std::size_t nb = q->scales.size();
        std::vector<std::uint8_t> qa(nb);
        std::vector<float> gs(quant::dq_num_groups(nb));
        float mean = 0;
        quant::double_quantize_absmax(q->scales.data(), nb, qa.data(), gs.data(), &mean);
        quant::double_dequantize_absmax(qa.data(), gs.data(), mean, nb, q->scales.data());
        base_bytes += q->codes.size() + qa.size() + 4 * gs.size() + 4;
      }
    } else {
      l1.W32 = net.W1;
      l2.W32 = net.W2;
      base_bytes = std::size_t(net.W1.size() + net.W2.size()) * 4;
    }
    l1.A = randn(rank, 784, 1.0f / std::sqrt(784.0f), 11), l1.B = Mat::Zero(H, rank);
    l2.A = randn(rank, H, 1.0f / std::sqrt(float(H)), 12), l2.B = Mat::Zero(H, rank);
    l1.b = net.b1, l2.b = net.b2;
    Mat W3 = net.W3;
    Eigen::RowVectorXf b3 = net.b3;
    Mat z1, z2, a1, a2, lg, g3, g2, g1;
    for (std::size_t i = n_pre; i + std::size_t(bs) <= n_pre + n_ft; i += std::size_t(bs)) {
      const Mat x = Eigen::Map<const Mat>(train.images.data() + i * 784, bs, 784);
      l1.forward(x, z1);
      a1 = relu(z1);
      l2.forward(a1, z2);
      a2 = relu(z2);
      lg = (a2 * W3.transpose()).rowwise() + b3;
      xent(lg, train.labels.data() + i, g3);
      g2 = (g3 * W3).cwiseProduct((a2.array() > 0).cast<float>().matrix());
      W3 -= lr * g3.transpose() * a2, b3 -= lr * g3.colwise().sum();
      l2.backward_sgd(a1, g2, &g1, lr);
      g1 = g1.cwiseProduct((a1.array() > 0).cast<float>().matrix());
      l1.backward_sgd(x, g1, nullptr, lr);
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double acc = accuracy(test, [&](const Mat& x, Mat& out) {
      Mat u1, u2;
      l1.forward(x, u1);
      l2.forward(relu(u1), u2);
      out = (relu(u2) * W3.transpose()).rowwise() + b3;
    });
    const std::size_t trainable =
        std::size_t(l1.A.size() + l1.B.size() + l2.A.size() + l2.B.size() + W3.size()) * 4;
    return result{acc, secs, base_bytes, trainable, region.peak_mib()};
  };
  const result r32 = finetune(false);
  const result rq = finetune(true);
  std::printf("\nLoRA r=%ld fine-tuning on %zu more images (batch %ld, SGD lr %.2f):\n", long(rank),
              n_ft, long(bs), double(lr));
  std::printf("%-10s %10s %14s %14s %14s %9s\n", "base", "test acc", "base weights", "trainable",
              "heap peak", "seconds");
  for (auto [name, r] : {std::pair<const char*, result>{"fp32", r32}, {"NF4+DQ", rq}})
    std::printf("%-10s %10.4f %11.1f KiB %11.1f KiB %10.2f MiB %9.2f\n", name, r.acc,
                r.base_bytes / 1024.0, r.trainable_bytes / 1024.0, r.peak_mib, r.seconds);
  std::printf("NF4 base: %.3f bits/param (codes + double-quantized scales), %.1fx smaller\n",
              8.0 * double(rq.base_bytes) / double(r32.base_bytes / 4),
              double(r32.base_bytes) / double(rq.base_bytes));
  return 0;
}
