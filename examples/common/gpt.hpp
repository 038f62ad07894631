// examples/common/gpt.hpp — a small character-level GPT with causal attention, forward and
// backward by hand (llm.c style) over the layers in layers.hpp, plus its text loader and trainer.
//
//   ids [B, T] → wte[id] + wpe[t] → depth × pre-norm block → LayerNorm → logits = x·wteᵀ (tied)
//   block: x1 = x + proj(causal_attn(LN1(x)));  out = x1 + fc2(GELU(fc1(LN2(x1))))
//
// Attention is a pluggable causal backend working directly on the fused QKV projection's output
// ([B, T, 3C], token-major: no head split/merge copies) and writing [B, T, C]:
//   * gpt_tiled_attention(): lowmem's tiled attention (include/lowmem/attention.hpp, causal),
//     which saves only the per-row log-sum-exp (B·H·T floats per layer) and needs a
//     sequence-independent workspace;
//   * gpt_naive_attention(): the textbook version, materialising P = softmax(mask(QKᵀ)) as
//     B·H·T² floats per layer (kept for backward) plus a T² dS scratch per thread.
// The model and its activation arena count every byte they hold, so the trainer can report
// "attention memory" (saved + workspace) and the tracked training memory of each backend.
//
// Text: Debian's bible-kjv(-text) packages; `bible -f gen1:1-rev22:21` prints one verse per line
// ("Ge1:1 In the beginning ..."). load_kjv() runs it (reference prefixes stripped); any other
// text file works through read_text_file(). Vocabulary = the bytes present, mapped to dense ids.
#pragma once

#include <lowmem/attention.hpp>
#include <lowmem/core/random.hpp>
#include <lowmem/optimizers/fused.hpp>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "layers.hpp"
#include "process.hpp"

namespace demo {

// ---- text --------------------------------------------------------------------------------------

/// A text as dense character ids: chars[id] is the byte, ids the whole text.
struct char_corpus {
  std::string source;
  std::vector<std::uint8_t> ids;
  std::vector<unsigned char> chars;
  index_t vocab() const { return index_t(chars.size()); }
  std::string decode(const std::uint8_t* p, std::size_t n) const {
    std::string s(n, ' ');
    for (std::size_t i = 0; i < n; ++i) s[i] = char(chars[p[i]]);
    return s;
  }
  /// Ids of `s`; bytes absent from the vocabulary throw.
  std::vector<std::uint8_t> encode(const std::string& s) const {
    std::vector<std::uint8_t> out;
    for (unsigned char c : s) {
      std::size_t id = 0;
      while (id < chars.size() && chars[id] != c) ++id;
      if (id == chars.size())
        throw std::invalid_argument("char_corpus::encode: character not in the vocabulary");
      out.push_back(std::uint8_t(id));
    }
    return out;
  }
};

/// Builds the byte vocabulary (sorted by byte value) of `text`. Throws std::runtime_error when the
/// text has fewer than `min_chars` characters (a training window needs seq + 1).
inline char_corpus make_corpus(const std::string& text, const std::string& source,
                               std::size_t min_chars) {
  if (text.size() < min_chars)
    throw std::runtime_error("text from " + source + " has " + std::to_string(text.size()) +
                             " characters; need at least " + std::to_string(min_chars) +
                             " (training and validation windows of seq + 1 characters)");
  bool present[256] = {};
  for (unsigned char c : text) present[c] = true;
  char_corpus cc;
  cc.source = source;
  std::uint8_t map[256] = {};
  for (int c = 0; c < 256; ++c)
    if (present[c]) {
      map[c] = std::uint8_t(cc.chars.size());
      cc.chars.push_back(static_cast<unsigned char>(c));
    }
  cc.ids.resize(text.size());
  for (std::size_t i = 0; i < text.size(); ++i)
    cc.ids[i] = map[static_cast<unsigned char>(text[i])];
  return cc;
}

/// The whole file at `path` (binary). Throws std::runtime_error with the path and the reason.
inline std::string read_text_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open text file '" + path + "': " + std::strerror(errno));
  std::string s;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  const bool bad = std::ferror(f) != 0;
  std::fclose(f);
  if (bad) throw std::runtime_error("error reading text file '" + path + "'");
  return s;
}

/// True when `program` is an executable file in one of $PATH's directories.
inline bool program_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/bin:/bin";
  std::size_t b = 0;
  while (b <= p.size()) {
    std::size_t e = p.find(':', b);
    if (e == std::string::npos) e = p.size();
    const std::string full = (e > b ? p.substr(b, e - b) : ".") + "/" + program;
    struct stat st {};
    if (::stat(full.c_str(), &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111)) return true;
    b = e + 1;
  }
  return false;
}

