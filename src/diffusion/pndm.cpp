// PNDMScheduler (diffusers 0.31): pseudo numerical methods for diffusion models. With
// skip_prk_steps (Stable Diffusion's setting) this is PLMS: linear multistep over the past
// model outputs, the first step taken twice (Heun-like warm-up). Without it, 12 Runge-Kutta
// (PRK) sub-steps come first.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <vector>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion::detail {
namespace {

constexpr int64_t kPndmOrder = 4;

class PndmScheduler final : public Scheduler {
 public:
  explicit PndmScheduler(SchedulerConfig config) : Scheduler(std::move(config)) {
    final_alpha_cumprod_ =
        config_.set_alpha_to_one ? at::scalar_tensor(1.0, at::kFloat) : alphas_cumprod_.select(0, 0);
  }

  std::unique_ptr<Scheduler> clone() const override { return std::make_unique<PndmScheduler>(config_); }

  void set_timesteps(int64_t num_inference_steps) override {
    c10::InferenceMode guard;
    check_num_inference_steps(num_inference_steps);
    const int64_t train = config_.num_train_timesteps;
    const int64_t n = num_inference_steps;
    // The ascending base schedule (diffusers' self._timesteps).
    std::vector<int64_t> base;
    if (config_.timestep_spacing == "linspace") {
      for (const double t : np_linspace(0, static_cast<double>(train - 1), n))
        base.push_back(static_cast<int64_t>(np_round(t)));
    } else if (config_.timestep_spacing == "leading") {
      const int64_t ratio = train / n;
      for (int64_t i = 0; i < n; ++i) base.push_back(i * ratio + config_.steps_offset);
    } else {  // trailing
      const double ratio = static_cast<double>(train) / static_cast<double>(n);
      const auto values = np_arange(static_cast<double>(train), 0.0, -ratio);
      for (auto it = values.rbegin(); it != values.rend(); ++it)
        base.push_back(static_cast<int64_t>(np_round(*it)) - 1);
    }

    prk_timesteps_.clear();
    std::vector<int64_t> plms;
    const auto count = static_cast<int64_t>(base.size());
    if (config_.skip_prk_steps) {
      // base[:-1] + base[-2:-1] + base[-1:], reversed: the second-to-last entry is repeated.
      plms.assign(base.begin(), base.end() - 1);
      if (count >= 2) plms.push_back(base[count - 2]);
      plms.push_back(base[count - 1]);
      std::reverse(plms.begin(), plms.end());
    } else {
      if (count < kPndmOrder)
        throw ArgumentError(
            "PNDMScheduler::set_timesteps: the Runge-Kutta warm-up (skip_prk_steps false) needs "
            "at least 4 inference steps, got " +
            std::to_string(n));
      const int64_t half = train / n / 2;
      std::vector<int64_t> pairs;  // base[-4:].repeat(2) + tile([0, half], 4), without the last
      for (int64_t i = count - kPndmOrder; i < count; ++i) {
        pairs.push_back(base[i]);
        pairs.push_back(base[i] + half);
      }
      pairs.pop_back();
      std::vector<int64_t> repeated;  // .repeat(2)[1:-1]
      for (const int64_t t : pairs) repeated.insert(repeated.end(), {t, t});
      prk_timesteps_.assign(repeated.begin() + 1, repeated.end() - 1);
      std::reverse(prk_timesteps_.begin(), prk_timesteps_.end());
      plms.assign(base.begin(), base.end() - 3);
      std::reverse(plms.begin(), plms.end());
    }
    std::vector<int64_t> all = prk_timesteps_;
    all.insert(all.end(), plms.begin(), plms.end());
    for (const int64_t t : all)
      if (t < 0 || t >= train)
        throw ArgumentError("PNDMScheduler::set_timesteps: " + std::to_string(n) +
                            " steps with steps_offset " + std::to_string(config_.steps_offset) +
                            " give timestep " + std::to_string(t) + ", outside the trained range [0, " +
                            std::to_string(train) + ")");
    timesteps_ = long_tensor(all);
    num_inference_steps_ = n;
    ets_.clear();
    counter_ = 0;
    cur_model_output_ = at::Tensor();
    cur_sample_ = at::Tensor();
    next_step_index_ = -1;
  }

  at::Tensor step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                  const StepOptions& options) override {
    c10::InferenceMode guard;
    check_step_index(step_index, "step");
    check_sequential(step_index);
    const int64_t timestep = timesteps_[step_index].item<int64_t>();
    at::Tensor prev_sample;
    if (counter_ < static_cast<int64_t>(prk_timesteps_.size()) && !config_.skip_prk_steps)
      prev_sample = step_prk(model_output, timestep, sample);
    else
      prev_sample = step_plms(model_output, timestep, sample);
    next_step_index_ = step_index + 1;
    return prev_sample;
  }

