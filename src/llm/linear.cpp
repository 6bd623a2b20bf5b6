#include "llm/linear.h"

#include <ATen/ATen.h>

#include <vector>

#include "core/gemv.h"
#include "core/inplace_gemm.h"

namespace voken::llm {
namespace {

// Which kernel a bf16 product of `rows` rows takes (see linear.h).
enum class Path { Gemv, Inplace, Aten };

Path path_for(int64_t rows, bool contiguous_weights) {
  if (rows <= core::kGemvMaxRows && contiguous_weights && core::gemv_supported()) return Path::Gemv;
  if (rows > core::kGemvMaxRows && core::inplace_gemm_supported()) return Path::Inplace;
  return Path::Aten;
}

}  // namespace

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
  bool contiguous = true;
  for (const auto& w : weights) contiguous = contiguous && w.is_contiguous() && w.size(1) == in;
  switch (path_for(rows.size(0), contiguous)) {
    case Path::Gemv:
      ys = core::gemv_bf16_many(rows.to(at::kFloat).contiguous(), weights);
      break;
    case Path::Inplace: {
      std::vector<core::InplaceLinearJob> jobs;
      for (const auto& w : weights) jobs.push_back({w, {}, core::Activation::None, {}});
      ys = core::inplace_linear_many(rows, jobs, at::kFloat);
      break;
    }
    case Path::Aten:
      for (const auto& w : weights) ys.push_back(dense(x, w));
      return ys;
  }
  auto out_shape = x.sizes().vec();
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
  switch (path_for(rows.size(0), weight.is_contiguous())) {
    case Path::Gemv:
      return core::gemv_bf16(rows.to(at::kFloat).contiguous(), weight).view(out_shape);
    case Path::Inplace:
      if (weight.dim() == 2 && weight.stride(1) == 1)
        return core::inplace_linear(rows, weight, {}, at::kFloat).view(out_shape);
      break;
    case Path::Aten:
      break;
  }
  return at::linear(rows.to(at::kBFloat16), weight).to(at::kFloat).view(out_shape);
}

}  // namespace voken::llm
