// voken::Pipeline: MiniGPT-5 behind one call (see include/voken/pipeline.h for the contract and
// src/pipeline/{prompt,generation,bundle}.h for the stages).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>

#include "core/parallel.h"
#include "pipeline/pipeline_impl.h"
#include "vision/image.h"
#include "vision/preprocess.h"
#include "voken/error.h"

namespace voken {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string trim(const std::string& text) {
  const char* space = " \t\n\r\f\v";
  const size_t begin = text.find_first_not_of(space);
  if (begin == std::string::npos) return "";
  const size_t end = text.find_last_not_of(space);
  return text.substr(begin, end - begin + 1);
}

std::string show(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

void reject(const std::string& option, const std::string& rule, const std::string& value) {
  throw ArgumentError("GenerateOptions::" + option + " " + rule + ", got " + value);
}

vision::ImageSource source_of(const Segment& segment) {
  switch (segment.kind()) {
    case Segment::Kind::ImageFile:
      return vision::ImageSource::file(segment.text());
    case Segment::Kind::ImageBytes:
      return vision::ImageSource::encoded(segment.text(),
                                          segment.name().empty() ? "image bytes" : segment.name());
    case Segment::Kind::Pixels:
      return vision::ImageSource::pixels(segment.image());
    case Segment::Kind::Text:
      break;
  }
  throw ArgumentError("not an image segment");
}

// Reports a progress event; a false return cancels the generation.
void report(const ProgressCallback& progress, const ProgressEvent& event) {
  if (progress && !progress(event)) throw Cancelled("generation cancelled by the progress callback");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Segment

Segment Segment::text(std::string text) {
  Segment s;
  s.kind_ = Kind::Text;
  s.text_ = std::move(text);
  return s;
}

Segment Segment::image_file(std::string path) {
  Segment s;
  s.kind_ = Kind::ImageFile;
  s.text_ = std::move(path);
  return s;
}

Segment Segment::image_bytes(std::string encoded, std::string name) {
  Segment s;
  s.kind_ = Kind::ImageBytes;
  s.text_ = std::move(encoded);
  s.name_ = std::move(name);
  return s;
}

Segment Segment::image(Image pixels) {
  Segment s;
  s.kind_ = Kind::Pixels;
  s.image_ = std::move(pixels);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Option validation

namespace pipeline {

void validate_options(const GenerateOptions& options, const Pipeline::Impl& impl) {
  const TextOptions& t = options.text;
  if (!(std::isfinite(t.temperature) && t.temperature > 0))
    reject("text.temperature", "must be a finite value > 0", show(t.temperature));
  if (t.top_k < 0) reject("text.top_k", "must be >= 0 (0 disables top-k)", std::to_string(t.top_k));
  if (!(t.top_p > 0 && t.top_p <= 1)) reject("text.top_p", "must be in (0, 1]", show(t.top_p));
  if (!(std::isfinite(t.repetition_penalty) && t.repetition_penalty >= 1))
    reject("text.repetition_penalty", "must be a finite value >= 1 (1 disables it)",
           show(t.repetition_penalty));
  if (t.min_new_tokens < 0) reject("text.min_new_tokens", "must be >= 0", std::to_string(t.min_new_tokens));
  if (t.max_new_tokens < 0) reject("text.max_new_tokens", "must be >= 0", std::to_string(t.max_new_tokens));

  const ImageOptions& i = options.image;
  if (i.steps < 1) reject("image.steps", "must be >= 1", std::to_string(i.steps));
  if (i.height <= 0 || i.height % 8 != 0)
    reject("image.height", "must be a positive multiple of 8", std::to_string(i.height));
  if (i.width <= 0 || i.width % 8 != 0)
    reject("image.width", "must be a positive multiple of 8", std::to_string(i.width));
  if (!std::isfinite(i.guidance_scale))
    reject("image.guidance_scale", "must be finite", show(i.guidance_scale));
  if (!i.scheduler.empty()) {
    try {
      diffusion::scheduler_kind_from_name(i.scheduler);
    } catch (const ArgumentError& e) {
      throw ArgumentError(std::string("GenerateOptions::image.scheduler: ") + e.what());
    }
  }
  if (options.max_images < 0) reject("max_images", "must be >= 0", std::to_string(options.max_images));
  if (options.force_image && options.max_images == 0)
    reject("force_image", "needs max_images >= 1 (max_images 0 forbids images)",
           "force_image with max_images 0");
  if (options.draw_images && options.max_images > 0 && impl.diffusion() == nullptr)
    throw ArgumentError(
        "GenerateOptions::draw_images: this pipeline was loaded without its diffusion model "
        "(LoadOptions::load_diffusion = false); set draw_images = false or max_images = 0");
}

}  // namespace pipeline

// ---------------------------------------------------------------------------------------------
// Pipeline::Impl stages

int64_t Pipeline::Impl::context_positions() const {
  return llm().config().max_position_embeddings - llm().prefix_length();
}

pipeline::PromptAssembly Pipeline::Impl::tokenize(const pipeline::PromptText& prompt) const {
  pipeline::PromptAssembly assembly =
      pipeline::tokenize_prompt(tokenizer(), prompt.text, tokens().image_here, tokens().bos);
  if (assembly.num_images() != static_cast<int64_t>(prompt.images.size()))
    throw ArgumentError("generate_interleaved: the prompt tokenizes to " +
                        std::to_string(assembly.num_images()) + " <ImageHere> token(s) but " +
                        std::to_string(prompt.images.size()) +
                        " image(s) were given (does the system prompt hold \"<ImageHere>\"?)");
  const int64_t rows = image_encoder().num_query_tokens();
  const int64_t positions = assembly.positions(rows);
  const int64_t context = context_positions();
  if (positions > context)
    throw ArgumentError(
        "generate_interleaved: the prompt needs " + std::to_string(positions) + " positions (BOS + " +
        std::to_string(assembly.token_ids.size() - assembly.image_slots.size()) + " text tokens + " +
        std::to_string(assembly.num_images()) + " image(s) x " + std::to_string(rows) +
        " rows) but the LLM's context holds " + std::to_string(context) + "; give fewer images or less text");
  return assembly;
}

at::Tensor Pipeline::Impl::encode_images(const std::vector<const Segment*>& images) const {
  c10::InferenceMode guard;
  if (images.empty()) return at::Tensor();
  std::vector<vision::Image> decoded;
  decoded.reserve(images.size());
  for (const Segment* segment : images) decoded.push_back(source_of(*segment).load());
  const at::Tensor pixels = vision::preprocess_batch(decoded, preprocess());
  return image_encoder().encode(pixels);
}

llm::SamplingOptions Pipeline::Impl::sampling_options(const GenerateOptions& options) const {
  llm::SamplingOptions s = llm::SamplingOptions::minigpt5();
  s.do_sample = options.text.do_sample;
  s.temperature = options.text.temperature;
  s.top_k = options.text.top_k;
  s.top_p = options.text.top_p;
  s.repetition_penalty = options.text.repetition_penalty;
  s.max_new_tokens = options.text.max_new_tokens;
  s.min_new_tokens = std::min(options.text.min_new_tokens, options.text.max_new_tokens);
  s.stop_sequences = pipeline::minigpt5_stop_sequences(tokenizer());
  s.eos_token_ids = {tokens().eos};
  s.seed = options.seed;
  s.force_token_id = options.force_image ? tokens().img0() : -1;
  return s;
}

at::Tensor Pipeline::Impl::condition(const at::Tensor& voken_features) const {
  c10::InferenceMode guard;
  return mapper().map(voken_features.dim() == 2 ? voken_features.unsqueeze(0) : voken_features);
}

Image Pipeline::Impl::draw(const at::Tensor& condition, const GenerateOptions& options, int64_t index,
                           const diffusion::StepCallback& on_step) const {
  c10::InferenceMode guard;
  if (diffusion() == nullptr) throw ArgumentError("this pipeline was loaded without its diffusion model");
  diffusion::StableDiffusion sd = *diffusion();  // shares the UNet and VAE; own scheduler choice
  if (!options.image.scheduler.empty())
    sd.set_scheduler_config(
        sd.scheduler_config().as_kind(diffusion::scheduler_kind_from_name(options.image.scheduler)));
  diffusion::DiffusionOptions d;
  d.steps = options.image.steps;
  d.guidance_scale = options.image.guidance_scale;
  d.seed = options.seed + static_cast<uint64_t>(index);
  d.height = options.image.height;
  d.width = options.image.width;
  const diffusion::DiffusionResult result =
      sd.generate(condition, mapper().negative(condition.size(0)), d, on_step);
  return vision::image_from_tensor(result.image_uint8[0]);
}

// ---------------------------------------------------------------------------------------------
// Pipeline

Pipeline::Pipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;
Pipeline::~Pipeline() = default;

Pipeline Pipeline::load(const std::string& manifest_path, const LoadOptions& options) {
  c10::InferenceMode guard;
  core::set_intra_op_threads(options.num_threads, "LoadOptions::num_threads");
  auto impl = std::make_unique<Impl>();
  impl->bundle = pipeline::load_bundle(manifest_path, options);
  impl->load_options = options;
  return Pipeline(std::move(impl));
}

std::string Pipeline::build_prompt(const std::vector<Segment>& segments,
                                   const GenerateOptions& options) const {
  return pipeline::build_prompt_text(segments, options).text;
}

std::string Pipeline::describe() const {
  const auto& m = impl_->manifest();
  std::string out = (m.name.empty() ? std::string("voken bundle") : m.name) + " — " +
                    (m.manifest_path.empty() ? std::string("(in memory)") : m.manifest_path);
  if (m.random_weights) out += " [random weights]";
  for (const auto& line : impl_->bundle.summary) out += "\n  " + line;
  return out;
}

GenerateResult Pipeline::generate_interleaved(const std::vector<Segment>& segments,
                                              const GenerateOptions& options,
                                              const ProgressCallback& progress) const {
  c10::InferenceMode guard;
  const Impl& impl = *impl_;
  const auto start = Clock::now();

  // Everything that can be refused is refused before any heavy work.
  pipeline::validate_options(options, impl);
  const pipeline::PromptText prompt = pipeline::build_prompt_text(segments, options);
  for (const Segment* image : prompt.images) {
    if (image->kind() == Segment::Kind::ImageFile && image->text().empty())
      throw ArgumentError("generate_interleaved: an image segment has an empty path");
    if (image->kind() == Segment::Kind::ImageBytes && image->text().empty())
      throw ArgumentError("generate_interleaved: image segment '" + image->name() + "' holds no bytes");
    if (image->kind() == Segment::Kind::Pixels &&
        (image->image().empty() || image->image().pixels.size() !=
                                       static_cast<size_t>(image->image().width) * image->image().height * 3))
      throw ArgumentError(
          "generate_interleaved: an image segment's pixels are empty or not width x height x 3 bytes");
  }
  const pipeline::PromptAssembly assembly = impl.tokenize(prompt);
  const llm::SamplingOptions sampling = impl.sampling_options(options);
  sampling.validate();

  GenerateResult result;
  result.prompt = prompt.text;
  const int64_t rows = impl.image_encoder().num_query_tokens();
  result.prompt_tokens = assembly.positions(rows);

  // 1. Images in.
  auto stage = Clock::now();
  at::Tensor features;
  if (!prompt.images.empty()) {
    report(progress,
           {ProgressEvent::Stage::EncodeImages, 0, static_cast<int64_t>(prompt.images.size()), 0, ""});
    features = impl.encode_images(prompt.images);
  }
  const at::Tensor embeds = pipeline::assemble_embeddings(impl.llm(), assembly, features);
  result.timings.encode_images = seconds_since(stage);

  // 2. The prompt. The session holds the prompt, every sampled token (the last one is fed only
  // when it is an [IMG0]) and the forced vokens after each [IMG0] allowed, within the context.
  const int64_t forced_per_image = static_cast<int64_t>(impl.tokens().vokens.size()) - 1;
  const int64_t wanted =
      result.prompt_tokens + sampling.max_new_tokens + forced_per_image * options.max_images;
  const int64_t capacity = std::min(wanted, impl.context_positions());
  report(progress, {ProgressEvent::Stage::Prefill, 0, result.prompt_tokens, 0, ""});
  stage = Clock::now();
  llm::DecodeSession session(impl.llm(), capacity);
  session.prefill(embeds);
  result.timings.prefill = seconds_since(stage);

  // 3. Text, vokens, images.
  text::StreamingDecoder stream(impl.tokenizer(), /*skip_special_tokens=*/false);
  std::vector<Image> images;
  std::vector<GenerateResult::Condition> conditions;
  double mapping_seconds = 0, diffusion_seconds = 0;
  pipeline::VokenLoopOptions loop;
  loop.sampling = sampling;
  loop.voken_ids = impl.tokens().vokens;
  loop.max_images = options.max_images;
  pipeline::VokenLoopCallbacks callbacks;
  callbacks.on_token = [&](int64_t token, int64_t generated) {
    if (!progress) return true;
    ProgressEvent event{ProgressEvent::Stage::Token, generated, sampling.max_new_tokens, 0,
                        stream.push(token)};
    return progress(event);
  };
  callbacks.on_vokens = [&](const pipeline::VokenGroup& group, int64_t index) {
    auto t0 = Clock::now();
    const at::Tensor cond = impl.condition(group.features);
    at::Tensor negative;
    if (options.keep_conditions) {
      negative = impl.mapper().negative(1);
      GenerateResult::Condition kept;
      const at::Tensor positive = cond[0].to(at::kFloat).contiguous().cpu();
      const at::Tensor neg = negative[0].to(at::kFloat).contiguous().cpu();
      kept.rows = positive.size(0);
      kept.width = positive.size(1);
      kept.positive.assign(positive.data_ptr<float>(), positive.data_ptr<float>() + positive.numel());
      kept.negative.assign(neg.data_ptr<float>(), neg.data_ptr<float>() + neg.numel());
      conditions.push_back(std::move(kept));
    }
    mapping_seconds += seconds_since(t0);
    if (!options.draw_images) return;
    t0 = Clock::now();
    diffusion::StepCallback on_step;
    if (progress)
      on_step = [&](int64_t step, int64_t total) {
        return progress({ProgressEvent::Stage::Denoise, step, total, index, ""});
      };
    images.push_back(impl.draw(cond, options, index, on_step));
    diffusion_seconds += seconds_since(t0);
    report(progress, {ProgressEvent::Stage::ImageDone, index + 1, options.max_images, index, ""});
  };
  stage = Clock::now();
  pipeline::VokenLoopResult generated = pipeline::run_voken_loop(session, loop, callbacks);
  result.timings.decode = seconds_since(stage) - mapping_seconds - diffusion_seconds;
  result.timings.mapping = mapping_seconds;
  result.timings.diffusion = diffusion_seconds;

  // 4. The response as segments: text runs between the images, markers and the final "###"
  // removed.
  result.raw_text = impl.tokenizer().decode(generated.tokens, /*skip_special_tokens=*/false);
  result.generated_tokens = static_cast<int64_t>(generated.tokens.size());
  result.images = static_cast<int64_t>(generated.groups.size());
  result.stop_reason = generated.stop_reason;
  size_t text_end = generated.tokens.size();
  if (generated.stop_reason == "stop_sequence")
    text_end -= llm::StopChecker(sampling).matched_stop_length(generated.tokens);
  auto add_text = [&](size_t begin, size_t end) {
    std::vector<int64_t> ids;
    for (size_t k = begin; k < end && k < text_end; ++k)
      if (!impl.tokens().is_marker(generated.tokens[k])) ids.push_back(generated.tokens[k]);
    const std::string text = trim(impl.tokenizer().decode(ids, /*skip_special_tokens=*/true));
    if (!text.empty()) result.segments.push_back(Segment::text(text));
  };
  size_t begin = 0;
  for (size_t g = 0; g < generated.groups.size(); ++g) {
    const size_t at = static_cast<size_t>(generated.groups[g].token_index);
    add_text(begin, at);
    if (g < images.size()) result.segments.push_back(Segment::image(std::move(images[g])));
    begin = at + 1;
  }
  add_text(begin, generated.tokens.size());
  result.conditions = std::move(conditions);
  result.timings.total = seconds_since(start);
  return result;
}

}  // namespace voken
