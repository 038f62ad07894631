// examples/common/vit.hpp — a small Vision Transformer for 28×28 Fashion-MNIST, forward and
// backward by hand (llm.c style) over the layers in layers.hpp.
//
//   image [28, 28] → 16 patches of 7×7 (or (28/p)² patches of p×p) → patch_embed (linear p²→C)
//   + pos_embed → depth × pre-norm block → LayerNorm → mean over tokens → head (C→10)
//   block: x1 = x + proj(attn(LN1(x)));  out = x1 + fc2(GELU(fc1(LN2(x1))))
//
// Parameters are a list of named tensors (PyTorch/timm names, e.g. "blocks.0.attn.qkv.weight")
// so an optimizer, an adapter or a zeroth-order method iterates them generically
// (vit::trainable_spans()). Every nn.Linear-like layer is a `linear_slot`; a `linear_hook` attached
// to a slot replaces its forward/backward (LoRA, DoRA, QLoRA's dequantising matmul, QAT
// fake-quant) without touching the model code. Activations live in a `vit_activations` arena
// sized once for a batch size: a training arena keeps what backward needs for every block; an
// inference arena shares one block's scratch across all blocks (two residual buffers ping-pong),
// which is the honest inference memory that MeZO is compared against.
#pragma once

#include <lowmem/core/random.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "layers.hpp"

