#include "pipeline/bundle.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "io/paths.h"
#include "io/tensor_bytes.h"
#include "llm/adapters.h"
#include "voken/error.h"

namespace voken::pipeline {

namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// Manifest parsing: every problem of the file is collected, then thrown as one ConfigError.

constexpr const char* kPartNames[] = {"llm", "tokenizer", "vision", "minigpt5", "diffusion"};

std::string json_type_name(const io::Json& value) { return value.type_name(); }

class ManifestParser {
 public:
  ManifestParser(std::string source, std::string base_dir)
      : source_(std::move(source)), base_dir_(std::move(base_dir)) {}

  void problem(const std::string& field, const std::string& message) {
    problems_.push_back("'" + field + "': " + message);
  }

  // Unknown keys are errors (a typo must not silently drop a part); keys starting with '_' are
  // comments.
  void check_keys(const io::Json& object, const std::string& where, const std::set<std::string>& known) {
    for (const auto& [key, value] : object.items()) {
      (void)value;
      if (!key.empty() && key[0] == '_') continue;
      if (!known.count(key)) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
        problem(where.empty() ? key : where + "." + key, "unknown field (known: " + list + ")");
      }
    }
  }

  std::optional<std::string> string_field(const io::Json& object, const std::string& where,
                                          const std::string& key, bool required) {
    const std::string field = where.empty() ? key : where + "." + key;
    if (!object.contains(key) || object.at(key).is_null()) {
      if (required) problem(field, "missing (required)");
      return std::nullopt;
    }
    const io::Json& value = object.at(key);
    if (!value.is_string()) {
      problem(field, "expected a string, found " + json_type_name(value) + " " + value.dump());
      return std::nullopt;
    }
    if (value.get<std::string>().empty()) {
      problem(field, "is empty");
      return std::nullopt;
    }
    return value.get<std::string>();
  }

  std::optional<int64_t> int_field(const io::Json& object, const std::string& where, const std::string& key) {
    const std::string field = where.empty() ? key : where + "." + key;
    if (!object.contains(key) || object.at(key).is_null()) return std::nullopt;
    const io::Json& value = object.at(key);
    if (!value.is_number_integer()) {
      problem(field, "expected an integer, found " + json_type_name(value) + " " + value.dump());
      return std::nullopt;
    }
    return value.get<int64_t>();
  }

  std::optional<bool> bool_field(const io::Json& object, const std::string& where, const std::string& key) {
    const std::string field = where.empty() ? key : where + "." + key;
    if (!object.contains(key) || object.at(key).is_null()) return std::nullopt;
    const io::Json& value = object.at(key);
    if (!value.is_boolean()) {
      problem(field, "expected true or false, found " + value.dump());
      return std::nullopt;
    }
    return value.get<bool>();
  }

  // A part object; nullptr (with a problem when required) if absent or not an object.
  const io::Json* part(const io::Json& root, const std::string& key, bool required) {
    if (!root.contains(key) || root.at(key).is_null()) {
      if (required) problem(key, "missing (required part)");
      return nullptr;
    }
    if (!root.at(key).is_object()) {
      problem(key, "expected an object, found " + json_type_name(root.at(key)) + " " + root.at(key).dump());
      return nullptr;
    }
    return &root.at(key);
  }

  std::string resolve(const std::string& path) const {
    const fs::path p(path);
    if (p.is_absolute() || base_dir_.empty()) return p.lexically_normal().string();
    return (fs::path(base_dir_) / p).lexically_normal().string();
  }

  std::optional<std::string> path_field(const io::Json& object, const std::string& where,
                                        const std::string& key, bool required) {
    auto value = string_field(object, where, key, required);
    if (!value) return std::nullopt;
    return resolve(*value);
  }

  static std::optional<std::string> normalize_dtype(const std::string& name) {
    if (name == "float32") return std::string("float32");
    // libtorch 1.13 has no float16 matrix products on the CPU: float16 runs as bfloat16.
    if (name == "bfloat16" || name == "float16") return std::string("bfloat16");
    return std::nullopt;
  }

  static bool valid_device(const std::string& name) {
    if (name == "cpu" || name == "cuda") return true;
    static const std::regex cuda_n(R"(^cuda:\d{1,3}$)");
    return std::regex_match(name, cuda_n);
  }

  PartPlacement placement(const io::Json& object, const std::string& where, const PartPlacement& fallback) {
    PartPlacement result = fallback;
    if (auto dtype = string_field(object, where, "dtype", false)) {
      if (auto normalized = normalize_dtype(*dtype))
        result.dtype = *normalized;
      else
        problem(where.empty() ? "dtype" : where + ".dtype",
                "unknown dtype '" + *dtype + "' (expected float32, bfloat16 or float16)");
    }
    if (auto device = string_field(object, where, "device", false)) {
      if (valid_device(*device))
        result.device = *device;
      else
        problem(where.empty() ? "device" : where + ".device",
                "unknown device '" + *device + "' (expected cpu, cuda or cuda:N)");
    }
    return result;
  }

  void finish() const {
    if (problems_.empty()) return;
    std::string message = source_ + ": the bundle manifest has " + std::to_string(problems_.size()) +
                          (problems_.size() == 1 ? " problem:" : " problems:");
    for (const auto& p : problems_) message += "\n  " + p;
    throw ConfigError(message);
  }

 private:
  std::string source_;
  std::string base_dir_;
  std::vector<std::string> problems_;
};

// ---------------------------------------------------------------------------------------------
// Recognising checkpoints, so that a file in the wrong slot is named for what it is.

bool has_key_with_prefix(const io::StateDict& weights, const std::string& prefix) {
  for (const auto& key : weights.keys())
    if (io::starts_with(key, prefix)) return true;
  return false;
}

