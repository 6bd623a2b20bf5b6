#include "core/norm_kernels.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/cpu.h"
#include "core/gemv.h"
#include "core/parallel.h"
#include "core/simd_avx2.h"
#include "core/simd_avx512.h"
#include "voken/error.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core {
namespace {

using bf16_bits = uint16_t;

// The instruction set the row loops below run at, for a tier.
enum class Isa { generic, avx2, avx512 };

Isa isa_for(CpuTier tier, const char* function) {
  if (tier > cpu_tier())
    throw ArgumentError(std::string(function) + ": CPU tier " + tier_name(tier) +
                        " is above this process's tier " + tier_name(cpu_tier()));
#ifdef VOKEN_X86_KERNELS
  if (tier >= CpuTier::avx512) return Isa::avx512;
  if (tier >= CpuTier::avx2) return Isa::avx2;
#endif
  return Isa::generic;
}

// ---- generic: plain C++ the compiler vectorizes (no libm calls in the loops) --------------------

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) { return bf16_bits_to_float(v); }
inline void store(float* p, float v) { *p = v; }
inline void store(bf16_bits* p, float v) { *p = float_to_bf16_bits(v); }

// exp(x) with simd_avx512.h's exp16 range reduction and polynomial (about 1 ulp; inputs clamped to
// [-87, 88] as there, so 2^n stays a normal float32).
//
// Written so that GCC vectorizes loops that call it: no libm call, and no floating-point branch.
// Clamping with two float comparisons lets GCC's jump threading split the loop body into paths
// (the clamped ones fold to constants), and the float arithmetic left on the other path may trap
// (-ftrapping-math), so it can no longer be if-converted: "control flow in loop". The clamp is
// therefore an unsigned minimum of |x|'s bits (monotonic for non-negative floats) against the
// bound of x's sign; a NaN comes out as a bound, as from the min/max of the vector versions.
inline float exp_poly(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t limit = sign ? 0x42AE0000u : 0x42B00000u;  // 87.0f, 88.0f
  const uint32_t clamped = std::min(bits & 0x7FFFFFFFu, limit) | sign;
  std::memcpy(&x, &clamped, sizeof x);
  // Round to nearest by adding and removing 1.5 * 2^23 (exact here: |x log2 e| < 2^22); nearbyint
  // would be a libm call on the x86-64 baseline.
  constexpr float kRoundingShift = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRoundingShift) - kRoundingShift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = (poly * r) * r + (r + 1.0f);
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return poly * scale;
}

// Exact-form GELU through erfc, as simd_avx512.h's gelu16: with h = |x| erfc(|x| / sqrt 2) / 2,
// GELU(x) = x - h for x >= 0 and -h for x < 0, i.e. max(x, 0) - h (a select of existing values,
// which GCC if-converts; see exp_poly).
inline float gelu_poly(float x) {
  const float abs_x = std::fabs(x);
  const float z = abs_x * 0.70710678118654752f;
  const float t = 1.0f / (z * 0.5f + 1.0f);
  float p = 0.17087277f;
  p = p * t + -0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t + -1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t + -0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t + -1.26551223f;
  const float half_abs_x_erfc = 0.5f * abs_x * (t * exp_poly(p - z * z));
  return std::max(x, 0.0f) - half_abs_x_erfc;
}

inline float silu_poly(float x) { return x / (1.0f + exp_poly(-x)); }

constexpr int kGenericLanes = 16;

// Sum of 16 lanes, pairwise (the order of _mm512_reduce_add_ps).
inline float reduce_lanes(float* lanes) {
  for (int width = kGenericLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// s1[c] += x[c] - shift[c]; s2[c] += (x[c] - shift[c])^2 over one NHWC pixel row.
template <typename T>
void accumulate_channels_generic(const T* x, const float* shift, float* s1, float* s2, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const float d = to_float(x[c]) - shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// Shifted sum and sum of squares of a contiguous run (float partials over <= 4096 values).
template <typename T>
void accumulate_run_generic(const T* x, int64_t n, float shift, double& sum, double& sum_sq) {
  float s1[kGenericLanes] = {}, s2[kGenericLanes] = {};
  int64_t i = 0;
  for (; i + kGenericLanes <= n; i += kGenericLanes)
    for (int l = 0; l < kGenericLanes; ++l) {
      const float d = to_float(x[i + l]) - shift;
      s1[l] += d;
      s2[l] += d * d;
    }
  for (int l = 0; i + l < n; ++l) {
    const float d = to_float(x[i + l]) - shift;
    s1[l] += d;
    s2[l] += d * d;
  }
  sum += reduce_lanes(s1);
  sum_sq += reduce_lanes(s2);
}

// y[i] = x[i] * scale[i] + offset[i] (then SiLU) over a row with per-element factors.
template <bool kSilu, typename T>
void affine_row_generic(const T* x, T* y, const float* scale, const float* offset, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]) * scale[i] + offset[i];
    store(y + i, kSilu ? silu_poly(v) : v);
  }
}

