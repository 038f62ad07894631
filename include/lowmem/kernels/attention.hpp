// lowmem/kernels/attention.hpp — inner loops of tiled (FlashAttention-2-style) attention.
//
// Everything here works on 64 × 64 tiles held in a small per-thread buffer; the N × N score
// matrix never exists. The one compute primitive is `gemm`: C(m, :) (+)= Σ_p A(m, p) · B(p, :),
// with A read as broadcast scalars through two arbitrary strides (so K, V, Q and dO are read in
// place, transposed or not, with any token/head layout) and B / C as 64-lane rows of a packed
// fp32 buffer. Orientation is chosen so that no tile is ever transposed inside the tile loop:
//
//  * the forward, the single-pass backward and the dQ pass keep *queries in lanes*: Qt = Qᵀ
//    (d × 64) is packed once per query tile; Sᵀ = K·Qt, Oᵀ += Vᵀ·Pᵀ, dQᵀ += Kᵀ·dSᵀ (and, single
//    pass, dK += dSᵀ·Q, dV += Pᵀ·dO into the caller's rows); the online-softmax statistics (m, l)
//    are vectors. Groups of up to 4 query tiles share each K/V tile (read once per 256 queries).
//  * the two-pass dK/dV pass keeps *keys in lanes*: Kt, Vt packed once per key tile; S = Q·Kt,
//    dP = dO·Vt, dVᵀ += dOᵀ·P, dKᵀ += Qᵀ·dS.
//
// Backward schedules: single pass over (segment, kv head) work items (FA-2's flop count), or two
// passes (dK/dV over key tiles, then dQ over query tiles: parallel even for one head, and
// bitwise identical for any thread count, at the price of recomputing S and P twice). In both,
// each gradient element is accumulated by exactly one work item in a fixed order.
// Papers: FlashAttention arXiv:2205.14135, FlashAttention-2 arXiv:2307.08691.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../core/bf16.hpp"
#include "../core/random.hpp"
#include "../core/threading.hpp"
#include "../core/workspace.hpp"
#include "../simd/simd.hpp"
#include "random.hpp"

