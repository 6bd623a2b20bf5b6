#include "core/amx_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#include "core/amx.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"
#include "core/work_ranges.h"
#include "io/tensor_bytes.h"  // shape_string
#include "voken/error.h"

// GCC 12 reports its own AVX-512 intrinsics as possibly reading uninitialised vectors; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core {

#ifdef VOKEN_HAVE_AMX
namespace {

using bf16_bits = uint16_t;

// One 64-byte tile row (a cache line) per step of 32 inputs.
constexpr int64_t kStep = 32;
// Elements of one packed x block: 16 pairs x 16 tokens x 2.
constexpr int64_t kPackedBlock = 512;

// 16 x 16 transpose of 32-bit lanes (unpack, shuffle within 128-bit lanes, then across lanes).
VOKEN_AMX inline void transpose16(__m512 r[16]) {
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

// x [M, K] (row stride ldx) -> blocks [M/16][K/32][16 pairs][16 tokens][2] bf16 (rounded to
// nearest even), zero padded, for the token blocks [mb_begin, mb_end).
template <typename T>
VOKEN_AMX void pack_x(const T* x, int64_t ldx, int64_t m, int64_t k, int64_t k_steps, bf16_bits* packed,
                      int64_t mb_begin, int64_t mb_end) {
  for (int64_t mb = mb_begin; mb < mb_end; ++mb) {
    for (int64_t s = 0; s < k_steps; ++s) {
      const int64_t k0 = s * kStep;
      __m512 rows[16];
      for (int t = 0; t < 16; ++t) {
        const int64_t token = mb * 16 + t;
        if (token >= m) {
          rows[t] = _mm512_setzero_ps();
          continue;
        }
        const T* p = x + token * ldx + k0;
        if constexpr (std::is_same_v<T, float>) {
          const __m512 lo = _mm512_maskz_loadu_ps(simd::tail_mask(k - k0), p);
          const __m512 hi = _mm512_maskz_loadu_ps(simd::tail_mask(k - k0 - 16), p + 16);
          rows[t] = (__m512)_mm512_cvtne2ps_pbh(hi, lo);
        } else {
          rows[t] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(simd::tail_mask32(k - k0), p));
        }
      }
      transpose16(rows);
      bf16_bits* out = packed + (mb * k_steps + s) * kPackedBlock;
      for (int i = 0; i < 16; ++i) _mm512_store_ps(reinterpret_cast<float*>(out + i * 32), rows[i]);
    }
  }
}

struct Job {
  const bf16_bits* weight = nullptr;
  int64_t ldw = 0;  // elements
  int64_t n = 0;
  const float* bias = nullptr;
  Activation activation = Activation::None;
  void* out = nullptr;  // [M, N] with row stride ldo
  int64_t ldo = 0;
  const void* residual = nullptr;  // [M, N] added after the activation, row stride ld_residual
  bool residual_bf16 = false;
  int64_t ld_residual = 0;
  float* accumulator = nullptr;  // [blocks * 32][m_blocks * 16] partial sums when K is split
  int64_t first_unit = 0;        // units (32-row blocks) of earlier jobs
};

struct Problem {
  std::vector<Job> jobs;
  const bf16_bits* packed = nullptr;
  int64_t m = 0, k = 0, k_steps = 0, m_blocks = 0;
  bool out_bf16 = false;
  int64_t units = 0;
};

// gelu with tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); tanh(u) = 1 - 2 / (e^2u + 1).
VOKEN_AMX inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u =
      _mm512_mul_ps(_mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), x), _mm512_set1_ps(0.7978845608028654f));
  const __m512 e = simd::exp16(_mm512_mul_ps(u, _mm512_set1_ps(2.0f)));
  const __m512 tanh = _mm512_sub_ps(
      _mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh));
}

