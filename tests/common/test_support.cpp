#include "common/test_support.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace voken::test {

std::string golden_root() {
  const char* env = std::getenv("VOKEN_GOLDEN_DIR");
  std::string root = env && *env ? env : std::string(VOKEN_SOURCE_DIR) + "/../shared/golden";
  struct stat st {};
  if (::stat(root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return "";
  return std::filesystem::canonical(root).string();
}

std::string golden_component(const std::string& component) {
  const std::string root = golden_root();
  if (root.empty()) return "";
  const std::string dir = root + "/" + component;
  struct stat st {};
  return ::stat(dir.c_str(), &st) == 0 ? dir : "";
}

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/voken-test-XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

int run_python(const std::string& arguments) {
  const std::string command = std::string(VOKEN_PYTHON_EXECUTABLE) + " " + arguments;
  return std::system(command.c_str());
}

::testing::AssertionResult bit_equal(const at::Tensor& got, const at::Tensor& want) {
  if (got.scalar_type() != want.scalar_type())
    return ::testing::AssertionFailure() << "dtype " << got.scalar_type() << " vs " << want.scalar_type();
  if (!got.sizes().equals(want.sizes()))
    return ::testing::AssertionFailure() << "shape " << got.sizes() << " vs " << want.sizes();
  const auto a = got.contiguous();
  const auto b = want.contiguous();
  if (a.numel() && std::memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) != 0)
    return ::testing::AssertionFailure() << "values differ";
  return ::testing::AssertionSuccess();
}

}  // namespace voken::test
