// HF 4.31 logits processing, token choice and stopping; see sampling.h for the order of steps.
//
// Each step is written with the same ATen operations, on the same [1, vocab] layout, as the
// Python it mirrors, because exactness depends on it: top-p's cumulative sums decide which tokens
// survive, and torch.sort(stable=False) - what TopPLogitsWarper calls - does not keep ties in
// index order beyond 16 elements on CPU, so any other sort would keep a different set of tied
// tokens than HF does.
#include "llm/sampling.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include "voken/error.h"

namespace voken::llm {
namespace {

constexpr float kNegativeInfinity = -std::numeric_limits<float>::infinity();

template <typename T>
std::string show(const T& value) {
  std::ostringstream out;
  out.precision(10);
  out << value;
  return out.str();
}

[[noreturn]] void reject(const std::string& option, const std::string& requirement,
                         const std::string& value) {
  throw ArgumentError("SamplingOptions." + option + " " + requirement + ", got " + value);
}

// The caller's logits as an owned, contiguous [1, vocab] float32 CPU tensor (HF's scores layout;
// the processors below work in place on it).
at::Tensor owned_scores(const at::Tensor& logits) {
  if (!logits.defined()) throw ArgumentError("TokenSampler: logits tensor is undefined");
  if (!at::isFloatingType(logits.scalar_type()))
    throw ArgumentError("TokenSampler: logits must be a floating-point tensor, got " +
                        std::string(c10::toString(logits.scalar_type())));
  const bool flat = logits.dim() == 1;
  const bool single_row = logits.dim() == 2 && logits.size(0) == 1;
  if (!(flat || single_row) || logits.size(-1) == 0)
    throw ArgumentError("TokenSampler: logits must have shape [vocab] or [1, vocab] with vocab > 0, got " +
                        show(logits.sizes()));
  return logits.reshape({1, logits.size(-1)})
      .to(at::kCPU, at::kFloat, /*non_blocking=*/false, /*copy=*/true)
      .contiguous();
}

void check_ids_in_vocab(const std::vector<int64_t>& ids, int64_t vocab, const char* what) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw ArgumentError(std::string("TokenSampler: ") + what + " id " + std::to_string(ids[i]) +
                          " (index " + std::to_string(i) + ") is outside the vocabulary [0, " +
                          std::to_string(vocab) + ")");
}

// Plain loops over the float32 buffer: checks on every token must not cost extra ATen dispatches.
bool contains_nan(const at::Tensor& scores) {
  const at::Tensor dense = scores.contiguous();
  const float* values = dense.data_ptr<float>();
  return std::any_of(values, values + dense.numel(), [](float x) { return std::isnan(x); });
}

bool all_removed(const at::Tensor& scores) {
  const at::Tensor dense = scores.contiguous();
  const float* values = dense.data_ptr<float>();
  return std::all_of(values, values + dense.numel(), [](float x) { return x == kNegativeInfinity; });
}

at::Tensor id_tensor(const std::vector<int64_t>& ids) {
  return at::tensor(c10::ArrayRef<int64_t>(ids), at::TensorOptions().dtype(at::kLong));
}

// RepetitionPenaltyLogitsProcessor: gather every context id's score, shrink it towards
// "less likely" (negative * penalty, non-negative / penalty), scatter back. Repeated ids gather
// the same original score, so each distinct id is penalised once.
void apply_repetition_penalty(at::Tensor& scores, const std::vector<int64_t>& context, double penalty) {
  const at::Tensor ids = id_tensor(context).unsqueeze(0);
  const at::Tensor picked = scores.gather(1, ids);
  const at::Tensor penalised = at::where(picked < 0, picked * penalty, picked / penalty);
  scores.scatter_(1, ids, penalised);
}

// TopKLogitsWarper: everything strictly below the k-th largest score is removed, so ties with the
// k-th score all survive.
at::Tensor apply_top_k(const at::Tensor& scores, int64_t top_k) {
  const int64_t k = std::min(top_k, scores.size(-1));
  const at::Tensor kth_largest = std::get<0>(at::topk(scores, k)).narrow(-1, k - 1, 1);
  return scores.masked_fill(scores < kth_largest, kNegativeInfinity);
}

// TopPLogitsWarper (min_tokens_to_keep = 1): sort ascending, remove the prefix whose cumulative
// probability stays <= 1 - top_p, always keep the most probable token.
at::Tensor apply_top_p(const at::Tensor& scores, double top_p) {
  const auto [sorted_scores, sorted_indices] = at::sort(scores, /*dim=*/-1, /*descending=*/false);
  const at::Tensor cumulative = sorted_scores.softmax(-1).cumsum(-1);
  at::Tensor sorted_remove = cumulative <= (1.0 - top_p);
  sorted_remove.narrow(-1, sorted_remove.size(-1) - 1, 1).fill_(false);
  const at::Tensor remove = sorted_remove.scatter(1, sorted_indices, sorted_remove);
  return scores.masked_fill(remove, kNegativeInfinity);
}

// The same result as apply_top_p without sorting the whole vocabulary, for the common case where
// an earlier warper (top-k) left few finite scores. HF's ascending sort then starts with all the
// -inf entries, so its sorted values are exactly [-inf x (vocab - n), the n survivors sorted]:
// building that vector gives bit-identical softmax and cumulative sums. What it cannot rebuild is
// the order torch.sort gives to tied survivors, so ties (and NaN or +inf) fall back to the full
// sort. nullopt when this shortcut does not apply.
std::optional<at::Tensor> apply_top_p_to_survivors(const at::Tensor& scores, double top_p) {
  const int64_t vocab = scores.size(1);
  const at::Tensor alive = (scores != kNegativeInfinity).reshape({vocab});
  const at::Tensor alive_ids = alive.nonzero().reshape({-1});  // ascending ids
  const int64_t survivors = alive_ids.size(0);
  if (survivors == 0 || survivors * 4 > vocab) return std::nullopt;
  const auto [sorted_alive, order] = scores.reshape({vocab})
                                         .index_select(0, alive_ids)
                                         .sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const float* values = sorted_alive.data_ptr<float>();
  for (int64_t i = 0; i < survivors; ++i)
    if (!std::isfinite(values[i]) || (i > 0 && values[i] == values[i - 1])) return std::nullopt;

  const at::Tensor sorted_scores =
      at::cat({at::full({vocab - survivors}, kNegativeInfinity, scores.options()), sorted_alive})
          .reshape({1, vocab});
  const at::Tensor cumulative = sorted_scores.softmax(-1).cumsum(-1);
  at::Tensor sorted_remove = cumulative <= (1.0 - top_p);
  sorted_remove.narrow(-1, vocab - 1, 1).fill_(false);
  const at::Tensor survivor_removed = sorted_remove.reshape({vocab}).narrow(0, vocab - survivors, survivors);
  const at::Tensor removed_ids = alive_ids.index_select(0, order).masked_select(survivor_removed);
  return scores.index_fill(1, removed_ids, kNegativeInfinity);
}

}  // namespace

