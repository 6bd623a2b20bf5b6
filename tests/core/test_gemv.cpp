// The decode GEMV (core/gemv.h) at every runnable CPU tier, against at::linear in float64 on the
// same bf16 weights and float32 activations: 1-8 rows and more (taken 8 at a time), row lengths
// that leave tails after the 32-, 16- and 8-wide steps, output counts that leave partial blocks of
// rows in flight and several chunks per thread, several weights in one pass, 1 and 2 threads.
//
// Tolerance: every tier widens the bf16 weights exactly and keeps x in float32, so each product
// w * x is exact in an FMA (or rounded once, relative 2^-24, in the generic tier's multiply), and
// each output is summed in float32 lanes: at most ceil(K / 8) sequential additions per lane (8
// lanes on AVX2, 16 elsewhere) and at most 4 levels of pairwise lane reduction. With u = 2^-24 the
// first-order bound is
//   |y - ref| <= (ceil(K / 8) + 4 + 1) * u * (|x| |W|^T),
// stated below as (ceil(K / 8) + 5) u. A kernel that rounded x to bf16 (relative 2^-9) would
// exceed it by orders of magnitude.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/gemv.h"
#include "voken/error.h"

namespace voken::core {
namespace {

double gemv_bound(int64_t k) { return static_cast<double>((k + 7) / 8 + 5) * std::ldexp(1.0, -24); }

// x W^T in float64 and the bound `relative` * (|x| |W|^T).
struct Reference {
  at::Tensor value, bound;
};
Reference reference(const at::Tensor& x, const at::Tensor& w, double relative) {
  const auto x64 = x.to(at::kDouble), w64 = w.to(at::kDouble);
  return {at::linear(x64, w64), at::linear(x64.abs(), w64.abs()) * relative + 1e-30};
}

void expect_within(const at::Tensor& got, const Reference& ref, const std::string& what) {
  ASSERT_EQ(got.sizes(), ref.value.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), at::kFloat) << what;
  const double ratio = ((got.to(at::kDouble) - ref.value).abs() / ref.bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

std::string label(CpuTier tier, int64_t rows, int64_t in) {
  return std::string(tier_name(tier)) + " rows " + std::to_string(rows) + " in " + std::to_string(in);
}

TEST(Gemv, EveryTierIsSupportedUpToTheProcessTier) {
  for (CpuTier tier : runnable_tiers()) EXPECT_TRUE(gemv_supported(tier)) << tier_name(tier);
  if (cpu_tier() != CpuTier::amx)
    EXPECT_FALSE(gemv_supported(static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)));
}

TEST(Gemv, ManyWeightsMatchFloat64AtEveryTier) {
  at::manual_seed(11);
  const int saved_threads = at::get_num_threads();
  at::set_num_threads(1);  // the thread split is the next test's
  for (int64_t rows : {1, 2, 3, 4, 5, 6, 7, 8, 11}) {
    // Tails: 5 and 7 (< 8), 33 (32 + 1), 100 (3 * 32 + 4), 4103 (128 * 32 + 7).
    for (int64_t in : {5, 7, 16, 33, 100, 4103}) {
      const auto x = at::randn({rows, in});
      std::vector<at::Tensor> weights;
      std::vector<Reference> refs;
      // 1 and 7 rows: fewer than the rows in flight; 333: partial blocks; 333 x 4103: many chunks.
      for (int64_t out : {1, 7, 64, 333}) {
        weights.push_back((at::randn({out, in}) * 0.1).to(at::kBFloat16));
        refs.push_back(reference(x, weights.back(), gemv_bound(in)));
      }
      for (CpuTier tier : runnable_tiers()) {
        const auto ys = gemv_bf16_many(x, weights, tier);
        ASSERT_EQ(ys.size(), weights.size());
        for (size_t i = 0; i < weights.size(); ++i)
          expect_within(ys[i], refs[i], label(tier, rows, in) + " weight " + std::to_string(i));
        // One weight at a time is the same computation (the chunks depend on `in` only).
        EXPECT_TRUE(at::equal(gemv_bf16(x, weights[3], tier), ys[3])) << label(tier, rows, in);
      }
    }
  }
  at::set_num_threads(saved_threads);
}

// Each output is one thread's sequential sum, so the thread count cannot change a bit; the chunks
// (64 KB of weight rows) are split between the threads.
TEST(Gemv, ThreadCountDoesNotChangeTheResult) {
  at::manual_seed(12);
  const int saved_threads = at::get_num_threads();
  for (int64_t rows : {1, 3, 8}) {
    for (int64_t in : {33, 4103}) {
      const auto x = at::randn({rows, in});
      const std::vector<at::Tensor> weights = {(at::randn({777, in}) * 0.1).to(at::kBFloat16),
                                               (at::randn({50, in}) * 0.1).to(at::kBFloat16)};
      for (CpuTier tier : runnable_tiers()) {
        at::set_num_threads(1);
        const auto one = gemv_bf16_many(x, weights, tier);
        at::set_num_threads(2);
        const auto two = gemv_bf16_many(x, weights, tier);
        for (size_t i = 0; i < weights.size(); ++i)
          EXPECT_TRUE(at::equal(two[i], one[i])) << label(tier, rows, in);
      }
    }
  }
  at::set_num_threads(saved_threads);
}

// Large offsets and mixed signs: the bound is relative to |x| |W|^T, so cancellation is covered.
TEST(Gemv, CancellingSumsStayWithinTheBound) {
  at::manual_seed(13);
  const auto x = at::randn({2, 4096}) + 50;
  auto w = at::randn({64, 4096}).to(at::kBFloat16);
  const Reference ref = reference(x, w, gemv_bound(4096));
  for (CpuTier tier : runnable_tiers()) expect_within(gemv_bf16(x, w, tier), ref, tier_name(tier));
}

TEST(Gemv, EmptyShapes) {
  for (CpuTier tier : runnable_tiers()) {
    const auto ys = gemv_bf16_many(at::randn({0, 32}), {at::ones({4, 32}, at::kBFloat16)}, tier);
    EXPECT_EQ(ys[0].sizes(), at::IntArrayRef({0, 4}));
    EXPECT_EQ(gemv_bf16(at::randn({2, 32}), at::ones({0, 32}, at::kBFloat16), tier).sizes(),
              at::IntArrayRef({2, 0}));
    const auto zero_in = gemv_bf16(at::randn({2, 0}), at::ones({3, 0}, at::kBFloat16), tier);
    EXPECT_TRUE(at::equal(zero_in, at::zeros({2, 3})));
  }
}

TEST(Gemv, RejectsBadArguments) {
  const auto x = at::randn({2, 32});
  const auto w = at::ones({4, 32}, at::kBFloat16);
  EXPECT_THROW(gemv_bf16_many(x, {w, at::ones({4, 31}, at::kBFloat16)}), ArgumentError);  // K mismatch
  EXPECT_THROW(gemv_bf16(x, at::ones({4, 32})), ArgumentError);                           // float32 weight
  EXPECT_THROW(gemv_bf16(x, at::ones({32, 4}, at::kBFloat16).t()), ArgumentError);        // strided weight
  EXPECT_THROW(gemv_bf16(x.to(at::kBFloat16), w), ArgumentError);                         // bf16 x
  EXPECT_THROW(gemv_bf16(at::randn({2, 64}).narrow(1, 0, 32), w), ArgumentError);         // strided x
  EXPECT_THROW(gemv_bf16(at::randn({32}), w), ArgumentError);                             // 1-D x
  EXPECT_THROW(gemv_bf16(x, at::Tensor()), ArgumentError);                                // no weight
  try {
    gemv_bf16(x, at::ones({4, 31}, at::kBFloat16));
    ADD_FAILURE() << "no error";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("x has 32 columns, weight 0 expects 31"), std::string::npos)
        << e.what();
  }
  if (cpu_tier() != CpuTier::amx)
    EXPECT_THROW(gemv_bf16(x, w, static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)), ArgumentError);
}

}  // namespace
}  // namespace voken::core
