#include "core/inplace_gemm.h"

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
#include "core/packed_gemm_kernels.h"
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

using amx::kPackedBlock;
using amx::kStep;

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
VOKEN_TARGET_AMX inline __m512 gelu_tanh16(__m512 x) {
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
VOKEN_TARGET_AMX void write_tile(const Problem& p, const Job& job, const float* c, int64_t n0,
                                 int64_t token0) {
  __m512 rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_load_ps(c + i * 16);
  amx::transpose16(rows);
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

  VOKEN_TARGET_AMX inline void issue() {
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
VOKEN_TARGET_AMX inline void tile_product(const bf16_bits* a, int64_t a_row_bytes, int64_t a_step,
                                          int64_t a_tile, const bf16_bits* b, int64_t b_stride, int64_t steps,
                                          int64_t ahead, PanelPrefetch& prefetch) {
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
VOKEN_TARGET_AMX void pack_panel(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin,
                                 int64_t k_end, bf16_bits* panel) {
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
VOKEN_TARGET_AMX void run_unit_rows(const Problem& p, const Job& job, int64_t n0, int64_t rows,
                                    int64_t step_begin, int64_t step_end, PanelPrefetch& prefetch,
                                    Scratch& scratch) {
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

VOKEN_TARGET_AMX void run_unit(const Problem& p, int64_t unit, int64_t next_unit, int64_t step_begin,
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

VOKEN_TARGET_AMX void run_units(const Problem& p, WorkRanges& ranges, int64_t thread, int64_t step_begin,
                                int64_t step_end) {
  amx::configure_full_tiles();
  Scratch scratch;
  for (int64_t u = ranges.next(thread); u >= 0; u = ranges.next(thread))
    run_unit(p, u, ranges.peek(thread), step_begin, step_end, scratch);
  _tile_release();
}

VOKEN_TARGET_AMX void pack_any(const at::Tensor& x, Problem& p, bf16_bits* packed, int64_t begin,
                               int64_t end) {
  if (x.scalar_type() == at::kFloat)
    amx::pack_b_tiles(x.data_ptr<float>(), x.stride(0), p.m, p.k, p.k_steps, packed, begin, end);
  else
    amx::pack_b_tiles(reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()), x.stride(0), p.m, p.k,
                      p.k_steps, packed, begin, end);
}

// The AMX path: rows [m, k] (unit stride along k), outputs allocated.
void amx_linear_many(const at::Tensor& rows, const std::vector<InplaceLinearJob>& jobs,
                     std::vector<at::Tensor>& outputs, bool out_bf16) {
  const int64_t m = rows.size(0), k = rows.size(1);
  Problem p;
  p.m = m;
  p.k = k;
  p.k_steps = (k + kStep - 1) / kStep;
  p.m_blocks = (m + 15) / 16;
  p.out_bf16 = out_bf16;
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
}

}  // namespace
#endif

namespace {

// The vector tiers (avx512_bf16, avx512, avx2): x is copied once, rounded to bf16 (and widened to
// float32 for the FMA tiers), into whole row tiles with K zero padded to whole steps; for each
// task (a range of row tiles x a range of 32-row weight blocks) and K chunk, a block's weight rows
// are read in place and transposed into the packed layout (or a float32 panel) in a per-thread,
// L1-sized buffer, and the packed micro-kernel runs every row tile of the task against it. The
// weights are never copied as a whole: each panel is 32 rows x one K chunk.
void vector_linear_many(const gemm::VectorKernels& tier_kernels, const at::Tensor& rows,
                        const std::vector<InplaceLinearJob>& jobs, std::vector<at::Tensor>& outputs,
                        bool out_bf16) {
  const int64_t m = rows.size(0), k = rows.size(1);
  const gemm::VectorKernels kernels =
      gemm::small_tiles_fit_better(tier_kernels, m) ? gemm::with_small_tiles(tier_kernels) : tier_kernels;
  const int64_t t = kernels.tile_rows;
  const int64_t k_steps = (k + gemm::kStepDepth - 1) / gemm::kStepDepth,
                padded_k = k_steps * gemm::kStepDepth;
  const int64_t tiles = (m + t - 1) / t;
  at::Tensor copy = at::zeros({tiles * t, padded_k},
                              rows.options().dtype(kernels.float_operands ? at::kFloat : at::kBFloat16));
  copy.narrow(0, 0, m).narrow(1, 0, k).copy_(kernels.float_operands ? rows.to(at::kBFloat16) : rows);
  gemm::RowTiles a;
  a.tile_rows = t;
  a.lda = padded_k;
  a.tap_offset = {0};
  a.tap_steps = a.k_steps = k_steps;
  const char* base = static_cast<const char*>(copy.data_ptr());
  for (int64_t i = 0; i < tiles; ++i) a.tiles.push_back(base + i * t * padded_k * copy.element_size());

  struct Unit {
    const gemm::bf16_bits* weight;
    int64_t ldw, rows, n0;
    size_t job;
  };
  std::vector<Unit> units;
  std::vector<gemm::InplaceOutput> outs(jobs.size());
  std::vector<at::Tensor> keep_alive;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const at::Tensor& w = jobs[i].weight;
    const int64_t n = w.size(0);
    gemm::InplaceOutput& o = outs[i];
    if (jobs[i].bias.defined()) {
      keep_alive.push_back(jobs[i].bias.to(at::kFloat).contiguous());
      o.bias = keep_alive.back().data_ptr<float>();
    }
    o.activation = jobs[i].activation;
    o.out = outputs[i].data_ptr();
    o.ldo = n;
    o.out_bf16 = out_bf16;
    o.m = m;
    o.n = n;
    if (jobs[i].residual.defined()) {
      at::Tensor residual = jobs[i].residual.reshape({m, n});
      if (residual.stride(1) != 1 && n > 1) residual = residual.contiguous();
      keep_alive.push_back(residual);
      o.residual = residual.data_ptr();
      o.residual_bf16 = residual.scalar_type() == at::kBFloat16;
      o.ld_residual = residual.stride(0);
    }
    const auto* weight = reinterpret_cast<const gemm::bf16_bits*>(w.data_ptr<at::BFloat16>());
    for (int64_t n0 = 0; n0 < n; n0 += gemm::kBlockColumns)
      units.push_back(
          {weight + n0 * w.stride(0), w.stride(0), std::min<int64_t>(gemm::kBlockColumns, n - n0), n0, i});
  }
  const int64_t chunks = (k_steps + kernels.chunk_steps - 1) / kernels.chunk_steps;
  const gemm::Plan plan = gemm::make_plan(tiles, static_cast<int64_t>(units.size()), k_steps,
                                          (k_steps + chunks - 1) / chunks, std::max<int64_t>(1, 512 / t), 1);
  gemm::GemmSource source;
  source.panel_bytes = plan.chunk_steps * gemm::kStepElements * (kernels.float_operands ? 4 : 2);
  source.panel = [&](int64_t block, int64_t s0, int64_t s1, void* scratch) -> const void* {
    const Unit& u = units[static_cast<size_t>(block)];
    kernels.pack_rows(u.weight, u.ldw, u.rows, s0 * gemm::kStepDepth, std::min(k, s1 * gemm::kStepDepth),
                      scratch);
    return scratch;
  };
  source.weights = [&](int64_t block, int64_t s0, int64_t s1) {
    const Unit& u = units[static_cast<size_t>(block)];
    gemm::WeightRange range;
    range.base = u.weight + s0 * gemm::kStepDepth;
    range.row_bytes = (std::min(k, s1 * gemm::kStepDepth) - s0 * gemm::kStepDepth) * 2;
    range.rows = u.rows;
    range.stride_bytes = u.ldw * 2;
    return range;
  };
  gemm::run_vector_gemm(kernels, a, plan, source, [&](const float* c, int64_t tile, int64_t block) {
    const Unit& u = units[static_cast<size_t>(block)];
    kernels.store_inplace(outs[u.job], c, tile * t, t, u.n0);
  });
}

}  // namespace

bool inplace_gemm_supported(CpuTier tier) {
  if (tier > cpu_tier()) return false;
#ifdef VOKEN_HAVE_AMX
  if (tier == CpuTier::amx) return true;
#endif
  return gemm::vector_kernels(tier) != nullptr;
}

std::vector<at::Tensor> inplace_linear_many(const at::Tensor& x, const std::vector<InplaceLinearJob>& jobs,
                                            at::ScalarType out_dtype, CpuTier tier) {
  if (!inplace_gemm_supported(tier))
    throw ArgumentError(std::string("inplace_linear: no kernel for CPU tier ") + tier_name(tier) +
                        " (this process runs at " + tier_name(cpu_tier()) + ")");
  if (!x.defined() || x.dim() < 1 || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    throw ArgumentError(
        "inplace_linear: x must be a float32 or bfloat16 CPU tensor with at least one dimension");
  if (out_dtype != at::kFloat && out_dtype != at::kBFloat16)
    throw ArgumentError("inplace_linear: the output dtype must be float32 or bfloat16");
  if (jobs.empty()) throw ArgumentError("inplace_linear: no weights given");
  const int64_t k = x.size(-1);
  for (const auto& job : jobs) {
    const auto& w = job.weight;
    if (!w.defined() || w.dim() != 2 || w.scalar_type() != at::kBFloat16 || !w.device().is_cpu() ||
        (w.size(1) > 1 && w.stride(1) != 1) || w.stride(0) < w.size(1))
      throw ArgumentError(
          "inplace_linear: weights must be 2-D bfloat16 CPU tensors with unit stride along rows");
    if (w.size(1) != k)
      throw ArgumentError("inplace_linear: x has " + std::to_string(k) + " features, a weight expects " +
                          std::to_string(w.size(1)));
    if (job.bias.defined() && (job.bias.numel() != w.size(0) || !job.bias.device().is_cpu()))
      throw ArgumentError("inplace_linear: a bias has " + std::to_string(job.bias.numel()) + " values for " +
                          std::to_string(w.size(0)) + " outputs");
    if (job.residual.defined()) {
      auto expected = x.sizes().vec();
      expected.back() = w.size(0);
      if (!job.residual.sizes().equals(expected) || !job.residual.device().is_cpu() ||
          (job.residual.scalar_type() != at::kFloat && job.residual.scalar_type() != at::kBFloat16))
        throw ArgumentError(
            "inplace_linear: the residual must be a float32 or bfloat16 CPU tensor of the output's shape");
    }
  }
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
#ifdef VOKEN_HAVE_AMX
  if (tier == CpuTier::amx) {
    amx_linear_many(rows, jobs, outputs, out_dtype == at::kBFloat16);
    return outputs;
  }
#endif
  vector_linear_many(*gemm::vector_kernels(tier), rows, jobs, outputs, out_dtype == at::kBFloat16);
  return outputs;
}

at::Tensor inplace_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          at::ScalarType out_dtype, Activation activation, const at::Tensor& residual,
                          CpuTier tier) {
  return inplace_linear_many(x, {InplaceLinearJob{weight, bias, activation, residual}}, out_dtype, tier)
      .front();
}

}  // namespace voken::core
