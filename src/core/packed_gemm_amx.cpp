// The AMX tier of the packed products (core/packed_gemm.h): per task, 32 rows (two 16-row A
// tiles) x one 32-column block (two B tiles) accumulate in tiles 4-7 over a K chunk.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "core/amx.h"
#include "core/packed_gemm_kernels.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"

#ifdef VOKEN_HAVE_AMX

// GCC 12 reports its own AVX-512 intrinsics (_mm512_castsi512_si256, ...) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core::gemm {
namespace {

// One block of 16 or 32 rows (one or two A tiles) x 32 columns over K steps [s0, s1): C tiles
// 4-7 start from zero or from `c` (row-major 32 x 32 float32) and are stored back to `c`.
template <bool kTwoTiles>
VOKEN_TARGET_AMX void block_product(const RowTiles& a, const bf16_bits* packed, int64_t tile, int64_t block,
                                    int64_t s0, int64_t s1, float* c, bool accumulate) {
  constexpr int64_t kCStride = kBlockColumns * sizeof(float);
  if (accumulate) {
    _tile_loadd(4, c, kCStride);
    _tile_loadd(5, c + 16, kCStride);
    if (kTwoTiles) {
      _tile_loadd(6, c + 16 * kBlockColumns, kCStride);
      _tile_loadd(7, c + 16 * kBlockColumns + 16, kCStride);
    }
  } else {
    _tile_zero(4);
    _tile_zero(5);
    if (kTwoTiles) {
      _tile_zero(6);
      _tile_zero(7);
    }
  }
  const auto* a0 = static_cast<const bf16_bits*>(a.tiles[tile]);
  const auto* a1 = kTwoTiles ? static_cast<const bf16_bits*>(a.tiles[tile + 1]) : a0;
  const int64_t lda_bytes = a.lda * static_cast<int64_t>(sizeof(bf16_bits));
  const bf16_bits* b = packed + (block * a.k_steps + s0) * kStepElements;
  int64_t tap = s0 / a.tap_steps, step_in_tap = s0 % a.tap_steps;
  int64_t offset = a.tap_offset[tap] + step_in_tap * kStepDepth;
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(2, b, 64);
    _tile_loadd(0, a0 + offset, lda_bytes);
    _tile_loadd(3, b + kStepElements / 2, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if (kTwoTiles) {
      _tile_loadd(1, a1 + offset, lda_bytes);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
    b += kStepElements;
    offset += kStepDepth;
    if (++step_in_tap == a.tap_steps && s + 1 < s1) {
      step_in_tap = 0;
      offset = a.tap_offset[++tap];
    }
  }
  _tile_stored(4, c, kCStride);
  _tile_stored(5, c + 16, kCStride);
  if (kTwoTiles) {
    _tile_stored(6, c + 16 * kBlockColumns, kCStride);
    _tile_stored(7, c + 16 * kBlockColumns + 16, kCStride);
  }
}

VOKEN_TARGET_AMX void run_tasks(const RowTiles& a, const Plan& plan, const bf16_bits* packed,
                                const PackedOutput& out, int64_t begin, int64_t end) {
  amx::configure_full_tiles();
  const VectorKernels& store = *avx512_bf16_kernels();  // the AVX-512 epilogue
  // Accumulators of a task between K chunks (a single block's worth without chunking).
  const bool chunked = plan.chunk_steps < a.k_steps;
  const int64_t pairs = (plan.max_tiles + 1) / 2;
  const std::size_t floats = chunked ? pairs * plan.max_blocks * 32 * kBlockColumns : 32 * kBlockColumns;
  // Kept per thread between calls: a task's accumulators reach 512 KiB, which malloc would map
  // and unmap (page faults) on every task.
  thread_local std::unique_ptr<float, decltype(&std::free)> acc(nullptr, &std::free);
  thread_local std::size_t acc_floats = 0;
  if (acc_floats < floats) {
    acc.reset(static_cast<float*>(std::aligned_alloc(64, floats * sizeof(float))));
    if (!acc) {
      acc_floats = 0;
      throw std::bad_alloc();
    }
    acc_floats = floats;
  }
  for (int64_t index = begin; index < end; ++index) {
    const auto& task = plan.tasks[index];
    const int64_t blocks = task.block_end - task.block_begin;
    for (int64_t s0 = 0; s0 < a.k_steps; s0 += plan.chunk_steps) {
      const int64_t s1 = std::min(a.k_steps, s0 + plan.chunk_steps);
      const bool last = s1 == a.k_steps;
      for (int64_t block = task.block_begin; block < task.block_end; ++block)
        for (int64_t tile = task.tile_begin; tile < task.tile_end; tile += 2) {
          float* c =
              chunked ? acc.get() + (((tile - task.tile_begin) / 2) * blocks + (block - task.block_begin)) *
                                        32 * kBlockColumns
                      : acc.get();
          const bool two = tile + 1 < task.tile_end;
          if (two)
            block_product<true>(a, packed, tile, block, s0, s1, c, s0 > 0);
          else
            block_product<false>(a, packed, tile, block, s0, s1, c, s0 > 0);
          if (last) store.store_packed(out, c, tile * 16, two ? 32 : 16, block);
        }
    }
  }
  _tile_release();
}

}  // namespace

void run_packed_amx(const RowTiles& a, const Plan& plan, const bf16_bits* packed, const PackedOutput& out) {
  parallel_items(static_cast<int64_t>(plan.tasks.size()),
                 [&](int64_t task) { run_tasks(a, plan, packed, out, task, task + 1); });
}

}  // namespace voken::core::gemm

#endif
