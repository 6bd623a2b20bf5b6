// Schedulers: config reading with diffusers' per-class defaults and from_config semantics, bad
// input, the per-generation state, add_noise, and the RNG contract (C++ CPU generator == Python's
// torch.Generator for the same seed).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <sstream>
#include <string>

#include "common/test_support.h"
#include "diffusion/scheduler.h"
#include "io/json_file.h"
#include "voken/error.h"

namespace voken::diffusion {
namespace {

using test::TempDir;

const SchedulerKind kAllKinds[] = {SchedulerKind::kPNDM, SchedulerKind::kDDIM, SchedulerKind::kEuler,
                                   SchedulerKind::kEulerAncestral, SchedulerKind::kDPMSolverMultistep};

SchedulerConfig config_from(const io::Json& json, std::optional<SchedulerKind> kind = std::nullopt) {
  return SchedulerConfig::from_json(io::JsonView(json, "test config"), kind);
}

// Stable Diffusion 2.1-base's scheduler/scheduler_config.json as published (no timestep_spacing).
io::Json sd21_hub_config() {
  return io::Json::parse(R"({
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
    "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null})");
}

// Every field, for comparing configs.
std::string describe(const SchedulerConfig& c) {
  std::ostringstream out;
  out << scheduler_class_name(c.kind) << " T=" << c.num_train_timesteps << " beta=" << c.beta_start << ".."
      << c.beta_end << " " << c.beta_schedule << " trained=" << c.trained_betas.has_value()
      << " pred=" << c.prediction_type << " spacing=" << c.timestep_spacing << " offset=" << c.steps_offset
      << " zsnr=" << c.rescale_betas_zero_snr << " skip_prk=" << c.skip_prk_steps
      << " alpha1=" << c.set_alpha_to_one << " clip=" << c.clip_sample << "/" << c.clip_sample_range
      << " thresh=" << c.thresholding << "/" << c.dynamic_thresholding_ratio << "/" << c.sample_max_value
      << " karras=" << c.use_karras_sigmas << " exp=" << c.use_exponential_sigmas
      << " beta_sig=" << c.use_beta_sigmas << " final=" << c.final_sigmas_type
      << " smin=" << c.sigma_min.value_or(-1) << " smax=" << c.sigma_max.value_or(-1)
      << " interp=" << c.interpolation_type << " ttype=" << c.timestep_type << " order=" << c.solver_order
      << " algo=" << c.algorithm_type << " solver=" << c.solver_type << " lof=" << c.lower_order_final
      << " eaf=" << c.euler_at_final << " lu=" << c.use_lu_lambdas << " lmc=" << c.lambda_min_clipped
      << " var=" << c.variance_type.value_or("none");
  return out.str();
}

at::Generator cpu_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Runs the golden-style loop (fake model) and returns the stacked latents.
at::Tensor run_loop(Scheduler& scheduler, int64_t steps, const at::Tensor& start, StepOptions options = {}) {
  scheduler.set_timesteps(steps);
  auto x = start * scheduler.init_noise_sigma();
  std::vector<at::Tensor> latents;
  for (int64_t i = 0; i < scheduler.num_steps(); ++i) {
    const auto out = scheduler.scale_model_input(x, i) * 0.1 + std::sin(scheduler.timestep(i) / 100.0);
    x = scheduler.step(out, i, x, options);
    latents.push_back(x);
  }
  return at::stack(latents);
}

// ---------------------------------------------------------------------------------------------
// Kinds and configs

TEST(SchedulerKinds, ClassNamesAndShortNames) {
  for (const auto kind : kAllKinds) EXPECT_EQ(scheduler_kind_from_name(scheduler_class_name(kind)), kind);
  EXPECT_EQ(scheduler_kind_from_name("pndm"), SchedulerKind::kPNDM);
  EXPECT_EQ(scheduler_kind_from_name("DDIM"), SchedulerKind::kDDIM);
  EXPECT_EQ(scheduler_kind_from_name("euler"), SchedulerKind::kEuler);
  EXPECT_EQ(scheduler_kind_from_name("euler_a"), SchedulerKind::kEulerAncestral);
  EXPECT_EQ(scheduler_kind_from_name("dpmpp_2m"), SchedulerKind::kDPMSolverMultistep);
  try {
    scheduler_kind_from_name("heun");
    FAIL() << "expected ArgumentError";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("heun"), std::string::npos) << e.what();
  }
}

TEST(SchedulerConfig, EmptyConfigTakesEachClassDefaults) {
  const io::Json empty = io::Json::object();
  const auto pndm = config_from(empty, SchedulerKind::kPNDM);
  EXPECT_EQ(pndm.timestep_spacing, "leading");
  EXPECT_FALSE(pndm.set_alpha_to_one);
  EXPECT_FALSE(pndm.skip_prk_steps);
  EXPECT_EQ(pndm.beta_schedule, "linear");
  EXPECT_EQ(pndm.steps_offset, 0);
  const auto ddim = config_from(empty, SchedulerKind::kDDIM);
  EXPECT_EQ(ddim.timestep_spacing, "leading");
  EXPECT_TRUE(ddim.set_alpha_to_one);
  EXPECT_TRUE(ddim.clip_sample);
  for (const auto kind :
       {SchedulerKind::kEuler, SchedulerKind::kEulerAncestral, SchedulerKind::kDPMSolverMultistep})
    EXPECT_EQ(config_from(empty, kind).timestep_spacing, "linspace") << scheduler_class_name(kind);
  const auto dpm = config_from(empty, SchedulerKind::kDPMSolverMultistep);
  EXPECT_EQ(dpm.solver_order, 2);
  EXPECT_EQ(dpm.algorithm_type, "dpmsolver++");
  EXPECT_TRUE(std::isinf(dpm.lambda_min_clipped) && dpm.lambda_min_clipped < 0);
}

TEST(SchedulerConfig, ClassNameSelectsKindAndUnknownOnesAreNamed) {
  auto json = sd21_hub_config();
  EXPECT_EQ(config_from(json).kind, SchedulerKind::kPNDM);
  json["_class_name"] = "LMSDiscreteScheduler";
  try {
    config_from(json);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("LMSDiscreteScheduler"), std::string::npos) << e.what();
  }
  // Users can still build a supported class from it, as X.from_config(lms.config).
  EXPECT_EQ(config_from(json, SchedulerKind::kEuler).kind, SchedulerKind::kEuler);
  json.erase("_class_name");
  EXPECT_THROW(config_from(json), ConfigError);
  EXPECT_EQ(config_from(json, SchedulerKind::kDDIM).kind, SchedulerKind::kDDIM);
}

