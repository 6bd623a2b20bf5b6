// The avx512_bf16 and avx512 tiers of the GEMM kernels (core/packed_gemm_kernels.h).
//
// avx512_bf16: a micro-tile is 12 rows x 32 columns of float32 accumulators (24 zmm). Per k-pair:
// the two 16-column halves of the packed weights are loaded once (one zmm each: 16 columns x one
// k-pair, the packed layout's natural unit), and each row's k-pair (one 32-bit word of the
// bfloat16 activations) is broadcast into two vdpbf16ps. 12 rows keep 24 independent accumulation
// chains in flight (enough for vdpbf16ps's latency on Zen 4/5 and Intel) with 2 + 12 loads per
// 24 dot products.
//
// avx512 (no bf16 instructions): the same 12 x 32 micro-tile in float32 FMAs; the activations are
// a float32 copy (made once per call), the weights a float32 panel of the block and K chunk
// (widened once per task, 32 KiB: stays in L1), so the inner loop is loads and FMAs only.
#include <algorithm>
#include <cstring>

#include "core/packed_gemm_kernels.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx512.h"

// GCC 12 reports its own AVX-512 intrinsics as possibly reading uninitialised vectors; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core::gemm {
namespace {

constexpr int kRows = 12;      // rows per micro-tile (both AVX-512 tiers)
constexpr int kSmallRows = 8;  // rows per micro-tile of the small variant (e.g. 64 rows, 8-wide maps)

// ---- avx512_bf16 ---------------------------------------------------------------------------------

// Row r of a micro-tile at byte offset `offset`: rows in groups of three off four base pointers,
// each row one [base + index * {0, 1, 2} + displacement] address. The empty asm statements hide the
// bases from the compiler, which otherwise turns every (row, k) address of the unrolled loop into
// an induction variable of its own (and spills them all).
struct RowBases {
  const char* base[4];
  int64_t stride;  // bytes between rows

  inline RowBases(const void* a, int64_t stride_bytes) {
    const char* p = static_cast<const char*>(a);
    for (int g = 0; g < 4; ++g) base[g] = p + 3 * g * stride_bytes;
    stride = stride_bytes;
    asm("" : "+r"(base[0]), "+r"(base[1]), "+r"(base[2]), "+r"(base[3]), "+r"(stride));
  }
  inline const char* row(int r, int64_t offset) const { return base[r / 3] + (r % 3) * stride + offset; }
};

template <int R>
VOKEN_TARGET_AVX512_BF16 void steps_bf16(const bf16_bits* a, int64_t lda, const bf16_bits* b, int64_t steps,
                                         __m512 (&lo_io)[R], __m512 (&hi_io)[R]) {
  // Local copies: the compiler keeps them in registers across the loop (the caller's arrays it
  // would store and reload at every iteration).
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = lo_io[r];
    hi[r] = hi_io[r];
  }
  static_assert(R <= 12, "four groups of three rows");
  for (int64_t s = 0; s < steps; ++s, a += kStepDepth, b += kStepElements) {
    const RowBases rows(a, lda * static_cast<int64_t>(sizeof(bf16_bits)));
#pragma GCC unroll 16
    for (int pair = 0; pair < 16; ++pair) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + pair * 32);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 512 + pair * 32);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t word;
        std::memcpy(&word, rows.row(r, 4 * pair), sizeof word);
        const __m512bh w = (__m512bh)_mm512_set1_epi32(word);
        lo[r] = _mm512_dpbf16_ps(lo[r], w, b0);
        hi[r] = _mm512_dpbf16_ps(hi[r], w, b1);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    lo_io[r] = lo[r];
    hi_io[r] = hi[r];
  }
}

template <int R>
VOKEN_TARGET_AVX512_BF16 void product_bf16(const ProductArgs& p) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = p.accumulate ? _mm512_loadu_ps(p.c + r * 32) : _mm512_setzero_ps();
    hi[r] = p.accumulate ? _mm512_loadu_ps(p.c + r * 32 + 16) : _mm512_setzero_ps();
  }
  const bf16_bits* b = static_cast<const bf16_bits*>(p.b);
  int64_t s = p.s0;
  while (s < p.s1) {
    const int64_t tap = s / p.tap_steps, in_tap = s % p.tap_steps;
    const int64_t run = std::min(p.s1 - s, p.tap_steps - in_tap);
    steps_bf16<R>(static_cast<const bf16_bits*>(p.a) + p.tap_offset[tap] + in_tap * kStepDepth, p.lda, b, run,
                  lo, hi);
    b += run * kStepElements;
    s += run;
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(p.c + r * 32, lo[r]);
    _mm512_storeu_ps(p.c + r * 32 + 16, hi[r]);
  }
}

