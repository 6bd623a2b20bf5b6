#include "core/packed_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/amx.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"
#include "voken/error.h"

// GCC 12 reports its own AVX-512 intrinsics (_mm512_castsi512_si256, ...) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core {
namespace {

using bf16_bits = uint16_t;

constexpr int64_t kBlockColumns = 32;  // output columns per block: two 16-column tiles
constexpr int64_t kStepDepth = 32;     // reduction depth of one tile product
constexpr int64_t kStepElements = kBlockColumns * kStepDepth;  // packed weights per block and step

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

}  // namespace

bool packed_gemm_supported(int64_t out_features, int64_t in_channels, int64_t kernel) {
  return cpu_tier() == CpuTier::amx && out_features > 0 && in_channels > 0 &&
         out_features % kBlockColumns == 0 && in_channels % kStepDepth == 0 && (kernel == 1 || kernel == 3);
}

std::shared_ptr<const PackedGemmWeight> pack_gemm_weight(const at::Tensor& weight, const at::Tensor& bias) {
  const bool conv = weight.dim() == 4;
  if (!weight.defined() || !(weight.dim() == 2 || (conv && weight.size(2) == weight.size(3))) ||
      !at::isFloatingType(weight.scalar_type()))
    throw ArgumentError("pack_gemm_weight: expected a float [N, K] or [N, C, k, k] weight, got " +
                        (weight.defined() ? shape_of(weight) : std::string("an undefined tensor")));
  auto packed = std::make_shared<PackedGemmWeight>();
  packed->out_features = weight.size(0);
  packed->in_channels = weight.size(1);
  packed->kernel = conv ? weight.size(2) : 1;
  if (!packed_gemm_supported(packed->out_features, packed->in_channels, packed->kernel))
    throw ArgumentError("pack_gemm_weight: weight " + shape_of(weight) +
                        " cannot be packed here (needs AMX-BF16, N and C multiples of 32, kernel 1 or 3)");
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

std::shared_ptr<const PackedGemmWeight> pack_geglu_weight(const at::Tensor& weight, const at::Tensor& bias) {
  if (!weight.defined() || weight.dim() != 2 || weight.size(0) % 32 != 0)
    throw ArgumentError(
        "pack_geglu_weight: expected a [2*inner, K] weight with inner a multiple of 16, got " +
        (weight.defined() ? shape_of(weight) : std::string("an undefined tensor")));
  // Rows reordered so that every 32-column block holds 16 value columns and their 16 gates.
  const int64_t inner = weight.size(0) / 2, k = weight.size(1);
  const auto interleave = [&](const at::Tensor& t, int64_t width) {
    return t.reshape({2, inner / 16, 16, width}).transpose(0, 1).reshape({2 * inner, width});
  };
  auto packed = std::make_shared<PackedGemmWeight>(*pack_gemm_weight(
      interleave(weight, k), bias.defined() ? interleave(bias.reshape({-1, 1}), 1).reshape({-1}) : bias));
  packed->geglu = true;
  return packed;
}

at::Tensor unpack_gemm_weight(const PackedGemmWeight& weight) {
  const int64_t n = weight.out_features, k = weight.depth();
  return weight.data.reshape({n / kBlockColumns, k / kStepDepth, 2, 16, 16, 2})
      .permute({0, 2, 4, 1, 3, 5})
      .reshape({n, k});
}

#ifdef VOKEN_HAVE_AMX
namespace {

// C = A W^T over 16-row tiles of A whose rows need not be contiguous in memory: for a k x k
// convolution each tile is 16 consecutive pixels of the zero-padded NHWC input, and the K range of
// tap (ky, kx) reads the same rows shifted by ky rows and kx pixels (segment_offset).
struct Gemm {
  std::vector<const bf16_bits*> a_tiles;  // per 16-row tile: its first row at tap 0, channel 0
  int64_t lda = 0;                        // elements between consecutive rows of a tile
  std::vector<int64_t> segment_offset;    // per tap: element offset of its columns
  int64_t segment_steps = 0;              // 32-deep steps per tap (in_channels / 32)
  const bf16_bits* b = nullptr;           // packed weights
  int64_t k_steps = 0, n_blocks = 0;
  const float* bias = nullptr;
  std::vector<int64_t> out_rows;  // per row of every tile: element offset of its output row, or -1
  bf16_bits* out = nullptr;
  const bf16_bits* residual = nullptr;  // laid out as `out`
  bool geglu = false;                   // blocks of 16 values and 16 gates -> 16 outputs
};

// How the work is cut: tasks of (tile range, block range), each running the K chunks in order.
struct Plan {
  int64_t chunk_steps = 0;  // K steps per chunk
  struct Task {
    int64_t tile_begin, tile_end, block_begin, block_end;
  };
  std::vector<Task> tasks;
  int64_t max_tiles = 0, max_blocks = 0;
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

Plan make_plan(const Gemm& g) {
  Plan plan;
  // The weight panel of one block and chunk (chunk_steps x 2 KiB) stays in L1 while the tiles of
  // a task stream past it; the accumulators of a task (<= 32 tiles x 8 blocks, 512 KiB) and its A
  // rows for a chunk stay in L2.
  constexpr int64_t kChunkSteps = 16, kMaxTaskTiles = 32, kMaxTaskBlocks = 8;
  plan.chunk_steps = g.k_steps <= 2 * kChunkSteps ? g.k_steps : kChunkSteps;
  const int64_t tiles = static_cast<int64_t>(g.a_tiles.size());
  const int64_t threads = parallel_threads();
  const int64_t tile_groups = (tiles + kMaxTaskTiles - 1) / kMaxTaskTiles;
  int64_t block_groups = (g.n_blocks + kMaxTaskBlocks - 1) / kMaxTaskBlocks;
  // Few tasks (small images, wide layers: bound by reading the weights): enough of them, in a
  // multiple of the thread count, that every thread streams the same share of the weights.
  while (tile_groups * block_groups < 8 * threads && (tile_groups * block_groups) % threads != 0 &&
         block_groups < g.n_blocks)
    ++block_groups;
  const auto tile_ranges = split(tiles, tile_groups, 2);
  const auto block_ranges = split(g.n_blocks, block_groups, 1);
  for (const auto& [t0, t1] : tile_ranges)
    for (const auto& [b0, b1] : block_ranges) {
      plan.tasks.push_back({t0, t1, b0, b1});
      plan.max_tiles = std::max(plan.max_tiles, t1 - t0);
      plan.max_blocks = std::max(plan.max_blocks, b1 - b0);
    }
  return plan;
}

// One block of 16 or 32 rows (one or two A tiles) x 32 columns over K steps [s0, s1): C tiles
// 4-7 start from zero or from `c` (row-major 32 x 32 float32) and are stored back to `c`.
template <bool kTwoTiles>
VOKEN_TARGET_AMX void block_product(const Gemm& g, int64_t tile, int64_t block, int64_t s0, int64_t s1,
                                    float* c, bool accumulate) {
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
  const bf16_bits* a0 = g.a_tiles[tile];
  const bf16_bits* a1 = kTwoTiles ? g.a_tiles[tile + 1] : a0;
  const int64_t lda_bytes = g.lda * static_cast<int64_t>(sizeof(bf16_bits));
  const bf16_bits* b = g.b + (block * g.k_steps + s0) * kStepElements;
  int64_t segment = s0 / g.segment_steps, step_in_segment = s0 % g.segment_steps;
  int64_t offset = g.segment_offset[segment] + step_in_segment * kStepDepth;
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
    if (++step_in_segment == g.segment_steps && s + 1 < s1) {
      step_in_segment = 0;
      offset = g.segment_offset[++segment];
    }
  }
  _tile_stored(4, c, kCStride);
  _tile_stored(5, c + 16, kCStride);
  if (kTwoTiles) {
    _tile_stored(6, c + 16 * kBlockColumns, kCStride);
    _tile_stored(7, c + 16 * kBlockColumns + 16, kCStride);
  }
}

// out = round(c + bias (+ residual)) for the 16 rows of `tile` and the columns of `block`.
VOKEN_TARGET_AMX void store_rows(const Gemm& g, int64_t tile, int64_t block, const float* c) {
  const int64_t n0 = block * kBlockColumns;
  const __m512 bias0 = g.bias ? _mm512_loadu_ps(g.bias + n0) : _mm512_setzero_ps();
  const __m512 bias1 = g.bias ? _mm512_loadu_ps(g.bias + n0 + 16) : _mm512_setzero_ps();
  if (g.geglu) {
    for (int r = 0; r < 16; ++r) {
      const int64_t row = g.out_rows[tile * 16 + r];
      if (row < 0) continue;
      const __m512 value = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns), bias0);
      const __m512 gate = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns + 16), bias1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.out + row + block * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(value, simd::gelu16(gate))));
    }
    return;
  }
  for (int r = 0; r < 16; ++r) {
    const int64_t row = g.out_rows[tile * 16 + r];
    if (row < 0) continue;
    __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns), bias0);
    __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + r * kBlockColumns + 16), bias1);
    if (g.residual) {
      const __m512i res = _mm512_loadu_si512(g.residual + row + n0);
      v0 = _mm512_add_ps(
          v0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(res)), 16)));
      v1 = _mm512_add_ps(v1, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(res, 1)), 16)));
    }
    _mm512_storeu_si512(g.out + row + n0, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
}

