#!/usr/bin/env bash
# The README's main command: installs what it needs, builds and runs the bundled demo
# (examples/vit_demo.cpp, then the long-sequence run examples/char_gpt.cpp). Extra arguments go
# to vit_demo (e.g. --quick); --quick is passed on to char_gpt too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DLOWMEM_BUILD_TESTS=OFF \
      -DLOWMEM_BUILD_BENCH=OFF -DLOWMEM_BUILD_EXAMPLES=ON
cmake --build build-demo -j"$(nproc)" --target vit_demo char_gpt
# Pretrains a small ViT on Fashion-MNIST, fine-tunes it on inverted images (1 - x) with each
# method, prints the table and writes demo-output/{results.csv,accuracy_vs_memory.svg,...}.
./build-demo/examples/vit_demo --out demo-output "$@"
# The long-sequence run: a character-level GPT on the King James Bible (Debian bible-kjv) at
# sequence length 2048 with lowmem's tiled causal attention, then the same step with naive
# attention; prints the table and writes demo-output/{gpt_results.csv,gpt_loss.csv}.
gpt_args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then gpt_args+=(--quick); fi
done
./build-demo/examples/char_gpt --out demo-output ${gpt_args[@]+"${gpt_args[@]}"}