namespace demo {

struct vit_config {
  index_t image = 28;    // square input side
  index_t patch = 7;     // patch side (divides image)
  index_t width = 64;    // C
  index_t depth = 2;     // blocks
  index_t heads = 4;     // H (divides width)
  index_t mlp_ratio = 4; // hidden = mlp_ratio · C
  index_t classes = 10;
  // Fixed input standardisation (Fashion-MNIST training-set pixel mean and std), applied in
  // patchify: zero-mean inputs make the first steps of AdamW far better conditioned.
  float input_mean = 0.2860f, input_std = 0.3530f;
  index_t tokens() const { return (image / patch) * (image / patch); }
  index_t patch_dim() const { return patch * patch; }
  index_t hidden() const { return mlp_ratio * width; }
  index_t head_dim() const { return width / heads; }
};

/// A ViT shape (the input standardisation keeps its default).
inline vit_config vit_shape(index_t image, index_t patch, index_t width, index_t depth,
                            index_t heads, index_t mlp_ratio, index_t classes) {
  vit_config c;
  c.image = image;
  c.patch = patch;
  c.width = width;
  c.depth = depth;
  c.heads = heads;
  c.mlp_ratio = mlp_ratio;
  c.classes = classes;
  return c;
}

/// One named parameter tensor with its fp32 storage and (when trainable) its gradient.
/// A hook may release `value` (e.g. QLoRA keeps the weight as NF4 codes instead); the model then
/// counts that hook's resident_bytes() in place of the fp32 bytes.
struct param {
  std::string name;
  std::vector<index_t> shape;
  std::vector<float> value;
  std::vector<float> grad; // empty unless trainable (allocated by vit::set_trainable)
  bool trainable = false;
  index_t numel() const {
    index_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// A non-owning view of a trainable tensor: what optimizers and ZO methods iterate.
struct param_span {
  std::string name;
  float* data = nullptr;
  float* grad = nullptr; // null for methods without gradients
  std::vector<index_t> shape;
  index_t numel = 0;
};

struct linear_slot;

/// Replaces one linear layer's math. forward OVERWRITES y[rows, out]; backward ACCUMULATES into
/// dx (may be null for the patch embedding, whose input is the image), into the hook's own
/// gradients and, if the slot's W/b are trainable, into theirs. `saved` is this hook's share of
/// the activation arena (saved_floats(rows) floats, written by forward, read by backward);
/// `workspace` is scratch of workspace_floats(rows) floats shared by all hooks (dead between
/// calls), used by forward and backward alike (training: in the gradient scratch; inference: in
/// the arena), so it is counted in the activation bytes.
class linear_hook {
public:
  virtual ~linear_hook() = default;
  virtual std::size_t saved_floats(index_t /*rows*/) const { return 0; }
  virtual std::size_t workspace_floats(index_t /*rows*/) const { return 0; }
  virtual void forward(const linear_slot& s, const float* x, float* y, float* saved,
                       float* workspace, index_t rows) = 0;
  virtual void backward(const linear_slot& s, const float* x, const float* dy, float* dx,
                        const float* saved, float* workspace, index_t rows) = 0;
  /// The hook's own trainable tensors (LoRA A/B, DoRA magnitude, LSQ step sizes).
  virtual std::vector<param_span> params() { return {}; }
  /// Bytes the hook keeps resident besides its params() (e.g. NF4 codes + scales of the base).
  virtual std::int64_t resident_bytes() const { return 0; }
};

/// An nn.Linear: y = x·Wᵀ + b with W [out, in]. `hook` (optional, not owned) overrides it.
struct linear_slot {
  std::string name; // e.g. "blocks.0.attn.qkv"
  index_t in = 0, out = 0;
  param* W = nullptr;
  param* b = nullptr;
  linear_hook* hook = nullptr;

  void forward(const float* x, float* y, float* saved, float* ws, index_t rows) const {
    if (hook) return hook->forward(*this, x, y, saved, ws, rows);
    linear_forward(x, W->value.data(), b->value.data(), y, rows, in, out);
  }
  void backward(const float* x, const float* dy, float* dx, const float* saved, float* ws,
                index_t rows) const {
    if (hook) return hook->backward(*this, x, dy, dx, saved, ws, rows);
    linear_backward(x, W->value.data(), dy, dx, W->trainable ? W->grad.data() : nullptr,
                    b->trainable ? b->grad.data() : nullptr, rows, in, out);
  }
};

/// Activation arena for one batch size. Offsets (in floats) into one buffer, set by plan().
class vit_activations {
public:
  struct block_offsets {
    std::size_t ln1, mean1, rstd1, qkv, q, k, v, att, o, om, x1, ln2, mean2, rstd2, h, g, out;
  };
  bool training = false;
  index_t batch = 0;
  std::vector<float> buffer; // saved activations (+ inference scratch)
  std::vector<float> grads;  // backward scratch (training only)
  std::size_t patches = 0, x0 = 0, tmp = 0, lnf = 0, meanf = 0, rstdf = 0, pooled = 0, logits = 0,
              probs = 0;
  std::vector<block_offsets> blocks;
  std::vector<std::size_t> hook_saved; // per linear slot
  std::size_t hook_fwd_ws = 0;         // inference arena: hooks' forward scratch (in buffer)
  // gradient scratch offsets (into grads)
  std::size_t d_res = 0, d_ln = 0, d_qkv = 0, d_q = 0, d_k = 0, d_v = 0, d_o = 0, d_om = 0, d_h = 0,
              d_g = 0, att_ws = 0, hook_ws = 0, d_pooled = 0, d_logits = 0;

  float* at(std::size_t off) { return buffer.data() + off; }
  float* grad_at(std::size_t off) { return grads.data() + off; }
  /// Hooks' scratch: the backward scratch region when training (forward and backward never
  /// overlap in time), a region of the arena for inference.
  float* hook_workspace() {
    return training ? grads.data() + hook_ws : buffer.data() + hook_fwd_ws;
  }
  /// Bytes of saved activations plus backward scratch: the "activations" line of the ledger.
  std::int64_t bytes() const {
    return std::int64_t((buffer.size() + grads.size()) * sizeof(float));
  }
};

class vit {
public:
  vit_config cfg;
  attention_backend attention = naive_attention();
  /// Activation (gradient) checkpointing for training arenas (QLoRA paper, arXiv:2305.14314,
  /// trains this way): keep only each block's output, recompute a block's internals in backward
  /// (one extra block forward per block but the last). Set before plan().
  bool checkpointing = false;
  std::deque<param> params; // deque: stable addresses for slots and spans
  std::vector<linear_slot>
      slots; // 0: patch_embed, 1 + 4l + {0 qkv, 1 proj, 2 fc1, 3 fc2}, last: head

  explicit vit(const vit_config& c = {}, std::uint64_t seed = 1) : cfg(c) {
    if (c.image % c.patch != 0 || c.width % c.heads != 0)
      throw std::invalid_argument("vit: patch must divide image and heads must divide width");
    build();
    init(seed);
  }
  // Copies share nothing but the attention backend; hooks are not copied (they belong to a run).
  vit(const vit& o)
      : cfg(o.cfg), attention(o.attention), checkpointing(o.checkpointing), params(o.params) {
    build_slots();
    for (auto& s : slots) s.hook = nullptr;
  }
  vit& operator=(const vit&) = delete;

  param& get(const std::string& name) {
    for (auto& p : params)
      if (p.name == name) return p;
    throw std::invalid_argument("vit: no parameter '" + name + "'");
  }
  linear_slot& slot(const std::string& name) {
    for (auto& s : slots)
      if (s.name == name) return s;
    throw std::invalid_argument("vit: no linear layer '" + name + "'");
  }
  static std::size_t qkv_slot(index_t l) { return std::size_t(1 + 4 * l); }

  /// Marks every parameter trainable or frozen by predicate; allocates / frees gradients.
  template <class Pred> void set_trainable(Pred&& pred) {
    for (auto& p : params) {
      p.trainable = pred(p);
      if (p.trainable)
        p.grad.assign(std::size_t(p.numel()), 0.0f);
      else
        std::vector<float>().swap(p.grad);
    }
  }
  void set_all_trainable(bool on) {
    set_trainable([on](const param&) { return on; });
  }

  /// The trainable model tensors (hooks' tensors come from linear_hook::params()).
  std::vector<param_span> trainable_spans() {
    std::vector<param_span> out;
    for (auto& p : params)
      if (p.trainable) out.push_back({p.name, p.value.data(), p.grad.data(), p.shape, p.numel()});
    return out;
  }
  /// Every model tensor with a null grad: what a zeroth-order method (MeZO) perturbs in place
  /// without allocating gradients (call set_all_trainable(false) first to free any).
  std::vector<param_span> all_spans() {
    std::vector<param_span> out;
    for (auto& p : params) out.push_back({p.name, p.value.data(), nullptr, p.shape, p.numel()});
    return out;
  }
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const auto& p : params) n += p.numel();
    return n;
  }
  /// Resident parameter bytes: fp32 tensors still held + what attached hooks keep (incl. their
  /// own tensors, counted via params()).
  std::int64_t resident_parameter_bytes() const {
    std::int64_t b = 0;
    for (const auto& p : params) b += std::int64_t(p.value.size() * sizeof(float));
    for (const auto& s : slots)
      if (s.hook) {
        b += s.hook->resident_bytes();
        for (const auto& ps : s.hook->params()) b += ps.numel * std::int64_t(sizeof(float));
      }
    return b;
  }
  std::int64_t gradient_bytes() const {
    std::int64_t b = 0;
    for (const auto& p : params) b += std::int64_t(p.grad.size() * sizeof(float));
    for (const auto& s : slots)
      if (s.hook)
        for (const auto& ps : s.hook->params())
          if (ps.grad) b += ps.numel * std::int64_t(sizeof(float));
    return b;
  }
  void zero_grad() {
    for (auto& p : params) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
    for (auto& s : slots)
      if (s.hook)
        for (auto& ps : s.hook->params())
          if (ps.grad) std::fill(ps.grad, ps.grad + ps.numel, 0.0f);
  }

