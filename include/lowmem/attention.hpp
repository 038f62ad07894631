// lowmem/attention.hpp — exact softmax attention in tiles, forward and backward, O(N) extra memory.
//
// Papers: FlashAttention (Dao et al.) arXiv:2205.14135; FlashAttention-2 (Dao) arXiv:2307.08691;
// ALiBi (Press et al.) arXiv:2108.12409; logit soft-capping as in Gemma 2 arXiv:2408.00118.
//
// Math (per batch b, query head h, kv head hk = h / (Hq / Hkv)):
//   s_ij = scale · q_i·k_j                       (scale defaults to 1/sqrt(d))
//   z_ij = c·tanh(s_ij / c)       if softcap c > 0, else s_ij
//        − slope_h · |i + Nk − Nq − j|   (ALiBi, bottom-right aligned)   + bias_ij
//   z_ij = −inf unless −wr <= i + Nk − Nq − j <= wl   (causal: wr = 0; a window (wl, wr))
//   P = softmax_j(z),   L_i = log Σ_j exp z_ij,   O = (P ∘ M / (1 − p)) V
// with M an optional dropout mask (keep with probability 1 − p) regenerated from the core
// counter RNG, so the backward never stores it. Rows with no allowed key give O = 0, L = −inf.
//
// The N × N matrices S and P never exist: the forward keeps an online softmax (running max and
// sum per query) over 64-key tiles; the backward recomputes P tile by tile from L (FA-2,
// D_i = Σ_k dO_ik O_ik, dS = P ∘ (dP − D)). Fully masked tiles (causal, windows) are skipped.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/bf16.hpp"
#include "core/errors.hpp"
#include "core/random.hpp"
#include "core/threading.hpp"
#include "core/workspace.hpp"
#include "kernels/attention.hpp"
#include "simd/simd.hpp"

