// safetensors files: memory-mapped, zero-copy reading and a plain writer.
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
// data_offsets:[begin,end]}, "__metadata__": {str: str}}, then the byte buffer.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/mapped_file.h"

namespace voken::io {

struct SafetensorsEntry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  std::size_t begin = 0;  // absolute file offsets of the tensor's bytes
  std::size_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps the file and validates the whole header (every error names the file and tensor).
  static SafetensorsFile open(const std::string& path);
  static SafetensorsFile open(std::shared_ptr<MappedFile> file);

  const std::string& path() const { return file_->path(); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Entries in file-offset order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  bool contains(const std::string& name) const;
  // Zero-copy tensor viewing the mapping; throws WeightsError if the name is absent.
  at::Tensor tensor(const std::string& name) const;
  at::Tensor tensor(const SafetensorsEntry& entry) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::size_t> index_;
};

// Writes tensors (any device/layout; converted to contiguous CPU) in the given order.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace voken::io
