// AVX-512 helpers shared by the kernels in core: float32/bfloat16 loads and stores (bfloat16
// rounded to nearest even, as c10::BFloat16), tail masks, exp, GELU, SiLU. Internal header:
// functions carry their own target attribute, so callers compile them into AVX-512 code paths
// chosen at run time (cpu_tier() >= CpuTier::avx512, core/cpu.h).
#pragma once

#include "core/cpu.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include <cstdint>

namespace voken::core::simd {

using bf16_bits = uint16_t;

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1u);
}

VOKEN_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
VOKEN_TARGET_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
VOKEN_TARGET_AVX512 inline __m512 load16(const bf16_bits* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
VOKEN_TARGET_AVX512 inline __m512 load16(const bf16_bits* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

VOKEN_TARGET_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
VOKEN_TARGET_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
VOKEN_TARGET_AVX512 inline __m512i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  // NaN stays a (quiet) NaN.
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
}
VOKEN_TARGET_AVX512 inline void store16(bf16_bits* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(round_to_bf16_bits(v)));
}
VOKEN_TARGET_AVX512 inline void store16(bf16_bits* p, __m512 v, __mmask16 m) {
  _mm512_mask_cvtepi32_storeu_epi16(p, m, round_to_bf16_bits(v));
}

// exp(x): Cody-Waite range reduction, Cephes' degree-6 polynomial, scalef (about 1 ulp; inputs
// clamped to [-87, 88]).
VOKEN_TARGET_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  poly = _mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(poly, n);
}

// 1 / d to ~1 ulp: the 14-bit estimate and one Newton step (a division costs several times
// more).
VOKEN_TARGET_AVX512 inline __m512 reciprocal16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// 2^x for x <= 128 (very negative x gives 0; -inf gives NaN, for lanes the caller masks):
// rounding split and a degree-5 Taylor polynomial of 2^f, f in [-1/2, 1/2] (relative error
// < 3e-6), meant for softmax weights that are rounded to bfloat16 anyway.
VOKEN_TARGET_AVX512 inline __m512 exp2_fast16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Exact-form GELU, 0.5 x (1 + erf(x / sqrt(2))), through erfc(z) = t exp(-z^2 + P(t)),
// t = 1 / (1 + z / 2) (Numerical Recipes' erfcc, relative error < 1.2e-7 for all z >= 0).
VOKEN_TARGET_AVX512 inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t =
      _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  const __m512 erfc = _mm512_mul_ps(t, exp16(_mm512_fnmadd_ps(z, z, p)));  // erfc(|x| / sqrt(2))
  const __m512 half_x_erfc = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), erfc);
  // x >= 0: x (1 - erfc / 2); x < 0: erf(x / sqrt 2) = erfc(|x| / sqrt 2) - 1, so x erfc / 2.
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_sub_ps(x, half_x_erfc), negative, half_x_erfc);
}

// x * sigmoid(x).
VOKEN_TARGET_AVX512 inline __m512 silu16(__m512 x) {
  return _mm512_mul_ps(
      x, reciprocal16(_mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
}

}  // namespace voken::core::simd

#endif
