// y = x W^T for a few rows of x and bfloat16 weights read in place: the LLM decode step (one
// token, or a few forced ones), which is bound by reading every weight once from memory.
//
// The kernel streams W once, widens each bf16 weight to float32 in registers and accumulates in
// float32 against float32 activations, on every CPU tier (the parity goldens expect float32
// activations): AVX-512 (16 lanes; also what the avx512_bf16 and amx tiers run), AVX2 (8 lanes) and
// generic (plain C++ that the compiler vectorizes: SSE2 on x86-64, NEON on ARM64). oneDNN's bf16
// matmul (libtorch 1.13) reaches only a fraction of the memory bandwidth for a single row: it
// re-packs the weights on every call (measured 4-5 GB/s against several times that here).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "core/cpu.h"

namespace voken::core {

// Rows of x up to which the decode kernel is used (more rows are compute-bound: inplace_gemm.h).
constexpr int64_t kGemvMaxRows = 8;

// Whether gemv_bf16 has a kernel at `tier`: every tier up to cpu_tier() has one.
bool gemv_supported(CpuTier tier = cpu_tier());

// ys[i] = x weights[i]^T: x [rows, in] float32 contiguous, each weight [out_i, in] bf16
// contiguous -> [rows, out_i] float32. Weights that share x (q/k/v, gate/up) are computed in one
// parallel pass. Any number of rows (taken kGemvMaxRows at a time). ArgumentError when the tier
// is above cpu_tier() or the arguments do not fit.
std::vector<at::Tensor> gemv_bf16_many(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                       CpuTier tier = cpu_tier());
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, CpuTier tier = cpu_tier());

}  // namespace voken::core
