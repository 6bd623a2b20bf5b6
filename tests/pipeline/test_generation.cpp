// The voken loop (generation.h): forced vokens and the positions of their hidden states, images
// bounded by max_images, force_image, stop rules, context_full, cancel, determinism. A tiny
// in-memory LLaMA whose logits are steerable: every layer's output projections are zero, so the
// last hidden state is the token's own (normalised) embedding; channel 0 of every embedding is a
// positive constant, so lm_head column 0 is a per-token logit bias.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/golden.h"
#include "common/test_support.h"
#include "llm/decoder.h"
#include "llm/llama.h"
#include "pipeline/generation.h"
#include "voken/error.h"

namespace voken::pipeline {
namespace {

constexpr int64_t kVocab = 24;
constexpr int64_t kHidden = 8;
constexpr int64_t kImg0 = 10;  // [IMG0]..[IMG7] = 10..17

std::vector<int64_t> vokens() {
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < 8; ++i) ids.push_back(kImg0 + i);
  return ids;
}

// `bias[t]`: token t's logit per unit of the (positive) channel-0 activation.
llm::Llama steerable_llama(const std::vector<double>& bias, uint64_t seed = 7) {
  at::manual_seed(seed);
  llm::LlamaConfig config;
  config.vocab_size = kVocab;
  config.hidden_size = kHidden;
  config.intermediate_size = 16;
  config.num_hidden_layers = 1;
  config.num_attention_heads = 2;
  config.num_key_value_heads = 2;
  config.max_position_embeddings = 64;
  io::StateDict weights;
  at::Tensor embed = at::randn({kVocab, kHidden});
  embed.select(1, 0).fill_(3.0);
  weights.insert("model.embed_tokens.weight", embed, "test");
  const std::string p = "model.layers.0.";
  weights.insert(p + "input_layernorm.weight", at::ones({kHidden}), "test");
  weights.insert(p + "post_attention_layernorm.weight", at::ones({kHidden}), "test");
  for (const char* name : {"q_proj", "k_proj", "v_proj"})
    weights.insert(p + "self_attn." + name + ".weight", at::randn({kHidden, kHidden}) * 0.3, "test");
  weights.insert(p + "self_attn.o_proj.weight", at::zeros({kHidden, kHidden}), "test");
  weights.insert(p + "mlp.gate_proj.weight", at::randn({16, kHidden}) * 0.3, "test");
  weights.insert(p + "mlp.up_proj.weight", at::randn({16, kHidden}) * 0.3, "test");
  weights.insert(p + "mlp.down_proj.weight", at::zeros({kHidden, 16}), "test");
  weights.insert("model.norm.weight", at::ones({kHidden}), "test");
  at::Tensor head = at::randn({kVocab, kHidden}) * 0.05;
  head.select(1, 0).copy_(at::tensor(bias, at::kDouble).to(at::kFloat));
  weights.insert("lm_head.weight", head, "test");
  io::WeightLoader loader(weights, {}, "steerable test LLaMA");
  return llm::Llama(config, loader);
}

// Token 3 is the favourite, then 4, 5, ...; [IMG0] below all of them unless `img0` says otherwise.
std::vector<double> biases(double img0 = -2.0) {
  std::vector<double> b(kVocab, 0.0);
  for (int64_t t = 0; t < kVocab; ++t) b[t] = -0.05 * static_cast<double>(t);
  b[3] = 1.0;
  b[2] = -3.0;  // EOS
  b[kImg0] = img0;
  return b;
}

VokenLoopOptions greedy(int64_t max_new_tokens, int64_t max_images) {
  VokenLoopOptions options;
  options.sampling.do_sample = false;
  options.sampling.max_new_tokens = max_new_tokens;
  options.sampling.eos_token_ids = {2};
  options.voken_ids = vokens();
  options.max_images = max_images;
  return options;
}

llm::DecodeSession prefilled(const llm::Llama& model, int64_t capacity, int64_t prompt = 5) {
  llm::DecodeSession session(model, capacity);
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < prompt; ++i) ids.push_back(4 + i);
  session.prefill(ids);
  return session;
}

