#include "diffusion/unet.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <set>
#include <sstream>

#include "core/inplace_gemm.h"
#include "core/norm_kernels.h"
#include "voken/error.h"

namespace voken::diffusion {
namespace {

std::string join(const std::vector<int64_t>& values) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

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

// An int, or a list of ints with one entry per block; an int is repeated `count` times.
std::vector<int64_t> per_block_ints(const io::JsonView& json, const std::string& key, std::size_t count,
                                    const std::vector<int64_t>& fallback) {
  if (!json.has(key)) {
    if (fallback.size() == 1) return std::vector<int64_t>(count, fallback[0]);
    if (fallback.size() != count)
      throw ConfigError(json.source() + ": field '" + key + "' is absent and its default has " +
                        std::to_string(fallback.size()) + " entries, but there are " + std::to_string(count) +
                        " blocks");
    return fallback;
  }
  const auto& value = json.json().at(key);
  if (value.is_number_integer()) return std::vector<int64_t>(count, value.get<int64_t>());
  std::vector<int64_t> out;
  if (value.is_array())
    for (const auto& item : value)
      if (item.is_number_integer()) out.push_back(item.get<int64_t>());
  if (!value.is_array() || out.size() != value.size())
    throw ConfigError(json.source() + ": field '" + key +
                      "' must be an integer or a list of integers, found " + value.dump());
  if (out.size() != count)
    throw ConfigError(json.source() + ": field '" + key + "' has " + std::to_string(out.size()) +
                      " entries but down_block_types has " + std::to_string(count));
  return out;
}

std::vector<bool> per_block_bools(const io::JsonView& json, const std::string& key, std::size_t count) {
  if (!json.has(key)) return std::vector<bool>(count, false);
  const auto& value = json.json().at(key);
  if (value.is_boolean()) return std::vector<bool>(count, value.get<bool>());
  std::vector<bool> out;
  if (value.is_array())
    for (const auto& item : value)
      if (item.is_boolean()) out.push_back(item.get<bool>());
  if (!value.is_array() || out.size() != value.size() || out.size() != count)
    throw ConfigError(json.source() + ": field '" + key + "' must be a boolean or a list of " +
                      std::to_string(count) + " booleans, found " + value.dump());
  return out;
}

std::optional<std::string> optional_string(const io::JsonView& json, const std::string& key) {
  if (!json.has(key)) return std::nullopt;
  return json.get<std::string>(key);
}

// Fields that select features this implementation does not build: they must be absent, null or
// hold upstream's default.
void refuse_unsupported(const io::JsonView& json) {
  const auto refuse = [&](const std::string& key, const std::string& why) {
    throw ConfigError(json.source() + ": field '" + key + "' = " + json.json().at(key).dump() +
                      " is not supported (" + why + ")");
  };
  for (const char* key :
       {"class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim",
        "encoder_hid_dim_type", "time_cond_proj_dim", "reverse_transformer_layers_per_block"})
    if (json.has(key)) refuse(key, "only null is implemented: SD 1.x/2.x UNets do not use it");
  if (json.has("num_attention_heads"))
    refuse("num_attention_heads",
           "diffusers v0.31 refuses it too; the head count is given by attention_head_dim");
  if (json.has("dual_cross_attention") && json.get<bool>("dual_cross_attention"))
    refuse("dual_cross_attention", "only false is implemented");
  if (json.has("time_embedding_type") && json.get<std::string>("time_embedding_type") != "positional")
    refuse("time_embedding_type", "only 'positional' is implemented");
  if (json.has("attention_type") && json.get<std::string>("attention_type") != "default")
    refuse("attention_type", "only 'default' is implemented");
  if (json.has("_class_name") && json.get<std::string>("_class_name") != "UNet2DConditionModel")
    refuse("_class_name", "expected 'UNet2DConditionModel'");
}

void check_activation(const std::string& source, const std::string& field, const std::string& name) {
  if (!activation_from_name(name))
    throw ConfigError(source + ": field '" + field + "' = '" + name +
                      "' is not supported (silu, swish, gelu, relu, mish)");
}

void check_finite(const at::Tensor& tensor, const std::string& what) {
  if (at::isFloatingType(tensor.scalar_type()) && !at::isfinite(tensor).all().item<bool>())
    throw ArgumentError("UNet2DCondition: " + what + " contains NaN or Inf");
}

std::string shape_string(const at::Tensor& tensor) {
  std::vector<int64_t> sizes(tensor.sizes().begin(), tensor.sizes().end());
  return join(sizes);
}

}  // namespace

UNetConfig UNetConfig::from_json(const io::JsonView& json) {
  if (!json.json().is_object()) throw ConfigError(json.source() + ": expected a JSON object");
  refuse_unsupported(json);
  UNetConfig config;
  config.in_channels = json.get_or<int64_t>("in_channels", config.in_channels);
  config.out_channels = json.get_or<int64_t>("out_channels", config.out_channels);
  config.center_input_sample = json.get_or<bool>("center_input_sample", config.center_input_sample);
  config.flip_sin_to_cos = json.get_or<bool>("flip_sin_to_cos", config.flip_sin_to_cos);
  config.freq_shift = json.get_or<double>("freq_shift", config.freq_shift);
  config.down_block_types = string_list(json, "down_block_types", config.down_block_types);
  config.up_block_types = string_list(json, "up_block_types", config.up_block_types);
  // An explicit null means "no mid block"; absent means upstream's default.
  if (json.json().contains("mid_block_type")) config.mid_block_type = optional_string(json, "mid_block_type");
  const std::size_t blocks = config.down_block_types.size();
  config.block_out_channels = per_block_ints(json, "block_out_channels", blocks, config.block_out_channels);
  config.only_cross_attention = per_block_bools(json, "only_cross_attention", blocks);
  config.layers_per_block = per_block_ints(json, "layers_per_block", blocks, {2});
  config.downsample_padding = json.get_or<int64_t>("downsample_padding", config.downsample_padding);
  config.mid_block_scale_factor =
      json.get_or<double>("mid_block_scale_factor", config.mid_block_scale_factor);
  config.act_fn = json.get_or<std::string>("act_fn", config.act_fn);
  if (json.json().contains("norm_num_groups") && json.json().at("norm_num_groups").is_null())
    throw ConfigError(json.source() + ": field 'norm_num_groups' = null is not supported (SD uses 32)");
  config.norm_num_groups = json.get_or<int64_t>("norm_num_groups", config.norm_num_groups);
  config.norm_eps = json.get_or<double>("norm_eps", config.norm_eps);
  config.cross_attention_dim = per_block_ints(json, "cross_attention_dim", blocks, {1280});
  if (json.has("transformer_layers_per_block") && json.json().at("transformer_layers_per_block").is_array())
    for (const auto& item : json.json().at("transformer_layers_per_block"))
      if (item.is_array())
        throw ConfigError(
            json.source() +
            ": field 'transformer_layers_per_block' with nested lists (asymmetric UNets) is not "
            "supported");
  config.transformer_layers_per_block = per_block_ints(json, "transformer_layers_per_block", blocks, {1});
  config.attention_head_dim = per_block_ints(json, "attention_head_dim", blocks, {8});
  config.use_linear_projection = json.get_or<bool>("use_linear_projection", config.use_linear_projection);
  config.upcast_attention = json.get_or<bool>("upcast_attention", config.upcast_attention);
  config.resnet_time_scale_shift = json.get_or<std::string>("resnet_time_scale_shift", "default");
  config.resnet_skip_time_act = json.get_or<bool>("resnet_skip_time_act", config.resnet_skip_time_act);
  if (json.has("time_embedding_dim")) config.time_embedding_dim = json.get<int64_t>("time_embedding_dim");
  config.time_embedding_act_fn = optional_string(json, "time_embedding_act_fn");
  config.timestep_post_act = optional_string(json, "timestep_post_act");
  config.conv_in_kernel = json.get_or<int64_t>("conv_in_kernel", config.conv_in_kernel);
  config.conv_out_kernel = json.get_or<int64_t>("conv_out_kernel", config.conv_out_kernel);
  // Accepted and without effect here, as in upstream for these block types: sample_size, dropout
  // (inference), resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention,
  // class_embeddings_concat, addition_* sizes, projection_class_embeddings_input_dim.
  config.validate(json.source());
  return config;
}

UNetConfig UNetConfig::load(const std::string& config_path) {
  const io::Json json = io::read_json_file(config_path);
  return from_json(io::JsonView(json, config_path));
}

void UNetConfig::validate(const std::string& source) const {
  const auto fail = [&](const std::string& message) { throw ConfigError(source + ": " + message); };
  const std::size_t n = block_out_channels.size();
  if (n == 0) fail("field 'block_out_channels' is empty");
  if (down_block_types.size() != n)
    fail("field 'down_block_types' has " + std::to_string(down_block_types.size()) +
         " entries but block_out_channels has " + std::to_string(n));
  if (up_block_types.size() != n)
    fail("field 'up_block_types' has " + std::to_string(up_block_types.size()) +
         " entries but down_block_types has " + std::to_string(n));
  const auto check_size = [&](const char* field, std::size_t size) {
    if (size != n)
      fail(std::string("field '") + field + "' has " + std::to_string(size) + " entries for " +
           std::to_string(n) + " blocks");
  };
  check_size("layers_per_block", layers_per_block.size());
  check_size("cross_attention_dim", cross_attention_dim.size());
  check_size("transformer_layers_per_block", transformer_layers_per_block.size());
  check_size("attention_head_dim", attention_head_dim.size());
  check_size("only_cross_attention", only_cross_attention.size());
  for (const auto& type : down_block_types)
    if (type != "CrossAttnDownBlock2D" && type != "DownBlock2D")
      fail("field 'down_block_types' has unsupported block type '" + type +
           "' (CrossAttnDownBlock2D, DownBlock2D)");
  for (const auto& type : up_block_types)
    if (type != "CrossAttnUpBlock2D" && type != "UpBlock2D")
      fail("field 'up_block_types' has unsupported block type '" + type +
           "' (CrossAttnUpBlock2D, UpBlock2D)");
  if (mid_block_type && *mid_block_type != "UNetMidBlock2DCrossAttn")
    fail("field 'mid_block_type' has unsupported block type '" + *mid_block_type +
         "' (UNetMidBlock2DCrossAttn or null)");
  const auto positive = [&](const char* field, int64_t value) {
    if (value <= 0)
      fail(std::string("field '") + field + "' must be positive, found " + std::to_string(value));
  };
  positive("in_channels", in_channels);
  positive("out_channels", out_channels);
  positive("norm_num_groups", norm_num_groups);
  positive("downsample_padding", downsample_padding + 1);
  for (std::size_t i = 0; i < n; ++i) {
    positive("block_out_channels", block_out_channels[i]);
    positive("layers_per_block", layers_per_block[i]);
    positive("cross_attention_dim", cross_attention_dim[i]);
    positive("transformer_layers_per_block", transformer_layers_per_block[i]);
    positive("attention_head_dim", attention_head_dim[i]);
    if (block_out_channels[i] % norm_num_groups != 0)
      fail("block_out_channels " + join(block_out_channels) + " are not all divisible by norm_num_groups " +
           std::to_string(norm_num_groups));
  }
  // Heads must divide the width of every transformer: down block i and up block n-1-i share
  // block_out_channels[i] and attention_head_dim[i]; the mid block uses the last entries.
  for (std::size_t i = 0; i < n; ++i) {
    const bool down_attn = down_block_types[i] == "CrossAttnDownBlock2D";
    const bool up_attn = up_block_types[n - 1 - i] == "CrossAttnUpBlock2D";
    const bool mid_attn = mid_block_type && i == n - 1;
    if ((down_attn || up_attn || mid_attn) && block_out_channels[i] % attention_head_dim[i] != 0)
      fail("block_out_channels[" + std::to_string(i) + "] = " + std::to_string(block_out_channels[i]) +
           " is not divisible by attention_head_dim[" + std::to_string(i) +
           "] = " + std::to_string(attention_head_dim[i]) + " (the number of heads)");
  }
  if (!(norm_eps > 0)) fail("field 'norm_eps' must be positive, found " + std::to_string(norm_eps));
  if (downsample_padding < 0) fail("field 'downsample_padding' must be >= 0");
  if (resnet_time_scale_shift != "default" && resnet_time_scale_shift != "scale_shift")
    fail("field 'resnet_time_scale_shift' = '" + resnet_time_scale_shift +
         "' is not supported (default, scale_shift)");
  check_activation(source, "act_fn", act_fn);
  if (time_embedding_act_fn) check_activation(source, "time_embedding_act_fn", *time_embedding_act_fn);
  if (timestep_post_act) check_activation(source, "timestep_post_act", *timestep_post_act);
  if (time_embedding_dim) positive("time_embedding_dim", *time_embedding_dim);
  for (const auto& [field, kernel] : {std::pair<const char*, int64_t>{"conv_in_kernel", conv_in_kernel},
                                      std::pair<const char*, int64_t>{"conv_out_kernel", conv_out_kernel}})
    if (kernel <= 0 || kernel % 2 == 0)
      fail(std::string("field '") + field + "' must be a positive odd number, found " +
           std::to_string(kernel));
  if (block_out_channels[0] < 2) fail("block_out_channels[0] must be at least 2 (timestep embedding width)");
}

UNet2DCondition::UNet2DCondition(const UNetConfig& config, io::WeightLoader& weights,
                                 const ComputeOptions& options)
    : config_(config), options_(options) {
  c10::InferenceMode guard;
  config.validate();
  const bool cl = options.channels_last;
  const auto& channels = config.block_out_channels;
  const std::size_t n = channels.size();
  activation_ = *activation_from_name(config.act_fn);
  if (config.time_embedding_act_fn) time_embedding_act_ = activation_from_name(*config.time_embedding_act_fn);
  if (config.timestep_post_act) timestep_post_act_ = activation_from_name(*config.timestep_post_act);

  conv_in_ = Conv2d::load(weights, "conv_in.", config.in_channels, channels[0], config.conv_in_kernel, 1,
                          (config.conv_in_kernel - 1) / 2, cl);
  dtype_ = conv_in_.weight.scalar_type();
  if (dtype_ == at::kHalf)
    throw ArgumentError(
        "UNet2DCondition: float16 compute is not supported on CPU; load as float32 or bfloat16");

  const int64_t temb = config.time_embed_dim();
  time_linear_1_ = Linear::load(weights, "time_embedding.linear_1.", channels[0], temb, true);
  time_linear_2_ = Linear::load(weights, "time_embedding.linear_2.", temb, temb, true);

  ResnetSettings resnet;
  resnet.groups = config.norm_num_groups;
  resnet.eps = config.norm_eps;
  resnet.activation = activation_;
  resnet.temb_channels = temb;
  resnet.time_embedding_norm = config.resnet_time_scale_shift == "scale_shift" ? TimeEmbeddingNorm::ScaleShift
                                                                               : TimeEmbeddingNorm::Default;
  resnet.skip_time_act = config.resnet_skip_time_act;
  resnet.channels_last = cl;

  const auto transformer_settings = [&](std::size_t block, int64_t width, int64_t layers, bool only_cross) {
    TransformerSettings s;
    s.heads = config.heads(block);
    s.head_dim = width / s.heads;
    s.num_layers = layers;
    s.cross_attention_dim = config.cross_attention_dim[block];
    s.norm_num_groups = config.norm_num_groups;
    s.use_linear_projection = config.use_linear_projection;
    s.only_cross_attention = only_cross;
    s.upcast_attention = config.upcast_attention;
    return s;
  };

  std::set<int64_t> context_dims;
  const auto note_context = [&](const std::vector<Transformer2D>& attentions) {
    for (const auto& attn : attentions) context_dims.insert(attn.context_dim());
  };

  // Down blocks.
  int64_t out_channel = channels[0];
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t in_channel = out_channel;
    out_channel = channels[i];
    const std::string prefix = "down_blocks." + std::to_string(i) + ".";
    const bool cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
    DownBlock block;
    for (int64_t j = 0; j < config.layers_per_block[i]; ++j) {
      block.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets." + std::to_string(j) + ".",
                                                  j == 0 ? in_channel : out_channel, out_channel, resnet));
      if (cross)
        block.attentions.push_back(
            Transformer2D::load(weights, prefix + "attentions." + std::to_string(j) + ".", out_channel,
                                transformer_settings(i, out_channel, config.transformer_layers_per_block[i],
                                                     config.only_cross_attention[i])));
    }
    if (i + 1 < n)
      block.downsampler =
          Downsample2D::load(weights, prefix + "downsamplers.0.", out_channel, config.downsample_padding, cl);
    note_context(block.attentions);
    down_blocks_.push_back(std::move(block));
  }

  // Mid block: upstream passes neither only_cross_attention nor a layer count (one layer).
  if (config.mid_block_type) {
    MidBlock mid;
    ResnetSettings mid_resnet = resnet;
    mid_resnet.output_scale_factor = config.mid_block_scale_factor;
    const int64_t width = channels[n - 1];
    mid.resnets.push_back(ResnetBlock2D::load(weights, "mid_block.resnets.0.", width, width, mid_resnet));
    mid.attentions.push_back(Transformer2D::load(
        weights, "mid_block.attentions.0.", width,
        transformer_settings(n - 1, width, config.transformer_layers_per_block[n - 1], false)));
    mid.resnets.push_back(ResnetBlock2D::load(weights, "mid_block.resnets.1.", width, width, mid_resnet));
    note_context(mid.attentions);
    mid_block_ = std::move(mid);
  }

  // Up blocks: block i mirrors down block n-1-i.
  out_channel = channels[n - 1];
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t mirror = n - 1 - i;
    const int64_t prev_output_channel = out_channel;
    out_channel = channels[mirror];
    const int64_t in_channel = channels[mirror == 0 ? 0 : mirror - 1];
    const std::string prefix = "up_blocks." + std::to_string(i) + ".";
    const bool cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
    const int64_t layers = config.layers_per_block[mirror] + 1;
    UpBlock block;
    for (int64_t j = 0; j < layers; ++j) {
      const int64_t skip_channels = j == layers - 1 ? in_channel : out_channel;
      const int64_t resnet_in = j == 0 ? prev_output_channel : out_channel;
      block.resnets.push_back(ResnetBlock2D::load(weights, prefix + "resnets." + std::to_string(j) + ".",
                                                  resnet_in + skip_channels, out_channel, resnet));
      if (cross)
        block.attentions.push_back(Transformer2D::load(
            weights, prefix + "attentions." + std::to_string(j) + ".", out_channel,
            transformer_settings(mirror, out_channel, config.transformer_layers_per_block[mirror],
                                 config.only_cross_attention[mirror])));
    }
    if (i + 1 < n) block.upsampler = Upsample2D::load(weights, prefix + "upsamplers.0.", out_channel, cl);
    note_context(block.attentions);
    up_blocks_.push_back(std::move(block));
  }

  conv_norm_out_ =
      GroupNorm::load(weights, "conv_norm_out.", channels[0], config.norm_num_groups, config.norm_eps);
  conv_out_ = Conv2d::load(weights, "conv_out.", channels[0], config.out_channels, config.conv_out_kernel, 1,
                           (config.conv_out_kernel - 1) / 2, cl);

  // One product for all time embedding projections per step instead of one tiny matrix product
  // per resnet (see project_time).
  std::vector<ResnetBlock2D*> resnets;
  for (auto& block : down_blocks_)
    for (auto& r : block.resnets) resnets.push_back(&r);
  if (mid_block_)
    for (auto& r : mid_block_->resnets) resnets.push_back(&r);
  for (auto& block : up_blocks_)
    for (auto& r : block.resnets) resnets.push_back(&r);
  std::vector<at::Tensor> proj_weights, proj_biases;
  for (const auto* r : resnets) {
    proj_weights.push_back(r->time_emb_proj->weight);
    proj_biases.push_back(r->time_emb_proj->bias);
  }
  time_proj_weight_ = at::cat(proj_weights, 0).contiguous();
  time_proj_bias_ = at::cat(proj_biases, 0).to(at::kFloat).contiguous();
  int64_t offset = 0;
  for (auto* r : resnets) {
    const int64_t width = r->time_emb_proj->weight.size(0);
    r->time_emb_proj->weight = time_proj_weight_.narrow(0, offset, width);
    time_proj_offsets_.push_back(offset);
    offset += width;
  }

  // Weights in the AMX kernels' tile order (time_emb_proj excluded: batched above).
  if (options.packed_weights) {
    for (auto& block : down_blocks_) {
      for (auto& r : block.resnets) r.pack();
      for (auto& a : block.attentions) a.pack();
      if (block.downsampler) block.downsampler->pack();
    }
    if (mid_block_) {
      for (auto& r : mid_block_->resnets) r.pack();
      for (auto& a : mid_block_->attentions) a.pack();
    }
    for (auto& block : up_blocks_) {
      for (auto& r : block.resnets) r.pack();
      for (auto& a : block.attentions) a.pack();
      if (block.upsampler) block.upsampler->pack();
    }
    conv_in_.pack();
    conv_out_.pack();
  }

  if (context_dims.size() > 1) {
    std::vector<int64_t> dims(context_dims.begin(), context_dims.end());
    throw ConfigError("UNet2DCondition: cross-attention layers expect different context widths " +
                      join(dims) + " (cross_attention_dim); one encoder_hidden_states cannot feed them all");
  }
  if (!context_dims.empty()) context_dim_ = *context_dims.begin();
}