// y[i] = x[i] * scale + offset (then SiLU) over a plane.
template <bool kSilu, typename T>
void affine_plane_generic(const T* x, T* y, float scale, float offset, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]) * scale + offset;
    store(y + i, kSilu ? silu_poly(v) : v);
  }
}

// Softmax of one row into `out` (which may be `x`), through a float scratch row.
template <typename T>
void softmax_row_generic(const T* x, T* out, float* scratch, int64_t n) {
  float lane_max[kGenericLanes];
  std::fill(lane_max, lane_max + kGenericLanes, -INFINITY);
  int64_t i = 0;
  for (; i + kGenericLanes <= n; i += kGenericLanes)
    for (int l = 0; l < kGenericLanes; ++l) lane_max[l] = std::max(lane_max[l], to_float(x[i + l]));
  for (int l = 0; i + l < n; ++l) lane_max[l] = std::max(lane_max[l], to_float(x[i + l]));
  float max = lane_max[0];
  for (int l = 1; l < kGenericLanes; ++l) max = std::max(max, lane_max[l]);
  float lane_sum[kGenericLanes] = {};
  for (i = 0; i + kGenericLanes <= n; i += kGenericLanes)
    for (int l = 0; l < kGenericLanes; ++l) {
      const float e = exp_poly(to_float(x[i + l]) - max);
      scratch[i + l] = e;
      lane_sum[l] += e;
    }
  for (int l = 0; i + l < n; ++l) {
    const float e = exp_poly(to_float(x[i + l]) - max);
    scratch[i + l] = e;
    lane_sum[l] += e;
  }
  const float inv = 1.0f / reduce_lanes(lane_sum);
  for (i = 0; i < n; ++i) store(out + i, scratch[i] * inv);
}

// out[i] = value[i] * gelu(gate[i]).
template <typename T>
void geglu_row_generic(const T* value, const T* gate, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(out + i, to_float(value[i]) * gelu_poly(to_float(gate[i])));
}

// The vision LayerNorm (layer_norm_bf16) over rows [begin, end): float32 two-pass mean and
// variance, ((x - mean) * rstd) * w + b, rounded once. weight and bias hold C values (ones and
// zeros when the caller has none: multiplying by 1 and adding 0 are exact).
void layer_norm_bf16_rows_generic(const bf16_bits* x, int64_t ldx, bf16_bits* y, int64_t ldy,
                                  const float* weight, const float* bias, int64_t channels, float eps,
                                  int64_t begin, int64_t end) {
  const float inverse_count = 1.0f / static_cast<float>(channels);
  for (int64_t r = begin; r < end; ++r) {
    const bf16_bits* row = x + r * ldx;
    float lanes[kGenericLanes] = {};
    int64_t c = 0;
    for (; c + kGenericLanes <= channels; c += kGenericLanes)
      for (int l = 0; l < kGenericLanes; ++l) lanes[l] += to_float(row[c + l]);
    for (int l = 0; c + l < channels; ++l) lanes[l] += to_float(row[c + l]);
    const float mean = reduce_lanes(lanes) * inverse_count;
    std::fill(lanes, lanes + kGenericLanes, 0.0f);
    for (c = 0; c + kGenericLanes <= channels; c += kGenericLanes)
      for (int l = 0; l < kGenericLanes; ++l) {
        const float d = to_float(row[c + l]) - mean;
        lanes[l] += d * d;
      }
    for (int l = 0; c + l < channels; ++l) {
      const float d = to_float(row[c + l]) - mean;
      lanes[l] += d * d;
    }
    const float rstd = 1.0f / std::sqrt(reduce_lanes(lanes) * inverse_count + eps);
    bf16_bits* out = y + r * ldy;
    for (c = 0; c < channels; ++c) store(out + c, (to_float(row[c]) - mean) * rstd * weight[c] + bias[c]);
  }
}

// ---- avx2: 8 lanes (simd_avx2.h); tails through partial loads and stores ------------------------

#ifdef VOKEN_X86_KERNELS

// Lanes [0, n) of v, zeros elsewhere.
VOKEN_TARGET_AVX2 inline __m256 keep_lanes(__m256 v, int64_t n) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(simd8::tail_mask(n)));
}

template <typename T>
VOKEN_TARGET_AVX2 void accumulate_channels_avx2(const T* x, const float* shift, float* s1, float* s2,
                                                int64_t channels) {
  int64_t c = 0;
  for (; c + 8 <= channels; c += 8) {
    const __m256 d = _mm256_sub_ps(simd8::load8(x + c), simd8::load8(shift + c));
    simd8::store8(s1 + c, _mm256_add_ps(simd8::load8(s1 + c), d));
    simd8::store8(s2 + c, _mm256_fmadd_ps(d, d, simd8::load8(s2 + c)));
  }
  if (c < channels) {
    const int64_t n = channels - c;
    const __m256 d = _mm256_sub_ps(simd8::load8(x + c, n), simd8::load8(shift + c, n));
    simd8::store8(s1 + c, _mm256_add_ps(simd8::load8(s1 + c, n), d), n);
    simd8::store8(s2 + c, _mm256_fmadd_ps(d, d, simd8::load8(s2 + c, n)), n);
  }
}

