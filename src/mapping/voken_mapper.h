// The MiniGPT-5 voken mapper (model.py, MiniGPT5_Model): the LLM's hidden states at the
// generative voken positions -> Stable Diffusion prompt embeddings.
//
//   fc                  Linear(llm_dim, sd_dim) -> GELU (exact erf) -> Linear(sd_dim, sd_dim)
//   llm_to_t2i_mapping  torch.nn.Transformer(batch_first, norm_first, d_model sd_dim, nhead 8,
//                       dropout 0, ReLU feed-forward, LayerNorm eps 1e-5, final encoder and
//                       decoder norms), run with no masks: src = fc output, tgt = the prompt
//   t2i_decoder_prompt  a learned [1, prompt_len (77), sd_dim] decoder query, repeated per item
//
// Every size except the number of heads is read from the weights (fc.0.weight, the prompt, the
// layers present, linear1); nhead is not recoverable from packed attention weights and comes
// from MapperOptions (upstream: nn.Transformer's default, 8).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io/json_file.h"
#include "io/state_dict.h"

namespace voken::mapping {

struct MapperOptions {
  int64_t nhead = 8;          // attention heads of every nn.Transformer attention block
  int64_t img_token_num = 8;  // upstream IMG_TOKEN_NUM: voken count of negative()'s zero input
  io::WeightOptions weights;  // dtype/device the weights are converted to (compute happens there)

  // Optional fields "nhead" and "img_token_num" of a manifest object; ConfigError when invalid.
  static MapperOptions from_json(const io::JsonView& mapper);
};

// Upstream key names (relative to the Lightning state_dict's root).
inline constexpr const char* kFcPrefix = "fc.";
inline constexpr const char* kTransformerPrefix = "llm_to_t2i_mapping.";
inline constexpr const char* kDecoderPromptKey = "t2i_decoder_prompt";

// MiniGPT-5 loads its stage-1 checkpoint, then the stage-2 one with strict=False on top
// (examples/playground.py): every key of `stage2` replaces or adds to `stage1`. Tensors are
// shared, not copied. The result's origin() is stage2's; its sources name each tensor's file.
io::StateDict overlay_state_dicts(const io::StateDict& stage1, const io::StateDict& stage2);

// Every intermediate the parity tests compare.
struct MapperOutputs {
  at::Tensor fc_out;           // [B, T, sd_dim]
  at::Tensor memory;           // [B, T, sd_dim], encoder output after the final encoder norm
  at::Tensor mapping_feature;  // [B, prompt_len, sd_dim], the prompt embeddings
};

class VokenMapper {
 public:
  // Takes fc.*, llm_to_t2i_mapping.* and t2i_decoder_prompt from `weights` (upstream names,
  // shapes derived from the weights themselves). Problems are recorded on the loader for the
  // caller's finish(); other keys are left alone, so one loader can serve several components.
  // ArgumentError when options.nhead is not positive or does not divide sd_dim.
  VokenMapper(const MapperOptions& options, io::WeightLoader& weights);

  // From a whole checkpoint (e.g. a MiniGPT-5 Lightning .ckpt's state_dict, or the overlay of
  // stage 1 and stage 2): strict within the mapper's keys (a missing, mis-shaped or unknown key
  // under fc. / llm_to_t2i_mapping. is a WeightsError listing every problem at once), keys of
  // other components (LLM embeddings, LoRA, ...) are ignored.
  static VokenMapper load(const io::StateDict& checkpoint, const MapperOptions& options = {});
  // From checkpoint files: stage 1, and optionally (non-empty path) stage 2 on top of it.
  static VokenMapper load(const std::string& stage1_path, const std::string& stage2_path = "",
                          const MapperOptions& options = {});

  // voken_hidden [B, T, llm_dim] (any float dtype; converted to the weights' dtype and device)
  // -> prompt embeddings [B, prompt_len, sd_dim] in the weights' dtype. ArgumentError on a
  // wrong rank, width, empty batch/sequence or a non-float tensor.
  at::Tensor map(const at::Tensor& voken_hidden) const;
  // map() with every intermediate.
  MapperOutputs forward(const at::Tensor& voken_hidden) const;
  // The classifier-free-guidance negative (upstream USE_CFG): the mapping of all-zero voken
  // features [1, img_token_num, llm_dim], repeated to [batch, prompt_len, sd_dim]. It depends on
  // the weights only, so it is computed once per mapper (thread-safe) and copied out.
  at::Tensor negative(int64_t batch = 1) const;

  int64_t llm_dim() const { return llm_dim_; }
  int64_t sd_dim() const { return sd_dim_; }
  int64_t prompt_len() const { return prompt_len_; }
  int64_t nhead() const { return nhead_; }
  int64_t dim_feedforward() const { return ffn_dim_; }
  int64_t img_token_num() const { return img_token_num_; }
  int64_t num_encoder_layers() const { return static_cast<int64_t>(encoder_.size()); }
  int64_t num_decoder_layers() const { return static_cast<int64_t>(decoder_.size()); }
  at::ScalarType dtype() const;
  at::Device device() const;

 private:
  struct Linear {
    at::Tensor weight, bias;
  };
  struct Norm {
    at::Tensor weight, bias;
  };
  // nn.MultiheadAttention's packed in_proj, kept packed for self-attention (one matmul for
  // q, k, v) and split into q and kv rows for cross-attention (query and memory differ).
  struct Attention {
    Linear qkv, q, kv, out;
  };
  struct EncoderLayer {
    Attention self_attn;
    Linear linear1, linear2;
    Norm norm1, norm2;
  };
  struct DecoderLayer {
    Attention self_attn, cross_attn;
    Linear linear1, linear2;
    Norm norm1, norm2, norm3;
  };

  Linear take_linear(io::WeightLoader& weights, const std::string& name, int64_t out, int64_t in) const;
  Norm take_norm(io::WeightLoader& weights, const std::string& name) const;
  Attention take_attention(io::WeightLoader& weights, const std::string& name) const;

  at::Tensor layer_norm(const at::Tensor& x, const Norm& norm) const;
  at::Tensor feed_forward(const at::Tensor& x, const Linear& linear1, const Linear& linear2) const;
  at::Tensor self_attention(const at::Tensor& x, const Attention& attn) const;
  at::Tensor cross_attention(const at::Tensor& x, const at::Tensor& memory, const Attention& attn) const;
  // q [B, Tq, d], k and v [B, Tk, d] -> softmax(q k^T / sqrt(head_dim)) v per head, [B, Tq, d].
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const;
  MapperOutputs run(const at::Tensor& voken_hidden) const;

  int64_t llm_dim_ = 0, sd_dim_ = 0, prompt_len_ = 0, nhead_ = 0, head_dim_ = 0, ffn_dim_ = 0;
  int64_t img_token_num_ = 0;
  Linear fc_in_, fc_out_;
  at::Tensor decoder_prompt_;
  std::vector<EncoderLayer> encoder_;
  std::vector<DecoderLayer> decoder_;
  Norm encoder_norm_, decoder_norm_;

  // negative()'s [1, prompt_len, sd_dim], computed on first use; shared by copies of the mapper,
  // which share the weights too.
  struct NegativeCache {
    std::once_flag once;
    at::Tensor value;
  };
  std::shared_ptr<NegativeCache> negative_cache_ = std::make_shared<NegativeCache>();
};

}  // namespace voken::mapping
