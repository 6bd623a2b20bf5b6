// Stepwise decoding of one sequence with a Llama and its KV cache, shaped for MiniGPT-5's loop:
// prefill a prompt given as embeddings (text rows with image features spliced in), then feed
// tokens one at a time (step) or several in one pass (force: e.g. the eight voken tokens
// [IMG0]..[IMG7] MiniGPT-5 appends once [IMG0] is sampled), reading the next-token logits and the
// last-layer hidden state of every position fed so far (the voken features are hidden states at
// positions p-1 .. p+6 of [IMG0] at p).
//
// generate() is the convenience loop on top: TokenSampler picks tokens (HF processor order),
// StopChecker ends on EOS / stop sequences / max_new_tokens, and a per-token callback can stop.
// Like HF generate, the last generated token is not fed to the model.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "llm/llama.h"
#include "llm/sampling.h"

namespace voken::llm {

// What one prefill/step/force returns.
struct StepOutput {
  at::Tensor logits;           // [V] float32: next-token logits after the last position fed
  at::Tensor hidden;           // [n, H] float32: last-layer hidden states of the n positions fed
  int64_t first_position = 0;  // session position of hidden[0]
};

// One sequence (batch 1). Holds a reference to the model, which must outlive it. Positions are
// counted from 0 at the first prompt row (prefix-tuning rows are not positions of the session).
class DecodeSession {
 public:
  // max_positions: prompt + everything to be generated or forced; the cache and the hidden-state
  // record are allocated once for it. ArgumentError if it exceeds the model's context.
  DecodeSession(const Llama& model, int64_t max_positions);

  // The prompt, as embeddings [T, H] or [1, T, H] (any float dtype) or as token ids. Only once,
  // before anything else.
  StepOutput prefill(const at::Tensor& inputs_embeds);
  StepOutput prefill(const std::vector<int64_t>& token_ids);

  // Feeds one token / several tokens in one batched pass.
  StepOutput step(int64_t token);
  StepOutput force(const std::vector<int64_t>& tokens);
  // Feeds more embedding rows (e.g. an image in the middle of a conversation).
  StepOutput append(const at::Tensor& embeds);

  // Positions fed so far; the capacity; what is left.
  int64_t length() const { return length_; }
  int64_t max_positions() const { return max_positions_; }
  int64_t remaining() const { return max_positions_ - length_; }

  // Last-layer hidden state [H] at a position fed so far / rows [begin, end) as [end-begin, H].
  at::Tensor hidden_at(int64_t position) const;
  at::Tensor hidden_states(int64_t begin, int64_t end) const;
  // Next-token logits [V] after the last position fed (undefined before the prefill).
  const at::Tensor& last_logits() const { return last_logits_; }
  // Token ids fed through prefill(ids), step and force, in order (embedding rows are not ids).
  const std::vector<int64_t>& fed_tokens() const { return fed_tokens_; }

  // Forgets positions >= new_length (so that they can be fed again differently); the next-token
  // logits become undefined until the next feed. ArgumentError outside [1, length()].
  void truncate(int64_t new_length);

  const Llama& model() const { return model_; }

 private:
  StepOutput run(const at::Tensor& embeds, const char* what);

  const Llama& model_;
  KvCache cache_;
  int64_t max_positions_;
  int64_t length_ = 0;
  at::Tensor hidden_record_;  // [max_positions, H] float32
  at::Tensor last_logits_;
  std::vector<int64_t> fed_tokens_;
};

struct GenerateResult {
  std::vector<int64_t> tokens;  // generated ids, the stopping token included (as HF returns them)
  StopReason reason = StopReason::None;
};

// Called once per generated token, after it was chosen and before it is fed back; the session's
// last_logits() are the logits that chose it. Return false to stop (StopReason::Callback).
using TokenCallback = std::function<bool(int64_t token, const DecodeSession& session)>;

// Generates from the session's current state (it must have been prefilled). `context` are ids
// the repetition penalty (and force_token_id) see before the generated ones (HF: input_ids;
// MiniGPT-5 prompts go in as embeddings, so there it is empty). The session needs room for
// max_new_tokens - 1 more positions (ArgumentError otherwise, before anything is generated).
GenerateResult generate(DecodeSession& session, const SamplingOptions& options,
                        const TokenCallback& on_token = {}, const std::vector<int64_t>& context = {});

}  // namespace voken::llm