template <typename T>
VOKEN_TARGET_AVX2 void accumulate_run_avx2(const T* x, int64_t n, float shift, double& sum, double& sum_sq) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(simd8::load8(x + i), s);
    a1 = _mm256_add_ps(a1, d);
    a2 = _mm256_fmadd_ps(d, d, a2);
  }
  if (i < n) {
    const __m256 d = keep_lanes(_mm256_sub_ps(simd8::load8(x + i, n - i), s), n - i);
    a1 = _mm256_add_ps(a1, d);
    a2 = _mm256_fmadd_ps(d, d, a2);
  }
  sum += simd8::reduce_add(a1);
  sum_sq += simd8::reduce_add(a2);
}

template <typename T>
VOKEN_TARGET_AVX2 void affine_row_avx2(const T* x, T* y, const float* scale, const float* offset, int64_t n,
                                       bool apply_silu) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    __m256 v;
    if (left >= 8)
      v = _mm256_fmadd_ps(simd8::load8(x + i), simd8::load8(scale + i), simd8::load8(offset + i));
    else
      v = _mm256_fmadd_ps(simd8::load8(x + i, left), simd8::load8(scale + i, left),
                          simd8::load8(offset + i, left));
    if (apply_silu) v = simd8::silu8(v);
    if (left >= 8)
      simd8::store8(y + i, v);
    else
      simd8::store8(y + i, v, left);
  }
}

template <typename T>
VOKEN_TARGET_AVX2 void affine_plane_avx2(const T* x, T* y, float scale, float offset, int64_t n,
                                         bool apply_silu) {
  const __m256 a = _mm256_set1_ps(scale), b = _mm256_set1_ps(offset);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t left = n - i;
    __m256 v = _mm256_fmadd_ps(left >= 8 ? simd8::load8(x + i) : simd8::load8(x + i, left), a, b);
    if (apply_silu) v = simd8::silu8(v);
    if (left >= 8)
      simd8::store8(y + i, v);
    else
      simd8::store8(y + i, v, left);
  }
}

template <typename T>
VOKEN_TARGET_AVX2 void softmax_row_avx2(const T* x, T* out, float* scratch, int64_t n) {
  const __m256 minus_infinity = _mm256_set1_ps(-INFINITY);
  __m256 vmax = minus_infinity;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, simd8::load8(x + i));
  if (i < n) {
    const __m256 v = _mm256_blendv_ps(minus_infinity, simd8::load8(x + i, n - i),
                                      _mm256_castsi256_ps(simd8::tail_mask(n - i)));
    vmax = _mm256_max_ps(vmax, v);
  }
  const __m256 max = _mm256_set1_ps(simd8::reduce_max(vmax));
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = simd8::exp8(_mm256_sub_ps(simd8::load8(x + i), max));
    simd8::store8(scratch + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  if (i < n) {
    const __m256 e = keep_lanes(simd8::exp8(_mm256_sub_ps(simd8::load8(x + i, n - i), max)), n - i);
    simd8::store8(scratch + i, e, n - i);
    vsum = _mm256_add_ps(vsum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / simd8::reduce_add(vsum));
  for (i = 0; i + 8 <= n; i += 8) simd8::store8(out + i, _mm256_mul_ps(simd8::load8(scratch + i), inv));
  if (i < n) simd8::store8(out + i, _mm256_mul_ps(simd8::load8(scratch + i, n - i), inv), n - i);
}

template <typename T>
VOKEN_TARGET_AVX2 void geglu_row_avx2(const T* value, const T* gate, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    simd8::store8(out + i, _mm256_mul_ps(simd8::load8(value + i), simd8::gelu8(simd8::load8(gate + i))));
  if (i < n)
    simd8::store8(out + i,
                  _mm256_mul_ps(simd8::load8(value + i, n - i), simd8::gelu8(simd8::load8(gate + i, n - i))),
                  n - i);
}

VOKEN_TARGET_AVX2 void layer_norm_bf16_rows_avx2(const bf16_bits* x, int64_t ldx, bf16_bits* y, int64_t ldy,
                                                 const float* weight, const float* bias, int64_t channels,
                                                 float eps, int64_t begin, int64_t end) {
  const float inverse_count = 1.0f / static_cast<float>(channels);
  const int64_t full = channels / 8 * 8;
  const int64_t left = channels - full;
  for (int64_t r = begin; r < end; ++r) {
    const bf16_bits* row = x + r * ldx;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8) sum = _mm256_add_ps(sum, simd8::load8(row + c));
    if (left > 0) sum = _mm256_add_ps(sum, simd8::load8(row + full, left));
    const __m256 mean = _mm256_set1_ps(simd8::reduce_add(sum) * inverse_count);
    __m256 squares = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 d = _mm256_sub_ps(simd8::load8(row + c), mean);
      squares = _mm256_fmadd_ps(d, d, squares);
    }
    if (left > 0) {
      const __m256 d = keep_lanes(_mm256_sub_ps(simd8::load8(row + full, left), mean), left);
      squares = _mm256_fmadd_ps(d, d, squares);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(simd8::reduce_add(squares) * inverse_count + eps));
    bf16_bits* out = y + r * ldy;
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(simd8::load8(row + c), mean), rstd);
      simd8::store8(out + c,
                    _mm256_add_ps(_mm256_mul_ps(v, simd8::load8(weight + c)), simd8::load8(bias + c)));
    }
    if (left > 0) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(simd8::load8(row + full, left), mean), rstd);
      simd8::store8(
          out + full,
          _mm256_add_ps(_mm256_mul_ps(v, simd8::load8(weight + full, left)), simd8::load8(bias + full, left)),
          left);
    }
  }
}

