// EVA ViT-g/14, the frozen image tower of BLIP-2 and MiniGPT-4/5, as upstream's
// `create_eva_vit_g` builds it (minigpt4/models/eva_vit.py): patch embedding, a class token,
// absolute position embeddings (bicubically resized by `interpolate_pos_embed` when the model is
// built for another image size than the checkpoint), pre-norm blocks whose qkv projection has a
// q and a v bias but no k bias, exact-erf GELU MLPs, and no final norm: MiniGPT-4 reads the
// output of the last built block (the 39th of the 40 blocks the checkpoint holds).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "io/json_file.h"
#include "io/state_dict.h"

namespace voken::vision {

// Sizes of the ViT. Upstream hard-codes them in create_eva_vit_g; the bundle's config.json
// (object "vision") may state them. Sizes the weights can tell (width, patch size, MLP width)
// are taken from the weights when the config leaves them out, and checked against the weights
// when it gives them. The rest defaults to upstream's values.
struct EvaVitConfig {
  int64_t img_size = 224;             // the size the model is built for (pos_embed grid)
  std::optional<int64_t> patch_size;  // unset: patch_embed.proj.weight (upstream 14)
  std::optional<int64_t> embed_dim;   // unset: patch_embed.proj.weight (upstream 1408)
  int64_t depth = 39;                 // blocks built; the checkpoint may hold more
  int64_t num_heads = 16;             // upstream 1408 // 88
  std::optional<int64_t> head_dim;    // unset: embed_dim / num_heads (EVA's attn_head_dim)
  std::optional<double> mlp_ratio;    // hidden = int(embed_dim * mlp_ratio) (upstream 4.3637)
  std::optional<int64_t> mlp_hidden;  // explicit hidden width; wins over mlp_ratio
  double layer_norm_eps = 1e-6;
  bool use_abs_pos_emb = true;

  // Reads the fields above from `vision` (names as in the golden bundle's model/config.json);
  // absent fields keep their defaults. Throws ConfigError naming the field when a value is
  // invalid or describes a model this implementation does not build (e.g. a final norm).
  static EvaVitConfig from_json(const io::JsonView& vision);
  // Throws ConfigError for non-positive sizes and the like.
  void validate(const std::string& source = "EvaVitConfig") const;
};

// Resizes a checkpoint's position embedding [1, extra + s*s, D] to the grid of a model with
// `num_patches` patches, as upstream's interpolate_pos_embed does: the leading `extra` tokens
// (the class token) are kept, the s x s grid is resized bicubically (align_corners=False) in
// float32. Returns float32; unchanged (but float32) when the grid already fits.
at::Tensor interpolate_pos_embed(const at::Tensor& pos_embed, int64_t num_patches,
                                 int64_t num_extra_tokens = 1);

// LayerNorm over the last dimension computed in float32 (weight and bias float32), the result in
// x's dtype. Upstream's fp16-safe LayerNorm does the same; it is also ~10x faster than
// libtorch 1.13's own bf16 LayerNorm on CPU. A no-op cast for float32 inputs.
at::Tensor layer_norm_float32(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              double eps);

// WeightLoader::take for a parameter kept in float32 whatever the loader's dtype, converted from
// the stored tensor itself (a bf16 model does not round it first).
at::Tensor take_float32(io::WeightLoader& weights, const std::string& name,
                        const std::vector<int64_t>& shape);

class EvaVit {
 public:
  // Takes patch_embed.proj.{weight,bias}, cls_token, pos_embed and blocks.<i>.* for i < depth.
  // Keys are not checked for completeness here: the caller's loader.finish() reports them.
  // Also tells the loader to ignore what upstream's non-strict load ignores: blocks beyond
  // `depth` and the classifier-only norm/fc_norm/head tensors.
  EvaVit(const EvaVitConfig& config, io::WeightLoader& weights);

  // pixels [B, C, img_size, img_size] (any float dtype; cast to the weights' dtype) ->
  // tokens [B, 1 + (img_size / patch)^2, width] of the last built block.
  at::Tensor forward(const at::Tensor& pixels) const;

  int64_t width() const { return width_; }
  int64_t depth() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t num_heads() const { return num_heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t mlp_hidden() const { return mlp_hidden_; }
  int64_t patch_size() const { return patch_size_; }
  int64_t image_size() const { return img_size_; }
  int64_t in_channels() const { return in_channels_; }
  int64_t num_tokens() const { return 1 + grid_ * grid_; }
  // [1, num_tokens, width] as used (after interpolation), or undefined without abs pos emb.
  const at::Tensor& position_embedding() const { return pos_embed_; }
  at::ScalarType dtype() const { return patch_weight_.scalar_type(); }

 private:
  struct Block {
    at::Tensor norm1_weight, norm1_bias;  // LayerNorm parameters are float32 (layer_norm_float32)
    at::Tensor qkv_weight, qkv_bias;      // bias = cat(q_bias, zeros, v_bias)
    at::Tensor proj_weight, proj_bias;
    at::Tensor norm2_weight, norm2_bias;
    at::Tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias;
  };
  at::Tensor block_forward(const Block& block, const at::Tensor& x) const;

  int64_t img_size_ = 0, patch_size_ = 0, grid_ = 0, in_channels_ = 0;
  int64_t width_ = 0, num_heads_ = 0, head_dim_ = 0, mlp_hidden_ = 0;
  double eps_ = 1e-6;
  double scale_ = 1.0;
  at::Tensor patch_weight_, patch_bias_, cls_token_, pos_embed_;
  std::vector<Block> blocks_;
};

}  // namespace voken::vision
