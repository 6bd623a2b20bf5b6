#include "diffusion/attention_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "diffusion/parallel.h"
#include "diffusion/simd_avx512.h"
#include "voken/error.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define VOKEN_HAVE_AMX_KERNEL 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define VOKEN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace voken::diffusion {

#ifdef VOKEN_HAVE_AMX_KERNEL
namespace {

bool detect_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool avx512 = (ebx & (1u << 16)) && (ebx & (1u << 30)) && (ebx & (1u << 17)) && (ebx & (1u << 31));
  const bool amx = (edx & (1u << 24)) && (edx & (1u << 22));
  if (!avx512 || !amx) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;  // AVX512-BF16
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const uint32_t avx512_state = 0xE6;                   // SSE, AVX, opmask, ZMM halves
  const uint32_t tile_state = (1u << 17) | (1u << 18);  // XTILECFG, XTILEDATA
  if ((xcr0_lo & avx512_state) != avx512_state || (xcr0_lo & tile_state) != tile_state) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

constexpr int kRows = 16;     // queries per block: the tile height
constexpr int kKeys = 32;     // key padding granule: one 32-deep P tile
constexpr int kChunk = 1024;  // keys per softmax chunk (fewest AMX/AVX-512 switches that stay in L1/L2)
// The running row maximum is only raised (and the output rescaled) when a chunk's scores exceed
// it by more than this (after scaling): exp() arguments stay below it, so nothing overflows and
// the sums stay exact to float rounding, while rescales become rare after the first chunks.
constexpr float kRescaleThreshold = 8.0f;

using bf16_bits = uint16_t;

struct alignas(64) TileConfig {
  uint8_t palette_id = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct Problem {
  const bf16_bits* q = nullptr;
  const bf16_bits* k = nullptr;
  const bf16_bits* v = nullptr;
  bf16_bits* out = nullptr;
  int64_t batch = 0, heads = 0, head_dim = 0, queries = 0, keys = 0;
  int64_t q_batch = 0, q_row = 0, k_batch = 0, k_row = 0, v_batch = 0, v_row = 0;  // strides (elements)
  int64_t dq = 0;           // head_dim rounded up to 32: the Q K^T reduction, in 32-deep steps
  int64_t dv = 0;           // head_dim rounded up to 16: P V output columns, 16 per tile
  int64_t keys_padded = 0;  // keys rounded up to kKeys
  float scale = 1;
  // Per (batch, head): K as [dq/2][keys_padded][2] and V as [keys_padded/2][dv][2] (the pair-
  // interleaved "VNNI" layout of AMX B tiles), zero padded.
  std::vector<bf16_bits> packed_k, packed_v;
};

void pack_head(Problem& p, int64_t bh) {
  const int64_t b = bh / p.heads, h = bh % p.heads, kp = p.keys_padded;
  bf16_bits* kv = p.packed_k.data() + bh * p.dq * kp;
  bf16_bits* vv = p.packed_v.data() + bh * kp * p.dv;
  for (int64_t n = 0; n < p.keys; ++n) {
    const bf16_bits* ks = p.k + b * p.k_batch + n * p.k_row + h * p.head_dim;
    const bf16_bits* vs = p.v + b * p.v_batch + n * p.v_row + h * p.head_dim;
    for (int64_t d = 0; d < p.head_dim; ++d) {
      kv[((d >> 1) * kp + n) * 2 + (d & 1)] = ks[d];
      vv[((n >> 1) * p.dv + d) * 2 + (n & 1)] = vs[d];
    }
  }
}

VOKEN_AMX inline bf16_bits float_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<bf16_bits>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// One 16-row query block against all keys, in 1024-key chunks (switching between AMX and
// AVX-512 work has a cost; per 256 keys it was a third of the time):
//   1. S = Q K^T for the chunk: 64 keys per step in four accumulator tiles (independent chains),
//      B tiles alternating so that loads need not wait for the previous product;
//   2. online softmax of the chunk's 16 x 1024 scores in AVX-512 (float32), P rounded to bfloat16;
//   3. O += P V, O's four tiles loaded from and stored to an L1 buffer once per chunk (so that a
//      rescale is a plain multiply of that buffer).
// Tiles: 0 and 3 A (Q or P), 1 and 6 (S phase) / 1 and 2 (P V phase) B, 2-5 S, 4-7 O.
VOKEN_AMX void run_blocks(const Problem& p, int64_t begin, int64_t end) {
  TileConfig config;
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kRows;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);

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
  const int64_t k_stride = kp * 2 * sizeof(bf16_bits);
  const int64_t v_stride = p.dv * 2 * sizeof(bf16_bits);
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
    const bf16_bits* kv = p.packed_k.data() + bh * p.dq * kp;
    const bf16_bits* vv = p.packed_v.data() + bh * kp * p.dv;

