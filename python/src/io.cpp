// voken.io: checkpoint reading from Python, returning numpy arrays (no Python torch needed).
#include <ATen/ATen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <unordered_map>

#include "bindings.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "voken/error.h"

namespace py = pybind11;

namespace voken::python {
namespace {

py::dtype numpy_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return py::dtype::of<float>();
    case at::kDouble:
      return py::dtype::of<double>();
    case at::kHalf:
      return py::dtype("float16");
    case at::kLong:
      return py::dtype::of<int64_t>();
    case at::kInt:
      return py::dtype::of<int32_t>();
    case at::kShort:
      return py::dtype::of<int16_t>();
    case at::kChar:
      return py::dtype::of<int8_t>();
    case at::kByte:
      return py::dtype::of<uint8_t>();
    case at::kBool:
      return py::dtype::of<bool>();
    default:
      throw ArgumentError(std::string("no numpy dtype for ") + c10::toString(type));
  }
}

at::ScalarType scalar_type_of(const py::dtype& dtype) {
  const char kind = dtype.kind();
  const auto size = dtype.itemsize();
  if (kind == 'f' && size == 4) return at::kFloat;
  if (kind == 'f' && size == 8) return at::kDouble;
  if (kind == 'f' && size == 2) return at::kHalf;
  if (kind == 'i' && size == 8) return at::kLong;
  if (kind == 'i' && size == 4) return at::kInt;
  if (kind == 'i' && size == 2) return at::kShort;
  if (kind == 'i' && size == 1) return at::kChar;
  if (kind == 'u' && size == 1) return at::kByte;
  if (kind == 'b') return at::kBool;
  throw ArgumentError("unsupported numpy dtype " + py::repr(dtype).cast<std::string>());
}

// Placeholders for what the safe unpickler does not rebuild.
struct PickledObject {
  std::string cls;
  py::object args;
  py::object state;
};
struct PickledGlobal {
  std::string name;
};

class TreeConverter {
 public:
  explicit TreeConverter(const io::PyObjects& objects, const std::string& path)
      : objects_(objects), path_(path) {}

  py::object convert(io::PyRef ref, int depth = 0) {
    if (depth > kMaxDepth)
      throw FormatError(path_ + ": pickled objects nest deeper than " + std::to_string(kMaxDepth) +
                        " levels (or contain a cycle)");
    const auto found = done_.find(ref);
    if (found != done_.end()) return found->second;  // shared references stay shared
    const io::PyObject& o = objects_[ref];
    py::object result;
    switch (o.kind) {
      case io::PyKind::None:
        result = py::none();
        break;
      case io::PyKind::Bool:
        result = py::bool_(o.boolean);
        break;
      case io::PyKind::Int:
        result = py::int_(o.integer);
        break;
      case io::PyKind::Float:
        result = py::float_(o.real);
        break;
      case io::PyKind::String:
        result = py::str(o.str);
        break;
      case io::PyKind::Bytes:
        result = py::bytes(o.str);
        break;
      case io::PyKind::List:
      case io::PyKind::Tuple:
      case io::PyKind::Set: {
        py::list items;
        for (io::PyRef item : o.items) items.append(convert(item, depth + 1));
        if (o.kind == io::PyKind::List)
          result = items;
        else if (o.kind == io::PyKind::Tuple)
          result = py::tuple(items);
        else
          result = py::set(items);
        break;
      }
      case io::PyKind::Dict: {
        py::dict dict;
        for (const auto& [k, v] : o.entries) dict[convert(k, depth + 1)] = convert(v, depth + 1);
        result = dict;
        break;
      }
      case io::PyKind::Tensor:
      case io::PyKind::Storage:
        result = to_numpy(o.tensor);
        break;
      case io::PyKind::Global:
        result = py::cast(PickledGlobal{o.str});
        break;
      case io::PyKind::Object:
        result =
            py::cast(PickledObject{o.str, convert(o.items[0], depth + 1), convert(o.items[1], depth + 1)});
        break;
    }
    done_.emplace(ref, result);
    return result;
  }

 private:
  static constexpr int kMaxDepth = 200;
  const io::PyObjects& objects_;
  const std::string& path_;
  std::unordered_map<io::PyRef, py::object> done_;
};

}  // namespace

