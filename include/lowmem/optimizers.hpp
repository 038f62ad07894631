// lowmem/optimizers.hpp — memory-light first-order optimizers (family header).
//
//  * optimizers/fused.hpp (no Eigen): fused AdamW / Adam (PyTorch 1.13 formulas,
//    arXiv:1711.05101), SGD with momentum / dampening / Nesterov, Lion (arXiv:2302.06675), fp32 or
//    bf16 parameters (stochastic rounding); 8-bit AdamW and Lion with block-wise dynamic
//    quantization (arXiv:2110.02861, bitsandbytes' codebooks); 4-bit AdamW (arXiv:2309.01507).
//  * optimizers/projected.hpp (Eigen): GaLore (arXiv:2403.03507) with Q-GaLore's int8
//    projection and lazy layer-wise refresh (arXiv:2407.08296), APOLLO and APOLLO-Mini
//    (arXiv:2412.05270), FRUGAL (arXiv:2411.07837).
//  * optimizers/lisa.hpp: LISA layer sampling (arXiv:2403.17919).
#pragma once

#include "optimizers/fused.hpp"
#include "optimizers/lisa.hpp"
#include "optimizers/projected.hpp"