VOKEN_TARGET_AMX void run_tasks(const Gemm& g, const Plan& plan, int64_t begin, int64_t end) {
  amx::configure_full_tiles();
  // Accumulators of a task between K chunks (a single block's worth without chunking).
  const bool chunked = plan.chunk_steps < g.k_steps;
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
    for (int64_t s0 = 0; s0 < g.k_steps; s0 += plan.chunk_steps) {
      const int64_t s1 = std::min(g.k_steps, s0 + plan.chunk_steps);
      const bool last = s1 == g.k_steps;
      for (int64_t block = task.block_begin; block < task.block_end; ++block)
        for (int64_t tile = task.tile_begin; tile < task.tile_end; tile += 2) {
          float* c =
              chunked ? acc.get() + (((tile - task.tile_begin) / 2) * blocks + (block - task.block_begin)) *
                                        32 * kBlockColumns
                      : acc.get();
          const bool two = tile + 1 < task.tile_end;
          if (two)
            block_product<true>(g, tile, block, s0, s1, c, s0 > 0);
          else
            block_product<false>(g, tile, block, s0, s1, c, s0 > 0);
          if (last) {
            store_rows(g, tile, block, c);
            if (two) store_rows(g, tile + 1, block, c + 16 * kBlockColumns);
          }
        }
    }
  }
  _tile_release();
}