TEST(SchedulerConfig, SwappingKindsUsesTheNewClassDefaultsForKeysTheFileLacks) {
  const auto pndm = config_from(sd21_hub_config());
  EXPECT_EQ(pndm.timestep_spacing, "leading");
  EXPECT_TRUE(pndm.skip_prk_steps);
  const auto ddim = pndm.as_kind(SchedulerKind::kDDIM);
  EXPECT_EQ(ddim.timestep_spacing, "leading");
  EXPECT_FALSE(ddim.clip_sample);       // from the file (DDIM's default is true)
  EXPECT_FALSE(ddim.set_alpha_to_one);  // from the file (DDIM's default is true)
  EXPECT_EQ(ddim.steps_offset, 1);
  for (const auto kind :
       {SchedulerKind::kEuler, SchedulerKind::kEulerAncestral, SchedulerKind::kDPMSolverMultistep}) {
    const auto swapped = pndm.as_kind(kind);
    EXPECT_EQ(swapped.timestep_spacing, "linspace") << scheduler_class_name(kind);
    EXPECT_EQ(swapped.beta_schedule, "scaled_linear");
    EXPECT_EQ(swapped.beta_start, 0.00085);
  }
  // make_scheduler's kind argument is the same swap.
  EXPECT_EQ(make_scheduler(pndm, SchedulerKind::kEuler)->config().timestep_spacing, "linspace");
  // A key listed in _use_default_values counts as absent, as in diffusers' extract_init_dict.
  auto listed = sd21_hub_config();
  listed["timestep_spacing"] = "leading";
  listed["_use_default_values"] = {"timestep_spacing"};
  EXPECT_EQ(config_from(listed).as_kind(SchedulerKind::kEuler).timestep_spacing, "linspace");
  listed.erase("_use_default_values");
  EXPECT_EQ(config_from(listed).as_kind(SchedulerKind::kEuler).timestep_spacing, "leading");
}

