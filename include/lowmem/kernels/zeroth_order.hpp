// lowmem/kernels/zeroth_order.hpp — inner loops of the zeroth-order optimizers
// (lowmem/zeroth_order.hpp). Each elementwise rule is an "op" applied to (element offset, z batch,
// lane count); the *_z kernels generate z themselves and hand it to the op in registers (Gaussian z
// through random::kernels::for_normals: no z buffer is stored and reloaded, and θ is streamed
// while normals are computed, so memory traffic overlaps the generation), the buffer kernels
// (move, switch_move, update) read a z the caller generated into a small L1-resident buffer
// (q-SPSA needs several z at once).
//
// Every kernel is elementwise: element i's result depends only on element i's inputs, so any
// blocking / chunking / threading of a span gives bitwise identical results. Multiply-adds are
// explicit `simd::fma` (one rounding) so a scalar reference written with std::fma reproduces the
// bits on archs with FMA (AVX2+FMA3, AVX-512). Tails use partial loads/stores (no reads or writes
// past n). No heap allocation.
#pragma once

#include <algorithm>
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

/// Perturbation move from offset o to offset o_new along the same z, element i:
///   t = fma(-o, z, θ)            reconstruction of the unperturbed value (θ ≈ θ₀ + o·z)
///   θ ← fma(o_new, z, t)         where |t| < tau (all elements when tau = +inf)
/// Going through t (rather than θ + (o_new − o)·z) makes each restore undo a single rounding,
/// so t == θ₀ except at rounding ties and binade crossings. o = 0 makes t = θ exactly.
/// Masked / bf16 are template flags: the fused loops must not re-test them per register.
template <class Arch, bool Masked, bool Bf16> struct move_op {
  using F = simd::fbatch<Arch>;
  float* theta;
  F vc, vno, vtau;
  move_op(float* th, float o_new, float o, float tau) : theta(th), vc(o_new), vno(-o), vtau(tau) {}
  void operator()(std::size_t i, const F& zz, std::size_t m) const {
    const F th = load<Arch>(theta + i, m);
    F t = simd::fma<Arch>(vno, zz, th);
    if constexpr (Bf16) t = round_bf16<Arch>(t);
    F r = simd::fma<Arch>(vc, zz, t);
    if constexpr (Masked) r = xsimd::select(xsimd::abs(t) < vtau, r, th);
    store<Arch>(theta + i, r, m);
  }
};

template <class Arch> struct move_op_t {
  template <bool Masked, bool Bf16> using op = move_op<Arch, Masked, Bf16>;
};

/// Calls f(op) with Op<Masked, Bf16> built from args, the flags chosen at run time.
template <template <bool, bool> class Op, class Fn, class... Args>
inline void dispatch_op(bool masked, bool bf16, Fn&& f, const Args&... args) {
  if (masked) {
    if (bf16)
      f(Op<true, true>(args...));
    else
      f(Op<true, false>(args...));
  } else {
    if (bf16)
      f(Op<false, true>(args...));
    else
      f(Op<false, false>(args...));
  }
}

/// op(i, z_i, m) over [0, n) with z read from a buffer (partial batch at the tail). The op is
/// taken and captured by value: read through a reference, its members (float vectors a θ store
/// may alias) are reloaded for every register (+32% instructions in a Rademacher step).
template <class Arch, class Op> inline void apply_buffered(const float* z, std::size_t n, Op op) {
  for_lanes<Arch>(n, [op, z](std::size_t i, std::size_t m) { op(i, load<Arch>(z + i, m), m); });
}

