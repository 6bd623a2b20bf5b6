// Elementwise/row kernels around the AMX products for bf16 activations, where libtorch 1.13's
// own bf16 CPU kernels are slow (its bf16 LayerNorm runs ~10x slower than the float32 one).
#pragma once

#include <ATen/core/Tensor.h>

namespace voken::core {

// LayerNorm over the last dimension of a bf16 x [..., C] (unit stride in the last dimension),
// computed in float32 (two-pass mean and variance), weight/bias [C] of any float dtype (or
// undefined), the result rounded once to bf16, as at::layer_norm(x.float(), ...).bfloat16()
// computes it. Falls back to exactly that on CPUs without AVX-512.
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace voken::core
