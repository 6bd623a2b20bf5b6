#include "llm/adapters.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <regex>
#include <set>

#include "io/paths.h"
#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

using io::is_directory;
using io::path_exists;
using io::starts_with;

// The last dotted segment of a module path ("model.layers.0.self_attn.q_proj" -> "q_proj").
std::string leaf_name(const std::string& module) {
  const auto dot = module.find_last_of('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

}  // namespace

LoraConfig LoraConfig::from_json(const io::JsonView& json) {
  LoraConfig config;
  const std::string& source = json.source();
  if (json.has("peft_type")) {
    const auto type = json.get<std::string>("peft_type");
    if (type != "LORA") throw ConfigError(source + ": peft_type is '" + type + "', expected 'LORA'");
  }
  // PEFT's LoraConfig defaults.
  config.r = json.get_or<int64_t>("r", 8);
  config.lora_alpha = json.get_or<double>("lora_alpha", 8.0);
  if (config.r <= 0)
    throw ConfigError(source + ": field 'r' must be positive, got " + std::to_string(config.r));
  if (json.get_or<bool>("fan_in_fan_out", false))
    throw ConfigError(source + ": fan_in_fan_out=true is for Conv1D layers (GPT-2), not LLaMA's nn.Linear");
  for (const char* unsupported : {"use_rslora", "use_dora"})
    if (json.get_or<bool>(unsupported, false))
      throw ConfigError(source + ": " + unsupported + "=true is not supported");
  if (json.has("target_modules")) {
    const auto& targets = json.json().at("target_modules");
    if (!targets.is_array())
      throw ConfigError(source + ": field 'target_modules' must be a list of module names (a regex string " +
                        "is not supported): " + targets.dump());
    for (const auto& t : targets) {
      if (!t.is_string())
        throw ConfigError(source + ": field 'target_modules' holds a non-string: " + t.dump());
      config.target_modules.push_back(t.get<std::string>());
    }
  }
  return config;
}

at::Tensor LoraUpdate::delta() const {
  c10::InferenceMode guard;
  return at::matmul(b.to(at::kFloat), a.to(at::kFloat)) * scaling;
}

std::vector<std::pair<at::Tensor, at::Tensor>> PrefixEncoder::key_values(int64_t num_layers, int64_t kv_heads,
                                                                         int64_t head_dim) const {
  c10::InferenceMode guard;
  const at::Tensor tokens = embedding.to(at::kFloat);
  const at::Tensor flat =
      has_projection()
          ? at::linear(at::tanh(at::linear(tokens, hidden_weight.to(at::kFloat), hidden_bias.to(at::kFloat))),
                       output_weight.to(at::kFloat), output_bias.to(at::kFloat))
          : tokens;
  const int64_t expected = num_layers * 2 * kv_heads * head_dim;
  if (flat.size(1) != expected)
    throw ConfigError("the prefix encoder produces " + std::to_string(flat.size(1)) +
                      " values per virtual token; this model needs layers*2*kv_heads*head_dim = " +
                      std::to_string(num_layers) + "*2*" + std::to_string(kv_heads) + "*" +
                      std::to_string(head_dim) + " = " + std::to_string(expected));
  const int64_t count = num_virtual_tokens();
  // get_prompt: view(P, layers*2, heads, head_dim) -> [layers*2, heads, P, head_dim].
  const at::Tensor stacked = flat.view({count, num_layers * 2, kv_heads, head_dim}).permute({1, 2, 0, 3});
  std::vector<std::pair<at::Tensor, at::Tensor>> result;
  for (int64_t l = 0; l < num_layers; ++l)
    result.emplace_back(stacked[2 * l].contiguous(), stacked[2 * l + 1].contiguous());
  return result;
}

LlamaAdapters read_llama_adapters(const io::StateDict& checkpoint, const AdapterReadOptions& options) {
  c10::InferenceMode guard;
  LlamaAdapters result;
  result.source = checkpoint.origin();
  std::vector<std::string> problems;

  // PEFT names below the LLaMA: `<module>.lora_A.<adapter>.weight` (in memory and in Lightning
  // checkpoints) or `<module>.lora_A.weight` (saved adapter files); the same for
  // modules_to_save; `original_module` / `base_layer` are PEFT's frozen copies of base tensors.
  static const std::regex lora_key(R"(^(.+)\.lora_([AB])(?:\.([^.]+))?\.weight$)");
  static const std::regex saved_module_key(R"(^(.+)\.modules_to_save(?:\.([^.]+))?\.weight$)");
  static const std::regex original_key(R"(^(.+)\.(?:original_module|base_layer)\.weight$)");
  static const std::regex full_weight_key(
      R"(^(model\.embed_tokens|model\.norm|model\.layers\.\d+\..+|lm_head)\.weight$)");

  struct PendingLora {
    at::Tensor a, b;
  };
  std::map<std::string, PendingLora> pending;
  std::map<std::string, at::Tensor> encoder;

  auto add_replacement = [&](const std::string& name, const at::Tensor& tensor, const std::string& key) {
    if (result.replacements.count(name))
      problems.push_back(key + ": a second replacement for " + name);
    else
      // As stored (typically a view of the mapped checkpoint): the model's loader converts it to
      // its own dtype once, so no float32 copy of a vocab x hidden matrix is made on the way.
      result.replacements.emplace(name, tensor);
  };
  auto check_adapter_name = [&](const std::string& adapter, const std::string& key) {
    if (!adapter.empty() && adapter != "default")
      problems.push_back(key + ": adapter '" + adapter +
                         "' (only PEFT's single 'default' adapter is supported)");
  };

  for (const auto& key : checkpoint.keys()) {
    const at::Tensor& tensor = checkpoint.at(key);
    if (!options.prefix_encoder_prefix.empty() && starts_with(key, options.prefix_encoder_prefix)) {
      const std::string name = key.substr(options.prefix_encoder_prefix.size());
      static const std::set<std::string> known = {"embedding.weight", "transform.0.weight",
                                                  "transform.0.bias", "transform.2.weight",
                                                  "transform.2.bias"};
      if (known.count(name))
        encoder[name] = tensor.to(at::kFloat);
      else
        problems.push_back("unexpected prefix-encoder tensor " + key + " " +
                           io::shape_string(tensor.sizes()));
      continue;
    }
    if (!starts_with(key, options.llama_prefix)) continue;  // another component's weights
    std::string name = key.substr(options.llama_prefix.size());
    if (starts_with(name, "base_model.model.")) name = name.substr(std::string("base_model.model.").size());
    std::smatch m;
    if (std::regex_match(name, m, lora_key)) {
      const std::string module = m[1].str();
      check_adapter_name(m[3].str(), key);
      if (!options.lora.target_modules.empty() &&
          std::find(options.lora.target_modules.begin(), options.lora.target_modules.end(),
                    leaf_name(module)) == options.lora.target_modules.end()) {
        problems.push_back(key + ": module '" + leaf_name(module) + "' is not among the LoRA target_modules");
        continue;
      }
      (m[2].str() == "A" ? pending[module].a : pending[module].b) = tensor.to(at::kFloat);
    } else if (std::regex_match(name, m, saved_module_key)) {
      check_adapter_name(m[2].str(), key);
      add_replacement(m[1].str() + ".weight", tensor, key);
    } else if (std::regex_match(name, m, original_key)) {
      // The base tensor again; the base checkpoint already provides it.
    } else if (std::regex_match(name, full_weight_key)) {
      add_replacement(name, tensor, key);  // a stage-1 checkpoint's trained embed_tokens/lm_head
    } else {
      problems.push_back("unexpected tensor " + key + " " + io::shape_string(tensor.sizes()));
    }
  }

  for (auto& [module, lora] : pending) {
    if (!lora.a.defined() || !lora.b.defined()) {
      problems.push_back(module + ": lora_" + std::string(lora.a.defined() ? "A" : "B") + " without lora_" +
                         (lora.a.defined() ? "B" : "A"));
      continue;
    }
    if (lora.a.dim() != 2 || lora.b.dim() != 2 || lora.a.size(0) != lora.b.size(1)) {
      problems.push_back(module + ": rank mismatch, lora_A " + io::shape_string(lora.a.sizes()) +
                         " (expected [r, in])" + " vs lora_B " + io::shape_string(lora.b.sizes()) +
                         " (expected [out, r])");
      continue;
    }
    const int64_t rank = lora.a.size(0);
    if (options.lora.r > 0 && rank != options.lora.r) {
      problems.push_back(module + ": rank mismatch, the weights have r=" + std::to_string(rank) +
                         " but the LoRA config says r=" + std::to_string(options.lora.r));
      continue;
    }
    LoraUpdate update;
    update.a = lora.a;
    update.b = lora.b;
    update.scaling = options.lora.lora_alpha / static_cast<double>(rank);
    result.lora.emplace(module + ".weight", std::move(update));
  }

  if (!encoder.empty()) {
    PrefixEncoder prefix;
    auto get = [&](const std::string& name) {
      const auto it = encoder.find(name);
      return it == encoder.end() ? at::Tensor() : it->second;
    };
    prefix.embedding = get("embedding.weight");
    prefix.hidden_weight = get("transform.0.weight");
    prefix.hidden_bias = get("transform.0.bias");
    prefix.output_weight = get("transform.2.weight");
    prefix.output_bias = get("transform.2.bias");
    const std::string where = options.prefix_encoder_prefix;
    const int transform_parts = prefix.hidden_weight.defined() + prefix.hidden_bias.defined() +
                                prefix.output_weight.defined() + prefix.output_bias.defined();
    if (!prefix.embedding.defined() || prefix.embedding.dim() != 2) {
      problems.push_back(where + "embedding.weight: missing or not [num_virtual_tokens, dim]");
    } else if (transform_parts != 0 && transform_parts != 4) {
      problems.push_back(where + "transform.{0,2}.{weight,bias}: " + std::to_string(transform_parts) +
                         " of the 4 projection tensors present");
    } else if (transform_parts == 4) {
      const int64_t dim = prefix.embedding.size(1);
      const bool fits =
          prefix.hidden_weight.dim() == 2 && prefix.hidden_weight.size(1) == dim &&
          prefix.hidden_bias.dim() == 1 && prefix.hidden_bias.size(0) == prefix.hidden_weight.size(0) &&
          prefix.output_weight.dim() == 2 && prefix.output_weight.size(1) == prefix.hidden_weight.size(0) &&
          prefix.output_bias.dim() == 1 && prefix.output_bias.size(0) == prefix.output_weight.size(0);
      if (!fits)
        problems.push_back(where + "transform: shapes do not chain: embedding " +
                           io::shape_string(prefix.embedding.sizes()) + ", transform.0 " +
                           io::shape_string(prefix.hidden_weight.sizes()) + " + " +
                           io::shape_string(prefix.hidden_bias.sizes()) + ", transform.2 " +
                           io::shape_string(prefix.output_weight.sizes()) + " + " +
                           io::shape_string(prefix.output_bias.sizes()));
      else
        result.prefix = prefix;
    } else {
      result.prefix = prefix;
    }
  }

  if (!problems.empty()) {
    std::string message = checkpoint.origin() + ": the LLM adapter weights are not usable (" +
                          std::to_string(problems.size()) + " problems):";
    for (const auto& p : problems) message += "\n    " + p;
    throw WeightsError(message);
  }
  return result;
}

LlamaAdapters load_llama_adapters(const std::string& path, const AdapterReadOptions& options) {
  if (!path_exists(path)) throw FileNotFoundError("adapter checkpoint not found: " + path);
  if (is_directory(path) && path_exists(path + "/adapter_config.json")) {
    AdapterReadOptions peft = options;
    const io::Json json = io::read_json_file(path + "/adapter_config.json");
    peft.lora = LoraConfig::from_json(io::JsonView(json, path + "/adapter_config.json"));
    peft.llama_prefix = "";  // PEFT saves the wrapper's keys (base_model.model.…) at the root
    for (const char* name : {"adapter_model.safetensors", "adapter_model.bin"}) {
      const std::string file = path + "/" + name;
      if (path_exists(file)) return read_llama_adapters(io::StateDict::load(file), peft);
    }
    throw FileNotFoundError(
        path + ": PEFT adapter directory without adapter_model.safetensors or adapter_model.bin");
  }
  return read_llama_adapters(io::StateDict::load(path), options);
}

}  // namespace voken::llm
