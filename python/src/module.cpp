// voken._voken: the module entry point; each area binds itself in its own file.
#include <pybind11/pybind11.h>

#include "bindings.h"
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
        d["parallel_info"] = info.parallel_info;
        return d;
      },
      "Version of voken, the libtorch it was built with, and runtime threading facts.");
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
