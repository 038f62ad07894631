// lowmem/kernels/zeroth_order_eggroll.hpp — the dense products behind EGGROLL's batched forward
// and low-rank update (lowmem/zeroth_order.hpp):
//  * gemm_nt_pack + gemm_nt_packed: Y = X·Wᵀ for the whole population (X [P, K], W [O, K], both
//    row-major) as an outer-product micro-kernel without horizontal reductions. X is packed once
//    into column panels (adapters' layout, xt[k·32 + t] = X[p0 + t, k]), 64 rows at a time; W is
//    read in place: a micro-tile of NV·width rows of X × MR rows of W keeps NV·MR accumulators
//    acc[v][c] += xt[k, v-th vector] · broadcast(W[o + c, k]) for k = 0..K-1, in k-blocks of
//    512 (the sums wait in an L1 tile between blocks). W comes from DRAM once, each 512-column
//    piece of MR rows then serves all 64 rows of X from L1; each packed X vector is read once per
//    MR columns (the 64-row panel pair, K·64 floats = 1 MiB at K = 4096, stays in L2).
//  * gemm_nt: dot-product form of the same product for the small per-member terms (x_j·A_j:
//    a few rows, rank columns), a 4×4 register tile of dot products with a horizontal reduce.
//  * add_low_rank: W += B·A (T = population·rank terms): W streamed once, row groups of 12 (6)
//    rows × 2 registers held in registers for all T terms, A packed in column panels (L2).
//
// Numerics: fp32 accumulation. gemm_nt_packed: every Y element is one fma chain (multiply-add
// where the arch has no fma) over k = 0..K-1 in order, starting from 0 — independent of the
// blocking, the tails and the thread split (threads split whole MR-column groups), so 1 thread
// == N threads bitwise. gemm_nt: each sum's
// order is fixed by (k-tile, register lane). No heap allocation.
#pragma once

#include <algorithm>
#include <cstddef>

#include "../simd/simd.hpp"
#include "adapters.hpp"

namespace lowmem::zo::kernels {

inline constexpr std::ptrdiff_t nt_k_tile = 512; // 2 KiB of a row: 4 W rows + 4 X rows in L1

/// Rows of X per packed panel (the adapters' column-panel width, a multiple of every width).
inline constexpr std::ptrdiff_t nt_panel = std::ptrdiff_t(adapters::kernels::panel);
/// Rows of X packed per pass over W: two panels, so a W row segment read from DRAM serves 64
/// rows of X (2·64 flops per 4 bytes of W: compute-bound) and the K·64-float pack stays in L2.
inline constexpr std::ptrdiff_t nt_pack_rows = 2 * nt_panel;

/// Columns of Y (rows of W, broadcast) per micro-tile: 2·MR accumulators + 2 X vectors + 1
/// broadcast fit the register file (32 registers on AVX-512: MR = 12; 16 elsewhere: MR = 6).
template <class Arch> inline constexpr std::ptrdiff_t nt_mr = simd::width<Arch> >= 16 ? 12 : 6;

/// Floats gemm_nt_pack writes for K columns: nt_pack_rows·K.
inline constexpr std::size_t nt_pack_floats(std::size_t K) noexcept {
  return std::size_t(nt_pack_rows) * K;
}

/// Packs rows [0, np) of X (np <= nt_pack_rows; ld ldx) into ceil(np / 32) column panels of K
/// columns: xt[q·K·32 + k·32 + t] = X[32q + t, k], zero for rows >= np. xt: 64-byte aligned.
inline void gemm_nt_pack(const float* x, std::ptrdiff_t ldx, std::ptrdiff_t np, std::ptrdiff_t K,
                         float* xt) noexcept {
  for (std::ptrdiff_t q = 0; q * nt_panel < np; ++q)
    adapters::kernels::rows_to_panel(x + q * nt_panel * ldx, std::size_t(ldx),
                                     std::size_t(std::min(nt_panel, np - q * nt_panel)),
                                     std::size_t(K), xt + q * K * nt_panel);
}

/// k-block of the packed product: the W rows of a column group (MR·nt_k_block floats, 24 KiB at
/// MR = 12) stay in L1 for every row block of x, and W's DRAM traffic is spread over the pass
/// instead of arriving in bursts for the first row block. (128..4096 measured within noise of
/// each other on the shared Xeon, 1 thread: best-of-15 19.2-20.5 ms.)
inline constexpr std::ptrdiff_t nt_k_block = 512;

/// Micro-tile over one k-block: acc[t, c] (+)= Σ_{k<K} xt[k·32 + t]·W[c, k] for t < NV·width,
/// c < MR. acc: the running sums, [MR][NV·width] (64-byte aligned), read unless first; stored
/// back as vectors, so splitting k into blocks keeps each sum one fma chain in k order.
/// xt: a panel offset by a multiple of NV·width rows (aligned); W rows ldw apart.
template <class Arch, int NV, int MR>
inline void gemm_nt_micro(const float* xt, const float* w, std::ptrdiff_t ldw, std::ptrdiff_t K,
                          float* acc_io, bool first) {
  using F = simd::fbatch<Arch>;
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>);
  F acc[NV][MR];
  for (int c = 0; c < MR; ++c)
    for (int v = 0; v < NV; ++v)
      acc[v][c] = first ? F(0.f) : F::load_aligned(acc_io + (c * NV + v) * Wd);
  for (std::ptrdiff_t k = 0; k < K; ++k) {
    F xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = F::load_aligned(xt + k * nt_panel + v * Wd);
    for (int c = 0; c < MR; ++c) {
      const F wb(w[c * ldw + k]);
      for (int v = 0; v < NV; ++v) acc[v][c] = simd::fma<Arch>(xv[v], wb, acc[v][c]);
    }
  }
  for (int c = 0; c < MR; ++c)
    for (int v = 0; v < NV; ++v) acc[v][c].store_aligned(acc_io + (c * NV + v) * Wd);
}

