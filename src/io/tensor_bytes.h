// Dtype names of the on-disk formats and zero-copy tensors over mapped bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/mapped_file.h"

namespace voken::io {

// safetensors dtype strings ("F32", "BF16", ...); nullopt when libtorch 1.13 has no such type.
std::optional<at::ScalarType> dtype_from_safetensors(const std::string& name);
std::string safetensors_dtype_name(at::ScalarType dtype);  // throws ArgumentError if unsupported

// torch typed-storage class names ("FloatStorage", "BFloat16Storage", ...).
std::optional<at::ScalarType> dtype_from_storage_class(const std::string& name);
std::string storage_class_name(at::ScalarType dtype);

// Number of elements of a shape, throwing FormatError (naming `context`) on negative
// dimensions or int64 overflow instead of wrapping.
int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& context);

// A tensor viewing `nbytes` bytes at `offset` in `file` as a contiguous buffer of `dtype`,
// reshaped by `sizes`/`strides` with `storage_offset` (in elements). Zero-copy when the address
// is aligned to the element size (always, for torch.save and safetensors files), a copy
// otherwise. The caller has already checked that every addressed element lies in the range.
at::Tensor tensor_over_mapping(const std::shared_ptr<MappedFile>& file, std::size_t offset,
                               std::size_t nbytes, at::ScalarType dtype);

std::string shape_string(at::IntArrayRef shape);

}  // namespace voken::io
