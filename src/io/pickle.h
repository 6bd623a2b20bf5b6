// A pickle virtual machine that only *describes* what a pickle builds. It never imports or
// calls anything: the few reconstructors torch checkpoints need (tensors, parameters,
// OrderedDict, bytes) are implemented here in C++, globals on a deny-list (os.system,
// builtins.eval, ...) are refused with FormatError, and any other class or callable becomes an
// inert placeholder object (e.g. argparse.Namespace in Lightning hyper_parameters).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace voken::io {

using PyRef = uint32_t;

enum class PyKind : uint8_t {
  None,
  Bool,
  Int,
  Float,
  String,
  Bytes,
  List,
  Tuple,
  Dict,
  Set,
  Tensor,   // a rebuilt tensor (or parameter)
  Storage,  // a typed storage from a persistent id (a 1-D tensor over its bytes)
  Global,   // a module-level name that was referenced but not called: str = "module.name"
  Object,   // an inert placeholder: str = class name, items = {args tuple, state or None}
};

const char* py_kind_name(PyKind kind);

struct PyObject {
  PyKind kind = PyKind::None;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0.0;
  std::string str;                               // String, Bytes, Global/Object name
  std::vector<PyRef> items;                      // List, Tuple, Set; Object: {args, state}
  std::vector<std::pair<PyRef, PyRef>> entries;  // Dict, insertion-ordered
  at::Tensor tensor;                             // Tensor, Storage
};

// All objects one unpickling created. References are indices, so destruction is flat and
// cyclic pickles cannot leak or recurse.
class PyObjects {
 public:
  PyRef add(PyObject object);
  const PyObject& operator[](PyRef ref) const { return objects_.at(ref); }
  PyObject& operator[](PyRef ref) { return objects_.at(ref); }
  std::size_t size() const { return objects_.size(); }

  // Dict lookup by string key; nullptr when `dict` is not a dict or lacks the key.
  const PyObject* find(PyRef dict, const std::string& key) const;
  PyRef find_ref(PyRef dict, const std::string& key) const;  // kNone when absent
  static constexpr PyRef kNone = 0xffffffffu;

 private:
  std::vector<PyObject> objects_;
};

// Resolves a persistent id (a tuple built by the pickle) to an object, e.g. torch's
// ('storage', FloatStorage, key, location, numel).
using PersistentLoader = std::function<PyRef(PyObjects&, PyRef pid)>;

struct Unpickled {
  PyObjects objects;
  PyRef root = 0;
};

// Runs the pickle in `data[0, size)`. `source` names the file/record in every error.
Unpickled unpickle(const uint8_t* data, std::size_t size, const std::string& source,
                   const PersistentLoader& persistent_load);

// Whether a global may be referenced at all (false for os.system, builtins.eval, ...).
bool is_denied_global(const std::string& module, const std::string& name);

}  // namespace voken::io