// ---- avx512: 16 lanes (simd_avx512.h); tails through masks ---------------------------------------

using simd::load16;
using simd::store16;
using simd::tail_mask;

template <typename T>
VOKEN_TARGET_AVX512 void accumulate_channels_avx512(const T* x, const float* shift, float* s1, float* s2,
                                                    int64_t channels) {
  for (int64_t c = 0; c < channels; c += 16) {
    const __mmask16 m = tail_mask(channels - c);
    const __m512 d = _mm512_sub_ps(load16(x + c, m), load16(shift + c, m));
    store16(s1 + c, _mm512_add_ps(load16(s1 + c, m), d), m);
    store16(s2 + c, _mm512_fmadd_ps(d, d, load16(s2 + c, m)), m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void accumulate_run_avx512(const T* x, int64_t n, float shift, double& sum,
                                               double& sum_sq) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, load16(x + i, m), s);
    a1 = _mm512_add_ps(a1, d);
    a2 = _mm512_fmadd_ps(d, d, a2);
  }
  sum += _mm512_reduce_add_ps(a1);
  sum_sq += _mm512_reduce_add_ps(a2);
}

template <typename T>
VOKEN_TARGET_AVX512 void affine_row_avx512(const T* x, T* y, const float* scale, const float* offset,
                                           int64_t n, bool apply_silu) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(load16(x + i, m), load16(scale + i, m), load16(offset + i, m));
    if (apply_silu) v = simd::silu16(v);
    store16(y + i, v, m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void affine_plane_avx512(const T* x, T* y, float scale, float offset, int64_t n,
                                             bool apply_silu) {
  const __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(offset);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(load16(x + i, m), a, b);
    if (apply_silu) v = simd::silu16(v);
    store16(y + i, v, m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void softmax_row_avx512(const T* x, T* out, float* scratch, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, load16(x + i, m));
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(m, simd::exp16(_mm512_sub_ps(load16(x + i, m), max)));
    store16(scratch + i, e, m);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(out + i, _mm512_mul_ps(load16(scratch + i, m), inv), m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void geglu_row_avx512(const T* value, const T* gate, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(out + i, _mm512_mul_ps(load16(value + i, m), simd::gelu16(load16(gate + i, m))), m);
  }
}

VOKEN_TARGET_AVX512 void layer_norm_bf16_rows_avx512(const bf16_bits* x, int64_t ldx, bf16_bits* y,
                                                     int64_t ldy, const float* weight, const float* bias,
                                                     int64_t channels, float eps, int64_t begin,
                                                     int64_t end) {
  const float inverse_count = 1.0f / static_cast<float>(channels);
  for (int64_t r = begin; r < end; ++r) {
    const bf16_bits* row = x + r * ldx;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; c += 16)
      sum = _mm512_add_ps(sum, load16(row + c, tail_mask(channels - c)));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) * inverse_count);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 m = tail_mask(channels - c);
      const __m512 d = _mm512_maskz_sub_ps(m, load16(row + c, m), mean);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) * inverse_count + eps));
    bf16_bits* out = y + r * ldy;
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 m = tail_mask(channels - c);
      const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(row + c, m), mean), rstd);
      store16(out + c, _mm512_add_ps(_mm512_mul_ps(v, load16(weight + c, m)), load16(bias + c, m)), m);
    }
  }
}

#endif  // VOKEN_X86_KERNELS

// ---- dispatch: one switch per row -------------------------------------------------------------

