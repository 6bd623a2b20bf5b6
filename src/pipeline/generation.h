// MiniGPT-5's text loop with generative vokens (upstream: HF generate through
// MiniGPT5.prepare_inputs_for_generation, then model.py generate()'s choice of hidden states),
// extended to any number of images per response:
//
//  - tokens are sampled one at a time from the session's logits (llm::TokenSampler: HF 4.31
//    processors and warpers, MiniGPT-5's force_generation as SamplingOptions::force_token_id);
//    the repetition penalty sees the sampled tokens only (the prompt went in as embeddings);
//  - when [IMG0] is sampled, [IMG0]..[IMG{n-1}] are fed in one pass (upstream replaces the next
//    step's input with the n voken embeddings); the voken features are the last-layer hidden
//    states at p-1 (the position whose logits chose [IMG0]) and p..p+n-2 ([IMG0] at p). Only the
//    sampled [IMG0] counts as a generated token and enters the penalty context (upstream's loop
//    never appends the forced ones to input_ids); sampling continues from the logits after
//    [IMG{n-1}];
//  - once `max_images` groups exist, [IMG0]'s logit is -inf, so no further image starts;
//  - generation ends on EOS, a stop sequence ("###"), max_new_tokens, or when the session has
//    no room left ("context_full", never an exception mid-generation).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "llm/decoder.h"
#include "llm/sampling.h"
#include "text/tokenizer.h"

namespace voken::pipeline {

// Feeds `voken_ids` ([IMG0] first) in one pass into a session whose last logits chose [IMG0],
// and returns the voken features [n, H] float32: hidden(p-1), hidden(p) .. hidden(p+n-2) where p
// is [IMG0]'s position. ArgumentError if the session is empty or has no room for n positions.
at::Tensor force_vokens(llm::DecodeSession& session, const std::vector<int64_t>& voken_ids);

// "###" as upstream's StoppingCriteriaSub lists it ([835] and [2277, 29937] for LLaMA),
// looked up by piece ("▁###"; "##" then "#") so that other sentencepiece vocabularies get their
// own ids; pieces the vocabulary lacks are left out.
std::vector<std::vector<int64_t>> minigpt5_stop_sequences(const text::Tokenizer& tokenizer);

struct VokenLoopOptions {
  llm::SamplingOptions sampling;   // seed, processors/warpers, stops, EOS, max_new_tokens, force
  std::vector<int64_t> voken_ids;  // [IMG0]..[IMG{n-1}]; empty: plain text generation
  int64_t max_images = 0;          // voken groups allowed; then [IMG0] is masked
};

struct VokenGroup {
  int64_t token_index = 0;  // index of its [IMG0] in VokenLoopResult::tokens
  at::Tensor features;      // [n, H] float32
};

struct VokenLoopResult {
  std::vector<int64_t> tokens;  // sampled tokens (forced vokens excluded), stop tokens included
  std::vector<VokenGroup> groups;
  std::string stop_reason;  // "eos", "stop_sequence", "max_new_tokens", "context_full"
};

struct VokenLoopCallbacks {
  // After each sampled token (before it is fed back): `generated` tokens so far. Return false to
  // cancel (the loop throws voken::Cancelled).
  std::function<bool(int64_t token, int64_t generated)> on_token;
  // When a group's features are ready (`index` = its number), before sampling goes on.
  std::function<void(const VokenGroup& group, int64_t index)> on_vokens;
};

// Runs the loop from a prefilled session. ArgumentError for invalid sampling options or an
// unprefilled session.
VokenLoopResult run_voken_loop(llm::DecodeSession& session, const VokenLoopOptions& options,
                               const VokenLoopCallbacks& callbacks = {});

}  // namespace voken::pipeline
