#include "diffusion/attention_kernels.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "core/amx.h"
#include "core/amx_gemm.h"  // AttentionOperands
#include "core/bf16_ops.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"
#include "voken/error.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::diffusion {

#ifdef VOKEN_HAVE_AMX
namespace {

namespace simd = core::simd;

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
VOKEN_AMX void run_blocks(const Problem& p, int64_t begin, int64_t end) {
  core::amx::configure_full_tiles();

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
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = core::float_to_bf16_bits(obuf[r * 64 + d] * inv);
    }
  }
  _tile_release();
}

}  // namespace

at::Tensor fused_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale) {
  if (!core::has_amx_bf16())
    throw ArgumentError("fused_attention_bf16: this CPU/OS does not provide AMX-BF16");
  Problem p;
  static_cast<core::AttentionOperands&>(p) = core::attention_operands(q, k, v, heads, "fused_attention_bf16");
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
  core::parallel_range(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) pack_head(p, bh);
  });
  const int64_t tasks = groups * ((p.queries + kRows - 1) / kRows);
  core::parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) { run_blocks(p, begin, end); });
  return out;
}

#else  // no AMX kernel in this build

at::Tensor fused_attention_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double) {
  throw ArgumentError("fused_attention_bf16: not built for this compiler/platform");
}

#endif

}  // namespace voken::diffusion
