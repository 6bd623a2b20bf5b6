#include "llm/decoder.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <string>

#include "voken/error.h"

namespace voken::llm {

DecodeSession::DecodeSession(const Llama& model, int64_t max_positions)
    : model_(model), cache_(model.new_cache(1, max_positions)), max_positions_(max_positions) {
  c10::InferenceMode guard;
  hidden_record_ = at::empty({max_positions, model.hidden_size()}, at::kFloat);
}

StepOutput DecodeSession::run(const at::Tensor& embeds, const char* what) {
  c10::InferenceMode guard;
  const int64_t count = embeds.size(1);
  if (count > remaining())
    throw ArgumentError(std::string("DecodeSession::") + what + ": " + std::to_string(count) +
                        " positions do not fit (" + std::to_string(length_) + " of " +
                        std::to_string(max_positions_) + " used)");
  LlamaOutput out = model_.forward_embeds(embeds, &cache_, LogitsFor::Last);
  StepOutput result;
  result.first_position = length_;
  result.hidden = out.hidden[0];
  result.logits = out.logits[0][0];
  hidden_record_.narrow(0, length_, count).copy_(result.hidden);
  length_ += count;
  last_logits_ = result.logits;
  return result;
}

StepOutput DecodeSession::prefill(const at::Tensor& inputs_embeds) {
  if (length_ != 0) throw ArgumentError("DecodeSession::prefill: the session already holds a prompt");
  if (!inputs_embeds.defined() || (inputs_embeds.dim() != 2 && inputs_embeds.dim() != 3) ||
      (inputs_embeds.dim() == 3 && inputs_embeds.size(0) != 1))
    throw ArgumentError("DecodeSession::prefill: inputs_embeds must be [T, H] or [1, T, H]");
  return run(inputs_embeds.dim() == 2 ? inputs_embeds.unsqueeze(0) : inputs_embeds, "prefill");
}

StepOutput DecodeSession::prefill(const std::vector<int64_t>& token_ids) {
  if (length_ != 0) throw ArgumentError("DecodeSession::prefill: the session already holds a prompt");
  if (token_ids.empty()) throw ArgumentError("DecodeSession::prefill: no tokens");
  StepOutput out = force(token_ids);
  return out;
}

StepOutput DecodeSession::step(int64_t token) { return force({token}); }

StepOutput DecodeSession::force(const std::vector<int64_t>& tokens) {
  if (tokens.empty()) throw ArgumentError("DecodeSession::force: no tokens");
  c10::InferenceMode guard;
  const at::Tensor ids = at::tensor(tokens, at::kLong).unsqueeze(0);
  StepOutput out = run(model_.embed(ids), "force");
  fed_tokens_.insert(fed_tokens_.end(), tokens.begin(), tokens.end());
  return out;
}

StepOutput DecodeSession::append(const at::Tensor& embeds) {
  if (!embeds.defined() || (embeds.dim() != 2 && embeds.dim() != 3) ||
      (embeds.dim() == 3 && embeds.size(0) != 1))
    throw ArgumentError("DecodeSession::append: embeds must be [n, H] or [1, n, H]");
  return run(embeds.dim() == 2 ? embeds.unsqueeze(0) : embeds, "append");
}

at::Tensor DecodeSession::hidden_at(int64_t position) const {
  if (position < 0 || position >= length_)
    throw ArgumentError("DecodeSession::hidden_at(" + std::to_string(position) + "): positions 0.." +
                        std::to_string(length_ - 1) + " have been fed");
  return hidden_record_[position];
}

at::Tensor DecodeSession::hidden_states(int64_t begin, int64_t end) const {
  if (begin < 0 || end > length_ || begin > end)
    throw ArgumentError("DecodeSession::hidden_states(" + std::to_string(begin) + ", " + std::to_string(end) +
                        "): positions 0.." + std::to_string(length_ - 1) + " have been fed");
  return hidden_record_.narrow(0, begin, end - begin);
}

void DecodeSession::truncate(int64_t new_length) {
  if (new_length < 1 || new_length > length_)
    throw ArgumentError("DecodeSession::truncate(" + std::to_string(new_length) + "): must lie in [1, " +
                        std::to_string(length_) + "]");
  // fed_tokens_ holds ids only for the positions fed as ids; drop as many as the positions lost.
  const int64_t dropped = length_ - new_length;
  const int64_t keep = std::max<int64_t>(0, static_cast<int64_t>(fed_tokens_.size()) - dropped);
  fed_tokens_.resize(static_cast<size_t>(keep));
  cache_.truncate(cache_.prefix_length() + new_length);
  length_ = new_length;
  last_logits_ = at::Tensor();
}

GenerateResult generate(DecodeSession& session, const SamplingOptions& options, const TokenCallback& on_token,
                        const std::vector<int64_t>& context) {
  c10::InferenceMode guard;
  if (!session.last_logits().defined())
    throw ArgumentError("generate: the session has no next-token logits (prefill or feed it first)");
  if (session.remaining() < options.max_new_tokens - 1)
    throw ArgumentError("generate: max_new_tokens " + std::to_string(options.max_new_tokens) +
                        " needs room for " + std::to_string(options.max_new_tokens - 1) +
                        " more positions, the session has " + std::to_string(session.remaining()));
  TokenSampler sampler(options);
  const StopChecker stopper(options);
  GenerateResult result;
  result.reason = stopper.check(result.tokens);  // max_new_tokens == 0
  std::vector<int64_t> seen = context;
  while (result.reason == StopReason::None) {
    const int64_t token =
        sampler.next(session.last_logits(), seen, static_cast<int64_t>(result.tokens.size()));
    result.tokens.push_back(token);
    seen.push_back(token);
    result.reason = stopper.check(result.tokens);
    const bool keep_going = on_token ? on_token(token, session) : true;
    if (result.reason != StopReason::None) break;
    if (!keep_going) {
      result.reason = StopReason::Callback;
      break;
    }
    session.step(token);
  }
  return result;
}

}  // namespace voken::llm
