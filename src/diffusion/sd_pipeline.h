// Stable Diffusion text-to-image and image-to-image loops with classifier-free guidance, equal
// to diffusers v0.31.0 StableDiffusionPipeline / StableDiffusionImg2ImgPipeline given the prompt
// embeddings (the text encoder is not part of this component).
//
// txt2img: latents = randn([B, C, height/8, width/8], generator seeded with `seed`) (or the
// caller's initial_latents) * init_noise_sigma; per step: one UNet call on [negative, positive]
// (batch 2B) with scale_model_input(latents), noise = uncond + g * (cond - uncond), scheduler
// step. guidance_scale <= 1 skips the negative (UNet batch B), as diffusers does. Then
// decode(latents / scaling_factor), image = clamp(decoded / 2 + 0.5, 0, 1), uint8 = round(255 x).
//
// A seed gives the same initial latents as Python's `torch.manual_seed(seed); torch.randn(shape)`
// and as the pipeline's `generator=torch.Generator().manual_seed(seed)`: the draw is
// at::randn(shape, CPUGeneratorImpl(seed)) (scheduler.h documents and tests the generator
// equality).
//
// img2img: image in [0, 1] -> 2x - 1 -> VAE posterior sample (mean + std * noise) *
// scaling_factor; of the `steps` schedule, the last min(int(steps * strength), steps) steps are
// run, starting from add_noise(init_latents, noise, first kept step). With a seed the posterior
// noise is drawn first, then the added noise, from the same generator (diffusers' order).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "diffusion/scheduler.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"

namespace voken::diffusion {

// Called after each denoising step with (steps done, steps in this run); return false to stop
// (the generation then throws voken::Cancelled).
using StepCallback = std::function<bool(int64_t step, int64_t total)>;

struct DiffusionOptions {
  int64_t steps = 50;            // num_inference_steps, >= 1
  double guidance_scale = 7.5;   // <= 1: no classifier-free guidance (negative unused)
  std::optional<uint64_t> seed;  // for the initial latents (txt2img) / posterior + noise (img2img)
  at::Tensor initial_latents;    // txt2img: [B, C, h, w] before init_noise_sigma; wins over seed
  int64_t height = 512;          // txt2img: multiples of 8 (the VAE factor); img2img: from image
  int64_t width = 512;
  double strength = 0.8;       // img2img: in [0, 1]
  at::Tensor posterior_noise;  // img2img: noise of the posterior sample (else from seed)
  at::Tensor noise;            // img2img: noise added to init_latents (else from seed)
  double eta = 0.0;            // DDIM's eta
  bool record_trace = false;   // fill DiffusionResult's per-step trace
};

struct DiffusionResult {
  at::Tensor latents;      // float32 [B, C, h, w], final
  at::Tensor decoded;      // float32 [B, 3, H, W], raw VAE output
  at::Tensor image;        // float32 [B, 3, H, W] in [0, 1]
  at::Tensor image_uint8;  // uint8 [B, H, W, 3] (RGB)
  at::Tensor timesteps;    // the timesteps run
  // img2img only.
  at::Tensor init_latents;   // scaled posterior sample
  at::Tensor latents_start;  // init_latents noised to the first step
  // With record_trace: per step, the latents after the step and the guided noise prediction.
  std::vector<at::Tensor> step_latents;
  std::vector<at::Tensor> step_noise_pred;
};

class StableDiffusion {
 public:
  StableDiffusion(UNet2DCondition unet, AutoencoderKL vae, SchedulerConfig scheduler);

  // A diffusers pipeline directory (unet/, vae/, scheduler/).
  static StableDiffusion load(const std::string& pipeline_dir,
                              std::optional<at::ScalarType> float_dtype = std::nullopt);
  static StableDiffusion load(const std::string& unet_dir, const std::string& vae_dir,
                              const std::string& scheduler_dir,
                              std::optional<at::ScalarType> float_dtype = std::nullopt);

  // cond, negative: [B, S, D] prompt embeddings (negative may be undefined: zeros are not
  // substituted, so it is required when guidance_scale > 1). ArgumentError for bad sizes, steps,
  // NaN/Inf in the embeddings; Cancelled when the callback returns false.
  DiffusionResult generate(const at::Tensor& cond, const at::Tensor& negative,
                           const DiffusionOptions& options, const StepCallback& callback = {}) const;
  // image: float [B, 3, H, W] in [0, 1], H and W multiples of 8.
  DiffusionResult img2img(const at::Tensor& image, const at::Tensor& cond, const at::Tensor& negative,
                          const DiffusionOptions& options, const StepCallback& callback = {}) const;

  const UNet2DCondition& unet() const { return *unet_; }
  const AutoencoderKL& vae() const { return *vae_; }
  const SchedulerConfig& scheduler_config() const { return scheduler_config_; }
  void set_scheduler_config(SchedulerConfig config) { scheduler_config_ = std::move(config); }

 private:
  // The denoising loop from step `first_step` of `scheduler`, then decoding into `result`.
  void denoise(Scheduler& scheduler, int64_t first_step, at::Tensor latents, const at::Tensor& context,
               bool guided, const DiffusionOptions& options, const StepCallback& callback,
               at::Generator* generator, DiffusionResult& result) const;
  at::Tensor context(const at::Tensor& cond, const at::Tensor& negative, const DiffusionOptions& options,
                     bool& guided) const;

  std::shared_ptr<UNet2DCondition> unet_;
  std::shared_ptr<AutoencoderKL> vae_;
  SchedulerConfig scheduler_config_;
};

}  // namespace voken::diffusion
