// The demo's --quick mode, in-process (examples/common/vit_pipeline.hpp, the same functions
// examples/vit_demo.cpp runs): real Fashion-MNIST, real training, assertions on measured values.
//
// Budget (Release, one thread): pretraining 600 steps × 64 images of a 105K-parameter ViT
// (depth 2) ≈ 22 s unloaded, then 10 fine-tuning runs of 60 steps (MeZO: 600 forward pairs).
// Measured for the whole file: 83.9 s CPU, 3:18 wall at load average 14 on 2 cores.
//
// Sanitizer builds (CI's ASan+UBSan stage) run the same functions on the same model, data and
// methods, only shorter (test_config below): their job is memory safety of every code path
// (each method's forward, backward, optimizer, checkpointing, quantized storage, peft export);
// the accuracy bars of the quick run are asserted by the Release build of this same file.
#include <catch2/catch.hpp>

#include <common/vit_memory.hpp>
#include <common/vit_methods.hpp>
#include <common/vit_pipeline.hpp>
#include <lowmem/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <sys/stat.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

/// --quick's configuration; in sanitizer builds (several times slower) a shorter run of the same
/// code: 150 pretraining steps instead of 600, 20 fine-tuning steps instead of 60, 500 test
/// images instead of 2000 (the previous sanitizer configuration, 300 / 60 / 1000, ran 404 s
/// under ASan+UBSan at -O1 and was the whole tail of CI's sanitizer ctest run). Accuracy of this
/// configuration, measured in Release (vit_demo --quick --pretrain-steps 150 --finetune-steps 20,
/// 2000 test images): pretrained 76.4%; frozen 8.7%; full FT 38.3%, 8-bit 38.2%, APOLLO-Mini
/// 31.85%, QAT 39.7%; LoRA / DoRA / QLoRA 28.85 / 35.95 / 26.6% at lora_lr 1e-2, 45.9 / 46.05 /
/// 44.85% at lora_lr 5e-3.
demo::demo_config test_config() {
  demo::demo_config cfg = demo::quick_config();
  cfg.progress = false;
#ifdef LOWMEM_SANITIZER_BUILD
  cfg.pretrain_steps = 150;
  cfg.finetune_steps = 20;
  cfg.test_limit = 500;
#endif
  return cfg;
}

// Accuracy bars. Release (the quick run): the 80% after pretraining; every fine-tuning
// method +25 points over the frozen base (2000 test images: ±2 points at 2σ); 8-bit AdamW within
// 3 points of fp32. Sanitizer builds (the short run above, 500 test images: ±4.5 points at 2σ):
// bars that only a working backward and optimizer reach (a broken one stays at the frozen base,
// and pretraining at chance, 10%), with ≥ 8 points of margin below the values measured above.
#ifndef LOWMEM_SANITIZER_BUILD
constexpr double pretrained_bar = 0.80, finetune_gain = 0.25, q8_slack = 0.03;
#else
constexpr double pretrained_bar = 0.60, finetune_gain = 0.10, q8_slack = 0.06;
#endif

} // namespace

