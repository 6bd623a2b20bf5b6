// MiniGPT-5 behind one call: a sequence of text and images in, a sequence of text and images out.
//
//   auto pipe = voken::Pipeline::load("minigpt5/bundle.json");
//   auto result = pipe.generate_interleaved({voken::Segment::text("A cat on a sofa."),
//                                            voken::Segment::image_file("sofa.jpg"),
//                                            voken::Segment::text("What happens next?")});
//   for (const auto& segment : result.segments) ...
//
// What happens inside (upstream: MiniGPT-5 model.py generate() / mini_gpt5.py predict()):
//  1. the prompt is built as upstream does: system prompt, "###Human:", the user's segments with
//     every image as "<Img><ImageHere></Img>", then " ###Assistant:" (or the caller's own template
//     in raw-prompt mode); images are decoded, preprocessed and encoded in one batch and their 32
//     embeddings take the place of each <ImageHere> token;
//  2. text is sampled with the LLM; when [IMG0] comes out, [IMG0]..[IMG7] are fed in one pass and
//     the last-layer hidden states at positions p-1 .. p+6 ([IMG0] at p) go through the voken
//     mapper into a [77, d] Stable Diffusion condition, with the mapping of all-zero vokens as the
//     classifier-free-guidance negative;
//  3. each such condition becomes an image (UNet + scheduler + VAE), and text generation goes on
//     after it, until the LLM stops ("###", EOS, max_new_tokens).
//
// Thread safety: a Pipeline is immutable after load; concurrent generate_interleaved() calls on
// one Pipeline are allowed (each call has its own caches and generators).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "voken/image.h"

namespace voken {

// One piece of a conversation: text, or an image given as a file path, encoded bytes
// (JPEG/PNG/WebP/BMP) or decoded RGB pixels. Results contain only Text and Pixels segments.
class Segment {
 public:
  enum class Kind { Text, ImageFile, ImageBytes, Pixels };

  static Segment text(std::string text);
  static Segment image_file(std::string path);
  static Segment image_bytes(std::string encoded, std::string name = "image bytes");
  static Segment image(Image pixels);

  Kind kind() const { return kind_; }
  bool is_text() const { return kind_ == Kind::Text; }
  bool is_image() const { return kind_ != Kind::Text; }
  // Text: the text. ImageFile: the path. ImageBytes: the encoded bytes. Pixels: empty.
  const std::string& text() const { return text_; }
  // ImageBytes: the name given for messages. Otherwise empty.
  const std::string& name() const { return name_; }
  // Pixels: the image. Otherwise empty.
  const Image& image() const { return image_; }

