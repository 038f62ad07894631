// lowmem/quant/kivi.hpp — KIVI KV-cache quantization (arXiv:2402.02750): keys quantized
// per-channel (each channel's values over a group of G tokens share a scale and zero point),
// values per-token (each token's values over a group of G channels share them), asymmetric 2- or
// 4-bit, with the newest tokens kept in fp32 (the residual window) because attention looks at
// them the most and key outliers are per-channel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/eigen.hpp"
#include "../core/errors.hpp"

namespace lowmem::quant {

/// KIVI configuration for one attention head.
struct kivi_config {
  int bits = 2;           ///< 2 or 4
  index_t head_dim = 64;  ///< d
  index_t group = 32;     ///< G: tokens per key group, channels per value group (divides d)
  index_t residual = 128; ///< R: newest tokens kept in fp32 (a multiple of G, may be 0)
  index_t max_tokens = 4096;
};

namespace detail {
/// Packs b-bit codes (b = 2 or 4), lower element index in the higher bits of a byte.
inline void put_code(std::uint8_t* p, std::size_t i, int bits, std::uint32_t c) {
  const std::size_t per = std::size_t(8 / bits);
  const int shift = 8 - bits * int(i % per + 1);
  std::uint8_t& b = p[i / per];
  b = std::uint8_t((b & ~(((1u << bits) - 1u) << shift)) | (c << shift));
}
inline std::uint32_t get_code(const std::uint8_t* p, std::size_t i, int bits) {
  const std::size_t per = std::size_t(8 / bits);
  const int shift = 8 - bits * int(i % per + 1);
  return (p[i / per] >> shift) & ((1u << bits) - 1u);
}
/// Asymmetric quantization of n strided values to b bits: writes codes at code indices
/// c0 + k·cstride, returns (scale, zero) with x ≈ (code − zero)·scale (min/max range, RNE).
inline void kivi_quant_run(const float* x, std::size_t n, std::size_t stride, int bits,
                           std::uint8_t* codes, std::size_t c0, std::size_t cstride, float& scale,
                           float& zero) {
  float lo = x[0], hi = x[0];
  for (std::size_t k = 1; k < n; ++k)
    lo = std::min(lo, x[k * stride]), hi = std::max(hi, x[k * stride]);
  const float qmax = float((1 << bits) - 1);
  scale = (hi - lo) / qmax;
  if (!(scale > 0)) { // constant run: code 0 with zero = ∓1 and scale |x| reproduces x exactly
    scale = std::fabs(lo);
    zero = lo > 0 ? -1.0f : 1.0f;
  } else {
    zero = std::nearbyint(-lo / scale); // lo maps to code 0 (up to rounding)
  }
  const float inv = scale > 0 ? 1.0f / scale : 0.0f;
  for (std::size_t k = 0; k < n; ++k) {
    const float q = std::min(std::max(std::nearbyint(x[k * stride] * inv) + zero, 0.0f), qmax);
    // (a constant run with lo == 0 has scale 0: every code 0, dequantizes to 0)
    put_code(codes, c0 + k * cstride, bits, std::uint32_t(q));
  }
}
} // namespace detail

/// A KIVI-quantized K/V cache for one head. Memory: everything is allocated at construction for
/// max_tokens (codes, scales, zeros, an fp32 residual of R + G tokens); append and dequantize
/// allocate nothing.
/// Layout: tokens [0, nq) are quantized in groups of G (nq = the largest multiple of G with
/// size − nq >= R, i.e. the fp32 residual holds the newest R .. R+G−1 tokens once size >= R).
/// Group g's codes cover its G×d block row-major (token-major), packed 8/bits per byte.
/// Key scales/zeros: [g][channel]; value scales/zeros: [token][channel group].
/// Numerics: asymmetric min/max per run, RNE; |x − deq(x)| <= scale/2 + rounding of the zero.
class kivi_cache {
public:
  explicit kivi_cache(const kivi_config& c) : cfg_(c) {
    const char* fn = "kivi_cache";
    require(c.bits == 2 || c.bits == 4, fn, "config.bits", "2 or 4", c.bits);
    require_positive(fn, "config.head_dim", c.head_dim);
    require_positive(fn, "config.group", c.group);
    require_multiple_of(fn, "config.head_dim (value groups)", c.group, c.head_dim);
    require_non_negative(fn, "config.residual", c.residual);
    require_multiple_of(fn, "config.residual", c.group, c.residual);
    require_non_negative(fn, "config.max_tokens", c.max_tokens);
    const std::size_t d = std::size_t(c.head_dim), G = std::size_t(c.group);
    const std::size_t groups = std::size_t(c.max_tokens) / G + 1;
    const std::size_t group_bytes = (G * d * std::size_t(c.bits) + 7) / 8;
    kcodes_.assign(groups * group_bytes, 0);
    vcodes_.assign(groups * group_bytes, 0);
    kscale_.assign(groups * d, 0.f), kzero_.assign(groups * d, 0.f);
    vscale_.assign(groups * G * (d / G), 0.f), vzero_.assign(groups * G * (d / G), 0.f);
    rk_.assign((std::size_t(c.residual) + G) * d, 0.f);
    rv_.assign((std::size_t(c.residual) + G) * d, 0.f);
    group_bytes_ = group_bytes;
  }

