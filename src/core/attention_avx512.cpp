// Attention kernels of the avx512_bf16 tier (vdpbf16ps, P rounded to bf16) and the avx512 tier
// (float32 FMA on K and V widened at packing, P in float32). See core/attention.h.
//
// Per (batch, head) K and V are packed once. Each work unit is a block of kRows queries, streamed
// over the keys in chunks of kChunk with an online softmax, in three phases per chunk:
//   1. S = Q K^T, 6 query rows x 64 keys per register tile (24 accumulators, 10 loads per 24
//      products), the chunk's K (key tiles contiguous) hot in L1 across the block's row tiles;
//   2. the softmax of those rows right away (their scores still in L1): the running maximum,
//      rescaling of the output rows when it moves, P written for phase 3;
//   3. O += P V, 6 rows x 64 output columns per register tile, the chunk's V hot in L1.
// The output rows (float32, kRows x D) stay in L1/L2 for the whole block.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/attention_internal.h"
#include "core/cpu.h"
#include "core/parallel.h"
#include "core/work_ranges.h"

#ifdef VOKEN_X86_KERNELS

#include <immintrin.h>

#include "core/simd_avx512.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core::attention_detail {
namespace {

constexpr int kRows = 48;         // queries per work unit
constexpr int kRowTile = 6;       // query rows per register tile
constexpr int64_t kKeyTile = 64;  // keys per score register tile (4 vectors)
constexpr int64_t kChunk = 256;   // keys per softmax chunk (a multiple of kKeyTile)
// A tail of at most one key tile joins the chunk before it (257 keys: one chunk, not two).
constexpr int64_t kChunkStride = kChunk + kKeyTile;  // scratch row length: the longest chunk
int64_t chunk_length(int64_t remaining) { return remaining <= kChunkStride ? remaining : kChunk; }
constexpr int64_t kKeyGranule = 16;  // keys are padded to a multiple of this (one vector)
constexpr float kLog2e = 1.44269504088896341f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// What both AVX-512 kernels know of a call.
struct Geometry {
  const AttentionJob* job = nullptr;
  int64_t keys_padded = 0;   // keys rounded up to kKeyGranule
  int64_t dims_padded = 0;   // head_dim rounded up to 16 (output columns)
  int64_t query_blocks = 0;  // ceil(queries / kRows)
  float coef = 0;            // score scale * log2(e): p = 2^(s * coef - max * coef)
  float threshold = 0;       // kRescaleThreshold in score units
  explicit Geometry(const AttentionJob& j) : job(&j) {
    keys_padded = round_up(j.keys, kKeyGranule);
    dims_padded = round_up(j.head_dim, 16);
    query_blocks = (j.queries + kRows - 1) / kRows;
    coef = j.score_scale() * kLog2e;
    threshold = kRescaleThreshold / j.score_scale();
  }
};

// The online softmax's state of a block's rows.
struct RowState {
  float max[kRows];
  float sum[kRows];
};

// The chunk maximum of a score row over its `valid` real keys; raises the running maximum when the
// chunk exceeds it by more than the threshold and rescales the row's output and sum. Returns
// max * coef, the shift of the exponent.
VOKEN_TARGET_AVX512 inline float update_row_max(const float* s, int64_t valid, const Geometry& g, float& max,
                                                float& sum, float* o) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t c = 0; c < valid; c += 16)
    vmax = _mm512_mask_max_ps(vmax, simd::tail_mask(valid - c), vmax, _mm512_loadu_ps(s + c));
  if (max == -INFINITY) {
    max = _mm512_reduce_max_ps(vmax);
  } else if (_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(max + g.threshold), _CMP_GT_OQ)) {
    const float chunk_max = _mm512_reduce_max_ps(vmax);
    const float factor = std::exp2((max - chunk_max) * g.coef);
    max = chunk_max;
    sum *= factor;
    const __m512 f = _mm512_set1_ps(factor);
    for (int64_t d = 0; d < g.dims_padded; d += 16)
      _mm512_store_ps(o + d, _mm512_mul_ps(_mm512_load_ps(o + d), f));
  }
  return max * g.coef;
}

