// vit_demo — the end-to-end demo: pretrain a small ViT on Fashion-MNIST, then compare
// fine-tuning methods on a shifted domain (inverted images, x → 1 − x) by accuracy and memory.
//
//   vit_demo [--quick] [--out DIR] [--pretrain-steps N] [--finetune-steps N] [--pretrain-lr X]
//            [--finetune-lr X] [--mezo-lr X] [--threads N]  (default 1 thread, see main)
//
// Progress goes to stderr; the results table to stdout; DIR (default demo-output/) receives
// results.csv, accuracy_vs_memory.svg and base.safetensors (the pretrained model, timm names).
#include <lowmem/core/memory_hooks.hpp> // once per program: heap accounting for the table
#include <lowmem/io/safetensors.hpp>

#include <common/process.hpp>
#include <common/vit_memory.hpp>
#include <common/vit_methods.hpp>
#include <common/vit_pipeline.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace {

using demo::mib;

// The method table: one row per method, in the order of the printed table. The LoRA family
// also exports its adapter in peft's format to <out>/{lora,dora,qlora}/ (vit_methods.hpp).
std::vector<demo::method> method_table(const std::string& out, const demo::demo_config& cfg) {
  const demo::adapter_export lora{out + "/lora", out + "/base.safetensors"};
  const demo::adapter_export dora{out + "/dora", out + "/base.safetensors"};
  const demo::adapter_export qlora{out + "/qlora", out + "/base.safetensors"};
  return {
      {"frozen base", demo::run_frozen},
      {"full FT, AdamW fp32", demo::run_full_adamw},
      {"full FT, AdamW 8-bit", demo::run_full_adamw8},
      {"APOLLO-Mini", demo::run_apollo_mini},
      {demo::adapter_row_name(demo::adapter_kind::lora, cfg),
       [lora](const demo::method_context& c) { return demo::run_lora(c, lora); }},
      {demo::adapter_row_name(demo::adapter_kind::dora, cfg),
       [dora](const demo::method_context& c) { return demo::run_dora(c, dora); }},
      {demo::adapter_row_name(demo::adapter_kind::qlora, cfg),
       [qlora](const demo::method_context& c) { return demo::run_qlora(c, qlora); }},
      {"QAT int4 LSQ", demo::run_qat},
      {"MeZO (LoRA)", demo::run_mezo_lora},
      {"MeZO (full)", demo::run_mezo_full},
  };
}

void save_base(const demo::vit& m, const std::string& path) {
  std::vector<lowmem::io::tensor_to_write> t;
  for (const auto& p : m.params)
    t.push_back({p.name, lowmem::io::dtype::f32,
                 std::vector<std::int64_t>(p.shape.begin(), p.shape.end()), p.value.data()});
  const auto& c = m.cfg;
  lowmem::io::save_safetensors(
      path, t,
      {{"format", "pt"},
       {"model", "vit"},
       {"config", "image=" + std::to_string(c.image) + " patch=" + std::to_string(c.patch) +
                      " width=" + std::to_string(c.width) + " depth=" + std::to_string(c.depth) +
                      " heads=" + std::to_string(c.heads) +
                      " mlp_ratio=" + std::to_string(c.mlp_ratio)}});
}

/// A base saved by save_base (same model configuration): skips pretraining.
demo::vit load_base(const demo::demo_config& cfg, const std::string& path) {
  demo::vit m(cfg.model, cfg.seed);
  m.attention = demo::lowmem_attention();
  const auto f = lowmem::io::safetensors_file::open(path);
  for (auto& p : m.params)
    f.copy_to(p.name, lowmem::io::dtype::f32, p.value.data(), p.value.size());
  m.set_all_trainable(false);
  return m;
}

void write_csv(const std::vector<demo::method_result>& rs, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + path);
  std::fprintf(
      f, "method,trainable_params,param_bytes,grad_bytes,optimizer_state_bytes,"
         "activation_bytes,tracked_training_bytes,peak_rss_kib,start_rss_kib,heap_peak_bytes,steps,"
         "sec_per_step,test_accuracy\n");
  for (const auto& r : rs)
    std::fprintf(f, "\"%s\",%lld,%lld,%lld,%lld,%lld,%lld,%ld,%ld,%lld,%ld,%.6f,%.4f\n",
                 r.name.c_str(), (long long)r.trainable_params, (long long)r.param_bytes,
                 (long long)r.grad_bytes, (long long)r.optimizer_bytes,
                 (long long)r.activation_bytes, (long long)r.tracked_bytes, r.peak_rss_kib,
                 r.start_rss_kib, (long long)r.heap_peak_bytes, long(r.steps), r.sec_per_step,
                 r.accuracy);
  std::fclose(f);
}

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&')
      o += "&amp;";
    else if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else
      o += c;
  }
  return o;
}

