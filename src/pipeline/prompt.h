// Building MiniGPT-5's prompt from a conversation's segments and turning it into the LLM's
// inputs_embeds, as upstream does it (examples/playground.py builds the text,
// mini_gpt5.py predict() tokenizes it with add_special_tokens=False, MiniGPT5.input_warp
// assembles the embeddings):
//
//   text      system_prompt + "###Human:" + the user's segments in order (text as is, each image
//             as "<Img><ImageHere></Img>") + " ###Assistant:"; in raw-prompt mode the text
//             segments alone, concatenated, with images either as "<Img><ImageHere></Img>" where
//             they stand or, when the text already holds <ImageHere> placeholders, filling those
//             in order;
//   ids       the tokenizer's ids of that text, without BOS;
//   embeds    [BOS embedding, the ids' embeddings] with every <ImageHere> row replaced by the
//             rows of its image (32 query outputs of the image encoder, in image order).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "llm/llama.h"
#include "text/tokenizer.h"
#include "voken/pipeline.h"

namespace voken::pipeline {

// The prompt text and where its images go.
struct PromptText {
  std::string text;
  // The image segments, in the order their <ImageHere> placeholders appear in `text`.
  std::vector<const Segment*> images;
};

// Builds the prompt text. ArgumentError for an empty segment list, a prompt without any text or
// image, a raw prompt whose <ImageHere> count differs from its image count, or (outside raw mode)
// text segments that themselves hold "<ImageHere>" (they would take image rows that do not exist).
PromptText build_prompt_text(const std::vector<Segment>& segments, const GenerateOptions& options);

// The tokenized prompt.
struct PromptAssembly {
  std::string text;
  std::vector<int64_t> token_ids;    // without BOS (add_special_tokens=False)
  std::vector<int64_t> image_slots;  // indices into token_ids of the <ImageHere> tokens, in order
  int64_t bos_id = 1;

  int64_t num_images() const { return static_cast<int64_t>(image_slots.size()); }
  // Positions of the assembled sequence: BOS + text tokens + rows_per_image per image (replacing
  // its <ImageHere> token).
  int64_t positions(int64_t rows_per_image) const;
  // Where image k's first row lands in the assembled sequence.
  std::vector<int64_t> image_rows_start(int64_t rows_per_image) const;
};

// Tokenizes `text` as upstream does (no BOS) and finds the <ImageHere> ids.
PromptAssembly tokenize_prompt(const text::Tokenizer& tokenizer, const std::string& text,
                               int64_t image_here_id, int64_t bos_id);

// inputs_embeds [T, H] float32 (T = assembly.positions(rows)): the BOS embedding, the text
// embeddings, each <ImageHere> replaced by image_features[k] ([N, rows, H], any float dtype;
// N must equal the number of image slots, else ArgumentError).
at::Tensor assemble_embeddings(const llm::Llama& model, const PromptAssembly& assembly,
                               const at::Tensor& image_features);

}  // namespace voken::pipeline