TEST_CASE("vit_demo --quick: pretraining, frozen base and full fine-tuning on inverted images",
          "[demo][quick]") {
#if defined(_OPENMP)
  omp_set_num_threads(1); // as the demo's default (see vit_demo.cpp: small GEMMs, shared cores)
#endif
  const demo::demo_config cfg = test_config();
  demo::dataset train = demo::load_split("train", std::size_t(cfg.train_limit));
  const demo::dataset test = demo::load_split("t10k", std::size_t(cfg.test_limit));
  REQUIRE(train.count == cfg.train_limit);

  demo::train_stats st;
  const demo::vit base = demo::pretrain(cfg, train, &st);
  const double clean = demo::evaluate(base, test);
  INFO("pretrained: " << 100 * clean << "% on " << test.count << " unshifted test images after "
                      << st.steps << " steps (" << st.seconds << " s), final loss "
                      << st.final_loss);
  // Measured 83.4% in quick mode (600 steps × 64 images ≈ 3 passes over 12K images); the full
  // default run (60K images, 3 epochs) reaches more.
  CHECK(clean > pretrained_bar);

  // The checkpoint round trip the demo performs (timm names, fp32).
  const std::string path = "test_demo_quick_base.safetensors";
  {
    std::vector<lowmem::io::tensor_to_write> t;
    for (const auto& p : base.params)
      t.push_back({p.name, lowmem::io::dtype::f32,
                   std::vector<std::int64_t>(p.shape.begin(), p.shape.end()), p.value.data()});
    lowmem::io::save_safetensors(path, t);
    const auto f = lowmem::io::safetensors_file::open(path);
    REQUIRE(f.tensors().size() == base.params.size());
    const auto& qkv = base.params[3 + 2]; // blocks.0.attn.qkv.weight
    REQUIRE(qkv.name == "blocks.0.attn.qkv.weight");
    std::vector<float> back(qkv.value.size());
    f.copy_to(qkv.name, lowmem::io::dtype::f32, back.data(), back.size());
    CHECK(back == qkv.value);
  }
  std::remove(path.c_str());

  const demo::dataset ft_train = demo::inverted(train, cfg.finetune_limit);
  const demo::dataset ft_test = demo::inverted(test);
  const demo::method_context ctx{base, ft_train, ft_test, cfg};
  const demo::method_result frozen = demo::run_measured({"frozen base", demo::run_frozen}, ctx);
  const demo::method_result full =
      demo::run_measured({"full FT, AdamW fp32", demo::run_full_adamw}, ctx);
  INFO("shifted domain: frozen " << 100 * frozen.accuracy << "%, full FT " << 100 * full.accuracy
                                 << "% (" << full.steps << " steps, " << 1e3 * full.sec_per_step
                                 << " ms/step)");
  // Inversion is a real domain shift: the frozen base is no better than chance (measured 6–8%,
  // below 10% because inverted garments look systematically like other classes).
  CHECK(frozen.accuracy < 0.25);
  // Fine-tuning repairs much of it within 60 steps: measured 65% (+56 points); require +25
  // points, a margin no noise on 2000 test images (±2 points at 2σ) can produce by accident.
  CHECK(full.accuracy > frozen.accuracy + finetune_gain);

  // The ledger is what the table reports: exact byte counts for fp32 full fine-tuning.
  const std::int64_t P = base.parameter_count();
  CHECK(full.trainable_params == P);
  CHECK(full.param_bytes == 4 * P);
  CHECK(full.grad_bytes == 4 * P);
  CHECK(full.optimizer_bytes == 8 * P); // AdamW: m and v in fp32
  CHECK(full.tracked_bytes ==
        full.param_bytes + full.grad_bytes + full.optimizer_bytes + full.activation_bytes);
  CHECK(frozen.grad_bytes == 0);
  CHECK(frozen.optimizer_bytes == 0);
  // Inference shares one block's scratch; training keeps every block's activations + grads.
  CHECK(frozen.activation_bytes < full.activation_bytes / 2);
  CHECK(frozen.tracked_bytes < full.tracked_bytes);
  if (lowmem::memory::tracking_enabled() && lowmem::memory::tracking_malloc()) {
    // The real heap peak of the run covers at least the declared training memory (the model
    // copy, gradients, optimizer state and arenas are all heap-allocated inside the region).
    CHECK(full.heap_peak_bytes >= full.tracked_bytes);
  }
  CHECK(full.peak_rss_kib > 0);

  // 8-bit AdamW (lowmem::optim quantized state): the matrices ≥ 4096 elements hold 1 byte per
  // moment plus scales, the small tensors keep fp32 state (bitsandbytes' min_8bit_size). Measured
  // 0.239 MiB vs 0.801 MiB, accuracy 65.2% vs 65.05%: require less than half the state and
  // accuracy within 3 points of fp32 (2000 test images: ±2 points at 2σ).
  const demo::method_result q8 =
      demo::run_measured({"full FT, AdamW 8-bit", demo::run_full_adamw8}, ctx);
  INFO("8-bit AdamW: " << 100 * q8.accuracy << "%, state " << q8.optimizer_bytes << " bytes");
  CHECK(q8.optimizer_bytes < full.optimizer_bytes / 2);
  CHECK(q8.tracked_bytes < full.tracked_bytes);
  CHECK(q8.accuracy > full.accuracy - q8_slack);

#ifndef LOWMEM_SANITIZER_BUILD // 600 ZO steps: seconds in Release, minutes under ASan
  // MeZO on all parameters: inference memory (no gradients, no state, the inference arena), and
  // a clear gain over the frozen base. Measured 28.8% vs 8.75% (lr 1e-3, 600 steps); require
  // +10 points (±2 points of noise at 2σ on 2000 images).
  const demo::method_result zo = demo::run_measured({"MeZO (full)", demo::run_mezo_full}, ctx);
  INFO("MeZO: " << 100 * zo.accuracy << "%, tracked " << zo.tracked_bytes << " bytes");
  CHECK(zo.grad_bytes == 0);
  CHECK(zo.optimizer_bytes == 0);
  CHECK(double(zo.tracked_bytes) <= 1.1 * double(frozen.tracked_bytes)); // the target
  CHECK(zo.accuracy > frozen.accuracy + 0.10);
#endif

  // ---- the parameter-efficient, projected and quantized methods (vit_methods.hpp) ----
  const std::string out = "test_demo_quick_out";
  ::mkdir(out.c_str(), 0755);
  const demo::method_result apollo =
      demo::run_measured({"APOLLO-Mini", demo::run_apollo_mini}, ctx);
  const demo::method_result lora =
      demo::run_measured({"LoRA",
                          [&](const demo::method_context& c) {
                            return demo::run_lora(c, {out + "/lora", "base"});
                          }},
                         ctx);
  const demo::method_result dora =
      demo::run_measured({"DoRA",
                          [&](const demo::method_context& c) {
                            return demo::run_dora(c, {out + "/dora", "base"});
                          }},
                         ctx);
  const demo::method_result qlora =
      demo::run_measured({"QLoRA",
                          [&](const demo::method_context& c) {
                            return demo::run_qlora(c, {out + "/qlora", "base"});
                          }},
                         ctx);
  const demo::method_result qat = demo::run_measured({"QAT", demo::run_qat}, ctx);
  for (const auto* r : {&apollo, &lora, &dora, &qlora, &qat}) {
    INFO(r->name << ": " << 100 * r->accuracy << "% (frozen " << 100 * frozen.accuracy
                 << "%, full FT " << 100 * full.accuracy << "%), tracked " << r->tracked_bytes
                 << " bytes, optimizer " << r->optimizer_bytes << " bytes");
    // Measured (quick, 60 steps): APOLLO-Mini 64.1%, LoRA 55.65%, DoRA 56.1%, QLoRA 56.05%,
    // QAT 64.25% vs frozen 8.75%: require +25 points, as for full fine-tuning (2000 test images:
    // ±2 points at 2σ), which no broken hook or optimizer reaches (it stays near the frozen base).
    CHECK(r->accuracy > frozen.accuracy + finetune_gain);
    CHECK(r->tracked_bytes ==
          r->param_bytes + r->grad_bytes + r->optimizer_bytes + r->activation_bytes);
  }
  // Memory order (the issue's): QLoRA < LoRA < full AdamW. Measured (quick, batch 64, LoRA family
  // with activation checkpointing): QLoRA 12.01 MB < LoRA 12.34 MB < full 18.14 MB; the target
  // QLoRA ≤ 25% of full is NOT reached (66%): activations dominate at this model size.
  CHECK(qlora.tracked_bytes < lora.tracked_bytes);
  CHECK(lora.tracked_bytes < full.tracked_bytes);
  // Exact ledger bytes of LoRA: adapters r·(in + out) per block linear + the full patch_embed and
  // head (modules_to_save); AdamW state 8 bytes per trainable parameter, gradients 4.
  {
    const auto& mc = cfg.model;
    const std::int64_t C = mc.width, F = mc.hidden(), r = cfg.lora_rank;
    const std::int64_t adapters = mc.depth * r * ((C + 3 * C) + (C + C) + (C + F) + (F + C));
    const std::int64_t saved = (C * mc.patch_dim() + C) + (mc.classes * C + mc.classes);
    CHECK(lora.trainable_params == adapters + saved);
    CHECK(lora.grad_bytes == 4 * lora.trainable_params);
    CHECK(lora.optimizer_bytes == 8 * lora.trainable_params);
    CHECK(lora.param_bytes == 4 * (P + adapters));
    // QLoRA: the block linears' fp32 weights are replaced by NF4 codes (half a byte each) plus
    // double-quantized absmax (one byte per 64 weights, one fp32 per 256 blocks, one mean).
    std::int64_t nf4 = 0;
    for (demo::index_t l = 0; l < mc.depth; ++l)
      for (std::int64_t n : {3 * C * C, C * C, F * C, C * F}) {
        const std::int64_t blocks = n / 64;
        nf4 += n / 2 + blocks + 4 * ((blocks + 255) / 256) + 4 - 4 * n;
      }
    CHECK(qlora.param_bytes == lora.param_bytes + nf4);
    CHECK(qlora.trainable_params == lora.trainable_params);
  }
  // APOLLO-Mini keeps 2·max(m, n) floats of moments per matrix instead of 2·m·n.
  CHECK(apollo.optimizer_bytes < full.optimizer_bytes / 4);

  // peft export: read back with lowmem's reader under peft's names, then parse with Python.
  for (const char* kind : {"lora", "dora", "qlora"}) {
    const std::string dir = out + "/" + kind;
    const auto f = lowmem::io::safetensors_file::open(dir + "/adapter_model.safetensors");
    const std::string k = "base_model.model.blocks.0.attn.qkv.";
    const std::size_t r = std::size_t(cfg.lora_rank);
    std::vector<float> A(r * std::size_t(cfg.model.width));
    f.copy_to(k + "lora_A.weight", lowmem::io::dtype::f32, A.data(), A.size());
    std::vector<float> Bm(std::size_t(3 * cfg.model.width) * r);
    f.copy_to(k + "lora_B.weight", lowmem::io::dtype::f32, Bm.data(), Bm.size());
    CHECK(std::any_of(Bm.begin(), Bm.end(), [](float v) { return v != 0.0f; })); // trained
    if (std::string(kind) == "dora") {
      std::vector<float> mag(std::size_t(3 * cfg.model.width));
      f.copy_to(k + "lora_magnitude_vector", lowmem::io::dtype::f32, mag.data(), mag.size());
      CHECK(std::all_of(mag.begin(), mag.end(), [](float v) { return v > 0; }));
    }
    if (std::system("test -x /usr/bin/python3") == 0) {
      const std::string cmd = std::string("/usr/bin/python3 ") + LOWMEM_TEST_DATA_DIR +
                              "/peft_adapter_check.py " + dir +
                              (std::string(kind) == "dora" ? " --dora" : "");
      CHECK(std::system(cmd.c_str()) == 0);
    }
  }

#ifndef LOWMEM_SANITIZER_BUILD
  const demo::method_result zl = demo::run_measured({"MeZO (LoRA)", demo::run_mezo_lora}, ctx);
  INFO("MeZO (LoRA): " << 100 * zl.accuracy << "%, tracked " << zl.tracked_bytes << " bytes");
  CHECK(zl.grad_bytes == 0);
  CHECK(zl.optimizer_bytes == 0);
  CHECK(double(zl.tracked_bytes) <= 1.1 * double(frozen.tracked_bytes)); // the target
  // Measured 19.25% vs 8.75% (600 ZO steps on the block adapters' A/B only, B starts at 0 so
  // early estimates carry little signal): require +5 points, > 2× the ±2-point noise.
  CHECK(zl.accuracy > frozen.accuracy + 0.05);
#endif
}