namespace lowmem::attention_kernels {

using index_t = std::ptrdiff_t;

/// Query tile = key tile = 64 rows: 64 lanes are 4 AVX-512 / 8 AVX2 / 16 SSE registers, and the
/// per-thread buffers (a few × 64·d floats) stay in L2 for d ≤ 256.
inline constexpr index_t tile = 64;
/// Window extents at or above this are "unbounded".
inline constexpr index_t unbounded = std::numeric_limits<index_t>::max() / 4;

inline float load(const float* p) noexcept { return *p; }
inline float load(const bf16* p) noexcept { return to_float(*p); }
inline void store(float* p, float x) noexcept { *p = x; }
inline void store(bf16* p, float x) noexcept { *p = to_bf16(x); }

/// Everything a kernel needs to know about one attention call (raw pointers, element strides;
/// the last (head) dimension is contiguous).
template <class T> struct problem {
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  index_t q_sb = 0, q_sh = 0, q_sn = 0;
  index_t k_sb = 0, k_sh = 0, k_sn = 0;
  index_t v_sb = 0, v_sh = 0, v_sn = 0;
  index_t batch = 0, hq = 0, hkv = 0, nq = 0, nk = 0, d = 0; // nq/nk: per batch, or packed totals
  const std::int32_t *cu_q = nullptr, *cu_k = nullptr;       // varlen offsets (batch == 1)
  index_t nseg = 0;                                          // segments: batch, or num_seqs
  index_t max_nq = 0, max_nk = 0;                            // longest segment
  float scale = 1, softcap = 0;
  const float* alibi = nullptr;
  index_t wl = unbounded, wr = unbounded; // causal is folded into wr = min(wr, 0)
  const float* bias = nullptr;
  index_t bias_sb = 0, bias_sh = 0, bias_si = 0;
  float* dbias = nullptr; // backward accumulates d(bias) here (bias strides; 0 = reduced over)
  float dropout = 0;
  random::stream rng{};
};

struct segment {
  index_t b, q_begin, nq, k_begin, nk;
};

template <class T> inline segment get_segment(const problem<T>& p, index_t s) noexcept {
  if (p.cu_q)
    return {0, index_t(p.cu_q[s]), index_t(p.cu_q[s + 1] - p.cu_q[s]), index_t(p.cu_k[s]),
            index_t(p.cu_k[s + 1] - p.cu_k[s])};
  return {s, 0, p.nq, 0, p.nk};
}

// ---- masks: query i may attend key j iff  -wr <= (i + off) - j <= wl,  off = nk - nq ----------

/// Keys [lo, hi) some query of [i0, i1) may attend.
inline void key_range(index_t i0, index_t i1, index_t off, index_t wl, index_t wr, index_t nk,
                      index_t& lo, index_t& hi) noexcept {
  lo = wl >= unbounded ? 0 : std::max<index_t>(0, i0 + off - wl);
  hi = wr >= unbounded ? nk : std::min<index_t>(nk, i1 - 1 + off + wr + 1);
}
/// Queries [lo, hi) that may attend some key of [j0, j1).
inline void query_range(index_t j0, index_t j1, index_t off, index_t wl, index_t wr, index_t nq,
                        index_t& lo, index_t& hi) noexcept {
  lo = wr >= unbounded ? 0 : std::max<index_t>(0, j0 - off - wr);
  hi = wl >= unbounded ? nq : std::min<index_t>(nq, j1 - 1 - off + wl + 1);
}
/// True when every (i, j) of the tile is allowed (no per-element mask needed).
inline bool tile_full(index_t i0, index_t i1, index_t j0, index_t j1, index_t off, index_t wl,
                      index_t wr) noexcept {
  const bool left = wl >= unbounded || j0 >= (i1 - 1) + off - wl;
  const bool right = wr >= unbounded || (j1 - 1) <= i0 + off + wr;
  return left && right;
}

// ---- the GEMM micro-kernel ---------------------------------------------------------------------

template <class Arch> inline constexpr int nb_regs = simd::width<Arch> >= 16 ? 4 : 2;
inline constexpr int mr_rows = 6;

/// C(m, 0..NB·W) (+)= Σ_p A(m, p) B(p, 0..NB·W) for m < MR; A(m, p) = a[m·sm + p·sp].
/// B rows are aligned; C rows aligned (packed buffers) or not (rows of the caller's gradients).
template <class Arch, int MR, int NB, bool Accumulate, bool AlignedC, class TA>
inline void gemm_block(const TA* a, index_t sm, index_t sp, index_t P, const float* b, index_t ldb,
                       float* c, index_t ldc) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>);
  F acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NB; ++v) {
      if constexpr (!Accumulate)
        acc[m][v] = F(0.f);
      else if constexpr (AlignedC)
        acc[m][v] = F::load_aligned(c + m * ldc + v * W);
      else
        acc[m][v] = F::load_unaligned(c + m * ldc + v * W);
    }
  for (index_t p = 0; p < P; ++p) {
    F bv[NB];
    for (int v = 0; v < NB; ++v) bv[v] = F::load_aligned(b + p * ldb + v * W);
    for (int m = 0; m < MR; ++m) {
      const F av(load(a + m * sm + p * sp));
      for (int v = 0; v < NB; ++v) acc[m][v] = simd::fma<Arch>(av, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NB; ++v) {
      if constexpr (AlignedC)
        acc[m][v].store_aligned(c + m * ldc + v * W);
      else
        acc[m][v].store_unaligned(c + m * ldc + v * W);
    }
}

template <class Arch, int MR, int NB, bool Accumulate, bool AlignedC, class TA>
inline void gemm_tail(index_t rows, const TA* a, index_t sm, index_t sp, index_t P, const float* b,
                      index_t ldb, float* c, index_t ldc) noexcept {
  if constexpr (MR > 0) {
    if (rows == MR)
      return gemm_block<Arch, MR, NB, Accumulate, AlignedC>(a, sm, sp, P, b, ldb, c, ldc);
    gemm_tail<Arch, MR - 1, NB, Accumulate, AlignedC>(rows, a, sm, sp, P, b, ldb, c, ldc);
  }
}

/// C(m, 0..NB·W) for all m < M, in blocks of mr_rows rows.
template <class Arch, int NB, bool Accumulate, bool AlignedC, class TA>
inline void gemm_cols(const TA* a, index_t sm, index_t sp, index_t M, index_t P, const float* b,
                      index_t ldb, float* c, index_t ldc) noexcept {
  index_t m = 0;
  for (; m + mr_rows <= M; m += mr_rows)
    gemm_block<Arch, mr_rows, NB, Accumulate, AlignedC>(a + m * sm, sm, sp, P, b, ldb, c + m * ldc,
                                                        ldc);
  if (m < M)
    gemm_tail<Arch, mr_rows - 1, NB, Accumulate, AlignedC>(M - m, a + m * sm, sm, sp, P, b, ldb,
                                                           c + m * ldc, ldc);
}

/// C (M × 64, ld ldc) (+)= A (M × P, strides sm, sp) · B (P × 64, ld ldb); B, C 64-byte aligned.
template <class Arch, bool Accumulate, class TA>
inline void gemm(const TA* a, index_t sm, index_t sp, index_t M, index_t P, const float* b,
                 index_t ldb, float* c, index_t ldc) noexcept {
  constexpr int NB = nb_regs<Arch>;
  constexpr index_t step = NB * index_t(simd::width<Arch>);
  for (index_t v0 = 0; v0 < tile; v0 += step)
    gemm_cols<Arch, NB, Accumulate, true>(a, sm, sp, M, P, b + v0, ldb, c + v0, ldc);
}

template <class Arch, int NB, class TA>
inline void gemm_rows_rest(index_t vecs, const TA* a, index_t sm, index_t sp, index_t M, index_t P,
                           const float* b, index_t ldb, float* c, index_t ldc) noexcept {
  if constexpr (NB > 0) {
    if (vecs == NB) return gemm_cols<Arch, NB, true, false>(a, sm, sp, M, P, b, ldb, c, ldc);
    gemm_rows_rest<Arch, NB - 1>(vecs, a, sm, sp, M, P, b, ldb, c, ldc);
  }
}

/// C (M × n, unaligned rows, ld ldc) += A (M × P) · B (P × n, aligned rows, ld ldb); n % W == 0.
template <class Arch, class TA>
inline void gemm_acc_rows(const TA* a, index_t sm, index_t sp, index_t M, index_t P, const float* b,
                          index_t ldb, float* c, index_t ldc, index_t n) noexcept {
  constexpr int NB = nb_regs<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>);
  index_t v0 = 0;
  for (; v0 + NB * W <= n; v0 += NB * W)
    gemm_cols<Arch, NB, true, false>(a, sm, sp, M, P, b + v0, ldb, c + v0, ldc);
  if (v0 < n) gemm_rows_rest<Arch, NB - 1>((n - v0) / W, a, sm, sp, M, P, b + v0, ldb, c + v0, ldc);
}

// ---- score transform: z = scale·s (→ softcap) + alibi + bias, masked --------------------------

