// Shared pieces of the Python bindings.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace voken::python {

// Exception types (voken.Error and subclasses) and the C++ -> Python translation.
void bind_errors(pybind11::module_& m);
void bind_io(pybind11::module_ m);

// A numpy array viewing `tensor` (zero-copy; the array keeps the tensor alive). bfloat16 has no
// numpy dtype and comes back as float32 (exact widening).
pybind11::array to_numpy(const at::Tensor& tensor);
// A tensor over a numpy array's memory (a copy when `copy`), for passing arrays into C++.
at::Tensor from_numpy(const pybind11::array& array, bool copy);

}  // namespace voken::python
