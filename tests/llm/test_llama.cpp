// LLaMA model unit tests: an independent float64 reference on random tiny models (GQA, tied
// embeddings, sharded .bin checkpoints), KV-cached decoding against full recompute for 32 steps
// in float32 and bf16, the bf16 path against the fp32 goldens, the streaming bf16 kernel, the
// stepwise decoder, and every bad input (config, weights, ids, lengths) with its message.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/golden.h"
#include "common/test_support.h"
#include "core/gemv.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/torch_file.h"
#include "llama_cases.h"
#include "llm/decoder.h"
#include "llm/linear.h"
#include "llm/llama.h"
#include "tiny_llama.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

using test::TempDir;

// Expects `body` to throw E with every one of `fragments` in its message.
template <typename E, typename F>
void expect_error(F&& body, const std::vector<std::string>& fragments) {
  try {
    body();
    ADD_FAILURE() << "no exception; expected one mentioning '" << fragments.front() << "'";
  } catch (const E& e) {
    const std::string message = e.what();
    for (const auto& f : fragments)
      EXPECT_NE(message.find(f), std::string::npos) << "'" << f << "' not in: " << message;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// ---------------------------------------------------------------------------------------------
// Forward against the independent reference.

struct TinyCase {
  const char* what;
  tiny::Spec spec;
};

class TinyModels : public ::testing::TestWithParam<TinyCase> {};

TEST_P(TinyModels, ForwardMatchesFloat64Reference) {
  const tiny::Spec spec = GetParam().spec;
  TempDir dir;
  const auto weights = tiny::make_weights(spec, 7);
  tiny::write_model(dir.path(), spec, weights);
  const Llama model = Llama::load(dir.path());
  EXPECT_EQ(model.vocab_size(), spec.vocab);
  const at::Tensor ids = at::randint(spec.vocab, {2, 11}, at::kLong);
  const LlamaOutput out = model.forward(ids);
  ASSERT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 11, spec.vocab}));
  ASSERT_EQ(out.hidden.sizes(), (std::vector<int64_t>{2, 11, spec.hidden}));
  const auto w = tiny::as_map(weights);
  for (int64_t b = 0; b < 2; ++b) {
    const at::Tensor embeds = w.at("model.embed_tokens.weight").index_select(0, ids[b]);
    const auto ref = tiny::reference_forward(spec, w, embeds);
    EXPECT_LT(max_diff(out.logits[b], ref.logits), 2e-5) << GetParam().what;
    EXPECT_LT(max_diff(out.hidden[b], ref.hidden), 2e-5) << GetParam().what;
  }
}

tiny::Spec gqa_spec() {
  tiny::Spec s;
  s.heads = 4;
  s.kv_heads = 2;
  return s;
}
tiny::Spec mqa_tied_spec() {
  tiny::Spec s;
  s.heads = 4;
  s.kv_heads = 1;
  s.tie = true;
  s.theta = 500000.0;
  return s;
}
tiny::Spec odd_sizes_spec() {
  tiny::Spec s;
  s.hidden = 40;  // head_dim 10, intermediate not a multiple of 16
  s.heads = 4;
  s.kv_heads = 4;
  s.intermediate = 37;
  s.layers = 3;
  return s;
}

INSTANTIATE_TEST_SUITE_P(Shapes, TinyModels,
                         ::testing::Values(TinyCase{"mha", tiny::Spec{}}, TinyCase{"gqa", gqa_spec()},
                                           TinyCase{"mqa+tied", mqa_tied_spec()},
                                           TinyCase{"odd sizes", odd_sizes_spec()}));

