#include "llm/linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <string>

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
// rows. Accumulates in float32 in 16-wide lanes, reduced at the end.
template <int M, int R>
VOKEN_AVX512 void gemv_rows(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out,
                            int64_t row_begin, int64_t row_end) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << (in - full)) - 1u);
  int64_t j = row_begin;
  for (; j + R <= row_end; j += R) {
    __m512 acc[R][M];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 16) {
      __m512 xv[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * in + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load_bf16(w + (j + r) * in + k);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    if (full < in) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(tail_mask, x + m * in + full);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load_bf16_tail(w + (j + r) * in + full, tail_mask);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * out + j + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
  if (j < row_end) gemv_rows<M, 1>(x, w, y, in, out, j, row_end);
}

template <int M>
VOKEN_AVX512 void gemv(const float* x, const uint16_t* w, float* y, int64_t in, int64_t out) {
  // R * M accumulators stay in registers (32 zmm): 8 independent FMA chains for one row of x.
  constexpr int R = M >= 8 ? 1 : 8 / M;
  // Work is handed out in chunks of ~64 KB of weights from a shared counter rather than split
  // statically: on a shared machine a descheduled thread then leaves its share to the running
  // one instead of the whole step waiting for it (each chunk is still read sequentially).
  const int64_t rows_per_chunk = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, in) / R) * R;
  const int64_t chunks = (out + rows_per_chunk - 1) / rows_per_chunk;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      gemv_rows<M, R>(x, w, y, in, out, c * rows_per_chunk, std::min(out, (c + 1) * rows_per_chunk));
  });
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

at::Tensor streaming_bf16_linear(const at::Tensor& x, const at::Tensor& weight) {
  if (!has_streaming_bf16_kernel())
    throw ArgumentError("streaming_bf16_linear: this CPU lacks AVX-512 F/BW/VL");
  if (x.dim() != 2 || x.scalar_type() != at::kFloat || !x.is_contiguous() || !x.device().is_cpu())
    throw ArgumentError("streaming_bf16_linear: x must be a contiguous 2-D float32 CPU tensor");
  if (weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() ||
      !weight.device().is_cpu())
    throw ArgumentError("streaming_bf16_linear: weight must be a contiguous 2-D bfloat16 CPU tensor");
  if (x.size(1) != weight.size(1))
    throw ArgumentError("streaming_bf16_linear: x has " + std::to_string(x.size(1)) +
                        " columns, weight expects " + std::to_string(weight.size(1)));
  const int64_t rows = x.size(0);
  const int64_t in = x.size(1);
  const int64_t out = weight.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  for (int64_t m0 = 0; m0 < rows; m0 += kStreamingKernelMaxRows) {
    const int64_t chunk = std::min(kStreamingKernelMaxRows, rows - m0);
    const float* xp = x.data_ptr<float>() + m0 * in;
    float* yp = y.data_ptr<float>() + m0 * out;
    switch (chunk) {
      case 1:
        gemv<1>(xp, w, yp, in, out);
        break;
      case 2:
        gemv<2>(xp, w, yp, in, out);
        break;
      case 3:
        gemv<3>(xp, w, yp, in, out);
        break;
      case 4:
        gemv<4>(xp, w, yp, in, out);
        break;
      case 5:
        gemv<5>(xp, w, yp, in, out);
        break;
      case 6:
        gemv<6>(xp, w, yp, in, out);
        break;
      case 7:
        gemv<7>(xp, w, yp, in, out);
        break;
      default:
        gemv<8>(xp, w, yp, in, out);
        break;
    }
  }
  return y;
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& weight) {
  if (weight.scalar_type() != at::kBFloat16) return at::linear(x, weight);
  const int64_t in = weight.size(1);
  const at::Tensor rows = x.reshape({-1, in});
  auto out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  if (rows.size(0) <= kStreamingKernelMaxRows && weight.is_contiguous() && has_streaming_bf16_kernel() &&
      x.device().is_cpu())
    return streaming_bf16_linear(rows.to(at::kFloat).contiguous(), weight).view(out_shape);
  return at::linear(rows.to(at::kBFloat16), weight).to(at::kFloat).view(out_shape);
}

}  // namespace voken::llm
