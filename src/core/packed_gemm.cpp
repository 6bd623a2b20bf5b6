#include "core/packed_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/packed_gemm_kernels.h"
#include "core/parallel.h"
#include "voken/error.h"

namespace voken::core {
namespace gemm {
namespace {

// Per-thread 64-byte aligned scratch that only grows: a task's accumulators reach hundreds of
// KiB, which malloc would map and unmap (page faults) on every task.
class ThreadBuffer {
 public:
  void* get(std::size_t bytes) {
    if (bytes > bytes_) {
      data_.reset(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      bytes_ = data_ ? bytes : 0;
      if (!data_) throw std::bad_alloc();
    }
    return data_.get();
  }

 private:
  std::unique_ptr<void, decltype(&std::free)> data_{nullptr, &std::free};
  std::size_t bytes_ = 0;
};

// `count` items in `parts` contiguous ranges of near-equal size (sizes rounded to `granule`).
std::vector<std::pair<int64_t, int64_t>> split(int64_t count, int64_t parts, int64_t granule) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int64_t units = (count + granule - 1) / granule;
  parts = std::max<int64_t>(1, std::min(parts, units));
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t begin = std::min(count, units * p / parts * granule);
    const int64_t end = std::min(count, units * (p + 1) / parts * granule);
    if (end > begin) ranges.emplace_back(begin, end);
  }
  return ranges;
}

// Requests the weight rows of the next panel into L2 a few lines per row tile while this panel is
// computed: with few row tiles (small images, short prompts) each panel is used briefly and its
// weights would otherwise arrive from memory with nothing to overlap them.
struct PanelPrefetch {
  WeightRange range;
  int64_t lines_per_row = 0, total = 0, cursor = 0;

