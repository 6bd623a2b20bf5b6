// Preprocessing: Pillow-exact resampling on random images and sizes (up, down, mixed, 1-pixel),
// the three upstream transforms on awkward shapes and a real 2000x1372 photo, all against PIL
// run by tests/fixtures/pil_reference.py; then the fused (virtually padded / cropped) path
// against the explicit steps, normalization, batching, config parsing and bad arguments.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>

#include "common/test_support.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "vision/image.h"
#include "vision/preprocess.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

const std::string kPilReference = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/pil_reference.py";
constexpr TransformKind kAllKinds[] = {TransformKind::Blip2Eval, TransformKind::Playground,
                                       TransformKind::TrainEval};

bool have_pil() { return test::run_python("-c 'import PIL, numpy' >/dev/null 2>&1") == 0; }

// Noise (the hardest case for rounding) or a smooth gradient with noise (photo-like).
Image random_image(int width, int height, std::mt19937& rng, bool smooth) {
  Image image(width, height);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x)
      for (int c = 0; c < 3; ++c) {
        int v = static_cast<int>(rng() % 256);
        if (smooth) v = (x * 7 + y * 3 + c * 50) % 256 + static_cast<int>(rng() % 9) - 4;
        image.row(y)[x * 3 + c] = static_cast<uint8_t>(std::clamp(v, 0, 255));
      }
  return image;
}

Image from_tensor(const at::Tensor& t) { return image_from_tensor(t); }

::testing::AssertionResult same_pixels(const Image& got, const Image& want) {
  if (got.width != want.width || got.height != want.height)
    return ::testing::AssertionFailure()
           << "size " << got.width << "x" << got.height << " vs " << want.width << "x" << want.height;
  if (got.pixels == want.pixels) return ::testing::AssertionSuccess();
  int worst = 0;
  std::size_t count = 0;
  for (std::size_t i = 0; i < got.pixels.size(); ++i) {
    const int d = std::abs(int{got.pixels[i]} - int{want.pixels[i]});
    worst = std::max(worst, d);
    count += d != 0;
  }
  return ::testing::AssertionFailure()
         << count << " of " << got.pixels.size() << " values differ, by up to " << worst;
}

// Writes the images with their requests, runs the reference command, returns its output.
io::SafetensorsFile run_reference(const TempDir& dir, const std::string& command,
                                  const std::vector<std::pair<std::string, Image>>& images,
                                  const std::map<std::string, std::string>& requests) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, image] : images) tensors.emplace_back(name, image_to_tensor(image));
  const std::string in = dir.file(command + "_in.safetensors");
  const std::string out = dir.file(command + "_out.safetensors");
  io::write_safetensors(in, tensors, requests);
  EXPECT_EQ(test::run_python("'" + kPilReference + "' " + command + " '" + in + "' '" + out + "'"), 0);
  return io::SafetensorsFile::open(out);
}

TEST(Resample, MatchesPilOnRandomImagesAndSizes) {
  if (!have_pil()) GTEST_SKIP() << "/usr/bin/python3 with PIL and numpy not available";
  std::mt19937 rng(1234);
  struct Request {
    std::string name;
    Image image;
    int width, height;
    ResampleFilter filter;
  };
  std::vector<Request> requests;
  // Fixed awkward shapes, then random ones; each resized to a mix of smaller, larger and equal
  // sizes per axis, with both filters.
  const std::vector<std::pair<int, int>> fixed = {{1, 1}, {1, 9},     {9, 1},    {2, 2},
                                                  {3, 5}, {256, 256}, {640, 480}};
  std::vector<std::pair<int, int>> shapes = fixed;
  for (int i = 0; i < 16; ++i) shapes.emplace_back(1 + rng() % 300, 1 + rng() % 300);
  int id = 0;
  for (const auto& [w, h] : shapes) {
    const Image image = random_image(w, h, rng, id % 2 == 1);
    const std::vector<std::pair<int, int>> targets = {
        {224, 224},
        {static_cast<int>(1 + rng() % 400), static_cast<int>(1 + rng() % 400)},
        {w, 1 + rng() % 64},
        {1 + static_cast<int>(rng() % 3), h}};
    for (const auto& [tw, th] : targets)
      for (auto filter : {ResampleFilter::Bilinear, ResampleFilter::Bicubic})
        requests.push_back({"r" + std::to_string(id++), image, tw, th, filter});
  }
  std::vector<std::pair<std::string, Image>> images;
  std::map<std::string, std::string> spec;
  for (const auto& r : requests) {
    images.emplace_back(r.name, r.image);
    spec[r.name] = std::string(r.filter == ResampleFilter::Bilinear ? "bilinear " : "bicubic ") +
                   std::to_string(r.width) + " " + std::to_string(r.height);
  }
  TempDir dir;
  const auto pil = run_reference(dir, "resize", images, spec);
  // Both horizontal kernels: AVX2 (when the CPU has it) and the portable one.
  for (const char* disable_avx2 : {"0", "1"}) {
    ::setenv("VOKEN_DISABLE_AVX2", disable_avx2, 1);
    for (const auto& r : requests) {
      const Image ours = resize(r.image, r.width, r.height, r.filter);
      EXPECT_TRUE(same_pixels(ours, from_tensor(pil.tensor(r.name))))
          << r.name << ": " << r.image.width << "x" << r.image.height << " -> " << spec[r.name]
          << " VOKEN_DISABLE_AVX2=" << disable_avx2;
    }
  }
  ::unsetenv("VOKEN_DISABLE_AVX2");
}

