// lowmem/kernels/optimizers.hpp — fused element-wise optimizer updates (fp32 state), templated on
// the xsimd Arch. No Eigen, no allocation, no checks: the public entries in optimizers.hpp
// validate.
//
// Each `*_span` kernel updates n consecutive elements in one pass over p, g and the state: every
// value is loaded once and stored once. Tails use masked-by-copy partial loads with the same
// vector arithmetic as full registers, so an element's result does not depend on where a chunk
// boundary falls (bitwise identical for any threading split).
//
// bf16 parameters: `bf16_params` converts a 64-element group (aligned on the absolute element
// index) into a stack buffer, runs the fp32 update on it, and writes back with stochastic rounding
// whose 16 random bits for element i are `to_bf16_stochastic(x, s, i)`'s, generated 64 at a time
// with the vectorized Philox of kernels/random.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/bf16.hpp"
#include "../core/random.hpp"
#include "../simd/simd.hpp"
#include "random.hpp"

namespace lowmem::optim::kernels {

/// AdamW / Adam coefficients, precomputed per step in double and rounded once to float.
struct adam_coeffs {
  float decay = 1; // 1 - lr * weight_decay (AdamW), 1 for Adam
  float l2 = 0;    // weight_decay for Adam (g += l2 * p), 0 for AdamW
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.999f, one_minus_beta2 = 0.001f;
  float inv_sqrt_bc2 = 1; // 1 / sqrt(1 - beta2^t)
  float eps = 1e-8f;
  float step_size = 1e-3f; // lr / (1 - beta1^t)
};

struct sgd_coeffs {
  float lr = 1e-3f, momentum = 0, one_minus_dampening = 1, weight_decay = 0;
  bool nesterov = false;
  bool first = false; // first step: the momentum buffer is initialised to the gradient
};

struct lion_coeffs {
  float decay = 1; // 1 - lr * weight_decay
  float lr = 1e-4f;
  float beta1 = 0.9f, one_minus_beta1 = 0.1f;
  float beta2 = 0.99f, one_minus_beta2 = 0.01f;
};

namespace detail {
template <class Arch, bool Partial> inline simd::fbatch<Arch> ld(const float* p, std::size_t n) {
  if constexpr (Partial)
    return simd::load_partial<Arch>(p, n);
  else
    return simd::fbatch<Arch>::load_unaligned(p);
}
template <class Arch, bool Partial>
inline void st(float* p, const simd::fbatch<Arch>& v, std::size_t n) {
  if constexpr (Partial)
    simd::store_partial<Arch>(p, v, n);
  else
    v.store_unaligned(p);
}
} // namespace detail

/// m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2;  p = p·decay − step_size · m /
/// (sqrt(v)·inv_sqrt_bc2 + eps) with g' = g + l2·p (Adam's coupled L2; l2 = 0 for AdamW).
/// PyTorch 1.13's formula.
template <class Arch, bool L2>
inline void adam_span(float* p, const float* g, float* m, float* v, std::size_t n,
                      const adam_coeffs& c) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F decay(c.decay), l2(c.l2), b1(c.beta1), omb1(c.one_minus_beta1), b2(c.beta2),
      omb2(c.one_minus_beta2), isb(c.inv_sqrt_bc2), eps(c.eps), nstep(-c.step_size);
  auto body = [&](std::size_t i, auto partial, std::size_t k) {
    constexpr bool P = decltype(partial)::value;
    F pv = detail::ld<Arch, P>(p + i, k);
    F gv = detail::ld<Arch, P>(g + i, k);
    F mv = detail::ld<Arch, P>(m + i, k);
    F vv = detail::ld<Arch, P>(v + i, k);
    if constexpr (L2) gv = simd::fma<Arch>(l2, pv, gv);
    mv = simd::fma<Arch>(b1, mv, omb1 * gv);
    vv = simd::fma<Arch>(b2, vv, omb2 * (gv * gv));
    const F denom = simd::fma<Arch>(xsimd::sqrt(vv), isb, eps);
    pv = simd::fma<Arch>(nstep, mv / denom, pv * decay);
    detail::st<Arch, P>(p + i, pv, k);
    detail::st<Arch, P>(m + i, mv, k);
    detail::st<Arch, P>(v + i, vv, k);
  };
  std::size_t i = 0;
  for (; i + W <= n; i += W) body(i, std::false_type{}, W);
  if (i < n) body(i, std::true_type{}, n - i);
}

