// Internal interface between the GEMM front ends (packed_gemm.cpp, inplace_gemm.cpp) and the
// per-ISA kernels (packed_gemm_amx.cpp, packed_gemm_avx512.cpp, packed_gemm_avx2.cpp).
//
// Every product is C = A B over "row tiles" of A and 32-column blocks of B, in 32-deep K steps:
//  - A: tiles of `tile_rows` rows; the rows of a tile are `lda` elements apart and need not be
//    the rows of a matrix: for a k x k convolution each tile is a run of consecutive pixels of the
//    zero-padded NHWC input, and the K range of tap t reads the same rows shifted by
//    tap_offset[t] elements (an implicit GEMM). A is bfloat16 for the bf16 tiers (amx,
//    avx512_bf16) and float32 for the FMA tiers (avx512, avx2), which widen it once per call.
//  - B: per block and step, 1024 bfloat16 in the packed layout (PackedGemmWeight: two 16-column
//    halves of 16 k-pairs x 16 columns x 2), or, for the FMA tiers, a float32 panel of 32 k x 32
//    columns per step, widened (or, for weights read in place, transposed) per task and K chunk
//    so that the micro-kernel does nothing but loads and FMAs.
//  - Tasks cover a range of tiles x a range of blocks and run the K chunks in order; between
//    chunks a task's float32 accumulators wait in a per-thread buffer.
// Nothing here contains intrinsics: the kernels are behind plain function pointers, so that this
// header and the drivers compile for any target.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/cpu.h"
#include "core/inplace_gemm.h"  // Activation

