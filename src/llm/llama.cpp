#include "llm/llama.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <set>

#include "core/parallel.h"
#include "io/state_dict.h"
#include "io/tensor_bytes.h"
#include "llm/linear.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

std::string regex_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

// HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then times the weight, in float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor variance = x.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x * at::rsqrt(variance + eps));
}

// HF apply_rotary_pos_emb with rotate_half: x * cos + cat(-x2, x1) * sin.
// x: [B, heads, T, head_dim]; cos/sin: [T, head_dim].
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

void require(bool ok, const std::string& source, const std::string& message) {
  if (!ok) throw ConfigError(source + ": " + message);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// LlamaConfig

LlamaConfig LlamaConfig::from_json(const io::JsonView& json) {
  LlamaConfig c;
  c.source = json.source();
  if (json.has("model_type")) {
    const auto type = json.get<std::string>("model_type");
    require(type == "llama", c.source, "model_type is '" + type + "', expected 'llama'");
  }
  c.vocab_size = json.get<int64_t>("vocab_size");
  c.hidden_size = json.get<int64_t>("hidden_size");
  c.intermediate_size = json.get<int64_t>("intermediate_size");
  c.num_hidden_layers = json.get<int64_t>("num_hidden_layers");
  c.num_attention_heads = json.get<int64_t>("num_attention_heads");
  c.num_key_value_heads = json.get_or<int64_t>("num_key_value_heads", c.num_attention_heads);
  c.max_position_embeddings = json.get_or<int64_t>("max_position_embeddings", c.max_position_embeddings);
  c.rms_norm_eps = json.get_or<double>("rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = json.get_or<double>("rope_theta", c.rope_theta);
  c.tie_word_embeddings = json.get_or<bool>("tie_word_embeddings", c.tie_word_embeddings);
  // Token ids are informational here; configs sometimes hold lists or nulls, which are skipped.
  const std::initializer_list<std::pair<const char*, int64_t*>> token_fields = {
      {"bos_token_id", &c.bos_token_id}, {"eos_token_id", &c.eos_token_id}};
  for (const auto& [key, field] : token_fields)
    if (json.has(key) && json.json().at(key).is_number_integer()) *field = json.get<int64_t>(key);
  const auto act = json.get_or<std::string>("hidden_act", "silu");
  require(act == "silu", c.source, "hidden_act '" + act + "' is not supported (LLaMA uses 'silu')");
  require(!json.has("rope_scaling"), c.source,
          "rope_scaling " + (json.has("rope_scaling") ? json.json().at("rope_scaling").dump() : "") +
              " is not supported (only plain rotary embeddings)");
  c.validate();
  return c;
}

LlamaConfig LlamaConfig::from_file(const std::string& path) {
  const io::Json json = io::read_json_file(path);
  return from_json(io::JsonView(json, path));
}

void LlamaConfig::validate() const {
  const std::string& s = source.empty() ? std::string("LLaMA config") : source;
  const std::initializer_list<std::pair<const char*, int64_t>> sizes = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"max_position_embeddings", max_position_embeddings}};
  for (const auto& [name, value] : sizes)
    require(value > 0, s, std::string(name) + " must be positive, got " + std::to_string(value));
  require(rms_norm_eps > 0, s, "rms_norm_eps must be positive, got " + std::to_string(rms_norm_eps));
  require(rope_theta > 0, s, "rope_theta must be positive, got " + std::to_string(rope_theta));
  require(hidden_size % num_attention_heads == 0, s,
          "hidden_size " + std::to_string(hidden_size) + " is not divisible by num_attention_heads " +
              std::to_string(num_attention_heads));
  require(num_attention_heads % num_key_value_heads == 0, s,
          "num_attention_heads " + std::to_string(num_attention_heads) +
              " is not divisible by num_key_value_heads " + std::to_string(num_key_value_heads));
  require(head_dim() % 2 == 0, s,
          "head_dim (hidden_size / num_attention_heads) = " + std::to_string(head_dim()) +
              " must be even for rotary embeddings");
}

