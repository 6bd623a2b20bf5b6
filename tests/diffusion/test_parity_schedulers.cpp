// Parity of the five schedulers with HF diffusers 0.31 over every case of the golden folder
// `schedulers`: the config is read from the case's scheduler_dir, then the reference loop runs
// with the fake model 0.1 * scale_model_input(x, t) + sin(t / 100), injecting the reference's
// per-step noise where the scheduler is stochastic. Every output is compared with its own
// tolerance from cases.json; one PARITY line per case.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "common/golden.h"
#include "diffusion/scheduler.h"

namespace voken::diffusion {
namespace {

struct Tolerance {
  double atol = 0.0;
  double rtol = 0.0;
};

// The tensor's own tolerance ("tolerances"), else the case-level pair.
Tolerance tolerance_for(const io::Json& golden_case, const std::string& tensor) {
  Tolerance tolerance{golden_case.value("atol", 0.0), golden_case.value("rtol", 0.0)};
  if (golden_case.contains("tolerances") && golden_case.at("tolerances").contains(tensor)) {
    const auto& entry = golden_case.at("tolerances").at(tensor);
    tolerance = {entry.value("atol", tolerance.atol), entry.value("rtol", tolerance.rtol)};
  }
  return tolerance;
}

void run_case(const test::GoldenSet& golden, const io::Json& golden_case) {
  const auto name = golden_case.at("name").get<std::string>();
  SCOPED_TRACE(name);
  const auto& params = golden_case.at("params");
  const auto steps = params.at("num_inference_steps").get<int64_t>();
  const auto config =
      SchedulerConfig::from_file(golden.dir() + "/" + params.at("scheduler_dir").get<std::string>());
  auto scheduler = make_scheduler(config);
  scheduler->set_timesteps(steps);

  const auto start = golden.tensor(name + ".start");
  const std::string noise_name = name + ".step_noise";
  const at::Tensor step_noise = golden.has(noise_name) ? golden.tensor(noise_name) : at::Tensor();
  ASSERT_TRUE(start.defined());

  std::map<std::string, at::Tensor> got;
  got["timesteps"] = scheduler->timesteps();
  got["init_noise_sigma"] = at::full({1}, scheduler->init_noise_sigma(), at::kFloat);
  if (scheduler->sigmas().defined()) got["sigmas"] = scheduler->sigmas();

  auto x = start * scheduler->init_noise_sigma();
  std::vector<at::Tensor> model_inputs, model_outputs, latents;
  for (int64_t i = 0; i < scheduler->num_steps(); ++i) {
    const double t = scheduler->timestep(i);
    const auto x_in = scheduler->scale_model_input(x, i);
    const auto out = x_in * 0.1 + std::sin(t / 100.0);
    StepOptions options;
    options.eta = params.value("eta", 0.0);  // DDIM's step argument, when a case sets it
    if (scheduler->is_stochastic(options)) {
      ASSERT_TRUE(step_noise.defined()) << name << ": stochastic scheduler but no " << noise_name;
      ASSERT_LT(i, step_noise.size(0)) << noise_name;
      options.noise = step_noise[i];
    }
    x = scheduler->step(out, i, x, options);
    model_inputs.push_back(x_in);
    model_outputs.push_back(out);
    latents.push_back(x);
  }
  got["model_inputs"] = at::stack(model_inputs);
  got["model_outputs"] = at::stack(model_outputs);
  got["latents"] = at::stack(latents);

  test::ParityCase parity(golden.component(), name);
  for (const auto& [tensor_name, description] : golden_case.at("outputs").items()) {
    const auto output = tensor_name.substr(tensor_name.find('.') + 1);
    const auto it = got.find(output);
    if (it == got.end()) {
      ADD_FAILURE() << name << ": the test does not produce golden output '" << tensor_name << "'";
      parity.compare(output, at::Tensor(), golden.tensor(tensor_name), 0.0);
      continue;
    }
    const auto want = golden.tensor(tensor_name);
    const auto tolerance = tolerance_for(golden_case, tensor_name);
    if (!at::isFloatingType(want.scalar_type()))
      parity.compare_exact(output, it->second, want);
    else
      parity.compare(output, it->second, want, tolerance.atol, tolerance.rtol);
  }
  parity.finish();
}

TEST(SchedulerParity, EveryGoldenCase) {
  const auto golden = test::GoldenSet::open("schedulers");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("schedulers");
  ASSERT_FALSE(golden->cases().empty());
  for (const auto& golden_case : golden->cases()) run_case(*golden, golden_case);
}

}  // namespace
}  // namespace voken::diffusion
