// UNet2DCondition and AutoencoderKL beyond the goldens: config parsing (defaults, int-or-list
// fields, unsupported block types and fields named in the error), weights (mismatches reported,
// .bin and fp16 files into float32 and bfloat16), bad inputs, attention chunking in a model,
// channels-last against NCHW, bfloat16 against float32, SD 1.x conv projections against SD 2.x
// linear ones, and the VAE's deprecated attention names. (The kernels are tested at every CPU tier
// in tests/core: test_packed_gemm, test_attention, test_norm_kernels.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <functional>
#include <regex>
#include <string>

#include "common/test_support.h"
#include "core/cpu.h"
#include "core/packed_gemm.h"
#include "diffusion/nn_blocks.h"
#include "diffusion/random_diffusers_model.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "voken/error.h"

namespace voken::diffusion {
namespace {

// The kernels these tests check live in core.
using core::packed_gemm_supported;

using io::Json;
using test::TempDir;

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// An SD 1.x-shaped UNet in miniature: conv projections, an int head count, a DownBlock2D at the
// bottom and an UpBlock2D on top, as SD's layout has them.
Json tiny_unet_config() {
  return Json{{"_class_name", "UNet2DConditionModel"},
              {"block_out_channels", {8, 16, 16}},
              {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
              {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
              {"layers_per_block", 1},
              {"attention_head_dim", 2},
              {"norm_num_groups", 4},
              {"cross_attention_dim", 12},
              {"use_linear_projection", false},
              {"in_channels", 4},
              {"out_channels", 4},
              {"sample_size", 8}};
}

Json tiny_vae_config() {
  return Json{{"_class_name", "AutoencoderKL"},
              {"block_out_channels", {8, 16}},
              {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
              {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
              {"layers_per_block", 1},
              {"norm_num_groups", 4},
              {"latent_channels", 4},
              {"scaling_factor", 0.18215}};
}

UNetConfig parse_unet(const Json& json) {
  return UNetConfig::from_json(io::JsonView(json, "unet/config.json"));
}
VaeConfig parse_vae(const Json& json) { return VaeConfig::from_json(io::JsonView(json, "vae/config.json")); }

std::vector<std::pair<std::string, at::Tensor>> random_unet_weights(const Json& config, uint64_t seed) {
  const UNetConfig parsed = parse_unet(config);
  return test::random_weights(
      test::expected_weights([&](io::WeightLoader& loader) { UNet2DCondition unet(parsed, loader); }), seed);
}

std::vector<std::pair<std::string, at::Tensor>> random_vae_weights(const Json& config, uint64_t seed) {
  const VaeConfig parsed = parse_vae(config);
  return test::random_weights(
      test::expected_weights([&](io::WeightLoader& loader) { AutoencoderKL vae(parsed, loader); }), seed);
}

struct UNetInputs {
  at::Tensor sample, timestep, context;
};
UNetInputs unet_inputs(int64_t batch, int64_t height, int64_t width, int64_t context_dim = 12) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  return {at::randn({batch, 4, height, width}, generator, f32),
          at::full({batch}, 421, at::TensorOptions().dtype(at::kLong)),
          at::randn({batch, 5, context_dim}, generator, f32)};
}

// A model folder written once per test.
class TinyUNet : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = tiny_unet_config();
    weights_ = random_unet_weights(config_, 1);
    dir_ = tmp_.file("unet");
    test::write_model(dir_, config_, weights_);
  }
  TempDir tmp_;
  Json config_;
  std::vector<std::pair<std::string, at::Tensor>> weights_;
  std::string dir_;
};

// ---- config ---------------------------------------------------------------------------------

TEST(UNetConfigTest, DefaultsAreUpstreams) {
  const UNetConfig config = parse_unet(Json::object());
  EXPECT_EQ(config.block_out_channels, (std::vector<int64_t>{320, 640, 1280, 1280}));
  EXPECT_EQ(config.attention_head_dim, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_EQ(config.cross_attention_dim, (std::vector<int64_t>{1280, 1280, 1280, 1280}));
  EXPECT_EQ(config.layers_per_block, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(config.down_block_types.back(), "DownBlock2D");
  EXPECT_EQ(config.up_block_types.front(), "UpBlock2D");
  EXPECT_TRUE(config.flip_sin_to_cos);
  EXPECT_EQ(config.time_embed_dim(), 1280);
  EXPECT_FALSE(config.use_linear_projection);
}

TEST(UNetConfigTest, IntFieldsBroadcastAndListsArePerBlock) {
  Json json = tiny_unet_config();
  json["attention_head_dim"] = {2, 4, 4};  // SD 2.x style: heads per block
  json["layers_per_block"] = {1, 2, 1};
  json["only_cross_attention"] = true;
  const UNetConfig config = parse_unet(json);
  EXPECT_EQ(config.attention_head_dim, (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(config.layers_per_block, (std::vector<int64_t>{1, 2, 1}));
  EXPECT_EQ(config.cross_attention_dim, (std::vector<int64_t>{12, 12, 12}));
  EXPECT_EQ(config.only_cross_attention, (std::vector<bool>{true, true, true}));
  EXPECT_EQ(config.heads(1), 4);
}

void expect_config_error(const Json& json, const std::string& needle, bool vae = false) {
  try {
    if (vae)
      parse_vae(json);
    else
      parse_unet(json);
    ADD_FAILURE() << "no ConfigError for " << needle;
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(vae ? "vae/config.json" : "unet/config.json"), std::string::npos)
        << e.what();
  }
}

TEST(UNetConfigTest, UnsupportedBlockTypesAndFieldsAreNamed) {
  Json json = tiny_unet_config();
  json["down_block_types"][1] = "SimpleCrossAttnDownBlock2D";
  expect_config_error(json, "SimpleCrossAttnDownBlock2D");
  json = tiny_unet_config();
  json["up_block_types"][0] = "AttnUpBlock2D";
  expect_config_error(json, "AttnUpBlock2D");
  json = tiny_unet_config();
  json["mid_block_type"] = "UNetMidBlock2DSimpleCrossAttn";
  expect_config_error(json, "UNetMidBlock2DSimpleCrossAttn");
  for (const auto& [field, value] : std::vector<std::pair<std::string, Json>>{
           {"class_embed_type", "timestep"},
           {"addition_embed_type", "text_time"},
           {"num_class_embeds", 10},
           {"encoder_hid_dim", 32},
           {"time_cond_proj_dim", 8},
           {"num_attention_heads", 8},
           {"dual_cross_attention", true},
           {"time_embedding_type", "fourier"},
           {"attention_type", "gated"},
           {"resnet_time_scale_shift", "spatial"},
           {"act_fn", "tanh"},
           {"transformer_layers_per_block", Json::array({{1, 2}, 1, 1})},
           {"norm_num_groups", nullptr},
           {"_class_name", "UNet2DModel"}}) {
    json = tiny_unet_config();
    json[field] = value;
    expect_config_error(json, field);
  }
}

TEST(UNetConfigTest, InconsistentSizesAreNamed) {
  Json json = tiny_unet_config();
  json["attention_head_dim"] = {2, 2};
  expect_config_error(json, "attention_head_dim");
  json = tiny_unet_config();
  json["attention_head_dim"] = 3;  // 8 channels / 3 heads
  expect_config_error(json, "attention_head_dim");
  json = tiny_unet_config();
  json["block_out_channels"] = {8, 16};
  expect_config_error(json, "block_out_channels");
  json = tiny_unet_config();
  json["norm_num_groups"] = 3;
  expect_config_error(json, "norm_num_groups");
  json = tiny_unet_config();
  json["layers_per_block"] = "two";
  expect_config_error(json, "layers_per_block");
}

TEST(VaeConfigTest, UnsupportedBlockTypesAndFieldsAreNamed) {
  const VaeConfig config = parse_vae(tiny_vae_config());
  EXPECT_EQ(config.block_out_channels, (std::vector<int64_t>{8, 16}));
  EXPECT_DOUBLE_EQ(config.scaling_factor, 0.18215);
  Json json = tiny_vae_config();
  json["up_block_types"][1] = "AttnUpDecoderBlock2D";
  expect_config_error(json, "AttnUpDecoderBlock2D", true);
  json = tiny_vae_config();
  json["_class_name"] = "AutoencoderTiny";
  expect_config_error(json, "_class_name", true);
  json = tiny_vae_config();
  json["down_block_types"] = {"DownEncoderBlock2D"};
  expect_config_error(json, "down_block_types", true);
}

// ---- weights --------------------------------------------------------------------------------

TEST_F(TinyUNet, MismatchedWeightsAreReportedTogether) {
  // The config says the context is 16 wide, the weights were made for 12.
  Json wider = config_;
  wider["cross_attention_dim"] = 16;
  std::filesystem::remove(dir_ + "/config.json");
  test::write_model(dir_, wider, weights_);
  try {
    UNet2DCondition::load(dir_);
    FAIL() << "no WeightsError";
  } catch (const WeightsError& e) {
    const std::string message = e.what();
    EXPECT_NE(
        message.find("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight: expected [8, 16]"),
        std::string::npos)
        << message;
    EXPECT_NE(message.find("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v.weight"),
              std::string::npos)
        << message;
  }
  // A missing and an extra tensor.
  auto weights = weights_;
  weights.erase(weights.begin() + 3);
  weights.emplace_back("extra.weight", at::zeros({2}));
  test::write_model(dir_, config_, weights);
  try {
    UNet2DCondition::load(dir_);
    FAIL() << "no WeightsError";
  } catch (const WeightsError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("missing (1)"), std::string::npos) << message;
    EXPECT_NE(message.find(weights_[3].first), std::string::npos) << message;
    EXPECT_NE(message.find("unexpected (1)"), std::string::npos) << message;
  }
}

TEST_F(TinyUNet, BinAndFloat16FilesLoadIntoFloat32AndBFloat16) {
  const auto inputs = unet_inputs(2, 8, 8);
  const auto reference = UNet2DCondition::load(dir_).forward(inputs.sample, inputs.timestep, inputs.context);

  // .bin (torch.save zip) holds the same float32 weights: the same numbers.
  const std::string bin_dir = tmp_.file("bin");
  test::write_model(bin_dir, config_, weights_, at::kFloat, test::CheckpointFormat::TorchBin);
  const auto from_bin = UNet2DCondition::load(bin_dir);
  EXPECT_EQ(from_bin.dtype(), at::kFloat);
  EXPECT_TRUE(test::bit_equal(from_bin.forward(inputs.sample, inputs.timestep, inputs.context), reference));

  // An fp16 file becomes float32 by default, equal to float32 weights rounded through fp16.
  const std::string fp16_dir = tmp_.file("fp16");
  test::write_model(fp16_dir, config_, weights_, at::kHalf);
  std::vector<std::pair<std::string, at::Tensor>> rounded;
  for (const auto& [name, t] : weights_) rounded.emplace_back(name, t.to(at::kHalf).to(at::kFloat));
  const std::string rounded_dir = tmp_.file("rounded");
  test::write_model(rounded_dir, config_, rounded);
  const auto fp16 = UNet2DCondition::load(fp16_dir);
  EXPECT_EQ(fp16.dtype(), at::kFloat);
  const auto fp16_out = fp16.forward(inputs.sample, inputs.timestep, inputs.context);
  EXPECT_TRUE(test::bit_equal(
      fp16_out, UNet2DCondition::load(rounded_dir).forward(inputs.sample, inputs.timestep, inputs.context)));
  // ... or bfloat16 on request.
  const auto bf16 = UNet2DCondition::load(fp16_dir, at::kBFloat16);
  EXPECT_EQ(bf16.dtype(), at::kBFloat16);
  const auto bf16_out = bf16.forward(inputs.sample, inputs.timestep, inputs.context);
  EXPECT_EQ(bf16_out.scalar_type(), at::kFloat);
  EXPECT_LE(max_abs_diff(bf16_out, fp16_out), 0.05 * fp16_out.abs().max().item<double>());
}

// ---- inputs ---------------------------------------------------------------------------------

void expect_argument_error(const std::function<void()>& call, const std::string& needle) {
  try {
    call();
    ADD_FAILURE() << "no ArgumentError for " << needle;
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST_F(TinyUNet, BadInputsAreRefusedWithClearErrors) {
  const auto unet = UNet2DCondition::load(dir_);
  const auto in = unet_inputs(2, 8, 8);
  at::Tensor nan_context = in.context.clone();
  nan_context[1][2][3] = NAN;
  expect_argument_error([&] { unet.forward(in.sample, in.timestep, nan_context); },
                        "encoder_hidden_states contains NaN");
  at::Tensor inf_sample = in.sample.clone();
  inf_sample[0][0][0][0] = INFINITY;
  expect_argument_error([&] { unet.forward(inf_sample, in.timestep, in.context); },
                        "sample contains NaN or Inf");
  expect_argument_error([&] { unet.forward(in.sample, std::nan(""), in.context); }, "timestep contains NaN");
  expect_argument_error([&] { unet.forward(in.sample, in.timestep, at::zeros({2, 5, 16})); }, "[2, S, 12]");
  expect_argument_error([&] { unet.forward(in.sample, in.timestep, in.context.narrow(0, 0, 1)); },
                        "[2, S, 12]");
  expect_argument_error([&] { unet.forward(in.sample, at::zeros({3}, at::kLong), in.context); }, "timestep");
  expect_argument_error(
      [&] {
        unet.forward(at::zeros({2, 3, 8, 8}), in.timestep, in.context);
      },
      "[B, 4, H, W]");
  expect_argument_error([&] { unet.forward(at::zeros({2, 4, 8}), in.timestep, in.context); }, "[B, 4, H, W]");
}

TEST_F(TinyUNet, TimestepBroadcastsOverTheBatchWhateverItsType) {
  const auto unet = UNet2DCondition::load(dir_);
  const auto in = unet_inputs(2, 8, 8);
  const auto per_sample = unet.forward(in.sample, at::full({2}, 421, at::kLong), in.context);
  EXPECT_TRUE(
      test::bit_equal(unet.forward(in.sample, at::full({1}, 421, at::kLong), in.context), per_sample));
  EXPECT_TRUE(
      test::bit_equal(unet.forward(in.sample, at::scalar_tensor(421, at::kInt), in.context), per_sample));
  EXPECT_TRUE(test::bit_equal(unet.forward(in.sample, 421.0, in.context), per_sample));
  // Different timesteps per sample: sample 1 of [9, 421] is sample 1 of [421, 421].
  const auto mixed = unet.forward(in.sample, at::tensor({9, 421}, at::kLong), in.context);
  EXPECT_TRUE(test::bit_equal(mixed[1], per_sample[1]));
  EXPECT_GT(max_abs_diff(mixed[0], per_sample[0]), 1e-4);
}

// ---- numerics -------------------------------------------------------------------------------

TEST_F(TinyUNet, AttentionChunkingAndMemoryLayoutDoNotChangeTheResult) {
  // 6x10 latents: not divisible by the overall factor 4 (upsample_size path).
  const auto in = unet_inputs(2, 6, 10);
  auto unet = UNet2DCondition::load(dir_);
  const auto reference = unet.forward(in.sample, in.timestep, in.context);
  EXPECT_EQ(reference.sizes(), (std::vector<int64_t>{2, 4, 6, 10}));
  ComputeOptions options = unet.compute_options();
  options.attention_max_scores = 7;  // one score row (5 context tokens) at a time
  unet.set_compute_options(options);
  EXPECT_LT(max_abs_diff(unet.forward(in.sample, in.timestep, in.context), reference), 1e-5);
  ComputeOptions nchw;
  nchw.channels_last = false;
  const auto contiguous = UNet2DCondition::load(dir_, std::nullopt, nchw);
  EXPECT_LT(max_abs_diff(contiguous.forward(in.sample, in.timestep, in.context), reference), 1e-5);
}

TEST_F(TinyUNet, BFloat16StaysCloseToFloat32) {
  const auto in = unet_inputs(2, 8, 8);
  const auto fp32 = UNet2DCondition::load(dir_).forward(in.sample, in.timestep, in.context);
  const auto bf16 = UNet2DCondition::load(dir_, at::kBFloat16).forward(in.sample, in.timestep, in.context);
  // The documented bfloat16 tolerance of the parity tests: 5% of the output's largest magnitude.
  EXPECT_LE(max_abs_diff(bf16, fp32), 0.05 * fp32.abs().max().item<double>());
  EXPECT_GT(max_abs_diff(bf16, fp32), 0.0);  // really computed in bfloat16
}

// SD 1.x (1x1-conv proj_in/proj_out) and SD 2.x (linear) Transformer2D projections compute the
// same map; the same weights in either form give the same output.
std::vector<std::pair<std::string, at::Tensor>> with_projection_shape(
    const std::vector<std::pair<std::string, at::Tensor>>& weights, bool as_conv) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const std::regex projection(R"(\.proj_(in|out)\.weight$)");
  for (const auto& [name, t] : weights) {
    if (!std::regex_search(name, projection)) {
      out.emplace_back(name, t);
      continue;
    }
    out.emplace_back(name,
                     as_conv ? t.reshape({t.size(0), t.size(1), 1, 1}) : t.reshape({t.size(0), t.size(1)}));
  }
  return out;
}

TEST_F(TinyUNet, ConvProjectionEqualsLinearProjection) {
  Json linear = config_;
  linear["use_linear_projection"] = true;
  const std::string linear_dir = tmp_.file("linear");
  test::write_model(linear_dir, linear, with_projection_shape(weights_, false));
  const auto in = unet_inputs(1, 8, 8);
  const auto conv_out = UNet2DCondition::load(dir_).forward(in.sample, in.timestep, in.context);
  const auto linear_out = UNet2DCondition::load(linear_dir).forward(in.sample, in.timestep, in.context);
  EXPECT_LT(max_abs_diff(conv_out, linear_out), 1e-6);
  // Each form refuses the other's key shapes.
  test::write_model(linear_dir, config_, with_projection_shape(weights_, false));
  EXPECT_THROW(UNet2DCondition::load(linear_dir), WeightsError);
}

// The golden SD 2.x-style UNet rewritten in SD 1.x form (conv projections) must still match the
// golden outputs: the conv path against upstream's numbers.
TEST(UNetGolden, ConvProjectionFormOfTheGoldenModelMatchesItsCases) {
  const std::string golden = test::golden_component("unet");
  VOKEN_SKIP_IF_EMPTY(golden, "golden folder for 'unet' not found (set VOKEN_GOLDEN_DIR)");
  const Json cases = io::read_json_file(golden + "/cases.json");
  const std::string model_dir = golden + "/" + cases.value("model_dir", "model") + "/unet";
  Json config = io::read_json_file(model_dir + "/config.json");
  if (!config.value("use_linear_projection", false))
    GTEST_SKIP() << "golden UNet already uses conv projections";
  config["use_linear_projection"] = false;
  const io::StateDict state = io::StateDict::load(model_dir);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (const auto& name : state.keys()) weights.emplace_back(name, state.at(name));
  TempDir tmp;
  test::write_model(tmp.file("unet"), config, with_projection_shape(weights, true));
  const auto unet = UNet2DCondition::load(tmp.file("unet"), at::kFloat);
  const auto set = io::SafetensorsFile::open(golden + "/cases.safetensors");
  int checked = 0;
  for (const auto& c : cases.at("cases")) {
    if (c.contains("model_dir")) continue;  // other models
    const std::string name = c.at("name").get<std::string>();
    const auto got = unet.forward(set.tensor(name + ".sample"), set.tensor(name + ".timestep"),
                                  set.tensor(name + ".encoder_hidden_states"));
    const at::Tensor want = set.tensor(name + ".noise_pred");
    const double atol = c.at("atol").get<double>(), rtol = c.value("rtol", 0.0);
    EXPECT_TRUE(
        ((got.to(at::kDouble) - want).abs() <= atol + rtol * want.abs().to(at::kDouble)).all().item<bool>())
        << name << ": max |err| " << max_abs_diff(got, want);
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

// ---- VAE ------------------------------------------------------------------------------------

TEST(TinyVae, DeprecatedAttentionNamesAndConvShapesLoadTheSame) {
  const Json config = tiny_vae_config();
  const auto weights = random_vae_weights(config, 5);
  TempDir tmp;
  test::write_model(tmp.file("current"), config, weights);
  std::vector<std::pair<std::string, at::Tensor>> old_names;
  const std::vector<std::pair<std::string, std::string>> renames = {
      {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
  int renamed = 0;
  for (auto [name, t] : weights) {
    for (const auto& [current, deprecated] : renames) {
      const auto at = name.find(current);
      if (at == std::string::npos) continue;
      name.replace(at, current.size(), deprecated);
      if (t.dim() == 2) t = t.reshape({t.size(0), t.size(1), 1, 1});  // original LDM files: 1x1 convs
      ++renamed;
    }
    old_names.emplace_back(name, t);
  }
  EXPECT_EQ(renamed, 16);  // q, k, v, out weight + bias, encoder and decoder
  test::write_model(tmp.file("deprecated"), config, old_names);

  const auto current = AutoencoderKL::load(tmp.file("current"));
  const auto deprecated = AutoencoderKL::load(tmp.file("deprecated"));
  auto generator = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor image = at::rand({1, 3, 12, 20}, generator, at::TensorOptions().dtype(at::kFloat)) * 2 - 1;
  const auto posterior = current.encode(image);
  EXPECT_EQ(posterior.mean.sizes(), (std::vector<int64_t>{1, 4, 6, 10}));
  EXPECT_TRUE(test::bit_equal(deprecated.encode(image).mean, posterior.mean));
  EXPECT_TRUE((posterior.logvar >= -30).all().item<bool>() && (posterior.logvar <= 20).all().item<bool>());
  const at::Tensor decoded = current.decode(posterior.mean);
  EXPECT_EQ(decoded.sizes(), (std::vector<int64_t>{1, 3, 12, 20}));
  EXPECT_TRUE(test::bit_equal(deprecated.decode(posterior.mean), decoded));

  // bfloat16 and chunked attention.
  const auto bf16 = AutoencoderKL::load(tmp.file("current"), at::kBFloat16);
  EXPECT_LE(max_abs_diff(bf16.decode(posterior.mean), decoded), 0.05 * decoded.abs().max().item<double>());
  ComputeOptions chunked;
  chunked.attention_max_scores = 13;
  const auto small_chunks = AutoencoderKL::load(tmp.file("current"), std::nullopt, chunked);
  EXPECT_LT(max_abs_diff(small_chunks.decode(posterior.mean), decoded), 1e-5);

  // Bad input.
  at::Tensor nan_latents = posterior.mean.clone();
  nan_latents[0][1][2][3] = NAN;
  expect_argument_error([&] { current.decode(nan_latents); }, "latents contains NaN");
  expect_argument_error([&] { current.decode(at::zeros({1, 3, 6, 10})); }, "[B, 4, H, W]");
  expect_argument_error([&] { current.encode(at::zeros({3, 12, 20})); }, "[B, 3, H, W]");
  expect_argument_error([&] { posterior.sample(at::zeros({1, 4, 6, 9})); }, "noise");
}

// ---- packed products in whole models (the kernels themselves: tests/core/test_packed_gemm.cpp) ----

// A UNet and a VAE whose widths the packed kernels take: packed and oneDNN bfloat16 agree, and
// both stay within the bfloat16 tolerance of float32.
TEST(PackedGemm, PackedModelsMatchUnpackedOnes) {
  if (!packed_gemm_supported(32, 32, 3)) GTEST_SKIP() << "no packed kernels at this CPU tier";
  Json unet_config = tiny_unet_config();
  unet_config["block_out_channels"] = {32, 64, 64};
  unet_config["norm_num_groups"] = 8;
  unet_config["use_linear_projection"] = true;
  unet_config["cross_attention_dim"] = 32;
  TempDir tmp;
  test::write_model(tmp.file("unet"), unet_config, random_unet_weights(unet_config, 3));
  const auto in = unet_inputs(2, 8, 12, 32);
  ComputeOptions plain;
  plain.packed_weights = false;
  const auto fp32 = UNet2DCondition::load(tmp.file("unet")).forward(in.sample, in.timestep, in.context);
  const auto packed =
      UNet2DCondition::load(tmp.file("unet"), at::kBFloat16).forward(in.sample, in.timestep, in.context);
  const auto unpacked = UNet2DCondition::load(tmp.file("unet"), at::kBFloat16, plain)
                            .forward(in.sample, in.timestep, in.context);
  const double scale = fp32.abs().max().item<double>();
  EXPECT_LE(max_abs_diff(packed, fp32), 0.05 * scale);
  EXPECT_LE(max_abs_diff(packed, unpacked), 0.05 * scale);
  EXPECT_GT(max_abs_diff(packed, unpacked), 0.0);  // really a different code path

  Json vae_config = tiny_vae_config();
  vae_config["block_out_channels"] = {32, 64};
  vae_config["norm_num_groups"] = 8;
  test::write_model(tmp.file("vae"), vae_config, random_vae_weights(vae_config, 4));
  auto generator = at::make_generator<at::CPUGeneratorImpl>(24);
  const at::Tensor latents = at::randn({1, 4, 6, 10}, generator, at::TensorOptions().dtype(at::kFloat));
  const auto vae_fp32 = AutoencoderKL::load(tmp.file("vae")).decode(latents);
  const auto vae_packed = AutoencoderKL::load(tmp.file("vae"), at::kBFloat16).decode(latents);
  const auto vae_unpacked = AutoencoderKL::load(tmp.file("vae"), at::kBFloat16, plain).decode(latents);
  const double vae_scale = vae_fp32.abs().max().item<double>();
  EXPECT_LE(max_abs_diff(vae_packed, vae_fp32), 0.05 * vae_scale);
  EXPECT_LE(max_abs_diff(vae_packed, vae_unpacked), 0.05 * vae_scale);
  EXPECT_GT(max_abs_diff(vae_packed, vae_unpacked), 0.0);
}

}  // namespace
}  // namespace voken::diffusion
