#include "io/zip_archive.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "voken/error.h"

namespace voken::io {
namespace {

constexpr uint32_t kLocalHeader = 0x04034b50;
constexpr uint32_t kCentralHeader = 0x02014b50;
constexpr uint32_t kEndOfCentralDirectory = 0x06054b50;
constexpr uint32_t kZip64EndOfCentralDirectory = 0x06064b50;
constexpr uint32_t kZip64Locator = 0x07064b50;
constexpr std::size_t kAlignment = 64;

class Reader {
 public:
  Reader(const MappedFile& file) : file_(file) {}
  uint64_t uint(std::size_t offset, int bytes, const char* what) const {
    if (offset > file_.size() || static_cast<std::size_t>(bytes) > file_.size() - offset)
      throw FormatError(file_.path() + ": zip " + what + " at byte " + std::to_string(offset) +
                        " lies past the end of the file (truncated?)");
    uint64_t value = 0;
    for (int i = bytes - 1; i >= 0; --i) value = (value << 8) | file_.data()[offset + i];
    return value;
  }

 private:
  const MappedFile& file_;
};

}  // namespace

uint32_t crc32(const void* data, std::size_t size, uint32_t crc) {
  // zlib's is table-driven over several bytes at a time; checksums gate writing speed.
  const auto* bytes = static_cast<const Bytef*>(data);
  while (size > 0) {
    const auto chunk = static_cast<uInt>(std::min<std::size_t>(size, 1u << 30));
    crc = static_cast<uint32_t>(::crc32(crc, bytes, chunk));
    bytes += chunk;
    size -= chunk;
  }
  return crc;
}

ZipArchive ZipArchive::open(std::shared_ptr<MappedFile> file) {
  ZipArchive archive;
  archive.file_ = std::move(file);
  const MappedFile& f = *archive.file_;
  const Reader r(f);
  const std::string& path = f.path();
  if (f.size() < 22) throw FormatError(path + ": too short to be a zip archive");
  // The end-of-central-directory record is in the last 64 KiB + 22 bytes.
  std::size_t eocd = std::string::npos;
  const std::size_t lowest = f.size() > 22 + 65535 ? f.size() - 22 - 65535 : 0;
  for (std::size_t pos = f.size() - 22;; --pos) {
    if (r.uint(pos, 4, "signature") == kEndOfCentralDirectory) {
      eocd = pos;
      break;
    }
    if (pos == lowest) break;
  }
  if (eocd == std::string::npos)
    throw FormatError(path + ": no zip end-of-central-directory record (truncated or not a torch.save file)");
  uint64_t count = r.uint(eocd + 10, 2, "record count");
  uint64_t directory_size = r.uint(eocd + 12, 4, "directory size");
  uint64_t directory_offset = r.uint(eocd + 16, 4, "directory offset");
  if ((count == 0xffff || directory_size == 0xffffffff || directory_offset == 0xffffffff) && eocd >= 20 &&
      r.uint(eocd - 20, 4, "zip64 locator") == kZip64Locator) {
    const uint64_t zip64 = r.uint(eocd - 20 + 8, 8, "zip64 record offset");
    if (r.uint(zip64, 4, "zip64 record") != kZip64EndOfCentralDirectory)
      throw FormatError(path + ": bad zip64 end-of-central-directory record");
    count = r.uint(zip64 + 32, 8, "zip64 record count");
    directory_size = r.uint(zip64 + 40, 8, "zip64 directory size");
    directory_offset = r.uint(zip64 + 48, 8, "zip64 directory offset");
  }
  if (directory_offset > f.size() || directory_size > f.size() - directory_offset ||
      count > directory_size / 46)
    throw FormatError(path + ": zip central directory (" + std::to_string(count) + " records, " +
                      std::to_string(directory_size) + " bytes at " + std::to_string(directory_offset) +
                      ") does not fit the file (truncated?)");
  std::size_t pos = directory_offset;
  for (uint64_t i = 0; i < count; ++i) {
    if (r.uint(pos, 4, "central header") != kCentralHeader)
      throw FormatError(path + ": corrupt zip central directory at byte " + std::to_string(pos));
    ZipRecord record;
    record.method = static_cast<uint16_t>(r.uint(pos + 10, 2, "method"));
    uint64_t compressed = r.uint(pos + 20, 4, "size");
    uint64_t size = r.uint(pos + 24, 4, "size");
    const auto name_length = r.uint(pos + 28, 2, "name length");
    const auto extra_length = r.uint(pos + 30, 2, "extra length");
    const auto comment_length = r.uint(pos + 32, 2, "comment length");
    uint64_t header_offset = r.uint(pos + 42, 4, "header offset");
    r.uint(pos + 46 + name_length + extra_length + comment_length - 1, 1, "central record");
    record.name.assign(reinterpret_cast<const char*>(f.data() + pos + 46), name_length);
    // zip64 extra field: the 0xffffffff fields, in this order.
    for (std::size_t e = pos + 46 + name_length; e + 4 <= pos + 46 + name_length + extra_length;) {
      const auto id = r.uint(e, 2, "extra id");
      const auto length = r.uint(e + 2, 2, "extra length");
      if (id == 0x0001) {
        std::size_t field = e + 4;
        if (size == 0xffffffff) size = r.uint(field, 8, "zip64 size"), field += 8;
        if (compressed == 0xffffffff) compressed = r.uint(field, 8, "zip64 size"), field += 8;
        if (header_offset == 0xffffffff) header_offset = r.uint(field, 8, "zip64 offset");
      }
      e += 4 + length;
    }
    if (r.uint(header_offset, 4, "local header") != kLocalHeader)
      throw FormatError(path + ": zip record '" + record.name + "' has no local header");
    const auto local_name = r.uint(header_offset + 26, 2, "local name length");
    const auto local_extra = r.uint(header_offset + 28, 2, "local extra length");
    record.data_offset = header_offset + 30 + local_name + local_extra;
    record.size = record.method == 0 ? size : compressed;
    if (record.data_offset > f.size() || record.size > f.size() - record.data_offset)
      throw FormatError(path + ": zip record '" + record.name + "' (" + std::to_string(record.size) +
                        " bytes) runs past the end of the file (truncated?)");
    archive.index_[record.name] = archive.records_.size();
    archive.records_.push_back(std::move(record));
    pos += 46 + name_length + extra_length + comment_length;
  }
  return archive;
}

const ZipRecord* ZipArchive::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &records_[it->second];
}

