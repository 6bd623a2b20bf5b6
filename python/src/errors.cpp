#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "voken/error.h"

namespace py = pybind11;

namespace voken::python {

void bind_errors(py::module_& m) {
  // Types live for the whole interpreter, so the handles are created once and never released.
  auto make = [&m](const char* name, py::tuple bases, const char* doc) {
    py::dict namespace_dict;
    namespace_dict["__module__"] = "voken";
    namespace_dict["__doc__"] = doc;
    py::object type = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&PyType_Type))(
        name, bases, namespace_dict);
    m.attr(name) = type;
    return type.release();
  };
  static py::handle error =
      make("Error", py::make_tuple(py::handle(PyExc_RuntimeError)), "Base class of the errors voken raises.");
  static py::handle format_error = make("FormatError", py::make_tuple(error, py::handle(PyExc_ValueError)),
                                        "A file's bytes are not what its format promises.");
  static py::handle config_error = make("ConfigError", py::make_tuple(error, py::handle(PyExc_ValueError)),
                                        "A configuration is missing fields or inconsistent.");
  static py::handle weights_error = make("WeightsError", py::make_tuple(error, py::handle(PyExc_ValueError)),
                                         "Weights are missing, unexpected or wrongly shaped.");
  static py::handle cancelled =
      make("Cancelled", py::make_tuple(error), "A progress callback asked to stop.");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const voken::FileNotFoundError& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const voken::FormatError& e) {
      PyErr_SetString(format_error.ptr(), e.what());
    } catch (const voken::ConfigError& e) {
      PyErr_SetString(config_error.ptr(), e.what());
    } catch (const voken::WeightsError& e) {
      PyErr_SetString(weights_error.ptr(), e.what());
    } catch (const voken::ArgumentError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const voken::Cancelled& e) {
      PyErr_SetString(cancelled.ptr(), e.what());
    } catch (const voken::Error& e) {
      PyErr_SetString(error.ptr(), e.what());
    } catch (const c10::Error& e) {
      // A libtorch check voken did not anticipate: its message without the C++ backtrace.
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
}

}  // namespace voken::python
