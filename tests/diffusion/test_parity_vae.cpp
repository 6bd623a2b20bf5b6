// Parity of AutoencoderKL with diffusers v0.31.0 over every case of $VOKEN_GOLDEN_DIR/vae (any
// folder of that layout). Cases are dispatched on their input tensors:
//   <case>.latents            -> decode(latents / scaling_factor), output <case>.image
//   <case>.image (+ .noise)   -> encode: <case>.mean, <case>.logvar, <case>.sample = mean + std * noise
// The model is <model_dir>/vae/ (the case's own model_dir when it has one); scaling_factor comes
// from the case's params, else from the VAE's config. Tolerances: per tensor from "tolerances",
// else the case's atol/rtol.
//
// bfloat16 runs of the same cases are compared with the float32 expectation within 5% of each
// output's largest magnitude, upstream's own bfloat16 distance ("info_bf16_maxdiff") printed
// beside (lines "BF16 vae/<case>@<tier> ..."; PARITY lines are float32 only).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "diffusion/vae.h"

namespace voken::diffusion {
namespace {

namespace fs = std::filesystem;

// bfloat16 runs: max |got - expected| <= this fraction of max |expected| (about 3 bf16 ulps of
// the output's scale, accumulated over the network; upstream's own bf16 error is printed beside).
constexpr double kBf16RelativeTolerance = 0.05;

std::string vae_dir(const test::GoldenSet& golden, const io::Json& c) {
  const std::string model_dir = c.contains("model_dir") ? c.at("model_dir").get<std::string>()
                                                        : golden.json().value("model_dir", "model");
  const std::string base = golden.dir() + "/" + model_dir;
  return fs::exists(base + "/vae/config.json") ? base + "/vae" : base;
}

std::pair<double, double> tolerance(const io::Json& c, const std::string& output) {
  if (c.contains("tolerances") && c.at("tolerances").contains(output)) {
    const auto& t = c.at("tolerances").at(output);
    return {t.at("atol").get<double>(), t.value("rtol", 0.0)};
  }
  return {c.at("atol").get<double>(), c.value("rtol", 0.0)};
}

class VaeParity : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = test::GoldenSet::open("vae");
    if (!golden_) GTEST_SKIP() << test::GoldenSet::missing_reason("vae");
  }
  const AutoencoderKL& model(const std::string& dir, at::ScalarType dtype) {
    auto& slot = models_[dir + "|" + c10::toString(dtype)];
    if (!slot) slot = std::make_unique<AutoencoderKL>(AutoencoderKL::load(dir, dtype));
    return *slot;
  }
  // Every output of the case, computed in `dtype`.
  std::map<std::string, at::Tensor> run(const io::Json& c, at::ScalarType dtype) {
    const std::string name = c.at("name").get<std::string>();
    const auto& vae = model(vae_dir(*golden_, c), dtype);
    std::map<std::string, at::Tensor> out;
    if (golden_->has(name + ".latents")) {
      double scaling = vae.scaling_factor();
      if (c.contains("params") && c.at("params").contains("scaling_factor"))
        scaling = c.at("params").at("scaling_factor").get<double>();
      out[name + ".image"] = vae.decode(golden_->tensor(name + ".latents") / scaling);
    } else {
      EXPECT_TRUE(golden_->has(name + ".image")) << name << ": neither latents nor image among the inputs";
      const VaePosterior posterior = vae.encode(golden_->tensor(name + ".image"));
      out[name + ".mean"] = posterior.mean;
      out[name + ".logvar"] = posterior.logvar;
      if (golden_->has(name + ".noise"))
        out[name + ".sample"] = posterior.sample(golden_->tensor(name + ".noise"));
    }
    return out;
  }
  std::optional<test::GoldenSet> golden_;
  std::map<std::string, std::unique_ptr<AutoencoderKL>> models_;
};

TEST_F(VaeParity, EveryGoldenCaseFloat32) {
  ASSERT_FALSE(golden_->cases().empty());
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    test::ParityCase parity("vae", name);
    const auto got = run(c, at::kFloat);
    for (const auto& [output, description] : c.at("outputs").items()) {
      const auto it = got.find(output);
      const auto [atol, rtol] = tolerance(c, output);
      parity.compare(output, it == got.end() ? at::Tensor() : it->second, golden_->tensor(output), atol,
                     rtol);
    }
    EXPECT_TRUE(parity.finish());
  }
}

TEST_F(VaeParity, EveryGoldenCaseBFloat16) {
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const auto got = run(c, at::kBFloat16);
    for (const auto& [output, description] : c.at("outputs").items()) {
      const auto it = got.find(output);
      ASSERT_NE(it, got.end()) << output;
      const double upstream_bf16 =
          c.contains("info_bf16_maxdiff") && c.at("info_bf16_maxdiff").contains(output)
              ? c.at("info_bf16_maxdiff").at(output).get<double>()
              : -1.0;
      test::check_bf16("vae", name, output, it->second, golden_->tensor(output), kBf16RelativeTolerance,
                       upstream_bf16);
    }
  }
}

}  // namespace
}  // namespace voken::diffusion
