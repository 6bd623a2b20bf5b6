// Building blocks shared by the Stable Diffusion UNet (unet.h) and VAE (vae.h), following the
// semantics of HF diffusers v0.31.0 (models/resnet.py, downsampling.py, upsampling.py,
// attention.py, attention_processor.py, transformers/transformer_2d.py): group norm (+ activation),
// ResnetBlock2D, nearest-upsample + conv, strided-conv downsample, multi-head attention whose
// score matrix is materialised a chunk of query rows at a time, BasicTransformerBlock (self-attn,
// cross-attn, GEGLU feed-forward), Transformer2DModel (continuous input) and the VAE's spatial
// self-attention.
//
// Every block computes in the dtype of its weights (float32 or bfloat16); inputs must already be
// in that dtype. Blocks are plain structs built by `load` functions that take each tensor by its
// diffusers key (relative to a prefix) with its expected shape from a WeightLoader.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/packed_gemm.h"
#include "io/state_dict.h"

namespace voken::diffusion {

// diffusers' get_activation names: "silu" and "swish" (SiLU), "gelu" (exact erf), "relu", "mish".
enum class Activation { Silu, Gelu, Relu, Mish };
std::optional<Activation> activation_from_name(const std::string& name);
at::Tensor activate(const at::Tensor& x, Activation activation);
// In place where ATen has an in-place kernel.
void activate_(at::Tensor& x, Activation activation);

// How blocks lay out activations and bound the attention working set. Not part of a model's
// config: two settings give the same numbers up to float rounding order.
struct ComputeOptions {
  // Activations in NHWC memory order (channels-last strides of NCHW tensors). oneDNN's
  // convolutions run faster on them, and a Transformer2D's tokens are then a free view.
  bool channels_last = true;
  // Largest number of attention-score elements (query rows x keys, summed over the heads in a
  // chunk) materialised at once. A 64x64 latent at batch 2 with 5 heads has 168M of them.
  int64_t attention_max_scores = int64_t{4} << 20;
  // bfloat16 attention through the fused kernel (core/attention.h) at every CPU tier from avx2
  // up; otherwise, or when false, the chunked path.
  bool fused_attention = true;
  // Largest feed-forward intermediate (the GEGLU projection of a chunk of tokens) in bytes: the
  // tokens go through the feed-forward in row chunks of this size, which keeps the intermediate
  // in cache and out of mmap'd (page-faulting) allocations.
  int64_t feed_forward_chunk_bytes = int64_t{8} << 20;
  // Read when a model is built: bfloat16 linear layers, stride-1 convolutions and stride-2 3x3
  // convolutions get their weights packed for the kernels of core/packed_gemm.h when the CPU tier
  // is avx2 or above and the shapes fit (the plain weights are then released). Otherwise, or when
  // false, bf16 linear layers run in core/inplace_gemm.h (weights read in place) and convolutions
  // in float32 through at::conv2d (at the generic tier: libtorch's bf16 ops).
  bool packed_weights = true;
};

struct Conv2d {
  at::Tensor weight;  // [out, in, k, k]; undefined once packed
  at::Tensor bias;    // [out] (may be undefined)
  int64_t stride = 1;
  int64_t padding = 0;
  std::shared_ptr<const core::PackedGemmWeight> packed;  // after pack()

  // Takes <prefix>weight and <prefix>bias. `channels_last` stores the kernel NHWC-ordered, the
  // order oneDNN wants for NHWC inputs.
  static Conv2d load(io::WeightLoader& weights, const std::string& prefix, int64_t in_channels,
                     int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding,
                     bool channels_last);
  at::Tensor operator()(const at::Tensor& x) const;
  // conv(x) + residual (the output's shape and dtype), added before rounding when packed.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& residual) const;
  // Packs a bfloat16 weight for core/packed_gemm.h when the CPU and the shape allow (stride 1 with
  // padding (k-1)/2, or a 3x3 kernel with stride 2 and padding 0 or 1) and releases the plain one;
  // returns whether it did.
  bool pack();
  int64_t out_channels() const { return packed ? packed->out_features : weight.size(0); }
  int64_t in_channels() const { return packed ? packed->in_channels : weight.size(1); }
};

struct Linear {
  at::Tensor weight;                                     // [out, in]; undefined once packed
  at::Tensor bias;                                       // [out] or undefined
  std::shared_ptr<const core::PackedGemmWeight> packed;  // after pack()

  static Linear load(io::WeightLoader& weights, const std::string& prefix, int64_t in_features,
                     int64_t out_features, bool with_bias);
  // A 1x1 convolution stored as [out, in, 1, 1] (e.g. Transformer2D's conv proj_in/proj_out),
  // taken as the equivalent linear map over channels.
  static Linear load_pointwise_conv(io::WeightLoader& weights, const std::string& prefix, int64_t in_features,
                                    int64_t out_features);
  at::Tensor operator()(const at::Tensor& x) const;
  // linear(x) + residual (the output's shape and dtype), added before rounding when packed.
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& residual) const;
  // accumulator += linear(x), in place (accumulator: contiguous rows of the output's shape).
  void add_to(const at::Tensor& x, at::Tensor& accumulator) const;
  // As Conv2d::pack.
  bool pack();
  int64_t in_features() const { return packed ? packed->in_channels : weight.size(1); }
  int64_t out_features() const { return packed ? packed->out_features : weight.size(0); }
};

