// Parity with upstream preprocessing ($VOKEN_GOLDEN_DIR/preprocess): every case's RGB input
// through every transform it stores (blip2_eval, playground, train_eval), compared with the
// PIL + torchvision outputs at the case's tolerance; where the case names its source JPEG, the
// whole path from the file (voken decode == the PIL-decoded input, then every transform) too.
// A negative control shows the comparison can fail: plain interpolation without Pillow's
// antialiasing (what cv::resize does) lands far outside the tolerance.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "common/golden.h"
#include "common/test_support.h"
#include "vision/image.h"
#include "vision/preprocess.h"

namespace voken::vision {
namespace {

namespace fs = std::filesystem;

std::optional<TransformKind> kind_of(const std::string& path_name) {
  for (auto kind : {TransformKind::Blip2Eval, TransformKind::Playground, TransformKind::TrainEval})
    if (path_name == transform_name(kind)) return kind;
  return std::nullopt;
}

// The golden's normalisation and output size (cases.json "normalize"; the size from the output).
PreprocessConfig config_for(const test::GoldenSet& golden, TransformKind kind, int64_t size) {
  PreprocessConfig config;
  config.kind = kind;
  config.image_size = static_cast<int>(size);
  if (golden.json().contains("normalize")) {
    const auto& n = golden.json().at("normalize");
    for (int c = 0; c < 3; ++c) {
      config.mean[c] = n.at("mean").at(c).get<float>();
      config.std[c] = n.at("std").at(c).get<float>();
    }
  }
  return config;
}

// "shared/assets/images/x.jpg" is relative to the directory holding shared/ (golden root's
// grandparent); an absolute path is taken as is.
std::string source_image_path(const test::GoldenSet& golden, const io::Json& c) {
  if (!c.contains("source_image") || !c.at("source_image").is_string()) return "";
  const std::string name = c.at("source_image").get<std::string>();
  const fs::path path = fs::path(name).is_absolute()
                            ? fs::path(name)
                            : fs::path(test::golden_root()).parent_path().parent_path() / name;
  return fs::is_regular_file(path) ? path.string() : "";
}

TEST(ParityPreprocess, AllCases) {
  const auto golden = test::GoldenSet::open("preprocess");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("preprocess");
  ASSERT_FALSE(golden->cases().empty());
  int outputs_checked = 0;
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    const double atol = c.at("atol").get<double>();
    const double rtol = c.value("rtol", 0.0);
    test::ParityCase parity("preprocess", name);
    const Image input = image_from_tensor(golden->tensor(name + ".rgb"));
    const std::string source = source_image_path(*golden, c);
    std::optional<Image> decoded;
    if (!source.empty()) {
      decoded = load_image(source);
      // In normalized units like the other outputs: any decode difference is >= 0.0142.
      const PreprocessConfig units = config_for(*golden, TransformKind::Blip2Eval, 1);
      parity.compare("decode", normalize_to_tensor(*decoded, units), normalize_to_tensor(input, units), atol,
                     rtol);
    }
    for (const auto& [key, description] : c.at("outputs").items()) {
      const std::string path_name = key.substr(key.rfind('.') + 1);
      const auto kind = kind_of(path_name);
      if (!kind) {
        ADD_FAILURE() << name << ": output '" << key << "' is not a known transform";
        continue;
      }
      const at::Tensor want = golden->tensor(key);
      ASSERT_EQ(want.dim(), 3) << key;
      const PreprocessConfig config = config_for(*golden, *kind, want.size(-1));
      parity.compare(path_name, preprocess(input, config), want, atol, rtol);
      if (decoded) parity.compare("file." + path_name, preprocess(*decoded, config), want, atol, rtol);
      ++outputs_checked;
    }
    parity.finish();
  }
  EXPECT_GT(outputs_checked, 0);
}

// The batch entry point on the golden inputs gives the same results as one by one.
TEST(ParityPreprocess, BatchOfAllCases) {
  const auto golden = test::GoldenSet::open("preprocess");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("preprocess");
  std::vector<Image> images;
  std::vector<at::Tensor> wants;
  double atol = 0.0;
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    if (!golden->has(name + ".blip2_eval")) continue;
    images.push_back(image_from_tensor(golden->tensor(name + ".rgb")));
    wants.push_back(golden->tensor(name + ".blip2_eval"));
    atol = std::max(atol, c.at("atol").get<double>());
  }
  if (images.empty()) GTEST_SKIP() << "no blip2_eval outputs in the golden cases";
  const at::Tensor batch =
      preprocess_batch(images, config_for(*golden, TransformKind::Blip2Eval, wants.front().size(-1)));
  const at::Tensor want = at::stack(wants);
  ASSERT_EQ(batch.sizes(), want.sizes());
  EXPECT_LE((batch - want).abs().max().item<double>(), atol);
}

// Negative control: resizing without Pillow's antialiasing (torch's plain bilinear/bicubic,
// which like cv::resize INTER_LINEAR/INTER_CUBIC uses a fixed 2- or 4-tap kernel) misses the
// golden outputs by far more than the tolerance, so the parity comparison does discriminate.
TEST(ParityPreprocess, PlainInterpolationFailsTheTolerance) {
  const auto golden = test::GoldenSet::open("preprocess");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("preprocess");
  double worst_plain = 0.0, worst_ours = 0.0, atol = 0.0;
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    if (!golden->has(name + ".blip2_eval")) continue;
    atol = std::max(atol, c.at("atol").get<double>());
    const at::Tensor rgb = golden->tensor(name + ".rgb");
    const at::Tensor want = golden->tensor(name + ".blip2_eval");
    const PreprocessConfig config = config_for(*golden, TransformKind::Blip2Eval, want.size(-1));
    const int64_t size = want.size(-1);
    if (rgb.size(0) <= size && rgb.size(1) <= size) continue;  // only downscales show the filter
    const at::Tensor chw = rgb.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat);
    for (bool bicubic : {false, true}) {
      const at::Tensor resized = bicubic ? at::upsample_bicubic2d(chw, {size, size}, false)
                                         : at::upsample_bilinear2d(chw, {size, size}, false);
      const at::Tensor u8 = resized.round().clamp(0, 255).to(at::kByte).squeeze(0).permute({1, 2, 0});
      const at::Tensor plain = normalize_to_tensor(image_from_tensor(u8), config);
      worst_plain = std::max(worst_plain, (plain - want).abs().max().item<double>());
    }
    worst_ours =
        std::max(worst_ours, (preprocess(image_from_tensor(rgb), config) - want).abs().max().item<double>());
  }
  if (atol == 0.0) GTEST_SKIP() << "no downscaling blip2_eval case in the golden folder";
  std::printf("negative control: plain interpolation max_abs_err=%.3g, voken %.3g, atol %.3g\n", worst_plain,
              worst_ours, atol);
  EXPECT_GT(worst_plain, atol);
  EXPECT_LE(worst_ours, atol);
}

}  // namespace
}  // namespace voken::vision
