// The LLM's bf16 products (llm/linear.h) against at::linear in float64 on the same weights:
// the streaming decode kernel for 1-8 rows, several weights in one pass (dense_many), and
// dense()/dense_many() for more rows (the AMX prefill kernel where the CPU has it).
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

TEST(LinearKernels, StreamingManyMatchesFloat64) {
  if (!core::gemv_supported()) GTEST_SKIP() << "CPU without AVX-512 F/BW/VL";
  at::manual_seed(11);
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (int64_t rows = 1; rows <= core::kGemvMaxRows; ++rows) {
      for (int64_t in : {5, 16, 48, 100, 4096}) {
        const auto x = at::randn({rows, in});
        std::vector<at::Tensor> weights;
        for (int64_t out : {1, 7, 64, 333}) weights.push_back((at::randn({out, in}) * 0.1).to(at::kBFloat16));
        const auto ys = core::gemv_bf16_many(x, weights);
        ASSERT_EQ(ys.size(), weights.size());
        for (size_t i = 0; i < weights.size(); ++i)
          expect_within(ys[i], x, weights[i], streaming_bound(in),
                        "rows " + std::to_string(rows) + " in " + std::to_string(in) + " weight " +
                            std::to_string(i) + " threads " + std::to_string(threads));
        // One weight at a time is the same computation.
        EXPECT_TRUE(at::equal(core::gemv_bf16(x, weights[3]), ys[3]));
      }
    }
  }
}

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

TEST(LinearKernels, StreamingRejectsMismatchedWeights) {
  if (!core::gemv_supported()) GTEST_SKIP() << "CPU without AVX-512 F/BW/VL";
  const auto x = at::randn({2, 32});
  EXPECT_THROW(core::gemv_bf16_many(x, {at::ones({4, 32}, at::kBFloat16), at::ones({4, 31}, at::kBFloat16)}),
               ArgumentError);
  EXPECT_THROW(core::gemv_bf16_many(x, {at::ones({4, 32})}), ArgumentError);
}

}  // namespace
}  // namespace voken::llm
