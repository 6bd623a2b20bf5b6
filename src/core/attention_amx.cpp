// Attention kernel of the amx tier: both numerics modes (see core/attention.h), any key count,
// heads of up to kAttentionMaxHeadDim dimensions.
//
// Per (batch, head) K is packed as 32-bit words [dq/2][keys_padded] (a dimension pair per word,
// the layout of AMX B tiles for Q K^T) and V as [keys_padded/2][dv] (a key pair per word, B tiles
// for P V). Each work unit is a block of 32 queries (two 16-row tiles, so that each K and V tile
// load serves both) streamed over the keys in 512-key chunks (switching between AMX and AVX-512
// work has a cost, so each phase runs over a whole chunk):
//   1. S = Q K^T for the chunk, 32 keys per step: tiles Q0, Q1 (A) x K0, K1 (B) -> four S tiles;
//   2. online softmax of the chunk's 32 x 512 scores in AVX-512 (float32), P rounded to bf16;
//   3. O += P V, output columns 32 at a time: tiles P0, P1 (A) x V0, V1 (B) -> four O tiles
//      loaded from and stored to the block's float32 output rows once per chunk (a rescale is then
//      a plain multiply of those rows).
// Tiles: 0, 1 A (Q or P); 2, 3 B (K or V); 4-7 S or O.
//
// This kernel keeps its own block loop rather than the driver of the other tiers
// (attention_flash.h): its row sums are 16-lane partial sums carried across chunks (a scalar sum
// per chunk, as the driver keeps, would change its results), its 512-key chunks take no tail, and
// each phase runs over the whole 32-row block between tile loads. It shares the packing of K and
// V and the rule for the running maxima (raise_row_max).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/attention_internal.h"
#include "core/cpu.h"
#include "core/parallel.h"
#include "core/work_ranges.h"

#ifdef VOKEN_HAVE_AMX

#include "core/amx.h"
#include "core/simd_avx512.h"