// 2^(s * coef - shift) for 16 scores, zero for keys at or beyond `valid_here` (relative index).
VOKEN_TARGET_AVX512 inline __m512 probabilities16(const float* s, __m512 coef, __m512 shift,
                                                  int64_t valid_here) {
  const __m512 p = simd::exp2_fast16(_mm512_fmsub_ps(_mm512_loadu_ps(s), coef, shift));
  return valid_here >= 16 ? p : _mm512_maskz_mov_ps(simd::tail_mask(valid_here), p);
}

// Writes the block's output rows: O / sum rounded to bf16.
VOKEN_TARGET_AVX512 void store_rows(const AttentionJob& job, const Geometry& g, int64_t bh, int64_t q0,
                                    int rows, const float* o, const RowState& state) {
  const int64_t b = bh / job.heads, h = bh % job.heads;
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / state.sum[r]);
    bf16_bits* dst = job.out_row_ptr(b, h, q0 + r);
    for (int64_t d = 0; d < job.head_dim; d += 16)
      simd::store16(dst + d, _mm512_mul_ps(_mm512_load_ps(o + r * g.dims_padded + d), inv),
                    simd::tail_mask(job.head_dim - d));
  }
}

// ---------------------------------------------------------------------------------------------
// Packing into bf16 pairs (for this file's avx512_bf16 kernel and the AMX one).

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

// ---------------------------------------------------------------------------------------------
// avx512_bf16: Q, K, P and V as bf16 pairs in 32-bit words; vdpbf16ps accumulates in float32.

struct Bf16Problem : Geometry {
  int64_t dim_words = 0;         // ceil(head_dim / 2): the Q K^T reduction in dimension pairs
  uint32_t* packed_k = nullptr;  // per (batch, head): key tiles [dim_words][64] (pack_keys_bf16_pairs)
  uint32_t* packed_v = nullptr;  // per (batch, head): [keys_padded / 2][dims_padded] key pairs
  int64_t k_size = 0, v_size = 0;
  explicit Bf16Problem(const AttentionJob& j) : Geometry(j) {
    dim_words = (j.head_dim + 1) / 2;
    k_size = keys_padded * dim_words;
    v_size = keys_padded / 2 * dims_padded;
  }
};

// S[kRowTile][NT * 16] = Q K^T for one key tile: q rows of `dim_words` words (q_stride apart),
// k the tile [dim_words][NT * 16].
template <int NT>
VOKEN_TARGET_AVX512_BF16 void score_tile_bf16(const uint32_t* q, int64_t q_stride, const uint32_t* k,
                                              int64_t dim_words, float* s, int64_t s_stride) {
  __m512 acc[kRowTile][NT];
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < dim_words; ++w) {
    __m512bh kv[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) kv[t] = (__m512bh)_mm512_load_si512(k + w * NT * 16 + t * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRowTile; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * q_stride + w]));
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qb, kv[t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_store_ps(s + r * s_stride + t * 16, acc[r][t]);
}

// O[kRowTile][NV * 16] += P V over `pairs` key pairs: p rows of words (p_stride words apart), v
// rows of words v_stride apart, o rows o_stride floats apart.
template <int NV>
VOKEN_TARGET_AVX512_BF16 void output_tile_bf16(const uint32_t* p, int64_t p_stride, const uint32_t* v,
                                               int64_t v_stride, int64_t pairs, float* o, int64_t o_stride) {
  __m512 acc[kRowTile][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_load_ps(o + r * o_stride + t * 16);
  for (int64_t w = 0; w < pairs; ++w) {
    __m512bh vv[NV];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) vv[t] = (__m512bh)_mm512_load_si512(v + w * v_stride + t * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRowTile; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * p_stride + w]));
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], pb, vv[t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) _mm512_store_ps(o + r * o_stride + t * 16, acc[r][t]);
}

