// lowmem/quant.hpp — quantizers: the formats that shrink frozen weights, activations and caches,
// the fake-quant ops of quantization-aware training, Hadamard rotation, and linear kernels that
// multiply by a quantized weight without expanding it to fp32 (the base of QLoRA on CPU).
//
// Papers: QLoRA (NF4, double quantization) arXiv:2305.14314; LSQ (learned step size)
// arXiv:1902.08153; FP8 formats (OCP / "FP8 Formats for Deep Learning") arXiv:2209.05433;
// Hadamard rotation before quantization (QuaRot) arXiv:2404.00456; KIVI (KV cache)
// arXiv:2402.02750; LLM.int8() arXiv:2208.07339; SpQR (bilevel group statistics + sparse fp32
// outliers) arXiv:2306.03078.
//
// Headers:
//   quant/formats.hpp   affine int8/int4, NF4/FP4 + double quantization, FP8 e4m3/e5m2
//   quant/llm_int8.hpp int8×int8→int32 GEMM (AVX512-VNNI) and the LLM.int8() outlier decomposition
//   quant/qat.hpp       fake-quant forward / straight-through backward, LSQ
//   quant/hadamard.hpp  fast Walsh–Hadamard transform with random signs (and blocked variant)
//   quant/kivi.hpp     KIVI 2/4-bit KV cache (keys per-channel, values per-token, fp32 residual)
//   quant/linear.hpp    y = x·deq(W)ᵀ and dx = dy·deq(W) for int8 / int4 / NF4 weights; int8 GEMV
//                       with dynamically quantized activations (VNNI)
//   quant/spqr.hpp      SpQR: 2–4-bit groups, 3-bit quantized scales/zeros, CSR fp32 outliers;
//                       quantize (leave-one-out sensitivity), dequantize, GEMV fwd/bwd
//   quant/serialize.hpp a self-describing byte format for quantized tensors, with a validating
//                       decoder for untrusted bytes
#pragma once

#include "quant/formats.hpp"
#include "quant/hadamard.hpp"
#include "quant/kivi.hpp"
#include "quant/linear.hpp"
#include "quant/llm_int8.hpp"
#include "quant/qat.hpp"
#include "quant/serialize.hpp"
#include "quant/spqr.hpp"
