#include "core/attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "core/amx.h"
#include "core/bf16.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"
#include "core/work_ranges.h"
#include "io/tensor_bytes.h"  // shape_string
#include "voken/error.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core {

#ifdef VOKEN_HAVE_AMX
namespace {

constexpr int kRows = 32;    // queries per block: two 16-row tiles share every K and V tile load
constexpr int kKeys = 32;    // key padding granule: one 32-deep P tile
constexpr int kChunk = 512;  // keys per softmax chunk (scores and probabilities stay in L1/L2)
// The running row maximum is only raised (and the output rescaled) when a chunk's scores exceed
// it by more than this (after scaling): exp() arguments stay below it, so nothing overflows and
// the sums stay exact to float rounding, while rescales become rare after the first chunks.
constexpr float kRescaleThreshold = 8.0f;

using bf16_bits = uint16_t;

struct Problem : core::AttentionOperands {
  bf16_bits* out = nullptr;
  int64_t dq = 0;           // head_dim rounded up to 32: the Q K^T reduction, in 32-deep steps
  int64_t dv = 0;           // head_dim rounded up to 16: P V output columns, 16 per tile
  int64_t keys_padded = 0;  // keys rounded up to kKeys
  float scale = 1;
  // Per (batch, head): K as [dq/2][keys_padded][2] and V as [keys_padded/2][dv][2] (the pair-
  // interleaved "VNNI" layout of AMX B tiles), zero padded.
  std::unique_ptr<bf16_bits[]> packed_k, packed_v;  // not zero-initialised: pack_head writes all
};

// K as 32-bit words [dq/2][keys_padded] (a dimension pair per word) and V as 32-bit words
// [keys_padded/2][dv] (a key pair per word), every padding word written as zero.
void pack_head(Problem& p, int64_t bh) {
  const int64_t b = bh / p.heads, h = bh % p.heads, kp = p.keys_padded;
  auto* kw = reinterpret_cast<uint32_t*>(p.packed_k.get() + bh * p.dq * kp);
  auto* vw = reinterpret_cast<uint32_t*>(p.packed_v.get() + bh * kp * p.dv);
  const auto key_row = [&](int64_t n) { return p.k + b * p.k_batch + n * p.k_row + h * p.head_dim; };
  const auto value_row = [&](int64_t n) { return p.v + b * p.v_batch + n * p.v_row + h * p.head_dim; };
  const auto word = [](uint32_t lo, uint32_t hi) { return lo | (hi << 16); };
  // K: 16 keys at a time, so that each word row is written in 64-byte runs.
  for (int64_t n0 = 0; n0 < kp; n0 += 16)
    for (int64_t w = 0; w < p.dq / 2; ++w) {
      const int64_t d = 2 * w;
      for (int64_t n = n0; n < n0 + 16; ++n) {
        uint32_t value = 0;
        if (n < p.keys && d < p.head_dim) {
          const bf16_bits* row = key_row(n);
          value = word(row[d], d + 1 < p.head_dim ? row[d + 1] : 0);
        }
        kw[w * kp + n] = value;
      }
    }
  // V: rows n and n + 1 interleaved.
  for (int64_t n = 0; n < kp; n += 2) {
    uint32_t* dst = vw + (n / 2) * p.dv;
    const bf16_bits* even = n < p.keys ? value_row(n) : nullptr;
    const bf16_bits* odd = n + 1 < p.keys ? value_row(n + 1) : nullptr;
    if (even && odd) {
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = word(even[d], odd[d]);
    } else {
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = word(even ? even[d] : 0, 0);
    }
    for (int64_t d = p.head_dim; d < p.dv; ++d) dst[d] = 0;
  }
}

// One 32-row query block (two 16-row tiles) against all keys, in 512-key chunks (switching
// between AMX and AVX-512 work has a cost, so each phase runs over a whole chunk):
//   1. S = Q K^T for the chunk, 32 keys per step: tiles Q0, Q1 (A) x K0, K1 (B) -> four S tiles,
//      so that each K tile, read from L2, serves both query tiles;
//   2. online softmax of the chunk's 32 x 512 scores in AVX-512 (float32), P rounded to bfloat16;
//   3. O += P V, output columns 32 at a time: tiles P0, P1 (A) x V0, V1 (B) -> four O tiles
//      loaded from and stored to an L1 buffer once per chunk (a rescale is then a plain multiply
//      of that buffer).
// Tiles: 0, 1 A (Q or P); 2, 3 B (K or V); 4-7 S or O.
VOKEN_TARGET_AMX void run_blocks(const Problem& p, int64_t begin, int64_t end) {
  amx::configure_full_tiles();

  alignas(64) bf16_bits qbuf[kRows * 64];
  alignas(64) float obuf[kRows * 64];
  // Scores (64 KiB) and probabilities (32 KiB) of a chunk: on the heap, not the worker's stack.
  const std::unique_ptr<void, decltype(&std::free)> scratch(
      std::aligned_alloc(64, kRows * kChunk * (sizeof(float) + sizeof(bf16_bits))), &std::free);
  if (!scratch) throw std::bad_alloc();
  float* const sbuf = static_cast<float*>(scratch.get());
  bf16_bits* const pbuf = reinterpret_cast<bf16_bits*>(sbuf + kRows * kChunk);
  alignas(64) float lsum[kRows * 16];
  float row_max[kRows];

  const int64_t kp = p.keys_padded;
  const int64_t query_blocks = (p.queries + kRows - 1) / kRows;
  const int dsteps = static_cast<int>(p.dq / 32);
  const int otiles = static_cast<int>(p.dv / 16);
  const int64_t q_stride = p.dq * sizeof(bf16_bits);
  const int64_t k_stride = kp * 2 * sizeof(bf16_bits);
  const int64_t v_stride = p.dv * 2 * sizeof(bf16_bits);
  constexpr int64_t kSStride = kChunk * sizeof(float);
  constexpr int64_t kPStride = kChunk * sizeof(bf16_bits);
  constexpr int64_t kOStride = 64 * sizeof(float);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const float scale_log2e = p.scale * 1.44269504088896341f;
  const __m512 scale_log2e_v = _mm512_set1_ps(scale_log2e);

  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / query_blocks, q0 = (task % query_blocks) * kRows;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, p.queries - q0));
    // Q rows, zero padded to dq columns and kRows rows.
    std::memset(qbuf, 0, sizeof qbuf);
    for (int r = 0; r < rows; ++r)
      std::memcpy(qbuf + r * p.dq, p.q + b * p.q_batch + (q0 + r) * p.q_row + h * p.head_dim,
                  p.head_dim * sizeof(bf16_bits));
    std::memset(obuf, 0, sizeof obuf);
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      _mm512_store_ps(lsum + r * 16, _mm512_setzero_ps());
    }
    const bf16_bits* kv = p.packed_k.get() + bh * p.dq * kp;
    const bf16_bits* vv = p.packed_v.get() + bh * kp * p.dv;

    for (int64_t k0 = 0; k0 < kp; k0 += kChunk) {
      const int64_t len = std::min<int64_t>(kChunk, kp - k0);  // a multiple of kKeys
      const int64_t valid = std::min<int64_t>(len, p.keys - k0);

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
          _tile_loadd(1, qbuf + 16 * p.dq + ds * 32, q_stride);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(4, sbuf + j, kSStride);
        _tile_stored(5, sbuf + j + 16, kSStride);
        _tile_stored(6, sbuf + 16 * kChunk + j, kSStride);
        _tile_stored(7, sbuf + 16 * kChunk + j + 16, kSStride);
      }

      // 2. Online softmax: P = 2^((S - rowmax) * scale * log2 e); keys beyond `valid` masked.
      for (int r = 0; r < kRows; ++r) {
        const float* srow = sbuf + r * kChunk;
        __m512 vmax = neg_inf;
        for (int64_t c = 0; c < len; c += 16)
          vmax = _mm512_mask_max_ps(vmax, simd::tail_mask(valid - c), vmax, _mm512_load_ps(srow + c));
        float factor = 1.0f;
        if (row_max[r] == -INFINITY) {
          row_max[r] = _mm512_reduce_max_ps(vmax);
        } else if (_mm512_cmp_ps_mask(vmax, _mm512_set1_ps(row_max[r] + kRescaleThreshold / p.scale),
                                      _CMP_GT_OQ)) {
          const float chunk_max = _mm512_reduce_max_ps(vmax);
          factor = std::exp((row_max[r] - chunk_max) * p.scale);
          row_max[r] = chunk_max;
          const __m512 f = _mm512_set1_ps(factor);
          for (int c = 0; c < 64; c += 16)
            _mm512_store_ps(obuf + r * 64 + c, _mm512_mul_ps(_mm512_load_ps(obuf + r * 64 + c), f));
        }
        const __m512 shift = _mm512_set1_ps(row_max[r] * scale_log2e);
        __m512 acc = _mm512_mul_ps(_mm512_load_ps(lsum + r * 16), _mm512_set1_ps(factor));
        bf16_bits* prow = pbuf + r * kChunk;
        for (int64_t c = 0; c < len; c += 32) {
          __m512 p0 = simd::exp2_fast16(_mm512_fmsub_ps(_mm512_load_ps(srow + c), scale_log2e_v, shift));
          __m512 p1 = simd::exp2_fast16(_mm512_fmsub_ps(_mm512_load_ps(srow + c + 16), scale_log2e_v, shift));
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
        _tile_loadd(4, o, kOStride);
        _tile_loadd(6, o + 16 * 64, kOStride);
        if (pair) {
          _tile_loadd(5, o + 16, kOStride);
          _tile_loadd(7, o + 16 * 64 + 16, kOStride);
        }
        for (int64_t j = 0; j < len; j += kKeys) {
          const bf16_bits* vb = vv + ((k0 + j) / 2 * p.dv + t * 16) * 2;
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
        _tile_stored(4, o, kOStride);
        _tile_stored(6, o + 16 * 64, kOStride);
        if (pair) {
          _tile_stored(5, o + 16, kOStride);
          _tile_stored(7, o + 16 * 64 + 16, kOStride);
        }
      }
    }

    const int64_t out_row = p.heads * p.head_dim;
    for (int r = 0; r < rows; ++r) {
      const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_load_ps(lsum + r * 16));
      bf16_bits* dst = p.out + (b * p.queries + q0 + r) * out_row + h * p.head_dim;
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = float_to_bf16_bits(obuf[r * 64 + d] * inv);
    }
  }
  _tile_release();
}

}  // namespace

