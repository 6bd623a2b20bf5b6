// TokenSampler and StopChecker: HF 4.31 processing order and semantics (cross-checked against
// tests/fixtures/hf_logits_reference.py run by Debian's torch), seeded sampling, stop rules, and
// option/input validation.
#include "llm/sampling.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "io/json_file.h"
#include "io/state_dict.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

at::Tensor random_logits(int64_t vocab, uint64_t seed, double scale = 3.0) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({vocab}, generator, at::kFloat) * scale;
}

// A bool tensor from 0/1 values (at::tensor has no bool overload on CPU in libtorch 1.13).
at::Tensor mask(std::vector<int64_t> bits) { return at::tensor(bits).to(at::kBool); }

std::vector<int64_t> ids_of(const io::Json& json) { return json.get<std::vector<int64_t>>(); }

SamplingOptions options_from_json(const io::Json& json) {
  SamplingOptions options;
  options.do_sample = json.at("do_sample").get<bool>();
  options.temperature = json.at("temperature").get<double>();
  options.top_k = json.at("top_k").get<int64_t>();
  options.top_p = json.at("top_p").get<double>();
  options.repetition_penalty = json.at("repetition_penalty").get<double>();
  options.min_new_tokens = json.at("min_new_tokens").get<int64_t>();
  options.max_new_tokens = json.at("max_new_tokens").get<int64_t>();
  options.stop_sequences = json.at("stop_sequences").get<std::vector<std::vector<int64_t>>>();
  options.eos_token_ids = ids_of(json.at("eos_token_ids"));
  options.seed = json.at("seed").get<uint64_t>();
  options.force_token_id = json.at("force_token_id").get<int64_t>();
  return options;
}

std::vector<int64_t> to_ids(const at::Tensor& tensor) {
  const at::Tensor flat = tensor.to(at::kLong).contiguous();
  return std::vector<int64_t>(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel());
}

// The Python reference's output, produced once per test run (nullptr + reason when unavailable).
struct Reference {
  test::TempDir dir;
  io::Json description;
  io::StateDict tensors;
};

const Reference* reference(std::string* why_missing) {
  static std::unique_ptr<Reference> loaded;
  static std::string reason;
  static bool attempted = false;
  if (!attempted) {
    attempted = true;
    if (test::run_python("-c 'import torch' >/dev/null 2>&1") != 0) {
      reason = "Debian's python3 with torch is unavailable; HF cross-check skipped";
    } else {
      auto ref = std::make_unique<Reference>();
      const std::string script = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/hf_logits_reference.py";
      if (test::run_python("'" + script + "' '" + ref->dir.path() + "'") != 0) {
        reason = "hf_logits_reference.py failed (see its output above)";
      } else {
        ref->description = io::read_json_file(ref->dir.file("cases.json"));
        ref->tensors = io::StateDict::load(ref->dir.file("tensors.pth"));
        loaded = std::move(ref);
      }
    }
  }
  if (!loaded && why_missing) *why_missing = reason;
  return loaded.get();
}

// Same -inf pattern and finite values within 1e-6; returns the largest finite difference.
::testing::AssertionResult same_scores(const at::Tensor& got, const at::Tensor& want, double* max_err) {
  if (got.scalar_type() != at::kFloat || !got.sizes().equals(want.sizes()))
    return ::testing::AssertionFailure()
           << "got " << got.scalar_type() << got.sizes() << ", want float" << want.sizes();
  const at::Tensor got_removed = got == -kInf;
  const at::Tensor want_removed = want == -kInf;
  if (!at::equal(got_removed, want_removed))
    return ::testing::AssertionFailure() << (got_removed != want_removed).sum().item<int64_t>()
                                         << " positions differ in being removed (-inf)";
  const at::Tensor kept = ~want_removed;
  *max_err = kept.any().item<bool>()
                 ? (got.masked_select(kept).to(at::kDouble) - want.masked_select(kept).to(at::kDouble))
                       .abs()
                       .max()
                       .item<double>()
                 : 0.0;
  if (!(*max_err <= 1e-6)) return ::testing::AssertionFailure() << "max_abs_err " << *max_err << " > 1e-6";
  return ::testing::AssertionSuccess();
}

