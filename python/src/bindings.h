// Shared pieces of the Python bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl/filesystem.h>  // path arguments take str and os.PathLike

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "voken/error.h"
#include "voken/image.h"

namespace voken::python {

// Path arguments: str or os.PathLike (pathlib.Path) from Python.
using Path = std::filesystem::path;

// Exception types (voken.Error and subclasses) and the C++ -> Python translation.
void bind_errors(pybind11::module_& m);
void bind_io(pybind11::module_ m);
// One function per area, each in its own file (text.cpp, llm.cpp, ...), all on the top module.
void bind_text(pybind11::module_& m);
void bind_llm(pybind11::module_& m);
void bind_vision(pybind11::module_& m);
void bind_mapping(pybind11::module_& m);
void bind_diffusion(pybind11::module_& m);
void bind_pipeline(pybind11::module_& m);

// A numpy array viewing `tensor` (zero-copy; the array keeps the tensor alive). bfloat16 has no
// numpy dtype and comes back as float32 (exact widening).
pybind11::array to_numpy(const at::Tensor& tensor);
// A tensor over a numpy array's memory (a copy when `copy`), for passing arrays into C++.
at::Tensor from_numpy(const pybind11::array& array, bool copy);
// from_numpy of anything numpy.asarray accepts (lists, scalars, arrays); `what` names the
// argument in the ValueError for objects numpy cannot convert.
at::Tensor tensor_from_python(const pybind11::handle& object, const char* what);

// Weight dtypes by name: "float32" (also "fp32", "float"), "bfloat16" ("bf16"); "float16"
// ("fp16", "half") loads as bfloat16, as bundle manifests do (libtorch has no fp16 matmul on
// CPU). ArgumentError naming `what` for anything else.
at::ScalarType parse_dtype(const std::string& name, const char* what = "dtype");
// None -> unset (the component's default: usually the file's own dtype).
std::optional<at::ScalarType> parse_optional_dtype(const pybind11::object& name, const char* what = "dtype");
std::string dtype_name(at::ScalarType type);

// A loader's num_threads argument: None keeps the process's thread count (importing voken set
// one per core, unless OMP_NUM_THREADS; voken.set_num_threads changes it), so a load does not undo
// an explicit choice; an int is passed on (0: automatic, < 0 rejected by the loader).
int thread_count_option(const std::optional<int>& num_threads);

// An image argument -> RGB pixels, through voken._images.as_image_source: a path (str or
// os.PathLike), encoded bytes, a PIL image or a numpy array (HWC uint8 RGB, also HW gray and
// HWC RGBA). FileNotFoundError / FormatError / ValueError as the source calls for.
voken::Image image_from_python(const pybind11::handle& object);
// A numpy uint8 [H, W, 3] array owning `image`'s pixels (moved, not copied).
pybind11::array image_to_numpy(voken::Image image);

// Python callbacks called from C++ work that runs without the GIL. Each call re-acquires the
// GIL; a Python exception raised by the callback (or a pending KeyboardInterrupt, checked before
// every call) is kept and the C++ side is told to stop. After the C++ call has returned or
// thrown voken::Cancelled, rethrow_pending() raises the kept exception in the caller's thread.
class CallbackBridge {
 public:
  CallbackBridge() = default;
  CallbackBridge(const CallbackBridge&) = delete;
  CallbackBridge& operator=(const CallbackBridge&) = delete;
  ~CallbackBridge() = default;  // error_already_set takes the GIL itself to die

  // Under the GIL: checks for signals, then runs `body` (which calls Python and returns whether
  // to continue). Returns false when the work should stop. Safe to call without the GIL held.
  template <class Body>
  bool run(Body&& body) {
    pybind11::gil_scoped_acquire gil;
    if (pending_) return false;
    try {
      if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
      return body();
    } catch (pybind11::error_already_set& error) {
      pending_ = std::make_unique<pybind11::error_already_set>(std::move(error));
      return false;
    }
  }
  // Only checks for signals (KeyboardInterrupt) between steps of work with no user callback.
  bool check_signals() {
    return run([] { return true; });
  }
  bool has_pending() const { return pending_ != nullptr; }
  // With the GIL held: throws the kept Python exception, if any.
  void rethrow_pending();

 private:
  std::unique_ptr<pybind11::error_already_set> pending_;
};

// Runs `work` without the GIL. When it throws voken::Cancelled and the bridge holds a Python
// exception from a callback, that exception is raised instead (the user's exception, or
// KeyboardInterrupt, is what they should see).
template <class Work>
auto run_without_gil(CallbackBridge& bridge, Work&& work) -> decltype(work()) {
  try {
    pybind11::gil_scoped_release release;
    return work();
  } catch (const voken::Cancelled&) {
    bridge.rethrow_pending();
    throw;
  }
}

}  // namespace voken::python
