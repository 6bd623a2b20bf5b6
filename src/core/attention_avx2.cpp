// Attention kernel of the avx2 tier: float32 FMA on K and V widened at packing, P in float32. The
// same three phases per query block and key chunk as attention_avx512.cpp (see there), with 8-wide
// vectors and 16 registers: 6 query rows x 16 keys per score tile and 6 rows x 16 output columns
// per output tile (12 accumulators each), smaller chunks for the 32 KiB L1 of AVX2-only CPUs.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/attention_internal.h"
#include "core/cpu.h"
#include "core/parallel.h"
#include "core/work_ranges.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx2.h"

namespace voken::core::attention_detail {
namespace {

constexpr int kRows = 24;         // queries per work unit
constexpr int kRowTile = 6;       // query rows per register tile
constexpr int64_t kKeyTile = 16;  // keys per score register tile (2 vectors)
constexpr int64_t kChunk = 128;   // keys per softmax chunk (a multiple of kKeyTile)
// A tail of at most one key tile joins the chunk before it (257 keys: one chunk, not two).
constexpr int64_t kChunkStride = kChunk + kKeyTile;  // scratch row length: the longest chunk
int64_t chunk_length(int64_t remaining) { return remaining <= kChunkStride ? remaining : kChunk; }
constexpr int64_t kKeyGranule = 16;  // keys are padded to a multiple of this
constexpr float kLog2e = 1.44269504088896341f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Problem {
  const AttentionJob* job = nullptr;
  int64_t keys_padded = 0, dims_padded = 0, query_blocks = 0;
  float coef = 0, threshold = 0;  // as in attention_avx512.cpp
  float* packed_k = nullptr;      // per (batch, head): key tiles [head_dim][16] (pack_keys_float32)
  float* packed_v = nullptr;      // per (batch, head): [keys_padded][dims_padded]
  int64_t k_size = 0, v_size = 0;
  explicit Problem(const AttentionJob& j) : job(&j) {
    keys_padded = round_up(j.keys, kKeyGranule);
    dims_padded = round_up(j.head_dim, 8);
    query_blocks = (j.queries + kRows - 1) / kRows;
    coef = j.score_scale() * kLog2e;
    threshold = kRescaleThreshold / j.score_scale();
    k_size = keys_padded * j.head_dim;
    v_size = keys_padded * dims_padded;
  }
};

// 2^x for the softmax exponents, x <= kRescaleThreshold * log2(e) < 12: simd8::exp2_fast8's
// polynomial (relative error < 3e-6) with one exponent-field scale instead of its two (which cover
// the whole float range). x is clamped below at -126: 2^-126 is nothing next to the row's term of
// its running maximum, which is 1.
VOKEN_TARGET_AVX2 inline __m256 exp2_softmax8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.3333558e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(p, simd8::pow2i(n));
}

struct RowState {
  float max[kRows];
  float sum[kRows];
};

// S[kRowTile][16] = Q K^T for one key tile [dims][16].
VOKEN_TARGET_AVX2 void score_tile(const float* q, int64_t q_stride, const float* k, int64_t dims, float* s,
                                  int64_t s_stride) {
  __m256 acc[kRowTile][2];
#pragma GCC unroll 6
  for (int r = 0; r < kRowTile; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dims; ++d) {
    const __m256 k0 = _mm256_load_ps(k + d * 16), k1 = _mm256_load_ps(k + d * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRowTile; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q + r * q_stride + d);
      acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRowTile; ++r) {
    _mm256_store_ps(s + r * s_stride, acc[r][0]);
    _mm256_store_ps(s + r * s_stride + 8, acc[r][1]);
  }
}

// O[kRowTile][NV * 8] += P V over `keys` keys.
template <int NV>
VOKEN_TARGET_AVX2 void output_tile(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                                   int64_t keys, float* o, int64_t o_stride) {
  __m256 acc[kRowTile][NV];
#pragma GCC unroll 6
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 2
    for (int t = 0; t < NV; ++t) acc[r][t] = _mm256_load_ps(o + r * o_stride + t * 8);
  for (int64_t j = 0; j < keys; ++j) {
    __m256 vv[NV];
#pragma GCC unroll 2
    for (int t = 0; t < NV; ++t) vv[t] = _mm256_load_ps(v + j * v_stride + t * 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRowTile; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * p_stride + j);
#pragma GCC unroll 2
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm256_fmadd_ps(pb, vv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 2
    for (int t = 0; t < NV; ++t) _mm256_store_ps(o + r * o_stride + t * 8, acc[r][t]);
}

struct Scratch {
  AlignedBuffer<float> q, s, p,
      o;  // [kRows][head_dim], [kRowTile][kChunkStride], [kRows][kChunkStride], [kRows][dims_padded]
  explicit Scratch(const Problem& pr)
      : q(kRows * pr.job->head_dim),
        s(kRowTile * kChunkStride),
        p(kRows * kChunkStride),
        o(kRows * pr.dims_padded) {}
};

// Q rows widened to float32 (times the scale and rounded to bf16 for ScaledQueryBf16), zero rows
// up to a whole row tile.
VOKEN_TARGET_AVX2 void load_queries(const Problem& pr, int64_t bh, int64_t q0, int rows, int padded_rows,
                                    float* q) {
  const AttentionJob& job = *pr.job;
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  const __m256 scale = _mm256_set1_ps(job.scale);
  for (int r = 0; r < padded_rows; ++r) {
    const bf16_bits* src = r < rows ? job.q_row_ptr(b, h, q0 + r) : nullptr;
    for (int64_t d = 0; d < dims; d += 8) {
      __m256 x = src ? simd8::load8(src + d, dims - d) : _mm256_setzero_ps();
      if (job.scales_query())
        x = _mm256_castsi256_ps(_mm256_slli_epi32(simd8::round_to_bf16_bits(_mm256_mul_ps(x, scale)), 16));
      simd8::store8(q + r * dims + d, x, dims - d);
    }
  }
}

VOKEN_TARGET_AVX2 void softmax_rows(const Problem& pr, const float* s, int64_t valid, int64_t len, int row0,
                                    RowState& state, float* o, float* p) {
  const __m256 coef = _mm256_set1_ps(pr.coef), neg_inf = _mm256_set1_ps(-INFINITY);
  for (int r = 0; r < kRowTile; ++r) {
    const int i = row0 + r;
    const float* srow = s + r * kChunkStride;
    float* orow = o + i * pr.dims_padded;
    __m256 vmax = neg_inf;
    int64_t c = 0;
    for (; c + 8 <= valid; c += 8) vmax = _mm256_max_ps(vmax, _mm256_load_ps(srow + c));
    if (c < valid)
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_load_ps(srow + c),
                                                  _mm256_castsi256_ps(simd8::tail_mask(valid - c))));
    float& max = state.max[i];
    if (max == -INFINITY) {
      max = simd8::reduce_max(vmax);
    } else if (_mm256_movemask_ps(_mm256_cmp_ps(vmax, _mm256_set1_ps(max + pr.threshold), _CMP_GT_OQ))) {
      const float chunk_max = simd8::reduce_max(vmax);
      const float factor = std::exp2((max - chunk_max) * pr.coef);
      max = chunk_max;
      state.sum[i] *= factor;
      const __m256 f = _mm256_set1_ps(factor);
      for (int64_t d = 0; d < pr.dims_padded; d += 8)
        _mm256_store_ps(orow + d, _mm256_mul_ps(_mm256_load_ps(orow + d), f));
    }
    const __m256 shift = _mm256_set1_ps(max * pr.coef);
    float* prow = p + i * kChunkStride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < len; c += 8) {
      __m256 e = exp2_softmax8(_mm256_fmsub_ps(_mm256_load_ps(srow + c), coef, shift));
      if (c + 8 > valid) e = _mm256_and_ps(e, _mm256_castsi256_ps(simd8::tail_mask(valid - c)));
      acc = _mm256_add_ps(acc, e);
      _mm256_store_ps(prow + c, e);
    }
    state.sum[i] += simd8::reduce_add(acc);
  }
}

