// Scheduler configuration (diffusers' per-class defaults and from_config semantics), the shared
// base class, the factory, and the numpy/torch helpers the five schedulers share.
#include "diffusion/scheduler.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <set>

#include "diffusion/schedulers_impl.h"
#include "voken/error.h"

namespace voken::diffusion {

// ---------------------------------------------------------------------------------------------
// Kinds

namespace {

struct KindName {
  SchedulerKind kind;
  const char* class_name;
  std::vector<const char*> aliases;
};

const std::vector<KindName>& kind_names() {
  static const std::vector<KindName> names = {
      {SchedulerKind::kPNDM, "PNDMScheduler", {"pndm", "plms"}},
      {SchedulerKind::kDDIM, "DDIMScheduler", {"ddim"}},
      {SchedulerKind::kEuler, "EulerDiscreteScheduler", {"euler"}},
      {SchedulerKind::kEulerAncestral,
       "EulerAncestralDiscreteScheduler",
       {"euler_a", "euler-a", "euler_ancestral", "euler-ancestral"}},
      {SchedulerKind::kDPMSolverMultistep,
       "DPMSolverMultistepScheduler",
       {"dpmpp_2m", "dpm++2m", "dpmpp2m", "dpm++_2m", "dpmsolver++", "dpm_solver", "dpmsolver"}},
  };
  return names;
}

std::string supported_class_names() {
  std::string out;
  for (const auto& entry : kind_names()) out += (out.empty() ? "" : ", ") + std::string(entry.class_name);
  return out;
}

std::optional<SchedulerKind> find_kind(const std::string& name) {
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const auto& entry : kind_names()) {
    if (name == entry.class_name) return entry.kind;
    for (const char* alias : entry.aliases)
      if (lower == alias) return entry.kind;
  }
  return std::nullopt;
}

}  // namespace

std::string scheduler_class_name(SchedulerKind kind) {
  for (const auto& entry : kind_names())
    if (entry.kind == kind) return entry.class_name;
  return "<unknown scheduler kind>";
}

SchedulerKind scheduler_kind_from_name(const std::string& name) {
  if (auto kind = find_kind(name)) return *kind;
  throw ArgumentError("unknown scheduler '" + name + "': expected one of " + supported_class_names() +
                      " or pndm, ddim, euler, euler_a, dpmpp_2m");
}

// ---------------------------------------------------------------------------------------------
// Configuration

namespace {

// Typed reads of the keys a config file set, with errors naming the source and the key.
class FieldReader {
 public:
  FieldReader(const io::Json& fields, const std::string& source) : fields_(fields), source_(source) {}

  bool has(const char* key) const { return fields_.contains(key) && !fields_.at(key).is_null(); }

  void read(const char* key, bool& out) const {
    if (!has(key)) return;
    const auto& value = fields_.at(key);
    if (!value.is_boolean()) fail(key, "a boolean", value);
    out = value.get<bool>();
  }
  void read(const char* key, int64_t& out) const {
    if (!has(key)) return;
    const auto& value = fields_.at(key);
    if (value.is_number_integer()) {
      out = value.get<int64_t>();
    } else if (value.is_number_float() && std::nearbyint(value.get<double>()) == value.get<double>() &&
               std::abs(value.get<double>()) < 9e15) {
      out = static_cast<int64_t>(value.get<double>());
    } else {
      fail(key, "an integer", value);
    }
  }
  void read(const char* key, double& out) const {
    if (has(key)) out = number(key, fields_.at(key));
  }
  void read(const char* key, std::string& out) const {
    if (!has(key)) return;
    const auto& value = fields_.at(key);
    if (!value.is_string()) fail(key, "a string", value);
    out = value.get<std::string>();
  }
  void read(const char* key, std::optional<double>& out) const {
    if (fields_.contains(key))
      out = has(key) ? std::optional<double>(number(key, fields_.at(key))) : std::nullopt;
  }
  void read(const char* key, std::optional<std::string>& out) const {
    if (!fields_.contains(key)) return;
    if (!has(key)) {
      out.reset();
      return;
    }
    std::string value;
    read(key, value);
    out = value;
  }
  void read(const char* key, std::optional<std::vector<double>>& out) const {
    if (!fields_.contains(key)) return;
    if (!has(key)) {
      out.reset();
      return;
    }
    const auto& value = fields_.at(key);
    if (!value.is_array()) fail(key, "a list of numbers or null", value);
    std::vector<double> values;
    values.reserve(value.size());
    for (const auto& item : value) values.push_back(number(key, item));
    out = std::move(values);
  }