void SamplingOptions::validate() const {
  if (do_sample && !(std::isfinite(temperature) && temperature > 0))
    reject("temperature", "must be a finite value > 0 when do_sample is true", show(temperature));
  if (top_k < 0) reject("top_k", "must be >= 0 (0 disables top-k)", show(top_k));
  if (!(top_p > 0 && top_p <= 1)) reject("top_p", "must be in (0, 1] (1 disables top-p)", show(top_p));
  if (!(std::isfinite(repetition_penalty) && repetition_penalty > 0))
    reject("repetition_penalty", "must be a finite value > 0 (1 disables it)", show(repetition_penalty));
  if (max_new_tokens < 0) reject("max_new_tokens", "must be >= 0", show(max_new_tokens));
  if (min_new_tokens < 0) reject("min_new_tokens", "must be >= 0", show(min_new_tokens));
  if (min_new_tokens > max_new_tokens)
    reject("min_new_tokens", "must not exceed max_new_tokens (" + show(max_new_tokens) + ")",
           show(min_new_tokens));
  for (size_t i = 0; i < stop_sequences.size(); ++i) {
    const std::string name = "stop_sequences[" + std::to_string(i) + "]";
    if (stop_sequences[i].empty()) reject(name, "must not be empty", "an empty sequence");
    for (const int64_t id : stop_sequences[i])
      if (id < 0) reject(name, "must hold token ids >= 0", show(id));
  }
  for (size_t i = 0; i < eos_token_ids.size(); ++i)
    if (eos_token_ids[i] < 0)
      reject("eos_token_ids[" + std::to_string(i) + "]", "must be a token id >= 0", show(eos_token_ids[i]));
  if (force_token_id < -1)
    reject("force_token_id", "must be a token id >= 0, or -1 to disable it", show(force_token_id));
}

SamplingOptions SamplingOptions::minigpt5() {
  SamplingOptions options;
  options.do_sample = true;
  options.temperature = 1.0;
  options.top_k = 50;  // HF GenerationConfig default; MiniGPT-5 never sets top_k
  options.top_p = 0.9;
  options.repetition_penalty = 2.0;
  options.min_new_tokens = 1;  // min_length=1 with an inputs_embeds prompt (input_ids start empty)
  options.max_new_tokens = 256;
  options.stop_sequences = {{835}, {2277, 29937}};  // "###", tokenized two ways
  options.eos_token_ids = {2};
  return options;
}

