#include "io/tensor_bytes.h"

#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <sstream>

#include "voken/error.h"

namespace voken::io {
namespace {

struct DtypeName {
  const char* safetensors;
  const char* storage_class;
  at::ScalarType dtype;
};

// libtorch 1.13 has no unsigned types beyond uint8 and no float8, so U16/U32/U64/F8_* are
// rejected by the lookup below rather than misread.
constexpr DtypeName kDtypes[] = {
    {"F64", "DoubleStorage", at::kDouble}, {"F32", "FloatStorage", at::kFloat},
    {"F16", "HalfStorage", at::kHalf},     {"BF16", "BFloat16Storage", at::kBFloat16},
    {"I64", "LongStorage", at::kLong},     {"I32", "IntStorage", at::kInt},
    {"I16", "ShortStorage", at::kShort},   {"I8", "CharStorage", at::kChar},
    {"U8", "ByteStorage", at::kByte},      {"BOOL", "BoolStorage", at::kBool},
};

}  // namespace

std::optional<at::ScalarType> dtype_from_safetensors(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.safetensors) return d.dtype;
  return std::nullopt;
}

std::string safetensors_dtype_name(at::ScalarType dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.safetensors;
  throw ArgumentError(std::string("dtype ") + c10::toString(dtype) +
                      " cannot be stored in safetensors by voken");
}

std::optional<at::ScalarType> dtype_from_storage_class(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.storage_class) return d.dtype;
  return std::nullopt;
}

std::string storage_class_name(at::ScalarType dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.storage_class;
  throw ArgumentError(std::string("dtype ") + c10::toString(dtype) +
                      " has no torch storage class known to voken");
}

int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& context) {
  int64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) throw FormatError(context + ": negative dimension in shape " + shape_string(shape));
    if (dim != 0 && numel > std::numeric_limits<int64_t>::max() / dim)
      throw FormatError(context + ": shape " + shape_string(shape) + " overflows int64");
    numel *= dim;
  }
  return numel;
}

at::Tensor tensor_over_mapping(const std::shared_ptr<MappedFile>& file, std::size_t offset,
                               std::size_t nbytes, at::ScalarType dtype) {
  const auto element_size = static_cast<std::size_t>(c10::elementSize(dtype));
  const auto numel = static_cast<int64_t>(nbytes / element_size);
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  uint8_t* address = file->data() + offset;
  if (numel == 0) return at::empty({0}, options);
  if (reinterpret_cast<std::uintptr_t>(address) % element_size != 0) {
    // Misaligned element access is undefined behaviour for some kernels: copy instead.
    auto copy = at::empty({numel}, options);
    std::memcpy(copy.data_ptr(), address, nbytes);
    return copy;
  }
  std::shared_ptr<MappedFile> keep_alive = file;
  return at::from_blob(
      address, {numel}, [keep_alive](void*) mutable { keep_alive.reset(); }, options);
}

std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

}  // namespace voken::io
