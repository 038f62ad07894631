// examples/common/vit_methods.hpp — the parameter-efficient, quantized, projected and zeroth-order
// fine-tuning methods of the ViT study (vit_demo.cpp), each a thin plug-in over lowmem's kernels:
//
//   LoRA   lora_hook   : lowmem::lora_forward / lora_backward            (adapters/lora.hpp)
//   DoRA   dora_hook   : lowmem::dora_forward / dora_backward / norms    (adapters/dora.hpp)
//   QLoRA  qlora_hook  : NF4 base (quant::qweight_storage, double-quantized absmax) through
//                        quant::qlinear_forward / qlinear_backward, plus the base-free LoRA
//                        terms lowmem::lora_adapter_forward / lora_adapter_backward
//   QAT    qat_hook    : quant::lsq_forward / lsq_backward (int4, learned per-channel steps)
//   APOLLO-Mini / GaLore projected_optimizer : optim::projected_adam for matrices, AdamW for
//   vectors MeZO on LoRA       : lowmem::zo over the LoRA A/B spans only (inference memory)
//
// plus export_peft_adapter(): the trained adapter as peft's adapter_model.safetensors +
// adapter_config.json (lowmem::io::save_safetensors, nlohmann json).
//
// Which layers get adapters (measured in --quick, see method_table() in vit_demo.cpp): the shift
// is an input inversion x → 1 − x, which the patch embedding sees first — its exact repair is
// W_pe → −W_pe with a new bias, a FULL-rank change of a 64×49 matrix that a rank-8 adapter cannot
// express. So, like peft's `modules_to_save`, the LoRA family trains the patch embedding (3.2K
// parameters) and the classifier head (650) in full, and puts rank-32 adapters (rank chosen on a
// validation split, vit_pipeline.hpp) on every block linear (qkv, proj, fc1, fc2).
#pragma once

#include <lowmem/adapters.hpp>
#include <lowmem/io/safetensors.hpp>
#include <lowmem/optimizers/projected.hpp>
#include <lowmem/quant.hpp>
#include <lowmem/zeroth_order.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <memory>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "vit_pipeline.hpp"

