// The one Catch2 main of the lowmem test suite; also installs the allocator hooks so tests can
// assert on lowmem::memory regions (no allocation in hot paths, workspace bounds).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#include <lowmem/core/memory_hooks.hpp>
