// Attention kernel of the avx2 tier: float32 FMA on K and V widened at packing, P in float32 (see
// core/attention.h): the driver of attention_flash.h over attention_simd.inc's kernel functions,
// compiled here for AVX2 with an 8-lane policy, and the packing of K and V into float32.
//
// With 16 vector registers: register tiles of 6 query rows x 16 keys for S = Q K^T and 6 rows x 16
// output columns for O += P V (12 accumulators each); chunks of 128 keys for the 32 KiB L1 of
// AVX2-only CPUs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/attention_flash.h"
#include "core/attention_internal.h"
#include "core/cpu.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx2.h"

namespace voken::core::attention_detail {
namespace {

// The lane policy of attention_simd.inc (its comment says what each member does). AVX2 has no mask
// registers: a Tail is a lane count.
struct Avx2Lanes {
  using Word = float;
  using Operand = __m256;
  using Vec = __m256;
  using Tail = int64_t;
  static constexpr int kLanes = 8;
  static constexpr int kRows = 24, kRowTile = 6;
  static constexpr int64_t kKeyTile = 16, kChunk = 128, kOutputTile = 16;

  VOKEN_TARGET_AVX2 static Operand operand(const float* p) { return _mm256_load_ps(p); }
  VOKEN_TARGET_AVX2 static Operand broadcast(float w) { return _mm256_set1_ps(w); }
  VOKEN_TARGET_AVX2 static Vec dot(Vec acc, Operand a, Operand b) { return _mm256_fmadd_ps(a, b, acc); }

  VOKEN_TARGET_AVX2 static Tail tail(int64_t n) { return n; }
  VOKEN_TARGET_AVX2 static Vec zero() { return _mm256_setzero_ps(); }
  VOKEN_TARGET_AVX2 static Vec set1(float x) { return _mm256_set1_ps(x); }
  VOKEN_TARGET_AVX2 static Vec load(const float* p) { return _mm256_load_ps(p); }
  VOKEN_TARGET_AVX2 static void store(float* p, Vec x) { _mm256_store_ps(p, x); }
  VOKEN_TARGET_AVX2 static Vec load(const bf16_bits* p, Tail n) { return simd8::load8(p, n); }
  VOKEN_TARGET_AVX2 static void store(float* p, Vec x, Tail n) { simd8::store8(p, x, n); }
  VOKEN_TARGET_AVX2 static void store(bf16_bits* p, Vec x, Tail n) { simd8::store8(p, x, n); }
  VOKEN_TARGET_AVX2 static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  VOKEN_TARGET_AVX2 static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  VOKEN_TARGET_AVX2 static Vec fmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }
  VOKEN_TARGET_AVX2 static Vec max_tail(Vec a, Vec b, Tail n) {
    if (n >= kLanes) return _mm256_max_ps(a, b);
    return _mm256_max_ps(
        a, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), b, _mm256_castsi256_ps(simd8::tail_mask(n))));
  }
  VOKEN_TARGET_AVX2 static Vec keep(Vec x, Tail n) {
    return _mm256_and_ps(x, _mm256_castsi256_ps(simd8::tail_mask(n)));
  }
  VOKEN_TARGET_AVX2 static float reduce_add(Vec x) { return simd8::reduce_add(x); }
  VOKEN_TARGET_AVX2 static float reduce_max(Vec x) { return simd8::reduce_max(x); }
  VOKEN_TARGET_AVX2 static Vec exp2(Vec x) { return simd8::exp2_softmax8(x); }
  VOKEN_TARGET_AVX2 static Vec round_to_bf16(Vec x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(simd8::round_to_bf16_bits(x), 16));
  }
};

#define VOKEN_ATTENTION_TARGET VOKEN_TARGET_AVX2
#include "core/attention_simd.inc"
#undef VOKEN_ATTENTION_TARGET

// 8 x 8 transpose of float32 lanes.
VOKEN_TARGET_AVX2 inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c] holds, in its 128-bit half k, column 4k + c of rows 4g..4g+3.
  __m256 u[8];
  for (int g = 0; g < 8; g += 4) {
    u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
  }
}

}  // namespace

VOKEN_TARGET_AVX2 void pack_keys_float32(const AttentionJob& job, int64_t bh, int64_t tile,
                                         int64_t keys_padded, int64_t key_begin, int64_t key_end,
                                         float* packed) {
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  // 8 keys x 8 dimensions at a time, widened and transposed in registers.
  for (int64_t key0 = key_begin; key0 < key_end; key0 += 8) {
    const int64_t t0 = key0 / tile * tile, width = std::min(tile, keys_padded - t0);
    float* dst = packed + t0 * dims + (key0 - t0);
    for (int64_t d0 = 0; d0 < dims; d0 += 8) {
      __m256 rows[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t n = key0 + i;
        rows[i] = n < job.keys ? simd8::load8(job.k_row_ptr(b, h, n) + d0, dims - d0) : _mm256_setzero_ps();
      }
      transpose8x8(rows);
      const int64_t count = std::min<int64_t>(8, dims - d0);
      for (int64_t j = 0; j < count; ++j) _mm256_store_ps(dst + (d0 + j) * width, rows[j]);
    }
  }
}

VOKEN_TARGET_AVX2 void pack_values_float32(const AttentionJob& job, int64_t bh, int64_t key_begin,
                                           int64_t key_end, int64_t dims_padded, float* packed) {
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  for (int64_t n = key_begin; n < key_end; ++n) {
    float* dst = packed + n * dims_padded;
    const bf16_bits* row = n < job.keys ? job.v_row_ptr(b, h, n) : nullptr;
    for (int64_t d = 0; d < dims_padded; d += 8)
      _mm256_store_ps(dst + d, row && d < dims ? simd8::load8(row + d, dims - d) : _mm256_setzero_ps());
  }
}

void attention_avx2(const AttentionJob& job) { flash_attention<SimdKernel<Avx2Lanes>>(job); }

}  // namespace voken::core::attention_detail

#endif  // VOKEN_X86_KERNELS
