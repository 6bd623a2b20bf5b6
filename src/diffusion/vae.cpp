#include "diffusion/vae.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <sstream>

#include "voken/error.h"

namespace voken::diffusion {
namespace {

// The encoder's and decoder's fixed epsilon (diffusers passes resnet_eps=1e-6 everywhere).
constexpr double kVaeNormEps = 1e-6;

std::vector<std::string> string_list(const io::JsonView& json, const std::string& key,
                                     const std::vector<std::string>& fallback) {
  if (!json.has(key)) return fallback;
  const auto& value = json.json().at(key);
  std::vector<std::string> out;
  if (value.is_array())
    for (const auto& item : value)
      if (item.is_string()) out.push_back(item.get<std::string>());
  if (!value.is_array() || out.size() != value.size() || out.empty())
    throw ConfigError(json.source() + ": field '" + key + "' must be a non-empty list of strings, found " +
                      value.dump());
  return out;
}

std::vector<int64_t> int_list(const io::JsonView& json, const std::string& key,
                              const std::vector<int64_t>& fallback) {
  if (!json.has(key)) return fallback;
  const auto& value = json.json().at(key);
  std::vector<int64_t> out;
  if (value.is_array())
    for (const auto& item : value)
      if (item.is_number_integer()) out.push_back(item.get<int64_t>());
  if (!value.is_array() || out.size() != value.size() || out.empty())
    throw ConfigError(json.source() + ": field '" + key + "' must be a non-empty list of integers, found " +
                      value.dump());
  return out;
}

std::string shape_string(const at::Tensor& tensor) {
  std::ostringstream out;
  out << tensor.sizes();
  return out.str();
}

void check_input(const at::Tensor& x, int64_t channels, const std::string& what) {
  if (!x.defined() || x.dim() != 4 || x.size(1) != channels || x.size(0) < 1 || x.size(2) < 1 ||
      x.size(3) < 1 || !at::isFloatingType(x.scalar_type()))
    throw ArgumentError("AutoencoderKL: " + what + " must be a float tensor [B, " + std::to_string(channels) +
                        ", H, W], got " +
                        (x.defined() ? shape_string(x) : std::string("an undefined tensor")));
  if (!at::isfinite(x).all().item<bool>())
    throw ArgumentError("AutoencoderKL: " + what + " contains NaN or Inf");
}

}  // namespace

VaeConfig VaeConfig::from_json(const io::JsonView& json) {
  if (!json.json().is_object()) throw ConfigError(json.source() + ": expected a JSON object");
  if (json.has("_class_name") && json.get<std::string>("_class_name") != "AutoencoderKL")
    throw ConfigError(json.source() + ": field '_class_name' = '" + json.get<std::string>("_class_name") +
                      "' is not supported (expected 'AutoencoderKL')");
  VaeConfig config;
  config.in_channels = json.get_or<int64_t>("in_channels", config.in_channels);
  config.out_channels = json.get_or<int64_t>("out_channels", config.out_channels);
  config.down_block_types = string_list(json, "down_block_types", config.down_block_types);
  config.up_block_types = string_list(json, "up_block_types", config.up_block_types);
  config.block_out_channels = int_list(json, "block_out_channels", config.block_out_channels);
  config.layers_per_block = json.get_or<int64_t>("layers_per_block", config.layers_per_block);
  config.act_fn = json.get_or<std::string>("act_fn", config.act_fn);
  config.latent_channels = json.get_or<int64_t>("latent_channels", config.latent_channels);
  config.norm_num_groups = json.get_or<int64_t>("norm_num_groups", config.norm_num_groups);
  config.scaling_factor = json.get_or<double>("scaling_factor", config.scaling_factor);
  if (json.has("shift_factor")) config.shift_factor = json.get<double>("shift_factor");
  config.use_quant_conv = json.get_or<bool>("use_quant_conv", config.use_quant_conv);
  config.use_post_quant_conv = json.get_or<bool>("use_post_quant_conv", config.use_post_quant_conv);
  config.mid_block_add_attention =
      json.get_or<bool>("mid_block_add_attention", config.mid_block_add_attention);
  // Accepted without effect on encode/decode, as upstream: sample_size (tiling), force_upcast
  // (fp16), latents_mean / latents_std (used by some pipelines, not by the model).
  config.validate(json.source());
  return config;
}

VaeConfig VaeConfig::load(const std::string& config_path) {
  const io::Json json = io::read_json_file(config_path);
  return from_json(io::JsonView(json, config_path));
}

void VaeConfig::validate(const std::string& source) const {
  const auto fail = [&](const std::string& message) { throw ConfigError(source + ": " + message); };
  const std::size_t n = block_out_channels.size();
  if (n == 0) fail("field 'block_out_channels' is empty");
  if (down_block_types.size() != n)
    fail("field 'down_block_types' has " + std::to_string(down_block_types.size()) +
         " entries but block_out_channels has " + std::to_string(n));
  if (up_block_types.size() != n)
    fail("field 'up_block_types' has " + std::to_string(up_block_types.size()) +
         " entries but block_out_channels has " + std::to_string(n));
  for (const auto& type : down_block_types)
    if (type != "DownEncoderBlock2D")
      fail("field 'down_block_types' has unsupported block type '" + type + "' (DownEncoderBlock2D)");
  for (const auto& type : up_block_types)
    if (type != "UpDecoderBlock2D")
      fail("field 'up_block_types' has unsupported block type '" + type + "' (UpDecoderBlock2D)");
  const auto positive = [&](const std::string& field, int64_t value) {
    if (value <= 0) fail("field '" + field + "' must be positive, found " + std::to_string(value));
  };
  positive("in_channels", in_channels);
  positive("out_channels", out_channels);
  positive("latent_channels", latent_channels);
  positive("layers_per_block", layers_per_block);
  positive("norm_num_groups", norm_num_groups);
  for (const int64_t c : block_out_channels) {
    positive("block_out_channels", c);
    if (c % norm_num_groups != 0)
      fail("block_out_channels entry " + std::to_string(c) + " is not divisible by norm_num_groups " +
           std::to_string(norm_num_groups));
  }
  if (!activation_from_name(act_fn))
    fail("field 'act_fn' = '" + act_fn + "' is not supported (silu, swish, gelu, relu, mish)");
  if (!(scaling_factor > 0)) fail("field 'scaling_factor' must be positive");
}

at::Tensor VaePosterior::std() const { return at::exp(logvar * 0.5); }

at::Tensor VaePosterior::sample(const at::Tensor& noise) const {
  if (!noise.defined() || !noise.sizes().equals(mean.sizes()))
    throw ArgumentError("VaePosterior::sample: noise must have the shape of the mean " + shape_string(mean) +
                        ", got " +
                        (noise.defined() ? shape_string(noise) : std::string("an undefined tensor")));
  return mean + std() * noise.to(at::kFloat);
}

AutoencoderKL::AutoencoderKL(const VaeConfig& config, io::WeightLoader& weights,
                             const ComputeOptions& options)
    : config_(config), options_(options) {
  c10::InferenceMode guard;
  config.validate();
  const bool cl = options.channels_last;
  const auto& channels = config.block_out_channels;
  const std::size_t n = channels.size();
  const int64_t latent = config.latent_channels;

  ResnetSettings resnet;
  resnet.groups = config.norm_num_groups;
  resnet.eps = kVaeNormEps;
  resnet.activation = *activation_from_name(config.act_fn);
  resnet.channels_last = cl;

  const auto load_mid = [&](const std::string& prefix) {
    MidBlock mid;
    const int64_t width = channels[n - 1];
    mid.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets.0.", width, width, resnet));
    // attention_head_dim = the block width: a single head.
    if (config.mid_block_add_attention)
      mid.attentions.push_back(SpatialSelfAttention::load(weights, prefix + "attentions.0.", width,
                                                          /*heads=*/1, config.norm_num_groups, kVaeNormEps));
    mid.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets.1.", width, width, resnet));
    return mid;
  };

  // Encoder.
  encoder_conv_in_ = Conv2d::load(weights, "encoder.conv_in.", config.in_channels, channels[0], 3, 1, 1, cl);
  dtype_ = encoder_conv_in_.weight.scalar_type();
  if (dtype_ == at::kHalf)
    throw ArgumentError(
        "AutoencoderKL: float16 compute is not supported on CPU; load as float32 or bfloat16");
  int64_t out_channel = channels[0];
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t in_channel = out_channel;
    out_channel = channels[i];
    const std::string prefix = "encoder.down_blocks." + std::to_string(i) + ".";
    Stage stage;
    for (int64_t j = 0; j < config.layers_per_block; ++j)
      stage.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets." + std::to_string(j) + ".",
                                                  j == 0 ? in_channel : out_channel, out_channel, resnet));
    if (i + 1 < n)
      stage.downsampler =
          Downsample2D::load(weights, prefix + "downsamplers.0.", out_channel, /*padding=*/0, cl);
    encoder_blocks_.push_back(std::move(stage));
  }
  encoder_mid_ = load_mid("encoder.mid_block.");
  encoder_norm_out_ = GroupNorm::load(weights, "encoder.conv_norm_out.", channels[n - 1],
                                      config.norm_num_groups, kVaeNormEps);
  encoder_conv_out_ = Conv2d::load(weights, "encoder.conv_out.", channels[n - 1], 2 * latent, 3, 1, 1, cl);
  if (config.use_quant_conv)
    quant_conv_ = Conv2d::load(weights, "quant_conv.", 2 * latent, 2 * latent, 1, 1, 0, cl);

  // Decoder.
  if (config.use_post_quant_conv)
    post_quant_conv_ = Conv2d::load(weights, "post_quant_conv.", latent, latent, 1, 1, 0, cl);
  decoder_conv_in_ = Conv2d::load(weights, "decoder.conv_in.", latent, channels[n - 1], 3, 1, 1, cl);
  decoder_mid_ = load_mid("decoder.mid_block.");
  out_channel = channels[n - 1];
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t in_channel = out_channel;
    out_channel = channels[n - 1 - i];
    const std::string prefix = "decoder.up_blocks." + std::to_string(i) + ".";
    Stage stage;
    for (int64_t j = 0; j < config.layers_per_block + 1; ++j)
      stage.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets." + std::to_string(j) + ".",
                                                  j == 0 ? in_channel : out_channel, out_channel, resnet));
    if (i + 1 < n) stage.upsampler = Upsample2D::load(weights, prefix + "upsamplers.0.", out_channel, cl);
    decoder_blocks_.push_back(std::move(stage));
  }
  decoder_norm_out_ =
      GroupNorm::load(weights, "decoder.conv_norm_out.", channels[0], config.norm_num_groups, kVaeNormEps);
  decoder_conv_out_ =
      Conv2d::load(weights, "decoder.conv_out.", channels[0], config.out_channels, 3, 1, 1, cl);
  // Weights in the AMX kernels' tile order where the CPU and the shapes allow.
  if (options.packed_weights) {
    const auto pack_mid = [](MidBlock& mid) {
      for (auto& r : mid.resnets) r.pack();
      for (auto& a : mid.attentions) a.pack();
    };
    for (auto* stages : {&encoder_blocks_, &decoder_blocks_})
      for (auto& stage : *stages) {
        for (auto& r : stage.resnets) r.pack();
        if (stage.downsampler) stage.downsampler->pack();
        if (stage.upsampler) stage.upsampler->pack();
      }
    pack_mid(encoder_mid_);
    pack_mid(decoder_mid_);
    for (auto* conv : {&encoder_conv_in_, &encoder_conv_out_, &decoder_conv_in_, &decoder_conv_out_})
      conv->pack();
    if (quant_conv_) quant_conv_->pack();
    if (post_quant_conv_) post_quant_conv_->pack();
  }
}