py::array to_numpy(const at::Tensor& input) {
  at::Tensor tensor = input.device().is_cpu() ? input : input.to(at::kCPU);
  if (tensor.scalar_type() == at::kBFloat16) tensor = tensor.to(at::kFloat);
  std::vector<py::ssize_t> shape(tensor.sizes().begin(), tensor.sizes().end());
  std::vector<py::ssize_t> strides;
  for (int64_t s : tensor.strides()) strides.push_back(s * static_cast<py::ssize_t>(tensor.element_size()));
  auto* owner = new at::Tensor(tensor);
  py::capsule base(owner, [](void* p) { delete static_cast<at::Tensor*>(p); });
  return py::array(numpy_dtype(tensor.scalar_type()), shape, strides, tensor.data_ptr(), base);
}

at::Tensor from_numpy(const py::array& input, bool copy) {
  py::array array = input;
  for (py::ssize_t d = 0; d < array.ndim(); ++d) {
    if (array.strides(d) < 0 || array.strides(d) % array.itemsize() != 0) {
      // Reversed or byte-misaligned views: libtorch wants non-negative element strides.
      array = py::module_::import("numpy").attr("ascontiguousarray")(array);
      break;
    }
  }
  const auto dtype = scalar_type_of(array.dtype());
  std::vector<int64_t> shape(array.shape(), array.shape() + array.ndim());
  std::vector<int64_t> strides;
  for (py::ssize_t d = 0; d < array.ndim(); ++d) {
    if (array.strides(d) % array.itemsize() != 0)
      throw ArgumentError("numpy array strides are not element-aligned");
    strides.push_back(array.strides(d) / array.itemsize());
  }
  auto* keep = new py::object(array);  // released under the GIL by the deleter
  at::Tensor view = at::from_blob(
      const_cast<void*>(array.data()), shape, strides,
      [keep](void*) {
        py::gil_scoped_acquire gil;
        delete keep;
      },
      at::TensorOptions().dtype(dtype));
  return copy ? view.clone() : view;
}

void bind_io(py::module_ m) {
  py::class_<PickledObject>(m, "PickledObject",
                            "An object of a class voken does not rebuild (e.g. argparse.Namespace), kept "
                            "inert: its class name, constructor arguments and state.")
      .def_readonly("cls", &PickledObject::cls)
      .def_readonly("args", &PickledObject::args)
      .def_readonly("state", &PickledObject::state)
      .def("__repr__", [](const PickledObject& o) {
        return "PickledObject(" + o.cls + ", args=" + std::string(py::repr(o.args)) +
               ", state=" + std::string(py::repr(o.state)) + ")";
      });
  py::class_<PickledGlobal>(m, "PickledGlobal",
                            "A module-level name the pickle referenced, e.g. torch.float16.")
      .def_readonly("name", &PickledGlobal::name)
      .def("__repr__", [](const PickledGlobal& g) { return "PickledGlobal(" + g.name + ")"; });

  m.def(
      "load_state_dict",
      [](const std::string& path, const std::string& inner_key) {
        io::StateDict state;
        {
          py::gil_scoped_release release;
          state = io::StateDict::load(path, inner_key);
        }
        py::dict out;
        for (const auto& name : state.keys()) out[py::str(name)] = to_numpy(state.at(name));
        return out;
      },
      py::arg("path"), py::arg("inner_key") = "",
      "Tensors of a checkpoint (.safetensors, torch.save zip, *.index.json, or an HF/diffusers "
      "directory) as {name: numpy array}, in file order; memory-mapped where possible. bfloat16 "
      "comes back as float32.");
  m.def(
      "load_torch",
      [](const std::string& path) {
        std::unique_ptr<io::TorchFile> file;
        {
          py::gil_scoped_release release;
          file = std::make_unique<io::TorchFile>(io::load_torch_file(path));
        }
        return TreeConverter(file->pickle.objects, path).convert(file->pickle.root);
      },
      py::arg("path"),
      "The whole object tree of a torch.save file, read without Python torch or running any "
      "pickled code: tensors as numpy arrays, unknown classes as PickledObject.");
  m.def(
      "safetensors_metadata",
      [](const std::string& path) { return io::SafetensorsFile::open(path).metadata(); }, py::arg("path"),
      "The __metadata__ of a safetensors file.");
  m.def(
      "save_safetensors",
      [](const std::string& path, const py::dict& tensors,
         const std::optional<std::map<std::string, std::string>>& metadata) {
        std::vector<std::pair<std::string, at::Tensor>> list;
        for (const auto& [name, value] : tensors)
          list.emplace_back(py::cast<std::string>(name), from_numpy(py::array::ensure(value), false));
        py::gil_scoped_release release;
        io::write_safetensors(path, list, metadata.value_or(std::map<std::string, std::string>{}));
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = py::none(),
      "Write {name: numpy array} as a safetensors file.");
}

}  // namespace voken::python
