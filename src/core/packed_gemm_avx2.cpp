// The avx2 tier of the GEMM kernels (core/packed_gemm_kernels.h): float32 FMAs on 8-wide vectors.
// AVX2 has 16 vector registers, so a micro-tile is 6 rows x 16 columns (12 accumulators, two
// weight vectors and a broadcast), run for each 16-column half of a block. The activations are a
// float32 copy made once per call; the weights a float32 panel of the block and K chunk, widened
// from the packed bfloat16 once per task (the weights stay bfloat16 in memory).
#include <algorithm>

#include "core/packed_gemm_kernels.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx2.h"

namespace voken::core::gemm {
namespace {

constexpr int kRows = 6;  // rows per micro-tile

// Row r at byte offset `offset`: rows in groups of three off two base pointers, each row one
// [base + index * {0, 1, 2} + displacement] address. The empty asm statement hides the bases from
// the compiler, which otherwise turns every (row, k) address of the unrolled loop into an
// induction variable of its own (and spills them).
struct RowBases {
  const char* base[2];
  int64_t stride;  // bytes between rows

  inline RowBases(const float* a, int64_t lda) {
    stride = lda * static_cast<int64_t>(sizeof(float));
    base[0] = reinterpret_cast<const char*>(a);
    base[1] = base[0] + 3 * stride;
    asm("" : "+r"(base[0]), "+r"(base[1]), "+r"(stride));
  }
  inline const float* row(int r, int64_t offset) const {
    return reinterpret_cast<const float*>(base[r / 3] + (r % 3) * stride + offset);
  }
};

template <int R>
VOKEN_TARGET_AVX2 void steps_avx2(const float* a, int64_t lda, const float* b, int64_t steps,
                                  __m256 (&lo_io)[R], __m256 (&hi_io)[R]) {
  // Local copies: the compiler keeps them in registers across the loop (the caller's arrays it
  // would store and reload at every iteration).
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = lo_io[r];
    hi[r] = hi_io[r];
  }
  static_assert(R <= 6, "two groups of three rows");
  const int64_t depth = steps * kStepDepth;
  for (int64_t k = 0; k < depth; k += 8, a += 8, b += 8 * kBlockColumns) {
    const RowBases rows(a, lda);
#pragma GCC unroll 8
    for (int kk = 0; kk < 8; ++kk) {
      const __m256 b0 = _mm256_loadu_ps(b + kk * kBlockColumns);
      const __m256 b1 = _mm256_loadu_ps(b + kk * kBlockColumns + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 x = _mm256_broadcast_ss(rows.row(r, 4 * kk));
        lo[r] = _mm256_fmadd_ps(x, b0, lo[r]);
        hi[r] = _mm256_fmadd_ps(x, b1, hi[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    lo_io[r] = lo[r];
    hi_io[r] = hi[r];
  }
}

VOKEN_TARGET_AVX2 void product_avx2(const ProductArgs& p) {
  for (int half = 0; half < 2; ++half) {
    float* c = p.c + half * 16;
    __m256 lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) {
      lo[r] = p.accumulate ? _mm256_loadu_ps(c + r * kBlockColumns) : _mm256_setzero_ps();
      hi[r] = p.accumulate ? _mm256_loadu_ps(c + r * kBlockColumns + 8) : _mm256_setzero_ps();
    }
    const float* b = static_cast<const float*>(p.b) + half * 16;
    int64_t s = p.s0;
    while (s < p.s1) {
      const int64_t tap = s / p.tap_steps, in_tap = s % p.tap_steps;
      const int64_t run = std::min(p.s1 - s, p.tap_steps - in_tap);
      steps_avx2<kRows>(static_cast<const float*>(p.a) + p.tap_offset[tap] + in_tap * kStepDepth, p.lda, b,
                        run, lo, hi);
      b += run * kStepElements;
      s += run;
    }
    for (int r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(c + r * kBlockColumns, lo[r]);
      _mm256_storeu_ps(c + r * kBlockColumns + 8, hi[r]);
    }
  }
}

// Packed steps -> float32 [k][32] (see packed_gemm_avx512.cpp: even value = low half shifted up,
// odd value = high half).
VOKEN_TARGET_AVX2 void widen_packed_avx2(const bf16_bits* packed, int64_t steps, float* panel) {
  for (int64_t s = 0; s < steps; ++s)
    for (int half = 0; half < 2; ++half)
      for (int pair = 0; pair < 16; ++pair)
        for (int part = 0; part < 2; ++part) {
          const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              packed + s * kStepElements + half * 512 + pair * 32 + part * 16));
          float* dst = panel + (s * kStepDepth + 2 * pair) * kBlockColumns + half * 16 + part * 8;
          _mm256_storeu_ps(dst, simd8::even_bf16(words));
          _mm256_storeu_ps(dst + kBlockColumns, simd8::odd_bf16(words));
        }
}

// 8 x 8 transpose of float32 lanes.
VOKEN_TARGET_AVX2 void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {
    u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Weight rows read in place -> float32 [k][32] of one block: 8 rows x 8 k widened and transposed.
VOKEN_TARGET_AVX2 void pack_rows_avx2(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin,
                                      int64_t k_end, void* panel) {
  auto* out = static_cast<float*>(panel);
  const int64_t depth = (k_end - k_begin + kStepDepth - 1) / kStepDepth * kStepDepth;
  for (int64_t k = 0; k < depth; k += 8) {
    const int64_t valid = k_end - k_begin - k;
    for (int64_t group = 0; group < 4; ++group) {
      __m256 v[8];
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t row = group * 8 + j;
        const bf16_bits* src = w + row * ldw + k_begin + k;
        v[j] = row >= rows || valid <= 0 ? _mm256_setzero_ps()
               : valid >= 8              ? simd8::load8(src)
                                         : simd8::load8(src, valid);
      }
      transpose8(v);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (k + i) * kBlockColumns + group * 8, v[i]);
    }
  }
}

// gelu with tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 1 - 2 / (e^2u + 1).
VOKEN_TARGET_AVX2 inline __m256 gelu_tanh8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u =
      _mm256_mul_ps(_mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715f), x), _mm256_set1_ps(0.7978845608028654f));
  const __m256 e = simd8::exp8(_mm256_mul_ps(u, _mm256_set1_ps(2.0f)));
  const __m256 tanh = _mm256_sub_ps(
      _mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh));
}

