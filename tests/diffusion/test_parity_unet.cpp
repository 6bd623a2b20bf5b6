// Parity of UNet2DCondition with diffusers v0.31.0 UNet2DConditionModel.forward over every case of
// $VOKEN_GOLDEN_DIR/unet (any folder of that layout). Each case loads <model_dir>/unet/ (the case's
// own model_dir when it has one, else the folder's), feeds <case>.sample, <case>.timestep and
// <case>.encoder_hidden_states, and compares every output (noise_pred) with the per-tensor
// tolerance of cases.json ("tolerances", else the case's atol/rtol).
//
// The same cases also run with bfloat16 weights and activations, against the float32 expectation
// with a looser tolerance documented here (not in the golden): max |err| <= 5% of the output's
// largest magnitude. Upstream's own bfloat16 distance ("info_bf16_maxdiff") is printed beside for
// comparison. Those lines read "BF16 unet/<case>@<tier> ..." (PARITY lines are float32 only).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "diffusion/unet.h"

namespace voken::diffusion {
namespace {

namespace fs = std::filesystem;

// bfloat16 runs: max |got - expected| <= this fraction of max |expected| (about 3 bf16 ulps of
// the output's scale, accumulated over the network; upstream's own bf16 error is printed beside).
constexpr double kBf16RelativeTolerance = 0.05;

// <dir>/<model_dir>/unet when it holds a config, else <dir>/<model_dir> itself.
std::string unet_dir(const test::GoldenSet& golden, const io::Json& c) {
  const std::string model_dir = c.contains("model_dir") ? c.at("model_dir").get<std::string>()
                                                        : golden.json().value("model_dir", "model");
  const std::string base = golden.dir() + "/" + model_dir;
  return fs::exists(base + "/unet/config.json") ? base + "/unet" : base;
}

std::pair<double, double> tolerance(const io::Json& c, const std::string& output) {
  if (c.contains("tolerances") && c.at("tolerances").contains(output)) {
    const auto& t = c.at("tolerances").at(output);
    return {t.at("atol").get<double>(), t.value("rtol", 0.0)};
  }
  return {c.at("atol").get<double>(), c.value("rtol", 0.0)};
}

class UNetParity : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = test::GoldenSet::open("unet");
    if (!golden_) GTEST_SKIP() << test::GoldenSet::missing_reason("unet");
  }
  const UNet2DCondition& model(const std::string& dir, at::ScalarType dtype) {
    auto& slot = models_[dir + "|" + c10::toString(dtype)];
    if (!slot) slot = std::make_unique<UNet2DCondition>(UNet2DCondition::load(dir, dtype));
    return *slot;
  }
  at::Tensor run(const io::Json& c, at::ScalarType dtype) {
    const std::string name = c.at("name").get<std::string>();
    const auto& unet = model(unet_dir(*golden_, c), dtype);
    return unet.forward(golden_->tensor(name + ".sample"), golden_->tensor(name + ".timestep"),
                        golden_->tensor(name + ".encoder_hidden_states"));
  }
  std::optional<test::GoldenSet> golden_;
  std::map<std::string, std::unique_ptr<UNet2DCondition>> models_;
};

TEST_F(UNetParity, EveryGoldenCaseFloat32) {
  ASSERT_FALSE(golden_->cases().empty());
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    test::ParityCase parity("unet", name);
    const at::Tensor got = run(c, at::kFloat);
    for (const auto& [output, description] : c.at("outputs").items()) {
      const auto [atol, rtol] = tolerance(c, output);
      parity.compare(output, got, golden_->tensor(output), atol, rtol);
    }
    EXPECT_TRUE(parity.finish());
  }
}

TEST_F(UNetParity, EveryGoldenCaseBFloat16) {
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const at::Tensor got = run(c, at::kBFloat16);
    for (const auto& [output, description] : c.at("outputs").items()) {
      const double upstream_bf16 =
          c.contains("info_bf16_maxdiff") && c.at("info_bf16_maxdiff").contains(output)
              ? c.at("info_bf16_maxdiff").at(output).get<double>()
              : -1.0;
      test::check_bf16("unet", name, output, got, golden_->tensor(output), kBf16RelativeTolerance,
                       upstream_bf16);
    }
  }
}

}  // namespace
}  // namespace voken::diffusion