struct GroupNorm {
  at::Tensor weight, bias;  // [channels]
  int64_t groups = 32;
  double eps = 1e-5;

  static GroupNorm load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                        int64_t groups, double eps);
  // x: [B, C, H, W] in any memory order (kept). Statistics in float32 whatever the dtype.
  // `activation`: applied after the affine transform (ResnetBlock2D, the output heads).
  at::Tensor operator()(const at::Tensor& x, std::optional<Activation> activation = std::nullopt) const;
  // In place on x (NCHW-contiguous or channels-last), e.g. a convolution's fresh output.
  void apply_(at::Tensor& x, std::optional<Activation> activation = std::nullopt) const;
};

struct LayerNorm {
  at::Tensor weight, bias;  // [dim]
  double eps = 1e-5;

  static LayerNorm load(io::WeightLoader& weights, const std::string& prefix, int64_t dim, double eps);
  at::Tensor operator()(const at::Tensor& x) const;
};

// How a ResnetBlock2D adds the time embedding (diffusers' resnet_time_scale_shift).
enum class TimeEmbeddingNorm { Default, ScaleShift };

struct ResnetSettings {
  int64_t groups = 32;
  std::optional<int64_t> groups_out;  // unset: `groups`
  double eps = 1e-6;
  Activation activation = Activation::Silu;
  std::optional<int64_t> temb_channels;  // unset: no time embedding (VAE)
  TimeEmbeddingNorm time_embedding_norm = TimeEmbeddingNorm::Default;
  bool skip_time_act = false;
  double output_scale_factor = 1.0;
  bool channels_last = true;
};

struct ResnetBlock2D {
  GroupNorm norm1, norm2;
  Conv2d conv1, conv2;
  std::optional<Conv2d> conv_shortcut;  // when in_channels != out_channels
  std::optional<Linear> time_emb_proj;
  Activation activation = Activation::Silu;
  TimeEmbeddingNorm time_embedding_norm = TimeEmbeddingNorm::Default;
  bool skip_time_act = false;
  double output_scale_factor = 1.0;

  static ResnetBlock2D load(io::WeightLoader& weights, const std::string& prefix, int64_t in_channels,
                            int64_t out_channels, const ResnetSettings& settings);
  // temb: [B, temb_channels] or undefined (required when the block has time_emb_proj).
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& temb) const;
  // With the time embedding already projected: time_proj = time_emb_proj(act(temb)) (or
  // time_emb_proj(temb) with skip_time_act), [B, out] or [B, 2*out] for scale_shift, any float
  // dtype; undefined when the block has no time embedding. (The UNet projects for all its blocks
  // in one product.)
  at::Tensor forward_projected(const at::Tensor& x, const at::Tensor& time_proj) const;
  // Packs the convolutions (not time_emb_proj, which the UNet batches itself); see Conv2d::pack.
  void pack();
  int64_t in_channels() const { return conv1.in_channels(); }
  int64_t out_channels() const { return conv2.out_channels(); }
};

// Downsample2D with use_conv: a 3x3 stride-2 convolution; padding 0 means upstream's asymmetric
// (0, 1, 0, 1) zero pad first (the VAE encoder).
struct Downsample2D {
  Conv2d conv;
  bool pad_right_bottom = false;

  static Downsample2D load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                           int64_t padding, bool channels_last);
  at::Tensor operator()(const at::Tensor& x) const;
  void pack() { conv.pack(); }
};

// Upsample2D with use_conv: nearest-neighbour resize (2x, or to `size` when given: the UNet's
// upsample_size path for latents not divisible by its overall factor), then a 3x3 convolution.
struct Upsample2D {
  Conv2d conv;

  static Upsample2D load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                         bool channels_last);
  at::Tensor operator()(const at::Tensor& x, std::optional<std::pair<int64_t, int64_t>> size) const;
  void pack() { conv.pack(); }
};

// softmax(q k^T * scale) v per head. q: [B, Nq, heads*D], k and v: [B, Nk, heads*D] (same dtype)
// -> [B, Nq, heads*D] in that dtype. The scores of at most `max_scores` elements exist at once
// (query rows are processed in chunks, across heads when several fit); results do not depend on
// the chunking beyond float rounding of the matrix products. `upcast`: q and k in float32 for the
// scores (diffusers' upcast_attention); softmax always accumulates in float32. `allow_fused`:
// bfloat16 q, k and v (upcast or not) at a CPU tier from avx2 up take the fused kernel
// (core::attention, ScaledScoresFloat32: float32 scores as upcast_attention computes them,
// float32 softmax, probabilities rounded to bfloat16 before the P V product at the bf16 tiers).
at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale, bool upcast, int64_t max_scores, bool allow_fused = true);