TEST(Transform, MatchesPilOnAwkwardShapesAndARealPhoto) {
  if (!have_pil()) GTEST_SKIP() << "/usr/bin/python3 with PIL and numpy not available";
  std::mt19937 rng(99);
  // Odd/even differences (expand2square offsets, half-to-even crop offsets), 1-pixel sides,
  // extreme aspect ratios, already-square and already-224 images; and other output sizes.
  const std::vector<std::pair<int, int>> shapes = {{1, 1},     {1, 7},     {7, 1},     {2, 3},     {224, 224},
                                                   {225, 224}, {224, 225}, {224, 301}, {767, 432}, {432, 767},
                                                   {640, 480}, {480, 641}, {300, 17},  {17, 300},  {3, 3000},
                                                   {2500, 2},  {451, 449}, {100, 50},  {99, 50},   {57, 113}};
  std::vector<std::pair<std::string, Image>> images;
  std::map<std::string, std::string> spec;
  std::vector<std::tuple<std::string, TransformKind, int>> requests;
  int id = 0;
  for (const auto& [w, h] : shapes) {
    const Image image = random_image(w, h, rng, id % 3 == 0);
    for (auto kind : kAllKinds)
      for (int size : {224, 37}) {
        const std::string name = "t" + std::to_string(id++);
        images.emplace_back(name, image);
        spec[name] = std::string(transform_name(kind)) + " " + std::to_string(size);
        requests.emplace_back(name, kind, size);
      }
  }
  // The largest real photo of the assets, decoded by voken (test_image checks that decode
  // equals PIL's).
  const std::string root = test::golden_root();
  const fs::path photo =
      root.empty() ? fs::path()
                   : fs::path(root).parent_path() / "assets/images/minigpt4_2000x1372_wmkn_0012149409555.jpg";
  if (!photo.empty() && fs::exists(photo)) {
    const Image image = load_image(photo.string());
    for (auto kind : kAllKinds) {
      const std::string name = std::string("photo_") + transform_name(kind);
      images.emplace_back(name, image);
      spec[name] = std::string(transform_name(kind)) + " 224";
      requests.emplace_back(name, kind, 224);
    }
  } else {
    std::printf("note: %s not found; real-photo transform check skipped\n", photo.string().c_str());
  }
  TempDir dir;
  const auto pil = run_reference(dir, "transform", images, spec);
  std::map<std::string, const Image*> by_name;
  for (const auto& [name, image] : images) by_name[name] = &image;
  for (const auto& [name, kind, size] : requests) {
    PreprocessConfig config;
    config.kind = kind;
    config.image_size = size;
    const Image& input = *by_name[name];
    const std::string what =
        name + " " + std::to_string(input.width) + "x" + std::to_string(input.height) + " " + spec[name];
    EXPECT_TRUE(same_pixels(transform_pixels(input, config), from_tensor(pil.tensor(name + ".pixels"))))
        << what;
    const at::Tensor ours = preprocess(input, config);
    const at::Tensor want = pil.tensor(name + ".tensor");
    ASSERT_EQ(ours.sizes(), want.sizes()) << what;
    EXPECT_LE((ours - want).abs().max().item<float>(), 1e-6f) << what;
  }
}

