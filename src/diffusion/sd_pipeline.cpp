#include "diffusion/sd_pipeline.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <sstream>
#include <utility>

#include "voken/error.h"

namespace voken::diffusion {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_finite(const at::Tensor& t, const char* what) {
  if (!at::isfinite(t).all().item<bool>())
    throw ArgumentError(std::string("StableDiffusion: ") + what + " contains NaN or Inf");
}

void check_steps(const DiffusionOptions& options) {
  if (options.steps < 1)
    throw ArgumentError("StableDiffusion: steps must be >= 1, got " + std::to_string(options.steps));
  if (!std::isfinite(options.guidance_scale))
    throw ArgumentError("StableDiffusion: guidance_scale must be finite");
}

void check_multiple_of_8(int64_t value, const char* what) {
  if (value <= 0 || value % 8 != 0)
    throw ArgumentError(std::string("StableDiffusion: ") + what + " must be a positive multiple of 8, got " +
                        std::to_string(value));
}

}  // namespace

StableDiffusion::StableDiffusion(UNet2DCondition unet, AutoencoderKL vae, SchedulerConfig scheduler)
    : unet_(std::make_shared<UNet2DCondition>(std::move(unet))),
      vae_(std::make_shared<AutoencoderKL>(std::move(vae))),
      scheduler_config_(std::move(scheduler)) {}

StableDiffusion StableDiffusion::load(const std::string& pipeline_dir,
                                      std::optional<at::ScalarType> float_dtype) {
  return load(pipeline_dir + "/unet", pipeline_dir + "/vae", pipeline_dir + "/scheduler", float_dtype);
}

StableDiffusion StableDiffusion::load(const std::string& unet_dir, const std::string& vae_dir,
                                      const std::string& scheduler_dir,
                                      std::optional<at::ScalarType> float_dtype) {
  c10::InferenceMode guard;
  return StableDiffusion(UNet2DCondition::load(unet_dir, float_dtype),
                         AutoencoderKL::load(vae_dir, float_dtype),
                         SchedulerConfig::from_file(scheduler_dir));
}

at::Tensor StableDiffusion::context(const at::Tensor& cond, const at::Tensor& negative,
                                    const DiffusionOptions& options, bool& guided) const {
  if (!cond.defined() || cond.dim() != 3)
    throw ArgumentError("StableDiffusion: cond must be [B, S, D] prompt embeddings, got " +
                        (cond.defined() ? shape_string(cond) : std::string("undefined")));
  if (unet_->context_dim() > 0 && cond.size(2) != unet_->context_dim())
    throw ArgumentError("StableDiffusion: cond has width " + std::to_string(cond.size(2)) +
                        ", the UNet expects " + std::to_string(unet_->context_dim()));
  check_finite(cond, "cond");
  // diffusers: do_classifier_free_guidance = guidance_scale > 1.
  guided = options.guidance_scale > 1.0;
  if (!guided) return cond.to(at::kFloat);
  if (!negative.defined())
    throw ArgumentError("StableDiffusion: guidance_scale > 1 needs negative prompt embeddings");
  if (negative.sizes() != cond.sizes())
    throw ArgumentError("StableDiffusion: negative " + shape_string(negative) + " must have cond's shape " +
                        shape_string(cond));
  check_finite(negative, "negative");
  return at::cat({negative.to(at::kFloat), cond.to(at::kFloat)}, 0);
}

void StableDiffusion::denoise(Scheduler& scheduler, int64_t first_step, at::Tensor latents,
                              const at::Tensor& context, bool guided, const DiffusionOptions& options,
                              const StepCallback& callback, at::Generator* generator,
                              DiffusionResult& result) const {
  const int64_t total = scheduler.num_steps() - first_step;
  result.timesteps = scheduler.timesteps().slice(0, first_step);
  StepOptions step_options;
  step_options.eta = options.eta;
  if (generator) step_options.generator = *generator;
  for (int64_t i = first_step; i < scheduler.num_steps(); ++i) {
    const at::Tensor model_input =
        scheduler.scale_model_input(guided ? at::cat({latents, latents}, 0) : latents, i);
    const at::Tensor prediction = unet_->forward(model_input, scheduler.timesteps()[i], context);
    at::Tensor noise_pred = prediction;
    if (guided) {
      auto halves = prediction.chunk(2, 0);
      noise_pred = halves[0] + options.guidance_scale * (halves[1] - halves[0]);
    }
    if (scheduler.is_stochastic(step_options) && !step_options.generator)
      throw ArgumentError("StableDiffusion: this scheduler is stochastic: pass a seed");
    latents = scheduler.step(noise_pred, i, latents, step_options);
    if (options.record_trace) {
      result.step_latents.push_back(latents);
      result.step_noise_pred.push_back(noise_pred);
    }
    if (callback && !callback(i - first_step + 1, total))
      throw Cancelled("StableDiffusion: cancelled by the step callback after step " +
                      std::to_string(i - first_step + 1) + " of " + std::to_string(total));
  }
  result.latents = latents;
  result.decoded = vae_->decode(latents / vae_->scaling_factor());
  result.image = (result.decoded / 2 + 0.5).clamp(0, 1);
  result.image_uint8 = (result.image * 255).round().permute({0, 2, 3, 1}).to(at::kByte).contiguous();
}