TEST(Llama, ShardedBinCheckpointLoadsLikeSafetensors) {
  const tiny::Spec spec;
  TempDir single, sharded;
  const auto weights = tiny::make_weights(spec, 3);
  tiny::write_model(single.path(), spec, weights);
  std::ofstream(sharded.file("config.json")) << tiny::config_json(spec).dump();
  io::Json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", io::Json::object()}};
  const size_t half = weights.size() / 2;
  for (int shard = 0; shard < 2; ++shard) {
    const std::string file = "pytorch_model-0000" + std::to_string(shard + 1) + "-of-00002.bin";
    tiny::Weights part(weights.begin() + (shard ? half : 0), shard ? weights.end() : weights.begin() + half);
    for (const auto& [name, t] : part) index["weight_map"][name] = file;
    // fp16 on disk: widened to float32 at load.
    for (auto& [name, t] : part) t = t.to(at::kHalf);
    io::save_torch_state_dict(sharded.file(file), part);
  }
  std::ofstream(sharded.file("pytorch_model.bin.index.json")) << index.dump();
  const Llama a = Llama::load(single.path());
  const Llama b = Llama::load(sharded.path());
  EXPECT_EQ(b.weight_dtype(), at::kFloat);
  const at::Tensor ids = at::arange(1, 9, at::kLong).unsqueeze(0);
  // fp16 storage rounds the weights: close, not equal.
  EXPECT_LT(max_diff(a.forward(ids).logits, b.forward(ids).logits), 2e-2);
}

TEST(Llama, InvFreqBuffersOfOldCheckpointsAreIgnored) {
  const tiny::Spec spec;
  TempDir dir;
  auto weights = tiny::make_weights(spec, 3);
  weights.emplace_back("model.layers.0.self_attn.rotary_emb.inv_freq", at::ones({spec.head_dim() / 2}));
  tiny::write_model(dir.path(), spec, weights);
  EXPECT_NO_THROW(Llama::load(dir.path()));
}

TEST(Llama, ThreadCountOptionSetsTheIntraOpPool) {
  const tiny::Spec spec;
  TempDir dir;
  tiny::write_model(dir.path(), spec, tiny::make_weights(spec, 3));
  const int before = at::get_num_threads();
  LlamaLoadOptions options;
  options.num_threads = 2;
  Llama::load(dir.path(), options);
  EXPECT_EQ(at::get_num_threads(), 2);
  at::set_num_threads(before);
  options.num_threads = 0;
  Llama::load(dir.path(), options);
  EXPECT_EQ(at::get_num_threads(), before);  // 0 leaves the setting alone
}

// ---------------------------------------------------------------------------------------------
// KV cache: decoding step by step equals recomputing the whole sequence.

void expect_cached_equals_recompute(const Llama& model, double tolerance, double hidden_tolerance) {
  at::manual_seed(11);
  const int64_t prompt = 9, steps = 32;
  const at::Tensor all_ids = at::randint(model.vocab_size(), {1, prompt + steps}, at::kLong);
  KvCache cache = model.new_cache(1, prompt + steps);
  model.forward(all_ids.narrow(1, 0, prompt), &cache, LogitsFor::Last);
  double worst_logits = 0, worst_hidden = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const LlamaOutput step = model.forward(all_ids.narrow(1, prompt + i, 1), &cache, LogitsFor::Last);
    const LlamaOutput full = model.forward(all_ids.narrow(1, 0, prompt + i + 1), nullptr, LogitsFor::Last);
    worst_logits = std::max(worst_logits, max_diff(step.logits, full.logits));
    worst_hidden = std::max(worst_hidden, max_diff(step.hidden[0][0], full.hidden[0][prompt + i]));
  }
  EXPECT_EQ(cache.length(), prompt + steps);
  EXPECT_LE(worst_logits, tolerance);
  EXPECT_LE(worst_hidden, hidden_tolerance);
  std::printf("cached vs recompute (%s weights, %lld steps): logits %.3g, hidden %.3g\n",
              c10::toString(model.weight_dtype()), static_cast<long long>(steps), worst_logits, worst_hidden);
}

TEST(KvCache, DecodeEqualsFullRecomputeFloat32) {
  const auto golden = test::GoldenSet::open("llama");
  tiny::Spec spec = gqa_spec();
  TempDir dir;
  tiny::write_model(dir.path(), spec, tiny::make_weights(spec, 5));
  expect_cached_equals_recompute(Llama::load(dir.path()), 1e-5, 1e-5);
  if (golden) expect_cached_equals_recompute(Llama::load(golden->model_dir()), 2e-5, 1e-5);
}

