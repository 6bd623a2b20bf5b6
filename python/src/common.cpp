// Helpers shared by the binding files: dtype names, image arguments, callbacks without the GIL.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cctype>
#include <string>

#include "bindings.h"
#include "vision/image.h"
#include "voken/error.h"

namespace py = pybind11;

namespace voken::python {

at::ScalarType parse_dtype(const std::string& name, const char* what) {
  std::string key = name;
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  if (key.rfind("torch.", 0) == 0) key = key.substr(6);  // str(torch.bfloat16) is "torch.bfloat16"
  if (key == "float32" || key == "fp32" || key == "float") return at::kFloat;
  if (key == "bfloat16" || key == "bf16") return at::kBFloat16;
  if (key == "float16" || key == "fp16" || key == "half") return at::kBFloat16;
  throw ArgumentError(std::string(what) + ": unknown dtype '" + name +
                      "' (expected \"float32\" or \"bfloat16\"; \"float16\" loads as bfloat16)");
}

std::optional<at::ScalarType> parse_optional_dtype(const py::object& name, const char* what) {
  if (name.is_none()) return std::nullopt;
  if (py::isinstance<py::str>(name)) return parse_dtype(name.cast<std::string>(), what);
  // numpy dtypes and scalar types (numpy.float32) by their numpy name; anything else (e.g.
  // torch.bfloat16, whose str is "torch.bfloat16") by its str.
  try {
    return parse_dtype(py::module_::import("numpy").attr("dtype")(name).attr("name").cast<std::string>(),
                       what);
  } catch (py::error_already_set&) {
    return parse_dtype(py::str(name).cast<std::string>(), what);
  }
}

int thread_count_option(const std::optional<int>& num_threads) {
  return num_threads ? *num_threads : at::get_num_threads();
}

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(type);
  }
}

at::Tensor tensor_from_python(const py::handle& object, const char* what) {
  if (object.is_none()) throw ArgumentError(std::string(what) + ": expected an array, got None");
  py::array array;
  try {
    array = py::module_::import("numpy").attr("asarray")(object);
  } catch (py::error_already_set& error) {
    throw ArgumentError(std::string(what) + ": cannot be read as a numpy array (" + error.what() + ")");
  }
  if (array.dtype().kind() == 'O' || array.dtype().kind() == 'U' || array.dtype().kind() == 'S')
    throw ArgumentError(std::string(what) + ": expected numbers, got an array of dtype " +
                        py::str(array.dtype()).cast<std::string>());
  return from_numpy(array, /*copy=*/false);
}

namespace {

// ("file", path) | ("bytes", data, name) | ("pixels", uint8 C-contiguous [H, W, 3]).
voken::Image image_from_source(const py::tuple& source) {
  const auto kind = source[0].cast<std::string>();
  if (kind == "file") {
    const auto path = source[1].cast<std::string>();
    py::gil_scoped_release release;
    return vision::load_image(path);
  }
  if (kind == "bytes") {
    const auto data = source[1].cast<std::string>();
    const auto name = source[2].cast<std::string>();
    py::gil_scoped_release release;
    return vision::decode_image(reinterpret_cast<const uint8_t*>(data.data()), data.size(), {}, name);
  }
  if (kind == "pixels") {
    auto array = source[1].cast<py::array_t<uint8_t, py::array::c_style>>();
    if (array.ndim() != 3 || array.shape(2) != 3)
      throw ArgumentError("image array: expected [H, W, 3] uint8 after conversion");
    return vision::image_from_rgb(array.data(), static_cast<std::size_t>(array.size()),
                                  static_cast<int>(array.shape(1)), static_cast<int>(array.shape(0)));
  }
  throw ArgumentError("internal: unknown image source kind '" + kind + "'");
}

}  // namespace

voken::Image image_from_python(const py::handle& object) {
  py::tuple source = py::module_::import("voken._images").attr("as_image_source")(object);
  return image_from_source(source);
}

py::array image_to_numpy(voken::Image image) {
  auto* owner = new voken::Image(std::move(image));
  py::capsule base(owner, [](void* p) { delete static_cast<voken::Image*>(p); });
  return py::array_t<uint8_t>(
      {static_cast<py::ssize_t>(owner->height), static_cast<py::ssize_t>(owner->width), py::ssize_t{3}},
      owner->pixels.data(), base);
}

void CallbackBridge::rethrow_pending() {
  if (!pending_) return;
  py::error_already_set error = std::move(*pending_);
  pending_.reset();
  throw error;
}

}  // namespace voken::python
