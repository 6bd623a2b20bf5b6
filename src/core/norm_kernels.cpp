#include "core/norm_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/bf16.h"
#include "core/cpu.h"
#include "core/parallel.h"
#include "core/simd_avx512.h"
#include "voken/error.h"

// GCC 12 reports its own AVX-512 reduction intrinsics (_mm512_reduce_*) as possibly reading an
// uninitialised vector; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace voken::core {
namespace {

#ifdef VOKEN_X86_KERNELS
#endif

using bf16_bits = uint16_t;

// ---- scalar element access (portable path) ----------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline void store(float* p, float v) { *p = v; }
inline void store(bf16_bits* p, float v) { *p = float_to_bf16_bits(v); }
inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

bool use_avx512() {
#ifdef VOKEN_X86_KERNELS
  return cpu_tier() >= CpuTier::avx512;
#else
  return false;
#endif
}

// ---- the inner loops, portable --------------------------------------------------------------

// s1[c] += x[c] - shift[c]; s2[c] += (x[c] - shift[c])^2 over one NHWC pixel row.
template <typename T>
void accumulate_channels(const T* x, const float* shift, float* s1, float* s2, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const float d = to_float(x[c]) - shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// Shifted sum and sum of squares of a contiguous run (float partials over <= 4096 values).
template <typename T>
void accumulate_run(const T* x, int64_t n, float shift, double& sum, double& sum_sq) {
  constexpr int kLanes = 16;
  float s1[kLanes] = {}, s2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = to_float(x[i + l]) - shift;
      s1[l] += d;
      s2[l] += d * d;
    }
  for (; i < n; ++i) {
    const float d = to_float(x[i]) - shift;
    s1[0] += d;
    s2[0] += d * d;
  }
  for (int l = 0; l < kLanes; ++l) {
    sum += s1[l];
    sum_sq += s2[l];
  }
}

// y[i] = x[i] * scale[i] + offset[i] (then SiLU) over a row with per-element factors.
template <typename T>
void affine_row(const T* x, T* y, const float* scale, const float* offset, int64_t n, bool apply_silu) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]) * scale[i] + offset[i];
    store(y + i, apply_silu ? silu(v) : v);
  }
}

// y[i] = x[i] * scale + offset (then SiLU) over a plane.
template <typename T>
void affine_plane(const T* x, T* y, float scale, float offset, int64_t n, bool apply_silu) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]) * scale + offset;
    store(y + i, apply_silu ? silu(v) : v);
  }
}

// Softmax of one row into `out` (which may be `x`), through a float scratch row.
template <typename T>
void softmax_row(const T* x, T* out, float* scratch, int64_t n) {
  float max = -INFINITY;
  for (int64_t i = 0; i < n; ++i) max = std::max(max, to_float(x[i]));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    scratch[i] = std::exp(to_float(x[i]) - max);
    sum += scratch[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) store(out + i, scratch[i] * inv);
}

// out[i] = value[i] * gelu(gate[i]).
template <typename T>
void geglu_row(const T* value, const T* gate, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(out + i, to_float(value[i]) * gelu(to_float(gate[i])));
}

// ---- the same loops in AVX-512 ----------------------------------------------------------------

#ifdef VOKEN_X86_KERNELS
using simd::load16;
using simd::store16;
using simd::tail_mask;