// bf16: a prefill of more than core::kGemvMaxRows rows runs oneDNN with bf16-rounded
// activations, a decode step the float32-activation kernel, so the two differ by bf16 rounding
// of the activations (relative ~2^-8 per product). Tolerance: 2% of the largest |logit|.
TEST(KvCache, DecodeEqualsFullRecomputeBfloat16) {
  const auto golden = test::GoldenSet::open("llama");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("llama");
  LlamaLoadOptions options;
  options.dtype = at::kBFloat16;
  const Llama model = Llama::load(golden->model_dir(), options);
  EXPECT_EQ(model.weight_dtype(), at::kBFloat16);
  expect_cached_equals_recompute(model, 0.25, 0.1);
}

TEST(KvCache, TruncateAndRefeedGivesTheSameResult) {
  tiny::Spec spec = gqa_spec();
  TempDir dir;
  tiny::write_model(dir.path(), spec, tiny::make_weights(spec, 5));
  const Llama model = Llama::load(dir.path());
  const at::Tensor ids = at::randint(spec.vocab, {1, 12}, at::kLong);
  KvCache cache = model.new_cache(1, 16);
  model.forward(ids.narrow(1, 0, 8), &cache);
  const LlamaOutput first = model.forward(ids.narrow(1, 8, 4), &cache);
  KvCache branch = cache.clone();
  cache.truncate(8);
  const LlamaOutput again = model.forward(ids.narrow(1, 8, 4), &cache);
  EXPECT_TRUE(at::equal(first.logits, again.logits));
  // The clone was independent of what happened to the original since.
  EXPECT_EQ(branch.length(), 12);
  cache.truncate(8);
  model.forward(at::zeros({1, 4}, at::kLong), &cache);
  const LlamaOutput next = model.forward(ids.narrow(1, 0, 1), &branch);
  KvCache fresh = model.new_cache(1, 16);
  model.forward(ids, &fresh);
  EXPECT_TRUE(at::allclose(next.logits, model.forward(ids.narrow(1, 0, 1), &fresh).logits, 1e-5, 1e-5));
  expect_error<ArgumentError>([&] { cache.truncate(13); }, {"truncate(13)", "[0, 12]"});
}

// ---------------------------------------------------------------------------------------------
// The streaming bf16 kernel against at::linear on the same (widened) weights.

TEST(StreamingKernel, MatchesFloat32ProductForAllRowCountsAndTails) {
  if (!core::gemv_supported()) GTEST_SKIP() << "CPU without AVX-512 F/BW/VL";
  at::manual_seed(2);
  for (int64_t in : {16, 37, 64, 130}) {
    for (int64_t out : {1, 7, 33}) {
      const at::Tensor weight = at::randn({out, in}).to(at::kBFloat16);
      for (int64_t rows = 1; rows <= 10; ++rows) {
        const at::Tensor x = at::randn({rows, in});
        const at::Tensor want = at::linear(x.to(at::kDouble), weight.to(at::kDouble));
        const at::Tensor got = core::gemv_bf16(x, weight);
        EXPECT_LT(max_diff(got, want), 1e-4 * std::sqrt(static_cast<double>(in)))
            << "in " << in << " out " << out << " rows " << rows;
      }
    }
  }
  expect_error<ArgumentError>(
      [] {
        core::gemv_bf16(at::ones({2, 3}), at::ones({4, 5}).to(at::kBFloat16));
      },
      {"3 columns", "expects 5"});
  expect_error<ArgumentError>([] { core::gemv_bf16(at::ones({2, 3}), at::ones({4, 3})); }, {"bfloat16"});
}

TEST(StreamingKernel, DenseChoosesAPathForEveryShape) {
  at::manual_seed(4);
  const at::Tensor weight = at::randn({24, 40});
  const at::Tensor x = at::randn({3, 20, 40});
  EXPECT_TRUE(at::allclose(dense(x, weight), at::linear(x, weight)));
  const at::Tensor bf = weight.to(at::kBFloat16);
  for (int64_t rows : {1, 8, 9, 60}) {
    const at::Tensor xr = at::randn({rows, 40});
    const at::Tensor got = dense(xr, bf);
    EXPECT_EQ(got.scalar_type(), at::kFloat);
    EXPECT_LT(max_diff(got, at::linear(xr, bf.to(at::kFloat))), 0.1) << rows;
  }
}

