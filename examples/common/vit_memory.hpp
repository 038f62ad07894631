// examples/common/vit_memory.hpp — the demo's second table: the memory of ONE training step of
// each method at a weight-dominated shape (ViT-B/16: width 768, depth 12, 12 heads, MLP 3072,
// 224×224 inputs → 196 patches of 16×16), random weights and inputs (memory does not depend on
// values).
//
// Why: the small Fashion-MNIST ViT (105K parameters, batch 128) is ACTIVATION-dominated — its
// weights, gradients and optimizer state are ~1.6 MiB of a ~33 MiB ledger — so no method that
// only shrinks weights/gradients/state (LoRA, QLoRA, 8-bit AdamW) can cut its memory much. At
// ViT-B/16 and a batch of a few images the weights (86M parameters, 328 MiB fp32) dominate,
// which is the regime these methods are built for.
//
// Same accounting as the main table (vit_pipeline.hpp): the ledger is built by training_ledger()
// / inference_ledger(), the functions finetune_gradient() and finetune_mezo() use; the methods
// are configured by the same code (attach_adapters, adamw_lowmem, lowmem::zo). Peak RSS: the
// kernel's high-water mark is reset after the model is set up, and the table reports the peak
// during the step minus the resident set before the method's model copy (the process baseline),
// i.e. what the method itself holds at its peak, setup transients (QLoRA's fp32 copy before
// quantization) excluded.
//
// Input: one channel (the demo's ViT patchifies grayscale images), so the patch embedding is
// 256 → 768 instead of 768 → 768 (0.4M of ViT-B's 86M weights); head 1000 classes.
#pragma once