TEST(SamplingHfReference, ProcessedScoresAndTokensMatchTransformers431) {
  std::string why;
  const Reference* ref = reference(&why);
  if (!ref) GTEST_SKIP() << why;
  const auto& cases = ref->description.at("cases");
  ASSERT_FALSE(cases.empty());
  for (const auto& item : cases) {
    const std::string name = item.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const SamplingOptions options = options_from_json(item.at("options"));
    const std::vector<int64_t> context = ids_of(item.at("context"));
    const int64_t new_tokens = item.at("new_tokens").get<int64_t>();
    const at::Tensor logits = ref->tensors.at(name + ".logits");  // float32, or bfloat16 as is
    const at::Tensor logits_before = logits.clone();

    TokenSampler sampler(options);
    double max_err = 0;
    const auto match = same_scores(sampler.process(logits, context, new_tokens),
                                   ref->tensors.at(name + ".processed"), &max_err);
    EXPECT_TRUE(match);
    std::cout << "REFERENCE sampling/" << name << " max_abs_err=" << max_err << " atol=1e-06 "
              << (match ? "PASS" : "FAIL") << std::endl;
    EXPECT_TRUE(test::bit_equal(logits, logits_before)) << "the caller's logits were modified";

    // Greedy: the argmax; sampling: successive draws of a generator seeded like the sampler's.
    std::vector<int64_t> drawn;
    for (int64_t i = 0; i < item.at("draws").get<int64_t>(); ++i)
      drawn.push_back(sampler.next(logits, context, new_tokens));
    EXPECT_EQ(drawn, to_ids(ref->tensors.at(name + ".tokens")));
  }
}

TEST(SamplingHfReference, DecodeLoopsMatchHfWithGlobalSeed) {
  std::string why;
  const Reference* ref = reference(&why);
  if (!ref) GTEST_SKIP() << why;
  for (const auto& item : ref->description.at("loops")) {
    const std::string name = item.at("name").get<std::string>();
    SCOPED_TRACE(name);
    const SamplingOptions options = options_from_json(item.at("options"));
    const at::Tensor table = ref->tensors.at(name + ".logits");
    TokenSampler sampler(options);
    const StopChecker stop(options);
    std::vector<int64_t> context = ids_of(item.at("prompt"));
    std::vector<int64_t> generated;
    StopReason reason = stop.check(generated);
    for (int64_t step = 0; reason == StopReason::None && step < table.size(0); ++step) {
      const int64_t token = sampler.next(table[step], context, static_cast<int64_t>(generated.size()));
      context.push_back(token);
      generated.push_back(token);
      reason = stop.check(generated);
    }
    EXPECT_EQ(generated, to_ids(ref->tensors.at(name + ".tokens")));
    EXPECT_EQ(to_string(reason), item.at("stop_reason").get<std::string>());
  }
}

// ---------------------------------------------------------------------------------------------

TEST(TokenSampler, GreedyPicksArgmaxAndFirstIndexAmongTies) {
  TokenSampler greedy(SamplingOptions{});
  const at::Tensor logits = at::tensor({1.0f, 5.0f, -kInf, 5.0f, 2.0f});
  EXPECT_EQ(greedy.next(logits, {}, 0), 1);
  const at::Tensor big = random_logits(32009, 1);
  EXPECT_EQ(greedy.next(big, {}, 0), big.argmax().item<int64_t>());
  // Warpers are sampling-only: a greedy sampler with top_k/top_p/temperature set is unaffected.
  SamplingOptions with_warpers;
  with_warpers.temperature = 0.5;
  with_warpers.top_k = 3;
  with_warpers.top_p = 0.2;
  EXPECT_TRUE(test::bit_equal(TokenSampler(with_warpers).process(big, {}, 0), big));
  // [1, vocab] rows and half-precision logits are accepted.
  EXPECT_EQ(greedy.next(big.unsqueeze(0).to(at::kBFloat16), {}, 0),
            big.to(at::kBFloat16).to(at::kFloat).argmax().item<int64_t>());
}

