// Helpers shared by the C++ tests: golden-folder discovery, temp dirs, tensor comparison.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

namespace voken::test {

// $VOKEN_GOLDEN_DIR, else <source>/../shared/golden; empty when that directory is absent.
std::string golden_root();
// <golden_root>/<component>, or "" after printing why it is skipped (use VOKEN_SKIP_WITHOUT).
std::string golden_component(const std::string& component);

// A fresh directory under $TMPDIR, removed with its contents when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Writes `bytes` to `path` (binary).
void write_file(const std::string& path, const std::string& bytes);
std::string read_file(const std::string& path);

// Runs Debian's python3 (the one CMake found) with arguments; returns its exit status.
int run_python(const std::string& arguments);

// True when the two tensors have identical dtype, shape and bits.
::testing::AssertionResult bit_equal(const at::Tensor& got, const at::Tensor& want);

}  // namespace voken::test

// Skips the current test (with the reason printed) when `dir` is empty.
#define VOKEN_SKIP_IF_EMPTY(dir, what) \
  if ((dir).empty()) GTEST_SKIP() << what