UNet2DCondition UNet2DCondition::load(const std::string& dir, std::optional<at::ScalarType> float_dtype,
                                      const ComputeOptions& options) {
  const UNetConfig config = UNetConfig::load(dir + "/config.json");
  io::WeightOptions weight_options;
  weight_options.float_dtype = float_dtype;
  io::WeightLoader loader(io::StateDict::load(dir), weight_options, "UNet2DConditionModel (" + dir + ")");
  UNet2DCondition unet(config, loader, options);
  loader.finish();
  return unet;
}

at::Tensor UNet2DCondition::time_embedding(const at::Tensor& timestep, int64_t batch) const {
  // A single timestep is broadcast over the batch, as upstream's timesteps.expand(batch).
  at::Tensor t = timestep.reshape({-1});
  if (t.size(0) == 1 && batch != 1) t = t.expand({batch});
  const at::Tensor sinusoid =
      timestep_embedding(t, config_.block_out_channels[0], config_.flip_sin_to_cos, config_.freq_shift)
          .to(dtype_);
  at::Tensor emb = time_linear_2_(activate(time_linear_1_(sinusoid), activation_));
  if (timestep_post_act_) emb = activate(emb, *timestep_post_act_);
  if (time_embedding_act_) emb = activate(emb, *time_embedding_act_);
  return emb;
}

