#include "vision/image_encoder.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <vector>

#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

QFormerConfig qformer_config_for(const ImageEncoderConfig& config, const EvaVit& vit) {
  QFormerConfig qformer = config.qformer;
  // init_Qformer sets encoder_width = visual_encoder.num_features.
  if (!qformer.encoder_width) qformer.encoder_width = vit.width();
  return qformer;
}

}  // namespace

ImageEncoderConfig ImageEncoderConfig::from_json(const io::JsonView& root) {
  ImageEncoderConfig config;
  if (root.has("vision")) config.vision = EvaVitConfig::from_json(root.child("vision"));
  if (root.has("ln_vision")) {
    const auto ln = root.child("ln_vision");
    config.ln_vision_eps = ln.get_or<double>("eps", config.ln_vision_eps);
    if (!(config.ln_vision_eps > 0))
      throw ConfigError(ln.source() + ": field 'eps' must be positive, found " +
                        std::to_string(config.ln_vision_eps));
  }
  if (root.has("qformer")) config.qformer = QFormerConfig::from_json(root.child("qformer"));
  if (root.has("num_query_token")) {
    const auto queries = root.get<int64_t>("num_query_token");
    if (queries <= 0)
      throw ConfigError(root.source() + ": field 'num_query_token' must be positive, found " +
                        std::to_string(queries));
    if (config.qformer.query_length && *config.qformer.query_length != queries)
      throw ConfigError(root.source() + ": field 'num_query_token' (" + std::to_string(queries) +
                        ") disagrees with qformer.query_length (" +
                        std::to_string(*config.qformer.query_length) + ")");
    config.qformer.query_length = queries;
  }
  if (root.has("llama_proj")) {
    const auto projection = root.child("llama_proj");
    if (projection.has("out")) {
      config.llama_proj_out = projection.get<int64_t>("out");
      if (*config.llama_proj_out <= 0)
        throw ConfigError(projection.source() + ": field 'out' must be positive");
    }
    if (projection.has("in")) {
      const auto in = projection.get<int64_t>("in");
      if (config.qformer.hidden_size && *config.qformer.hidden_size != in)
        throw ConfigError(projection.source() + ": field 'in' (" + std::to_string(in) +
                          ") disagrees with qformer.hidden_size (" +
                          std::to_string(*config.qformer.hidden_size) + ")");
      config.qformer.hidden_size = in;
    }
  }
  config.qformer.validate(root.source() + " [qformer]");
  return config;
}

ImageEncoderConfig ImageEncoderConfig::load(const std::string& path) {
  const auto json = io::read_json_file(path);
  return from_json(io::JsonView(json, path));
}

ImageEncoder::ImageEncoder(const ImageEncoderConfig& config, io::WeightLoader& vit_weights,
                           io::WeightLoader& blip2_weights, io::WeightLoader& projection_weights)
    : vit_(config.vision, vit_weights), qformer_(qformer_config_for(config, vit_), blip2_weights) {
  c10::InferenceMode guard;
  ln_weight_ = take_float32(blip2_weights, "ln_vision.weight", {vit_.width()});
  ln_bias_ = take_float32(blip2_weights, "ln_vision.bias", {vit_.width()});
  ln_eps_ = config.ln_vision_eps;
  // Everything else in a BLIP-2 checkpoint (t5_proj/opt_proj, Qformer.cls, a copy of the ViT,
  // ...) belongs to other heads of BLIP-2.
  blip2_weights.ignore(R"(^(?!ln_vision\.|Qformer\.bert\.|query_tokens$))");

  int64_t out = 4096;
  if (config.llama_proj_out) {
    out = *config.llama_proj_out;
  } else if (const auto shape = projection_weights.shape_of("llama_proj.weight");
             shape && shape->size() == 2) {
    out = (*shape)[0];
  }
  projection_weight_ = projection_weights.take("llama_proj.weight", {out, qformer_.hidden_size()});
  projection_bias_ = projection_weights.take("llama_proj.bias", {out});
  // MiniGPT-4/5 checkpoints also hold the LLM's adapters and other heads.
  projection_weights.ignore(R"(^(?!llama_proj\.))");
}

ImageEncoder ImageEncoder::load(const ImageEncoderFiles& files, const ImageEncoderConfig& config,
                                const io::WeightOptions& options) {
  auto vit_state = io::StateDict::load(files.vit);
  if (!vit_state.contains("patch_embed.proj.weight") &&
      vit_state.contains("visual_encoder.patch_embed.proj.weight"))
    vit_state = vit_state.with_prefix("visual_encoder.");
  io::WeightLoader vit_weights(std::move(vit_state), options, "EVA ViT (" + files.vit + ")");
  io::WeightLoader blip2_weights(io::StateDict::load(files.qformer), options,
                                 "BLIP-2 ln_vision + Q-Former (" + files.qformer + ")");
  io::WeightLoader projection_weights(io::StateDict::load(files.projection), options,
                                      "MiniGPT-4 llama_proj (" + files.projection + ")");
  ImageEncoder encoder(config, vit_weights, blip2_weights, projection_weights);
  // One error for all three files.
  std::string problems;
  for (auto* weights : {&vit_weights, &blip2_weights, &projection_weights}) {
    try {
      weights->finish();
    } catch (const WeightsError& e) {
      problems += (problems.empty() ? "" : "\n") + std::string(e.what());
    }
  }
  if (!problems.empty()) throw WeightsError(problems);
  return encoder;
}

at::Tensor ImageEncoder::apply_ln_vision(const at::Tensor& vit_tokens) const {
  c10::InferenceMode guard;
  if (!vit_tokens.defined() || vit_tokens.dim() < 1 || vit_tokens.size(-1) != vit_.width())
    throw ArgumentError(
        "ln_vision: expected tokens [..., " + std::to_string(vit_.width()) + "], found " +
        (vit_tokens.defined() ? io::shape_string(vit_tokens.sizes()) : std::string("undefined")));
  const auto x = vit_tokens.to(ln_weight_.device(), at::kFloat);
  return at::layer_norm(x, {vit_.width()}, ln_weight_, ln_bias_, ln_eps_).to(vit_tokens.scalar_type());
}

at::Tensor ImageEncoder::project(const at::Tensor& qformer_output) const {
  c10::InferenceMode guard;
  if (!qformer_output.defined() || qformer_output.dim() < 1 ||
      qformer_output.size(-1) != projection_weight_.size(1))
    throw ArgumentError(
        "llama_proj: expected features [..., " + std::to_string(projection_weight_.size(1)) + "], found " +
        (qformer_output.defined() ? io::shape_string(qformer_output.sizes()) : std::string("undefined")));
  const auto x = qformer_output.to(projection_weight_.device(), projection_weight_.scalar_type());
  return at::linear(x, projection_weight_, projection_bias_);
}

ImageFeatures ImageEncoder::encode_all(const at::Tensor& pixels) const {
  c10::InferenceMode guard;
  ImageFeatures features;
  features.vit = vit_.forward(pixels);
  features.ln_vision = apply_ln_vision(features.vit);
  features.qformer = qformer_.forward(features.ln_vision);
  features.llama_proj = project(features.qformer);
  return features;
}

at::Tensor ImageEncoder::encode(const at::Tensor& pixels) const {
  c10::InferenceMode guard;
  return encode_all(pixels).llama_proj;
}

}  // namespace voken::vision