struct Bf16Scratch {
  AlignedBuffer<uint32_t> q, p;  // [kRows][dim_words] query pairs; [kRows][kChunkStride / 2] P pairs
  AlignedBuffer<float> s, o;     // [kRowTile][kChunkStride] scores; [kRows][dims_padded] output
  explicit Bf16Scratch(const Bf16Problem& pr)
      : q(kRows * pr.dim_words),
        p(kRows * kChunkStride / 2),
        s(kRowTile * kChunkStride),
        o(kRows * pr.dims_padded) {}
};

// Q rows [q0, q0 + rows) of one head as bf16 pairs (times the scale, rounded, for
// ScaledQueryBf16), zero rows up to a whole row tile.
VOKEN_TARGET_AVX512_BF16 void load_queries_bf16(const Bf16Problem& pr, int64_t bh, int64_t q0, int rows,
                                                int padded_rows, uint32_t* q) {
  const AttentionJob& job = *pr.job;
  const int64_t b = bh / job.heads, h = bh % job.heads, width = 2 * pr.dim_words;
  const __m512 scale = _mm512_set1_ps(job.scale);
  for (int r = 0; r < padded_rows; ++r) {
    bf16_bits* dst = reinterpret_cast<bf16_bits*>(q + r * pr.dim_words);
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

VOKEN_TARGET_AVX512_BF16 void softmax_rows_bf16(const Bf16Problem& pr, const float* s, int64_t valid,
                                                int64_t len, int row0, RowState& state, float* o,
                                                uint32_t* p) {
  const __m512 coef = _mm512_set1_ps(pr.coef);
  for (int r = 0; r < kRowTile; ++r) {
    const int i = row0 + r;
    const float* srow = s + r * kChunkStride;
    const __m512 shift =
        _mm512_set1_ps(update_row_max(srow, valid, pr, state.max[i], state.sum[i], o + i * pr.dims_padded));
    uint32_t* prow = p + i * (kChunkStride / 2);
    __m512 acc = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= len; c += 32) {
      const __m512 p0 = probabilities16(srow + c, coef, shift, valid - c);
      const __m512 p1 = probabilities16(srow + c + 16, coef, shift, valid - c - 16);
      acc = _mm512_add_ps(acc, _mm512_add_ps(p0, p1));
      _mm512_store_si512(prow + c / 2, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    if (c < len) {  // 16 keys left
      const __m512 p0 = probabilities16(srow + c, coef, shift, valid - c);
      acc = _mm512_add_ps(acc, p0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(prow + c / 2), (__m256i)_mm512_cvtneps_pbh(p0));
    }
    state.sum[i] += _mm512_reduce_add_ps(acc);
  }
}

VOKEN_TARGET_AVX512_BF16 void scores_bf16(const Bf16Problem& pr, const uint32_t* q, const uint32_t* k,
                                          int64_t len, float* s) {
  for (int64_t j = 0; j < len; j += kKeyTile) {
    const uint32_t* tile = k + j * pr.dim_words;
    switch (std::min<int64_t>(kKeyTile, len - j) / 16) {
      case 4:
        score_tile_bf16<4>(q, pr.dim_words, tile, pr.dim_words, s + j, kChunkStride);
        break;
      case 3:
        score_tile_bf16<3>(q, pr.dim_words, tile, pr.dim_words, s + j, kChunkStride);
        break;
      case 2:
        score_tile_bf16<2>(q, pr.dim_words, tile, pr.dim_words, s + j, kChunkStride);
        break;
      default:
        score_tile_bf16<1>(q, pr.dim_words, tile, pr.dim_words, s + j, kChunkStride);
        break;
    }
  }
}

VOKEN_TARGET_AVX512_BF16 void outputs_bf16(const Bf16Problem& pr, const uint32_t* p, const uint32_t* v,
                                           int64_t pairs, float* o) {
  for (int64_t d = 0; d < pr.dims_padded; d += 64) {
    switch (std::min<int64_t>(64, pr.dims_padded - d) / 16) {
      case 4:
        output_tile_bf16<4>(p, kChunkStride / 2, v + d, pr.dims_padded, pairs, o + d, pr.dims_padded);
        break;
      case 3:
        output_tile_bf16<3>(p, kChunkStride / 2, v + d, pr.dims_padded, pairs, o + d, pr.dims_padded);
        break;
      case 2:
        output_tile_bf16<2>(p, kChunkStride / 2, v + d, pr.dims_padded, pairs, o + d, pr.dims_padded);
        break;
      default:
        output_tile_bf16<1>(p, kChunkStride / 2, v + d, pr.dims_padded, pairs, o + d, pr.dims_padded);
        break;
    }
  }
}

VOKEN_TARGET_AVX512_BF16 void run_bf16_units(const void* context, WorkRanges& ranges, int64_t worker) {
  const Bf16Problem& pr = *static_cast<const Bf16Problem*>(context);
  const AttentionJob& job = *pr.job;
  Bf16Scratch w(pr);
  RowState state;
  for (int64_t unit = ranges.next(worker); unit >= 0; unit = ranges.next(worker)) {
    const int64_t bh = unit / pr.query_blocks, q0 = unit % pr.query_blocks * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, job.queries - q0));
    const int tiles = (rows + kRowTile - 1) / kRowTile;
    load_queries_bf16(pr, bh, q0, rows, tiles * kRowTile, w.q.get());
    std::memset(w.o.get(), 0, sizeof(float) * tiles * kRowTile * pr.dims_padded);
    std::fill(state.max, state.max + kRows, -INFINITY);
    std::fill(state.sum, state.sum + kRows, 0.0f);
    const uint32_t* k = pr.packed_k + bh * pr.k_size;
    const uint32_t* v = pr.packed_v + bh * pr.v_size;
    for (int64_t k0 = 0, len = 0; k0 < pr.keys_padded; k0 += len) {
      len = chunk_length(pr.keys_padded - k0);  // a multiple of 16
      const int64_t valid = std::min(len, job.keys - k0);
      for (int t = 0; t < tiles; ++t) {
        scores_bf16(pr, w.q.get() + t * kRowTile * pr.dim_words, k + k0 * pr.dim_words, len, w.s.get());
        softmax_rows_bf16(pr, w.s.get(), valid, len, t * kRowTile, state, w.o.get(), w.p.get());
      }
      for (int t = 0; t < tiles; ++t)
        outputs_bf16(pr, w.p.get() + t * kRowTile * (kChunkStride / 2), v + k0 / 2 * pr.dims_padded, len / 2,
                     w.o.get() + t * kRowTile * pr.dims_padded);
    }
    store_rows(job, pr, bh, q0, rows, w.o.get(), state);
  }
}

// ---------------------------------------------------------------------------------------------
// avx512: float32 FMA on K and V widened once; P stays float32.

struct Float32Problem : Geometry {
  float* packed_k = nullptr;  // per (batch, head): key tiles [head_dim][64] (pack_keys_float32)
  float* packed_v = nullptr;  // per (batch, head): [keys_padded][dims_padded]
  int64_t k_size = 0, v_size = 0;
  explicit Float32Problem(const AttentionJob& j) : Geometry(j) {
    k_size = keys_padded * j.head_dim;
    v_size = keys_padded * dims_padded;
  }
};

template <int NT>
VOKEN_TARGET_AVX512 void score_tile_f32(const float* q, int64_t q_stride, const float* k, int64_t dims,
                                        float* s, int64_t s_stride) {
  __m512 acc[kRowTile][NT];
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dims; ++d) {
    __m512 kv[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) kv[t] = _mm512_load_ps(k + d * NT * 16 + t * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRowTile; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * q_stride + d]);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(qb, kv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm512_store_ps(s + r * s_stride + t * 16, acc[r][t]);
}

template <int NV>
VOKEN_TARGET_AVX512 void output_tile_f32(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                                         int64_t keys, float* o, int64_t o_stride) {
  __m512 acc[kRowTile][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_load_ps(o + r * o_stride + t * 16);
  for (int64_t j = 0; j < keys; ++j) {
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) vv[t] = _mm512_load_ps(v + j * v_stride + t * 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRowTile; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * p_stride + j]);
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_fmadd_ps(pb, vv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRowTile; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) _mm512_store_ps(o + r * o_stride + t * 16, acc[r][t]);
}

struct Float32Scratch {
  AlignedBuffer<float> q, s, p,
      o;  // [kRows][head_dim], [kRowTile][kChunkStride], [kRows][kChunkStride], [kRows][dims_padded]
  explicit Float32Scratch(const Float32Problem& pr)
      : q(kRows * pr.job->head_dim),
        s(kRowTile * kChunkStride),
        p(kRows * kChunkStride),
        o(kRows * pr.dims_padded) {}
};

// Q rows widened to float32 (times the scale and rounded to bf16 for ScaledQueryBf16), zero rows
// up to a whole row tile.
VOKEN_TARGET_AVX512 void load_queries_f32(const Float32Problem& pr, int64_t bh, int64_t q0, int rows,
                                          int padded_rows, float* q) {
  const AttentionJob& job = *pr.job;
  const int64_t b = bh / job.heads, h = bh % job.heads, dims = job.head_dim;
  const __m512 scale = _mm512_set1_ps(job.scale);
  for (int r = 0; r < padded_rows; ++r) {
    const bf16_bits* src = r < rows ? job.q_row_ptr(b, h, q0 + r) : nullptr;
    for (int64_t d = 0; d < dims; d += 16) {
      const __mmask16 m = simd::tail_mask(dims - d);
      __m512 x = src ? simd::load16(src + d, m) : _mm512_setzero_ps();
      if (job.scales_query()) {
        // Rounded to bf16 as upstream's q * scale, then widened again.
        const __m512i bits = simd::round_to_bf16_bits(_mm512_mul_ps(x, scale));
        x = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      }
      _mm512_mask_storeu_ps(q + r * dims + d, m, x);
    }
  }
}

VOKEN_TARGET_AVX512 void softmax_rows_f32(const Float32Problem& pr, float* s, int64_t valid, int64_t len,
                                          int row0, RowState& state, float* o, float* p) {
  const __m512 coef = _mm512_set1_ps(pr.coef);
  for (int r = 0; r < kRowTile; ++r) {
    const int i = row0 + r;
    const float* srow = s + r * kChunkStride;
    const __m512 shift =
        _mm512_set1_ps(update_row_max(srow, valid, pr, state.max[i], state.sum[i], o + i * pr.dims_padded));
    float* prow = p + i * kChunkStride;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < len; c += 16) {
      const __m512 p0 = probabilities16(srow + c, coef, shift, valid - c);
      acc = _mm512_add_ps(acc, p0);
      _mm512_store_ps(prow + c, p0);
    }
    state.sum[i] += _mm512_reduce_add_ps(acc);
  }
}