// ---------------------------------------------------------------------------------------------
// KvCache

KvCache::KvCache(int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t capacity, int64_t head_dim)
    : batch_(batch), capacity_(capacity) {
  if (num_layers <= 0 || batch <= 0 || kv_heads <= 0 || capacity <= 0 || head_dim <= 0)
    throw ArgumentError("KvCache: every size must be positive (layers " + std::to_string(num_layers) +
                        ", batch " + std::to_string(batch) + ", kv heads " + std::to_string(kv_heads) +
                        ", capacity " + std::to_string(capacity) + ", head_dim " + std::to_string(head_dim) +
                        ")");
  c10::InferenceMode guard;
  for (int64_t l = 0; l < num_layers; ++l) {
    keys_.push_back(at::empty({batch, kv_heads, capacity, head_dim}, at::kFloat));
    values_.push_back(at::empty({batch, kv_heads, capacity, head_dim}, at::kFloat));
  }
}

KvCache KvCache::clone() const {
  c10::InferenceMode guard;
  KvCache copy;
  for (const auto& k : keys_) copy.keys_.push_back(k.clone());
  for (const auto& v : values_) copy.values_.push_back(v.clone());
  copy.batch_ = batch_;
  copy.capacity_ = capacity_;
  copy.length_ = length_;
  copy.prefix_length_ = prefix_length_;
  return copy;
}

void KvCache::truncate(int64_t new_length) {
  if (new_length < prefix_length_ || new_length > length_)
    throw ArgumentError("KvCache::truncate(" + std::to_string(new_length) + "): must lie in [" +
                        std::to_string(prefix_length_) + ", " + std::to_string(length_) + "]");
  length_ = new_length;
}

void KvCache::advance(int64_t positions) {
  if (positions < 0 || length_ + positions > capacity_)
    throw ArgumentError("KvCache::advance(" + std::to_string(positions) + "): " + std::to_string(length_) +
                        " of " + std::to_string(capacity_) + " positions used");
  length_ += positions;
}

void KvCache::set_prefix_length(int64_t length) {
  if (length < 0 || length > capacity_)
    throw ArgumentError("KvCache::set_prefix_length(" + std::to_string(length) + "): capacity is " +
                        std::to_string(capacity_));
  prefix_length_ = length;
  length_ = length;
}

// ---------------------------------------------------------------------------------------------
// Llama

at::Tensor Llama::Projection::apply(const at::Tensor& x) const {
  at::Tensor y = dense(x, weight);
  // PEFT LoraLayer: result + lora_B(lora_A(x)) * scaling (dropout is off at inference).
  if (lora) y = y + at::linear(at::linear(x, lora->a), lora->b) * lora->scaling;
  return y;
}

