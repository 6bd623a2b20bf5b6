// The BLIP-2 Q-Former as MiniGPT-4/5 run it (minigpt4/models/Qformer.py, BertModel with
// query_embeds and no input_ids): learned query tokens -> embeddings LayerNorm -> BERT layers,
// each with self-attention over the queries, cross-attention to the image tokens in every
// `cross_attention_freq`-th layer, and the query feed-forward branch (intermediate_query /
// output_query). The text branch (word/position embeddings, intermediate/output) is never run
// by MiniGPT-4 and is not built.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/json_file.h"
#include "io/state_dict.h"

namespace voken::vision {

// BertConfig fields (bert-base-uncased + BLIP-2's init_Qformer additions). Sizes the weights
// tell are taken from them when the config leaves them out, and checked when it gives them.
struct QFormerConfig {
  std::optional<int64_t> hidden_size;        // unset: query_tokens (bert-base 768)
  std::optional<int64_t> num_hidden_layers;  // unset: layers present in the checkpoint (12)
  int64_t num_attention_heads = 12;
  std::optional<int64_t> intermediate_size;  // unset: intermediate_query.dense (3072)
  std::string hidden_act = "gelu";           // "gelu" (erf), "gelu_new"/"gelu_pytorch_tanh", "relu"
  double layer_norm_eps = 1e-12;
  std::optional<int64_t> encoder_width;  // unset: crossattention.self.key (ViT width 1408)
  bool add_cross_attention = true;
  int64_t cross_attention_freq = 2;
  std::optional<int64_t> query_length;  // number of query tokens; unset: query_tokens (32)

  // Field names as in BertConfig / the golden bundle's config.json object "qformer".
  static QFormerConfig from_json(const io::JsonView& qformer);
  void validate(const std::string& source = "QFormerConfig") const;
};

class QFormer {
 public:
  // Takes `query_tokens` and `<prefix>embeddings.LayerNorm.*`, `<prefix>encoder.layer.<i>.*`
  // (upstream key names; prefix "Qformer.bert." in BLIP-2 checkpoints). Missing or mis-shaped
  // keys are reported by the caller's loader.finish(); the text branch and other unused BLIP-2
  // tensors are marked as ignored on the loader.
  QFormer(const QFormerConfig& config, io::WeightLoader& weights,
          const std::string& prefix = "Qformer.bert.");

  // image_embeds [B, N, encoder_width] (after ln_vision) -> last_hidden_state [B, queries, hidden].
  // Every image token is attended to (MiniGPT-4's encoder_attention_mask is all ones).
  at::Tensor forward(const at::Tensor& image_embeds) const;

  int64_t hidden_size() const { return hidden_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t num_heads() const { return num_heads_; }
  int64_t intermediate_size() const { return intermediate_; }
  int64_t encoder_width() const { return encoder_width_; }
  int64_t num_query_tokens() const { return num_queries_; }
  std::vector<int64_t> cross_attention_layers() const;
  at::ScalarType dtype() const { return query_tokens_.scalar_type(); }

 private:
  enum class Activation { GeluErf, GeluTanh, Relu };
  struct Layer {
    at::Tensor self_qkv_weight, self_qkv_bias;  // query, key, value fused: [3H, H]
    at::Tensor self_out_weight, self_out_bias, self_norm_weight, self_norm_bias;
    bool has_cross_attention = false;
    at::Tensor cross_q_weight, cross_q_bias;
    at::Tensor cross_kv_weight, cross_kv_bias;  // key, value fused: [2H, encoder_width]
    at::Tensor cross_out_weight, cross_out_bias, cross_norm_weight, cross_norm_bias;
    at::Tensor ffn_in_weight, ffn_in_bias, ffn_out_weight, ffn_out_bias, ffn_norm_weight, ffn_norm_bias;
  };
  at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const;
  at::Tensor activation(const at::Tensor& x) const;

  int64_t hidden_ = 0, num_heads_ = 0, head_dim_ = 0, intermediate_ = 0, encoder_width_ = 0, num_queries_ = 0;
  double eps_ = 1e-12;
  Activation activation_ = Activation::GeluErf;
  at::Tensor query_tokens_, embed_norm_weight_, embed_norm_bias_;
  std::vector<Layer> layers_;
};

}  // namespace voken::vision