/// The King James Bible as plain text, one verse per line, from Debian's `bible` program
/// (packages bible-kjv + bible-kjv-text; scripts/install_deps.sh installs them). Strips the
/// "Ge1:1 " reference prefixes. Throws std::runtime_error with what to install on failure.
inline std::string load_kjv() {
  if (!program_on_path("bible"))
    throw std::runtime_error("program 'bible' not found on PATH: install the Debian packages "
                             "bible-kjv and bible-kjv-text (bash scripts/install_deps.sh), or "
                             "pass --text FILE");
  std::FILE* p = ::popen("bible -f 'gen1:1-rev22:21' 2>&1", "r");
  if (!p) throw std::runtime_error(std::string("cannot run 'bible': ") + std::strerror(errno));
  std::string raw;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) raw.append(buf, n);
  const int status = ::pclose(p);
  if (status != 0)
    throw std::runtime_error("'bible -f gen1:1-rev22:21' failed (status " + std::to_string(status) +
                             "): " + raw.substr(0, 300) +
                             " — is bible-kjv-text (/usr/lib/bible.data) installed?");
  std::string text;
  text.reserve(raw.size());
  std::size_t b = 0;
  while (b < raw.size()) {
    std::size_t e = raw.find('\n', b);
    if (e == std::string::npos) e = raw.size();
    std::size_t s = b;
    // "Ge1:1 " / "1Co13:4 ": a reference is a run of letters/digits with a ':' before the space
    const std::size_t sp = raw.find(' ', b);
    if (sp != std::string::npos && sp < e && raw.find(':', b) < sp) s = sp + 1;
    text.append(raw, s, e - s);
    text.push_back('\n');
    b = e + 1;
  }
  if (text.size() < 1000000)
    throw std::runtime_error("'bible' printed only " + std::to_string(text.size()) +
                             " characters (expected the 4 MB KJV): " + raw.substr(0, 300));
  return text;
}

// ---- causal attention backends -----------------------------------------------------------------

/// One causal attention call on the fused QKV layout: qkv [B, T, 3C] (all of Q, then K, then V per
/// token; head h is columns h·d .. h·d+d of each), output [B, T, C], C = H·d.
struct causal_shape {
  index_t B = 0, T = 0, H = 0, d = 0;
  float scale = 1.0f;
  index_t C() const { return H * d; }
};

/// O = softmax(scale·QKᵀ + causal mask)·V per (batch, head). `saved_floats` is what forward keeps
/// for backward (one per layer, in the arena); `workspace_floats` is scratch shared by all layers
/// and by forward and backward. Forward overwrites out and saved; backward ACCUMULATES into dqkv.
struct causal_attention {
  std::string name;
  std::function<std::size_t(const causal_shape&)> saved_floats;
  std::function<std::size_t(const causal_shape&)> workspace_floats;
  std::function<void(const causal_shape&, const float* qkv, float* out, float* saved, float* ws)>
      forward;
  std::function<void(const causal_shape&, const float* qkv, const float* out, const float* dout,
                     const float* saved, float* dqkv, float* ws)>
      backward;
};

namespace gpt_detail {
using SMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using StridedMap = Eigen::Map<SMat, 0, Eigen::OuterStride<>>;
using CStridedMap = Eigen::Map<const SMat, 0, Eigen::OuterStride<>>;
} // namespace gpt_detail

