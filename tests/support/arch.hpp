// Runs a kernel test on every compiled SIMD arch the CPU supports.
//
//   LOWMEM_ARCH_TEST_CASE("fill_normal matches the scalar stream", "[random]") {
//     using Arch = TestType;                   // xsimd arch tag
//     for (std::size_t n : lowmem::test::tail_sizes<Arch>()) { ... }
//   }
#pragma once

#include <catch2/catch.hpp>
#include <lowmem/simd/simd.hpp>

#include <cstddef>
#include <vector>

#define LOWMEM_ARCH_TEST_CASE(name, tags)                                                          \
  TEMPLATE_LIST_TEST_CASE(name, tags, lowmem::simd::test_archs)

/// Inside an arch test: skip (with a message) when the CPU lacks the arch.
#define LOWMEM_SKIP_IF_UNSUPPORTED()                                                               \
  do {                                                                                             \
    if (!lowmem::simd::cpu_supports<TestType>()) {                                                 \
      WARN("skipping arch " << TestType::name() << ": not supported by this CPU");                 \
      return;                                                                                      \
    }                                                                                              \
  } while (0)

namespace lowmem::test {

/// Tail sizes for a kernel over floats on Arch: 0, 1, W-1, W, W+1, 2W+1, and an odd large one.
template <class Arch> std::vector<std::size_t> tail_sizes(std::size_t large = 1001) {
  const std::size_t w = simd::width<Arch>;
  return {0, 1, w - 1, w, w + 1, 2 * w + 1, 64 + 3, large};
}

} // namespace lowmem::test