// The golden configs were written by diffusers after X.from_config(sd21_pndm.config): reading the
// hub file and swapping the kind must give exactly the same fields.
TEST(SchedulerConfig, SwappedHubConfigEqualsDiffusersSavedConfigs) {
  const auto dir = test::golden_component("schedulers");
  VOKEN_SKIP_IF_EMPTY(dir, "golden folder 'schedulers' not found");
  const auto hub = config_from(sd21_hub_config());
  const std::pair<const char*, SchedulerKind> saved[] = {{"pndm_eps", SchedulerKind::kPNDM},
                                                         {"ddim_eps", SchedulerKind::kDDIM},
                                                         {"euler_eps", SchedulerKind::kEuler},
                                                         {"euler_a_eps", SchedulerKind::kEulerAncestral},
                                                         {"dpmpp2m_eps", SchedulerKind::kDPMSolverMultistep}};
  for (const auto& [name, kind] : saved) {
    const auto path = dir + "/model/" + name;
    if (!std::filesystem::exists(path)) continue;
    const auto file = SchedulerConfig::from_file(path);
    EXPECT_EQ(file.kind, kind) << name;
    EXPECT_EQ(describe(hub.as_kind(kind)), describe(file)) << name;
  }
}

TEST(SchedulerConfig, ReadsPythonNonFiniteLiteralsAndDirectoryLayouts) {
  TempDir dir;
  std::filesystem::create_directories(dir.file("pipeline/scheduler"));
  const std::string text = R"({"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
    "note": "Infinity and NaN stay text", "beta_start": 0.001, "sample_max_value": Infinity})";
  test::write_file(dir.file("pipeline/scheduler/scheduler_config.json"), text);
  for (const auto& path : {dir.file("pipeline"), dir.file("pipeline/scheduler"),
                           dir.file("pipeline/scheduler/scheduler_config.json")}) {
    const auto config = SchedulerConfig::from_file(path);
    EXPECT_EQ(config.kind, SchedulerKind::kDPMSolverMultistep);
    EXPECT_TRUE(std::isinf(config.lambda_min_clipped) && config.lambda_min_clipped < 0);
    EXPECT_TRUE(std::isinf(config.sample_max_value) && config.sample_max_value > 0);
    EXPECT_EQ(config.beta_start, 0.001);
  }
  EXPECT_THROW(SchedulerConfig::from_file(dir.file("nowhere")), FileNotFoundError);
  EXPECT_THROW(SchedulerConfig::from_file(dir.path()), FileNotFoundError);
  test::write_file(dir.file("bad.json"), "{\"_class_name\": \"DDIMScheduler\",");
  EXPECT_THROW(SchedulerConfig::from_file(dir.file("bad.json")), ConfigError);
}

TEST(SchedulerConfig, BadValuesAreConfigErrorsNamingTheField) {
  struct BadCase {
    const char* json;
    const char* field;
  };
  const BadCase cases[] = {
      {R"({"_class_name": "DDIMScheduler", "beta_schedule": "cosine"})", "beta_schedule"},
      {R"({"_class_name": "DDIMScheduler", "steps_offset": "1"})", "steps_offset"},
      {R"({"_class_name": "DDIMScheduler", "clip_sample": 1})", "clip_sample"},
      {R"({"_class_name": "DDIMScheduler", "beta_start": "small"})", "beta_start"},
      {R"({"_class_name": "PNDMScheduler", "prediction_type": "sample"})", "prediction_type"},
      {R"({"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"})",
       "prediction_type"},
      {R"({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "uniform"})", "timestep_spacing"},
      {R"({"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": true})", "use_beta_sigmas"},
      {R"({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true, "use_exponential_sigmas": true})",
       "use_karras_sigmas"},
      {R"({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "cubic"})", "interpolation_type"},
      {R"({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2], "num_train_timesteps": 3})",
       "trained_betas"},
      {R"({"_class_name": "DDIMScheduler", "trained_betas": "0.1"})", "trained_betas"},
      {R"({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4})", "solver_order"},
      {R"({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "algorithm_type": "sde-dpmsolver++"})",
       "solver_order"},
      {R"({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"})",
       "final_sigmas_type"},
      {R"({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "unipc"})", "algorithm_type"},
      {R"({"_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": true})",
       "use_exponential_sigmas"},
      {R"({"_class_name": "DDIMScheduler", "num_train_timesteps": 0})", "num_train_timesteps"},
      {R"({"_class_name": "DDIMScheduler", "steps_offset": -1})", "steps_offset"},
  };
  for (const auto& bad : cases) {
    try {
      config_from(io::Json::parse(bad.json));
      ADD_FAILURE() << "expected ConfigError for " << bad.json;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(bad.field), std::string::npos) << bad.json << " -> " << e.what();
      EXPECT_NE(std::string(e.what()).find("test config"), std::string::npos) << e.what();
    }
  }
  // Thresholding is implemented (DDIM, DPM-Solver), and the renames diffusers registers apply.
  EXPECT_TRUE(
      config_from(io::Json::parse(R"({"_class_name": "DDIMScheduler", "thresholding": true})")).thresholding);
  const auto renamed = config_from(io::Json::parse(
      R"({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis", "solver_type": "bh2"})"));
  EXPECT_EQ(renamed.algorithm_type, "dpmsolver++");
  EXPECT_EQ(renamed.solver_type, "midpoint");
}

