// Group norm, layer norm, softmax, GEGLU and few-row bfloat16 linear kernels for float32 and bfloat16
// activations on CPU.
//
// Why not at::group_norm / at::layer_norm: in libtorch 1.13 (CPU) their bfloat16 kernels lose
// precision badly (max errors of 5-20 for a channels-last group norm over 64x64 maps, >1 for a
// layer norm of rows with an offset of 100), and the float32 channels-last group norm computes
// var = E[x^2] - E[x]^2 in float32 (1e-2 errors for offset inputs). These kernels accumulate
// shifted sums in float32 over short runs and in float64 across runs, read either memory order
// (NCHW or NHWC) without reordering, and can apply SiLU in the same pass.
#pragma once

#include <ATen/core/Tensor.h>

namespace voken::core {

// x: [B, C, *spatial] float32 or bfloat16, NCHW-contiguous or channels-last (other strides are
// made contiguous first). weight, bias: [C] (any float dtype). Returns x's dtype and memory order.
at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      double eps, bool silu);
// The same, writing over x (which must be NCHW-contiguous or channels-last): no new allocation,
// which matters for the VAE's 512x512 maps (each fresh buffer is mmap'd and page-faulted).
void group_norm_(at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                 bool silu);

// Over the last dimension. x: float32 or bfloat16 (made contiguous). Returns x's dtype.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// softmax over the last dimension, in place, for a contiguous float32 or bfloat16 tensor; float32
// arithmetic. (libtorch 1.13's CPU softmax runs at about a tenth of memory speed on bfloat16
// attention scores, which made it the largest single cost of a 64x64-latent UNet step.)
void softmax_lastdim_(at::Tensor& x);

// GEGLU: projected [..., 2*inner] (the value half, then the gate half; float32 or bfloat16, made
// contiguous) -> value * gelu(gate) [..., inner] in the same dtype; GELU is the exact (erf) one,
// here to ~2e-7 relative. One pass instead of libtorch's erf GELU (which alone took ~5% of a
// bfloat16 UNet step) plus a multiply.
at::Tensor geglu(const at::Tensor& projected);

// y = x W^T + b for a few rows: x float32 [rows, in], W bfloat16 [out, in] contiguous, b float32
// [out] or undefined -> float32 [rows, out]. Reads W once, at memory speed; oneDNN's bfloat16
// matmul repacks W on every call, ~10x slower at two rows. Requires the avx512 tier or above.
at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// Whether few_rows_linear_bf16 is available here.
bool has_few_rows_linear_bf16();

// LayerNorm over the last dimension of a bf16 x [..., C] (unit stride in the last dimension),
// computed in float32 (two-pass mean and variance), weight/bias [C] of any float dtype (or
// undefined), the result rounded once to bf16, as at::layer_norm(x.float(), ...).bfloat16()
// computes it. Falls back to exactly that on CPUs without AVX-512.
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace voken::core
