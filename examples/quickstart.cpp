// lowmem quickstart: the README's 20 lines, compiled and run by ctest (example:quickstart).
#include <lowmem/core/memory_hooks.hpp> // once per program: enables lowmem::memory regions
#include <lowmem/lowmem.hpp>

#include <cstdio>
#include <vector>

int main() {
  // A perturbation for 10M parameters, regenerable slice by slice from (seed, stream).
  const lowmem::random::stream z{/*seed=*/1234, /*stream id=*/0};
  std::vector<float> theta(10'000'000, 0.5f), noise(4096);
  lowmem::memory::region region; // measures heap growth from here
  for (std::size_t b = 0; b < theta.size(); b += noise.size()) {
    const std::size_t n = std::min(noise.size(), theta.size() - b);
    lowmem::random::fill_normal(z, b, noise.data(), n); // values [b, b+n) of the stream
    for (std::size_t i = 0; i < n; ++i) theta[b + i] += 1e-3f * noise[i];
  }
  const long long allocations = region.allocations(); // 0: the fill never touches the heap
  std::printf("perturbed %zu parameters, heap growth %lld bytes, %lld allocations\n", theta.size(),
              (long long)region.peak_bytes(), allocations);
  try { // bad input is rejected before anything is written, naming the argument
    lowmem::require_positive("quickstart", "epsilon", -1e-3);
  } catch (const lowmem::invalid_argument& e) {
    std::printf("%s\n", e.what());
  }
  return allocations == 0 ? 0 : 1;
}