 private:
  // Runge-Kutta sub-steps: four model evaluations per step, combined 1/6, 1/3, 1/3, 1/6.
  at::Tensor step_prk(const at::Tensor& model_output_in, int64_t timestep, const at::Tensor& sample) {
    const int64_t half = config_.num_train_timesteps / num_inference_steps_ / 2;
    const int64_t diff_to_prev = counter_ % 2 ? 0 : half;
    const int64_t prev_timestep = timestep - diff_to_prev;
    timestep = prk_timesteps_[counter_ / 4 * 4];

    at::Tensor model_output = model_output_in;
    const auto accumulate = [&](double weight) {
      const auto term = model_output_in * weight;
      cur_model_output_ = cur_model_output_.defined() ? cur_model_output_ + term : term;
    };
    switch (counter_ % 4) {
      case 0:
        accumulate(1.0 / 6);
        ets_.push_back(model_output_in);
        cur_sample_ = sample;
        break;
      case 1:
      case 2:
        accumulate(1.0 / 3);
        break;
      default:
        model_output = cur_model_output_ + model_output_in * (1.0 / 6);
        cur_model_output_ = at::Tensor();
        break;
    }
    const auto& base_sample = cur_sample_.defined() ? cur_sample_ : sample;
    auto prev_sample = get_prev_sample(base_sample, timestep, prev_timestep, model_output);
    ++counter_;
    return prev_sample;
  }

  // Linear multistep (Adams-Bashforth up to 4th order) over the stored model outputs.
  at::Tensor step_plms(const at::Tensor& model_output_in, int64_t timestep, const at::Tensor& sample_in) {
    if (!config_.skip_prk_steps && ets_.size() < 3)
      throw ArgumentError("PNDMScheduler::step: PLMS steps need the 12 Runge-Kutta steps first");
    const int64_t ratio = config_.num_train_timesteps / num_inference_steps_;
    int64_t prev_timestep = timestep - ratio;
    if (counter_ != 1) {
      if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
      ets_.push_back(model_output_in);
    } else {
      prev_timestep = timestep;
      timestep = timestep + ratio;
    }

    at::Tensor model_output = model_output_in;
    at::Tensor sample = sample_in;
    const auto n = ets_.size();
    const auto& e1 = ets_[n - 1];
    if (n == 1 && counter_ == 0) {
      cur_sample_ = sample;
    } else if (n == 1 && counter_ == 1) {
      model_output = (model_output_in + e1) / 2;
      sample = cur_sample_;
      cur_sample_ = at::Tensor();
    } else if (n == 2) {
      model_output = (e1 * 3 - ets_[n - 2]) / 2;
    } else if (n == 3) {
      model_output = (e1 * 23 - ets_[n - 2] * 16 + ets_[n - 3] * 5) / 12;
    } else {
      model_output = (e1 * 55 - ets_[n - 2] * 59 + ets_[n - 3] * 37 - ets_[n - 4] * 9) * (1.0 / 24);
    }
    auto prev_sample = get_prev_sample(sample, timestep, prev_timestep, model_output);
    ++counter_;
    return prev_sample;
  }

  // Formula (9) of the PNDM paper: x_(t-delta) from x_t and the (combined) noise estimate.
  at::Tensor get_prev_sample(const at::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                             at::Tensor model_output) const {
    const auto alpha_prod_t = element(alphas_cumprod_, timestep, "PNDMScheduler::step");
    const auto alpha_prod_t_prev = prev_timestep >= 0
                                       ? element(alphas_cumprod_, prev_timestep, "PNDMScheduler::step")
                                       : final_alpha_cumprod_;
    const auto beta_prod_t = at::rsub(alpha_prod_t, 1);
    const auto beta_prod_t_prev = at::rsub(alpha_prod_t_prev, 1);
    if (config_.prediction_type == "v_prediction")
      model_output = at::pow(alpha_prod_t, 0.5) * model_output + at::pow(beta_prod_t, 0.5) * sample;
    const auto sample_coeff = at::pow(alpha_prod_t_prev / alpha_prod_t, 0.5);
    const auto model_output_denom_coeff = alpha_prod_t * at::pow(beta_prod_t_prev, 0.5) +
                                          at::pow(alpha_prod_t * beta_prod_t * alpha_prod_t_prev, 0.5);
    return sample_coeff * sample -
           (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff;
  }

  at::Tensor final_alpha_cumprod_;
  std::vector<int64_t> prk_timesteps_;
  // Per-generation state (reset by set_timesteps).
  std::vector<at::Tensor> ets_;  // past model outputs
  int64_t counter_ = 0;
  at::Tensor cur_model_output_;  // undefined = 0
  at::Tensor cur_sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_pndm(const SchedulerConfig& config) {
  return std::make_unique<PndmScheduler>(config);
}

}  // namespace voken::diffusion::detail