std::vector<int64_t> draw(const SamplingOptions& options, const at::Tensor& logits, int count) {
  TokenSampler sampler(options);
  std::vector<int64_t> tokens;
  for (int i = 0; i < count; ++i) tokens.push_back(sampler.next(logits, {}, 0));
  return tokens;
}

TEST(TokenSampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  const at::Tensor logits = random_logits(1000, 2, 0.5);
  SamplingOptions options;
  options.do_sample = true;
  options.seed = 1234;
  const auto first = draw(options, logits, 64);
  EXPECT_EQ(first, draw(options, logits, 64));
  options.seed = 1235;
  EXPECT_NE(first, draw(options, logits, 64));
}

TEST(TokenSampler, CopiesContinueTheSameStreamIndependently) {
  const at::Tensor logits = random_logits(500, 3, 0.5);
  SamplingOptions options;
  options.do_sample = true;
  options.seed = 99;
  TokenSampler original(options);
  for (int i = 0; i < 5; ++i) original.next(logits, {}, 0);
  TokenSampler copy = original;
  std::vector<int64_t> from_original, from_copy;
  for (int i = 0; i < 20; ++i) from_original.push_back(original.next(logits, {}, 0));
  for (int i = 0; i < 20; ++i) from_copy.push_back(copy.next(logits, {}, 0));
  EXPECT_EQ(from_original, from_copy);
}

TEST(TokenSampler, TopK1SamplingEqualsGreedy) {
  SamplingOptions greedy_options;
  greedy_options.repetition_penalty = 1.5;
  greedy_options.min_new_tokens = 3;
  greedy_options.eos_token_ids = {7};
  SamplingOptions top1 = greedy_options;
  top1.do_sample = true;
  top1.top_k = 1;
  top1.temperature = 0.8;
  top1.seed = 5;
  TokenSampler greedy(greedy_options), sampler(top1);
  std::vector<int64_t> context = {1, 2, 3};
  for (int step = 0; step < 20; ++step) {
    const at::Tensor logits = random_logits(32009, 100 + step);
    const int64_t want = greedy.next(logits, context, step);
    EXPECT_EQ(sampler.next(logits, context, step), want) << "step " << step;
    context.push_back(want);
  }
}

// Counts of `draws` samples vs the expected probabilities, within 5 standard deviations.
void expect_frequencies(const SamplingOptions& options, const at::Tensor& logits,
                        const std::vector<double>& probabilities, int draws) {
  TokenSampler sampler(options);
  std::vector<int> counts(probabilities.size(), 0);
  for (int i = 0; i < draws; ++i) {
    const int64_t token = sampler.next(logits, {}, 0);
    ASSERT_GE(token, 0);
    ASSERT_LT(token, static_cast<int64_t>(counts.size()));
    ++counts[token];
  }
  for (size_t token = 0; token < probabilities.size(); ++token) {
    const double p = probabilities[token];
    const double expected = p * draws;
    const double sigma = std::sqrt(draws * p * (1 - p));
    if (p == 0) {
      EXPECT_EQ(counts[token], 0) << "token " << token;
    } else {
      EXPECT_NEAR(counts[token], expected, 5 * sigma) << "token " << token;
    }
  }
}

TEST(TokenSampler, SampledFrequenciesFollowTheProcessedDistribution) {
  const std::vector<double> p = {0.1, 0.2, 0.3, 0.4};
  const at::Tensor logits = at::tensor(std::vector<double>(p.begin(), p.end())).log().to(at::kFloat);
  SamplingOptions options;
  options.do_sample = true;
  options.seed = 2024;
  expect_frequencies(options, logits, p, 20000);
  // Temperature 0.5 then top_p 0.75 (HF's warper order): the probabilities become p^2 / 0.30 =
  // 1/30, 4/30, 9/30, 16/30 with ascending cumulative sums 1/30, 5/30, 14/30, 1, so the two
  // smallest (<= 0.25) are removed. Top-p before temperature would have removed only the first.
  options.temperature = 0.5;
  options.top_p = 0.75;
  expect_frequencies(options, logits, {0, 0, 9.0 / 25, 16.0 / 25}, 20000);
}