const char* to_string(StopReason reason) {
  switch (reason) {
    case StopReason::None:
      return "none";
    case StopReason::Eos:
      return "eos";
    case StopReason::StopSequence:
      return "stop_sequence";
    case StopReason::MaxNewTokens:
      return "max_new_tokens";
    case StopReason::Callback:
      return "callback";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------

TokenSampler::TokenSampler(const SamplingOptions& options)
    : options_(options), generator_(at::make_generator<at::CPUGeneratorImpl>(options.seed)) {
  options_.validate();
}

TokenSampler::TokenSampler(const TokenSampler& other)
    : options_(other.options_), generator_(other.generator_.clone()) {}

TokenSampler& TokenSampler::operator=(const TokenSampler& other) {
  if (this != &other) {
    options_ = other.options_;
    generator_ = other.generator_.clone();
  }
  return *this;
}

at::Tensor TokenSampler::process(const at::Tensor& logits, const std::vector<int64_t>& context,
                                 int64_t new_tokens) const {
  c10::InferenceMode inference_mode;
  return process_owned(owned_scores(logits), context, new_tokens).reshape({-1});
}

at::Tensor TokenSampler::process_owned(at::Tensor scores, const std::vector<int64_t>& context,
                                       int64_t new_tokens) const {
  if (new_tokens < 0) throw ArgumentError("TokenSampler: new_tokens must be >= 0, got " + show(new_tokens));
  const int64_t vocab = scores.size(1);
  check_ids_in_vocab(context, vocab, "context");
  check_ids_in_vocab(options_.eos_token_ids, vocab, "eos_token_ids");
  if (options_.force_token_id >= vocab)
    throw ArgumentError("TokenSampler: force_token_id " + show(options_.force_token_id) +
                        " is outside the vocabulary [0, " + show(vocab) + ")");

  // Logits processors (HF _get_logits_processor order).
  if (options_.repetition_penalty != 1.0 && !context.empty())
    apply_repetition_penalty(scores, context, options_.repetition_penalty);
  if (new_tokens < options_.min_new_tokens && !options_.eos_token_ids.empty())
    scores.index_fill_(1, id_tensor(options_.eos_token_ids), kNegativeInfinity);

  // Logits warpers (HF _get_logits_warper order), sampling only.
  if (options_.do_sample) {
    if (options_.temperature != 1.0) scores = scores / options_.temperature;
    if (options_.top_k != 0) scores = apply_top_k(scores, options_.top_k);
    if (options_.top_p < 1.0) {
      auto shortcut = apply_top_p_to_survivors(scores, options_.top_p);
      scores = shortcut ? *std::move(shortcut) : apply_top_p(scores, options_.top_p);
    }
  }

  // MiniGPT-5 force_generation, computed on the warped scores like its patched sample loop.
  const int64_t forced = options_.force_token_id;
  if (forced >= 0 && std::find(context.begin(), context.end(), forced) == context.end())
    scores.narrow(1, forced, 1).copy_((scores.max() * 10).reshape({1, 1}));
  return scores;
}

int64_t TokenSampler::next(const at::Tensor& logits, const std::vector<int64_t>& context,
                           int64_t new_tokens) {
  c10::InferenceMode inference_mode;
  at::Tensor scores = owned_scores(logits);
  // Checked before processing, which could hide a NaN (e.g. behind min_new_tokens' -inf).
  if (contains_nan(scores)) throw ArgumentError("TokenSampler: logits contain NaN");
  scores = process_owned(std::move(scores), context, new_tokens);
  if (all_removed(scores))
    throw ArgumentError("TokenSampler: no token can be chosen, every score is -inf after processing (vocab " +
                        show(scores.size(1)) + ", min_new_tokens suppressing " +
                        show(options_.eos_token_ids.size()) + " EOS id(s))");
  if (!options_.do_sample) return scores.argmax(-1).item<int64_t>();

  // HF sample(): softmax over the processed scores, then one multinomial draw.
  const at::Tensor probabilities = scores.softmax(-1);
  try {
    return at::multinomial(probabilities, 1, /*replacement=*/false, generator_).item<int64_t>();
  } catch (const c10::Error& e) {
    throw ArgumentError(std::string("TokenSampler: the processed scores are not a valid distribution "
                                    "(infinite logits?): ") +
                        e.what_without_backtrace());
  }
}

// ---------------------------------------------------------------------------------------------

StopChecker::StopChecker(const SamplingOptions& options)
    : stop_sequences_(options.stop_sequences),
      eos_token_ids_(options.eos_token_ids),
      max_new_tokens_(options.max_new_tokens) {
  options.validate();
}

// Upstream's StoppingCriteriaSub compares each stop sequence with input_ids[-len(stop):]; with a
// shorter history that comparison broadcasts (a stop like [5, 5] would match a lone 5). Here a
// stop sequence matches only when all of it is there; for MiniGPT-5's stops the two agree.
size_t StopChecker::matched_stop_length(const std::vector<int64_t>& generated) const {
  size_t longest = 0;
  for (const auto& stop : stop_sequences_)
    if (stop.size() <= generated.size() && stop.size() > longest &&
        std::equal(stop.begin(), stop.end(), generated.end() - static_cast<std::ptrdiff_t>(stop.size())))
      longest = stop.size();
  return longest;
}

StopReason StopChecker::check(const std::vector<int64_t>& generated) const {
  if (!generated.empty()) {
    const int64_t last = generated.back();
    if (std::find(eos_token_ids_.begin(), eos_token_ids_.end(), last) != eos_token_ids_.end())
      return StopReason::Eos;
    if (matched_stop_length(generated) > 0) return StopReason::StopSequence;
  }
  if (static_cast<int64_t>(generated.size()) >= max_new_tokens_) return StopReason::MaxNewTokens;
  return StopReason::None;
}

}  // namespace voken::llm
