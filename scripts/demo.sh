#!/usr/bin/env bash
# The README's main command: installs what it needs, builds and runs the bundled demo
# (examples/vit_demo.cpp). Extra arguments go to the demo (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DLOWMEM_BUILD_TESTS=OFF \
      -DLOWMEM_BUILD_BENCH=OFF -DLOWMEM_BUILD_EXAMPLES=ON
cmake --build build-demo -j"$(nproc)" --target vit_demo
# Pretrains a small ViT on Fashion-MNIST, fine-tunes it on inverted images (1 - x) with each
# method, prints the table and writes demo-output/{results.csv,accuracy_vs_memory.svg,...}.
./build-demo/examples/vit_demo --out demo-output "$@"