// ---------------------------------------------------------------------------------------------
// Schedules and steps

TEST(Scheduler, TimestepDtypesAndCountsFollowDiffusers) {
  const auto pndm = config_from(sd21_hub_config());
  for (const auto kind : kAllKinds) {
    auto scheduler = make_scheduler(pndm, kind);
    EXPECT_FALSE(scheduler->has_timesteps());
    EXPECT_THROW(scheduler->timesteps(), ArgumentError);
    scheduler->set_timesteps(10);
    const bool float_steps = kind == SchedulerKind::kEuler || kind == SchedulerKind::kEulerAncestral;
    EXPECT_EQ(scheduler->timesteps().scalar_type(), float_steps ? at::kFloat : at::kLong);
    EXPECT_EQ(scheduler->num_steps(), kind == SchedulerKind::kPNDM ? 11 : 10);
    const bool has_sigmas = kind != SchedulerKind::kPNDM && kind != SchedulerKind::kDDIM;
    EXPECT_EQ(scheduler->sigmas().defined(), has_sigmas);
    if (has_sigmas) EXPECT_EQ(scheduler->sigmas().size(0), 11);
  }
  // PLMS takes its second timestep twice.
  auto plms = make_scheduler(pndm);
  plms->set_timesteps(10);
  EXPECT_EQ(plms->timestep(1), plms->timestep(2));
}

TEST(Scheduler, BadStepCountsAreArgumentErrors) {
  const auto pndm = config_from(sd21_hub_config());
  for (const auto kind : kAllKinds) {
    auto scheduler = make_scheduler(pndm, kind);
    for (const int64_t bad : {int64_t{0}, int64_t{-3}, int64_t{1001}}) {
      try {
        scheduler->set_timesteps(bad);
        ADD_FAILURE() << scheduler_class_name(kind) << " accepted " << bad << " steps";
      } catch (const ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos) << e.what();
      }
    }
  }
  // 1000 leading steps with steps_offset 1 reach timestep 1000, past the trained range.
  EXPECT_THROW(make_scheduler(pndm)->set_timesteps(1000), ArgumentError);
  EXPECT_THROW(make_scheduler(pndm, SchedulerKind::kDDIM)->set_timesteps(1000), ArgumentError);
  // PNDM's Runge-Kutta warm-up needs 4 steps.
  auto prk = pndm;
  prk.skip_prk_steps = false;
  EXPECT_THROW(make_scheduler(prk)->set_timesteps(3), ArgumentError);
  EXPECT_NO_THROW(make_scheduler(prk)->set_timesteps(4));
}

TEST(Scheduler, StepsNeedTimestepsValidIndicesAndOrder) {
  const auto pndm = config_from(sd21_hub_config());
  const auto x = at::randn({1, 4, 3, 3}, cpu_generator(1));
  for (const auto kind : kAllKinds) {
    SCOPED_TRACE(scheduler_class_name(kind));
    auto scheduler = make_scheduler(pndm, kind);
    const StepOptions noise{cpu_generator(2)};
    EXPECT_THROW(scheduler->step(x, 0, x, noise), ArgumentError);
    scheduler->set_timesteps(5);
    EXPECT_THROW(scheduler->step(x, -1, x, noise), ArgumentError);
    EXPECT_THROW(scheduler->step(x, scheduler->num_steps(), x, noise), ArgumentError);
    EXPECT_THROW(scheduler->scale_model_input(x, scheduler->num_steps()), ArgumentError);
    EXPECT_THROW(scheduler->timestep(-1), ArgumentError);
  }
  // Multistep kinds keep history: steps must follow each other (they may start late, as img2img).
  for (const auto kind : {SchedulerKind::kPNDM, SchedulerKind::kDPMSolverMultistep}) {
    auto scheduler = make_scheduler(pndm, kind);
    scheduler->set_timesteps(5);
    EXPECT_NO_THROW(scheduler->step(x, 2, x));
    EXPECT_THROW(scheduler->step(x, 4, x), ArgumentError);
    EXPECT_NO_THROW(scheduler->step(x, 3, x));
    scheduler->set_timesteps(5);  // restarts
    EXPECT_NO_THROW(scheduler->step(x, 0, x));
  }
}

