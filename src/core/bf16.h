// Scalar bfloat16 conversions shared by the kernels (the vector ones are in simd_avx512.h).
#pragma once

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

}  // namespace voken::core
