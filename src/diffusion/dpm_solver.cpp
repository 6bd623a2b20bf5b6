// DPMSolverMultistepScheduler (diffusers 0.31): DPM-Solver / DPM-Solver++ multistep, orders 1-3,
// midpoint or Heun second-order updates, optional SDE variants. The default configuration
// (dpmsolver++, order 2, midpoint, lower_order_final) is "DPM++ 2M"; with Karras sigmas it is
// "DPM++ 2M Karras".
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <vector>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion::detail {
namespace {

struct AlphaSigma {
  at::Tensor alpha;
  at::Tensor sigma;
};

// alpha_t = 1 / sqrt(sigma^2 + 1) (Python's `1 / x` is x.reciprocal() * 1), sigma_t = sigma * alpha_t.
AlphaSigma alpha_sigma(const at::Tensor& sigma) {
  auto alpha = at::reciprocal(at::pow(at::pow(sigma, 2) + 1, 0.5)) * 1;
  auto sigma_t = sigma * alpha;
  return {std::move(alpha), std::move(sigma_t)};
}

at::Tensor lambda_of(const AlphaSigma& as) { return at::log(as.alpha) - at::log(as.sigma); }

bool starts_with_sde(const std::string& algorithm) { return algorithm.rfind("sde-", 0) == 0; }

class DpmSolverScheduler final : public Scheduler {
 public:
  explicit DpmSolverScheduler(SchedulerConfig config) : Scheduler(std::move(config)) {
    c10::InferenceMode guard;
    if (config_.rescale_betas_zero_snr) alphas_cumprod_[-1] = std::ldexp(1.0, -24);
    // The VP schedule's log-SNR, only needed for lambda_min_clipped.
    lambda_t_ = at::log(at::sqrt(alphas_cumprod_)) - at::log(at::sqrt(at::rsub(alphas_cumprod_, 1)));
  }

  std::unique_ptr<Scheduler> clone() const override { return std::make_unique<DpmSolverScheduler>(config_); }

  bool is_stochastic(const StepOptions&) const override { return starts_with_sde(config_.algorithm_type); }

  void set_timesteps(int64_t num_inference_steps) override {
    c10::InferenceMode guard;
    check_num_inference_steps(num_inference_steps);
    const int64_t train = config_.num_train_timesteps;
    const int64_t n = num_inference_steps;
    // Clip the smallest lambdas (critical for the cosine schedule); -inf by default: no clipping.
    const int64_t clipped_idx =
        at::searchsorted(at::flip(lambda_t_, {0}), at::Scalar(config_.lambda_min_clipped)).item<int64_t>();
    const int64_t last_timestep = train - clipped_idx;

    std::vector<double> timesteps;  // integral values, descending
    if (config_.timestep_spacing == "linspace") {
      const auto values = np_linspace(0, static_cast<double>(last_timestep - 1), n + 1);
      for (int64_t i = n; i >= 1; --i) timesteps.push_back(np_round(values[i]));
    } else if (config_.timestep_spacing == "leading") {
      const int64_t ratio = last_timestep / (n + 1);
      for (int64_t i = n; i >= 1; --i)
        timesteps.push_back(static_cast<double>(i * ratio + config_.steps_offset));
    } else {  // trailing
      const double ratio = static_cast<double>(train) / static_cast<double>(n);
      for (const double t : np_arange(static_cast<double>(last_timestep), 0.0, -ratio))
        timesteps.push_back(static_cast<double>(static_cast<int64_t>(np_round(t)) - 1));
    }

    const auto train_sigmas = training_sigmas(alphas_cumprod_);
    const auto log_sigmas = log_f32(train_sigmas);
    std::vector<double> sigmas;
    if (config_.use_karras_sigmas) {
      // Karras from the flipped (descending) training sigmas; sigma_min/sigma_max keys of the
      // file win, as diffusers' hasattr(config, "sigma_min") lookup does.
      const double sigma_min = config_.sigma_min.value_or(train_sigmas.front());
      const double sigma_max = config_.sigma_max.value_or(train_sigmas.back());
      sigmas = karras_sigmas(sigma_min, sigma_max, n);
      timesteps.clear();
      for (const double sigma : sigmas)
        timesteps.push_back(np_round(sigma_to_t(log_sigma_for_t(sigma), log_sigmas)));
    } else if (config_.use_lu_lambdas) {
      // Uniform in log sigma between the extremes (rho = 1), as upstream's _convert_to_lu.
      const double lambda_min = log_sigmas.front();
      const double lambda_max = log_sigmas.back();
      timesteps.clear();
      for (const double r : np_linspace(0.0, 1.0, n)) {
        const double sigma = std::exp(lambda_max + r * (lambda_min - lambda_max));
        sigmas.push_back(sigma);
        timesteps.push_back(np_round(sigma_to_t(log_sigma_for_t(sigma), log_sigmas)));
      }
    } else {
      sigmas = np_interp_on_index(timesteps, train_sigmas);
    }
    if (config_.final_sigmas_type == "sigma_min") {
      const auto first = alphas_cumprod_.select(0, 0);
      sigmas.push_back(at::pow(at::rsub(first, 1) / first, 0.5).item<float>());
    } else {
      sigmas.push_back(0.0);
    }
    sigmas_ = float_tensor(sigmas);
    std::vector<int64_t> integral;
    for (const double t : timesteps) integral.push_back(static_cast<int64_t>(t));
    timesteps_ = long_tensor(integral);
    num_inference_steps_ = static_cast<int64_t>(integral.size());
    model_outputs_.assign(static_cast<std::size_t>(config_.solver_order), at::Tensor());
    lower_order_nums_ = 0;
    next_step_index_ = -1;
  }

  at::Tensor step(const at::Tensor& model_output_in, int64_t step_index, const at::Tensor& sample,
                  const StepOptions& options) override {
    c10::InferenceMode guard;
    check_step_index(step_index, "step");
    check_sequential(step_index);
    const int64_t count = timesteps_.size(0);
    const int64_t order = config_.solver_order;
    // Lower orders near the end improve stability for few steps.
    const bool lower_order_final =
        step_index == count - 1 && (config_.euler_at_final || (config_.lower_order_final && count < 15) ||
                                    config_.final_sigmas_type == "zero");
    const bool lower_order_second = step_index == count - 2 && config_.lower_order_final && count < 15;

    const auto model_output = convert_model_output(model_output_in, step_index, sample);
    for (int64_t i = 0; i + 1 < order; ++i) model_outputs_[i] = model_outputs_[i + 1];
    model_outputs_[order - 1] = model_output;

    const auto sample32 = sample.to(at::kFloat);
    at::Tensor noise;
    if (starts_with_sde(config_.algorithm_type)) noise = step_noise(model_output, options, at::kFloat);

    at::Tensor prev_sample;
    if (order == 1 || lower_order_nums_ < 1 || lower_order_final)
      prev_sample = first_order_update(model_output, step_index, sample32, noise);
    else if (order == 2 || lower_order_nums_ < 2 || lower_order_second)
      prev_sample = second_order_update(step_index, sample32, noise);
    else
      prev_sample = third_order_update(step_index, sample32);
    if (lower_order_nums_ < order) ++lower_order_nums_;
    next_step_index_ = step_index + 1;
    return prev_sample.to(model_output.scalar_type());
  }

  at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise,
                       int64_t step_index) const override {
    c10::InferenceMode guard;
    check_step_index(step_index, "add_noise");
    if (!noise.sizes().equals(original.sizes()))
      throw ArgumentError("DPMSolverMultistepScheduler::add_noise: noise has shape " +
                          c10::str(noise.sizes()) + ", original has " + c10::str(original.sizes()));
    const auto sigma = sigmas_.to(original.device(), original.scalar_type()).select(0, step_index);
    const auto as = alpha_sigma(sigma);
    return as.alpha * original + as.sigma * noise;
  }

 private:
  // DPM-Solver++ works on the data prediction x0, DPM-Solver on the noise prediction.
  at::Tensor convert_model_output(const at::Tensor& model_output_in, int64_t step_index,
                                  const at::Tensor& sample) const {
    at::Tensor model_output = model_output_in;
    const bool learned_variance = config_.variance_type && (*config_.variance_type == "learned" ||
                                                            *config_.variance_type == "learned_range");
    const auto sigma = sigmas_.select(0, step_index);
    if (config_.algorithm_type == "dpmsolver++" || config_.algorithm_type == "sde-dpmsolver++") {
      at::Tensor x0_pred;
      if (config_.prediction_type == "epsilon") {
        if (learned_variance) model_output = model_output.slice(1, 0, 3);
        const auto as = alpha_sigma(sigma);
        x0_pred = (sample - as.sigma * model_output) / as.alpha;
      } else if (config_.prediction_type == "sample") {
        x0_pred = model_output;
      } else {  // v_prediction
        const auto as = alpha_sigma(sigma);
        x0_pred = as.alpha * sample - as.sigma * model_output;
      }
      if (config_.thresholding)
        x0_pred = threshold_sample(x0_pred, config_.dynamic_thresholding_ratio, config_.sample_max_value);
      return x0_pred;
    }
    at::Tensor epsilon;
    if (config_.prediction_type == "epsilon") {
      epsilon = learned_variance ? model_output.slice(1, 0, 3) : model_output;
    } else if (config_.prediction_type == "sample") {
      const auto as = alpha_sigma(sigma);
      epsilon = (sample - as.alpha * model_output) / as.sigma;
    } else {  // v_prediction
      const auto as = alpha_sigma(sigma);
      epsilon = as.alpha * model_output + as.sigma * sample;
    }
    if (config_.thresholding) {
      const auto as = alpha_sigma(sigma);
      auto x0_pred = (sample - as.sigma * epsilon) / as.alpha;
      x0_pred = threshold_sample(x0_pred, config_.dynamic_thresholding_ratio, config_.sample_max_value);
      epsilon = (sample - as.alpha * x0_pred) / as.sigma;
    }
    return epsilon;
  }

  // One step of first-order DPM-Solver (DDIM).
  at::Tensor first_order_update(const at::Tensor& model_output, int64_t i, const at::Tensor& sample,
                                const at::Tensor& noise) const {
    const auto t = alpha_sigma(sigmas_.select(0, i + 1));
    const auto s = alpha_sigma(sigmas_.select(0, i));
    const auto h = lambda_of(t) - lambda_of(s);
    const auto& algorithm = config_.algorithm_type;
    if (algorithm == "dpmsolver++")
      return (t.sigma / s.sigma) * sample - (t.alpha * (at::exp(-h) - 1.0)) * model_output;
    if (algorithm == "dpmsolver")
      return (t.alpha / s.alpha) * sample - (t.sigma * (at::exp(h) - 1.0)) * model_output;
    if (algorithm == "sde-dpmsolver++")
      return (t.sigma / s.sigma * at::exp(-h)) * sample +
             (t.alpha * at::rsub(at::exp(h * -2.0), 1)) * model_output +
             t.sigma * at::sqrt(at::rsub(at::exp(h * -2), 1.0)) * noise;
    // sde-dpmsolver
    return (t.alpha / s.alpha) * sample - (t.sigma * (at::exp(h) - 1.0)) * 2.0 * model_output +
           t.sigma * at::sqrt(at::exp(h * 2) - 1.0) * noise;
  }

  // One step of second-order multistep DPM-Solver from the last two model outputs.
  at::Tensor second_order_update(int64_t i, const at::Tensor& sample, const at::Tensor& noise) const {
    const auto t = alpha_sigma(sigmas_.select(0, i + 1));
    const auto s0 = alpha_sigma(sigmas_.select(0, i));
    const auto s1 = alpha_sigma(sigmas_.select(0, i - 1));
    const auto lambda_t = lambda_of(t);
    const auto lambda_s0 = lambda_of(s0);
    const auto lambda_s1 = lambda_of(s1);
    const auto& m0 = model_outputs_[model_outputs_.size() - 1];
    const auto& m1 = model_outputs_[model_outputs_.size() - 2];
    const auto h = lambda_t - lambda_s0;
    const auto h_0 = lambda_s0 - lambda_s1;
    const auto r0 = h_0 / h;
    const auto& d0 = m0;
    const auto d1 = (at::reciprocal(r0) * 1.0) * (m0 - m1);
    const auto& algorithm = config_.algorithm_type;
    const bool midpoint = config_.solver_type == "midpoint";
    if (algorithm == "dpmsolver++") {
      const auto coeff = t.alpha * (at::exp(-h) - 1.0);
      if (midpoint) return (t.sigma / s0.sigma) * sample - coeff * d0 - (coeff * 0.5) * d1;
      return (t.sigma / s0.sigma) * sample - coeff * d0 + (t.alpha * ((at::exp(-h) - 1.0) / h + 1.0)) * d1;
    }
    if (algorithm == "dpmsolver") {
      const auto coeff = t.sigma * (at::exp(h) - 1.0);
      if (midpoint) return (t.alpha / s0.alpha) * sample - coeff * d0 - (coeff * 0.5) * d1;
      return (t.alpha / s0.alpha) * sample - coeff * d0 - (t.sigma * ((at::exp(h) - 1.0) / h - 1.0)) * d1;
    }
    if (algorithm == "sde-dpmsolver++") {
      const auto coeff = t.alpha * at::rsub(at::exp(h * -2.0), 1);
      const auto noise_term = t.sigma * at::sqrt(at::rsub(at::exp(h * -2), 1.0)) * noise;
      const auto base = (t.sigma / s0.sigma * at::exp(-h)) * sample + coeff * d0;
      if (midpoint) return base + (coeff * 0.5) * d1 + noise_term;
      return base + (t.alpha * (at::rsub(at::exp(h * -2.0), 1.0) / (h * -2.0) + 1.0)) * d1 + noise_term;
    }
    // sde-dpmsolver
    const auto coeff = t.sigma * (at::exp(h) - 1.0);
    const auto noise_term = t.sigma * at::sqrt(at::exp(h * 2) - 1.0) * noise;
    const auto base = (t.alpha / s0.alpha) * sample - (coeff * 2.0) * d0;
    if (midpoint) return base - coeff * d1 + noise_term;
    return base - ((t.sigma * ((at::exp(h) - 1.0) / h - 1.0)) * 2.0) * d1 + noise_term;
  }

  // One step of third-order multistep DPM-Solver from the last three model outputs.
  at::Tensor third_order_update(int64_t i, const at::Tensor& sample) const {
    const auto t = alpha_sigma(sigmas_.select(0, i + 1));
    const auto s0 = alpha_sigma(sigmas_.select(0, i));
    const auto s1 = alpha_sigma(sigmas_.select(0, i - 1));
    const auto s2 = alpha_sigma(sigmas_.select(0, i - 2));
    const auto lambda_t = lambda_of(t);
    const auto lambda_s0 = lambda_of(s0);
    const auto lambda_s1 = lambda_of(s1);
    const auto lambda_s2 = lambda_of(s2);
    const auto size = model_outputs_.size();
    const auto& m0 = model_outputs_[size - 1];
    const auto& m1 = model_outputs_[size - 2];
    const auto& m2 = model_outputs_[size - 3];
    const auto h = lambda_t - lambda_s0;
    const auto h_0 = lambda_s0 - lambda_s1;
    const auto h_1 = lambda_s1 - lambda_s2;
    const auto r0 = h_0 / h;
    const auto r1 = h_1 / h;
    const auto& d0 = m0;
    const auto d1_0 = (at::reciprocal(r0) * 1.0) * (m0 - m1);
    const auto d1_1 = (at::reciprocal(r1) * 1.0) * (m1 - m2);
    const auto d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1);
    const auto d2 = (at::reciprocal(r0 + r1) * 1.0) * (d1_0 - d1_1);
    if (config_.algorithm_type == "dpmsolver++")
      return (t.sigma / s0.sigma) * sample - (t.alpha * (at::exp(-h) - 1.0)) * d0 +
             (t.alpha * ((at::exp(-h) - 1.0) / h + 1.0)) * d1 -
             (t.alpha * ((at::exp(-h) - 1.0 + h) / at::pow(h, 2) - 0.5)) * d2;
    return (t.alpha / s0.alpha) * sample - (t.sigma * (at::exp(h) - 1.0)) * d0 -
           (t.sigma * ((at::exp(h) - 1.0) / h - 1.0)) * d1 -
           (t.sigma * ((at::exp(h) - 1.0 - h) / at::pow(h, 2) - 0.5)) * d2;
  }

  at::Tensor lambda_t_;
  // Per-generation state (reset by set_timesteps).
  std::vector<at::Tensor> model_outputs_;
  int64_t lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Scheduler> make_dpm_solver(const SchedulerConfig& config) {
  return std::make_unique<DpmSolverScheduler>(config);
}

}  // namespace voken::diffusion::detail
