#include "io/state_dict.h"

#include <ATen/ATen.h>
#include <sys/stat.h>

#include <regex>
#include <sstream>

#include "io/json_file.h"
#include "io/paths.h"
#include "io/safetensors.h"
#include "io/tensor_bytes.h"
#include "io/torch_file.h"
#include "voken/error.h"

namespace voken::io {
namespace {

std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// The checkpoint names HF and diffusers save under, in order of preference.
constexpr const char* kDirectoryCheckpoints[] = {
    "model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin",
};

void load_file_into(StateDict& out, const std::string& path, const std::string& inner_key) {
  auto mapped = MappedFile::open(path);
  if (is_torch_file(*mapped)) {
    const TorchFile file = load_torch_file(mapped);
    for (auto& [name, tensor] : torch_state_dict(file, inner_key)) out.insert(name, tensor, path);
    return;
  }
  SafetensorsFile file = [&] {
    try {
      return SafetensorsFile::open(std::move(mapped));
    } catch (const FormatError& e) {
      if (ends_with(path, ".safetensors")) throw;
      throw FormatError(path + ": neither a torch.save zip checkpoint nor a safetensors file (" + e.what() +
                        ")");
    }
  }();
  for (const auto& entry : file.entries()) out.insert(entry.name, file.tensor(entry), path);
}

void load_index_into(StateDict& out, const std::string& index_path) {
  const Json index = read_json_file(index_path);
  if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object())
    throw FormatError(index_path + ": shard index without a \"weight_map\" object");
  const std::string base = directory_of(index_path);
  std::vector<std::string> shards;
  for (const auto& [name, shard] : index.at("weight_map").items()) {
    if (!shard.is_string())
      throw FormatError(index_path + ": weight_map entry '" + name + "' is not a file name");
    const std::string file = shard.get<std::string>();
    if (file.find('/') != std::string::npos || file == "..")
      throw FormatError(index_path + ": shard name '" + file + "' must be a plain file name");
    if (std::find(shards.begin(), shards.end(), file) == shards.end()) shards.push_back(file);
  }
  for (const auto& shard : shards) {
    const std::string shard_path = base + "/" + shard;
    if (!path_exists(shard_path))
      throw FileNotFoundError(index_path + ": shard file not found: " + shard_path);
    load_file_into(out, shard_path, "");
  }
  for (const auto& [name, shard] : index.at("weight_map").items()) {
    if (!out.contains(name) || out.source_of(name) != base + "/" + shard.get<std::string>())
      throw FormatError(index_path + ": tensor '" + name + "' is listed in shard " +
                        shard.get<std::string>() + " but that file does not hold it");
  }
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += "\n    " + item;
  return out;
}

}  // namespace

StateDict StateDict::load(const std::string& path, const std::string& inner_key) {
  if (!path_exists(path)) throw FileNotFoundError("checkpoint not found: " + path);
  StateDict result;
  result.origin_ = path;
  if (is_directory(path)) {
    for (const char* name : kDirectoryCheckpoints) {
      const std::string candidate = path + "/" + name;
      if (path_exists(candidate)) return load(candidate, inner_key);
    }
    std::string expected;
    for (const char* name : kDirectoryCheckpoints)
      expected += std::string(expected.empty() ? "" : ", ") + name;
    throw FileNotFoundError(path + ": directory holds no checkpoint (looked for " + expected + ")");
  }
  if (ends_with(path, ".index.json"))
    load_index_into(result, path);
  else
    load_file_into(result, path, inner_key);
  return result;
}

void StateDict::insert(const std::string& name, const at::Tensor& tensor, const std::string& source) {
  if (contains(name))
    throw WeightsError("duplicate tensor '" + name + "' (in " + source_of(name) + " and " + source + ")");
  index_.emplace(name, entries_.size());
  entries_.push_back({name, tensor, source});
}

const at::Tensor& StateDict::at(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw WeightsError(origin_ + ": no tensor named '" + name + "'");
  return entries_[it->second].tensor;
}

const std::string& StateDict::source_of(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw WeightsError(origin_ + ": no tensor named '" + name + "'");
  return entries_[it->second].source;
}

std::vector<std::string> StateDict::keys() const {
  std::vector<std::string> keys;
  keys.reserve(entries_.size());
  for (const auto& e : entries_) keys.push_back(e.name);
  return keys;
}

StateDict StateDict::with_prefix(const std::string& prefix) const {
  StateDict view;
  view.origin_ = origin_ + (prefix.empty() ? "" : " [" + prefix + "*]");
  for (const auto& e : entries_)
    if (e.name.compare(0, prefix.size(), prefix) == 0)
      view.insert(e.name.substr(prefix.size()), e.tensor, e.source);
  return view;
}

