#include "vision/eva_vit.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <regex>
#include <set>
#include <string>

#include "core/attention.h"
#include "core/inplace_gemm.h"
#include "core/norm_kernels.h"
#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

std::optional<int64_t> optional_int(const io::JsonView& view, const std::string& key) {
  if (!view.has(key)) return std::nullopt;
  return view.get<int64_t>(key);
}

// int(sqrt(n)) as Python computes int(n ** 0.5) for the sizes that occur here.
int64_t integer_sqrt(int64_t n) {
  auto root = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (root * root > n) --root;
  while ((root + 1) * (root + 1) <= n) ++root;
  return root;
}

}  // namespace

at::Tensor layer_norm_float32(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              double eps) {
  if (x.scalar_type() == at::kFloat) return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  return at::layer_norm(x.to(at::kFloat), {x.size(-1)}, weight, bias, eps).to(x.scalar_type());
}

at::Tensor take_float32(io::WeightLoader& weights, const std::string& name,
                        const std::vector<int64_t>& shape) {
  const auto taken = weights.take(name, shape);
  const auto stored = weights.shape_of(name);
  if (!stored || *stored != shape) return taken.to(at::kFloat);  // a placeholder; finish() reports it
  return io::convert_weight(weights.weights().at(name), {at::kFloat, weights.options().device});
}

EvaVitConfig EvaVitConfig::from_json(const io::JsonView& vision) {
  EvaVitConfig config;
  config.img_size = vision.get_or<int64_t>("img_size", config.img_size);
  config.patch_size = optional_int(vision, "patch_size");
  config.embed_dim = optional_int(vision, "embed_dim");
  config.depth = vision.get_or<int64_t>("depth", config.depth);
  config.num_heads = vision.get_or<int64_t>("num_heads", config.num_heads);
  config.head_dim = optional_int(vision, "head_dim");
  if (vision.has("mlp_ratio")) config.mlp_ratio = vision.get<double>("mlp_ratio");
  config.mlp_hidden = optional_int(vision, "mlp_hidden");
  config.layer_norm_eps = vision.get_or<double>("layer_norm_eps", config.layer_norm_eps);
  config.use_abs_pos_emb = vision.get_or<bool>("use_abs_pos_emb", config.use_abs_pos_emb);
  // Variants of the EVA ViT that MiniGPT-4 does not use; refuse rather than compute them wrongly.
  if (vision.has("final_norm"))
    throw ConfigError(vision.source() +
                      ": field 'final_norm' must be null: MiniGPT-4 uses the last block's "
                      "tokens without a final norm (found " +
                      vision.json().at("final_norm").dump() + ")");
  for (const char* unsupported : {"use_rel_pos_bias", "use_shared_rel_pos_bias"})
    if (vision.get_or<bool>(unsupported, false))
      throw ConfigError(vision.source() + ": field '" + unsupported +
                        "' is true, but relative position biases are not implemented (EVA ViT-g uses none)");
  if (vision.has("init_values") && vision.get<double>("init_values") > 0)
    throw ConfigError(vision.source() +
                      ": field 'init_values' > 0 (layer scale) is not implemented "
                      "(EVA ViT-g uses none)");
  config.validate(vision.source());
  return config;
}

void EvaVitConfig::validate(const std::string& source) const {
  auto positive = [&](const char* name, std::optional<int64_t> value) {
    if (value && *value <= 0)
      throw ConfigError(source + ": field '" + name + "' must be positive, found " + std::to_string(*value));
  };
  positive("img_size", img_size);
  positive("patch_size", patch_size);
  positive("embed_dim", embed_dim);
  positive("depth", depth);
  positive("num_heads", num_heads);
  positive("head_dim", head_dim);
  positive("mlp_hidden", mlp_hidden);
  if (mlp_ratio && !(*mlp_ratio > 0))
    throw ConfigError(source + ": field 'mlp_ratio' must be positive, found " + std::to_string(*mlp_ratio));
  if (!(layer_norm_eps > 0))
    throw ConfigError(source + ": field 'layer_norm_eps' must be positive, found " +
                      std::to_string(layer_norm_eps));
  if (patch_size && img_size < *patch_size)
    throw ConfigError(source + ": img_size " + std::to_string(img_size) + " is smaller than patch_size " +
                      std::to_string(*patch_size));
  if (embed_dim && !head_dim && *embed_dim % num_heads != 0)
    throw ConfigError(source + ": embed_dim " + std::to_string(*embed_dim) +
                      " is not divisible by num_heads " + std::to_string(num_heads));
}

