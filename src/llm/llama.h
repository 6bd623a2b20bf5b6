// LLaMA / Vicuna decoder (Hugging Face LlamaForCausalLM semantics, transformers 4.31 as pinned by
// MiniGPT-5), for inference on CPU:
//
//  - config from HF `config.json`, weights under HF key names from any checkpoint StateDict reads
//    (single file or shards, safetensors or torch `.bin`), plus the MiniGPT-5 adapters
//    (adapters.h): LoRA merged or unmerged, replaced embed_tokens/lm_head rows, prefix tuning;
//  - forward from token ids or from inputs_embeds (image features are spliced in as rows), giving
//    logits and the last-layer hidden states after the final norm (MiniGPT-5's
//    hidden_states[-1]) at every position;
//  - a KvCache preallocated to the needed length, so that a decode step costs one pass over the
//    weights plus attention over the cache, and a prefill is one batched pass;
//  - float32 or bfloat16 weights; activations, norms, rotary tables, attention and the cache are
//    float32 in both cases (see linear.h for the bf16 matrix products).
//
// Numerics follow HF: RMSNorm in float32, rotary cos/sin built in float32 from
// inv_freq = 1 / theta^(arange(0, d, 2) / d) (rotate_half layout), scores / sqrt(head_dim),
// causal mask, softmax in float32, grouped-query attention by kv-head sharing.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/json_file.h"
#include "io/state_dict.h"
#include "llm/adapters.h"

namespace voken::llm {

// The fields of HF LlamaConfig that define the computation. Dimensions are required (a config
// without them is not a LLaMA config, and HF's silent 7B defaults would only hide that); the
// rest default as in HF.
struct LlamaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // HF default: num_attention_heads (no GQA)
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  std::string source;  // the file it came from, for messages

  // Reads and validates (ConfigError naming file and field). Refuses what is not supported
  // instead of computing something else: hidden_act other than silu, rope_scaling, model_type
  // other than llama.
  static LlamaConfig from_json(const io::JsonView& json);
  static LlamaConfig from_file(const std::string& path);  // config.json
  // ConfigError when sizes are non-positive or inconsistent (hidden_size not divisible by
  // num_attention_heads, heads not divisible by kv heads, odd head_dim, ...).
  void validate() const;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

// Keys and values of every layer for `batch` sequences, preallocated for `capacity` positions
// (prefix-tuning rows included). Each layer holds [batch, kv_heads, capacity, head_dim] float32;
// positions [0, length) are filled. Move-only (copies would silently share the buffers); clone()
// makes an independent copy, e.g. to branch a conversation.
class KvCache {
 public:
  KvCache(int64_t num_layers, int64_t batch, int64_t kv_heads, int64_t capacity, int64_t head_dim);
  KvCache(KvCache&&) noexcept = default;
  KvCache& operator=(KvCache&&) noexcept = default;
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  KvCache clone() const;

  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t batch() const { return batch_; }
  int64_t num_layers() const { return static_cast<int64_t>(keys_.size()); }
  // Rows that came from prefix tuning (the first positions; truncate() never removes them).
  int64_t prefix_length() const { return prefix_length_; }

  // Forgets positions >= new_length (e.g. to re-run a step); ArgumentError outside
  // [prefix_length, length].
  void truncate(int64_t new_length);

  // For the model: the full buffers, and marking positions as filled.
  at::Tensor& keys(int64_t layer) { return keys_.at(static_cast<size_t>(layer)); }
  at::Tensor& values(int64_t layer) { return values_.at(static_cast<size_t>(layer)); }
  const at::Tensor& keys(int64_t layer) const { return keys_.at(static_cast<size_t>(layer)); }
  const at::Tensor& values(int64_t layer) const { return values_.at(static_cast<size_t>(layer)); }
  void advance(int64_t positions);
  void set_prefix_length(int64_t length);

