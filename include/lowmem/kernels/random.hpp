// lowmem/kernels/random.hpp — vectorized fills from the counter-based generator.
//
// out[k] = f(value begin + k of stream s) for k in [0, n), f = uniform / normal / rademacher /
// bits, with the value -> counter mapping of core/random.hpp. One group of 64 words is 16 Philox
// blocks run side by side in SIMD lanes (64 uniform values, 2048 Rademacher signs; a normal group
// is 3 Philox groups, 192 words -> 256 normals). Ranges that start or end inside a group compute
// that group into a stack buffer and copy the needed part, so any slice equals the same slice of
// a whole-range fill, bit for bit (test: whole vs pieces vs threads). No heap allocation.
//
// Why it is fast (one AVX-512 core; see bench/bench_core.cpp):
//  * One Philox block per 64-bit lane: a round is then vpmuludq (the full 64-bit product: low half
//    in place, high half one vpshufd away) + vpshufd + one 3-way xor (vpternlogd) per multiply,
//    with no vpmulld. The high dword of each lane is scratch; only the low dwords are packed
//    (shufps) in the last round. vpshufd rather than vpsrlq: on Intel cores 512-bit vpmuludq and
//    vpsrlq both issue only on port 0, vpshufd on port 5 (uniform fill ~5% faster on a Sapphire
//    Rapids-class core, A/B of min-of-20000 timings).
//  * Counter words 1-3 are the same for all 16 blocks of a group (hi32(block), the stream id), so
//    round 0's second multiply and round 1's first are scalar, precomputed once per fill
//    (philox_plan): 18 instead of 20 vector multiplies per 8 blocks. The round keys are
//    broadcast once per fill, not per group.
//  * Two to four independent units are interleaved per step (a Philox round is a 5-cycle
//    dependency chain mul -> shift -> xor).
//  * Words for 8 groups (normal: 12) go to an L1 buffer, then a separate loop transforms them:
//    Box–Muller's long dependency chain would otherwise stall behind Philox's in every group.
//    (Splicing the two at round or step granularity was measured slower: register spills.)
//    Normals go through for_normals, which hands each register of normals to a consumer: the
//    fill stores it, the zeroth-order sweeps apply it to θ directly (no z buffer; one code path,
//    so both produce the same bits).
//  * Normals take 24 bits per uniform, 3 words per 4 normals (core/random.hpp): Philox is about
//    half the cost of a normal, and the fourth uniform (the words' low bytes) costs 5 integer ops.
//  * Box–Muller uses simd::log_fast, simd::sqrt_fast and simd::sincos_quarter (polynomials with
//    exact range reduction, ~2e-7 relative; Estrin evaluation) instead of xsimd's generic
//    log/sincos, and rsqrt + one Newton step instead of vsqrtps. The angle's quadrant is two sign
//    bits (a reflection, xor-ed into the results), the angle inside it pi/4 + a with |a| <= pi/4,
//    and cos, sin(pi/4 + a) = (cos a -+ sin a) / sqrt(2), whose 1/sqrt(2) cancels Box–Muller's
//    sqrt(2): no quadrant selects.
//  * Rademacher signs take one bit each (32 per word, core/random.hpp), so Philox is ~1/32 of a
//    word per sign; the fill is the expansion (broadcast, test, blend: 2 stores per word).
// Measured on one Zen 4 core (AVX-512), L1-resident fills of 1024 values, min of 2000 runs, TSC
// ticks (2.096 GHz), both builds -O3 -march=native, run back to back on a loaded machine: uniform
// 0.45 ticks/value; normal 0.63 (3.3 G/s) vs 0.72 (2.9 G/s) for the previous mapping (2 words
// per pair, quadrant selects). Philox is ~0.42 ticks/word, so ~0.32 of a normal's 0.63.
// On a Sapphire Rapids-class KVM core (2.0 GHz TSC), same method: uniform 0.94-1.2 ticks/value,
// normal 1.3-1.9 (varies with the host's load): about 3 vector uops per normal (1.5 Philox, 1.5
// Box–Muller) at 2 per cycle (512-bit ops issue on ports 0 and 5 only).
// Port facts of that Intel core (throughput microbenchmarks, Dec 2026, 16 independent chains):
// 512-bit vpmuludq, FMA, vpxord, vpternlogd, vpaddd, vcvtdq2ps 2 per cycle (ports 0 and 5);
// vpshufd, vshufps, vpshufb, vpermd 1 per cycle (port 5); vpslld / vpsrld 1 per cycle (port 0);
// vrsqrt14ps 1 per 2 cycles; reg-reg zmm moves free. Per 64 normals the generated code has ~78
// vector uops of Philox (48 words) and ~96 of transform (incl. the ZO sweep's 2 FMAs per
// register): ~2.7 uops per normal, and an L1-resident fill measures ~1.3 TSC ticks per normal,
// ~90% of that 2-uops/cycle bound. Re-tuned there with in-process A/B (alternating, min/median
// over 25-41 rounds): units_in_flight 2 stays best (1 is slower in 25 of 25 rounds, 3 no gain),
// normal_chunk 2 or 8 no different from 4; Horner instead of Estrin in log/sincos (-2 uops per
// pair) is not faster (latency-bound chains); the angle word by byte permutes
// (simd::low_bytes_to_top24) and one vfnmadd in sqrt_fast: L1 fill -6% (faster in 14 of 15 rounds).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/random.hpp"
#include "../core/threading.hpp"
#include "../simd/simd.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define LOWMEM_RANDOM_UNROLL _Pragma("GCC unroll 16")
// The Box–Muller transform must be inlined into the loop that consumes its registers (a call
// passes the 4 result registers through memory; GCC stops inlining it once the consumer is a
// fused ZO sweep: +24% instructions per step measured with callgrind).
#define LOWMEM_RANDOM_INLINE inline __attribute__((always_inline))
#else
#define LOWMEM_RANDOM_UNROLL
#define LOWMEM_RANDOM_INLINE inline
#endif