// 16 x 16 transpose of 32-bit lanes (unpack, shuffle within 128-bit lanes, then across lanes).
VOKEN_TARGET_AVX512 void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 w = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(v, v2, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v, v2, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(w, w2, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(w, w2, 0xDD);
  }
}

// Weight rows read in place -> the packed layout of one block: per step and 16-row half, the rows'
// 16 k-pairs (32-bit words) transposed so that each zmm holds one k-pair of 16 columns.
VOKEN_TARGET_AVX512 void pack_rows_bf16(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin,
                                        int64_t k_end, void* panel) {
  auto* out = static_cast<bf16_bits*>(panel);
  const int64_t steps = (k_end - k_begin + kStepDepth - 1) / kStepDepth;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k0 = k_begin + s * kStepDepth;
    const __mmask32 mask = simd::tail_mask32(k_end - k0);
    for (int64_t half = 0; half < 2; ++half) {
      __m512 words[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t row = half * 16 + j;
        words[j] = row < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, w + row * ldw + k0))
                              : _mm512_setzero_ps();
      }
      transpose16(words);
      bf16_bits* dst = out + s * kStepElements + half * 512;
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(dst + i * 32), words[i]);
    }
  }
}

// ---- avx512 (float32 FMAs) -------------------------------------------------------------------------

template <int R>
VOKEN_TARGET_AVX512 void steps_f32(const float* a, int64_t lda, const float* b, int64_t steps,
                                   __m512 (&lo_io)[R], __m512 (&hi_io)[R]) {
  // Local copies: the compiler keeps them in registers across the loop (the caller's arrays it
  // would store and reload at every iteration).
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = lo_io[r];
    hi[r] = hi_io[r];
  }
  static_assert(R <= 12, "four groups of three rows");
  const int64_t depth = steps * kStepDepth;
  for (int64_t k = 0; k < depth; k += 8, a += 8, b += 8 * kBlockColumns) {
    const RowBases rows(a, lda * static_cast<int64_t>(sizeof(float)));
#pragma GCC unroll 8
    for (int kk = 0; kk < 8; ++kk) {
      const __m512 b0 = _mm512_loadu_ps(b + kk * kBlockColumns);
      const __m512 b1 = _mm512_loadu_ps(b + kk * kBlockColumns + 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 x = _mm512_set1_ps(*reinterpret_cast<const float*>(rows.row(r, 4 * kk)));
        lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
        hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    lo_io[r] = lo[r];
    hi_io[r] = hi[r];
  }
}

template <int R>
VOKEN_TARGET_AVX512 void product_f32(const ProductArgs& p) {
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = p.accumulate ? _mm512_loadu_ps(p.c + r * 32) : _mm512_setzero_ps();
    hi[r] = p.accumulate ? _mm512_loadu_ps(p.c + r * 32 + 16) : _mm512_setzero_ps();
  }
  const float* b = static_cast<const float*>(p.b);
  int64_t s = p.s0;
  while (s < p.s1) {
    const int64_t tap = s / p.tap_steps, in_tap = s % p.tap_steps;
    const int64_t run = std::min(p.s1 - s, p.tap_steps - in_tap);
    steps_f32<R>(static_cast<const float*>(p.a) + p.tap_offset[tap] + in_tap * kStepDepth, p.lda, b, run, lo,
                 hi);
    b += run * kStepElements;
    s += run;
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(p.c + r * 32, lo[r]);
    _mm512_storeu_ps(p.c + r * 32 + 16, hi[r]);
  }
}

// Packed steps -> float32 [k][32]: each 32-bit word holds the pair (k even, k odd) of a column;
// the even value is the low half shifted up, the odd one the high half with the low bits cleared.
VOKEN_TARGET_AVX512 void widen_packed_f32(const bf16_bits* packed, int64_t steps, float* panel) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t s = 0; s < steps; ++s)
    for (int half = 0; half < 2; ++half)
      for (int pair = 0; pair < 16; ++pair) {
        const __m512i words = _mm512_loadu_si512(packed + s * kStepElements + half * 512 + pair * 32);
        float* dst = panel + (s * kStepDepth + 2 * pair) * kBlockColumns + half * 16;
        _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(words, 16)));
        _mm512_storeu_ps(dst + kBlockColumns, _mm512_castsi512_ps(_mm512_and_si512(words, high)));
      }
}

// Weight rows read in place -> float32 [k][32] of one block: 16 rows x 16 k widened and transposed.
VOKEN_TARGET_AVX512 void pack_rows_f32(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin,
                                       int64_t k_end, void* panel) {
  auto* out = static_cast<float*>(panel);
  const int64_t depth = (k_end - k_begin + kStepDepth - 1) / kStepDepth * kStepDepth;
  for (int64_t k = 0; k < depth; k += 16) {
    const __mmask16 mask = simd::tail_mask(k_end - k_begin - k);
    for (int64_t half = 0; half < 2; ++half) {
      __m512 v[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t row = half * 16 + j;
        v[j] = row < rows ? simd::load16(w + row * ldw + k_begin + k, mask) : _mm512_setzero_ps();
      }
      transpose16(v);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (k + i) * kBlockColumns + half * 16, v[i]);
    }
  }
}

