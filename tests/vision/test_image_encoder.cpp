// ImageEncoder (EVA ViT + ln_vision + Q-Former + llama_proj) on small random checkpoints
// written in the real containers: loading and the keys it ignores, bad checkpoints and configs
// (clear exceptions), bad pixel tensors, batch == one image at a time, bf16 against float32,
// position-embedding interpolation.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "common/test_support.h"
#include "io/json_file.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "vision/image_encoder.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

using Tensors = std::vector<std::pair<std::string, at::Tensor>>;

// Small sizes that differ from each other, so a swapped dimension cannot go unnoticed.
constexpr int64_t kWidth = 24, kPatch = 8, kImage = 32, kViTHeads = 2, kMlp = 40, kStoredBlocks = 3,
                  kDepth = 2;
constexpr int64_t kHidden = 16, kQHeads = 2, kLayers = 3, kIntermediate = 36, kQueries = 4, kLlm = 20;
constexpr int64_t kGrid = kImage / kPatch, kTokens = 1 + kGrid * kGrid;

// The config a bundle would give for these sizes (what the weights cannot tell).
ImageEncoderConfig tiny_config() {
  ImageEncoderConfig config;
  config.vision.img_size = kImage;
  config.vision.depth = kDepth;
  config.vision.num_heads = kViTHeads;
  config.qformer.num_attention_heads = kQHeads;
  return config;
}

struct TinyCheckpoints {
  Tensors vit, blip2, projection;

  explicit TinyCheckpoints(uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto randn = [&](std::vector<int64_t> shape, double scale) {
      return at::normal(0.0, scale, shape, gen, at::TensorOptions().dtype(at::kFloat));
    };
    auto norm = [&](const std::string& p, int64_t n, Tensors& out) {
      out.emplace_back(p + ".weight", 1.0 + randn({n}, 0.1));
      out.emplace_back(p + ".bias", randn({n}, 0.1));
    };
    auto linear = [&](const std::string& p, int64_t out_features, int64_t in_features, Tensors& out) {
      out.emplace_back(p + ".weight",
                       randn({out_features, in_features}, 1.0 / std::sqrt(double(in_features))));
      out.emplace_back(p + ".bias", randn({out_features}, 0.05));
    };
    vit.emplace_back("cls_token", randn({1, 1, kWidth}, 0.5));
    vit.emplace_back("pos_embed", randn({1, kTokens, kWidth}, 0.5));
    vit.emplace_back("patch_embed.proj.weight", randn({kWidth, 3, kPatch, kPatch}, 0.05));
    vit.emplace_back("patch_embed.proj.bias", randn({kWidth}, 0.05));
    for (int64_t i = 0; i < kStoredBlocks; ++i) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      norm(p + "norm1", kWidth, vit);
      vit.emplace_back(p + "attn.q_bias", randn({kWidth}, 0.1));
      vit.emplace_back(p + "attn.v_bias", randn({kWidth}, 0.1));
      vit.emplace_back(p + "attn.qkv.weight", randn({3 * kWidth, kWidth}, 0.3));
      linear(p + "attn.proj", kWidth, kWidth, vit);
      norm(p + "norm2", kWidth, vit);
      linear(p + "mlp.fc1", kMlp, kWidth, vit);
      linear(p + "mlp.fc2", kWidth, kMlp, vit);
    }
    // eva_vit_g.pth stores float16.
    for (auto& [name, tensor] : vit) tensor = tensor.to(at::kHalf);

    blip2.emplace_back("query_tokens", randn({1, kQueries, kHidden}, 0.5));
    norm("ln_vision", kWidth, blip2);
    blip2.emplace_back("Qformer.bert.embeddings.position_ids", at::arange(64, at::kLong).unsqueeze(0));
    blip2.emplace_back("Qformer.bert.embeddings.word_embeddings.weight", randn({50, kHidden}, 0.1));
    norm("Qformer.bert.embeddings.LayerNorm", kHidden, blip2);
    for (int64_t i = 0; i < kLayers; ++i) {
      const std::string p = "Qformer.bert.encoder.layer." + std::to_string(i) + ".";
      for (const char* proj : {"query", "key", "value"})
        linear(p + "attention.self." + proj, kHidden, kHidden, blip2);
      linear(p + "attention.output.dense", kHidden, kHidden, blip2);
      norm(p + "attention.output.LayerNorm", kHidden, blip2);
      if (i % 2 == 0) {
        linear(p + "crossattention.self.query", kHidden, kHidden, blip2);
        linear(p + "crossattention.self.key", kHidden, kWidth, blip2);
        linear(p + "crossattention.self.value", kHidden, kWidth, blip2);
        linear(p + "crossattention.output.dense", kHidden, kHidden, blip2);
        norm(p + "crossattention.output.LayerNorm", kHidden, blip2);
      }
      // The text branch, unused by the query path.
      linear(p + "intermediate.dense", kIntermediate, kHidden, blip2);
      linear(p + "output.dense", kHidden, kIntermediate, blip2);
      norm(p + "output.LayerNorm", kHidden, blip2);
      linear(p + "intermediate_query.dense", kIntermediate, kHidden, blip2);
      linear(p + "output_query.dense", kHidden, kIntermediate, blip2);
      norm(p + "output_query.LayerNorm", kHidden, blip2);
    }
    linear("t5_proj", 12, kHidden, blip2);