template <class Arch> struct scorer {
  using F = simd::fbatch<Arch>;
  static constexpr index_t W = index_t(simd::width<Arch>);
  float scale = 1, softcap = 0, inv_softcap = 0, slope = 0;
  bool has_alibi = false;
  float wl = 1e30f, wr = 1e30f;
  const float* bias = nullptr; // bias(i, j) of this (b, h) at the segment origin
  index_t bias_si = 0;
  float dropout = 0, keep_scale = 1;

  /// Scores of lanes [v·W, v·W + W) of one row. rel0 + sign·lane = (i + off) - j for that lane;
  /// lanes >= nvalid are masked; `g` receives dz/ds (scale, times the softcap derivative).
  /// `brow`: bias of this row at lane 0, lane stride `bls` (null: no bias).
  template <bool Grad>
  F score(F raw, index_t v, float rel0, float sign, index_t nvalid, bool masked, const float* brow,
          index_t bls, F& g) const noexcept {
    alignas(64) static constexpr float iota_[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                                                    8, 9, 10, 11, 12, 13, 14, 15};
    F z = raw * F(scale);
    if (softcap > 0) {
      const F t = simd::tanh<Arch>(z * F(inv_softcap));
      z = t * F(softcap);
      if constexpr (Grad) g = F(scale) * (F(1.f) - t * t);
    } else if constexpr (Grad) {
      g = F(scale);
    }
    const F lane = F(float(v * W)) + F::load_aligned(iota_);
    const F rel = F(rel0) + F(sign) * lane;
    if (has_alibi) z = z - F(slope) * xsimd::abs(rel);
    if (brow) {
      alignas(64) float tmp[16] = {};
      const index_t c0 = v * W;
      for (index_t l = 0; l < W && c0 + l < nvalid; ++l) tmp[l] = brow[(c0 + l) * bls];
      z = z + F::load_aligned(tmp);
    }
    if (masked) {
      const auto ok = (rel <= F(wl)) & (rel >= F(-wr)) & (lane < F(float(nvalid)));
      z = xsimd::select(ok, z, F(-std::numeric_limits<float>::infinity()));
    }
    return z;
  }
  /// Dropout factor of uniform draws u: 1/(1-p) where u >= p, else 0.
  F drop_factor(F u) const noexcept {
    return xsimd::select(u >= F(dropout), F(keep_scale), F(0.f));
  }
};

template <class Arch, class T> inline scorer<Arch> make_scorer(const problem<T>& p, index_t h) {
  scorer<Arch> s;
  s.scale = p.scale;
  s.softcap = p.softcap;
  s.inv_softcap = p.softcap > 0 ? 1.f / p.softcap : 0.f;
  s.has_alibi = p.alibi != nullptr;
  s.slope = p.alibi ? p.alibi[h] : 0.f;
  s.wl = p.wl >= unbounded ? 1e30f : float(p.wl);
  s.wr = p.wr >= unbounded ? 1e30f : float(p.wr);
  s.dropout = p.dropout;
  s.keep_scale = p.dropout > 0 ? 1.f / (1.f - p.dropout) : 1.f;
  return s;
}

/// Dropout mask index of (b, h, global query gi, global key gj): queries are the fastest index,
/// so a row of keys-major tile draws is one contiguous range of the stream.
template <class T>
inline std::uint64_t drop_index(const problem<T>& p, index_t b, index_t h, index_t gi,
                                index_t gj) noexcept {
  return (std::uint64_t(b * p.hq + h) * std::uint64_t(p.nk) + std::uint64_t(gj)) *
             std::uint64_t(p.nq) +
         std::uint64_t(gi);
}

/// Packs rows [0, rows) of a (row stride sn, contiguous d) into Xt (d × 64), zero lanes >= rows.
template <class T>
inline void pack_transposed(const T* x, index_t sn, index_t rows, index_t d, float* xt) noexcept {
  for (index_t k = 0; k < d; ++k)
    for (index_t c = rows; c < tile; ++c) xt[k * tile + c] = 0.f;
  for (index_t c = 0; c < rows; ++c) {
    const T* row = x + c * sn;
    for (index_t k = 0; k < d; ++k) xt[k * tile + c] = load(row + k);
  }
}

/// Packs rows [0, rows) of x (row stride sn) into X (rows × d, ld d) as fp32.
template <class T>
inline void pack_rows(const T* x, index_t sn, index_t rows, index_t d, float* out) noexcept {
  for (index_t c = 0; c < rows; ++c)
    for (index_t k = 0; k < d; ++k) out[c * d + k] = load(x + c * sn + k);
}

// ---- workspace ---------------------------------------------------------------------------------

/// Most query tiles in a group (see q_group).
inline constexpr index_t max_group = 4;

/// Query tiles processed together against each key tile: K and V tiles are then read from
/// memory once per group (not once per query tile), which keeps long sequences compute-bound.
/// 4 tiles (256 queries) at d <= 64, fewer for larger d so the group's state stays ~128 KiB.
inline index_t q_group(index_t d) noexcept {
  return std::max<index_t>(1, std::min<index_t>(max_group, 256 / std::max<index_t>(d, 1)));
}

struct buffers {
  float *a, *b, *acc1, *acc2; // d × 64 each: packed K, V and dK, dV of the key-tile pass
  float *s, *dp;              // 64 × 64 score tiles
  float *drop_row, *dz_row;   // 64-vectors
  float* drop_tile;           // 64 × 64
  float* grp;                 // q_group(d) slots of per-query-tile state (see slot)
};

/// Per-query-tile state of a group: packed Qᵀ and dOᵀ (d × 64), Q and dO rows (64 × d, single
/// pass only), an accumulator (Oᵀ or dQᵀ, d × 64) and two 64-vectors (m, l or D, L).
struct slot {
  float *qt, *dot, *qp, *dop, *acc, *v1, *v2;
};
inline index_t slot_floats(index_t d) noexcept { return 5 * d * tile + 2 * tile; }
inline slot get_slot(const buffers& w, index_t g, index_t d) noexcept {
  const index_t dt = d * tile;
  float* b = w.grp + g * slot_floats(d);
  return {b, b + dt, b + 2 * dt, b + 3 * dt, b + 4 * dt, b + 5 * dt, b + 5 * dt + tile};
}

template <class WS> inline buffers carve(WS& ws, index_t d) {
  buffers b{};
  const std::size_t dt = std::size_t(d * tile), tt = std::size_t(tile * tile);
  b.a = ws.template take<float>(dt);
  b.b = ws.template take<float>(dt);
  b.acc1 = ws.template take<float>(dt);
  b.acc2 = ws.template take<float>(dt);
  b.s = ws.template take<float>(tt);
  b.dp = ws.template take<float>(tt);
  b.drop_row = ws.template take<float>(tile);
  b.dz_row = ws.template take<float>(tile);
  b.drop_tile = ws.template take<float>(tt);
  b.grp = ws.template take<float>(std::size_t(q_group(d) * slot_floats(d)));
  return b;
}