template <typename T>
VOKEN_TARGET_AVX512 void accumulate_channels_avx512(const T* x, const float* shift, float* s1, float* s2,
                                                    int64_t channels) {
  for (int64_t c = 0; c < channels; c += 16) {
    const __mmask16 m = tail_mask(channels - c);
    const __m512 d = _mm512_sub_ps(load16(x + c, m), load16(shift + c, m));
    store16(s1 + c, _mm512_add_ps(load16(s1 + c, m), d), m);
    store16(s2 + c, _mm512_fmadd_ps(d, d, load16(s2 + c, m)), m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void accumulate_run_avx512(const T* x, int64_t n, float shift, double& sum,
                                               double& sum_sq) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 d = _mm512_maskz_sub_ps(m, load16(x + i, m), s);
    a1 = _mm512_add_ps(a1, d);
    a2 = _mm512_fmadd_ps(d, d, a2);
  }
  sum += _mm512_reduce_add_ps(a1);
  sum_sq += _mm512_reduce_add_ps(a2);
}

template <typename T>
VOKEN_TARGET_AVX512 void affine_row_avx512(const T* x, T* y, const float* scale, const float* offset,
                                           int64_t n, bool apply_silu) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(load16(x + i, m), load16(scale + i, m), load16(offset + i, m));
    if (apply_silu) v = simd::silu16(v);
    store16(y + i, v, m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void affine_plane_avx512(const T* x, T* y, float scale, float offset, int64_t n,
                                             bool apply_silu) {
  const __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(offset);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_fmadd_ps(load16(x + i, m), a, b);
    if (apply_silu) v = simd::silu16(v);
    store16(y + i, v, m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void softmax_row_avx512(const T* x, T* out, float* scratch, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, load16(x + i, m));
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(m, simd::exp16(_mm512_sub_ps(load16(x + i, m), max)));
    store16(scratch + i, e, m);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(out + i, _mm512_mul_ps(load16(scratch + i, m), inv), m);
  }
}

template <typename T>
VOKEN_TARGET_AVX512 void geglu_row_avx512(const T* value, const T* gate, T* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store16(out + i, _mm512_mul_ps(load16(value + i, m), simd::gelu16(load16(gate + i, m))), m);
  }
}

// y[r][j] = sum_k x[r][k] w[j][k] for output columns [j_begin, j_end), four weight rows at a time.
VOKEN_TARGET_AVX512 void few_rows_gemv_avx512(const float* x, const bf16_bits* w, const float* bias, float* y,
                                              int64_t rows, int64_t in, int64_t out, int64_t j_begin,
                                              int64_t j_end) {
  constexpr int kMaxRows = 8;
  for (int64_t j = j_begin; j < j_end; ++j) {
    __m512 acc[kMaxRows];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    const bf16_bits* wj = w + j * in;
    for (int64_t k = 0; k < in; k += 16) {
      const __mmask16 m = tail_mask(in - k);
      const __m512 wv = load16(wj + k, m);
      for (int r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(wv, load16(x + r * in + k, m), acc[r]);
    }
    for (int r = 0; r < rows; ++r) y[r * out + j] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[j] : 0.0f);
  }
}
#endif

// ---- dispatch ---------------------------------------------------------------------------------

template <typename T>
void accumulate_channels_any(const T* x, const float* shift, float* s1, float* s2, int64_t channels) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return accumulate_channels_avx512(x, shift, s1, s2, channels);
#endif
  accumulate_channels(x, shift, s1, s2, channels);
}
template <typename T>
void accumulate_run_any(const T* x, int64_t n, float shift, double& sum, double& sum_sq) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return accumulate_run_avx512(x, n, shift, sum, sum_sq);
#endif
  accumulate_run(x, n, shift, sum, sum_sq);
}
template <typename T>
void affine_row_any(const T* x, T* y, const float* scale, const float* offset, int64_t n, bool apply_silu) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return affine_row_avx512(x, y, scale, offset, n, apply_silu);
#endif
  affine_row(x, y, scale, offset, n, apply_silu);
}
template <typename T>
void affine_plane_any(const T* x, T* y, float scale, float offset, int64_t n, bool apply_silu) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return affine_plane_avx512(x, y, scale, offset, n, apply_silu);
#endif
  affine_plane(x, y, scale, offset, n, apply_silu);
}
template <typename T>
void softmax_row_any(const T* x, T* out, float* scratch, int64_t n) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return softmax_row_avx512(x, out, scratch, n);
#endif
  softmax_row(x, out, scratch, n);
}

template <typename T>
void geglu_row_any(const T* value, const T* gate, T* out, int64_t n) {
#ifdef VOKEN_X86_KERNELS
  if (use_avx512()) return geglu_row_avx512(value, gate, out, n);
#endif
  geglu_row(value, gate, out, n);
}

template <typename T>
void geglu_rows(const T* projected, T* out, int64_t rows, int64_t inner) {
  parallel_range(0, rows, std::max<int64_t>(1, 16384 / inner), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      geglu_row_any(projected + r * 2 * inner, projected + r * 2 * inner + inner, out + r * inner, inner);
  });
}

std::vector<float> as_floats(const at::Tensor& t) {
  const at::Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// Per-(batch, channel) scale and offset from per-(batch, group) shifted sums.
void group_factors(const std::vector<double>& sum, const std::vector<double>& sum_sq,
                   const std::vector<float>& shift, int64_t batch, int64_t channels, int64_t groups,
                   int64_t count, const std::vector<float>& weight, const std::vector<float>& bias,
                   double eps, std::vector<float>& scale, std::vector<float>& offset) {
  const int64_t per_group = channels / groups;
  scale.resize(batch * channels);
  offset.resize(batch * channels);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      const double mean_shifted = sum[b * groups + g] / count;
      const double var = std::max(0.0, sum_sq[b * groups + g] / count - mean_shifted * mean_shifted);
      const double mean = shift[b * groups + g] + mean_shifted;
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const double a = rstd * weight[c];
        scale[b * channels + c] = static_cast<float>(a);
        offset[b * channels + c] = static_cast<float>(bias[c] - mean * a);
      }
    }
}

