// Parity of StableDiffusion (txt2img and img2img loops) with diffusers v0.31.0 over every case
// of $VOKEN_GOLDEN_DIR/sd_loop (any folder of that layout). A case names its unet/vae/scheduler
// dirs and params; txt2img cases give latents_init (before init_noise_sigma), img2img cases
// (params.mode "img2img") give init_image in [0, 1] and the posterior and added noise. Every
// expected tensor is compared with its own tolerance from "tolerances" (else the case's).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "diffusion/sd_pipeline.h"

namespace voken::diffusion {
namespace {

std::pair<double, double> tolerance(const io::Json& c, const std::string& output) {
  if (c.contains("tolerances") && c.at("tolerances").contains(output)) {
    const auto& t = c.at("tolerances").at(output);
    return {t.at("atol").get<double>(), t.value("rtol", 0.0)};
  }
  return {c.at("atol").get<double>(), c.value("rtol", 0.0)};
}

TEST(SdLoopParity, AllCases) {
  auto golden = test::GoldenSet::open("sd_loop");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("sd_loop");
  std::map<std::string, std::unique_ptr<StableDiffusion>> pipelines;
  ASSERT_FALSE(golden->cases().empty());
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const std::string model = golden->json().value("model_dir", "model");
    const std::string unet_dir = golden->dir() + "/" + c.value("unet", model + "/unet");
    const std::string vae_dir = golden->dir() + "/" + c.value("vae", model + "/vae");
    const std::string scheduler_dir = golden->dir() + "/" + c.value("scheduler", model + "/scheduler");
    auto& pipeline = pipelines[unet_dir + "|" + vae_dir + "|" + scheduler_dir];
    if (!pipeline)
      pipeline = std::make_unique<StableDiffusion>(
          StableDiffusion::load(unet_dir, vae_dir, scheduler_dir, at::kFloat));

    const auto& params = c.at("params");
    DiffusionOptions options;
    options.steps = params.at("num_inference_steps").get<int64_t>();
    options.guidance_scale = params.at("guidance_scale").get<double>();
    options.height = params.at("height").get<int64_t>();
    options.width = params.at("width").get<int64_t>();
    options.eta = params.value("eta", 0.0);
    options.record_trace = true;
    const at::Tensor cond = golden->tensor(name + ".prompt_embeds");
    const at::Tensor negative = golden->tensor(name + ".negative_prompt_embeds");
    DiffusionResult result;
    if (params.value("mode", "txt2img") == "img2img") {
      options.strength = params.at("strength").get<double>();
      options.posterior_noise = golden->tensor(name + ".noise_posterior");
      options.noise = golden->tensor(name + ".noise");
      result = pipeline->img2img(golden->tensor(name + ".init_image"), cond, negative, options);
    } else {
      options.initial_latents = golden->tensor(name + ".latents_init");
      result = pipeline->generate(cond, negative, options);
    }

    test::ParityCase parity("sd_loop", name);
    const std::map<std::string, at::Tensor> got = {
        {"step_latents", at::stack(result.step_latents)},
        {"step_noise_pred", at::stack(result.step_noise_pred)},
        {"latents", result.latents},
        {"decoded", result.decoded},
        {"image", result.image},
        {"image_uint8", result.image_uint8},
        {"init_latents", result.init_latents},
        {"latents_start", result.latents_start},
    };
    const std::string timesteps_key = name + ".timesteps";
    if (golden->has(timesteps_key)) {
      const at::Tensor want = golden->tensor(timesteps_key);
      const auto [atol, rtol] = tolerance(c, timesteps_key);
      parity.compare("timesteps", result.timesteps.to(at::kDouble), want.to(at::kDouble), atol, rtol);
    }
    for (const auto& [output, tensor] : got) {
      const std::string key = name + "." + output;
      if (!golden->has(key)) continue;
      ASSERT_TRUE(tensor.defined()) << key;
      const auto [atol, rtol] = tolerance(c, key);
      const at::Tensor want = golden->tensor(key);
      parity.compare(output, tensor, want, atol, rtol);
      // The case line's max_abs_err is dominated by image_uint8's +-1 rounding: show each output.
      std::printf("  %s max_abs_err=%.3g atol=%.3g\n", key.c_str(),
                  (tensor.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>(), atol);
    }
    EXPECT_TRUE(parity.finish());
  }
}

}  // namespace
}  // namespace voken::diffusion
