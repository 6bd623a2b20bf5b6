// safetensors: round trips for every dtype, zero-copy mapping lifetime, metadata, and every
// kind of malformed file giving a FormatError that names the file.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/test_support.h"
#include "io/safetensors.h"
#include "voken/error.h"

namespace voken::io {
namespace {

using test::TempDir;

std::vector<std::pair<std::string, at::Tensor>> every_dtype() {
  auto base = at::arange(24, at::kDouble).reshape({2, 3, 4}) * 0.37 - 1.3;
  return {{"f64", base},
          {"f32", base.to(at::kFloat)},
          {"f16", base.to(at::kHalf)},
          {"bf16", base.to(at::kBFloat16)},
          {"i64", at::arange(-5, 7, at::kLong)},
          {"i32", at::arange(-5, 7, at::kInt).reshape({3, 4})},
          {"i16", at::arange(-5, 7, at::kShort)},
          {"i8", at::arange(-5, 7, at::kChar)},
          {"u8", at::arange(0, 255, 7, at::kByte)},
          {"bool", at::arange(10, at::kLong).remainder(3).eq(0)},
          {"scalar", at::scalar_tensor(2.5, at::kFloat)},
          {"empty", at::zeros({0, 3}, at::kFloat)}};
}

TEST(Safetensors, RoundTripsEveryDtypeBitExactly) {
  TempDir dir;
  const auto tensors = every_dtype();
  write_safetensors(dir.file("a.safetensors"), tensors, {{"format", "pt"}, {"note", "hello"}});
  const auto file = SafetensorsFile::open(dir.file("a.safetensors"));
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "hello");
  ASSERT_EQ(file.entries().size(), tensors.size());
  for (const auto& [name, want] : tensors) EXPECT_TRUE(test::bit_equal(file.tensor(name), want)) << name;
}

TEST(Safetensors, TensorsViewTheMappingAndOutliveTheFileObject) {
  TempDir dir;
  const auto want = at::arange(1000, at::kFloat);
  write_safetensors(dir.file("a.safetensors"), {{"x", want}});
  at::Tensor got;
  const void* mapped_start = nullptr;
  {
    const auto file = SafetensorsFile::open(dir.file("a.safetensors"));
    got = file.tensor("x");
    mapped_start = file.entries()[0].begin + static_cast<const uint8_t*>(nullptr);
  }
  // The file object is gone; the tensor still reads the mapped bytes.
  EXPECT_TRUE(test::bit_equal(got, want));
  // Zero-copy: the data pointer lies inside a page-aligned mapping, not a fresh allocation
  // (offset within the file equals offset within the mapping).
  const auto address = reinterpret_cast<std::uintptr_t>(got.data_ptr());
  EXPECT_EQ(address % 4096, reinterpret_cast<std::uintptr_t>(mapped_start) % 4096);
  // In-place writes touch a private copy of the page, never the file.
  got.add_(1);
  const auto again = SafetensorsFile::open(dir.file("a.safetensors")).tensor("x");
  EXPECT_TRUE(test::bit_equal(again, want));
}

TEST(Safetensors, MissingTensorNamesFileAndKey) {
  TempDir dir;
  write_safetensors(dir.file("a.safetensors"), {{"x", at::ones({2})}});
  const auto file = SafetensorsFile::open(dir.file("a.safetensors"));
  try {
    file.tensor("y");
    FAIL() << "no exception";
  } catch (const WeightsError& e) {
    EXPECT_NE(std::string(e.what()).find("a.safetensors"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("'y'"), std::string::npos);
  }
}

TEST(Safetensors, MissingFileIsFileNotFound) {
  EXPECT_THROW(SafetensorsFile::open("/nonexistent/x.safetensors"), FileNotFoundError);
}

// Builds a safetensors file from a literal header and a byte buffer of `data_bytes` bytes.
std::string make_file(const std::string& header, std::size_t data_bytes) {
  std::string out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + header + std::string(data_bytes, '\x01');
}

struct BadCase {
  const char* name;
  std::string bytes;
  const char* expected_in_message;
};

class SafetensorsBadInput : public ::testing::TestWithParam<BadCase> {};

TEST_P(SafetensorsBadInput, GivesFormatErrorNamingFileAndProblem) {
  TempDir dir;
  const std::string path = dir.file(std::string(GetParam().name) + ".safetensors");
  test::write_file(path, GetParam().bytes);
  try {
    SafetensorsFile::open(path);
    FAIL() << "no exception for " << GetParam().name;
  } catch (const FormatError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(GetParam().expected_in_message), std::string::npos) << message;
  }
}

std::string truncated_valid_file() {
  TempDir dir;
  write_safetensors(dir.file("t.safetensors"), {{"w", at::ones({64, 64})}});
  std::string bytes = test::read_file(dir.file("t.safetensors"));
  return bytes.substr(0, bytes.size() - 100);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsBadInput,
    ::testing::Values(
        BadCase{"empty", "", "shorter than the 8-byte header"},
        BadCase{"header_past_end", make_file("{}", 0).substr(0, 8) + "{", "past the end"},
        BadCase{"huge_header", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8), "100 MB"},
        BadCase{"malformed_json", make_file("{\"a\": {\"dtype\": ", 0), "malformed"},
        BadCase{"not_object", make_file("[1,2]", 0), "not a JSON object"},
        BadCase{"unknown_dtype",
                make_file(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2),
                "unsupported dtype 'F8_E4M3'"},
        BadCase{"size_mismatch",
                make_file(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24),
                "needs 24 bytes but data_offsets span 20"},
        BadCase{"out_of_range", make_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
                "outside the data buffer"},
        BadCase{"overlap",
                make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                          12),
                "overlapping"},
        BadCase{"negative_dim", make_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                "negative"},
        BadCase{"overflowing_shape",
                make_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4),
                "overflows"},
        BadCase{"missing_fields", make_file(R"({"w":{"dtype":"F32"}})", 0),
                "needs dtype, shape and data_offsets"},
        BadCase{"truncated", truncated_valid_file(), "outside the data buffer"}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace voken::io
