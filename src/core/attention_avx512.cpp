// Attention kernels of the avx512_bf16 tier (vdpbf16ps, P rounded to bf16) and the avx512 tier
// (float32 FMA on K and V widened at packing, P in float32), see core/attention.h: the driver of
// attention_flash.h over attention_simd.inc's kernel functions, compiled here for AVX-512 (with
// 16-lane policies), and the packing of K and V into bf16 pairs (also the AMX kernel's).
//
// Register tiles: 6 query rows x 64 keys for S = Q K^T (24 accumulators, 10 loads per 24
// products), 6 rows x 64 output columns for O += P V; chunks of 256 keys, so that a chunk's K and V
// stay in L1 across the block's row tiles.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "core/attention_flash.h"
#include "core/attention_internal.h"
#include "core/cpu.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx512.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core::attention_detail {
namespace {

// ---------------------------------------------------------------------------------------------
// The lane policies of attention_simd.inc (its comment says what each member does).

// avx512: float32 lanes, K and V widened to float32 (pack_keys_float32, pack_values_float32).
struct Avx512Lanes {
  using Word = float;
  using Operand = __m512;
  using Vec = __m512;
  using Tail = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 48, kRowTile = 6;
  static constexpr int64_t kKeyTile = 64, kChunk = 256, kOutputTile = 64;

  VOKEN_TARGET_AVX512 static Operand operand(const float* p) { return _mm512_load_ps(p); }
  VOKEN_TARGET_AVX512 static Operand broadcast(float w) { return _mm512_set1_ps(w); }
  VOKEN_TARGET_AVX512 static Vec dot(Vec acc, Operand a, Operand b) { return _mm512_fmadd_ps(a, b, acc); }

  VOKEN_TARGET_AVX512 static Tail tail(int64_t n) { return simd::tail_mask(n); }
  VOKEN_TARGET_AVX512 static Vec zero() { return _mm512_setzero_ps(); }
  VOKEN_TARGET_AVX512 static Vec set1(float x) { return _mm512_set1_ps(x); }
  VOKEN_TARGET_AVX512 static Vec load(const float* p) { return _mm512_load_ps(p); }
  VOKEN_TARGET_AVX512 static void store(float* p, Vec x) { _mm512_store_ps(p, x); }
  VOKEN_TARGET_AVX512 static Vec load(const bf16_bits* p, Tail t) { return simd::load16(p, t); }
  VOKEN_TARGET_AVX512 static void store(float* p, Vec x, Tail t) { simd::store16(p, x, t); }
  VOKEN_TARGET_AVX512 static void store(bf16_bits* p, Vec x, Tail t) { simd::store16(p, x, t); }
  VOKEN_TARGET_AVX512 static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  VOKEN_TARGET_AVX512 static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  VOKEN_TARGET_AVX512 static Vec fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }
  VOKEN_TARGET_AVX512 static Vec max_tail(Vec a, Vec b, Tail t) { return _mm512_mask_max_ps(a, t, a, b); }
  VOKEN_TARGET_AVX512 static Vec keep(Vec x, Tail t) { return _mm512_maskz_mov_ps(t, x); }
  VOKEN_TARGET_AVX512 static float reduce_add(Vec x) { return _mm512_reduce_add_ps(x); }
  VOKEN_TARGET_AVX512 static float reduce_max(Vec x) { return _mm512_reduce_max_ps(x); }
  VOKEN_TARGET_AVX512 static Vec exp2(Vec x) { return simd::exp2_fast16(x); }
  VOKEN_TARGET_AVX512 static Vec round_to_bf16(Vec x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(simd::round_to_bf16_bits(x), 16));
  }
};

// avx512_bf16: the products on bf16 pairs (vdpbf16ps), K and V packed as pairs (pack_keys_bf16_pairs,
// pack_values_bf16_pairs); the softmax and the output rows in float32 as above.
struct Avx512Bf16Lanes : Avx512Lanes {
  using Word = uint32_t;
  using Operand = __m512bh;