at::Tensor interpolate_pos_embed(const at::Tensor& pos_embed, int64_t num_patches, int64_t num_extra_tokens) {
  c10::InferenceMode guard;
  if (pos_embed.dim() != 3 || pos_embed.size(0) != 1 || pos_embed.size(1) < num_extra_tokens)
    throw ArgumentError("interpolate_pos_embed: expected a position embedding [1, " +
                        std::to_string(num_extra_tokens) + " + s*s, D], found " +
                        io::shape_string(pos_embed.sizes()));
  const auto source = pos_embed.to(at::kFloat);
  const int64_t width = source.size(2);
  const int64_t old_grid = integer_sqrt(source.size(1) - num_extra_tokens);
  const int64_t new_grid = integer_sqrt(num_patches);
  if (old_grid == new_grid) return source;
  if (old_grid * old_grid != source.size(1) - num_extra_tokens)
    throw ArgumentError("interpolate_pos_embed: " + std::to_string(source.size(1) - num_extra_tokens) +
                        " position tokens do not form a square grid");
  const auto extra = source.narrow(1, 0, num_extra_tokens);
  const auto grid = source.narrow(1, num_extra_tokens, old_grid * old_grid)
                        .reshape({1, old_grid, old_grid, width})
                        .permute({0, 3, 1, 2});
  const std::vector<int64_t> new_size{new_grid, new_grid};
  const auto resized = at::upsample_bicubic2d(grid, at::IntArrayRef(new_size), /*align_corners=*/false);
  return at::cat({extra, resized.permute({0, 2, 3, 1}).flatten(1, 2)}, 1);
}

EvaVit::EvaVit(const EvaVitConfig& config, io::WeightLoader& weights) {
  c10::InferenceMode guard;
  config.validate();
  // Sizes the weights tell, unless the config states them (then take() checks them).
  const auto patch_shape = weights.shape_of("patch_embed.proj.weight");
  const bool patch_shape_ok = patch_shape && patch_shape->size() == 4;
  width_ = config.embed_dim.value_or(patch_shape_ok ? (*patch_shape)[0] : 1408);
  patch_size_ = config.patch_size.value_or(patch_shape_ok ? (*patch_shape)[2] : 14);
  in_channels_ = patch_shape_ok ? (*patch_shape)[1] : 3;
  num_heads_ = config.num_heads;
  if (!config.head_dim && width_ % num_heads_ != 0)
    throw ConfigError("EVA ViT: width " + std::to_string(width_) +
                      " (from patch_embed.proj.weight) is not divisible by num_heads " +
                      std::to_string(num_heads_));
  head_dim_ = config.head_dim.value_or(width_ / num_heads_);
  const int64_t attn_width = head_dim_ * num_heads_;
  scale_ = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  eps_ = config.layer_norm_eps;
  img_size_ = config.img_size;
  if (img_size_ < patch_size_)
    throw ConfigError("EVA ViT: img_size " + std::to_string(img_size_) + " is smaller than the patch size " +
                      std::to_string(patch_size_));
  grid_ = img_size_ / patch_size_;
  if (config.mlp_hidden) {
    mlp_hidden_ = *config.mlp_hidden;
  } else if (config.mlp_ratio) {
    mlp_hidden_ = static_cast<int64_t>(static_cast<double>(width_) * *config.mlp_ratio);
  } else {
    const auto fc1 = weights.shape_of("blocks.0.mlp.fc1.weight");
    mlp_hidden_ =
        fc1 && fc1->size() == 2 ? (*fc1)[0] : static_cast<int64_t>(static_cast<double>(width_) * 4.3637);
  }

  patch_weight_ = weights.take("patch_embed.proj.weight", {width_, in_channels_, patch_size_, patch_size_});
  patch_bias_ = weights.take("patch_embed.proj.bias", {width_});
  cls_token_ = weights.take("cls_token", {1, 1, width_});
  if (config.use_abs_pos_emb) {
    const int64_t tokens = num_tokens();
    const auto stored = weights.shape_of("pos_embed");
    const bool needs_resize = stored && stored->size() == 3 && (*stored)[0] == 1 && (*stored)[2] == width_ &&
                              (*stored)[1] != tokens;
    if (needs_resize) {
      // Upstream resizes the checkpoint's embedding in float32 before loading it into the model;
      // read the stored tensor itself so that a bf16 target does not round it first.
      weights.take("pos_embed", {1, -1, width_});
      try {
        pos_embed_ = io::convert_weight(
            interpolate_pos_embed(weights.weights().at("pos_embed"), grid_ * grid_), weights.options());
      } catch (const ArgumentError& e) {
        throw WeightsError("EVA ViT: cannot resize pos_embed " + io::shape_string(at::IntArrayRef(*stored)) +
                           " from " + weights.weights().source_of("pos_embed") + " to " +
                           std::to_string(tokens) + " tokens: " + e.what());
      }
    } else {
      pos_embed_ = weights.take("pos_embed", {1, tokens, width_});
    }
  }

  blocks_.reserve(static_cast<std::size_t>(config.depth));
  for (int64_t i = 0; i < config.depth; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    Block block;
    block.norm1_weight = take_float32(weights, p + "norm1.weight", {width_});
    block.norm1_bias = take_float32(weights, p + "norm1.bias", {width_});
    block.qkv_weight = weights.take(p + "attn.qkv.weight", {3 * attn_width, width_});
    const auto q_bias = weights.take(p + "attn.q_bias", {attn_width});
    const auto v_bias = weights.take(p + "attn.v_bias", {attn_width});
    // EVA has no k bias; one linear with (q_bias, 0, v_bias) computes all three projections.
    block.qkv_bias = at::cat({q_bias, at::zeros_like(v_bias), v_bias}).contiguous();
    block.proj_weight = weights.take(p + "attn.proj.weight", {width_, attn_width});
    block.proj_bias = weights.take(p + "attn.proj.bias", {width_});
    block.norm2_weight = take_float32(weights, p + "norm2.weight", {width_});
    block.norm2_bias = take_float32(weights, p + "norm2.bias", {width_});
    block.fc1_weight = weights.take(p + "mlp.fc1.weight", {mlp_hidden_, width_});
    block.fc1_bias = weights.take(p + "mlp.fc1.bias", {mlp_hidden_});
    block.fc2_weight = weights.take(p + "mlp.fc2.weight", {width_, mlp_hidden_});
    block.fc2_bias = weights.take(p + "mlp.fc2.bias", {width_});
    blocks_.push_back(std::move(block));
  }

  // What upstream's load_state_dict(strict=False) silently skips and is indeed unused by the
  // features path: blocks beyond `depth` (EVA-CLIP has 40, MiniGPT-4 builds 39) and the
  // classifier-only tensors. Anything else unexpected (e.g. layer-scale gammas or relative
  // position tables of other EVA variants) stays an error: it would change the result.
  std::set<std::string> extra_blocks;
  const std::regex block_key(R"(^blocks\.(\d+)\.)");
  for (const auto& name : weights.weights().keys()) {
    std::smatch match;
    if (std::regex_search(name, match, block_key) && std::stoll(match[1].str()) >= config.depth)
      extra_blocks.insert(match[1].str());
  }
  for (const auto& index : extra_blocks) weights.ignore("^blocks\\." + index + "\\.");
  weights.ignore(R"(^(norm|fc_norm|head|lm_head)\.)");
}