/// Bytes of one thread's buffers for head dimension d.
inline std::size_t thread_bytes(index_t d) {
  workspace_planner p;
  carve(p, d);
  return detail::align_up(p.bytes(), workspace_alignment);
}

// ---- tile-loop scaffolding shared by the forward and both backward passes --------------------

/// Row n of head h of batch b of a strided [B, H, N, d] tensor.
template <class X>
inline X* row_at(X* base, index_t sb, index_t sh, index_t sn, index_t b, index_t h,
                 index_t n) noexcept {
  return base + b * sb + h * sh + n * sn;
}
/// Offset of bias(b, h, packed query gi, packed key gj).
template <class T>
inline index_t bias_offset(const problem<T>& p, index_t b, index_t h, index_t gi,
                           index_t gj) noexcept {
  return b * p.bias_sb + h * p.bias_sh + gi * p.bias_si + gj;
}
/// True when the (queries [i0, i1)) × (keys [j0, j1)) tile needs the per-element mask: some
/// pair is outside the window, or the lane dimension (`lanes` valid of 64) has padding.
inline bool needs_mask(index_t lanes, index_t i0, index_t i1, index_t j0, index_t j1, index_t off,
                       index_t wl, index_t wr) noexcept {
  return lanes < tile || !tile_full(i0, i1, j0, j1, off, wl, wr);
}
/// Dropout uniforms of queries [i, i + n) for key j (segment-relative), into out[0, n).
template <class Arch, class T>
inline void dropout_draws(const problem<T>& p, const segment& sg, index_t h, index_t i, index_t j,
                          index_t n, float* out) noexcept {
  random::kernels::fill<Arch, random::kernels::distribution::uniform>(
      p.rng, drop_index(p, sg.b, h, sg.q_begin + i, sg.k_begin + j), out, std::size_t(n));
}
/// dst rows [0, rows) (row stride sn) += the transposed lanes of t (d × 64).
inline void add_transposed(const float* t, index_t rows, index_t d, float* dst,
                           index_t sn) noexcept {
  for (index_t c = 0; c < rows; ++c)
    for (index_t k = 0; k < d; ++k) dst[c * sn + k] += t[k * tile + c];
}

/// A group of up to q_group(d) consecutive query tiles [ibeg, ibeg + 64·ng) of one segment: the
/// keys [lo, hi) each tile may see and the union [begin, end) on the 64-aligned key grid, so one
/// pass over key tiles serves every tile of the group.
struct tile_group {
  index_t ibeg = 0, ng = 0, nq = 0, begin = 0, end = 0;
  index_t lo[max_group] = {}, hi[max_group] = {};

  tile_group(index_t ibeg_, index_t G, const segment& sg, index_t wl, index_t wr) noexcept
      : ibeg(ibeg_), ng(std::min(G, (sg.nq - ibeg_ + tile - 1) / tile)), nq(sg.nq), begin(sg.nk) {
    for (index_t g = 0; g < ng; ++g) {
      key_range(i0(g), i0(g) + rows(g), sg.nk - sg.nq, wl, wr, sg.nk, lo[g], hi[g]);
      if (lo[g] < hi[g]) {
        begin = std::min(begin, lo[g] / tile * tile);
        end = std::max(end, hi[g]);
      }
    }
  }
  index_t i0(index_t g) const noexcept { return ibeg + g * tile; }
  index_t rows(index_t g) const noexcept { return std::min(tile, nq - i0(g)); }
  /// Whether tile g sees some key of [j0, j0 + nc).
  bool sees(index_t g, index_t j0, index_t nc) const noexcept {
    return j0 + nc > lo[g] && j0 < hi[g];
  }
};

// ---- forward -----------------------------------------------------------------------------------

template <class T> struct fwd_out {
  T* o;
  index_t o_sb, o_sh, o_sn;
  float* lse;
};

