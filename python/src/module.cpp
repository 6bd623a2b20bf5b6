// voken._voken: the module entry point; each area binds itself in its own file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "core/parallel.h"
#include "voken/version.h"

namespace py = pybind11;

PYBIND11_MODULE(_voken, m) {
  m.doc() = "voken native module (see the voken package)";
  m.attr("__version__") = voken::version();
  voken::python::bind_errors(m);
  m.def(
      "build_info",
      [] {
        const auto info = voken::build_info();
        py::dict d;
        d["voken_version"] = info.voken_version;
        d["torch_version"] = info.torch_version;
        d["cuda_enabled"] = info.cuda_enabled;
        d["cuda_available"] = info.cuda_available;
        d["intra_op_threads"] = info.intra_op_threads;
        d["run_threads"] = info.run_threads;
        d["parallel_info"] = info.parallel_info;
        d["cpu_model"] = info.cpu_model;
        d["cpu_id"] = info.cpu_id;
        d["cpu_tier"] = info.cpu_tier;
        d["cpu_native_tier"] = info.cpu_native_tier;
        d["cpu_features"] = info.cpu_features;
        d["blas_core"] = info.blas_core;
        return d;
      },
      "Version of voken, the libtorch it was built with, the CPU and its kernel tier (cpu_tier; VOKEN_CPU "
      "chooses a lower one), and runtime threading facts.");
  m.def(
      "set_num_threads", [](int threads) { voken::core::set_intra_op_threads(threads, "num_threads"); },
      py::arg("num_threads") = 0,
      "Sets libtorch's intra-op threads for this process: > 0 exactly that many; 0 $OMP_NUM_THREADS "
      "when set, else one per core (what importing voken does).");
  // Debian's libtorch starts with one thread on some multi-core machines: use the cores unless
  // OMP_NUM_THREADS says otherwise.
  voken::core::set_intra_op_threads(0, "num_threads");
  voken::python::bind_io(
      m.def_submodule("io", "Checkpoint files: safetensors, torch.save zips, state dicts."));
  // The components, for users who need one part (the voken package re-exports them).
  voken::python::bind_text(m);
  voken::python::bind_llm(m);
  voken::python::bind_vision(m);
  voken::python::bind_mapping(m);
  voken::python::bind_diffusion(m);
  // Pipeline last: it returns the component classes above.
  voken::python::bind_pipeline(m);
}