TEST(VokenLoop, ImagesAreBoundedByMaxImagesAndTextContinues) {
  // [IMG0] is the favourite: it comes as long as max_images allows, then text goes on.
  const llm::Llama model = steerable_llama(biases(5.0));
  for (int64_t max_images : {0, 1, 2, 3}) {
    auto session = prefilled(model, 64);
    const VokenLoopResult r = run_voken_loop(session, greedy(6, max_images));
    ASSERT_EQ(static_cast<int64_t>(r.groups.size()), max_images);
    EXPECT_EQ(r.tokens.size(), 6u);
    EXPECT_EQ(r.stop_reason, "max_new_tokens");
    EXPECT_EQ(std::count(r.tokens.begin(), r.tokens.end(), kImg0), max_images);
    for (int64_t k = 0; k < max_images; ++k) EXPECT_EQ(r.tokens[static_cast<size_t>(k)], kImg0);
    for (size_t k = static_cast<size_t>(max_images); k < r.tokens.size(); ++k) EXPECT_NE(r.tokens[k], kImg0);
    // Positions: the prompt (5), then per image its 8 vokens, then the fed text tokens.
    EXPECT_EQ(session.length(), 5 + 8 * max_images + (6 - max_images - 1));
  }
}

TEST(VokenLoop, VokenFeaturesAreTheHiddenStatesAtPMinus1ToPPlus6) {
  const llm::Llama model = steerable_llama(biases(5.0));
  auto session = prefilled(model, 64);
  const VokenLoopResult r = run_voken_loop(session, greedy(4, 2));
  ASSERT_EQ(r.groups.size(), 2u);
  // Group 0: [IMG0] sampled from the prompt's last logits, fed at p = 5; group 1 at p = 13.
  for (int64_t g = 0; g < 2; ++g) {
    const int64_t p = 5 + 8 * g;
    EXPECT_EQ(r.groups[g].token_index, g);
    ASSERT_EQ(r.groups[g].features.sizes(), at::IntArrayRef({8, kHidden}));
    EXPECT_TRUE(test::bit_equal(r.groups[g].features, session.hidden_states(p - 1, p + 7)));
  }
  // The vokens were fed as ids, the forced ones never count as generated tokens.
  std::vector<int64_t> fed = session.fed_tokens();
  std::vector<int64_t> expected = {4, 5, 6, 7, 8};
  const std::vector<int64_t> ids = vokens();
  for (int g = 0; g < 2; ++g) expected.insert(expected.end(), ids.begin(), ids.end());
  expected.push_back(r.tokens[2]);
  EXPECT_EQ(fed, expected);
}

TEST(VokenLoop, ForceImageBoostsImg0UntilOneImageExists) {
  // [IMG0] is never chosen by itself, but force_token_id puts it first; then it is not boosted.
  const llm::Llama model = steerable_llama(biases(-2.0));
  auto plain_session = prefilled(model, 64);
  const VokenLoopResult plain = run_voken_loop(plain_session, greedy(5, 4));
  EXPECT_TRUE(plain.groups.empty());
  auto session = prefilled(model, 64);
  VokenLoopOptions options = greedy(5, 4);
  options.sampling.force_token_id = kImg0;
  const VokenLoopResult forced = run_voken_loop(session, options);
  ASSERT_EQ(forced.groups.size(), 1u);
  EXPECT_EQ(forced.tokens.front(), kImg0);
  EXPECT_EQ(forced.tokens.size(), 5u);  // text continues after the image
}

TEST(VokenLoop, Img0AsTheLastAllowedTokenStillMakesItsImage) {
  const llm::Llama model = steerable_llama(biases(5.0));
  auto session = prefilled(model, 64);
  const VokenLoopResult r = run_voken_loop(session, greedy(1, 4));
  EXPECT_EQ(r.tokens, std::vector<int64_t>{kImg0});
  EXPECT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.stop_reason, "max_new_tokens");
}