template <typename T>
void accumulate_channels_any(Isa isa, const T* x, const float* shift, float* s1, float* s2,
                             int64_t channels) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return accumulate_channels_avx512(x, shift, s1, s2, channels);
    case Isa::avx2:
      return accumulate_channels_avx2(x, shift, s1, s2, channels);
#endif
    default:
      return accumulate_channels_generic(x, shift, s1, s2, channels);
  }
}

template <typename T>
void accumulate_run_any(Isa isa, const T* x, int64_t n, float shift, double& sum, double& sum_sq) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return accumulate_run_avx512(x, n, shift, sum, sum_sq);
    case Isa::avx2:
      return accumulate_run_avx2(x, n, shift, sum, sum_sq);
#endif
    default:
      return accumulate_run_generic(x, n, shift, sum, sum_sq);
  }
}

template <typename T>
void affine_row_any(Isa isa, const T* x, T* y, const float* scale, const float* offset, int64_t n,
                    bool apply_silu) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return affine_row_avx512(x, y, scale, offset, n, apply_silu);
    case Isa::avx2:
      return affine_row_avx2(x, y, scale, offset, n, apply_silu);
#endif
    default:
      return apply_silu ? affine_row_generic<true>(x, y, scale, offset, n)
                        : affine_row_generic<false>(x, y, scale, offset, n);
  }
}

template <typename T>
void affine_plane_any(Isa isa, const T* x, T* y, float scale, float offset, int64_t n, bool apply_silu) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return affine_plane_avx512(x, y, scale, offset, n, apply_silu);
    case Isa::avx2:
      return affine_plane_avx2(x, y, scale, offset, n, apply_silu);
#endif
    default:
      return apply_silu ? affine_plane_generic<true>(x, y, scale, offset, n)
                        : affine_plane_generic<false>(x, y, scale, offset, n);
  }
}

template <typename T>
void softmax_row_any(Isa isa, const T* x, T* out, float* scratch, int64_t n) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return softmax_row_avx512(x, out, scratch, n);
    case Isa::avx2:
      return softmax_row_avx2(x, out, scratch, n);
#endif
    default:
      return softmax_row_generic(x, out, scratch, n);
  }
}

template <typename T>
void geglu_row_any(Isa isa, const T* value, const T* gate, T* out, int64_t n) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return geglu_row_avx512(value, gate, out, n);
    case Isa::avx2:
      return geglu_row_avx2(value, gate, out, n);
#endif
    default:
      return geglu_row_generic(value, gate, out, n);
  }
}

void layer_norm_bf16_rows_any(Isa isa, const bf16_bits* x, int64_t ldx, bf16_bits* y, int64_t ldy,
                              const float* weight, const float* bias, int64_t channels, float eps,
                              int64_t begin, int64_t end) {
  switch (isa) {
#ifdef VOKEN_X86_KERNELS
    case Isa::avx512:
      return layer_norm_bf16_rows_avx512(x, ldx, y, ldy, weight, bias, channels, eps, begin, end);
    case Isa::avx2:
      return layer_norm_bf16_rows_avx2(x, ldx, y, ldy, weight, bias, channels, eps, begin, end);
#endif
    default:
      return layer_norm_bf16_rows_generic(x, ldx, y, ldy, weight, bias, channels, eps, begin, end);
  }
}

// ---- the whole-tensor loops -------------------------------------------------------------------

// A 1-D float tensor's values as float32 (`fill` repeated `count` times when it is undefined);
// converted here, without an ATen conversion kernel.
std::vector<float> as_floats(const at::Tensor& t, int64_t count, float fill, const char* function) {
  if (!t.defined()) return std::vector<float>(static_cast<size_t>(count), fill);
  const at::Tensor c = t.contiguous();
  std::vector<float> out(static_cast<size_t>(c.numel()));
  switch (c.scalar_type()) {
    case at::kFloat:
      std::copy(c.data_ptr<float>(), c.data_ptr<float>() + c.numel(), out.begin());
      break;
    case at::kBFloat16:
      std::copy(c.data_ptr<at::BFloat16>(), c.data_ptr<at::BFloat16>() + c.numel(), out.begin());
      break;
    case at::kHalf:
      std::copy(c.data_ptr<at::Half>(), c.data_ptr<at::Half>() + c.numel(), out.begin());
      break;
    case at::kDouble:
      std::transform(c.data_ptr<double>(), c.data_ptr<double>() + c.numel(), out.begin(),
                     [](double v) { return static_cast<float>(v); });
      break;
    default:
      throw ArgumentError(std::string(function) +
                          ": weight and bias must be float32, bfloat16, float16 or float64");
  }
  return out;
}

template <typename T>
void geglu_rows(Isa isa, const T* projected, T* out, int64_t rows, int64_t inner) {
  parallel_range(0, rows, std::max<int64_t>(1, 16384 / inner), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      geglu_row_any(isa, projected + r * 2 * inner, projected + r * 2 * inner + inner, out + r * inner,
                    inner);
  });
}

