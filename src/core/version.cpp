#include "voken/version.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/version.h>

#include "core/cpu.h"
#include "core/parallel.h"

namespace voken {
namespace {

// OpenBLAS's kernel choice, looked up at run time (libtorch links OpenBLAS or another BLAS).
std::string openblas_core() {
  using CoreName = char* (*)();
  const auto core_name = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  const char* name = core_name ? core_name() : nullptr;
  return name ? name : "";
}

}  // namespace

const char* version() { return VOKEN_VERSION_STRING; }

BuildInfo build_info() {
  BuildInfo info;
  info.voken_version = VOKEN_VERSION_STRING;
  info.torch_version = TORCH_VERSION;
#ifdef VOKEN_WITH_CUDA
  info.cuda_enabled = true;
#endif
  info.cuda_available = at::hasCUDA();
  info.intra_op_threads = at::get_num_threads();
  info.run_threads = core::automatic_thread_count();
  info.parallel_info = at::get_parallel_info();
  const core::CpuInfo& cpu = core::cpu_info();
  info.cpu_model = cpu.model_name;
  info.cpu_id = cpu.vendor;
  if (cpu.family || cpu.model)
    info.cpu_id += " family " + std::to_string(cpu.family) + " model " + std::to_string(cpu.model);
  info.cpu_tier = core::tier_name(cpu.tier);
  info.cpu_native_tier = core::tier_name(cpu.native);
  const core::CpuFeatures& f = cpu.detected;
  const std::pair<bool, const char*> features[] = {
      {f.avx2, "avx2"},         {f.avx512, "avx512"},           {f.avx512_bf16, "avx512_bf16"},
      {f.amx_bf16, "amx_bf16"}, {f.avx512_vnni, "avx512_vnni"}, {f.avx_vnni, "avx_vnni"},
      {f.amx_int8, "amx_int8"}};
  for (const auto& [present, name] : features)
    if (present) info.cpu_features.emplace_back(name);
  info.blas_core = openblas_core();
  return info;
}

}  // namespace voken