  explicit PanelPrefetch(const WeightRange& r) : range(r) {
    lines_per_row = (r.row_bytes + 63) / 64;
    total = r.base ? r.rows * lines_per_row : 0;
  }
  void issue(int64_t count) {
    for (int64_t end = std::min(total, cursor + count); cursor < end; ++cursor)
      __builtin_prefetch(static_cast<const char*>(range.base) +
                             (cursor / lines_per_row) * range.stride_bytes + (cursor % lines_per_row) * 64,
                         0, 2);
  }
};

void run_task(const VectorKernels& kernels, const RowTiles& a, const Plan& plan, const GemmSource& source,
              const StoreFn& store, const Plan::Task& task) {
  thread_local ThreadBuffer acc_buffer, panel_buffer;
  const int64_t tile_floats = kernels.tile_rows * kBlockColumns;
  const bool chunked = plan.chunk_steps < a.k_steps;
  const int64_t blocks = task.block_end - task.block_begin, tiles = task.tile_end - task.tile_begin;
  auto* acc =
      static_cast<float*>(acc_buffer.get(sizeof(float) * tile_floats * (chunked ? tiles * blocks : 1)));
  void* scratch = source.panel_bytes > 0 ? panel_buffer.get(source.panel_bytes) : nullptr;
  ProductArgs args;
  args.lda = a.lda;
  args.tap_offset = a.tap_offset.data();
  args.tap_steps = a.tap_steps;
  for (int64_t s0 = 0; s0 < a.k_steps; s0 += plan.chunk_steps) {
    const int64_t s1 = std::min(a.k_steps, s0 + plan.chunk_steps);
    args.s0 = s0;
    args.s1 = s1;
    args.accumulate = s0 > 0;
    for (int64_t block = task.block_begin; block < task.block_end; ++block) {
      args.b = source.panel(block, s0, s1, scratch);
      // The panel after this one: the next block of the chunk, or the first of the next chunk.
      WeightRange next;
      if (block + 1 < task.block_end)
        next = source.weights(block + 1, s0, s1);
      else if (s1 < a.k_steps)
        next = source.weights(task.block_begin, s1, std::min(a.k_steps, s1 + plan.chunk_steps));
      PanelPrefetch prefetch(next);
      const int64_t per_tile = (prefetch.total + tiles - 1) / tiles;
      for (int64_t tile = task.tile_begin; tile < task.tile_end; ++tile) {
        prefetch.issue(per_tile);
        args.a = a.tiles[tile];
        args.c = chunked
                     ? acc + ((tile - task.tile_begin) * blocks + (block - task.block_begin)) * tile_floats
                     : acc;
        kernels.product(args);
        if (s1 == a.k_steps) store(args.c, tile, block);
      }
    }
  }
}

}  // namespace

Plan make_plan(int64_t tiles, int64_t blocks, int64_t k_steps, int64_t chunk_steps, int64_t max_task_tiles,
               int64_t tile_granule) {
  Plan plan;
  plan.chunk_steps = std::max<int64_t>(1, std::min(chunk_steps, k_steps));
  // Up to 8 blocks per task: their accumulators and the task's A rows of a chunk stay in L2 while
  // one block's weight panel of the chunk stays in L1.
  constexpr int64_t kMaxTaskBlocks = 8;
  const int64_t threads = parallel_threads();
  int64_t tile_groups = (tiles + max_task_tiles - 1) / max_task_tiles;
  int64_t block_groups = (blocks + kMaxTaskBlocks - 1) / kMaxTaskBlocks;
  // Few tasks (small images, wide layers: bound by reading the weights): enough of them, in a
  // multiple of the thread count, that every thread streams the same share of the weights.
  while (tile_groups * block_groups < 8 * threads && (tile_groups * block_groups) % threads != 0 &&
         block_groups < blocks)
    ++block_groups;
  // Still fewer tasks than threads (few, wide blocks; many cores): split the rows further too.
  const int64_t tile_units = (tiles + tile_granule - 1) / tile_granule;
  while (tile_groups * block_groups < threads && tile_groups < tile_units) ++tile_groups;
  const auto tile_ranges = split(tiles, tile_groups, tile_granule);
  const auto block_ranges = split(blocks, block_groups, 1);
  for (const auto& [t0, t1] : tile_ranges)
    for (const auto& [b0, b1] : block_ranges) {
      plan.tasks.push_back({t0, t1, b0, b1});
      plan.max_tiles = std::max(plan.max_tiles, t1 - t0);
      plan.max_blocks = std::max(plan.max_blocks, b1 - b0);
    }
  return plan;
}

void run_vector_gemm(const VectorKernels& kernels, const RowTiles& a, const Plan& plan,
                     const GemmSource& source, const StoreFn& store) {
  parallel_items(static_cast<int64_t>(plan.tasks.size()), [&](int64_t index) {
    run_task(kernels, a, plan, source, store, plan.tasks[static_cast<size_t>(index)]);
  });
}

const VectorKernels* vector_kernels(CpuTier tier) {
  switch (tier) {
    case CpuTier::avx512_bf16:
      return avx512_bf16_kernels();
    case CpuTier::avx512:
      return avx512_kernels();
    case CpuTier::avx2:
      return avx2_kernels();
    default:
      return nullptr;
  }
}

#ifndef VOKEN_X86_KERNELS
const VectorKernels* avx512_bf16_kernels() { return nullptr; }
const VectorKernels* avx512_kernels() { return nullptr; }
const VectorKernels* avx2_kernels() { return nullptr; }
#endif

}  // namespace gemm

namespace {

using gemm::bf16_bits;
using gemm::kBlockColumns;
using gemm::kStepDepth;
using gemm::kStepElements;

std::string sizes_string(at::IntArrayRef sizes) {
  std::string out = "[";
  for (std::size_t d = 0; d < sizes.size(); ++d) out += (d ? ", " : "") + std::to_string(sizes[d]);
  return out + "]";
}
std::string shape_of(const at::Tensor& t) { return sizes_string(t.sizes()); }

// The weight as [N, K] with K ordered (ky, kx, c) for convolutions.
at::Tensor as_matrix(const at::Tensor& weight) {
  if (weight.dim() == 2) return weight;
  return weight.permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
}

// Whether this build has kernels for `tier` (not whether the CPU can run them).
bool tier_built(CpuTier tier) {
#ifdef VOKEN_HAVE_AMX
  if (tier == CpuTier::amx) return true;
#endif
  return gemm::vector_kernels(tier) != nullptr;
}

}  // namespace

