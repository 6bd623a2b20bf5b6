// Group norm and layer norm kernels for float32 and bfloat16 activations on CPU.
//
// Why not at::group_norm / at::layer_norm: in libtorch 1.13 (CPU) their bfloat16 kernels lose
// precision badly (max errors of 5-20 for a channels-last group norm over 64x64 maps, >1 for a
// layer norm of rows with an offset of 100), and the float32 channels-last group norm computes
// var = E[x^2] - E[x]^2 in float32 (1e-2 errors for offset inputs). These kernels accumulate
// shifted sums in float32 over short runs and in float64 across runs, read either memory order
// (NCHW or NHWC) without reordering, and can apply SiLU in the same pass.
#pragma once

#include <ATen/core/Tensor.h>

namespace voken::diffusion {

// x: [B, C, *spatial] float32 or bfloat16, NCHW-contiguous or channels-last (other strides are
// made contiguous first). weight, bias: [C] (any float dtype). Returns x's dtype and memory order.
at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      double eps, bool silu);

// Over the last dimension. x: float32 or bfloat16 (made contiguous). Returns x's dtype.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace voken::diffusion