// The fused path never materialises expand2square's padding or the cropped margins; it must
// equal the explicit composition of the public steps.
TEST(Transform, FusedPathEqualsExplicitSteps) {
  std::mt19937 rng(5);
  for (const auto& [w, h] :
       std::vector<std::pair<int, int>>{{300, 200}, {199, 301}, {64, 9}, {5, 230}, {224, 100}}) {
    const Image image = random_image(w, h, rng, false);
    for (int size : {224, 50}) {
      PreprocessConfig config;
      config.image_size = size;
      config.fill = {255, 128, 7};
      config.kind = TransformKind::Playground;
      const Image square = expand_to_square(image, config.fill);
      ASSERT_EQ(square.width, std::max(w, h));
      Image explicit_steps = center_crop(resize(square, size, size, ResampleFilter::Bilinear), size, size);
      EXPECT_TRUE(same_pixels(transform_pixels(image, config), explicit_steps))
          << w << "x" << h << " " << size;

      config.kind = TransformKind::TrainEval;
      const auto [rw, rh] = resize_short_side(w, h, size);
      EXPECT_EQ(std::min(rw, rh), size);
      explicit_steps = center_crop(resize(image, rw, rh, ResampleFilter::Bilinear), size, size);
      EXPECT_TRUE(same_pixels(transform_pixels(image, config), explicit_steps))
          << w << "x" << h << " " << size;

      config.kind = TransformKind::Blip2Eval;
      EXPECT_TRUE(
          same_pixels(transform_pixels(image, config), resize(image, size, size, ResampleFilter::Bicubic)));
    }
  }
}

TEST(Transform, ExtremeAspectRatiosStayCheap) {
  // expand2square of 1 x 200000 would be a 200000^2 canvas (120 GB), and train_eval's resize a
  // 224 x 44.8M image; both are computed without allocating either.
  std::mt19937 rng(3);
  const Image strip = random_image(1, 200000, rng, false);
  PreprocessConfig config;
  config.kind = TransformKind::Playground;
  const Image square = transform_pixels(strip, config);
  ASSERT_EQ(square.width, 224);
  // The strip is 1/200000 of the canvas width: at most one output column is touched by it,
  // and every other pixel is the white fill.
  int touched = 0;
  for (int x = 0; x < 224; ++x) {
    bool white = true;
    for (int y = 0; y < 224; ++y)
      for (int c = 0; c < 3; ++c) white &= square.row(y)[x * 3 + c] == 255;
    touched += !white;
  }
  EXPECT_LE(touched, 2);
  config.kind = TransformKind::TrainEval;
  const Image crop = transform_pixels(strip, config);
  EXPECT_EQ(crop.width, 224);
  EXPECT_EQ(crop.height, 224);
}

TEST(Transform, GeometryHelpers) {
  // Short side to the requested size; the long side truncated; orientation kept.
  const auto [w1, h1] = resize_short_side(767, 432, 224);
  EXPECT_EQ(h1, 224);
  EXPECT_EQ(w1, static_cast<int>(224.0 * 767 / 432));
  const auto [w2, h2] = resize_short_side(432, 767, 224);
  EXPECT_EQ(w2, 224);
  EXPECT_EQ(h2, w1);
  // Center crop: an odd margin d gives offset round(d / 2) to even.
  Image image(7, 1);
  for (int x = 0; x < 7; ++x) image.row(0)[x * 3] = static_cast<uint8_t>(x);
  EXPECT_EQ(center_crop(image, 2, 1).row(0)[0], 2);  // margin 5 -> 2.5 -> 2
  EXPECT_EQ(center_crop(image, 4, 1).row(0)[0], 2);  // margin 3 -> 1.5 -> 2
  EXPECT_EQ(center_crop(image, 6, 1).row(0)[0], 0);  // margin 1 -> 0.5 -> 0
  // expand2square: the shorter side padded, offset (difference) // 2.
  const Image tall = expand_to_square(Image(2, 5, 9), {1, 2, 3});
  ASSERT_EQ(tall.width, 5);
  EXPECT_EQ(tall.row(0)[0], 1);
  EXPECT_EQ(tall.row(0)[1 * 3], 9);  // (5 - 2) // 2 = 1
  EXPECT_EQ(tall.row(0)[3 * 3 + 2], 3);
}

TEST(Normalize, MatchesTorchvisionFloat32Arithmetic) {
  std::mt19937 rng(8);
  const Image image = random_image(13, 11, rng, false);
  PreprocessConfig config;
  config.mean = {0.5f, 0.25f, 0.125f};
  config.std = {0.2f, 0.3f, 0.4f};
  const at::Tensor ours = normalize_to_tensor(image, config);
  ASSERT_EQ(ours.sizes(), at::IntArrayRef({3, 11, 13}));
  // ToTensor + Normalize as torchvision writes them, in float32 ATen ops.
  const at::Tensor x = image_to_tensor(image).permute({2, 0, 1}).to(at::kFloat).div(255);
  const at::Tensor mean =
      at::tensor(std::vector<float>(config.mean.begin(), config.mean.end())).view({3, 1, 1});
  const at::Tensor stdev =
      at::tensor(std::vector<float>(config.std.begin(), config.std.end())).view({3, 1, 1});
  const at::Tensor want = (x - mean) / stdev;
  EXPECT_LE((ours - want).abs().max().item<float>(), 1e-6f);
}

