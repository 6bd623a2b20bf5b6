#include "diffusion/norm_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "voken/error.h"

// The inner loops are written so that GCC vectorises them; each hot function is compiled for
// AVX-512, AVX2 and baseline x86-64 and picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VOKEN_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VOKEN_VECTOR_CLONES
#endif

namespace voken::diffusion {
namespace {

using bf16_bits = uint16_t;

inline float to_float(float v) { return v; }
inline float to_float(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline void store(float* p, float v) { *p = v; }
// Round to nearest even, as c10::BFloat16 does; NaN stays NaN.
inline void store(bf16_bits* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  *p = static_cast<bf16_bits>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// exp(x) for SiLU: Cody-Waite range reduction and Cephes' degree-6 polynomial (about 1 ulp), in
// plain arithmetic so that loops calling it vectorise.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline float silu(float v) { return v / (1.0f + fast_exp(-v)); }

// ---- inner loops (one instantiation per element type, vectorised by the compiler) -----------

// s1[c] += x[c] - shift[c]; s2[c] += (x[c] - shift[c])^2 for one NHWC pixel row.
template <typename T>
inline void accumulate_channels(const T* __restrict x, const float* __restrict shift, float* __restrict s1,
                                float* __restrict s2, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const float d = to_float(x[c]) - shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}
VOKEN_VECTOR_CLONES void accumulate_channels_f32(const float* x, const float* shift, float* s1, float* s2,
                                                 int64_t channels) {
  accumulate_channels(x, shift, s1, s2, channels);
}
VOKEN_VECTOR_CLONES void accumulate_channels_bf16(const bf16_bits* x, const float* shift, float* s1,
                                                  float* s2, int64_t channels) {
  accumulate_channels(x, shift, s1, s2, channels);
}

// Shifted sum and sum of squares of a contiguous run, in 16 float lanes.
template <typename T>
inline void accumulate_run(const T* __restrict x, int64_t n, float shift, double& sum, double& sum_sq) {
  constexpr int kLanes = 16;
  float s1[kLanes] = {}, s2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = to_float(x[i + l]) - shift;
      s1[l] += d;
      s2[l] += d * d;
    }
  double t1 = 0, t2 = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(to_float(x[i])) - shift;
    t1 += d;
    t2 += d * d;
  }
  for (int l = 0; l < kLanes; ++l) {
    t1 += s1[l];
    t2 += s2[l];
  }
  sum += t1;
  sum_sq += t2;
}
VOKEN_VECTOR_CLONES void accumulate_run_f32(const float* x, int64_t n, float shift, double& sum,
                                            double& sum_sq) {
  accumulate_run(x, n, shift, sum, sum_sq);
}
VOKEN_VECTOR_CLONES void accumulate_run_bf16(const bf16_bits* x, int64_t n, float shift, double& sum,
                                             double& sum_sq) {
  accumulate_run(x, n, shift, sum, sum_sq);
}

// y[i] = x[i] * scale[i] + offset[i] (then SiLU): one NHWC pixel row with per-channel factors.
template <typename T>
inline void affine_channels(const T* __restrict x, T* __restrict y, const float* __restrict scale,
                            const float* __restrict offset, int64_t n, bool apply_silu) {
  if (apply_silu) {
    for (int64_t i = 0; i < n; ++i) store(y + i, silu(to_float(x[i]) * scale[i] + offset[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) store(y + i, to_float(x[i]) * scale[i] + offset[i]);
  }
}
VOKEN_VECTOR_CLONES void affine_channels_f32(const float* x, float* y, const float* scale,
                                             const float* offset, int64_t n, bool apply_silu) {
  affine_channels(x, y, scale, offset, n, apply_silu);
}
VOKEN_VECTOR_CLONES void affine_channels_bf16(const bf16_bits* x, bf16_bits* y, const float* scale,
                                              const float* offset, int64_t n, bool apply_silu) {
  affine_channels(x, y, scale, offset, n, apply_silu);
}

// y[i] = x[i] * scale + offset (then SiLU): one NCHW plane.
template <typename T>
inline void affine_plane(const T* __restrict x, T* __restrict y, float scale, float offset, int64_t n,
                         bool apply_silu) {
  if (apply_silu) {
    for (int64_t i = 0; i < n; ++i) store(y + i, silu(to_float(x[i]) * scale + offset));
  } else {
    for (int64_t i = 0; i < n; ++i) store(y + i, to_float(x[i]) * scale + offset);
  }
}
VOKEN_VECTOR_CLONES void affine_plane_f32(const float* x, float* y, float scale, float offset, int64_t n,
                                          bool apply_silu) {
  affine_plane(x, y, scale, offset, n, apply_silu);
}
VOKEN_VECTOR_CLONES void affine_plane_bf16(const bf16_bits* x, bf16_bits* y, float scale, float offset,
                                           int64_t n, bool apply_silu) {
  affine_plane(x, y, scale, offset, n, apply_silu);
}

// y = (x - mean) * rstd * w + b over one row.
template <typename T>
inline void normalize_row(const T* __restrict x, T* __restrict y, const float* __restrict w,
                          const float* __restrict b, float mean, float rstd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(y + i, (to_float(x[i]) - mean) * rstd * w[i] + b[i]);
}
VOKEN_VECTOR_CLONES void normalize_row_f32(const float* x, float* y, const float* w, const float* b,
                                           float mean, float rstd, int64_t n) {
  normalize_row(x, y, w, b, mean, rstd, n);
}
VOKEN_VECTOR_CLONES void normalize_row_bf16(const bf16_bits* x, bf16_bits* y, const float* w, const float* b,
                                            float mean, float rstd, int64_t n) {
  normalize_row(x, y, w, b, mean, rstd, n);
}

inline void accumulate_channels_of(const float* x, const float* shift, float* s1, float* s2, int64_t c) {
  accumulate_channels_f32(x, shift, s1, s2, c);
}
inline void accumulate_channels_of(const bf16_bits* x, const float* shift, float* s1, float* s2, int64_t c) {
  accumulate_channels_bf16(x, shift, s1, s2, c);
}
inline void accumulate_run_of(const float* x, int64_t n, float shift, double& s, double& q) {
  accumulate_run_f32(x, n, shift, s, q);
}
inline void accumulate_run_of(const bf16_bits* x, int64_t n, float shift, double& s, double& q) {
  accumulate_run_bf16(x, n, shift, s, q);
}
inline void affine_channels_of(const float* x, float* y, const float* a, const float* b, int64_t n, bool s) {
  affine_channels_f32(x, y, a, b, n, s);
}
inline void affine_channels_of(const bf16_bits* x, bf16_bits* y, const float* a, const float* b, int64_t n,
                               bool s) {
  affine_channels_bf16(x, y, a, b, n, s);
}
inline void affine_plane_of(const float* x, float* y, float a, float b, int64_t n, bool s) {
  affine_plane_f32(x, y, a, b, n, s);
}
inline void affine_plane_of(const bf16_bits* x, bf16_bits* y, float a, float b, int64_t n, bool s) {
  affine_plane_bf16(x, y, a, b, n, s);
}
inline void normalize_row_of(const float* x, float* y, const float* w, const float* b, float m, float r,
                             int64_t n) {
  normalize_row_f32(x, y, w, b, m, r, n);
}
inline void normalize_row_of(const bf16_bits* x, bf16_bits* y, const float* w, const float* b, float m,
                             float r, int64_t n) {
  normalize_row_bf16(x, y, w, b, m, r, n);
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
  at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kRun = 4096;  // float partial sums stay exact enough over this many values
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* base = x + bg * span;
      shift[bg] = to_float(base[0]);
      for (int64_t i = 0; i < span; i += kRun)
        accumulate_run_of(base + i, std::min(kRun, span - i), shift[bg], sum[bg], sum_sq[bg]);
    }
  });
  std::vector<float> scale, offset;
  group_factors(sum, sum_sq, shift, batch, channels, groups, span, weight, bias, eps, scale, offset);
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc)
      affine_plane_of(x + bc * spatial, y + bc * spatial, scale[bc], offset[bc], spatial, apply_silu);
  });
}