// ---- epilogues (both tiers, and amx) ---------------------------------------------------------------

// gelu with tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 1 - 2 / (e^2u + 1).
VOKEN_TARGET_AVX512 inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u =
      _mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x), _mm512_set1_ps(0.7978845608028654f));
  const __m512 e = simd::exp16(_mm512_mul_ps(u, _mm512_set1_ps(2.0f)));
  const __m512 tanh = _mm512_sub_ps(
      _mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh));
}

VOKEN_TARGET_AVX512 void store_packed_512(const PackedOutput& o, const float* c, int64_t row0, int64_t rows,
                                          int64_t block) {
  const int64_t n0 = block * kBlockColumns;
  const __m512 bias0 = o.bias ? _mm512_loadu_ps(o.bias + n0) : _mm512_setzero_ps();
  const __m512 bias1 = o.bias ? _mm512_loadu_ps(o.bias + n0 + 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = o.out_rows[row0 + r];
    if (row < 0) continue;
    const __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns), bias0);
    const __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns + 16), bias1);
    if (o.geglu) {
      simd::store16(o.out + row + block * 16, _mm512_mul_ps(v0, simd::gelu16(v1)));
    } else if (o.residual) {
      simd::store16(o.out + row + n0, _mm512_add_ps(v0, simd::load16(o.residual + row + n0)));
      simd::store16(o.out + row + n0 + 16, _mm512_add_ps(v1, simd::load16(o.residual + row + n0 + 16)));
    } else {
      simd::store16(o.out + row + n0, v0);
      simd::store16(o.out + row + n0 + 16, v1);
    }
  }
}

VOKEN_TARGET_AVX512 void store_inplace_512(const InplaceOutput& o, const float* c, int64_t row0, int64_t rows,
                                           int64_t n0) {
  const int64_t count = std::min<int64_t>(rows, o.m - row0);
  for (int half = 0; half < 2; ++half) {
    const int64_t col = n0 + half * 16;
    if (col >= o.n) break;
    const __mmask16 mask = simd::tail_mask(o.n - col);
    const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(mask, o.bias + col) : _mm512_setzero_ps();
    for (int64_t r = 0; r < count; ++r) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns + half * 16), bias);
      if (o.activation == Activation::GeluErf)
        v = simd::gelu16(v);
      else if (o.activation == Activation::GeluTanh)
        v = gelu_tanh16(v);
      const int64_t row = row0 + r;
      if (o.residual) {
        const int64_t at = row * o.ld_residual + col;
        v = _mm512_add_ps(v, o.residual_bf16
                                 ? simd::load16(static_cast<const bf16_bits*>(o.residual) + at, mask)
                                 : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(o.residual) + at));
      }
      if (o.out_bf16)
        simd::store16(static_cast<bf16_bits*>(o.out) + row * o.ldo + col, v, mask);
      else
        _mm512_mask_storeu_ps(static_cast<float*>(o.out) + row * o.ldo + col, mask, v);
    }
  }
}

}  // namespace

const VectorKernels* avx512_bf16_kernels() {
  static const VectorKernels kernels = [] {
    VectorKernels k;
    k.tier = CpuTier::avx512_bf16;
    k.tile_rows = kRows;
    k.float_operands = false;
    k.chunk_steps = 16;  // a block's weights of a chunk: 32 KiB
    k.product = &product_bf16<kRows>;
    k.small_tile_rows = kSmallRows;
    k.product_small = &product_bf16<kSmallRows>;
    k.pack_rows = &pack_rows_bf16;
    k.store_packed = &store_packed_512;
    k.store_inplace = &store_inplace_512;
    return k;
  }();
  return &kernels;
}

const VectorKernels* avx512_kernels() {
  static const VectorKernels kernels = [] {
    VectorKernels k;
    k.tier = CpuTier::avx512;
    k.tile_rows = kRows;
    k.float_operands = true;
    k.chunk_steps = 8;  // a block's float32 panel of a chunk: 32 KiB
    k.product = &product_f32<kRows>;
    k.small_tile_rows = kSmallRows;
    k.product_small = &product_f32<kSmallRows>;
    k.widen_packed = &widen_packed_f32;
    k.pack_rows = &pack_rows_f32;
    k.store_packed = &store_packed_512;
    k.store_inplace = &store_inplace_512;
    return k;
  }();
  return &kernels;
}

}  // namespace voken::core::gemm

#endif