TEST(Scheduler, StochasticStepsNeedAGeneratorOrMatchingNoise) {
  const auto pndm = config_from(sd21_hub_config());
  const auto x = at::randn({1, 4, 3, 3}, cpu_generator(1));
  auto ancestral = make_scheduler(pndm, SchedulerKind::kEulerAncestral);
  ancestral->set_timesteps(5);
  EXPECT_TRUE(ancestral->is_stochastic());
  EXPECT_THROW(ancestral->step(x, 0, x), ArgumentError);
  StepOptions wrong_shape;
  wrong_shape.noise = at::zeros({1, 4, 3, 2});
  EXPECT_THROW(ancestral->step(x, 0, x, wrong_shape), ArgumentError);

  auto ddim = make_scheduler(pndm, SchedulerKind::kDDIM);
  ddim->set_timesteps(5);
  StepOptions eta;
  eta.eta = 0.5;
  EXPECT_TRUE(ddim->is_stochastic(eta));
  EXPECT_FALSE(ddim->is_stochastic());
  EXPECT_THROW(ddim->step(x, 0, x, eta), ArgumentError);
  eta.eta = -0.1;
  EXPECT_THROW(ddim->step(x, 0, x, eta), ArgumentError);
  EXPECT_NO_THROW(ddim->step(x, 0, x));
}

// A generator draws one randn of the model output's shape per step, so generator and explicit
// noise from an equally seeded generator give the same trajectory.
TEST(Scheduler, GeneratorDrawsEqualExplicitNoise) {
  const auto pndm = config_from(sd21_hub_config());
  const auto start = at::randn({2, 4, 5, 5}, cpu_generator(3));
  auto with_generator = make_scheduler(pndm, SchedulerKind::kEulerAncestral);
  const auto a = run_loop(*with_generator, 6, start, StepOptions{cpu_generator(42)});

  auto with_noise = make_scheduler(pndm, SchedulerKind::kEulerAncestral);
  with_noise->set_timesteps(6);
  auto source = cpu_generator(42);
  auto x = start * with_noise->init_noise_sigma();
  std::vector<at::Tensor> latents;
  for (int64_t i = 0; i < with_noise->num_steps(); ++i) {
    const auto out = with_noise->scale_model_input(x, i) * 0.1 + std::sin(with_noise->timestep(i) / 100.0);
    StepOptions options;
    options.noise = at::randn(out.sizes(), source);
    x = with_noise->step(out, i, x, options);
    latents.push_back(x);
  }
  EXPECT_TRUE(test::bit_equal(a, at::stack(latents)));
  // And a different seed gives a different trajectory.
  auto other = make_scheduler(pndm, SchedulerKind::kEulerAncestral);
  EXPECT_FALSE(at::equal(a, run_loop(*other, 6, start, StepOptions{cpu_generator(43)})));
}

TEST(Scheduler, CloneStartsAFreshGeneration) {
  const auto start = at::randn({1, 4, 4, 4}, cpu_generator(5));
  for (const auto kind : kAllKinds) {
    SCOPED_TRACE(scheduler_class_name(kind));
    auto first = make_scheduler(config_from(sd21_hub_config()), kind);
    const auto a = run_loop(*first, 8, start, StepOptions{cpu_generator(9)});
    auto second = first->clone();
    EXPECT_FALSE(second->has_timesteps());
    EXPECT_EQ(second->kind(), kind);
    EXPECT_TRUE(test::bit_equal(a, run_loop(*second, 8, start, StepOptions{cpu_generator(9)})));
    // Re-running set_timesteps on the used instance resets its state too.
    EXPECT_TRUE(test::bit_equal(a, run_loop(*first, 8, start, StepOptions{cpu_generator(9)})));
  }
}

