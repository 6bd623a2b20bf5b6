// MiniGPT-4/5's image encoder (`MiniGPT4.encode_img`): EVA ViT-g -> ln_vision (LayerNorm in
// float32) -> BLIP-2 Q-Former over 32 learned queries -> llama_proj into the LLM's embedding
// space. Weights come from the three files upstream reads, with their real key names:
// eva_vit_g.pth (a bare state dict), the BLIP-2 checkpoint ({"model": ln_vision.*, Qformer.*,
// query_tokens, ...}) and MiniGPT-4's checkpoint ({"model": llama_proj.*, ...}).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "io/json_file.h"
#include "io/state_dict.h"
#include "vision/eva_vit.h"
#include "vision/qformer.h"

namespace voken::vision {

// The encoder's configuration. Upstream hard-codes all of it (create_eva_vit_g,
// bert-base-uncased + init_Qformer, minigpt4.yaml); a bundle's config.json may state it:
//   {"vision": {EvaVitConfig fields}, "ln_vision": {"eps"}, "qformer": {QFormerConfig fields},
//    "num_query_token": 32, "llama_proj": {"in": 768, "out": 4096}}
// Every field is optional; absent ones take upstream's values or, for sizes, the weights'.
struct ImageEncoderConfig {
  EvaVitConfig vision;
  double ln_vision_eps = 1e-5;
  QFormerConfig qformer;
  std::optional<int64_t> llama_proj_out;  // unset: llama_proj.weight (4096 for Vicuna-7B)

  static ImageEncoderConfig from_json(const io::JsonView& root);
  // Reads a config.json as above (FileNotFoundError / ConfigError naming the file and field).
  static ImageEncoderConfig load(const std::string& path);
};

// The checkpoint files (any format StateDict::load reads; torch files are searched for their
// "model" dict as upstream's loaders do).
struct ImageEncoderFiles {
  std::string vit;         // eva_vit_g.pth; keys may also carry a "visual_encoder." prefix
  std::string qformer;     // blip2_pretrained_flant5xxl.pth (ln_vision, Q-Former, query tokens)
  std::string projection;  // prerained_minigpt4_7b.pth (llama_proj)
};

// Every stage of one encode call, as upstream's encode_img computes them.
struct ImageFeatures {
  at::Tensor vit;         // [B, 1 + patches, vit_width]   visual_encoder(image)
  at::Tensor ln_vision;   // [B, 1 + patches, vit_width]   ln_vision(...)
  at::Tensor qformer;     // [B, queries, qformer_hidden]  Qformer.bert(...).last_hidden_state
  at::Tensor llama_proj;  // [B, queries, llm_width]       llama_proj(...) = inputs_llama
};

class ImageEncoder {
 public:
  // Builds from three loaders (one per file). Does not call finish(): the caller does, so that
  // a bundle can check several components at once. `load` below is the usual entry point.
  ImageEncoder(const ImageEncoderConfig& config, io::WeightLoader& vit_weights,
               io::WeightLoader& blip2_weights, io::WeightLoader& projection_weights);

  // Loads the three files, converts the weights as `options` says ({at::kFloat} or
  // {at::kBFloat16}; unset keeps each file's dtype, float16 becoming float32 on CPU, and each
  // stage casts its input to its own weights' dtype) and throws one WeightsError listing every
  // missing, mis-shaped or unexpected tensor of all three files.
  static ImageEncoder load(const ImageEncoderFiles& files, const ImageEncoderConfig& config = {},
                           const io::WeightOptions& options = {});

  // pixels: preprocessed images, float [B, 3, S, S] with S = image_size() -> [B, queries, llm_width]
  // in the weights' dtype. Throws ArgumentError for other shapes.
  at::Tensor encode(const at::Tensor& pixels) const;
  // The same, keeping every intermediate.
  ImageFeatures encode_all(const at::Tensor& pixels) const;

  // The stages on their own (for tests and for callers holding intermediate tensors).
  at::Tensor apply_ln_vision(
      const at::Tensor& vit_tokens) const;                     // float32 LayerNorm, result in the input dtype
  at::Tensor project(const at::Tensor& qformer_output) const;  // llama_proj

  const EvaVit& vit() const { return vit_; }
  const QFormer& qformer() const { return qformer_; }
  int64_t image_size() const { return vit_.image_size(); }
  int64_t num_query_tokens() const { return qformer_.num_query_tokens(); }
  int64_t output_width() const { return projection_weight_.size(0); }
  at::ScalarType dtype() const { return vit_.dtype(); }

 private:
  EvaVit vit_;
  QFormer qformer_;
  at::Tensor ln_weight_, ln_bias_;  // float32 regardless of the weight dtype
  double ln_eps_ = 1e-5;
  at::Tensor projection_weight_, projection_bias_;
};

}  // namespace voken::vision
