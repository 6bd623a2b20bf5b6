// Next-token selection with the semantics of Hugging Face `generate` as pinned by MiniGPT-5
// (transformers 4.31.0): logits processors, sampling warpers, greedy/multinomial choice, and the
// stopping rules (EOS, token-id stop sequences, max new tokens).
//
// Order of operations for one position, as `GenerationMixin.generate` builds it for a decoder-only
// model with num_beams == 1:
//   processors (always):     repetition penalty -> min-new-tokens EOS suppression
//   warpers (do_sample only): temperature -> top-k -> top-p
//   MiniGPT-5 extension:     force_token_id boost (its `force_generation`, see SamplingOptions)
//   choice:                  greedy = argmax (first index among ties, like torch.argmax);
//                            sample = softmax, then at::multinomial(probs, 1) on this sampler's own
//                            CPU generator.
// Cost per token: O(vocab) passes plus top-k's partial selection; top-p needs the ascending order
// of the scores, which costs a full O(vocab log vocab) sort only when more than a quarter of the
// vocabulary survived the earlier steps or the survivors hold ties (see sampling.cpp).
// A processor or warper whose option is neutral (penalty 1, temperature 1, top_k 0, top_p 1,
// min_new_tokens 0) is skipped, exactly as HF leaves it out of its list.
//
// Sampling draws come from a per-sampler at::Generator (a CPUGeneratorImpl seeded with
// `seed`), never from the global RNG. at::multinomial with one sample draws one Exp(1) value
// per vocabulary entry and takes argmax(p / q), so a sampler seeded with S produces the same
// tokens as HF's sampling loop run after `torch.manual_seed(S)` on CPU (or with a
// `torch.Generator().manual_seed(S)`), provided nothing else consumed that generator; the
// cross-check test verifies this against Python's torch.
//
// Upstream MiniGPT-5 values: SamplingOptions itself mirrors HF's neutral semantics (greedy,
// top_k 0 = disabled); SamplingOptions::minigpt5() returns what MiniGPT-5's generate() really
// runs with, including HF's GenerationConfig default top_k = 50 that MiniGPT-5 never overrides.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace voken::llm {

struct SamplingOptions {
  // false: greedy (argmax over processed scores, warpers not applied, like HF greedy_search).
  bool do_sample = false;
  // Sampling warpers (HF TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper); used only
  // when do_sample. temperature 1, top_k 0 and top_p 1 disable the respective warper.
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  // HF RepetitionPenaltyLogitsProcessor over every id of the sampler's `context` argument, once
  // per distinct id: negative scores are multiplied by it, others divided. 1 disables it.
  double repetition_penalty = 1.0;
  // Every EOS id gets -inf while fewer than this many tokens have been generated
  // (HF MinNewTokensLengthLogitsProcessor; also what MinLengthLogitsProcessor amounts to when the
  // prompt is passed as inputs_embeds, as MiniGPT-5 does: its min_length=1 is min_new_tokens=1).
  int64_t min_new_tokens = 0;
  // Generation stops once this many tokens were generated (0: generate nothing).
  int64_t max_new_tokens = 300;
  // Generation stops when the generated tokens end with one of these (MiniGPT-5: [835] and
  // [2277, 29937], the two encodings of "###"). The stop tokens are part of the output.
  std::vector<std::vector<int64_t>> stop_sequences;
  // Generation stops after any of these (kept in the output, like HF); also the ids
  // min_new_tokens suppresses.
  std::vector<int64_t> eos_token_ids;
  // Seed of the sampler's own generator (same seed, same logits -> same tokens).
  uint64_t seed = 0;
  // MiniGPT-5's `force_generation` (its patched sample loop): while this id is absent from the
  // context, its score is set to 10 * max(score) after the warpers. Upstream's formula is kept
  // as is, including its quirk that a negative maximum makes the boost a penalty. Upstream has it
  // only in its sampling loop; here it applies to greedy decoding too. -1 disables it.
  int64_t force_token_id = -1;

  // ArgumentError naming the option and its value when one is out of range.
  void validate() const;

  // What upstream MiniGPT-5 samples with: model.py generate() -> mini_gpt5.py predict() ->
  // llama_model.generate(do_sample=True, top_p=0.9, temperature=1.0, repetition_penalty=2.0,
  // min_length=1, max_new_tokens=256) plus HF 4.31's GenerationConfig default top_k=50, the
  // "###" stop sequences and LLaMA's EOS id 2. The prompt goes in as inputs_embeds, so upstream's
  // repetition penalty and force_generation see only the generated ids (pass those as context).
  static SamplingOptions minigpt5();
};

enum class StopReason { None, Eos, StopSequence, MaxNewTokens, Callback };
const char* to_string(StopReason reason);

// Applies the processors/warpers in HF order and picks the next token. Not thread-safe (next()
// advances the generator); copies get an independent generator continuing from the same state.
class TokenSampler {
 public:
  explicit TokenSampler(const SamplingOptions& options);  // validates the options
  TokenSampler(const TokenSampler& other);
  TokenSampler& operator=(const TokenSampler& other);
  TokenSampler(TokenSampler&&) noexcept = default;
  TokenSampler& operator=(TokenSampler&&) noexcept = default;

  // logits: [vocab] (or [1, vocab]), any float dtype, any device; processed in float32 on CPU.
  // context: the ids the repetition penalty and force_token_id see (HF: the input_ids so far);
  // new_tokens: how many tokens were generated so far (for min_new_tokens).
  int64_t next(const at::Tensor& logits, const std::vector<int64_t>& context, int64_t new_tokens);

  // The processed scores [vocab] float32 (after the processors and, when sampling, the warpers
  // and force_token_id) - what next() takes the argmax of or samples from.
  at::Tensor process(const at::Tensor& logits, const std::vector<int64_t>& context, int64_t new_tokens) const;

  const SamplingOptions& options() const { return options_; }

 private:
  // Processes an owned [1, vocab] float32 CPU tensor in place where possible.
  at::Tensor process_owned(at::Tensor scores, const std::vector<int64_t>& context, int64_t new_tokens) const;

  SamplingOptions options_;
  at::Generator generator_;
};

// Decides, after each generated token, whether generation ends and why.
class StopChecker {
 public:
  explicit StopChecker(const SamplingOptions& options);  // validates the options

  // `generated`: every token generated so far (prompt excluded). Priority when several apply at
  // once: Eos, then StopSequence, then MaxNewTokens. An empty sequence stops only when
  // max_new_tokens == 0. Never returns Callback (that reason belongs to the decode loop).
  StopReason check(const std::vector<int64_t>& generated) const;

  // Length of the stop sequence `generated` ends with (the longest if several match), else 0;
  // lets callers strip the stop marker from the output text.
  size_t matched_stop_length(const std::vector<int64_t>& generated) const;

 private:
  std::vector<std::vector<int64_t>> stop_sequences_;
  std::vector<int64_t> eos_token_ids_;
  int64_t max_new_tokens_;
};

}  // namespace voken::llm