Llama::Llama(LlamaConfig config, io::WeightLoader& weights, const LlamaAdapters& adapters, bool merge_lora)
    : config_(std::move(config)) {
  c10::InferenceMode guard;
  config_.validate();
  const int64_t hidden = config_.hidden_size;
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t head_dim = config_.head_dim();
  const int64_t inter = config_.intermediate_size;
  const int64_t vocab = config_.vocab_size;

  // Problems found here (adapters) are reported together with the loader's.
  std::vector<std::string> problems;
  std::set<std::string> used_replacements;
  // Matrices stay float32 or bf16 (what dense() computes with); anything else becomes float32.
  auto matrix_dtype = [](at::Tensor t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ? t : t.to(at::kFloat);
  };
  auto take = [&](const std::string& name, const std::vector<int64_t>& shape) {
    const auto it = adapters.replacements.find(name);
    if (it == adapters.replacements.end()) return matrix_dtype(weights.take(name, shape));
    used_replacements.insert(name);
    if (weights.contains(name)) weights.ignore("^" + regex_escape(name) + "$");
    if (!it->second.sizes().equals(shape))
      problems.push_back("replacement " + name + " from " + adapters.source + ": expected " +
                         io::shape_string(shape) + ", found " + io::shape_string(it->second.sizes()));
    return matrix_dtype(io::convert_weight(it->second, weights.options()));
  };
  auto take_norm = [&](const std::string& name) { return take(name, {hidden}).to(at::kFloat); };

  weights.ignore(R"(^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$)");
  embed_tokens_ = take("model.embed_tokens.weight", {vocab, hidden});
  for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Layer layer;
    layer.input_norm = take_norm(p + "input_layernorm.weight");
    layer.post_attention_norm = take_norm(p + "post_attention_layernorm.weight");
    layer.q.weight = take(p + "self_attn.q_proj.weight", {heads * head_dim, hidden});
    layer.k.weight = take(p + "self_attn.k_proj.weight", {kv_heads * head_dim, hidden});
    layer.v.weight = take(p + "self_attn.v_proj.weight", {kv_heads * head_dim, hidden});
    layer.o.weight = take(p + "self_attn.o_proj.weight", {hidden, heads * head_dim});
    layer.gate.weight = take(p + "mlp.gate_proj.weight", {inter, hidden});
    layer.up.weight = take(p + "mlp.up_proj.weight", {inter, hidden});
    layer.down.weight = take(p + "mlp.down_proj.weight", {hidden, inter});
    layers_.push_back(std::move(layer));
  }
  final_norm_ = take_norm("model.norm.weight");
  if (config_.tie_word_embeddings && !adapters.replacements.count("lm_head.weight")) {
    // HF ties lm_head to the embedding; a stored lm_head.weight is the same tensor.
    lm_head_ = embed_tokens_;
    weights.ignore(R"(^lm_head\.weight$)");
  } else {
    lm_head_ = take("lm_head.weight", {vocab, hidden});
  }
  weight_dtype_ = layers_.front().q.weight.scalar_type();

  for (const auto& [name, tensor] : adapters.replacements)
    if (!used_replacements.count(name))
      problems.push_back("replacement " + name + " " + io::shape_string(tensor.sizes()) + " from " +
                         adapters.source + ": the model has no such weight");

  for (const auto& [name, update] : adapters.lora) {
    Projection* projection = find_projection(name);
    if (projection == nullptr) {
      problems.push_back("LoRA update for " + name + " from " + adapters.source +
                         ": not a linear weight of this model");
      continue;
    }
    const int64_t out = projection->weight.size(0);
    const int64_t in = projection->weight.size(1);
    if (update.a.dim() != 2 || update.b.dim() != 2 || update.a.size(1) != in || update.b.size(0) != out ||
        update.b.size(1) != update.a.size(0)) {
      problems.push_back("LoRA update for " + name + " from " + adapters.source + ": lora_A " +
                         io::shape_string(update.a.sizes()) + " and lora_B " +
                         io::shape_string(update.b.sizes()) + " do not fit a [" + std::to_string(out) + ", " +
                         std::to_string(in) + "] weight");
      continue;
    }
    if (merge_lora) {
      const auto dtype = projection->weight.scalar_type();
      projection->weight = (projection->weight.to(at::kFloat) + update.delta()).to(dtype);
    } else {
      projection->lora = update;
      unmerged_lora_ = true;
    }
  }

  if (adapters.prefix) {
    try {
      const auto kv = adapters.prefix->key_values(config_.num_hidden_layers, kv_heads, head_dim);
      for (size_t i = 0; i < layers_.size(); ++i) {
        layers_[i].prefix_keys = kv[i].first;
        layers_[i].prefix_values = kv[i].second;
      }
      prefix_length_ = adapters.prefix->num_virtual_tokens();
      if (prefix_length_ >= config_.max_position_embeddings)
        problems.push_back("prefix tuning has " + std::to_string(prefix_length_) +
                           " virtual tokens, max_position_embeddings is " +
                           std::to_string(config_.max_position_embeddings));
    } catch (const ConfigError& e) {
      problems.push_back(std::string("prefix encoder from ") + adapters.source + ": " + e.what());
    }
  }

  std::string loader_message;
  try {
    weights.finish();
  } catch (const WeightsError& e) {
    loader_message = e.what();
  }
  if (!loader_message.empty() || !problems.empty()) {
    std::string message = loader_message.empty() ? "LLaMA: weights do not match the model" : loader_message;
    if (!problems.empty()) {
      message += "\n  adapter problems (" + std::to_string(problems.size()) + "):";
      for (const auto& p : problems) message += "\n    " + p;
    }
    throw WeightsError(message);
  }

  // Rotary tables exactly as HF LlamaRotaryEmbedding builds them (float32 throughout).
  const at::Tensor inv_freq = at::reciprocal(
      at::pow(config_.rope_theta, at::arange(0, head_dim, 2, at::kFloat) / static_cast<double>(head_dim)));
  const at::Tensor t = at::arange(config_.max_position_embeddings, at::kFloat);
  const at::Tensor freqs = at::outer(t, inv_freq);
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  rope_cos_ = emb.cos();
  rope_sin_ = emb.sin();
}

