// EulerDiscreteScheduler (diffusers 0.31): Euler steps of the probability-flow ODE in sigma
// space (k-diffusion's sample_euler), sigmas interpolated from the training schedule, Karras or
// exponential sigma spacing optional.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <vector>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion::detail {

// The timestep spacing Euler and Euler ancestral share: float32 values, descending.
std::vector<float> euler_timesteps(const SchedulerConfig& config, int64_t n) {
  const int64_t train = config.num_train_timesteps;
  std::vector<float> timesteps;
  if (config.timestep_spacing == "linspace") {
    const auto values = np_linspace(0, static_cast<double>(train - 1), n);
    for (auto it = values.rbegin(); it != values.rend(); ++it) timesteps.push_back(static_cast<float>(*it));
  } else if (config.timestep_spacing == "leading") {
    const int64_t ratio = train / n;
    for (int64_t i = n - 1; i >= 0; --i)
      timesteps.push_back(static_cast<float>(i * ratio) + static_cast<float>(config.steps_offset));
  } else {  // trailing
    const double ratio = static_cast<double>(train) / static_cast<double>(n);
    for (const double t : np_arange(static_cast<double>(train), 0.0, -ratio))
      timesteps.push_back(static_cast<float>(np_round(t)) - 1.0f);
  }
  return timesteps;
}

namespace {

class EulerScheduler final : public Scheduler {
 public:
  explicit EulerScheduler(SchedulerConfig config) : Scheduler(std::move(config)) {
    c10::InferenceMode guard;
    // Close to 0 without being 0, so that the first sigma is finite (diffusers uses 2**-24).
    if (config_.rescale_betas_zero_snr) alphas_cumprod_[-1] = std::ldexp(1.0, -24);
  }

  std::unique_ptr<Scheduler> clone() const override { return std::make_unique<EulerScheduler>(config_); }

  void set_timesteps(int64_t num_inference_steps) override {
    c10::InferenceMode guard;
    check_num_inference_steps(num_inference_steps);
    const int64_t n = num_inference_steps;
    const auto timesteps32 = euler_timesteps(config_, n);
    std::vector<double> timesteps(timesteps32.begin(), timesteps32.end());

    const auto train_sigmas = training_sigmas(alphas_cumprod_);
    const auto log_sigmas = log_f32(train_sigmas);
    std::vector<double> sigmas;
    if (config_.interpolation_type == "linear") {
      sigmas = np_interp_on_index(timesteps, train_sigmas);
    } else {  // log_linear: torch.linspace(log(sigma_max), log(sigma_min), n + 1).exp(), as upstream
      const auto values = at::linspace(static_cast<double>(log_sigmas.back()),
                                       static_cast<double>(log_sigmas.front()), n + 1, at::kFloat)
                              .exp();
      sigmas.assign(values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
    }

    if (config_.use_karras_sigmas || config_.use_exponential_sigmas) {
      const double sigma_min = config_.sigma_min.value_or(sigmas.back());
      const double sigma_max = config_.sigma_max.value_or(sigmas.front());
      timesteps.clear();
      if (config_.use_karras_sigmas) {
        sigmas = karras_sigmas(sigma_min, sigma_max, n);
        for (const double sigma : sigmas) timesteps.push_back(sigma_to_t(log_sigma_for_t(sigma), log_sigmas));
      } else {
        // float32 torch sigmas, whose float32 logs _sigma_to_t then uses.
        const auto values = at::linspace(std::log(sigma_max), std::log(sigma_min), n, at::kFloat).exp();
        sigmas.assign(values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
        for (const double sigma : sigmas) {
          const float clamped = std::max(static_cast<float>(sigma), 1e-10f);
          timesteps.push_back(
              sigma_to_t(static_cast<float>(std::log(static_cast<double>(clamped))), log_sigmas));
        }
      }
    }

    if (config_.final_sigmas_type == "sigma_min") {
      const auto first = alphas_cumprod_.select(0, 0);
      sigmas.push_back(at::pow(at::rsub(first, 1) / first, 0.5).item<float>());
    } else {
      sigmas.push_back(0.0);
    }
    sigmas_ = float_tensor(sigmas);

    if (config_.timestep_type == "continuous" && config_.prediction_type == "v_prediction") {
      // 0.25 * log(sigma), one float32 0-dim op per sigma as upstream.
      std::vector<double> continuous;
      for (int64_t i = 0; i + 1 < sigmas_.size(0); ++i)
        continuous.push_back((at::log(sigmas_.select(0, i)) * 0.25).item<float>());
      timesteps_ = float_tensor(continuous);
    } else {
      timesteps_ = float_tensor(timesteps);
    }
    num_inference_steps_ = n;
    next_step_index_ = -1;
  }

  double init_noise_sigma() const override {
    c10::InferenceMode guard;
    if (!sigmas_.defined())
      throw ArgumentError("EulerDiscreteScheduler::init_noise_sigma: set_timesteps() has not been called");
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
    const auto sample32 = sample.to(at::kFloat);
    const auto sigma = sigmas_.select(0, step_index);
    // s_churn = 0 (diffusers' default and the pipelines'): gamma = 0, sigma_hat = sigma * 1.
    const auto sigma_hat = sigma * 1.0;
    at::Tensor pred_original_sample;
    if (config_.prediction_type == "epsilon") {
      pred_original_sample = sample32 - sigma_hat * model_output;
    } else if (config_.prediction_type == "v_prediction") {
      pred_original_sample =
          model_output * (-sigma / at::pow(at::pow(sigma, 2) + 1, 0.5)) + sample32 / (at::pow(sigma, 2) + 1);
    } else {  // sample / original_sample
      pred_original_sample = model_output;
    }
    const auto derivative = (sample32 - pred_original_sample) / sigma_hat;
    const auto dt = sigmas_.select(0, step_index + 1) - sigma_hat;
    const auto prev_sample = sample32 + derivative * dt;
    next_step_index_ = step_index + 1;
    return prev_sample.to(model_output.scalar_type());
  }

  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise,
                       int64_t step_index) const override {
    c10::InferenceMode guard;
    check_step_index(step_index, "add_noise");
    if (!noise.sizes().equals(original.sizes()))
      throw ArgumentError("EulerDiscreteScheduler::add_noise: noise has shape " + c10::str(noise.sizes()) +
                          ", original has " + c10::str(original.sizes()));
    const auto sigma = sigmas_.to(original.device(), original.scalar_type()).select(0, step_index);
    return original + noise * sigma;
  }
};

}  // namespace

std::unique_ptr<Scheduler> make_euler(const SchedulerConfig& config) {
  return std::make_unique<EulerScheduler>(config);
}

}  // namespace voken::diffusion::detail
