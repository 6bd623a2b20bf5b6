// Version and build information.
#pragma once

#include <string>

namespace voken {

// voken's own version, "major.minor.patch".
const char* version();

// What this library was built against and runs with.
struct BuildInfo {
  std::string voken_version;
  std::string torch_version;    // libtorch version at build time, e.g. "1.13.1"
  bool cuda_enabled = false;    // built with VOKEN_WITH_CUDA against a CUDA libtorch
  bool cuda_available = false;  // a CUDA device is usable right now
  int intra_op_threads = 0;     // libtorch's intra-op pool size
  std::string parallel_info;    // libtorch's at::get_parallel_info() summary
};

BuildInfo build_info();

}  // namespace voken
