// lowmem/kernels/zeroth_order.hpp — inner loops of the zeroth-order optimizers
// (lowmem/zeroth_order.hpp): one block of at most a few thousand parameters at a time, with the
// perturbation z of the block already generated into a small L1-resident buffer by the caller.
//
// Every kernel is elementwise: element i's result depends only on element i's inputs, so any
// blocking / chunking / threading of a span gives bitwise identical results. Multiply-adds are
// explicit `simd::fma` (one rounding) so a scalar reference written with std::fma reproduces the
// bits on archs with FMA (AVX2+FMA3, AVX-512). Tails use partial loads/stores (no reads or writes
// past n). No heap allocation.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/random.hpp"
#include "../simd/simd.hpp"
#include "random.hpp"

namespace lowmem::zo {

/// Distribution of the perturbation z.
enum class noise { gaussian, rademacher };

namespace kernels {

/// z[k] = value begin + k of stream s (Gaussian or Rademacher), k < n.
template <class Arch>
inline void fill_z(noise d, const random::stream& s, std::uint64_t begin, float* z, std::size_t n) {
  // the public serial fills (parallel = false): a call inside a lowmem parallel_for chunk
  if (d == noise::gaussian)
    random::fill_normal<Arch>(s, begin, z, n);
  else
    random::fill_rademacher<Arch>(s, begin, z, n);
}

/// Runs f(batch theta, batch z, ...) over [0, n) in registers: `load` gives the lanes of an array
/// at i (partial at the tail). Helper for the kernels below.
template <class Arch, class Body> inline void for_lanes(std::size_t n, Body&& body) {
  constexpr std::size_t W = simd::width<Arch>;
  std::size_t i = 0;
  for (; i + W <= n; i += W) body(i, W);
  if (i < n) body(i, n - i);
}

template <class Arch> inline simd::fbatch<Arch> load(const float* p, std::size_t m) {
  return m == simd::width<Arch> ? simd::fbatch<Arch>::load_unaligned(p)
                                : simd::load_partial<Arch>(p, m);
}
template <class Arch> inline void store(float* p, const simd::fbatch<Arch>& v, std::size_t m) {
  if (m == simd::width<Arch>)
    v.store_unaligned(p);
  else
    simd::store_partial<Arch>(p, v, m);
}

/// x rounded to the nearest bf16 value (ties to even), kept in fp32: the reconstruction of a bf16
/// parameter is rounded back onto the bf16 grid so a restore undoes one bf16 rounding exactly
/// (NaN inputs are not preserved; parameters are finite).
template <class Arch> inline simd::fbatch<Arch> round_bf16(const simd::fbatch<Arch>& x) {
  using U = simd::ubatch<Arch>;
  const U u = simd::as_uint<Arch>(x);
  return simd::as_float<Arch>((u + U(0x7FFFu) + ((u >> 16) & U(1u))) & U(0xFFFF0000u));
}

/// Perturbation move on one block, from offset o to offset o_new along the same z:
///   t = fma(-o, z, θ)            reconstruction of the unperturbed value (θ ≈ θ₀ + o·z)
///   θ ← fma(o_new, z, t)         where |t| < tau (all elements when tau = +inf)
/// Going through t (rather than θ + (o_new − o)·z) makes each restore undo a single rounding,
/// so t == θ₀ except at rounding ties and binade crossings. o = 0 makes t = θ exactly.
template <class Arch>
inline void move(float* theta, const float* z, std::size_t n, float o_new, float o, float tau,
                 bool bf16_grid = false) {
  using F = simd::fbatch<Arch>;
  const F vc(o_new), vno(-o), vtau(tau);
  const bool masked = !std::isinf(tau);
  for_lanes<Arch>(n, [&](std::size_t i, std::size_t m) {
    const F th = load<Arch>(theta + i, m), zz = load<Arch>(z + i, m);
    F t = simd::fma<Arch>(vno, zz, th);
    if (bf16_grid) t = round_bf16<Arch>(t);
    F r = simd::fma<Arch>(vc, zz, t);
    if (masked) r = xsimd::select(xsimd::abs(t) < vtau, r, th);
    store<Arch>(theta + i, r, m);
  });
}

/// Switch from perturbation z_old (θ ≈ θ₀ + o·z_old) to z_new:
///   t = fma(-o, z_old, θ);  θ ← fma(c, z_new, t)  where |t| < tau  (bf16_grid: as in move).
template <class Arch>
inline void switch_move(float* theta, const float* z_old, const float* z_new, std::size_t n,
                        float o, float c, float tau, bool bf16_grid = false) {
  using F = simd::fbatch<Arch>;
  const F vc(c), vno(-o), vtau(tau);
  const bool masked = !std::isinf(tau);
  for_lanes<Arch>(n, [&](std::size_t i, std::size_t m) {
    const F th = load<Arch>(theta + i, m);
    F t = simd::fma<Arch>(vno, load<Arch>(z_old + i, m), th);
    if (bf16_grid) t = round_bf16<Arch>(t);
    F r = simd::fma<Arch>(vc, load<Arch>(z_new + i, m), t);
    if (masked) r = xsimd::select(xsimd::abs(t) < vtau, r, th);
    store<Arch>(theta + i, r, m);
  });
}

/// acc[i] = c·z[i] (first) or fma(c, z[i], acc[i]): the q-SPSA gradient sum Σ_j c_j z_j.
template <class Arch>
inline void accumulate(float* acc, const float* z, std::size_t n, float c, bool first) {
  using F = simd::fbatch<Arch>;
  const F vc(c);
  for_lanes<Arch>(n, [&](std::size_t i, std::size_t m) {
    const F zz = load<Arch>(z + i, m);
    store<Arch>(acc + i, first ? vc * zz : simd::fma<Arch>(vc, zz, load<Arch>(acc + i, m)), m);
  });
}

/// Which update rule the final sweep applies (see zeroth_order.hpp for the math).
enum class rule { sgd, sign, momentum, adam };

/// Scalars of the final sweep.
struct update_scalars {
  float o = 0;           // current offset: θ ≈ θ₀ + o·z_last
  float g = 0;           // projected gradient ĝ (used when the gradient buffer is null: g = ĝ·z)
  float decay = 1;       // a = 1 − η·λ (decoupled weight decay)
  float lr = 0;          // η
  float beta1 = 0;       // momentum / Adam β₁
  float beta2 = 0;       // Adam β₂
  float one_m_beta1 = 0; // 1 − β₁ (Adam); 1 for heavy-ball momentum
  float one_m_beta2 = 0; // 1 − β₂
  float step_size = 0;   // Adam: η / (1 − β₁ᵗ)
  float inv_sqrt_bc2 = 1; // Adam: 1 / sqrt(1 − β₂ᵗ)
  float adam_eps = 1e-8f;
  float tau = INFINITY;    // sparsity threshold
  float lower = -INFINITY; // projection θ ← max(θ, lower) (QZO keeps scales >= 0)
};

/// Final sweep on one block: restore and update, fused.
///   t  = fma(-o, z, θ)                              (≈ θ₀, the restored value)
///   gv = grad ? grad[i] : ĝ·z                       (ZO gradient estimate, element i)
///   sgd:      θ ← fma(a, t, −η·gv)
///   sign:     θ ← fma(a, t, −η·sign(gv))            (sign(0) = 0)
///   momentum: m ← fma(β₁, m, gv);  θ ← fma(a, t, −η·m)
///   adam:     m ← fma(β₁, m, (1−β₁)·gv);  v ← fma(β₂, v, (1−β₂)·gv²)
///             θ ← fma(a, t, −s·m / (sqrt(v)·κ + eps))     s = η/(1−β₁ᵗ), κ = 1/sqrt(1−β₂ᵗ)
///   then θ ← max(θ, lower) (bf16_grid: t rounded as in move). Elements with |t| >= tau keep θ (and
///   their state) unchanged.
template <class Arch, rule R>
inline void update(float* theta, const float* z, const float* grad, float* m1, float* m2,
                   std::size_t n, const update_scalars& s, bool bf16_grid = false) {
  using F = simd::fbatch<Arch>;
  const F vno(-s.o), vg(s.g), va(s.decay), vnlr(-s.lr), vtau(s.tau), vlow(s.lower);
  const bool masked = !std::isinf(s.tau), bounded = !std::isinf(s.lower);
  for_lanes<Arch>(n, [&](std::size_t i, std::size_t m) {
    const F th = load<Arch>(theta + i, m), zz = load<Arch>(z + i, m);
    F t = simd::fma<Arch>(vno, zz, th);
    if (bf16_grid) t = round_bf16<Arch>(t);
    const F gv = grad ? load<Arch>(grad + i, m) : vg * zz;
    F r;
    if constexpr (R == rule::sgd) {
      r = simd::fma<Arch>(va, t, vnlr * gv);
    } else if constexpr (R == rule::sign) {
      const F sg = xsimd::select(gv > F(0.f), F(1.f), xsimd::select(gv < F(0.f), F(-1.f), F(0.f)));
      r = simd::fma<Arch>(va, t, vnlr * sg);
    } else if constexpr (R == rule::momentum) {
      F mm = simd::fma<Arch>(F(s.beta1), load<Arch>(m1 + i, m), F(s.one_m_beta1) * gv);
      r = simd::fma<Arch>(va, t, vnlr * mm);
      if (masked) mm = xsimd::select(xsimd::abs(t) < vtau, mm, load<Arch>(m1 + i, m));
      store<Arch>(m1 + i, mm, m);
    } else {
      const F m_old = load<Arch>(m1 + i, m), v_old = load<Arch>(m2 + i, m);
      F mm = simd::fma<Arch>(F(s.beta1), m_old, F(s.one_m_beta1) * gv);
      F vv = simd::fma<Arch>(F(s.beta2), v_old, F(s.one_m_beta2) * (gv * gv));
      const F den = simd::fma<Arch>(xsimd::sqrt(vv), F(s.inv_sqrt_bc2), F(s.adam_eps));
      r = simd::fma<Arch>(va, t, F(-s.step_size) * (mm / den));
      if (masked) {
        const auto keep = xsimd::abs(t) < vtau;
        mm = xsimd::select(keep, mm, m_old);
        vv = xsimd::select(keep, vv, v_old);
      }
      store<Arch>(m1 + i, mm, m);
      store<Arch>(m2 + i, vv, m);
    }
    if (bounded) r = xsimd::max(r, vlow);
    if (masked) r = xsimd::select(xsimd::abs(t) < vtau, r, th);
    store<Arch>(theta + i, r, m);
  });
}

} // namespace kernels
} // namespace lowmem::zo