DiffusionResult StableDiffusion::generate(const at::Tensor& cond, const at::Tensor& negative,
                                          const DiffusionOptions& options,
                                          const StepCallback& callback) const {
  c10::InferenceMode guard;
  check_steps(options);
  check_multiple_of_8(options.height, "height");
  check_multiple_of_8(options.width, "width");
  bool guided = false;
  const at::Tensor ctx = context(cond, negative, options, guided);
  const int64_t batch = cond.size(0);
  const int64_t factor = int64_t{1} << (vae_->config().block_out_channels.size() - 1);
  const std::vector<int64_t> shape = {batch, unet_->config().in_channels, options.height / factor,
                                      options.width / factor};

  std::optional<at::Generator> generator;
  if (options.seed) generator = at::make_generator<at::CPUGeneratorImpl>(*options.seed);
  at::Tensor latents;
  if (options.initial_latents.defined()) {
    if (options.initial_latents.sizes() != at::IntArrayRef(shape))
      throw ArgumentError("StableDiffusion: initial_latents " + shape_string(options.initial_latents) +
                          " must be " + shape_string(at::empty(shape, at::kMeta)));
    check_finite(options.initial_latents, "initial_latents");
    latents = options.initial_latents.to(at::kFloat);
  } else if (generator) {
    latents = at::randn(shape, *generator, at::kFloat);
  } else {
    throw ArgumentError("StableDiffusion: pass a seed or initial_latents");
  }

  auto scheduler = make_scheduler(scheduler_config_);
  scheduler->set_timesteps(options.steps);
  latents = latents * scheduler->init_noise_sigma();
  DiffusionResult result;
  denoise(*scheduler, 0, latents, ctx, guided, options, callback, generator ? &*generator : nullptr, result);
  return result;
}

DiffusionResult StableDiffusion::img2img(const at::Tensor& image, const at::Tensor& cond,
                                         const at::Tensor& negative, const DiffusionOptions& options,
                                         const StepCallback& callback) const {
  c10::InferenceMode guard;
  check_steps(options);
  if (!(options.strength >= 0.0 && options.strength <= 1.0))
    throw ArgumentError("StableDiffusion: strength must be in [0, 1], got " +
                        std::to_string(options.strength));
  if (!image.defined() || image.dim() != 4 || image.size(1) != vae_->config().in_channels)
    throw ArgumentError("StableDiffusion: image must be [B, " + std::to_string(vae_->config().in_channels) +
                        ", H, W], got " + (image.defined() ? shape_string(image) : std::string("undefined")));
  check_multiple_of_8(image.size(2), "image height");
  check_multiple_of_8(image.size(3), "image width");
  check_finite(image, "image");
  bool guided = false;
  const at::Tensor ctx = context(cond, negative, options, guided);
  if (image.size(0) != cond.size(0))
    throw ArgumentError("StableDiffusion: image batch " + std::to_string(image.size(0)) + " != cond batch " +
                        std::to_string(cond.size(0)));

  auto scheduler = make_scheduler(scheduler_config_);
  scheduler->set_timesteps(options.steps);
  // diffusers get_timesteps: keep the last init_timestep steps of the schedule (order 1 here:
  // PNDM's repeated PLMS timestep is part of timesteps, counted in num_steps).
  const int64_t init_timestep =
      std::min(static_cast<int64_t>(static_cast<double>(options.steps) * options.strength), options.steps);
  const int64_t t_start = std::max<int64_t>(options.steps - init_timestep, 0);
  if (t_start >= scheduler->num_steps())
    throw ArgumentError("StableDiffusion: strength " + std::to_string(options.strength) + " with " +
                        std::to_string(options.steps) + " steps leaves no denoising step");

  std::optional<at::Generator> generator;
  if (options.seed) generator = at::make_generator<at::CPUGeneratorImpl>(*options.seed);
  const VaePosterior posterior = vae_->encode(image.to(at::kFloat) * 2 - 1);
  auto draw = [&](const at::Tensor& given, const char* what) {
    if (given.defined()) {
      if (given.sizes() != posterior.mean.sizes())
        throw ArgumentError(std::string("StableDiffusion: ") + what + " " + shape_string(given) +
                            " must be " + shape_string(posterior.mean));
      return given.to(at::kFloat);
    }
    if (!generator) throw ArgumentError(std::string("StableDiffusion: pass a seed or ") + what);
    return at::randn(posterior.mean.sizes(), *generator, at::kFloat);
  };
  const at::Tensor posterior_noise = draw(options.posterior_noise, "posterior_noise");
  DiffusionResult result;
  result.init_latents = posterior.sample(posterior_noise) * vae_->scaling_factor();
  const at::Tensor noise = draw(options.noise, "noise");
  result.latents_start = scheduler->add_noise(result.init_latents, noise, t_start);
  denoise(*scheduler, t_start, result.latents_start, ctx, guided, options, callback,
          generator ? &*generator : nullptr, result);
  return result;
}

}  // namespace voken::diffusion
