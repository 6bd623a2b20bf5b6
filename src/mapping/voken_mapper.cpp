#include "mapping/voken_mapper.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <optional>

#include "core/attention.h"
#include "core/cpu.h"
#include "io/paths.h"
#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::mapping {
namespace {

// Size `dim` of stored tensor `name` when it exists with rank `rank`; nullopt otherwise (the
// take() of that tensor then reports it).
std::optional<int64_t> stored_size(const io::WeightLoader& weights, const std::string& name, std::size_t rank,
                                   std::size_t dim) {
  const auto shape = weights.shape_of(name);
  if (!shape || shape->size() != rank) return std::nullopt;
  return (*shape)[dim];
}

// Number of nn.TransformerEncoder/DecoderLayer modules in the checkpoint: one more than the
// highest index under `<prefix>layers.`. Gaps are left for take() to report as missing keys, and
// a stack with no layer at all still builds layer 0, so that its keys are reported too. Indices
// beyond 999 are not counted (their keys end up "unexpected"), so that a corrupt key cannot make
// the loader build, and report, a million missing layers.
int64_t count_layers(const io::WeightLoader& weights, const std::string& stack_prefix) {
  const std::string prefix = stack_prefix + "layers.";
  int64_t count = 1;
  for (const auto& name : weights.weights().keys()) {
    if (!io::starts_with(name, prefix)) continue;
    const auto end = name.find('.', prefix.size());
    const auto index =
        name.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
    if (index.empty() || index.size() > 3 || index.find_first_not_of("0123456789") != std::string::npos)
      continue;
    count = std::max<int64_t>(count, std::stoll(index) + 1);
  }
  return count;
}

void validate_options(const MapperOptions& options) {
  if (options.nhead <= 0)
    throw ArgumentError("voken mapper: nhead must be positive, got " + std::to_string(options.nhead));
  if (options.img_token_num <= 0)
    throw ArgumentError("voken mapper: img_token_num must be positive, got " +
                        std::to_string(options.img_token_num));
}

VokenMapper load_strict(const io::StateDict& checkpoint, const MapperOptions& options,
                        const std::string& what) {
  validate_options(options);
  bool has_mapper_keys = false;
  for (const auto& name : checkpoint.keys())
    has_mapper_keys = has_mapper_keys || io::starts_with(name, kFcPrefix) ||
                      io::starts_with(name, kTransformerPrefix) || name == kDecoderPromptKey;
  if (!has_mapper_keys)
    throw WeightsError(what +
                       ": no voken mapper weights (fc.*, llm_to_t2i_mapping.*, t2i_decoder_prompt) in " +
                       checkpoint.origin() + "; expected a MiniGPT-5 stage-1 or stage-2 checkpoint");
  io::WeightLoader weights(checkpoint, options.weights, what);
  // Other components' keys (LLM embeddings, LoRA, ...) share the checkpoint.
  weights.ignore(std::string("^(?!") + "fc\\.|llm_to_t2i_mapping\\.|t2i_decoder_prompt$)");
  VokenMapper mapper(options, weights);
  weights.finish(/*strict=*/true);
  return mapper;
}

}  // namespace

MapperOptions MapperOptions::from_json(const io::JsonView& mapper) {
  MapperOptions options;
  options.nhead = mapper.get_or<int64_t>("nhead", options.nhead);
  options.img_token_num = mapper.get_or<int64_t>("img_token_num", options.img_token_num);
  if (options.nhead <= 0)
    throw ConfigError(mapper.source() + ": field 'nhead' must be positive, got " +
                      std::to_string(options.nhead));
  if (options.img_token_num <= 0)
    throw ConfigError(mapper.source() + ": field 'img_token_num' must be positive, got " +
                      std::to_string(options.img_token_num));
  return options;
}

io::StateDict overlay_state_dicts(const io::StateDict& stage1, const io::StateDict& stage2) {
  io::StateDict merged = stage2.with_prefix("");
  for (const auto& name : stage1.keys())
    if (!merged.contains(name)) merged.insert(name, stage1.at(name), stage1.source_of(name));
  return merged;
}

