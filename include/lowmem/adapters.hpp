// lowmem/adapters.hpp — low-rank and sparse adapters around a frozen weight: fused forward and
// backward kernels that never form a full-size weight gradient or an in×out temporary.
//
// Papers: LoRA arXiv:2106.09685, rsLoRA arXiv:2312.03732, DoRA arXiv:2402.09353,
// VeRA arXiv:2310.11454, SHiRA arXiv:2406.13175, SLTrain arXiv:2406.02214,
// Kronecker adapters (Compacter) arXiv:2106.04647, PiSSA arXiv:2404.02948,
// LoRA-GA arXiv:2407.05000.
// Conventions follow PyTorch/peft: W [out, in] row-major, y = x·Wᵀ (+ b), A [r, in], B [out, r].
#pragma once

#include "adapters/common.hpp"
#include "adapters/dora.hpp"
#include "adapters/init.hpp"
#include "adapters/kronecker.hpp"
#include "adapters/lora.hpp"
#include "adapters/multi_lora.hpp"
#include "adapters/sparse.hpp"
#include "adapters/vera.hpp"