std::string sample_keys(const io::StateDict& weights) {
  const auto keys = weights.keys();
  std::string out;
  for (size_t i = 0; i < keys.size() && i < 3; ++i) out += (i ? ", '" : "'") + keys[i] + "'";
  if (keys.size() > 3) out += ", ...";
  return out;
}

// What a set of tensors looks like, in words ("" when it is not recognised).
std::string recognise(const io::StateDict& weights) {
  if (weights.contains("conv_in.weight") && has_key_with_prefix(weights, "time_embedding."))
    return "a diffusers UNet (conv_in, time_embedding, ...)";
  if (weights.contains("encoder.conv_in.weight") && weights.contains("decoder.conv_in.weight"))
    return "a diffusers VAE (encoder.conv_in, decoder.conv_in, ...)";
  if (has_key_with_prefix(weights, "text_model.")) return "a CLIP text encoder (text_model.*)";
  if (weights.contains("model.embed_tokens.weight"))
    return "an HF LLaMA checkpoint (model.embed_tokens, ...)";
  if (weights.contains("t2i_decoder_prompt") || has_key_with_prefix(weights, "llm_to_t2i_mapping.") ||
      has_key_with_prefix(weights, "fc.") || has_key_with_prefix(weights, "model.llama_model."))
    return "a MiniGPT-5 stage checkpoint (fc, llm_to_t2i_mapping, model.llama_model.*)";
  if (weights.contains("query_tokens") || has_key_with_prefix(weights, "Qformer."))
    return "a BLIP-2 checkpoint (query_tokens, Qformer.*)";
  if (weights.contains("patch_embed.proj.weight") ||
      weights.contains("visual_encoder.patch_embed.proj.weight"))
    return "an EVA ViT checkpoint (patch_embed, blocks.*)";
  if (weights.contains("llama_proj.weight")) return "a MiniGPT-4 checkpoint (llama_proj)";
  return "";
}

// What a directory looks like from its config files ("" when not recognised).
std::string recognise_directory(const std::string& dir) {
  if (io::is_regular_file(dir + "/model_index.json"))
    return "a diffusers pipeline directory (model_index.json)";
  const std::string config = dir + "/config.json";
  if (io::is_regular_file(config)) {
    try {
      const io::Json json = io::read_json_file(config);
      if (json.is_object() && json.contains("_class_name") && json.at("_class_name").is_string())
        return "a diffusers " + json.at("_class_name").get<std::string>() + " directory";
      if (json.is_object() && json.contains("model_type") && json.at("model_type").is_string())
        return "an HF '" + json.at("model_type").get<std::string>() + "' model directory";
    } catch (const Error&) {
    }
  }
  if (io::is_regular_file(dir + "/scheduler_config.json")) return "a diffusers scheduler directory";
  if (io::is_regular_file(dir + "/tokenizer.model")) return "a tokenizer directory";
  return "";
}

std::string looks_like(const std::string& path, const io::StateDict* weights) {
  std::string what = weights ? recognise(*weights) : "";
  if (what.empty() && io::is_directory(path)) what = recognise_directory(path);
  if (what.empty() && weights)
    what =
        "a checkpoint with " + std::to_string(weights->size()) + " tensors (" + sample_keys(*weights) + ")";
  return what.empty() ? "" : "; it looks like " + what;
}

int64_t parameter_count(const io::StateDict& weights) {
  int64_t total = 0;
  for (const auto& key : weights.keys()) total += weights.at(key).numel();
  return total;
}

std::string format_count(int64_t count) {
  std::ostringstream out;
  out.precision(3);
  if (count >= 1000000000)
    out << static_cast<double>(count) / 1e9 << " B";
  else if (count >= 1000000)
    out << static_cast<double>(count) / 1e6 << " M";
  else if (count >= 1000)
    out << static_cast<double>(count) / 1e3 << " k";
  else
    out << count;
  return out.str() + " parameters";
}

// ---------------------------------------------------------------------------------------------
// check_bundle helpers.

class Checker {
 public:
  explicit Checker(BundleCheck& check) : check_(check) {}

  void add(BundleProblem::Kind kind, const std::string& part, const std::string& message) {
    check_.problems.push_back({kind, part, message});
  }

  // A path that must exist; a problem otherwise.
  bool exists(const std::string& part, const std::string& path, const std::string& expected) {
    if (io::path_exists(path)) return true;
    add(BundleProblem::Kind::MissingFile, part, "not found: " + path + " (expected " + expected + ")");
    return false;
  }

  // Opens a checkpoint (file or directory) without converting anything.
  std::optional<io::StateDict> open(const std::string& part, const std::string& path,
                                    const std::string& expected) {
    if (!exists(part, path, expected)) return std::nullopt;
    try {
      return io::StateDict::load(path);
    } catch (const FileNotFoundError& e) {
      // A directory without any checkpoint file of the known names.
      add(BundleProblem::Kind::WrongPart, part,
          path + " is not " + expected + ": " + e.what() + looks_like(path, nullptr));
    } catch (const Error& e) {
      add(BundleProblem::Kind::Config, part, "cannot read " + path + ": " + e.what());
    }
    return std::nullopt;
  }

  // Records a problem naming what the checkpoint looks like when `ok` is false.
  bool expect_kind(bool ok, const std::string& part, const std::string& path, const io::StateDict& weights,
                   const std::string& expected) {
    if (ok) return true;
    add(BundleProblem::Kind::WrongPart, part, path + " is not " + expected + looks_like(path, &weights));
    return false;
  }

