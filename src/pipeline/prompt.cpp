#include "pipeline/prompt.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cctype>

#include "io/tensor_bytes.h"
#include "voken/error.h"

namespace voken::pipeline {

namespace {

constexpr const char* kImagePlaceholder = "<ImageHere>";
constexpr const char* kImageBlock = "<Img><ImageHere></Img>";

size_t count_occurrences(const std::string& text, const std::string& needle) {
  size_t count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size()))
    ++count;
  return count;
}

bool has_visible_text(const std::string& text) {
  return std::any_of(text.begin(), text.end(), [](unsigned char c) { return !std::isspace(c); });
}

}  // namespace

PromptText build_prompt_text(const std::vector<Segment>& segments, const GenerateOptions& options) {
  if (segments.empty()) throw ArgumentError("generate_interleaved: the segment list is empty");
  PromptText prompt;
  std::vector<const Segment*> images;
  bool visible = false;
  std::string user;  // the segments' part of the prompt
  size_t placeholders_in_text = 0;
  for (const Segment& segment : segments) {
    if (segment.is_text()) {
      placeholders_in_text += count_occurrences(segment.text(), kImagePlaceholder);
      visible = visible || has_visible_text(segment.text());
    } else {
      images.push_back(&segment);
    }
  }
  if (!visible && images.empty())
    throw ArgumentError("generate_interleaved: the prompt is empty (no text and no image segment)");

  if (options.raw_prompt && placeholders_in_text > 0) {
    // The caller's template places the images itself.
    if (placeholders_in_text != images.size())
      throw ArgumentError("generate_interleaved: the raw prompt holds " +
                          std::to_string(placeholders_in_text) + " <ImageHere> placeholder(s) but " +
                          std::to_string(images.size()) + " image segment(s) were given");
    for (const Segment& segment : segments)
      if (segment.is_text()) user += segment.text();
    prompt.text = user;
    prompt.images = images;
    return prompt;
  }
  if (placeholders_in_text > 0)
    throw ArgumentError(
        "generate_interleaved: a text segment contains \"<ImageHere>\", which stands for image rows; pass "
        "images as image segments, or set raw_prompt to place them with your own placeholders");
  for (const Segment& segment : segments)
    user += segment.is_text() ? segment.text() : std::string(kImageBlock);
  prompt.images = images;
  prompt.text = options.raw_prompt ? user : options.system_prompt + "###Human:" + user + " ###Assistant:";
  return prompt;
}

int64_t PromptAssembly::positions(int64_t rows_per_image) const {
  return 1 + static_cast<int64_t>(token_ids.size()) + num_images() * (rows_per_image - 1);
}

std::vector<int64_t> PromptAssembly::image_rows_start(int64_t rows_per_image) const {
  std::vector<int64_t> starts;
  for (size_t k = 0; k < image_slots.size(); ++k)
    starts.push_back(1 + image_slots[k] + static_cast<int64_t>(k) * (rows_per_image - 1));
  return starts;
}

PromptAssembly tokenize_prompt(const text::Tokenizer& tokenizer, const std::string& text,
                               int64_t image_here_id, int64_t bos_id) {
  PromptAssembly assembly;
  assembly.text = text;
  assembly.bos_id = bos_id;
  assembly.token_ids = tokenizer.encode(text, /*add_bos=*/false, /*add_eos=*/false);
  for (size_t i = 0; i < assembly.token_ids.size(); ++i)
    if (assembly.token_ids[i] == image_here_id) assembly.image_slots.push_back(static_cast<int64_t>(i));
  return assembly;
}

at::Tensor assemble_embeddings(const llm::Llama& model, const PromptAssembly& assembly,
                               const at::Tensor& image_features) {
  c10::InferenceMode guard;
  const int64_t hidden = model.hidden_size();
  const int64_t images = assembly.num_images();
  if (images > 0) {
    if (!image_features.defined() || image_features.dim() != 3 || image_features.size(0) != images ||
        image_features.size(2) != hidden)
      throw ArgumentError(
          "assemble_embeddings: the prompt has " + std::to_string(images) +
          " <ImageHere> slot(s); expected image features [" + std::to_string(images) + ", rows, " +
          std::to_string(hidden) + "], got " +
          (image_features.defined() ? io::shape_string(image_features.sizes()) : std::string("none")));
  } else if (image_features.defined() && image_features.numel() > 0) {
    throw ArgumentError("assemble_embeddings: image features " + io::shape_string(image_features.sizes()) +
                        " given but the prompt has no <ImageHere> slot");
  }
  std::vector<int64_t> ids;
  ids.reserve(assembly.token_ids.size() + 1);
  ids.push_back(assembly.bos_id);
  ids.insert(ids.end(), assembly.token_ids.begin(), assembly.token_ids.end());
  // Every id is embedded (the <ImageHere> rows are computed and dropped: one batched lookup is
  // simpler than slicing around them, and costs a few rows).
  const at::Tensor text_rows = model.embed(at::tensor(ids, at::kLong))[0];  // [1 + n, H] (embed adds a batch)
  if (images == 0) return text_rows.contiguous();
  const at::Tensor image_rows = image_features.to(at::kFloat);
  std::vector<at::Tensor> pieces;
  int64_t start = 0;  // in `ids` (BOS at 0)
  for (int64_t k = 0; k < images; ++k) {
    const int64_t slot = assembly.image_slots[static_cast<size_t>(k)] + 1;
    pieces.push_back(text_rows.narrow(0, start, slot - start));
    pieces.push_back(image_rows[k]);
    start = slot + 1;
  }
  pieces.push_back(text_rows.narrow(0, start, text_rows.size(0) - start));
  return at::cat(pieces, 0);
}

}  // namespace voken::pipeline
