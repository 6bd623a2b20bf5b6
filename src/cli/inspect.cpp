// `voken inspect`: what is inside a checkpoint, or every part of a bundle and whether it loads.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "io/json_file.h"
#include "io/paths.h"
#include "io/state_dict.h"
#include "io/tensor_bytes.h"
#include "pipeline/bundle.h"

namespace voken::cli {
namespace {

constexpr const char* kInspectUsage = R"(usage: voken inspect PATH [--tensors] [--quick] [--key K]

PATH is a bundle manifest (bundle.json, or the directory holding it) or a checkpoint.

bundle: every part with its files, its tensors (names with layer numbers folded to *, dtype,
  shape, count), parameter counts and sizes; then the check of files, configs and the dimensions
  that connect the parts; then a full load that reports every missing, unexpected or mis-shaped
  tensor of every part (weights are memory-mapped, so this costs little beyond converting dtypes).
  --tensors   every tensor, not a folded summary
  --quick     stop after the check (no load)

checkpoint: a .safetensors file, a torch.save file (.pth .bin .ckpt), a *.index.json, or an
  HF/diffusers directory: every tensor with dtype and shape, and totals.
  --key K     the dict inside a torch file to read (default: auto)
)";

std::string human_count(double n) {
  const char* units[] = {"", "K", "M", "B"};
  int unit = 0;
  while (n >= 1000 && unit < 3) n /= 1000, ++unit;
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, unit ? "%.2f%s" : "%.0f%s", n, units[unit]);
  return buffer;
}

std::string megabytes(std::size_t bytes) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.1f MB", double(bytes) / 1e6);
  return buffer;
}

// "model.layers.12.mlp.up_proj.weight" -> "model.layers.*.mlp.up_proj.weight": numbered
// components (layers, blocks) folded, so a 32-layer model reads as one line per tensor kind.
std::string fold_numbers(const std::string& name) {
  std::string out;
  std::size_t start = 0;
  while (start <= name.size()) {
    std::size_t dot = name.find('.', start);
    if (dot == std::string::npos) dot = name.size();
    const std::string component = name.substr(start, dot - start);
    const bool numeric = !component.empty() && std::all_of(component.begin(), component.end(), ::isdigit);
    out += numeric ? "*" : component;
    if (dot < name.size()) out += '.';
    start = dot + 1;
  }
  return out;
}

// Tensors, parameters and bytes per dtype, and the tensors themselves (folded or all).
void print_tensors(const io::StateDict& weights, bool all_tensors, const std::string& indent,
                   std::size_t max_lines) {
  struct Group {
    std::string name, dtype, shape;
    int count = 0;
  };
  std::vector<Group> groups;
  std::map<std::tuple<std::string, std::string, std::string>, std::size_t> index;
  std::map<std::string, std::pair<int64_t, std::size_t>> per_dtype;  // params, bytes
  int64_t total = 0;
  for (const auto& name : weights.keys()) {
    const at::Tensor& t = weights.at(name);
    const std::string dtype = c10::toString(t.scalar_type());
    const std::string shape = io::shape_string(t.sizes());
    auto& [params, bytes] = per_dtype[dtype];
    params += t.numel();
    bytes += static_cast<std::size_t>(t.numel()) * t.element_size();
    total += t.numel();
    const std::string key = all_tensors ? name : fold_numbers(name);
    const auto [it, inserted] = index.emplace(std::make_tuple(key, dtype, shape), groups.size());
    if (inserted) groups.push_back({key, dtype, shape, 0});
    ++groups[it->second].count;
  }
  std::string dtypes;
  for (const auto& [dtype, counts] : per_dtype)
    dtypes += (dtypes.empty() ? "" : ", ") + dtype + " " + human_count(double(counts.first)) + " (" +
              megabytes(counts.second) + ")";
  std::printf("%s%zu tensors, %s parameters: %s\n", indent.c_str(), weights.size(),
              human_count(double(total)).c_str(), dtypes.c_str());
  std::size_t width = 8;
  for (const auto& group : groups) width = std::max(width, std::min<std::size_t>(group.name.size(), 64));
  const std::size_t shown = all_tensors ? groups.size() : std::min(groups.size(), max_lines);
  for (std::size_t i = 0; i < shown; ++i) {
    const Group& g = groups[i];
    std::printf("%s  %-*s  %-9s %-16s%s\n", indent.c_str(), static_cast<int>(width), g.name.c_str(),
                g.dtype.c_str(), g.shape.c_str(),
                g.count > 1 ? (" x" + std::to_string(g.count)).c_str() : "");
  }
  if (shown < groups.size())
    std::printf("%s  ... %zu more kinds of tensors (--tensors lists every tensor)\n", indent.c_str(),
                groups.size() - shown);
}