StateDict StateDict::renamed(const std::vector<RenameRule>& rules) const {
  std::vector<std::pair<std::regex, std::string>> compiled;
  for (const auto& rule : rules) {
    try {
      compiled.emplace_back(std::regex(rule.pattern), rule.replacement);
    } catch (const std::regex_error& e) {
      throw ArgumentError("invalid rename pattern '" + rule.pattern + "': " + e.what());
    }
  }
  StateDict out;
  out.origin_ = origin_;
  for (const auto& e : entries_) {
    std::string name = e.name;
    for (const auto& [pattern, replacement] : compiled) name = std::regex_replace(name, pattern, replacement);
    if (out.contains(name)) throw WeightsError(origin_ + ": renaming maps two tensors to '" + name + "'");
    out.insert(name, e.tensor, e.source);
  }
  return out;
}

std::size_t StateDict::nbytes() const {
  std::size_t total = 0;
  for (const auto& e : entries_)
    total += static_cast<std::size_t>(e.tensor.numel()) * e.tensor.element_size();
  return total;
}

at::Tensor convert_weight(const at::Tensor& tensor, const WeightOptions& options) {
  at::ScalarType dtype = tensor.scalar_type();
  if (at::isFloatingType(dtype)) {
    if (options.float_dtype)
      dtype = *options.float_dtype;
    else if (dtype == at::kHalf && options.device.is_cpu())
      dtype = at::kFloat;
  }
  return tensor.to(options.device, dtype);  // returns `tensor` itself when nothing changes
}

WeightLoader::WeightLoader(StateDict weights, WeightOptions options, std::string what)
    : weights_(std::move(weights)), options_(options), what_(std::move(what)) {}

at::Tensor WeightLoader::take(const std::string& name, const std::vector<int64_t>& shape) {
  return take_impl(name, shape, true);
}

at::Tensor WeightLoader::take_optional(const std::string& name, const std::vector<int64_t>& shape) {
  return take_impl(name, shape, false);
}

std::optional<std::vector<int64_t>> WeightLoader::shape_of(const std::string& name) const {
  if (!weights_.contains(name)) return std::nullopt;
  return weights_.at(name).sizes().vec();
}

at::Tensor WeightLoader::take_impl(const std::string& name, const std::vector<int64_t>& shape,
                                   bool required) {
  auto placeholder = [&] {
    std::vector<int64_t> concrete;
    for (int64_t d : shape) concrete.push_back(d < 0 ? 0 : d);
    // A broadcast zero: the right shape for construction to go on, and no memory.
    const auto dtype = options_.float_dtype.value_or(at::kFloat);
    return at::zeros({}, at::TensorOptions().dtype(dtype).device(options_.device)).expand(concrete);
  };
  if (!weights_.contains(name)) {
    if (!required) return {};
    missing_.emplace_back(name, shape);
    return placeholder();
  }
  taken_.insert(name);
  const at::Tensor& stored = weights_.at(name);
  bool matches = stored.dim() == static_cast<int64_t>(shape.size());
  for (std::size_t d = 0; matches && d < shape.size(); ++d)
    matches = shape[d] < 0 || stored.size(static_cast<int64_t>(d)) == shape[d];
  if (!matches) {
    mis_shaped_.push_back(name + ": expected " + shape_string(shape) + ", found " +
                          shape_string(stored.sizes()) + " in " + weights_.source_of(name));
    return placeholder();
  }
  return convert_weight(stored, options_);
}

void WeightLoader::ignore(const std::string& pattern) {
  try {
    ignored_.emplace_back(pattern);
  } catch (const std::regex_error& e) {
    throw ArgumentError(what_ + ": invalid ignore pattern '" + pattern + "': " + e.what());
  }
}

void WeightLoader::finish(bool strict) {
  std::vector<std::string> unexpected;
  if (strict) {
    for (const auto& name : weights_.keys()) {
      if (taken_.count(name)) continue;
      bool skip = false;
      for (const auto& re : ignored_) skip = skip || std::regex_search(name, re);
      if (!skip) unexpected.push_back(name + " " + shape_string(weights_.at(name).sizes()));
    }
  }
  if (missing_.empty() && mis_shaped_.empty() && unexpected.empty()) return;
  std::ostringstream message;
  message << what_ << ": weights do not match the model (from " << weights_.origin() << ")";
  if (!missing_.empty()) {
    std::vector<std::string> missing;
    for (const auto& [name, shape] : missing_) missing.push_back(name + " " + shape_string(shape));
    message << "\n  missing (" << missing.size() << "):" << joined(missing);
  }
  if (!mis_shaped_.empty())
    message << "\n  wrong shape (" << mis_shaped_.size() << "):" << joined(mis_shaped_);
  if (!unexpected.empty()) message << "\n  unexpected (" << unexpected.size() << "):" << joined(unexpected);
  throw WeightsError(message.str());
}

WeightShapes expected_weights(const std::function<void(WeightLoader&)>& build) {
  WeightLoader loader(StateDict(), WeightOptions{}, "probe");
  build(loader);
  return loader.missing();
}

}  // namespace voken::io