bool packed_gemm_supported(int64_t out_features, int64_t in_channels, int64_t kernel, CpuTier tier) {
  return tier >= CpuTier::avx2 && tier <= cpu_tier() && tier_built(tier) && out_features > 0 &&
         in_channels > 0 && out_features % kBlockColumns == 0 && in_channels % kStepDepth == 0 &&
         (kernel == 1 || kernel == 3);
}

std::shared_ptr<const PackedGemmWeight> pack_gemm_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                         CpuTier tier) {
  const bool conv = weight.defined() && weight.dim() == 4;
  if (!weight.defined() || !(weight.dim() == 2 || (conv && weight.size(2) == weight.size(3))) ||
      !at::isFloatingType(weight.scalar_type()))
    throw ArgumentError("pack_gemm_weight: expected a float [N, K] or [N, C, k, k] weight, got " +
                        (weight.defined() ? shape_of(weight) : std::string("an undefined tensor")));
  auto packed = std::make_shared<PackedGemmWeight>();
  packed->out_features = weight.size(0);
  packed->in_channels = weight.size(1);
  packed->kernel = conv ? weight.size(2) : 1;
  packed->tier = tier;
  if (!packed_gemm_supported(packed->out_features, packed->in_channels, packed->kernel, tier))
    throw ArgumentError("pack_gemm_weight: weight " + shape_of(weight) + " cannot be packed for CPU tier " +
                        tier_name(tier) + " (needs tier avx2 or above, at most " + tier_name(cpu_tier()) +
                        ", N and C multiples of 32, kernel 1 or 3)");
  if (bias.defined() && bias.numel() != packed->out_features)
    throw ArgumentError("pack_gemm_weight: bias has " + std::to_string(bias.numel()) + " values for " +
                        std::to_string(packed->out_features) + " outputs");
  const int64_t n = packed->out_features, k = packed->depth(), steps = k / kStepDepth;
  // [N, K] -> [N/32 blocks][K/32 steps][2 tiles][16 k-pairs][16 columns][2 (k parity)]: each k pair
  // of a weight row is one 32-bit word of the packed layout.
  const at::Tensor matrix = as_matrix(weight).to(at::kBFloat16).contiguous();
  packed->data = at::empty({n * k}, matrix.options());
  const auto* src = reinterpret_cast<const uint32_t*>(matrix.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(packed->data.data_ptr<at::BFloat16>());
  parallel_range(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t block = row / kBlockColumns, half = (row % kBlockColumns) / 16, column = row % 16;
      const uint32_t* pairs = src + row * (k / 2);
      for (int64_t s = 0; s < steps; ++s) {
        uint32_t* tile = dst + ((block * steps + s) * 2 + half) * 256 + column;
        for (int64_t pair = 0; pair < 16; ++pair) tile[pair * 16] = pairs[s * 16 + pair];
      }
    }
  });
  if (bias.defined()) packed->bias = bias.to(at::kFloat).contiguous();
  return packed;
}

std::shared_ptr<const PackedGemmWeight> pack_geglu_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                          CpuTier tier) {
  if (!weight.defined() || weight.dim() != 2 || weight.size(0) % 32 != 0)
    throw ArgumentError(
        "pack_geglu_weight: expected a [2*inner, K] weight with inner a multiple of 16, got " +
        (weight.defined() ? shape_of(weight) : std::string("an undefined tensor")));
  // Rows reordered so that every 32-column block holds 16 value columns and their 16 gates.
  const int64_t inner = weight.size(0) / 2, k = weight.size(1);
  const auto interleave = [&](const at::Tensor& t, int64_t width) {
    return t.reshape({2, inner / 16, 16, width}).transpose(0, 1).reshape({2 * inner, width});
  };
  auto packed = std::make_shared<PackedGemmWeight>(
      *pack_gemm_weight(interleave(weight, k),
                        bias.defined() ? interleave(bias.reshape({-1, 1}), 1).reshape({-1}) : bias, tier));
  packed->geglu = true;
  return packed;
}