TEST(TokenSampler, RepetitionPenaltyOncePerSeenIdBothSigns) {
  const at::Tensor logits = at::tensor({2.0f, -2.0f, 0.0f, 1.0f, -1.0f, 3.0f});
  const std::vector<int64_t> context = {0, 1, 2, 0, 0, 1, 4};  // 3 and 5 unseen, 0 seen three times
  for (const double penalty : {2.0, 0.5}) {
    SamplingOptions options;
    options.repetition_penalty = penalty;
    const at::Tensor got = TokenSampler(options).process(logits, context, 0);
    for (int64_t id = 0; id < logits.size(0); ++id) {
      const float x = logits[id].item<float>();
      const bool seen = std::find(context.begin(), context.end(), id) != context.end();
      const float want = !seen   ? x
                         : x < 0 ? static_cast<float>(x * penalty)
                                 : static_cast<float>(x / penalty);
      EXPECT_EQ(got[id].item<float>(), want) << "penalty " << penalty << " id " << id;
    }
  }
}

TEST(TokenSampler, TopPKeepsAtLeastOneAndCutsTiesLikeTorchSort) {
  SamplingOptions options;
  options.do_sample = true;
  options.top_p = 1e-9;  // every cumulative sum is <= 1 - top_p (== 1 in float32)
  const at::Tensor logits = random_logits(32009, 4);
  const at::Tensor kept = TokenSampler(options).process(logits, {}, 0) != -kInf;
  EXPECT_EQ(kept.sum().item<int64_t>(), 1);
  EXPECT_TRUE(kept[logits.argmax().item<int64_t>()].item<bool>());

  // Four equal logits, top_p 0.5: cumulative 0.25, 0.5, 0.75, 1 -> two removed. HF's
  // torch.sort(descending=False) keeps index order for so few ties (it stops doing so beyond 16
  // elements, which the Python cross-check covers), so the lowest ids are cut.
  options.top_p = 0.5;
  const at::Tensor uniform = TokenSampler(options).process(at::zeros({4}), {}, 0);
  EXPECT_TRUE(at::equal(uniform != -kInf, mask({0, 0, 1, 1})));
  // Forty ties: exactly half survive, whichever they are.
  const at::Tensor forty = TokenSampler(options).process(at::zeros({40}), {}, 0);
  EXPECT_EQ((forty != -kInf).sum().item<int64_t>(), 20);
}

TEST(TokenSampler, TopKKeepsEveryTieWithTheKthScore) {
  SamplingOptions options;
  options.do_sample = true;
  options.top_k = 2;
  const at::Tensor got = TokenSampler(options).process(at::tensor({1.0f, 3.0f, 2.0f, 2.0f, 0.0f}), {}, 0);
  EXPECT_TRUE(at::equal(got != -kInf, mask({0, 1, 1, 1, 0})));
  options.top_k = 100;  // more than the vocabulary: nothing removed
  EXPECT_TRUE(test::bit_equal(TokenSampler(options).process(at::tensor({1.0f, 2.0f}), {}, 0),
                              at::tensor({1.0f, 2.0f})));
}

TEST(TokenSampler, MinNewTokensSuppressesEveryEosId) {
  SamplingOptions options;
  options.min_new_tokens = 2;
  options.eos_token_ids = {1, 3};
  TokenSampler sampler(options);
  const at::Tensor logits = at::tensor({0.0f, 9.0f, 1.0f, 8.0f, 2.0f});
  for (const int64_t generated : {0, 1}) {
    const at::Tensor got = sampler.process(logits, {}, generated);
    EXPECT_EQ(got[1].item<float>(), -kInf);
    EXPECT_EQ(got[3].item<float>(), -kInf);
    EXPECT_EQ(sampler.next(logits, {}, generated), 4);
  }
  EXPECT_TRUE(test::bit_equal(sampler.process(logits, {}, 2), logits));
  EXPECT_EQ(sampler.next(logits, {}, 2), 1);
}

