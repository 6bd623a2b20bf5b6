// Private to src/diffusion: the pieces the five schedulers share, written to reproduce the
// numpy (float64, numpy 1.x casting) and torch (float32) arithmetic of diffusers 0.31 exactly.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "diffusion/scheduler.h"

namespace voken::diffusion::detail {

// ---- numpy equivalents (results in double, as numpy computes them) ----
// np.linspace(start, stop, num): i * ((stop - start) / (num - 1)) + start, last = stop.
std::vector<double> np_linspace(double start, double stop, int64_t num);
// np.arange(start, stop, step) for float steps: start + i * ((start + step) - start).
std::vector<double> np_arange(double start, double stop, double step);
// np.round: half to even.
double np_round(double value);
// np.interp(x, np.arange(len(fp)), fp) with fp given as float32 values.
std::vector<double> np_interp_on_index(const std::vector<double>& x, const std::vector<float>& fp);
// Karras et al. (2022) sigmas, rho = 7: (max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho.
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t count);
// diffusers' _sigma_to_t with numpy 1.x casting: the distances and the weight are float32
// (log_sigma, a float64 scalar, is cast down), the final blend of indices is float64.
double sigma_to_t(float log_sigma, const std::vector<float>& log_sigmas);
// np.log(np.maximum(sigma, 1e-10)) of a float64 sigma, cast to float32 as _sigma_to_t uses it.
float log_sigma_for_t(double sigma);

// ---- torch equivalents (float32 tensors) ----
// betas from beta_schedule / trained_betas, then rescale_betas_zero_snr when set.
at::Tensor make_betas(const SchedulerConfig& config, bool allow_zero_snr_rescale);
// ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 as float32 values (ascending in t).
std::vector<float> training_sigmas(const at::Tensor& alphas_cumprod);
// np.log of a float32 array (float32 results).
std::vector<float> log_f32(const std::vector<float>& values);
// Element `index` of a 1-D tensor as a 0-dim tensor; ArgumentError naming `what` when out of range.
at::Tensor element(const at::Tensor& tensor, int64_t index, const char* what);
// Dynamic thresholding of a predicted x0 (Imagen), diffusers' _threshold_sample.
at::Tensor threshold_sample(const at::Tensor& sample, double ratio, double max_value);
// float32 / int64 1-D tensors from host values (each cast the way numpy's astype casts).
at::Tensor float_tensor(const std::vector<double>& values);
at::Tensor long_tensor(const std::vector<int64_t>& values);

// Euler and Euler ancestral's timestep spacing (float32, descending).
std::vector<float> euler_timesteps(const SchedulerConfig& config, int64_t num_inference_steps);

// ---- the five classes ----
std::unique_ptr<Scheduler> make_pndm(const SchedulerConfig& config);
std::unique_ptr<Scheduler> make_ddim(const SchedulerConfig& config);
std::unique_ptr<Scheduler> make_euler(const SchedulerConfig& config);
std::unique_ptr<Scheduler> make_euler_ancestral(const SchedulerConfig& config);
std::unique_ptr<Scheduler> make_dpm_solver(const SchedulerConfig& config);

}  // namespace voken::diffusion::detail
