#!/usr/bin/env bash
# The README's main command: installs what it needs, builds and runs the bundled demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DLOWMEM_BUILD_TESTS=OFF \
      -DLOWMEM_BUILD_BENCH=OFF -DLOWMEM_BUILD_EXAMPLES=ON
cmake --build build-demo -j"$(nproc)" --target quickstart
./build-demo/examples/quickstart
