#include "vision/qformer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <regex>

#include "core/attention.h"
#include "core/cpu.h"
#include "core/inplace_gemm.h"
#include "core/norm_kernels.h"
#include "io/tensor_bytes.h"
#include "vision/eva_vit.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

std::optional<int64_t> optional_int(const io::JsonView& view, const std::string& key) {
  if (!view.has(key)) return std::nullopt;
  return view.get<int64_t>(key);
}

std::string escape_regex(const std::string& text) {
  static const std::regex special(R"([.^$|()\[\]{}*+?\\])");
  return std::regex_replace(text, special, R"(\$&)");
}

// float32 LayerNorm; bf16 activations through core::layer_norm_bf16 (the same float32 computation
// and rounding, without libtorch's separate conversion passes).
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (x.scalar_type() == at::kBFloat16 && x.device().is_cpu())
    return core::layer_norm_bf16(x, weight, bias, eps);
  return layer_norm_float32(x, weight, bias, eps);
}

}  // namespace

QFormerConfig QFormerConfig::from_json(const io::JsonView& qformer) {
  QFormerConfig config;
  config.hidden_size = optional_int(qformer, "hidden_size");
  config.num_hidden_layers = optional_int(qformer, "num_hidden_layers");
  config.num_attention_heads = qformer.get_or<int64_t>("num_attention_heads", config.num_attention_heads);
  config.intermediate_size = optional_int(qformer, "intermediate_size");
  config.hidden_act = qformer.get_or<std::string>("hidden_act", config.hidden_act);
  config.layer_norm_eps = qformer.get_or<double>("layer_norm_eps", config.layer_norm_eps);
  config.encoder_width = optional_int(qformer, "encoder_width");
  config.add_cross_attention = qformer.get_or<bool>("add_cross_attention", config.add_cross_attention);
  config.cross_attention_freq = qformer.get_or<int64_t>("cross_attention_freq", config.cross_attention_freq);
  config.query_length = optional_int(qformer, "query_length");
  // Relative position embeddings would change the self-attention scores; bert-base (and every
  // BLIP-2 checkpoint) uses absolute ones, which the query-only path never adds.
  const auto position_type = qformer.get_or<std::string>("position_embedding_type", "absolute");
  if (position_type != "absolute")
    throw ConfigError(qformer.source() + ": field 'position_embedding_type' is '" + position_type +
                      "'; only 'absolute' is implemented");
  config.validate(qformer.source());
  return config;
}