AutoencoderKL AutoencoderKL::load(const std::string& dir, std::optional<at::ScalarType> float_dtype,
                                  const ComputeOptions& options) {
  const VaeConfig config = VaeConfig::load(dir + "/config.json");
  io::WeightOptions weight_options;
  weight_options.float_dtype = float_dtype;
  io::WeightLoader loader(io::StateDict::load(dir), weight_options, "AutoencoderKL (" + dir + ")");
  AutoencoderKL vae(config, loader, options);
  loader.finish();
  return vae;
}

at::Tensor AutoencoderKL::MidBlock::operator()(const at::Tensor& x, const ComputeOptions& options) const {
  at::Tensor h = resnets[0](x, {});
  if (!attentions.empty()) h = attentions[0](h, options);
  return resnets[1](h, {});
}

VaePosterior AutoencoderKL::encode(const at::Tensor& image) const {
  c10::InferenceMode guard;
  check_input(image, config_.in_channels, "image");
  at::Tensor x = encoder_conv_in_(to_layout(image.to(dtype_), options_.channels_last));
  for (const auto& stage : encoder_blocks_) {
    for (const auto& resnet : stage.resnets) x = resnet(x, {});
    if (stage.downsampler) x = to_layout((*stage.downsampler)(x), options_.channels_last);
  }
  x = encoder_mid_(x, options_);
  // The encoder's output activation is SiLU whatever act_fn says (diffusers' Encoder.conv_act).
  x = encoder_conv_out_(encoder_norm_out_(x, Activation::Silu));
  if (quant_conv_) x = (*quant_conv_)(x);
  const auto moments = x.to(at::kFloat).chunk(2, 1);
  VaePosterior posterior;
  posterior.mean = moments[0].contiguous();
  posterior.logvar = at::clamp(moments[1], -30.0, 20.0).contiguous();
  return posterior;
}

at::Tensor AutoencoderKL::decode(const at::Tensor& latents) const {
  c10::InferenceMode guard;
  check_input(latents, config_.latent_channels, "latents");
  at::Tensor x = to_layout(latents.to(dtype_), options_.channels_last);
  if (post_quant_conv_) x = (*post_quant_conv_)(x);
  x = decoder_mid_(decoder_conv_in_(x), options_);
  for (const auto& stage : decoder_blocks_) {
    for (const auto& resnet : stage.resnets) x = resnet(x, {});
    if (stage.upsampler) x = (*stage.upsampler)(x, std::nullopt);
  }
  x = decoder_conv_out_(decoder_norm_out_(x, Activation::Silu));
  return x.to(at::kFloat).contiguous();
}

}  // namespace voken::diffusion