  /// Sizes an arena for `batch` images. Call after attaching hooks (their saved state is in it).
  vit_activations plan(index_t batch, bool training) const {
    vit_activations a;
    a.training = training;
    a.batch = batch;
    const index_t B = batch, N = cfg.tokens(), C = cfg.width, BN = B * N;
    std::size_t top = 0;
    auto take = [&top](index_t n) {
      const std::size_t off = top;
      top += (std::size_t(n) + 15) / 16 * 16; // 64-byte aligned sub-buffers
      return off;
    };
    const attention_shape as{B, cfg.heads, N, cfg.head_dim()};
    a.patches = take(BN * cfg.patch_dim());
    a.x0 = take(BN * C);
    a.tmp = take(BN * C);
    a.hook_saved.resize(slots.size());
    auto hook_take = [&](std::size_t slot, index_t rows) {
      const linear_hook* h = slots[slot].hook;
      a.hook_saved[slot] = take(h ? index_t(h->saved_floats(rows)) : 0);
    };
    hook_take(0, BN);
    vit_activations::block_offsets shared{};
    std::size_t res[2] = {a.x0, training ? 0 : take(BN * C)};
    // Blocks share one set of internals in inference and, with activation checkpointing, in
    // training too (only each block's output — the next block's input — is kept per block).
    const bool share = !training || checkpointing;
    for (index_t l = 0; l < cfg.depth; ++l) {
      vit_activations::block_offsets b{};
      if (!share || l == 0) {
        b.ln1 = take(BN * C);
        b.mean1 = take(BN);
        b.rstd1 = take(BN);
        b.qkv = take(BN * 3 * C);
        b.q = take(BN * C);
        b.k = take(BN * C);
        b.v = take(BN * C);
        b.att = take(index_t(attention.saved_floats(as)));
        b.o = take(BN * C);
        b.om = take(BN * C);
        b.x1 = training ? take(BN * C) : 0;
        b.ln2 = take(BN * C);
        b.mean2 = take(BN);
        b.rstd2 = take(BN);
        b.h = take(BN * cfg.hidden());
        b.g = take(BN * cfg.hidden());
        for (std::size_t j = 0; j < 4; ++j) {
          if (!share) {
            hook_take(qkv_slot(l) + j, BN);
            continue;
          }
          // shared across blocks: sized for the largest hook at this position in any block
          std::size_t n = 0;
          for (index_t k = 0; k < cfg.depth; ++k)
            if (const linear_hook* h = slots[qkv_slot(k) + j].hook)
              n = std::max(n, h->saved_floats(BN));
          a.hook_saved[qkv_slot(l) + j] = take(index_t(n));
        }
        if (share) shared = b;
      } else {
        b = shared; // every block reuses block 0's scratch
        for (std::size_t s = qkv_slot(l); s < qkv_slot(l) + 4; ++s)
          a.hook_saved[s] = a.hook_saved[qkv_slot(0) + (s - qkv_slot(l))];
      }
      if (training) {
        b.out = take(BN * C);
      } else {
        b.out = res[(l + 1) % 2]; // ping-pong residual stream; x1 is built in place in out
        b.x1 = b.out;
      }
      a.blocks.push_back(b);
    }
    a.lnf = take(BN * C);
    a.meanf = take(BN);
    a.rstdf = take(BN);
    a.pooled = take(B * C);
    hook_take(slots.size() - 1, B);
    a.logits = take(B * cfg.classes);
    a.probs = take(B * cfg.classes);
    std::size_t hw = 0;
    for (std::size_t s = 0; s < slots.size(); ++s)
      if (slots[s].hook)
        hw = std::max(hw, slots[s].hook->workspace_floats(s + 1 == slots.size() ? B : BN));
    if (!training) a.hook_fwd_ws = take(index_t(hw));
    a.buffer.assign(top, 0.0f);
    if (training) {
      std::size_t g = 0;
      auto gtake = [&g](index_t n) {
        const std::size_t off = g;
        g += (std::size_t(n) + 15) / 16 * 16;
        return off;
      };
      a.d_res = gtake(BN * C);
      a.d_ln = gtake(BN * C);
      a.d_qkv = gtake(BN * 3 * C);
      a.d_q = gtake(BN * C);
      a.d_k = gtake(BN * C);
      a.d_v = gtake(BN * C);
      a.d_o = gtake(BN * C);
      a.d_om = gtake(BN * C);
      a.d_h = gtake(BN * cfg.hidden());
      a.d_g = gtake(BN * cfg.hidden());
      a.att_ws = gtake(index_t(attention.workspace_floats(as)));
      a.hook_ws = gtake(index_t(hw));
      a.d_pooled = gtake(B * C);
      a.d_logits = gtake(B * cfg.classes);
      a.grads.assign(g, 0.0f);
    }
    return a;
  }