void print_part(const std::string& part, const std::string& path, const std::string& detail) {
  std::printf("\n%-18s %s%s\n", part.c_str(), path.empty() ? "-" : path.c_str(),
              detail.empty() ? "" : ("  [" + detail + "]").c_str());
}

std::string placement(const pipeline::PartPlacement& p) { return p.dtype + " on " + p.device; }

std::string join(const std::vector<int64_t>& values) {
  std::string out;
  for (auto v : values) out += (out.empty() ? "" : ", ") + std::to_string(v);
  return out;
}

bool is_bundle_manifest(const std::string& path) {
  if (io::is_directory(path)) return io::is_regular_file(path + "/bundle.json");
  if (!io::is_regular_file(path) || !io::ends_with(path, ".json") || io::ends_with(path, ".index.json"))
    return false;
  try {
    const io::Json json = io::read_json_file(path);
    return json.is_object() && json.contains("voken_bundle");
  } catch (const Error&) {
    return false;  // not JSON: let the checkpoint reader say what it is
  }
}

int inspect_checkpoint(const std::string& path, const std::string& key) {
  const auto state = io::StateDict::load(path, key);
  std::size_t name_width = 4;
  for (const auto& name : state.keys()) name_width = std::max(name_width, name.size());
  std::map<std::string, std::pair<int64_t, std::size_t>> per_dtype;  // params, bytes
  int64_t total = 0;
  for (const auto& name : state.keys()) {
    const auto& t = state.at(name);
    std::printf("%-*s  %-9s %s\n", static_cast<int>(name_width), name.c_str(), c10::toString(t.scalar_type()),
                io::shape_string(t.sizes()).c_str());
    auto& [params, bytes] = per_dtype[c10::toString(t.scalar_type())];
    params += t.numel();
    bytes += static_cast<std::size_t>(t.numel()) * t.element_size();
    total += t.numel();
  }
  std::printf("\n%zu tensors, %s parameters (%.1f MB) from %s\n", state.size(),
              human_count(double(total)).c_str(), double(state.nbytes()) / 1e6, state.origin().c_str());
  for (const auto& [dtype, counts] : per_dtype)
    std::printf("  %-9s %s parameters, %.1f MB\n", dtype.c_str(), human_count(double(counts.first)).c_str(),
                double(counts.second) / 1e6);
  return 0;
}

