// lowmem/optimizers/lisa.hpp — LISA layer sampler (Pan et al., arXiv:2403.17919).
//
// Every K steps LISA freezes all but γ of the L middle layers (embedding and head always train),
// so optimizer state exists only for the active layers. The sampler draws the active set from the
// core counter RNG: period p = (t − 1) / K uses stream (seed, p), whose 32-bit values, mapped to
// [0, L) by multiply-shift, are taken in order skipping repeats until γ distinct layers are drawn
// (uniform over γ-subsets), then sorted. It is a pure function of (seed, period): a
// restarted job resumes with the same layers. The trainer asks `active(t)` each step and, when
// `switched(t)` is true, frees the optimizer state of layers that left the set and zero-initialises
// the state of layers that joined (LISA resets the state of re-activated layers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../core/errors.hpp"
#include "../core/random.hpp"

namespace lowmem::optim {

class lisa_sampler {
public:
  /// layers L (middle layers), gamma active at a time (1 <= gamma <= L), period K >= 1.
  lisa_sampler(int layers, int gamma, std::int64_t period, std::uint64_t seed = 0)
      : layers_(layers), gamma_(gamma), period_(period), seed_(seed) {
    const char* fn = "optim::lisa_sampler";
    require_positive(fn, "layers", layers);
    require(gamma >= 1 && gamma <= layers, fn, "gamma", "in [1, layers]", gamma);
    require(period >= 1, fn, "period", ">= 1", period);
  }

  /// Sorted indices of the active middle layers at step t (t >= 1). Allocates the result vector.
  std::vector<int> active(std::int64_t t) const {
    std::vector<int> out(static_cast<std::size_t>(gamma_));
    active(t, out.data());
    return out;
  }
  /// Allocation-free form: writes gamma sorted indices to out.
  void active(std::int64_t t, int* out) const {
    require(t >= 1, "optim::lisa_sampler::active", "t", ">= 1", t);
    const random::stream s{seed_, std::uint64_t((t - 1) / period_)};
    // rejection sampling of gamma distinct indices (gamma <= L; expected draws <= L·H_L)
    int count = 0;
    for (std::uint64_t i = 0; count < gamma_; ++i) {
      const int c = int(std::uint64_t(s.bits(i)) * std::uint64_t(layers_) >> 32);
      if (std::find(out, out + count, c) == out + count) out[count++] = c;
    }
    std::sort(out, out + count);
  }
  /// True when step t starts a new sampling period (the active set may change).
  bool switched(std::int64_t t) const noexcept { return t >= 1 && (t - 1) % period_ == 0; }
  /// Whether middle layer `layer` is active at step t.
  bool is_active(std::int64_t t, int layer) const {
    std::vector<int> a = active(t);
    return std::binary_search(a.begin(), a.end(), layer);
  }
  int layers() const noexcept { return layers_; }
  int gamma() const noexcept { return gamma_; }

private:
  int layers_, gamma_;
  std::int64_t period_;
  std::uint64_t seed_;
};

} // namespace lowmem::optim