namespace lowmem {

/// A 4-D attention tensor [batch, heads, seq, dim] over any layout whose last dimension is
/// contiguous: element (b, h, n, k) is data[b·stride_batch + h·stride_head + n·stride_seq + k].
/// attention_bhnd / attention_bnhd build the two usual layouts; attention_view converts a core
/// tensor_view<T, 4>.
template <class T> struct attention_tensor {
  T* data = nullptr;
  std::ptrdiff_t batch = 0, heads = 0, seq = 0, dim = 0;
  std::ptrdiff_t stride_batch = 0, stride_head = 0, stride_seq = 0;

  /// Any tensor converts to its read-only view.
  operator attention_tensor<const T>() const noexcept {
    return {data, batch, heads, seq, dim, stride_batch, stride_head, stride_seq};
  }
};

// core/tensor.hpp's strided view, declared here so this header stays free of Eigen (tensor.hpp
// includes Eigen/Core for its TensorMap interop); attention_view instantiates only for callers
// that include core/tensor.hpp themselves.
template <class T, int Rank> struct tensor_view;

/// A core strided view (core/tensor.hpp) of extents [B, H, N, d] as an attention tensor, e.g.
/// attention_view(token_major_view(p, B, N, H, d)); the last dimension must be contiguous
/// (lowmem::invalid_argument otherwise).
template <class T> attention_tensor<T> attention_view(const tensor_view<T, 4>& t) {
  require(t.stride[3] == 1, "attention_view", "t.stride[3]", "1 (contiguous last dimension)",
          t.stride[3]);
  return {t.data,      t.extent[0], t.extent[1], t.extent[2],
          t.extent[3], t.stride[0], t.stride[1], t.stride[2]};
}

/// Head-major [B, H, N, d], row-major and packed.
template <class T>
attention_tensor<T> attention_bhnd(T* data, std::ptrdiff_t B, std::ptrdiff_t H, std::ptrdiff_t N,
                                   std::ptrdiff_t d) {
  return {data, B, H, N, d, H * N * d, N * d, d};
}
/// Token-major [B, N, H, d] (the layout of a fused QKV projection's output), packed.
template <class T>
attention_tensor<T> attention_bnhd(T* data, std::ptrdiff_t B, std::ptrdiff_t N, std::ptrdiff_t H,
                                   std::ptrdiff_t d) {
  return {data, B, H, N, d, N * H * d, d, H * d};
}

/// No window limit on that side.
inline constexpr std::ptrdiff_t attention_unbounded = std::numeric_limits<std::ptrdiff_t>::max();

/// Additive fp32 bias bias(b, h, i, j) = data[b·stride_batch + h·stride_head + i·stride_row + j]
/// (j contiguous; a zero stride broadcasts: stride_batch = 0 gives a per-head [Hq, Nq, Nk] bias,
/// stride_head = 0 a [B, 1, Nq, Nk] one, both a shared [Nq, Nk] one, stride_row = 0 a key-padding
/// row [B, H, 1, Nk]). -inf entries mask. Under varlen, i and j are positions in the packed
/// sequences (batch 0).
///
/// Gradient: when `grad` is non-null, attention_backward ACCUMULATES ∂loss/∂bias into it, laid out
/// with the same strides as data: grad[off(b, h, i, j)] += ∂loss/∂z_bhij = P∘(dP − D), summed
/// over every (b, h, i, j) that maps to the same element (so zero strides reduce over the
/// broadcast dimensions). Distinct elements of the [B, Hq, Nq, Nk] grid must map to the same
/// offset only through zero strides. The sum order is fixed (bitwise identical for any thread
/// count); requesting it selects the backward's two-pass schedule (see attention_backward).
struct attention_bias {
  const float* data = nullptr;
  std::ptrdiff_t stride_batch = 0, stride_head = 0, stride_row = 0;
  float* grad = nullptr; ///< optional: d(bias), accumulated by attention_backward (not read by
                         ///< the forward)
};

/// Variable-length packed sequences: batch must be 1, sequence s owns queries
/// [cu_seqlens_q[s], cu_seqlens_q[s+1]) and keys [cu_seqlens_k[s], cu_seqlens_k[s+1]) of the
/// packed seq axis; no compute is spent across sequences or on padding.
struct attention_varlen {
  const std::int32_t* cu_seqlens_q = nullptr; // num_seqs + 1 offsets, 0 first, non-decreasing
  const std::int32_t* cu_seqlens_k = nullptr;
  std::ptrdiff_t num_seqs = 0;
};

/// Options of attention_forward / attention_backward (pass the same options to both).
struct attention_options {
  float scale = 0.f;   ///< softmax scale; 0 means 1/sqrt(d)
  bool causal = false; ///< key j visible to query i iff j <= i + Nk − Nq (bottom-right aligned)
  std::ptrdiff_t window_left = attention_unbounded;  ///< keys at most this far left of the diagonal
  std::ptrdiff_t window_right = attention_unbounded; ///< ... and right of it (causal: 0)
  const float* alibi_slopes = nullptr;               ///< Hq slopes, or null
  float softcap = 0.f;                               ///< tanh soft-capping of the scores; 0 = off
  attention_bias bias{};                             ///< optional additive bias
  attention_varlen varlen{};                         ///< optional packed sequences
  float dropout = 0.f;                               ///< attention dropout probability p in [0, 1)
  random::stream dropout_rng{0, 0}; ///< mask element (b,h,i,j) = uniform(((b·Hq+h)·Nk+j)·Nq+i)>=p
  int threads = 0;                  ///< thread budget; <= 0: max_threads()
  /// Backward schedule: true forces the two-pass schedule, bitwise identical for any thread
  /// count; false (default) may pick the faster single pass (see attention_backward).
  bool deterministic = false;
};

namespace attention_detail {

inline int thread_budget(int threads) { return threads > 0 ? threads : max_threads(); }

template <class T>
void require_tensor(const char* fn, const char* arg, const attention_tensor<T>& t) {
  // Argument names are built only on failure (no allocation on the success path).
  const auto check = [&](bool ok, const char* field, const char* expected, std::ptrdiff_t got) {
    if (!ok)
      detail::throw_invalid(fn, (std::string(arg) + "." + field).c_str(), expected,
                            detail::to_text(got));
  };
  check(t.batch >= 0, "batch", ">= 0", t.batch);
  check(t.heads >= 0, "heads", ">= 0", t.heads);
  check(t.seq >= 0, "seq", ">= 0", t.seq);
  check(t.dim > 0, "dim", "> 0", t.dim);
  check(t.stride_batch >= 0, "stride_batch", ">= 0", t.stride_batch);
  check(t.stride_head >= 0, "stride_head", ">= 0", t.stride_head);
  check(t.stride_seq >= 0, "stride_seq", ">= 0", t.stride_seq);
  require_data(fn, arg, t.data, std::size_t(t.batch * t.heads * t.seq * t.dim));
}

template <class A, class B>
void require_same_shape(const char* fn, const char* arg, const attention_tensor<A>& t,
                        const attention_tensor<B>& like) {
  const auto shape = [](auto& x) {
    return "[" + detail::to_text(x.batch) + ", " + detail::to_text(x.heads) + ", " +
           detail::to_text(x.seq) + ", " + detail::to_text(x.dim) + "]";
  };
  if (t.batch != like.batch || t.heads != like.heads || t.seq != like.seq || t.dim != like.dim)
    detail::throw_invalid(fn, arg, "shape " + shape(like), shape(t));
}

inline void require_offsets(const char* fn, const char* arg, const std::int32_t* cu,
                            std::ptrdiff_t n, std::ptrdiff_t total) {
  require_data(fn, arg, cu, std::size_t(n + 1));
  require_equal(fn, arg, std::int32_t(0), cu[0]);
  for (std::ptrdiff_t s = 0; s < n; ++s)
    require(cu[s + 1] >= cu[s], fn, arg, "non-decreasing offsets", cu[s + 1]);
  require_equal(fn, arg, total, std::ptrdiff_t(cu[n]));
}

/// Validates the shared inputs and builds the kernel problem (nothing is written).
template <class T>
attention_kernels::problem<T>
make_problem(const char* fn, const attention_tensor<const T>& q, const attention_tensor<const T>& k,
             const attention_tensor<const T>& v, const attention_options& opt) {
  require_tensor(fn, "q", q);
  require_tensor(fn, "k", k);
  require_tensor(fn, "v", v);
  require_equal(fn, "k.batch", q.batch, k.batch);
  require_equal(fn, "v.batch", q.batch, v.batch);
  require_equal(fn, "k.dim", q.dim, k.dim);
  require_equal(fn, "v.dim", q.dim, v.dim);
  require_positive(fn, "k.heads", k.heads);
  require_multiple_of(fn, "q.heads", k.heads, q.heads);
  require_equal(fn, "v.heads", k.heads, v.heads);
  require_equal(fn, "v.seq", k.seq, v.seq);
  require_non_negative(fn, "window_left", opt.window_left);
  require_non_negative(fn, "window_right", opt.window_right);
  require_non_negative(fn, "scale", opt.scale);
  require_non_negative(fn, "softcap", opt.softcap);
  require_in_half_open(fn, "dropout", 0.f, 1.f, opt.dropout);
  require_non_negative(fn, "bias.stride_batch", opt.bias.stride_batch);
  require_non_negative(fn, "bias.stride_head", opt.bias.stride_head);
  require_non_negative(fn, "bias.stride_row", opt.bias.stride_row);

  attention_kernels::problem<T> p;
  p.q = q.data, p.k = k.data, p.v = v.data;
  p.q_sb = q.stride_batch, p.q_sh = q.stride_head, p.q_sn = q.stride_seq;
  p.k_sb = k.stride_batch, p.k_sh = k.stride_head, p.k_sn = k.stride_seq;
  p.v_sb = v.stride_batch, p.v_sh = v.stride_head, p.v_sn = v.stride_seq;
  p.batch = q.batch, p.hq = q.heads, p.hkv = k.heads, p.nq = q.seq, p.nk = k.seq, p.d = q.dim;
  p.nseg = q.batch, p.max_nq = q.seq, p.max_nk = k.seq;
  if (opt.varlen.cu_seqlens_q || opt.varlen.cu_seqlens_k) {
    require_equal(fn, "q.batch (varlen)", std::ptrdiff_t(1), q.batch);
    require_positive(fn, "varlen.num_seqs", opt.varlen.num_seqs);
    require_offsets(fn, "varlen.cu_seqlens_q", opt.varlen.cu_seqlens_q, opt.varlen.num_seqs, q.seq);
    require_offsets(fn, "varlen.cu_seqlens_k", opt.varlen.cu_seqlens_k, opt.varlen.num_seqs, k.seq);
    p.cu_q = opt.varlen.cu_seqlens_q, p.cu_k = opt.varlen.cu_seqlens_k;
    p.nseg = opt.varlen.num_seqs;
    p.max_nq = p.max_nk = 0;
    for (std::ptrdiff_t s = 0; s < p.nseg; ++s) {
      p.max_nq = std::max<std::ptrdiff_t>(p.max_nq, p.cu_q[s + 1] - p.cu_q[s]);
      p.max_nk = std::max<std::ptrdiff_t>(p.max_nk, p.cu_k[s + 1] - p.cu_k[s]);
    }
  }
  p.scale = opt.scale > 0 ? opt.scale : 1.f / std::sqrt(float(q.dim));
  p.softcap = opt.softcap;
  p.alibi = opt.alibi_slopes;
  const auto clip = [](std::ptrdiff_t w) {
    return w >= attention_kernels::unbounded ? attention_kernels::unbounded : w;
  };
  p.wl = clip(opt.window_left);
  p.wr = opt.causal ? std::min<std::ptrdiff_t>(0, clip(opt.window_right)) : clip(opt.window_right);
  p.bias = opt.bias.data;
  p.bias_sb = opt.bias.stride_batch, p.bias_sh = opt.bias.stride_head;
  p.bias_si = opt.bias.stride_row;
  if (opt.bias.grad)
    require(opt.bias.data != nullptr, fn, "bias.grad", "bias.data set as well", "null bias.data");
  p.dbias = opt.bias.grad;
  p.dropout = opt.dropout;
  p.rng = opt.dropout_rng;
  return p;
}

template <class X> struct identity { using type = X; };
template <class X> using identity_t = typename identity<X>::type;

} // namespace attention_detail

/// Workspace bytes attention_forward and attention_backward need for head dimension d and a
/// thread budget (<= 0: max_threads()): per thread, 64 × d fp32 tiles for packed operands and
/// accumulators of a group of up to 4 query tiles (256 queries at d <= 64, 128 at d = 128, 64 at
/// d >= 256), three 64 × 64 score tiles and a few 64-vectors: 434 KiB at d = 64, at most 640 KiB
/// for d <= 256, independent of the sequence length.
inline std::size_t attention_workspace_bytes(std::ptrdiff_t d, int threads = 0) {
  require_positive("attention_workspace_bytes", "d", d);
  return std::size_t(attention_detail::thread_budget(threads)) *
             attention_kernels::thread_bytes(d) +
         workspace_alignment;
}

/// Attention forward: O = softmax(z(Q Kᵀ)) V and L_i = log Σ_j exp z_ij (see the header comment
/// for z: scale, softcap, ALiBi, bias, causal / window masks, dropout).
///
/// Shapes: q, o [B, Hq, Nq, d]; k, v [B, Hkv, Nk, d] with Hq a multiple of Hkv (GQA/MQA); any
/// strides with a contiguous last dimension (attention_bhnd, attention_bnhd). lse: B·Hq·Nq floats,
/// row-major [B, Hq, Nq] (varlen: [Hq, total_q]). T is float or lowmem::bf16 (bf16 in and out,
/// fp32 accumulation).
/// Memory: no allocation; scratch is `ws` (attention_workspace_bytes(d, opt.threads)), carved per
/// thread into 64-query × 64-key tiles: O(threads · 64 · d), never O(N²).
/// Threads: parallel over batch × heads × groups of up to 4 query tiles of 64 (each group reads a
/// K/V tile once for all its queries), handed out one at a time to whichever thread is free
/// (dynamic scheduling: a core slowed by other work takes fewer groups); each group writes only
/// its own rows of o and lse, so results are bitwise identical for any thread count.
/// Numerics: fp32 accumulation; online softmax with per-tile rescaling; relative error vs a double
/// reference ~1e-6 for fp32 inputs.
/// Preconditions (lowmem::invalid_argument, thrown before anything is written): matching
/// batch/dim, Hq % Hkv == 0, d > 0, windows >= 0, softcap >= 0, dropout in [0, 1), valid varlen
/// offsets (batch 1, offsets from 0 to seq, non-decreasing), workspace large enough.
template <class Arch = simd::default_arch, class Tq, class T = std::remove_const_t<Tq>>
void attention_forward(const attention_tensor<Tq>& q,
                       const attention_detail::identity_t<attention_tensor<const T>>& k,
                       const attention_detail::identity_t<attention_tensor<const T>>& v,
                       const attention_detail::identity_t<attention_tensor<T>>& o, float* lse,
                       const attention_options& opt, workspace ws) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, bf16>::value,
                "attention_forward: float or lowmem::bf16 tensors");
  const char* fn = "attention_forward";
  const attention_tensor<const T> qc = q;
  auto p = attention_detail::make_problem<T>(fn, qc, k, v, opt);
  attention_detail::require_tensor(fn, "o", o);
  attention_detail::require_same_shape(fn, "o", o, q);
  require_data(fn, "lse", lse, std::size_t(q.batch * q.heads * q.seq));
  const int threads = attention_detail::thread_budget(opt.threads);
  require_workspace(fn, ws, attention_workspace_bytes(q.dim, threads));
  if (q.batch == 0 || q.heads == 0 || q.seq == 0) return;
  void* base = ws.template take<unsigned char>(attention_workspace_bytes(q.dim, threads) -
                                               workspace_alignment);
  attention_kernels::fwd_out<T> out{o.data, o.stride_batch, o.stride_head, o.stride_seq, lse};
  attention_kernels::forward<Arch>(p, out, threads, base);
}

