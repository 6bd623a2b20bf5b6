// Scalar bfloat16 conversions shared by the kernels (the vector ones are in simd_avx2.h and
// simd_avx512.h). Plain C++ that GCC vectorizes in the generic kernels' loops.
#pragma once

#include <cstdint>
#include <cstring>

namespace voken::core {

// bfloat16 bits -> float (exact: a bfloat16 is the top half of a float32).
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// float -> bfloat16 bits, rounded to nearest even as c10::BFloat16 does; NaN stays a quiet NaN.
inline uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace voken::core