TEST(TokenSampler, ForceTokenBoostsUntilTheIdIsInTheContext) {
  SamplingOptions options;
  options.force_token_id = 2;
  TokenSampler sampler(options);
  const at::Tensor logits = at::tensor({1.0f, 4.0f, 0.5f});
  EXPECT_EQ(sampler.process(logits, {0}, 1)[2].item<float>(), 40.0f);
  EXPECT_EQ(sampler.next(logits, {0}, 1), 2);
  EXPECT_EQ(sampler.next(logits, {0, 2}, 2), 1);
}

TEST(TokenSampler, RejectsBadInputs) {
  SamplingOptions options;
  options.eos_token_ids = {5};
  options.min_new_tokens = 1;
  TokenSampler sampler(options);
  const at::Tensor logits = random_logits(10, 6);
  auto expect_error = [&](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no error, expected one mentioning '" << needle << "'";
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { sampler.next(at::Tensor(), {}, 1); }, "undefined");
  expect_error([&] { sampler.next(at::arange(10), {}, 1); }, "floating-point");
  expect_error([&] { sampler.next(logits.reshape({2, 5}), {}, 1); }, "[2, 5]");
  expect_error([&] { sampler.next(at::zeros({0}), {}, 1); }, "vocab > 0");
  expect_error([&] { sampler.next(logits, {3, 10}, 1); }, "context id 10");
  expect_error([&] { sampler.next(logits, {-1}, 1); }, "context id -1");
  expect_error([&] { sampler.next(logits, {}, -1); }, "new_tokens");
  expect_error([&] { sampler.next(at::where(at::arange(10) == 4, at::full({10}, NAN), logits), {}, 1); },
               "NaN");
  expect_error([&] { sampler.next(at::tensor({1.0f, 2.0f}), {}, 1); }, "eos_token_ids id 5");
  // Only EOS left, and min_new_tokens forbids it.
  options.eos_token_ids = {0};
  expect_error([&] { TokenSampler(options).next(at::tensor({1.0f}), {}, 0); }, "every score is -inf");
  options.do_sample = true;
  expect_error(
      [&] {
        TokenSampler(options).next(at::tensor({1.0f, kInf}), {}, 1);
      },
      "not a valid distribution");
  options.force_token_id = 20;
  expect_error([&] { TokenSampler(options).next(logits, {}, 1); }, "force_token_id 20");
}

// ---------------------------------------------------------------------------------------------