Llama Llama::load(const std::string& model_dir, const LlamaLoadOptions& options) {
  if (options.dtype != at::kFloat && options.dtype != at::kBFloat16)
    throw ArgumentError("LlamaLoadOptions::dtype must be float32 or bfloat16, got " +
                        std::string(c10::toString(options.dtype)));
  core::set_intra_op_threads(options.num_threads, "LlamaLoadOptions::num_threads");
  LlamaConfig config = LlamaConfig::from_file(model_dir + "/config.json");
  LlamaAdapters adapters;
  if (!options.adapter_path.empty()) adapters = load_llama_adapters(options.adapter_path, options.adapter);

  // MiniGPT-5 resized the vocabulary before training: its embed_tokens/lm_head define the rows.
  const auto embed = adapters.replacements.find("model.embed_tokens.weight");
  const auto head = adapters.replacements.find("lm_head.weight");
  const bool has_embed = embed != adapters.replacements.end();
  const bool has_head = head != adapters.replacements.end();
  if (has_embed && has_head && embed->second.size(0) != head->second.size(0))
    throw WeightsError(adapters.source + ": embed_tokens has " + std::to_string(embed->second.size(0)) +
                       " rows but lm_head has " + std::to_string(head->second.size(0)));
  if (has_embed)
    config.vocab_size = embed->second.size(0);
  else if (has_head)
    config.vocab_size = head->second.size(0);

  io::WeightOptions weight_options;
  weight_options.float_dtype = options.dtype;
  io::WeightLoader loader(io::StateDict::load(model_dir), weight_options, "LLaMA (" + model_dir + ")");
  if (!options.strict) loader.ignore(".*");
  return Llama(std::move(config), loader, adapters, options.merge_lora);
}

Llama::Projection* Llama::find_projection(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return nullptr;
  std::size_t end = 0;
  int64_t index = -1;
  try {
    index = std::stoll(name.substr(prefix.size()), &end);
  } catch (const std::exception&) {
    return nullptr;
  }
  if (index < 0 || index >= static_cast<int64_t>(layers_.size())) return nullptr;
  const std::string rest = name.substr(prefix.size() + end);
  Layer& layer = layers_[static_cast<size_t>(index)];
  const std::pair<const char*, Projection*> table[] = {
      {".self_attn.q_proj.weight", &layer.q}, {".self_attn.k_proj.weight", &layer.k},
      {".self_attn.v_proj.weight", &layer.v}, {".self_attn.o_proj.weight", &layer.o},
      {".mlp.gate_proj.weight", &layer.gate}, {".mlp.up_proj.weight", &layer.up},
      {".mlp.down_proj.weight", &layer.down}};
  for (const auto& [suffix, projection] : table)
    if (rest == suffix) return projection;
  return nullptr;
}