/// Naive causal attention: P = softmax_rows(mask(scale·QKᵀ)) saved as B·H·T² floats (the full
/// T×T score GEMM is computed, then masked: the textbook implementation); backward from P with a
/// T² dS tile per thread: dV += PᵀdO, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dP∘P)), dQ += scale·dS·K,
/// dK += scale·dSᵀ·Q.
inline causal_attention gpt_naive_attention() {
  using namespace gpt_detail;
  causal_attention a;
  a.name = "naive";
  a.saved_floats = [](const causal_shape& s) { return std::size_t(s.B * s.H * s.T * s.T); };
  a.workspace_floats = [](const causal_shape& s) {
    return std::size_t(lowmem::max_threads()) * std::size_t(s.T * s.T);
  };
  a.forward = [](const causal_shape& s, const float* qkv, float* out, float* P, float*) {
    const index_t T = s.T, d = s.d, C = s.C();
    const lowmem::item_work head_work{4 * T * T * d}; // a head: 4 T×T×d products
    lowmem::parallel_for(0, s.B * s.H, head_work, [&](index_t b0, index_t b1, int) {
      for (index_t bh = b0; bh < b1; ++bh) {
        const index_t b = bh / s.H, h = bh % s.H;
        const float* base = qkv + b * T * 3 * C + h * d;
        CStridedMap Q(base, T, d, Eigen::OuterStride<>(3 * C));
        CStridedMap K(base + C, T, d, Eigen::OuterStride<>(3 * C));
        CStridedMap V(base + 2 * C, T, d, Eigen::OuterStride<>(3 * C));
        MatMap Pm(P + bh * T * T, T, T);
        Pm.noalias() = s.scale * (Q * K.transpose());
        for (index_t i = 0; i < T; ++i) {
          float* row = P + bh * T * T + i * T;
          const float mx = *std::max_element(row, row + i + 1);
          float sum = 0;
          for (index_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
          const float inv = 1.0f / sum;
          for (index_t j = 0; j <= i; ++j) row[j] *= inv;
          for (index_t j = i + 1; j < T; ++j) row[j] = 0.0f;
        }
        StridedMap(out + b * T * C + h * d, T, d, Eigen::OuterStride<>(C)).noalias() = Pm * V;
      }
    });
  };
  a.backward = [](const causal_shape& s, const float* qkv, const float*, const float* dout,
                  const float* P, float* dqkv, float* ws) {
    const index_t T = s.T, d = s.d, C = s.C();
    const lowmem::item_work head_work{4 * T * T * d}; // a head: 4 T×T×d products
    lowmem::parallel_for(0, s.B * s.H, head_work, [&](index_t b0, index_t b1, int t) {
      MatMap dS(ws + std::size_t(t) * std::size_t(T * T), T, T);
      for (index_t bh = b0; bh < b1; ++bh) {
        const index_t b = bh / s.H, h = bh % s.H;
        const index_t off = b * T * 3 * C + h * d;
        CStridedMap Q(qkv + off, T, d, Eigen::OuterStride<>(3 * C));
        CStridedMap K(qkv + off + C, T, d, Eigen::OuterStride<>(3 * C));
        CStridedMap V(qkv + off + 2 * C, T, d, Eigen::OuterStride<>(3 * C));
        StridedMap dQ(dqkv + off, T, d, Eigen::OuterStride<>(3 * C));
        StridedMap dK(dqkv + off + C, T, d, Eigen::OuterStride<>(3 * C));
        StridedMap dV(dqkv + off + 2 * C, T, d, Eigen::OuterStride<>(3 * C));
        CStridedMap dO(dout + b * T * C + h * d, T, d, Eigen::OuterStride<>(C));
        CMatMap Pm(P + bh * T * T, T, T);
        dV.noalias() += Pm.transpose() * dO;
        dS.noalias() = dO * V.transpose();
        for (index_t i = 0; i < T; ++i) {
          float dot = 0;
          for (index_t j = 0; j <= i; ++j) dot += dS(i, j) * Pm(i, j);
          for (index_t j = 0; j < T; ++j) dS(i, j) = Pm(i, j) * (dS(i, j) - dot) * s.scale;
        }
        dQ.noalias() += dS * K;
        dK.noalias() += dS.transpose() * Q;
      }
    });
  };
  return a;
}

/// lowmem's tiled causal attention (FlashAttention-2 schedule), reading Q/K/V in place from the
/// fused QKV buffer through strided views. Saves the log-sum-exp (B·H·T floats per layer); the
/// workspace is attention_workspace_bytes(d, threads), independent of T. `threads` <= 0: all.
inline causal_attention gpt_tiled_attention(int threads = 0) {
  causal_attention a;
  a.name = "lowmem tiled";
  a.saved_floats = [](const causal_shape& s) { return std::size_t(s.B * s.H * s.T); };
  a.workspace_floats = [threads](const causal_shape& s) {
    return (lowmem::attention_workspace_bytes(s.d, threads) + sizeof(float) - 1) / sizeof(float);
  };
  auto view = [](auto* p, const causal_shape& s, index_t row) {
    using T = std::remove_pointer_t<decltype(p)>;
    return lowmem::attention_tensor<T>{p, s.B, s.H, s.T, s.d, s.T * row, s.d, row};
  };
  a.forward = [threads, view](const causal_shape& s, const float* qkv, float* out, float* lse,
                              float* ws) {
    lowmem::attention_options opt;
    opt.scale = s.scale;
    opt.causal = true;
    opt.threads = threads;
    const index_t C = s.C();
    lowmem::attention_forward(
        view(qkv, s, 3 * C), view(qkv + C, s, 3 * C), view(qkv + 2 * C, s, 3 * C), view(out, s, C),
        lse, opt, lowmem::workspace(ws, lowmem::attention_workspace_bytes(s.d, threads)));
  };
  a.backward = [threads, view](const causal_shape& s, const float* qkv, const float* out,
                               const float* dout, const float* lse, float* dqkv, float* ws) {
    lowmem::attention_options opt;
    opt.scale = s.scale;
    opt.causal = true;
    opt.threads = threads;
    const index_t C = s.C();
    lowmem::attention_backward(
        view(qkv, s, 3 * C), view(qkv + C, s, 3 * C), view(qkv + 2 * C, s, 3 * C), view(out, s, C),
        view(dout, s, C), lse, view(dqkv, s, 3 * C), view(dqkv + C, s, 3 * C),
        view(dqkv + 2 * C, s, 3 * C), opt,
        lowmem::workspace(ws, lowmem::attention_workspace_bytes(s.d, threads)));
  };
  return a;
}

// ---- model -------------------------------------------------------------------------------------

struct gpt_config {
  index_t vocab = 0;     // V (from the corpus)
  index_t seq = 2048;    // maximum context (wpe rows)
  index_t width = 128;   // C
  index_t depth = 2;     // blocks
  index_t heads = 4;     // H (divides width)
  index_t mlp_ratio = 4; // hidden = mlp_ratio · C
  index_t head_dim() const { return width / heads; }
  index_t hidden() const { return mlp_ratio * width; }
};

/// One named tensor inside the flat parameter buffer.
struct gpt_tensor {
  std::string name;
  std::size_t offset = 0, numel = 0;
  bool matrix = false; // 2-D weight: gets weight decay
};

/// Activation arena for (batch, seq): saved activations of every block plus backward scratch and
/// the attention workspace, one buffer each, sized once (offsets in floats).
struct gpt_activations {
  struct block {
    std::size_t ln1, mean1, rstd1, qkv, att, ao, x1, ln2, mean2, rstd2, h, g, out;
  };
  index_t batch = 0, seq = 0;
  std::vector<float> buffer, grads;
  std::size_t x0 = 0, tmp = 0, lnf = 0, meanf = 0, rstdf = 0, logits = 0, probs = 0, att_ws = 0;
  std::vector<block> blocks;
  std::size_t d_res = 0, d_ln = 0, d_qkv = 0, d_ao = 0, d_h = 0, d_g = 0, d_logits = 0;
  std::int64_t attention_saved_bytes = 0;     // all layers
  std::int64_t attention_workspace_bytes = 0; // shared
  float* at(std::size_t o) { return buffer.data() + o; }
  float* grad_at(std::size_t o) { return grads.data() + o; }
  std::int64_t bytes() const {
    return std::int64_t((buffer.size() + grads.size()) * sizeof(float));
  }
  std::int64_t attention_bytes() const { return attention_saved_bytes + attention_workspace_bytes; }
};

class gpt {
public:
  gpt_config cfg;
  causal_attention attention = gpt_tiled_attention();
  std::vector<gpt_tensor> tensors;
  std::vector<float> params, grads;

  explicit gpt(const gpt_config& c, std::uint64_t seed = 1) : cfg(c) {
    if (c.vocab < 2 || c.vocab > 256 || c.width % c.heads != 0 || c.seq < 1 || c.depth < 0)
      throw std::invalid_argument("gpt: need 2 <= vocab <= 256, heads dividing width, seq >= 1");
    build();
    init(seed);
  }

  const gpt_tensor& tensor(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw std::invalid_argument("gpt: no parameter '" + name + "'");
  }
  float* p(const std::string& name) { return params.data() + tensor(name).offset; }
  const float* p(const std::string& name) const { return params.data() + tensor(name).offset; }
  float* g(const std::string& name) const {
    return const_cast<float*>(grads.data()) + tensor(name).offset;
  }
  std::int64_t parameter_count() const { return std::int64_t(params.size()); }
  void zero_grad() { std::fill(grads.begin(), grads.end(), 0.0f); }

  causal_shape shape(index_t B, index_t T) const {
    return {B, T, cfg.heads, cfg.head_dim(), 1.0f / std::sqrt(float(cfg.head_dim()))};
  }

  /// Sizes an arena for `batch` sequences of up to `seq` tokens with the current backend.
  gpt_activations plan(index_t batch, index_t seq) const {
    if (seq > cfg.seq || seq < 1 || batch < 1)
      throw std::invalid_argument("gpt::plan: need 1 <= seq <= cfg.seq and batch >= 1");
    gpt_activations a;
    a.batch = batch;
    a.seq = seq;
    const index_t BT = batch * seq, C = cfg.width, F = cfg.hidden(), V = cfg.vocab;
    std::size_t top = 0;
    auto take = [](std::size_t& t, std::size_t n) {
      const std::size_t off = t;
      t += (n + 15) / 16 * 16;
      return off;
    };
    const causal_shape cs = shape(batch, seq);
    const std::size_t att_saved = attention.saved_floats(cs);
    a.x0 = take(top, BT * C);
    a.tmp = take(top, BT * C);
    for (index_t l = 0; l < cfg.depth; ++l) {
      gpt_activations::block b{};
      b.ln1 = take(top, BT * C);
      b.mean1 = take(top, BT);
      b.rstd1 = take(top, BT);
      b.qkv = take(top, BT * 3 * C);
      b.att = take(top, att_saved);
      b.ao = take(top, BT * C);
      b.x1 = take(top, BT * C);
      b.ln2 = take(top, BT * C);
      b.mean2 = take(top, BT);
      b.rstd2 = take(top, BT);
      b.h = take(top, BT * F);
      b.g = take(top, BT * F);
      b.out = take(top, BT * C);
      a.blocks.push_back(b);
    }
    a.lnf = take(top, BT * C);
    a.meanf = take(top, BT);
    a.rstdf = take(top, BT);
    a.logits = take(top, BT * V);
    a.probs = take(top, BT * V);
    const std::size_t ws = attention.workspace_floats(cs);
    a.att_ws = take(top, ws);
    a.buffer.assign(top, 0.0f);
    std::size_t g = 0;
    a.d_res = take(g, BT * C);
    a.d_ln = take(g, BT * C);
    a.d_qkv = take(g, BT * 3 * C);
    a.d_ao = take(g, BT * C);
    a.d_h = take(g, BT * F);
    a.d_g = take(g, BT * F);
    a.d_logits = take(g, BT * V);
    a.grads.assign(g, 0.0f);
    a.attention_saved_bytes = std::int64_t(att_saved * sizeof(float)) * cfg.depth;
    a.attention_workspace_bytes = std::int64_t(ws * sizeof(float));
    return a;
  }

  /// Forward of B sequences of T tokens (ids [B, T], B ≤ a.batch, T ≤ a.seq): logits at
  /// a.at(a.logits) [B·T, V]. With targets [B, T], returns the mean next-character cross-entropy
  /// (nats) and keeps probs for backward; else returns 0.
  double forward(gpt_activations& a, const std::uint8_t* ids, const std::uint8_t* targets,
                 index_t B, index_t T) const {
    if (B > a.batch || T > a.seq || B < 1 || T < 1)
      throw std::invalid_argument("gpt::forward: batch/seq outside the arena");
    const index_t BT = B * T, C = cfg.width, V = cfg.vocab;
    const causal_shape cs = shape(B, T);
    float* x = a.at(a.x0);
    const float* wte = p("wte");
    const float* wpe = p("wpe");
    for (index_t r = 0; r < BT; ++r) {
      if (ids[r] >= V) throw std::invalid_argument("gpt::forward: token id >= vocab");
      const float* e = wte + index_t(ids[r]) * C;
      const float* q = wpe + (r % T) * C;
      for (index_t c = 0; c < C; ++c) x[r * C + c] = e[c] + q[c];
    }
    for (index_t l = 0; l < cfg.depth; ++l) {
      const auto& b = a.blocks[std::size_t(l)];
      const std::string n = "h." + std::to_string(l) + ".";
      layernorm_forward(x, p(n + "ln1.w"), p(n + "ln1.b"), a.at(b.ln1), a.at(b.mean1),
                        a.at(b.rstd1), BT, C);
      linear_forward(a.at(b.ln1), p(n + "qkv.w"), p(n + "qkv.b"), a.at(b.qkv), BT, C, 3 * C);
      attention.forward(cs, a.at(b.qkv), a.at(b.ao), a.at(b.att), a.at(a.att_ws));
      linear_forward(a.at(b.ao), p(n + "proj.w"), p(n + "proj.b"), a.at(a.tmp), BT, C, C);
      residual_forward(x, a.at(a.tmp), a.at(b.x1), BT * C);
      layernorm_forward(a.at(b.x1), p(n + "ln2.w"), p(n + "ln2.b"), a.at(b.ln2), a.at(b.mean2),
                        a.at(b.rstd2), BT, C);
      linear_forward(a.at(b.ln2), p(n + "fc1.w"), p(n + "fc1.b"), a.at(b.h), BT, C, cfg.hidden());
      gelu_forward(a.at(b.h), a.at(b.g), BT * cfg.hidden());
      linear_forward(a.at(b.g), p(n + "fc2.w"), p(n + "fc2.b"), a.at(a.tmp), BT, cfg.hidden(), C);
      residual_forward(a.at(b.x1), a.at(a.tmp), a.at(b.out), BT * C);
      x = a.at(b.out);
    }
    layernorm_forward(x, p("lnf.w"), p("lnf.b"), a.at(a.lnf), a.at(a.meanf), a.at(a.rstdf), BT, C);
    linear_forward(a.at(a.lnf), wte, nullptr, a.at(a.logits), BT, C, V); // tied head
    if (!targets) return 0.0;
    return softmax_xent_forward(a.at(a.logits), targets, a.at(a.probs), BT, V);
  }

  /// Backward of the last forward(a, ids, targets, B, T): ACCUMULATES into grads (zero_grad()
  /// first for plain gradients).
  void backward(gpt_activations& a, const std::uint8_t* ids, const std::uint8_t* targets, index_t B,
                index_t T) {
    const index_t BT = B * T, C = cfg.width, V = cfg.vocab, F = cfg.hidden();
    const causal_shape cs = shape(B, T);
    std::fill(a.grads.begin(), a.grads.end(), 0.0f);
    float* dres = a.grad_at(a.d_res);
    float* dln = a.grad_at(a.d_ln);
    float* dlogits = a.grad_at(a.d_logits);
    softmax_xent_backward(a.at(a.probs), targets, dlogits, BT, V);
    linear_backward(a.at(a.lnf), p("wte"), dlogits, dln, g("wte"), nullptr, BT, C, V);
    const float* xL = cfg.depth > 0 ? a.at(a.blocks.back().out) : a.at(a.x0);
    layernorm_backward(xL, p("lnf.w"), a.at(a.meanf), a.at(a.rstdf), dln, dres, g("lnf.w"),
                       g("lnf.b"), BT, C);
    for (index_t l = cfg.depth - 1; l >= 0; --l) {
      const auto& b = a.blocks[std::size_t(l)];
      const std::string n = "h." + std::to_string(l) + ".";
      const float* x = l == 0 ? a.at(a.x0) : a.at(a.blocks[std::size_t(l - 1)].out);
      float* dg = a.grad_at(a.d_g);
      float* dh = a.grad_at(a.d_h);
      // MLP branch: dres holds d(out), which is also d(x1) through the skip
      std::fill(dg, dg + BT * F, 0.0f);
      std::fill(dh, dh + BT * F, 0.0f);
      std::fill(dln, dln + BT * C, 0.0f);
      linear_backward(a.at(b.g), p(n + "fc2.w"), dres, dg, g(n + "fc2.w"), g(n + "fc2.b"), BT, F,
                      C);
      gelu_backward(a.at(b.h), dg, dh, BT * F);
      linear_backward(a.at(b.ln2), p(n + "fc1.w"), dh, dln, g(n + "fc1.w"), g(n + "fc1.b"), BT, C,
                      F);
      layernorm_backward(a.at(b.x1), p(n + "ln2.w"), a.at(b.mean2), a.at(b.rstd2), dln, dres,
                         g(n + "ln2.w"), g(n + "ln2.b"), BT, C);
      // attention branch: dres now holds d(x1) = d(x) through the skip
      float* dao = a.grad_at(a.d_ao);
      float* dqkv = a.grad_at(a.d_qkv);
      std::fill(dao, dao + BT * C, 0.0f);
      std::fill(dqkv, dqkv + BT * 3 * C, 0.0f);
      std::fill(dln, dln + BT * C, 0.0f);
      linear_backward(a.at(b.ao), p(n + "proj.w"), dres, dao, g(n + "proj.w"), g(n + "proj.b"), BT,
                      C, C);
      attention.backward(cs, a.at(b.qkv), a.at(b.ao), dao, a.at(b.att), dqkv, a.at(a.att_ws));
      linear_backward(a.at(b.ln1), p(n + "qkv.w"), dqkv, dln, g(n + "qkv.w"), g(n + "qkv.b"), BT, C,
                      3 * C);
      layernorm_backward(x, p(n + "ln1.w"), a.at(b.mean1), a.at(b.rstd1), dln, dres, g(n + "ln1.w"),
                         g(n + "ln1.b"), BT, C);
    }
    float* dwte = g("wte");
    float* dwpe = g("wpe");
    for (index_t r = 0; r < BT; ++r)
      for (index_t c = 0; c < C; ++c) {
        dwte[index_t(ids[r]) * C + c] += dres[r * C + c];
        dwpe[(r % T) * C + c] += dres[r * C + c];
      }
  }

private:
  void add(const std::string& name, std::size_t numel, bool matrix) {
    tensors.push_back({name, params.size(), numel, matrix});
    params.resize(params.size() + numel, 0.0f);
  }
  void build() {
    const std::size_t C = std::size_t(cfg.width), F = std::size_t(cfg.hidden());
    add("wte", std::size_t(cfg.vocab) * C, true);
    add("wpe", std::size_t(cfg.seq) * C, true);
    for (index_t l = 0; l < cfg.depth; ++l) {
      const std::string n = "h." + std::to_string(l) + ".";
      add(n + "ln1.w", C, false);
      add(n + "ln1.b", C, false);
      add(n + "qkv.w", 3 * C * C, true);
      add(n + "qkv.b", 3 * C, false);
      add(n + "proj.w", C * C, true);
      add(n + "proj.b", C, false);
      add(n + "ln2.w", C, false);
      add(n + "ln2.b", C, false);
      add(n + "fc1.w", F * C, true);
      add(n + "fc1.b", F, false);
      add(n + "fc2.w", C * F, true);
      add(n + "fc2.b", C, false);
    }
    add("lnf.w", C, false);
    add("lnf.b", C, false);
    grads.assign(params.size(), 0.0f);
  }
  /// GPT-2 init: weights N(0, 0.02²), residual projections (proj, fc2) scaled by 1/√(2·depth),
  /// biases 0, LayerNorm γ = 1. Deterministic in `seed`.
  void init(std::uint64_t seed) {
    std::uint64_t id = 0;
    for (const auto& t : tensors) {
      float* v = params.data() + t.offset;
      const lowmem::random::stream z{seed, id++};
      const bool ln_w = t.name.find("ln") != std::string::npos && t.name.back() == 'w';
      if (ln_w) std::fill(v, v + t.numel, 1.0f);
      if (!t.matrix) continue;
      float sd = 0.02f;
      if (t.name.find("proj.w") != std::string::npos || t.name.find("fc2.w") != std::string::npos)
        sd /= std::sqrt(2.0f * float(std::max<index_t>(cfg.depth, 1)));
      for (std::size_t i = 0; i < t.numel; ++i) v[i] = sd * z.normal(i);
    }
  }
};

// ---- training ----------------------------------------------------------------------------------

struct gpt_train_config {
  index_t batch = 1, seq = 2048, steps = 300;
  double lr = 3e-3, min_lr_ratio = 0.1, weight_decay = 0.1, clip = 1.0;
  index_t warmup = 20;
  std::uint64_t seed = 7;
  bool progress = true;
  index_t log_every = 10;
};

/// Training/validation split of a corpus (last `val_fraction` of the text held out) and batches
/// of random windows: ids = text[o .. o+T), targets = text[o+1 .. o+T].
struct gpt_batcher {
  const std::vector<std::uint8_t>* text = nullptr;
  std::size_t begin = 0, end = 0; // [begin, end) of text
  void sample(std::uint64_t seed, std::uint64_t step, index_t B, index_t T, std::uint8_t* ids,
              std::uint8_t* targets) const {
    const lowmem::random::stream r{seed, 0x6770740000000000ull + step};
    const std::size_t span = end - begin - std::size_t(T) - 1;
    for (index_t b = 0; b < B; ++b) {
      const std::size_t o =
          begin + std::size_t(double(r.uniform(std::uint64_t(b))) * double(span + 1)) % (span + 1);
      std::memcpy(ids + b * T, text->data() + o, std::size_t(T));
      std::memcpy(targets + b * T, text->data() + o + 1, std::size_t(T));
    }
  }
};

/// AdamW (lowmem's fused adamw_step) over the model's tensors: weight decay on 2-D weights only;
/// global-norm gradient clipping before the update. m, v: zero-initialised, params.size() each.
struct gpt_adamw {
  std::vector<float> m, v;
  std::int64_t step = 0;
  explicit gpt_adamw(const gpt& model)
      : m(model.params.size(), 0.0f), v(model.params.size(), 0.0f) {}
  std::int64_t bytes() const { return std::int64_t((m.size() + v.size()) * sizeof(float)); }
  /// Returns the gradient norm before clipping.
  double update(gpt& model, double lr, double weight_decay, double clip) {
    double sq = 0;
    for (float gv : model.grads) sq += double(gv) * double(gv);
    const double norm = std::sqrt(sq);
    if (clip > 0 && norm > clip) {
      const float s = float(clip / norm);
      for (float& gv : model.grads) gv *= s;
    }
    ++step;
    for (const auto& t : model.tensors) {
      lowmem::optim::adamw_config c;
      c.lr = lr;
      c.beta2 = 0.99;
      c.weight_decay = t.matrix ? weight_decay : 0.0;
      lowmem::optim::adamw_step(model.params.data() + t.offset, model.grads.data() + t.offset,
                                m.data() + t.offset, v.data() + t.offset, t.numel, step, c);
    }
    return norm;
  }
};

struct gpt_train_result {
  std::vector<double> losses; // per step (training batch, before the update)
  double seconds = 0, cpu_seconds = 0;
  double tokens_per_s = 0;
  gpt_activations arena; // the last step's activations (for inspection)
};

/// Linear warm-up, then cosine decay from lr to lr·min_lr_ratio.
inline double gpt_lr(const gpt_train_config& c, index_t step) {
  if (step < c.warmup) return c.lr * double(step + 1) / double(c.warmup);
  const double t = double(step - c.warmup) / double(std::max<index_t>(1, c.steps - c.warmup));
  const double k = 0.5 * (1.0 + std::cos(3.14159265358979323846 * std::min(1.0, t)));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * k);
}