at::Tensor unpack_gemm_weight(const PackedGemmWeight& weight) {
  const int64_t n = weight.out_features, k = weight.depth();
  return weight.data.reshape({n / kBlockColumns, k / kStepDepth, 2, 16, 16, 2})
      .permute({0, 2, 4, 1, 3, 5})
      .reshape({n, k});
}

namespace {

// One call's A operand and where its rows go; `buffers` keep copies alive.
struct Call {
  bool small_tiles = false;  // tiles of the tier's small_tile_rows (VectorKernels::product_small)
  gemm::RowTiles a;
  std::vector<int64_t> out_rows;  // per row of every tile: element offset of its output row, or -1
  std::vector<at::Tensor> buffers;
};

int64_t tile_rows_of(CpuTier tier) {
  if (tier == CpuTier::amx) return 16;
  return gemm::vector_kernels(tier)->tile_rows;
}
bool float_operands_of(CpuTier tier) {
  return tier != CpuTier::amx && gemm::vector_kernels(tier)->float_operands;
}

void run(Call& call, const PackedGemmWeight& weight, at::Tensor& out, const at::Tensor& residual) {
  gemm::RowTiles& a = call.a;
  a.k_steps = weight.depth() / kStepDepth;
  a.tap_steps = weight.in_channels / kStepDepth;
  if (a.tiles.empty()) return;
  gemm::PackedOutput o;
  o.bias = weight.bias.defined() ? weight.bias.data_ptr<float>() : nullptr;
  o.out_rows = call.out_rows.data();
  o.out = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  o.residual =
      residual.defined() ? reinterpret_cast<const bf16_bits*>(residual.data_ptr<at::BFloat16>()) : nullptr;
  o.geglu = weight.geglu;
  const auto* packed = reinterpret_cast<const bf16_bits*>(weight.data.data_ptr<at::BFloat16>());
  const int64_t tiles = static_cast<int64_t>(a.tiles.size()), blocks = weight.out_features / kBlockColumns;
#ifdef VOKEN_HAVE_AMX
  if (weight.tier == CpuTier::amx) {
    // 16-step chunks (a block's weights of a chunk, 32 KiB, stay in L1) unless K is short; tasks
    // of up to 32 tiles (512 rows) in pairs of tiles.
    constexpr int64_t kChunkSteps = 16;
    const gemm::Plan plan = gemm::make_plan(tiles, blocks, a.k_steps,
                                            a.k_steps <= 2 * kChunkSteps ? a.k_steps : kChunkSteps, 32, 2);
    gemm::run_packed_amx(a, plan, packed, o);
    return;
  }
#endif
  const gemm::VectorKernels* vector = gemm::vector_kernels(weight.tier);
  const gemm::VectorKernels kernels = call.small_tiles ? gemm::with_small_tiles(*vector) : *vector;
  // Balanced chunks of at most chunk_steps; tasks of up to ~512 rows.
  const int64_t chunks = (a.k_steps + kernels.chunk_steps - 1) / kernels.chunk_steps;
  const gemm::Plan plan = gemm::make_plan(tiles, blocks, a.k_steps, (a.k_steps + chunks - 1) / chunks,
                                          std::max<int64_t>(1, 512 / kernels.tile_rows), 1);
  const int64_t k_steps = a.k_steps;
  const gemm::StoreFn store = [&](const float* c, int64_t tile, int64_t block) {
    kernels.store_packed(o, c, tile * kernels.tile_rows, kernels.tile_rows, block);
  };
  gemm::GemmSource source;
  source.weights = [&](int64_t block, int64_t s0, int64_t s1) {
    gemm::WeightRange range;
    range.base = packed + (block * k_steps + s0) * kStepElements;
    range.row_bytes = (s1 - s0) * kStepElements * static_cast<int64_t>(sizeof(bf16_bits));
    return range;
  };
  if (kernels.float_operands) {
    // The weight panel of a block and chunk widened to float32 once per task.
    source.panel_bytes = plan.chunk_steps * kStepElements * static_cast<int64_t>(sizeof(float));
    source.panel = [&](int64_t block, int64_t s0, int64_t s1, void* scratch) -> const void* {
      kernels.widen_packed(packed + (block * k_steps + s0) * kStepElements, s1 - s0,
                           static_cast<float*>(scratch));
      return scratch;
    };
  } else {
    source.panel = [&](int64_t block, int64_t s0, int64_t, void*) -> const void* {
      return packed + (block * k_steps + s0) * kStepElements;
    };
  }
  gemm::run_vector_gemm(kernels, a, plan, source, store);
}

void check_input(const at::Tensor& x, const PackedGemmWeight& weight, const char* what) {
  if (weight.tier < CpuTier::avx2 || weight.tier > cpu_tier() || !tier_built(weight.tier))
    throw ArgumentError(std::string(what) + ": the weight was packed for CPU tier " + tier_name(weight.tier) +
                        ", this process runs at " + tier_name(cpu_tier()));
  if (!x.defined() || x.scalar_type() != at::kBFloat16 || !x.device().is_cpu())
    throw ArgumentError(std::string(what) + ": expected a bfloat16 CPU tensor");
}

at::Tensor checked_residual(const at::Tensor& residual, at::IntArrayRef sizes, at::MemoryFormat format,
                            const char* what) {
  if (!residual.defined()) return residual;
  if (residual.sizes() != sizes || residual.scalar_type() != at::kBFloat16)
    throw ArgumentError(std::string(what) + ": residual must be bfloat16 " + sizes_string(sizes) + ", got " +
                        shape_of(residual));
  return residual.contiguous(format);
}

// out = x W^T + bias (+ residual); out [M, N] contiguous, residual [M, N] contiguous (may be out).
void linear_rows(const at::Tensor& x, const PackedGemmWeight& weight, const at::Tensor& residual,
                 at::Tensor& out) {
  const int64_t k = weight.depth(), n = weight.output_width();
  at::Tensor rows = x.reshape({-1, k});
  const int64_t m = rows.size(0);
  Call call;
  const gemm::VectorKernels* vector =
      weight.tier == CpuTier::amx ? nullptr : gemm::vector_kernels(weight.tier);
  call.small_tiles = vector && gemm::small_tiles_fit_better(*vector, m);
  const int64_t t = call.small_tiles ? vector->small_tile_rows : tile_rows_of(weight.tier);
  const int64_t tiles = (m + t - 1) / t;
  gemm::RowTiles& a = call.a;
  a.tile_rows = t;
  a.tap_offset = {0};
  if (float_operands_of(weight.tier)) {
    // FMA tiers: a float32 copy, zero padded to whole tiles.
    at::Tensor copy = at::empty({tiles * t, k}, rows.options().dtype(at::kFloat));
    copy.narrow(0, 0, m).copy_(rows);
    copy.narrow(0, m, tiles * t - m).zero_();
    a.lda = k;
    const float* base = copy.data_ptr<float>();
    for (int64_t i = 0; i < tiles; ++i) a.tiles.push_back(base + i * t * k);
    call.buffers.push_back(copy);
  } else {
    // bf16 tiers read the rows in place; the last partial tile's rows are copied, zero padded (tile
    // loads read whole tiles).
    if (rows.stride(1) != 1 || (m > 1 && rows.stride(0) < k)) rows = rows.contiguous();
    a.lda = m > 1 ? rows.stride(0) : k;
    const auto* base = reinterpret_cast<const bf16_bits*>(rows.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < tiles; ++i) a.tiles.push_back(base + i * t * a.lda);
    if (m % t != 0) {
      at::Tensor tail = at::zeros({t * a.lda}, rows.options());
      const int64_t first = (tiles - 1) * t;
      tail.view({t, a.lda}).narrow(0, 0, m - first).narrow(1, 0, k).copy_(rows.narrow(0, first, m - first));
      a.tiles.back() = tail.data_ptr<at::BFloat16>();
      call.buffers.push_back(tail);
    }
  }
  call.out_rows.resize(tiles * t);
  for (int64_t r = 0; r < tiles * t; ++r) call.out_rows[r] = r < m ? r * n : -1;
  run(call, weight, out, residual);
}

void check_linear(const at::Tensor& x, const PackedGemmWeight& weight, const char* what) {
  check_input(x, weight, what);
  if (weight.kernel != 1 || x.dim() < 1 || x.size(-1) != weight.depth())
    throw ArgumentError(std::string(what) + ": input " + shape_of(x) + " does not fit a [" +
                        std::to_string(weight.out_features) + ", " + std::to_string(weight.depth()) +
                        "] weight");
}

// A 3x3 convolution as an implicit GEMM. The input is copied once into zero-padded NHWC planes (in
// the tier's operand dtype) laid out so that every tap of the kernel reads the GEMM's rows at a
// constant shift:
//  - stride 1: one padded plane per image; GEMM rows of an image are its padded-width rows y in
//    [0, H) (x in [0, W + 2), the last 2 columns computed and dropped); tap (ky, kx) is the shift
//    ky * padded_width + kx.
//  - stride 2: the padded image split by row and column parity into 4 planes (py, px) of
//    ceil(padded / 2) pixels a side; output pixel (y, x) reads padded pixel (2y + ky, 2x + kx),
//    i.e. plane (ky % 2, kx % 2) at (y + ky / 2, x + kx / 2): GEMM rows run over plane-width rows
//    and each tap is again a constant shift.
// Slack after the last image covers the reads of the last tile past its image.
struct ConvLayout {
  int64_t stride = 1, pad_begin = 1, pad_end = 1;
  bool upsample = false;
};

at::Tensor conv3x3(const at::Tensor& input /* NHWC-contiguous (channels-last) */,
                   const PackedGemmWeight& weight, const at::Tensor& residual, const ConvLayout& layout,
                   int64_t out_h, int64_t out_w) {
  const int64_t n = weight.out_features, channels = weight.in_channels, batch = input.size(0);
  const int64_t source_h = input.size(2), source_w = input.size(3);
  const int64_t in_h = source_h * (layout.upsample ? 2 : 1), in_w = source_w * (layout.upsample ? 2 : 1);
  const int64_t padded_h = in_h + layout.pad_begin + layout.pad_end;
  const int64_t padded_w = in_w + layout.pad_begin + layout.pad_end;
  const bool strided = layout.stride == 2;
  const int64_t plane_h = strided ? (padded_h + 1) / 2 : padded_h;
  const int64_t plane_w = strided ? (padded_w + 1) / 2 : padded_w;
  const int64_t planes = strided ? 4 : 1, plane_pixels = plane_h * plane_w,
                image_pixels = planes * plane_pixels;
  // Output rows that are whole tiles of the tier's small micro-kernel: tiles start at each output
  // row and no padding column is computed (8x8 images otherwise compute 10 columns for 8).
  const gemm::VectorKernels* vector =
      weight.tier == CpuTier::amx ? nullptr : gemm::vector_kernels(weight.tier);
  const bool aligned = vector && vector->small_tile_rows > 0 && out_w % vector->small_tile_rows == 0;
  const int64_t t = aligned ? vector->small_tile_rows : tile_rows_of(weight.tier);
  const int64_t image_rows = out_h * plane_w,
                image_tiles = aligned ? out_h * (out_w / t) : (image_rows + t - 1) / t;
  const int64_t slack = t + 4;

  at::Tensor out =
      at::empty({batch, n, out_h, out_w}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  Call call;
  const auto dtype = float_operands_of(weight.tier) ? at::kFloat : at::kBFloat16;
  at::Tensor padded = at::zeros({batch * image_pixels + slack, channels}, input.options().dtype(dtype));
  const at::Tensor source = input.permute({0, 2, 3, 1});  // [B, H, W, C] view
  const at::Tensor images = padded.narrow(0, 0, batch * image_pixels);
  if (!strided) {
    at::Tensor interior = images.view({batch, padded_h, padded_w, channels})
                              .narrow(1, layout.pad_begin, in_h)
                              .narrow(2, layout.pad_begin, in_w);
    if (layout.upsample)  // each source pixel written to a 2x2 block: broadcast over the inner 2s
      interior.view({batch, source_h, 2, source_w, 2, channels})
          .copy_(source.view({batch, source_h, 1, source_w, 1, channels}));
    else
      interior.copy_(source);
  } else {
    const at::Tensor split = images.view({batch, 2, 2, plane_h, plane_w, channels});
    for (int64_t py = 0; py < 2; ++py)
      for (int64_t px = 0; px < 2; ++px) {
        // Source rows sy land on padded row sy + pad_begin = 2 y' + py.
        const int64_t sy0 = ((py - layout.pad_begin) % 2 + 2) % 2,
                      sx0 = ((px - layout.pad_begin) % 2 + 2) % 2;
        if (sy0 >= in_h || sx0 >= in_w) continue;
        const int64_t rows = (in_h - sy0 + 1) / 2, cols = (in_w - sx0 + 1) / 2;
        split.select(1, py)
            .select(1, px)
            .narrow(1, (sy0 + layout.pad_begin) / 2, rows)
            .narrow(2, (sx0 + layout.pad_begin) / 2, cols)
            .copy_(source.slice(1, sy0, in_h, 2).slice(2, sx0, in_w, 2));
      }
  }
  call.buffers.push_back(padded);

  gemm::RowTiles& a = call.a;
  a.tile_rows = t;
  a.lda = channels;
  for (int64_t ky = 0; ky < 3; ++ky)
    for (int64_t kx = 0; kx < 3; ++kx)
      a.tap_offset.push_back((strided ? ((ky % 2) * 2 + kx % 2) * plane_pixels + (ky / 2) * plane_w + kx / 2
                                      : ky * padded_w + kx) *
                             channels);
  const int64_t element = dtype == at::kFloat ? 4 : 2;
  const char* base = static_cast<const char*>(padded.data_ptr());
  call.out_rows.resize(batch * image_tiles * t);
  call.small_tiles = aligned;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < image_tiles; ++i) {
      if (aligned) {
        const int64_t y = i / (out_w / t), x0 = (i % (out_w / t)) * t;
        a.tiles.push_back(base + (b * image_pixels + y * plane_w + x0) * channels * element);
        for (int64_t r = 0; r < t; ++r)
          call.out_rows[(b * image_tiles + i) * t + r] = ((b * out_h + y) * out_w + x0 + r) * n;
        continue;
      }
      a.tiles.push_back(base + (b * image_pixels + i * t) * channels * element);
      for (int64_t r = 0; r < t; ++r) {
        const int64_t local = i * t + r, y = local / plane_w, col = local % plane_w;
        call.out_rows[(b * image_tiles + i) * t + r] =
            local < image_rows && col < out_w ? ((b * out_h + y) * out_w + col) * n : -1;
      }
    }
  run(call, weight, out, residual);
  return out;
}

void check_conv(const at::Tensor& x, const PackedGemmWeight& weight, const char* what) {
  check_input(x, weight, what);
  if (weight.geglu) throw ArgumentError(std::string(what) + ": a GEGLU projection is not a convolution");
  if (x.dim() != 4 || x.size(1) != weight.in_channels)
    throw ArgumentError(std::string(what) + ": input " + shape_of(x) + " does not have " +
                        std::to_string(weight.in_channels) + " channels");
}

bool wants_nchw(const at::Tensor& x) {
  return x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

at::Tensor packed_linear(const at::Tensor& x, const PackedGemmWeight& weight, const at::Tensor& residual) {
  check_linear(x, weight, "packed_linear");
  if (weight.geglu && residual.defined())
    throw ArgumentError("packed_linear: a GEGLU projection takes no residual");
  const int64_t n = weight.output_width(), m = x.numel() / weight.depth();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  at::Tensor out = at::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor res = checked_residual(residual.defined() ? residual.reshape({-1, n}) : residual, {m, n},
                                          at::MemoryFormat::Contiguous, "packed_linear");
  linear_rows(x, weight, res, out);
  return out.view(out_sizes);
}

void packed_linear_into(const at::Tensor& x, const PackedGemmWeight& weight, at::Tensor& accumulator) {
  check_linear(x, weight, "packed_linear_into");
  if (weight.geglu) throw ArgumentError("packed_linear_into: not for a GEGLU projection");
  const int64_t n = weight.out_features, m = x.numel() / weight.depth();
  if (!accumulator.defined() || accumulator.scalar_type() != at::kBFloat16 || !accumulator.is_contiguous() ||
      accumulator.numel() != m * n || accumulator.size(-1) != n)
    throw ArgumentError("packed_linear_into: accumulator must be a contiguous bfloat16 tensor of " +
                        std::to_string(m) + " rows of " + std::to_string(n) + ", got " +
                        (accumulator.defined() ? shape_of(accumulator) : std::string("an undefined tensor")));
  at::Tensor rows = accumulator.view({m, n});
  linear_rows(x, weight, rows, rows);
}

at::Tensor packed_conv2d(const at::Tensor& x, const PackedGemmWeight& weight, const at::Tensor& residual,
                         bool upsample_2x) {
  check_conv(x, weight, "packed_conv2d");
  const int64_t n = weight.out_features, channels = x.size(1);
  const bool nchw_out = wants_nchw(x);
  at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (upsample_2x && weight.kernel == 1) {
    input = at::upsample_nearest2d(input, {2 * x.size(2), 2 * x.size(3)});
    upsample_2x = false;
  }
  const int64_t batch = x.size(0), height = input.size(2) * (upsample_2x ? 2 : 1),
                width = input.size(3) * (upsample_2x ? 2 : 1);
  const at::Tensor res =
      checked_residual(residual, {batch, n, height, width}, at::MemoryFormat::ChannelsLast, "packed_conv2d");
  if (weight.kernel == 1) {
    // A 1x1 convolution is a product over the NHWC pixel rows.
    const at::Tensor rows = input.permute({0, 2, 3, 1}).reshape({-1, channels});
    const at::Tensor y =
        packed_linear(rows, weight, res.defined() ? res.permute({0, 2, 3, 1}).reshape({-1, n}) : res);
    const at::Tensor out = y.view({batch, height, width, n}).permute({0, 3, 1, 2});
    return nchw_out ? out.contiguous() : out;
  }
  ConvLayout layout;
  layout.upsample = upsample_2x;
  const at::Tensor out = conv3x3(input, weight, res, layout, height, width);
  return nchw_out ? out.contiguous() : out;
}

at::Tensor packed_conv2d_stride2(const at::Tensor& x, const PackedGemmWeight& weight, int64_t pad_begin,
                                 int64_t pad_end) {
  check_conv(x, weight, "packed_conv2d_stride2");
  if (weight.kernel != 3 || pad_begin < 0 || pad_begin > 1 || pad_end < 0 || pad_end > 1)
    throw ArgumentError("packed_conv2d_stride2: needs a 3x3 weight and paddings of 0 or 1, got kernel " +
                        std::to_string(weight.kernel) + ", padding (" + std::to_string(pad_begin) + ", " +
                        std::to_string(pad_end) + ")");
  const int64_t padded_h = x.size(2) + pad_begin + pad_end, padded_w = x.size(3) + pad_begin + pad_end;
  if (padded_h < 3 || padded_w < 3)
    throw ArgumentError("packed_conv2d_stride2: input " + shape_of(x) + " is smaller than the 3x3 kernel");
  ConvLayout layout;
  layout.stride = 2;
  layout.pad_begin = pad_begin;
  layout.pad_end = pad_end;
  const at::Tensor out = conv3x3(x.contiguous(at::MemoryFormat::ChannelsLast), weight, at::Tensor(), layout,
                                 (padded_h - 3) / 2 + 1, (padded_w - 3) / 2 + 1);
  return wants_nchw(x) ? out.contiguous() : out;
}

}  // namespace voken::core