/// A group of up to q_group(d) query tiles of one head of one segment: online softmax over the
/// key tiles each may see; key tiles on the 64-aligned grid are shared by the group's tiles.
/// Slot use: qt = Qᵀ, acc = Oᵀ, v1 = running max m, v2 = running sum l.
template <class Arch, class T>
void forward_group(const problem<T>& p, const fwd_out<T>& out, index_t s, index_t h, index_t tg,
                   const buffers& w) {
  using F = simd::fbatch<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>), NV = tile / W;
  const segment sg = get_segment(p, s);
  const index_t d = p.d, G = q_group(d);
  if (tg * G * tile >= sg.nq) return;
  const tile_group grp(tg * G * tile, G, sg, p.wl, p.wr);
  const index_t hk = h / (p.hq / p.hkv), off = sg.nk - sg.nq;
  const T* qb = row_at(p.q, p.q_sb, p.q_sh, p.q_sn, sg.b, h, sg.q_begin);
  const T* kb = row_at(p.k, p.k_sb, p.k_sh, p.k_sn, sg.b, hk, sg.k_begin);
  const T* vb = row_at(p.v, p.v_sb, p.v_sh, p.v_sn, sg.b, hk, sg.k_begin);
  const scorer<Arch> sc = make_scorer<Arch>(p, h);
  const F ninf(-std::numeric_limits<float>::infinity());
  float* S = w.s;
  std::fill(w.drop_row, w.drop_row + tile, 0.f);

  for (index_t g = 0; g < grp.ng; ++g) {
    const slot t = get_slot(w, g, d);
    pack_transposed(qb + grp.i0(g) * p.q_sn, p.q_sn, grp.rows(g), d, t.qt);
    std::fill(t.acc, t.acc + d * tile, 0.f);
    std::fill(t.v1, t.v1 + tile, -std::numeric_limits<float>::infinity());
    std::fill(t.v2, t.v2 + tile, 0.f);
  }
  for (index_t j0 = grp.begin; j0 < grp.end; j0 += tile) {
    const index_t nc = std::min(tile, sg.nk - j0);
    for (index_t g = 0; g < grp.ng; ++g) {
      if (!grp.sees(g, j0, nc)) continue;
      const index_t i0 = grp.i0(g), nrows = grp.rows(g);
      const slot t = get_slot(w, g, d);
      const float* bias0 =
          p.bias ? p.bias + bias_offset(p, sg.b, h, sg.q_begin + i0, sg.k_begin) : nullptr;
      const bool masked = needs_mask(nrows, i0, i0 + nrows, j0, j0 + nc, off, p.wl, p.wr);
      gemm<Arch, false>(kb + j0 * p.k_sn, p.k_sn, 1, nc, d, t.qt, tile, S, tile); // Sᵀ: keys
      F tmax[NV];
      for (index_t v = 0; v < NV; ++v) tmax[v] = ninf;
      F gdummy;
      for (index_t r = 0; r < nc; ++r) {
        const index_t j = j0 + r;
        const float* brow = bias0 ? bias0 + j : nullptr;
        float* row = S + r * tile;
        for (index_t v = 0; v < NV; ++v) {
          const F z = sc.template score<false>(F::load_aligned(row + v * W), v, float(i0 + off - j),
                                               1.f, nrows, masked, brow, p.bias_si, gdummy);
          z.store_aligned(row + v * W);
          tmax[v] = xsimd::max(tmax[v], z);
        }
      }
      F mu[NV], alpha[NV], rs[NV];
      for (index_t v = 0; v < NV; ++v) {
        const F mold = F::load_aligned(t.v1 + v * W);
        const F mnew = xsimd::max(mold, tmax[v]);
        mu[v] = xsimd::select(mnew == ninf, F(0.f), mnew);
        alpha[v] = simd::exp<Arch>(mold - mu[v]);
        mnew.store_aligned(t.v1 + v * W);
        rs[v] = F(0.f);
      }
      for (index_t r = 0; r < nc; ++r) {
        float* row = S + r * tile;
        if (p.dropout > 0) dropout_draws<Arch>(p, sg, h, i0, j0 + r, nrows, w.drop_row);
        for (index_t v = 0; v < NV; ++v) {
          F P = simd::exp<Arch>(F::load_aligned(row + v * W) - mu[v]);
          rs[v] = rs[v] + P;
          if (p.dropout > 0) P = P * sc.drop_factor(F::load_aligned(w.drop_row + v * W));
          P.store_aligned(row + v * W);
        }
      }
      for (index_t v = 0; v < NV; ++v)
        (alpha[v] * F::load_aligned(t.v2 + v * W) + rs[v]).store_aligned(t.v2 + v * W);
      for (index_t k = 0; k < d; ++k)
        for (index_t v = 0; v < NV; ++v)
          (F::load_aligned(t.acc + k * tile + v * W) * alpha[v])
              .store_aligned(t.acc + k * tile + v * W);
      gemm<Arch, true>(vb + j0 * p.v_sn, 1, p.v_sn, d, nc, S, tile, t.acc, tile); // Oᵀ += Vᵀ Pᵀ
    }
  }
  for (index_t g = 0; g < grp.ng; ++g) {
    const index_t i0 = grp.i0(g);
    const slot t = get_slot(w, g, d);
    T* ob = row_at(out.o, out.o_sb, out.o_sh, out.o_sn, sg.b, h, sg.q_begin + i0);
    float* lse = out.lse + (sg.b * p.hq + h) * p.nq + sg.q_begin + i0;
    for (index_t c = 0; c < grp.rows(g); ++c) {
      const float l = t.v2[c];
      const float inv = l > 0 ? 1.f / l : 0.f;
      for (index_t k = 0; k < d; ++k) store(ob + c * out.o_sn + k, t.acc[k * tile + c] * inv);
      lse[c] = l > 0 ? t.v1[c] + std::log(l) : -std::numeric_limits<float>::infinity();
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

template <class T> struct bwd_io {
  const T* o;
  index_t o_sb, o_sh, o_sn;
  const T* dout;
  index_t do_sb, do_sh, do_sn;
  const float* lse;
  float* dq;
  index_t dq_sb, dq_sh, dq_sn;
  float* dk;
  index_t dk_sb, dk_sh, dk_sn;
  float* dv;
  index_t dv_sb, dv_sh, dv_sn;
};

/// D_i = Σ_k dO_ik O_ik (fp32; SIMD for fp32 rows, the order is fixed so results are
/// reproducible).
template <class Arch, class T> inline float row_dot(const T* a, const T* b, index_t d) noexcept {
  index_t k = 0;
  float s = 0;
  if constexpr (std::is_same<T, float>::value) {
    using F = simd::fbatch<Arch>;
    constexpr index_t W = index_t(simd::width<Arch>);
    if (d >= W) {
      F acc(0.f);
      for (; k + W <= d; k += W)
        acc = simd::fma<Arch>(F::load_unaligned(a + k), F::load_unaligned(b + k), acc);
      s = simd::reduce_add(acc);
    }
  }
  for (; k < d; ++k) s += load(a + k) * load(b + k);
  return s;
}
/// log-sum-exp with fully masked rows (-inf) mapped to +inf, so exp(z - L) = 0 there.
inline float safe_lse(float l) noexcept {
  return l == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::infinity() : l;
}

/// y[0, n) += x[0, n) (x aligned, y not; n <= tile).
template <class Arch> inline void add_row(const float* x, float* y, index_t n) noexcept {
  using F = simd::fbatch<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>);
  index_t c = 0;
  for (; c + W <= n; c += W)
    (F::load_unaligned(y + c) + F::load_aligned(x + c)).store_unaligned(y + c);
  for (; c < n; ++c) y[c] += x[c];
}

/// dK, dV (and d(bias)) of one key tile of one KV head: loops over the query heads of its group
/// and the query tiles that may attend it (keys in lanes).
template <class Arch, class T>
void backward_kv_tile(const problem<T>& p, const bwd_io<T>& io, index_t s, index_t hk, index_t t,
                      const buffers& w) {
  using F = simd::fbatch<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>), NV = tile / W;
  const segment sg = get_segment(p, s);
  const index_t j0 = t * tile;
  if (j0 >= sg.nk) return;
  const index_t ncols = std::min(tile, sg.nk - j0), d = p.d, off = sg.nk - sg.nq;
  const index_t group = p.hq / p.hkv;
  float *kt = w.a, *vt = w.b, *dkt = w.acc1, *dvt = w.acc2, *S = w.s, *dP = w.dp;
  pack_transposed(row_at(p.k, p.k_sb, p.k_sh, p.k_sn, sg.b, hk, sg.k_begin + j0), p.k_sn, ncols, d,
                  kt);
  pack_transposed(row_at(p.v, p.v_sb, p.v_sh, p.v_sn, sg.b, hk, sg.k_begin + j0), p.v_sn, ncols, d,
                  vt);
  std::fill(dkt, dkt + d * tile, 0.f);
  std::fill(dvt, dvt + d * tile, 0.f);
  if (p.dropout > 0) std::fill(w.drop_tile, w.drop_tile + tile * tile, 0.f);
  index_t ilo, ihi;
  query_range(j0, j0 + ncols, off, p.wl, p.wr, sg.nq, ilo, ihi);
  for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
    const scorer<Arch> sc = make_scorer<Arch>(p, h);
    const T* qh = row_at(p.q, p.q_sb, p.q_sh, p.q_sn, sg.b, h, sg.q_begin);
    const T* oh = row_at(io.o, io.o_sb, io.o_sh, io.o_sn, sg.b, h, sg.q_begin);
    const T* doh = row_at(io.dout, io.do_sb, io.do_sh, io.do_sn, sg.b, h, sg.q_begin);
    const float* lh = io.lse + (sg.b * p.hq + h) * p.nq + sg.q_begin;
    const index_t boff = bias_offset(p, sg.b, h, sg.q_begin, sg.k_begin + j0);
    const float* bias0 = p.bias ? p.bias + boff : nullptr;
    float* dbias0 = p.dbias ? p.dbias + boff : nullptr;
    for (index_t i0 = ilo; i0 < ihi; i0 += tile) {
      const index_t nr = std::min(tile, ihi - i0);
      const bool masked = needs_mask(ncols, i0, i0 + nr, j0, j0 + ncols, off, p.wl, p.wr);
      gemm<Arch, false>(qh + i0 * p.q_sn, p.q_sn, 1, nr, d, kt, tile, S, tile);
      gemm<Arch, false>(doh + i0 * io.do_sn, io.do_sn, 1, nr, d, vt, tile, dP, tile);
      if (p.dropout > 0)
        for (index_t c = 0; c < ncols; ++c)
          dropout_draws<Arch>(p, sg, h, i0, j0 + c, nr, w.drop_tile + c * tile);
      for (index_t r = 0; r < nr; ++r) {
        const index_t i = i0 + r;
        const float Di = row_dot<Arch>(doh + i * io.do_sn, oh + i * io.o_sn, d);
        const F L(safe_lse(lh[i]));
        const float* brow = bias0 ? bias0 + i * p.bias_si : nullptr;
        if (p.dropout > 0)
          for (index_t c = 0; c < tile; ++c) w.drop_row[c] = w.drop_tile[c * tile + r];
        float *srow = S + r * tile, *dprow = dP + r * tile;
        for (index_t v = 0; v < NV; ++v) {
          F g;
          const F z = sc.template score<true>(F::load_aligned(srow + v * W), v, float(i + off - j0),
                                              -1.f, ncols, masked, brow, 1, g);
          const F P = simd::exp<Arch>(z - L);
          F dpd = F::load_aligned(dprow + v * W), Pd = P;
          if (p.dropout > 0) {
            const F f = sc.drop_factor(F::load_aligned(w.drop_row + v * W));
            Pd = P * f;
            dpd = dpd * f;
          }
          Pd.store_aligned(srow + v * W);
          const F dz = P * (dpd - F(Di)); // ∂loss/∂z_ij = ∂loss/∂bias_ij
          (dz * g).store_aligned(dprow + v * W);
          if (dbias0) dz.store_aligned(w.dz_row + v * W);
        }
        if (dbias0) add_row<Arch>(w.dz_row, dbias0 + i * p.bias_si, ncols);
      }
      gemm<Arch, true>(doh + i0 * io.do_sn, 1, io.do_sn, d, nr, S, tile, dvt, tile);
      gemm<Arch, true>(qh + i0 * p.q_sn, 1, p.q_sn, d, nr, dP, tile, dkt, tile);
    }
  }
  add_transposed(dkt, ncols, d,
                 row_at(io.dk, io.dk_sb, io.dk_sh, io.dk_sn, sg.b, hk, sg.k_begin + j0), io.dk_sn);
  add_transposed(dvt, ncols, d,
                 row_at(io.dv, io.dv_sb, io.dv_sh, io.dv_sn, sg.b, hk, sg.k_begin + j0), io.dv_sn);
}