void run(Gemm& g, const PackedGemmWeight& weight, at::Tensor& out, const at::Tensor& residual) {
  g.b = reinterpret_cast<const bf16_bits*>(weight.data.data_ptr<at::BFloat16>());
  g.k_steps = weight.depth() / kStepDepth;
  g.n_blocks = weight.out_features / kBlockColumns;
  g.segment_steps = weight.in_channels / kStepDepth;
  g.bias = weight.bias.defined() ? weight.bias.data_ptr<float>() : nullptr;
  g.out = reinterpret_cast<bf16_bits*>(out.data_ptr<at::BFloat16>());
  g.residual =
      residual.defined() ? reinterpret_cast<const bf16_bits*>(residual.data_ptr<at::BFloat16>()) : nullptr;
  g.geglu = weight.geglu;
  if (g.a_tiles.empty()) return;
  const Plan plan = make_plan(g);
  parallel_items(static_cast<int64_t>(plan.tasks.size()),
                 [&](int64_t task) { run_tasks(g, plan, task, task + 1); });
}

void check_input(const at::Tensor& x, const char* what) {
  if (cpu_tier() != CpuTier::amx)
    throw ArgumentError(std::string(what) + ": needs the amx CPU tier, this process runs at " +
                        tier_name(cpu_tier()));
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

}  // namespace