at::Tensor fused_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale) {
  if (cpu_tier() != CpuTier::amx)
    throw ArgumentError(std::string("fused_attention_bf16: needs the amx CPU tier, this process runs at ") +
                        tier_name(cpu_tier()));
  Problem p;
  static_cast<AttentionOperands&>(p) = attention_operands(q, k, v, heads, "fused_attention_bf16");
  if (p.head_dim > kFusedAttentionMaxHeadDim)
    throw ArgumentError("fused_attention_bf16: heads of " + std::to_string(p.head_dim) +
                        " dimensions, the kernel takes up to " + std::to_string(kFusedAttentionMaxHeadDim));
  p.dq = (p.head_dim + 31) / 32 * 32;
  p.dv = (p.head_dim + 15) / 16 * 16;
  p.keys_padded = (p.keys + kKeys - 1) / kKeys * kKeys;
  p.scale = static_cast<float>(scale);
  at::Tensor out =
      at::empty({p.batch, p.queries, q.size(2)}, q.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  const int64_t groups = p.batch * p.heads;
  p.packed_k.reset(new bf16_bits[groups * p.dq * p.keys_padded]);
  p.packed_v.reset(new bf16_bits[groups * p.keys_padded * p.dv]);
  parallel_range(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) pack_head(p, bh);
  });
  const int64_t tasks = groups * ((p.queries + kRows - 1) / kRows);
  parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) { run_blocks(p, begin, end); });
  return out;
}

