// lowmem/optimizers/fused.hpp — fused element-wise optimizers with fp32, 8-bit or 4-bit state.
//
// Every step reads the parameters, the gradient and the state once and writes parameters and
// state once (fused, xsimd-vectorized), allocates nothing, and validates its input before writing.
//
// Methods and papers:
//  * AdamW / Adam with PyTorch 1.13's update formulas (Loshchilov & Hutter, arXiv:1711.05101),
//    SGD with momentum / dampening / Nesterov (PyTorch semantics), Lion (arXiv:2302.06675).
//  * 8-bit AdamW and Lion: block-wise dynamic quantization of the state (arXiv:2110.02861), the
//    codebook values of bitsandbytes' create_dynamic_map; tensors below 4096 elements keep fp32
//    state (bitsandbytes' min_8bit_size).
//  * 4-bit AdamW (arXiv:2309.01507): m with a signed 4-bit dynamic map in blocks of 128, v with
//    the zero-excluding linear map (as torchao does).
//  * Projected methods (GaLore arXiv:2403.03507, APOLLO arXiv:2412.05270) live in
//    optimizers/projected.hpp.
//
// Conventions: parameters fp32 or bf16 (bf16 written back with stochastic rounding from a caller
// stream, element i of the tensor uses value i of the stream: pass a fresh stream per step, e.g.
// {seed, step}), gradients fp32 (AdamW, fp32 or quantized state: also bf16, widened exactly in
// 64-element stack chunks). Hyper-parameters as PyTorch names them; `step` is the 1-based step
// count t after increment (PyTorch's state['step'] when the update runs). `threads` <= 0 means
// lowmem::max_threads(); results are bitwise identical for every thread count (chunks are aligned
// to 64 elements / 2048-element groups and every element's arithmetic is independent of them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/bf16.hpp"
#include "../core/errors.hpp"
#include "../core/random.hpp"
#include "../core/threading.hpp"
#include "../kernels/optimizers.hpp"
#include "../kernels/optimizers_quant.hpp"
#include "../simd/simd.hpp"