 private:
  KvCache() = default;
  std::vector<at::Tensor> keys_;
  std::vector<at::Tensor> values_;
  int64_t batch_ = 0;
  int64_t capacity_ = 0;
  int64_t length_ = 0;
  int64_t prefix_length_ = 0;
};

// Which positions get lm_head logits (the vocabulary projection is the largest single matrix;
// a prefill usually needs only the last row).
enum class LogitsFor { All, Last, None };

struct LlamaOutput {
  at::Tensor logits;  // float32 [B, T, V] (All), [B, 1, V] (Last), undefined (None)
  at::Tensor hidden;  // float32 [B, T, H]: last layer after model.norm
};

struct LlamaLoadOptions {
  // Weight dtype: kFloat (default; fp16 checkpoints are widened) or kBFloat16 (bf16 checkpoints
  // stay memory-mapped without a copy).
  at::ScalarType dtype = at::kFloat;
  // A MiniGPT-5 checkpoint (.ckpt) or a PEFT adapter directory applied on top of the base model;
  // empty: none.
  std::string adapter_path;
  AdapterReadOptions adapter;
  // LoRA merged into the weights at load (default) or applied on the fly at every product.
  bool merge_lora = true;
  // libtorch's intra-op threads, set when loading: > 0 exactly that many; 0 $OMP_NUM_THREADS
  // when set, else one per core (Debian's libtorch starts with 1 thread on some machines).
  int num_threads = 0;
  // Unused tensors in the base checkpoint are errors (rotary inv_freq buffers are always allowed).
  bool strict = true;
};

class Llama {
 public:
  // Takes every weight from `weights` by its HF name with the shape `config` implies, then
  // applies `adapters`: replacements must have the shape of the tensor they replace (the
  // caller sets config.vocab_size to the checkpoint's rows when embed_tokens/lm_head are
  // replaced, as load() does); LoRA updates must match their weight; finish() reports all
  // problems at once.
  Llama(LlamaConfig config, io::WeightLoader& weights, const LlamaAdapters& adapters = {},
        bool merge_lora = true);

  // `model_dir`: an HF directory (config.json + model.safetensors[.index.json] or
  // pytorch_model.bin[.index.json]); options.adapter_path adds a MiniGPT-5 checkpoint.
  static Llama load(const std::string& model_dir, const LlamaLoadOptions& options = {});

  const LlamaConfig& config() const { return config_; }
  int64_t vocab_size() const { return config_.vocab_size; }
  int64_t hidden_size() const { return config_.hidden_size; }
  at::ScalarType weight_dtype() const { return weight_dtype_; }
  int64_t prefix_length() const { return prefix_length_; }
  bool has_unmerged_lora() const { return unmerged_lora_; }
  // Bytes of all weights held (as stored: bf16 counts 2 per element).
  std::size_t weight_bytes() const;
  // Bytes read from weights per decoded token (every layer, final norm, lm_head; one embedding row).
  std::size_t weight_bytes_per_token() const;

  // Token ids [B, T] (or [T]) of any integer dtype -> embeddings [B, T, H] float32.
  // ArgumentError for ids outside [0, vocab_size).
  at::Tensor embed(const at::Tensor& input_ids) const;

  // An empty cache for `batch` sequences of up to `max_positions` positions (prompt + generated),
  // with the prefix-tuning rows (if any) already in place. ArgumentError when prefix +
  // max_positions exceeds max_position_embeddings.
  KvCache new_cache(int64_t batch, int64_t max_positions) const;

  // Runs input positions [cache.length(), cache.length() + T) and appends their keys/values to
  // the cache. Without a cache: a fresh sequence (prefix rows included). ArgumentError for bad
  // ids, shapes, batch mismatch, or when the positions do not fit the cache or the context.
  LlamaOutput forward(const at::Tensor& input_ids, KvCache* cache = nullptr,
                      LogitsFor logits = LogitsFor::All) const;
  // inputs_embeds: [B, T, H] (or [T, H]), any float dtype (computed in float32).
  LlamaOutput forward_embeds(const at::Tensor& inputs_embeds, KvCache* cache = nullptr,
                             LogitsFor logits = LogitsFor::All) const;

  // lm_head over hidden states [..., H] float32 -> [..., V] float32.
  at::Tensor lm_head(const at::Tensor& hidden) const;

  // The effective weight under its HF name (merged LoRA and replacements included), e.g.
  // "model.layers.0.self_attn.q_proj.weight"; ArgumentError for an unknown name.
  at::Tensor weight(const std::string& name) const;

 private:
  struct Projection {
    at::Tensor weight;               // [out, in], float32 or bf16
    std::optional<LoraUpdate> lora;  // when not merged
    at::Tensor apply(const at::Tensor& x) const;
  };
  struct Layer {
    at::Tensor input_norm, post_attention_norm;  // float32 [H]
    Projection q, k, v, o, gate, up, down;
    at::Tensor prefix_keys, prefix_values;  // [kv_heads, P, head_dim] float32, or undefined
  };

  at::Tensor run_layers(at::Tensor x, KvCache& cache) const;
  LlamaOutput finish(const at::Tensor& hidden, LogitsFor logits) const;
  void check_fits(int64_t batch, int64_t positions, const KvCache* cache) const;
  Projection* find_projection(const std::string& name);

  LlamaConfig config_;
  at::ScalarType weight_dtype_ = at::kFloat;
  at::Tensor embed_tokens_;  // [V, H]
  at::Tensor final_norm_;    // [H] float32
  at::Tensor lm_head_;       // [V, H] (the embedding itself when tied)
  std::vector<Layer> layers_;
  at::Tensor rope_cos_, rope_sin_;  // [max_position_embeddings, head_dim] float32
  int64_t prefix_length_ = 0;
  bool unmerged_lora_ = false;
};

}  // namespace voken::llm