 private:
  Kind kind_ = Kind::Text;
  std::string text_;
  std::string name_;
  Image image_;
};

// How text is sampled. The defaults are what upstream MiniGPT-5 runs with (model.py generate ->
// predict -> HF generate of transformers 4.31): sampling with top_p 0.9, temperature 1.0,
// repetition_penalty 2.0, HF's default top_k 50, min_length 1, max_new_tokens 256, stop on "###".
struct TextOptions {
  bool do_sample = true;            // false: greedy
  double temperature = 1.0;         // > 0
  int64_t top_k = 50;               // 0: off
  double top_p = 0.9;               // (0, 1]
  double repetition_penalty = 2.0;  // >= 1 (1: off); sees the generated tokens only, like upstream
  int64_t min_new_tokens = 1;       // EOS suppressed before this many tokens
  // Sampled tokens (the 7 vokens forced after [IMG0] do not count, as upstream).
  int64_t max_new_tokens = 256;
};

// How each image is drawn. Defaults: diffusers' StableDiffusionPipeline as upstream calls it.
struct ImageOptions {
  // "" = the bundle's scheduler (SD 2.1-base: PNDM); or one of "pndm", "ddim", "euler",
  // "euler_ancestral", "dpm_solver" (DPM-Solver++ 2M), configured from the bundle's
  // scheduler_config.json.
  std::string scheduler;
  int64_t steps = 50;           // >= 1
  double guidance_scale = 7.5;  // <= 1: no classifier-free guidance
  int64_t height = 512;         // multiples of 8
  int64_t width = 512;
};

struct GenerateOptions {
  TextOptions text;
  ImageOptions image;
  // Everything random (token sampling, initial latents) derives from this seed: the sampler is
  // seeded with `seed`, the k-th image's latents (k = 0, 1, ...) with `seed + k`. Same seed, same
  // inputs, same bundle and dtype: same output.
  uint64_t seed = 0;
  // Upstream's system prompt (examples/playground.py); ignored in raw-prompt mode.
  std::string system_prompt =
      "Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
      "once I provide it to you. Please understanding images and generate story.";
  // Raw-prompt mode: the text segments are the whole prompt, concatenated as given (no system
  // prompt, no ###Human/###Assistant); each image segment still becomes <Img><ImageHere></Img>,
  // unless the text already holds "<ImageHere>" placeholders, which then take the images in order.
  bool raw_prompt = false;
  // Upstream's force_generation: [IMG0]'s score is boosted until the response holds an image.
  bool force_image = false;
  // At most this many images in the response; once reached, [IMG0] is no longer sampled. 0: text only.
  int64_t max_images = 4;
  // false: vokens are still produced and mapped (see GenerateResult::conditions), no diffusion.
  bool draw_images = true;
  // Keep each image's [77, d] condition in the result (for callers that draw it themselves).
  bool keep_conditions = false;
};

// What a progress callback sees.
struct ProgressEvent {
  enum class Stage {
    EncodeImages,  // the input images are being encoded (current 0, total = number of images)
    Prefill,       // the prompt is being read (current 0, total = prompt positions)
    Token,         // a token was generated (current = tokens so far, total = max_new_tokens)
    Denoise,       // a denoising step finished (current = step, total = the scheduler's iterations:
                   // steps, or steps + 1 for PNDM as in diffusers; image = index)
    ImageDone,     // an image is complete (image = its index)
  };
  Stage stage = Stage::Token;
  int64_t current = 0;
  int64_t total = 0;
  int64_t image = 0;  // index of the image being drawn (Denoise, ImageDone)
  std::string text;   // Token: the text this token completed (may be empty mid-character)
};
// Return false to cancel: generate_interleaved() then throws voken::Cancelled.
using ProgressCallback = std::function<bool(const ProgressEvent&)>;

struct StageTimings {
  double encode_images = 0;  // seconds: decode + preprocess + ViT + Q-Former + projection
  double prefill = 0;        // the prompt's forward pass
  double decode = 0;         // token generation, voken forcing included
  double mapping = 0;        // voken mapper, negatives included
  double diffusion = 0;      // UNet loops + VAE decodes
  double total = 0;
};

struct GenerateResult {
  // The response in order: text (voken markers and the "###" stop removed) and images.
  std::vector<Segment> segments;
  // The response as the LLM wrote it, markers included (upstream's tokenizer.decode output).
  std::string raw_text;
  // The prompt exactly as tokenized (with <ImageHere> where image rows went).
  std::string prompt;
  int64_t prompt_tokens = 0;     // prompt positions (text tokens + image rows + BOS)
  int64_t generated_tokens = 0;  // tokens sampled (forced voken tokens not counted)
  int64_t images = 0;            // images in the response
  std::string stop_reason;       // "eos", "stop_sequence", "max_new_tokens", "context_full"
  StageTimings timings;
  // With keep_conditions: per image, the condition and negative as float32 [77 * d] with their
  // shape (rows, width).
  struct Condition {
    std::vector<float> positive, negative;
    int64_t rows = 0, width = 0;
  };
  std::vector<Condition> conditions;
};

// Where and how each part is loaded; overrides the bundle manifest's per-part settings.
struct LoadOptions {
  std::string dtype;   // "" (manifest's, default "bfloat16"), "float32" or "bfloat16" for every part
  std::string device;  // "" (manifest's, default "cpu"), "cpu", "cuda", "cuda:N" (needs a CUDA libtorch)
  // libtorch's intra-op threads (at::set_num_threads), process-wide: > 0 exactly that many; 0
  // $OMP_NUM_THREADS when set, else one per core.
  int num_threads = 0;
  bool load_diffusion = true;  // false: text-only pipeline (images can be read, not drawn)
};

class Pipeline {
 public:
  // Reads a bundle manifest (bundle.json, see docs/bundle.md), validates every part (files
  // present, configs readable, tensor names and shapes consistent across parts) and reports every
  // problem in one ConfigError/WeightsError/FileNotFoundError before loading any weights.
  static Pipeline load(const std::string& manifest_path, const LoadOptions& options = {});

  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  ~Pipeline();

  // ArgumentError for an empty segment list, an empty text-only prompt, options out of range,
  // more images than the context holds; FileNotFoundError / FormatError for unreadable images;
  // Cancelled when the callback returns false.
  GenerateResult generate_interleaved(const std::vector<Segment>& segments,
                                      const GenerateOptions& options = {},
                                      const ProgressCallback& progress = {}) const;

  // The prompt generate_interleaved() would build (text with <ImageHere> placeholders).
  std::string build_prompt(const std::vector<Segment>& segments, const GenerateOptions& options = {}) const;

  // A one-line-per-part summary: paths, dtypes, parameter counts.
  std::string describe() const;

  struct Impl;
  // For the library's own bindings (Python, CLI): the loaded components.
  const Impl& impl() const { return *impl_; }

 private:
  explicit Pipeline(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace voken