// ---------------------------------------------------------------------------------------------
// DecodeSession and generate().

class Decoder : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_ = gqa_spec();
    tiny::write_model(dir_.path(), spec_, tiny::make_weights(spec_, 9));
    model_.emplace(Llama::load(dir_.path()));
  }
  tiny::Spec spec_;
  TempDir dir_;
  std::optional<Llama> model_;
};

TEST_F(Decoder, ForcingSeveralTokensEqualsSteppingThem) {
  const std::vector<int64_t> prompt = {1, 5, 9, 33};
  const std::vector<int64_t> forced = {40, 41, 42, 43, 44};
  DecodeSession a(*model_, 16), b(*model_, 16);
  a.prefill(prompt);
  b.prefill(model_->embed(at::tensor(prompt, at::kLong)));
  const StepOutput together = a.force(forced);
  StepOutput last;
  for (int64_t t : forced) last = b.step(t);
  EXPECT_EQ(together.first_position, 4);
  EXPECT_EQ(together.hidden.size(0), 5);
  EXPECT_LT(max_diff(together.logits, last.logits), 1e-5);
  EXPECT_LT(max_diff(a.hidden_states(0, 9), b.hidden_states(0, 9)), 1e-5);
  EXPECT_LT(max_diff(a.hidden_at(8), last.hidden[0]), 1e-5);
  EXPECT_EQ(a.length(), 9);
  EXPECT_EQ(a.fed_tokens().size(), 9u);
  EXPECT_EQ(b.fed_tokens().size(), 5u);  // the prompt went in as embeddings
  // Full recompute agrees with the session's record.
  std::vector<int64_t> all = prompt;
  all.insert(all.end(), forced.begin(), forced.end());
  const LlamaOutput full = model_->forward(at::tensor(all, at::kLong));
  EXPECT_LT(max_diff(full.hidden[0], a.hidden_states(0, 9)), 1e-5);
  EXPECT_LT(max_diff(full.logits[0][8], a.last_logits()), 1e-5);
}

TEST_F(Decoder, GenerateStopsForEveryReason) {
  DecodeSession session(*model_, 64);
  session.prefill(std::vector<int64_t>{1, 2, 3});
  const at::Tensor start_logits = session.last_logits();
  SamplingOptions greedy;
  greedy.max_new_tokens = 6;
  std::vector<int64_t> seen;
  auto result = generate(session, greedy, [&](int64_t token, const DecodeSession&) {
    seen.push_back(token);
    return true;
  });
  EXPECT_EQ(result.reason, StopReason::MaxNewTokens);
  EXPECT_EQ(result.tokens.size(), 6u);
  EXPECT_EQ(seen, result.tokens);
  EXPECT_EQ(session.length(), 3 + 5);  // the last token is not fed
  EXPECT_EQ(result.tokens[0], start_logits.argmax().item<int64_t>());

  // Greedy is deterministic: the first token again, as EOS.
  DecodeSession again(*model_, 64);
  again.prefill(std::vector<int64_t>{1, 2, 3});
  SamplingOptions eos = greedy;
  eos.eos_token_ids = {result.tokens[1]};
  EXPECT_EQ(generate(again, eos).reason, StopReason::Eos);

  DecodeSession third(*model_, 64);
  third.prefill(std::vector<int64_t>{1, 2, 3});
  int calls = 0;
  const auto stopped = generate(third, greedy, [&](int64_t, const DecodeSession&) { return ++calls < 2; });
  EXPECT_EQ(stopped.reason, StopReason::Callback);
  EXPECT_EQ(stopped.tokens.size(), 2u);
}

