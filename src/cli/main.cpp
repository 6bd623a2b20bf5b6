// The `voken` command line. Subcommands so far: info, inspect.
#include <ATen/ATen.h>

#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "io/state_dict.h"
#include "io/tensor_bytes.h"
#include "voken/error.h"
#include "voken/version.h"

namespace {

constexpr const char* kUsage = R"(usage: voken <command> [options]

commands:
  info                      version, libtorch, threads
  inspect PATH [--key K]    list the tensors of a checkpoint: a .safetensors file, a torch.save
                            file (.pth .bin .ckpt), a *.index.json, or an HF/diffusers directory;
                            --key picks the dict inside a torch file (default: auto)
)";

int info() {
  const auto build = voken::build_info();
  std::printf("voken %s\nlibtorch %s\ncuda enabled %s, available %s\nintra-op threads %d\n",
              build.voken_version.c_str(), build.torch_version.c_str(), build.cuda_enabled ? "yes" : "no",
              build.cuda_available ? "yes" : "no", build.intra_op_threads);
  return 0;
}

std::string human_count(double n) {
  const char* units[] = {"", "K", "M", "B"};
  int unit = 0;
  while (n >= 1000 && unit < 3) n /= 1000, ++unit;
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, unit ? "%.2f%s" : "%.0f%s", n, units[unit]);
  return buffer;
}

int inspect(const std::string& path, const std::string& key) {
  const auto state = voken::io::StateDict::load(path, key);
  std::size_t name_width = 4;
  for (const auto& name : state.keys()) name_width = std::max(name_width, name.size());
  std::map<std::string, std::pair<int64_t, std::size_t>> per_dtype;  // params, bytes
  int64_t total = 0;
  for (const auto& name : state.keys()) {
    const auto& t = state.at(name);
    std::printf("%-*s  %-9s %s\n", static_cast<int>(name_width), name.c_str(), c10::toString(t.scalar_type()),
                voken::io::shape_string(t.sizes()).c_str());
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

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  try {
    c10::InferenceMode inference;
    if (args[0] == "info") return info();
    if (args[0] == "inspect" && args.size() >= 2) {
      std::string key;
      for (std::size_t i = 2; i + 1 < args.size(); ++i)
        if (args[i] == "--key") key = args[i + 1];
      return inspect(args[1], key);
    }
    std::fprintf(stderr, "voken: unknown command or missing argument: %s\n\n%s", args[0].c_str(), kUsage);
    return 2;
  } catch (const voken::Error& e) {
    std::fprintf(stderr, "voken: error: %s\n", e.what());
    return 1;
  }
}