VOKEN_TARGET_AVX2 void store_packed_avx2(const PackedOutput& o, const float* c, int64_t row0, int64_t rows,
                                         int64_t block) {
  const int64_t n0 = block * kBlockColumns;
  __m256 bias[4];
  for (int q = 0; q < 4; ++q) bias[q] = o.bias ? _mm256_loadu_ps(o.bias + n0 + 8 * q) : _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = o.out_rows[row0 + r];
    if (row < 0) continue;
    __m256 v[4];
    for (int q = 0; q < 4; ++q) v[q] = _mm256_add_ps(_mm256_loadu_ps(c + r * kBlockColumns + 8 * q), bias[q]);
    if (o.geglu) {
      simd8::store8(o.out + row + block * 16, _mm256_mul_ps(v[0], simd8::gelu8(v[2])));
      simd8::store8(o.out + row + block * 16 + 8, _mm256_mul_ps(v[1], simd8::gelu8(v[3])));
      continue;
    }
    for (int q = 0; q < 4; ++q) {
      if (o.residual) v[q] = _mm256_add_ps(v[q], simd8::load8(o.residual + row + n0 + 8 * q));
      simd8::store8(o.out + row + n0 + 8 * q, v[q]);
    }
  }
}

VOKEN_TARGET_AVX2 void store_inplace_avx2(const InplaceOutput& o, const float* c, int64_t row0, int64_t rows,
                                          int64_t n0) {
  const int64_t count = std::min<int64_t>(rows, o.m - row0);
  for (int q = 0; q < 4; ++q) {
    const int64_t col = n0 + q * 8;
    if (col >= o.n) break;
    const int64_t valid = o.n - col;  // >= 8: a whole vector
    const __m256 bias = !o.bias      ? _mm256_setzero_ps()
                        : valid >= 8 ? simd8::load8(o.bias + col)
                                     : simd8::load8(o.bias + col, valid);
    for (int64_t r = 0; r < count; ++r) {
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(c + r * kBlockColumns + q * 8), bias);
      if (o.activation == Activation::GeluErf)
        v = simd8::gelu8(v);
      else if (o.activation == Activation::GeluTanh)
        v = gelu_tanh8(v);
      const int64_t row = row0 + r;
      if (o.residual) {
        const int64_t at = row * o.ld_residual + col;
        if (o.residual_bf16) {
          const auto* res = static_cast<const bf16_bits*>(o.residual) + at;
          v = _mm256_add_ps(v, valid >= 8 ? simd8::load8(res) : simd8::load8(res, valid));
        } else {
          const auto* res = static_cast<const float*>(o.residual) + at;
          v = _mm256_add_ps(v, valid >= 8 ? simd8::load8(res) : simd8::load8(res, valid));
        }
      }
      if (o.out_bf16) {
        auto* dst = static_cast<bf16_bits*>(o.out) + row * o.ldo + col;
        valid >= 8 ? simd8::store8(dst, v) : simd8::store8(dst, v, valid);
      } else {
        auto* dst = static_cast<float*>(o.out) + row * o.ldo + col;
        valid >= 8 ? simd8::store8(dst, v) : simd8::store8(dst, v, valid);
      }
    }
  }
}

}  // namespace

const VectorKernels* avx2_kernels() {
  static const VectorKernels kernels = [] {
    VectorKernels k;
    k.tier = CpuTier::avx2;
    k.tile_rows = kRows;
    k.float_operands = true;
    k.chunk_steps = 8;  // a block's float32 panel of a chunk: 32 KiB
    k.product = &product_avx2;
    k.widen_packed = &widen_packed_avx2;
    k.pack_rows = &pack_rows_avx2;
    k.store_packed = &store_packed_avx2;
    k.store_inplace = &store_inplace_avx2;
    return k;
  }();
  return &kernels;
}

}  // namespace voken::core::gemm

#endif