 private:
  double number(const char* key, const io::Json& value) const {
    if (value.is_number()) return value.get<double>();
    if (value.is_string()) {
      const auto& text = value.get_ref<const std::string&>();
      if (text == "Infinity") return std::numeric_limits<double>::infinity();
      if (text == "-Infinity") return -std::numeric_limits<double>::infinity();
      if (text == "NaN") return std::numeric_limits<double>::quiet_NaN();
    }
    fail(key, "a number", value);
  }
  [[noreturn]] void fail(const char* key, const char* expected, const io::Json& value) const {
    throw ConfigError(source_ + ": field '" + key + "' must be " + expected + ", got " + value.dump());
  }
  const io::Json& fields_;
  const std::string& source_;
};

void require_one_of(const SchedulerConfig& config, const char* key, const std::string& value,
                    std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* option : allowed) {
    if (value == option) return;
    list += (list.empty() ? "'" : ", '") + std::string(option) + "'";
  }
  throw ConfigError(config.source + ": " + scheduler_class_name(config.kind) + " field '" + key + "' is '" +
                    value + "', expected one of " + list);
}

[[noreturn]] void unsupported(const SchedulerConfig& config, const std::string& what) {
  throw ConfigError(config.source + ": " + scheduler_class_name(config.kind) + ": " + what);
}

// The fields of `kind`: the file's value where the file set the key, else the class's default.
SchedulerConfig resolve(const io::Json& file_fields, SchedulerKind kind, const std::string& source) {
  SchedulerConfig config;
  config.kind = kind;
  config.source = source;
  // Class defaults that differ between the classes (all others are equal in diffusers 0.31).
  const bool leading_default = kind == SchedulerKind::kPNDM || kind == SchedulerKind::kDDIM;
  config.timestep_spacing = leading_default ? "leading" : "linspace";
  config.set_alpha_to_one = kind == SchedulerKind::kDDIM;

  const FieldReader reader(file_fields, source);
  reader.read("num_train_timesteps", config.num_train_timesteps);
  reader.read("beta_start", config.beta_start);
  reader.read("beta_end", config.beta_end);
  reader.read("beta_schedule", config.beta_schedule);
  reader.read("trained_betas", config.trained_betas);
  reader.read("prediction_type", config.prediction_type);
  reader.read("timestep_spacing", config.timestep_spacing);
  reader.read("steps_offset", config.steps_offset);
  if (kind != SchedulerKind::kPNDM) reader.read("rescale_betas_zero_snr", config.rescale_betas_zero_snr);

  switch (kind) {
    case SchedulerKind::kPNDM:
      reader.read("skip_prk_steps", config.skip_prk_steps);
      reader.read("set_alpha_to_one", config.set_alpha_to_one);
      break;
    case SchedulerKind::kDDIM:
      reader.read("clip_sample", config.clip_sample);
      reader.read("clip_sample_range", config.clip_sample_range);
      reader.read("set_alpha_to_one", config.set_alpha_to_one);
      reader.read("thresholding", config.thresholding);
      reader.read("dynamic_thresholding_ratio", config.dynamic_thresholding_ratio);
      reader.read("sample_max_value", config.sample_max_value);
      break;
    case SchedulerKind::kEuler:
      reader.read("interpolation_type", config.interpolation_type);
      reader.read("use_karras_sigmas", config.use_karras_sigmas);
      reader.read("use_exponential_sigmas", config.use_exponential_sigmas);
      reader.read("use_beta_sigmas", config.use_beta_sigmas);
      reader.read("sigma_min", config.sigma_min);
      reader.read("sigma_max", config.sigma_max);
      reader.read("timestep_type", config.timestep_type);
      reader.read("final_sigmas_type", config.final_sigmas_type);
      break;
    case SchedulerKind::kEulerAncestral:
      break;
    case SchedulerKind::kDPMSolverMultistep:
      reader.read("solver_order", config.solver_order);
      reader.read("thresholding", config.thresholding);
      reader.read("dynamic_thresholding_ratio", config.dynamic_thresholding_ratio);
      reader.read("sample_max_value", config.sample_max_value);
      reader.read("algorithm_type", config.algorithm_type);
      reader.read("solver_type", config.solver_type);
      reader.read("lower_order_final", config.lower_order_final);
      reader.read("euler_at_final", config.euler_at_final);
      reader.read("use_karras_sigmas", config.use_karras_sigmas);
      reader.read("use_exponential_sigmas", config.use_exponential_sigmas);
      reader.read("use_beta_sigmas", config.use_beta_sigmas);
      reader.read("use_lu_lambdas", config.use_lu_lambdas);
      reader.read("final_sigmas_type", config.final_sigmas_type);
      reader.read("lambda_min_clipped", config.lambda_min_clipped);
      reader.read("variance_type", config.variance_type);
      // Not DPM-Solver arguments, but diffusers keeps every extra key of the file in the config
      // and its Karras conversion reads these when present.
      reader.read("sigma_min", config.sigma_min);
      reader.read("sigma_max", config.sigma_max);
      // The renames DPMSolverMultistepScheduler.__init__ registers.
      if (config.algorithm_type == "deis") config.algorithm_type = "dpmsolver++";
      if (config.solver_type == "logrho" || config.solver_type == "bh1" || config.solver_type == "bh2")
        config.solver_type = "midpoint";
      break;
  }
  config.validate();
  return config;
}

}  // namespace

