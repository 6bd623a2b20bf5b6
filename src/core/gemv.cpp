#include "core/gemv.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/parallel.h"
#include "core/work_ranges.h"
#include "voken/error.h"

#ifdef VOKEN_X86_KERNELS
#include <immintrin.h>
#endif

// GCC 12 reports its own _mm512_setzero_ps/_mm512_reduce_add_ps as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace voken::core {
namespace {

struct GemvTask {
  const uint16_t* w;
  float* y;
  int64_t out;
  int64_t first_chunk;
  int64_t rows_per_chunk;
};

#ifdef VOKEN_X86_KERNELS
// 16 bf16 values -> 16 float32 (bf16 is the top half of a float32: widen and shift).
VOKEN_TARGET_AVX512 inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
VOKEN_TARGET_AVX512 inline __m512 load_bf16_tail(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// y[m, j] = sum_k x[m, k] * W[j, k] for output rows [row_begin, row_end): R weight rows at a time
// against all M input rows, so every weight byte is read once and each loaded x vector serves R
// rows; accumulates in float32 in 16-wide lanes, reduced at the end. The R rows are R streams in
// flight (more DRAM requests outstanding than one sequential row keeps; measured faster), each
// with its line kPrefetchBytes ahead requested explicitly.
template <int M, int R>
VOKEN_TARGET_AVX512 void gemv_rows(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
                                   int64_t row_begin, int64_t row_end) {
  constexpr int64_t kPrefetchBytes = 512;
  const int64_t full = in / 32 * 32;
  int64_t j = row_begin;
  for (; j + R <= row_end; j += R) {
    __m512 acc[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + r) * in + k) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        __m512 xv[M];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * in + k + 16 * half);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 wv = load_bf16(w + (j + r) * in + k + 16 * half);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
    }
    for (int64_t k = full; k < in; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>(in - k >= 16 ? 0xFFFF : (1u << (in - k)) - 1u);
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * in + k);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load_bf16_tail(w + (j + r) * in + k, mask);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * out + j + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
  if (j < row_end) gemv_rows<M, 1>(x, w, y, in, out, j, row_end);
}

// All tasks' rows against M rows of x in one parallel region: the chunks are numbered across the
// tasks in order, so each thread's share is one run through consecutive weights.
template <int M>
VOKEN_TARGET_AVX512 void gemv_many(const float* x, const std::vector<GemvTask>& tasks, int64_t in,
                                   int64_t chunks) {
  constexpr int R = M >= 8 ? 1 : 8 / M;  // R * M accumulators: 8 independent FMA chains
  const int64_t threads = std::min<int64_t>(parallel_threads(), chunks);
  WorkRanges ranges(chunks, threads);
  auto work = [&](int64_t t) {
    size_t task = 0;
    for (int64_t c = ranges.next(t); c >= 0; c = ranges.next(t)) {
      task = 0;
      while (task + 1 < tasks.size() && c >= tasks[task + 1].first_chunk) ++task;
      const GemvTask& g = tasks[task];
      const int64_t begin = (c - g.first_chunk) * g.rows_per_chunk;
      gemv_rows<M, R>(x, g.w, g.y, in, g.out, begin, std::min(g.out, begin + g.rows_per_chunk));
    }
  };
  if (threads <= 1)
    work(0);
  else
    parallel_items(threads, work);
}

#endif  // VOKEN_X86_KERNELS

}  // namespace

bool gemv_supported(CpuTier tier) { return tier >= CpuTier::avx512 && tier <= cpu_tier(); }

namespace {

void check_arguments(const at::Tensor& x, const std::vector<at::Tensor>& weights, CpuTier tier) {
  if (!gemv_supported(tier))
    throw ArgumentError(std::string("gemv_bf16: no kernel for CPU tier ") + tier_name(tier) +
                        " (this process runs at " + tier_name(cpu_tier()) + ")");
  if (x.dim() != 2 || x.scalar_type() != at::kFloat || !x.is_contiguous() || !x.device().is_cpu())
    throw ArgumentError("gemv_bf16: x must be a contiguous 2-D float32 CPU tensor");
  for (const auto& weight : weights) {
    if (weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() ||
        !weight.device().is_cpu())
      throw ArgumentError("gemv_bf16: weight must be a contiguous 2-D bfloat16 CPU tensor");
    if (x.size(1) != weight.size(1))
      throw ArgumentError("gemv_bf16: x has " + std::to_string(x.size(1)) + " columns, weight expects " +
                          std::to_string(weight.size(1)));
  }
}

}  // namespace

std::vector<at::Tensor> gemv_bf16_many(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                       CpuTier tier) {
  check_arguments(x, weights, tier);
  const int64_t rows = x.size(0);
  const int64_t in = x.size(1);
  std::vector<at::Tensor> ys;
  for (const auto& weight : weights) ys.push_back(at::empty({rows, weight.size(0)}, x.options()));
  if (rows == 0 || in == 0) {
    for (auto& y : ys) y.zero_();
    return ys;
  }
  for (int64_t m0 = 0; m0 < rows; m0 += kGemvMaxRows) {
    const int64_t chunk = std::min(kGemvMaxRows, rows - m0);
    const float* xp = x.data_ptr<float>() + m0 * in;
    // Chunks of ~64 KB of weights (whole rows, a multiple of 8 of them), numbered across all the
    // weights in order.
    const int64_t rows_per_chunk = std::max<int64_t>(8, 65536 / (2 * in) / 8 * 8);
    std::vector<GemvTask> tasks;
    int64_t chunks = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t out = weights[i].size(0);
      if (out == 0) continue;
      tasks.push_back({reinterpret_cast<const uint16_t*>(weights[i].data_ptr<at::BFloat16>()),
                       ys[i].data_ptr<float>() + m0 * out, out, chunks, rows_per_chunk});
      chunks += (out + rows_per_chunk - 1) / rows_per_chunk;
    }
    if (chunks == 0) continue;
#ifdef VOKEN_X86_KERNELS
    switch (chunk) {
      case 1:
        gemv_many<1>(xp, tasks, in, chunks);
        break;
      case 2:
        gemv_many<2>(xp, tasks, in, chunks);
        break;
      case 3:
        gemv_many<3>(xp, tasks, in, chunks);
        break;
      case 4:
        gemv_many<4>(xp, tasks, in, chunks);
        break;
      case 5:
        gemv_many<5>(xp, tasks, in, chunks);
        break;
      case 6:
        gemv_many<6>(xp, tasks, in, chunks);
        break;
      case 7:
        gemv_many<7>(xp, tasks, in, chunks);
        break;
      default:
        gemv_many<8>(xp, tasks, in, chunks);
        break;
    }
#endif
  }
  return ys;
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, CpuTier tier) {
  return gemv_bf16_many(x, {weight}, tier).front();
}

}  // namespace voken::core