void QFormerConfig::validate(const std::string& source) const {
  auto positive = [&](const char* name, std::optional<int64_t> value) {
    if (value && *value <= 0)
      throw ConfigError(source + ": field '" + name + "' must be positive, found " + std::to_string(*value));
  };
  positive("hidden_size", hidden_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("intermediate_size", intermediate_size);
  positive("encoder_width", encoder_width);
  positive("cross_attention_freq", cross_attention_freq);
  positive("query_length", query_length);
  if (!(layer_norm_eps > 0))
    throw ConfigError(source + ": field 'layer_norm_eps' must be positive, found " +
                      std::to_string(layer_norm_eps));
  if (hidden_size && *hidden_size % num_attention_heads != 0)
    throw ConfigError(source + ": hidden_size " + std::to_string(*hidden_size) +
                      " is not divisible by num_attention_heads " + std::to_string(num_attention_heads));
  if (hidden_act != "gelu" && hidden_act != "gelu_new" && hidden_act != "gelu_pytorch_tanh" &&
      hidden_act != "relu")
    throw ConfigError(source + ": field 'hidden_act' is '" + hidden_act +
                      "'; implemented: gelu, gelu_new, gelu_pytorch_tanh, relu");
}

QFormer::QFormer(const QFormerConfig& config, io::WeightLoader& weights, const std::string& prefix) {
  c10::InferenceMode guard;
  config.validate();
  const std::string layer_prefix = prefix + "encoder.layer.";

  const auto query_shape = weights.shape_of("query_tokens");
  const bool query_shape_ok = query_shape && query_shape->size() == 3;
  hidden_ = config.hidden_size.value_or(query_shape_ok ? (*query_shape)[2] : 768);
  num_queries_ = config.query_length.value_or(query_shape_ok ? (*query_shape)[1] : 32);
  num_heads_ = config.num_attention_heads;
  if (hidden_ % num_heads_ != 0)
    throw ConfigError("Q-Former: hidden size " + std::to_string(hidden_) +
                      " (from query_tokens) is not divisible by " + "num_attention_heads " +
                      std::to_string(num_heads_));
  head_dim_ = hidden_ / num_heads_;
  eps_ = config.layer_norm_eps;
  if (config.hidden_act == "gelu")
    activation_ = Activation::GeluErf;
  else if (config.hidden_act == "relu")
    activation_ = Activation::Relu;
  else
    activation_ = Activation::GeluTanh;

  // Layers present in the checkpoint, for when the config does not say how many to build.
  int64_t stored_layers = 0;
  const std::regex layer_key("^" + escape_regex(layer_prefix) + R"((\d+)\.)");
  for (const auto& name : weights.weights().keys()) {
    std::smatch match;
    if (std::regex_search(name, match, layer_key))
      stored_layers = std::max<int64_t>(stored_layers, std::stoll(match[1].str()) + 1);
  }
  const int64_t num_layers = config.num_hidden_layers.value_or(stored_layers > 0 ? stored_layers : 12);
  auto is_cross_layer = [&](int64_t i) {
    return config.add_cross_attention && i % config.cross_attention_freq == 0;
  };

  const auto ffn_shape = weights.shape_of(layer_prefix + "0.intermediate_query.dense.weight");
  intermediate_ =
      config.intermediate_size.value_or(ffn_shape && ffn_shape->size() == 2 ? (*ffn_shape)[0] : 3072);
  encoder_width_ = config.encoder_width.value_or(1408);
  if (!config.encoder_width) {
    for (int64_t i = 0; i < num_layers; ++i) {
      if (!is_cross_layer(i)) continue;
      const auto key_shape =
          weights.shape_of(layer_prefix + std::to_string(i) + ".crossattention.self.key.weight");
      if (key_shape && key_shape->size() == 2) encoder_width_ = (*key_shape)[1];
      break;
    }
  }

  query_tokens_ = weights.take("query_tokens", {1, num_queries_, hidden_});
  embed_norm_weight_ = take_float32(weights, prefix + "embeddings.LayerNorm.weight", {hidden_});
  embed_norm_bias_ = take_float32(weights, prefix + "embeddings.LayerNorm.bias", {hidden_});

  layers_.reserve(static_cast<std::size_t>(num_layers));
  for (int64_t i = 0; i < num_layers; ++i) {
    const std::string p = layer_prefix + std::to_string(i) + ".";
    Layer layer;
    const std::string self = p + "attention.self.";
    layer.self_qkv_weight = at::cat({weights.take(self + "query.weight", {hidden_, hidden_}),
                                     weights.take(self + "key.weight", {hidden_, hidden_}),
                                     weights.take(self + "value.weight", {hidden_, hidden_})});
    layer.self_qkv_bias =
        at::cat({weights.take(self + "query.bias", {hidden_}), weights.take(self + "key.bias", {hidden_}),
                 weights.take(self + "value.bias", {hidden_})});
    layer.self_out_weight = weights.take(p + "attention.output.dense.weight", {hidden_, hidden_});
    layer.self_out_bias = weights.take(p + "attention.output.dense.bias", {hidden_});
    layer.self_norm_weight = take_float32(weights, p + "attention.output.LayerNorm.weight", {hidden_});
    layer.self_norm_bias = take_float32(weights, p + "attention.output.LayerNorm.bias", {hidden_});
    layer.has_cross_attention = is_cross_layer(i);
    if (layer.has_cross_attention) {
      const std::string cross = p + "crossattention.self.";
      layer.cross_q_weight = weights.take(cross + "query.weight", {hidden_, hidden_});
      layer.cross_q_bias = weights.take(cross + "query.bias", {hidden_});
      layer.cross_kv_weight = at::cat({weights.take(cross + "key.weight", {hidden_, encoder_width_}),
                                       weights.take(cross + "value.weight", {hidden_, encoder_width_})});
      layer.cross_kv_bias = at::cat(
          {weights.take(cross + "key.bias", {hidden_}), weights.take(cross + "value.bias", {hidden_})});
      layer.cross_out_weight = weights.take(p + "crossattention.output.dense.weight", {hidden_, hidden_});
      layer.cross_out_bias = weights.take(p + "crossattention.output.dense.bias", {hidden_});
      layer.cross_norm_weight =
          take_float32(weights, p + "crossattention.output.LayerNorm.weight", {hidden_});
      layer.cross_norm_bias = take_float32(weights, p + "crossattention.output.LayerNorm.bias", {hidden_});
    }
    layer.ffn_in_weight = weights.take(p + "intermediate_query.dense.weight", {intermediate_, hidden_});
    layer.ffn_in_bias = weights.take(p + "intermediate_query.dense.bias", {intermediate_});
    layer.ffn_out_weight = weights.take(p + "output_query.dense.weight", {hidden_, intermediate_});
    layer.ffn_out_bias = weights.take(p + "output_query.dense.bias", {hidden_});
    layer.ffn_norm_weight = take_float32(weights, p + "output_query.LayerNorm.weight", {hidden_});
    layer.ffn_norm_bias = take_float32(weights, p + "output_query.LayerNorm.bias", {hidden_});
    layers_.push_back(std::move(layer));
  }

  // The text branch of BERT, present in full BLIP-2 checkpoints, never runs for query tokens.
  const std::string escaped = escape_regex(prefix);
  weights.ignore("^" + escaped + R"(embeddings\.(word_embeddings|position_embeddings|position_ids)\b)");
  weights.ignore("^" + escaped + R"(encoder\.layer\.\d+\.(intermediate|output)\.)");
  weights.ignore("^" + escaped + R"(pooler\.)");
}

std::vector<int64_t> QFormer::cross_attention_layers() const {
  std::vector<int64_t> indices;
  for (std::size_t i = 0; i < layers_.size(); ++i)
    if (layers_[i].has_cross_attention) indices.push_back(static_cast<int64_t>(i));
  return indices;
}

at::Tensor QFormer::activation(const at::Tensor& x) const {
  switch (activation_) {
    case Activation::GeluErf:
      return at::gelu(x);
    case Activation::GeluTanh:
      return at::gelu(x, "tanh");
    case Activation::Relu:
      return at::relu(x);
  }
  return x;
}

// q [B, Lq, H], k/v [B, Lk, H] -> context [B, Lq, H]; no mask (all tokens are attended to).
at::Tensor QFormer::attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
  const int64_t batch = q.size(0), q_len = q.size(1), k_len = k.size(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  // bf16 at a tier from avx2 up: the fused kernel with float32 scores scaled in float32 (upstream
  // divides the scores after the product; bf16 scores there, float32 here: closer to float32). The
  // float32 path stays ATen, as the float32 goldens compute it.
  if (q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
      v.scalar_type() == at::kBFloat16 && core::cpu_tier() >= core::CpuTier::avx2 &&
      core::attention_supported(head_dim_, k_len, core::AttentionNumerics::ScaledScoresFloat32) &&
      q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1)
    return core::attention(q, k, v, num_heads_, scale, core::AttentionNumerics::ScaledScoresFloat32);
  const auto split = [&](const at::Tensor& t, int64_t len) {
    return t.reshape({batch, len, num_heads_, head_dim_}).transpose(1, 2);
  };
  // Upstream divides the scores by sqrt(head_dim) after the product; same rounding here.
  auto scores = at::matmul(split(q, q_len), split(k, k_len).transpose(-1, -2)) /
                std::sqrt(static_cast<double>(head_dim_));
  const auto probs = at::softmax(scores, -1);
  return at::matmul(probs, split(v, k_len)).transpose(1, 2).reshape({batch, q_len, hidden_});
}

at::Tensor QFormer::forward(const at::Tensor& image_embeds) const {
  c10::InferenceMode guard;
  if (!image_embeds.defined() || image_embeds.dim() != 3 || image_embeds.size(2) != encoder_width_ ||
      image_embeds.size(1) < 1)
    throw ArgumentError(
        "Q-Former: expected image_embeds [B, N, " + std::to_string(encoder_width_) + "], found " +
        (image_embeds.defined() ? io::shape_string(image_embeds.sizes()) : std::string("undefined")));
  if (!at::isFloatingType(image_embeds.scalar_type()))
    throw ArgumentError("Q-Former: image_embeds must be floating-point");
  const int64_t batch = image_embeds.size(0);
  const auto encoder = image_embeds.to(query_tokens_.device(), query_tokens_.scalar_type());
  // bf16 weights on a CPU of tier avx2 or above: products in core::inplace_linear (no per-call
  // weight repacking as in at::linear/oneDNN, and no libtorch bf16 fallback loops on CPUs without
  // AVX-512); the result is rounded to bf16 once, as at::linear's is.
  const bool own_kernels = query_tokens_.scalar_type() == at::kBFloat16 && query_tokens_.device().is_cpu() &&
                           core::inplace_gemm_supported();
  auto linear = [&](const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    return own_kernels && weight.scalar_type() == at::kBFloat16
               ? core::inplace_linear(x, weight, bias, at::kBFloat16)
               : at::linear(x, weight, bias);
  };
  auto h = layer_norm(query_tokens_.expand({batch, num_queries_, hidden_}), embed_norm_weight_,
                      embed_norm_bias_, eps_);
  for (const auto& layer : layers_) {
    const auto qkv = linear(h, layer.self_qkv_weight, layer.self_qkv_bias).split(hidden_, -1);
    auto context = attention(qkv[0], qkv[1], qkv[2]);
    h = layer_norm(linear(context, layer.self_out_weight, layer.self_out_bias) + h, layer.self_norm_weight,
                   layer.self_norm_bias, eps_);
    if (layer.has_cross_attention) {
      const auto q = linear(h, layer.cross_q_weight, layer.cross_q_bias);
      const auto kv = linear(encoder, layer.cross_kv_weight, layer.cross_kv_bias).split(hidden_, -1);
      context = attention(q, kv[0], kv[1]);
      h = layer_norm(linear(context, layer.cross_out_weight, layer.cross_out_bias) + h,
                     layer.cross_norm_weight, layer.cross_norm_bias, eps_);
    }
    const auto inner = activation(linear(h, layer.ffn_in_weight, layer.ffn_in_bias));
    h = layer_norm(linear(inner, layer.ffn_out_weight, layer.ffn_out_bias) + h, layer.ffn_norm_weight,
                   layer.ffn_norm_bias, eps_);
  }
  return h;
}

}  // namespace voken::vision
