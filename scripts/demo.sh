#!/usr/bin/env bash
# The README's main command: installs what it needs, builds and runs the bundled demo
# (examples/vit_demo.cpp and, side by side on the other core, the long-sequence run
# examples/char_gpt.cpp). Extra arguments go to vit_demo (e.g. --quick); --quick is passed on to char_gpt too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release -DLOWMEM_BUILD_TESTS=OFF \
      -DLOWMEM_BUILD_BENCH=OFF -DLOWMEM_BUILD_EXAMPLES=ON
cmake --build build-demo -j"$(nproc)" --target vit_demo char_gpt
# Both programs run one thread each (their layers are too small for OpenMP to pay), so on a
# 2-core machine they run side by side, one per core: the whole demo then takes as long as the
# ViT study alone (~9.5 min of the 10-minute budget on 2 quiet cores; run one after the other it
# was ~10.6 min). char_gpt's progress lines (prefixed "tiled step") interleave with vit_demo's on
# stderr; its table is kept in demo-output/gpt_table.md and printed after the ViT table.
mkdir -p demo-output
gpt_args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then gpt_args+=(--quick); fi
done
# The long-sequence run: a character-level GPT on the King James Bible (Debian bible-kjv) at
# sequence length 2048 with lowmem's tiled causal attention, then the same step with naive
# attention; writes demo-output/{gpt_results.csv,gpt_loss.csv,gpt_table.md}.
./build-demo/examples/char_gpt --out demo-output ${gpt_args[@]+"${gpt_args[@]}"} \
  > demo-output/gpt_table.md &
gpt_pid=$!
# Pretrains a small ViT on Fashion-MNIST, fine-tunes it on inverted images (1 - x) with each
# method, prints the table and writes demo-output/{results.csv,accuracy_vs_memory.svg,...}.
vit_status=0
./build-demo/examples/vit_demo --out demo-output "$@" || vit_status=$?
gpt_status=0
wait "$gpt_pid" || gpt_status=$?
cat demo-output/gpt_table.md
if [ "$vit_status" -ne 0 ] || [ "$gpt_status" -ne 0 ]; then
  echo "demo.sh: vit_demo exited with $vit_status, char_gpt with $gpt_status" >&2
  exit 1
fi
