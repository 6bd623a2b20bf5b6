// The `voken` command line: dispatch to the subcommands (src/cli/*.cpp) and the exit statuses.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "voken/error.h"
#include "voken/version.h"

namespace {

constexpr const char* kUsage =
    R"(usage: voken <command> [options]     (voken <command> --help for its options)

commands:
  generate --bundle M --text T --image I ...   one MiniGPT-5 turn -> an HTML page + Markdown
  demo [--dir D] [--keep] [--steps N]          a tiny random-weight bundle, run end to end
  inspect PATH                                 a bundle's parts, or a checkpoint's tensors
  info                                         version, libtorch, CPU and kernel tier, threads

exit status: 0 done, 1 failed, 2 bad command line, 130 interrupted (Ctrl-C)
)";

}  // namespace

namespace voken::cli {

int info_main(const std::vector<std::string>& args) {
  parse_arguments(args, {}, nullptr, "info");
  const auto build = voken::build_info();
  std::string features;
  for (const auto& f : build.cpu_features) features += (features.empty() ? "" : " ") + f;
  std::printf("voken %s\nlibtorch %s\ncuda enabled %s, available %s\n", build.voken_version.c_str(),
              build.torch_version.c_str(), build.cuda_enabled ? "yes" : "no",
              build.cuda_available ? "yes" : "no");
  std::printf("cpu %s (%s)\ncpu features %s\n", build.cpu_model.c_str(), build.cpu_id.c_str(),
              features.empty() ? "(none voken uses)" : features.c_str());
  if (build.cpu_tier == build.cpu_native_tier)
    std::printf("kernel tier %s\n", build.cpu_tier.c_str());
  else
    std::printf("kernel tier %s (VOKEN_CPU; this CPU offers %s)\n", build.cpu_tier.c_str(),
                build.cpu_native_tier.c_str());
  std::printf("threads %d (%s)\n", build.run_threads,
              std::getenv("OMP_NUM_THREADS") ? "$OMP_NUM_THREADS"
                                             : "one per core; --threads or OMP_NUM_THREADS to change");
  if (!build.blas_core.empty())
    std::printf("fp32 BLAS OpenBLAS, %s kernels%s\n", build.blas_core.c_str(),
                std::getenv("OPENBLAS_CORETYPE") ? " (OPENBLAS_CORETYPE)" : "");
  return 0;
}

}  // namespace voken::cli

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "-h" || command == "--help" || command == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (command == "--version") {
    std::printf("voken %s\n", voken::version());
    return 0;
  }
  try {
    if (command == "info") return voken::cli::info_main(args);
    if (command == "inspect") return voken::cli::inspect_main(args);
    if (command == "generate") return voken::cli::generate_main(args);
    if (command == "demo") return voken::cli::demo_main(args);
    std::fprintf(stderr, "voken: unknown command '%s'\n\n%s", command.c_str(), kUsage);
    return 2;
  } catch (const voken::cli::UsageError& e) {
    std::fprintf(stderr, "voken %s: %s\n", command.c_str(), e.what());
    return 2;
  } catch (const voken::Cancelled& e) {
    std::fprintf(stderr, "voken %s: cancelled: %s\n", command.c_str(), e.what());
    return 130;
  } catch (const voken::Error& e) {
    std::fprintf(stderr, "voken %s: error: %s\n", command.c_str(), e.what());
    return 1;
  } catch (const c10::Error& e) {
    // libtorch's own checks (should not happen: voken validates first); without its backtrace.
    std::fprintf(stderr, "voken %s: internal error (libtorch): %s\n", command.c_str(),
                 e.what_without_backtrace());
    return 1;
  }
}