template <typename T>
void group_norm_nchw(const T* x, T* y, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                     const std::vector<float>& weight, const std::vector<float>& bias, double eps,
                     bool apply_silu) {
  const int64_t per_group = channels / groups;
  const int64_t span = per_group * spatial;
  std::vector<double> sum(batch * groups, 0.0), sum_sq(batch * groups, 0.0);
  std::vector<float> shift(batch * groups);
  parallel_range(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kRun = 4096;  // float partial sums stay exact enough over this many values
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* base = x + bg * span;
      shift[bg] = to_float(base[0]);
      for (int64_t i = 0; i < span; i += kRun)
        accumulate_run_any(base + i, std::min(kRun, span - i), shift[bg], sum[bg], sum_sq[bg]);
    }
  });
  std::vector<float> scale, offset;
  group_factors(sum, sum_sq, shift, batch, channels, groups, span, weight, bias, eps, scale, offset);
  parallel_range(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc)
      affine_plane_any(x + bc * spatial, y + bc * spatial, scale[bc], offset[bc], spatial, apply_silu);
  });
}

template <typename T>
void group_norm_nhwc(const T* x, T* y, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                     const std::vector<float>& weight, const std::vector<float>& bias, double eps,
                     bool apply_silu) {
  const int64_t per_group = channels / groups;
  constexpr int64_t kPixelsPerChunk = 128;  // float per-channel partial sums over this many pixels
  const int64_t chunks = (spatial + kPixelsPerChunk - 1) / kPixelsPerChunk;
  // Shift: the group's first value, per channel for the row loop.
  std::vector<float> group_shift(batch * groups), channel_shift(batch * channels);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      const float s = to_float(x[b * spatial * channels + (c / per_group) * per_group]);
      channel_shift[b * channels + c] = s;
      if (c % per_group == 0) group_shift[b * groups + c / per_group] = s;
    }
  std::vector<double> partial1(batch * chunks * channels), partial2(batch * chunks * channels);
  parallel_range(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s1(channels), s2(channels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, chunk = task % chunks;
      std::fill(s1.begin(), s1.end(), 0.0f);
      std::fill(s2.begin(), s2.end(), 0.0f);
      const int64_t p_end = std::min(spatial, (chunk + 1) * kPixelsPerChunk);
      for (int64_t p = chunk * kPixelsPerChunk; p < p_end; ++p)
        accumulate_channels_any(x + (b * spatial + p) * channels, channel_shift.data() + b * channels,
                                s1.data(), s2.data(), channels);
      for (int64_t c = 0; c < channels; ++c) {
        partial1[task * channels + c] = s1[c];
        partial2[task * channels + c] = s2[c];
      }
    }
  });
  std::vector<double> sum(batch * groups, 0.0), sum_sq(batch * groups, 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t at = (b * chunks + chunk) * channels + c;
        sum[b * groups + c / per_group] += partial1[at];
        sum_sq[b * groups + c / per_group] += partial2[at];
      }
  std::vector<float> scale, offset;
  group_factors(sum, sum_sq, group_shift, batch, channels, groups, per_group * spatial, weight, bias, eps,
                scale, offset);
  parallel_range(0, batch * spatial, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bp = begin; bp < end; ++bp) {
      const int64_t b = bp / spatial;
      affine_row_any(x + bp * channels, y + bp * channels, scale.data() + b * channels,
                     offset.data() + b * channels, channels, apply_silu);
    }
  });
}

template <typename T>
void layer_norm_rows(const T* x, T* y, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     const std::vector<float>& bias, double eps) {
  parallel_range(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(dim), offset(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * dim;
      // Shifted by the row's first value: an exact-enough mean and variance in one pass.
      const float shift = to_float(row[0]);
      double sum = 0, sum_sq = 0;
      for (int64_t i = 0; i < dim; i += 4096)
        accumulate_run_any(row + i, std::min<int64_t>(4096, dim - i), shift, sum, sum_sq);
      const double mean_shifted = sum / dim;
      const double var = std::max(0.0, sum_sq / dim - mean_shifted * mean_shifted);
      const double mean = shift + mean_shifted;
      const double rstd = 1.0 / std::sqrt(var + eps);
      // y = x * (rstd * w) + (b - mean * rstd * w)
      for (int64_t i = 0; i < dim; ++i) {
        scale[i] = static_cast<float>(rstd * weight[i]);
        offset[i] = static_cast<float>(bias[i] - mean * rstd * weight[i]);
      }
      affine_row_any(row, y + r * dim, scale.data(), offset.data(), dim, false);
    }
  });
}

