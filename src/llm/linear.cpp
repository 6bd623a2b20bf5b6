#include "llm/linear.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/amx_gemm.h"
#include "core/parallel.h"
#include "core/work_ranges.h"
#include "voken/error.h"

// GCC 12 reports its own _mm512_setzero_ps/_mm512_reduce_add_ps as "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace voken::llm {
namespace {

#define VOKEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 bf16 values -> 16 float32 (bf16 is the top half of a float32: widen and shift).
VOKEN_AVX512 inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
VOKEN_AVX512 inline __m512 load_bf16_tail(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// y[m, j] = sum_k x[m, k] * W[j, k] for output rows [row_begin, row_end): R weight rows at a time
// against all M input rows, so every weight byte is read once and each loaded x vector serves R
// rows; accumulates in float32 in 16-wide lanes, reduced at the end. The R rows are R streams in
// flight (more DRAM requests outstanding than one sequential row keeps; measured faster), each
// with its line kPrefetchBytes ahead requested explicitly.
template <int M, int R>
VOKEN_AVX512 void gemv_rows(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
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

struct GemvTask {
  const uint16_t* w;
  float* y;
  int64_t out;
  int64_t first_chunk;
  int64_t rows_per_chunk;
};

// All tasks' rows against M rows of x in one parallel region: the chunks are numbered across the
// tasks in order, so each thread's share is one run through consecutive weights.
template <int M>
VOKEN_AVX512 void gemv_many(const float* x, const std::vector<GemvTask>& tasks, int64_t in, int64_t chunks) {
  constexpr int R = M >= 8 ? 1 : 8 / M;  // R * M accumulators: 8 independent FMA chains
  const int64_t threads = std::min<int64_t>(core::parallel_threads(), chunks);
  core::WorkRanges ranges(chunks, threads);
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
    core::parallel_items(threads, work);
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

}  // namespace

bool has_streaming_bf16_kernel() {
  static const bool supported = cpu_has_avx512();  // a CPU property, computed once
  return supported;
}

namespace {

void check_streaming_arguments(const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  if (!has_streaming_bf16_kernel())
    throw ArgumentError("streaming_bf16_linear: this CPU lacks AVX-512 F/BW/VL");
  if (x.dim() != 2 || x.scalar_type() != at::kFloat || !x.is_contiguous() || !x.device().is_cpu())
    throw ArgumentError("streaming_bf16_linear: x must be a contiguous 2-D float32 CPU tensor");
  for (const auto& weight : weights) {
    if (weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() ||
        !weight.device().is_cpu())
      throw ArgumentError("streaming_bf16_linear: weight must be a contiguous 2-D bfloat16 CPU tensor");
    if (x.size(1) != weight.size(1))
      throw ArgumentError("streaming_bf16_linear: x has " + std::to_string(x.size(1)) +
                          " columns, weight expects " + std::to_string(weight.size(1)));
  }
}

}  // namespace

std::vector<at::Tensor> streaming_bf16_linear_many(const at::Tensor& x,
                                                   const std::vector<at::Tensor>& weights) {
  check_streaming_arguments(x, weights);
  const int64_t rows = x.size(0);
  const int64_t in = x.size(1);
  std::vector<at::Tensor> ys;
  for (const auto& weight : weights) ys.push_back(at::empty({rows, weight.size(0)}, x.options()));
  if (rows == 0 || in == 0) {
    for (auto& y : ys) y.zero_();
    return ys;
  }
  for (int64_t m0 = 0; m0 < rows; m0 += kStreamingKernelMaxRows) {
    const int64_t chunk = std::min(kStreamingKernelMaxRows, rows - m0);
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
  }
  return ys;
}

at::Tensor streaming_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  return streaming_bf16_linear_many(x, {weight}).front();
}

std::vector<at::Tensor> dense_many(const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  bool all_bf16 = !weights.empty();
  for (const auto& w : weights) all_bf16 = all_bf16 && w.scalar_type() == at::kBFloat16 && w.dim() == 2;
  std::vector<at::Tensor> ys;
  if (!all_bf16 || !x.device().is_cpu()) {
    for (const auto& w : weights) ys.push_back(dense(x, w));
    return ys;
  }
  const int64_t in = weights.front().size(1);
  const at::Tensor rows = x.reshape({-1, in});
  auto out_shape = x.sizes().vec();
  bool contiguous = true;
  for (const auto& w : weights) contiguous = contiguous && w.is_contiguous() && w.size(1) == in;
  if (rows.size(0) <= kStreamingKernelMaxRows && contiguous && has_streaming_bf16_kernel()) {
    ys = streaming_bf16_linear_many(rows.to(at::kFloat).contiguous(), weights);
  } else if (rows.size(0) > kStreamingKernelMaxRows && core::has_amx_bf16()) {
    std::vector<core::AmxLinearJob> jobs;
    for (const auto& w : weights) jobs.push_back({w, {}, core::Activation::None, {}});
    ys = core::amx_linear_many(rows, jobs, at::kFloat);
  } else {
    for (const auto& w : weights) ys.push_back(dense(x, w));
    return ys;
  }
  for (size_t i = 0; i < ys.size(); ++i) {
    out_shape.back() = weights[i].size(0);
    ys[i] = ys[i].view(out_shape);
  }
  return ys;
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& weight) {
  if (weight.scalar_type() != at::kBFloat16) return at::linear(x, weight);
  const int64_t in = weight.size(1);
  const at::Tensor rows = x.reshape({-1, in});
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  if (!x.device().is_cpu()) return at::linear(rows.to(at::kBFloat16), weight).to(at::kFloat).view(out_shape);
  if (rows.size(0) <= kStreamingKernelMaxRows && weight.is_contiguous() && has_streaming_bf16_kernel())
    return streaming_bf16_linear(rows.to(at::kFloat).contiguous(), weight).view(out_shape);
  if (rows.size(0) > kStreamingKernelMaxRows && weight.dim() == 2 && weight.stride(1) == 1 &&
      core::has_amx_bf16())
    return core::amx_linear(rows, weight, {}, at::kFloat).view(out_shape);
  return at::linear(rows.to(at::kBFloat16), weight).to(at::kFloat).view(out_shape);
}

}  // namespace voken::llm