TEST_F(Decoder, BadUseIsRefused) {
  DecodeSession session(*model_, 6);
  expect_error<ArgumentError>([&] { generate(session, SamplingOptions{}); }, {"prefill"});
  expect_error<ArgumentError>([&] { session.hidden_at(0); }, {"hidden_at(0)"});
  session.prefill(std::vector<int64_t>{1, 2, 3, 4});
  expect_error<ArgumentError>([&] { session.prefill(std::vector<int64_t>{1}); }, {"already"});
  expect_error<ArgumentError>([&] { session.force({5, 6, 7}); }, {"3 positions do not fit", "4 of 6"});
  SamplingOptions long_run;
  long_run.max_new_tokens = 10;
  expect_error<ArgumentError>([&] { generate(session, long_run); }, {"max_new_tokens 10", "has 2"});
  expect_error<ArgumentError>([&] { session.step(spec_.vocab); }, {"token id 97", "[0, 97)"});
  EXPECT_EQ(session.length(), 4);  // nothing was fed by the failed calls
  expect_error<ArgumentError>([&] { session.hidden_states(2, 5); }, {"hidden_states(2, 5)"});
  expect_error<ArgumentError>([&] { DecodeSession(*model_, spec_.max_positions + 1); },
                              {"exceed the context of 128"});
  session.truncate(2);
  EXPECT_FALSE(session.last_logits().defined());
  EXPECT_EQ(session.fed_tokens().size(), 2u);
}

// ---------------------------------------------------------------------------------------------
// Bad input: configs.

io::Json good_config() { return tiny::config_json(tiny::Spec{}); }

void expect_config_error(io::Json json, const std::vector<std::string>& fragments) {
  expect_error<ConfigError>([&] { LlamaConfig::from_json(io::JsonView(json, "cfg.json")); }, fragments);
}

TEST(LlamaConfig, ReadsHfFieldsAndDefaults) {
  io::Json json = good_config();
  json.erase("num_key_value_heads");
  json.erase("rope_theta");
  json.erase("max_position_embeddings");
  json["eos_token_id"] = {2, 3};  // lists are tolerated (informational ids)
  const LlamaConfig c = LlamaConfig::from_json(io::JsonView(json, "cfg.json"));
  EXPECT_EQ(c.num_key_value_heads, c.num_attention_heads);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.head_dim(), 8);
}