  /// Forward on `B` ≤ a.batch images [B, 784]; returns the mean cross-entropy when labels are
  /// given (else 0). Logits are at a.at(a.logits), [B, classes].
  double forward(vit_activations& a, const float* images, const std::uint8_t* labels,
                 index_t B) const {
    if (B > a.batch) throw std::invalid_argument("vit::forward: batch larger than the arena");
    const index_t N = cfg.tokens(), C = cfg.width, BN = B * N;
    patchify(images, a.at(a.patches), B);
    float* x = a.at(a.x0);
    float* hws = a.hook_workspace();
    slots[0].forward(a.at(a.patches), x, a.at(a.hook_saved[0]), hws, BN);
    const float* pos = get_c("pos_embed").value.data();
    for (index_t r = 0; r < BN; ++r)
      for (index_t c = 0; c < C; ++c) x[r * C + c] += pos[(r % N) * C + c];
    for (index_t l = 0; l < cfg.depth; ++l) {
      block_forward(a, l, x, B);
      x = a.at(a.blocks[std::size_t(l)].out);
    }
    layernorm_forward(x, get_c("norm.weight").value.data(), get_c("norm.bias").value.data(),
                      a.at(a.lnf), a.at(a.meanf), a.at(a.rstdf), BN, C);
    meanpool_forward(a.at(a.lnf), a.at(a.pooled), B, N, C);
    slots.back().forward(a.at(a.pooled), a.at(a.logits), a.at(a.hook_saved.back()), hws, B);
    if (!labels) return 0.0;
    return softmax_xent_forward(a.at(a.logits), labels, a.at(a.probs), B, cfg.classes);
  }

