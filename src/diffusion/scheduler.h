// Diffusion noise schedulers, numerically equal to HF diffusers v0.31.0:
//   PNDMScheduler (PLMS with skip_prk_steps, Stable Diffusion 2.1-base's default; PRK steps too),
//   DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
//   DPMSolverMultistepScheduler (DPM-Solver++ 2M by default; orders 1-3, SDE variants).
//
// Configuration comes from diffusers' `scheduler/scheduler_config.json`. Like diffusers, a key
// the file does not set (or lists in `_use_default_values`) takes the default of the scheduler
// class that is being built, so swapping the kind (`DDIMScheduler.from_config(pndm.config)`)
// is `SchedulerConfig::as_kind` or the `kind` argument of `make_scheduler`.
//
// Use (the denoising loop of a diffusers pipeline):
//   auto scheduler = make_scheduler(SchedulerConfig::from_file(dir));
//   scheduler->set_timesteps(steps);
//   auto x = noise * scheduler->init_noise_sigma();
//   for (int64_t i = 0; i < scheduler->num_steps(); ++i) {
//     auto eps = unet(scheduler->scale_model_input(x, i), scheduler->timestep(i), ...);
//     x = scheduler->step(eps, i, x, {/*generator or noise for stochastic kinds*/});
//   }
// A scheduler is stateful per generation (PNDM keeps past model outputs, DPM-Solver the
// previous ones): use one instance per generation (`clone()` gives a fresh one). Steps must be
// taken in order, starting at any index (img2img starts late: see `add_noise`).
//
// Numerics mirror diffusers operation by operation: alphas_cumprod and the per-step
// coefficients are float32 0-dim tensors combined with the same ATen ops; the parts diffusers
// computes with numpy in float64 (timestep spacing, np.interp of sigmas, Karras sigmas,
// sigma -> t) are computed in double the same way, with numpy 1.x's float32 casting rules.
//
// RNG: the stochastic steps (Euler ancestral, DDIM with eta > 0, SDE-DPM-Solver) draw
// `at::randn(model_output.sizes(), generator)` on the CPU with the generator in StepOptions,
// one draw per step, exactly as diffusers' `randn_tensor` does with a CPU torch.Generator (then
// moved to the sample's device). A CPUGeneratorImpl seeded with s
// (`at::make_generator<at::CPUGeneratorImpl>(s)`) yields the same numbers as Python's
// `torch.Generator().manual_seed(s)` and `torch.manual_seed(s)` (tested), so a seed reproduces
// diffusers' latents. There is no global generator: a stochastic step without a generator or
// explicit noise is an ArgumentError.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/json_file.h"

namespace voken::diffusion {

enum class SchedulerKind { kPNDM, kDDIM, kEuler, kEulerAncestral, kDPMSolverMultistep };

// The diffusers class name ("PNDMScheduler", ...).
std::string scheduler_class_name(SchedulerKind kind);
// Accepts the diffusers class names and the short names "pndm", "ddim", "euler", "euler_a",
// "dpmpp_2m" (also "euler-ancestral", "dpm++2m", "dpmsolver++"); ArgumentError listing them.
SchedulerKind scheduler_kind_from_name(const std::string& name);

// Every field any of the five classes reads, with diffusers' names. After from_json/as_kind the
// fields of `kind` hold the file's value or that class's default; fields of other classes keep
// the values below and are ignored.
struct SchedulerConfig {
  SchedulerKind kind = SchedulerKind::kPNDM;
  std::string source = "<scheduler config>";  // where it came from, for error messages

  // All classes.
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";  // linear | scaled_linear | squaredcos_cap_v2
  std::optional<std::vector<double>> trained_betas;
  std::string prediction_type = "epsilon";   // epsilon | v_prediction | sample (not PNDM/Euler-a)
  std::string timestep_spacing = "leading";  // linspace | leading | trailing (default per class)
  int64_t steps_offset = 0;
  bool rescale_betas_zero_snr = false;  // not PNDM
  // PNDM.
  bool skip_prk_steps = false;
  // PNDM (default false), DDIM (default true).
  bool set_alpha_to_one = false;
  // DDIM.
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  // DDIM, DPM-Solver.
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  // Euler, DPM-Solver.
  bool use_karras_sigmas = false;
  bool use_exponential_sigmas = false;
  bool use_beta_sigmas = false;            // needs scipy's beta.ppf upstream: rejected with ConfigError
  std::string final_sigmas_type = "zero";  // zero | sigma_min
  // Euler (DPM-Solver's Karras sigmas also read them when the file has them, as diffusers does).
  std::optional<double> sigma_min;
  std::optional<double> sigma_max;
  std::string interpolation_type = "linear";  // linear | log_linear
  std::string timestep_type = "discrete";     // discrete | continuous
  // DPM-Solver.
  int64_t solver_order = 2;
  std::string algorithm_type = "dpmsolver++";  // dpmsolver++ | sde-dpmsolver++ | dpmsolver | sde-dpmsolver
  std::string solver_type = "midpoint";        // midpoint | heun
  bool lower_order_final = true;
  bool euler_at_final = false;
  bool use_lu_lambdas = false;
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();
  std::optional<std::string> variance_type;  // learned | learned_range keep 3 output channels