VOKEN_TARGET_AVX512 void scores_f32(const Float32Problem& pr, const float* q, const float* k, int64_t len,
                                    float* s) {
  const int64_t dims = pr.job->head_dim;
  for (int64_t j = 0; j < len; j += kKeyTile) {
    const float* tile = k + j * dims;
    switch (std::min<int64_t>(kKeyTile, len - j) / 16) {
      case 4:
        score_tile_f32<4>(q, dims, tile, dims, s + j, kChunkStride);
        break;
      case 3:
        score_tile_f32<3>(q, dims, tile, dims, s + j, kChunkStride);
        break;
      case 2:
        score_tile_f32<2>(q, dims, tile, dims, s + j, kChunkStride);
        break;
      default:
        score_tile_f32<1>(q, dims, tile, dims, s + j, kChunkStride);
        break;
    }
  }
}

VOKEN_TARGET_AVX512 void outputs_f32(const Float32Problem& pr, const float* p, const float* v, int64_t keys,
                                     float* o) {
  for (int64_t d = 0; d < pr.dims_padded; d += 64) {
    switch (std::min<int64_t>(64, pr.dims_padded - d) / 16) {
      case 4:
        output_tile_f32<4>(p, kChunkStride, v + d, pr.dims_padded, keys, o + d, pr.dims_padded);
        break;
      case 3:
        output_tile_f32<3>(p, kChunkStride, v + d, pr.dims_padded, keys, o + d, pr.dims_padded);
        break;
      case 2:
        output_tile_f32<2>(p, kChunkStride, v + d, pr.dims_padded, keys, o + d, pr.dims_padded);
        break;
      default:
        output_tile_f32<1>(p, kChunkStride, v + d, pr.dims_padded, keys, o + d, pr.dims_padded);
        break;
    }
  }
}

