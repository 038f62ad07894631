// attention_long_sequence: one causal attention forward + backward at N = 16384 tokens, 8 heads,
// d = 64 on the CPU, with O(N) extra memory. Prints the time, the FLOP rate, the heap the kernels
// used beyond the inputs, and a spot check of a few output rows against a direct double
// computation (the full N × N score matrix for all heads would be 8 GiB in fp32).
//
//   attention_long_sequence [N=16384] [threads=0 (all)]
#include <lowmem/attention.hpp>
#include <lowmem/core/memory.hpp>
#include <lowmem/core/memory_hooks.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const long N = argc > 1 ? std::atol(argv[1]) : 16384, H = 8, d = 64;
  lowmem::attention_options opt;
  opt.causal = true;
  opt.threads = argc > 2 ? std::atoi(argv[2]) : 0;

  // Token-major [1, N, H, d] inputs, as a fused QKV projection produces them.
  const std::size_t n = std::size_t(N * H * d);
  std::vector<float> q(n), k(n), v(n), o(n), dout(n), dq(n, 0.f), dk(n, 0.f), dv(n, 0.f);
  std::vector<float> lse(std::size_t(H * N));
  lowmem::random::fill_normal({1, 1}, 0, q.data(), n, true);
  lowmem::random::fill_normal({1, 2}, 0, k.data(), n, true);
  lowmem::random::fill_normal({1, 3}, 0, v.data(), n, true);
  lowmem::random::fill_normal({1, 4}, 0, dout.data(), n, true);
  using lowmem::attention_bnhd;
  const auto Q = attention_bnhd<const float>(q.data(), 1, N, H, d);
  const auto K = attention_bnhd<const float>(k.data(), 1, N, H, d);
  const auto V = attention_bnhd<const float>(v.data(), 1, N, H, d);

  const double inputs_mib = 8.0 * double(n) * 4 / (1 << 20);
  lowmem::memory::region region; // heap growth from here: workspace + anything the kernels use
  const auto t0 = std::chrono::steady_clock::now();
  lowmem::owned_workspace ws(lowmem::attention_workspace_bytes(d, opt.threads));
  lowmem::attention_forward(Q, K, V, attention_bnhd(o.data(), 1, N, H, d), lse.data(), opt,
                            ws.get());
  const auto t1 = std::chrono::steady_clock::now();
  lowmem::attention_backward(Q, K, V, attention_bnhd<const float>(o.data(), 1, N, H, d),
                             attention_bnhd<const float>(dout.data(), 1, N, H, d), lse.data(),
                             attention_bnhd(dq.data(), 1, N, H, d),
                             attention_bnhd(dk.data(), 1, N, H, d),
                             attention_bnhd(dv.data(), 1, N, H, d), opt, ws.get());
  const auto t2 = std::chrono::steady_clock::now();
  const double fwd_s = std::chrono::duration<double>(t1 - t0).count();
  const double bwd_s = std::chrono::duration<double>(t2 - t1).count();
  const double fwd_flops = 4.0 * double(N) * double(N) * d * H * 0.5; // causal: half
  std::printf("causal attention, N=%ld H=%ld d=%ld, threads=%d\n", N, H, d,
              lowmem::attention_detail::thread_budget(opt.threads));
  std::printf("forward  %.2f s  %.1f GFLOP/s\n", fwd_s, fwd_flops / fwd_s * 1e-9);
  std::printf("backward %.2f s  %.1f GFLOP/s (counted as 2.5x forward)\n", bwd_s,
              2.5 * fwd_flops / bwd_s * 1e-9);
  std::printf("inputs+outputs+gradients %.0f MiB; extra heap during fwd+bwd %.3f MiB "
              "(an fp32 S for all heads would be %.0f MiB)\n",
              inputs_mib, region.peak_mib(), double(H) * N * N * 4 / (1 << 20));

  // Spot check: rows 0, N/2 and N-1 of head 3 in double.
  double worst = 0;
  for (long i : {0L, N / 2, N - 1}) {
    const long h = 3;
    std::vector<double> s(std::size_t(i + 1)), acc(std::size_t(d), 0.0);
    double m = -INFINITY, sum = 0;
    for (long j = 0; j <= i; ++j) {
      double dot = 0;
      for (long c = 0; c < d; ++c) dot += double(q[(i * H + h) * d + c]) * k[(j * H + h) * d + c];
      s[std::size_t(j)] = dot / std::sqrt(double(d));
      m = std::max(m, s[std::size_t(j)]);
    }
    for (long j = 0; j <= i; ++j) {
      const double p = std::exp(s[std::size_t(j)] - m);
      sum += p;
      for (long c = 0; c < d; ++c) acc[std::size_t(c)] += p * v[(j * H + h) * d + c];
    }
    for (long c = 0; c < d; ++c)
      worst = std::max(worst, std::fabs(acc[std::size_t(c)] / sum - o[(i * H + h) * d + c]));
  }
  std::printf("spot check vs double (3 rows): max abs error %.2e\n", worst);
  return worst < 1e-4 ? 0 : 1;
}