    for (int64_t k0 = 0; k0 < kp; k0 += kChunk) {
      const int64_t len = std::min<int64_t>(kChunk, kp - k0);  // a multiple of kKeys
      const int64_t valid = std::min<int64_t>(len, p.keys - k0);

      // 1. S = Q K^T.
      for (int64_t j = 0; j < len; j += 64) {
        const bool four = j + 64 <= len;
        _tile_zero(2);
        _tile_zero(3);
        if (four) {
          _tile_zero(4);
          _tile_zero(5);
        }
        for (int ds = 0; ds < dsteps; ++ds) {
          _tile_loadd(0, qbuf + ds * 32, p.dq * sizeof(bf16_bits));
          const bf16_bits* kb = kv + (ds * 16 * kp + k0 + j) * 2;
          _tile_loadd(1, kb, k_stride);
          _tile_loadd(6, kb + 32, k_stride);
          _tile_dpbf16ps(2, 0, 1);
          _tile_dpbf16ps(3, 0, 6);
          if (four) {
            _tile_loadd(1, kb + 64, k_stride);
            _tile_loadd(6, kb + 96, k_stride);
            _tile_dpbf16ps(4, 0, 1);
            _tile_dpbf16ps(5, 0, 6);
          }
        }
        _tile_stored(2, sbuf + j, kChunk * sizeof(float));
        _tile_stored(3, sbuf + j + 16, kChunk * sizeof(float));
        if (four) {
          _tile_stored(4, sbuf + j + 32, kChunk * sizeof(float));
          _tile_stored(5, sbuf + j + 48, kChunk * sizeof(float));
        }
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

      // 3. O += P V over the chunk's keys, 32 at a time.
      constexpr int kOStride = 64 * sizeof(float);
      _tile_loadd(4, obuf, kOStride);
      _tile_loadd(5, obuf + 16, kOStride);
      _tile_loadd(6, obuf + 32, kOStride);
      _tile_loadd(7, obuf + 48, kOStride);
      for (int64_t j = 0; j < len; j += kKeys) {
        const bf16_bits* vb = vv + ((k0 + j) / 2) * p.dv * 2;
        const bf16_bits* pa = pbuf + j;
        const int64_t p_stride = kChunk * sizeof(bf16_bits);
        if ((j / kKeys) % 2 == 0) {
          _tile_loadd(0, pa, p_stride);
          _tile_loadd(1, vb, v_stride);
          _tile_dpbf16ps(4, 0, 1);
          if (otiles > 1) {
            _tile_loadd(2, vb + 32, v_stride);
            _tile_dpbf16ps(5, 0, 2);
          }
          if (otiles > 2) {
            _tile_loadd(1, vb + 64, v_stride);
            _tile_dpbf16ps(6, 0, 1);
          }
          if (otiles > 3) {
            _tile_loadd(2, vb + 96, v_stride);
            _tile_dpbf16ps(7, 0, 2);
          }
        } else {
          _tile_loadd(3, pa, p_stride);
          _tile_loadd(1, vb, v_stride);
          _tile_dpbf16ps(4, 3, 1);
          if (otiles > 1) {
            _tile_loadd(2, vb + 32, v_stride);
            _tile_dpbf16ps(5, 3, 2);
          }
          if (otiles > 2) {
            _tile_loadd(1, vb + 64, v_stride);
            _tile_dpbf16ps(6, 3, 1);
          }
          if (otiles > 3) {
            _tile_loadd(2, vb + 96, v_stride);
            _tile_dpbf16ps(7, 3, 2);
          }
        }
      }
      _tile_stored(4, obuf, kOStride);
      _tile_stored(5, obuf + 16, kOStride);
      _tile_stored(6, obuf + 32, kOStride);
      _tile_stored(7, obuf + 48, kOStride);
    }

    const int64_t out_row = p.heads * p.head_dim;
    for (int r = 0; r < rows; ++r) {
      const float inv = 1.0f / _mm512_reduce_add_ps(_mm512_load_ps(lsum + r * 16));
      bf16_bits* dst = p.out + (b * p.queries + q0 + r) * out_row + h * p.head_dim;
      for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = float_to_bf16(obuf[r * 64 + d] * inv);
    }
  }
  _tile_release();
}

}  // namespace