at::Tensor EvaVit::block_forward(const Block& block, const at::Tensor& x) const {
  const int64_t batch = x.size(0), tokens = x.size(1);
  // bf16 weights on a CPU of tier avx2 or above: the products run in core::inplace_linear (weights
  // read in place, no per-call repacking as in at::linear/oneDNN, no libtorch bf16 fallback loops on
  // CPUs without AVX-512), fc1's GELU and the residual additions are applied to the float32 sums
  // before the single rounding, the LayerNorms run in core::layer_norm_bf16 (float32 inside, rounded
  // to bf16 as layer_norm_float32 rounds).
  const bool own_kernels = x.scalar_type() == at::kBFloat16 &&
                           block.qkv_weight.scalar_type() == at::kBFloat16 && core::inplace_gemm_supported();
  auto norm = [&](const at::Tensor& in, const at::Tensor& weight, const at::Tensor& bias) {
    return own_kernels ? core::layer_norm_bf16(in, weight, bias, eps_)
                       : layer_norm_float32(in, weight, bias, eps_);
  };
  // activation(in W^T + bias) + residual.
  auto linear = [&](const at::Tensor& in, const at::Tensor& weight, const at::Tensor& bias,
                    core::Activation activation, const at::Tensor& residual) {
    if (own_kernels) return core::inplace_linear(in, weight, bias, at::kBFloat16, activation, residual);
    auto y = at::linear(in, weight, bias);
    if (activation == core::Activation::GeluErf) y = at::gelu(y);  // exact erf GELU (nn.GELU)
    return residual.defined() ? residual + y : y;
  };
  const auto none = core::Activation::None;
  auto h = norm(x, block.norm1_weight, block.norm1_bias);
  const auto qkv_rows = linear(h, block.qkv_weight, block.qkv_bias, none, {});  // [B, T, 3 * width]
  const int64_t attn_width = num_heads_ * head_dim_;
  at::Tensor context;
  // bf16 activations at a tier from avx2 up: the fused kernel on views of the product (no head
  // copies); upstream's rounding of q * scale to bf16 is kept, the scores and softmax stay float32
  // (closer to float32 than the bf16 ops). Elsewhere ATen, as upstream computes it.
  if (qkv_rows.scalar_type() == at::kBFloat16 && core::cpu_tier() >= core::CpuTier::avx2 &&
      core::attention_supported(head_dim_, tokens, core::AttentionNumerics::ScaledQueryBf16)) {
    context = core::attention(qkv_rows.narrow(-1, 0, attn_width), qkv_rows.narrow(-1, attn_width, attn_width),
                              qkv_rows.narrow(-1, 2 * attn_width, attn_width), num_heads_, scale_,
                              core::AttentionNumerics::ScaledQueryBf16);
  } else {
    // [B, T, 3, heads, head_dim] -> [3, B, heads, T, head_dim], copied once so that the batched
    // products below read contiguous heads (cheaper than letting each matmul copy its operand).
    const auto qkv =
        qkv_rows.view({batch, tokens, 3, num_heads_, head_dim_}).permute({2, 0, 3, 1, 4}).contiguous();
    // Upstream scales q before the product (not the scores); same rounding here.
    const auto q = qkv[0] * scale_;
    // The softmax runs in the activation dtype: libtorch accumulates bf16 in float internally,
    // and the probabilities are rounded to that dtype for the next product anyway.
    const auto probs = at::softmax(at::matmul(q, qkv[1].transpose(-2, -1)), -1);
    context = at::matmul(probs, qkv[2]).transpose(1, 2).reshape({batch, tokens, attn_width});
  }
  const auto out = linear(context, block.proj_weight, block.proj_bias, none, x);
  h = norm(out, block.norm2_weight, block.norm2_bias);
  h = linear(h, block.fc1_weight, block.fc1_bias, core::Activation::GeluErf, {});
  return linear(h, block.fc2_weight, block.fc2_bias, none, out);
}

