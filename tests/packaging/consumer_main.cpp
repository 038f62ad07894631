// A consumer of lowmem: includes the umbrella header, uses the RNG, a view and the error type.
#include <lowmem/lowmem.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> z(1000);
  lowmem::random::fill_normal(lowmem::random::stream{1, 2}, 0, z.data(), z.size());
  double mean = 0;
  for (float v : z) mean += v;
  mean /= double(z.size());
  try {
    lowmem::require_positive("consumer", "n", 0);
    return 1; // must have thrown
  } catch (const lowmem::invalid_argument& e) {
    std::printf("caught: %s\n", e.what());
  }
  std::printf("lowmem consumer ok: mean of 1000 normals = %.3f\n", mean);
  return (mean > -0.2 && mean < 0.2) ? 0 : 1;
}