// A 16 x 16 result tile c[n][token] (float32, stride 16) -> out rows token0.., columns n0..:
// transposed, plus bias, activation, rounding.
VOKEN_AMX void write_tile(const Problem& p, const Job& job, const float* c, int64_t n0, int64_t token0) {
  __m512 rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_load_ps(c + i * 16);
  transpose16(rows);
  const __mmask16 columns = simd::tail_mask(job.n - n0);
  const __m512 bias = job.bias ? _mm512_maskz_loadu_ps(columns, job.bias + n0) : _mm512_setzero_ps();
  const int64_t tokens = std::min<int64_t>(16, p.m - token0);
  for (int64_t t = 0; t < tokens; ++t) {
    __m512 v = _mm512_add_ps(rows[t], bias);
    if (job.activation == Activation::GeluErf)
      v = simd::gelu16(v);
    else if (job.activation == Activation::GeluTanh)
      v = gelu_tanh16(v);
    if (job.residual) {
      const int64_t r = (token0 + t) * job.ld_residual + n0;
      v = _mm512_add_ps(v, job.residual_bf16
                               ? simd::load16(static_cast<const bf16_bits*>(job.residual) + r, columns)
                               : _mm512_maskz_loadu_ps(columns, static_cast<const float*>(job.residual) + r));
    }
    const int64_t offset = (token0 + t) * job.ldo + n0;
    if (p.out_bf16)
      simd::store16(static_cast<bf16_bits*>(job.out) + offset, v, columns);
    else
      _mm512_mask_storeu_ps(static_cast<float*>(job.out) + offset, columns, v);
  }
}

// Requests the lines of a weight panel (rows x [k_begin, k_end) of a job) into L2 a few at a time,
// row after row, while another panel is being computed: the next unit's weights then arrive
// from DRAM during this unit's products instead of stalling its first pass.
struct PanelPrefetch {
  const char* base = nullptr;  // first row, at k_begin
  int64_t row_bytes = 0;       // stride between rows
  int64_t lines_per_row = 0;
  int64_t total = 0;  // rows * lines_per_row
  int64_t cursor = 0;
  int64_t per_step = 0;  // lines requested per step of 32 inputs

  VOKEN_AMX inline void issue() {
    for (int64_t i = 0; i < per_step && cursor < total; ++i, ++cursor)
      _mm_prefetch(base + (cursor / lines_per_row) * row_bytes + (cursor % lines_per_row) * 64, _MM_HINT_T1);
  }
};

// C += A B over `steps` steps of 32 inputs. A: NA tiles of 16 weight rows, a_row_bytes between
// rows, a_step elements between steps, the second tile a_tile elements after the first; B: NB
// packed token blocks (b_stride elements apart). Software-pipelined: each operand tile is
// reloaded for the next step as soon as its last product of this step is issued (tile registers
// are not renamed), so loads overlap the remaining products. With `ahead` > 0 (a first pass over
// weights read in place), the A rows `ahead` steps further are requested too.
template <int NA, int NB>
VOKEN_AMX inline void tile_product(const bf16_bits* a, int64_t a_row_bytes, int64_t a_step, int64_t a_tile,
                                   const bf16_bits* b, int64_t b_stride, int64_t steps, int64_t ahead,
                                   PanelPrefetch& prefetch) {
  if (steps <= 0) return;
  _tile_loadd(4, a, a_row_bytes);
  _tile_loadd(6, b, 64);
  if constexpr (NB == 2) _tile_loadd(7, b + b_stride, 64);
  if constexpr (NA == 2) _tile_loadd(5, a + a_tile, a_row_bytes);
  for (int64_t s = 0; s < steps; ++s) {
    if (ahead > 0) {
      const char* rows = reinterpret_cast<const char*>(a + (s + ahead) * a_step);
      for (int r = 0; r < 16 * NA; ++r) _mm_prefetch(rows + r * a_row_bytes, _MM_HINT_T0);
    }
    prefetch.issue();
    // The last step reloads its own tiles (harmless, and keeps the loop free of branches).
    const int64_t n = s + 1 < steps ? s + 1 : s;
    const bf16_bits* an = a + n * a_step;
    const bf16_bits* bn = b + n * kPackedBlock;
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, an, a_row_bytes);
    if constexpr (NA == 2) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(6, bn, 64);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(5, an + a_tile, a_row_bytes);
    } else {
      _tile_loadd(6, bn, 64);
    }
    if constexpr (NB == 2) _tile_loadd(7, bn + b_stride, 64);
  }
}

