#include "pipeline/generation.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <limits>

#include "voken/error.h"

namespace voken::pipeline {

at::Tensor force_vokens(llm::DecodeSession& session, const std::vector<int64_t>& voken_ids) {
  c10::InferenceMode guard;
  if (voken_ids.empty()) throw ArgumentError("force_vokens: no voken ids");
  const int64_t p = session.length();
  if (p < 1) throw ArgumentError("force_vokens: the session holds no position whose logits chose [IMG0]");
  const int64_t n = static_cast<int64_t>(voken_ids.size());
  if (session.remaining() < n)
    throw ArgumentError("force_vokens: " + std::to_string(n) + " voken positions do not fit (" +
                        std::to_string(session.remaining()) + " left)");
  session.force(voken_ids);
  // model.py generate(): cat([hidden of the step that produced [IMG0], hidden of [IMG0]..[IMG6]]).
  return session.hidden_states(p - 1, p + n - 1).clone();
}

std::vector<std::vector<int64_t>> minigpt5_stop_sequences(const text::Tokenizer& tokenizer) {
  std::vector<std::vector<int64_t>> stops;
  if (auto whole = tokenizer.token_id("\xE2\x96\x81###")) stops.push_back({*whole});  // "▁###"
  const auto hashes = tokenizer.token_id("##");
  const auto hash = tokenizer.token_id("#");
  if (hashes && hash) stops.push_back({*hashes, *hash});
  return stops;
}

VokenLoopResult run_voken_loop(llm::DecodeSession& session, const VokenLoopOptions& options,
                               const VokenLoopCallbacks& callbacks) {
  c10::InferenceMode guard;
  if (!session.last_logits().defined())
    throw ArgumentError("run_voken_loop: the session has no next-token logits (prefill it first)");
  if (options.max_images < 0)
    throw ArgumentError("run_voken_loop: max_images must be >= 0, got " + std::to_string(options.max_images));
  llm::SamplingOptions sampling = options.sampling;
  const bool vokens = !options.voken_ids.empty();
  const int64_t img0 = vokens ? options.voken_ids.front() : -1;
  // No image may start: a boost of [IMG0] would undo its mask.
  if (vokens && options.max_images == 0 && sampling.force_token_id == img0) sampling.force_token_id = -1;
  llm::TokenSampler sampler(sampling);
  const llm::StopChecker stopper(sampling);

  VokenLoopResult result;
  llm::StopReason reason = stopper.check(result.tokens);  // max_new_tokens == 0
  const int64_t forced = static_cast<int64_t>(options.voken_ids.size());
  while (reason == llm::StopReason::None) {
    at::Tensor logits = session.last_logits();
    if (vokens && static_cast<int64_t>(result.groups.size()) >= options.max_images) {
      logits = logits.to(at::kFloat).clone();
      logits[img0] = -std::numeric_limits<float>::infinity();
    }
    const int64_t token = sampler.next(logits, result.tokens, static_cast<int64_t>(result.tokens.size()));
    result.tokens.push_back(token);
    reason = stopper.check(result.tokens);
    if (callbacks.on_token && !callbacks.on_token(token, static_cast<int64_t>(result.tokens.size())))
      throw Cancelled("generation cancelled by the progress callback");

    if (vokens && token == img0) {
      // The image is completed even when [IMG0] was the last token allowed: the forced vokens are
      // not generated tokens.
      if (session.remaining() < forced) {
        result.stop_reason = "context_full";
        return result;
      }
      VokenGroup group;
      group.token_index = static_cast<int64_t>(result.tokens.size()) - 1;
      group.features = force_vokens(session, options.voken_ids);
      result.groups.push_back(group);
      if (callbacks.on_vokens)
        callbacks.on_vokens(result.groups.back(), static_cast<int64_t>(result.groups.size()) - 1);
      continue;
    }
    if (reason != llm::StopReason::None) break;
    if (session.remaining() < 1) {
      result.stop_reason = "context_full";
      return result;
    }
    session.step(token);
  }
  result.stop_reason = llm::to_string(reason);
  return result;
}

}  // namespace voken::pipeline