#else  // no AMX kernel in this build

at::Tensor fused_attention_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double) {
  throw ArgumentError("fused_attention_bf16: not built for this compiler/platform");
}

#endif

// ---------------------------------------------------------------------------------------------
// The vision encoder's attention (amx_attention): q scaled and rounded to bf16 first, one
// 32-query block per work unit, all its scores in one buffer.

#ifdef VOKEN_HAVE_AMX
namespace {

using amx::kPackedBlock;

struct AttentionProblem : AttentionOperands {
  bf16_bits* out = nullptr;
  int64_t o_batch = 0, o_row = 0;
  int64_t d_steps = 0;     // head_dim in 32-deep steps (the q k^T reduction)
  int64_t d_blocks = 0;    // head_dim in 16-wide blocks, rounded up to pairs (P v output columns)
  int64_t key_blocks = 0;  // keys in 16-wide blocks, rounded up to pairs
  int64_t key_steps = 0;   // keys in 32-deep steps (the P v reduction) = key_blocks / 2
  float scale = 1;
  bf16_bits *packed_k = nullptr, *packed_v = nullptr;  // per (batch, head)
  int64_t packed_k_size = 0, packed_v_size = 0;
};

// V rows (keys) -> B tiles of P v: per (d block, key step) [16 key pairs][16 dims][2], zero padded.
VOKEN_TARGET_AMX void pack_v(const AttentionProblem& p, const bf16_bits* v, bf16_bits* packed) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t ks = 0; ks < p.key_steps; ++ks) {
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t key = ks * 32 + 2 * i;
      for (int64_t db = 0; db < p.d_blocks; ++db) {
        const int64_t d = db * 16;
        const __mmask16 dims = simd::tail_mask(p.head_dim - d);
        const __m256i even =
            key < p.keys ? _mm256_maskz_loadu_epi16(dims, v + key * p.v_row + d) : _mm256_setzero_si256();
        const __m256i odd = key + 1 < p.keys ? _mm256_maskz_loadu_epi16(dims, v + (key + 1) * p.v_row + d)
                                             : _mm256_setzero_si256();
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
        _mm512_store_si512(packed + (db * p.key_steps + ks) * kPackedBlock + i * 32,
                           _mm512_permutexvar_epi16(interleave, both));
      }
    }
  }
}