// Per-(batch, channel) scale and offset from per-(batch, group) shifted sums.
void group_factors(const std::vector<double>& sum, const std::vector<double>& sum_sq,
                   const std::vector<float>& shift, int64_t batch, int64_t channels, int64_t groups,
                   int64_t count, const std::vector<float>& weight, const std::vector<float>& bias,
                   double eps, std::vector<float>& scale, std::vector<float>& offset) {
  const int64_t per_group = channels / groups;
  scale.resize(batch * channels);
  offset.resize(batch * channels);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      const double mean_shifted = sum[b * groups + g] / count;
      const double var = std::max(0.0, sum_sq[b * groups + g] / count - mean_shifted * mean_shifted);
      const double mean = shift[b * groups + g] + mean_shifted;
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double a = rstd * weight[c];
        scale[b * channels + c] = static_cast<float>(a);
        offset[b * channels + c] = static_cast<float>(bias[c] - mean * a);
      }
    }
}

template <typename T>
void group_norm_nchw(Isa isa, const T* x, T* y, int64_t batch, int64_t channels, int64_t spatial,
                     int64_t groups, const std::vector<float>& weight, const std::vector<float>& bias,
                     double eps, bool apply_silu) {
  const int64_t per_group = channels / groups;
  const int64_t span = per_group * spatial;
  std::vector<double> sum(batch * groups, 0.0), sum_sq(batch * groups, 0.0);
  std::vector<float> shift(batch * groups);
  parallel_range(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kRun = 4096;  // float partial sums stay exact enough over this many values
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* base = x + bg * span;
      shift[bg] = to_float(base[0]);
      for (int64_t i = 0; i < span; i += kRun)
        accumulate_run_any(isa, base + i, std::min(kRun, span - i), shift[bg], sum[bg], sum_sq[bg]);
    }
  });
  std::vector<float> scale, offset;
  group_factors(sum, sum_sq, shift, batch, channels, groups, span, weight, bias, eps, scale, offset);
  parallel_range(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc)
      affine_plane_any(isa, x + bc * spatial, y + bc * spatial, scale[bc], offset[bc], spatial, apply_silu);
  });
}

template <typename T>
void group_norm_nhwc(Isa isa, const T* x, T* y, int64_t batch, int64_t channels, int64_t spatial,
                     int64_t groups, const std::vector<float>& weight, const std::vector<float>& bias,
                     double eps, bool apply_silu) {
  const int64_t per_group = channels / groups;
  constexpr int64_t kPixelsPerChunk = 128;  // float per-channel partial sums over this many pixels
  const int64_t chunks = (spatial + kPixelsPerChunk - 1) / kPixelsPerChunk;
  // Shift: the group's first value, per channel for the row loop.
  std::vector<float> group_shift(batch * groups), channel_shift(batch * channels);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      const float s = to_float(x[b * spatial * channels + (c / per_group) * per_group]);
      channel_shift[b * channels + c] = s;
      if (c % per_group == 0) group_shift[b * groups + c / per_group] = s;
    }
  std::vector<double> partial1(batch * chunks * channels), partial2(batch * chunks * channels);
  parallel_range(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s1(channels), s2(channels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, chunk = task % chunks;
      std::fill(s1.begin(), s1.end(), 0.0f);
      std::fill(s2.begin(), s2.end(), 0.0f);
      const int64_t p_end = std::min(spatial, (chunk + 1) * kPixelsPerChunk);
      for (int64_t p = chunk * kPixelsPerChunk; p < p_end; ++p)
        accumulate_channels_any(isa, x + (b * spatial + p) * channels, channel_shift.data() + b * channels,
                                s1.data(), s2.data(), channels);
      for (int64_t c = 0; c < channels; ++c) {
        partial1[task * channels + c] = s1[c];
        partial2[task * channels + c] = s2[c];
      }
    }
  });
  std::vector<double> sum(batch * groups, 0.0), sum_sq(batch * groups, 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t at = (b * chunks + chunk) * channels + c;
        sum[b * groups + c / per_group] += partial1[at];
        sum_sq[b * groups + c / per_group] += partial2[at];
      }
  std::vector<float> scale, offset;
  group_factors(sum, sum_sq, group_shift, batch, channels, groups, per_group * spatial, weight, bias, eps,
                scale, offset);
  parallel_range(0, batch * spatial, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bp = begin; bp < end; ++bp) {
      const int64_t b = bp / spatial;
      affine_row_any(isa, x + bp * channels, y + bp * channels, scale.data() + b * channels,
                     offset.data() + b * channels, channels, apply_silu);
    }
  });
}