// The demo's second table (vit_memory.hpp) at --quick's weight-dominated shape (12.7M parameters,
// 16 tokens, batch 2): one step of each method on random data. QLoRA's gradients are checked by
// finite differences in test_demo_layers.cpp ("LoRA, DoRA and QLoRA hooks backprop correctly").
TEST_CASE("vit_demo --quick: one-step memory at a weight-dominated shape", "[demo][quick]") {
#if defined(_OPENMP)
  omp_set_num_threads(1);
#endif
  demo::demo_config cfg = demo::quick_config();
  demo::vit big(demo::weight_dominated_quick_config(), 3);
  big.attention = demo::lowmem_attention();
  const std::int64_t P = big.parameter_count();
  const auto rs = demo::measure_step_memory(big, 2, cfg);
  REQUIRE(rs.size() == 5);
  const auto& full = rs[0];
  const auto& q8 = rs[1];
  const auto& lora = rs[2];
  const auto& qlora = rs[3];
  const auto& zo = rs[4];
  for (const auto& r : rs) {
    INFO(r.name << ": tracked " << r.tracked_bytes << " bytes, loss " << r.loss);
    CHECK(r.tracked_bytes == r.param_bytes + r.grad_bytes + r.optimizer_bytes + r.activation_bytes);
    CHECK(std::isfinite(r.loss));
    CHECK(r.step_peak_rss_kib > 0);
  }
  // Full fine-tuning: exact ledger; the weights dominate (activations < a quarter of it all).
  CHECK(full.trainable_params == P);
  CHECK(full.param_bytes == 4 * P);
  CHECK(full.grad_bytes == 4 * P);
  CHECK(full.optimizer_bytes == 8 * P);
  CHECK(full.activation_bytes < full.tracked_bytes / 4);
  CHECK(q8.optimizer_bytes < full.optimizer_bytes / 3);
  CHECK(zo.grad_bytes == 0);
  CHECK(zo.optimizer_bytes == 0);
  CHECK(qlora.trainable_params == lora.trainable_params);
  CHECK(qlora.tracked_bytes < lora.tracked_bytes);
  // The target: QLoRA's tracked training memory <= 25% of full fp32 AdamW fine-tuning.
  INFO("QLoRA / full: " << double(qlora.tracked_bytes) / double(full.tracked_bytes));
  CHECK(double(qlora.tracked_bytes) <= 0.25 * double(full.tracked_bytes));
}