void SchedulerConfig::validate() const {
  if (num_train_timesteps < 2)
    unsupported(*this, "num_train_timesteps must be at least 2, got " + std::to_string(num_train_timesteps));
  if (trained_betas) {
    if (static_cast<int64_t>(trained_betas->size()) != num_train_timesteps)
      unsupported(*this, "trained_betas has " + std::to_string(trained_betas->size()) +
                             " values but num_train_timesteps is " + std::to_string(num_train_timesteps));
  } else {
    require_one_of(*this, "beta_schedule", beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"});
  }
  require_one_of(*this, "timestep_spacing", timestep_spacing, {"linspace", "leading", "trailing"});
  if (steps_offset < 0) unsupported(*this, "steps_offset must be >= 0, got " + std::to_string(steps_offset));

  const auto check_thresholding = [&] {
    if (thresholding && !(dynamic_thresholding_ratio > 0.0 && dynamic_thresholding_ratio <= 1.0))
      unsupported(*this, "dynamic_thresholding_ratio must be in (0, 1], got " +
                             std::to_string(dynamic_thresholding_ratio));
  };
  const auto check_sigma_schedule = [&] {
    if (int(use_karras_sigmas) + int(use_exponential_sigmas) + int(use_beta_sigmas) > 1)
      unsupported(*this, "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set");
    if (use_beta_sigmas)
      unsupported(*this, "use_beta_sigmas (beta-distribution sigmas, scipy upstream) is not supported");
    require_one_of(*this, "final_sigmas_type", final_sigmas_type, {"zero", "sigma_min"});
  };

  switch (kind) {
    case SchedulerKind::kPNDM:
      require_one_of(*this, "prediction_type", prediction_type, {"epsilon", "v_prediction"});
      break;
    case SchedulerKind::kDDIM:
      require_one_of(*this, "prediction_type", prediction_type, {"epsilon", "v_prediction", "sample"});
      check_thresholding();
      break;
    case SchedulerKind::kEuler:
      require_one_of(*this, "prediction_type", prediction_type,
                     {"epsilon", "v_prediction", "sample", "original_sample"});
      require_one_of(*this, "interpolation_type", interpolation_type, {"linear", "log_linear"});
      require_one_of(*this, "timestep_type", timestep_type, {"discrete", "continuous"});
      check_sigma_schedule();
      break;
    case SchedulerKind::kEulerAncestral:
      // diffusers raises NotImplementedError for "sample" at the first step.
      require_one_of(*this, "prediction_type", prediction_type, {"epsilon", "v_prediction"});
      break;
    case SchedulerKind::kDPMSolverMultistep:
      require_one_of(*this, "prediction_type", prediction_type, {"epsilon", "v_prediction", "sample"});
      require_one_of(*this, "algorithm_type", algorithm_type,
                     {"dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"});
      require_one_of(*this, "solver_type", solver_type, {"midpoint", "heun"});
      if (solver_order < 1 || solver_order > 3)
        unsupported(*this, "solver_order must be 1, 2 or 3, got " + std::to_string(solver_order));
      if (solver_order == 3 && algorithm_type.rfind("sde-", 0) == 0)
        unsupported(*this, "solver_order 3 has no SDE variant (algorithm_type '" + algorithm_type + "')");
      check_thresholding();
      check_sigma_schedule();
      // diffusers 0.31 cannot build these two for DPM-Solver (set_timesteps passes an unset
      // num_inference_steps), so there is no reference behaviour to match.
      if (use_exponential_sigmas)
        unsupported(*this, "use_exponential_sigmas is not supported (it fails in diffusers 0.31 as well)");
      if (final_sigmas_type == "zero" && algorithm_type != "dpmsolver++" &&
          algorithm_type != "sde-dpmsolver++")
        unsupported(*this, "final_sigmas_type 'zero' is not supported for algorithm_type '" + algorithm_type +
                               "'; use 'sigma_min'");
      break;
  }
}

SchedulerConfig SchedulerConfig::from_json(const io::JsonView& json, std::optional<SchedulerKind> kind) {
  const io::Json& root = json.json();
  if (!root.is_object()) throw ConfigError(json.source() + ": a scheduler config must be a JSON object");
  if (!kind) {
    if (!root.contains("_class_name") || !root.at("_class_name").is_string())
      throw ConfigError(json.source() + ": missing '_class_name' (expected one of " +
                        supported_class_names() + "); pass the scheduler kind explicitly to read it anyway");
    const auto class_name = root.at("_class_name").get<std::string>();
    kind = find_kind(class_name);
    if (!kind)
      throw ConfigError(json.source() + ": unsupported scheduler _class_name '" + class_name +
                        "' (supported: " + supported_class_names() +
                        "); pass a scheduler kind to build one of them from this config");
  }
  // As diffusers' extract_init_dict: keys listed in _use_default_values were not in the original
  // file and take the new class's defaults; private keys are not arguments.
  std::set<std::string> defaulted;
  if (root.contains("_use_default_values") && root.at("_use_default_values").is_array())
    for (const auto& key : root.at("_use_default_values"))
      if (key.is_string()) defaulted.insert(key.get<std::string>());
  io::Json file_fields = io::Json::object();
  for (const auto& [key, value] : root.items())
    if (!key.empty() && key[0] != '_' && !defaulted.count(key)) file_fields[key] = value;

  SchedulerConfig config = resolve(file_fields, *kind, json.source());
  config.file_fields_ = std::move(file_fields);
  return config;
}

SchedulerConfig SchedulerConfig::from_file(const std::string& path, std::optional<SchedulerKind> kind) {
  namespace fs = std::filesystem;
  std::string file = path;
  if (fs::is_directory(path)) {
    for (const char* candidate : {"scheduler_config.json", "scheduler/scheduler_config.json"}) {
      if (fs::is_regular_file(fs::path(path) / candidate)) {
        file = (fs::path(path) / candidate).string();
        break;
      }
    }
    if (file == path)
      throw FileNotFoundError("no scheduler_config.json or scheduler/scheduler_config.json in " + path);
  }
  const io::Json json = io::read_json_file(file);
  return from_json(io::JsonView(json, file), kind);
}

SchedulerConfig SchedulerConfig::as_kind(SchedulerKind other) const {
  SchedulerConfig config = resolve(file_fields_, other, source);
  config.file_fields_ = file_fields_;
  return config;
}

// ---------------------------------------------------------------------------------------------
// Base class

Scheduler::Scheduler(SchedulerConfig config) : config_(std::move(config)) {
  config_.validate();
  c10::InferenceMode guard;
  betas_ = detail::make_betas(config_, config_.kind != SchedulerKind::kPNDM);
  alphas_cumprod_ = at::cumprod(at::rsub(betas_, 1.0), 0);
}

Scheduler::~Scheduler() = default;

const at::Tensor& Scheduler::timesteps() const {
  if (!timesteps_.defined())
    throw ArgumentError(scheduler_class_name(kind()) + ": set_timesteps() has not been called");
  return timesteps_;
}

int64_t Scheduler::num_steps() const { return timesteps().size(0); }

double Scheduler::timestep(int64_t step_index) const {
  check_step_index(step_index, "timestep");
  return timesteps_[step_index].item<double>();
}

void Scheduler::check_step_index(int64_t step_index, const char* what) const {
  const int64_t count = num_steps();
  if (step_index < 0 || step_index >= count)
    throw ArgumentError(scheduler_class_name(kind()) + "::" + what + ": step index " +
                        std::to_string(step_index) + " is outside [0, " + std::to_string(count) + ")");
}

void Scheduler::check_num_inference_steps(int64_t num_inference_steps) const {
  if (num_inference_steps <= 0 || num_inference_steps > config_.num_train_timesteps)
    throw ArgumentError(scheduler_class_name(kind()) +
                        "::set_timesteps: num_inference_steps must be in [1, " +
                        std::to_string(config_.num_train_timesteps) + "] (num_train_timesteps), got " +
                        std::to_string(num_inference_steps));
}

void Scheduler::check_sequential(int64_t step_index) {
  if (next_step_index_ >= 0 && step_index != next_step_index_)
    throw ArgumentError(
        scheduler_class_name(kind()) + "::step: step index " + std::to_string(step_index) + " after step " +
        std::to_string(next_step_index_ - 1) +
        "; a multistep scheduler must take its steps in order (call set_timesteps to restart)");
}

at::Tensor Scheduler::step_noise(const at::Tensor& like, const StepOptions& options,
                                 at::ScalarType dtype) const {
  if (options.noise.defined()) {
    if (!options.noise.sizes().equals(like.sizes()))
      throw ArgumentError(scheduler_class_name(kind()) + "::step: noise has shape " +
                          c10::str(options.noise.sizes()) + ", expected " + c10::str(like.sizes()));
    return options.noise.to(like.device(), dtype);
  }
  if (!options.generator.has_value())
    throw ArgumentError(scheduler_class_name(kind()) +
                        "::step: this step adds noise; pass StepOptions::generator or StepOptions::noise");
  // As diffusers' randn_tensor: drawn on the generator's device, then moved.
  const auto& generator = *options.generator;
  return at::randn(like.sizes(), generator, at::TensorOptions().dtype(dtype).device(generator.device()))
      .to(like.device());
}

at::Tensor Scheduler::scale_model_input(const at::Tensor& sample, int64_t step_index) const {
  check_step_index(step_index, "scale_model_input");
  return sample;
}

// DDPMScheduler.add_noise (PNDM and DDIM): sqrt(a_t) x0 + sqrt(1 - a_t) noise at the step's timestep.
at::Tensor Scheduler::add_noise(const at::Tensor& original, const at::Tensor& noise,
                                int64_t step_index) const {
  c10::InferenceMode guard;
  check_step_index(step_index, "add_noise");
  if (!noise.sizes().equals(original.sizes()))
    throw ArgumentError(scheduler_class_name(kind()) + "::add_noise: noise has shape " +
                        c10::str(noise.sizes()) + ", original has " + c10::str(original.sizes()));
  const auto alphas_cumprod = alphas_cumprod_.to(original.device(), original.scalar_type());
  const auto alpha_prod =
      detail::element(alphas_cumprod, timesteps_[step_index].item<int64_t>(), "add_noise");
  const auto sqrt_alpha_prod = at::pow(alpha_prod, 0.5);
  const auto sqrt_one_minus_alpha_prod = at::pow(at::rsub(alpha_prod, 1), 0.5);
  return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise;
}

std::unique_ptr<Scheduler> make_scheduler(const SchedulerConfig& config, std::optional<SchedulerKind> kind) {
  if (kind && *kind != config.kind) return make_scheduler(config.as_kind(*kind));
  switch (config.kind) {
    case SchedulerKind::kPNDM:
      return detail::make_pndm(config);
    case SchedulerKind::kDDIM:
      return detail::make_ddim(config);
    case SchedulerKind::kEuler:
      return detail::make_euler(config);
    case SchedulerKind::kEulerAncestral:
      return detail::make_euler_ancestral(config);
    case SchedulerKind::kDPMSolverMultistep:
      return detail::make_dpm_solver(config);
  }
  throw ArgumentError("make_scheduler: invalid scheduler kind");
}

// ---------------------------------------------------------------------------------------------
// Shared numerics

namespace detail {

std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> values(static_cast<std::size_t>(std::max<int64_t>(num, 0)));
  if (num <= 0) return values;
  const double delta = stop - start;
  const int64_t div = num - 1;
  if (div > 0) {
    const double step = delta / static_cast<double>(div);
    for (int64_t i = 0; i < num; ++i) {
      // numpy divides first when the step underflows to zero (denormal ranges).
      const double scaled = step == 0 ? static_cast<double>(i) / static_cast<double>(div) * delta
                                      : static_cast<double>(i) * step;
      values[i] = scaled + start;
    }
    values[num - 1] = stop;
  } else {
    values[0] = 0.0 * delta + start;
  }
  return values;
}

std::vector<double> np_arange(double start, double stop, double step) {
  const double length = std::ceil((stop - start) / step);
  if (!(length > 0)) return {};
  const auto count = static_cast<std::size_t>(length);
  std::vector<double> values(count);
  values[0] = start;
  if (count > 1) values[1] = start + step;
  // numpy's fill(): start + i * (second - first).
  const double delta = count > 1 ? values[1] - values[0] : 0.0;
  for (std::size_t i = 2; i < count; ++i) values[i] = start + static_cast<double>(i) * delta;
  return values;
}

double np_round(double value) { return std::nearbyint(value); }

std::vector<double> np_interp_on_index(const std::vector<double>& x, const std::vector<float>& fp) {
  const auto last = static_cast<int64_t>(fp.size()) - 1;
  std::vector<double> out;
  out.reserve(x.size());
  for (const double value : x) {
    if (std::isnan(value)) {
      out.push_back(value);
    } else if (value < 0.0) {
      out.push_back(fp.front());
    } else if (value >= static_cast<double>(last)) {
      out.push_back(fp.back());
    } else {
      const auto j = static_cast<int64_t>(std::floor(value));
      const double xj = static_cast<double>(j);
      if (xj == value) {
        out.push_back(fp[j]);
        continue;
      }
      const double slope = (static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j])) / (xj + 1.0 - xj);
      double result = slope * (value - xj) + static_cast<double>(fp[j]);
      if (std::isnan(result)) {
        result = slope * (value - (xj + 1.0)) + static_cast<double>(fp[j + 1]);
        if (std::isnan(result) && fp[j] == fp[j + 1]) result = fp[j];
      }
      out.push_back(result);
    }
  }
  return out;
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t count) {
  const double rho = 7.0;
  const auto ramp = np_linspace(0.0, 1.0, count);
  const double min_inv_rho = std::pow(sigma_min, 1.0 / rho);
  const double max_inv_rho = std::pow(sigma_max, 1.0 / rho);
  std::vector<double> sigmas;
  sigmas.reserve(ramp.size());
  for (const double r : ramp) sigmas.push_back(std::pow(max_inv_rho + r * (min_inv_rho - max_inv_rho), rho));
  return sigmas;
}