  // Reads a config with one of the components' readers; problems recorded.
  template <typename F>
  auto config(const std::string& part, F&& read) -> std::optional<decltype(read())> {
    try {
      return read();
    } catch (const FileNotFoundError& e) {
      add(BundleProblem::Kind::MissingFile, part, e.what());
    } catch (const Error& e) {
      add(BundleProblem::Kind::Config, part, e.what());
    }
    return std::nullopt;
  }

 private:
  BundleCheck& check_;
};

// The rows of the LLM's input embedding after MiniGPT-5's checkpoints are applied (they replace
// embed_tokens with a resized copy), or nullopt when no checkpoint replaces it.
std::optional<int64_t> replaced_embedding_rows(const io::StateDict& stage) {
  static const std::regex embed_key(
      R"(^model\.llama_model\.(?:base_model\.model\.)?model\.embed_tokens(?:\.modules_to_save(?:\.[^.]+)?)?\.weight$)");
  for (const auto& key : stage.keys())
    if (std::regex_match(key, embed_key) && stage.at(key).dim() == 2) return stage.at(key).size(0);
  return std::nullopt;
}

bool is_minigpt5_checkpoint(const io::StateDict& weights) {
  return weights.contains(mapping::kDecoderPromptKey) || has_key_with_prefix(weights, mapping::kFcPrefix) ||
         has_key_with_prefix(weights, mapping::kTransformerPrefix) ||
         has_key_with_prefix(weights, "model.llama_model.") ||
         has_key_with_prefix(weights, "model.prefix_encoder.");
}

std::string placement_string(const PartPlacement& placement) {
  return placement.dtype + ", " + placement.device;
}

// Adapters of stage 1, then stage 2's on top, by target weight: what upstream's loading order
// gives (stage 1's on_load_checkpoint copies its embed_tokens/lm_head into every copy of them,
// then stage 2 with strict=False replaces the ones it holds).
llm::LlamaAdapters merged_adapters(const io::StateDict& stage1, const io::StateDict* stage2) {
  llm::LlamaAdapters adapters = llm::read_llama_adapters(stage1);
  if (stage2 == nullptr) return adapters;
  llm::LlamaAdapters over = llm::read_llama_adapters(*stage2);
  for (auto& [name, tensor] : over.replacements) adapters.replacements[name] = tensor;
  for (auto& [name, update] : over.lora) adapters.lora[name] = update;
  if (over.prefix) adapters.prefix = over.prefix;
  adapters.source = stage1.origin() + " + " + stage2->origin();
  return adapters;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PartPlacement

at::ScalarType PartPlacement::scalar_type() const { return dtype == "float32" ? at::kFloat : at::kBFloat16; }

at::Device PartPlacement::torch_device() const { return at::Device(device); }

// ---------------------------------------------------------------------------------------------
// BundleManifest

BundleManifest BundleManifest::read(const std::string& manifest_path) {
  std::string path = manifest_path;
  // A bundle directory stands for its bundle.json.
  if (io::is_directory(path)) path = (fs::path(path) / "bundle.json").string();
  if (!io::path_exists(path)) throw FileNotFoundError("bundle manifest not found: " + path);
  const io::Json json = io::read_json_file(path);
  const std::string base = fs::absolute(fs::path(path)).parent_path().lexically_normal().string();
  BundleManifest manifest = parse(json, base, path);
  manifest.manifest_path = path;
  return manifest;
}

BundleManifest BundleManifest::parse(const io::Json& json, const std::string& base_dir,
                                     const std::string& source) {
  if (!json.is_object()) throw ConfigError(source + ": a bundle manifest must be a JSON object");
  ManifestParser p(source, base_dir);
  BundleManifest m;
  m.base_dir = base_dir;

  std::set<std::string> top = {"voken_bundle", "name", "random_weights", "dtype", "device"};
  for (const char* part : kPartNames) top.insert(part);
  p.check_keys(json, "", top);

  if (!json.contains("voken_bundle") || json.at("voken_bundle").is_null()) {
    p.problem("voken_bundle", "missing (required; must be 1)");
  } else if (auto version = p.int_field(json, "", "voken_bundle")) {
    m.version = *version;
    if (*version != 1)
      p.problem("voken_bundle",
                "format version " + std::to_string(*version) + " is not supported (expected 1)");
  }
  if (json.contains("name") && !json.at("name").is_null()) {
    if (json.at("name").is_string())
      m.name = json.at("name").get<std::string>();
    else
      p.problem("name", "expected a string, found " + json.at("name").dump());
  }
  m.random_weights = p.bool_field(json, "", "random_weights").value_or(false);
  m.defaults = p.placement(json, "", PartPlacement{});

  if (const io::Json* llm = p.part(json, "llm", true)) {
    p.check_keys(*llm, "llm", {"path", "dtype", "device"});
    m.llm.path = p.path_field(*llm, "llm", "path", true).value_or("");
    m.llm.placement = p.placement(*llm, "llm", m.defaults);
  }
  m.tokenizer.path = m.llm.path;
  if (const io::Json* tokenizer = p.part(json, "tokenizer", false)) {
    // dtype/device are accepted for uniformity with the other parts (a tokenizer has no weights).
    p.check_keys(*tokenizer, "tokenizer", {"path", "dtype", "device"});
    p.placement(*tokenizer, "tokenizer", m.defaults);
    if (auto path = p.path_field(*tokenizer, "tokenizer", "path", false)) m.tokenizer.path = *path;
  }
  if (const io::Json* vision = p.part(json, "vision", true)) {
    p.check_keys(*vision, "vision",
                 {"vit", "qformer", "projection", "config", "preprocess", "dtype", "device"});
    m.vision.files.vit = p.path_field(*vision, "vision", "vit", true).value_or("");
    m.vision.files.qformer = p.path_field(*vision, "vision", "qformer", true).value_or("");
    m.vision.files.projection = p.path_field(*vision, "vision", "projection", true).value_or("");
    m.vision.config = p.path_field(*vision, "vision", "config", false).value_or("");
    if (auto preprocess = p.string_field(*vision, "vision", "preprocess", false)) {
      if (*preprocess == "playground")
        m.vision.preprocess = vision::TransformKind::Playground;
      else if (*preprocess == "blip2_eval")
        m.vision.preprocess = vision::TransformKind::Blip2Eval;
      else if (*preprocess == "train_eval")
        m.vision.preprocess = vision::TransformKind::TrainEval;
      else
        p.problem("vision.preprocess",
                  "unknown transform '" + *preprocess + "' (expected playground, blip2_eval or train_eval)");
    }
    m.vision.placement = p.placement(*vision, "vision", m.defaults);
  }
  if (const io::Json* minigpt5 = p.part(json, "minigpt5", true)) {
    p.check_keys(*minigpt5, "minigpt5", {"stage1", "stage2", "nhead", "img_token_num", "dtype", "device"});
    m.minigpt5.stage1 = p.path_field(*minigpt5, "minigpt5", "stage1", true).value_or("");
    m.minigpt5.stage2 = p.path_field(*minigpt5, "minigpt5", "stage2", false).value_or("");
    if (auto nhead = p.int_field(*minigpt5, "minigpt5", "nhead")) {
      if (*nhead <= 0)
        p.problem("minigpt5.nhead", "must be positive, found " + std::to_string(*nhead));
      else
        m.minigpt5.nhead = *nhead;
    }
    if (auto count = p.int_field(*minigpt5, "minigpt5", "img_token_num")) {
      if (*count <= 0)
        p.problem("minigpt5.img_token_num", "must be positive, found " + std::to_string(*count));
      else
        m.minigpt5.img_token_num = *count;
    }
    m.minigpt5.placement = p.placement(*minigpt5, "minigpt5", m.defaults);
  }
  if (const io::Json* diffusion = p.part(json, "diffusion", false)) {
    p.check_keys(*diffusion, "diffusion", {"path", "scheduler", "dtype", "device"});
    m.diffusion.path = p.path_field(*diffusion, "diffusion", "path", true).value_or("");
    if (auto scheduler = p.string_field(*diffusion, "diffusion", "scheduler", false)) {
      try {
        diffusion::scheduler_kind_from_name(*scheduler);
        m.diffusion.scheduler = *scheduler;
      } catch (const ArgumentError& e) {
        p.problem("diffusion.scheduler", e.what());
      }
    }
    m.diffusion.placement = p.placement(*diffusion, "diffusion", m.defaults);
  }
  p.finish();
  return m;
}

void BundleManifest::override_placement(const LoadOptions& options) {
  std::optional<std::string> dtype;
  if (!options.dtype.empty()) {
    dtype = ManifestParser::normalize_dtype(options.dtype);
    if (!dtype)
      throw ArgumentError("LoadOptions::dtype '" + options.dtype + "' is not float32, bfloat16 or float16");
  }
  if (!options.device.empty() && !ManifestParser::valid_device(options.device))
    throw ArgumentError("LoadOptions::device '" + options.device + "' is not cpu, cuda or cuda:N");
  for (PartPlacement* placement :
       {&defaults, &llm.placement, &vision.placement, &minigpt5.placement, &diffusion.placement}) {
    if (dtype) placement->dtype = *dtype;
    if (!options.device.empty()) placement->device = options.device;
  }
}

// ---------------------------------------------------------------------------------------------
// BundleCheck

std::string BundleCheck::report() const {
  std::string out;
  std::vector<const BundleProblem*> sorted;
  for (const auto& p : problems) sorted.push_back(&p);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const BundleProblem* a, const BundleProblem* b) { return a->part < b->part; });
  for (const auto* p : sorted) out += (out.empty() ? "" : "\n") + ("  " + p->part + ": " + p->message);
  return out;
}

