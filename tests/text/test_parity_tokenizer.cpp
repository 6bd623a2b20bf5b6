// Every case of the tokenizer golden folder: ids (exact) and decoded text (exact), for plain
// sentencepiece cases and for text around MiniGPT-5's added tokens (transformers 4.31 rule).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "common/golden.h"
#include "common/test_support.h"
#include "text/tokenizer.h"

namespace voken::text {
namespace {

at::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return at::tensor(at::ArrayRef<int64_t>(ids), at::kLong);
}

at::Tensor bytes_tensor(const std::string& text) {
  std::vector<int64_t> bytes;
  for (const char c : text) bytes.push_back(static_cast<unsigned char>(c));
  return ids_tensor(bytes);
}

TEST(TokenizerParity, AllGoldenCases) {
  const auto golden = test::GoldenSet::open("tokenizer");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("tokenizer");
  const auto& json = golden->json();
  const std::string vocab = golden->dir() + "/" + json.at("vocab_file").get<std::string>();
  ASSERT_TRUE(std::filesystem::exists(vocab)) << "cases.json vocab_file " << vocab << " is missing";

  // The added tokens the golden set was made with, in its own words.
  std::vector<AddedToken> added;
  for (const auto& [content, id] : json.at("added_tokens").items())
    added.push_back({content, id.get<int64_t>()});
  const Tokenizer tokenizer = Tokenizer::from_file(vocab, added);
  const auto& special = json.at("special_ids");
  EXPECT_EQ(tokenizer.unk_id(), special.at("unk").get<int64_t>());
  EXPECT_EQ(tokenizer.bos_id(), special.at("bos").get<int64_t>());
  EXPECT_EQ(tokenizer.eos_id(), special.at("eos").get<int64_t>());
  EXPECT_EQ(Tokenizer::from_file(vocab).added_tokens().size(), added.size());

  size_t count = 0;
  for (const auto& c : golden->cases()) {
    const std::string name = c.at("name").get<std::string>();
    const std::string kind = c.at("kind").get<std::string>();
    const std::string text = c.at("text").get<std::string>();
    const std::string decoded = c.at("decoded").get<std::string>();
    const at::Tensor want_ids = golden->tensor(name + ".ids");
    ASSERT_TRUE(want_ids.defined()) << name;
    // cases.json repeats the ids; both must agree with each other.
    EXPECT_TRUE(want_ids.equal(ids_tensor(c.at("ids").get<std::vector<int64_t>>()))) << name;
    const std::vector<int64_t> want(want_ids.data_ptr<int64_t>(),
                                    want_ids.data_ptr<int64_t>() + want_ids.numel());

    test::ParityCase parity("tokenizer", name);
    std::vector<int64_t> got_ids;
    std::string got_text;
    if (kind == "plain") {
      // sp.encode(text) / sp.decode(ids); the HF-level calls agree whenever the text holds no
      // special-token string, as in every plain case.
      got_ids = tokenizer.sentencepiece_encode(text);
      got_text = tokenizer.sentencepiece_decode(want);
      EXPECT_EQ(tokenizer.encode(text), got_ids) << name;
      EXPECT_EQ(tokenizer.decode(want), got_text) << name;
    } else if (kind == "added_special_tokens") {
      got_ids = tokenizer.encode(text);
      got_text = tokenizer.decode(want);
    } else {
      ADD_FAILURE() << name << ": unknown case kind '" << kind << "'";
      continue;
    }
    parity.compare_exact("ids", ids_tensor(got_ids), want_ids);
    parity.compare_exact("decoded", bytes_tensor(got_text), bytes_tensor(decoded));
    EXPECT_EQ(got_text, decoded) << name;
    // The pieces cases.json lists are the ids' pieces.
    if (c.contains("pieces")) {
      const auto pieces = c.at("pieces").get<std::vector<std::string>>();
      ASSERT_EQ(pieces.size(), want.size()) << name;
      for (size_t i = 0; i < want.size(); ++i)
        EXPECT_EQ(tokenizer.piece(want[i]), pieces[i]) << name << " #" << i;
    }
    parity.finish();
    ++count;
  }
  EXPECT_EQ(count, golden->cases().size());
}

}  // namespace
}  // namespace voken::text