struct AttentionScratch {
  std::unique_ptr<char, decltype(&std::free)> memory{nullptr, &std::free};
  bf16_bits* q = nullptr;   // [32][d_steps * 32], scaled, zero padded
  float* s = nullptr;       // [32][key_blocks * 16] scores
  bf16_bits* pr = nullptr;  // [32][key_blocks * 16] probabilities
  float* o = nullptr;       // [32][32] one output tile pair
  explicit AttentionScratch(const AttentionProblem& p) {
    const int64_t kp = p.key_blocks * 16, dp = p.d_steps * 32;
    const size_t q_bytes = 32 * dp * 2, s_bytes = 32 * kp * 4, p_bytes = 32 * kp * 2, o_bytes = 32 * 32 * 4;
    memory.reset(static_cast<char*>(std::aligned_alloc(64, q_bytes + s_bytes + p_bytes + o_bytes)));
    if (!memory) throw std::bad_alloc();
    q = reinterpret_cast<bf16_bits*>(memory.get());
    s = reinterpret_cast<float*>(memory.get() + q_bytes);
    pr = reinterpret_cast<bf16_bits*>(memory.get() + q_bytes + s_bytes);
    o = reinterpret_cast<float*>(memory.get() + q_bytes + s_bytes + p_bytes);
  }
};

// C tiles 0-3 = A B over `steps` 32-deep steps: A is two 16-row tiles (rows of `a`, `a_stride`
// elements apart, 32 elements per step), B two packed 16-column blocks (b0, b1, kPackedBlock
// elements per step). Tiles 4-7 hold the operands.
VOKEN_TARGET_AMX inline void tile_product_2x2(const bf16_bits* a, int64_t a_stride, const bf16_bits* b0,
                                              const bf16_bits* b1, int64_t steps) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * 32, a_stride * 2);
    _tile_loadd(6, b0 + s * kPackedBlock, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + s * kPackedBlock, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + 16 * a_stride + s * 32, a_stride * 2);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

