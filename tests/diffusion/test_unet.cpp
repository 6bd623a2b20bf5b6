// UNet2DCondition and AutoencoderKL beyond the goldens: config parsing (defaults, int-or-list
// fields, unsupported block types and fields named in the error), weights (mismatches reported,
// .bin and fp16 files into float32 and bfloat16), bad inputs, chunked attention against the whole
// score matrix, channels-last against NCHW, bfloat16 against float32, SD 1.x conv projections
// against SD 2.x linear ones, and the VAE's deprecated attention names. (The norm kernels are tested
// at every CPU tier in tests/core/test_norm_kernels.cpp.)
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <functional>
#include <regex>
#include <string>

#include "common/test_support.h"
#include "core/attention.h"
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
using core::fused_attention_bf16;
using core::pack_geglu_weight;
using core::pack_gemm_weight;
using core::packed_conv2d;
using core::packed_gemm_supported;
using core::packed_linear;
using core::packed_linear_into;
using core::unpack_gemm_weight;

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

TEST(Attention, ChunkedEqualsWholeScoreMatrix) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t batch = 2, queries = 50, keys = 37, heads = 3, head_dim = 8;
  const at::Tensor q = at::randn({batch, queries, heads * head_dim}, generator, f32);
  const at::Tensor k = at::randn({batch, keys, heads * head_dim}, generator, f32);
  const at::Tensor v = at::randn({batch, keys, heads * head_dim}, generator, f32);
  const double scale = 1 / std::sqrt(8.0);
  // Reference in float64 from the definition.
  const auto split = [&](const at::Tensor& t, int64_t n) {
    return t.to(at::kDouble).view({batch, n, heads, head_dim}).permute({0, 2, 1, 3});
  };
  const at::Tensor want =
      at::matmul(at::softmax(at::matmul(split(q, queries), split(k, keys).transpose(-1, -2)) * scale, -1),
                 split(v, keys))
          .permute({0, 2, 1, 3})
          .reshape({batch, queries, heads * head_dim});
  const at::Tensor whole = multi_head_attention(q, k, v, heads, scale, false, int64_t{1} << 40);
  EXPECT_LT(max_abs_diff(whole, want), 1e-5);
  // Budgets: one score row at a time, one head's rows in pieces, several heads at once.
  for (const int64_t budget : {int64_t{1}, keys, 7 * keys, queries * keys, 4 * queries * keys}) {
    const at::Tensor chunked = multi_head_attention(q, k, v, heads, scale, false, budget);
    EXPECT_LT(max_abs_diff(chunked, whole), 1e-6) << "budget " << budget;
  }
  // bfloat16: the fused AMX kernel (where the CPU has it) and the chunked path agree with the
  // float64 reference to bfloat16 accuracy, for head sizes that fill 1-4 output tiles, partial
  // query and key blocks, strided (fused-qkv-like) inputs, cross-attention lengths like 77.
  for (const int64_t dim : {int64_t{8}, int64_t{40}, int64_t{64}}) {
    for (const auto& [nq, nk] :
         std::vector<std::pair<int64_t, int64_t>>{{50, 37}, {16, 77}, {100, 200}, {20, 1100}}) {
      // Unit-variance inputs: scores of O(1). (The chunked path rounds scores to bfloat16, as
      // diffusers does, which costs ~2^-9 of their magnitude in the exponent; the fused kernel
      // keeps them in float32 and is checked on sharp score ranges below.)
      const at::Tensor qkv = at::randn({batch, nq, 3 * heads * dim}, generator, f32);
      const at::Tensor kv = at::randn({batch, nk, 2 * heads * dim}, generator, f32);
      const at::Tensor qb = qkv.to(at::kBFloat16).narrow(2, heads * dim, heads * dim);  // strided rows
      const at::Tensor kb = kv.to(at::kBFloat16).narrow(2, 0, heads * dim);
      const at::Tensor vb = kv.to(at::kBFloat16).narrow(2, heads * dim, heads * dim);
      const double s = 1 / std::sqrt(static_cast<double>(dim));
      const auto split_d = [&](const at::Tensor& t, int64_t n) {
        return t.to(at::kDouble).reshape({batch, n, heads, dim}).permute({0, 2, 1, 3});
      };
      const at::Tensor ref =
          at::matmul(at::softmax(at::matmul(split_d(qb, nq), split_d(kb, nk).transpose(-1, -2)) * s, -1),
                     split_d(vb, nk))
              .permute({0, 2, 1, 3})
              .reshape({batch, nq, heads * dim});
      const double tol = 0.02 * ref.abs().max().item<double>();
      const at::Tensor chunked = multi_head_attention(qb, kb, vb, heads, s, false, 64, /*allow_fused=*/false);
      EXPECT_LT(max_abs_diff(chunked, ref), 2.5 * tol)
          << "chunked dim " << dim << " nq " << nq << " nk " << nk;
      if ((core::cpu_tier() == core::CpuTier::amx)) {
        const at::Tensor fused = fused_attention_bf16(qb, kb, vb, heads, s);
        EXPECT_EQ(fused.sizes(), ref.sizes());
        EXPECT_LT(max_abs_diff(fused, ref), tol) << "fused dim " << dim << " nq " << nq << " nk " << nk;
        EXPECT_TRUE(at::isfinite(fused).all().item<bool>());
      }
    }
  }
  // A row whose maximum appears late (rescaling of the resident output) and large score ranges.
  if ((core::cpu_tier() == core::CpuTier::amx)) {
    at::Tensor qs = at::ones({1, 16, 64}) * 0.5;
    // Keys over three of the kernel's 1024-key chunks (the last one partial), the largest scores
    // in the last chunk.
    at::Tensor ks = at::randn({1, 2500, 64}, generator, f32);
    ks.narrow(1, 2300, 10).mul_(20);
    const at::Tensor vs = at::randn({1, 2500, 64}, generator, f32);
    const at::Tensor ref = multi_head_attention(qs, ks, vs, 1, 0.125, false, int64_t{1} << 30);
    const at::Tensor fused =
        fused_attention_bf16(qs.to(at::kBFloat16), ks.to(at::kBFloat16), vs.to(at::kBFloat16), 1, 0.125);
    EXPECT_LT(max_abs_diff(fused, ref), 0.03 * ref.abs().max().item<double>() + 0.02);
  } else {
    std::printf("note: no AMX-BF16 on this CPU; the fused attention kernel is not exercised\n");
  }
  // upcast (float32 scores) on bfloat16 inputs stays close to the float32 result.
  const at::Tensor bf16 = multi_head_attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16),
                                               heads, scale, true, keys * 5);
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_LT(max_abs_diff(bf16, whole), 0.05);
}

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