  VOKEN_TARGET_AVX512_BF16 static Operand operand(const uint32_t* p) {
    return (__m512bh)_mm512_load_si512(p);
  }
  VOKEN_TARGET_AVX512_BF16 static Operand broadcast(uint32_t w) {
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
  }
  VOKEN_TARGET_AVX512_BF16 static Vec dot(Vec acc, Operand a, Operand b) {
    return _mm512_dpbf16_ps(acc, a, b);
  }
};

// ---------------------------------------------------------------------------------------------
// Packing into bf16 pairs (for the avx512_bf16 kernel and the AMX one).

// 16 x 16 transpose of 32-bit lanes: unpack pairs, then 64-bit pairs, then 128-bit blocks twice.
VOKEN_TARGET_AVX512 inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now r[4g + c] holds, in its 128-bit block k, column 4k + c of rows 4g..4g+3; two rounds of
  // block shuffles gather column 4k + c's four blocks (g = 0..3) into one vector.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

}  // namespace

VOKEN_TARGET_AVX512 void pack_keys_bf16_pairs(const AttentionJob& job, int64_t bh, int64_t tile,
                                              int64_t dim_words, int64_t keys_padded, int64_t key_begin,
                                              int64_t key_end, uint32_t* packed) {
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  // 16 keys x 16 words (32 dimensions) at a time: rows loaded whole, transposed in registers.
  for (int64_t key0 = key_begin; key0 < key_end; key0 += 16) {
    const int64_t t0 = key0 / tile * tile, width = std::min(tile, keys_padded - t0);
    uint32_t* dst = packed + t0 * dim_words + (key0 - t0);
    for (int64_t w0 = 0; w0 < dim_words; w0 += 16) {
      __m512i rows[16];
      const __mmask32 dims_here = simd::tail_mask32(dims - 2 * w0);
      for (int i = 0; i < 16; ++i) {
        const int64_t n = key0 + i;
        rows[i] = n < job.keys ? _mm512_maskz_loadu_epi16(dims_here, job.k_row_ptr(b, h, n) + 2 * w0)
                               : _mm512_setzero_si512();
      }
      transpose16x16(rows);
      const int64_t words = std::min<int64_t>(16, dim_words - w0);
      for (int64_t j = 0; j < words; ++j) _mm512_store_si512(dst + (w0 + j) * width, rows[j]);
    }
  }
}