struct Scratch {
  alignas(64) float c[4][256];
  std::unique_ptr<bf16_bits, decltype(&std::free)> panel{nullptr, &std::free};
  int64_t panel_elements = 0;
  bf16_bits* panel_for(int64_t elements) {
    if (elements > panel_elements) {
      panel.reset(static_cast<bf16_bits*>(std::aligned_alloc(64, static_cast<size_t>(elements) * 2)));
      if (!panel) throw std::bad_alloc();
      panel_elements = elements;
    }
    return panel.get();
  }
};

// Weight rows [0, rows) (row stride ldw) over inputs [k_begin, k_end) -> tiles laid out one step
// after the other: [step][NA tiles][16 rows][32], zero padded (missing rows and inputs past k_end).
// For partial blocks, so that no tile reads past the weights.
template <int NA>
VOKEN_AMX void pack_panel(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin, int64_t k_end,
                          bf16_bits* panel) {
  const int64_t steps = (k_end - k_begin + kStep - 1) / kStep;
  for (int64_t r = 0; r < NA * 16; ++r) {
    bf16_bits* dst = panel + (r / 16) * 512 + (r % 16) * 32;
    if (r >= rows) {
      for (int64_t s = 0; s < steps; ++s) _mm512_store_si512(dst + s * NA * 512, _mm512_setzero_si512());
      continue;
    }
    const bf16_bits* src = w + r * ldw + k_begin;
    const int64_t full = (k_end - k_begin) / kStep;
    for (int64_t s = 0; s < full; ++s)
      _mm512_store_si512(dst + s * NA * 512, _mm512_loadu_si512(src + s * kStep));
    if (full < steps)
      _mm512_store_si512(
          dst + full * NA * 512,
          _mm512_maskz_loadu_epi16(simd::tail_mask32(k_end - k_begin - full * kStep), src + full * kStep));
  }
}

// One unit: rows [n0, n0 + 16 NA) of a job against all tokens, for the input steps
// [step_begin, step_end). The first pass accumulates from zero, the last writes the output.
template <int NA>
VOKEN_AMX void run_unit_rows(const Problem& p, const Job& job, int64_t n0, int64_t rows, int64_t step_begin,
                             int64_t step_end, PanelPrefetch& prefetch, Scratch& scratch) {
  const bool first = step_begin == 0, last = step_end == p.k_steps;
  const int64_t steps = step_end - step_begin;
  const bf16_bits* a;
  int64_t a_row_bytes, a_step, a_tile;
  // Full blocks of whole 32-input steps are read in place, straight from the weights, when their
  // rows start on cache lines (a tile row split over two lines loads several times slower; a
  // safetensors file aligns tensors to 8 bytes only). Other blocks are copied into a zero-padded,
  // aligned panel first, which also keeps tiles from reading past the weights.
  const bool in_place = rows == NA * 16 && p.k % kStep == 0 &&
                        reinterpret_cast<uintptr_t>(job.weight) % 64 == 0 && job.ldw % 32 == 0;
  if (in_place) {
    a = job.weight + n0 * job.ldw + step_begin * kStep;
    a_row_bytes = job.ldw * 2;
    a_step = kStep;
    a_tile = 16 * job.ldw;
  } else {
    bf16_bits* panel = scratch.panel_for(steps * NA * 512);
    pack_panel<NA>(job.weight + n0 * job.ldw, job.ldw, rows, step_begin * kStep,
                   std::min(p.k, step_end * kStep), panel);
    a = panel;
    a_row_bytes = 64;
    a_step = NA * 512;
    a_tile = 512;
  }
  const int64_t acc_row = p.m_blocks * 16;
  const int64_t acc_stride_bytes = acc_row * static_cast<int64_t>(sizeof(float));
  const int64_t b_stride = p.k_steps * kPackedBlock;
  for (int64_t mb = 0; mb < p.m_blocks; mb += 2) {
    const int nb = p.m_blocks - mb >= 2 ? 2 : 1;
    const bf16_bits* b = p.packed + (mb * p.k_steps + step_begin) * kPackedBlock;
    float* acc = job.accumulator ? job.accumulator + n0 * acc_row + mb * 16 : nullptr;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, acc, acc_stride_bytes);
      if (nb == 2) _tile_loadd(1, acc + 16, acc_stride_bytes);
      if (NA == 2) {
        _tile_loadd(2, acc + 16 * acc_row, acc_stride_bytes);
        if (nb == 2) _tile_loadd(3, acc + 16 * acc_row + 16, acc_stride_bytes);
      }
    }
    // In place, the first token blocks read the weights from memory: request them 8 steps ahead.
    const int64_t ahead = in_place && mb == 0 ? 8 : 0;
    if (nb == 2)
      tile_product<NA, 2>(a, a_row_bytes, a_step, a_tile, b, b_stride, steps, ahead, prefetch);
    else
      tile_product<NA, 1>(a, a_row_bytes, a_step, a_tile, b, b_stride, steps, ahead, prefetch);
    if (last) {
      _tile_stored(0, scratch.c[0], 64);
      if (nb == 2) _tile_stored(1, scratch.c[1], 64);
      if (NA == 2) {
        _tile_stored(2, scratch.c[2], 64);
        if (nb == 2) _tile_stored(3, scratch.c[3], 64);
      }
      for (int ia = 0; ia < NA; ++ia)
        for (int ib = 0; ib < nb; ++ib)
          write_tile(p, job, scratch.c[ia * 2 + ib], n0 + 16 * ia, (mb + ib) * 16);
    } else {
      _tile_stored(0, acc, acc_stride_bytes);
      if (nb == 2) _tile_stored(1, acc + 16, acc_stride_bytes);
      if (NA == 2) {
        _tile_stored(2, acc + 16 * acc_row, acc_stride_bytes);
        if (nb == 2) _tile_stored(3, acc + 16 * acc_row + 16, acc_stride_bytes);
      }
    }
  }
}