float log_sigma_for_t(double sigma) { return static_cast<float>(std::log(std::max(sigma, 1e-10))); }

double sigma_to_t(float log_sigma, const std::vector<float>& log_sigmas) {
  const auto count = static_cast<int64_t>(log_sigmas.size());
  // cumsum(dists >= 0).argmax(): the last index whose log sigma is <= log_sigma (0 if none).
  int64_t low = 0;
  for (int64_t i = 0; i < count; ++i)
    if (log_sigma - log_sigmas[i] >= 0.0f) low = i;
  low = std::min(low, count - 2);
  const int64_t high = low + 1;
  const float low_value = log_sigmas[low];
  const float high_value = log_sigmas[high];
  float w = (low_value - log_sigma) / (low_value - high_value);
  if (!std::isnan(w)) w = std::min(std::max(w, 0.0f), 1.0f);
  const float one_minus_w = 1.0f - w;
  // float32 weights times int64 indices: numpy promotes to float64.
  return static_cast<double>(one_minus_w) * static_cast<double>(low) +
         static_cast<double>(w) * static_cast<double>(high);
}

namespace {

// Glide's cosine schedule (betas_for_alpha_bar), in Python float64 then float32.
at::Tensor cosine_betas(int64_t count) {
  const double pi = 3.141592653589793;
  const auto alpha_bar = [&](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * pi / 2), 2); };
  std::vector<double> betas;
  betas.reserve(count);
  for (int64_t i = 0; i < count; ++i) {
    const double t1 = static_cast<double>(i) / static_cast<double>(count);
    const double t2 = static_cast<double>(i + 1) / static_cast<double>(count);
    betas.push_back(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
  }
  return float_tensor(betas);
}

// Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas) {
  const auto alphas = at::rsub(betas, 1.0);
  auto alphas_bar_sqrt = at::cumprod(alphas, 0).sqrt();
  const auto first = alphas_bar_sqrt[0].clone();
  const auto last = alphas_bar_sqrt[-1].clone();
  alphas_bar_sqrt.sub_(last);
  alphas_bar_sqrt.mul_(first / (first - last));
  const auto alphas_bar = at::pow(alphas_bar_sqrt, 2);
  const auto ratios = alphas_bar.slice(0, 1) / alphas_bar.slice(0, 0, -1);
  return at::rsub(at::cat({alphas_bar.slice(0, 0, 1), ratios}), 1);
}

}  // namespace

at::Tensor make_betas(const SchedulerConfig& config, bool allow_zero_snr_rescale) {
  const auto count = config.num_train_timesteps;
  at::Tensor betas;
  if (config.trained_betas) {
    betas = float_tensor(*config.trained_betas);
  } else if (config.beta_schedule == "linear") {
    betas = at::linspace(config.beta_start, config.beta_end, count, at::kFloat);
  } else if (config.beta_schedule == "scaled_linear") {
    betas = at::pow(
        at::linspace(std::pow(config.beta_start, 0.5), std::pow(config.beta_end, 0.5), count, at::kFloat), 2);
  } else if (config.beta_schedule == "squaredcos_cap_v2") {
    betas = cosine_betas(count);
  } else {
    throw ConfigError(config.source + ": beta_schedule '" + config.beta_schedule + "' is not implemented");
  }
  if (allow_zero_snr_rescale && config.rescale_betas_zero_snr) betas = rescale_zero_terminal_snr(betas);
  return betas;
}