TEST(LlamaConfig, MissingOrInconsistentFieldsAreNamed) {
  for (const char* field :
       {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}) {
    io::Json json = good_config();
    json.erase(field);
    expect_config_error(json, {"cfg.json", field});
  }
  io::Json json = good_config();
  json["hidden_size"] = 30;
  expect_config_error(json, {"hidden_size 30 is not divisible by num_attention_heads 4"});
  json = good_config();
  json["num_key_value_heads"] = 3;
  expect_config_error(json, {"num_attention_heads 4 is not divisible by num_key_value_heads 3"});
  json = good_config();
  json["hidden_size"] = 36;
  json["num_attention_heads"] = 4;
  json["num_key_value_heads"] = 4;
  expect_config_error(json, {"head_dim", "9", "even"});
  json = good_config();
  json["num_hidden_layers"] = 0;
  expect_config_error(json, {"num_hidden_layers must be positive"});
  json = good_config();
  json["hidden_act"] = "gelu";
  expect_config_error(json, {"hidden_act 'gelu'"});
  json = good_config();
  json["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  expect_config_error(json, {"rope_scaling", "linear"});
  json = good_config();
  json["model_type"] = "mistral";
  expect_config_error(json, {"model_type is 'mistral'"});
  json = good_config();
  json["rms_norm_eps"] = "small";
  expect_config_error(json, {"rms_norm_eps", "wrong type"});
  TempDir dir;
  expect_error<FileNotFoundError>([&] { Llama::load(dir.path()); }, {"config.json"});
}

// ---------------------------------------------------------------------------------------------
// Bad input: weights (all problems in one message).

TEST(LlamaWeights, MissingExtraAndMisShapedAreListedTogether) {
  const tiny::Spec spec;
  TempDir dir;
  tiny::Weights weights;
  for (auto& [name, t] : tiny::make_weights(spec, 1)) {
    if (name == "model.layers.1.mlp.up_proj.weight") continue;                               // missing
    if (name == "model.layers.0.self_attn.k_proj.weight") t = at::zeros({16, spec.hidden});  // mis-shaped
    weights.emplace_back(name, t);
  }
  weights.emplace_back("model.layers.2.self_attn.q_proj.weight", at::zeros({4, 4}));  // unexpected
  tiny::write_model(dir.path(), spec, weights);
  expect_error<WeightsError>([&] { Llama::load(dir.path()); },
                             {"missing (1)", "model.layers.1.mlp.up_proj.weight", "wrong shape (1)",
                              "model.layers.0.self_attn.k_proj.weight: expected [32, 32], found [16, 32]",
                              "unexpected (1)", "model.layers.2.self_attn.q_proj.weight"});
  LlamaLoadOptions lenient;
  lenient.strict = false;
  expect_error<WeightsError>([&] { Llama::load(dir.path(), lenient); }, {"missing (1)"});
}

TEST(LlamaWeights, Bf16OptionKeepsBf16CheckpointsAndRefusesOtherDtypes) {
  const tiny::Spec spec;
  TempDir dir;
  tiny::Weights weights = tiny::make_weights(spec, 1);
  for (auto& [name, t] : weights) t = t.to(at::kBFloat16);
  tiny::write_model(dir.path(), spec, weights);
  LlamaLoadOptions options;
  options.dtype = at::kBFloat16;
  const Llama model = Llama::load(dir.path(), options);
  EXPECT_EQ(model.weight_dtype(), at::kBFloat16);
  EXPECT_EQ(model.weight("model.norm.weight").scalar_type(), at::kFloat);
  EXPECT_EQ(model.weight_bytes(), io::StateDict::load(dir.path()).nbytes() + 2 * (2 * 2 + 1) * spec.hidden);
  options.dtype = at::kHalf;
  expect_error<ArgumentError>([&] { Llama::load(dir.path(), options); }, {"float32 or bfloat16"});
}

// ---------------------------------------------------------------------------------------------
// Bad input: ids, shapes, lengths.

TEST(LlamaInput, BadIdsShapesAndLengthsAreRefused) {
  const tiny::Spec spec;
  TempDir dir;
  tiny::write_model(dir.path(), spec, tiny::make_weights(spec, 1));
  const Llama model = Llama::load(dir.path());
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::tensor(std::vector<int64_t>{1, 97}, at::kLong));
      },
      {"token id 97 is outside the vocabulary [0, 97)"});
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::tensor(std::vector<int64_t>{-1, 3}, at::kLong));
      },
      {"token id -1"});
  expect_error<ArgumentError>([&] { model.forward(at::ones({1, 3}, at::kFloat)); }, {"integer"});
  expect_error<ArgumentError>(
      [&] {
        model.forward_embeds(at::ones({1, 3, 31}));
      },
      {"[B, T, 32]", "[1, 3, 31]"});
  expect_error<ArgumentError>([&] { model.forward_embeds(at::ones({1, 0, 32})); }, {"empty"});
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::zeros({1, 129}, at::kLong));
      },
      {"129 positions", "context of 128"});
  KvCache cache = model.new_cache(1, 10);
  model.forward(at::zeros({1, 8}, at::kLong), &cache);
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::zeros({1, 3}, at::kLong), &cache);
      },
      {"3 new positions do not fit", "8 of 10"});
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::zeros({2, 1}, at::kLong), &cache);
      },
      {"input batch 2", "holds 1"});
  KvCache foreign(1, 1, 4, 10, 8);
  expect_error<ArgumentError>(
      [&] {
        model.forward(at::zeros({1, 1}, at::kLong), &foreign);
      },
      {"not made for this model"});
  expect_error<ArgumentError>([&] { model.new_cache(1, 129); }, {"exceed the context of 128"});
  expect_error<ArgumentError>([&] { model.weight("model.layers.9.mlp.up_proj.weight"); },
                              {"no weight named"});
  EXPECT_EQ(cache.length(), 8);  // failed calls left the cache alone
}

}  // namespace
}  // namespace voken::llm