int inspect_bundle(const std::string& path, bool all_tensors, bool quick) {
  const std::string manifest_path = resolve_manifest_path(path);
  const pipeline::BundleManifest m = pipeline::BundleManifest::read(manifest_path);
  std::printf("bundle             %s\n", m.manifest_path.c_str());
  std::printf("name               %s\n", m.name.empty() ? "(none)" : m.name.c_str());
  if (m.random_weights)
    std::printf("weights            RANDOM (random_weights: true): outputs mean nothing\n");
  std::printf("defaults           %s\n", placement(m.defaults).c_str());

  pipeline::BundleCheck check = pipeline::check_bundle(m);
  const std::size_t lines = 12;
  auto tensors = [&](const std::optional<io::StateDict>& weights) {
    if (weights) print_tensors(*weights, all_tensors, "  ", lines);
  };

  print_part("llm", m.llm.path, placement(m.llm.placement));
  if (check.llm_config) {
    const auto& c = *check.llm_config;
    std::printf(
        "  config: hidden %lld, %lld layers, %lld heads (%lld kv), intermediate %lld, vocab %lld, context "
        "%lld\n",
        (long long)c.hidden_size, (long long)c.num_hidden_layers, (long long)c.num_attention_heads,
        (long long)c.num_key_value_heads, (long long)c.intermediate_size, (long long)c.vocab_size,
        (long long)c.max_position_embeddings);
  }
  tensors(check.llm_weights);
  print_part("tokenizer", m.tokenizer.path, "");
  if (check.tokenizer)
    std::printf("  %lld tokens (%lld sentencepiece pieces + %lld added)\n",
                (long long)check.tokenizer->vocab_size(), (long long)check.tokenizer->sentencepiece_size(),
                (long long)(check.tokenizer->vocab_size() - check.tokenizer->sentencepiece_size()));
  print_part("vision.vit", m.vision.files.vit, placement(m.vision.placement));
  tensors(check.vit_weights);
  print_part("vision.qformer", m.vision.files.qformer, "");
  tensors(check.qformer_weights);
  print_part("vision.projection", m.vision.files.projection, "");
  tensors(check.projection_weights);
  print_part("vision.config", m.vision.config.empty() ? "(upstream dimensions)" : m.vision.config,
             std::string("preprocess ") + vision::transform_name(m.vision.preprocess));
  print_part("minigpt5.stage1", m.minigpt5.stage1, placement(m.minigpt5.placement));
  tensors(check.stage1);
  if (!m.minigpt5.stage2.empty()) {
    print_part("minigpt5.stage2", m.minigpt5.stage2, "overrides stage 1");
    tensors(check.stage2);
  }
  print_part("diffusion", m.diffusion.path, placement(m.diffusion.placement));
  if (check.scheduler_config)
    std::printf("  scheduler: %s%s\n", diffusion::scheduler_class_name(check.scheduler_config->kind).c_str(),
                m.diffusion.scheduler.empty() ? "" : (" (manifest: " + m.diffusion.scheduler + ")").c_str());
  for (const auto& [name, dir] : {std::make_pair(std::string("unet"), check.diffusion_unet_dir),
                                  std::make_pair(std::string("vae"), check.diffusion_vae_dir)}) {
    if (dir.empty()) continue;
    std::printf("  %s: %s\n", name.c_str(), dir.c_str());
    if (name == "unet" && check.unet_config)
      std::printf("  config: block_out_channels [%s], cross_attention_dim %lld\n",
                  join(check.unet_config->block_out_channels).c_str(),
                  (long long)check.unet_config->cross_attention_dim.front());
    if (name == "vae" && check.vae_config)
      std::printf("  config: block_out_channels [%s]\n", join(check.vae_config->block_out_channels).c_str());
    try {
      print_tensors(io::StateDict::load(dir), all_tensors, "  ", lines);
    } catch (const Error& e) {
      std::printf("  (cannot read: %s)\n", e.what());  // the check below reports it too
    }
  }

  std::printf("\n");
  if (!check.ok()) {
    std::printf("check: %zu problem%s found before loading any weights:\n%s\n", check.problems.size(),
                check.problems.size() == 1 ? "" : "s", check.report().c_str());
    return 1;
  }
  std::printf("check: files, configs and the dimensions connecting the parts are consistent\n");
  if (quick) return 0;
  try {
    const pipeline::LoadedBundle loaded = pipeline::load_bundle(std::move(check));
    std::printf("load: every part built; no missing, unexpected or mis-shaped tensors\n");
    for (const auto& line : loaded.summary) std::printf("  %s\n", line.c_str());
  } catch (const WeightsError& e) {
    std::printf("load: the weights do not fit the models:\n%s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace

int inspect_main(const std::vector<std::string>& args) {
  std::string path, key;
  bool all_tensors = false, quick = false, help = false;
  const std::vector<OptionSpec> specs = {
      {"--help", false, [&](const std::string&) { help = true; }},
      {"--key", true, [&](const std::string& v) { key = v; }},
      {"--tensors", false, [&](const std::string&) { all_tensors = true; }},
      {"--quick", false, [&](const std::string&) { quick = true; }},
  };
  parse_arguments(
      args, specs,
      [&](const std::string& arg) {
        if (!path.empty()) throw UsageError("one PATH only, got '" + path + "' and '" + arg + "'");
        path = arg;
      },
      "inspect");
  if (help) {
    std::fputs(kInspectUsage, stdout);
    return 0;
  }
  if (path.empty()) throw UsageError("give a PATH (a bundle.json or a checkpoint; see voken inspect --help)");
  if (!io::path_exists(path)) throw FileNotFoundError(path + ": no such file or directory");
  c10::InferenceMode inference;
  if (is_bundle_manifest(path)) return inspect_bundle(path, all_tensors, quick);
  return inspect_checkpoint(path, key);
}

}  // namespace voken::cli
