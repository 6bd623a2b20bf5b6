// What a MiniGPT-5 checkpoint adds to the base LLaMA/Vicuna weights:
//
//  - PEFT LoRA (stage 2): `…<module>.lora_A[.default].weight` [r, in] and `lora_B` [out, r] for
//    q_proj/v_proj; the effective weight is W + (lora_alpha / r) * B @ A (dropout is inactive
//    at inference). Merged into the base weights at load by default, or applied on the fly.
//  - Whole-weight replacements: PEFT `modules_to_save` copies of embed_tokens/lm_head (stage 2,
//    `…embed_tokens.modules_to_save[.default].weight`) or the plain trained embed_tokens/lm_head
//    of a stage-1 checkpoint. MiniGPT-5 resizes the vocabulary for its added tokens ([IMG0..7],
//    <ImageHere>) before training, so these carry more rows than the base model and replace the
//    base tensors wholesale.
//  - PEFT prefix tuning (`PrefixEncoder`, optional in MiniGPT-5: `model.prefix_encoder.*`):
//    num_virtual_tokens learned key/value rows per layer, put in front of every sequence as
//    past key/values (no rotary embedding is applied to them; they occupy the first positions,
//    as in Hugging Face's LlamaModel with past_key_values and no explicit position_ids).
//
// Key layouts read: MiniGPT-5's Lightning `.ckpt` (`state_dict` with the LLaMA under
// `model.llama_model.` and, with LoRA, PEFT's `base_model.model.` wrapper below it) and a PEFT
// adapter directory (`adapter_config.json` + `adapter_model.safetensors`/`.bin`, keys under
// `base_model.model.`, no `.default` segment).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/json_file.h"
#include "io/state_dict.h"

namespace voken::llm {

// The PEFT LoraConfig fields that matter at inference.
struct LoraConfig {
  // Rank. 0: taken from the weights (rows of lora_A); otherwise every adapter must have this rank.
  int64_t r = 0;
  // Scaling numerator (scaling = lora_alpha / r). MiniGPT-5 hard-codes r=8, lora_alpha=16 and
  // its checkpoints do not record them, so 16 is the default here; a PEFT adapter_config.json
  // overrides it.
  double lora_alpha = 16.0;
  // Module names (last path segment, e.g. "q_proj") allowed to carry LoRA weights; empty: any.
  std::vector<std::string> target_modules;

  // PEFT adapter_config.json: r, lora_alpha, target_modules (a list; a regex string is refused),
  // fan_in_fan_out (must be false for LLaMA), peft_type (must be LORA when present).
  static LoraConfig from_json(const io::JsonView& json);
};

// One low-rank update of a linear weight W [out, in]: W_eff = W + scaling * B @ A.
struct LoraUpdate {
  at::Tensor a;  // [r, in], float32
  at::Tensor b;  // [out, r], float32
  double scaling = 1.0;

  int64_t rank() const { return a.size(0); }
  at::Tensor delta() const;  // scaling * B @ A, float32 [out, in]
};

// PEFT PrefixEncoder weights. With projection (MiniGPT-5): Embedding(P, token_dim) ->
// Linear(token_dim, encoder_hidden) -> Tanh -> Linear(encoder_hidden, layers*2*kv_dim);
// without: Embedding(P, layers*2*kv_dim) directly.
struct PrefixEncoder {
  at::Tensor embedding;                   // [P, token_dim] or [P, layers*2*kv_dim]
  at::Tensor hidden_weight, hidden_bias;  // transform.0, undefined without projection
  at::Tensor output_weight, output_bias;  // transform.2, undefined without projection

  int64_t num_virtual_tokens() const { return embedding.size(0); }
  bool has_projection() const { return hidden_weight.defined(); }
  // The per-layer past keys and values, each [kv_heads, P, head_dim] float32, laid out as
  // MiniGPT-5's get_prompt does: view(P, layers*2, kv_heads, head_dim), layer l's key is slice
  // 2l and its value slice 2l+1. ConfigError when the encoder's output size does not match.
  std::vector<std::pair<at::Tensor, at::Tensor>> key_values(int64_t num_layers, int64_t kv_heads,
                                                            int64_t head_dim) const;
};

// Everything read from an adapter checkpoint, keyed by Hugging Face LLaMA weight names
// (e.g. "model.layers.0.self_attn.q_proj.weight").
struct LlamaAdapters {
  std::map<std::string, at::Tensor> replacements;  // whole tensors replacing the base ones, as stored
  std::map<std::string, LoraUpdate> lora;          // low-rank updates of base weights
  std::optional<PrefixEncoder> prefix;
  std::string source;  // where they came from, for errors

  bool empty() const { return replacements.empty() && lora.empty() && !prefix; }
};

struct AdapterReadOptions {
  // Where the LLaMA's own keys start inside the checkpoint (MiniGPT-5: the Lightning module's
  // `model` is MiniGPT5, whose `llama_model` is the LLaMA or its PEFT wrapper).
  std::string llama_prefix = "model.llama_model.";
  // Where MiniGPT5.prefix_encoder's keys start.
  std::string prefix_encoder_prefix = "model.prefix_encoder.";
  LoraConfig lora;
};

// Reads the LLM adapters from a checkpoint's tensors. Keys outside the two prefixes (the voken
// mapper, fc, ...) belong to other components and are ignored. Under the prefixes every key must
// be understood: unknown keys, a lora_A without its lora_B, ranks that disagree (with each other
// or with LoraConfig::r) are all listed in one WeightsError. LoRA factors and the
// prefix encoder are converted to float32; whole-weight replacements stay as stored (the model
// converts them once, to its own dtype).
LlamaAdapters read_llama_adapters(const io::StateDict& checkpoint, const AdapterReadOptions& options = {});

// `path`: a MiniGPT-5 checkpoint (Lightning .ckpt or any file StateDict reads), or a PEFT adapter
// directory (adapter_config.json supplies the LoraConfig, keys need no llama_prefix).
LlamaAdapters load_llama_adapters(const std::string& path, const AdapterReadOptions& options = {});

}  // namespace voken::llm
