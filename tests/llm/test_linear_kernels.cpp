// The LLM's bf16 products (llm/linear.h): which kernel dense()/dense_many() choose for a row count
// (the streaming decode GEMV for 1-8 rows, the prefill kernel or at::linear beyond), checked
// against at::linear in float64 on the same weights, and float32 weights left to at::linear. The
// kernels themselves are tested at every CPU tier in tests/core.
//
// Tolerances: the streaming kernel keeps x in float32 and sums in float32, so
//   |y - ref| <= K * 2^-24 * (|x| |W|^T);
// the prefill path rounds x to bf16 first (relative 2^-9 per element), which adds
//   2^-8 * (|x| |W|^T)  (a documented bound, twice the worst rounding of each x value).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>

#include "core/gemv.h"
#include "llm/linear.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

// Passes when every element is within `relative` * (|x| |W|^T).
void expect_within(const at::Tensor& got, const at::Tensor& x, const at::Tensor& w, double relative,
                   const std::string& what) {
  const auto x64 = x.to(at::kDouble), w64 = w.to(at::kDouble);
  const auto ref = at::linear(x64, w64);
  const auto bound = at::linear(x64.abs(), w64.abs()) * relative + 1e-30;
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), at::kFloat) << what;
  const double ratio = ((got.to(at::kDouble) - ref).abs() / bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

double streaming_bound(int64_t k) { return static_cast<double>(k) * std::ldexp(1.0, -24); }
double prefill_bound(int64_t k) { return streaming_bound(k) + std::ldexp(1.0, -8); }

TEST(LinearKernels, DenseManyEqualsDenseForEveryRowCount) {
  at::manual_seed(12);
  for (int64_t rows : {1, 3, 8, 9, 40, 130}) {
    const auto x = at::randn({2, rows, 96});
    const std::vector<at::Tensor> weights = {(at::randn({96, 96}) * 0.1).to(at::kBFloat16),
                                             (at::randn({40, 96}) * 0.1).to(at::kBFloat16),
                                             (at::randn({17, 96}) * 0.1).to(at::kBFloat16)};
    const auto ys = dense_many(x, weights);
    ASSERT_EQ(ys.size(), weights.size());
    const double bound = 2 * rows <= core::kGemvMaxRows ? streaming_bound(96) : prefill_bound(96);
    for (size_t i = 0; i < weights.size(); ++i) {
      EXPECT_EQ(ys[i].sizes(), at::IntArrayRef({2, rows, weights[i].size(0)}));
      expect_within(ys[i].reshape({2 * rows, -1}), x.reshape({2 * rows, 96}), weights[i], bound,
                    "rows " + std::to_string(rows) + " weight " + std::to_string(i));
      EXPECT_TRUE(at::allclose(dense(x, weights[i]), ys[i], 0, 0)) << "dense != dense_many, rows " << rows;
    }
  }
}

TEST(LinearKernels, Float32WeightsStayOnAtLinear) {
  const auto x = at::randn({12, 32});
  const auto w = at::randn({8, 32});
  const auto ys = dense_many(x, {w, w});
  EXPECT_TRUE(at::equal(ys[0], at::linear(x, w)));
  EXPECT_TRUE(at::equal(ys[1], at::linear(x, w)));
}

}  // namespace
}  // namespace voken::llm
