// Elementwise/row kernels around the AMX products for bf16 activations, where libtorch 1.13's
// own bf16 CPU kernels are slow (its bf16 LayerNorm runs ~10x slower than the float32 one).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>

namespace voken::core {

// float -> bfloat16 bits, rounded to nearest even as c10::BFloat16 does; NaN stays a quiet NaN.
inline uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// LayerNorm over the last dimension of a bf16 x [..., C] (unit stride in the last dimension),
// computed in float32 (two-pass mean and variance), weight/bias [C] of any float dtype (or
// undefined), the result rounded once to bf16, as at::layer_norm(x.float(), ...).bfloat16()
// computes it. Falls back to exactly that on CPUs without AVX-512.
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace voken::core