const Job& job_of(const Problem& p, int64_t unit) {
  const Job* job = &p.jobs.front();
  for (const Job& j : p.jobs)
    if (unit >= j.first_unit) job = &j;
  return *job;
}

VOKEN_AMX void run_unit(const Problem& p, int64_t unit, int64_t next_unit, int64_t step_begin,
                        int64_t step_end, Scratch& scratch) {
  const Job& job = job_of(p, unit);
  const int64_t n0 = (unit - job.first_unit) * 32;
  const int64_t rows = std::min<int64_t>(32, job.n - n0);
  PanelPrefetch prefetch;
  if (next_unit >= 0) {
    const Job& next = job_of(p, next_unit);
    const int64_t next_n0 = (next_unit - next.first_unit) * 32;
    const int64_t k_begin = step_begin * kStep, k_end = std::min(p.k, step_end * kStep);
    prefetch.base = reinterpret_cast<const char*>(next.weight + next_n0 * next.ldw + k_begin);
    prefetch.row_bytes = next.ldw * 2;
    prefetch.lines_per_row = ((k_end - k_begin) * 2 + 63) / 64;
    prefetch.total = std::min<int64_t>(32, next.n - next_n0) * prefetch.lines_per_row;
    // Spread over this unit's steps (all token blocks), finishing a little early.
    const int64_t unit_steps = (p.m_blocks + 1) / 2 * (step_end - step_begin);
    prefetch.per_step = (prefetch.total + unit_steps - 1) / std::max<int64_t>(1, unit_steps) + 1;
  }
  if (rows > 16)
    run_unit_rows<2>(p, job, n0, rows, step_begin, step_end, prefetch, scratch);
  else
    run_unit_rows<1>(p, job, n0, rows, step_begin, step_end, prefetch, scratch);
}

VOKEN_AMX void run_units(const Problem& p, WorkRanges& ranges, int64_t thread, int64_t step_begin,
                         int64_t step_end) {
  amx::configure_full_tiles();
  Scratch scratch;
  for (int64_t u = ranges.next(thread); u >= 0; u = ranges.next(thread))
    run_unit(p, u, ranges.peek(thread), step_begin, step_end, scratch);
  _tile_release();
}