#include "process.hpp"
#include "vit_methods.hpp"
#include "vit_pipeline.hpp"

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace demo {

/// ViT-B/16 (Dosovitskiy et al., 2020) with one input channel.
inline vit_config vit_b16_config() {
  return vit_shape(/*image*/ 224, /*patch*/ 16, /*width*/ 768, /*depth*/ 12, /*heads*/ 12,
                   /*mlp_ratio*/ 4, /*classes*/ 1000);
}

/// --quick: a smaller shape that is still weight-dominated (12.7M parameters, 16 tokens). At
/// width 256 (3.2M parameters) the rank-32 adapters alone made QLoRA 24.6% of full fine-tuning.
inline vit_config weight_dominated_quick_config() {
  return vit_shape(/*image*/ 64, /*patch*/ 16, /*width*/ 512, /*depth*/ 4, /*heads*/ 8,
                   /*mlp_ratio*/ 4, /*classes*/ 100);
}

struct step_memory_result {
  std::string name;
  std::int64_t trainable_params = 0;
  std::int64_t param_bytes = 0, grad_bytes = 0, optimizer_bytes = 0, activation_bytes = 0;
  std::int64_t tracked_bytes = 0;
  long baseline_rss_kib = 0;  // resident set before the method's model copy
  long step_peak_rss_kib = 0; // high-water mark during the step (reset after setup)
  bool rss_reset = false;
  double setup_seconds = 0, step_seconds = 0;
  double loss = 0;
  /// growth of the peak RSS over the baseline: what the method holds at its peak
  double rss_growth_mib() const { return double(step_peak_rss_kib - baseline_rss_kib) / 1024.0; }
};

/// One training step (gradient methods: forward + backward + optimizer step; MeZO: one ZO step,
/// two forwards) of each of full AdamW fp32, AdamW 8-bit, LoRA, QLoRA NF4 and MeZO (full) on a
/// copy of `base`, with `batch` random images and labels. `cfg` supplies the LoRA options and
/// adapter checkpointing, as in the main table.
inline std::vector<step_memory_result> measure_step_memory(const vit& base, index_t batch,
                                                           const demo_config& cfg) {
  using clock = std::chrono::steady_clock;
  const auto& mc = base.cfg;
  std::vector<float> images(std::size_t(batch * mc.image * mc.image));
  std::vector<std::uint8_t> labels(static_cast<std::size_t>(batch));
  const lowmem::random::stream z{cfg.seed, 999};
  for (std::size_t i = 0; i < images.size(); ++i) images[i] = z.uniform(i);
  for (std::size_t i = 0; i < labels.size(); ++i)
    labels[i] =
        std::uint8_t(z.uniform(images.size() + i) * float(std::min<index_t>(mc.classes, 256)));
  const lora_options lo = lora_options_of(cfg, mc);

  enum kind { full32, full8, lora, qlora, mezo };
  const std::vector<std::pair<kind, std::string>> rows = {
      {full32, "full FT, AdamW fp32"},
      {full8, "full FT, AdamW 8-bit"},
      {lora, adapter_row_name(adapter_kind::lora, cfg)},
      {qlora, adapter_row_name(adapter_kind::qlora, cfg)},
      {mezo, "MeZO (full)"}};
  std::vector<step_memory_result> out;
  for (const auto& row : rows) {
    step_memory_result r;
    r.name = row.second;
    reset_peak_rss();
    r.baseline_rss_kib = current_rss_kib();
    const auto t0 = clock::now();
    {
      vit m(base);
      lowmem::memory::ledger l;
      if (row.first == mezo) {
        lowmem::zo::parameters params;
        r.trainable_params = add_all_parameters(m, params);
        lowmem::zo::optimizer opt(params, mezo_options(cfg, cfg.mezo_lr, 200)); // as run_mezo_full
        vit_activations acts = m.plan(batch, false);
        l = inference_ledger(m, acts);
        r.rss_reset = reset_peak_rss();
        const auto t1 = clock::now();
        r.setup_seconds = std::chrono::duration<double>(t1 - t0).count();
        r.loss =
            opt.step([&] { return m.forward(acts, images.data(), labels.data(), batch); }).loss;
        r.step_seconds = std::chrono::duration<double>(clock::now() - t1).count();
      } else {
        std::vector<std::unique_ptr<linear_hook>> hooks;
        if (row.first == lora || row.first == qlora) {
          m.checkpointing = cfg.adapter_checkpointing;
          hooks =
              attach_adapters(m, row.first == lora ? adapter_kind::lora : adapter_kind::qlora, lo);
        } else {
          m.set_all_trainable(true);
        }
        const std::vector<param_span> spans = trained_spans(m, hooks);
        r.trainable_params = numel(spans);
        std::unique_ptr<optimizer> opt;
        if (row.first == full32)
          opt = std::make_unique<adamw_fp32>(spans);
        else if (row.first == full8)
          opt = std::make_unique<adamw_lowmem>(spans, 8);
        else
          opt = lora_optimizer(spans, cfg);
        vit_activations acts = m.plan(batch, true);
        l = training_ledger(m, *opt, acts);
        r.rss_reset = reset_peak_rss();
        const auto t1 = clock::now();
        r.setup_seconds = std::chrono::duration<double>(t1 - t0).count();
        m.zero_grad();
        r.loss = m.forward(acts, images.data(), labels.data(), batch);
        m.backward(acts, labels.data(), batch);
        clip_gradients(spans, 1.0f);
        opt->step(spans, cfg.finetune_lr);
        r.step_seconds = std::chrono::duration<double>(clock::now() - t1).count();
      }
      record_ledger(r, l);
      r.step_peak_rss_kib = peak_rss_kib();
    }
    out.push_back(r);
  }
  return out;
}

/// Prints the second table (markdown) and the QLoRA / full AdamW ratio of tracked memory.
inline void print_step_memory(const std::vector<step_memory_result>& rs, const vit& base,
                              index_t batch, double seconds) {
  const auto& c = base.cfg;
  std::printf(
      "\nMemory at a weight-dominated shape: ONE training step, random weights and inputs\n"
      "(ViT %ldx%ld input, %ldx%ld patches -> %ld tokens, width %ld, depth %ld, %ld heads, MLP "
      "%ld, %ld classes: %lld parameters; batch %ld). The table above is ACTIVATION-dominated "
      "(a 105K-parameter model at batch 128); this one is WEIGHT-dominated.\n\n",
      long(c.image), long(c.image), long(c.patch), long(c.patch), long(c.tokens()), long(c.width),
      long(c.depth), long(c.heads), long(c.hidden()), long(c.classes),
      (long long)base.parameter_count(), long(batch));
  std::printf("| method | trainable params | tracked training memory (params + grads + opt + "
              "acts) | peak RSS growth (step) | setup | step |\n"
              "|---|---:|---:|---:|---:|---:|\n");
  for (const auto& r : rs)
    std::printf(
        "| %s | %lld | %.1f MiB (%.1f + %.1f + %.1f + %.1f) | %.1f MiB | %.2f s | %.2f s |\n",
        r.name.c_str(), (long long)r.trainable_params, mib(r.tracked_bytes), mib(r.param_bytes),
        mib(r.grad_bytes), mib(r.optimizer_bytes), mib(r.activation_bytes), r.rss_growth_mib(),
        r.setup_seconds, r.step_seconds);
  const step_memory_result* full = nullptr;
  const step_memory_result* q = nullptr;
  for (const auto& r : rs) {
    if (r.name == "full FT, AdamW fp32") full = &r;
    if (r.name.compare(0, 5, "QLoRA") == 0) q = &r;
  }
  if (full && q)
    std::printf("\nQLoRA / full AdamW fp32 at this shape: tracked %.1f%%, peak RSS growth %.1f%%\n",
                100.0 * double(q->tracked_bytes) / double(full->tracked_bytes),
                100.0 * q->rss_growth_mib() / std::max(1e-9, full->rss_growth_mib()));
  std::printf("peak RSS growth (step): kernel high-water mark during the step (reset after setup) "
              "minus the resident set before the method's model copy%s. Section time %.1f s.\n",
              rs.empty() || rs.front().rss_reset ? "" : " (reset refused: process maxima)",
              seconds);
}

} // namespace demo