VokenMapper::VokenMapper(const MapperOptions& options, io::WeightLoader& weights) {
  validate_options(options);
  nhead_ = options.nhead;
  img_token_num_ = options.img_token_num;

  // Sizes from the weights; -1 (unknown) when the tensor that tells is absent or malformed,
  // which take() then reports.
  const std::string fc0 = std::string(kFcPrefix) + "0.weight";
  const std::string transformer = kTransformerPrefix;
  llm_dim_ = stored_size(weights, fc0, 2, 1).value_or(-1);
  sd_dim_ =
      stored_size(weights, fc0, 2, 0)
          .value_or(
              stored_size(weights, kDecoderPromptKey, 3, 2)
                  .value_or(stored_size(weights, transformer + "encoder.norm.weight", 1, 0).value_or(-1)));
  prompt_len_ = stored_size(weights, kDecoderPromptKey, 3, 1).value_or(-1);
  ffn_dim_ =
      stored_size(weights, transformer + "encoder.layers.0.linear1.weight", 2, 0)
          .value_or(stored_size(weights, transformer + "decoder.layers.0.linear1.weight", 2, 0).value_or(-1));
  if (sd_dim_ > 0 && sd_dim_ % nhead_ != 0)
    throw ArgumentError("voken mapper: nhead " + std::to_string(nhead_) +
                        " does not divide the model width " + std::to_string(sd_dim_) +
                        " (from the weights' fc.0.weight / t2i_decoder_prompt)");
  head_dim_ = sd_dim_ > 0 ? sd_dim_ / nhead_ : 0;

  fc_in_ = take_linear(weights, std::string(kFcPrefix) + "0", sd_dim_, llm_dim_);
  fc_out_ = take_linear(weights, std::string(kFcPrefix) + "2", sd_dim_, sd_dim_);
  decoder_prompt_ = weights.take(kDecoderPromptKey, {1, prompt_len_, sd_dim_});

  const int64_t encoder_layers = count_layers(weights, transformer + "encoder.");
  for (int64_t i = 0; i < encoder_layers; ++i) {
    const std::string layer = transformer + "encoder.layers." + std::to_string(i) + ".";
    EncoderLayer block;
    block.self_attn = take_attention(weights, layer + "self_attn");
    block.linear1 = take_linear(weights, layer + "linear1", ffn_dim_, sd_dim_);
    block.linear2 = take_linear(weights, layer + "linear2", sd_dim_, ffn_dim_);
    block.norm1 = take_norm(weights, layer + "norm1");
    block.norm2 = take_norm(weights, layer + "norm2");
    encoder_.push_back(std::move(block));
  }
  encoder_norm_ = take_norm(weights, transformer + "encoder.norm");

  const int64_t decoder_layers = count_layers(weights, transformer + "decoder.");
  for (int64_t i = 0; i < decoder_layers; ++i) {
    const std::string layer = transformer + "decoder.layers." + std::to_string(i) + ".";
    DecoderLayer block;
    block.self_attn = take_attention(weights, layer + "self_attn");
    block.cross_attn = take_attention(weights, layer + "multihead_attn");
    block.linear1 = take_linear(weights, layer + "linear1", ffn_dim_, sd_dim_);
    block.linear2 = take_linear(weights, layer + "linear2", sd_dim_, ffn_dim_);
    block.norm1 = take_norm(weights, layer + "norm1");
    block.norm2 = take_norm(weights, layer + "norm2");
    block.norm3 = take_norm(weights, layer + "norm3");
    decoder_.push_back(std::move(block));
  }
  decoder_norm_ = take_norm(weights, transformer + "decoder.norm");
}

VokenMapper VokenMapper::load(const io::StateDict& checkpoint, const MapperOptions& options) {
  return load_strict(checkpoint, options, "voken mapper (" + checkpoint.origin() + ")");
}

