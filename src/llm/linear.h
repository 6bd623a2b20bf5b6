// The one matrix product of the LLaMA forward, y = x W^T, with the CPU path chosen per call (the
// kernels live in src/core; this file only picks):
//
//  - float32 weights: at::linear (BLAS sgemm/sgemv), what the fp32 parity goldens are made with.
//  - bfloat16 weights, few rows (decoding): core::gemv_bf16, which streams W once at memory
//    speed, widening each weight to float32 against the float32 activations.
//  - bfloat16 weights, many rows (prefill): core::inplace_linear, which reads the weights in place
//    (mmapped checkpoints are not copied), rounds x to bf16 and returns the float32 sums (no bf16
//    rounding of the result).
//  - where the CPU tier has neither kernel: at::linear on bf16-rounded x, its bf16 result widened
//    back to float32.
//
// Activations stay float32 in every case (as llama.cpp does); only weights are bf16.
// dense_many computes several products of the same x (q/k/v, gate/up) in one parallel pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace voken::llm {

// x: [..., in] float32; weight: [out, in] float32 or bfloat16 (contiguous). Returns [..., out]
// float32.
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight);

// ys[i] = dense(x, weights[i]) for weights that share the input (q/k/v, gate/up): bf16 weights
// are computed in one parallel pass (x converted/packed once, one thread synchronisation).
std::vector<at::Tensor> dense_many(const at::Tensor& x, const std::vector<at::Tensor>& weights);

}  // namespace voken::llm
