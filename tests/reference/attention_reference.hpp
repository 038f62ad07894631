// Naive double reference for lowmem/attention.hpp: materialises S and P per (segment, head) and
// applies every option exactly as the header's math states. Written for clarity, not speed.
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include <lowmem/attention.hpp>

#include "common.hpp"

namespace lowmem::ref {

struct attention_grads {
  std::vector<double> dq, dk, dv; // packed [B, H, N, d] (dq like q, dk/dv like k)
  /// d(bias) at the bias's own offsets (b·stride_batch + h·stride_head + i·stride_row + j),
  /// summed where offsets coincide; sized to the largest offset used + 1 (empty without bias).
  std::vector<double> dbias;
};

struct attention_result {
  std::vector<double> o;   // packed [B, Hq, Nq, d]
  std::vector<double> lse; // [B, Hq, Nq]
};

namespace detail_attn {
template <class T> double at(const attention_tensor<const T>& t, long b, long h, long n, long k) {
  return double(attention_kernels::load(t.data + b * t.stride_batch + h * t.stride_head +
                                        n * t.stride_seq + k));
}
struct seg {
  long b, qb, nq, kb, nk;
};
inline std::vector<seg> segments(const attention_options& opt, long B, long Nq, long Nk) {
  std::vector<seg> s;
  if (opt.varlen.cu_seqlens_q) {
    for (long i = 0; i < opt.varlen.num_seqs; ++i)
      s.push_back({0, opt.varlen.cu_seqlens_q[i],
                   opt.varlen.cu_seqlens_q[i + 1] - opt.varlen.cu_seqlens_q[i],
                   opt.varlen.cu_seqlens_k[i],
                   opt.varlen.cu_seqlens_k[i + 1] - opt.varlen.cu_seqlens_k[i]});
  } else {
    for (long b = 0; b < B; ++b) s.push_back({b, 0, Nq, 0, Nk});
  }
  return s;
}

/// Scores z_ij (and dz/ds) of one (segment, head); -inf where masked.
template <class T>
void scores(const attention_tensor<const T>& q, const attention_tensor<const T>& k,
            const attention_options& opt, const seg& sg, long h, long hk, std::vector<double>& z,
            std::vector<double>& g) {
  const long d = q.dim, off = sg.nk - sg.nq;
  const double scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(d));
  const double wr =
      opt.causal ? std::min<double>(0.0, double(opt.window_right)) : double(opt.window_right);
  const double wl = double(opt.window_left);
  z.assign(std::size_t(sg.nq * sg.nk), 0.0);
  g.assign(z.size(), 0.0);
  for (long i = 0; i < sg.nq; ++i)
    for (long j = 0; j < sg.nk; ++j) {
      double s = 0;
      for (long c = 0; c < d; ++c)
        s += at(q, sg.b, h, sg.qb + i, c) * at(k, sg.b, hk, sg.kb + j, c);
      s *= scale;
      double gz = scale;
      if (opt.softcap > 0) {
        const double t = std::tanh(s / opt.softcap);
        s = opt.softcap * t;
        gz = scale * (1 - t * t);
      }
      const double rel = double(i + off - j);
      if (opt.alibi_slopes) s -= opt.alibi_slopes[h] * std::fabs(rel);
      if (opt.bias.data)
        s += opt.bias.data[sg.b * opt.bias.stride_batch + h * opt.bias.stride_head +
                           (sg.qb + i) * opt.bias.stride_row + sg.kb + j];
      if (rel > wl || rel < -wr) s = -std::numeric_limits<double>::infinity();
      z[std::size_t(i * sg.nk + j)] = s;
      g[std::size_t(i * sg.nk + j)] = gz;
    }
}

/// Dropout factor of (b, h, global i, global j): 1/(1-p) kept, 0 dropped (stream as documented).
inline double drop(const attention_options& opt, long Hq, long NqTot, long NkTot, long b, long h,
                   long gi, long gj) {
  if (opt.dropout <= 0) return 1.0;
  const std::uint64_t idx = (std::uint64_t(b * Hq + h) * std::uint64_t(NkTot) + std::uint64_t(gj)) *
                                std::uint64_t(NqTot) +
                            std::uint64_t(gi);
  return opt.dropout_rng.uniform(idx) >= opt.dropout ? 1.0 / (1.0 - double(opt.dropout)) : 0.0;
}
} // namespace detail_attn