/// Backward of one group of up to q_group(d) query tiles [ibeg, ...) of head h (queries in
/// lanes): each key tile the group sees is read once for all its tiles (S = K·Qᵀ, dP = V·dOᵀ,
/// dQᵀ += Kᵀ·dSᵀ summed in the group's slots, then added to the caller's rows). With KV (single
/// pass) also dK += dSᵀ·Q and dV += (P∘M')ᵀ·dO straight into the caller's rows, which the work
/// item must own; that needs d % W == 0 (aligned packed Q / dO rows).
/// Slot use: qt = Qᵀ, dot = dOᵀ, qp / dop = Q / dO rows (KV only), acc = dQᵀ, v1 = D, v2 = L.
template <class Arch, bool KV, class T>
void backward_qgroup(const problem<T>& p, const bwd_io<T>& io, const segment& sg, index_t h,
                     index_t ibeg, const buffers& w) {
  using F = simd::fbatch<Arch>;
  constexpr index_t W = index_t(simd::width<Arch>), NV = tile / W;
  const index_t d = p.d, off = sg.nk - sg.nq, hk = h / (p.hq / p.hkv);
  const tile_group grp(ibeg, q_group(d), sg, p.wl, p.wr);
  const scorer<Arch> sc = make_scorer<Arch>(p, h);
  const T* kb = row_at(p.k, p.k_sb, p.k_sh, p.k_sn, sg.b, hk, sg.k_begin);
  const T* vb = row_at(p.v, p.v_sb, p.v_sh, p.v_sn, sg.b, hk, sg.k_begin);
  const T* qh = row_at(p.q, p.q_sb, p.q_sh, p.q_sn, sg.b, h, sg.q_begin);
  const T* oh = row_at(io.o, io.o_sb, io.o_sh, io.o_sn, sg.b, h, sg.q_begin);
  const T* doh = row_at(io.dout, io.do_sb, io.do_sh, io.do_sn, sg.b, h, sg.q_begin);
  const float* lh = io.lse + (sg.b * p.hq + h) * p.nq + sg.q_begin;
  float *S = w.s, *dP = w.dp;
  if (p.dropout > 0) std::fill(w.drop_row, w.drop_row + tile, 0.f); // lanes >= rows stay finite
  for (index_t g = 0; g < grp.ng; ++g) {
    const index_t i0 = grp.i0(g), nrows = grp.rows(g);
    const slot t = get_slot(w, g, d);
    pack_transposed(qh + i0 * p.q_sn, p.q_sn, nrows, d, t.qt);
    pack_transposed(doh + i0 * io.do_sn, io.do_sn, nrows, d, t.dot);
    if constexpr (KV) {
      pack_rows(qh + i0 * p.q_sn, p.q_sn, nrows, d, t.qp);
      pack_rows(doh + i0 * io.do_sn, io.do_sn, nrows, d, t.dop);
    }
    std::fill(t.acc, t.acc + d * tile, 0.f);
    for (index_t c = 0; c < tile; ++c) {
      const index_t i = i0 + c;
      t.v1[c] = c < nrows ? row_dot<Arch>(doh + i * io.do_sn, oh + i * io.o_sn, d) : 0.f;
      t.v2[c] = c < nrows ? safe_lse(lh[i]) : std::numeric_limits<float>::infinity();
    }
  }
  for (index_t j0 = grp.begin; j0 < grp.end; j0 += tile) {
    const index_t nc = std::min(tile, sg.nk - j0);
    for (index_t g = 0; g < grp.ng; ++g) {
      if (!grp.sees(g, j0, nc)) continue;
      const index_t i0 = grp.i0(g), nrows = grp.rows(g);
      const slot t = get_slot(w, g, d);
      const float* bias0 =
          p.bias ? p.bias + bias_offset(p, sg.b, h, sg.q_begin + i0, sg.k_begin) : nullptr;
      const bool masked = needs_mask(nrows, i0, i0 + nrows, j0, j0 + nc, off, p.wl, p.wr);
      gemm<Arch, false>(kb + j0 * p.k_sn, p.k_sn, 1, nc, d, t.qt, tile, S, tile);
      gemm<Arch, false>(vb + j0 * p.v_sn, p.v_sn, 1, nc, d, t.dot, tile, dP, tile);
      for (index_t r = 0; r < nc; ++r) {
        const index_t j = j0 + r;
        const float* brow = bias0 ? bias0 + j : nullptr;
        if (p.dropout > 0) dropout_draws<Arch>(p, sg, h, i0, j, nrows, w.drop_row);
        float *srow = S + r * tile, *dprow = dP + r * tile;
        for (index_t v = 0; v < NV; ++v) {
          F g2;
          const F z = sc.template score<true>(F::load_aligned(srow + v * W), v, float(i0 + off - j),
                                              1.f, nrows, masked, brow, p.bias_si, g2);
          const F P = simd::exp<Arch>(z - F::load_aligned(t.v2 + v * W));
          F dpd = F::load_aligned(dprow + v * W), Pd = P;
          if (p.dropout > 0) {
            const F f = sc.drop_factor(F::load_aligned(w.drop_row + v * W));
            Pd = P * f;
            dpd = dpd * f;
          }
          if constexpr (KV) Pd.store_aligned(srow + v * W);
          (P * (dpd - F::load_aligned(t.v1 + v * W)) * g2).store_aligned(dprow + v * W);
        }
      }
      gemm<Arch, true>(kb + j0 * p.k_sn, 1, p.k_sn, d, nc, dP, tile, t.acc, tile); // dQᵀ += Kᵀ dSᵀ
      if constexpr (KV) {
        gemm_acc_rows<Arch>(S, tile, 1, nc, nrows, t.dop, d,
                            row_at(io.dv, io.dv_sb, io.dv_sh, io.dv_sn, sg.b, hk, sg.k_begin + j0),
                            io.dv_sn, d);
        gemm_acc_rows<Arch>(dP, tile, 1, nc, nrows, t.qp, d,
                            row_at(io.dk, io.dk_sb, io.dk_sh, io.dk_sn, sg.b, hk, sg.k_begin + j0),
                            io.dk_sn, d);
      }
    }
  }
  for (index_t g = 0; g < grp.ng; ++g)
    add_transposed(get_slot(w, g, d).acc, grp.rows(g), d,
                   row_at(io.dq, io.dq_sb, io.dq_sh, io.dq_sn, sg.b, h, sg.q_begin + grp.i0(g)),
                   io.dq_sn);
}