VOKEN_TARGET_AVX512 void run_f32_units(const void* context, WorkRanges& ranges, int64_t worker) {
  const Float32Problem& pr = *static_cast<const Float32Problem*>(context);
  const AttentionJob& job = *pr.job;
  Float32Scratch w(pr);
  RowState state;
  for (int64_t unit = ranges.next(worker); unit >= 0; unit = ranges.next(worker)) {
    const int64_t bh = unit / pr.query_blocks, q0 = unit % pr.query_blocks * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, job.queries - q0));
    const int tiles = (rows + kRowTile - 1) / kRowTile;
    load_queries_f32(pr, bh, q0, rows, tiles * kRowTile, w.q.get());
    std::memset(w.o.get(), 0, sizeof(float) * tiles * kRowTile * pr.dims_padded);
    std::fill(state.max, state.max + kRows, -INFINITY);
    std::fill(state.sum, state.sum + kRows, 0.0f);
    const float* k = pr.packed_k + bh * pr.k_size;
    const float* v = pr.packed_v + bh * pr.v_size;
    for (int64_t k0 = 0, len = 0; k0 < pr.keys_padded; k0 += len) {
      len = chunk_length(pr.keys_padded - k0);
      const int64_t valid = std::min(len, job.keys - k0);
      for (int t = 0; t < tiles; ++t) {
        scores_f32(pr, w.q.get() + t * kRowTile * job.head_dim, k + k0 * job.head_dim, len, w.s.get());
        softmax_rows_f32(pr, w.s.get(), valid, len, t * kRowTile, state, w.o.get(), w.p.get());
      }
      for (int t = 0; t < tiles; ++t)
        outputs_f32(pr, w.p.get() + t * kRowTile * kChunkStride, v + k0 * pr.dims_padded, len,
                    w.o.get() + t * kRowTile * pr.dims_padded);
    }
    store_rows(job, pr, bh, q0, rows, w.o.get(), state);
  }
}

}  // namespace