  /// Backward of the last forward(a, images, labels, B) (training arena, labels given):
  /// ACCUMULATES into the gradients of trainable parameters and of hooks' tensors.
  void backward(vit_activations& a, const std::uint8_t* labels, index_t B) const {
    if (!a.training) throw std::invalid_argument("vit::backward: inference arena");
    const index_t N = cfg.tokens(), C = cfg.width, BN = B * N, H = cfg.heads, d = cfg.head_dim(),
                  F = cfg.hidden();
    const attention_shape as{B, H, N, d, 1.0f / std::sqrt(float(d))};
    std::fill(a.grads.begin(), a.grads.end(), 0.0f);
    float* dres = a.grad_at(a.d_res);
    float* ws = a.grad_at(a.hook_ws);
    softmax_xent_backward(a.at(a.probs), labels, a.grad_at(a.d_logits), B, cfg.classes);
    slots.back().backward(a.at(a.pooled), a.grad_at(a.d_logits), a.grad_at(a.d_pooled),
                          a.at(a.hook_saved.back()), ws, B);
    float* dln = a.grad_at(a.d_ln);
    meanpool_backward(a.grad_at(a.d_pooled), dln, B, N, C);
    const float* xL = cfg.depth > 0 ? a.at(a.blocks.back().out) : a.at(a.x0);
    layernorm_backward(xL, get_c("norm.weight").value.data(), a.at(a.meanf), a.at(a.rstdf), dln,
                       dres, grad_of("norm.weight"), grad_of("norm.bias"), BN, C);
    for (index_t l = cfg.depth - 1; l >= 0; --l) {
      const auto& b = a.blocks[std::size_t(l)];
      const std::string p = "blocks." + std::to_string(l) + ".";
      const std::size_t s0 = qkv_slot(l);
      const float* x = l == 0 ? a.at(a.x0) : a.at(a.blocks[std::size_t(l - 1)].out);
      // Checkpointing: the shared internals hold the last block's; recompute the others.
      if (checkpointing && l != cfg.depth - 1) block_forward(a, l, x, B);
      // MLP branch: dres holds d(out) = d(x1) through the skip.
      float* dg = a.grad_at(a.d_g);
      float* dh = a.grad_at(a.d_h);
      std::fill(dg, dg + BN * F, 0.0f);
      std::fill(dh, dh + BN * F, 0.0f);
      std::fill(dln, dln + BN * C, 0.0f);
      slots[s0 + 3].backward(a.at(b.g), dres, dg, a.at(a.hook_saved[s0 + 3]), ws, BN);
      gelu_backward(a.at(b.h), dg, dh, BN * F);
      slots[s0 + 2].backward(a.at(b.ln2), dh, dln, a.at(a.hook_saved[s0 + 2]), ws, BN);
      layernorm_backward(a.at(b.x1), get_c(p + "norm2.weight").value.data(), a.at(b.mean2),
                         a.at(b.rstd2), dln, dres, grad_of(p + "norm2.weight"),
                         grad_of(p + "norm2.bias"), BN, C);
      // Attention branch: dres now holds d(x1) = d(x) through the skip.
      float* dom = a.grad_at(a.d_om);
      float* dO = a.grad_at(a.d_o);
      float* dq = a.grad_at(a.d_q);
      float* dk = a.grad_at(a.d_k);
      float* dv = a.grad_at(a.d_v);
      float* dqkv = a.grad_at(a.d_qkv);
      std::fill(dom, dom + BN * C, 0.0f);
      std::fill(dO, dO + BN * C, 0.0f);
      std::fill(dq, dq + BN * C, 0.0f);
      std::fill(dk, dk + BN * C, 0.0f);
      std::fill(dv, dv + BN * C, 0.0f);
      std::fill(dqkv, dqkv + BN * 3 * C, 0.0f);
      std::fill(dln, dln + BN * C, 0.0f);
      slots[s0 + 1].backward(a.at(b.om), dres, dom, a.at(a.hook_saved[s0 + 1]), ws, BN);
      merge_heads_backward(dom, dO, B, N, H, d);
      attention.backward(as, a.at(b.q), a.at(b.k), a.at(b.v), a.at(b.o), dO, a.at(b.att), dq, dk,
                         dv, a.grad_at(a.att_ws));
      split_heads_backward(dq, dk, dv, dqkv, B, N, H, d);
      slots[s0].backward(a.at(b.ln1), dqkv, dln, a.at(a.hook_saved[s0]), ws, BN);
      layernorm_backward(x, get_c(p + "norm1.weight").value.data(), a.at(b.mean1), a.at(b.rstd1),
                         dln, dres, grad_of(p + "norm1.weight"), grad_of(p + "norm1.bias"), BN, C);
    }
    if (float* dpos = grad_of("pos_embed"))
      for (index_t r = 0; r < BN; ++r)
        for (index_t c = 0; c < C; ++c) dpos[(r % N) * C + c] += dres[r * C + c];
    slots[0].backward(a.at(a.patches), dres, nullptr, a.at(a.hook_saved[0]), ws, BN);
  }