template <typename T>
void group_norm_nhwc(const T* x, T* y, int64_t batch, int64_t channels, int64_t spatial, int64_t groups,
                     const std::vector<float>& weight, const std::vector<float>& bias, double eps,
                     bool apply_silu) {
  const int64_t per_group = channels / groups;
  constexpr int64_t kPixelsPerChunk = 128;  // float per-channel partial sums over this many pixels
  const int64_t chunks = (spatial + kPixelsPerChunk - 1) / kPixelsPerChunk;
  // Shift: the group's first value, per channel for the vectorised row loop.
  std::vector<float> group_shift(batch * groups), channel_shift(batch * channels);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      const float s = to_float(x[b * spatial * channels + (c / per_group) * per_group]);
      channel_shift[b * channels + c] = s;
      if (c % per_group == 0) group_shift[b * groups + c / per_group] = s;
    }
  std::vector<double> partial1(batch * chunks * channels), partial2(batch * chunks * channels);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s1(channels), s2(channels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, chunk = task % chunks;
      std::fill(s1.begin(), s1.end(), 0.0f);
      std::fill(s2.begin(), s2.end(), 0.0f);
      const int64_t p_end = std::min(spatial, (chunk + 1) * kPixelsPerChunk);
      for (int64_t p = chunk * kPixelsPerChunk; p < p_end; ++p)
        accumulate_channels_of(x + (b * spatial + p) * channels, channel_shift.data() + b * channels,
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
  at::parallel_for(0, batch * spatial, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bp = begin; bp < end; ++bp) {
      const int64_t b = bp / spatial;
      affine_channels_of(x + bp * channels, y + bp * channels, scale.data() + b * channels,
                         offset.data() + b * channels, channels, apply_silu);
    }
  });
}

