// DDIMScheduler (diffusers 0.31): denoising diffusion implicit models, formulas (12) and (16) of
// the DDIM paper; deterministic for eta = 0, ancestral-like noise for eta > 0.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <vector>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion::detail {
namespace {

class DdimScheduler final : public Scheduler {
 public:
  explicit DdimScheduler(SchedulerConfig config) : Scheduler(std::move(config)) {
    final_alpha_cumprod_ =
        config_.set_alpha_to_one ? at::scalar_tensor(1.0, at::kFloat) : alphas_cumprod_.select(0, 0);
  }

  std::unique_ptr<Scheduler> clone() const override { return std::make_unique<DdimScheduler>(config_); }

  bool is_stochastic(const StepOptions& options) const override { return options.eta > 0; }

  void set_timesteps(int64_t num_inference_steps) override {
    c10::InferenceMode guard;
    check_num_inference_steps(num_inference_steps);
    const int64_t train = config_.num_train_timesteps;
    const int64_t n = num_inference_steps;
    std::vector<int64_t> timesteps;  // descending
    if (config_.timestep_spacing == "linspace") {
      const auto values = np_linspace(0, static_cast<double>(train - 1), n);
      for (auto it = values.rbegin(); it != values.rend(); ++it)
        timesteps.push_back(static_cast<int64_t>(np_round(*it)));
    } else if (config_.timestep_spacing == "leading") {
      const int64_t ratio = train / n;
      for (int64_t i = n - 1; i >= 0; --i) timesteps.push_back(i * ratio + config_.steps_offset);
    } else {  // trailing
      const double ratio = static_cast<double>(train) / static_cast<double>(n);
      for (const double t : np_arange(static_cast<double>(train), 0.0, -ratio))
        timesteps.push_back(static_cast<int64_t>(np_round(t)) - 1);
    }
    for (const int64_t t : timesteps)
      if (t < 0 || t >= train)
        throw ArgumentError("DDIMScheduler::set_timesteps: " + std::to_string(n) +
                            " steps with steps_offset " + std::to_string(config_.steps_offset) +
                            " give timestep " + std::to_string(t) + ", outside the trained range [0, " +
                            std::to_string(train) + ")");
    timesteps_ = long_tensor(timesteps);
    num_inference_steps_ = n;
    next_step_index_ = -1;
  }

  at::Tensor step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                  const StepOptions& options) override {
    c10::InferenceMode guard;
    check_step_index(step_index, "step");
    if (options.eta < 0)
      throw ArgumentError("DDIMScheduler::step: eta must be >= 0, got " + std::to_string(options.eta));
    const int64_t timestep = timesteps_[step_index].item<int64_t>();
    // 1. previous step value
    const int64_t prev_timestep = timestep - config_.num_train_timesteps / num_inference_steps_;
    // 2. alphas, betas
    const auto alpha_prod_t = element(alphas_cumprod_, timestep, "DDIMScheduler::step");
    const auto alpha_prod_t_prev = prev_timestep >= 0
                                       ? element(alphas_cumprod_, prev_timestep, "DDIMScheduler::step")
                                       : final_alpha_cumprod_;
    const auto beta_prod_t = at::rsub(alpha_prod_t, 1);
    // 3. predicted x0 and noise
    at::Tensor pred_original_sample, pred_epsilon;
    if (config_.prediction_type == "epsilon") {
      pred_original_sample = (sample - at::pow(beta_prod_t, 0.5) * model_output) / at::pow(alpha_prod_t, 0.5);
      pred_epsilon = model_output;
    } else if (config_.prediction_type == "sample") {
      pred_original_sample = model_output;
      pred_epsilon = (sample - at::pow(alpha_prod_t, 0.5) * pred_original_sample) / at::pow(beta_prod_t, 0.5);
    } else {  // v_prediction
      pred_original_sample = at::pow(alpha_prod_t, 0.5) * sample - at::pow(beta_prod_t, 0.5) * model_output;
      pred_epsilon = at::pow(alpha_prod_t, 0.5) * model_output + at::pow(beta_prod_t, 0.5) * sample;
    }
    // 4. clip or threshold x0
    if (config_.thresholding) {
      pred_original_sample = threshold_sample(pred_original_sample, config_.dynamic_thresholding_ratio,
                                              config_.sample_max_value);
    } else if (config_.clip_sample) {
      pred_original_sample =
          pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);
    }
    // 5. sigma_t(eta), formula (16)
    const auto beta_prod_t_prev = at::rsub(alpha_prod_t_prev, 1);
    const auto variance = (beta_prod_t_prev / beta_prod_t) * at::rsub(alpha_prod_t / alpha_prod_t_prev, 1);
    const auto std_dev_t = at::pow(variance, 0.5) * options.eta;
    if (options.use_clipped_model_output)
      pred_epsilon = (sample - at::pow(alpha_prod_t, 0.5) * pred_original_sample) / at::pow(beta_prod_t, 0.5);
    // 6-7. direction pointing to x_t, and x_(t-1) without noise, formula (12)
    const auto pred_sample_direction =
        at::pow(at::rsub(alpha_prod_t_prev, 1) - at::pow(std_dev_t, 2), 0.5) * pred_epsilon;
    auto prev_sample = at::pow(alpha_prod_t_prev, 0.5) * pred_original_sample + pred_sample_direction;
    if (options.eta > 0) {
      const auto noise = step_noise(model_output, options, model_output.scalar_type());
      prev_sample = prev_sample + std_dev_t * noise;
    }
    next_step_index_ = step_index + 1;
    return prev_sample;
  }

 private:
  at::Tensor final_alpha_cumprod_;
};

}  // namespace

std::unique_ptr<Scheduler> make_ddim(const SchedulerConfig& config) {
  return std::make_unique<DdimScheduler>(config);
}

}  // namespace voken::diffusion::detail