// The UNet LayerNorm over contiguous rows.
template <typename T>
void layer_norm_rows(Isa isa, const T* x, T* y, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     const std::vector<float>& bias, double eps) {
  parallel_range(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(dim), offset(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * dim;
      // Shifted by the row's first value: an exact-enough mean and variance in one pass.
      const float shift = to_float(row[0]);
      double sum = 0, sum_sq = 0;
      for (int64_t i = 0; i < dim; i += 4096)
        accumulate_run_any(isa, row + i, std::min<int64_t>(4096, dim - i), shift, sum, sum_sq);
      const double mean_shifted = sum / dim;
      const double var = std::max(0.0, sum_sq / dim - mean_shifted * mean_shifted);
      const double mean = shift + mean_shifted;
      const double rstd = 1.0 / std::sqrt(var + eps);
      // y = x * (rstd * w) + (b - mean * rstd * w)
      for (int64_t i = 0; i < dim; ++i) {
        scale[i] = static_cast<float>(rstd * weight[i]);
        offset[i] = static_cast<float>(bias[i] - mean * rstd * weight[i]);
      }
      affine_row_any(isa, row, y + r * dim, scale.data(), offset.data(), dim, false);
    }
  });
}

template <typename T>
void softmax_rows(Isa isa, T* data, int64_t rows, int64_t n) {
  parallel_range(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(n);
    for (int64_t r = begin; r < end; ++r) softmax_row_any(isa, data + r * n, data + r * n, scratch.data(), n);
  });
}

bool is_float_or_bf16(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

std::string shape_of(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "] " + std::string(c10::toString(t.scalar_type()));
}

void check_cpu(const at::Tensor& t, const char* function, const char* name) {
  if (t.defined() && !t.device().is_cpu())
    throw ArgumentError(std::string(function) + ": " + name + " must be a CPU tensor");
}

}  // namespace

void softmax_lastdim_(at::Tensor& x, CpuTier tier) {
  const Isa isa = isa_for(tier, "softmax_lastdim_");
  if (!is_float_or_bf16(x) || !x.is_contiguous() || x.dim() < 1 || !x.device().is_cpu())
    throw ArgumentError("softmax_lastdim_: expected a contiguous float32 or bfloat16 CPU tensor, got " +
                        shape_of(x));
  const int64_t n = x.size(-1);
  if (x.numel() == 0 || n == 0) return;
  const int64_t rows = x.numel() / n;
  if (x.scalar_type() == at::kFloat)
    softmax_rows(isa, x.data_ptr<float>(), rows, n);
  else
    softmax_rows(isa, reinterpret_cast<bf16_bits*>(x.data_ptr<at::BFloat16>()), rows, n);
}

at::Tensor geglu(const at::Tensor& input, CpuTier tier) {
  const Isa isa = isa_for(tier, "geglu");
  if (!is_float_or_bf16(input) || input.dim() < 1 || input.size(-1) % 2 != 0 || !input.device().is_cpu())
    throw ArgumentError("geglu: expected a float32/bfloat16 CPU tensor with an even last dimension, got " +
                        shape_of(input));
  const at::Tensor x = input.contiguous();
  const int64_t inner = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = inner;
  at::Tensor y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  const int64_t rows = y.numel() / inner;
  if (x.scalar_type() == at::kFloat)
    geglu_rows(isa, x.data_ptr<float>(), y.data_ptr<float>(), rows, inner);
  else
    geglu_rows(isa, reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), rows, inner);
  return y;
}

at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                CpuTier tier) {
  isa_for(tier, "few_rows_linear_bf16");
  if (!x.defined() || x.dim() != 2 || x.scalar_type() != at::kFloat || !weight.defined() ||
      weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() ||
      weight.size(1) != x.size(1) ||
      (bias.defined() && (bias.scalar_type() != at::kFloat || bias.numel() != weight.size(0))))
    throw ArgumentError(
        "few_rows_linear_bf16: expected x float32 [rows, in], weight contiguous bfloat16 [out, in], bias "
        "float32 [out] or none; got x " +
        shape_of(x) + ", weight " + shape_of(weight) + ", bias " + shape_of(bias));
  check_cpu(x, "few_rows_linear_bf16", "x");
  check_cpu(bias, "few_rows_linear_bf16", "bias");
  at::Tensor y = gemv_bf16(x.contiguous(), weight, tier);
  // The same float32 addition as adding the bias to each reduced sum.
  if (bias.defined()) y.add_(bias.reshape({1, -1}));
  return y;
}