namespace {
void put(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}
}  // namespace

// Written under a temporary name and renamed when complete: a process that has the old file
// mapped keeps its pages, and a failure never leaves a truncated checkpoint behind.
ZipWriter::ZipWriter(const std::string& path)
    : path_(path), out_(path + ".partial", std::ios::binary | std::ios::trunc) {
  if (!out_) throw FormatError("cannot write " + path);
}

ZipWriter::~ZipWriter() {
  if (!finished_) std::remove((path_ + ".partial").c_str());
}

void ZipWriter::write(const void* data, std::size_t size) {
  out_.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out_) throw FormatError("error while writing " + path_);
  offset_ += size;
}

void ZipWriter::add(const std::string& name, const void* data, std::size_t size) {
  // Local header with sizes inline (zip64 extra when large) and a padding extra field ("FB",
  // as torch uses) that puts the data on a 64-byte boundary.
  const bool zip64 = size >= 0xffffffffull || offset_ >= 0xffffffffull;
  const uint32_t crc = crc32(data, size);
  std::string header;
  put(header, kLocalHeader, 4);
  put(header, zip64 ? 45 : 20, 2);  // version needed
  put(header, 1u << 11, 2);         // UTF-8 names
  put(header, 0, 2);                // stored
  put(header, 0, 4);                // time/date
  put(header, crc, 4);
  put(header, zip64 ? 0xffffffffull : size, 4);
  put(header, zip64 ? 0xffffffffull : size, 4);
  put(header, name.size(), 2);
  const std::size_t zip64_extra = zip64 ? 20 : 0;
  std::size_t unpadded = offset_ + 30 + name.size() + zip64_extra + 4;
  const std::size_t padding = (kAlignment - unpadded % kAlignment) % kAlignment;
  put(header, zip64_extra + 4 + padding, 2);
  header += name;
  if (zip64) {
    put(header, 0x0001, 2);
    put(header, 16, 2);
    put(header, size, 8);
    put(header, size, 8);
  }
  put(header, 0x4246, 2);  // "FB"
  put(header, padding, 2);
  header.append(padding, 'Z');
  entries_.push_back({name, offset_, size, crc});
  write(header.data(), header.size());
  write(data, size);
}