TEST(StopChecker, EosStopSequencesOnTheTailAndMaxNewTokens) {
  SamplingOptions options = SamplingOptions::minigpt5();
  options.max_new_tokens = 5;
  const StopChecker stop(options);
  using V = std::vector<int64_t>;
  EXPECT_EQ(stop.check(V{}), StopReason::None);
  EXPECT_EQ(stop.check(V{2277}), StopReason::None);
  EXPECT_EQ(stop.check(V{29937}), StopReason::None);
  EXPECT_EQ(stop.check(V{2277, 29937}), StopReason::StopSequence);
  EXPECT_EQ(stop.check(V{10, 2277, 29937}), StopReason::StopSequence);
  EXPECT_EQ(stop.check(V{29937, 2277}), StopReason::None);
  EXPECT_EQ(stop.check(V{10, 835}), StopReason::StopSequence);
  EXPECT_EQ(stop.check(V{835, 10}), StopReason::None);
  EXPECT_EQ(stop.check(V{10, 2}), StopReason::Eos);
  EXPECT_EQ(stop.check(V{1, 1, 1, 1}), StopReason::None);
  EXPECT_EQ(stop.check(V{1, 1, 1, 1, 1}), StopReason::MaxNewTokens);
  EXPECT_EQ(stop.check(V{1, 1, 1, 1, 2}), StopReason::Eos);  // EOS wins over the length limit
  EXPECT_EQ(stop.check(V{1, 1, 1, 1, 835}), StopReason::StopSequence);
  EXPECT_EQ(stop.matched_stop_length(V{1, 2277, 29937}), 2u);
  EXPECT_EQ(stop.matched_stop_length(V{1, 835}), 1u);
  EXPECT_EQ(stop.matched_stop_length(V{835, 1}), 0u);

  options.max_new_tokens = 0;
  options.min_new_tokens = 0;
  EXPECT_EQ(StopChecker(options).check(V{}), StopReason::MaxNewTokens);
  // A stop sequence longer than what was generated never matches (no broadcasting).
  options.max_new_tokens = 10;
  options.stop_sequences = {{5, 5}};
  EXPECT_EQ(StopChecker(options).check(V{5}), StopReason::None);
  EXPECT_EQ(StopChecker(options).check(V{5, 5}), StopReason::StopSequence);
  EXPECT_STREQ(to_string(StopReason::StopSequence), "stop_sequence");
}

TEST(SamplingOptions, ValidateNamesTheOptionAndValue) {
  EXPECT_NO_THROW(SamplingOptions{}.validate());
  EXPECT_NO_THROW(SamplingOptions::minigpt5().validate());
  struct BadCase {
    std::function<void(SamplingOptions&)> change;
    std::string needle;
  };
  const std::vector<BadCase> bad = {
      {[](SamplingOptions& o) { o.do_sample = true, o.temperature = 0; }, "temperature"},
      {[](SamplingOptions& o) { o.do_sample = true, o.temperature = -1.5; }, "-1.5"},
      {[](SamplingOptions& o) { o.do_sample = true, o.temperature = NAN; }, "temperature"},
      {[](SamplingOptions& o) { o.top_p = 0; }, "top_p"},
      {[](SamplingOptions& o) { o.top_p = 1.25; }, "1.25"},
      {[](SamplingOptions& o) { o.top_k = -3; }, "top_k must be >= 0 (0 disables top-k), got -3"},
      {[](SamplingOptions& o) { o.repetition_penalty = 0; }, "repetition_penalty"},
      {[](SamplingOptions& o) { o.repetition_penalty = -2; }, "-2"},
      {[](SamplingOptions& o) { o.max_new_tokens = -1; }, "max_new_tokens"},
      {[](SamplingOptions& o) { o.min_new_tokens = -1; }, "min_new_tokens"},
      {[](SamplingOptions& o) { o.min_new_tokens = 400; },
       "min_new_tokens must not exceed max_new_tokens (300)"},
      {[](SamplingOptions& o) {
         o.stop_sequences = {{835}, {}};
       },
       "stop_sequences[1]"},
      {[](SamplingOptions& o) { o.stop_sequences = {{-4}}; }, "stop_sequences[0]"},
      {[](SamplingOptions& o) {
         o.eos_token_ids = {2, -1};
       },
       "eos_token_ids[1]"},
      {[](SamplingOptions& o) { o.force_token_id = -2; }, "force_token_id"},
  };
  for (const auto& item : bad) {
    SamplingOptions options;
    item.change(options);
    try {
      options.validate();
      ADD_FAILURE() << "accepted; expected an error mentioning " << item.needle;
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(item.needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("SamplingOptions."), std::string::npos) << e.what();
    }
    EXPECT_THROW(TokenSampler{options}, ArgumentError) << item.needle;
    EXPECT_THROW(StopChecker{options}, ArgumentError) << item.needle;
  }
  // Temperature is a sampling option: greedy ignores it, as HF's greedy search does.
  SamplingOptions greedy;
  greedy.temperature = 0;
  EXPECT_NO_THROW(greedy.validate());
}

}  // namespace
}  // namespace voken::llm