TEST(VokenLoop, ContextFullStopsInsteadOfThrowing) {
  const llm::Llama model = steerable_llama(biases());
  {
    auto session = prefilled(model, 8);  // 5 prompt + 3 positions
    const VokenLoopResult r = run_voken_loop(session, greedy(20, 4));
    EXPECT_EQ(r.stop_reason, "context_full");
    EXPECT_EQ(r.tokens.size(), 4u);  // 3 fed back + the one that found no room
  }
  {
    const llm::Llama eager = steerable_llama(biases(5.0));
    auto session = prefilled(eager, 10);  // 5 positions left: not enough for 8 vokens
    const VokenLoopResult r = run_voken_loop(session, greedy(20, 4));
    EXPECT_EQ(r.stop_reason, "context_full");
    EXPECT_EQ(r.tokens, std::vector<int64_t>{kImg0});
    EXPECT_TRUE(r.groups.empty());
  }
}

TEST(VokenLoop, StopsOnEosAndStopSequences) {
  std::vector<double> b = biases();
  b[2] = 9.0;  // EOS is the favourite
  const llm::Llama eos_model = steerable_llama(b);
  auto session = prefilled(eos_model, 64);
  const VokenLoopResult eos = run_voken_loop(session, greedy(10, 4));
  EXPECT_EQ(eos.stop_reason, "eos");
  EXPECT_EQ(eos.tokens, std::vector<int64_t>{2});  // kept, like HF

  const llm::Llama model = steerable_llama(biases());  // token 3 every time
  auto stop_session = prefilled(model, 64);
  VokenLoopOptions options = greedy(10, 4);
  options.sampling.stop_sequences = {{3, 3, 3}};
  const VokenLoopResult stop = run_voken_loop(stop_session, options);
  EXPECT_EQ(stop.stop_reason, "stop_sequence");
  EXPECT_EQ(stop.tokens, (std::vector<int64_t>{3, 3, 3}));
}

TEST(VokenLoop, CancelAndBadInput) {
  const llm::Llama model = steerable_llama(biases());
  auto session = prefilled(model, 64);
  VokenLoopCallbacks callbacks;
  int calls = 0;
  callbacks.on_token = [&](int64_t, int64_t generated) {
    ++calls;
    return generated < 3;
  };
  EXPECT_THROW(run_voken_loop(session, greedy(10, 4), callbacks), Cancelled);
  EXPECT_EQ(calls, 3);

  llm::DecodeSession empty(model, 16);
  EXPECT_THROW(run_voken_loop(empty, greedy(10, 4)), ArgumentError);
  EXPECT_THROW(force_vokens(empty, vokens()), ArgumentError);
  auto full = prefilled(model, 10);
  EXPECT_THROW(force_vokens(full, vokens()), ArgumentError);  // 5 left, 8 needed
  auto ok = prefilled(model, 64);
  VokenLoopOptions bad = greedy(10, -1);
  EXPECT_THROW(run_voken_loop(ok, bad), ArgumentError);
}

TEST(VokenLoop, SameSeedSameTokens) {
  const llm::Llama model = steerable_llama(biases(0.5));
  VokenLoopOptions options = greedy(12, 2);
  options.sampling = llm::SamplingOptions::minigpt5();
  options.sampling.max_new_tokens = 12;
  options.sampling.stop_sequences.clear();
  options.sampling.eos_token_ids = {2};
  std::vector<std::vector<int64_t>> runs;
  for (uint64_t seed : {11u, 11u, 12u}) {
    options.sampling.seed = seed;
    auto session = prefilled(model, 64);
    runs.push_back(run_voken_loop(session, options).tokens);
  }
  EXPECT_EQ(runs[0], runs[1]);
}

TEST(VokenLoop, MaxNewTokensZeroGeneratesNothing) {
  const llm::Llama model = steerable_llama(biases());
  auto session = prefilled(model, 64);
  const VokenLoopResult r = run_voken_loop(session, greedy(0, 4));
  EXPECT_TRUE(r.tokens.empty());
  EXPECT_EQ(r.stop_reason, "max_new_tokens");
}

}  // namespace
}  // namespace voken::pipeline
