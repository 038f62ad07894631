#!/usr/bin/env bash
# The README's test command: installs what it needs, builds and runs the whole test suite.
# Extra arguments go to cmake's configure step (e.g. -DLOWMEM_SANITIZE="address;undefined").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
build=${LOWMEM_TEST_BUILD_DIR:-build-test}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE="${LOWMEM_TEST_BUILD_TYPE:-Release}" \
      -DLOWMEM_BUILD_TESTS=ON -DLOWMEM_BUILD_BENCH=OFF -DLOWMEM_BUILD_EXAMPLES=ON "$@"
cmake --build "$build" -j"$(nproc)"
ctest --test-dir "$build" -j"$(nproc)" --output-on-failure
