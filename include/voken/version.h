// Version and build information.
#pragma once

#include <string>
#include <vector>

namespace voken {

// voken's own version, "major.minor.patch".
const char* version();

// What this library was built against and runs with.
struct BuildInfo {
  std::string voken_version;
  std::string torch_version;    // libtorch version at build time, e.g. "1.13.1"
  bool cuda_enabled = false;    // built with VOKEN_WITH_CUDA against a CUDA libtorch
  bool cuda_available = false;  // a CUDA device is usable right now
  int intra_op_threads = 0;     // libtorch's intra-op pool size right now
  int run_threads = 0;          // what a run with num_threads = 0 (the default) will use
  std::string parallel_info;    // libtorch's at::get_parallel_info() summary
  // The CPU and the kernels voken runs on it (one answer per process, see the README's "CPU
  // tiers"): its brand string and CPUID family/model, the kernel tier in use ("amx",
  // "avx512_bf16", "avx512", "avx2" or "generic"), the best tier it offers (higher than `cpu_tier`
  // when VOKEN_CPU chose a lower one), and the instruction-set features found.
  std::string cpu_model;
  std::string cpu_id;  // e.g. "GenuineIntel family 6 model 207"
  std::string cpu_tier;
  std::string cpu_native_tier;
  std::vector<std::string> cpu_features;
  std::string blas_core;  // OpenBLAS's kernel choice (libtorch's fp32 BLAS), or "" when unknown
};

// Throws ConfigError when VOKEN_CPU names no tier or one this CPU lacks.
BuildInfo build_info();

}  // namespace voken