namespace voken::core::gemm {

using bf16_bits = uint16_t;

constexpr int64_t kBlockColumns = 32;                          // output columns per block
constexpr int64_t kStepDepth = 32;                             // K per step
constexpr int64_t kStepElements = kBlockColumns * kStepDepth;  // B values per block and step

// The A operand: tiles of rows (see above).
struct RowTiles {
  int64_t tile_rows = 0;
  std::vector<const void*> tiles;   // per tile: its first row at tap 0, K index 0
  int64_t lda = 0;                  // elements between consecutive rows of a tile
  std::vector<int64_t> tap_offset;  // per tap: element offset of its K range
  int64_t tap_steps = 0;            // steps per tap
  int64_t k_steps = 0;              // steps in all (taps x tap_steps)
};

// One micro-tile: the tile_rows rows of one tile x one 32-column block, over steps [s0, s1).
struct ProductArgs {
  const void* a = nullptr;  // the tile (RowTiles::tiles[t])
  int64_t lda = 0;
  const int64_t* tap_offset = nullptr;
  int64_t tap_steps = 0;
  int64_t s0 = 0, s1 = 0;
  const void* b = nullptr;  // B of this block at step s0 (1024 values per step, see above)
  float* c = nullptr;       // [tile_rows][32] float32: the result, and the start when accumulate
  bool accumulate = false;
};

// Where a packed product's rows go: out = round(c + bias (+ residual)) or the GEGLU of the pairs.
struct PackedOutput {
  const float* bias = nullptr;          // [N] or null
  const int64_t* out_rows = nullptr;    // per A row (tile * tile_rows + r): output element offset, or -1
  bf16_bits* out = nullptr;             // rows of N (N / 2 for GEGLU) values
  const bf16_bits* residual = nullptr;  // laid out as `out`, or null
  bool geglu = false;                   // blocks of 16 values and 16 gates -> 16 outputs
};

// One job of an in-place product: rows [0, m) of the output, columns [0, n).
struct InplaceOutput {
  const float* bias = nullptr;
  Activation activation = Activation::None;
  void* out = nullptr;  // float32 or bfloat16, row stride ldo
  int64_t ldo = 0;
  bool out_bf16 = false;
  const void* residual = nullptr;  // float32 or bfloat16, row stride ld_residual, added last
  bool residual_bf16 = false;
  int64_t ld_residual = 0;
  int64_t m = 0, n = 0;
};

// The kernels of one vector tier.
struct VectorKernels {
  CpuTier tier = CpuTier::generic;
  int64_t tile_rows = 0;
  bool float_operands = false;  // A and the B panels in float32 (FMA tiers), else bfloat16
  int64_t chunk_steps = 0;      // K steps per chunk: one block's B panel of a chunk stays in L1
  void (*product)(const ProductArgs&) = nullptr;
  // Optional: a micro-kernel of fewer rows (small_tile_rows), for row counts that fill its tiles
  // better, and for convolutions whose output width is a multiple of it: every tile then lies
  // within one output row and no padding column is computed.
  int64_t small_tile_rows = 0;
  void (*product_small)(const ProductArgs&) = nullptr;
  // FMA tiers: `steps` steps of one packed block -> float32 panel [steps * 32 k][32 columns].
  void (*widen_packed)(const bf16_bits* packed, int64_t steps, float* panel) = nullptr;
  // Weights read in place: rows [0, rows) (rows <= 32, row stride ldw) over K [k_begin, k_end) ->
  // the B panel of one block (zero padded to 32 columns and whole steps).
  void (*pack_rows)(const bf16_bits* w, int64_t ldw, int64_t rows, int64_t k_begin, int64_t k_end,
                    void* panel) = nullptr;
  // c [tile_rows][32] of rows [row0, row0 + tile_rows) x block -> the packed output.
  void (*store_packed)(const PackedOutput& out, const float* c, int64_t row0, int64_t tile_rows,
                       int64_t block) = nullptr;
  // c [tile_rows][32] of rows [row0, ...) x columns [n0, n0 + 32) -> the job's output (only rows < m
  // and columns < n).
  void (*store_inplace)(const InplaceOutput& out, const float* c, int64_t row0, int64_t tile_rows,
                        int64_t n0) = nullptr;
};

// `kernels` with the small micro-kernel as its product.
inline VectorKernels with_small_tiles(VectorKernels kernels) {
  kernels.tile_rows = kernels.small_tile_rows;
  kernels.product = kernels.product_small;
  return kernels;
}

// Whether m rows fill the small tiles better (fewer rows of padding) than the regular ones.
inline bool small_tiles_fit_better(const VectorKernels& kernels, int64_t m) {
  const auto padded = [m](int64_t t) { return (m + t - 1) / t * t; };
  return kernels.small_tile_rows > 0 && padded(kernels.small_tile_rows) < padded(kernels.tile_rows);
}

// The kernels of `tier` (avx2, avx512 or avx512_bf16), or null when this build has none.
const VectorKernels* vector_kernels(CpuTier tier);
const VectorKernels* avx512_bf16_kernels();
const VectorKernels* avx512_kernels();
const VectorKernels* avx2_kernels();

// How the work is cut: tasks of (tile range, block range), each running the K chunks in order.
struct Plan {
  int64_t chunk_steps = 0;
  struct Task {
    int64_t tile_begin, tile_end, block_begin, block_end;
  };
  std::vector<Task> tasks;
  int64_t max_tiles = 0, max_blocks = 0;
};

// Tasks of at most max_task_tiles tiles (in multiples of tile_granule) x 8 blocks, and enough of
// them (a multiple of the thread count where possible) that every thread gets work.
Plan make_plan(int64_t tiles, int64_t blocks, int64_t k_steps, int64_t chunk_steps, int64_t max_task_tiles,
               int64_t tile_granule);

// Where the weights of a block and K chunk lie in memory (rows of row_bytes, stride_bytes apart),
// for prefetching them before their panel is needed.
struct WeightRange {
  const void* base = nullptr;
  int64_t row_bytes = 0, rows = 1, stride_bytes = 0;
};

// The B operand of a product.
struct GemmSource {
  // B of `block` for steps [s0, s1): a pointer into packed weights, or a panel written into
  // `scratch` (panel_bytes per thread).
  std::function<const void*(int64_t block, int64_t s0, int64_t s1, void* scratch)> panel;
  int64_t panel_bytes = 0;
  // The memory `panel` reads for (block, s0, s1).
  std::function<WeightRange(int64_t block, int64_t s0, int64_t s1)> weights;
};

// Results of tile x block (c [tile_rows][32], complete sums).
using StoreFn = std::function<void(const float* c, int64_t tile, int64_t block)>;

// Runs the plan's tasks in parallel with `kernels`.
void run_vector_gemm(const VectorKernels& kernels, const RowTiles& a, const Plan& plan,
                     const GemmSource& source, const StoreFn& store);

#ifdef VOKEN_HAVE_AMX
// The AMX products of a packed weight (tile_rows 16, bfloat16 A; make_plan with granule 2).
void run_packed_amx(const RowTiles& a, const Plan& plan, const bf16_bits* packed, const PackedOutput& out);
#endif

}  // namespace voken::core::gemm