namespace lowmem::optim {

/// torch.optim.AdamW hyper-parameters (PyTorch defaults).
struct adamw_config {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-2;
};
/// torch.optim.Adam hyper-parameters; weight_decay is coupled L2 (g += wd·p).
struct adam_config {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
};
/// torch.optim.SGD hyper-parameters.
struct sgd_config {
  double lr = 1e-3, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false;
};
/// Lion (lucidrains/lion-pytorch defaults).
struct lion_config {
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0;
};

namespace detail {

inline constexpr std::ptrdiff_t unit = 64; // fp32 threading granule (elements)
// parallel_for work of one 64-element unit of a fused fp32 step: per element up to 4 floats read
// (p, g, m, v), 3 written, plus a division and a square root (AdamW); chunks of >= 4096 elements
inline constexpr item_work unit_work{8 * unit};
// a 2048-element group of a quantized-state step: the fp32 step plus decoding and encoding the
// state, ~6 vector instructions per parameter (compute-bound); chunks of >= 2 groups
inline constexpr item_work group_work{8 * std::ptrdiff_t(kernels::group_size)};

inline void check_common(const char* fn, const void* p, const void* g, std::size_t n, double lr) {
  require_data(fn, "param", p, n);
  require_data(fn, "grad", g, n);
  require_non_negative(fn, "lr", lr);
}
inline void check_betas(const char* fn, double b1, double b2) {
  require_in_half_open(fn, "beta1", 0.0, 1.0, b1);
  require_in_half_open(fn, "beta2", 0.0, 1.0, b2);
}
template <class C> inline void check_adam(const char* fn, const C& c, std::int64_t step) {
  check_betas(fn, c.beta1, c.beta2);
  require_non_negative(fn, "eps", c.eps);
  require_non_negative(fn, "weight_decay", c.weight_decay);
  require(step >= 1, fn, "step", ">= 1", step);
}

inline kernels::adam_coeffs adam_coeffs(double lr, double b1, double b2, double eps, double wd,
                                        bool decoupled, std::int64_t step) {
  kernels::adam_coeffs c;
  const double bc1 = 1 - std::pow(b1, double(step)), bc2 = 1 - std::pow(b2, double(step));
  c.decay = decoupled ? float(1 - lr * wd) : 1.0f;
  c.l2 = decoupled ? 0.0f : float(wd);
  c.beta1 = float(b1), c.one_minus_beta1 = float(1 - b1);
  c.beta2 = float(b2), c.one_minus_beta2 = float(1 - b2);
  c.inv_sqrt_bc2 = float(1 / std::sqrt(bc2));
  c.eps = float(eps);
  c.step_size = float(lr / bc1);
  return c;
}

/// Calls span(offset, const float* g_f32, count) over g[0, n): fp32 gradients directly, bf16 ones
/// widened (exactly) into a 64-element stack buffer chunk by chunk. The span kernels are
/// element-wise with chunk-independent results, so bf16 gradients give bit for bit the result of
/// their fp32 widening.
template <class Arch, class G, class Span>
inline void grad_chunks(const G* g, std::size_t n, Span&& span) noexcept {
  if constexpr (std::is_same<G, float>::value) {
    span(std::size_t(0), g, n);
  } else {
    alignas(64) float gf[64];
    for (std::size_t i = 0; i < n; i += 64) {
      const std::size_t k = std::min<std::size_t>(64, n - i);
      to_float<Arch>(g + i, gf, k);
      span(i, static_cast<const float*>(gf), k);
    }
  }
}

template <class Arch, class P, class G>
inline void adam_dispatch(P* p, const G* g, float* m, float* v, std::size_t n,
                          const kernels::adam_coeffs& c, const random::stream* rs, int threads) {
  const std::ptrdiff_t units = std::ptrdiff_t((n + unit - 1) / unit);
  auto run = [&c](float* pp, const G* gg, float* mm, float* vv, std::size_t k) {
    grad_chunks<Arch>(gg, k, [&](std::size_t o, const float* gf, std::size_t kk) {
      if (c.l2 != 0.0f)
        kernels::adam_span<Arch, true>(pp + o, gf, mm + o, vv + o, kk, c);
      else
        kernels::adam_span<Arch, false>(pp + o, gf, mm + o, vv + o, kk, c);
    });
  };
  parallel_for(
      0, units, unit_work,
      [&](std::ptrdiff_t ub, std::ptrdiff_t ue, int) {
        const std::size_t b = std::size_t(ub * unit), e = std::min(n, std::size_t(ue * unit));
        if constexpr (std::is_same<P, float>::value) {
          run(p + b, g + b, m + b, v + b, e - b);
        } else {
          kernels::bf16_params<Arch>(p, b, e, *rs, [&](float* pf, std::size_t i, std::size_t k) {
            run(pf, g + i, m + i, v + i, k);
          });
        }
      },
      threads);
}

template <class Arch, class P, class G>
inline void adamw_fp32(P* param, const G* grad, float* m, float* v, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, const random::stream* rs,
                       int threads) {
  const char* fn = "optim::adamw_step";
  check_common(fn, param, grad, n, cfg.lr);
  require_data(fn, "m", m, n);
  require_data(fn, "v", v, n);
  check_adam(fn, cfg, step);
  const auto c = adam_coeffs(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, true, step);
  adam_dispatch<Arch, P, G>(param, grad, m, v, n, c, rs, threads);
}

} // namespace detail

// ---- fp32 state ---------------------------------------------------------------------------------

/// AdamW (PyTorch 1.13, decoupled weight decay), one fused pass:
///   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
///   p ← p − (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + eps).
/// Shapes: param, grad, m, v are n contiguous floats (m, v zero-initialised before step 1).
/// Memory: no allocation; reads 16 and writes 12 bytes per parameter.
/// Numerics: fp32 with FMA; bias corrections in double, rounded once (matches a double
/// reference of PyTorch's formula to ~1e-7 relative per step).
/// Preconditions (throw lowmem::invalid_argument before any write): lr, eps, weight_decay >= 0,
/// betas in [0, 1), step >= 1, non-null data when n > 0.
template <class Arch = simd::default_arch>
inline void adamw_step(float* param, const float* grad, float* m, float* v, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, int threads = 1) {
  detail::adamw_fp32<Arch>(param, grad, m, v, n, step, cfg, nullptr, threads);
}

/// AdamW with bf16 gradients (mixed-precision backward): each gradient is widened exactly to fp32
/// in 64-element stack chunks, so the result is bit for bit that of the fp32 overload on the
/// widened gradient. Memory: reads 2 bytes of gradient per parameter instead of 4 (26 bytes moved
/// per parameter), no allocation. Shapes, numerics and preconditions as the fp32 overload.
template <class Arch = simd::default_arch>
inline void adamw_step(float* param, const bf16* grad, float* m, float* v, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, int threads = 1) {
  detail::adamw_fp32<Arch>(param, grad, m, v, n, step, cfg, nullptr, threads);
}

/// AdamW on bf16 parameters: the update is computed in fp32 from the bf16 value and written back
/// with stochastic rounding (element i uses value i of `rounding`), so E[p_new] equals the fp32
/// update. Otherwise as the fp32 overload (m, v fp32).
template <class Arch = simd::default_arch>
inline void adamw_step(bf16* param, const float* grad, float* m, float* v, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, const random::stream& rounding,
                       int threads = 1) {
  detail::adamw_fp32<Arch>(param, grad, m, v, n, step, cfg, &rounding, threads);
}

/// AdamW on bf16 parameters with bf16 gradients (gradients widened exactly, as above; parameters
/// written back with stochastic rounding from `rounding`). Otherwise as the fp32 overload.
template <class Arch = simd::default_arch>
inline void adamw_step(bf16* param, const bf16* grad, float* m, float* v, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, const random::stream& rounding,
                       int threads = 1) {
  detail::adamw_fp32<Arch>(param, grad, m, v, n, step, cfg, &rounding, threads);
}

/// Adam (PyTorch 1.13): g ← g + wd·p (coupled L2), then the AdamW moments and update without
/// decoupled decay. Shapes, memory, numerics and preconditions as adamw_step.
template <class Arch = simd::default_arch>
inline void adam_step(float* param, const float* grad, float* m, float* v, std::size_t n,
                      std::int64_t step, const adam_config& cfg, int threads = 1) {
  const char* fn = "optim::adam_step";
  detail::check_common(fn, param, grad, n, cfg.lr);
  require_data(fn, "m", m, n);
  require_data(fn, "v", v, n);
  detail::check_adam(fn, cfg, step);
  const auto c =
      detail::adam_coeffs(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, false, step);
  detail::adam_dispatch<Arch, float>(param, grad, m, v, n, c, nullptr, threads);
}

/// SGD (PyTorch 1.13): d = g + wd·p; with momentum μ > 0: buf = d at step 1, else
/// buf = μ·buf + (1 − dampening)·d; d = nesterov ? d + μ·buf : buf; p ← p − lr·d.
/// Shapes: param, grad, momentum_buffer n floats (the buffer may be null when μ = 0).
/// Memory: no allocation. Preconditions: lr, momentum, weight_decay >= 0, dampening in [0, 1],
/// nesterov requires μ > 0 and dampening = 0 (as PyTorch), step >= 1.
template <class Arch = simd::default_arch>
inline void sgd_step(float* param, const float* grad, float* momentum_buffer, std::size_t n,
                     std::int64_t step, const sgd_config& cfg, int threads = 1) {
  const char* fn = "optim::sgd_step";
  detail::check_common(fn, param, grad, n, cfg.lr);
  require_non_negative(fn, "momentum", cfg.momentum);
  require_in_closed(fn, "dampening", 0.0, 1.0, cfg.dampening);
  require_non_negative(fn, "weight_decay", cfg.weight_decay);
  require(step >= 1, fn, "step", ">= 1", step);
  if (cfg.nesterov)
    require(cfg.momentum > 0 && cfg.dampening == 0, fn, "nesterov",
            "momentum > 0 and dampening == 0", cfg.momentum);
  if (cfg.momentum > 0) require_data(fn, "momentum_buffer", momentum_buffer, n);
  kernels::sgd_coeffs c;
  c.lr = float(cfg.lr), c.momentum = float(cfg.momentum);
  c.one_minus_dampening = float(1 - cfg.dampening), c.weight_decay = float(cfg.weight_decay);
  c.nesterov = cfg.nesterov, c.first = step == 1;
  const std::ptrdiff_t units = std::ptrdiff_t((n + detail::unit - 1) / detail::unit);
  parallel_for(
      0, units, detail::unit_work,
      [&](std::ptrdiff_t ub, std::ptrdiff_t ue, int) {
        const std::size_t b = std::size_t(ub * detail::unit),
                          e = std::min(n, std::size_t(ue * detail::unit));
        kernels::sgd_span<Arch>(param + b, grad + b,
                                momentum_buffer ? momentum_buffer + b : nullptr, e - b, c);
      },
      threads);
}

/// Lion (arXiv:2302.06675): u = sign(β1·m + (1−β1)·g); p ← p·(1 − lr·wd) − lr·u;
/// m ← β2·m + (1−β2)·g. Shapes: param, grad, m n floats. Memory: 4 bytes of state per parameter,
/// no allocation. Preconditions: lr, weight_decay >= 0, betas in [0, 1).
template <class Arch = simd::default_arch>
inline void lion_step(float* param, const float* grad, float* m, std::size_t n,
                      const lion_config& cfg, int threads = 1) {
  const char* fn = "optim::lion_step";
  detail::check_common(fn, param, grad, n, cfg.lr);
  require_data(fn, "m", m, n);
  detail::check_betas(fn, cfg.beta1, cfg.beta2);
  require_non_negative(fn, "weight_decay", cfg.weight_decay);
  kernels::lion_coeffs c;
  c.decay = float(1 - cfg.lr * cfg.weight_decay), c.lr = float(cfg.lr);
  c.beta1 = float(cfg.beta1), c.one_minus_beta1 = float(1 - cfg.beta1);
  c.beta2 = float(cfg.beta2), c.one_minus_beta2 = float(1 - cfg.beta2);
  const std::ptrdiff_t units = std::ptrdiff_t((n + detail::unit - 1) / detail::unit);
  parallel_for(
      0, units, detail::unit_work,
      [&](std::ptrdiff_t ub, std::ptrdiff_t ue, int) {
        const std::size_t b = std::size_t(ub * detail::unit),
                          e = std::min(n, std::size_t(ue * detail::unit));
        kernels::lion_span<Arch>(param + b, grad + b, m + b, e - b, c);
      },
      threads);
}

// ---- quantized state ----------------------------------------------------------------------------

/// Quantized optimizer state of one tensor: 1 moment (Lion: signed m) or 2 (Adam: signed m,
/// unsigned v), 8 or 4 bits (see kernels/optimizers_quant.hpp for codebooks and scales).
/// Tensors with fewer than `min_quantized_size` elements (default 4096, bitsandbytes'
/// min_8bit_size) keep fp32 moments. All storage is allocated here, once, zero-initialised.
/// bytes(): 8-bit Adam 2.0117 bytes/param, 4-bit Adam 1.0195 bytes/param (codes + scales).
class quantized_state {
public:
  quantized_state(std::size_t n, int bits, int moments, std::size_t min_quantized_size = 4096)
      : n_(n), bits_(bits), moments_(moments) {
    const char* fn = "optim::quantized_state";
    require(bits == 8 || bits == 4, fn, "bits", "8 or 4", bits);
    require(moments == 1 || moments == 2, fn, "moments", "1 or 2", moments);
    quantized_ = n >= min_quantized_size;
    for (int k = 0; k < moments; ++k) {
      if (!quantized_) {
        f32_[k].assign(n, 0.0f);
        continue;
      }
      const std::size_t B = bits == 8 ? 256 : 128;
      codes_[k].assign(bits == 8 ? n : (n + 1) / 2, 0);
      bexp_[k].assign((n + B - 1) / B, 255);
      gscale_[k].assign((n + kernels::group_size - 1) / kernels::group_size, 0.0f);
      views_[k].codes = codes_[k].data();
      views_[k].block_exp = bexp_[k].data();
      views_[k].group_scale = gscale_[k].data();
      views_[k].cb =
          k == 0 ? (bits == 8 ? &kernels::signed_dynamic8() : &kernels::signed_dynamic4())
                 : (bits == 8 ? &kernels::unsigned_dynamic8() : &kernels::unsigned_linear4());
    }
  }
  std::size_t size() const noexcept { return n_; }
  int bits() const noexcept { return bits_; }
  int moments() const noexcept { return moments_; }
  bool quantized() const noexcept { return quantized_; }
  /// Bytes held for the state (codes, block bytes, group scales; or fp32 moments).
  std::size_t bytes() const noexcept {
    std::size_t b = 0;
    for (int k = 0; k < moments_; ++k)
      b += f32_[k].size() * 4 + codes_[k].size() + bexp_[k].size() + gscale_[k].size() * 4;
    return b;
  }
  /// Writes moment k (0 = m, 1 = v) dequantized to out[0..n) (checkpoints, tests).
  void dequantize(int k, float* out) const {
    require(k >= 0 && k < moments_, "optim::quantized_state::dequantize", "k",
            "< " + std::to_string(moments_), k);
    if (!quantized_) {
      std::copy(f32_[k].begin(), f32_[k].end(), out);
      return;
    }
    for (std::size_t b = 0; b < n_; b += kernels::group_size) {
      const std::size_t len = std::min(kernels::group_size, n_ - b);
      if (bits_ == 8)
        kernels::dequantize_group<simd::default_arch, 8>(views_[k], b, len, out + b);
      else
        kernels::dequantize_group<simd::default_arch, 4>(views_[k], b, len, out + b);
    }
  }
  kernels::qmoment_view* views() noexcept { return views_; }
  const kernels::qmoment_view& view(int k) const noexcept { return views_[k]; }
  float* fp32(int k) noexcept { return f32_[k].data(); }

private:
  std::size_t n_;
  int bits_, moments_;
  bool quantized_ = false;
  std::vector<float> f32_[2];
  std::vector<std::uint8_t> codes_[2], bexp_[2];
  std::vector<float> gscale_[2];
  kernels::qmoment_view views_[2];
};

namespace detail {

template <class Arch, int Bits, class P, class G, class Span>
inline void quantized_dispatch(P* p, const G* g, quantized_state& s, std::size_t n,
                               const random::stream* rs, int threads, Span&& span_f32) {
  // span_f32 on fp32 gradients; bf16 ones widened chunk by chunk (grad_chunks)
  auto span = [&span_f32](float* pp, const G* gg, float* mm, float* vv, std::size_t k) {
    grad_chunks<Arch>(gg, k, [&](std::size_t o, const float* gf, std::size_t kk) {
      span_f32(pp + o, gf, mm + o, vv ? vv + o : nullptr, kk);
    });
  };
  if (!s.quantized()) {
    // fp32 moments: the same fused span over 64-element units
    const std::ptrdiff_t units = std::ptrdiff_t((n + unit - 1) / unit);
    float* m = s.fp32(0);
    float* v = s.moments() > 1 ? s.fp32(1) : nullptr;
    parallel_for(
        0, units, unit_work,
        [&](std::ptrdiff_t ub, std::ptrdiff_t ue, int) {
          const std::size_t b = std::size_t(ub * unit), e = std::min(n, std::size_t(ue * unit));
          if constexpr (std::is_same<P, float>::value) {
            span(p + b, g + b, m + b, v ? v + b : nullptr, e - b);
          } else {
            kernels::bf16_params<Arch>(p, b, e, *rs, [&](float* pf, std::size_t i, std::size_t k) {
              span(pf, g + i, m + i, v ? v + i : nullptr, k);
            });
          }
        },
        threads);
    return;
  }
  const std::ptrdiff_t groups = std::ptrdiff_t((n + kernels::group_size - 1) / kernels::group_size);
  kernels::qmoment_view* views = s.views();
  const int count = s.moments();
  parallel_for(
      0, groups, group_work,
      [&](std::ptrdiff_t gb, std::ptrdiff_t ge, int) {
        kernels::qmoment_view local[2] = {views[0], views[1]};
        kernels::quantized_groups<Arch, Bits>(
            std::size_t(gb), std::size_t(ge), n, local, count,
            [&](std::size_t b, std::size_t len, float* mb, float* vb) {
              // the next group's parameters and gradient, fetched while this one computes (the
              // steps are mostly in-register compute: this keeps DRAM busy meanwhile)
              if (b + len < n) {
                const std::size_t nl = std::min(kernels::group_size, n - (b + len));
                simd::prefetch_range(p + b + len, nl * sizeof(P));
                simd::prefetch_range(g + b + len, nl * sizeof(G));
              }
              if constexpr (std::is_same<P, float>::value) {
                span(p + b, g + b, mb, vb, len);
              } else {
                kernels::bf16_params<Arch>(p, b, b + len, *rs,
                                           [&](float* pf, std::size_t i, std::size_t k) {
                                             span(pf, g + i, mb + (i - b), vb + (i - b), k);
                                           });
              }
            });
      },
      threads);
}

#if XSIMD_WITH_AVX512F && defined(__AVX512VBMI__)
/// The AVX512-VBMI path of the quantized-state steps on fp32 parameters and gradients: the full
/// groups of each thread's range through full(bits, views, gb, ge) (a two-pass kernel, bit for
/// bit the generic path, returning where the full groups end), the partial last group through the
/// generic kernels::quantized_groups with span(p, g, m, v, len). Returns false (nothing written)
/// when the state is fp32 (small tensors): the caller then takes the generic path.
template <class Arch, class Span, class Full>
inline bool full_groups_step(float* param, const float* grad, quantized_state& state, std::size_t n,
                             int threads, Span& span, Full&& full) {
  if (!state.quantized()) return false;
  const std::ptrdiff_t groups = std::ptrdiff_t((n + kernels::group_size - 1) / kernels::group_size);
  kernels::qmoment_view* views = state.views();
  const int count = state.moments();
  auto run = [&](auto bits) {
    constexpr int Bits = decltype(bits)::value;
    parallel_for(
        0, groups, group_work,
        [&](std::ptrdiff_t gb, std::ptrdiff_t ge, int) {
          kernels::qmoment_view local[2] = {views[0], views[1]};
          const std::size_t rest = full(bits, local, std::size_t(gb), std::size_t(ge));
          kernels::quantized_groups<Arch, Bits>(
              rest, std::size_t(ge), n, local, count,
              [&](std::size_t b, std::size_t len, float* mb, float* vb) {
                span(param + b, grad + b, mb, vb, len);
              });
        },
        threads);
  };
  if (state.bits() == 8)
    run(std::integral_constant<int, 8>{});
  else
    run(std::integral_constant<int, 4>{});
  return true;
}
#endif

template <class Arch, class P, class G>
inline void adamw_quantized(const char* fn, P* param, const G* grad, quantized_state& state,
                            std::size_t n, std::int64_t step, const adamw_config& cfg,
                            const random::stream* rs, int threads) {
  check_common(fn, param, grad, n, cfg.lr);
  require_equal(fn, "state.size", n, state.size());
  require_equal(fn, "state.moments", 2, state.moments());
  check_adam(fn, cfg, step);
  const auto c = adam_coeffs(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, true, step);
  auto span = [&c](float* p, const float* g, float* m, float* v, std::size_t k) {
    kernels::adam_span<Arch, false>(p, g, m, v, k, c);
  };
#if XSIMD_WITH_AVX512F && defined(__AVX512VBMI__)
  if constexpr (std::is_base_of<xsimd::avx512bw, Arch>::value && std::is_same<P, float>::value &&
                std::is_same<G, float>::value) {
    if (full_groups_step<Arch>(
            param, grad, state, n, threads, span,
            [&](auto bits, kernels::qmoment_view* q, std::size_t gb, std::size_t ge) {
              return kernels::adamw_quant_full_groups<decltype(bits)::value>(param, grad, q, gb, ge,
                                                                             n, c);
            }))
      return;
  }
#endif
  if (state.bits() == 8)
    quantized_dispatch<Arch, 8>(param, grad, state, n, rs, threads, span);
  else
    quantized_dispatch<Arch, 4>(param, grad, state, n, rs, threads, span);
}

} // namespace detail

/// 8-bit / 4-bit AdamW (arXiv:2110.02861, arXiv:2309.01507): per 2048-element group, dequantize
/// m and v into L1 stack buffers, run adamw_step's fused update, requantize with fresh block
/// scales (nearest code). `state` = quantized_state(n, 8 or 4, 2). Memory: no allocation; state
/// 2.0117 (8-bit) or 1.0195 (4-bit) bytes/param; fp32 state below 4096 elements.
/// Numerics: the parameter update is exactly adamw_step's on the dequantized state; the stored
/// state carries the codebook's rounding error (≤ half a code gap × block scale).
/// Speed: on AVX512-VBMI runs kernels::adamw_quant_full_groups (two passes per group, bit for
/// bit the generic path); 8-bit ~91 vector instructions per 16 parameters (update + decode 34,
/// encode m 30, encode v 27): compute-bound (issue-bound) at ~1-1.4× the fp32 step, not
/// memory-bound.
/// Preconditions: as adamw_step, plus state.size() == n and state.moments() == 2.
template <class Arch = simd::default_arch>
inline void adamw_step(float* param, const float* grad, quantized_state& state, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, int threads = 1) {
  detail::adamw_quantized<Arch, float>("optim::adamw_step", param, grad, state, n, step, cfg,
                                       nullptr, threads);
}
/// Quantized-state AdamW on bf16 parameters (stochastic rounding from `rounding`).
template <class Arch = simd::default_arch>
inline void adamw_step(bf16* param, const float* grad, quantized_state& state, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, const random::stream& rounding,
                       int threads = 1) {
  detail::adamw_quantized<Arch, bf16>("optim::adamw_step", param, grad, state, n, step, cfg,
                                      &rounding, threads);
}
/// Quantized-state AdamW with bf16 gradients, fp32 parameters: the gradient is widened exactly in
/// 64-element stack chunks (bit for bit the fp32-gradient result on the widened values).
template <class Arch = simd::default_arch>
inline void adamw_step(float* param, const bf16* grad, quantized_state& state, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, int threads = 1) {
  detail::adamw_quantized<Arch, float>("optim::adamw_step", param, grad, state, n, step, cfg,
                                       nullptr, threads);
}
/// Quantized-state AdamW with bf16 gradients and bf16 parameters (stochastic rounding).
template <class Arch = simd::default_arch>
inline void adamw_step(bf16* param, const bf16* grad, quantized_state& state, std::size_t n,
                       std::int64_t step, const adamw_config& cfg, const random::stream& rounding,
                       int threads = 1) {
  detail::adamw_quantized<Arch, bf16>("optim::adamw_step", param, grad, state, n, step, cfg,
                                      &rounding, threads);
}

/// 8-bit / 4-bit Lion: lion_step's update on the dequantized signed-dynamic-map m, requantized.
/// `state` = quantized_state(n, bits, 1). Preconditions as lion_step plus state shape.
/// Speed: on AVX512-VBMI runs kernels::lion_quant_full_groups (the two-pass driver of the
/// quantized AdamW step with Lion's update; bit for bit the generic path).
template <class Arch = simd::default_arch>
inline void lion_step(float* param, const float* grad, quantized_state& state, std::size_t n,
                      const lion_config& cfg, int threads = 1) {
  const char* fn = "optim::lion_step";
  detail::check_common(fn, param, grad, n, cfg.lr);
  require_equal(fn, "state.size", n, state.size());
  require_equal(fn, "state.moments", 1, state.moments());
  detail::check_betas(fn, cfg.beta1, cfg.beta2);
  require_non_negative(fn, "weight_decay", cfg.weight_decay);
  kernels::lion_coeffs c;
  c.decay = float(1 - cfg.lr * cfg.weight_decay), c.lr = float(cfg.lr);
  c.beta1 = float(cfg.beta1), c.one_minus_beta1 = float(1 - cfg.beta1);
  c.beta2 = float(cfg.beta2), c.one_minus_beta2 = float(1 - cfg.beta2);
  auto span = [&c](float* p, const float* g, float* m, float*, std::size_t k) {
    kernels::lion_span<Arch>(p, g, m, k, c);
  };
#if XSIMD_WITH_AVX512F && defined(__AVX512VBMI__)
  if constexpr (std::is_base_of<xsimd::avx512bw, Arch>::value) {
    if (detail::full_groups_step<Arch>(
            param, grad, state, n, threads, span,
            [&](auto bits, kernels::qmoment_view* q, std::size_t gb, std::size_t ge) {
              return kernels::lion_quant_full_groups<decltype(bits)::value>(param, grad, q, gb, ge,
                                                                            n, c);
            }))
      return;
  }
#endif
  if (state.bits() == 8)
    detail::quantized_dispatch<Arch, 8>(param, grad, state, n, nullptr, threads, span);
  else
    detail::quantized_dispatch<Arch, 4>(param, grad, state, n, nullptr, threads, span);
}

} // namespace lowmem::optim
