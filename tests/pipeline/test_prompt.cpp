// Prompt building (upstream template, raw mode, placeholders), tokenization into ids and image
// slots, and embedding assembly (MiniGPT5.input_warp): structure, bad input, and the golden
// playground prompt rebuilt from segments.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include "common/golden.h"
#include "common/test_support.h"
#include "llm/llama.h"
#include "pipeline/generation.h"
#include "pipeline/prompt.h"
#include "text/tokenizer.h"
#include "voken/error.h"

namespace voken::pipeline {
namespace {

#define EXPECT_THROW_WITH(statement, Type, needle)                                  \
  do {                                                                              \
    try {                                                                           \
      statement;                                                                    \
      ADD_FAILURE() << #statement " did not throw";                                 \
    } catch (const Type& e) {                                                       \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what(); \
    }                                                                               \
  } while (0)

std::string llama_tokenizer_path() {
  const std::string root = test::golden_root();
  if (root.empty()) return "";
  const std::string path = root + "/../assets/llama/tokenizer.model";
  return std::filesystem::exists(path) ? path : "";
}

Segment picture() { return Segment::image(Image(4, 4, 200)); }

TEST(BuildPrompt, UpstreamTemplateWithImagesWhereTheyStand) {
  GenerateOptions options;
  options.system_prompt = "SYS.";
  const std::vector<Segment> segments = {Segment::text("first"), picture(), Segment::text(" then"),
                                         Segment::image_file("b.jpg")};
  const PromptText prompt = build_prompt_text(segments, options);
  EXPECT_EQ(prompt.text, "SYS.###Human:first<Img><ImageHere></Img> then<Img><ImageHere></Img> ###Assistant:");
  ASSERT_EQ(prompt.images.size(), 2u);
  EXPECT_EQ(prompt.images[0], &segments[1]);
  EXPECT_EQ(prompt.images[1], &segments[3]);
}

TEST(BuildPrompt, DefaultSystemPromptIsUpstreams) {
  // examples/playground.py's system prompt, as GenerateOptions documents it.
  const PromptText prompt = build_prompt_text({Segment::text("Hi.")}, GenerateOptions{});
  EXPECT_EQ(prompt.text, GenerateOptions{}.system_prompt + "###Human:Hi. ###Assistant:");
}

TEST(BuildPrompt, ImageOnlyPromptIsAccepted) {
  const PromptText prompt = build_prompt_text({picture()}, GenerateOptions{});
  EXPECT_EQ(prompt.images.size(), 1u);
}

TEST(BuildPrompt, RawModeConcatenatesAndPlacesImages) {
  GenerateOptions options;
  options.raw_prompt = true;
  const std::vector<Segment> segments = {Segment::text("Q: "), picture(), Segment::text(" A:")};
  EXPECT_EQ(build_prompt_text(segments, options).text, "Q: <Img><ImageHere></Img> A:");
}

TEST(BuildPrompt, RawModePlaceholdersTakeTheImagesInOrder) {
  GenerateOptions options;
  options.raw_prompt = true;
  const std::vector<Segment> segments = {picture(), Segment::text("x<ImageHere>y"),
                                         Segment::image_file("2.png"), Segment::text("<ImageHere>z")};
  const PromptText prompt = build_prompt_text(segments, options);
  EXPECT_EQ(prompt.text, "x<ImageHere>y<ImageHere>z");
  ASSERT_EQ(prompt.images.size(), 2u);
  EXPECT_EQ(prompt.images[0], &segments[0]);
  EXPECT_EQ(prompt.images[1], &segments[2]);
}

TEST(BuildPrompt, BadInput) {
  GenerateOptions options;
  EXPECT_THROW_WITH(build_prompt_text({}, options), ArgumentError, "segment list is empty");
  EXPECT_THROW_WITH(build_prompt_text({Segment::text(""), Segment::text(" \n")}, options), ArgumentError,
                    "prompt is empty");
  EXPECT_THROW_WITH(build_prompt_text({Segment::text("a <ImageHere>"), picture()}, options), ArgumentError,
                    "raw_prompt");
  options.raw_prompt = true;
  EXPECT_THROW_WITH(build_prompt_text({Segment::text("")}, options), ArgumentError, "prompt is empty");
  EXPECT_THROW_WITH(build_prompt_text({Segment::text("<ImageHere><ImageHere>"), picture()}, options),
                    ArgumentError, "2 <ImageHere> placeholder(s) but 1 image");
}

// The golden playground text split back into segments: outside raw mode the pipeline closes
// every image with </Img>, where upstream's utterance forgot the second one.
TEST(BuildPrompt, PlaygroundFromSegments) {
  const auto golden = test::GoldenSet::open("llama_e2e");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("llama_e2e");
  const io::Json* c = golden->find_case("playground");
  if (c == nullptr) GTEST_SKIP() << "no playground case";
  const std::string text = c->at("text").get<std::string>();
  const size_t human = text.find("###Human:");
  const size_t assistant = text.rfind(" ###Assistant:");
  ASSERT_NE(human, std::string::npos);
  ASSERT_NE(assistant, std::string::npos);
  GenerateOptions options;
  options.system_prompt = text.substr(0, human);
  const std::string user = text.substr(human + 9, assistant - human - 9);
  std::vector<Segment> segments;
  const std::regex image_block("<Img><ImageHere>(</Img>)?");
  size_t begin = 0;
  for (auto it = std::sregex_iterator(user.begin(), user.end(), image_block); it != std::sregex_iterator();
       ++it) {
    segments.push_back(Segment::text(user.substr(begin, it->position() - begin)));
    segments.push_back(picture());
    begin = it->position() + it->length();
  }
  segments.push_back(Segment::text(user.substr(begin)));
  const std::string closed =
      std::regex_replace(text, std::regex("<Img><ImageHere>(?!</Img>)"), "<Img><ImageHere></Img>");
  EXPECT_EQ(build_prompt_text(segments, options).text, closed);
}

TEST(TokenizePrompt, PositionsAndImageRows) {
  const std::string path = llama_tokenizer_path();
  if (path.empty()) GTEST_SKIP() << "LLaMA tokenizer.model not found (<golden>/../assets/llama)";
  const text::Tokenizer tokenizer = text::Tokenizer::from_file(path);
  const int64_t image_here = *tokenizer.token_id("<ImageHere>");
  const PromptAssembly a =
      tokenize_prompt(tokenizer, "a<ImageHere>b c<ImageHere>", image_here, tokenizer.bos_id());
  ASSERT_EQ(a.num_images(), 2);
  for (int64_t slot : a.image_slots) EXPECT_EQ(a.token_ids[static_cast<size_t>(slot)], image_here);
  const int64_t n = static_cast<int64_t>(a.token_ids.size());
  EXPECT_EQ(a.positions(32), 1 + n + 2 * 31);
  const auto starts = a.image_rows_start(32);
  EXPECT_EQ(starts[0], 1 + a.image_slots[0]);
  EXPECT_EQ(starts[1], 1 + a.image_slots[1] + 31);
  EXPECT_EQ(a.token_ids, tokenizer.encode("a<ImageHere>b c<ImageHere>"));  // no BOS
}

// Upstream's StoppingCriteriaSub hard-codes [835] and [2277, 29937] ("###" after a space, and
// otherwise); the pipeline finds them by piece, which must give the same ids for LLaMA.
TEST(StopSequences, AreUpstreamsIdsForLlama) {
  const std::string path = llama_tokenizer_path();
  if (path.empty()) GTEST_SKIP() << "LLaMA tokenizer.model not found (<golden>/../assets/llama)";
  const text::Tokenizer tokenizer = text::Tokenizer::from_file(path);
  const std::vector<std::vector<int64_t>> upstream = {{835}, {2277, 29937}};
  EXPECT_EQ(minigpt5_stop_sequences(tokenizer), upstream);
  // And they are what "###" becomes in the two positions the response can put it.
  EXPECT_EQ(tokenizer.encode("a ###").back(), 835);
  const auto glued = tokenizer.encode("a.###");
  ASSERT_GE(glued.size(), 2u);
  EXPECT_EQ(std::vector<int64_t>(glued.end() - 2, glued.end()), (std::vector<int64_t>{2277, 29937}));
}

TEST(AssembleEmbeddings, RowsComeFromTextAndImagesInOrder) {
  const auto golden = test::GoldenSet::open("llama_e2e");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("llama_e2e");
  const llm::Llama model = llm::Llama::load(golden->model_dir());
  const int64_t h = model.hidden_size();
  PromptAssembly a;
  a.bos_id = 1;
  a.token_ids = {5, 32008, 7, 8, 32008};
  a.image_slots = {1, 4};
  const at::Tensor images = at::randn({2, 3, h});
  const at::Tensor embeds = assemble_embeddings(model, a, images);
  ASSERT_EQ(embeds.size(0), a.positions(3));
  const at::Tensor text = model.embed(at::tensor(std::vector<int64_t>{1, 5, 7, 8}, at::kLong))[0];
  EXPECT_TRUE(test::bit_equal(embeds[0], text[0]));
  EXPECT_TRUE(test::bit_equal(embeds[1], text[1]));
  EXPECT_TRUE(test::bit_equal(embeds.narrow(0, 2, 3), images[0]));
  EXPECT_TRUE(test::bit_equal(embeds[5], text[2]));
  EXPECT_TRUE(test::bit_equal(embeds[6], text[3]));
  EXPECT_TRUE(test::bit_equal(embeds.narrow(0, 7, 3), images[1]));

  EXPECT_THROW_WITH(assemble_embeddings(model, a, at::randn({1, 3, h})), ArgumentError, "2 <ImageHere> slot");
  EXPECT_THROW_WITH(assemble_embeddings(model, a, at::randn({2, 3, h + 1})), ArgumentError,
                    "expected image features");
  PromptAssembly text_only;
  text_only.token_ids = {5, 6};
  EXPECT_THROW_WITH(assemble_embeddings(model, text_only, at::randn({1, 3, h})), ArgumentError,
                    "no <ImageHere>");
  EXPECT_EQ(assemble_embeddings(model, text_only, at::Tensor()).size(0), 3);
}

}  // namespace
}  // namespace voken::pipeline
