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

/// W[o, :] += Σ_{t<T} B[o, t]·A[t, :] for o in [o0, o1): W O×K (ld ldw), B O×T (ld ldb),
/// A T×K (ld lda), row-major. Sum over t in order, one fma per term.
template <class Arch>
inline void add_low_rank(float* w, std::ptrdiff_t ldw, const float* b, std::ptrdiff_t ldb,
                         const float* a, std::ptrdiff_t lda, std::ptrdiff_t o0, std::ptrdiff_t o1,
                         std::ptrdiff_t K, std::ptrdiff_t T) {
  using F = simd::fbatch<Arch>;
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>);
  for (std::ptrdiff_t o = o0; o < o1; ++o) {
    float* wr = w + o * ldw;
    const float* br = b + o * ldb;
    for (std::ptrdiff_t k = 0; k < K; k += Wd) {
      const std::ptrdiff_t m = std::min(Wd, K - k);
      F acc =
          m == Wd ? F::load_unaligned(wr + k) : simd::load_partial<Arch>(wr + k, std::size_t(m));
      for (std::ptrdiff_t t = 0; t < T; ++t) {
        const float* ar = a + t * lda + k;
        const F av = m == Wd ? F::load_unaligned(ar) : simd::load_partial<Arch>(ar, std::size_t(m));
        acc = simd::fma<Arch>(F(br[t]), av, acc);
      }
      if (m == Wd)
        acc.store_unaligned(wr + k);
      else
        simd::store_partial<Arch>(wr + k, acc, std::size_t(m));
    }
  }
}

} // namespace lowmem::zo::kernels
