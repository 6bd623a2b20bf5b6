// The one matrix product of the LLaMA forward, y = x W^T, with the CPU path chosen per call:
//
//  - float32 weights: at::linear (BLAS sgemm/sgemv), what the fp32 parity goldens are made with.
//  - bfloat16 weights, few rows (decoding): a fused kernel that streams W once, widens each bf16
//    weight to float32 in registers and accumulates in float32 against the float32 activations.
//    Decoding is bound by reading the weights, and oneDNN's bf16 matmul (AMX brgemm) reaches only
//    a fraction of the memory bandwidth for a single row (measured: 4-5 GB/s against ~2-4x that
//    for this kernel on the same machine).
//  - bfloat16 weights, many rows (prefill), on an AMX CPU: core::amx_linear, which reads the
//    weights in place (mmapped checkpoints are not copied), rounds x to bf16 and returns the
//    float32 sums (no bf16 rounding of the result). Without AMX: at::linear on bf16-rounded x
//    (oneDNN), its bf16 result widened back to float32.
//
// Activations stay float32 in every case (as llama.cpp does); only weights are bf16.
// dense_many computes several products of the same x (q/k/v, gate/up) in one parallel pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace voken::llm {

// Rows of x up to which bf16 weights go through the streaming kernel rather than oneDNN.
constexpr int64_t kStreamingKernelMaxRows = 8;

// x: [..., in] float32; weight: [out, in] float32 or bfloat16 (contiguous). Returns [..., out]
// float32.
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight);

// ys[i] = dense(x, weights[i]) for weights that share the input (q/k/v, gate/up): bf16 weights
// are computed in one parallel pass (x converted/packed once, one thread synchronisation).
std::vector<at::Tensor> dense_many(const at::Tensor& x, const std::vector<at::Tensor>& weights);

// Whether this CPU runs the streaming bf16 kernel (AVX-512 F/BW/VL); otherwise bf16 weights
// always go through at::linear.
bool has_streaming_bf16_kernel();

// The streaming kernel itself, for tests and benchmarks: x [rows, in] float32 contiguous,
// weight [out, in] bf16 contiguous -> [rows, out] float32. Throws ArgumentError when the CPU
// lacks the instructions or the arguments do not fit.
at::Tensor streaming_bf16_linear(const at::Tensor& x, const at::Tensor& weight);
std::vector<at::Tensor> streaming_bf16_linear_many(const at::Tensor& x,
                                                   const std::vector<at::Tensor>& weights);

}  // namespace voken::llm
