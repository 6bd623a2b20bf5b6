// A read-only view of a whole file through mmap. Tensors created from it keep a shared_ptr to
// the mapping, so the mapping lives exactly as long as any tensor that views it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace voken::io {

class MappedFile {
 public:
  // Throws FileNotFoundError when the path does not exist, FormatError when it is not a
  // regular file or cannot be mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // The pages are mapped private and writable (copy-on-write): an in-place op on a tensor
  // viewing them touches only a private copy of that page, never the file, and never faults.
  uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // Readahead hint. Parsing an index that is spread over the file (zip local headers, one per
  // tensor record) with the default readahead pulls megabytes around every header on a cold
  // cache; callers switch to random access while parsing and back to normal for bulk reads.
  void advise_random_access(bool random) const;

 private:
  MappedFile(std::string path, uint8_t* data, std::size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace voken::io