// ---- packed AMX products ----------------------------------------------------------------------

// float64 reference of a bfloat16 product, and the tolerance of one bfloat16 rounding of it.
double bf16_tolerance(const at::Tensor& reference) {
  return 0.008 * reference.abs().max().item<double>() + 1e-3;
}

TEST(PackedGemm, SupportedShapesAndPackingRoundTrip) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(21);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!(core::cpu_tier() == core::CpuTier::amx)) {
    EXPECT_FALSE(packed_gemm_supported(64, 64, 3));
    EXPECT_THROW(pack_gemm_weight(at::zeros({64, 64}), at::Tensor()), ArgumentError);
    GTEST_SKIP() << "no AMX-BF16 on this CPU: the packed kernels are not exercised";
  }
  EXPECT_TRUE(packed_gemm_supported(64, 96, 1));
  EXPECT_TRUE(packed_gemm_supported(32, 32, 3));
  EXPECT_FALSE(packed_gemm_supported(48, 64, 1));  // N not a multiple of 32
  EXPECT_FALSE(packed_gemm_supported(64, 4, 3));   // conv_in's 4 channels
  EXPECT_FALSE(packed_gemm_supported(64, 64, 5));
  EXPECT_THROW(pack_gemm_weight(at::zeros({48, 64}), at::Tensor()), ArgumentError);
  EXPECT_THROW(pack_gemm_weight(at::zeros({64, 64}), at::zeros({3})), ArgumentError);
  const at::Tensor linear = at::randn({96, 64}, generator, f32).to(at::kBFloat16);
  EXPECT_TRUE(test::bit_equal(unpack_gemm_weight(*pack_gemm_weight(linear, at::Tensor())), linear));
  // Convolution kernels in either memory order pack as [N, (ky, kx, c)].
  const at::Tensor conv = at::randn({64, 32, 3, 3}, generator, f32).to(at::kBFloat16);
  const at::Tensor as_matrix = conv.permute({0, 2, 3, 1}).reshape({64, -1});
  EXPECT_TRUE(test::bit_equal(unpack_gemm_weight(*pack_gemm_weight(conv, at::Tensor())), as_matrix));
  EXPECT_TRUE(test::bit_equal(
      unpack_gemm_weight(*pack_gemm_weight(conv.contiguous(at::MemoryFormat::ChannelsLast), at::Tensor())),
      as_matrix));
}