VokenMapper VokenMapper::load(const std::string& stage1_path, const std::string& stage2_path,
                              const MapperOptions& options) {
  const auto stage1 = io::StateDict::load(stage1_path);
  if (stage2_path.empty()) return load_strict(stage1, options, "voken mapper (" + stage1_path + ")");
  const auto merged = overlay_state_dicts(stage1, io::StateDict::load(stage2_path));
  return load_strict(merged, options, "voken mapper (" + stage1_path + " with stage 2 " + stage2_path + ")");
}

VokenMapper::Linear VokenMapper::take_linear(io::WeightLoader& weights, const std::string& name, int64_t out,
                                             int64_t in) const {
  return {weights.take(name + ".weight", {out, in}), weights.take(name + ".bias", {out})};
}

VokenMapper::Norm VokenMapper::take_norm(io::WeightLoader& weights, const std::string& name) const {
  return {weights.take(name + ".weight", {sd_dim_}), weights.take(name + ".bias", {sd_dim_})};
}

VokenMapper::Attention VokenMapper::take_attention(io::WeightLoader& weights, const std::string& name) const {
  Attention attn;
  const int64_t packed = sd_dim_ > 0 ? 3 * sd_dim_ : -1;
  attn.qkv = {weights.take(name + ".in_proj_weight", {packed, sd_dim_}),
              weights.take(name + ".in_proj_bias", {packed})};
  attn.out = take_linear(weights, name + ".out_proj", sd_dim_, sd_dim_);
  if (attn.qkv.weight.size(0) == 3 * sd_dim_ && sd_dim_ > 0) {
    // Row slices of a contiguous matrix: contiguous views, no copies.
    attn.q = {attn.qkv.weight.narrow(0, 0, sd_dim_), attn.qkv.bias.narrow(0, 0, sd_dim_)};
    attn.kv = {attn.qkv.weight.narrow(0, sd_dim_, 2 * sd_dim_),
               attn.qkv.bias.narrow(0, sd_dim_, 2 * sd_dim_)};
  }
  return attn;
}

at::ScalarType VokenMapper::dtype() const { return decoder_prompt_.scalar_type(); }

at::Device VokenMapper::device() const { return decoder_prompt_.device(); }

at::Tensor VokenMapper::layer_norm(const at::Tensor& x, const Norm& norm) const {
  return at::layer_norm(x, {sd_dim_}, norm.weight, norm.bias, /*eps=*/1e-5);
}

at::Tensor VokenMapper::feed_forward(const at::Tensor& x, const Linear& linear1,
                                     const Linear& linear2) const {
  return at::linear(at::relu(at::linear(x, linear1.weight, linear1.bias)), linear2.weight, linear2.bias);
}

at::Tensor VokenMapper::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const {
  const int64_t batch = q.size(0);
  const int64_t query_len = q.size(1);
  // bf16 at a tier from avx2 up: the fused kernel, q times the scale rounded to bf16 first as
  // upstream's q / sqrt(head_dim) rounds it (a float product instead of a quotient: at most one
  // float ulp apart before that rounding), float32 scores and softmax.
  if (q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
      v.scalar_type() == at::kBFloat16 && core::cpu_tier() >= core::CpuTier::avx2 &&
      core::attention_supported(head_dim_, k.size(1), core::AttentionNumerics::ScaledQueryBf16) &&
      q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1)
    return core::attention(q, k, v, nhead_, 1.0 / std::sqrt(static_cast<double>(head_dim_)),
                           core::AttentionNumerics::ScaledQueryBf16);
  auto split_heads = [&](const at::Tensor& t) {
    return t.reshape({batch, t.size(1), nhead_, head_dim_}).transpose(1, 2);  // [B, h, T, hd]
  };
  // Scale q before the product, as torch's multi_head_attention_forward does.
  const auto q_scaled = split_heads(q).div(std::sqrt(static_cast<double>(head_dim_)));
  const auto scores = at::matmul(q_scaled, split_heads(k).transpose(-2, -1));
  const auto context = at::matmul(at::softmax(scores, -1), split_heads(v));
  return context.transpose(1, 2).reshape({batch, query_len, sd_dim_});
}

