// Parity of the pipeline's own stages with upstream MiniGPT-5, on the golden folder `llama_e2e`
// (tiny LLaMA with the real 32009-token vocabulary): prompt text and tokenization, the
// input_warp embedding assembly with image rows, the greedy continuation through the pipeline's
// voken loop, and the hidden states handed to the voken mapper. The stages tested are the ones
// generate_interleaved() calls (prompt.h, generation.h). One PARITY line per golden case:
//   PARITY pipeline/<case> max_abs_err=<e> atol=<a> PASS|FAIL
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/golden.h"
#include "common/test_support.h"
#include "llm/decoder.h"
#include "llm/llama.h"
#include "pipeline/generation.h"
#include "pipeline/prompt.h"
#include "text/tokenizer.h"

namespace voken::pipeline {
namespace {

// The real LLaMA tokenizer.model beside the golden folder (shared/assets/llama).
std::string llama_tokenizer_path() {
  const std::string root = test::golden_root();
  if (root.empty()) return "";
  const std::string path = root + "/../assets/llama/tokenizer.model";
  return std::filesystem::exists(path) ? path : "";
}

at::Tensor ids_tensor(const std::vector<int64_t>& ids) { return at::tensor(ids, at::kLong); }

std::vector<int64_t> voken_ids(const text::Tokenizer& tokenizer) {
  std::vector<int64_t> ids;
  for (int i = 0; i < 8; ++i) ids.push_back(*tokenizer.token_id("[IMG" + std::to_string(i) + "]"));
  return ids;
}

struct Fixture {
  const test::GoldenSet& golden;
  const llm::Llama& model;
  const text::Tokenizer& tokenizer;
};

// examples/playground.py's prompt (its utterance leaves the second image without </Img>, so the
// text goes in as a raw prompt with two image segments) -> ids -> input_warp embeddings.
void playground(const Fixture& f, const io::Json& c) {
  test::ParityCase parity("pipeline", "playground");
  const double atol = c.at("atol").get<double>(), rtol = c.at("rtol").get<double>();
  const std::string text = c.at("text").get<std::string>();
  const at::Tensor features = f.golden.tensor("playground.image_feats");

  GenerateOptions options;
  options.raw_prompt = true;
  std::vector<Segment> segments = {Segment::text(text)};
  for (int64_t k = 0; k < features.size(0); ++k) segments.push_back(Segment::image(Image(8, 8, 128)));
  const PromptText prompt = build_prompt_text(segments, options);
  EXPECT_EQ(prompt.text, text);
  EXPECT_EQ(prompt.images.size(), static_cast<size_t>(features.size(0)));

  const PromptAssembly assembly =
      tokenize_prompt(f.tokenizer, prompt.text, *f.tokenizer.token_id("<ImageHere>"), f.tokenizer.bos_id());
  parity.compare_exact("input_ids", ids_tensor(assembly.token_ids),
                       f.golden.tensor("playground.input_ids")[0]);
  std::vector<int64_t> want_starts = c.at("image_rows_start").get<std::vector<int64_t>>();
  parity.compare_exact("image_rows_start", ids_tensor(assembly.image_rows_start(features.size(1))),
                       ids_tensor(want_starts));

  const at::Tensor embeds = assemble_embeddings(f.model, assembly, features);
  const at::Tensor want = f.golden.tensor("playground.inputs_embeds")[0];
  EXPECT_EQ(assembly.positions(features.size(1)), want.size(0));
  parity.compare("inputs_embeds", embeds, want, atol, rtol);
  parity.finish();
}

// The golden's 16 greedy tokens after the playground prompt, through run_voken_loop with the
// pipeline's stop rules (the golden continuation holds no stop token and no [IMG0]).
void playground_greedy(const Fixture& f, const io::Json& c) {
  test::ParityCase parity("pipeline", "playground_greedy");
  const at::Tensor embeds = f.golden.tensor("playground_greedy.inputs_embeds");
  const at::Tensor want = f.golden.tensor("playground_greedy.output_ids")[0];
  const int64_t count = want.size(0);

  VokenLoopOptions options;
  options.sampling.do_sample = false;
  options.sampling.max_new_tokens = count;
  options.sampling.stop_sequences = minigpt5_stop_sequences(f.tokenizer);
  options.sampling.eos_token_ids = {f.model.config().eos_token_id};
  options.voken_ids = voken_ids(f.tokenizer);
  options.max_images = 4;
  llm::DecodeSession session(f.model, embeds.size(1) + count + 8 * options.max_images);
  session.prefill(embeds);
  const VokenLoopResult result = run_voken_loop(session, options);
  parity.compare_exact("output_ids", ids_tensor(result.tokens), want);
  EXPECT_EQ(result.stop_reason, "max_new_tokens");
  EXPECT_TRUE(result.groups.empty());
  (void)c;
  parity.finish();
}

// BOS + text + [IMG0]..[IMG7]: the text is tokenized and assembled as the pipeline does, the
// session prefilled, [IMG0] "sampled", and force_vokens must return the hidden rows upstream's
// generate() hands to fc: positions p-1 .. p+6.
void vokens(const Fixture& f, const io::Json& c) {
  test::ParityCase parity("pipeline", "vokens");
  const double atol = c.at("atol").get<double>(), rtol = c.at("rtol").get<double>();
  const at::Tensor input_ids = f.golden.tensor("vokens.input_ids")[0];
  const int64_t p = c.at("img0_position").get<int64_t>();

  GenerateOptions options;
  options.raw_prompt = true;
  const PromptText prompt = build_prompt_text({Segment::text(c.at("text").get<std::string>())}, options);
  const PromptAssembly assembly =
      tokenize_prompt(f.tokenizer, prompt.text, *f.tokenizer.token_id("<ImageHere>"), f.tokenizer.bos_id());
  parity.compare_exact("input_ids", ids_tensor(assembly.token_ids), input_ids.narrow(0, 1, p - 1));
  parity.compare_exact("voken ids", ids_tensor(voken_ids(f.tokenizer)), input_ids.narrow(0, p, 8));
  EXPECT_EQ(input_ids[0].item<int64_t>(), f.tokenizer.bos_id());

  llm::DecodeSession session(f.model, input_ids.size(0));
  session.prefill(assemble_embeddings(f.model, assembly, at::Tensor()));
  ASSERT_EQ(session.length(), p);
  const at::Tensor features = force_vokens(session, voken_ids(f.tokenizer));
  parity.compare("voken_hidden", features, f.golden.tensor("vokens.voken_hidden")[0], atol, rtol);
  parity.compare("hidden", session.hidden_states(0, session.length()), f.golden.tensor("vokens.hidden")[0],
                 atol, rtol);
  parity.finish();
}

TEST(ParityPipeline, EveryCaseOfLlamaE2e) {
  const auto golden = test::GoldenSet::open("llama_e2e");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("llama_e2e");
  const std::string tokenizer_path = llama_tokenizer_path();
  if (tokenizer_path.empty()) GTEST_SKIP() << "LLaMA tokenizer.model not found (<golden>/../assets/llama)";
  const llm::Llama model = llm::Llama::load(golden->model_dir());
  const text::Tokenizer tokenizer = text::Tokenizer::from_file(tokenizer_path);
  const Fixture fixture{*golden, model, tokenizer};
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    if (name == "playground")
      playground(fixture, c);
    else if (name == "playground_greedy")
      playground_greedy(fixture, c);
    else if (name == "vokens")
      vokens(fixture, c);
    else
      ADD_FAILURE() << "llama_e2e case '" << name << "' is not known to the pipeline parity test";
  }
}

}  // namespace
}  // namespace voken::pipeline