/// op(i, z_i, m) over [0, n) with z_i = value begin + i of stream s, generated here. Gaussian: the
/// full normal groups (256 values) go through random::kernels::for_normals, z in registers; a
/// partial group at either end through a 1 KiB stack buffer (same values: the fill API is built
/// on for_normals too). While a group's normals are computed, θ (`prefetch`, non-null, valid for
/// prefetch_n >= n elements) is prefetched one z block (4 KiB) ahead: the words pass
/// touches no memory, and without this the hardware prefetcher stops at each block. Rademacher:
/// blocks of 1024 signs in a stack buffer (the fill is a few integer ops per 32 values).
template <class Arch, class Op>
inline void apply_generated(noise d, const random::stream& s, std::uint64_t begin, std::size_t n,
                            const Op& op, const float* prefetch, std::size_t prefetch_n) {
  using F = simd::fbatch<Arch>;
  constexpr std::size_t V = 256, W = simd::width<Arch>, B = 1024, PF = 1024;
  if (n == 0) return;
  if (d == noise::rademacher) {
    alignas(64) float z[B];
    const Op o = op;
    for (std::size_t b = 0; b < n; b += B) {
      const std::size_t m = n - b < B ? n - b : B;
      random::kernels::fill_signs<Arch>(s, begin + b, z, m);
      apply_buffered<Arch>(z, m,
                           [o, b](std::size_t i, const F& zz, std::size_t w) { o(b + i, zz, w); });
    }
    return;
  }
  alignas(64) float tmp[V];
  auto partial = [&](std::size_t i, std::size_t m) { // elements [i, i + m) within one group
    random::kernels::fill_values<Arch, random::kernels::distribution::normal>(s, begin + i, tmp, m);
    apply_buffered<Arch>(tmp, m, [&](std::size_t k, const simd::fbatch<Arch>& zz, std::size_t w) {
      op(i + k, zz, w);
    });
  };
  std::size_t i = 0;
  if (begin % V != 0) {
    const std::size_t h = std::size_t(V - begin % V);
    partial(0, h < n ? h : n);
    i = h < n ? h : n;
  }
  const std::size_t ng = (n - i) / V;
  if (ng > 0) {
    const std::uint64_t G = (begin + i) / V;
    random::kernels::philox_plan<Arch> P(s, std::uint32_t((48 * G) >> 32));
    // Everything the loop body reads is copied into the lambda by value: members read through a
    // reference (or a float vector in memory, which a θ store may alias) are reloaded for every
    // register, and the copies stay in registers. When the whole range plus the prefetch distance
    // lies inside prefetch_n (every chunk but a span's last), the prefetch address is not clamped:
    // the clamp's cmp + cmov per register ran on the ALU ports the normals need (A/B on a Sapphire
    // Rapids-class core: DRAM-resident move_z faster in 42 of 66 alternating rounds, medians
    // -1..4%); otherwise clamped (no branch).
    const Op o = op;
    const std::size_t i0 = i, last = prefetch_n - 1;
    if (i0 + V * ng + PF <= prefetch_n) {
      const float* pf = prefetch + i0 + PF;
      random::kernels::for_normals<Arch>(P, s, G, ng, [o, i0, pf](std::size_t k, const F& z) {
        if constexpr (PF > 0) __builtin_prefetch(pf + k, 1, 3);
        o(i0 + k, z, W);
      });
    } else {
      random::kernels::for_normals<Arch>(
          P, s, G, ng, [o, i0, last, prefetch](std::size_t k, const F& z) {
            if constexpr (PF > 0) __builtin_prefetch(prefetch + std::min(i0 + k + PF, last), 1, 3);
            o(i0 + k, z, W);
          });
    }
    i += V * ng;
  }
  if (i < n) partial(i, n - i);
}

/// Buffer form of move_op on one block: θ[i] moved from o to o_new along z[i], i < n.
template <class Arch>
inline void move(float* theta, const float* z, std::size_t n, float o_new, float o, float tau,
                 bool bf16_grid = false) {
  dispatch_op<move_op_t<Arch>::template op>(
      !std::isinf(tau), bf16_grid, [&](const auto& op) { apply_buffered<Arch>(z, n, op); }, theta,
      o_new, o, tau);
}