at::Tensor UNet2DCondition::project_time(const at::Tensor& emb) const {
  const at::Tensor act = config_.resnet_skip_time_act ? emb : activate(emb, activation_);
  if (time_proj_weight_.scalar_type() == at::kBFloat16 && act.size(0) <= 8)
    return core::few_rows_linear_bf16(act.to(at::kFloat), time_proj_weight_, time_proj_bias_);
  // CPUs without AVX-512 (no few-row kernel): the in-place GEMM, float32 out as above.
  if (time_proj_weight_.scalar_type() == at::kBFloat16 && core::inplace_gemm_supported())
    return core::inplace_linear(act, time_proj_weight_, time_proj_bias_, at::kFloat);
  return at::linear(act, time_proj_weight_, time_proj_bias_.to(act.scalar_type()));
}

at::Tensor UNet2DCondition::forward(const at::Tensor& sample, double timestep,
                                    const at::Tensor& encoder_hidden_states) const {
  return forward(sample, at::scalar_tensor(timestep, at::TensorOptions().dtype(at::kDouble)),
                 encoder_hidden_states);
}

at::Tensor UNet2DCondition::forward(const at::Tensor& sample, const at::Tensor& timestep,
                                    const at::Tensor& encoder_hidden_states) const {
  c10::InferenceMode guard;
  // Inputs.
  if (!sample.defined() || sample.dim() != 4 || sample.size(1) != config_.in_channels || sample.size(0) < 1 ||
      sample.size(2) < 1 || sample.size(3) < 1 || !at::isFloatingType(sample.scalar_type()))
    throw ArgumentError("UNet2DCondition: sample must be a float tensor [B, " +
                        std::to_string(config_.in_channels) + ", H, W], got " +
                        (sample.defined()
                             ? shape_string(sample) + " " + std::string(c10::toString(sample.scalar_type()))
                             : std::string("an undefined tensor")));
  const int64_t batch = sample.size(0);
  if (!timestep.defined() || (timestep.numel() != 1 && !(timestep.dim() == 1 && timestep.size(0) == batch)) ||
      timestep.scalar_type() == at::kBool || timestep.is_complex())
    throw ArgumentError("UNet2DCondition: timestep must hold 1 or " + std::to_string(batch) +
                        " (batch) numbers, got shape " +
                        (timestep.defined() ? shape_string(timestep) : std::string("(undefined)")));
  if (context_dim_ > 0 && (!encoder_hidden_states.defined() || encoder_hidden_states.dim() != 3 ||
                           encoder_hidden_states.size(0) != batch || encoder_hidden_states.size(1) < 1 ||
                           encoder_hidden_states.size(2) != context_dim_ ||
                           !at::isFloatingType(encoder_hidden_states.scalar_type())))
    throw ArgumentError("UNet2DCondition: encoder_hidden_states must be a float tensor [" +
                        std::to_string(batch) + ", S, " + std::to_string(context_dim_) + "], got " +
                        (encoder_hidden_states.defined() ? shape_string(encoder_hidden_states)
                                                         : std::string("an undefined tensor")));
  check_finite(sample, "sample");
  check_finite(timestep, "timestep");
  if (encoder_hidden_states.defined()) check_finite(encoder_hidden_states, "encoder_hidden_states");

  const bool cl = options_.channels_last;
  at::Tensor x = to_layout(sample.to(dtype_), cl);
  if (config_.center_input_sample) x = x * 2 - 1;
  const at::Tensor emb = time_embedding(timestep, batch);
  const at::Tensor context =
      encoder_hidden_states.defined() ? encoder_hidden_states.to(dtype_).contiguous() : at::Tensor();

  const at::Tensor time_proj = project_time(emb);
  std::size_t next_resnet = 0;  // blocks run in the order their projections were concatenated
  const auto resnet = [&](const ResnetBlock2D& block, const at::Tensor& input) {
    const int64_t width = block.time_emb_proj->weight.size(0);
    return block.forward_projected(input, time_proj.narrow(1, time_proj_offsets_[next_resnet++], width));
  };

  x = conv_in_(x);
  std::vector<at::Tensor> skips{x};
  for (const auto& block : down_blocks_) {
    for (std::size_t j = 0; j < block.resnets.size(); ++j) {
      x = resnet(block.resnets[j], x);
      if (!block.attentions.empty()) x = block.attentions[j](x, context, options_);
      skips.push_back(x);
    }
    if (block.downsampler) {
      x = (*block.downsampler)(x);
      skips.push_back(x);
    }
  }
  if (mid_block_) {
    x = resnet(mid_block_->resnets[0], x);
    for (std::size_t j = 0; j < mid_block_->attentions.size(); ++j) {
      x = mid_block_->attentions[j](x, context, options_);
      x = resnet(mid_block_->resnets[j + 1], x);
    }
  }
  for (const auto& block : up_blocks_) {
    for (std::size_t j = 0; j < block.resnets.size(); ++j) {
      x = at::cat({x, skips.back()}, 1);
      skips.pop_back();
      x = resnet(block.resnets[j], x);
      if (!block.attentions.empty()) x = block.attentions[j](x, context, options_);
    }
    if (block.upsampler) {
      // Upsample to the size of the next skip tensor: 2x when the latent size is divisible by the
      // UNet's overall factor, else upstream's upsample_size path (nearest to that size).
      std::optional<std::pair<int64_t, int64_t>> size;
      if (!skips.empty()) size = std::make_pair(skips.back().size(2), skips.back().size(3));
      x = (*block.upsampler)(x, size);
    }
  }
  x = conv_out_(conv_norm_out_(x, activation_));
  return x.to(at::kFloat).contiguous();
}

}  // namespace voken::diffusion