at::Tensor Llama::weight(const std::string& name) const {
  c10::InferenceMode guard;
  if (name == "model.embed_tokens.weight") return embed_tokens_;
  if (name == "lm_head.weight") return lm_head_;
  if (name == "model.norm.weight") return final_norm_;
  const Projection* projection = const_cast<Llama*>(this)->find_projection(name);
  if (projection != nullptr) {
    if (!projection->lora) return projection->weight;
    return (projection->weight.to(at::kFloat) + projection->lora->delta())
        .to(projection->weight.scalar_type());
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    if (name == p + "input_layernorm.weight") return layers_[i].input_norm;
    if (name == p + "post_attention_layernorm.weight") return layers_[i].post_attention_norm;
  }
  throw ArgumentError("Llama::weight: no weight named '" + name + "'");
}

std::size_t Llama::weight_bytes() const {
  auto bytes = [](const at::Tensor& t) { return static_cast<std::size_t>(t.numel()) * t.element_size(); };
  std::size_t total = bytes(embed_tokens_) + bytes(final_norm_);
  if (!lm_head_.is_same(embed_tokens_)) total += bytes(lm_head_);
  for (const auto& layer : layers_) {
    total += bytes(layer.input_norm) + bytes(layer.post_attention_norm);
    for (const Projection* p :
         {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
      total += bytes(p->weight);
      if (p->lora) total += bytes(p->lora->a) + bytes(p->lora->b);
    }
  }
  return total;
}

std::size_t Llama::weight_bytes_per_token() const {
  auto bytes = [](const at::Tensor& t) { return static_cast<std::size_t>(t.numel()) * t.element_size(); };
  std::size_t total = weight_bytes() - bytes(embed_tokens_) + bytes(embed_tokens_[0]);
  if (lm_head_.is_same(embed_tokens_)) total += bytes(lm_head_);
  return total;
}

at::Tensor Llama::embed(const at::Tensor& input_ids) const {
  c10::InferenceMode guard;
  if (!input_ids.defined() || !at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false))
    throw ArgumentError("Llama::embed: input_ids must be an integer tensor");
  if (input_ids.dim() != 1 && input_ids.dim() != 2)
    throw ArgumentError("Llama::embed: input_ids must be [T] or [B, T], got " +
                        io::shape_string(input_ids.sizes()));
  const at::Tensor ids = (input_ids.dim() == 1 ? input_ids.unsqueeze(0) : input_ids).to(at::kCPU, at::kLong);
  if (ids.numel() > 0) {
    const int64_t low = ids.min().item<int64_t>();
    const int64_t high = ids.max().item<int64_t>();
    if (low < 0 || high >= config_.vocab_size)
      throw ArgumentError("Llama::embed: token id " + std::to_string(low < 0 ? low : high) +
                          " is outside the vocabulary [0, " + std::to_string(config_.vocab_size) + ")");
  }
  return at::embedding(embed_tokens_, ids).to(at::kFloat);
}

KvCache Llama::new_cache(int64_t batch, int64_t max_positions) const {
  c10::InferenceMode guard;
  if (max_positions <= 0 || batch <= 0)
    throw ArgumentError("Llama::new_cache: batch and max_positions must be positive, got " +
                        std::to_string(batch) + " and " + std::to_string(max_positions));
  if (prefix_length_ + max_positions > config_.max_position_embeddings)
    throw ArgumentError(
        "Llama::new_cache: " + std::to_string(max_positions) + " positions" +
        (prefix_length_ ? " + " + std::to_string(prefix_length_) + " prefix-tuning rows" : "") +
        " exceed the context of " + std::to_string(config_.max_position_embeddings) +
        " (max_position_embeddings)");
  KvCache cache(config_.num_hidden_layers, batch, config_.num_key_value_heads, prefix_length_ + max_positions,
                config_.head_dim());
  if (prefix_length_ > 0) {
    for (size_t l = 0; l < layers_.size(); ++l) {
      cache.keys(static_cast<int64_t>(l))
          .narrow(2, 0, prefix_length_)
          .copy_(layers_[l].prefix_keys.unsqueeze(0));
      cache.values(static_cast<int64_t>(l))
          .narrow(2, 0, prefix_length_)
          .copy_(layers_[l].prefix_values.unsqueeze(0));
    }
    cache.set_prefix_length(prefix_length_);
  }
  return cache;
}