/// MR columns of Y (W rows w[0..MR)) for all np packed rows: per k-block, per panel, blocks of
/// 2·width rows (one width when no more remain); the sums live in an L1 tile between k-blocks
/// and are transposed into Y at the end (acc lane l of vector v is row v·width + l).
template <class Arch, int MR>
inline void gemm_nt_columns(const float* xt, std::ptrdiff_t np, const float* w, std::ptrdiff_t ldw,
                            float* y, std::ptrdiff_t ldy, std::ptrdiff_t K) {
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>);
  alignas(64) float acc[nt_pack_rows * MR]; // row block p: [MR][2·Wd or Wd] at acc + p·MR
  for (std::ptrdiff_t k0 = 0; k0 == 0 || k0 < K; k0 += nt_k_block) {
    const std::ptrdiff_t kn = std::min(nt_k_block, K - k0);
    for (std::ptrdiff_t p = 0; p < np; p += 2 * Wd) {
      // p is a multiple of 2·Wd, which divides the panel width: blocks never straddle panels
      const float* blk = xt + (p / nt_panel) * K * nt_panel + p % nt_panel + k0 * nt_panel;
      if (np - p > Wd)
        gemm_nt_micro<Arch, 2, MR>(blk, w + k0, ldw, kn, acc + p * MR, k0 == 0);
      else
        gemm_nt_micro<Arch, 1, MR>(blk, w + k0, ldw, kn, acc + p * MR, k0 == 0);
    }
  }
  for (std::ptrdiff_t p = 0; p < np; p += 2 * Wd) {
    const std::ptrdiff_t n = std::min(2 * Wd, np - p), len = n > Wd ? 2 * Wd : Wd;
    const float* tile = acc + p * MR;
    for (std::ptrdiff_t t = 0; t < n; ++t)
      for (int c = 0; c < MR; ++c) y[(p + t) * ldy + c] = tile[c * len + t];
  }
}

/// Y[p, o] = Σ_{k<K} X[p, k]·W[o, k] for p < np, o in [o0, o1), X packed by gemm_nt_pack.
/// W: O×K (ld ldw), Y: np×O (ld ldy), row-major. Columns in groups of nt_mr, then 4, then 1.
template <class Arch>
inline void gemm_nt_packed(const float* xt, std::ptrdiff_t np, const float* w, std::ptrdiff_t ldw,
                           float* y, std::ptrdiff_t ldy, std::ptrdiff_t o0, std::ptrdiff_t o1,
                           std::ptrdiff_t K) {
  constexpr std::ptrdiff_t MR = nt_mr<Arch>;
  std::ptrdiff_t o = o0;
  for (; o + MR <= o1; o += MR)
    gemm_nt_columns<Arch, int(MR)>(xt, np, w + o * ldw, ldw, y + o, ldy, K);
  for (; o + 4 <= o1; o += 4) gemm_nt_columns<Arch, 4>(xt, np, w + o * ldw, ldw, y + o, ldy, K);
  for (; o < o1; ++o) gemm_nt_columns<Arch, 1>(xt, np, w + o * ldw, ldw, y + o, ldy, K);
}

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