/// Hand-written SVG scatter: x = tracked training memory (MiB, linear from 0), y = accuracy (%).
void write_svg(const std::vector<demo::method_result>& rs, const std::string& path,
               const std::string& title) {
  const double W = 900, H = 460, L = 70, R = 380, T = 40, Bm = 50;
  double xmax = 0;
  double ymin = 100, ymax = 0;
  for (const auto& r : rs) {
    xmax = std::max(xmax, mib(r.tracked_bytes));
    ymin = std::min(ymin, 100 * r.accuracy);
    ymax = std::max(ymax, 100 * r.accuracy);
  }
  xmax = xmax > 0 ? xmax * 1.1 : 1;
  ymin = std::max(0.0, std::floor(ymin / 10) * 10 - 5);
  ymax = std::min(100.0, std::ceil(ymax / 10) * 10 + 5);
  const double pw = W - L - R, ph = H - T - Bm;
  auto X = [&](double v) { return L + pw * v / xmax; };
  auto Y = [&](double v) { return T + ph * (1 - (v - ymin) / (ymax - ymin)); };
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + path);
  std::fprintf(f,
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
               "font-family=\"sans-serif\" font-size=\"12\">\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
               "<text x=\"%.0f\" y=\"22\" font-size=\"15\">%s</text>\n",
               W, H, L, xml_escape(title).c_str());
  // axes and grid
  for (int i = 0; i <= 5; ++i) {
    const double xv = xmax * i / 5, yv = ymin + (ymax - ymin) * i / 5;
    std::fprintf(f,
                 "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                 "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.2f</text>\n"
                 "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                 "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.0f</text>\n",
                 X(xv), T, X(xv), T + ph, X(xv), T + ph + 16, xv, L, Y(yv), L + pw, Y(yv), L - 6,
                 Y(yv) + 4, yv);
  }
  std::fprintf(f,
               "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
               "stroke=\"black\"/>\n"
               "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">tracked training memory "
               "(MiB: parameters + gradients + optimizer state + activations)</text>\n"
               "<text transform=\"translate(18 %.1f) rotate(-90)\" text-anchor=\"middle\">test "
               "accuracy on the shifted domain (%%)</text>\n",
               L, T, pw, ph, L + pw / 2, H - 12, T + ph / 2);
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  for (std::size_t i = 0; i < rs.size(); ++i) {
    const auto& r = rs[i];
    const char* col = colors[i % 10];
    std::fprintf(f,
                 "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"6\" fill=\"%s\"><title>%s: %.2f%%, %.3f "
                 "MiB</title></circle>\n"
                 "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"5\" fill=\"%s\"/>\n"
                 "<text x=\"%.1f\" y=\"%.1f\">%s (%.1f%%, %.2f MiB)</text>\n",
                 X(mib(r.tracked_bytes)), Y(100 * r.accuracy), col, xml_escape(r.name).c_str(),
                 100 * r.accuracy, mib(r.tracked_bytes), L + pw + 14, T + 10 + 20.0 * double(i),
                 col, L + pw + 24, T + 14 + 20.0 * double(i), xml_escape(r.name).c_str(),
                 100 * r.accuracy, mib(r.tracked_bytes));
  }
  std::fprintf(f, "</svg>\n");
  std::fclose(f);
}

} // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string out = "demo-output";
  long pre = -1, fine = -1;
  float pre_lr = -1, fine_lr = -1, mezo_lr = -1, lora_lr = -1, apollo_lr = -1;
  int threads = 1;
  long cfg_depth = -1, cfg_batch = -1;
  std::string base_path, only;
  long lora_rank = -1, val = 0, shape_batch = -1;
  bool no_step_memory = false;
  float lora_alpha = -1, lora_plus = -1;
  bool rslora = false, lora_norms = false;
  std::string methods;
  demo::options opts(
      "vit_demo",
      "usage: vit_demo [--quick] [--out DIR] [--pretrain-steps N] "
      "[--finetune-steps N] [--pretrain-lr X] [--finetune-lr X] [--mezo-lr X] [--depth N] "
      "[--batch N] [--threads N] [--base FILE.safetensors (skip pretraining)] "
      "[--methods 'NAME;NAME' (exact row names)] [--lora-lr X] [--apollo-lr X] "
      "[--lora-rank N] [--lora-alpha X] [--rslora] [--lora-plus RATIO] [--lora-norms] "
      "[--shape-batch N (ViT-B/16 memory table, default 1)] [--no-step-memory] [--val N "
      "(tune: train on the first 20K - N shifted images, report accuracy on "
      "the last N instead of the test set)]\n");
  opts.add("--quick", quick)
      .add("--out", out)
      .add("--pretrain-steps", pre)
      .add("--finetune-steps", fine)
      .add("--pretrain-lr", pre_lr)
      .add("--finetune-lr", fine_lr)
      .add("--mezo-lr", mezo_lr)
      .add("--depth", cfg_depth)
      .add("--batch", cfg_batch)
      .add("--lora-lr", lora_lr)
      .add("--apollo-lr", apollo_lr)
      .add("--lora-rank", lora_rank)
      .add("--lora-alpha", lora_alpha)
      .add("--lora-plus", lora_plus)
      .add("--rslora", rslora)
      .add("--lora-norms", lora_norms)
      .add("--shape-batch", shape_batch)
      .add("--no-step-memory", no_step_memory)
      .add("--val", val)
      .add("--base", base_path)
      .add("--methods", methods)
      .add("--threads", threads);
  if (const int rc = opts.parse(argc, argv)) return rc;
  if (!methods.empty()) only = ";" + methods + ";";
  demo::demo_config cfg = quick ? demo::quick_config() : demo::demo_config{};
  if (pre >= 0) cfg.pretrain_steps = pre;
  if (fine >= 0) cfg.finetune_steps = fine;
  if (cfg_depth > 0) cfg.model.depth = cfg_depth;
  if (cfg_batch > 0) cfg.batch = cfg_batch;
  if (pre_lr > 0) cfg.pretrain_lr = pre_lr;
  if (fine_lr > 0) cfg.finetune_lr = fine_lr;
  if (mezo_lr > 0) cfg.mezo_lr = mezo_lr;
  if (lora_lr > 0) cfg.lora_lr = lora_lr;
  if (apollo_lr > 0) cfg.apollo_lr = apollo_lr;
  if (lora_rank > 0) cfg.lora_rank = lora_rank;
  if (lora_alpha > 0) cfg.lora_alpha = lora_alpha;
  if (lora_plus > 0) cfg.lora_plus_ratio = lora_plus;
  if (rslora) cfg.lora_rslora = true;
  if (lora_norms) cfg.lora_train_norms = true;
  if (val < 0 || val >= cfg.finetune_limit) {
    opts.print_usage();
    return 2;
  }
  // One thread by default: the layers are small (M = batch·16 rows, K ≤ 256), so OpenMP gains
  // little and, on a loaded machine, every parallel region waits for a descheduled partner
  // (measured 10× slower with 2 threads at load 9 on 2 cores). --threads N opts in.
  demo::set_threads(threads);
  ::mkdir(out.c_str(), 0755);
  const auto t_start = std::chrono::steady_clock::now();

  try {
    demo::dataset train = demo::load_split("train", std::size_t(cfg.train_limit));
    const demo::dataset test = demo::load_split("t10k", std::size_t(cfg.test_limit));
    const auto& mc = cfg.model;
    std::fprintf(stderr,
                 "vit_demo%s: ViT %ldx%ld patches, width %ld, depth %ld, %ld heads, MLP %ldx; "
                 "%ld train / %ld test images, batch %ld, %d threads\n",
                 quick ? " --quick" : "", long(mc.patch), long(mc.patch), long(mc.width),
                 long(mc.depth), long(mc.heads), long(mc.mlp_ratio), long(train.count),
                 long(test.count), long(cfg.batch), lowmem::max_threads());

    demo::train_stats pst;
    demo::vit base =
        base_path.empty() ? demo::pretrain(cfg, train, &pst) : load_base(cfg, base_path);
    const double acc_clean = demo::evaluate(base, test);
    std::fprintf(stderr, "pretrained in %.1fs (%.1f ms/step): test accuracy %.2f%% (unshifted)\n",
                 pst.seconds, 1e3 * pst.seconds / double(std::max<demo::index_t>(pst.steps, 1)),
                 100 * acc_clean);
    if (base_path.empty()) save_base(base, out + "/base.safetensors");

    // Fine-tuning data: inverted images (the shifted domain); the unshifted set is no longer
    // needed, so free it before the measured runs.
    // --val N (tuning): the last N of the shifted fine-tuning images are held out and take the
    // test set's place, so no choice is made on the test set.
    const demo::dataset ft_train = demo::inverted(train, cfg.finetune_limit - val);
    const demo::dataset ft_test =
        val > 0 ? demo::inverted(train, val, cfg.finetune_limit - val) : demo::inverted(test);
    if (val > 0)
      std::printf("VALIDATION run: accuracies below are on %ld held-out shifted training images "
                  "(images %ld..%ld), not on the test set.\n",
                  val, long(cfg.finetune_limit - val), long(cfg.finetune_limit - 1));
    std::vector<float>().swap(train.images);
    const demo::method_context ctx{base, ft_train, ft_test, cfg};

    std::vector<demo::method_result> results;
    for (const auto& m : method_table(out, cfg)) {
      if (!only.empty() && only.find(";" + m.name + ";") == std::string::npos) continue;
      results.push_back(demo::run_measured(m, ctx));
      const auto& r = results.back();
      std::fprintf(stderr, "%s: accuracy %.2f%%, tracked %.3f MiB\n", r.name.c_str(),
                   100 * r.accuracy, mib(r.tracked_bytes));
    }

    std::printf("\nViT (%lld parameters) pretrained on Fashion-MNIST: %.2f%% test accuracy "
                "(%ld steps x %ld images, %.1fs).\n"
                "Shifted domain: inverted images (1 - x); fine-tuning on %ld shifted training "
                "images, %ld steps x %ld, evaluated on %ld shifted test images.\n\n",
                (long long)base.parameter_count(), 100 * acc_clean, long(pst.steps),
                long(cfg.batch), pst.seconds, long(ft_train.count), long(cfg.finetune_steps),
                long(cfg.batch), long(ft_test.count));
    std::printf("| method | trainable params | optimizer state | tracked training memory "
                "(params + grads + opt + acts) | peak RSS (growth) | time/step | test accuracy |\n"
                "|---|---:|---:|---:|---:|---:|---:|\n");
    for (const auto& r : results)
      std::printf(
          "| %s | %lld | %.3f MiB | %.3f MiB (%.3f + %.3f + %.3f + %.3f) | %.1f MiB (+%.1f) | "
          "%s | %.2f%% |\n",
          r.name.c_str(), (long long)r.trainable_params, mib(r.optimizer_bytes),
          mib(r.tracked_bytes), mib(r.param_bytes), mib(r.grad_bytes), mib(r.optimizer_bytes),
          mib(r.activation_bytes), double(r.peak_rss_kib) / 1024.0,
          double(r.peak_rss_kib - r.start_rss_kib) / 1024.0,
          r.steps ? (std::to_string(int(1e3 * r.sec_per_step + 0.5)) + " ms").c_str() : "-",
          100 * r.accuracy);
    if (!results.empty() && !results.front().rss_reset)
      std::printf("\n(peak RSS could not be reset per method: values are process maxima)\n");
    std::printf("\npeak RSS: getrusage high-water mark during the method (reset before it); growth "
                "= over the resident set at its start (data sets in fp32 and the base model).\n");
    if (!no_step_memory) {
      // The weight-dominated table (vit_memory.hpp): ViT-B/16 (quick: a 12.7M-parameter shape).
      const auto t0 = std::chrono::steady_clock::now();
      const demo::index_t sb = shape_batch > 0 ? shape_batch : 1;
      std::vector<demo::step_memory_result> sm;
      {
        demo::vit big(quick ? demo::weight_dominated_quick_config() : demo::vit_b16_config(),
                      cfg.seed + 5);
        big.attention = demo::lowmem_attention();
        big.set_all_trainable(false);
        std::fprintf(stderr, "step memory: %lld-parameter ViT built, batch %ld\n",
                     (long long)big.parameter_count(), long(sb));
        sm = demo::measure_step_memory(big, sb, cfg);
        demo::print_step_memory(
            sm, big, sb,
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    write_csv(results, out + "/results.csv");
    write_svg(results, out + "/accuracy_vs_memory.svg",
              "Fashion-MNIST ViT, inverted-image domain: accuracy vs training memory");
    const double total =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    std::printf("\nwrote %s/results.csv, %s/accuracy_vs_memory.svg, %s/base.safetensors "
                "(total %.1fs)\n",
                out.c_str(), out.c_str(), out.c_str(), total);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vit_demo: %s\n", e.what());
    return 1;
  }
  return 0;
}
