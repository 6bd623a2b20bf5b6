// Stable Diffusion's denoiser: diffusers' UNet2DConditionModel (v0.31.0), built from a diffusers
// `unet/` folder (config.json + diffusion_pytorch_model.safetensors or .bin, any float dtype).
//
// Covers what SD 1.x and 2.x checkpoints use: CrossAttnDownBlock2D / DownBlock2D,
// UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D; block_out_channels, layers_per_block
// and transformer_layers_per_block (int or per block), attention_head_dim (int or per block; it
// is the NUMBER of heads, diffusers' naming quirk: num_attention_heads = attention_head_dim),
// use_linear_projection (SD 2.x) or 1x1-conv projections (SD 1.x), cross_attention_dim,
// only_cross_attention, upcast_attention, norm_num_groups, norm_eps, flip_sin_to_cos, freq_shift,
// act_fn, resnet_time_scale_shift, time embedding options. Config fields that select anything
// else (class/addition embeddings, other block types, ...) are refused with a ConfigError naming
// the field.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "diffusion/nn_blocks.h"
#include "io/json_file.h"
#include "io/state_dict.h"

namespace voken::diffusion {

struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"};
  std::optional<std::string> mid_block_type = "UNetMidBlock2DCrossAttn";  // unset: no mid block
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  // Per-block lists below have one entry per down block (ints in the config are broadcast).
  std::vector<bool> only_cross_attention = {false, false, false, false};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  std::vector<int64_t> layers_per_block = {2, 2, 2, 2};
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1;
  std::string act_fn = "silu";
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim = {1280, 1280, 1280, 1280};
  std::vector<int64_t> transformer_layers_per_block = {1, 1, 1, 1};
  // The number of attention heads per block (see the header comment).
  std::vector<int64_t> attention_head_dim = {8, 8, 8, 8};
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string resnet_time_scale_shift = "default";  // or "scale_shift"
  bool resnet_skip_time_act = false;
  std::optional<int64_t> time_embedding_dim;  // unset: 4 * block_out_channels[0]
  std::optional<std::string> time_embedding_act_fn;
  std::optional<std::string> timestep_post_act;
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;

  // Reads a diffusers unet/config.json object; absent fields keep upstream's defaults. Throws
  // ConfigError naming the field for wrong types, inconsistent lengths, and any field or value
  // this implementation does not build.
  static UNetConfig from_json(const io::JsonView& json);
  static UNetConfig load(const std::string& config_path);
  void validate(const std::string& source = "UNetConfig") const;

  std::size_t num_blocks() const { return block_out_channels.size(); }
  int64_t heads(std::size_t block) const { return attention_head_dim.at(block); }
  int64_t time_embed_dim() const { return time_embedding_dim.value_or(4 * block_out_channels.at(0)); }
};

class UNet2DCondition {
 public:
  // Takes every tensor by its diffusers key with the shape the config implies; the caller's
  // loader.finish() reports missing, mis-shaped and unexpected keys. Computes in the dtype the
  // loader gives the weights (float32 or bfloat16).
  UNet2DCondition(const UNetConfig& config, io::WeightLoader& weights, const ComputeOptions& options = {});

  // <dir>/config.json + the checkpoint in <dir> (StateDict::load's directory rules), strictly.
  // `float_dtype` unset: the file's dtype (fp16 becomes fp32).
  static UNet2DCondition load(const std::string& dir,
                              std::optional<at::ScalarType> float_dtype = std::nullopt,
                              const ComputeOptions& options = {});

  // noise prediction = unet(sample, timestep, encoder_hidden_states).sample
  //   sample: [B, in_channels, H, W] (any float dtype), any H, W >= 1;
  //   timestep: 1 element (broadcast over the batch; 0-d allowed) or [B], integer or float;
  //   encoder_hidden_states: [B, S, cross_attention_dim].
  // Returns [B, out_channels, H, W] float32. Throws ArgumentError for shapes that do not fit and
  // for NaN/Inf in any input.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timestep,
                     const at::Tensor& encoder_hidden_states) const;
  at::Tensor forward(const at::Tensor& sample, double timestep,
                     const at::Tensor& encoder_hidden_states) const;

  const UNetConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  const ComputeOptions& compute_options() const { return options_; }
  void set_compute_options(const ComputeOptions& options) { options_ = options; }
  // The attention context width the cross-attention layers expect (-1 without any).
  int64_t context_dim() const { return context_dim_; }

 private:
  struct DownBlock {
    std::vector<ResnetBlock2D> resnets;
    std::vector<Transformer2D> attentions;  // empty for DownBlock2D
    std::optional<Downsample2D> downsampler;
  };
  struct UpBlock {
    std::vector<ResnetBlock2D> resnets;
    std::vector<Transformer2D> attentions;  // empty for UpBlock2D
    std::optional<Upsample2D> upsampler;
  };
  struct MidBlock {
    std::vector<ResnetBlock2D> resnets;
    std::vector<Transformer2D> attentions;
  };

  at::Tensor time_embedding(const at::Tensor& timestep, int64_t batch) const;
  // Every resnet's time_emb_proj(act(emb)) in one product: [B, sum of widths], float32 or dtype.
  at::Tensor project_time(const at::Tensor& emb) const;

  UNetConfig config_;
  ComputeOptions options_;
  at::ScalarType dtype_ = at::kFloat;
  int64_t context_dim_ = -1;
  Activation activation_ = Activation::Silu;
  std::optional<Activation> time_embedding_act_, timestep_post_act_;
  Conv2d conv_in_, conv_out_;
  Linear time_linear_1_, time_linear_2_;
  std::vector<DownBlock> down_blocks_;
  std::optional<MidBlock> mid_block_;
  std::vector<UpBlock> up_blocks_;
  GroupNorm conv_norm_out_;
  // The resnets' time_emb_proj weights concatenated in forward order (each block's Linear views
  // its rows), the biases as float32, and each block's first row.
  at::Tensor time_proj_weight_, time_proj_bias_;
  std::vector<int64_t> time_proj_offsets_;
};

}  // namespace voken::diffusion