VOKEN_TARGET_AVX512 void pack_values_bf16_pairs(const AttentionJob& job, int64_t bh, int64_t key_begin,
                                                int64_t key_end, int64_t dims_padded, uint32_t* packed) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  for (int64_t n = key_begin; n < key_end; n += 2) {
    uint32_t* dst = packed + (n / 2) * dims_padded;
    const bf16_bits* even = n < job.keys ? job.v_row_ptr(b, h, n) : nullptr;
    const bf16_bits* odd = n + 1 < job.keys ? job.v_row_ptr(b, h, n + 1) : nullptr;
    for (int64_t d = 0; d < dims_padded; d += 16) {
      const __mmask16 m = simd::tail_mask(dims - d);
      const __m256i e = even ? _mm256_maskz_loadu_epi16(m, even + d) : _mm256_setzero_si256();
      const __m256i o = odd ? _mm256_maskz_loadu_epi16(m, odd + d) : _mm256_setzero_si256();
      _mm512_store_si512(
          dst + d, _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(e), o, 1)));
    }
  }
}
namespace {

// attention_simd.inc compiled for each of the two instruction sets (see its first comment).
namespace avx512_kernel {
#define VOKEN_ATTENTION_TARGET VOKEN_TARGET_AVX512
#include "core/attention_simd.inc"
#undef VOKEN_ATTENTION_TARGET
}  // namespace avx512_kernel

namespace avx512_bf16_kernel {
#define VOKEN_ATTENTION_TARGET VOKEN_TARGET_AVX512_BF16
#include "core/attention_simd.inc"
#undef VOKEN_ATTENTION_TARGET
}  // namespace avx512_bf16_kernel

// The avx512_bf16 kernel: queries as bf16 pairs (the scale applied and rounded for ScaledQueryBf16)
// and probabilities rounded to bf16 pairs, instead of SimdKernel's float32 ones.
struct Avx512Bf16Kernel : avx512_bf16_kernel::SimdKernel<Avx512Bf16Lanes> {
  // Q rows [q0, q0 + rows) of one head as bf16 pairs, `depth` words a row (the odd dimension of an
  // odd head_dim zero), zero rows up to padded_rows.
  VOKEN_TARGET_AVX512_BF16 static void load_queries(const FlashLayout& l, int64_t bh, int64_t q0, int rows,
                                                    int padded_rows, uint32_t* q) {
    const AttentionJob& job = *l.job;
    const int64_t b = bh / job.heads, h = bh % job.heads, width = 2 * l.depth;
    const __m512 scale = _mm512_set1_ps(job.scale);
    for (int r = 0; r < padded_rows; ++r) {
      bf16_bits* dst = reinterpret_cast<bf16_bits*>(q + r * l.depth);
      const bf16_bits* src = r < rows ? job.q_row_ptr(b, h, q0 + r) : nullptr;
      for (int64_t d = 0; d < width; d += 16) {
        const __mmask16 m = src ? simd::tail_mask(job.head_dim - d) : __mmask16(0);
        const __mmask16 store = simd::tail_mask(width - d);
        if (job.scales_query())
          simd::store16(dst + d, _mm512_mul_ps(simd::load16(src ? src + d : dst, m), scale), store);
        else
          _mm256_mask_storeu_epi16(dst + d, store, _mm256_maskz_loadu_epi16(m, src ? src + d : dst));
      }
    }
  }

  // As SimdKernel::exponentiate, P rounded to bf16 pairs (rows kChunkStride / 2 words apart); the
  // sums are of the float32 values, 32 keys a step.
  VOKEN_TARGET_AVX512_BF16 static void exponentiate(const float* s, int64_t valid, int64_t len, float coef,
                                                    const float* shifts, uint32_t* p, float* sums) {
    using avx512_bf16_kernel::probabilities;
    const __m512 c = _mm512_set1_ps(coef);
    for (int r = 0; r < kRowTile; ++r) {
      const float* srow = s + r * kChunkStride;
      uint32_t* prow = p + r * (kChunkStride / 2);
      const __m512 shift = _mm512_set1_ps(shifts[r]);
      __m512 sum = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= len; j += 32) {
        const __m512 p0 = probabilities<Avx512Bf16Lanes>(srow + j, c, shift, valid - j);
        const __m512 p1 = probabilities<Avx512Bf16Lanes>(srow + j + 16, c, shift, valid - j - 16);
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        _mm512_store_si512(prow + j / 2, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      }
      if (j < len) {  // 16 keys left
        const __m512 p0 = probabilities<Avx512Bf16Lanes>(srow + j, c, shift, valid - j);
        sum = _mm512_add_ps(sum, p0);
        _mm256_store_si256(reinterpret_cast<__m256i*>(prow + j / 2), (__m256i)_mm512_cvtneps_pbh(p0));
      }
      sums[r] = _mm512_reduce_add_ps(sum);
    }
  }
};

}  // namespace

void attention_avx512_bf16(const AttentionJob& job) { flash_attention<Avx512Bf16Kernel>(job); }

void attention_avx512(const AttentionJob& job) {
  flash_attention<avx512_kernel::SimdKernel<Avx512Lanes>>(job);
}

}  // namespace voken::core::attention_detail

#endif  // VOKEN_X86_KERNELS