// ---- drivers -----------------------------------------------------------------------------------

template <class T> inline index_t query_tiles(const problem<T>& p) {
  return (p.max_nq + tile - 1) / tile;
}
template <class T> inline index_t key_tiles(const problem<T>& p) {
  return (p.max_nk + tile - 1) / tile;
}

/// Runs fn(item, buffers) for items [0, n) on up to `threads` threads, each with its own buffers
/// carved from ws (threads · thread_bytes(d) bytes); no more threads than items of `work` make
/// chunks of lowmem::min_chunk_work (a small problem runs serially and opens no OpenMP region).
/// Items are handed out one at a time in index order (a shared atomic counter: dynamic scheduling),
/// so a thread that runs faster (the other core is shared with other work, or its items are
/// cheaper) takes more of them, and the threads finish within one item of each other. Every item
/// writes only its own outputs, so the results do not depend on which thread ran it. Nested calls
/// run serially.
template <class Fn>
inline void run_items(index_t n, item_work work, index_t d, int threads, void* ws, Fn&& fn) {
  if (n <= 0) return;
  const std::size_t per = thread_bytes(d);
  const auto carve_thread = [&](int c) {
    workspace local(static_cast<unsigned char*>(ws) + std::size_t(c) * per, per);
    return carve(local, d);
  };
  const index_t team = in_parallel() ? 1 : chunk_count(n, work, threads);
#if defined(_OPENMP)
  if (team > 1) {
    std::atomic<index_t> next{0};
#pragma omp parallel num_threads(static_cast <int>(team))
    {
      const buffers w = carve_thread(omp_get_thread_num()); // < team: in range of ws
      for (index_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i, w);
    }
    return;
  }
#endif
  (void)team;
  const buffers w = carve_thread(0);
  for (index_t i = 0; i < n; ++i) fn(i, w);
}