/// PyTorch SGD: d = g + wd·p; buf = first ? d : momentum·buf + (1-dampening)·d;
/// d = nesterov ? d + momentum·buf : buf; p -= lr·d. With momentum 0 `buf` is not touched.
template <class Arch>
inline void sgd_span(float* p, const float* g, float* buf, std::size_t n,
                     const sgd_coeffs& c) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F wd(c.weight_decay), mom(c.momentum), omd(c.one_minus_dampening), nlr(-c.lr);
  const bool use_mom = c.momentum != 0.0f;
  auto body = [&](std::size_t i, auto partial, std::size_t k) {
    constexpr bool P = decltype(partial)::value;
    F pv = detail::ld<Arch, P>(p + i, k);
    F d = simd::fma<Arch>(wd, pv, detail::ld<Arch, P>(g + i, k));
    if (use_mom) {
      F b = c.first ? d : simd::fma<Arch>(mom, detail::ld<Arch, P>(buf + i, k), omd * d);
      detail::st<Arch, P>(buf + i, b, k);
      d = c.nesterov ? simd::fma<Arch>(mom, b, d) : b;
    }
    detail::st<Arch, P>(p + i, simd::fma<Arch>(nlr, d, pv), k);
  };
  std::size_t i = 0;
  for (; i + W <= n; i += W) body(i, std::false_type{}, W);
  if (i < n) body(i, std::true_type{}, n - i);
}

/// Lion: u = sign(b1 m + (1-b1) g); p = p·decay − lr·u; m = b2 m + (1-b2) g (sign(0) = 0).
template <class Arch>
inline void lion_span(float* p, const float* g, float* m, std::size_t n,
                      const lion_coeffs& c) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  const F decay(c.decay), nlr(-c.lr), b1(c.beta1), omb1(c.one_minus_beta1), b2(c.beta2),
      omb2(c.one_minus_beta2), one(1.0f), mone(-1.0f), zero(0.0f);
  auto body = [&](std::size_t i, auto partial, std::size_t k) {
    constexpr bool P = decltype(partial)::value;
    F pv = detail::ld<Arch, P>(p + i, k);
    const F gv = detail::ld<Arch, P>(g + i, k);
    F mv = detail::ld<Arch, P>(m + i, k);
    const F cv = simd::fma<Arch>(b1, mv, omb1 * gv);
    const F u = xsimd::select(cv > zero, one, xsimd::select(cv < zero, mone, zero));
    pv = simd::fma<Arch>(nlr, u, pv * decay);
    mv = simd::fma<Arch>(b2, mv, omb2 * gv);
    detail::st<Arch, P>(p + i, pv, k);
    detail::st<Arch, P>(m + i, mv, k);
  };
  std::size_t i = 0;
  for (; i + W <= n; i += W) body(i, std::false_type{}, W);
  if (i < n) body(i, std::true_type{}, n - i);
}

/// The 64 random words of Philox group g of stream s, in value order (value 64g + j at [j]).
template <class Arch>
inline void group_bits(const random::stream& s, std::uint64_t g, std::uint32_t* out) noexcept {
  constexpr std::size_t W = simd::width<Arch>, R = random::kernels::regs_per_word<Arch>;
  simd::ubatch<Arch> w[4][R];
  random::kernels::philox_group<Arch>(s, g, w);
  for (std::size_t k = 0; k < 4; ++k)
    for (std::size_t r = 0; r < R; ++r) w[k][r].store_unaligned(out + 16 * k + r * W);
}

/// Runs `update(float* p_f32, std::size_t begin, std::size_t count)` on bf16 parameters
/// p[begin, end) converted to fp32 in 64-element stack groups aligned on the element index, and
/// writes them back with stochastic rounding from stream s (value i rounds element i).
template <class Arch, class Update>
inline void bf16_params(bf16* p, std::size_t begin, std::size_t end, const random::stream& s,
                        Update&& update) noexcept {
  alignas(64) float buf[64];
  alignas(64) std::uint32_t bits[64];
  std::size_t i = begin;
  while (i < end) {
    const std::size_t g = i / 64, stop = (g + 1) * 64 < end ? (g + 1) * 64 : end, k = stop - i;
    for (std::size_t j = 0; j < k; ++j) buf[j] = to_float(p[i + j]);
    update(buf, i, k);
    group_bits<Arch>(s, g, bits);
    const std::size_t off = i - 64 * g;
    for (std::size_t j = 0; j < k; ++j) p[i + j] = to_bf16_stochastic(buf[j], bits[off + j] >> 16);
    i = stop;
  }
}

} // namespace lowmem::optim::kernels