void BundleCheck::throw_if_problems() const {
  if (problems.empty()) return;
  const std::string where = manifest.manifest_path.empty() ? std::string("bundle") : manifest.manifest_path;
  const std::string message = where + ": " + std::to_string(problems.size()) +
                              (problems.size() == 1 ? " problem" : " problems") +
                              " found before loading any weights:\n" + report();
  const bool all_missing = std::all_of(problems.begin(), problems.end(), [](const BundleProblem& p) {
    return p.kind == BundleProblem::Kind::MissingFile;
  });
  const bool all_weights = std::all_of(problems.begin(), problems.end(), [](const BundleProblem& p) {
    return p.kind == BundleProblem::Kind::Weights;
  });
  if (all_missing) throw FileNotFoundError(message);
  if (all_weights) throw WeightsError(message);
  throw ConfigError(message);
}

BundleCheck check_bundle(const BundleManifest& manifest, bool check_diffusion) {
  c10::InferenceMode guard;
  BundleCheck check;
  check.manifest = manifest;
  Checker c(check);
  using Kind = BundleProblem::Kind;

  // Devices: only the CPU is built into this libtorch unless it has CUDA; the LLM and the
  // diffusion model compute on the CPU only in this version.
  auto check_device = [&](const std::string& part, const PartPlacement& placement, bool cpu_only) {
    if (placement.device == "cpu") return;
    if (!at::hasCUDA())
      c.add(Kind::Config, part + ".device",
            "'" + placement.device + "' needs a CUDA build of libtorch; this one has no CUDA (use cpu)");
    else if (cpu_only)
      c.add(Kind::Config, part + ".device", "'" + placement.device + "': this part runs on the CPU only");
  };
  check_device("llm", manifest.llm.placement, true);
  check_device("vision", manifest.vision.placement, false);
  check_device("minigpt5", manifest.minigpt5.placement, false);
  if (check_diffusion) check_device("diffusion", manifest.diffusion.placement, true);

  // --- LLM --------------------------------------------------------------------------------
  const std::string& llm_dir = manifest.llm.path;
  if (c.exists("llm.path", llm_dir, "an HF LLaMA/Vicuna directory (config.json + weights)")) {
    if (!io::is_directory(llm_dir)) {
      std::optional<io::StateDict> weights;
      try {
        weights = io::StateDict::load(llm_dir);
      } catch (const Error&) {
      }
      c.add(Kind::WrongPart, "llm.path",
            llm_dir +
                " is a file; expected an HF LLaMA/Vicuna directory (config.json + model.safetensors or "
                "pytorch_model.bin)" +
                looks_like(llm_dir, weights ? &*weights : nullptr));
    } else {
      const std::string config_path = llm_dir + "/config.json";
      const std::string other = recognise_directory(llm_dir);
      if (io::is_regular_file(config_path) && other.find("diffusers") != std::string::npos) {
        c.add(Kind::WrongPart, "llm.path", llm_dir + " is not an HF LLaMA directory; it looks like " + other);
      } else {
        check.llm_config = c.config("llm.path", [&] { return llm::LlamaConfig::from_file(config_path); });
        check.llm_weights = c.open("llm.path", llm_dir, "an HF LLaMA/Vicuna directory with weights");
        if (check.llm_weights)
          c.expect_kind(check.llm_weights->contains("model.embed_tokens.weight"), "llm.path", llm_dir,
                        *check.llm_weights, "an HF LLaMA checkpoint (no 'model.embed_tokens.weight')");
      }
    }
  }

  // --- Tokenizer -----------------------------------------------------------------------------
  const std::string& tokenizer_path = manifest.tokenizer.path;
  if (c.exists("tokenizer.path", tokenizer_path, "a directory holding tokenizer.model, or the file")) {
    check.tokenizer = c.config("tokenizer.path", [&] {
      return io::is_directory(tokenizer_path) ? text::Tokenizer::from_directory(tokenizer_path)
                                              : text::Tokenizer::from_file(tokenizer_path);
    });
    if (check.tokenizer) {
      std::vector<std::string> absent;
      for (int64_t i = 0; i < manifest.minigpt5.img_token_num; ++i)
        if (!check.tokenizer->token_id("[IMG" + std::to_string(i) + "]"))
          absent.push_back("[IMG" + std::to_string(i) + "]");
      if (!check.tokenizer->token_id("<ImageHere>")) absent.push_back("<ImageHere>");
      if (!absent.empty()) {
        std::string list;
        for (const auto& a : absent) list += (list.empty() ? "" : " ") + a;
        c.add(Kind::Mismatch, "tokenizer.path",
              "the tokenizer lacks MiniGPT-5's tokens " + list + " (minigpt5.img_token_num is " +
                  std::to_string(manifest.minigpt5.img_token_num) + ")");
      }
    }
  }

  // --- Vision ---------------------------------------------------------------------------------
  const auto& files = manifest.vision.files;
  check.vit_weights = c.open("vision.vit", files.vit, "the EVA ViT-g checkpoint (eva_vit_g.pth)");
  if (check.vit_weights) {
    if (!check.vit_weights->contains("patch_embed.proj.weight") &&
        check.vit_weights->contains("visual_encoder.patch_embed.proj.weight"))
      check.vit_weights = check.vit_weights->with_prefix("visual_encoder.");
    if (!c.expect_kind(check.vit_weights->contains("patch_embed.proj.weight"), "vision.vit", files.vit,
                       *check.vit_weights,
                       "an EVA ViT-g checkpoint (eva_vit_g.pth: 'patch_embed.proj.weight')"))
      check.vit_weights.reset();
  }
  check.qformer_weights =
      c.open("vision.qformer", files.qformer, "the BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth)");
  if (check.qformer_weights &&
      !c.expect_kind(check.qformer_weights->contains("query_tokens") &&
                         check.qformer_weights->contains("ln_vision.weight"),
                     "vision.qformer", files.qformer, *check.qformer_weights,
                     "a BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth: 'query_tokens', 'ln_vision.*', "
                     "'Qformer.bert.*')"))
    check.qformer_weights.reset();
  check.projection_weights =
      c.open("vision.projection", files.projection, "the MiniGPT-4 checkpoint (prerained_minigpt4_7b.pth)");
  if (check.projection_weights &&
      !c.expect_kind(check.projection_weights->contains("llama_proj.weight"), "vision.projection",
                     files.projection, *check.projection_weights,
                     "a MiniGPT-4 checkpoint (prerained_minigpt4_7b.pth: 'llama_proj.weight')"))
    check.projection_weights.reset();
  if (!manifest.vision.config.empty()) {
    if (c.exists("vision.config", manifest.vision.config, "an image-encoder config.json"))
      check.vision_config =
          c.config("vision.config", [&] { return vision::ImageEncoderConfig::load(manifest.vision.config); });
  } else {
    check.vision_config = vision::ImageEncoderConfig{};
  }

  // --- MiniGPT-5 checkpoints ------------------------------------------------------------------
  const auto& mg = manifest.minigpt5;
  check.stage1 = c.open("minigpt5.stage1", mg.stage1, "a MiniGPT-5 stage-1 Lightning checkpoint (.ckpt)");
  if (check.stage1 &&
      !c.expect_kind(
          is_minigpt5_checkpoint(*check.stage1), "minigpt5.stage1", mg.stage1, *check.stage1,
          "a MiniGPT-5 checkpoint (fc.*, llm_to_t2i_mapping.*, t2i_decoder_prompt, model.llama_model.*)"))
    check.stage1.reset();
  if (!mg.stage2.empty()) {
    check.stage2 = c.open("minigpt5.stage2", mg.stage2, "a MiniGPT-5 stage-2 Lightning checkpoint (.ckpt)");
    if (check.stage2 &&
        !c.expect_kind(is_minigpt5_checkpoint(*check.stage2), "minigpt5.stage2", mg.stage2, *check.stage2,
                       "a MiniGPT-5 checkpoint (LoRA under model.llama_model.base_model.*, mapper)"))
      check.stage2.reset();
  }

  // --- Diffusion ------------------------------------------------------------------------------
  std::optional<io::StateDict> unet_weights;
  if (check_diffusion) {
    const std::string& dir = manifest.diffusion.path;
    if (dir.empty()) {
      c.add(Kind::Config, "diffusion",
            "the manifest has no diffusion part (needed to draw images; load with load_diffusion = false for "
            "a text-only pipeline)");
    } else if (c.exists("diffusion.path", dir,
                        "a diffusers Stable Diffusion directory (unet/, vae/, scheduler/)")) {
      if (!io::is_directory(dir)) {
        std::optional<io::StateDict> weights;
        try {
          weights = io::StateDict::load(dir);
        } catch (const Error&) {
        }
        c.add(Kind::WrongPart, "diffusion.path",
              dir + " is a file; expected a diffusers Stable Diffusion directory (unet/, vae/, scheduler/)" +
                  looks_like(dir, weights ? &*weights : nullptr));
      } else if (!io::is_directory(dir + "/unet") && !io::is_directory(dir + "/vae")) {
        c.add(Kind::WrongPart, "diffusion.path",
              dir + " is not a diffusers Stable Diffusion directory (no unet/ and vae/)" +
                  looks_like(dir, nullptr));
      } else {
        check.diffusion_unet_dir = dir + "/unet";
        check.diffusion_vae_dir = dir + "/vae";
        check.diffusion_scheduler_dir = dir + "/scheduler";
        if (c.exists("diffusion.path", check.diffusion_unet_dir + "/config.json", "the UNet's config.json")) {
          check.unet_config = c.config("diffusion.path", [&] {
            return diffusion::UNetConfig::load(check.diffusion_unet_dir + "/config.json");
          });
          unet_weights = c.open("diffusion.path", check.diffusion_unet_dir, "the UNet's weights");
          if (unet_weights &&
              !c.expect_kind(unet_weights->contains("conv_in.weight"), "diffusion.path",
                             check.diffusion_unet_dir, *unet_weights, "a diffusers UNet ('conv_in.weight')"))
            unet_weights.reset();
        }
        if (c.exists("diffusion.path", check.diffusion_vae_dir + "/config.json", "the VAE's config.json")) {
          check.vae_config = c.config("diffusion.path", [&] {
            return diffusion::VaeConfig::load(check.diffusion_vae_dir + "/config.json");
          });
          auto vae_weights = c.open("diffusion.path", check.diffusion_vae_dir, "the VAE's weights");
          if (vae_weights)
            c.expect_kind(vae_weights->contains("decoder.conv_in.weight"), "diffusion.path",
                          check.diffusion_vae_dir, *vae_weights,
                          "a diffusers VAE ('decoder.conv_in.weight')");
        }
        if (c.exists("diffusion.path", check.diffusion_scheduler_dir + "/scheduler_config.json",
                     "the scheduler's scheduler_config.json")) {
          std::optional<diffusion::SchedulerKind> kind;
          if (!manifest.diffusion.scheduler.empty())
            kind = diffusion::scheduler_kind_from_name(manifest.diffusion.scheduler);  // validated by parse
          check.scheduler_config = c.config("diffusion.scheduler", [&] {
            return diffusion::SchedulerConfig::from_file(check.diffusion_scheduler_dir, kind);
          });
        }
      }
    }
  }

  // --- Dimensions that connect the parts --------------------------------------------------------
  // -1: unknown (the LLM's config could not be read).
  const int64_t llm_width = check.llm_config ? check.llm_config->hidden_size : -1;
  const std::string llm_width_text = llm_width > 0 ? std::to_string(llm_width) : std::string("?");
  if (check.projection_weights && llm_width > 0) {
    const at::Tensor& proj = check.projection_weights->at("llama_proj.weight");
    if (proj.dim() != 2 || proj.size(0) != llm_width)
      c.add(Kind::Mismatch, "vision.projection",
            "llama_proj.weight is " + io::shape_string(proj.sizes()) + " but the LLM's hidden_size is " +
                llm_width_text + " (expected [" + llm_width_text + ", q-former width])");
  }
  std::optional<io::StateDict> overlay;
  if (check.stage1)
    overlay = check.stage2 ? mapping::overlay_state_dicts(*check.stage1, *check.stage2) : *check.stage1;
  std::optional<int64_t> sd_width;
  if (overlay) {
    const std::string fc0 = std::string(mapping::kFcPrefix) + "0.weight";
    if (!overlay->contains(fc0) || !overlay->contains(mapping::kDecoderPromptKey)) {
      c.add(Kind::Weights, "minigpt5",
            "neither stage checkpoint holds the voken mapper ('" + fc0 + "', '" + mapping::kDecoderPromptKey +
                "', llm_to_t2i_mapping.*)");
    } else {
      const at::Tensor& fc = overlay->at(fc0);
      const at::Tensor& prompt = overlay->at(mapping::kDecoderPromptKey);
      if (fc.dim() == 2) sd_width = fc.size(0);
      if (fc.dim() != 2 || (llm_width > 0 && fc.size(1) != llm_width))
        c.add(Kind::Mismatch, "minigpt5",
              fc0 + " is " + io::shape_string(fc.sizes()) + " but the LLM's hidden_size is " +
                  llm_width_text + " (expected [sd width, " + llm_width_text + "])");
      if (sd_width && *sd_width % manifest.minigpt5.nhead != 0)
        c.add(Kind::Mismatch, "minigpt5.nhead",
              std::to_string(manifest.minigpt5.nhead) + " attention heads do not divide the mapper width " +
                  std::to_string(*sd_width));
      if (prompt.dim() != 3 || prompt.size(0) != 1 || (sd_width && prompt.size(2) != *sd_width))
        c.add(Kind::Mismatch, "minigpt5",
              std::string(mapping::kDecoderPromptKey) + " is " + io::shape_string(prompt.sizes()) +
                  " (expected [1, prompt length, " +
                  (sd_width ? std::to_string(*sd_width) : std::string("d")) + "])");
    }
  }
  if (check.llm_config && check.tokenizer && check.stage1) {
    std::optional<int64_t> rows;
    if (check.stage2) rows = replaced_embedding_rows(*check.stage2);
    if (!rows) rows = replaced_embedding_rows(*check.stage1);
    const int64_t vocabulary = rows.value_or(check.llm_config->vocab_size);
    if (check.tokenizer->vocab_size() > vocabulary)
      c.add(
          Kind::Mismatch, "minigpt5",
          "the tokenizer has " + std::to_string(check.tokenizer->vocab_size()) +
              " tokens (MiniGPT-5's [IMG0].. and <ImageHere> included) but the LLM's embedding has " +
              std::to_string(vocabulary) + " rows" +
              (rows ? std::string(" (from the stage checkpoints)")
                    : std::string(" (neither stage checkpoint replaces embed_tokens with the resized one)")));
  }
  if (check.unet_config) {
    const auto& dims = check.unet_config->cross_attention_dim;
    if (sd_width && std::any_of(dims.begin(), dims.end(), [&](int64_t d) { return d != *sd_width; }))
      c.add(Kind::Mismatch, "diffusion.path",
            "the UNet's cross_attention_dim is " + std::to_string(dims.front()) +
                " but the voken mapper produces width " + std::to_string(*sd_width) + " (fc.0.weight rows)");
    if (check.vae_config && check.unet_config->in_channels != check.vae_config->latent_channels)
      c.add(Kind::Mismatch, "diffusion.path",
            "the UNet takes " + std::to_string(check.unet_config->in_channels) +
                " latent channels, the VAE has " + std::to_string(check.vae_config->latent_channels));
  }
  return check;
}

