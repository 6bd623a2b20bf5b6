#include "core/gemv.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/parallel.h"
#include "core/simd_avx2.h"
#include "core/simd_avx512.h"
#include "core/work_ranges.h"
#include "voken/error.h"

// GCC 12 reports its own _mm512_setzero_ps/_mm512_reduce_add_ps as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace voken::core {
namespace {

// y[m * out + j] = sum_k x[m * in + k] * W[j * in + k] for output rows [row_begin, row_end) and
// every row m of x (the row count is the kernel's template argument M).
using RowsKernel = void (*)(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
                            int64_t row_begin, int64_t row_end);

// Every kernel below streams R weight rows at a time against all M rows of x, so every weight
// byte is read once and each loaded x vector serves R rows. The R rows are R streams in flight:
// more DRAM requests outstanding than one sequential row keeps (on the Sapphire Rapids here, one
// row at a time with 4 accumulators, as llama.cpp's dot products run, read at ~65-70% of the rate
// of 8 rows in flight; 4 rows were as fast as 8). All accumulate in float32 lanes (lane l sums the
// products at k = l mod lanes), reduced at the end of a row.

// ---- generic: plain C++ that GCC vectorizes (SSE2 on x86-64, NEON on ARM64) ---------------------

// Accumulators per block of R rows: R * M arrays of 16 floats. R * M = 4 keeps them in ARM64's 32 vector
// registers (4 registers each) with room for the operands.
constexpr int generic_rows_in_flight(int m) { return m >= 4 ? 1 : 4 / m; }

template <int M, int R>
void gemv_rows_generic(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
                       int64_t row_begin, int64_t row_end) {
  constexpr int kLanes = 16;
  const int64_t full = in / kLanes * kLanes;
  int64_t j = row_begin;
  for (; j + R <= row_end; j += R) {
    float acc[R][M][kLanes] = {};
    for (int64_t k = 0; k < full; k += kLanes) {
      for (int r = 0; r < R; ++r) {
        const uint16_t* wr = w + (j + r) * in + k;
        float wv[kLanes];
        for (int l = 0; l < kLanes; ++l) wv[l] = bf16_bits_to_float(wr[l]);
        for (int m = 0; m < M; ++m)
          for (int l = 0; l < kLanes; ++l) acc[r][m][l] += wv[l] * x[m * in + k + l];
      }
    }
    if (full < in) {
      // The last in - full values through zero-padded copies: constant indices into acc keep it
      // in registers in the loop above.
      float xt[M][kLanes] = {};
      for (int m = 0; m < M; ++m)
        for (int64_t k = full; k < in; ++k) xt[m][k - full] = x[m * in + k];
      for (int r = 0; r < R; ++r) {
        float wv[kLanes] = {};
        for (int64_t k = full; k < in; ++k) wv[k - full] = bf16_bits_to_float(w[(j + r) * in + k]);
        for (int m = 0; m < M; ++m)
          for (int l = 0; l < kLanes; ++l) acc[r][m][l] += wv[l] * xt[m][l];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) {
        // Pairwise, as the vector kernels reduce their lanes.
        float s[kLanes];
        for (int l = 0; l < kLanes; ++l) s[l] = acc[r][m][l];
        for (int width = kLanes / 2; width >= 1; width /= 2)
          for (int l = 0; l < width; ++l) s[l] += s[l + width];
        y[m * out + j + r] = s[0];
      }
  }
  if (j < row_end) gemv_rows_generic<M, 1>(x, w, y, in, out, j, row_end);
}

#ifdef VOKEN_X86_KERNELS

// Software prefetch distance per weight row, in bytes ahead of the row's current read. Here no
// prefetch read 10-20% slower; 1024 and 2048 bytes were no faster than 512.
constexpr int64_t kPrefetchBytes = 512;

// R * M accumulators: 8 independent FMA chains (and 8 + 2 of the 16 ymm registers on AVX2).
constexpr int rows_in_flight(int m) { return m >= 8 ? 1 : 8 / m; }

// ---- avx2: 8 lanes; 32 values of k per step (a 64-byte line of each weight row) -------------

template <int M, int R>
VOKEN_TARGET_AVX2 void gemv_rows_avx2(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
                                      int64_t row_begin, int64_t row_end) {
  const int64_t full = in / 32 * 32;
  int64_t j = row_begin;
  for (; j + R <= row_end; j += R) {
    __m256 acc[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + r) * in + k) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int quarter = 0; quarter < 4; ++quarter) {
        __m256 xv[M];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * in + k + 8 * quarter);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 wv = simd8::load8(w + (j + r) * in + k + 8 * quarter);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
    }
    for (int64_t k = full; k < in; k += 8) {
      const int64_t n = in - k;  // the partial loads read only [k, in)
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = simd8::load8(x + m * in + k, n);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = simd8::load8(w + (j + r) * in + k, n);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * out + j + r] = simd8::reduce_add(acc[r][m]);
  }
  if (j < row_end) gemv_rows_avx2<M, 1>(x, w, y, in, out, j, row_end);
}

// ---- avx512: 16 lanes; 32 values of k per step --------------------------------------------------