namespace voken::core::attention_detail {
namespace {

constexpr int kRows = 32;        // queries per block
constexpr int64_t kKeys = 32;    // key padding granule: one 32-deep P tile
constexpr int64_t kChunk = 512;  // keys per softmax chunk

struct Problem {
  const AttentionJob* job = nullptr;
  int64_t dq = 0;           // head_dim rounded up to 32: the Q K^T reduction, in 32-deep steps
  int64_t dv = 0;           // head_dim rounded up to 16: P V output columns, 16 per tile
  int64_t keys_padded = 0;  // keys rounded up to kKeys
  int64_t query_blocks = 0;
  float coef = 0, threshold = 0;  // score scale * log2(e); kRescaleThreshold in score units
  const uint32_t *packed_k = nullptr, *packed_v = nullptr;
  int64_t k_size = 0, v_size = 0;  // words per (batch, head)
  explicit Problem(const AttentionJob& j) : job(&j) {
    dq = (j.head_dim + 31) / 32 * 32;
    dv = (j.head_dim + 15) / 16 * 16;
    keys_padded = (j.keys + kKeys - 1) / kKeys * kKeys;
    query_blocks = (j.queries + kRows - 1) / kRows;
    coef = j.exponent_coef();
    threshold = j.rescale_threshold();
    k_size = dq / 2 * keys_padded;
    v_size = keys_padded / 2 * dv;
  }
};

struct Scratch {
  AlignedBuffer<bf16_bits> q, p;   // [kRows][dq] queries; [kRows][kChunk] probabilities
  AlignedBuffer<float> s, o, sum;  // [kRows][kChunk] scores; [kRows][dv] output; [kRows][16] sums
  explicit Scratch(const Problem& pr)
      : q(kRows * pr.dq), p(kRows * kChunk), s(kRows * kChunk), o(kRows * pr.dv), sum(kRows * 16) {}
};

VOKEN_TARGET_AMX void run_block(const Problem& pr, int64_t unit, Scratch& w) {
  const AttentionJob& job = *pr.job;
  const int64_t bh = unit / pr.query_blocks, q0 = unit % pr.query_blocks * kRows;
  const int64_t b = bh / job.heads, h = bh % job.heads;
  const int rows = static_cast<int>(std::min<int64_t>(kRows, job.queries - q0));
  const int64_t kp = pr.keys_padded, dq = pr.dq, dv = pr.dv;
  bf16_bits* const qbuf = w.q.get();
  bf16_bits* const pbuf = w.p.get();
  float* const sbuf = w.s.get();
  float* const obuf = w.o.get();
  float* const lsum = w.sum.get();
  float row_max[kRows];

  // Q rows (times the scale, rounded to bf16, for ScaledQueryBf16), zero padded to dq columns and
  // kRows rows.
  const __m512 scale = _mm512_set1_ps(job.scale);
  for (int r = 0; r < kRows; ++r) {
    const bf16_bits* src = r < rows ? job.q_row_ptr(b, h, q0 + r) : nullptr;
    for (int64_t d = 0; d < dq; d += 16) {
      const __mmask16 m = src ? simd::tail_mask(job.head_dim - d) : __mmask16(0);
      if (job.scales_query())
        simd::store16(qbuf + r * dq + d, _mm512_mul_ps(simd::load16(src ? src + d : qbuf, m), scale));
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qbuf + r * dq + d),
                            _mm256_maskz_loadu_epi16(m, src ? src + d : qbuf));
    }
  }
  std::memset(obuf, 0, sizeof(float) * kRows * dv);
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    _mm512_store_ps(lsum + r * 16, _mm512_setzero_ps());
  }
  const bf16_bits* kv = reinterpret_cast<const bf16_bits*>(pr.packed_k + bh * pr.k_size);
  const bf16_bits* vv = reinterpret_cast<const bf16_bits*>(pr.packed_v + bh * pr.v_size);
  const int dsteps = static_cast<int>(dq / 32);
  const int otiles = static_cast<int>(dv / 16);
  const int64_t q_stride = dq * sizeof(bf16_bits);
  const int64_t k_stride = kp * 2 * sizeof(bf16_bits);
  const int64_t v_stride = dv * 2 * sizeof(bf16_bits);
  constexpr int64_t kSStride = kChunk * sizeof(float);
  constexpr int64_t kPStride = kChunk * sizeof(bf16_bits);
  const int64_t o_stride = dv * sizeof(float);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const __m512 coef = _mm512_set1_ps(pr.coef);

  for (int64_t k0 = 0; k0 < kp; k0 += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, kp - k0);  // a multiple of kKeys
    const int64_t valid = std::min<int64_t>(len, job.keys - k0);

    // 1. S = Q K^T.
    for (int64_t j = 0; j < len; j += kKeys) {
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int ds = 0; ds < dsteps; ++ds) {
        const bf16_bits* kb = kv + (ds * 16 * kp + k0 + j) * 2;
        _tile_loadd(2, kb, k_stride);
        _tile_loadd(0, qbuf + ds * 32, q_stride);
        _tile_loadd(3, kb + 32, k_stride);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_loadd(1, qbuf + 16 * dq + ds * 32, q_stride);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
      _tile_stored(4, sbuf + j, kSStride);
      _tile_stored(5, sbuf + j + 16, kSStride);
      _tile_stored(6, sbuf + 16 * kChunk + j, kSStride);
      _tile_stored(7, sbuf + 16 * kChunk + j + 16, kSStride);
    }

    // 2. Online softmax: P = 2^(S * coef - rowmax * coef); keys beyond `valid` masked.
    for (int r = 0; r < kRows; ++r) {
      const float* srow = sbuf + r * kChunk;
      __m512 vmax = neg_inf;
      for (int64_t c = 0; c < valid; c += 16)
        vmax = _mm512_mask_max_ps(vmax, simd::tail_mask(valid - c), vmax, _mm512_load_ps(srow + c));
      const float factor = raise_row_max(row_max[r], _mm512_reduce_max_ps(vmax), pr.threshold, pr.coef);
      if (factor != 1.0f) {
        const __m512 f = _mm512_set1_ps(factor);
        for (int64_t c = 0; c < dv; c += 16)
          _mm512_store_ps(obuf + r * dv + c, _mm512_mul_ps(_mm512_load_ps(obuf + r * dv + c), f));
      }
      const __m512 shift = _mm512_set1_ps(row_max[r] * pr.coef);
      __m512 acc = _mm512_mul_ps(_mm512_load_ps(lsum + r * 16), _mm512_set1_ps(factor));
      bf16_bits* prow = pbuf + r * kChunk;
      for (int64_t c = 0; c < len; c += 32) {
        __m512 p0 = simd::exp2_fast16(_mm512_fmsub_ps(_mm512_load_ps(srow + c), coef, shift));
        __m512 p1 = simd::exp2_fast16(_mm512_fmsub_ps(_mm512_load_ps(srow + c + 16), coef, shift));
        if (c + 32 > valid) {
          p0 = _mm512_maskz_mov_ps(simd::tail_mask(valid - c), p0);
          p1 = _mm512_maskz_mov_ps(simd::tail_mask(valid - c - 16), p1);
        }
        acc = _mm512_add_ps(acc, _mm512_add_ps(p0, p1));
        _mm512_store_si512(reinterpret_cast<__m512i*>(prow + c), (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      }
      _mm512_store_ps(lsum + r * 16, acc);
    }

    // 3. O += P V over the chunk's keys, 32 at a time, 32 output columns per pass.
    for (int t = 0; t < otiles; t += 2) {
      const bool pair = t + 1 < otiles;
      float* o = obuf + t * 16;
      _tile_loadd(4, o, o_stride);
      _tile_loadd(6, o + 16 * dv, o_stride);
      if (pair) {
        _tile_loadd(5, o + 16, o_stride);
        _tile_loadd(7, o + 16 * dv + 16, o_stride);
      }
      for (int64_t j = 0; j < len; j += kKeys) {
        const bf16_bits* vb = vv + ((k0 + j) / 2 * dv + t * 16) * 2;
        _tile_loadd(2, vb, v_stride);
        _tile_loadd(0, pbuf + j, kPStride);
        _tile_loadd(1, pbuf + 16 * kChunk + j, kPStride);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(6, 1, 2);
        if (pair) {
          _tile_loadd(3, vb + 32, v_stride);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
      _tile_stored(4, o, o_stride);
      _tile_stored(6, o + 16 * dv, o_stride);
      if (pair) {
        _tile_stored(5, o + 16, o_stride);
        _tile_stored(7, o + 16 * dv + 16, o_stride);
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_load_ps(lsum + r * 16)));
    bf16_bits* dst = job.out_row_ptr(b, h, q0 + r);
    for (int64_t d = 0; d < job.head_dim; d += 16)
      simd::store16(dst + d, _mm512_mul_ps(_mm512_load_ps(obuf + r * dv + d), inv),
                    simd::tail_mask(job.head_dim - d));
  }
}

VOKEN_TARGET_AMX void run_units_amx(const void* context, WorkRanges& ranges, int64_t worker) {
  const Problem& pr = *static_cast<const Problem*>(context);
  Scratch scratch(pr);
  amx::configure_full_tiles();
  for (int64_t u = ranges.next(worker); u >= 0; u = ranges.next(worker)) run_block(pr, u, scratch);
  _tile_release();
}

}  // namespace

void attention_amx(const AttentionJob& job) {
  Problem pr(job);
  const int64_t groups = job.batch * job.heads;
  AlignedBuffer<uint32_t> packed_k(groups * pr.k_size), packed_v(groups * pr.v_size);
  // K as one key tile of all keys: the rows of the B tiles are keys_padded words apart.
  pack_in_parallel(groups, pr.keys_padded, [&](int64_t bh, int64_t begin, int64_t end) {
    pack_keys_bf16_pairs(job, bh, pr.keys_padded, pr.dq / 2, pr.keys_padded, begin, end,
                         packed_k.get() + bh * pr.k_size);
    pack_values_bf16_pairs(job, bh, begin, end, pr.dv, packed_v.get() + bh * pr.v_size);
  });
  pr.packed_k = packed_k.get();
  pr.packed_v = packed_v.get();
  run_units(groups * pr.query_blocks, run_units_amx, &pr);
}

}  // namespace voken::core::attention_detail

#endif  // VOKEN_HAVE_AMX