bool has_amx_bf16() {
  static const bool available = detect_amx();
  return available;
}

at::Tensor fused_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale) {
  if (!has_amx_bf16()) throw ArgumentError("fused_attention_bf16: this CPU/OS does not provide AMX-BF16");
  const auto fits = [&](const at::Tensor& t) {
    return t.defined() && t.dim() == 3 && t.scalar_type() == at::kBFloat16 && t.stride(2) == 1 &&
           t.device().is_cpu();
  };
  if (!fits(q) || !fits(k) || !fits(v) || heads <= 0 || q.size(2) % heads != 0 || k.size(2) != q.size(2) ||
      v.size(2) != q.size(2) || k.size(0) != q.size(0) || v.size(0) != q.size(0) || v.size(1) != k.size(1) ||
      q.size(2) / heads > kFusedAttentionMaxHeadDim || k.size(1) < 1)
    throw ArgumentError(
        "fused_attention_bf16: expected bfloat16 q [B, Nq, H*D], k and v [B, Nk, H*D] with unit "
        "last stride and D <= " +
        std::to_string(kFusedAttentionMaxHeadDim));
  Problem p;
  p.batch = q.size(0);
  p.heads = heads;
  p.head_dim = q.size(2) / heads;
  p.queries = q.size(1);
  p.keys = k.size(1);
  p.q_batch = q.stride(0);
  p.q_row = q.stride(1);
  p.k_batch = k.stride(0);
  p.k_row = k.stride(1);
  p.v_batch = v.stride(0);
  p.v_row = v.stride(1);
  p.dq = (p.head_dim + 31) / 32 * 32;
  p.dv = (p.head_dim + 15) / 16 * 16;
  p.keys_padded = (p.keys + kKeys - 1) / kKeys * kKeys;
  p.scale = static_cast<float>(scale);
  p.q = reinterpret_cast<const bf16_bits*>(q.data_ptr<at::BFloat16>());
  p.k = reinterpret_cast<const bf16_bits*>(k.data_ptr<at::BFloat16>());
  p.v = reinterpret_cast<const bf16_bits*>(v.data_ptr<at::BFloat16>());
  at::Tensor out =
      at::empty({p.batch, p.queries, q.size(2)}, q.options().memory_format(at::MemoryFormat::Contiguous));
  p.out = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  const int64_t groups = p.batch * p.heads;
  p.packed_k.assign(groups * p.dq * p.keys_padded, 0);
  p.packed_v.assign(groups * p.keys_padded * p.dv, 0);
  parallel_range(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) pack_head(p, bh);
  });
  const int64_t tasks = groups * ((p.queries + kRows - 1) / kRows);
  parallel_range(0, tasks, 1, [&](int64_t begin, int64_t end) { run_blocks(p, begin, end); });
  return out;
}

#else  // no AMX kernel in this build

bool has_amx_bf16() { return false; }

at::Tensor fused_attention_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double) {
  throw ArgumentError("fused_attention_bf16: not built for this compiler/platform");
}

#endif

}  // namespace voken::diffusion