template <int M, int R>
VOKEN_TARGET_AVX512 void gemv_rows_avx512(const float* x, const uint16_t* w, float* y, int64_t in,
                                          int64_t out, int64_t row_begin, int64_t row_end) {
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
          const __m512 wv = simd::load16(w + (j + r) * in + k + 16 * half);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
    }
    for (int64_t k = full; k < in; k += 16) {
      const __mmask16 mask = simd::tail_mask(in - k);
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = simd::load16(x + m * in + k, mask);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = simd::load16(w + (j + r) * in + k, mask);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * out + j + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
  if (j < row_end) gemv_rows_avx512<M, 1>(x, w, y, in, out, j, row_end);
}

#endif  // VOKEN_X86_KERNELS

// The kernel for M rows of x at `tier` (avx512_bf16 and amx use the AVX-512 one: the weights are
// widened to float32 against float32 activations, so vdpbf16ps and the tiles have nothing to do).
template <int M>
RowsKernel rows_kernel(CpuTier tier) {
#ifdef VOKEN_X86_KERNELS
  if (tier >= CpuTier::avx512) return gemv_rows_avx512<M, rows_in_flight(M)>;
  if (tier >= CpuTier::avx2) return gemv_rows_avx2<M, rows_in_flight(M)>;
#endif
  return gemv_rows_generic<M, generic_rows_in_flight(M)>;
}

RowsKernel rows_kernel(int64_t rows, CpuTier tier) {
  switch (rows) {
    case 1:
      return rows_kernel<1>(tier);
    case 2:
      return rows_kernel<2>(tier);
    case 3:
      return rows_kernel<3>(tier);
    case 4:
      return rows_kernel<4>(tier);
    case 5:
      return rows_kernel<5>(tier);
    case 6:
      return rows_kernel<6>(tier);
    case 7:
      return rows_kernel<7>(tier);
    default:
      return rows_kernel<8>(tier);
  }
}

struct GemvTask {
  const uint16_t* w;
  float* y;
  int64_t out;
  int64_t first_chunk;
  int64_t rows_per_chunk;
};

// All tasks' rows in one parallel region: the chunks are numbered across the tasks in order, so
// each thread's share is one run through consecutive weights.
void gemv_tasks(RowsKernel kernel, const float* x, const std::vector<GemvTask>& tasks, int64_t in,
                int64_t chunks) {
  const int64_t threads = std::min<int64_t>(parallel_threads(), chunks);
  WorkRanges ranges(chunks, threads);
  auto work = [&](int64_t t) {
    size_t task = 0;
    for (int64_t c = ranges.next(t); c >= 0; c = ranges.next(t)) {
      task = 0;
      while (task + 1 < tasks.size() && c >= tasks[task + 1].first_chunk) ++task;
      const GemvTask& g = tasks[task];
      const int64_t begin = (c - g.first_chunk) * g.rows_per_chunk;
      kernel(x, g.w, g.y, in, g.out, begin, std::min(g.out, begin + g.rows_per_chunk));
    }
  };
  if (threads <= 1)
    work(0);
  else
    parallel_items(threads, work);
}

void check_arguments(const at::Tensor& x, const std::vector<at::Tensor>& weights, CpuTier tier) {
  if (!gemv_supported(tier))
    throw ArgumentError(std::string("gemv_bf16: CPU tier ") + tier_name(tier) +
                        " is above this process's tier " + tier_name(cpu_tier()));
  if (!x.defined() || x.dim() != 2 || x.scalar_type() != at::kFloat || !x.is_contiguous() ||
      !x.device().is_cpu())
    throw ArgumentError("gemv_bf16: x must be a contiguous 2-D float32 CPU tensor");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& weight = weights[i];
    if (!weight.defined() || weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 ||
        !weight.is_contiguous() || !weight.device().is_cpu())
      throw ArgumentError("gemv_bf16: weight " + std::to_string(i) +
                          " must be a contiguous 2-D bfloat16 CPU tensor");
    if (x.size(1) != weight.size(1))
      throw ArgumentError("gemv_bf16: x has " + std::to_string(x.size(1)) + " columns, weight " +
                          std::to_string(i) + " expects " + std::to_string(weight.size(1)));
  }
}

}  // namespace

bool gemv_supported(CpuTier tier) { return tier <= cpu_tier(); }

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
  // Chunks of ~64 KB of weights (whole rows, a multiple of 8 of them), numbered across all the
  // weights in order.
  const int64_t rows_per_chunk = std::max<int64_t>(8, 65536 / (2 * in) / 8 * 8);
  for (int64_t m0 = 0; m0 < rows; m0 += kGemvMaxRows) {
    const int64_t chunk = std::min(kGemvMaxRows, rows - m0);
    std::vector<GemvTask> tasks;
    int64_t chunks = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      const int64_t out = weights[i].size(0);
      if (out == 0) continue;
      tasks.push_back({reinterpret_cast<const uint16_t*>(weights[i].data_ptr<at::BFloat16>()),
                       ys[i].data_ptr<float>() + m0 * out, out, chunks, rows_per_chunk});
      chunks += (out + rows_per_chunk - 1) / rows_per_chunk;
    }
    if (chunks > 0) gemv_tasks(rows_kernel(chunk, tier), x.data_ptr<float>() + m0 * in, tasks, in, chunks);
  }
  return ys;
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& weight, CpuTier tier) {
  return gemv_bf16_many(x, {weight}, tier).front();
}

}  // namespace voken::core