template <typename T>
void softmax_rows(T* data, int64_t rows, int64_t n) {
  parallel_range(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(n);
    for (int64_t r = begin; r < end; ++r) softmax_row_any(data + r * n, data + r * n, scratch.data(), n);
  });
}

}  // namespace

void softmax_lastdim_(at::Tensor& x) {
  const auto dtype = x.scalar_type();
  if (!x.is_contiguous() || x.dim() < 1 || (dtype != at::kFloat && dtype != at::kBFloat16))
    throw ArgumentError("softmax_lastdim_: expected a contiguous float32 or bfloat16 tensor");
  const int64_t n = x.size(-1);
  if (x.numel() == 0 || n == 0) return;
  const int64_t rows = x.numel() / n;
  if (dtype == at::kFloat)
    softmax_rows(x.data_ptr<float>(), rows, n);
  else
    softmax_rows(reinterpret_cast<bf16_bits*>(x.data_ptr<at::BFloat16>()), rows, n);
}

at::Tensor geglu(const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  if (input.dim() < 1 || input.size(-1) % 2 != 0 || (dtype != at::kFloat && dtype != at::kBFloat16))
    throw ArgumentError("geglu: expected a float32/bfloat16 tensor with an even last dimension");
  const at::Tensor x = input.contiguous();
  const int64_t inner = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = inner;
  at::Tensor y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  const int64_t rows = y.numel() / inner;
  if (dtype == at::kFloat)
    geglu_rows(x.data_ptr<float>(), y.data_ptr<float>(), rows, inner);
  else
    geglu_rows(reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()),
               reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), rows, inner);
  return y;
}

bool has_few_rows_linear_bf16() { return use_avx512(); }

at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  constexpr int64_t kMaxRows = 8;
  if (!use_avx512() || x.dim() != 2 || x.scalar_type() != at::kFloat || x.size(0) > kMaxRows ||
      weight.dim() != 2 || weight.scalar_type() != at::kBFloat16 || !weight.is_contiguous() ||
      weight.size(1) != x.size(1) ||
      (bias.defined() && (bias.scalar_type() != at::kFloat || bias.numel() != weight.size(0))))
    throw ArgumentError(
        "few_rows_linear_bf16: expected x float32 [<= 8, in], weight bfloat16 [out, in], bias "
        "float32 [out] on an AVX-512 CPU");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias;
  const int64_t rows = xc.size(0), in = xc.size(1), out = weight.size(0);
  at::Tensor y = at::empty({rows, out}, xc.options());
#ifdef VOKEN_X86_KERNELS
  const auto* w = reinterpret_cast<const bf16_bits*>(weight.data_ptr<at::BFloat16>());
  parallel_range(0, out, 16, [&](int64_t begin, int64_t end) {
    few_rows_gemv_avx512(xc.data_ptr<float>(), w, bc.defined() ? bc.data_ptr<float>() : nullptr,
                         y.data_ptr<float>(), rows, in, out, begin, end);
  });
#endif
  return y;
}

namespace {

void check_group_norm(const at::Tensor& input, int64_t groups, const at::Tensor& weight,
                      const at::Tensor& bias) {
  const auto dtype = input.scalar_type();
  if (input.dim() < 2 || (dtype != at::kFloat && dtype != at::kBFloat16) || groups <= 0 ||
      input.size(1) % groups != 0 || weight.numel() != input.size(1) || bias.numel() != input.size(1))
    throw ArgumentError("group_norm: expected a float32/bfloat16 [B, C, ...] tensor with C divisible by " +
                        std::to_string(groups) + " groups and [C] weight and bias");
}

bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// y may be x (every value is read before it is written, at the same index).
void group_norm_into(const at::Tensor& x, const at::Tensor& y, int64_t groups, const at::Tensor& weight,
                     const at::Tensor& bias, double eps, bool silu, bool nhwc) {
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t spatial = channels == 0 || batch == 0 ? 0 : x.numel() / (batch * channels);
  if (x.numel() == 0) return;
  const auto w = as_floats(weight), b = as_floats(bias);
  if (x.scalar_type() == at::kFloat) {
    const auto* xp = x.data_ptr<float>();
    auto* yp = y.data_ptr<float>();
    nhwc ? group_norm_nhwc(xp, yp, batch, channels, spatial, groups, w, b, eps, silu)
         : group_norm_nchw(xp, yp, batch, channels, spatial, groups, w, b, eps, silu);
  } else {
    const auto* xp = reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>());
    nhwc ? group_norm_nhwc(xp, yp, batch, channels, spatial, groups, w, b, eps, silu)
         : group_norm_nchw(xp, yp, batch, channels, spatial, groups, w, b, eps, silu);
  }
}

}  // namespace