void Llama::check_fits(int64_t batch, int64_t positions, const KvCache* cache) const {
  if (cache == nullptr) {
    if (prefix_length_ + positions > config_.max_position_embeddings)
      throw ArgumentError(
          "Llama::forward: " + std::to_string(positions) + " positions" +
          (prefix_length_ ? " + " + std::to_string(prefix_length_) + " prefix-tuning rows" : "") +
          " exceed the context of " + std::to_string(config_.max_position_embeddings) +
          " (max_position_embeddings)");
    return;
  }
  const int64_t head_dim = config_.head_dim();
  if (cache->num_layers() != config_.num_hidden_layers ||
      !cache->keys(0).sizes().equals(
          {cache->batch(), config_.num_key_value_heads, cache->capacity(), head_dim}))
    throw ArgumentError("Llama::forward: the KvCache was not made for this model (" +
                        std::to_string(cache->num_layers()) + " layers of " +
                        io::shape_string(cache->keys(0).sizes()) + "); use Llama::new_cache");
  if (cache->batch() != batch)
    throw ArgumentError("Llama::forward: input batch " + std::to_string(batch) + " but the KvCache holds " +
                        std::to_string(cache->batch()) + " sequences");
  if (cache->length() + positions > cache->capacity() ||
      cache->length() + positions > config_.max_position_embeddings)
    throw ArgumentError("Llama::forward: " + std::to_string(positions) +
                        " new positions do not fit: the KvCache" + " holds " +
                        std::to_string(cache->length()) + " of " + std::to_string(cache->capacity()) +
                        " positions (context " + std::to_string(config_.max_position_embeddings) + ")");
}

LlamaOutput Llama::forward(const at::Tensor& input_ids, KvCache* cache, LogitsFor logits) const {
  c10::InferenceMode guard;
  return forward_embeds(embed(input_ids), cache, logits);
}

LlamaOutput Llama::forward_embeds(const at::Tensor& inputs_embeds, KvCache* cache, LogitsFor logits) const {
  c10::InferenceMode guard;
  if (!inputs_embeds.defined() || !at::isFloatingType(inputs_embeds.scalar_type()))
    throw ArgumentError("Llama::forward_embeds: inputs_embeds must be a floating-point tensor");
  if ((inputs_embeds.dim() != 2 && inputs_embeds.dim() != 3) || inputs_embeds.size(-1) != config_.hidden_size)
    throw ArgumentError("Llama::forward_embeds: inputs_embeds must be [B, T, " +
                        std::to_string(config_.hidden_size) + "] or [T, " +
                        std::to_string(config_.hidden_size) + "], got " +
                        io::shape_string(inputs_embeds.sizes()));
  at::Tensor x = (inputs_embeds.dim() == 2 ? inputs_embeds.unsqueeze(0) : inputs_embeds)
                     .to(at::kCPU, at::kFloat)
                     .contiguous();
  const int64_t batch = x.size(0);
  const int64_t positions = x.size(1);
  if (batch == 0 || positions == 0)
    throw ArgumentError("Llama::forward_embeds: empty input " + io::shape_string(inputs_embeds.sizes()));
  check_fits(batch, positions, cache);
  std::optional<KvCache> local;
  if (cache == nullptr) {
    local.emplace(new_cache(batch, positions));
    cache = &*local;
  }
  return finish(run_layers(std::move(x), *cache), logits);
}