/// Forward: O, L; and if dout is given, the gradients (fresh, not accumulated).
template <class T>
attention_result attention(const attention_tensor<const T>& q, const attention_tensor<const T>& k,
                           const attention_tensor<const T>& v, const attention_options& opt,
                           const attention_tensor<const T>* dout = nullptr,
                           attention_grads* grads = nullptr) {
  using namespace detail_attn;
  const long B = q.batch, Hq = q.heads, Hkv = k.heads, Nq = q.seq, Nk = k.seq, d = q.dim;
  attention_result r;
  r.o.assign(std::size_t(B * Hq * Nq * d), 0.0);
  r.lse.assign(std::size_t(B * Hq * Nq), -std::numeric_limits<double>::infinity());
  if (grads) {
    grads->dq.assign(r.o.size(), 0.0);
    grads->dk.assign(std::size_t(B * Hkv * Nk * d), 0.0);
    grads->dv.assign(grads->dk.size(), 0.0);
    grads->dbias.clear();
  }
  std::vector<double> z, g, P;
  for (const seg& sg : segments(opt, B, Nq, Nk))
    for (long h = 0; h < Hq; ++h) {
      const long hk = h / (Hq / Hkv);
      scores(q, k, opt, sg, h, hk, z, g);
      P.assign(z.size(), 0.0);
      for (long i = 0; i < sg.nq; ++i) {
        double m = -std::numeric_limits<double>::infinity();
        for (long j = 0; j < sg.nk; ++j) m = std::max(m, z[std::size_t(i * sg.nk + j)]);
        if (m == -std::numeric_limits<double>::infinity()) continue; // O = 0, L = -inf
        double sum = 0;
        for (long j = 0; j < sg.nk; ++j) sum += std::exp(z[std::size_t(i * sg.nk + j)] - m);
        const long gi = sg.qb + i;
        r.lse[std::size_t((sg.b * Hq + h) * Nq + gi)] = m + std::log(sum);
        for (long j = 0; j < sg.nk; ++j) {
          const double p = std::exp(z[std::size_t(i * sg.nk + j)] - m) / sum;
          P[std::size_t(i * sg.nk + j)] = p;
          const double pd = p * drop(opt, Hq, Nq, Nk, sg.b, h, gi, sg.kb + j);
          for (long c = 0; c < d; ++c)
            r.o[std::size_t(((sg.b * Hq + h) * Nq + gi) * d + c)] +=
                pd * at(v, sg.b, hk, sg.kb + j, c);
        }
      }
      if (!grads || !dout) continue;
      for (long i = 0; i < sg.nq; ++i) {
        const long gi = sg.qb + i;
        std::vector<double> dP(std::size_t(sg.nk), 0.0);
        double D = 0;
        for (long j = 0; j < sg.nk; ++j) {
          double dpd = 0;
          for (long c = 0; c < d; ++c)
            dpd += at(*dout, sg.b, h, gi, c) * at(v, sg.b, hk, sg.kb + j, c);
          dP[std::size_t(j)] = dpd * drop(opt, Hq, Nq, Nk, sg.b, h, gi, sg.kb + j);
          D += P[std::size_t(i * sg.nk + j)] * dP[std::size_t(j)];
        }
        for (long j = 0; j < sg.nk; ++j) {
          const double p = P[std::size_t(i * sg.nk + j)];
          const double f = drop(opt, Hq, Nq, Nk, sg.b, h, gi, sg.kb + j);
          const double dz = p * (dP[std::size_t(j)] - D);
          const double ds = dz * g[std::size_t(i * sg.nk + j)];
          const long gj = sg.kb + j;
          if (opt.bias.data) {
            const auto off = std::size_t(sg.b * opt.bias.stride_batch + h * opt.bias.stride_head +
                                         gi * opt.bias.stride_row + gj);
            if (off >= grads->dbias.size()) grads->dbias.resize(off + 1, 0.0);
            grads->dbias[off] += dz;
          }
          for (long c = 0; c < d; ++c) {
            grads->dq[std::size_t(((sg.b * Hq + h) * Nq + gi) * d + c)] +=
                ds * at(k, sg.b, hk, gj, c);
            grads->dk[std::size_t(((sg.b * Hkv + hk) * Nk + gj) * d + c)] +=
                ds * at(q, sg.b, h, gi, c);
            grads->dv[std::size_t(((sg.b * Hkv + hk) * Nk + gj) * d + c)] +=
                p * f * at(*dout, sg.b, h, gi, c);
          }
        }
      }
    }
  return r;
}

} // namespace lowmem::ref