at::Tensor EvaVit::forward(const at::Tensor& pixels) const {
  c10::InferenceMode guard;
  if (!pixels.defined() || pixels.dim() != 4 || pixels.size(1) != in_channels_ ||
      pixels.size(2) != img_size_ || pixels.size(3) != img_size_)
    throw ArgumentError(
        "EVA ViT: expected pixels [B, " + std::to_string(in_channels_) + ", " + std::to_string(img_size_) +
        ", " + std::to_string(img_size_) + "], found " +
        (pixels.defined() ? io::shape_string(pixels.sizes()) : std::string("an undefined tensor")));
  if (!at::isFloatingType(pixels.scalar_type()))
    throw ArgumentError(std::string("EVA ViT: pixels must be a floating-point tensor, found ") +
                        c10::toString(pixels.scalar_type()));
  const int64_t batch = pixels.size(0);
  const auto input = pixels.to(patch_weight_.device(), patch_weight_.scalar_type());
  // [B, D, g, g] -> [B, g*g, D]
  at::Tensor patches;
  if (input.scalar_type() == at::kBFloat16 && input.device().is_cpu() && core::inplace_gemm_supported()) {
    // The patch embedding (a stride = kernel convolution) is a product over the non-overlapping
    // patches, each flattened (c, ky, kx) as the kernel [D, C, p, p] is: the in-place kernel
    // instead of libtorch's bf16 convolution.
    const at::Tensor rows = input.narrow(2, 0, grid_ * patch_size_)
                                .narrow(3, 0, grid_ * patch_size_)
                                .reshape({batch, in_channels_, grid_, patch_size_, grid_, patch_size_})
                                .permute({0, 2, 4, 1, 3, 5})
                                .reshape({batch, grid_ * grid_, -1});
    patches = core::inplace_linear(rows, patch_weight_.reshape({width_, -1}), patch_bias_, at::kBFloat16);
  } else {
    patches = at::conv2d(input, patch_weight_, patch_bias_, {patch_size_, patch_size_});
    patches = patches.flatten(2).transpose(1, 2);
  }
  auto x = at::cat({cls_token_.expand({batch, 1, width_}), patches}, 1);
  if (pos_embed_.defined()) x = x + pos_embed_;
  for (const auto& block : blocks_) x = block_forward(block, x);
  return x;
}

}  // namespace voken::vision