/// Rank r of the forward's / dQ pass's query-tile groups in decreasing order of cost, so that
/// dynamically scheduled threads end on cheap items: under a right window (causal) later query
/// tiles see more keys, under a left window alone fewer; otherwise all cost the same.
template <class T> inline index_t costly_group_first(const problem<T>& p, index_t r, index_t nt) {
  return p.wr < unbounded ? nt - 1 - r : r;
}
/// The same for the key tiles of the dK/dV pass (mirrored: under a right window, earlier keys are
/// seen by more queries).
template <class T>
inline index_t costly_key_tile_first(const problem<T>& p, index_t r, index_t nt) {
  return p.wr < unbounded ? r : nt - 1 - r;
}

template <class Arch, class T>
void forward(const problem<T>& p, const fwd_out<T>& out, int threads, void* ws) {
  // Items run (segment, head)-major, so consecutive items reuse the head's K/V from cache;
  // within a head, costly groups first, so the threads end on cheap items (see run_items).
  const index_t G = q_group(p.d), nt = (query_tiles(p) + G - 1) / G;
  const item_work work{2 * std::min(G * tile, p.max_nq) * p.max_nk * p.d}; // S = QKᵀ, O += PV
  run_items(p.nseg * p.hq * nt, work, p.d, threads, ws, [&](index_t item, const buffers& w) {
    const index_t t = costly_group_first(p, item % nt, nt), sh = item / nt;
    forward_group<Arch>(p, out, sh / p.hq, sh % p.hq, t, w);
  });
}

/// True when the backward runs the single-pass schedule (see attention_backward's comment).
template <class Arch, class T>
inline bool single_pass(const problem<T>& p, int threads, bool deterministic) noexcept {
  // Work items (segment, kv head) must keep every thread busy: an exact multiple of the thread
  // count of equal items, or enough items (4 per thread) that the imbalance is small.
  const index_t items = p.nseg * p.hkv, t = index_t(threads);
  const bool balanced = items >= 4 * t || (!p.cu_q && items >= t && items % t == 0);
  return !deterministic && !p.dbias && p.d % index_t(simd::width<Arch>) == 0 && balanced;
}

template <class Arch, class T>
void backward(const problem<T>& p, const bwd_io<T>& io, int threads, bool deterministic, void* ws) {
  const index_t G = q_group(p.d);
  // a backward item's multiply-adds: S, dP, dV, dK, dQ over its query rows × keys × d
  const index_t qk = p.max_nq * p.max_nk * p.d;
  if (single_pass<Arch>(p, threads, deterministic)) {
    const item_work work{5 * (p.hq / p.hkv) * qk};
    run_items(p.nseg * p.hkv, work, p.d, threads, ws, [&](index_t item, const buffers& w) {
      const segment sg = get_segment(p, item / p.hkv);
      const index_t hk = item % p.hkv, group = p.hq / p.hkv;
      for (index_t h = hk * group; h < (hk + 1) * group; ++h)
        for (index_t ibeg = 0; ibeg < sg.nq; ibeg += G * tile)
          backward_qgroup<Arch, true>(p, io, sg, h, ibeg, w);
    });
    return;
  }
  // dK/dV pass (and d(bias)): a work item owns one key tile of one (segment, kv head), or of
  // every segment / kv head when the bias gradient is broadcast over batches / heads (zero
  // stride): then several of them add into the same d(bias) rows, which must stay on one thread.
  const index_t ntk = key_tiles(p);
  const bool all_s = p.dbias && !p.cu_q && p.bias_sb == 0, all_h = p.dbias && p.bias_sh == 0;
  const index_t ns = all_s ? 1 : p.nseg, nh = all_h ? 1 : p.hkv;
  const item_work kv_work{4 * (all_s ? p.nseg : 1) * (all_h ? p.hkv : 1) * qk /
                          std::max<index_t>(ntk, 1)};
  run_items(ns * nh * ntk, kv_work, p.d, threads, ws, [&](index_t item, const buffers& w) {
    const index_t t = costly_key_tile_first(p, item % ntk, ntk), sh = item / ntk;
    const index_t s0 = all_s ? 0 : sh / nh, s1 = all_s ? p.nseg : s0 + 1;
    const index_t h0 = all_h ? 0 : sh % nh, h1 = all_h ? p.hkv : h0 + 1;
    for (index_t s = s0; s < s1; ++s)
      for (index_t hk = h0; hk < h1; ++hk) backward_kv_tile<Arch>(p, io, s, hk, t, w);
  });
  // dQ pass: a work item is a group of up to G query tiles of one (segment, head).
  const index_t ntg = (query_tiles(p) + G - 1) / G;
  const item_work q_work{3 * qk / std::max<index_t>(ntg, 1)};
  run_items(p.nseg * p.hq * ntg, q_work, p.d, threads, ws, [&](index_t item, const buffers& w) {
    const index_t tg = costly_group_first(p, item % ntg, ntg), sh = item / ntg;
    const segment sg = get_segment(p, sh / p.hq);
    if (tg * G * tile < sg.nq) backward_qgroup<Arch, false>(p, io, sg, sh % p.hq, tg * G * tile, w);
  });
}

} // namespace lowmem::attention_kernels