void ZipWriter::finish() {
  if (finished_) return;
  const uint64_t directory_offset = offset_;
  std::string directory;
  for (const auto& e : entries_) {
    const bool zip64 = e.size >= 0xffffffffull || e.header_offset >= 0xffffffffull;
    put(directory, kCentralHeader, 4);
    put(directory, zip64 ? 45 : 20, 2);
    put(directory, zip64 ? 45 : 20, 2);
    put(directory, 1u << 11, 2);
    put(directory, 0, 2);
    put(directory, 0, 4);
    put(directory, e.crc, 4);
    put(directory, zip64 ? 0xffffffffull : e.size, 4);
    put(directory, zip64 ? 0xffffffffull : e.size, 4);
    put(directory, e.name.size(), 2);
    put(directory, zip64 ? 28 : 0, 2);
    put(directory, 0, 2);  // comment
    put(directory, 0, 2);  // disk
    put(directory, 0, 2);  // internal attributes
    put(directory, 0, 4);  // external attributes
    put(directory, zip64 ? 0xffffffffull : e.header_offset, 4);
    directory += e.name;
    if (zip64) {
      put(directory, 0x0001, 2);
      put(directory, 24, 2);
      put(directory, e.size, 8);
      put(directory, e.size, 8);
      put(directory, e.header_offset, 8);
    }
  }
  write(directory.data(), directory.size());
  const uint64_t zip64_record = offset_;
  bool need_zip64 = entries_.size() >= 0xffff || directory_offset >= 0xffffffffull;
  for (const auto& e : entries_)
    need_zip64 = need_zip64 || e.size >= 0xffffffffull || e.header_offset >= 0xffffffffull;
  std::string tail;
  if (need_zip64) {
    put(tail, kZip64EndOfCentralDirectory, 4);
    put(tail, 44, 8);
    put(tail, 45, 2);
    put(tail, 45, 2);
    put(tail, 0, 4);
    put(tail, 0, 4);
    put(tail, entries_.size(), 8);
    put(tail, entries_.size(), 8);
    put(tail, directory.size(), 8);
    put(tail, directory_offset, 8);
    put(tail, kZip64Locator, 4);
    put(tail, 0, 4);
    put(tail, zip64_record, 8);
    put(tail, 1, 4);
  }
  put(tail, kEndOfCentralDirectory, 4);
  put(tail, 0, 2);
  put(tail, 0, 2);
  put(tail, std::min<uint64_t>(entries_.size(), 0xffff), 2);
  put(tail, std::min<uint64_t>(entries_.size(), 0xffff), 2);
  put(tail, std::min<uint64_t>(directory.size(), 0xffffffff), 4);
  put(tail, std::min<uint64_t>(directory_offset, 0xffffffff), 4);
  put(tail, 0, 2);
  write(tail.data(), tail.size());
  out_.flush();
  if (!out_) throw FormatError("error while writing " + path_);
  out_.close();
  if (std::rename((path_ + ".partial").c_str(), path_.c_str()) != 0)
    throw FormatError("cannot rename " + path_ + ".partial to " + path_);
  finished_ = true;
}

}  // namespace voken::io
