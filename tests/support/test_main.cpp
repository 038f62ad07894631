// The one Catch2 main of the lowmem test suite; also installs the allocator hooks so tests can
// assert on lowmem::memory regions (no allocation in hot paths, workspace bounds).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <lowmem/core/memory_hooks.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

int main(int argc, char* argv[]) {
#if defined(_OPENMP)
  // The OpenMP runtime initialises itself on its first call, which can be inside a test's
  // no-allocation region (Eigen's GEMM asks for the thread count). LLVM's libomp (clang builds)
  // then loads its OMPT tool (libarcher), which allocates with operator new: initialise it here,
  // once per process, like the C++ runtime. (The thread team is still created by the first
  // parallel region: tests call warm_up_threads() for that.)
  (void)omp_get_max_threads();
#endif
  return Catch::Session().run(argc, argv);
}
