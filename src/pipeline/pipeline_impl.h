// What a voken::Pipeline holds, for the library's own front ends (Python bindings, CLI) that
// need one component or one stage of generate_interleaved() on its own. Everything is loaded by
// Pipeline::load and immutable afterwards.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "pipeline/bundle.h"
#include "pipeline/generation.h"
#include "pipeline/prompt.h"
#include "voken/pipeline.h"

namespace voken {

struct Pipeline::Impl {
  pipeline::LoadedBundle bundle;
  LoadOptions load_options;

  const pipeline::BundleManifest& manifest() const { return bundle.manifest; }
  const text::Tokenizer& tokenizer() const { return *bundle.tokenizer; }
  const llm::Llama& llm() const { return *bundle.llm; }
  const vision::ImageEncoder& image_encoder() const { return *bundle.image_encoder; }
  const vision::PreprocessConfig& preprocess() const { return bundle.preprocess; }
  const mapping::VokenMapper& mapper() const { return *bundle.mapper; }
  // nullptr when the pipeline was loaded without diffusion (LoadOptions::load_diffusion false).
  const diffusion::StableDiffusion* diffusion() const {
    return bundle.diffusion ? &*bundle.diffusion : nullptr;
  }
  const pipeline::SpecialTokens& tokens() const { return bundle.tokens; }
  // Positions the LLM can hold per sequence (max_position_embeddings minus prefix-tuning rows).
  int64_t context_positions() const;

  // The stages of generate_interleaved(), each callable on its own.

  // The prompt text and its tokenization; ArgumentError as build_prompt_text, and when the
  // tokenized prompt's <ImageHere> count differs from the images (e.g. a system prompt holding
  // one) or the prompt with its image rows does not fit the context.
  pipeline::PromptAssembly tokenize(const pipeline::PromptText& prompt) const;
  // Decodes, preprocesses and encodes the images in one batch: [N, queries, H] in the encoder's
  // dtype (undefined for N = 0). FileNotFoundError / FormatError name the failing image.
  at::Tensor encode_images(const std::vector<const Segment*>& images) const;
  // The sampling options generate_interleaved() runs the LLM with.
  llm::SamplingOptions sampling_options(const GenerateOptions& options) const;
  // Voken features [n, H] -> the condition [1, 77, d] (the mapper's output).
  at::Tensor condition(const at::Tensor& voken_features) const;
  // Draws one image from a condition; `index` k seeds the latents with options.seed + k.
  Image draw(const at::Tensor& condition, const GenerateOptions& options, int64_t index,
             const diffusion::StepCallback& on_step = {}) const;
};

namespace pipeline {
// ArgumentError naming the option when one is out of range (also checks that images can be
// drawn when draw_images is set).
void validate_options(const GenerateOptions& options, const Pipeline::Impl& impl);
}  // namespace pipeline

}  // namespace voken