    linear("llama_proj", kLlm, kHidden, projection);
  }

  void erase(Tensors& tensors, const std::string& name) {
    const auto it =
        std::find_if(tensors.begin(), tensors.end(), [&](const auto& e) { return e.first == name; });
    ASSERT_NE(it, tensors.end()) << name;
    tensors.erase(it);
  }
  void replace(Tensors& tensors, const std::string& name, at::Tensor value) {
    for (auto& entry : tensors)
      if (entry.first == name) entry.second = std::move(value);
  }

  // eva_vit_g.pth: a bare state dict; the other two: {"model": state_dict}, as upstream saves them.
  ImageEncoderFiles write(const test::TempDir& dir) const {
    auto wrapped = [](const Tensors& tensors) {
      std::vector<std::pair<std::string, io::PickleValue>> entries;
      for (const auto& [name, tensor] : tensors) entries.emplace_back(name, io::PickleValue::of(tensor));
      return io::PickleValue::dict({{"model", io::PickleValue::dict(std::move(entries))}});
    };
    ImageEncoderFiles files{dir.file("eva_vit_g.pth"), dir.file("blip2_pretrained_flant5xxl.pth"),
                            dir.file("prerained_minigpt4_7b.pth")};
    io::save_torch_state_dict(files.vit, vit);
    io::save_torch_file(files.qformer, wrapped(blip2));
    io::save_torch_file(files.projection, wrapped(projection));
    return files;
  }
};