std::vector<float> training_sigmas(const at::Tensor& alphas_cumprod) {
  const auto sigmas = at::pow(at::rsub(alphas_cumprod, 1) / alphas_cumprod, 0.5).contiguous();
  return std::vector<float>(sigmas.data_ptr<float>(), sigmas.data_ptr<float>() + sigmas.numel());
}

// numpy computes float32 logs with its own SIMD code, which can differ from this correctly
// rounded value by one ulp; that only moves _sigma_to_t's results in the 7th digit.
std::vector<float> log_f32(const std::vector<float>& values) {
  std::vector<float> logs;
  logs.reserve(values.size());
  for (const float v : values) logs.push_back(static_cast<float>(std::log(static_cast<double>(v))));
  return logs;
}

at::Tensor element(const at::Tensor& tensor, int64_t index, const char* what) {
  if (index < 0 || index >= tensor.size(0))
    throw ArgumentError(std::string(what) + ": index " + std::to_string(index) + " is outside [0, " +
                        std::to_string(tensor.size(0)) +
                        ") (the schedule reaches past the trained timesteps: fewer steps or a smaller "
                        "steps_offset are needed)");
  return tensor.select(0, index);
}

at::Tensor threshold_sample(const at::Tensor& sample, double ratio, double max_value) {
  const auto dtype = sample.scalar_type();
  auto values = (dtype == at::kFloat || dtype == at::kDouble) ? sample : sample.to(at::kFloat);
  const auto sizes = values.sizes().vec();
  if (sizes.size() < 2)
    throw ArgumentError("thresholding needs a [batch, channels, ...] sample, got shape " +
                        c10::str(values.sizes()));
  values = values.reshape({sizes[0], values.numel() / sizes[0]});
  auto s = at::quantile(values.abs(), ratio, 1);
  s = at::clamp(s, at::Scalar(1), at::Scalar(max_value)).unsqueeze(1);
  values = at::clamp(values, -s, s) / s;
  return values.reshape(sizes).to(dtype);
}

at::Tensor float_tensor(const std::vector<double>& values) {
  return at::tensor(at::ArrayRef<double>(values), at::kDouble).to(at::kFloat);
}

at::Tensor long_tensor(const std::vector<int64_t>& values) {
  return at::tensor(at::ArrayRef<int64_t>(values), at::kLong);
}

}  // namespace detail
}  // namespace voken::diffusion