VOKEN_TARGET_AMX void attention_block(const AttentionProblem& p, int64_t unit, AttentionScratch& w) {
  const int64_t q_blocks = (p.queries + 31) / 32;
  const int64_t bh = unit / q_blocks, q0 = unit % q_blocks * 32;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t rows = std::min<int64_t>(32, p.queries - q0);
  const int64_t kp = p.key_blocks * 16, dp = p.d_steps * 32;
  // q rows times scale, rounded to bf16 (as upstream's q * scale), zero padded.
  const __m512 scale = _mm512_set1_ps(p.scale);
  for (int64_t r = 0; r < 32; ++r) {
    const bf16_bits* src = p.q + b * p.q_batch + (q0 + r) * p.q_row + h * p.head_dim;
    for (int64_t d = 0; d < dp; d += 16) {
      const __mmask16 m = r < rows ? simd::tail_mask(p.head_dim - d) : __mmask16(0);
      const __m512 x = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + d)), 16));
      simd::store16(w.q + r * dp + d, _mm512_mul_ps(x, scale));
    }
  }
  // S = q k^T, 32 queries x 32 keys per 2 x 2 tiles.
  const bf16_bits* pk = p.packed_k + bh * p.packed_k_size;
  const int64_t k_block_stride = p.d_steps * kPackedBlock;
  for (int64_t kb = 0; kb < p.key_blocks; kb += 2) {
    tile_product_2x2(w.q, dp, pk + kb * k_block_stride, pk + (kb + 1) * k_block_stride, p.d_steps);
    _tile_stored(0, w.s + kb * 16, kp * 4);
    _tile_stored(1, w.s + kb * 16 + 16, kp * 4);
    _tile_stored(2, w.s + 16 * kp + kb * 16, kp * 4);
    _tile_stored(3, w.s + 16 * kp + kb * 16 + 16, kp * 4);
  }
  // Softmax over the real keys in float32; probabilities rounded to bf16, padding columns zero.
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = w.s + r * kp;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t c = 0; c < p.keys; c += 16)
      vmax = _mm512_max_ps(
          vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), simd::tail_mask(p.keys - c), srow + c));
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    // exp(s - max) as 2^((s - max) log2 e) with a polynomial good to 3e-6 relative: the
    // probabilities are rounded to bf16 (2^-9) right after.
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 shifted_max = _mm512_mul_ps(row_max, log2e);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t c = 0; c < p.keys; c += 16) {
      const __mmask16 m = simd::tail_mask(p.keys - c);
      const __m512 e = _mm512_maskz_mov_ps(
          m, simd::exp2_fast16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, srow + c), log2e, shifted_max)));
      _mm512_storeu_ps(srow + c, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    bf16_bits* prow = w.pr + r * kp;
    for (int64_t c = 0; c < kp; c += 16) {
      const __mmask16 m = simd::tail_mask(p.keys - c);
      simd::store16(prow + c, _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, srow + c), inverse));
    }
  }
  for (int64_t r = rows; r < 32; ++r) std::memset(w.pr + r * kp, 0, static_cast<size_t>(kp) * 2);
  // O = P v, 32 queries x 32 dims per 2 x 2 tiles.
  const bf16_bits* pv = p.packed_v + bh * p.packed_v_size;
  const int64_t v_block_stride = p.key_steps * kPackedBlock;
  bf16_bits* out = p.out + b * p.o_batch + q0 * p.o_row + h * p.head_dim;
  for (int64_t db = 0; db < p.d_blocks; db += 2) {
    tile_product_2x2(w.pr, kp, pv + db * v_block_stride, pv + (db + 1) * v_block_stride, p.key_steps);
    _tile_stored(0, w.o, 128);
    _tile_stored(1, w.o + 16, 128);
    _tile_stored(2, w.o + 16 * 32, 128);
    _tile_stored(3, w.o + 16 * 32 + 16, 128);
    for (int64_t r = 0; r < rows; ++r)
      for (int half = 0; half < 2; ++half) {
        const int64_t d = db * 16 + half * 16;
        const __mmask16 m = simd::tail_mask(p.head_dim - d);
        if (m) simd::store16(out + r * p.o_row + d, _mm512_load_ps(w.o + r * 32 + half * 16), m);
      }
  }
}

VOKEN_TARGET_AMX void attention_units(const AttentionProblem& p, WorkRanges& ranges, int64_t thread) {
  amx::configure_full_tiles();
  AttentionScratch scratch(p);
  for (int64_t u = ranges.next(thread); u >= 0; u = ranges.next(thread)) attention_block(p, u, scratch);
  _tile_release();
}

VOKEN_TARGET_AMX void attention_pack(const AttentionProblem& p, int64_t bh) {
  const int64_t b = bh / p.heads, h = bh % p.heads;
  amx::pack_b_tiles(p.k + b * p.k_batch + h * p.head_dim, p.k_row, p.keys, p.head_dim, p.d_steps,
                    p.packed_k + bh * p.packed_k_size, 0, p.key_blocks);
  pack_v(p, p.v + b * p.v_batch + h * p.head_dim, p.packed_v + bh * p.packed_v_size);
}
}  // namespace
#endif