VOKEN_TARGET_AVX2 void store_rows(const Problem& pr, int64_t bh, int64_t q0, int rows, const float* o,
                                  const RowState& state) {
  const AttentionJob& job = *pr.job;
  const int64_t b = bh / job.heads, h = bh % job.heads;
  for (int r = 0; r < rows; ++r) {
    const __m256 inv = _mm256_set1_ps(1.0f / state.sum[r]);
    bf16_bits* dst = job.out_row_ptr(b, h, q0 + r);
    for (int64_t d = 0; d < job.head_dim; d += 8)
      simd8::store8(dst + d, _mm256_mul_ps(_mm256_load_ps(o + r * pr.dims_padded + d), inv),
                    job.head_dim - d);
  }
}

VOKEN_TARGET_AVX2 void run_units_avx2(const void* context, WorkRanges& ranges, int64_t worker) {
  const Problem& pr = *static_cast<const Problem*>(context);
  const AttentionJob& job = *pr.job;
  const int64_t dims = job.head_dim;
  Scratch w(pr);
  RowState state;
  for (int64_t unit = ranges.next(worker); unit >= 0; unit = ranges.next(worker)) {
    const int64_t bh = unit / pr.query_blocks, q0 = unit % pr.query_blocks * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, job.queries - q0));
    const int tiles = (rows + kRowTile - 1) / kRowTile;
    load_queries(pr, bh, q0, rows, tiles * kRowTile, w.q.get());
    std::memset(w.o.get(), 0, sizeof(float) * tiles * kRowTile * pr.dims_padded);
    std::fill(state.max, state.max + kRows, -INFINITY);
    std::fill(state.sum, state.sum + kRows, 0.0f);
    const float* k = pr.packed_k + bh * pr.k_size;
    const float* v = pr.packed_v + bh * pr.v_size;
    for (int64_t k0 = 0, len = 0; k0 < pr.keys_padded; k0 += len) {
      len = chunk_length(pr.keys_padded - k0);  // a multiple of 16
      const int64_t valid = std::min(len, job.keys - k0);
      for (int t = 0; t < tiles; ++t) {
        const float* qt = w.q.get() + t * kRowTile * dims;
        for (int64_t j = 0; j < len; j += kKeyTile)
          score_tile(qt, dims, k + (k0 + j) * dims, dims, w.s.get() + j, kChunkStride);
        softmax_rows(pr, w.s.get(), valid, len, t * kRowTile, state, w.o.get(), w.p.get());
      }
      for (int t = 0; t < tiles; ++t) {
        const float* pt = w.p.get() + t * kRowTile * kChunkStride;
        float* ot = w.o.get() + t * kRowTile * pr.dims_padded;
        const float* vc = v + k0 * pr.dims_padded;
        int64_t d = 0;
        for (; d + 16 <= pr.dims_padded; d += 16)
          output_tile<2>(pt, kChunkStride, vc + d, pr.dims_padded, len, ot + d, pr.dims_padded);
        if (d < pr.dims_padded)
          output_tile<1>(pt, kChunkStride, vc + d, pr.dims_padded, len, ot + d, pr.dims_padded);
      }
    }
    store_rows(pr, bh, q0, rows, w.o.get(), state);
  }
}

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

void attention_avx2(const AttentionJob& job) {
  Problem pr(job);
  const int64_t groups = job.batch * job.heads;
  AlignedBuffer<float> packed_k(groups * pr.k_size), packed_v(groups * pr.v_size);
  pr.packed_k = packed_k.get();
  pr.packed_v = packed_v.get();
  pack_in_parallel(groups, pr.keys_padded, [&](int64_t bh, int64_t begin, int64_t end) {
    pack_keys_float32(job, bh, kKeyTile, pr.keys_padded, begin, end, pr.packed_k + bh * pr.k_size);
    pack_values_float32(job, bh, begin, end, pr.dims_padded, pr.packed_v + bh * pr.v_size);
  });
  run_units(groups * pr.query_blocks, run_units_avx2, &pr);
}

}  // namespace voken::core::attention_detail

#endif  // VOKEN_X86_KERNELS