at::Tensor VokenMapper::self_attention(const at::Tensor& x, const Attention& attn) const {
  const auto qkv = at::linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, -1);
  return at::linear(attend(qkv[0], qkv[1], qkv[2]), attn.out.weight, attn.out.bias);
}

at::Tensor VokenMapper::cross_attention(const at::Tensor& x, const at::Tensor& memory,
                                        const Attention& attn) const {
  const auto q = at::linear(x, attn.q.weight, attn.q.bias);
  const auto kv = at::linear(memory, attn.kv.weight, attn.kv.bias).chunk(2, -1);
  return at::linear(attend(q, kv[0], kv[1]), attn.out.weight, attn.out.bias);
}

MapperOutputs VokenMapper::run(const at::Tensor& voken_hidden) const {
  if (!voken_hidden.defined()) throw ArgumentError("voken mapper: voken_hidden is an undefined tensor");
  if (voken_hidden.dim() != 3 || voken_hidden.size(2) != llm_dim_ || voken_hidden.size(0) < 1 ||
      voken_hidden.size(1) < 1)
    throw ArgumentError("voken mapper: voken_hidden must be [batch >= 1, tokens >= 1, " +
                        std::to_string(llm_dim_) + "], got " + io::shape_string(voken_hidden.sizes()));
  if (!at::isFloatingType(voken_hidden.scalar_type()))
    throw ArgumentError(std::string("voken mapper: voken_hidden must be a floating-point tensor, got ") +
                        c10::toString(voken_hidden.scalar_type()));

  MapperOutputs out;
  const auto x = voken_hidden.to(device(), dtype());
  out.fc_out = at::linear(at::gelu(at::linear(x, fc_in_.weight, fc_in_.bias)), fc_out_.weight, fc_out_.bias);

  // nn.TransformerEncoder, norm_first layers: x = x + sa(norm1(x)); x = x + ff(norm2(x)).
  auto src = out.fc_out;
  for (const auto& layer : encoder_) {
    src = src + self_attention(layer_norm(src, layer.norm1), layer.self_attn);
    src = src + feed_forward(layer_norm(src, layer.norm2), layer.linear1, layer.linear2);
  }
  out.memory = layer_norm(src, encoder_norm_);

  // nn.TransformerDecoder on the learned prompt (one copy per batch item), no masks.
  auto tgt = decoder_prompt_.expand({x.size(0), prompt_len_, sd_dim_});
  for (const auto& layer : decoder_) {
    tgt = tgt + self_attention(layer_norm(tgt, layer.norm1), layer.self_attn);
    tgt = tgt + cross_attention(layer_norm(tgt, layer.norm2), out.memory, layer.cross_attn);
    tgt = tgt + feed_forward(layer_norm(tgt, layer.norm3), layer.linear1, layer.linear2);
  }
  out.mapping_feature = layer_norm(tgt, decoder_norm_);
  return out;
}

MapperOutputs VokenMapper::forward(const at::Tensor& voken_hidden) const {
  c10::InferenceMode guard;
  return run(voken_hidden);
}

at::Tensor VokenMapper::map(const at::Tensor& voken_hidden) const {
  c10::InferenceMode guard;
  return run(voken_hidden).mapping_feature;
}

at::Tensor VokenMapper::negative(int64_t batch) const {
  c10::InferenceMode guard;
  if (batch < 1)
    throw ArgumentError("voken mapper: negative() batch must be >= 1, got " + std::to_string(batch));
  std::call_once(negative_cache_->once, [&] {
    const auto zeros =
        at::zeros({1, img_token_num_, llm_dim_}, at::TensorOptions().dtype(dtype()).device(device()));
    negative_cache_->value = run(zeros).mapping_feature;
  });
  const auto& single = negative_cache_->value;
  return batch == 1 ? single.clone() : single.expand({batch, prompt_len_, sd_dim_}).contiguous();
}

}  // namespace voken::mapping