AttentionOperands attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     int64_t heads, const std::string& what) {
  const auto shape = [](const at::Tensor& t) {
    return t.defined() ? std::string(c10::toString(t.scalar_type())) + " " + io::shape_string(t.sizes())
                       : std::string("undefined");
  };
  const auto fits = [](const at::Tensor& t) {
    return t.defined() && t.dim() == 3 && t.scalar_type() == at::kBFloat16 && t.device().is_cpu() &&
           t.stride(2) == 1;
  };
  if (!fits(q) || !fits(k) || !fits(v) || heads <= 0 || q.size(2) % heads != 0 || k.size(2) != q.size(2) ||
      v.size(2) != q.size(2) || k.size(0) != q.size(0) || v.size(0) != q.size(0) || v.size(1) != k.size(1) ||
      k.size(1) < 1)
    throw ArgumentError(what +
                        ": expected bfloat16 CPU tensors q [B, Tq, heads * D], k and v [B, Tk, heads * D] "
                        "(Tk >= 1, unit stride in the last dimension) for " +
                        std::to_string(heads) + " heads, got q " + shape(q) + ", k " + shape(k) + ", v " +
                        shape(v));
  AttentionOperands o;
  o.q = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  o.k = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  o.v = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  o.batch = q.size(0);
  o.heads = heads;
  o.head_dim = q.size(2) / heads;
  o.queries = q.size(1);
  o.keys = k.size(1);
  o.q_batch = q.stride(0);
  o.q_row = q.stride(1);
  o.k_batch = k.stride(0);
  o.k_row = k.stride(1);
  o.v_batch = v.stride(0);
  o.v_row = v.stride(1);
  return o;
}

at::Tensor amx_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                         double scale) {
  if (cpu_tier() != CpuTier::amx)
    throw ArgumentError(std::string("amx_attention: needs the amx CPU tier, this process runs at ") +
                        tier_name(cpu_tier()));
  const AttentionOperands operands = attention_operands(q, k, v, heads, "amx_attention");
  if (!amx_attention_supported(operands.head_dim, operands.keys))
    throw ArgumentError("amx_attention: head_dim " + std::to_string(operands.head_dim) + " / " +
                        std::to_string(operands.keys) + " keys are outside the kernel's range (head_dim <= " +
                        std::to_string(kAmxAttentionMaxHeadDim) + ", 1 to " +
                        std::to_string(kAmxAttentionMaxKeys) + " keys)");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (operands.batch == 0 || operands.queries == 0) return out;
#ifdef VOKEN_HAVE_AMX
  AttentionProblem p;
  static_cast<AttentionOperands&>(p) = operands;
  p.out = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  p.o_batch = out.stride(0);
  p.o_row = out.stride(1);
  p.d_steps = (p.head_dim + 31) / 32;
  p.d_blocks = (p.head_dim + 31) / 32 * 2;
  p.key_blocks = (p.keys + 31) / 32 * 2;
  p.key_steps = p.key_blocks / 2;
  p.scale = static_cast<float>(scale);
  p.packed_k_size = p.key_blocks * p.d_steps * kPackedBlock;
  p.packed_v_size = p.d_blocks * p.key_steps * kPackedBlock;
  const int64_t pairs = p.batch * heads;
  const std::unique_ptr<bf16_bits, decltype(&std::free)> packed(
      static_cast<bf16_bits*>(
          std::aligned_alloc(64, static_cast<size_t>(pairs * (p.packed_k_size + p.packed_v_size)) * 2)),
      &std::free);
  if (!packed) throw std::bad_alloc();
  p.packed_k = packed.get();
  p.packed_v = packed.get() + pairs * p.packed_k_size;
  parallel_items(pairs, [&](int64_t bh) { attention_pack(p, bh); });
  const int64_t units = pairs * ((p.queries + 31) / 32);
  const int64_t workers = std::min<int64_t>(parallel_threads(), units);
  WorkRanges ranges(units, workers);
  if (workers > 1)
    parallel_items(workers, [&](int64_t t) { attention_units(p, ranges, t); });
  else
    attention_units(p, ranges, 0);
#endif
  return out;
}

bool amx_attention_supported(int64_t head_dim, int64_t keys) {
  return cpu_tier() == CpuTier::amx && head_dim >= 1 && head_dim <= kAmxAttentionMaxHeadDim && keys >= 1 &&
         keys <= kAmxAttentionMaxKeys;
}

}  // namespace voken::core
