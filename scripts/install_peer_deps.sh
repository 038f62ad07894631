#!/usr/bin/env bash
# Packages for the PyTorch peers (bench/peers): Debian's torch 1.13 and OpenBLAS (Debian's torch
# calls the system BLAS, which is the slow netlib reference implementation without OpenBLAS).
set -euo pipefail
bash "$(dirname "$0")/install_deps.sh" python3-torch libopenblas0-pthread
