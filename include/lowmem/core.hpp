// lowmem/core.hpp — the foundation: errors and validation, row-major Eigen views, workspace,
// threading, counter-based RNG (and its vectorized fills), bf16, memory accounting, SIMD layer.
#pragma once

#include "core/bf16.hpp"
#include "core/eigen.hpp"
#include "core/errors.hpp"
#include "core/memory.hpp"
#include "core/random.hpp"
#include "core/tensor.hpp"
#include "core/threading.hpp"
#include "core/workspace.hpp"
#include "kernels/random.hpp"
#include "simd/simd.hpp"