// diffusers Attention with AttnProcessor, as BasicTransformerBlock builds it: to_q, to_k, to_v
// without bias (attention_bias=False), to_out.0 with bias.
struct CrossAttention {
  Linear to_q, to_k, to_v, to_out;
  // Self-attention: to_q, to_k and to_v stacked ([3*inner, dim]), one product for q, k and v.
  std::optional<Linear> qkv;
  int64_t heads = 1;
  bool upcast = false;

  // `context_dim`: unset for self-attention.
  static CrossAttention load(io::WeightLoader& weights, const std::string& prefix, int64_t query_dim,
                             std::optional<int64_t> context_dim, int64_t heads, int64_t head_dim,
                             bool upcast);
  // x: [B, N, dim]; context: [B, S, context_dim] or undefined (self-attention). Returns the
  // attention output plus `residual` when given ([B, N, dim]).
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context, const ComputeOptions& options,
                        const at::Tensor& residual = at::Tensor()) const;
  // The attention output added to `accumulator` in place ([B, N, dim], contiguous).
  void add_to(const at::Tensor& x, const at::Tensor& context, const ComputeOptions& options,
              at::Tensor& accumulator) const;
  // Packs the projections (for self-attention the stacked one; to_q, to_k and to_v are then
  // released as well).
  void pack();
  int64_t context_dim() const { return to_k.in_features(); }

 private:
  at::Tensor attend(const at::Tensor& x, const at::Tensor& context, const ComputeOptions& options) const;
};

struct TransformerSettings {
  int64_t heads = 8;
  int64_t head_dim = 64;
  int64_t num_layers = 1;
  int64_t cross_attention_dim = 768;
  int64_t norm_num_groups = 32;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
};

// BasicTransformerBlock with norm_type "layer_norm" and a GEGLU feed-forward (4x inner width).
struct BasicTransformerBlock {
  LayerNorm norm1, norm2, norm3;
  CrossAttention attn1, attn2;
  Linear ff_in;   // ff.net.0.proj: dim -> 2*inner (value half, then gate half)
  Linear ff_out;  // ff.net.2: inner -> dim
  // After pack(): ff_in packed with the GEGLU epilogue (ff_in itself is then released).
  std::shared_ptr<const core::PackedGemmWeight> ff_geglu;
  bool only_cross_attention = false;

  static BasicTransformerBlock load(io::WeightLoader& weights, const std::string& prefix, int64_t dim,
                                    const TransformerSettings& settings);
  at::Tensor operator()(const at::Tensor& tokens, const at::Tensor& context,
                        const ComputeOptions& options) const;
  void pack();
};

// Transformer2DModel on continuous [B, C, H, W] input: group norm (eps 1e-6), proj_in, blocks,
// proj_out, residual. A conv projection (1x1, SD 1.x) is applied as the equivalent linear map on
// the tokens, which is what use_linear_projection (SD 2.x) does; both read their own key shapes.
struct Transformer2D {
  GroupNorm norm;
  Linear proj_in, proj_out;
  std::vector<BasicTransformerBlock> blocks;

  static Transformer2D load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                            const TransformerSettings& settings);
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& context, const ComputeOptions& options) const;
  void pack();
  int64_t context_dim() const { return blocks.empty() ? -1 : blocks.front().attn2.context_dim(); }
};

// The VAE mid-block's Attention (_from_deprecated_attn_block): group norm, single- or multi-head
// self-attention with biased projections, float32 softmax, residual. Reads the current names
// (to_q, to_k, to_v, to_out.0) or the deprecated ones (query, key, value, proj_attn), as 2-D
// linear weights or 4-D 1x1 convolution kernels.
struct SpatialSelfAttention {
  GroupNorm group_norm;
  Linear to_q, to_k, to_v, to_out;
  int64_t heads = 1;
  double rescale_output_factor = 1.0;

  static SpatialSelfAttention load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                                   int64_t heads, int64_t groups, double eps);
  at::Tensor operator()(const at::Tensor& x, const ComputeOptions& options) const;
  void pack();
};

// Sinusoidal timestep embedding exactly as diffusers' get_timestep_embedding (float32 math, same
// operation order): timesteps [N] (any numeric dtype) -> [N, dim] float32.
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              double downscale_freq_shift, double scale = 1.0, double max_period = 10000.0);

// Tokens [B, H*W, C] (row-major pixels) <-> images [B, C, H, W]; views where the layout allows.
at::Tensor image_to_tokens(const at::Tensor& x);
at::Tensor tokens_to_image(const at::Tensor& tokens, int64_t height, int64_t width, bool channels_last);

// The layout the blocks expect for an input image tensor.
at::Tensor to_layout(const at::Tensor& x, bool channels_last);

}  // namespace voken::diffusion
