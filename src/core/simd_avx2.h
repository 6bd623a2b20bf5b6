// AVX2 + FMA helpers for the avx2 CPU tier, the 8-wide counterparts of simd_avx512.h: float32 and
// bfloat16 loads and stores (bfloat16 rounded to nearest even, as c10::BFloat16), partial
// (tail) loads and stores, exp, GELU, SiLU, horizontal sums. Internal header: functions carry their
// own target attribute (VOKEN_TARGET_AVX2), so callers compile them into AVX2 code paths chosen at
// run time (cpu_tier() >= CpuTier::avx2, core/cpu.h).
//
// AVX2 has no mask registers: partial vectors go through maskload/maskstore (float32) or a small
// stack buffer (bfloat16), so a tail never reads or writes past its last element.
#pragma once

#include "core/cpu.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace voken::core::simd8 {

using bf16_bits = uint16_t;

// Lane mask for maskload/maskstore: lanes [0, n) set (n clamped to [0, 8]).
VOKEN_TARGET_AVX2 inline __m256i tail_mask(int64_t n) {
  const int count = n <= 0 ? 0 : n >= 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

VOKEN_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
VOKEN_TARGET_AVX2 inline __m256 load8(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, tail_mask(n));
}

// 8 bfloat16 -> 8 float32 (a bfloat16 is the top half of a float32: widen and shift).
VOKEN_TARGET_AVX2 inline __m256 widen_bf16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
VOKEN_TARGET_AVX2 inline __m256 load8(const bf16_bits* p) {
  return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
VOKEN_TARGET_AVX2 inline __m256 load8(const bf16_bits* p, int64_t n) {
  alignas(16) bf16_bits buffer[8] = {};
  if (n > 0) std::memcpy(buffer, p, static_cast<size_t>(n < 8 ? n : 8) * sizeof(bf16_bits));
  return widen_bf16(_mm_load_si128(reinterpret_cast<const __m128i*>(buffer)));
}

// Pairs of bfloat16 (k, k+1) in each 32-bit lane -> the even (k) and odd (k+1) values as float32:
// the "VNNI" pair-interleaved layouts widen without shuffles.
VOKEN_TARGET_AVX2 inline __m256 even_bf16(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
}
VOKEN_TARGET_AVX2 inline __m256 odd_bf16(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

VOKEN_TARGET_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
VOKEN_TARGET_AVX2 inline void store8(float* p, __m256 v, int64_t n) {
  _mm256_maskstore_ps(p, tail_mask(n), v);
}

// 8 float32 -> 8 bfloat16 bits in the low 16 bits of each 32-bit lane, rounded to nearest even;
// NaN stays a quiet NaN.
VOKEN_TARGET_AVX2 inline __m256i round_to_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
// 8 rounded values packed to 8 consecutive bfloat16 (128 bits).
VOKEN_TARGET_AVX2 inline __m128i to_bf16(__m256 v) {
  const __m256i r = round_to_bf16_bits(v);
  // Values are < 2^16, so the unsigned saturating pack keeps them; it packs within 128-bit lanes.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
VOKEN_TARGET_AVX2 inline void store8(bf16_bits* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v));
}
VOKEN_TARGET_AVX2 inline void store8(bf16_bits* p, __m256 v, int64_t n) {
  alignas(16) bf16_bits buffer[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buffer), to_bf16(v));
  if (n > 0) std::memcpy(p, buffer, static_cast<size_t>(n < 8 ? n : 8) * sizeof(bf16_bits));
}

VOKEN_TARGET_AVX2 inline float reduce_add(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
VOKEN_TARGET_AVX2 inline float reduce_max(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// 2^n for integral n in [-126, 127] (as float32 lanes), through the exponent field.
VOKEN_TARGET_AVX2 inline __m256 pow2i(__m256 n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

// exp(x): the same range reduction and polynomial as simd_avx512.h's exp16 (about 1 ulp; inputs
// clamped to [-87, 88]). The clamp keeps n in [-126, 127], where 2^n is a normal float32, so one
// scaling does (scaling by a power of two rounds only where the result is subnormal, once either
// way: the same bits as building 2^n in two halves, for a quarter less work).
VOKEN_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
  poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
  poly = _mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  return _mm256_mul_ps(poly, pow2i(n));
}

// 1 / d to ~1 ulp: the 12-bit estimate and one Newton step.
VOKEN_TARGET_AVX2 inline __m256 reciprocal8(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

// 2^f for f in [-1/2, 1/2]: a degree-5 Taylor polynomial (relative error < 3e-6), as
// simd_avx512.h's exp2_fast16.
VOKEN_TARGET_AVX2 inline __m256 exp2_fraction8(__m256 f) {
  __m256 p = _mm256_set1_ps(1.3333558e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  return _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
}

// 2^x for x <= 128 (very negative x gives 0), relative error < 3e-6: for softmax weights that are
// rounded to bfloat16 anyway (simd_avx512.h's exp2_fast16).
VOKEN_TARGET_AVX2 inline __m256 exp2_fast8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-150.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp2_fraction8(_mm256_sub_ps(x, n));
  const __m256 half = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, pow2i(half)), pow2i(_mm256_sub_ps(n, half)));
  // Below 2^-126 the halves are denormal-free only down to n = -252; flush what is smaller.
  return _mm256_and_ps(result, _mm256_cmp_ps(x, _mm256_set1_ps(-149.0f), _CMP_GT_OQ));
}

// 2^x for x <= 127 with one exponent-field scaling where exp2_fast8 takes two (to reach down to
// 2^-149): x below -126 counts as -126. For softmax weights 2^(s - max) of a row that holds a 2^0:
// terms of 2^-126 and less are nothing next to it. The same bits as exp2_fast8 for x in
// [-126, 127].
VOKEN_TARGET_AVX2 inline __m256 exp2_softmax8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_mul_ps(exp2_fraction8(_mm256_sub_ps(x, n)), pow2i(n));
}

// Exact-form GELU, 0.5 x (1 + erf(x / sqrt(2))), as simd_avx512.h's gelu16 (relative error
// < 1.2e-7 for all x).
VOKEN_TARGET_AVX2 inline __m256 gelu8(__m256 x) {
  const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 z = _mm256_mul_ps(abs_x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 t =
      _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(0.17087277f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.82215223f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.48851587f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.13520398f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.27886807f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.18628806f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.09678418f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.37409196f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.00002368f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.26551223f));
  const __m256 erfc = _mm256_mul_ps(t, exp8(_mm256_fnmadd_ps(z, z, p)));  // erfc(|x| / sqrt(2))
  const __m256 half_x_erfc = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), erfc);
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(x, half_x_erfc), half_x_erfc, negative);
}

// x * sigmoid(x).
VOKEN_TARGET_AVX2 inline __m256 silu8(__m256 x) {
  return _mm256_mul_ps(
      x, reciprocal8(_mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))));
}

}  // namespace voken::core::simd8

#endif