// ---------------------------------------------------------------------------------------------
// SpecialTokens

bool SpecialTokens::is_marker(int64_t id) const {
  return id == image_here || std::find(vokens.begin(), vokens.end(), id) != vokens.end();
}

// ---------------------------------------------------------------------------------------------
// Loading

LoadedBundle load_bundle(BundleCheck&& check, bool load_diffusion) {
  c10::InferenceMode guard;
  if (!check.ok()) throw ArgumentError("load_bundle: the bundle check found problems:\n" + check.report());
  const BundleManifest& m = check.manifest;
  if (load_diffusion && !check.unet_config)
    throw ArgumentError("load_bundle: the bundle was checked without its diffusion part");
  LoadedBundle loaded;
  loaded.manifest = m;
  loaded.tokenizer = std::move(check.tokenizer);

  std::vector<std::string> problems;
  auto attempt = [&](const std::string& what, auto&& build) {
    try {
      build();
    } catch (const Error& e) {  // weights that do not fit, or sizes a component refuses
      problems.push_back(what + ": " + e.what());
    }
  };

  // LLM + MiniGPT-5's adapters (stage 1, then stage 2 over it).
  attempt("llm", [&] {
    llm::LlamaAdapters adapters = merged_adapters(*check.stage1, check.stage2 ? &*check.stage2 : nullptr);
    llm::LlamaConfig config = *check.llm_config;
    const auto embed = adapters.replacements.find("model.embed_tokens.weight");
    const auto head = adapters.replacements.find("lm_head.weight");
    if (embed != adapters.replacements.end())
      config.vocab_size = embed->second.size(0);
    else if (head != adapters.replacements.end())
      config.vocab_size = head->second.size(0);
    io::WeightOptions options;
    options.float_dtype = m.llm.placement.scalar_type();
    io::WeightLoader loader(*check.llm_weights, options, "LLaMA (" + m.llm.path + ")");
    loaded.llm.emplace(std::move(config), loader, adapters, /*merge_lora=*/true);
  });

  // Image encoder from the three opened files (one error for the three, as ImageEncoder::load).
  attempt("vision", [&] {
    io::WeightOptions options;
    options.float_dtype = m.vision.placement.scalar_type();
    options.device = m.vision.placement.torch_device();
    io::WeightLoader vit(*check.vit_weights, options, "EVA ViT (" + m.vision.files.vit + ")");
    io::WeightLoader blip2(*check.qformer_weights, options,
                           "BLIP-2 ln_vision + Q-Former (" + m.vision.files.qformer + ")");
    io::WeightLoader projection(*check.projection_weights, options,
                                "MiniGPT-4 llama_proj (" + m.vision.files.projection + ")");
    vision::ImageEncoder encoder(*check.vision_config, vit, blip2, projection);
    std::string message;
    for (auto* loader : {&vit, &blip2, &projection}) {
      try {
        loader->finish();
      } catch (const WeightsError& e) {
        message += (message.empty() ? "" : "\n") + std::string(e.what());
      }
    }
    if (!message.empty()) throw WeightsError(message);
    loaded.image_encoder.emplace(std::move(encoder));
  });

  attempt("minigpt5", [&] {
    mapping::MapperOptions options;
    options.nhead = m.minigpt5.nhead;
    options.img_token_num = m.minigpt5.img_token_num;
    options.weights.float_dtype = m.minigpt5.placement.scalar_type();
    options.weights.device = m.minigpt5.placement.torch_device();
    const io::StateDict overlay =
        check.stage2 ? mapping::overlay_state_dicts(*check.stage1, *check.stage2) : *check.stage1;
    loaded.mapper.emplace(mapping::VokenMapper::load(overlay, options));
  });

  if (load_diffusion) {
    std::optional<diffusion::UNet2DCondition> unet;
    std::optional<diffusion::AutoencoderKL> vae;
    const auto dtype = m.diffusion.placement.scalar_type();
    attempt("diffusion (unet)",
            [&] { unet.emplace(diffusion::UNet2DCondition::load(check.diffusion_unet_dir, dtype)); });
    attempt("diffusion (vae)",
            [&] { vae.emplace(diffusion::AutoencoderKL::load(check.diffusion_vae_dir, dtype)); });
    if (unet && vae) loaded.diffusion.emplace(std::move(*unet), std::move(*vae), *check.scheduler_config);
  }

  if (!problems.empty()) {
    std::string message = (m.manifest_path.empty() ? std::string("bundle") : m.manifest_path) +
                          ": the weights do not fit the models (" + std::to_string(problems.size()) +
                          (problems.size() == 1 ? " part):" : " parts):");
    for (const auto& p : problems) message += "\n" + p;
    throw WeightsError(message);
  }

  // Parts that loaded must also fit each other (check_bundle compared the files; the loaded
  // sizes are the final word, e.g. a vision config overriding the projection width).
  const int64_t width = loaded.llm->hidden_size();
  if (loaded.image_encoder->output_width() != width)
    throw WeightsError("bundle: the image encoder produces width " +
                       std::to_string(loaded.image_encoder->output_width()) +
                       " but the LLM's hidden size is " + std::to_string(width));
  if (loaded.mapper->llm_dim() != width)
    throw WeightsError("bundle: the voken mapper takes width " + std::to_string(loaded.mapper->llm_dim()) +
                       " but the LLM's hidden size is " + std::to_string(width));

  const text::Tokenizer& tokenizer = *loaded.tokenizer;
  for (int64_t i = 0; i < m.minigpt5.img_token_num; ++i)
    loaded.tokens.vokens.push_back(*tokenizer.token_id("[IMG" + std::to_string(i) + "]"));
  loaded.tokens.image_here = *tokenizer.token_id("<ImageHere>");
  loaded.tokens.bos = tokenizer.bos_id() >= 0 ? tokenizer.bos_id() : loaded.llm->config().bos_token_id;
  loaded.tokens.eos = loaded.llm->config().eos_token_id;

  loaded.preprocess.image_size = static_cast<int>(loaded.image_encoder->image_size());
  loaded.preprocess.kind = m.vision.preprocess;

  // describe(): one line per part.
  auto line = [&](const std::string& part, const std::string& path, const std::string& detail) {
    loaded.summary.push_back(part + ": " + path + " (" + detail + ")");
  };
  line("llm", m.llm.path,
       placement_string(m.llm.placement) + ", " + format_count(parameter_count(*check.llm_weights)) +
           ", hidden " + std::to_string(width) + ", " +
           std::to_string(loaded.llm->config().num_hidden_layers) + " layers, vocab " +
           std::to_string(loaded.llm->vocab_size()));
  line("tokenizer", m.tokenizer.path, std::to_string(tokenizer.vocab_size()) + " tokens");
  line("vision.vit", m.vision.files.vit,
       placement_string(m.vision.placement) + ", " + format_count(parameter_count(*check.vit_weights)));
  line("vision.qformer", m.vision.files.qformer,
       format_count(parameter_count(*check.qformer_weights)) + " in the file, " +
           std::to_string(loaded.image_encoder->num_query_tokens()) + " queries");
  line("vision.projection", m.vision.files.projection,
       "llama_proj -> " + std::to_string(loaded.image_encoder->output_width()) + ", preprocess " +
           vision::transform_name(m.vision.preprocess));
  line("minigpt5.stage1", m.minigpt5.stage1,
       placement_string(m.minigpt5.placement) + ", " + format_count(parameter_count(*check.stage1)));
  if (check.stage2)
    line("minigpt5.stage2", m.minigpt5.stage2,
         format_count(parameter_count(*check.stage2)) + ", overrides stage 1");
  line("mapper", "stage1" + std::string(check.stage2 ? " + stage2" : ""),
       std::to_string(loaded.mapper->llm_dim()) + " -> [" + std::to_string(loaded.mapper->prompt_len()) +
           ", " + std::to_string(loaded.mapper->sd_dim()) + "], nhead " +
           std::to_string(loaded.mapper->nhead()));
  if (loaded.diffusion)
    line("diffusion", m.diffusion.path,
         placement_string(m.diffusion.placement) + ", scheduler " +
             diffusion::scheduler_class_name(loaded.diffusion->scheduler_config().kind));
  else
    line("diffusion", m.diffusion.path.empty() ? std::string("-") : m.diffusion.path, "not loaded");
  return loaded;
}

LoadedBundle load_bundle(const std::string& manifest_path, const LoadOptions& options) {
  if (options.num_threads < 0)
    throw ArgumentError("LoadOptions::num_threads must be >= 0, got " + std::to_string(options.num_threads));
  BundleManifest manifest = BundleManifest::read(manifest_path);
  manifest.override_placement(options);
  BundleCheck check = check_bundle(manifest, options.load_diffusion);
  check.throw_if_problems();
  return load_bundle(std::move(check), options.load_diffusion);
}

}  // namespace voken::pipeline
