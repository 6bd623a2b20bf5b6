#include "voken/version.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

namespace voken {

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
  info.parallel_info = at::get_parallel_info();
  return info;
}

}  // namespace voken
