// StateDict: named tensors from any supported checkpoint (safetensors, torch zip, sharded
// indexes, HF/diffusers directories), with prefix views and rename rules; WeightLoader: how a
// model component takes its weights (dtype/device conversion, strict checking that reports
// every missing, unexpected and wrongly shaped key in one error).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace voken::io {

// One rename rule: every match of the ECMAScript regex `pattern` in a key is replaced by
// `replacement` ($1.. refer to groups). Rules apply in order.
struct RenameRule {
  std::string pattern;
  std::string replacement;
};

class StateDict {
 public:
  StateDict() = default;

  // `path` is one of: a .safetensors file; a torch.save zip (.pth .pt .bin .ckpt);
  // a *.safetensors.index.json or pytorch_model.bin.index.json (shards); or a directory holding
  // model.safetensors(.index.json), pytorch_model.bin(.index.json),
  // diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin (safetensors preferred).
  // For torch files, `inner_key` selects the dict holding the tensors (see torch_state_dict).
  static StateDict load(const std::string& path, const std::string& inner_key = "");

  // Adds a tensor; throws WeightsError if the name is already present.
  void insert(const std::string& name, const at::Tensor& tensor, const std::string& source);

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws WeightsError naming the checkpoint and the missing key.
  const at::Tensor& at(const std::string& name) const;
  const std::string& source_of(const std::string& name) const;
  std::vector<std::string> keys() const;  // insertion (file) order
  std::size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  // A human-readable origin for errors: the file, or "N files under DIR".
  const std::string& origin() const { return origin_; }

  // Keys starting with `prefix`, with the prefix removed (tensors shared, not copied).
  StateDict with_prefix(const std::string& prefix) const;
  // All keys renamed by `rules`; throws WeightsError if two keys collide.
  StateDict renamed(const std::vector<RenameRule>& rules) const;
  // Total bytes of all tensors.
  std::size_t nbytes() const;

 private:
  struct Entry {
    std::string name;
    at::Tensor tensor;
    std::string source;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> index_;
  std::string origin_;
  friend class WeightLoader;
};

// How weights are materialised for compute.
struct WeightOptions {
  // Floating-point weights are converted to this dtype. Unset: keep the file's dtype, except
  // fp16 on CPU, which becomes fp32 (libtorch 1.13 has no fp16 matmul on CPU).
  std::optional<at::ScalarType> float_dtype;
  at::Device device = at::kCPU;
};

// Converts one weight as WeightOptions says (zero-copy when nothing changes).
at::Tensor convert_weight(const at::Tensor& tensor, const WeightOptions& options);

// (key, shape) pairs, in the order a component takes them.
using WeightShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// A component's view of its checkpoint while it is being built. Problems are collected, not
// thrown one by one; finish() throws one WeightsError listing them all.
class WeightLoader {
 public:
  // `what` names the component in errors, e.g. "LLaMA (/models/vicuna)".
  WeightLoader(StateDict weights, WeightOptions options, std::string what);

  // The tensor `name`, converted, checked against `shape` (-1 = any size in that dimension).
  // A missing or mis-shaped tensor is recorded and a zero tensor of `shape` returned, so that
  // construction can go on and report every problem at once.
  at::Tensor take(const std::string& name, const std::vector<int64_t>& shape);
  // Like take, but an absent tensor is not an error: returns an undefined tensor.
  at::Tensor take_optional(const std::string& name, const std::vector<int64_t>& shape);
  // Shape of a stored tensor without taking it (nullopt when absent); for deriving dimensions
  // from the weights themselves.
  std::optional<std::vector<int64_t>> shape_of(const std::string& name) const;
  bool contains(const std::string& name) const { return weights_.contains(name); }

  // Keys matching this ECMAScript regex are known to be unused (e.g. a ViT block more than is
  // built, t5_proj in a BLIP-2 file) and are not reported as unexpected.
  void ignore(const std::string& pattern);

  // Throws WeightsError if anything was missing, mis-shaped, or (when `strict`) left unused.
  void finish(bool strict = true);

  const WeightOptions& options() const { return options_; }
  const StateDict& weights() const { return weights_; }
  // The required tensors found absent so far, with the shapes asked for, in take order.
  const WeightShapes& missing() const { return missing_; }

 private:
  at::Tensor take_impl(const std::string& name, const std::vector<int64_t>& shape, bool required);
  StateDict weights_;
  WeightOptions options_;
  std::string what_;
  std::set<std::string> taken_;
  std::vector<std::regex> ignored_;
  WeightShapes missing_;
  std::vector<std::string> mis_shaped_;
};

// Every (key, shape) `build` takes from a loader with take() (not take_optional), in take order:
// `build` runs against an empty checkpoint, where each take is recorded as missing with the shape
// it asks for. For writing checkpoints with exactly a component's keys (random-weight models).
WeightShapes expected_weights(const std::function<void(WeightLoader&)>& build);

}  // namespace voken::io