  index_t size() const { return size_; }
  index_t quantized_tokens() const { return nq_; }
  const kivi_config& config() const { return cfg_; }

  /// Appends one token's key k[d] and value v[d]; quantizes the oldest G residual tokens when
  /// the residual reaches R + G. Throws (before changing anything) when the cache is full.
  void append(const float* k, const float* v) {
    const char* fn = "kivi_cache::append";
    if (size_ >= cfg_.max_tokens) // (message built only on failure: append allocates nothing)
      lowmem::detail::throw_invalid(fn, "size",
                                    "< max_tokens (" + std::to_string(cfg_.max_tokens) + ")",
                                    std::to_string(size_));
    require_data(fn, "k", k, std::size_t(cfg_.head_dim));
    require_data(fn, "v", v, std::size_t(cfg_.head_dim));
    const std::size_t d = std::size_t(cfg_.head_dim), G = std::size_t(cfg_.group);
    const std::size_t r = std::size_t(size_ - nq_);
    std::copy(k, k + d, rk_.begin() + std::ptrdiff_t(r * d));
    std::copy(v, v + d, rv_.begin() + std::ptrdiff_t(r * d));
    ++size_;
    if (size_ - nq_ == cfg_.residual + cfg_.group) {
      const std::size_t g = std::size_t(nq_) / G;
      std::uint8_t* kc = kcodes_.data() + g * group_bytes_;
      std::uint8_t* vc = vcodes_.data() + g * group_bytes_;
      for (std::size_t c = 0; c < d; ++c) // keys: per channel over the G tokens
        detail::kivi_quant_run(rk_.data() + c, G, d, cfg_.bits, kc, c, d, kscale_[g * d + c],
                               kzero_[g * d + c]);
      const std::size_t vg = d / G;
      for (std::size_t t = 0; t < G; ++t) // values: per token over channel groups of G
        for (std::size_t j = 0; j < vg; ++j)
          detail::kivi_quant_run(rv_.data() + t * d + j * G, G, 1, cfg_.bits, vc, t * d + j * G, 1,
                                 vscale_[(g * G + t) * vg + j], vzero_[(g * G + t) * vg + j]);
      // shift the residual by G tokens
      std::copy(rk_.begin() + std::ptrdiff_t(G * d), rk_.end(), rk_.begin());
      std::copy(rv_.begin() + std::ptrdiff_t(G * d), rv_.end(), rv_.begin());
      nq_ += cfg_.group;
    }
  }

  /// Writes the cache as fp32: K, V [size, d] row-major (quantized tokens dequantized, residual
  /// tokens exact). Memory: none.
  void dequantize(float* K, float* V) const {
    const std::size_t d = std::size_t(cfg_.head_dim), G = std::size_t(cfg_.group), vg = d / G;
    require_data("kivi_cache::dequantize", "K", K, std::size_t(size_) * d);
    require_data("kivi_cache::dequantize", "V", V, std::size_t(size_) * d);
    for (std::size_t g = 0; g < std::size_t(nq_) / G; ++g) {
      const std::uint8_t* kc = kcodes_.data() + g * group_bytes_;
      const std::uint8_t* vc = vcodes_.data() + g * group_bytes_;
      for (std::size_t t = 0; t < G; ++t)
        for (std::size_t c = 0; c < d; ++c) {
          const std::size_t i = t * d + c, row = (g * G + t) * d;
          K[row + c] =
              (float(detail::get_code(kc, i, cfg_.bits)) - kzero_[g * d + c]) * kscale_[g * d + c];
          const std::size_t s = (g * G + t) * vg + c / G;
          V[row + c] = (float(detail::get_code(vc, i, cfg_.bits)) - vzero_[s]) * vscale_[s];
        }
    }
    const std::size_t r = std::size_t(size_ - nq_);
    std::copy(rk_.begin(), rk_.begin() + std::ptrdiff_t(r * d), K + std::size_t(nq_) * d);
    std::copy(rv_.begin(), rv_.begin() + std::ptrdiff_t(r * d), V + std::size_t(nq_) * d);
  }

  /// Bytes in use for the current size (codes + scales/zeros + fp32 residual).
  std::size_t bytes_used() const {
    const std::size_t d = std::size_t(cfg_.head_dim), G = std::size_t(cfg_.group);
    const std::size_t groups = std::size_t(nq_) / G;
    return 2 * groups * group_bytes_ + groups * d * 8 + groups * G * (d / G) * 8 +
           std::size_t(size_ - nq_) * d * 8;
  }

private:
  kivi_config cfg_;
  index_t size_ = 0, nq_ = 0;
  std::size_t group_bytes_ = 0;
  std::vector<std::uint8_t> kcodes_, vcodes_;
  std::vector<float> kscale_, kzero_, vscale_, vzero_, rk_, rv_;
};

} // namespace lowmem::quant