void attention_avx512_bf16(const AttentionJob& job) {
  Bf16Problem pr(job);
  const int64_t groups = job.batch * job.heads;
  AlignedBuffer<uint32_t> packed_k(groups * pr.k_size), packed_v(groups * pr.v_size);
  pr.packed_k = packed_k.get();
  pr.packed_v = packed_v.get();
  pack_in_parallel(groups, pr.keys_padded, [&](int64_t bh, int64_t begin, int64_t end) {
    pack_keys_bf16_pairs(job, bh, kKeyTile, pr.dim_words, pr.keys_padded, begin, end,
                         pr.packed_k + bh * pr.k_size);
    pack_values_bf16_pairs(job, bh, begin, end, pr.dims_padded, pr.packed_v + bh * pr.v_size);
  });
  run_units(groups * pr.query_blocks, run_bf16_units, &pr);
}

void attention_avx512(const AttentionJob& job) {
  Float32Problem pr(job);
  const int64_t groups = job.batch * job.heads;
  AlignedBuffer<float> packed_k(groups * pr.k_size), packed_v(groups * pr.v_size);
  pr.packed_k = packed_k.get();
  pr.packed_v = packed_v.get();
  pack_in_parallel(groups, pr.keys_padded, [&](int64_t bh, int64_t begin, int64_t end) {
    pack_keys_float32(job, bh, kKeyTile, pr.keys_padded, begin, end, pr.packed_k + bh * pr.k_size);
    pack_values_float32(job, bh, begin, end, pr.dims_padded, pr.packed_v + bh * pr.v_size);
  });
  run_units(groups * pr.query_blocks, run_f32_units, &pr);
}

}  // namespace voken::core::attention_detail

#endif  // VOKEN_X86_KERNELS
