// The subset of zip that torch.save writes and reads: stored (uncompressed) records, zip64,
// sizes in the central directory (data descriptors). Reading maps the file; writing aligns every
// record's data to 64 bytes as torch does, so readers can view tensors in place.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/mapped_file.h"

namespace voken::io {

struct ZipRecord {
  std::string name;
  std::size_t data_offset = 0;  // absolute file offset of the record's bytes
  std::size_t size = 0;
  uint16_t method = 0;  // 0 = stored
};

class ZipArchive {
 public:
  // Parses the central directory; every record is bounds-checked against the file.
  static ZipArchive open(std::shared_ptr<MappedFile> file);
  const std::shared_ptr<MappedFile>& file() const { return file_; }
  const std::vector<ZipRecord>& records() const { return records_; }
  const ZipRecord* find(const std::string& name) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::vector<ZipRecord> records_;
  std::map<std::string, std::size_t> index_;
};

// Streams records into a new zip file (stored, 64-byte aligned data, zip64 when needed).
class ZipWriter {
 public:
  explicit ZipWriter(const std::string& path);
  ~ZipWriter();
  ZipWriter(const ZipWriter&) = delete;
  ZipWriter& operator=(const ZipWriter&) = delete;
  void add(const std::string& name, const void* data, std::size_t size);
  void finish();  // writes the central directory; the file is complete after this

 private:
  struct Entry {
    std::string name;
    uint64_t header_offset;
    uint64_t size;
    uint32_t crc;
  };
  void write(const void* data, std::size_t size);
  std::string path_;
  std::ofstream out_;
  uint64_t offset_ = 0;
  std::vector<Entry> entries_;
  bool finished_ = false;
};

uint32_t crc32(const void* data, std::size_t size, uint32_t crc = 0);

}  // namespace voken::io