template <typename T>
void layer_norm_rows(const T* x, T* y, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     const std::vector<float>& bias, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * dim;
      // Shift by the row's first value, then an exact-enough mean and variance in one pass.
      const float shift = to_float(row[0]);
      double sum = 0, sum_sq = 0;
      accumulate_run_of(row, dim, shift, sum, sum_sq);
      const double mean_shifted = sum / dim;
      const double var = std::max(0.0, sum_sq / dim - mean_shifted * mean_shifted);
      normalize_row_of(row, y + r * dim, weight.data(), bias.data(), static_cast<float>(shift + mean_shifted),
                       static_cast<float>(1.0 / std::sqrt(var + eps)), dim);
    }
  });
}

}  // namespace

at::Tensor group_norm(const at::Tensor& input, int64_t groups, const at::Tensor& weight,
                      const at::Tensor& bias, double eps, bool silu) {
  const auto dtype = input.scalar_type();
  if (input.dim() < 2 || (dtype != at::kFloat && dtype != at::kBFloat16) || groups <= 0 ||
      input.size(1) % groups != 0 || weight.numel() != input.size(1) || bias.numel() != input.size(1))
    throw ArgumentError("group_norm: expected a float32/bfloat16 [B, C, ...] tensor with C divisible by " +
                        std::to_string(groups) + " groups and [C] weight and bias");
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t spatial = channels == 0 || batch == 0 ? 0 : input.numel() / (batch * channels);
  const bool nhwc =
      input.dim() == 4 && !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? input : input.contiguous();
  at::Tensor y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const auto w = as_floats(weight), b = as_floats(bias);
  if (dtype == at::kFloat) {
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
  return y;
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

}  // namespace voken::diffusion