VOKEN_AMX void pack_any(const at::Tensor& x, Problem& p, bf16_bits* packed, int64_t begin, int64_t end) {
  if (x.scalar_type() == at::kFloat)
    pack_x(x.data_ptr<float>(), x.stride(0), p.m, p.k, p.k_steps, packed, begin, end);
  else
    pack_x(reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()), x.stride(0), p.m, p.k, p.k_steps,
           packed, begin, end);
}

// ---------------------------------------------------------------------------------------------
// Attention: softmax((q scale) k^T) v per head, one 32-query block per work unit.

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
VOKEN_AMX void pack_v(const AttentionProblem& p, const bf16_bits* v, bf16_bits* packed) {
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
VOKEN_AMX inline void tile_product_2x2(const bf16_bits* a, int64_t a_stride, const bf16_bits* b0,
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

VOKEN_AMX void attention_block(const AttentionProblem& p, int64_t unit, AttentionScratch& w) {
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

VOKEN_AMX void attention_units(const AttentionProblem& p, WorkRanges& ranges, int64_t thread) {
  amx::configure_full_tiles();
  AttentionScratch scratch(p);
  for (int64_t u = ranges.next(thread); u >= 0; u = ranges.next(thread)) attention_block(p, u, scratch);
  _tile_release();
}

VOKEN_AMX void attention_pack(const AttentionProblem& p, int64_t bh) {
  const int64_t b = bh / p.heads, h = bh % p.heads;
  pack_x(p.k + b * p.k_batch + h * p.head_dim, p.k_row, p.keys, p.head_dim, p.d_steps,
         p.packed_k + bh * p.packed_k_size, 0, p.key_blocks);
  pack_v(p, p.v + b * p.v_batch + h * p.head_dim, p.packed_v + bh * p.packed_v_size);
}
}  // namespace
#endif

std::vector<at::Tensor> amx_linear_many(const at::Tensor& x, const std::vector<AmxLinearJob>& jobs,
                                        at::ScalarType out_dtype) {
  if (!has_amx_bf16()) throw ArgumentError("amx_linear: this CPU (or OS) does not offer AMX-BF16");
  if (!x.defined() || x.dim() < 1 || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    throw ArgumentError("amx_linear: x must be a float32 or bfloat16 CPU tensor with at least one dimension");
  if (out_dtype != at::kFloat && out_dtype != at::kBFloat16)
    throw ArgumentError("amx_linear: the output dtype must be float32 or bfloat16");
  if (jobs.empty()) throw ArgumentError("amx_linear: no weights given");
  const int64_t k = x.size(-1);
  for (const auto& job : jobs) {
    const auto& w = job.weight;
    if (!w.defined() || w.dim() != 2 || w.scalar_type() != at::kBFloat16 || !w.device().is_cpu() ||
        (w.size(1) > 1 && w.stride(1) != 1) || w.stride(0) < w.size(1))
      throw ArgumentError("amx_linear: weights must be 2-D bfloat16 CPU tensors with unit stride along rows");
    if (w.size(1) != k)
      throw ArgumentError("amx_linear: x has " + std::to_string(k) + " features, a weight expects " +
                          std::to_string(w.size(1)));
    if (job.bias.defined() && (job.bias.numel() != w.size(0) || !job.bias.device().is_cpu()))
      throw ArgumentError("amx_linear: a bias has " + std::to_string(job.bias.numel()) + " values for " +
                          std::to_string(w.size(0)) + " outputs");
    if (job.residual.defined()) {
      auto expected = x.sizes().vec();
      expected.back() = w.size(0);
      if (!job.residual.sizes().equals(expected) || !job.residual.device().is_cpu() ||
          (job.residual.scalar_type() != at::kFloat && job.residual.scalar_type() != at::kBFloat16))
        throw ArgumentError(
            "amx_linear: the residual must be a float32 or bfloat16 CPU tensor of the output's shape");
    }
  }
#ifdef VOKEN_HAVE_AMX
  at::Tensor rows = x.reshape({-1, k});
  if (rows.stride(1) != 1 || rows.stride(0) < k) rows = rows.contiguous();
  const int64_t m = rows.size(0);
  std::vector<at::Tensor> outputs;
  auto out_shape = x.sizes().vec();
  for (const auto& job : jobs) {
    out_shape.back() = job.weight.size(0);
    outputs.push_back(at::empty(out_shape, x.options().dtype(out_dtype)));
  }
  if (m == 0 || k == 0) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      outputs[i].zero_();
      if (jobs[i].bias.defined() && m > 0) outputs[i].add_(jobs[i].bias.to(out_dtype));
      if (jobs[i].residual.defined()) outputs[i].add_(jobs[i].residual);
    }
    return outputs;
  }

  Problem p;
  p.m = m;
  p.k = k;
  p.k_steps = (k + kStep - 1) / kStep;
  p.m_blocks = (m + 15) / 16;
  p.out_bf16 = out_dtype == at::kBFloat16;
  // Packed x stays in L2 (2 MB per core here): beyond ~1 MB the inputs are split into passes
  // whose partial sums go through a float32 accumulator.
  const int64_t steps_per_pass = std::max<int64_t>(8, 1024 / p.m_blocks);
  const int64_t passes = (p.k_steps + steps_per_pass - 1) / steps_per_pass;

  std::vector<at::Tensor> keep_alive;
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job job;
    job.weight = reinterpret_cast<const bf16_bits*>(jobs[i].weight.data_ptr<at::BFloat16>());
    job.ldw = jobs[i].weight.stride(0);
    job.n = jobs[i].weight.size(0);
    if (jobs[i].bias.defined()) {
      keep_alive.push_back(jobs[i].bias.to(at::kFloat).contiguous());
      job.bias = keep_alive.back().data_ptr<float>();
    }
    job.activation = jobs[i].activation;
    job.out = outputs[i].data_ptr();
    job.ldo = job.n;
    if (jobs[i].residual.defined()) {
      at::Tensor residual = jobs[i].residual.reshape({m, job.n});
      if (residual.stride(1) != 1 && job.n > 1) residual = residual.contiguous();
      keep_alive.push_back(residual);
      job.residual = residual.data_ptr();
      job.residual_bf16 = residual.scalar_type() == at::kBFloat16;
      job.ld_residual = residual.stride(0);
    }
    const int64_t blocks = (job.n + 31) / 32;
    if (passes > 1) {
      keep_alive.push_back(at::empty({blocks * 32, p.m_blocks * 16}, at::kFloat));
      job.accumulator = keep_alive.back().data_ptr<float>();
    }
    job.first_unit = p.units;
    p.units += blocks;
    p.jobs.push_back(job);
  }

  const std::unique_ptr<bf16_bits, decltype(&std::free)> packed(
      static_cast<bf16_bits*>(std::aligned_alloc(64, static_cast<size_t>(p.m_blocks * p.k_steps) * 1024)),
      &std::free);
  if (!packed) throw std::bad_alloc();
  p.packed = packed.get();
  const int64_t threads = parallel_threads();
  if (p.m_blocks > 1 && threads > 1)
    parallel_range(0, p.m_blocks, 1,
                   [&](int64_t begin, int64_t end) { pack_any(rows, p, packed.get(), begin, end); });
  else
    pack_any(rows, p, packed.get(), 0, p.m_blocks);

  const int64_t workers = std::min<int64_t>(threads, p.units);
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t step_begin = pass * steps_per_pass;
    const int64_t step_end = std::min(p.k_steps, step_begin + steps_per_pass);
    WorkRanges ranges(p.units, workers);
    if (workers > 1)
      parallel_items(workers, [&](int64_t t) { run_units(p, ranges, t, step_begin, step_end); });
    else
      run_units(p, ranges, 0, step_begin, step_end);
  }
  return outputs;
#else
  throw ArgumentError("amx_linear: not compiled with AMX support");
#endif
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      at::ScalarType out_dtype, Activation activation, const at::Tensor& residual) {
  return amx_linear_many(x, {AmxLinearJob{weight, bias, activation, residual}}, out_dtype).front();
}

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
  if (!has_amx_bf16()) throw ArgumentError("amx_attention: this CPU (or OS) does not offer AMX-BF16");
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
  return has_amx_bf16() && head_dim >= 1 && head_dim <= kAmxAttentionMaxHeadDim && keys >= 1 &&
         keys <= kAmxAttentionMaxKeys;
}

}  // namespace voken::core