  /// One block's forward from its input x into the arena (block l's offsets); also the
  /// recomputation of activation checkpointing.
  void block_forward(vit_activations& a, index_t l, const float* x, index_t B) const {
    const index_t N = cfg.tokens(), C = cfg.width, BN = B * N, H = cfg.heads, d = cfg.head_dim();
    const attention_shape as{B, H, N, d, 1.0f / std::sqrt(float(d))};
    float* hws = a.hook_workspace();
    const auto& b = a.blocks[std::size_t(l)];
    const std::string p = "blocks." + std::to_string(l) + ".";
    const std::size_t s0 = qkv_slot(l);
    layernorm_forward(x, get_c(p + "norm1.weight").value.data(),
                      get_c(p + "norm1.bias").value.data(), a.at(b.ln1), a.at(b.mean1),
                      a.at(b.rstd1), BN, C);
    slots[s0].forward(a.at(b.ln1), a.at(b.qkv), a.at(a.hook_saved[s0]), hws, BN);
    split_heads(a.at(b.qkv), a.at(b.q), a.at(b.k), a.at(b.v), B, N, H, d);
    attention.forward(as, a.at(b.q), a.at(b.k), a.at(b.v), a.at(b.o), a.at(b.att));
    merge_heads(a.at(b.o), a.at(b.om), B, N, H, d);
    slots[s0 + 1].forward(a.at(b.om), a.at(a.tmp), a.at(a.hook_saved[s0 + 1]), hws, BN);
    residual_forward(x, a.at(a.tmp), a.at(b.x1), BN * C);
    layernorm_forward(a.at(b.x1), get_c(p + "norm2.weight").value.data(),
                      get_c(p + "norm2.bias").value.data(), a.at(b.ln2), a.at(b.mean2),
                      a.at(b.rstd2), BN, C);
    slots[s0 + 2].forward(a.at(b.ln2), a.at(b.h), a.at(a.hook_saved[s0 + 2]), hws, BN);
    gelu_forward(a.at(b.h), a.at(b.g), BN * cfg.hidden());
    slots[s0 + 3].forward(a.at(b.g), a.at(a.tmp), a.at(a.hook_saved[s0 + 3]), hws, BN);
    residual_forward(a.at(b.x1), a.at(a.tmp), a.at(b.out), BN * C);
  }

