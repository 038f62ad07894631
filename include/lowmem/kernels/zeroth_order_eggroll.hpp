// lowmem/kernels/zeroth_order_eggroll.hpp — the dense products behind EGGROLL's batched forward
// and low-rank update (lowmem/zeroth_order.hpp): a register-blocked Y = X·Wᵀ ("NT", both
// row-major, dot products along rows) and a multi-axpy W += B·A.
//
// Numerics: fp32 accumulation; each output's sum order is fixed by (k-tile, register lane) and
// does not depend on threads (threads split whole 4-column blocks). No heap allocation.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../simd/simd.hpp"

namespace lowmem::zo::kernels {

inline constexpr std::ptrdiff_t nt_k_tile = 512; // 2 KiB of a row: 4 W rows + 4 X rows in L1

/// Y[p, o] = Σ_{k<K} X[p, k]·W[o, k] + (accumulate ? Y[p, o] : 0), for p < P, o in [o0, o1),
/// o0 a multiple of 4. X: P×K (ld ldx), W: O×K (ld ldw), Y: P×O (ld ldy); row-major.
template <class Arch>
inline void gemm_nt(const float* x, std::ptrdiff_t ldx, const float* w, std::ptrdiff_t ldw,
                    float* y, std::ptrdiff_t ldy, std::ptrdiff_t P, std::ptrdiff_t o0,
                    std::ptrdiff_t o1, std::ptrdiff_t K, bool accumulate) {
  using F = simd::fbatch<Arch>;
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>);
  auto ld = [](const float* p, std::ptrdiff_t m) {
    return m == Wd ? F::load_unaligned(p) : simd::load_partial<Arch>(p, std::size_t(m));
  };
  for (std::ptrdiff_t k0 = 0; k0 < std::max<std::ptrdiff_t>(K, 1); k0 += nt_k_tile) {
    const std::ptrdiff_t kn = std::min(nt_k_tile, K - k0);
    const bool add = accumulate || k0 > 0;
    for (std::ptrdiff_t o = o0; o < o1; o += 4) {
      const std::ptrdiff_t on = std::min<std::ptrdiff_t>(4, o1 - o);
      std::ptrdiff_t p = 0;
      if (on == 4) {
        for (; p + 4 <= P; p += 4) {
          F acc[4][4];
          for (auto& r : acc)
            for (auto& c : r) c = F(0.f);
          for (std::ptrdiff_t k = 0; k < kn; k += Wd) {
            const std::ptrdiff_t m = std::min(Wd, kn - k);
            F xv[4], wv[4];
            for (int i = 0; i < 4; ++i) xv[i] = ld(x + (p + i) * ldx + k0 + k, m);
            for (int i = 0; i < 4; ++i) wv[i] = ld(w + (o + i) * ldw + k0 + k, m);
            for (int i = 0; i < 4; ++i)
              for (int c = 0; c < 4; ++c) acc[i][c] = simd::fma<Arch>(xv[i], wv[c], acc[i][c]);
          }
          for (int i = 0; i < 4; ++i)
            for (int c = 0; c < 4; ++c) {
              float& dst = y[(p + i) * ldy + o + c];
              const float s = simd::reduce_add(acc[i][c]);
              dst = add ? dst + s : s;
            }
        }
      }
      // edges (rows past the last 4-block, or the last < 4 columns): one dot product at a time
      for (std::ptrdiff_t pp = p; pp < P; ++pp)
        for (std::ptrdiff_t c = 0; c < on; ++c) {
          F acc(0.f);
          for (std::ptrdiff_t k = 0; k < kn; k += Wd) {
            const std::ptrdiff_t m = std::min(Wd, kn - k);
            acc = simd::fma<Arch>(ld(x + pp * ldx + k0 + k, m), ld(w + (o + c) * ldw + k0 + k, m),
                                  acc);
          }
          float& dst = y[pp * ldy + o + c];
          const float s = simd::reduce_add(acc);
          dst = add ? dst + s : s;
        }
    }
    if (K == 0) break;
  }
}

/// R rows × a 4-register column chunk [k, k + kn) of W += B·A (kn <= 4·width).
template <class Arch, int R>
inline void add_low_rank_tile(float* w, std::ptrdiff_t ldw, const float* b, std::ptrdiff_t ldb,
                              const float* a, std::ptrdiff_t lda, std::ptrdiff_t k,
                              std::ptrdiff_t kn, std::ptrdiff_t T) {
  using F = simd::fbatch<Arch>;
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>);
  const int V = int((kn + Wd - 1) / Wd);
  auto ld = [&](const float* p, int v) {
    const std::ptrdiff_t m = std::min(Wd, kn - v * Wd);
    return m == Wd ? F::load_unaligned(p + v * Wd)
                   : simd::load_partial<Arch>(p + v * Wd, std::size_t(m));
  };
  F acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = ld(w + r * ldw + k, v);
  for (std::ptrdiff_t t = 0; t < T; ++t) {
    F av[4];
    for (int v = 0; v < V; ++v) av[v] = ld(a + t * lda + k, v);
    for (int r = 0; r < R; ++r) {
      const F bv(b[r * ldb + t]);
      for (int v = 0; v < V; ++v) acc[r][v] = simd::fma<Arch>(bv, av[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const std::ptrdiff_t m = std::min(Wd, kn - v * Wd);
      float* p = w + r * ldw + k + v * Wd;
      if (m == Wd)
        acc[r][v].store_unaligned(p);
      else
        simd::store_partial<Arch>(p, acc[r][v], std::size_t(m));
    }
}

/// W[o, :] += Σ_{t<T} B[o, t]·A[t, :] for o in [o0, o1): W O×K (ld ldw), B O×T (ld ldb),
/// A T×K (ld lda), row-major. Each element gets the terms in t order, one fma each, so the
/// blocking (4 rows × 4 registers; column chunks outer so a T×4·width slice of A stays in L1)
/// does not change any bit.
template <class Arch>
inline void add_low_rank(float* w, std::ptrdiff_t ldw, const float* b, std::ptrdiff_t ldb,
                         const float* a, std::ptrdiff_t lda, std::ptrdiff_t o0, std::ptrdiff_t o1,
                         std::ptrdiff_t K, std::ptrdiff_t T) {
  constexpr std::ptrdiff_t chunk = 4 * std::ptrdiff_t(simd::width<Arch>);
  for (std::ptrdiff_t k = 0; k < K; k += chunk) {
    const std::ptrdiff_t kn = std::min(chunk, K - k);
    std::ptrdiff_t o = o0;
    for (; o + 4 <= o1; o += 4)
      add_low_rank_tile<Arch, 4>(w + o * ldw, ldw, b + o * ldb, ldb, a, lda, k, kn, T);
    for (; o < o1; ++o)
      add_low_rank_tile<Arch, 1>(w + o * ldw, ldw, b + o * ldb, ldb, a, lda, k, kn, T);
  }
}

} // namespace lowmem::zo::kernels