namespace demo {

namespace methods_detail {
inline lowmem::ConstRowMap<float> cmap(const float* p, index_t r, index_t c) {
  return lowmem::ConstRowMap<float>(p, r, c, Eigen::OuterStride<>(c));
}
inline lowmem::RowMap<float> map(float* p, index_t r, index_t c) {
  return lowmem::RowMap<float>(p, r, c, Eigen::OuterStride<>(c));
}
inline std::size_t floats_of(std::size_t bytes) { return (bytes + 3) / 4; }
inline std::size_t pad16(std::size_t n) { return (n + 15) / 16 * 16; }
/// db += Σ_rows dy when the slot's bias is trainable (the adapters' kernels take W frozen and
/// leave the bias to the caller).
inline void bias_grad(const linear_slot& s, const float* dy, index_t rows) {
  if (!s.b || !s.b->trainable) return;
  float* g = s.b->grad.data();
  for (index_t i = 0; i < rows; ++i)
    for (index_t o = 0; o < s.out; ++o) g[o] += dy[i * s.out + o];
}
} // namespace methods_detail

// ---- LoRA family -------------------------------------------------------------------------------

struct lora_options {
  index_t rank = 8;
  float alpha = 16; // s = alpha / r = 2 (peft's default ratio for r = 8, alpha = 16)
  bool rslora = false;
  /// Slots that get an adapter (timm module names); others stay as they are.
  std::vector<std::string> targets;
  /// Modules trained in full alongside the adapters (peft's modules_to_save).
  std::vector<std::string> modules_to_save;
  std::uint64_t seed = 11;
};

/// The default LoRA-family configuration of the demo (header comment): adapters on every block
/// linear, patch_embed.proj and head trained in full.
inline lora_options default_lora_options(const vit_config& c) {
  lora_options o;
  for (index_t l = 0; l < c.depth; ++l)
    for (const char* s : {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"})
      o.targets.push_back("blocks." + std::to_string(l) + "." + s);
  o.modules_to_save = {"patch_embed.proj", "head"};
  return o;
}

/// The demo's LoRA-family options from its configuration (rank, alpha, rsLoRA, LayerNorms saved).
inline lora_options lora_options_of(const demo_config& dc, const vit_config& c) {
  lora_options o = default_lora_options(c);
  o.rank = dc.lora_rank;
  o.alpha = dc.lora_alpha > 0 ? dc.lora_alpha : 2.0f * float(dc.lora_rank);
  o.rslora = dc.lora_rslora;
  if (dc.lora_train_norms) {
    for (index_t l = 0; l < c.depth; ++l)
      for (const char* s : {"norm1", "norm2"})
        o.modules_to_save.push_back("blocks." + std::to_string(l) + "." + s);
    o.modules_to_save.push_back("norm");
  }
  return o;
}

/// Common state of a LoRA-style adapter on one slot: A [r, in], B [out, r] (peft init: A
/// Kaiming-uniform, B = 0, via lowmem::lora_init_kaiming), their gradients (absent for MeZO).
class adapter_hook : public linear_hook {
public:
  std::string module;
  index_t in = 0, out = 0, r = 0;
  float scale = 1;
  std::vector<float> A, B, dA, dB;

  adapter_hook(const linear_slot& s, const lora_options& o, std::uint64_t id, bool with_grad)
      : module(s.name), in(s.in), out(s.out), r(o.rank),
        scale(lowmem::lora_scale(o.alpha, o.rank, o.rslora)), A(std::size_t(r * in)),
        B(std::size_t(out * r)) {
    using namespace methods_detail;
    lowmem::lora_init_kaiming(lowmem::random::stream{o.seed, id}, map(A.data(), r, in),
                              map(B.data(), out, r));
    if (with_grad) {
      dA.assign(A.size(), 0.0f);
      dB.assign(B.size(), 0.0f);
    }
  }
  std::size_t saved_floats(index_t rows) const override { return std::size_t(rows * r); }
  std::vector<param_span> params() override {
    return {
        {module + ".lora_A.weight", A.data(), dA.empty() ? nullptr : dA.data(), {r, in}, r * in},
        {module + ".lora_B.weight", B.data(), dB.empty() ? nullptr : dB.data(), {out, r}, out * r}};
  }
};

/// LoRA (arXiv:2106.09685) on a frozen fp32 W: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ; saves u = x·Aᵀ.
class lora_hook : public adapter_hook {
public:
  using adapter_hook::adapter_hook;
  std::size_t workspace_floats(index_t rows) const override {
    return methods_detail::floats_of(lowmem::lora_backward_workspace_bytes(rows, in, r));
  }
  void forward(const linear_slot& s, const float* x, float* y, float* saved, float*,
               index_t rows) override {
    using namespace methods_detail;
    lowmem::lora_forward(cmap(x, rows, in), cmap(s.W->value.data(), out, in), s.b->value.data(),
                         cmap(A.data(), r, in), cmap(B.data(), out, r), scale, {},
                         map(y, rows, out), map(saved, rows, r));
  }
  void backward(const linear_slot& s, const float* x, const float* dy, float* dx,
                const float* saved, float* ws, index_t rows) override {
    using namespace methods_detail;
    lowmem::RowMatrixXf none(0, 0);
    lowmem::lora_backward(
        cmap(x, rows, in), cmap(s.W->value.data(), out, in), cmap(A.data(), r, in),
        cmap(B.data(), out, r), cmap(saved, rows, r), cmap(dy, rows, out), scale, {},
        dx ? lowmem::RowRef<float>(map(dx, rows, in)) : lowmem::RowRef<float>(none),
        map(dA.data(), r, in), map(dB.data(), out, r),
        lowmem::workspace(ws, lowmem::lora_backward_workspace_bytes(rows, in, r)));
    bias_grad(s, dy, rows);
  }
};

/// DoRA (arXiv:2402.09353): y = (x·Wᵀ + s·u·Bᵀ) ⊙ (m / ‖W + s·B·A‖_row) + b, magnitude m [out]
/// trainable (init m = row norms of W, as peft). Saves u, the pre-bias output and the norms.
class dora_hook : public adapter_hook {
public:
  std::vector<float> m, dm;
  /// false (default, the paper's §4.3 and peft's detach): the norm is a constant in backward;
  /// true: the exact gradient through the norm (used by the finite-difference test).
  bool exact = false;
  dora_hook(const linear_slot& s, const lora_options& o, std::uint64_t id, bool with_grad)
      : adapter_hook(s, o, id, with_grad), m(std::size_t(s.out)) {
    using namespace methods_detail;
    std::vector<float> scratch(floats_of(lowmem::dora_forward_workspace_bytes(out, r)) + 16);
    lowmem::dora_norms(cmap(s.W->value.data(), out, in), cmap(A.data(), r, in),
                       cmap(B.data(), out, r), scale, Eigen::Map<Eigen::VectorXf>(m.data(), out),
                       lowmem::workspace(scratch.data(), scratch.size() * sizeof(float)));
    if (with_grad) dm.assign(m.size(), 0.0f);
  }
  std::size_t saved_floats(index_t rows) const override {
    using methods_detail::pad16;
    return pad16(std::size_t(rows * r)) + pad16(std::size_t(rows * out)) + std::size_t(out);
  }
  std::size_t workspace_floats(index_t rows) const override {
    return methods_detail::floats_of(
        std::max(lowmem::dora_forward_workspace_bytes(out, r),
                 lowmem::dora_backward_workspace_bytes(rows, out, r, exact)));
  }
  void forward(const linear_slot& s, const float* x, float* y, float* saved, float* ws,
               index_t rows) override {
    using namespace methods_detail;
    float* u = saved;
    float* ys = saved + pad16(std::size_t(rows * r));
    float* norms = ys + pad16(std::size_t(rows * out));
    lowmem::dora_forward(cmap(x, rows, in), cmap(s.W->value.data(), out, in), s.b->value.data(),
                         cmap(A.data(), r, in), cmap(B.data(), out, r),
                         Eigen::Map<const Eigen::VectorXf>(m.data(), out), scale, map(y, rows, out),
                         map(u, rows, r), Eigen::Map<Eigen::VectorXf>(norms, out),
                         lowmem::workspace(ws, lowmem::dora_forward_workspace_bytes(out, r)));
    std::copy_n(y, rows * out, ys); // y itself is a shared buffer the model overwrites
  }
  void backward(const linear_slot& s, const float* x, const float* dy, float* dx,
                const float* saved, float* ws, index_t rows) override {
    using namespace methods_detail;
    const float* u = saved;
    const float* ys = saved + pad16(std::size_t(rows * r));
    const float* norms = ys + pad16(std::size_t(rows * out));
    lowmem::RowMatrixXf none(0, 0);
    lowmem::dora_backward(
        cmap(x, rows, in), cmap(s.W->value.data(), out, in), s.b->value.data(),
        cmap(A.data(), r, in), cmap(B.data(), out, r),
        Eigen::Map<const Eigen::VectorXf>(m.data(), out), cmap(u, rows, r),
        Eigen::Map<const Eigen::VectorXf>(norms, out), cmap(ys, rows, out), cmap(dy, rows, out),
        scale, exact, dx ? lowmem::RowRef<float>(map(dx, rows, in)) : lowmem::RowRef<float>(none),
        map(dA.data(), r, in), map(dB.data(), out, r), Eigen::Map<Eigen::VectorXf>(dm.data(), out),
        lowmem::workspace(ws, lowmem::dora_backward_workspace_bytes(rows, out, r, exact)));
    bias_grad(s, dy, rows);
  }
  std::vector<param_span> params() override {
    auto p = adapter_hook::params();
    p.push_back({module + ".lora_magnitude_vector",
                 m.data(),
                 dm.empty() ? nullptr : dm.data(),
                 {out},
                 out});
    return p;
  }
};

/// QLoRA (arXiv:2305.14314): the frozen base is NF4 (block 64) with double-quantized absmax
/// (e4m3 codes + one fp32 scale per 256 blocks + a mean: 4.127 bits per weight); the fp32 W is
/// RELEASED, so the model's resident bytes count the 4-bit codes (resident_bytes()). Forward:
/// y = x·deq(W)ᵀ (quant::qlinear_forward, a tile dequantized at a time) + s·u·Bᵀ + b with
/// u = x·Aᵀ (lowmem::lora_adapter_forward: LoRA's adapter terms without a base W). Backward:
/// dx += dy·deq(W) (quant::qlinear_backward), then lowmem::lora_adapter_backward: du = s·dy·B,
/// dB += s·dyᵀ·u, dA += duᵀ·x, dx += du·A. The absmax scales are decoded into the workspace on
/// every call.
class qlora_hook : public adapter_hook {
public:
  lowmem::quant::qweight_storage q; // codes; q.scales is cleared after double quantization
  std::vector<std::uint8_t> dq_codes;
  std::vector<float> dq_group_scales;
  float dq_mean = 0;
  std::size_t nblocks = 0;
  index_t block = 64; // QLoRA's NF4 block; `in` itself when 64 does not divide it (tiny tests)

  qlora_hook(linear_slot& s, const lora_options& o, std::uint64_t id, bool with_grad)
      : adapter_hook(s, o, id, with_grad), block(s.in % 64 == 0 ? 64 : s.in) {
    using namespace methods_detail;
    q = lowmem::quant::qweight_storage::quantize(cmap(s.W->value.data(), out, in),
                                                 lowmem::quant::weight_format::nf4, block);
    nblocks = q.scales.size();
    dq_codes.resize(nblocks);
    dq_group_scales.resize(lowmem::quant::dq_num_groups(nblocks));
    lowmem::quant::double_quantize_absmax(q.scales.data(), nblocks, dq_codes.data(),
                                          dq_group_scales.data(), &dq_mean);
    std::vector<float>().swap(q.scales);
    std::vector<float>().swap(s.W->value); // the fp32 base weight is gone
  }
  std::int64_t resident_bytes() const override {
    return std::int64_t(q.codes.size() + dq_codes.size() +
                        sizeof(float) * (dq_group_scales.size() + 1));
  }
  std::size_t qlinear_bytes(index_t rows) const {
    // the byte count depends on shapes only; a view with a stand-in scale pointer sizes it
    lowmem::quant::qweight v{lowmem::quant::weight_format::nf4,
                             out,
                             in,
                             block,
                             q.codes.data(),
                             reinterpret_cast<const float*>(dq_codes.data()),
                             nullptr};
    return lowmem::quant::qlinear_workspace_bytes(v, rows);
  }
  std::size_t workspace_floats(index_t rows) const override {
    using namespace methods_detail;
    return pad16(nblocks) + pad16(lora_floats(rows)) + pad16(floats_of(qlinear_bytes(rows)));
  }
  /// Scratch of lora_adapter_backward (du, rows·r floats, and its alignment slack).
  std::size_t lora_floats(index_t rows) const {
    return methods_detail::floats_of(lowmem::lora_backward_workspace_bytes(rows, in, r));
  }
  lowmem::quant::qweight decode_scales(float* ws) const {
    lowmem::quant::double_dequantize_absmax(dq_codes.data(), dq_group_scales.data(), dq_mean,
                                            nblocks, ws);
    return {lowmem::quant::weight_format::nf4, out, in, block, q.codes.data(), ws, nullptr};
  }
  void forward(const linear_slot& s, const float* x, float* y, float* saved, float* ws,
               index_t rows) override {
    using namespace methods_detail;
    const auto W = decode_scales(ws);
    float* qws = ws + pad16(nblocks) + pad16(lora_floats(rows));
    auto Y = map(y, rows, out);
    lowmem::quant::qlinear_forward(cmap(x, rows, in), W, Y,
                                   lowmem::workspace(qws, qlinear_bytes(rows)));
    lowmem::lora_adapter_forward(cmap(x, rows, in), cmap(A.data(), r, in), cmap(B.data(), out, r),
                                 scale, {}, Y, map(saved, rows, r));
    const float* b = s.b->value.data();
    for (index_t i = 0; i < rows; ++i)
      for (index_t o = 0; o < out; ++o) y[i * out + o] += b[o];
  }
  void backward(const linear_slot& s, const float* x, const float* dy, float* dx,
                const float* saved, float* ws, index_t rows) override {
    using namespace methods_detail;
    const auto W = decode_scales(ws);
    float* lws = ws + pad16(nblocks);
    float* qws = lws + pad16(lora_floats(rows));
    const auto DY = cmap(dy, rows, out);
    lowmem::RowMatrixXf none(0, 0);
    if (dx)
      lowmem::quant::qlinear_backward(DY, W, map(dx, rows, in),
                                      lowmem::workspace(qws, qlinear_bytes(rows)));
    lowmem::lora_adapter_backward(
        cmap(x, rows, in), cmap(A.data(), r, in), cmap(B.data(), out, r), cmap(saved, rows, r), DY,
        scale, {}, dx ? lowmem::RowRef<float>(map(dx, rows, in)) : lowmem::RowRef<float>(none),
        map(dA.data(), r, in), map(dB.data(), out, r),
        lowmem::workspace(lws, lowmem::lora_backward_workspace_bytes(rows, in, r)));
    bias_grad(s, dy, rows);
  }
};

enum class adapter_kind { lora, dora, qlora };

/// Attaches adapters of `kind` to o.targets of `m` (freezing everything, then making
/// o.modules_to_save trainable). with_grad = false (MeZO) allocates no gradients at all.
inline std::vector<std::unique_ptr<linear_hook>>
attach_adapters(vit& m, adapter_kind kind, const lora_options& o, bool with_grad = true) {
  const auto& save = o.modules_to_save;
  m.set_trainable([&](const param& p) {
    if (!with_grad) return false;
    for (const auto& mod : save)
      if (p.name.compare(0, mod.size() + 1, mod + ".") == 0) return true;
    return false;
  });
  std::vector<std::unique_ptr<linear_hook>> hooks;
  std::uint64_t id = 0;
  for (const auto& t : o.targets) {
    linear_slot& s = m.slot(t);
    if (kind == adapter_kind::lora)
      hooks.push_back(std::make_unique<lora_hook>(s, o, id, with_grad));
    else if (kind == adapter_kind::dora)
      hooks.push_back(std::make_unique<dora_hook>(s, o, id, with_grad));
    else
      hooks.push_back(std::make_unique<qlora_hook>(s, o, id, with_grad));
    s.hook = hooks.back().get();
    ++id;
  }
  return hooks;
}

// ---- QAT ---------------------------------------------------------------------------------------

/// QAT with LSQ (arXiv:1902.08153): the forward uses W_q = rne(clamp(W/s, −8, 7))·s (signed int4,
/// one learned step s per output channel, init 2·mean|W|/√7), the backward the straight-through
/// estimator for W and LSQ's gradient for s. W stays an fp32 master copy trained by the
/// optimizer; W_q and dW_q are recomputed into the workspace (2·out·in floats), not saved.
class qat_hook : public linear_hook {
public:
  std::string module;
  lowmem::quant::lsq_format fmt{4, true, 0};
  std::vector<float> step, dstep;
  index_t in = 0, out = 0;
  explicit qat_hook(const linear_slot& s) : module(s.name), in(s.in), out(s.out) {
    step.resize(std::size_t(lowmem::quant::lsq_num_steps(out, in, fmt)));
    dstep.assign(step.size(), 0.0f);
    lowmem::quant::lsq_init_steps(s.W->value.data(), out, in, fmt, step.data());
  }
  std::size_t workspace_floats(index_t) const override {
    return 2 * methods_detail::pad16(std::size_t(out * in));
  }
  void forward(const linear_slot& s, const float* x, float* y, float*, float* ws,
               index_t rows) override {
    for (auto& v : step) v = std::max(v, 1e-6f); // LSQ needs s > 0 (torchao clamps likewise)
    lowmem::quant::lsq_forward(s.W->value.data(), step.data(), out, in, fmt, ws);
    linear_forward(x, ws, s.b->value.data(), y, rows, in, out);
  }
  void backward(const linear_slot& s, const float* x, const float* dy, float* dx, const float*,
                float* ws, index_t rows) override {
    float* wq = ws;
    float* dwq = ws + methods_detail::pad16(std::size_t(out * in));
    lowmem::quant::lsq_forward(s.W->value.data(), step.data(), out, in, fmt, wq);
    std::fill(dwq, dwq + out * in, 0.0f);
    linear_backward(x, wq, dy, dx, dwq, s.b->trainable ? s.b->grad.data() : nullptr, rows, in, out);
    // W frozen: the straight-through gradient goes to the dead W_q scratch
    lowmem::quant::lsq_backward(s.W->value.data(), step.data(), dwq, out, in, fmt,
                                s.W->trainable ? s.W->grad.data() : wq, dstep.data());
  }
  std::vector<param_span> params() override {
    return {{module + ".weight_step", step.data(), dstep.data(), {out}, index_t(step.size())}};
  }
};

/// fp32 AdamW with a smaller learning rate (lr · factor) for the spans whose name ends with
/// `suffix` (LSQ step sizes: Adam normalises the gradient, so at the weights' lr a step of
/// ~0.01 would move by 30% per update and can cross zero).
class split_lr_optimizer : public optimizer {
public:
  split_lr_optimizer(const std::vector<param_span>& params, std::string suffix, float factor,
                     float special_wd = 0.0f)
      : suffix_(std::move(suffix)), factor_(factor) {
    std::vector<param_span> a, b;
    for (const auto& p : params) (is_special(p) ? b : a).push_back(p);
    main_ = std::make_unique<adamw_fp32>(a);
    special_ = std::make_unique<adamw_fp32>(b, special_wd);
  }
  std::string name() const override { return "AdamW fp32 (split lr)"; }
  std::int64_t state_bytes() const override {
    return main_->state_bytes() + special_->state_bytes();
  }
  void step(const std::vector<param_span>& params, float lr) override {
    std::vector<param_span> a, b;
    for (const auto& p : params) (is_special(p) ? b : a).push_back(p);
    main_->step(a, lr);
    special_->step(b, lr * factor_);
  }

private:
  bool is_special(const param_span& p) const {
    return p.name.size() >= suffix_.size() &&
           p.name.compare(p.name.size() - suffix_.size(), suffix_.size(), suffix_) == 0;
  }
  std::string suffix_;
  float factor_;
  std::unique_ptr<adamw_fp32> main_, special_;
};

// ---- projected optimizer (APOLLO-Mini / GaLore) ------------------------------------------------

/// optim::projected_adam for every matrix (Adam moments in a rank-r projected space), fp32 AdamW
/// (lowmem fused kernel) for vectors and pos_embed. state_bytes() counts the persistent state
/// (projected moments, stored projection) AND the object's preallocated scratch (projected
/// gradient R, the regenerated projection, channel scales, and for GaLore the randomized-SVD
/// sketches): all of it is live during training.
/// Library gap (reported): projected_adam has no per-step learning rate, so matrices use the
/// constant peak lr (no warm-up / cosine) while vectors follow the schedule.
class projected_optimizer : public optimizer {
public:
  lowmem::optim::projected_config cfg;
  projected_optimizer(const std::vector<param_span>& params, lowmem::optim::projected_config c,
                      float wd = 0.05f)
      : cfg(c) {
    std::vector<param_span> vecs;
    for (const auto& p : params) {
      const bool matrix = p.shape.size() == 2 && p.name != "pos_embed" &&
                          std::min(p.shape[0], p.shape[1]) >= cfg.rank;
      if (matrix) {
        auto pc = cfg;
        pc.weight_decay = wd;
        pc.seed = cfg.seed + proj_.size();
        proj_.push_back(
            std::make_unique<lowmem::optim::projected_adam>(p.shape[0], p.shape[1], pc));
        is_matrix_.push_back(true);
        const index_t d = std::min(p.shape[0], p.shape[1]), D = std::max(p.shape[0], p.shape[1]);
        const index_t r = cfg.rank;
        const bool stores = cfg.method == lowmem::optim::projection_method::galore ||
                            cfg.method == lowmem::optim::projection_method::frugal;
        const index_t k = std::min<index_t>(d, r + cfg.oversample);
        // R [r, D], P [d, r], colscale [D], colbuf [d]; GaLore: Y [d, k], Z [D, k], C [k, k],
        // B [k, D] and the eigen-solver's k×k matrices
        std::int64_t f = r * D + (stores ? 0 : d * r) + D + d;
        if (stores) f += d * k + D * k + 3 * k * k + k * D + k;
        scratch_bytes_ += f * 4;
      } else {
        is_matrix_.push_back(false);
        vecs.push_back(p);
      }
    }
    adam_ = std::make_unique<adamw_fp32>(vecs, 0.0f);
  }
  std::string name() const override { return "projected Adam"; }
  std::int64_t state_bytes() const override {
    std::int64_t b = adam_->state_bytes() + scratch_bytes_;
    for (const auto& p : proj_) b += std::int64_t(p->state_bytes());
    return b;
  }
  void step(const std::vector<param_span>& params, float lr) override {
    std::vector<param_span> vecs;
    std::size_t k = 0;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      if (is_matrix_[i]) {
        proj_[k++]->step(methods_detail::map(p.data, p.shape[0], p.shape[1]),
                         methods_detail::cmap(p.grad, p.shape[0], p.shape[1]));
      } else {
        vecs.push_back(p);
      }
    }
    adam_->step(vecs, lr);
  }

private:
  std::vector<std::unique_ptr<lowmem::optim::projected_adam>> proj_;
  std::vector<bool> is_matrix_;
  std::unique_ptr<adamw_fp32> adam_;
  std::int64_t scratch_bytes_ = 0;
};

// ---- peft export -------------------------------------------------------------------------------

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json in peft's LoRA format:
/// keys base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r], DoRA's
/// .lora_magnitude_vector [out] (peft saves it without ".weight", see its
/// get_peft_model_state_dict), and the modules_to_save tensors as base_model.model.<name>.
/// Returns the tensor names written.
inline std::vector<std::string>
export_peft_adapter(const std::string& dir, vit& m,
                    const std::vector<std::unique_ptr<linear_hook>>& hooks, const lora_options& o,
                    bool use_dora, const std::string& base_model) {
  ::mkdir(dir.c_str(), 0755);
  std::vector<lowmem::io::tensor_to_write> t;
  std::vector<std::string> names;
  const std::string prefix = "base_model.model.";
  for (const auto& h : hooks)
    for (const auto& s : h->params()) {
      t.push_back({prefix + s.name, lowmem::io::dtype::f32,
                   std::vector<std::int64_t>(s.shape.begin(), s.shape.end()), s.data});
      names.push_back(t.back().name);
    }
  for (const auto& mod : o.modules_to_save)
    for (const auto& p : m.params)
      if (p.name.compare(0, mod.size() + 1, mod + ".") == 0) {
        t.push_back({prefix + p.name, lowmem::io::dtype::f32,
                     std::vector<std::int64_t>(p.shape.begin(), p.shape.end()), p.value.data()});
        names.push_back(t.back().name);
      }
  lowmem::io::save_safetensors(dir + "/adapter_model.safetensors", t, {{"format", "pt"}});
  nlohmann::json c;
  c["peft_type"] = "LORA";
  c["task_type"] = nullptr;
  c["base_model_name_or_path"] = base_model;
  c["revision"] = nullptr;
  c["r"] = o.rank;
  c["lora_alpha"] = o.alpha;
  c["lora_dropout"] = 0.0;
  c["target_modules"] = o.targets; // exact module names (peft matches full names exactly)
  c["modules_to_save"] = o.modules_to_save;
  c["bias"] = "none";
  c["use_dora"] = use_dora;
  c["use_rslora"] = o.rslora;
  c["fan_in_fan_out"] = false;
  c["inference_mode"] = true;
  c["init_lora_weights"] = true;
  c["layers_to_transform"] = nullptr;
  c["layers_pattern"] = nullptr;
  c["rank_pattern"] = nlohmann::json::object();
  c["alpha_pattern"] = nlohmann::json::object();
  std::ofstream f(dir + "/adapter_config.json");
  f << c.dump(2) << "\n";
  if (!f) throw std::runtime_error("cannot write " + dir + "/adapter_config.json");
  return names;
}

// ---- the method runs ---------------------------------------------------------------------------

/// Where a LoRA-family run leaves its adapter (set by the demo; empty: no export).
struct adapter_export {
  std::string dir;        // e.g. demo-output/lora
  std::string base_model; // base_model_name_or_path
};

/// The LoRA family's optimizer: fp32 AdamW; with LoRA+ (lora_plus_ratio λ ≠ 1) the B factors
/// train at λ · lr (same weight decay), everything else at lr.
inline std::unique_ptr<optimizer> lora_optimizer(const std::vector<param_span>& s,
                                                 const demo_config& c) {
  if (c.lora_plus_ratio == 1.0f) return std::make_unique<adamw_fp32>(s);
  return std::make_unique<split_lr_optimizer>(s, ".lora_B.weight", c.lora_plus_ratio, 0.05f);
}

/// Row names of the LoRA family ("LoRA r=8", "DoRA r=8", "QLoRA NF4 r=8" at rank 8).
inline std::string adapter_row_name(adapter_kind kind, const demo_config& c) {
  const char* k = kind == adapter_kind::lora   ? "LoRA"
                  : kind == adapter_kind::dora ? "DoRA"
                                               : "QLoRA NF4";
  return std::string(k) + " r=" + std::to_string(c.lora_rank);
}

inline method_result run_adapter(const method_context& ctx, const std::string& name,
                                 adapter_kind kind, const adapter_export& ex = {}) {
  const lora_options o = lora_options_of(ctx.cfg, ctx.base.cfg);
  return finetune_gradient(
      ctx, name,
      [&](vit& m) {
        m.checkpointing = ctx.cfg.adapter_checkpointing;
        return attach_adapters(m, kind, o);
      },
      [&](const std::vector<param_span>& s) { return lora_optimizer(s, ctx.cfg); }, ctx.cfg.lora_lr,
      [&](vit& m, const std::vector<std::unique_ptr<linear_hook>>& hooks) {
        if (!ex.dir.empty())
          export_peft_adapter(ex.dir, m, hooks, o, kind == adapter_kind::dora, ex.base_model);
      });
}

inline method_result run_lora(const method_context& ctx, const adapter_export& ex = {}) {
  return run_adapter(ctx, adapter_row_name(adapter_kind::lora, ctx.cfg), adapter_kind::lora, ex);
}
inline method_result run_dora(const method_context& ctx, const adapter_export& ex = {}) {
  return run_adapter(ctx, adapter_row_name(adapter_kind::dora, ctx.cfg), adapter_kind::dora, ex);
}
inline method_result run_qlora(const method_context& ctx, const adapter_export& ex = {}) {
  return run_adapter(ctx, adapter_row_name(adapter_kind::qlora, ctx.cfg), adapter_kind::qlora, ex);
}

/// QAT: full fine-tuning (fp32 AdamW) through int4 LSQ fake-quant of every block linear; the
/// patch embedding and head stay fp32 (LSQ paper §3: first and last layers at higher precision).
inline method_result run_qat(const method_context& ctx) {
  return finetune_gradient(
      ctx, "QAT int4 LSQ",
      [](vit& m) {
        m.set_all_trainable(true);
        std::vector<std::unique_ptr<linear_hook>> hooks;
        for (auto& s : m.slots)
          if (s.name.compare(0, 7, "blocks.") == 0) {
            hooks.push_back(std::make_unique<qat_hook>(s));
            s.hook = hooks.back().get();
          }
        return hooks;
      },
      [&](const std::vector<param_span>& s) {
        return std::make_unique<split_lr_optimizer>(s, ".weight_step", ctx.cfg.qat_step_lr_factor);
      },
      ctx.cfg.finetune_lr);
}

/// APOLLO-Mini (arXiv:2412.05270): rank-1 random projection, tensor-wise scaling (scale 128),
/// 2·max(m, n) floats of state per matrix.
inline method_result run_apollo_mini(const method_context& ctx) {
  return finetune_gradient(
      ctx, "APOLLO-Mini", train_all,
      [&](const std::vector<param_span>& s) {
        lowmem::optim::projected_config c;
        c.method = lowmem::optim::projection_method::apollo_mini;
        c.rank = 1;
        c.scale = 128;
        c.lr = ctx.cfg.apollo_lr;
        c.update_gap = 200;
        return std::make_unique<projected_optimizer>(s, c);
      },
      ctx.cfg.finetune_lr);
}

/// MeZO on the LoRA parameters only: adapters (no gradient buffers) on the default targets, the
/// whole model frozen, lowmem::zo perturbing the A/B spans; forward-only (inference arena).
inline method_result run_mezo_lora(const method_context& ctx) {
  method_result r;
  r.name = "MeZO (LoRA)";
  vit m(ctx.base);
  lora_options o = default_lora_options(ctx.base.cfg);
  o.modules_to_save.clear(); // MeZO perturbs only A and B
  auto hooks = attach_adapters(m, adapter_kind::lora, o, false);
  lowmem::zo::parameters params;
  std::uint64_t id = 0;
  for (auto& h : hooks)
    for (auto& s : h->params()) {
      params.add(id++, s.data, std::size_t(s.numel));
      r.trainable_params += s.numel;
    }
  finetune_mezo(ctx, m, params, ctx.cfg.mezo_lora_lr, 400, r);
  return r;
}

} // namespace demo
