// Test helpers: small diffusers-layout model folders (config.json + random weights) for the UNet
// and VAE tests, with exactly the keys and shapes the C++ model takes.
//
// The key list comes from the model itself (io::expected_weights: built once against an empty
// checkpoint, every key it takes is recorded as missing with its expected shape).
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "voken/error.h"

namespace voken::test {

using io::expected_weights;
using io::WeightShapes;

// Random weights scaled like an initialised network: norm weights near 1, biases small, others
// ~ N(0, 1/fan_in), so activations stay O(1) through the blocks.
inline std::vector<std::pair<std::string, at::Tensor>> random_weights(const WeightShapes& shapes,
                                                                      uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<std::pair<std::string, at::Tensor>> out;
  const std::regex norm_weight(R"((norm\d*|norm_out|group_norm|conv_norm_out)\.weight$)");
  for (const auto& [name, shape] : shapes) {
    at::Tensor t = at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat));
    if (std::regex_search(name, norm_weight)) {
      t = 1 + 0.1 * t;
    } else if (shape.size() == 1) {
      t = 0.05 * t;
    } else {
      int64_t fan_in = 1;
      for (std::size_t d = 1; d < shape.size(); ++d) fan_in *= shape[d];
      t = t / std::sqrt(static_cast<double>(fan_in));
    }
    out.emplace_back(name, t.contiguous());
  }
  return out;
}

enum class CheckpointFormat { Safetensors, TorchBin };

// Writes <dir>/config.json and the checkpoint (weights cast to `dtype`).
inline void write_model(const std::string& dir, const io::Json& config,
                        const std::vector<std::pair<std::string, at::Tensor>>& weights,
                        at::ScalarType dtype = at::kFloat,
                        CheckpointFormat format = CheckpointFormat::Safetensors) {
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir + "/config.json");
    out << config.dump(2);
  }
  std::vector<std::pair<std::string, at::Tensor>> cast;
  for (const auto& [name, t] : weights) cast.emplace_back(name, t.to(dtype).contiguous());
  if (format == CheckpointFormat::Safetensors)
    io::write_safetensors(dir + "/diffusion_pytorch_model.safetensors", cast);
  else
    io::save_torch_state_dict(dir + "/diffusion_pytorch_model.bin", cast);
}

}  // namespace voken::test