/// Fused form: θ[i] moved from o to o_new along z_i = value begin + i of s (apply_generated).
template <class Arch>
inline void move_z(noise d, const random::stream& s, std::uint64_t begin, float* theta,
                   std::size_t n, float o_new, float o, float tau, bool bf16_grid = false,
                   std::size_t prefetch_n = 0) {
  dispatch_op<move_op_t<Arch>::template op>(
      !std::isinf(tau), bf16_grid,
      [&](const auto& op) {
        apply_generated<Arch>(d, s, begin, n, op, theta, std::max(n, prefetch_n));
      },
      theta, o_new, o, tau);
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

/// Final sweep, element i: restore and update, fused.
///   t  = fma(-o, z, θ)                              (≈ θ₀, the restored value)
///   gv = grad ? grad[i] : ĝ·z                       (ZO gradient estimate, element i)
///   sgd:      θ ← fma(a, t, −η·gv)
///   sign:     θ ← fma(a, t, −η·sign(gv))            (sign(0) = 0)
///   momentum: m ← fma(β₁, m, gv);  θ ← fma(a, t, −η·m)
///   adam:     m ← fma(β₁, m, (1−β₁)·gv);  v ← fma(β₂, v, (1−β₂)·gv²)
///             θ ← fma(a, t, −s·m / (sqrt(v)·κ + eps))     s = η/(1−β₁ᵗ), κ = 1/sqrt(1−β₂ᵗ)
///   then θ ← max(θ, lower) (bf16_grid: t rounded as in move). Elements with |t| >= tau keep θ (and
///   their state) unchanged. theta, grad, m1, m2 point at element 0 of the block.
template <class Arch, rule R, bool Masked, bool Bf16> struct update_op {
  using F = simd::fbatch<Arch>;
  float* theta;
  const float* grad;
  float *m1, *m2;
  update_scalars s;
  F vno, vg, va, vnlr, vtau, vlow;
  bool bounded;
  update_op(float* th, const float* g, float* mm1, float* mm2, const update_scalars& sc)
      : theta(th), grad(g), m1(mm1), m2(mm2), s(sc), vno(-sc.o), vg(sc.g), va(sc.decay),
        vnlr(-sc.lr), vtau(sc.tau), vlow(sc.lower), bounded(!std::isinf(sc.lower)) {}
  void operator()(std::size_t i, const F& zz, std::size_t m) const {
    const F th = load<Arch>(theta + i, m);
    F t = simd::fma<Arch>(vno, zz, th);
    if constexpr (Bf16) t = round_bf16<Arch>(t);
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
      if constexpr (Masked) mm = xsimd::select(xsimd::abs(t) < vtau, mm, load<Arch>(m1 + i, m));
      store<Arch>(m1 + i, mm, m);
    } else {
      const F m_old = load<Arch>(m1 + i, m), v_old = load<Arch>(m2 + i, m);
      F mm = simd::fma<Arch>(F(s.beta1), m_old, F(s.one_m_beta1) * gv);
      F vv = simd::fma<Arch>(F(s.beta2), v_old, F(s.one_m_beta2) * (gv * gv));
      const F den = simd::fma<Arch>(xsimd::sqrt(vv), F(s.inv_sqrt_bc2), F(s.adam_eps));
      r = simd::fma<Arch>(va, t, F(-s.step_size) * (mm / den));
      if constexpr (Masked) {
        const auto keep = xsimd::abs(t) < vtau;
        mm = xsimd::select(keep, mm, m_old);
        vv = xsimd::select(keep, vv, v_old);
      }
      store<Arch>(m1 + i, mm, m);
      store<Arch>(m2 + i, vv, m);
    }
    if (bounded) r = xsimd::max(r, vlow);
    if constexpr (Masked) r = xsimd::select(xsimd::abs(t) < vtau, r, th);
    store<Arch>(theta + i, r, m);
  }
};
template <class Arch, rule R> struct update_op_t {
  template <bool Masked, bool Bf16> using op = update_op<Arch, R, Masked, Bf16>;
};

/// Buffer form of update_op on one block (z[i] given).
template <class Arch, rule R>
inline void update(float* theta, const float* z, const float* grad, float* m1, float* m2,
                   std::size_t n, const update_scalars& s, bool bf16_grid = false) {
  dispatch_op<update_op_t<Arch, R>::template op>(
      !std::isinf(s.tau), bf16_grid, [&](const auto& op) { apply_buffered<Arch>(z, n, op); }, theta,
      grad, m1, m2, s);
}

/// Fused form: z_i = value begin + i of s, generated in registers (apply_generated).
template <class Arch, rule R>
inline void update_z(noise d, const random::stream& st, std::uint64_t begin, float* theta,
                     const float* grad, float* m1, float* m2, std::size_t n,
                     const update_scalars& s, bool bf16_grid = false, std::size_t prefetch_n = 0) {
  dispatch_op<update_op_t<Arch, R>::template op>(
      !std::isinf(s.tau), bf16_grid,
      [&](const auto& op) {
        apply_generated<Arch>(d, st, begin, n, op, theta, std::max(n, prefetch_n));
      },
      theta, grad, m1, m2, s);
}

} // namespace kernels
} // namespace lowmem::zo