namespace lowmem::random {
namespace kernels {

/// Registers of one Philox output word per group (16 lanes / width).
template <class Arch> inline constexpr std::size_t regs_per_word = 16 / simd::width<Arch>;
/// Register-wide units (2 registers of W/2 blocks each) evaluated together per step: ILP across
/// independent Philox chains. Measured on Zen 4: 2 for 512-bit registers (16 state registers of
/// 32), 4 for 256-bit ones (the extra chains beat the spills).
template <class Arch>
inline constexpr std::size_t units_in_flight = simd::width<Arch> >= 16 ? 2 : 4;

/// Per-fill constants of the wide Philox evaluation: round keys as vectors, and the parts of
/// rounds 0-1 that are the same for every block of a group (counter words 1-3 do not depend on
/// the lane). Valid for the groups whose blocks share hi32(block) == `block_hi`.
template <class Arch> struct philox_plan {
  using U = simd::ubatch<Arch>;
  static constexpr std::size_t W = simd::width<Arch>, R = regs_per_word<Arch>;
  U k0[10], k1[10];
  U r0_c2;      // round 0: c2' = hi(m0 c0) ^ (c3 ^ k1[0])
  U r1_c0;      // round 1: c0'' = hi(m1 c2') ^ (lo(m1 c2) ^ k0[1])
  U r1_c2;      // round 1: c2'' = c3' ^ (hi(m0 c0') ^ k1[1]), c0' scalar
  U r1_c3;      // round 1: c3'' = lo(m0 c0')
  U offs[R][2]; // low-counter lane offsets of unit p, half s (one block per 64-bit lane)
  std::uint32_t block_hi = 0;

  philox_plan(const stream& s, std::uint32_t hi) {
    const key_t key = s.key();
    std::uint32_t a = key[0], b = key[1];
    for (int r = 0; r < 10; ++r, a += philox_w0, b += philox_w1) k0[r] = U(a), k1[r] = U(b);
    // pack_low_u64(v0, v1) puts v_s's 64-bit lane q = 2l + i into packed lane 4l + 2s + i
    alignas(64) std::uint32_t lanes[W];
    for (std::size_t p = 0; p < R; ++p)
      for (std::size_t sh = 0; sh < 2; ++sh) {
        for (std::size_t q = 0; q < W / 2; ++q) {
          lanes[2 * q] = std::uint32_t(p * W + 4 * (q / 2) + 2 * sh + q % 2);
          lanes[2 * q + 1] = 0;
        }
        offs[p][sh] = U::load_aligned(lanes);
      }
    set_hi(s, hi);
  }

  void set_hi(const stream& s, std::uint32_t hi) {
    const key_t key = s.key();
    block_hi = hi;
    const std::uint32_t c2 = std::uint32_t(s.id), c3 = std::uint32_t(s.id >> 32);
    const std::uint64_t p1 = std::uint64_t(philox_m1) * c2;
    const std::uint32_t c0r1 = std::uint32_t(p1 >> 32) ^ hi ^ key[0]; // round-0 c0' (scalar)
    const std::uint32_t c1r1 = std::uint32_t(p1);                     // round-0 c1'
    const std::uint64_t p0 = std::uint64_t(philox_m0) * c0r1;
    r0_c2 = U(c3 ^ key[1]);
    r1_c0 = U(c1r1 ^ (key[0] + philox_w0));
    r1_c2 = U(std::uint32_t(p0 >> 32) ^ (key[1] + philox_w1));
    r1_c3 = U(std::uint32_t(p0));
  }
};

/// Philox4x32-10 of NU units. Unit u is register p[u] of group g[u] (blocks 16 g + p W + lane);
/// all groups must share hi32(block) == P.block_hi. out[u][w] = word w, packed (lane = block).
template <class Arch, std::size_t NU>
inline void philox_units(const philox_plan<Arch>& P, const std::uint64_t (&g)[NU],
                         const std::size_t (&p)[NU], simd::ubatch<Arch> (&out)[NU][4]) noexcept {
  using U = simd::ubatch<Arch>;
  // The 20 round-key vectors are loop-invariant for the caller's group loop; hoisted into
  // registers next to the 8 NU state registers they force spills of the state. An opaque copy of
  // the plan pointer keeps them as memory operands (loads are cheap, the ALU pipes are not).
  const philox_plan<Arch>* pp = &P;
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+r"(pp));
#endif
  const philox_plan<Arch>& Q = *pp;
  U x0[NU][2], x1[NU][2], x2[NU][2], x3[NU][2];
  // round 0 (c1..c3 are lane-independent: only c0's product is a vector)
  LOWMEM_RANDOM_UNROLL
  for (std::size_t u = 0; u < NU; ++u) {
    const U base(std::uint32_t(16 * g[u]));
    LOWMEM_RANDOM_UNROLL
    for (std::size_t s = 0; s < 2; ++s) {
      const U m0 = simd::mul_wide_u32<Arch>(Q.offs[p[u]][s] + base, philox_m0);
      x2[u][s] = simd::high_to_low_u64_dirty<Arch>(m0) ^ Q.r0_c2;
      x3[u][s] = m0;
    }
  }
  // round 1 (c0 is lane-independent: only c2's product is a vector)
  LOWMEM_RANDOM_UNROLL
  for (std::size_t u = 0; u < NU; ++u) {
    LOWMEM_RANDOM_UNROLL
    for (std::size_t s = 0; s < 2; ++s) {
      const U m1 = simd::mul_wide_u32<Arch>(x2[u][s], philox_m1);
      x0[u][s] = simd::high_to_low_u64_dirty<Arch>(m1) ^ Q.r1_c0;
      x1[u][s] = m1;
      x2[u][s] = x3[u][s] ^ Q.r1_c2;
      x3[u][s] = Q.r1_c3;
    }
  }
  LOWMEM_RANDOM_UNROLL
  for (int r = 2; r < 9; ++r) {
    LOWMEM_RANDOM_UNROLL
    for (std::size_t u = 0; u < NU; ++u) {
      LOWMEM_RANDOM_UNROLL
      for (std::size_t s = 0; s < 2; ++s) {
        const U m0 = simd::mul_wide_u32<Arch>(x0[u][s], philox_m0);
        const U m1 = simd::mul_wide_u32<Arch>(x2[u][s], philox_m1);
        x0[u][s] = simd::high_to_low_u64_dirty<Arch>(m1) ^ x1[u][s] ^ Q.k0[r];
        x1[u][s] = m1;
        x2[u][s] = simd::high_to_low_u64_dirty<Arch>(m0) ^ x3[u][s] ^ Q.k1[r];
        x3[u][s] = m0;
      }
    }
  }
  // round 9, fused with packing the low dwords into lanes: the high halves are packed straight
  // from the products (no shift), and the xors run on packed registers (half as many)
  LOWMEM_RANDOM_UNROLL
  for (std::size_t u = 0; u < NU; ++u) {
    const U m0a = simd::mul_wide_u32<Arch>(x0[u][0], philox_m0);
    const U m0b = simd::mul_wide_u32<Arch>(x0[u][1], philox_m0);
    const U m1a = simd::mul_wide_u32<Arch>(x2[u][0], philox_m1);
    const U m1b = simd::mul_wide_u32<Arch>(x2[u][1], philox_m1);
    out[u][0] =
        simd::pack_u64<Arch, true>(m1a, m1b) ^ simd::pack_u64<Arch>(x1[u][0], x1[u][1]) ^ Q.k0[9];
    out[u][1] = simd::pack_u64<Arch>(m1a, m1b);
    out[u][2] =
        simd::pack_u64<Arch, true>(m0a, m0b) ^ simd::pack_u64<Arch>(x3[u][0], x3[u][1]) ^ Q.k1[9];
    out[u][3] = simd::pack_u64<Arch>(m0a, m0b);
  }
}

/// Words [4][16] of the 16 Philox blocks of group g, as registers: w[word][r] holds lanes
/// r*width .. r*width+width-1.
template <class Arch>
inline void philox_group(const stream& s, std::uint64_t g,
                         simd::ubatch<Arch> (&w)[4][regs_per_word<Arch>]) noexcept {
  const philox_plan<Arch> P(s, std::uint32_t((16 * g) >> 32));
  for (std::size_t r = 0; r < regs_per_word<Arch>; ++r) {
    simd::ubatch<Arch> out[1][4];
    philox_units<Arch, 1>(P, {g}, {r}, out);
    for (int k = 0; k < 4; ++k) w[k][r] = out[0][k];
  }
}

enum class distribution { uniform, normal, rademacher };

/// Box–Muller on N (radius word, angle word) pairs, 24-bit uniforms in their top bits
/// (core/random.hpp): z_cos = +-r cos(phi), z_sin = +-r sin(phi), r = sqrt(-2 ln u1),
/// u1 = ((rw >> 8) + 1) 2^-24, phi = (pi/2) (2 o + 1) 2^-23 with o = angle bits 29..8, signs from
/// angle bits 31 (cos) and 30 (sin). The pairs go through each stage together (log of all, sqrt
/// of all, ...): independent chains sit next to each other in the instruction stream, so the
/// out-of-order window overlaps them (the compiler does not reorder across stages on x86).
template <class Arch, std::size_t N>
LOWMEM_RANDOM_INLINE void
box_muller(const simd::ubatch<Arch> (&rw)[N], const simd::ubatch<Arch> (&aw)[N],
           simd::fbatch<Arch> (&z_cos)[N], simd::fbatch<Arch> (&z_sin)[N]) noexcept {
  using U = simd::ubatch<Arch>;
  using F = simd::fbatch<Arch>;
  F r2[N], t[N], sn[N], cs[N];
  // -ln(u1) = -ln(X 2^-24), X in [1, 2^24] exact as float; the 2^-24 folds into the exponent.
  LOWMEM_RANDOM_UNROLL
  for (std::size_t k = 0; k < N; ++k)
    r2[k] = simd::log_fast<Arch, true>(simd::small_uint_to_float<Arch>((rw[k] >> 8) + U(1u)), 24);
  // 2 sqrt(-ln u1) = sqrt(2) r
  LOWMEM_RANDOM_UNROLL
  for (std::size_t k = 0; k < N; ++k) r2[k] = simd::sqrt_fast<Arch, true>(r2[k]);
  // phi = pi/4 + (pi/2) t, t = (2 o + 1) 2^-23 - 1/2 in (-1/2, 1/2), exactly: 2 o + 1 goes into the
  // mantissa of 1.0f (o from bits 29..8 to 22..1, bit 0 set), then 1.5 is subtracted
  LOWMEM_RANDOM_UNROLL
  for (std::size_t k = 0; k < N; ++k)
    t[k] = simd::as_float<Arch>(((aw[k] >> 7) & U(0x007FFFFEu)) | U(0x3F800001u)) - F(1.5f);
  // cos(pi/4 + a) = (cos a - sin a) / sqrt(2), sin(pi/4 + a) = (cos a + sin a) / sqrt(2): with
  // r2 = sqrt(2) r the two sqrt(2) cancel to the exact factor 1/2 in the polynomials
  LOWMEM_RANDOM_UNROLL
  for (std::size_t k = 0; k < N; ++k) simd::sincos_quarter<Arch>(t[k], sn[k], cs[k], 0.5f);
  const U sign(0x80000000u);
  LOWMEM_RANDOM_UNROLL
  for (std::size_t k = 0; k < N; ++k) {
    const F p = r2[k] * sn[k];
    z_cos[k] = simd::as_float<Arch>(simd::as_uint<Arch>(simd::fms<Arch>(r2[k], cs[k], p)) ^
                                    (aw[k] & sign));
    z_sin[k] = simd::as_float<Arch>(simd::as_uint<Arch>(simd::fma<Arch>(r2[k], cs[k], p)) ^
                                    ((aw[k] + aw[k]) & sign));
  }
}

/// Values per group of a distribution's fill, and the Philox groups (64 words each) it reads:
/// uniform 64 values from 1 group, normal 256 values from 3 groups (4 normals per 3 words).
template <distribution D>
inline constexpr std::size_t group_values = D == distribution::normal ? 256 : 64;
template <distribution D>
inline constexpr std::size_t group_philox = D == distribution::normal ? 3 : 1;

/// Random words of the full groups [g0, g0 + ng) to bits[0 .. 64 ng), in value order
/// (bits[64 (g - g0) + 16 w + l] = word w of block 16 g + l). `bits` is 64-byte aligned.
template <class Arch>
inline void philox_bits(philox_plan<Arch>& P, const stream& s, std::uint64_t g0, std::size_t ng,
                        std::uint32_t* bits) noexcept {
  using U = simd::ubatch<Arch>;
  constexpr std::size_t R = regs_per_word<Arch>, W = simd::width<Arch>, NU = units_in_flight<Arch>;
  const std::uint64_t g1 = g0 + ng;
  std::uint64_t g = g0;
  std::size_t r = 0;
  // units (g, r) in order; NU at a time when they share hi32(block) (all but one step in 2^28)
  while (g < g1) {
    const std::uint32_t hi = std::uint32_t((16 * g) >> 32);
    if (hi != P.block_hi) P.set_hi(s, hi);
    std::uint64_t gs[NU];
    std::size_t rs[NU];
    std::uint64_t gn = g;
    std::size_t rn = r, k = 0;
    for (; k < NU && gn < g1 && std::uint32_t((16 * gn) >> 32) == hi; ++k) {
      gs[k] = gn, rs[k] = rn;
      if (++rn == R) rn = 0, ++gn;
    }
    if (k == NU) {
      U w[NU][4];
      philox_units<Arch, NU>(P, gs, rs, w);
      for (std::size_t u = 0; u < NU; ++u)
        for (int j = 0; j < 4; ++j)
          w[u][j].store_aligned(bits + 64 * (gs[u] - g0) + rs[u] * W + 16 * j);
      g = gn, r = rn;
    } else {
      U w[1][4];
      philox_units<Arch, 1>(P, {g}, {r}, w);
      for (int j = 0; j < 4; ++j) w[0][j].store_aligned(bits + 64 * (g - g0) + r * W + 16 * j);
      if (++r == R) r = 0, ++g;
    }
  }
}

/// Piece j of the uniform transform of a word buffer (64-byte aligned): values [2 W j, 2 W (j +
/// 1)).
template <class Arch>
inline void uniform_piece(const std::uint32_t* bits, float* out, std::size_t j) noexcept {
  using U = simd::ubatch<Arch>;
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  LOWMEM_RANDOM_UNROLL
  for (std::size_t i = 2 * W * j; i < 2 * W * (j + 1); i += W) {
    const U b = U::load_aligned(bits + i);
    (simd::small_uint_to_float<Arch>(b >> 8) * F(0x1p-24f)).store_unaligned(out + i);
  }
}

/// out[i] = uniform(bits[i]) for the 64 ng values of ng full groups (bits 64-byte aligned).
template <class Arch>
inline void transform_uniform(const std::uint32_t* bits, std::size_t ng, float* out) noexcept {
  for (std::size_t j = 0; j < (32 / simd::width<Arch>)*ng; ++j) uniform_piece<Arch>(bits, out, j);
}

/// Normal groups per Philox pass of for_normals: 4 (3 KiB of words, L1-resident).
inline constexpr std::size_t normal_chunk = 4;

/// The normals of the full normal groups [G0, G0 + ng) (256 values each, core/random.hpp), one
/// register at a time: body(k, z) with z = values 256 G0 + k .. 256 G0 + k + W - 1, k increasing
/// in steps of W within each 64-value piece. The words of up to normal_chunk groups go to an L1
/// buffer first, then each piece (words rows 3 m .. 3 m + 2 of group G, lane offset h W) becomes
/// 4 W normals in registers (rows 4 m .. 4 m + 3) handed to body. A word triple (a, b, c) gives
/// z[0], z[1] from (radius a, angle b) and z[2], z[3] from (radius c, angle d), d = the low bytes
/// of a, b, c as a word's top 24 bits (core/random.hpp); two triples (4 Box–Muller pairs) are
/// transformed together, stage by stage (A/B on the Intel core: L1 fill -4%, L2 / DRAM-resident
/// move_z -5..6% medians vs one triple at a time, faster in 29 of 41 rounds): a fill stores them, a
/// ZO sweep applies them to θ without storing z. Both go through this one function, so the fill API
/// and the fused sweeps produce the same bits. Why two loops (Philox, then Box–Muller): one fused
/// loop per group exposes the long Philox -> Box–Muller dependency chain (and splicing the
/// transform between the Philox rounds spills registers; both measured slower).
template <class Arch, class Body>
LOWMEM_RANDOM_INLINE void for_normals(philox_plan<Arch>& P, const stream& s, std::uint64_t G0,
                                      std::size_t ng, Body&& body) noexcept {
  using U = simd::ubatch<Arch>;
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>, R = regs_per_word<Arch>;
  alignas(64) std::uint32_t words[192 * normal_chunk];
  for (std::size_t c = 0; c < ng; c += normal_chunk) {
    const std::size_t m = ng - c < normal_chunk ? ng - c : normal_chunk;
    philox_bits<Arch>(P, s, 3 * (G0 + c), 3 * m, words);
    for (std::size_t j = 0; j < 4 * R * m; j += 2) {
      U rw[4], aw[4];
      std::size_t k[2];
      LOWMEM_RANDOM_UNROLL
      for (std::size_t e = 0; e < 2; ++e) {
        const std::size_t G = (j + e) / (4 * R), row = ((j + e) / R) % 4, h = (j + e) % R;
        const std::uint32_t* in = words + 192 * G + 48 * row + h * W;
        const U a = U::load_aligned(in), b = U::load_aligned(in + 16),
                cc = U::load_aligned(in + 32);
        rw[2 * e] = a, rw[2 * e + 1] = cc, aw[2 * e] = b;
        aw[2 * e + 1] = simd::low_bytes_to_top24<Arch>(a, b, cc);
        k[e] = 256 * (c + G) + 64 * row + h * W;
      }
      F zc[4], zs[4];
      box_muller<Arch, 4>(rw, aw, zc, zs);
      LOWMEM_RANDOM_UNROLL
      for (std::size_t e = 0; e < 2; ++e) {
        body(k[e], zc[2 * e]);
        body(k[e] + 16, zs[2 * e]);
        body(k[e] + 32, zc[2 * e + 1]);
        body(k[e] + 48, zs[2 * e + 1]);
      }
    }
  }
}

/// The 32 Rademacher signs of one random word: out[b] = (bit b of word) ? -1 : +1, b < 32
/// (core/random.hpp). Register r of 32 / W takes bits r W .. r W + W - 1: the word is broadcast
/// and each lane tests its own bit (simd::select_by_mask: vptestmd + blend on AVX-512).
template <class Arch> inline void expand_signs(std::uint32_t word, float* out) noexcept {
  using U = simd::ubatch<Arch>;
  using F = simd::fbatch<Arch>;
  constexpr std::size_t W = simd::width<Arch>;
  alignas(64) static constexpr std::uint32_t lane_bit[32] = {
      1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
      1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
      1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
      1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
  const U w(word);
  LOWMEM_RANDOM_UNROLL
  for (std::size_t r = 0; r < 32 / W; ++r)
    simd::select_by_mask<Arch>(w, U::load_aligned(lane_bit + r * W), F(-1.0f), F(1.0f))
        .store_unaligned(out + r * W);
}

/// Rademacher signs: out[k] = s.rademacher(begin + k), k < n, 32 signs per Philox word (so a
/// group of 16 blocks covers 2048 values). Words for up to 8 groups go to a 2 KiB stack buffer;
/// a word only partly inside [begin, end) is expanded into a stack buffer and the needed part
/// copied, so any slice equals the same slice of a whole-range fill. Serial, no allocation.
template <class Arch>
inline void fill_signs(const stream& s, std::uint64_t begin, float* out, std::size_t n) noexcept {
  if (n == 0) return;
  constexpr std::size_t chunk = 8; // groups: 2 KiB of words, 16 Ki signs
  constexpr std::uint64_t per_group = 64 * 32;
  alignas(64) std::uint32_t words[64 * chunk];
  alignas(64) float tmp[32];
  const std::uint64_t end = begin + n;
  philox_plan<Arch> P(s, std::uint32_t((16 * (begin / per_group)) >> 32));
  std::uint64_t i = begin;
  while (i < end) {
    const std::uint64_t g0 = i / per_group, g1 = (end - 1) / per_group + 1;
    const std::size_t ng = std::size_t(g1 - g0 < chunk ? g1 - g0 : chunk);
    philox_bits<Arch>(P, s, g0, ng, words); // words[j - 64 g0] = s.bits(j)
    const std::uint64_t stop = end < per_group * (g0 + ng) ? end : per_group * (g0 + ng);
    // a word cut by begin or stop: expanded to tmp, the needed part copied
    auto partial = [&](std::uint64_t v1) {
      const std::uint64_t v0 = i & ~std::uint64_t(31);
      expand_signs<Arch>(words[i / 32 - 64 * g0], tmp);
      std::memcpy(out + (i - begin), tmp + (i - v0), std::size_t(v1 - i) * sizeof(float));
      i = v1;
    };
    if (i % 32 != 0) partial(std::min(stop, (i | 31) + 1));
    // whole words, straight to out
    const std::uint32_t* wp = words + (i / 32 - 64 * g0);
    float* op = out + (i - begin);
    const std::size_t full = std::size_t((stop - i) / 32);
    for (std::size_t k = 0; k < full; ++k) expand_signs<Arch>(wp[k], op + 32 * k);
    i += 32 * full;
    if (i < stop) partial(stop);
  }
}

/// Fills out[0..n) with values [begin, begin + n) of s from words (uniform: one word per value;
/// normal: 3 words per 4 values, through for_normals); serial.
template <class Arch, distribution D>
inline void fill_values(const stream& s, std::uint64_t begin, float* out, std::size_t n) noexcept {
  if (n == 0) return;
  constexpr std::size_t V = group_values<D>, P = group_philox<D>;
  alignas(64) float tmp[V];
  std::uint64_t i = begin;
  const std::uint64_t end = begin + n;
  philox_plan<Arch> P0(s, std::uint32_t((16 * P * (i / V)) >> 32));
  // ng full groups from group g to dst
  auto groups = [&](std::uint64_t g, std::size_t ng, float* dst) {
    if constexpr (D == distribution::normal) {
      for_normals<Arch>(P0, s, g, ng, [dst](std::size_t k, const simd::fbatch<Arch>& z) {
        z.store_unaligned(dst + k);
      });
    } else {
      // a chunk at a time: words into an L1-resident buffer, then transformed (two homogeneous
      // loops keep many independent instructions in the out-of-order window)
      constexpr std::size_t chunk = 8; // groups: 2 KiB of words
      alignas(64) std::uint32_t words[64 * chunk];
      for (std::size_t c = 0; c < ng; c += chunk) {
        const std::size_t m = ng - c < chunk ? ng - c : chunk;
        philox_bits<Arch>(P0, s, g + c, m, words);
        transform_uniform<Arch>(words, m, dst + 64 * c);
      }
    }
  };
  // head: partial first group
  if (i % V != 0) {
    const std::uint64_t g = i / V;
    groups(g, 1, tmp);
    const std::uint64_t stop = end < V * (g + 1) ? end : V * (g + 1);
    std::memcpy(out, tmp + (i - V * g), (stop - i) * sizeof(float));
    out += stop - i;
    i = stop;
  }
  // full groups
  const std::size_t full = std::size_t((end - i) / V);
  if (full > 0) {
    groups(i / V, full, out);
    out += V * full;
    i += V * full;
  }
  // tail: partial last group
  if (i < end) {
    groups(i / V, 1, tmp);
    std::memcpy(out, tmp, (end - i) * sizeof(float));
  }
}

/// Fills out[0..n) with values [begin, begin + n) of s; serial.
template <class Arch, distribution D>
inline void fill(const stream& s, std::uint64_t begin, float* out, std::size_t n) noexcept {
  if constexpr (D == distribution::rademacher)
    fill_signs<Arch>(s, begin, out, n);
  else
    fill_values<Arch, D>(s, begin, out, n);
}

/// Raw words: out[k] = s.bits(begin + k), k < n; serial, no allocation.
template <class Arch>
inline void fill_words(const stream& s, std::uint64_t begin, std::uint32_t* out,
                       std::size_t n) noexcept {
  if (n == 0) return;
  constexpr std::size_t chunk = 8; // groups
  alignas(64) std::uint32_t words[64 * chunk];
  philox_plan<Arch> P(s, std::uint32_t((16 * (begin / 64)) >> 32));
  std::uint64_t i = begin;
  const std::uint64_t end = begin + n;
  while (i < end) {
    const std::uint64_t g0 = i / 64, g1 = (end + 63) / 64;
    const std::size_t ng = std::size_t(g1 - g0 < chunk ? g1 - g0 : chunk);
    philox_bits<Arch>(P, s, g0, ng, words);
    const std::uint64_t stop = end < 64 * (g0 + ng) ? end : 64 * (g0 + ng);
    std::memcpy(out, words + (i - 64 * g0), std::size_t(stop - i) * sizeof(std::uint32_t));
    out += stop - i;
    i = stop;
  }
}

} // namespace kernels

/// Work of one filled value for parallel_for: a share of a Philox block (10 rounds of 2 integer
/// multiplies per 4 words), the conversion and the store; chunks of >= 8K values.
inline constexpr item_work fill_work{4};

/// Fills out[k] = s.uniform(begin + k), k < n. Threads over chunks when `parallel`.
template <class Arch = simd::default_arch>
inline void fill_uniform(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                         bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), fill_work,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::uniform>(s, begin + b, out + b,
                                                            std::size_t(e - b));
      },
      parallel ? 0 : 1);
}
/// Fills out[k] = s.normal(begin + k) (within vector-math accuracy), k < n.
template <class Arch = simd::default_arch>
inline void fill_normal(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                        bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), fill_work,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::normal>(s, begin + b, out + b,
                                                           std::size_t(e - b));
      },
      parallel ? 0 : 1);
}
/// Fills out[k] = s.rademacher(begin + k), k < n.
template <class Arch = simd::default_arch>
inline void fill_rademacher(const stream& s, std::uint64_t begin, float* out, std::size_t n,
                            bool parallel = false) {
  parallel_for(
      0, std::ptrdiff_t(n), fill_work,
      [&](std::ptrdiff_t b, std::ptrdiff_t e, int) {
        kernels::fill<Arch, kernels::distribution::rademacher>(s, begin + b, out + b,
                                                               std::size_t(e - b));
      },
      parallel ? 0 : 1);
}

} // namespace lowmem::random
