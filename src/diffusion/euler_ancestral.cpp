// EulerAncestralDiscreteScheduler (diffusers 0.31): Euler step down to sigma_down, then fresh
// noise of scale sigma_up (k-diffusion's sample_euler_ancestral, eta = 1). One randn draw of the
// model output's shape per step.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <vector>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion::detail {
namespace {

class EulerAncestralScheduler final : public Scheduler {
 public:
  explicit EulerAncestralScheduler(SchedulerConfig config) : Scheduler(std::move(config)) {
    c10::InferenceMode guard;
    if (config_.rescale_betas_zero_snr) alphas_cumprod_[-1] = std::ldexp(1.0, -24);
  }

  std::unique_ptr<Scheduler> clone() const override {
    return std::make_unique<EulerAncestralScheduler>(config_);
  }

  bool is_stochastic(const StepOptions&) const override { return true; }

  void set_timesteps(int64_t num_inference_steps) override {
    c10::InferenceMode guard;
    check_num_inference_steps(num_inference_steps);
    const auto timesteps32 = euler_timesteps(config_, num_inference_steps);
    const std::vector<double> timesteps(timesteps32.begin(), timesteps32.end());
    auto sigmas = np_interp_on_index(timesteps, training_sigmas(alphas_cumprod_));
    sigmas.push_back(0.0);
    sigmas_ = float_tensor(sigmas);
    timesteps_ = float_tensor(timesteps);
    num_inference_steps_ = num_inference_steps;
    next_step_index_ = -1;
  }

  double init_noise_sigma() const override {
    c10::InferenceMode guard;
    if (!sigmas_.defined())
      throw ArgumentError(
          "EulerAncestralDiscreteScheduler::init_noise_sigma: set_timesteps() has not been called");
    const auto max_sigma = sigmas_.max();
    if (config_.timestep_spacing == "linspace" || config_.timestep_spacing == "trailing")
      return max_sigma.item<double>();
    return at::pow(at::pow(max_sigma, 2) + 1, 0.5).item<double>();
  }

  at::Tensor scale_model_input(const at::Tensor& sample, int64_t step_index) const override {
    c10::InferenceMode guard;
    check_step_index(step_index, "scale_model_input");
    const auto sigma = sigmas_.select(0, step_index);
    return sample / at::pow(at::pow(sigma, 2) + 1, 0.5);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                  const StepOptions& options) override {
    c10::InferenceMode guard;
    check_step_index(step_index, "step");
    const auto sigma = sigmas_.select(0, step_index);
    const auto sample32 = sample.to(at::kFloat);
    // 1. predicted x0
    at::Tensor pred_original_sample;
    if (config_.prediction_type == "epsilon") {
      pred_original_sample = sample32 - sigma * model_output;
    } else {  // v_prediction
      pred_original_sample =
          model_output * (-sigma / at::pow(at::pow(sigma, 2) + 1, 0.5)) + sample32 / (at::pow(sigma, 2) + 1);
    }
    // 2. ancestral split of the step: deterministic down to sigma_down, noise of scale sigma_up
    const auto& sigma_from = sigma;
    const auto sigma_to = sigmas_.select(0, step_index + 1);
    const auto sigma_up = at::pow(
        at::pow(sigma_to, 2) * (at::pow(sigma_from, 2) - at::pow(sigma_to, 2)) / at::pow(sigma_from, 2), 0.5);
    const auto sigma_down = at::pow(at::pow(sigma_to, 2) - at::pow(sigma_up, 2), 0.5);
    const auto derivative = (sample32 - pred_original_sample) / sigma;
    const auto dt = sigma_down - sigma;
    auto prev_sample = sample32 + derivative * dt;
    const auto noise = step_noise(model_output, options, model_output.scalar_type());
    prev_sample = prev_sample + noise * sigma_up;
    next_step_index_ = step_index + 1;
    return prev_sample.to(model_output.scalar_type());
  }

  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise,
                       int64_t step_index) const override {
    c10::InferenceMode guard;
    check_step_index(step_index, "add_noise");
    if (!noise.sizes().equals(original.sizes()))
      throw ArgumentError("EulerAncestralDiscreteScheduler::add_noise: noise has shape " +
                          c10::str(noise.sizes()) + ", original has " + c10::str(original.sizes()));
    const auto sigma = sigmas_.to(original.device(), original.scalar_type()).select(0, step_index);
    return original + noise * sigma;
  }
};

}  // namespace

std::unique_ptr<Scheduler> make_euler_ancestral(const SchedulerConfig& config) {
  return std::make_unique<EulerAncestralScheduler>(config);
}

}  // namespace voken::diffusion::detail