TEST(PackedGemm, LinearMatchesFloat64ForAnyRowCountStrideAndResidual) {
  if (!(core::cpu_tier() == core::CpuTier::amx)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  auto generator = at::make_generator<at::CPUGeneratorImpl>(22);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto bf16 = [&](std::vector<int64_t> sizes) {
    return at::randn(sizes, generator, f32).to(at::kBFloat16);
  };
  // Row counts around the 16-row tiles and 32-row blocks, depths of 1-3 (and 20) steps, widths
  // of 1-3 (and 40) blocks: one task, several tasks, chunked reduction (K of 20 steps = 640 > 2 x
  // 16 steps).
  for (const auto& [k, n] :
       std::vector<std::pair<int64_t, int64_t>>{{32, 32}, {96, 64}, {640, 96}, {64, 1280}}) {
    const at::Tensor w = bf16({n, k}) / std::sqrt(static_cast<double>(k));
    const at::Tensor b = bf16({n});
    const auto packed = pack_gemm_weight(w, b);
    for (const int64_t m : {1, 15, 16, 17, 33, 100}) {
      const at::Tensor x = bf16({m, k});
      const at::Tensor ref = at::linear(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
      const at::Tensor y = packed_linear(x, *packed);
      EXPECT_EQ(y.scalar_type(), at::kBFloat16);
      EXPECT_EQ(y.sizes(), ref.sizes());
      EXPECT_LT(max_abs_diff(y, ref), bf16_tolerance(ref)) << "m " << m << " k " << k << " n " << n;
      // Rows with a stride (a view into a wider tensor, like q of a fused qkv product), batched.
      const at::Tensor wide = bf16({m, k + 64});
      const at::Tensor strided = wide.narrow(1, 32, k);
      const at::Tensor ref_strided =
          at::linear(strided.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
      EXPECT_LT(max_abs_diff(packed_linear(strided, *packed), ref_strided), bf16_tolerance(ref_strided));
      // + residual, with one rounding; and in place into an accumulator.
      const at::Tensor residual = bf16({m, n});
      const at::Tensor ref_res = ref + residual.to(at::kDouble);
      EXPECT_LT(max_abs_diff(packed_linear(x, *packed, residual), ref_res), bf16_tolerance(ref_res));
      at::Tensor accumulator = residual.clone();
      packed_linear_into(x, *packed, accumulator);
      EXPECT_TRUE(test::bit_equal(accumulator, packed_linear(x, *packed, residual)));
    }
  }
  // Leading dimensions are kept; no bias.
  const at::Tensor w = bf16({64, 32});
  const auto packed = pack_gemm_weight(w, at::Tensor());
  const at::Tensor x = bf16({2, 3, 5, 32});
  const at::Tensor y = packed_linear(x, *packed);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 5, 64}));
  const at::Tensor ref = at::linear(x.to(at::kDouble), w.to(at::kDouble));
  EXPECT_LT(max_abs_diff(y, ref), bf16_tolerance(ref));
  // Bad input.
  EXPECT_THROW(packed_linear(x.to(at::kFloat), *packed), ArgumentError);
  EXPECT_THROW(packed_linear(bf16({4, 64}), *packed), ArgumentError);
  EXPECT_THROW(packed_linear(bf16({4, 32}), *packed, bf16({4, 32})), ArgumentError);
  at::Tensor wrong = bf16({5, 64});
  EXPECT_THROW(packed_linear_into(bf16({4, 32}), *packed, wrong), ArgumentError);
}

TEST(PackedGemm, GegluProjectionMatchesFloat64) {
  if (!(core::cpu_tier() == core::CpuTier::amx)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  auto generator = at::make_generator<at::CPUGeneratorImpl>(25);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (const auto& [k, inner] : std::vector<std::pair<int64_t, int64_t>>{{32, 16}, {64, 48}, {640, 128}}) {
    const at::Tensor w =
        (at::randn({2 * inner, k}, generator, f32) / std::sqrt(static_cast<double>(k))).to(at::kBFloat16);
    const at::Tensor b = at::randn({2 * inner}, generator, f32).to(at::kBFloat16);
    const at::Tensor x = at::randn({2, 37, k}, generator, f32).to(at::kBFloat16);
    const at::Tensor projected = at::linear(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
    const at::Tensor ref = projected.narrow(-1, 0, inner) * at::gelu(projected.narrow(-1, inner, inner));
    const auto packed = pack_geglu_weight(w, b);
    EXPECT_TRUE(packed->geglu);
    EXPECT_EQ(packed->output_width(), inner);
    const at::Tensor y = packed_linear(x, *packed);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 37, inner}));
    EXPECT_LT(max_abs_diff(y, ref), bf16_tolerance(ref)) << "k " << k << " inner " << inner;
    EXPECT_THROW(packed_linear(x, *packed, y), ArgumentError);
  }
  EXPECT_THROW(pack_geglu_weight(at::zeros({40, 32}), at::Tensor()), ArgumentError);
}