TEST(Batch, StacksPerImageResultsForMixedSizes) {
  std::mt19937 rng(4);
  const std::vector<Image> images = {random_image(300, 200, rng, true), random_image(50, 90, rng, false),
                                     random_image(224, 224, rng, true)};
  for (auto kind : kAllKinds) {
    PreprocessConfig config;
    config.kind = kind;
    const at::Tensor batch = preprocess_batch(images, config);
    ASSERT_EQ(batch.sizes(), at::IntArrayRef({3, 3, 224, 224}));
    for (std::size_t i = 0; i < images.size(); ++i)
      EXPECT_TRUE(test::bit_equal(batch[i], preprocess(images[i], config)))
          << transform_name(kind) << " " << i;
  }
}

TEST(Config, FromJsonDefaultsFieldsAndErrors) {
  const auto parse = [](const std::string& text) {
    const io::Json json = io::Json::parse(text);
    return PreprocessConfig::from_json(io::JsonView(json, "processor.json"));
  };
  const PreprocessConfig defaults = parse("{}");
  EXPECT_EQ(defaults.image_size, 224);
  EXPECT_EQ(defaults.kind, TransformKind::Blip2Eval);
  EXPECT_EQ(defaults.mean, PreprocessConfig().mean);
  EXPECT_EQ(defaults.std, PreprocessConfig().std);
  const PreprocessConfig lavis =
      parse(R"({"name": "blip2_image_eval", "image_size": 364, "mean": [0.5, 0.5, 0.5]})");
  EXPECT_EQ(lavis.image_size, 364);
  EXPECT_EQ(lavis.mean[1], 0.5f);
  const PreprocessConfig playground = parse(R"({"transform": "playground", "fill": [0, 0, 0]})");
  EXPECT_EQ(playground.kind, TransformKind::Playground);
  EXPECT_EQ(playground.fill[2], 0);
  EXPECT_EQ(parse(R"({"transform": "train_eval"})").kind, TransformKind::TrainEval);

  const auto expect_config_error = [&](const std::string& text, const std::string& needle) {
    try {
      parse(text);
      ADD_FAILURE() << "no ConfigError for " << text;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("processor.json"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_config_error(R"({"image_size": 0})", "'image_size' must be positive");
  expect_config_error(R"({"image_size": "224"})", "'image_size' has the wrong type");
  expect_config_error(R"({"mean": [0.5, 0.5]})", "'mean' must be a list of 3 numbers");
  expect_config_error(R"({"std": [0.5, 0.0, 0.5]})", "'std' must hold positive");
  expect_config_error(R"({"name": "blip_image_train"})", "only LAVIS processor supported");
  expect_config_error(R"({"transform": "random_crop"})", "expected 'blip2_eval'");
  expect_config_error(R"({"fill": [256, 0, 0]})", "'fill' must be a list of 3 integers");
}

TEST(BadArguments, ClearErrors) {
  const auto expect_argument_error = [](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no ArgumentError; expected '" << needle << "'";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const Image image(4, 3, 10);
  expect_argument_error([&] { resize(image, 0, 5, ResampleFilter::Bicubic); },
                        "target size must be positive");
  expect_argument_error([&] { resize(Image(), 5, 5, ResampleFilter::Bicubic); }, "resize: empty image");
  expect_argument_error([&] { center_crop(image, 5, 3); }, "does not fit in the image 4 x 3");
  expect_argument_error([&] { preprocess_batch({}, PreprocessConfig()); }, "no images");
  expect_argument_error(
      [&] {
        preprocess_batch({image, Image()}, PreprocessConfig());
      },
      "image 1: empty image");
  PreprocessConfig config;
  config.image_size = 0;
  expect_argument_error([&] { preprocess(image, config); }, "image_size must be positive");
  config = PreprocessConfig();
  config.std[1] = 0.0f;
  expect_argument_error([&] { preprocess(image, config); }, "std[1] must be positive");
  Image broken(4, 3);
  broken.pixels.pop_back();
  expect_argument_error([&] { preprocess(broken, PreprocessConfig()); }, "pixel buffer holds 35 bytes");
}

}  // namespace
}  // namespace voken::vision