  // Reads a diffusers scheduler config. `kind`: build this class instead of `_class_name`
  // (keys the file does not set then take that class's defaults). An unknown or missing
  // `_class_name` without `kind` is a ConfigError naming it; bad values are ConfigErrors naming
  // the source and key. Float fields also take the strings "Infinity", "-Infinity", "NaN".
  static SchedulerConfig from_json(const io::JsonView& json,
                                   std::optional<SchedulerKind> kind = std::nullopt);
  // `path`: a scheduler_config.json, a directory holding one, or a diffusers pipeline directory
  // (reads scheduler/scheduler_config.json). Python's json extensions (e.g. DPM-Solver's
  // `"lambda_min_clipped": -Infinity`) are accepted.
  static SchedulerConfig from_file(const std::string& path, std::optional<SchedulerKind> kind = std::nullopt);
  // The same file read for another class, like diffusers' `Other.from_config(config)`. Changes
  // made to this object's fields are not carried over: set them on the result (like
  // from_config's keyword arguments). A config built in code has no file keys: as_kind then gives
  // the other class's defaults.
  SchedulerConfig as_kind(SchedulerKind other) const;
  // Re-checks the fields of `kind` (for configs edited in code); ConfigError naming the field.
  void validate() const;

 private:
  io::Json file_fields_ = io::Json::object();  // the keys the file set (for as_kind)
};

// Per-step arguments. Stochastic steps use `noise` if defined (shape of model_output; it wins
// over `generator`), else draw from `generator`. Euler's s_churn/s_tmin/s_tmax/s_noise are not
// offered (the pipelines never pass them: churn 0).
struct StepOptions {
  c10::optional<at::Generator> generator;
  at::Tensor noise;
  double eta = 0.0;                       // DDIM: weight of the added noise (0 = deterministic)
  bool use_clipped_model_output = false;  // DDIM
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerConfig config);
  virtual ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  SchedulerKind kind() const { return config_.kind; }
  const SchedulerConfig& config() const { return config_; }
  // A fresh scheduler with the same config and no timesteps (per-generation state is not copied).
  virtual std::unique_ptr<Scheduler> clone() const = 0;

  // Computes the schedule for `num_inference_steps` (1..num_train_timesteps, else ArgumentError)
  // and resets the per-generation state.
  virtual void set_timesteps(int64_t num_inference_steps) = 0;
  bool has_timesteps() const { return timesteps_.defined(); }
  // int64 for PNDM, DDIM and DPM-Solver; float32 for Euler and Euler ancestral (as diffusers).
  // PNDM with skip_prk_steps has num_inference_steps + 1 entries (the second one repeated).
  const at::Tensor& timesteps() const;
  int64_t num_steps() const;                  // iterations of the denoising loop = timesteps().size(0)
  double timestep(int64_t step_index) const;  // timesteps()[step_index] as a number
  // Euler, Euler ancestral, DPM-Solver: float32 [num_steps + 1] (undefined for PNDM and DDIM).
  const at::Tensor& sigmas() const { return sigmas_; }
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  // float32 [num_train_timesteps]
  // Standard deviation of the initial noise (1 except for the Euler kinds).
  virtual double init_noise_sigma() const { return 1.0; }
  // Whether step() needs a generator or noise with these options.
  virtual bool is_stochastic(const StepOptions& options = {}) const { return false; }

  // The denoising model's input at step `step_index` (Euler kinds divide by sqrt(sigma^2+1)).
  virtual at::Tensor scale_model_input(const at::Tensor& sample, int64_t step_index) const;
  // One denoising step from step `step_index` to the next: the previous (less noisy) sample.
  virtual at::Tensor step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                          const StepOptions& options = {}) = 0;
  // img2img: `original` noised to the level of step `step_index` (where denoising then starts).
  virtual at::Tensor add_noise(const at::Tensor& original, const at::Tensor& noise, int64_t step_index) const;

 protected:
  void check_step_index(int64_t step_index, const char* what) const;
  void check_num_inference_steps(int64_t num_inference_steps) const;
  // Multistep kinds: steps must follow each other; the first may start anywhere.
  void check_sequential(int64_t step_index);
  // noise for a stochastic step: options.noise (checked) or randn from options.generator.
  at::Tensor step_noise(const at::Tensor& like, const StepOptions& options, at::ScalarType dtype) const;

  SchedulerConfig config_;
  at::Tensor betas_;           // float32 [T]
  at::Tensor alphas_cumprod_;  // float32 [T]
  at::Tensor timesteps_;
  at::Tensor sigmas_;
  int64_t num_inference_steps_ = 0;
  int64_t next_step_index_ = -1;  // -1: no step taken since set_timesteps
};

// A scheduler of `kind` (default: the config's own kind) built from `config`.
std::unique_ptr<Scheduler> make_scheduler(const SchedulerConfig& config,
                                          std::optional<SchedulerKind> kind = std::nullopt);

}  // namespace voken::diffusion