/// Trains `model` for c.steps steps on random windows of `data` (progress on stderr).
inline gpt_train_result train_gpt(gpt& model, gpt_adamw& opt, const gpt_batcher& data,
                                  const gpt_train_config& c, const char* tag = "gpt") {
  gpt_train_result r;
  r.arena = model.plan(c.batch, c.seq);
  std::vector<std::uint8_t> ids(std::size_t(c.batch * c.seq)), tg(ids.size());
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = process_cpu_seconds();
  for (index_t s = 0; s < c.steps; ++s) {
    data.sample(c.seed, std::uint64_t(s), c.batch, c.seq, ids.data(), tg.data());
    model.zero_grad();
    const double loss = model.forward(r.arena, ids.data(), tg.data(), c.batch, c.seq);
    if (!std::isfinite(loss)) throw std::runtime_error("gpt training diverged (loss not finite)");
    model.backward(r.arena, ids.data(), tg.data(), c.batch, c.seq);
    opt.update(model, gpt_lr(c, s), c.weight_decay, c.clip);
    r.losses.push_back(loss);
    if (c.progress && ((s + 1) % c.log_every == 0 || s == 0 || s + 1 == c.steps)) {
      const double el =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double tps = double((s + 1) * c.batch * c.seq) / el;
      std::fprintf(stderr, "%s step %4ld/%ld  loss %.4f  lr %.2e  %.0f tok/s  ETA %.0fs\n", tag,
                   long(s + 1), long(c.steps), loss, gpt_lr(c, s), tps,
                   el / double(s + 1) * double(c.steps - s - 1));
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.cpu_seconds = process_cpu_seconds() - cpu0;
  r.tokens_per_s = r.seconds > 0 ? double(c.steps * c.batch * c.seq) / r.seconds : 0;
  return r;
}

/// Mean loss over `windows` fixed validation windows (forward only, arena of (1, T)).
inline double gpt_eval(const gpt& model, gpt_activations& a, const gpt_batcher& data, index_t T,
                       index_t windows, std::uint64_t seed) {
  std::vector<std::uint8_t> ids(static_cast<std::size_t>(T)), tg(ids.size());
  double sum = 0;
  for (index_t w = 0; w < windows; ++w) {
    data.sample(seed, std::uint64_t(w), 1, T, ids.data(), tg.data());
    sum += model.forward(a, ids.data(), tg.data(), 1, T);
  }
  return sum / double(std::max<index_t>(windows, 1));
}

/// Samples `n` characters after `prompt` with temperature `temp` (<= 0: greedy), conditioning
/// on the last a.seq characters; deterministic in `seed`. `a` is an arena of batch 1.
inline std::string gpt_sample(const gpt& model, gpt_activations& a, const char_corpus& cc,
                              const std::string& prompt, index_t n, float temp,
                              std::uint64_t seed) {
  std::vector<std::uint8_t> ctx = cc.encode(prompt);
  const index_t V = model.cfg.vocab;
  const lowmem::random::stream r{seed, 0x73616d706c650000ull};
  std::vector<double> pr(std::size_t(V), 0.0);
  for (index_t i = 0; i < n; ++i) {
    const index_t T = std::min<index_t>(index_t(ctx.size()), a.seq);
    const std::uint8_t* w = ctx.data() + ctx.size() - std::size_t(T);
    model.forward(a, w, nullptr, 1, T);
    const float* z = a.at(a.logits) + (T - 1) * V;
    index_t next = index_t(std::max_element(z, z + V) - z);
    if (temp > 0) {
      const float mx = z[next];
      double s = 0;
      for (index_t v = 0; v < V; ++v) s += (pr[std::size_t(v)] = std::exp((z[v] - mx) / temp));
      double u = double(r.uniform(std::uint64_t(i))) * s;
      for (next = 0; next + 1 < V && u >= pr[std::size_t(next)]; ++next) u -= pr[std::size_t(next)];
    }
    ctx.push_back(std::uint8_t(next));
  }
  return cc.decode(ctx.data() + ctx.size() - std::size_t(n), std::size_t(n));
}

} // namespace demo