namespace {

void check_group_norm(const at::Tensor& input, int64_t groups, const at::Tensor& weight,
                      const at::Tensor& bias) {
  if (!is_float_or_bf16(input) || input.dim() < 2 || groups <= 0 || input.size(1) % groups != 0 ||
      !weight.defined() || !bias.defined() || weight.numel() != input.size(1) ||
      bias.numel() != input.size(1))
    throw ArgumentError("group_norm: expected a float32/bfloat16 [B, C, ...] tensor with C divisible by " +
                        std::to_string(groups) + " groups and [C] weight and bias; got x " + shape_of(input) +
                        ", weight " + shape_of(weight) + ", bias " + shape_of(bias));
  check_cpu(input, "group_norm", "x");
}

bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// y may be x (every value is read before it is written, at the same index).
void group_norm_into(Isa isa, const at::Tensor& x, const at::Tensor& y, int64_t groups,
                     const at::Tensor& weight, const at::Tensor& bias, double eps, bool silu, bool nhwc) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t spatial = channels == 0 || batch == 0 ? 0 : x.numel() / (batch * channels);
  if (x.numel() == 0) return;
  const auto w = as_floats(weight, channels, 1.0f, "group_norm");
  const auto b = as_floats(bias, channels, 0.0f, "group_norm");
  if (x.scalar_type() == at::kFloat) {
    const auto* xp = x.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    nhwc ? group_norm_nhwc(isa, xp, yp, batch, channels, spatial, groups, w, b, eps, silu)
         : group_norm_nchw(isa, xp, yp, batch, channels, spatial, groups, w, b, eps, silu);
  } else {
    const auto* xp = reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>());
    nhwc ? group_norm_nhwc(isa, xp, yp, batch, channels, spatial, groups, w, b, eps, silu)
         : group_norm_nchw(isa, xp, yp, batch, channels, spatial, groups, w, b, eps, silu);
  }
}

}  // namespace

at::Tensor group_norm(const at::Tensor& input, int64_t groups, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, bool silu, CpuTier tier) {
  const Isa isa = isa_for(tier, "group_norm");
  check_group_norm(input, groups, weight, bias);
  const bool nhwc = is_nhwc(input);
  const at::Tensor x = nhwc ? input : input.contiguous();
  const at::Tensor y =
      at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  group_norm_into(isa, x, y, groups, weight, bias, eps, silu, nhwc);
  return y;
}

void group_norm_(at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                 bool silu, CpuTier tier) {
  const Isa isa = isa_for(tier, "group_norm_");
  check_group_norm(x, groups, weight, bias);
  const bool nhwc = is_nhwc(x);
  if (!nhwc && !x.is_contiguous())
    throw ArgumentError("group_norm_: x must be NCHW-contiguous or channels-last");
  group_norm_into(isa, x, x, groups, weight, bias, eps, silu, nhwc);
}

at::Tensor layer_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      CpuTier tier) {
  const Isa isa = isa_for(tier, "layer_norm");
  if (!is_float_or_bf16(input) || input.dim() < 1 || !input.device().is_cpu() || !weight.defined() ||
      !bias.defined() || weight.numel() != input.size(-1) || bias.numel() != input.size(-1))
    throw ArgumentError(
        "layer_norm: expected a float32/bfloat16 CPU tensor and weight/bias of its last dimension; got x " +
        shape_of(input) + ", weight " + shape_of(weight) + ", bias " + shape_of(bias));
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t dim = x.size(-1);
  if (x.numel() == 0 || dim == 0) return y;
  const int64_t rows = x.numel() / dim;
  const auto w = as_floats(weight, dim, 1.0f, "layer_norm");
  const auto b = as_floats(bias, dim, 0.0f, "layer_norm");
  if (x.scalar_type() == at::kFloat) {
    layer_norm_rows(isa, x.data_ptr<float>(), y.data_ptr<float>(), rows, dim, w, b, eps);
  } else {
    layer_norm_rows(isa, reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()),
                    reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), rows, dim, w, b, eps);
  }
  return y;
}

at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           CpuTier tier) {
  const Isa isa = isa_for(tier, "layer_norm_bf16");
  if (!x.defined() || x.dim() < 1 || x.scalar_type() != at::kBFloat16 || !x.device().is_cpu())
    throw ArgumentError("layer_norm_bf16: x must be a bfloat16 CPU tensor, got " + shape_of(x));
  const int64_t channels = x.size(-1);
  for (const at::Tensor* t : {&weight, &bias}) {
    if (t->defined() && t->numel() != channels)
      throw ArgumentError("layer_norm_bf16: weight/bias have " + std::to_string(t->numel()) + " values for " +
                          std::to_string(channels) + " channels");
    check_cpu(*t, "layer_norm_bf16", "weight/bias");
  }
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  at::Tensor rows = x.reshape({-1, channels});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  const auto w = as_floats(weight, channels, 1.0f, "layer_norm_bf16");
  const auto b = as_floats(bias, channels, 0.0f, "layer_norm_bf16");
  const auto* xp = reinterpret_cast<const bf16_bits*>(rows.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  const int64_t ldx = rows.stride(0);
  parallel_range(0, rows.size(0), 16, [&](int64_t begin, int64_t end) {
    layer_norm_bf16_rows_any(isa, xp, ldx, yp, channels, w.data(), b.data(), channels,
                             static_cast<float>(eps), begin, end);
  });
  return out;
}

}  // namespace voken::core
