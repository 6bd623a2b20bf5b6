// Every real photo of shared/assets/images through the whole image path a user's photo takes:
// decode -> upstream transform (both MiniGPT-5's playground and BLIP-2's eval) -> ImageEncoder
// (the golden vision model, in its real containers) -> LLM-ready embeddings.
//
// The transforms are compared with PIL run on the same files (tests/fixtures/pil_reference.py),
// exactly; the encoder, whose parity the golden cases establish, must then give finite
// embeddings of the right shape, the same for a batch as one photo at a time, and bfloat16
// within bfloat16 precision of float32.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>

#include "common/test_support.h"
#include "io/safetensors.h"
#include "vision/image.h"
#include "vision/image_encoder.h"
#include "vision/preprocess.h"

namespace voken::vision {
namespace {

namespace fs = std::filesystem;

struct Photo {
  std::string name;  // file stem
  Image image;
};

// The photos beside the golden folder (shared/assets/images), sorted by name.
std::vector<Photo> load_photos() {
  std::vector<Photo> photos;
  const std::string root = test::golden_root();
  if (root.empty()) return photos;
  const fs::path dir = fs::path(root).parent_path() / "assets" / "images";
  if (!fs::is_directory(dir)) return photos;
  std::vector<fs::path> paths;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".jpg" || entry.path().extension() == ".png")
      paths.push_back(entry.path());
  std::sort(paths.begin(), paths.end());
  for (const auto& path : paths) photos.push_back({path.stem().string(), load_image(path.string())});
  return photos;
}

ImageEncoderFiles golden_encoder_files(const fs::path& model) {
  return {(model / "eva_vit_g.pth").string(), (model / "blip2_pretrained_flant5xxl.pth").string(),
          (model / "prerained_minigpt4_7b.pth").string()};
}

TEST(RealPhotos, TransformsEqualPilAndEncodeThroughTheWholePath) {
  const auto photos = load_photos();
  if (photos.empty()) GTEST_SKIP() << "shared/assets/images not found beside the golden folder";
  const fs::path model = fs::path(test::golden_root()) / "vision" / "model";
  if (!fs::exists(model / "eva_vit_g.pth")) GTEST_SKIP() << "golden vision model not found in " << model;
  if (test::run_python("-c 'import PIL, numpy' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "/usr/bin/python3 with PIL and numpy not available";

  const auto config = ImageEncoderConfig::load((model / "config.json").string());
  const auto encoder = ImageEncoder::load(golden_encoder_files(model), config, {at::kFloat});
  const auto encoder_bf16 = ImageEncoder::load(golden_encoder_files(model), config, {at::kBFloat16});
  const int size = static_cast<int>(encoder.image_size());

  // PIL's transforms of every photo, both kinds.
  test::TempDir dir;
  std::vector<std::pair<std::string, at::Tensor>> inputs;
  std::map<std::string, std::string> requests;
  for (const auto& photo : photos)
    for (const auto kind : {TransformKind::Playground, TransformKind::Blip2Eval}) {
      const std::string name = photo.name + "." + transform_name(kind);
      inputs.emplace_back(name, image_to_tensor(photo.image));
      requests[name] = std::string(transform_name(kind)) + " " + std::to_string(size);
    }
  const std::string in = dir.file("in.safetensors"), out = dir.file("out.safetensors");
  io::write_safetensors(in, inputs, requests);
  ASSERT_EQ(test::run_python("'" + std::string(VOKEN_SOURCE_DIR) +
                             "/tests/fixtures/pil_reference.py' transform '" + in + "' '" + out + "'"),
            0);
  const auto pil = io::SafetensorsFile::open(out);

  for (const auto kind : {TransformKind::Playground, TransformKind::Blip2Eval}) {
    PreprocessConfig preprocess_config;
    preprocess_config.kind = kind;
    preprocess_config.image_size = size;
    std::vector<Image> images;
    for (const auto& photo : photos) {
      const std::string name = photo.name + "." + transform_name(kind);
      const at::Tensor ours = preprocess(photo.image, preprocess_config);
      const at::Tensor want = pil.tensor(name + ".tensor");
      ASSERT_EQ(ours.sizes(), want.sizes()) << name;
      EXPECT_LE((ours - want).abs().max().item<float>(), 1e-6f)
          << name << " (" << photo.image.width << "x" << photo.image.height << ")";
      images.push_back(photo.image);
    }

    const at::Tensor pixels = preprocess_batch(images, preprocess_config);
    const at::Tensor batch = encoder.encode(pixels);
    const auto n = static_cast<int64_t>(photos.size());
    ASSERT_EQ(batch.sizes(), (at::IntArrayRef{n, encoder.num_query_tokens(), encoder.output_width()}));
    EXPECT_TRUE(batch.isfinite().all().item<bool>()) << transform_name(kind);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor single = encoder.encode(pixels.narrow(0, i, 1));
      EXPECT_LE((single[0] - batch[i]).abs().max().item<float>(), 1e-5f)
          << photos[static_cast<size_t>(i)].name << ": a batch must equal one photo at a time";
    }
    // Distinct photos give distinct embeddings (a path that ignored its input would not).
    EXPECT_GT((batch[0] - batch[n - 1]).abs().max().item<float>(), 1e-3f);

    // bfloat16: 8 bits of mantissa through a few blocks; relative to the embeddings' scale.
    const at::Tensor bf16 = encoder_bf16.encode(pixels).to(at::kFloat);
    const double scale = batch.abs().max().item<double>();
    EXPECT_LE((bf16 - batch).abs().max().item<double>(), 0.05 * scale) << transform_name(kind);
  }
}

}  // namespace
}  // namespace voken::vision