at::Tensor group_norm(const at::Tensor& input, int64_t groups, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, bool silu) {
  check_group_norm(input, groups, weight, bias);
  const bool nhwc = is_nhwc(input);
  const at::Tensor x = nhwc ? input : input.contiguous();
  const at::Tensor y =
      at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  group_norm_into(x, y, groups, weight, bias, eps, silu, nhwc);
  return y;
}

void group_norm_(at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                 bool silu) {
  check_group_norm(x, groups, weight, bias);
  const bool nhwc = is_nhwc(x);
  if (!nhwc && !x.is_contiguous())
    throw ArgumentError("group_norm_: x must be NCHW-contiguous or channels-last");
  group_norm_into(x, x, groups, weight, bias, eps, silu, nhwc);
}

at::Tensor layer_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const auto dtype = input.scalar_type();
  if (input.dim() < 1 || (dtype != at::kFloat && dtype != at::kBFloat16) ||
      weight.numel() != input.size(-1) || bias.numel() != input.size(-1))
    throw ArgumentError(
        "layer_norm: expected a float32/bfloat16 tensor and weight/bias of its last dimension");
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t dim = x.size(-1);
  if (x.numel() == 0 || dim == 0) return y;
  const int64_t rows = x.numel() / dim;
  const auto w = as_floats(weight), b = as_floats(bias);
  if (dtype == at::kFloat) {
    layer_norm_rows(x.data_ptr<float>(), y.data_ptr<float>(), rows, dim, w, b, eps);
  } else {
    layer_norm_rows(reinterpret_cast<const bf16_bits*>(x.data_ptr<at::BFloat16>()),
                    reinterpret_cast<bf16_bits*>(y.data_ptr<at::BFloat16>()), rows, dim, w, b, eps);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
namespace {

// The vision encoder's bf16 LayerNorm (layer_norm_bf16).

#ifdef VOKEN_X86_KERNELS

VOKEN_TARGET_AVX512 void layer_norm_bf16_rows(const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
                                              const float* weight, const float* bias, int64_t channels,
                                              float eps, int64_t begin, int64_t end) {
  const float inverse_count = 1.0f / static_cast<float>(channels);
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = x + r * ldx;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; c += 16)
      sum = _mm512_add_ps(sum, simd::load16(row + c, simd::tail_mask(channels - c)));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) * inverse_count);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 m = simd::tail_mask(channels - c);
      const __m512 d = _mm512_maskz_sub_ps(m, simd::load16(row + c, m), mean);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) * inverse_count + eps));
    uint16_t* out = y + r * ldy;
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 m = simd::tail_mask(channels - c);
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(simd::load16(row + c, m), mean), rstd);
      if (weight) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, weight + c));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + c));
      simd::store16(out + c, v, m);
    }
  }
}
#endif

}  // namespace

at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  if (!x.defined() || x.dim() < 1 || x.scalar_type() != at::kBFloat16 || !x.device().is_cpu())
    throw ArgumentError("layer_norm_bf16: x must be a bfloat16 CPU tensor");
  const int64_t channels = x.size(-1);
  for (const at::Tensor* t : {&weight, &bias})
    if (t->defined() && t->numel() != channels)
      throw ArgumentError("layer_norm_bf16: weight/bias have " + std::to_string(t->numel()) + " values for " +
                          std::to_string(channels) + " channels");
#ifdef VOKEN_X86_KERNELS
  if (cpu_tier() >= CpuTier::avx512 && channels > 0) {
    at::Tensor rows = x.reshape({-1, channels});
    if (rows.stride(1) != 1) rows = rows.contiguous();
    const at::Tensor w = weight.defined() ? weight.to(at::kFloat).contiguous() : at::Tensor();
    const at::Tensor b = bias.defined() ? bias.to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    const auto* xp = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const int64_t ldx = rows.stride(0);
    parallel_range(0, rows.size(0), 16, [&](int64_t begin, int64_t end) {
      layer_norm_bf16_rows(xp, ldx, yp, channels, wp, bp, channels, static_cast<float>(eps), begin, end);
    });
    return out;
  }
#endif
  return at::layer_norm(x.to(at::kFloat), {channels}, weight.defined() ? weight.to(at::kFloat) : weight,
                        bias.defined() ? bias.to(at::kFloat) : bias, eps)
      .to(at::kBFloat16);
}

}  // namespace voken::core
