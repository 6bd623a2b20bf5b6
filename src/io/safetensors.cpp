#include "io/safetensors.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::io {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, before allocating.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | p[i];
  return value;
}

SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& info,
                             std::size_t data_start, std::size_t buffer_size) {
  const std::string where = path + ": tensor '" + name + "'";
  if (!info.is_object()) throw FormatError(where + ": header entry is not an object");
  const auto dtype_it = info.find("dtype");
  const auto shape_it = info.find("shape");
  const auto offsets_it = info.find("data_offsets");
  if (dtype_it == info.end() || shape_it == info.end() || offsets_it == info.end())
    throw FormatError(where + ": header entry needs dtype, shape and data_offsets");
  if (!dtype_it->is_string()) throw FormatError(where + ": dtype is not a string");
  const auto dtype_name = dtype_it->get<std::string>();
  const auto dtype = dtype_from_safetensors(dtype_name);
  if (!dtype)
    throw FormatError(where + ": unsupported dtype '" + dtype_name +
                      "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
  if (!shape_it->is_array()) throw FormatError(where + ": shape is not an array");
  SafetensorsEntry entry;
  entry.name = name;
  entry.dtype = *dtype;
  for (const auto& dim : *shape_it) {
    if (!dim.is_number_unsigned())
      throw FormatError(where + ": shape holds a non-integer or negative dimension");
    const auto value = dim.get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw FormatError(where + ": dimension too large");
    entry.shape.push_back(static_cast<int64_t>(value));
  }
  if (!offsets_it->is_array() || offsets_it->size() != 2 || !(*offsets_it)[0].is_number_unsigned() ||
      !(*offsets_it)[1].is_number_unsigned())
    throw FormatError(where + ": data_offsets must be two non-negative integers");
  const auto begin = (*offsets_it)[0].get<uint64_t>();
  const auto end = (*offsets_it)[1].get<uint64_t>();
  if (begin > end || end > buffer_size)
    throw FormatError(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                      "] outside the data buffer of " + std::to_string(buffer_size) +
                      " bytes (file truncated?)");
  const int64_t numel = checked_numel(entry.shape, where);
  const auto element_size = static_cast<uint64_t>(c10::elementSize(entry.dtype));
  if (static_cast<uint64_t>(numel) > std::numeric_limits<uint64_t>::max() / element_size ||
      static_cast<uint64_t>(numel) * element_size != end - begin)
    throw FormatError(where + ": " + dtype_name + " " + shape_string(entry.shape) + " needs " +
                      std::to_string(static_cast<uint64_t>(numel) * element_size) +
                      " bytes but data_offsets span " + std::to_string(end - begin));
  entry.begin = data_start + begin;
  entry.end = data_start + end;
  return entry;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) { return open(MappedFile::open(path)); }

SafetensorsFile SafetensorsFile::open(std::shared_ptr<MappedFile> mapped) {
  SafetensorsFile result;
  result.file_ = std::move(mapped);
  const auto& file = *result.file_;
  const std::string& path = file.path();
  if (file.size() < 8)
    throw FormatError(path + ": not a safetensors file (" + std::to_string(file.size()) +
                      " bytes, shorter than the 8-byte header length)");
  const uint64_t header_size = read_u64_le(file.data());
  if (header_size > kMaxHeaderBytes)
    throw FormatError(path + ": safetensors header length " + std::to_string(header_size) +
                      " exceeds the 100 MB limit (corrupt or not a safetensors file)");
  if (header_size > file.size() - 8)
    throw FormatError(path + ": safetensors header length " + std::to_string(header_size) +
                      " runs past the end of the file (" + std::to_string(file.size()) +
                      " bytes; truncated?)");
  json header;
  try {
    header = json::parse(file.data() + 8, file.data() + 8 + header_size);
  } catch (const json::exception& e) {
    throw FormatError(path + ": malformed safetensors JSON header: " + e.what());
  }
  if (!header.is_object()) throw FormatError(path + ": safetensors header is not a JSON object");
  const std::size_t data_start = 8 + header_size;
  const std::size_t buffer_size = file.size() - data_start;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw FormatError(path + ": __metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          throw FormatError(path + ": __metadata__ value of '" + m.key() + "' is not a string");
        result.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    result.entries_.push_back(parse_entry(path, it.key(), *it, data_start, buffer_size));
  }
  std::stable_sort(result.entries_.begin(), result.entries_.end(),
                   [](const auto& a, const auto& b) { return a.begin < b.begin; });
  for (std::size_t i = 0; i < result.entries_.size(); ++i) {
    const auto& entry = result.entries_[i];
    if (i > 0) {
      const auto& previous = result.entries_[i - 1];
      if (entry.begin < previous.end && entry.end > entry.begin)
        throw FormatError(path + ": tensors '" + previous.name + "' and '" + entry.name +
                          "' have overlapping data_offsets");
    }
    result.index_[entry.name] = i;
  }
  return result;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw WeightsError(path() + ": no tensor named '" + name + "'");
  return tensor(entries_[it->second]);
}

at::Tensor SafetensorsFile::tensor(const SafetensorsEntry& entry) const {
  return tensor_over_mapping(file_, entry.begin, entry.end - entry.begin, entry.dtype).view(entry.shape);
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__" || header.contains(name))
      throw ArgumentError("write_safetensors(" + path + "): duplicate or reserved name '" + name + "'");
    auto t = tensor.detach().to(at::kCPU).contiguous();
    const auto nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", safetensors_dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    contiguous.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the byte buffer 8-byte aligned
  // Written under a temporary name and renamed when complete (see ZipWriter).
  const std::string partial = path + ".partial";
  std::ofstream out(partial, std::ios::binary | std::ios::trunc);
  if (!out) throw FormatError("cannot write " + path);
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(uint64_t(text.size()) >> (8 * i));
  out.write(reinterpret_cast<const char*>(length), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& t : contiguous)
    out.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(t.numel() * t.element_size()));
  out.close();
  if (!out || std::rename(partial.c_str(), path.c_str()) != 0) {
    std::remove(partial.c_str());
    throw FormatError("error while writing " + path);
  }
}

}  // namespace voken::io