at::Tensor Llama::run_layers(at::Tensor x, KvCache& cache) const {
  const int64_t batch = x.size(0);
  const int64_t steps = x.size(1);
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t group = heads / kv_heads;
  const int64_t head_dim = config_.head_dim();
  const int64_t start = cache.length();
  const int64_t total = start + steps;
  const double eps = config_.rms_norm_eps;
  const double scale = std::sqrt(static_cast<double>(head_dim));

  const at::Tensor cos = rope_cos_.narrow(0, start, steps);
  const at::Tensor sin = rope_sin_.narrow(0, start, steps);
  // Causal mask over [cache + new]: new position i (absolute start + i) sees keys j <= start + i.
  at::Tensor masked;
  if (steps > 1) masked = at::ones({steps, total}, at::kBool).triu(start + 1);

  // Projections of the same input (q/k/v, gate/up) in one pass over their weights (one parallel
  // region, x converted once); unmerged LoRA updates are added to each result as in apply().
  auto project = [](std::initializer_list<const Projection*> projections, const at::Tensor& input) {
    std::vector<at::Tensor> weights;
    for (const Projection* p : projections) weights.push_back(p->weight);
    std::vector<at::Tensor> ys = dense_many(input, weights);
    size_t i = 0;
    for (const Projection* p : projections) {
      if (p->lora) ys[i] = ys[i] + at::linear(at::linear(input, p->lora->a), p->lora->b) * p->lora->scaling;
      ++i;
    }
    return ys;
  };

  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    const int64_t li = static_cast<int64_t>(l);
    const at::Tensor h = rms_norm(x, layer.input_norm, eps);
    const auto qkv = project({&layer.q, &layer.k, &layer.v}, h);
    const at::Tensor q = apply_rotary(qkv[0].view({batch, steps, heads, head_dim}).transpose(1, 2), cos, sin);
    const at::Tensor k =
        apply_rotary(qkv[1].view({batch, steps, kv_heads, head_dim}).transpose(1, 2), cos, sin);
    const at::Tensor v = qkv[2].view({batch, steps, kv_heads, head_dim}).transpose(1, 2);
    cache.keys(li).narrow(2, start, steps).copy_(k);
    cache.values(li).narrow(2, start, steps).copy_(v);
    const at::Tensor keys = cache.keys(li).narrow(2, 0, total);
    const at::Tensor values = cache.values(li).narrow(2, 0, total);

    // Grouped-query attention without copying the cache: the `group` query heads sharing a kv
    // head (HF repeat_kv: head h uses kv head h / group) are stacked along the row dimension.
    const at::Tensor grouped_q = q.contiguous().view({batch, kv_heads, group * steps, head_dim});
    at::Tensor scores = at::matmul(grouped_q, keys.transpose(2, 3)).div_(scale);
    if (masked.defined())
      scores.view({batch, kv_heads, group, steps, total})
          .masked_fill_(masked, -std::numeric_limits<float>::infinity());
    const at::Tensor probs = at::softmax(scores, -1);
    const at::Tensor attended = at::matmul(probs, values)
                                    .view({batch, heads, steps, head_dim})
                                    .transpose(1, 2)
                                    .reshape({batch, steps, heads * head_dim});
    x = x + layer.o.apply(attended);

    const at::Tensor h2 = rms_norm(x, layer.post_attention_norm, eps);
    const auto gate_up = project({&layer.gate, &layer.up}, h2);
    x = x + layer.down.apply(at::silu(gate_up[0]) * gate_up[1]);
  }
  cache.advance(steps);
  return x;
}

at::Tensor Llama::lm_head(const at::Tensor& hidden) const {
  c10::InferenceMode guard;
  return dense(hidden.to(at::kFloat), lm_head_);
}

LlamaOutput Llama::finish(const at::Tensor& x, LogitsFor logits) const {
  LlamaOutput out;
  out.hidden = rms_norm(x, final_norm_, config_.rms_norm_eps);
  if (logits == LogitsFor::All)
    out.logits = dense(out.hidden, lm_head_);
  else if (logits == LogitsFor::Last)
    out.logits = dense(out.hidden.narrow(1, out.hidden.size(1) - 1, 1), lm_head_);
  return out;
}

}  // namespace voken::llm
