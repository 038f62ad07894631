#!/usr/bin/env bash
# Installs the Debian 12 packages lowmem's build needs, only those missing. Run as root (or with
# sudo available). Usage: scripts/install_deps.sh [extra package ...]
set -euo pipefail
packages=(g++ cmake make libeigen3-dev libxsimd-dev catch2 libbenchmark-dev zlib1g-dev
          dataset-fashion-mnist nlohmann-json3-dev bible-kjv bible-kjv-text "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "lowmem: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