  /// Image [B, 784] → patches [B, tokens, patch²], tokens in raster order.
  void patchify(const float* images, float* out, index_t B) const {
    const index_t P = cfg.patch, G = cfg.image / P, S = cfg.image;
    const float mu = cfg.input_mean, inv_sd = 1.0f / cfg.input_std;
    for (index_t b = 0; b < B; ++b)
      for (index_t pr = 0; pr < G; ++pr)
        for (index_t pc = 0; pc < G; ++pc) {
          float* dst = out + ((b * G + pr) * G + pc) * P * P;
          for (index_t i = 0; i < P; ++i)
            for (index_t j = 0; j < P; ++j)
              dst[i * P + j] = (images[b * S * S + (pr * P + i) * S + pc * P + j] - mu) * inv_sd;
        }
  }

private:
  const param& get_c(const std::string& name) const {
    for (const auto& p : params)
      if (p.name == name) return p;
    throw std::invalid_argument("vit: no parameter '" + name + "'");
  }
  float* grad_of(const std::string& name) const {
    const param& p = get_c(name);
    return p.trainable ? const_cast<float*>(p.grad.data()) : nullptr;
  }

  void add(const std::string& name, std::vector<index_t> shape) {
    param p;
    p.name = name;
    p.shape = std::move(shape);
    p.value.assign(std::size_t(p.numel()), 0.0f);
    params.push_back(std::move(p));
  }
  void build() {
    const index_t C = cfg.width;
    add("patch_embed.proj.weight", {C, cfg.patch_dim()});
    add("patch_embed.proj.bias", {C});
    add("pos_embed", {cfg.tokens(), C});
    for (index_t l = 0; l < cfg.depth; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      add(p + "norm1.weight", {C});
      add(p + "norm1.bias", {C});
      add(p + "attn.qkv.weight", {3 * C, C});
      add(p + "attn.qkv.bias", {3 * C});
      add(p + "attn.proj.weight", {C, C});
      add(p + "attn.proj.bias", {C});
      add(p + "norm2.weight", {C});
      add(p + "norm2.bias", {C});
      add(p + "mlp.fc1.weight", {cfg.hidden(), C});
      add(p + "mlp.fc1.bias", {cfg.hidden()});
      add(p + "mlp.fc2.weight", {C, cfg.hidden()});
      add(p + "mlp.fc2.bias", {C});
    }
    add("norm.weight", {C});
    add("norm.bias", {C});
    add("head.weight", {cfg.classes, C});
    add("head.bias", {cfg.classes});
    build_slots();
  }
  void build_slots() {
    slots.clear();
    auto mk = [&](const std::string& name) {
      linear_slot s;
      s.name = name;
      s.W = &get(name + ".weight");
      s.b = &get(name + ".bias");
      s.out = s.W->shape[0];
      s.in = s.W->shape[1];
      slots.push_back(s);
    };
    mk("patch_embed.proj");
    for (index_t l = 0; l < cfg.depth; ++l) {
      const std::string p = "blocks." + std::to_string(l) + ".";
      mk(p + "attn.qkv");
      mk(p + "attn.proj");
      mk(p + "mlp.fc1");
      mk(p + "mlp.fc2");
    }
    mk("head");
  }
  /// Weights ~ N(0, 1/fan_in) (residual-branch outputs scaled by 1/√(2·depth), GPT-2 style),
  /// biases 0, LayerNorm γ = 1, β = 0, pos_embed ~ N(0, 0.02²). Deterministic in `seed`.
  void init(std::uint64_t seed) {
    std::uint64_t id = 0;
    for (auto& p : params) {
      const lowmem::random::stream z{seed, id++};
      const std::string& n = p.name;
      const bool is_ln = n.find("norm") != std::string::npos;
      if (is_ln) {
        if (n.size() > 6 && n.compare(n.size() - 6, 6, "weight") == 0)
          std::fill(p.value.begin(), p.value.end(), 1.0f);
        continue;
      }
      float std_dev = 0;
      if (n == "pos_embed")
        std_dev = 0.02f;
      else if (p.shape.size() == 2) {
        std_dev = 1.0f / std::sqrt(float(p.shape[1]));
        if (n.find("attn.proj") != std::string::npos || n.find("fc2") != std::string::npos)
          std_dev /= std::sqrt(2.0f * float(cfg.depth));
      }
      for (std::size_t i = 0; i < p.value.size(); ++i) p.value[i] = std_dev * z.normal(i);
    }
  }
};

} // namespace demo