at::Tensor random_pixels(int64_t batch, int64_t size, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::normal(0.0, 1.0, {batch, 3, size, size}, gen, at::TensorOptions().dtype(at::kFloat));
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// The message of the exception `body` throws as `E` ("" and a test failure otherwise).
template <typename E, typename F>
std::string error_of(F&& body) {
  try {
    body();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "'" << (part) << "' not in: " << (text)

TEST(ImageEncoder, LoadsTheRealContainersAndEncodesEveryStage) {
  test::TempDir dir;
  const auto files = TinyCheckpoints(1).write(dir);
  // The stored extra ViT block, t5_proj, position_ids and the text branch are ignored.
  const auto encoder = ImageEncoder::load(files, tiny_config());
  EXPECT_EQ(encoder.vit().width(), kWidth);
  EXPECT_EQ(encoder.vit().depth(), kDepth);
  EXPECT_EQ(encoder.vit().mlp_hidden(), kMlp);
  EXPECT_EQ(encoder.vit().patch_size(), kPatch);
  EXPECT_EQ(encoder.qformer().hidden_size(), kHidden);
  EXPECT_EQ(encoder.qformer().num_layers(), kLayers);
  EXPECT_EQ(encoder.qformer().intermediate_size(), kIntermediate);
  EXPECT_EQ(encoder.qformer().encoder_width(), kWidth);
  EXPECT_EQ(encoder.qformer().cross_attention_layers(), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(encoder.num_query_tokens(), kQueries);
  EXPECT_EQ(encoder.output_width(), kLlm);
  EXPECT_EQ(encoder.dtype(), at::kFloat);  // float16 files compute in float32 on CPU

  const auto features = encoder.encode_all(random_pixels(2, kImage, 7));
  EXPECT_EQ(features.vit.sizes(), (at::IntArrayRef{2, kTokens, kWidth}));
  EXPECT_EQ(features.ln_vision.sizes(), (at::IntArrayRef{2, kTokens, kWidth}));
  EXPECT_EQ(features.qformer.sizes(), (at::IntArrayRef{2, kQueries, kHidden}));
  EXPECT_EQ(features.llama_proj.sizes(), (at::IntArrayRef{2, kQueries, kLlm}));
  EXPECT_TRUE(features.llama_proj.isfinite().all().item<bool>());
  EXPECT_TRUE(encoder.encode(random_pixels(2, kImage, 7)).equal(features.llama_proj));
}

TEST(ImageEncoder, ConfigFileGivesTheSizesTheWeightsCannotTell) {
  test::TempDir dir;
  const auto files = TinyCheckpoints(2).write(dir);
  test::write_file(
      dir.file("config.json"),
      R"({"vision": {"img_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 1.67, "layer_norm_eps": 1e-6},
                       "ln_vision": {"eps": 1e-5},
                       "qformer": {"num_attention_heads": 2, "num_hidden_layers": 3, "cross_attention_freq": 2,
                                   "hidden_act": "gelu", "layer_norm_eps": 1e-12},
                       "num_query_token": 4, "llama_proj": {"in": 16, "out": 20}})");
  const auto config = ImageEncoderConfig::load(dir.file("config.json"));
  EXPECT_EQ(config.vision.depth, 2);
  EXPECT_EQ(config.qformer.query_length, kQueries);
  const auto encoder = ImageEncoder::load(files, config);
  EXPECT_EQ(encoder.vit().mlp_hidden(), kMlp);  // int(24 * 1.67) = 40, as upstream computes it
  const auto reference = ImageEncoder::load(files, tiny_config());
  const auto pixels = random_pixels(1, kImage, 3);
  EXPECT_TRUE(encoder.encode(pixels).equal(reference.encode(pixels)));
}

TEST(ImageEncoder, BatchEqualsOneImageAtATime) {
  test::TempDir dir;
  const auto encoder = ImageEncoder::load(TinyCheckpoints(3).write(dir), tiny_config());
  const auto pixels = random_pixels(3, kImage, 11);
  const auto batch = encoder.encode_all(pixels);
  for (int64_t i = 0; i < 3; ++i) {
    const auto single = encoder.encode_all(pixels.narrow(0, i, 1));
    // Only GEMM blocking differs between the two: float32 rounding noise.
    EXPECT_LE(max_abs_diff(batch.vit.narrow(0, i, 1), single.vit), 1e-5) << i;
    EXPECT_LE(max_abs_diff(batch.qformer.narrow(0, i, 1), single.qformer), 1e-5) << i;
    EXPECT_LE(max_abs_diff(batch.llama_proj.narrow(0, i, 1), single.llama_proj), 1e-5) << i;
  }
}

// bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) per stored weight and per
// activation; through the ViT, the Q-Former and the projection the errors add up to about 1% of
// the output's scale. The bound below is 5% of the largest |value| of each stage in float32,
// plus a mean error of 1.5%: loose enough for bf16, tight enough to catch a wrong op (which
// gives errors of the order of the values themselves).
TEST(ImageEncoder, Bf16FollowsFloat32WithinBf16Precision) {
  test::TempDir dir;
  const auto files = TinyCheckpoints(4).write(dir);
  const auto f32 = ImageEncoder::load(files, tiny_config(), {at::kFloat});
  const auto bf16 = ImageEncoder::load(files, tiny_config(), {at::kBFloat16});
  EXPECT_EQ(bf16.dtype(), at::kBFloat16);
  const auto pixels = random_pixels(2, kImage, 5);
  const auto want = f32.encode_all(pixels);
  const auto got = bf16.encode_all(pixels);
  EXPECT_EQ(got.llama_proj.scalar_type(), at::kBFloat16);
  const std::vector<std::pair<const char*, std::pair<at::Tensor, at::Tensor>>> stages = {
      {"vit", {got.vit, want.vit}},
      {"ln_vision", {got.ln_vision, want.ln_vision}},
      {"qformer", {got.qformer, want.qformer}},
      {"llama_proj", {got.llama_proj, want.llama_proj}}};
  for (const auto& [stage, pair] : stages) {
    const auto g = pair.first.to(at::kDouble), w = pair.second.to(at::kDouble);
    const double scale = w.abs().max().item<double>();
    const double max_err = (g - w).abs().max().item<double>();
    const double mean_err = (g - w).abs().mean().item<double>();
    EXPECT_LE(max_err, 0.05 * scale) << stage;
    EXPECT_LE(mean_err, 0.015 * scale) << stage;
    std::printf("bf16 vs float32 %-10s max_abs_err=%.3g mean_abs_err=%.3g scale=%.3g\n", stage, max_err,
                mean_err, scale);
  }
}

TEST(ImageEncoder, ResizesThePositionEmbeddingForAnotherImageSize) {
  test::TempDir dir;
  const TinyCheckpoints checkpoints(6);
  const auto files = checkpoints.write(dir);
  auto config = tiny_config();
  config.vision.img_size = 16;  // 2x2 patches instead of the checkpoint's 4x4
  const auto encoder = ImageEncoder::load(files, config);
  const auto& pos = encoder.vit().position_embedding();
  ASSERT_EQ(pos.sizes(), (at::IntArrayRef{1, 5, kWidth}));
  const auto stored = checkpoints.vit[1].second.to(at::kFloat);    // pos_embed
  EXPECT_TRUE(pos.narrow(1, 0, 1).equal(stored.narrow(1, 0, 1)));  // the class token's row is kept
  EXPECT_EQ(encoder.encode(random_pixels(1, 16, 1)).sizes(), (at::IntArrayRef{1, kQueries, kLlm}));
  // Same grid: the stored embedding itself.
  EXPECT_TRUE(interpolate_pos_embed(stored, kGrid * kGrid).equal(stored));
  EXPECT_THROW(interpolate_pos_embed(stored.narrow(1, 0, 7), 16), ArgumentError);  // 6 tokens: no square grid
}

TEST(ImageEncoder, AcceptsAVisualEncoderPrefix) {
  test::TempDir dir;
  TinyCheckpoints checkpoints(7);
  const auto plain = checkpoints.write(dir);
  Tensors prefixed;
  for (const auto& [name, tensor] : checkpoints.vit) prefixed.emplace_back("visual_encoder." + name, tensor);
  io::save_torch_state_dict(dir.file("prefixed.pth"), prefixed);
  auto files = plain;
  files.vit = dir.file("prefixed.pth");
  const auto pixels = random_pixels(1, kImage, 2);
  EXPECT_TRUE(ImageEncoder::load(files, tiny_config())
                  .encode(pixels)
                  .equal(ImageEncoder::load(plain, tiny_config()).encode(pixels)));
}

TEST(ImageEncoder, ReportsEveryMissingAndMisShapedKeyOfAllFilesAtOnce) {
  test::TempDir dir;
  TinyCheckpoints checkpoints(8);
  checkpoints.erase(checkpoints.vit, "blocks.1.attn.q_bias");
  checkpoints.erase(checkpoints.blip2, "Qformer.bert.encoder.layer.2.crossattention.self.key.weight");
  checkpoints.replace(checkpoints.projection, "llama_proj.weight", at::zeros({kLlm, kHidden + 1}));
  const auto files = checkpoints.write(dir);
  const auto message = error_of<WeightsError>([&] { ImageEncoder::load(files, tiny_config()); });
  EXPECT_CONTAINS(message, "blocks.1.attn.q_bias");
  EXPECT_CONTAINS(message, "Qformer.bert.encoder.layer.2.crossattention.self.key.weight");
  EXPECT_CONTAINS(message, "llama_proj.weight: expected [20, 16], found [20, 17]");
  EXPECT_CONTAINS(message, files.vit);
  EXPECT_CONTAINS(message, files.qformer);
  EXPECT_CONTAINS(message, files.projection);
}

TEST(ImageEncoder, MoreBlocksThanTheCheckpointHoldsAreMissing) {
  test::TempDir dir;
  const auto files = TinyCheckpoints(9).write(dir);
  auto config = tiny_config();
  config.vision.depth = kStoredBlocks + 1;
  const auto message = error_of<WeightsError>([&] { ImageEncoder::load(files, config); });
  EXPECT_CONTAINS(message, "blocks.3.attn.qkv.weight");
  EXPECT_EQ(message.find("blocks.2."), std::string::npos) << message;
}

TEST(ImageEncoder, UnexpectedTensorsThatWouldChangeTheResultAreErrors) {
  test::TempDir dir;
  TinyCheckpoints checkpoints(10);
  // Layer scale (another EVA variant) and a cross-attention where the config has none.
  checkpoints.vit.emplace_back("blocks.0.gamma_1", at::ones({kWidth}, at::kHalf));
  checkpoints.blip2.emplace_back("Qformer.bert.encoder.layer.1.crossattention.self.query.weight",
                                 at::zeros({kHidden, kHidden}));
  const auto files = checkpoints.write(dir);
  const auto message = error_of<WeightsError>([&] { ImageEncoder::load(files, tiny_config()); });
  EXPECT_CONTAINS(message, "unexpected");
  EXPECT_CONTAINS(message, "blocks.0.gamma_1");
  EXPECT_CONTAINS(message, "layer.1.crossattention.self.query.weight");
}

TEST(ImageEncoder, WrongQFormerWidthOrMissingFileAreClearErrors) {
  test::TempDir dir;
  TinyCheckpoints checkpoints(11);
  // A BLIP-2 file made for another ViT width.
  for (const char* kv : {"key", "value"})
    checkpoints.replace(checkpoints.blip2,
                        std::string("Qformer.bert.encoder.layer.0.crossattention.self.") + kv + ".weight",
                        at::zeros({kHidden, kWidth + 8}));
  const auto files = checkpoints.write(dir);
  const auto message = error_of<WeightsError>([&] { ImageEncoder::load(files, tiny_config()); });
  EXPECT_CONTAINS(message, "layer.0.crossattention.self.key.weight: expected [16, 24], found [16, 32]");
  auto missing = files;
  missing.projection = dir.file("absent.pth");
  EXPECT_THROW(ImageEncoder::load(missing, tiny_config()), FileNotFoundError);
}

TEST(ImageEncoder, BadConfigsAreConfigErrorsNamingTheField) {
  auto parse = [](const std::string& text) {
    const auto json = io::Json::parse(text);
    return ImageEncoderConfig::from_json(io::JsonView(json, "config.json"));
  };
  EXPECT_CONTAINS(error_of<ConfigError>([&] { parse(R"({"vision": {"embed_dim": 24, "num_heads": 5}})"); }),
                  "num_heads");
  EXPECT_CONTAINS(error_of<ConfigError>([&] { parse(R"({"vision": {"depth": 0}})"); }), "depth");
  EXPECT_CONTAINS(error_of<ConfigError>([&] { parse(R"({"vision": {"final_norm": "LayerNorm"}})"); }),
                  "final_norm");
  EXPECT_CONTAINS(error_of<ConfigError>([&] { parse(R"({"vision": {"img_size": "224"}})"); }), "img_size");
  EXPECT_CONTAINS(error_of<ConfigError>([&] { parse(R"({"qformer": {"hidden_act": "swish"}})"); }),
                  "hidden_act");
  EXPECT_CONTAINS(
      error_of<ConfigError>([&] { parse(R"({"qformer": {"position_embedding_type": "relative_key"}})"); }),
      "position_embedding_type");
  EXPECT_CONTAINS(
      error_of<ConfigError>([&] { parse(R"({"qformer": {"query_length": 32}, "num_query_token": 8})"); }),
      "num_query_token");

  // Heads that do not divide the width the weights give.
  test::TempDir dir;
  const auto files = TinyCheckpoints(12).write(dir);
  auto config = tiny_config();
  config.vision.num_heads = 5;
  EXPECT_CONTAINS(error_of<ConfigError>([&] { ImageEncoder::load(files, config); }), "num_heads 5");
}

TEST(ImageEncoder, BadPixelTensorsAreArgumentErrors) {
  test::TempDir dir;
  const auto encoder = ImageEncoder::load(TinyCheckpoints(13).write(dir), tiny_config());
  EXPECT_CONTAINS(error_of<ArgumentError>([&] { encoder.encode(random_pixels(1, kImage + 8, 0)); }),
                  "expected pixels [B, 3, 32, 32], found [1, 3, 40, 40]");
  EXPECT_THROW(encoder.encode(at::zeros({1, 1, kImage, kImage})), ArgumentError);
  EXPECT_THROW(encoder.encode(at::zeros({3, kImage, kImage})), ArgumentError);
  EXPECT_THROW(encoder.encode(at::zeros({1, 3, kImage, kImage}, at::kByte)), ArgumentError);
  EXPECT_THROW(encoder.encode(at::Tensor()), ArgumentError);
  EXPECT_THROW(encoder.qformer().forward(at::zeros({1, kTokens, kWidth + 1})), ArgumentError);
  EXPECT_THROW(encoder.apply_ln_vision(at::zeros({1, kTokens, kWidth - 1})), ArgumentError);
  EXPECT_THROW(encoder.project(at::zeros({1, kQueries, kLlm})), ArgumentError);
}

}  // namespace
}  // namespace voken::vision
