// Stable Diffusion's image autoencoder: diffusers' AutoencoderKL (v0.31.0), built from a diffusers
// `vae/` folder (config.json + diffusion_pytorch_model.safetensors or .bin, any float dtype).
//
// encode: image [B, in_channels, H, W] in [-1, 1] -> the posterior's mean and logvar (clamped to
// [-30, 20], as DiagonalGaussianDistribution does); decode: raw latents (already divided by
// scaling_factor, as pipelines do) -> image. Encoder/Decoder with DownEncoderBlock2D /
// UpDecoderBlock2D blocks and a mid block with (optional) single-head self-attention whose weights
// may carry the current (to_q/to_k/to_v/to_out.0) or deprecated (query/key/value/proj_attn) names.
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

struct VaeConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<std::string> down_block_types = {"DownEncoderBlock2D"};
  std::vector<std::string> up_block_types = {"UpDecoderBlock2D"};
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;
  std::string act_fn = "silu";
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;
  std::optional<double> shift_factor;  // pipelines: latents = (z - shift) * scale (SD 1.x/2.x: none)
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  // Reads a diffusers vae/config.json object; absent fields keep upstream's defaults. Throws
  // ConfigError naming the field for anything not built here (other block types, ...).
  static VaeConfig from_json(const io::JsonView& json);
  static VaeConfig load(const std::string& config_path);
  void validate(const std::string& source = "VaeConfig") const;
};

// DiagonalGaussianDistribution's parameters (float32).
struct VaePosterior {
  at::Tensor mean;    // [B, latent_channels, h, w]
  at::Tensor logvar;  // same shape, clamped to [-30, 20]
  at::Tensor std() const;
  // mean + std * noise (noise: standard normal, the shape of mean).
  at::Tensor sample(const at::Tensor& noise) const;
};

class AutoencoderKL {
 public:
  // Takes encoder.*, decoder.*, quant_conv.* and post_quant_conv.* by their diffusers keys with
  // the shapes the config implies; the caller's loader.finish() reports what does not fit.
  AutoencoderKL(const VaeConfig& config, io::WeightLoader& weights, const ComputeOptions& options = {});

  // <dir>/config.json + the checkpoint in <dir>, strictly. `float_dtype` unset: the file's
  // dtype (fp16 becomes fp32).
  static AutoencoderKL load(const std::string& dir, std::optional<at::ScalarType> float_dtype = std::nullopt,
                            const ComputeOptions& options = {});

  // image: [B, in_channels, H, W] (any float dtype, H and W >= 1) -> posterior at
  // ceil-halved resolution per down block (H / 8 for SD). Throws ArgumentError for a wrong shape
  // or NaN/Inf.
  VaePosterior encode(const at::Tensor& image) const;
  // latents: [B, latent_channels, h, w] -> [B, out_channels, h * 2^(blocks-1), ...] float32, not
  // clamped (vae.decode(latents).sample).
  at::Tensor decode(const at::Tensor& latents) const;

  const VaeConfig& config() const { return config_; }
  double scaling_factor() const { return config_.scaling_factor; }
  at::ScalarType dtype() const { return dtype_; }
  const ComputeOptions& compute_options() const { return options_; }
  void set_compute_options(const ComputeOptions& options) { options_ = options; }

 private:
  struct MidBlock {
    std::vector<ResnetBlock2D> resnets;
    std::vector<SpatialSelfAttention> attentions;  // empty without mid_block_add_attention
    at::Tensor operator()(const at::Tensor& x, const ComputeOptions& options) const;
  };
  struct Stage {  // DownEncoderBlock2D or UpDecoderBlock2D
    std::vector<ResnetBlock2D> resnets;
    std::optional<Downsample2D> downsampler;
    std::optional<Upsample2D> upsampler;
  };

  VaeConfig config_;
  ComputeOptions options_;
  at::ScalarType dtype_ = at::kFloat;
  // Encoder.
  Conv2d encoder_conv_in_, encoder_conv_out_;
  std::vector<Stage> encoder_blocks_;
  MidBlock encoder_mid_;
  GroupNorm encoder_norm_out_;
  std::optional<Conv2d> quant_conv_;
  // Decoder.
  std::optional<Conv2d> post_quant_conv_;
  Conv2d decoder_conv_in_, decoder_conv_out_;
  MidBlock decoder_mid_;
  std::vector<Stage> decoder_blocks_;
  GroupNorm decoder_norm_out_;
};

}  // namespace voken::diffusion