/// Convenience overload: allocates the workspace once for this call (not for hot loops).
template <class Arch = simd::default_arch, class Tq, class T = std::remove_const_t<Tq>>
void attention_forward(const attention_tensor<Tq>& q,
                       const attention_detail::identity_t<attention_tensor<const T>>& k,
                       const attention_detail::identity_t<attention_tensor<const T>>& v,
                       const attention_detail::identity_t<attention_tensor<T>>& o, float* lse,
                       const attention_options& opt = {}) {
  require_positive("attention_forward", "q.dim", q.dim);
  owned_workspace ws(attention_workspace_bytes(q.dim, opt.threads));
  attention_forward<Arch>(q, k, v, o, lse, opt, ws.get());
}

/// Attention backward (FlashAttention-2): given dO and the forward's O and L, ACCUMULATES
/// dQ += ∂/∂Q, dK += ∂/∂K, dV += ∂/∂V (+=: zero them first for plain gradients). Recomputes each
/// score tile from Q, K and L: D_i = Σ_k dO_ik O_ik, dV += (P∘M')ᵀ dO, dP = (dO Vᵀ)∘M',
/// dS = P∘(dP − D), then the softcap chain rule and the scale, dQ += dS K, dK += dSᵀ Q
/// (M' = dropout mask / (1 − p), regenerated from opt.dropout_rng). GQA: dK/dV sum over the
/// query heads of each group. With opt.bias.grad set, also d(bias) += P∘(dP − D) (reduced over
/// the bias's zero-stride dimensions; see attention_bias).
///
/// Shapes: as attention_forward; o, dout like q; dq (fp32) like q, dk, dv (fp32) like k, v.
/// Memory: no allocation; `ws` as for the forward.
/// Threads and determinism — two schedules, each summing every gradient element on one thread in
/// a fixed order (so each is reproducible run to run; work items are handed out dynamically, as in
/// the forward, and which thread runs an item does not change its result):
///  * single pass (FA-2's 10·N²·d flops), parallel over (batch, kv head): each work item loops
///    over its query heads and query tiles, and for each over the key tiles it sees; dQ is summed
///    per query tile, dK/dV rows straight into the caller's buffers. Used when
///    opt.deterministic is false, d is a multiple of the SIMD width and the B·Hkv items keep
///    the threads evenly busy (a multiple of the thread count, or >= 4 per thread).
///  * two passes (14·N²·d flops: S and P are recomputed in both), used otherwise (and always
///    when opt.bias.grad is set): dK/dV (and d(bias)) parallel over (batch, kv head, key tile),
///    each tile looping over its query heads and query tiles; then dQ parallel over (batch, head,
///    group of up to 4 query tiles) looping over key tiles, each K/V tile read once per group.
///    One sequence of one head uses every core. When d(bias)
///    is broadcast over batches or heads, the first pass's items span every batch / kv head of
///    their key tile (still parallel over key tiles).
/// Since the default picks the schedule from the thread count, its bits may differ between
/// thread counts; with opt.deterministic = true the result is bitwise identical for any thread
/// count (and across runs).
/// Numerics: fp32 accumulation; relative error vs a double reference ~1e-5.
/// Preconditions: as attention_forward, plus matching shapes of o, dout, dq, dk, dv.
template <class Arch = simd::default_arch, class Tq, class T = std::remove_const_t<Tq>>
void attention_backward(const attention_tensor<Tq>& q,
                        const attention_detail::identity_t<attention_tensor<const T>>& k,
                        const attention_detail::identity_t<attention_tensor<const T>>& v,
                        const attention_detail::identity_t<attention_tensor<const T>>& o,
                        const attention_detail::identity_t<attention_tensor<const T>>& dout,
                        const float* lse, const attention_tensor<float>& dq,
                        const attention_tensor<float>& dk, const attention_tensor<float>& dv,
                        const attention_options& opt, workspace ws) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, bf16>::value,
                "attention_backward: float or lowmem::bf16 tensors");
  const char* fn = "attention_backward";
  const attention_tensor<const T> qc = q;
  auto p = attention_detail::make_problem<T>(fn, qc, k, v, opt);
  attention_detail::require_tensor(fn, "o", o);
  attention_detail::require_same_shape(fn, "o", o, q);
  attention_detail::require_tensor(fn, "dout", dout);
  attention_detail::require_same_shape(fn, "dout", dout, q);
  attention_detail::require_tensor(fn, "dq", dq);
  attention_detail::require_same_shape(fn, "dq", dq, q);
  attention_detail::require_tensor(fn, "dk", dk);
  attention_detail::require_same_shape(fn, "dk", dk, k);
  attention_detail::require_tensor(fn, "dv", dv);
  attention_detail::require_same_shape(fn, "dv", dv, v);
  require_data(fn, "lse", lse, std::size_t(q.batch * q.heads * q.seq));
  const int threads = attention_detail::thread_budget(opt.threads);
  require_workspace(fn, ws, attention_workspace_bytes(q.dim, threads));
  if (q.batch == 0 || q.heads == 0 || (q.seq == 0 && k.seq == 0)) return;
  void* base = ws.template take<unsigned char>(attention_workspace_bytes(q.dim, threads) -
                                               workspace_alignment);
  attention_kernels::bwd_io<T> io{o.data,           o.stride_batch,  o.stride_head,
                                  o.stride_seq,     dout.data,       dout.stride_batch,
                                  dout.stride_head, dout.stride_seq, lse,
                                  dq.data,          dq.stride_batch, dq.stride_head,
                                  dq.stride_seq,    dk.data,         dk.stride_batch,
                                  dk.stride_head,   dk.stride_seq,   dv.data,
                                  dv.stride_batch,  dv.stride_head,  dv.stride_seq};
  attention_kernels::backward<Arch>(p, io, threads, opt.deterministic, base);
}

/// Convenience overload: allocates the workspace once for this call (not for hot loops).
template <class Arch = simd::default_arch, class Tq, class T = std::remove_const_t<Tq>>
void attention_backward(const attention_tensor<Tq>& q,
                        const attention_detail::identity_t<attention_tensor<const T>>& k,
                        const attention_detail::identity_t<attention_tensor<const T>>& v,
                        const attention_detail::identity_t<attention_tensor<const T>>& o,
                        const attention_detail::identity_t<attention_tensor<const T>>& dout,
                        const float* lse, const attention_tensor<float>& dq,
                        const attention_tensor<float>& dk, const attention_tensor<float>& dv,
                        const attention_options& opt = {}) {
  require_positive("attention_backward", "q.dim", q.dim);
  owned_workspace ws(attention_workspace_bytes(q.dim, opt.threads));
  attention_backward<Arch>(q, k, v, o, dout, lse, dq, dk, dv, opt, ws.get());
}

} // namespace lowmem