/// Column-panel width of the packed A of add_low_rank: two registers (32 floats on AVX-512).
template <class Arch>
inline constexpr std::ptrdiff_t lr_panel = 2 * std::ptrdiff_t(simd::width<Arch>);

/// Floats of add_low_rank's packed A for T rows and K columns on any arch: T·roundup(K, 32).
inline constexpr std::size_t lr_pack_floats(std::size_t T, std::size_t K) noexcept {
  return T * ((K + 31) / 32 * 32);
}

/// Index of A[t, k] in the packed A (T rows): panels of lr_panel columns, each T×lr_panel
/// row-major, so a tile's T×lr_panel slice is one contiguous stream; columns past K are zero.
template <class Arch>
inline constexpr std::size_t lr_pack_index(std::size_t t, std::size_t k, std::size_t T) noexcept {
  constexpr std::size_t pw = std::size_t(lr_panel<Arch>);
  return (k / pw) * T * pw + t * pw + k % pw;
}

/// R rows of W += B·A along the whole row: tiles of R rows × lr_panel columns stay in registers
/// for all T terms (acc[r][v] += B[r, t]·A[t, k + v·width]), so W streams through once.
template <class Arch, int R>
inline void add_low_rank_rows(float* w, std::ptrdiff_t ldw, const float* b, std::ptrdiff_t ldb,
                              const float* ap, std::ptrdiff_t K, std::ptrdiff_t T) {
  using F = simd::fbatch<Arch>;
  constexpr std::ptrdiff_t Wd = std::ptrdiff_t(simd::width<Arch>), PW = lr_panel<Arch>;
  for (std::ptrdiff_t k = 0; k < K; k += PW) {
    const std::ptrdiff_t m[2] = {std::clamp<std::ptrdiff_t>(K - k, 0, Wd),
                                 std::clamp<std::ptrdiff_t>(K - k - Wd, 0, Wd)};
    const float* a = ap + k * T; // panel k / PW starts at (k / PW)·T·PW = k·T
    F acc[R][2];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 2; ++v) {
        const float* p = w + r * ldw + k + v * Wd;
        acc[r][v] = m[v] == Wd  ? F::load_unaligned(p)
                    : m[v] == 0 ? F(0.f)
                                : simd::load_partial<Arch>(p, std::size_t(m[v]));
      }
    for (std::ptrdiff_t t = 0; t < T; ++t) {
      const F a0 = F::load_aligned(a + t * PW), a1 = F::load_aligned(a + t * PW + Wd);
      for (int r = 0; r < R; ++r) {
        const F bv(b[r * ldb + t]);
        acc[r][0] = simd::fma<Arch>(bv, a0, acc[r][0]);
        acc[r][1] = simd::fma<Arch>(bv, a1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 2; ++v) {
        float* p = w + r * ldw + k + v * Wd;
        if (m[v] == Wd)
          acc[r][v].store_unaligned(p);
        else if (m[v] > 0)
          simd::store_partial<Arch>(p, acc[r][v], std::size_t(m[v]));
      }
  }
}

/// W[o, :] += Σ_{t<T} B[o, t]·A[t, :] for o in [o0, o1): W O×K (ld ldw), B O×T (ld ldb),
/// row-major; A T×K packed at ap (lr_pack_index, 64-byte aligned). Each element gets the terms
/// in t order, one fma each, starting from W: the blocking (row groups of nt_mr, 4, 1; tiles of
/// lr_panel columns) and the thread split do not change any bit.
template <class Arch>
inline void add_low_rank(float* w, std::ptrdiff_t ldw, const float* b, std::ptrdiff_t ldb,
                         const float* ap, std::ptrdiff_t o0, std::ptrdiff_t o1, std::ptrdiff_t K,
                         std::ptrdiff_t T) {
  constexpr std::ptrdiff_t R = nt_mr<Arch>;
  std::ptrdiff_t o = o0;
  for (; o + R <= o1; o += R)
    add_low_rank_rows<Arch, int(R)>(w + o * ldw, ldw, b + o * ldb, ldb, ap, K, T);
  for (; o + 4 <= o1; o += 4)
    add_low_rank_rows<Arch, 4>(w + o * ldw, ldw, b + o * ldb, ldb, ap, K, T);
  for (; o < o1; ++o) add_low_rank_rows<Arch, 1>(w + o * ldw, ldw, b + o * ldb, ldb, ap, K, T);
}

} // namespace lowmem::zo::kernels
