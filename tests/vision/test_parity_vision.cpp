// Parity of the image encoder with upstream MiniGPT4.encode_img over every case of the golden
// folder $VOKEN_GOLDEN_DIR/vision (any folder of that layout: cases are dispatched on the names
// of their tensors, sizes come from model/config.json and the weights).
//
// A case's inputs say where it enters the pipeline:
//   <case>.image          pixels -> every stage (outputs among vit, ln_vision, qformer,
//                         llama_proj, pos_embed; the ViT is built for the case's vit_img_size)
//   <case>.input          -> ln_vision (output <case>.ln_vision) or llama_proj (<case>.llama_proj)
//   <case>.image_embeds   -> Q-Former (output <case>.last_hidden_state)
// Tolerances: atol_per_output[name] when given, else the case's atol; rtol from the case.
//
// The image cases also run with bfloat16 weights and activations against the float32 goldens
// ("BF16 vision/<case>@<tier>" lines): bf16 keeps 8 significant bits (2^-9 relative rounding) per
// weight and activation, which through the ViT, the Q-Former and the projection adds up to about
// 1% of each stage's scale; the bound is 5% of the stage's largest |value| (a wrong op or layout
// gives errors of the order of the values themselves).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "vision/image_encoder.h"

namespace voken::vision {
namespace {

namespace fs = std::filesystem;

// The three checkpoint files of model/, found by what they hold rather than by fixed names
// beyond upstream's: eva_vit*.pth, blip2*.pth, and the remaining .pth (MiniGPT-4's).
ImageEncoderFiles find_files(const std::string& model_dir) {
  ImageEncoderFiles files;
  for (const auto& entry : fs::directory_iterator(model_dir)) {
    const auto name = entry.path().filename().string();
    if (entry.path().extension() != ".pth" && entry.path().extension() != ".safetensors") continue;
    if (name.rfind("eva_vit", 0) == 0)
      files.vit = entry.path().string();
    else if (name.rfind("blip2", 0) == 0)
      files.qformer = entry.path().string();
    else
      files.projection = entry.path().string();
  }
  return files;
}

class VisionParity : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = test::GoldenSet::open("vision");
    if (!golden_) GTEST_SKIP() << test::GoldenSet::missing_reason("vision");
    files_ = find_files(golden_->model_dir());
    ASSERT_FALSE(files_.vit.empty() || files_.qformer.empty() || files_.projection.empty())
        << "model/ of " << golden_->dir() << " lacks eva_vit*.pth, blip2*.pth or the llama_proj checkpoint";
    const auto config_path = golden_->model_dir() + "/config.json";
    if (fs::exists(config_path)) config_ = ImageEncoderConfig::load(config_path);
  }

  // Float32 encoder built for `img_size` (cached: the interpolated-position case needs its own).
  const ImageEncoder& encoder(int64_t img_size) {
    auto& slot = encoders_[img_size];
    if (!slot) {
      auto config = config_;
      config.vision.img_size = img_size;
      slot = std::make_unique<ImageEncoder>(ImageEncoder::load(files_, config, {at::kFloat}));
    }
    return *slot;
  }

  // The same in bfloat16.
  const ImageEncoder& encoder_bf16(int64_t img_size) {
    auto& slot = encoders_bf16_[img_size];
    if (!slot) {
      auto config = config_;
      config.vision.img_size = img_size;
      slot = std::make_unique<ImageEncoder>(ImageEncoder::load(files_, config, {at::kBFloat16}));
    }
    return *slot;
  }

  std::optional<test::GoldenSet> golden_;
  ImageEncoderFiles files_;
  ImageEncoderConfig config_;
  std::map<int64_t, std::unique_ptr<ImageEncoder>> encoders_;
  std::map<int64_t, std::unique_ptr<ImageEncoder>> encoders_bf16_;
};

constexpr double kBf16RelativeTolerance = 0.05;

TEST_F(VisionParity, EveryImageCaseBFloat16) {
  int image_cases = 0;
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    if (!c.at("inputs").contains(name + ".image")) continue;
    SCOPED_TRACE(name);
    ++image_cases;
    const auto& bf16 = encoder_bf16(c.value("vit_img_size", config_.vision.img_size));
    const auto features = bf16.encode_all(golden_->tensor(name + ".image"));
    const std::map<std::string, at::Tensor> got = {{"vit", features.vit},
                                                   {"ln_vision", features.ln_vision},
                                                   {"qformer", features.qformer},
                                                   {"llama_proj", features.llama_proj}};
    for (const auto& [output, description] : c.at("outputs").items()) {
      const auto found = got.find(output.substr(name.size() + 1));
      if (found == got.end()) continue;  // pos_embed: a weight, not a computation
      EXPECT_EQ(found->second.scalar_type(), at::kBFloat16) << output;
      test::check_bf16("vision", name, output, found->second, golden_->tensor(output),
                       kBf16RelativeTolerance);
    }
  }
  if (image_cases == 0) GTEST_SKIP() << "no case of " << golden_->dir() << " starts from an image";
}

TEST_F(VisionParity, EveryGoldenCase) {
  ASSERT_FALSE(golden_->cases().empty());
  for (const auto& c : golden_->cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const double atol = c.at("atol").get<double>();
    const double rtol = c.value("rtol", 0.0);
    const int64_t img_size = c.value("vit_img_size", config_.vision.img_size);
    const auto& ref = encoder(img_size);
    auto tolerance = [&](const std::string& output) {
      if (c.contains("atol_per_output") && c.at("atol_per_output").contains(output))
        return c.at("atol_per_output").at(output).get<double>();
      return atol;
    };
    auto has_input = [&](const std::string& suffix) { return c.at("inputs").contains(name + "." + suffix); };

    std::map<std::string, at::Tensor> got;  // output suffix -> tensor
    if (has_input("image")) {
      const auto features = ref.encode_all(golden_->tensor(name + ".image"));
      got = {{"vit", features.vit},
             {"ln_vision", features.ln_vision},
             {"qformer", features.qformer},
             {"llama_proj", features.llama_proj}};
      if (ref.vit().position_embedding().defined()) got["pos_embed"] = ref.vit().position_embedding();
    } else if (has_input("image_embeds")) {
      got["last_hidden_state"] = ref.qformer().forward(golden_->tensor(name + ".image_embeds"));
    } else if (has_input("input")) {
      const auto input = golden_->tensor(name + ".input");
      if (c.at("outputs").contains(name + ".ln_vision")) got["ln_vision"] = ref.apply_ln_vision(input);
      if (c.at("outputs").contains(name + ".llama_proj")) got["llama_proj"] = ref.project(input);
    }

    test::ParityCase parity("vision", name);
    ASSERT_FALSE(c.at("outputs").empty());
    for (const auto& [output, description] : c.at("outputs").items()) {
      const std::string suffix = output.substr(name.size() + 1);
      const auto found = got.find(suffix);
      if (found == got.end()) {
        ADD_FAILURE() << "case " << name << ": don't know how to compute output " << output << " from inputs "
                      << c.at("inputs").dump();
        parity.compare(output, at::Tensor(), golden_->tensor(output), tolerance(output), rtol);
        continue;
      }
      parity.compare(output, found->second, golden_->tensor(output), tolerance(output), rtol);
    }
    EXPECT_TRUE(parity.finish());
  }
}

}  // namespace
}  // namespace voken::vision