namespace {

// out = x W^T + bias (+ residual); out [M, N] contiguous, residual [M, N] contiguous (may be out).
void linear_rows(const at::Tensor& x, const PackedGemmWeight& weight, const at::Tensor& residual,
                 at::Tensor& out) {
  const int64_t k = weight.depth(), n = weight.output_width();
  at::Tensor rows = x.reshape({-1, k});
  const int64_t m = rows.size(0);
  if (rows.stride(1) != 1 || (m > 1 && rows.stride(0) < k)) rows = rows.contiguous();
  Gemm g;
  g.lda = m > 1 ? rows.stride(0) : k;
  const auto* base = reinterpret_cast<const bf16_bits*>(rows.data_ptr<at::BFloat16>());
  const int64_t tiles = (m + 15) / 16;
  at::Tensor tail;  // the last partial tile's rows, zero padded to 16 (tile loads read 16 rows)
  for (int64_t t = 0; t < tiles; ++t) g.a_tiles.push_back(base + t * 16 * g.lda);
  if (m % 16 != 0) {
    tail = at::zeros({16 * g.lda}, rows.options());
    const int64_t first = (tiles - 1) * 16;
    tail.view({16, g.lda}).narrow(0, 0, m - first).narrow(1, 0, k).copy_(rows.narrow(0, first, m - first));
    g.a_tiles.back() = reinterpret_cast<const bf16_bits*>(tail.data_ptr<at::BFloat16>());
  }
  g.segment_offset = {0};
  g.out_rows.resize(tiles * 16);
  for (int64_t r = 0; r < tiles * 16; ++r) g.out_rows[r] = r < m ? r * n : -1;
  run(g, weight, out, residual);
}

void check_linear(const at::Tensor& x, const PackedGemmWeight& weight, const char* what) {
  check_input(x, what);
  if (weight.kernel != 1 || x.dim() < 1 || x.size(-1) != weight.depth())
    throw ArgumentError(std::string(what) + ": input " + shape_of(x) + " does not fit a [" +
                        std::to_string(weight.out_features) + ", " + std::to_string(weight.depth()) +
                        "] weight");
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
  check_input(x, "packed_conv2d");
  if (weight.geglu) throw ArgumentError("packed_conv2d: a GEGLU projection is not a convolution");
  if (x.dim() != 4 || x.size(1) != weight.in_channels)
    throw ArgumentError("packed_conv2d: input " + shape_of(x) + " does not have " +
                        std::to_string(weight.in_channels) + " channels");
  const int64_t n = weight.out_features, kernel = weight.kernel;
  const bool nchw_out = x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (upsample_2x && kernel == 1) {
    input = at::upsample_nearest2d(input, {2 * x.size(2), 2 * x.size(3)});
    upsample_2x = false;
  }
  const int64_t batch = x.size(0), channels = x.size(1), height = input.size(2) * (upsample_2x ? 2 : 1),
                width = input.size(3) * (upsample_2x ? 2 : 1);
  const at::Tensor res =
      checked_residual(residual, {batch, n, height, width}, at::MemoryFormat::ChannelsLast, "packed_conv2d");
  if (kernel == 1) {
    // A 1x1 convolution is a product over the NHWC pixel rows.
    const at::Tensor rows = input.permute({0, 2, 3, 1}).reshape({-1, channels});
    const at::Tensor y =
        packed_linear(rows, weight, res.defined() ? res.permute({0, 2, 3, 1}).reshape({-1, n}) : res);
    const at::Tensor out = y.view({batch, height, width, n}).permute({0, 3, 1, 2});
    return nchw_out ? out.contiguous() : out;
  }
  at::Tensor out =
      at::empty({batch, n, height, width}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return nchw_out ? out.contiguous() : out;
  // Zero-padded NHWC copy (of the 2x nearest-upsampled input when asked: each source pixel is
  // written twice into two rows, and the upsampled tensor never exists). GEMM rows of image b are its
  // padded-width rows y in [0, H) (x in [0, W + k - 1), the last k - 1 columns computed and dropped) so that
  // every tile is 16 consecutive padded pixels and every tap a constant shift; slack past the end covers the
  // last tile's reads.
  const int64_t pad = (kernel - 1) / 2;
  const int64_t padded_h = height + 2 * pad, padded_w = width + 2 * pad;
  const int64_t image_rows = height * padded_w, image_tiles = (image_rows + 15) / 16;
  const int64_t image_pixels = padded_h * padded_w, slack = 16 + kernel;
  at::Tensor padded = at::empty({(batch * image_pixels + slack) * channels}, x.options());
  auto* pp = reinterpret_cast<bf16_bits*>(padded.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const bf16_bits*>(input.data_ptr<at::BFloat16>());
  parallel_range(0, batch * padded_h, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / padded_h, y = row % padded_h - pad;
      bf16_bits* dst = pp + row * padded_w * channels;
      if (y < 0 || y >= height) {
        std::memset(dst, 0, padded_w * channels * sizeof(bf16_bits));
        continue;
      }
      std::memset(dst, 0, pad * channels * sizeof(bf16_bits));
      if (upsample_2x) {
        const int64_t source_width = width / 2;
        const bf16_bits* src = xp + (b * (height / 2) + y / 2) * source_width * channels;
        for (int64_t col = 0; col < source_width; ++col) {
          std::memcpy(dst + (pad + 2 * col) * channels, src + col * channels, channels * sizeof(bf16_bits));
          std::memcpy(dst + (pad + 2 * col + 1) * channels, src + col * channels,
                      channels * sizeof(bf16_bits));
        }
      } else {
        std::memcpy(dst + pad * channels, xp + (b * height + y) * width * channels,
                    width * channels * sizeof(bf16_bits));
      }
      std::memset(dst + (pad + width) * channels, 0, pad * channels * sizeof(bf16_bits));
    }
  });
  std::memset(pp + batch * image_pixels * channels, 0, slack * channels * sizeof(bf16_bits));

  Gemm g;
  g.lda = channels;
  for (int64_t ky = 0; ky < kernel; ++ky)
    for (int64_t kx = 0; kx < kernel; ++kx) g.segment_offset.push_back((ky * padded_w + kx) * channels);
  g.out_rows.resize(batch * image_tiles * 16);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < image_tiles; ++t) {
      g.a_tiles.push_back(pp + (b * image_pixels + t * 16) * channels);
      for (int64_t r = 0; r < 16; ++r) {
        const int64_t local = t * 16 + r, y = local / padded_w, col = local % padded_w;
        g.out_rows[(b * image_tiles + t) * 16 + r] =
            local < image_rows && col < width ? ((b * height + y) * width + col) * n : -1;
      }
    }
  run(g, weight, out, res);
  return nchw_out ? out.contiguous() : out;
}

#else  // no AMX kernel in this build

at::Tensor packed_linear(const at::Tensor&, const PackedGemmWeight&, const at::Tensor&) {
  throw ArgumentError("packed_linear: not built for this compiler/platform");
}
void packed_linear_into(const at::Tensor&, const PackedGemmWeight&, at::Tensor&) {
  throw ArgumentError("packed_linear_into: not built for this compiler/platform");
}
at::Tensor packed_conv2d(const at::Tensor&, const PackedGemmWeight&, const at::Tensor&, bool) {
  throw ArgumentError("packed_conv2d: not built for this compiler/platform");
}

#endif

}  // namespace voken::core