TEST(PackedGemm, ConvolutionsMatchFloat64InBothLayouts) {
  if (!(core::cpu_tier() == core::CpuTier::amx)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  auto generator = at::make_generator<at::CPUGeneratorImpl>(23);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto bf16 = [&](std::vector<int64_t> sizes) {
    return at::randn(sizes, generator, f32).to(at::kBFloat16);
  };
  struct Case {
    int64_t batch, cin, cout, height, width, kernel;
  };
  // Image sizes whose padded rows do (8x8: 80 = 5 tiles) and do not (1x1, 3x5, 6x10) fill whole
  // tiles; an odd tile count per image; enough channels for a chunked reduction (9 x 96 = 27 steps).
  for (const Case& c : {Case{1, 32, 32, 1, 1, 3}, Case{2, 32, 64, 3, 5, 3}, Case{2, 64, 32, 6, 10, 3},
                        Case{2, 96, 96, 8, 8, 3}, Case{3, 32, 32, 9, 7, 3}, Case{2, 64, 96, 6, 10, 1}}) {
    const at::Tensor w =
        bf16({c.cout, c.cin, c.kernel, c.kernel}) / std::sqrt(static_cast<double>(c.cin * 9));
    const at::Tensor b = bf16({c.cout});
    const auto packed = pack_gemm_weight(w, b);
    const at::Tensor x = bf16({c.batch, c.cin, c.height, c.width});
    const int64_t pad = (c.kernel - 1) / 2;
    const at::Tensor ref = at::conv2d(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), 1, pad);
    const at::Tensor residual = bf16({c.batch, c.cout, c.height, c.width});
    const at::Tensor ref_res = ref + residual.to(at::kDouble);
    for (const bool channels_last : {true, false}) {
      const at::Tensor in = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
      const at::Tensor y = packed_conv2d(in, *packed);
      EXPECT_EQ(y.sizes(), ref.sizes());
      EXPECT_EQ(y.is_contiguous(at::MemoryFormat::ChannelsLast),
                channels_last || (c.height == 1 && c.width == 1));
      EXPECT_LT(max_abs_diff(y, ref), bf16_tolerance(ref))
          << c.cin << "->" << c.cout << " " << c.height << "x" << c.width << " k" << c.kernel << " cl "
          << channels_last;
      EXPECT_LT(max_abs_diff(packed_conv2d(in, *packed, residual), ref_res), bf16_tolerance(ref_res));
      // Nearest 2x upsampling fused into the padded copy (Upsample2D).
      const at::Tensor up = at::upsample_nearest2d(x.to(at::kDouble), {2 * c.height, 2 * c.width});
      const at::Tensor ref_up = at::conv2d(up, w.to(at::kDouble), b.to(at::kDouble), 1, pad);
      const at::Tensor y_up = packed_conv2d(in, *packed, at::Tensor(), /*upsample_2x=*/true);
      EXPECT_EQ(y_up.sizes(), ref_up.sizes());
      EXPECT_LT(max_abs_diff(y_up, ref_up), bf16_tolerance(ref_up))
          << "upsampled " << c.height << "x" << c.width;
    }
  }
  const auto packed = pack_gemm_weight(bf16({32, 32, 3, 3}), at::Tensor());
  EXPECT_THROW(packed_conv2d(bf16({1, 16, 4, 4}), *packed), ArgumentError);
  EXPECT_THROW(packed_conv2d(bf16({1, 32, 4, 4}), *packed, bf16({1, 32, 4, 5})), ArgumentError);
}

// A UNet and a VAE whose widths the packed kernels take: packed and oneDNN bfloat16 agree, and
// both stay within the bfloat16 tolerance of float32.
TEST(PackedGemm, PackedModelsMatchUnpackedOnes) {
  if (!(core::cpu_tier() == core::CpuTier::amx)) GTEST_SKIP() << "no AMX-BF16 on this CPU";
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
