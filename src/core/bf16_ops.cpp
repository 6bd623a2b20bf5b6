#include "core/bf16_ops.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "core/parallel.h"
#include "voken/error.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "core/simd_avx512.h"
#endif

// GCC 12 reports its own AVX-512 reductions as possibly reading uninitialised vectors; they do not.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace voken::core {
namespace {

#ifdef VOKEN_HAVE_AVX512_KERNELS

VOKEN_AVX512 void layer_norm_rows(const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy,
                                  const float* weight, const float* bias, int64_t channels, float eps,
                                  int64_t begin, int64_t end) {
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
#ifdef VOKEN_HAVE_AVX512_KERNELS
  if (simd::cpu_has_avx512() && channels > 0) {
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
      layer_norm_rows(xp, ldx, yp, channels, wp, bp, channels, static_cast<float>(eps), begin, end);
    });
    return out;
  }
#endif
  return at::layer_norm(x.to(at::kFloat), {channels}, weight.defined() ? weight.to(at::kFloat) : weight,
                        bias.defined() ? bias.to(at::kFloat) : bias, eps)
      .to(at::kBFloat16);
}

}  // namespace voken::core