TEST(Scheduler, AddNoiseAtTheStartingStep) {
  const auto pndm = config_from(sd21_hub_config());
  const auto original = at::randn({1, 4, 3, 3}, cpu_generator(11));
  const auto noise = at::randn({1, 4, 3, 3}, cpu_generator(12));
  const int64_t start_step = 3;
  for (const auto kind : kAllKinds) {
    SCOPED_TRACE(scheduler_class_name(kind));
    auto scheduler = make_scheduler(pndm, kind);
    scheduler->set_timesteps(10);
    const auto got = scheduler->add_noise(original, noise, start_step);
    at::Tensor want;
    if (kind == SchedulerKind::kPNDM || kind == SchedulerKind::kDDIM) {
      const auto alpha = scheduler->alphas_cumprod()[static_cast<int64_t>(scheduler->timestep(start_step))];
      want = at::pow(alpha, 0.5) * original + at::pow(1 - alpha, 0.5) * noise;
    } else if (kind == SchedulerKind::kDPMSolverMultistep) {
      const auto sigma = scheduler->sigmas()[start_step];
      const auto alpha_t = at::reciprocal(at::pow(at::pow(sigma, 2) + 1, 0.5));
      want = alpha_t * original + sigma * alpha_t * noise;
    } else {
      want = original + noise * scheduler->sigmas()[start_step];
    }
    EXPECT_TRUE(at::allclose(got, want, 1e-6, 1e-6));
    EXPECT_THROW(scheduler->add_noise(original, noise.slice(3, 0, 2), start_step), ArgumentError);
    EXPECT_THROW(scheduler->add_noise(original, noise, scheduler->num_steps()), ArgumentError);
    // Denoising can start there.
    EXPECT_NO_THROW(scheduler->step(got, start_step, got, StepOptions{cpu_generator(1)}));
  }
}

// Dynamic thresholding with sample_max_value 1 clamps the predicted x0 to [-1, 1], which is
// exactly clip_sample with range 1.
TEST(Scheduler, ThresholdingAtOneEqualsClipping) {
  auto clip = config_from(sd21_hub_config(), SchedulerKind::kDDIM);
  clip.clip_sample = true;
  clip.clip_sample_range = 1.0;
  auto threshold = clip;
  threshold.clip_sample = false;
  threshold.thresholding = true;
  threshold.sample_max_value = 1.0;
  const auto start = at::randn({2, 4, 4, 4}, cpu_generator(13)) * 3;
  auto a = make_scheduler(clip);
  auto b = make_scheduler(threshold);
  EXPECT_TRUE(test::bit_equal(run_loop(*a, 10, start), run_loop(*b, 10, start)));
}

// ---------------------------------------------------------------------------------------------
// RNG contract with Python

TEST(SchedulerRng, CpuGeneratorMatchesPythonTorchGenerator) {
  if (test::run_python("-c 'import torch, numpy' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "no python3 with torch";
  TempDir dir;
  const uint64_t seed = 20240611;
  auto generator = cpu_generator(seed);
  // A latent-sized draw (vectorised normal path), a small one (scalar path), then another: the
  // order in which a generation consumes one generator.
  const auto big = at::randn({1, 4, 64, 64}, generator);
  const auto small = at::randn({5}, generator);
  const auto again = at::randn({2, 4, 8, 8}, generator);
  const auto all = at::cat({big.flatten(), small, again.flatten()}).contiguous();
  test::write_file(dir.file("cpp.f32"),
                   std::string(static_cast<const char*>(all.data_ptr()), all.numel() * sizeof(float)));
  test::write_file(dir.file("check.py"), R"(import sys, numpy, torch
seed, path = int(sys.argv[1]), sys.argv[2]
got = numpy.fromfile(path, dtype=numpy.float32)
def draws(g):
    return torch.cat([torch.randn(1, 4, 64, 64, generator=g).flatten(), torch.randn(5, generator=g),
                      torch.randn(2, 4, 8, 8, generator=g).flatten()]).numpy()
explicit = draws(torch.Generator().manual_seed(seed))
torch.manual_seed(seed)
default = draws(None)
ok = got.tobytes() == explicit.tobytes() and got.tobytes() == default.tobytes()
print("python randn equal:", ok)
sys.exit(0 if ok else 1)
)");
  EXPECT_EQ(test::run_python("'" + dir.file("check.py") + "' " + std::to_string(seed) + " '" +
                             dir.file("cpp.f32") + "'"),
            0);
}

}  // namespace
}  // namespace voken::diffusion
