// The in-place bfloat16 GEMM (core/inplace_gemm.h) at every CPU tier this machine can run, against
// at::linear in float64 on the same bf16-rounded inputs, over shapes that exercise every edge:
// token counts that are no multiple of any tier's row tile (6, 12, 16) or of 32, weight rows that
// leave partial 16/32-row blocks, row lengths that are no multiple of 32, K split into several
// chunks or passes, more than one task of row tiles, strided weights, several weights in one call,
// bias, activations, residuals, float32 and bf16 inputs and outputs.
//
// Tolerance (derived): x is rounded to bf16 (as in the reference), products of bf16 values are
// exact in float32, and the K products, the bias and the residual are summed in float32 in some
// order: |y - ref| <= (K + 2) * 2^-24 * S with S = |x| |W|^T + |bias| (+ |residual|). GELU's
// slope is at most 1.13 in magnitude and the kernels' GELU errs by ~1e-7 relative; a bf16 output
// adds one rounding, 2^-8 |ref|.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/cpu.h"
#include "core/inplace_gemm.h"
#include "voken/error.h"

namespace voken::core {
namespace {

std::vector<CpuTier> inplace_tiers() {
  std::vector<CpuTier> tiers;
  for (const CpuTier tier : runnable_tiers())
    if (inplace_gemm_supported(tier)) tiers.push_back(tier);
  return tiers;
}

std::string tier_text(CpuTier tier) { return std::string("tier ") + tier_name(tier); }

// Checks got = activation(x W^T + bias) + residual within the bound above.
void expect_close(const at::Tensor& got, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  Activation activation, const at::Tensor& residual, const std::string& what) {
  const auto x64 = x.to(at::kBFloat16).to(at::kDouble);
  const auto b64 = bias.defined() ? bias.to(at::kDouble) : at::Tensor();
  auto ref = at::linear(x64, w.to(at::kDouble), b64);
  auto magnitude = at::linear(x64.abs(), w.to(at::kDouble).abs(), b64.defined() ? b64.abs() : at::Tensor());
  auto bound = magnitude * (static_cast<double>(w.size(1) + 2) * std::ldexp(1.0, -24));
  if (activation == Activation::GeluErf) ref = at::gelu(ref);
  if (activation == Activation::GeluTanh) ref = at::gelu(ref, "tanh");
  if (activation != Activation::None) bound = bound * 1.13 + ref.abs() * 2e-7 + 1e-7;
  if (residual.defined()) {
    ref = ref + residual.to(at::kDouble);
    bound = bound + residual.to(at::kDouble).abs() * std::ldexp(1.0, -24);
  }
  if (got.scalar_type() == at::kBFloat16) bound = bound + ref.abs() * std::ldexp(1.0, -8);
  bound = bound + 1e-30;
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  const auto ratio = ((got.to(at::kDouble) - ref).abs() / bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

class InplaceGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    tiers_ = inplace_tiers();
    if (tiers_.empty()) GTEST_SKIP() << "no in-place kernel for this CPU (needs AVX2)";
  }
  std::vector<CpuTier> tiers_;
};

TEST(InplaceGemmTiers, SupportedExactlyFromAvx2UpToTheProcessTier) {
  EXPECT_FALSE(inplace_gemm_supported(CpuTier::generic));
  for (const CpuTier tier : {CpuTier::avx2, CpuTier::avx512, CpuTier::avx512_bf16, CpuTier::amx})
    if (tier > cpu_tier()) {
      EXPECT_FALSE(inplace_gemm_supported(tier)) << tier_text(tier);
      EXPECT_THROW(inplace_linear(at::randn({4, 32}), at::ones({8, 32}, at::kBFloat16), {}, at::kFloat,
                                  Activation::None, {}, tier),
                   ArgumentError);
    }
  EXPECT_THROW(inplace_linear(at::randn({4, 32}), at::ones({8, 32}, at::kBFloat16), {}, at::kFloat,
                              Activation::None, {}, CpuTier::generic),
               ArgumentError);
}

TEST_F(InplaceGemm, MatchesFloat64AcrossShapes) {
  at::manual_seed(3);
  for (const CpuTier tier : tiers_)
    for (int64_t m : {1, 5, 7, 16, 17, 33, 130}) {
      for (int64_t n : {16, 32, 40, 77}) {
        for (int64_t k : {32, 64, 100, 1408}) {
          const auto x = at::randn({m, k});
          const auto w = (at::randn({n, k}) * 0.1).to(at::kBFloat16);
          const auto bias = at::randn({n});
          const std::string what = tier_text(tier) + " m " + std::to_string(m) + " n " + std::to_string(n) +
                                   " k " + std::to_string(k);
          expect_close(inplace_linear(x, w, {}, at::kFloat, Activation::None, {}, tier), x, w, {},
                       Activation::None, {}, what);
          expect_close(
              inplace_linear(x.to(at::kBFloat16), w, bias, at::kBFloat16, Activation::None, {}, tier), x, w,
              bias, Activation::None, {}, what + " bf16 in and out");
        }
      }
    }
}

TEST_F(InplaceGemm, SeveralPassesOverLongRowsAndManyRowTiles) {
  // Long rows: many K chunks (and two AMX passes at 13 token blocks); 600 rows: more than one task
  // of row tiles at every vector tier (tasks of up to ~512 rows), each repacking its weight panels.
  at::manual_seed(4);
  for (const CpuTier tier : tiers_)
    for (const auto& [m, k] : std::vector<std::pair<int64_t, int64_t>>{{200, 2600}, {200, 5000}, {600, 96}}) {
      const std::string what = tier_text(tier) + " m " + std::to_string(m) + " k " + std::to_string(k);
      const auto x = at::randn({m, k}).to(at::kBFloat16);
      const auto w = (at::randn({72, k}) * 0.05).to(at::kBFloat16);
      const auto bias = at::randn({72});
      expect_close(inplace_linear(x, w, bias, at::kFloat, Activation::None, {}, tier), x, w, bias,
                   Activation::None, {}, what);
      expect_close(inplace_linear(x, w, bias, at::kBFloat16, Activation::GeluErf, {}, tier), x, w, bias,
                   Activation::GeluErf, {}, what + " gelu");
    }
}

TEST_F(InplaceGemm, StridedWeightsBatchedInputAndActivations) {
  at::manual_seed(5);
  const auto big = (at::randn({100, 200}) * 0.1).to(at::kBFloat16);
  const auto w = big.narrow(0, 3, 64).narrow(1, 10, 160);  // row stride 200, unaligned rows
  const auto x = at::randn({2, 37, 160});
  const auto bias = at::randn({64}).to(at::kBFloat16);
  for (const CpuTier tier : tiers_)
    for (auto activation : {Activation::None, Activation::GeluErf, Activation::GeluTanh}) {
      const auto y = inplace_linear(x, w, bias, at::kFloat, activation, {}, tier);
      ASSERT_EQ(y.sizes(), at::IntArrayRef({2, 37, 64}));
      expect_close(y.reshape({74, 64}), x.reshape({74, 160}), w, bias, activation, {},
                   tier_text(tier) + " strided");
    }
}

TEST_F(InplaceGemm, SeveralWeightsInOneCall) {
  at::manual_seed(6);
  const auto x = at::randn({45, 96});
  std::vector<InplaceLinearJob> jobs;
  for (int64_t n : {96, 48, 48, 7})
    jobs.push_back({(at::randn({n, 96}) * 0.1).to(at::kBFloat16), at::randn({n}), Activation::None, {}});
  jobs[1].activation = Activation::GeluErf;
  jobs[2].residual = at::randn({45, 48}).to(at::kBFloat16);
  const int saved = at::get_num_threads();
  for (const CpuTier tier : tiers_)
    for (int threads : {1, 2}) {
      at::set_num_threads(threads);
      const auto ys = inplace_linear_many(x, jobs, at::kFloat, tier);
      ASSERT_EQ(ys.size(), jobs.size());
      for (size_t i = 0; i < jobs.size(); ++i)
        expect_close(ys[i], x, jobs[i].weight, jobs[i].bias, jobs[i].activation, jobs[i].residual,
                     tier_text(tier) + " job " + std::to_string(i) + " threads " + std::to_string(threads));
    }
  at::set_num_threads(saved);
}

TEST_F(InplaceGemm, ResidualIsAddedBeforeTheRounding) {
  at::manual_seed(8);
  const auto x = at::randn({3, 50, 64});
  const auto w = (at::randn({40, 64}) * 0.1).to(at::kBFloat16);
  const auto bias = at::randn({40});
  for (const CpuTier tier : tiers_)
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      const auto residual = at::randn({3, 50, 40}).to(dtype);
      const auto got = inplace_linear(x, w, bias, at::kBFloat16, Activation::GeluErf, residual, tier);
      expect_close(got.reshape({150, 40}), x.reshape({150, 64}), w, bias, Activation::GeluErf,
                   residual.reshape({150, 40}), tier_text(tier) + " " + c10::toString(dtype));
      // A residual with strided rows (a view of a wider tensor).
      const auto wide = at::randn({150, 100}).to(dtype).narrow(1, 30, 40);
      expect_close(inplace_linear(x.reshape({150, 64}), w, bias, at::kFloat, Activation::None, wide, tier),
                   x.reshape({150, 64}), w, bias, Activation::None, wide,
                   tier_text(tier) + " strided residual");
      EXPECT_THROW(inplace_linear(x, w, bias, at::kFloat, Activation::None, at::randn({3, 50, 41}), tier),
                   ArgumentError);
    }
}

TEST_F(InplaceGemm, EmptyInputGivesEmptyOutput) {
  const auto w = at::ones({8, 32}, at::kBFloat16);
  for (const CpuTier tier : tiers_) {
    EXPECT_EQ(inplace_linear(at::zeros({0, 32}), w, {}, at::kFloat, Activation::None, {}, tier).sizes(),
              at::IntArrayRef({0, 8}));
  }
}

TEST_F(InplaceGemm, RejectsBadArguments) {
  const auto x = at::randn({4, 32});
  for (const CpuTier tier : tiers_) {
    SCOPED_TRACE(tier_text(tier));
    const auto linear = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& b = {},
                            at::ScalarType out = at::kFloat) {
      return inplace_linear(in, w, b, out, Activation::None, {}, tier);
    };
    EXPECT_THROW(linear(x, at::randn({8, 32})), ArgumentError);                    // float32 weight
    EXPECT_THROW(linear(x, at::randn({8, 16}).to(at::kBFloat16)), ArgumentError);  // K mismatch
    EXPECT_THROW(linear(x, at::randn({8, 32}).to(at::kBFloat16).t().contiguous().t()), ArgumentError);
    EXPECT_THROW(linear(x, at::randn({8, 32}).to(at::kBFloat16), at::randn({7})), ArgumentError);
    EXPECT_THROW(linear(x.to(at::kDouble), at::randn({8, 32}).to(at::kBFloat16)), ArgumentError);
    EXPECT_THROW(linear(x, at::randn({8, 32}).to(at::kBFloat16), {}, at::kDouble), ArgumentError);
    EXPECT_THROW(inplace_linear_many(x, {}, at::kFloat, tier), ArgumentError);
  }
}

}  // namespace
}  // namespace voken::core
