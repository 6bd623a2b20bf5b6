// The LLaMA tokenizer: sentencepiece BPE cross-checked against Python's sentencepiece (the real
// LLaMA model and a synthetic one exercising user-defined and unused pieces), the transformers
// 4.31 rules around added and special tokens, streaming decode, HF tokenizer directories, and
// corrupt model files (including a mutation fuzz).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "common/test_support.h"
#include "io/json_file.h"
#include "text/sentencepiece_model.h"
#include "text/tokenizer.h"
#include "voken/error.h"

namespace voken::text {
namespace {

using test::TempDir;

// The real LLaMA tokenizer.model: cases.json's vocab_file, else <golden_root>/../assets/llama.
std::string llama_model_path() {
  const std::string component = test::golden_component("tokenizer");
  if (!component.empty()) {
    const io::Json cases = io::read_json_file(component + "/cases.json");
    if (cases.contains("vocab_file")) {
      const std::string path = component + "/" + cases.at("vocab_file").get<std::string>();
      if (std::filesystem::exists(path)) return path;
    }
  }
  const std::string root = test::golden_root();
  if (root.empty()) return "";
  const std::string path = root + "/../assets/llama/tokenizer.model";
  return std::filesystem::exists(path) ? path : "";
}

#define SKIP_WITHOUT_LLAMA(path) \
  VOKEN_SKIP_IF_EMPTY(path,      \
                      "LLaMA tokenizer.model not found (cases.json vocab_file or <golden>/../assets/llama)")

// Expects `statement` to throw exactly `Type` (or a subclass) whose message contains `needle`.
#define EXPECT_THROW_WITH(statement, Type, needle)                                  \
  do {                                                                              \
    try {                                                                           \
      statement;                                                                    \
      ADD_FAILURE() << #statement " did not throw";                                 \
    } catch (const Type& e) {                                                       \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what(); \
    } catch (const std::exception& e) {                                             \
      ADD_FAILURE() << #statement " threw the wrong type: " << e.what();            \
    }                                                                               \
  } while (0)

std::string utf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

// Structurally valid UTF-8 (no truncated or stray bytes, no surrogates or overlongs).
bool valid_utf8(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    const auto b = static_cast<unsigned char>(text[i]);
    size_t n = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || i + n > text.size()) return false;
    uint32_t cp = n == 1 ? b : b & (0xFF >> (n + 1));
    for (size_t k = 1; k < n; ++k) {
      const auto c = static_cast<unsigned char>(text[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

// Strings of the kinds that trip tokenizers: whitespace runs, control characters, digits,
// scripts without spaces, emoji sequences, sentencepiece's own meta symbol, prompt markup.
std::vector<std::string> tricky_strings(size_t random_count) {
  std::vector<std::string> out = {"",
                                  " ",
                                  "  ",
                                  "   ",
                                  "\t",
                                  "\n",
                                  "\n\n",
                                  " \n ",
                                  "a",
                                  "A",
                                  "Hello world",
                                  "Hello  world",
                                  " Hello",
                                  "Hello ",
                                  "hello\tworld\r\n",
                                  "###",
                                  "###Human: hi ###Assistant:",
                                  "###Human:<Img><ImageHere></Img>",
                                  "0",
                                  "0123456789",
                                  "3.14159",
                                  "1,000,000",
                                  "2023-10-05T12:34:56Z",
                                  "x = 42 * (y + 7);",
                                  "中文测试",
                                  "日本語のテキストです。",
                                  "한국어 문장입니다",
                                  "Здравствуй, мир!",
                                  "مرحبا بالعالم",
                                  "שלום עולם",
                                  "สวัสดีครับ",
                                  "नमस्ते दुनिया",
                                  "Ελληνικά",
                                  "ℝ ∑ ∫ ≤ ≥ ≠ √",
                                  "emoji 😀🚀 test",
                                  "👨‍👩‍👧‍👦",
                                  "🇯🇵🇫🇷",
                                  "👍🏽",
                                  "e\xCC\x81 vs \xC3\xA9",
                                  "ﬁ ﬂ ① Ⅷ ＡＢＣ",
                                  "\xEF\xBF\xBD",
                                  "\x7F",
                                  std::string("\0a\0", 3),
                                  "\x01\x02\x1b[31m\x1f",
                                  "\xC2\x85\xC2\xA0\xE2\x80\xA8\xE3\x80\x80",
                                  "\xE2\x96\x81",
                                  "\xE2\x96\x81\xE2\x96\x81x",
                                  "a\xE2\x96\x81 b",
                                  "<s>",
                                  "</s>",
                                  "<unk>",
                                  "<0x41>",
                                  "[IMG0]",
                                  "<ImageHere>",
                                  "supercalifragilisticexpialidocious",
                                  "aaaaaaaaaaaaaaaaaaaaaaaa",
                                  "!!!!!!!!",
                                  "........",
                                  "https://github.com/eric-ai-lab/MiniGPT-5?tab=readme#usage",
                                  "def f(x):\n    return x**2\n",
                                  "    indented\n\tmixed  \t tabs",
                                  "🤖",
                                  "\xF0\x9F\xA6\x84\xF0\x9F\x8C\x88",
                                  "\xF0\x9D\x90\x80\xF0\xA0\x80\x80\xF3\xA0\x80\x81",
                                  "\xEE\x80\x80\xEF\xA3\xBF",
                                  "😀 😀  😀   😀"};
  const std::vector<std::string> fragments = {" ",
                                              "  ",
                                              "\t",
                                              "\n",
                                              "\r\n",
                                              "the",
                                              " the",
                                              "The",
                                              "quick",
                                              " brown",
                                              "fox",
                                              "123",
                                              "4567",
                                              ".",
                                              ",",
                                              "!",
                                              "?",
                                              "'",
                                              "\"",
                                              "(",
                                              ")",
                                              "[",
                                              "]",
                                              "<",
                                              ">",
                                              "/",
                                              "#",
                                              "##",
                                              "###",
                                              "-",
                                              "_",
                                              "*",
                                              "=",
                                              "$",
                                              "%",
                                              "中",
                                              "文",
                                              "日本",
                                              "語",
                                              "한",
                                              "국",
                                              "Привет",
                                              "é",
                                              "ü",
                                              "ñ",
                                              "ß",
                                              "😀",
                                              "🚀",
                                              "👍🏽",
                                              "\xE2\x80\x8B",
                                              "\xC2\xA0",
                                              "\xE3\x80\x80",
                                              "\xE2\x96\x81",
                                              "\x01",
                                              "\x1c",
                                              "\x7f",
                                              "Img",
                                              "ImageHere",
                                              "Human",
                                              "Assistant",
                                              ":",
                                              "0",
                                              "9",
                                              "3.14",
                                              "ing",
                                              "tion",
                                              "un",
                                              "re",
                                              "ly"};
  std::mt19937 rng(20240607);
  // Random code points from assorted blocks (no surrogates).
  const std::vector<std::pair<uint32_t, uint32_t>> blocks = {
      {0x20, 0x7E},       {0x00, 0x1F},       {0xA0, 0x24F},       {0x370, 0x52F},   {0x590, 0x6FF},
      {0x900, 0x97F},     {0xE00, 0xE7F},     {0x2000, 0x206F},    {0x2190, 0x23FF}, {0x3040, 0x30FF},
      {0x4E00, 0x9FFF},   {0xAC00, 0xD7A3},   {0xE000, 0xE0FF},    {0xFF00, 0xFFEF}, {0x1F300, 0x1FAFF},
      {0x1D400, 0x1D7FF}, {0x20000, 0x2A6DF}, {0x10FF00, 0x10FFFF}};
  for (size_t i = 0; i < random_count; ++i) {
    std::string text;
    const int parts = 1 + static_cast<int>(rng() % 10);
    for (int p = 0; p < parts; ++p) {
      if (rng() % 3 == 0) {
        const auto& [lo, hi] = blocks[rng() % blocks.size()];
        const int n = 1 + static_cast<int>(rng() % 4);
        for (int k = 0; k < n; ++k) text += utf8(lo + rng() % (hi - lo + 1));
      } else {
        text += fragments[rng() % fragments.size()];
      }
    }
    out.push_back(std::move(text));
  }
  return out;
}

// Id sequences for decoding: byte pieces forming valid, truncated and invalid UTF-8, control
// and unknown ids, ordinary pieces.
std::vector<std::vector<int64_t>> tricky_id_sequences(const Tokenizer& tokenizer, size_t count) {
  const auto byte_id = [&](unsigned char b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    return *tokenizer.token_id(name);
  };
  std::mt19937 rng(7);
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < count; ++i) {
    std::vector<int64_t> ids;
    const int parts = 1 + static_cast<int>(rng() % 8);
    for (int p = 0; p < parts; ++p) {
      switch (rng() % 6) {
        case 0:
        case 1: {  // a character as byte pieces, sometimes cut short or corrupted
          static const uint32_t kSamples[] = {0x41,    0xE9,     0x416, 0x4E2D, 0xFFFD,
                                              0x1F600, 0x10FFFF, 0x7FF, 0x800};
          std::string bytes = utf8(rng() % 2 ? kSamples[rng() % 9] : 0x80 + rng() % 0x1FF80);
          if (rng() % 4 == 0 && bytes.size() > 1) bytes.resize(1 + rng() % (bytes.size() - 1));
          if (rng() % 6 == 0) bytes[rng() % bytes.size()] = static_cast<char>(rng() % 256);
          for (const char b : bytes) ids.push_back(byte_id(static_cast<unsigned char>(b)));
          break;
        }
        case 2:
          ids.push_back(byte_id(static_cast<unsigned char>(rng() % 256)));
          break;
        case 3:
          ids.push_back(static_cast<int64_t>(rng() % 3));  // <unk>, <s>, </s>
          break;
        default:
          ids.push_back(259 + static_cast<int64_t>(rng() % (tokenizer.sentencepiece_size() - 259)));
      }
    }
    out.push_back(std::move(ids));
  }
  return out;
}

// Runs the Python reference on `model`; false (with `why`) when sentencepiece is unavailable.
bool python_reference(const std::string& model, const std::vector<std::string>& texts,
                      const std::vector<std::vector<int64_t>>& id_lists, io::Json* response,
                      std::string* why) {
  TempDir dir;
  io::Json request = {{"encode", texts}, {"decode", id_lists}};
  test::write_file(dir.file("request.json"), request.dump());
  const std::string script = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/sentencepiece_reference.py";
  const int status = test::run_python(script + " '" + model + "' '" + dir.file("request.json") + "' '" +
                                      dir.file("response.json") + "'");
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
    *why = "Python sentencepiece is not importable by " VOKEN_PYTHON_EXECUTABLE;
    return false;
  }
  if (status != 0) {
    ADD_FAILURE() << "sentencepiece_reference.py failed with status " << status;
    return false;
  }
  *response = io::read_json_file(dir.file("response.json"));
  return true;
}

// ---------------------------------------------------------------------------------------------
// A minimal protobuf writer for synthetic models.

std::string varint(uint64_t v) {
  std::string out;
  do {
    out += static_cast<char>((v & 0x7F) | (v >= 0x80 ? 0x80 : 0));
    v >>= 7;
  } while (v);
  return out;
}
std::string field_varint(int field, uint64_t v) {
  return varint(static_cast<uint64_t>(field) << 3) + varint(v);
}
std::string field_bytes(int field, const std::string& bytes) {
  return varint((static_cast<uint64_t>(field) << 3) | 2) + varint(bytes.size()) + bytes;
}
std::string field_float(int field, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  std::string out = varint((static_cast<uint64_t>(field) << 3) | 5);
  for (int i = 0; i < 4; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
  return out;
}

struct SyntheticPiece {
  std::string text;
  float score;
  int type;  // 1 normal 2 unknown 3 control 4 user-defined 5 unused 6 byte
};

std::string synthetic_model(const std::vector<SyntheticPiece>& pieces, const std::string& trainer_extra = "",
                            const std::string& normalizer = field_bytes(1, "identity") + field_varint(3, 1) +
                                                            field_varint(4, 0)) {
  std::string model;
  for (const auto& p : pieces)
    model += field_bytes(1, field_bytes(1, p.text) + field_float(2, p.score) + field_varint(3, p.type));
  model += field_bytes(2, field_varint(3, 2) + trainer_extra);  // model_type BPE
  model += field_bytes(3, normalizer);
  return model;
}

// A small BPE vocabulary with a user-defined piece, an unused merge and no byte fallback.
std::vector<SyntheticPiece> small_vocabulary() {
  return {{"<unk>", 0, 2},
          {"<s>", 0, 3},
          {"</s>", 0, 3},
          {"<sep>", 0, 4},
          {"\xE2\x96\x81", -1, 1},
          {"a", -2, 1},
          {"b", -3, 1},
          {"c", -4, 1},
          {"d", -5, 1},
          {"ab", -1.5f, 1},
          {"bc", -0.5f, 5},
          {"abc", -2.5f, 1},
          {"\xE2\x96\x81"
           "a",
           -1.2f, 1},
          {"cd", -1.5f, 1},
          {"\xE2\x96\x81"
           "ab",
           -1.1f, 1},
          {"dd", -1.5f, 1},
          {"ddd", -0.1f, 1},
          {"é", -6, 1}};
}

// ---------------------------------------------------------------------------------------------

TEST(SentencePiece, MatchesPythonOnTrickyStrings) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  const auto texts = tricky_strings(300);
  const auto id_lists = tricky_id_sequences(tokenizer, 200);
  io::Json response;
  std::string why;
  if (!python_reference(model, texts, id_lists, &response, &why)) {
    if (!why.empty()) GTEST_SKIP() << why;
    return;
  }
  std::printf("cross-checking %zu strings and %zu id sequences against Python sentencepiece %s\n",
              texts.size(), id_lists.size(), response.at("sentencepiece").get<std::string>().c_str());
  size_t mismatches = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto want = response.at("encode").at(i).get<std::vector<int64_t>>();
    const auto got = tokenizer.sentencepiece_encode(texts[i]);
    if (got != want && ++mismatches < 10)
      ADD_FAILURE() << "encode mismatch for " << io::Json(texts[i]).dump();
    // decode(encode(text)) round trip, with sentencepiece's own decode as the reference
    // (texts starting with a space lose it, as sentencepiece does).
    if (got == want) EXPECT_TRUE(valid_utf8(tokenizer.sentencepiece_decode(got)));
  }
  for (size_t i = 0; i < id_lists.size(); ++i) {
    const auto want = response.at("decode").at(i).get<std::string>();
    const auto got = tokenizer.sentencepiece_decode(id_lists[i]);
    if (got != want && ++mismatches < 20)
      ADD_FAILURE() << "decode mismatch for " << io::Json(id_lists[i]).dump() << ": got "
                    << io::Json(got).dump() << " want " << io::Json(want).dump();
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(SentencePiece, RoundTripDecodeMatchesPython) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  const auto texts = tricky_strings(60);
  std::vector<std::vector<int64_t>> encoded;
  for (const auto& text : texts) encoded.push_back(tokenizer.sentencepiece_encode(text));
  io::Json response;
  std::string why;
  if (!python_reference(model, {}, encoded, &response, &why)) {
    if (!why.empty()) GTEST_SKIP() << why;
    return;
  }
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(tokenizer.sentencepiece_decode(encoded[i]), response.at("decode").at(i).get<std::string>())
        << io::Json(texts[i]).dump();
}

TEST(SentencePiece, SyntheticModelMatchesPython) {
  // User-defined piece (never merged, matched whole), an UNUSED merge that must be split back,
  // unknown characters without byte fallback (a run of them is one <unk>), extra whitespace
  // removal, merges with equal scores (leftmost first).
  TempDir dir;
  const std::string path = dir.file("synthetic.model");
  test::write_file(path,
                   synthetic_model(small_vocabulary(), "",
                                   field_bytes(1, "identity") + field_varint(3, 1) + field_varint(4, 1)));
  const Tokenizer tokenizer = Tokenizer::from_file(path, {});
  const std::vector<std::string> texts = {"abc",
                                          "  a  b c  ",
                                          "xyz",
                                          "a<sep>b",
                                          "bcbc",
                                          "",
                                          "   ",
                                          "abcd",
                                          "dddd",
                                          "ddddd",
                                          "<sep><sep>",
                                          "éa",
                                          "a\xE2\x96\x81"
                                          "b",
                                          "zz abc zz",
                                          "cdcd ab",
                                          "<se",
                                          "ab<sep>",
                                          "\xE2\x96\x81"};
  const std::vector<std::vector<int64_t>> id_lists = {{4, 5},    {0, 5, 0},   {1, 5, 2}, {3, 4},   {4},
                                                      {4, 4, 5}, {14, 0, 14}, {1, 4, 5}, {10, 11}, {0}};
  io::Json response;
  std::string why;
  if (!python_reference(path, texts, id_lists, &response, &why)) {
    if (!why.empty()) GTEST_SKIP() << why;
    return;
  }
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(tokenizer.sentencepiece_encode(texts[i]),
              response.at("encode").at(i).get<std::vector<int64_t>>())
        << io::Json(texts[i]).dump();
  for (size_t i = 0; i < id_lists.size(); ++i)
    EXPECT_EQ(tokenizer.sentencepiece_decode(id_lists[i]), response.at("decode").at(i).get<std::string>())
        << io::Json(id_lists[i]).dump();
}

// ---------------------------------------------------------------------------------------------
// transformers 4.31 rules around added and special tokens.

TEST(Tokenizer, MiniGpt5Preset) {
  const auto tokens = minigpt5_added_tokens();
  ASSERT_EQ(tokens.size(), 9u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(tokens[i].content, "[IMG" + std::to_string(i) + "]");
    EXPECT_EQ(tokens[i].id, 32000 + i);
  }
  EXPECT_EQ(tokens[8].content, "<ImageHere>");
  EXPECT_EQ(tokens[8].id, 32008);
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  EXPECT_EQ(tokenizer.vocab_size(), 32009);
  EXPECT_EQ(tokenizer.sentencepiece_size(), 32000);
  EXPECT_EQ(tokenizer.bos_id(), 1);
  EXPECT_EQ(tokenizer.eos_id(), 2);
  EXPECT_EQ(tokenizer.unk_id(), 0);
  EXPECT_EQ(tokenizer.pad_id(), -1);
  EXPECT_EQ(tokenizer.token_id("<ImageHere>"), 32008);
  EXPECT_EQ(tokenizer.token_id("<0x0A>"), 13);
  EXPECT_EQ(tokenizer.token_id("no such piece"), std::nullopt);
  EXPECT_EQ(tokenizer.piece(32003), "[IMG3]");
  EXPECT_EQ(tokenizer.piece(1), "<s>");
  EXPECT_TRUE(tokenizer.is_special(32000));
  EXPECT_TRUE(tokenizer.is_special(2));
  EXPECT_FALSE(tokenizer.is_special(15043));
  EXPECT_TRUE(tokenizer.is_added(32008));
  EXPECT_FALSE(tokenizer.is_added(2));
}

TEST(Tokenizer, TextAroundAddedTokensIsStrippedAndEncodedPerChunk) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  const auto sp = [&](const std::string& text) { return tokenizer.sentencepiece_encode(text); };
  const auto concat = [](std::initializer_list<std::vector<int64_t>> parts) {
    std::vector<int64_t> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  EXPECT_EQ(tokenizer.encode("a [IMG0] b"), concat({sp("a"), {32000}, sp("b")}));
  // Python whitespace, not only ASCII: U+3000, U+00A0, U+001C, U+2028, \v, \f.
  EXPECT_EQ(tokenizer.encode("a\xE3\x80\x80\xC2\xA0<ImageHere>\x1c\xE2\x80\xA8\v\fb"),
            concat({sp("a"), {32008}, sp("b")}));
  // U+200B (zero width space) is not whitespace for Python.
  EXPECT_EQ(tokenizer.encode("a\xE2\x80\x8B[IMG1]"), concat({sp("a\xE2\x80\x8B"), {32001}}));
  EXPECT_EQ(tokenizer.encode(" \n "), sp(" \n "));
  EXPECT_EQ(tokenizer.encode("\t[IMG7]\t"), (std::vector<int64_t>{32007}));
  // <s>, </s>, <unk> in text are their ids, without stripping (AddedToken(lstrip=False, rstrip=False)).
  EXPECT_EQ(tokenizer.encode("Hello</s>"), concat({sp("Hello"), {2}}));
  EXPECT_EQ(tokenizer.encode("a <s> b"), concat({sp("a "), {1}, sp(" b")}));
  EXPECT_EQ(tokenizer.encode("<unk><s>"), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(tokenizer.encode("x <s>[IMG0] y"), concat({sp("x "), {1, 32000}, sp("y")}));
  // BOS/EOS around the whole text.
  EXPECT_EQ(tokenizer.encode("Hello", true, false), concat({{1}, sp("Hello")}));
  EXPECT_EQ(tokenizer.encode("Hello", true, true), concat({{1}, sp("Hello"), {2}}));
  EXPECT_EQ(tokenizer.encode("", true, true), (std::vector<int64_t>{1, 2}));
  // Malformed UTF-8 goes through sentencepiece's normalizer (U+FFFD), never crashes.
  EXPECT_EQ(tokenizer.encode("\xFF[IMG0]\xC3"), concat({sp("\xFF"), {32000}, sp("\xC3")}));
  EXPECT_EQ(sp("\xFF"), sp("\xEF\xBF\xBD"));
}

TEST(Tokenizer, LongestAddedTokenWinsAtTheLeftmostMatch) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer =
      Tokenizer::from_file(model, {{"<a>", 32000}, {"<a><b>", 32001}, {"b>", 32002, false, false, false}});
  const auto sp = [&](const std::string& text) { return tokenizer.sentencepiece_encode(text); };
  EXPECT_EQ(tokenizer.encode("<a><b>"), (std::vector<int64_t>{32001}));
  EXPECT_EQ(tokenizer.encode("<a><c>"), [&] {
    auto ids = std::vector<int64_t>{32000};
    const auto rest = sp("<c>");
    ids.insert(ids.end(), rest.begin(), rest.end());
    return ids;
  }());
  EXPECT_EQ(tokenizer.encode("<b> b> "), [&] {
    auto ids = sp("<");
    ids.push_back(32002);
    for (const int64_t id : sp(" ")) ids.push_back(id);
    ids.push_back(32002);
    for (const int64_t id : sp(" ")) ids.push_back(id);
    return ids;
  }());
  EXPECT_FALSE(tokenizer.is_special(32002));
  EXPECT_EQ(tokenizer.decode({32000, 32002}, true), "b>");
}

TEST(Tokenizer, DecodeFollowsTransformers431) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  const int64_t hello = *tokenizer.token_id("\xE2\x96\x81Hello");
  const int64_t world = *tokenizer.token_id("\xE2\x96\x81world");
  const int64_t space = *tokenizer.token_id("\xE2\x96\x81");
  // Added tokens verbatim, parts joined by one space; each run decodes on its own.
  EXPECT_EQ(tokenizer.decode({hello, 32000, world}), "Hello [IMG0] world");
  EXPECT_EQ(tokenizer.decode({32000, 32001}), "[IMG0] [IMG1]");
  EXPECT_EQ(tokenizer.decode({space, 32000}), " [IMG0]");  // the run decodes to "", still joined
  // <s>, </s>, <unk> inside a run (convert_tokens_to_string): verbatim, with a space before the
  // text they follow.
  EXPECT_EQ(tokenizer.decode({1, hello}), "<s>Hello");
  EXPECT_EQ(tokenizer.decode({hello, 2}), " Hello</s>");
  EXPECT_EQ(tokenizer.decode({1, hello, world, 2, 1}), "<s> Hello world</s><s>");
  EXPECT_EQ(tokenizer.decode({hello, 0, world}), " Hello<unk>world");
  EXPECT_EQ(tokenizer.decode({32008, 1, hello}), "<ImageHere> <s>Hello");
  // skip_special_tokens drops BOS/EOS/UNK and the additional special tokens.
  EXPECT_EQ(tokenizer.decode({1, hello, 32000, 0, world, 2}, true), "Hello world");
  // Plain sentencepiece decoding: control pieces vanish, unknown is " ⁇ ".
  EXPECT_EQ(tokenizer.sentencepiece_decode({1, hello, 0, 2}), "Hello \xE2\x81\x87 ");
  EXPECT_EQ(tokenizer.decode({}), "");
}

TEST(Tokenizer, OutOfRangeIdsAreArgumentErrors) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  EXPECT_THROW_WITH(tokenizer.decode({1, 32009}), ArgumentError, "32009");
  EXPECT_THROW_WITH(tokenizer.decode({-1}), ArgumentError, "32009 ids");
  EXPECT_THROW_WITH(tokenizer.piece(40000), ArgumentError, "40000");
  EXPECT_THROW_WITH(tokenizer.sentencepiece_decode({32000}), ArgumentError, "32000 pieces");
  StreamingDecoder stream(tokenizer);
  EXPECT_THROW_WITH(stream.push(123456), ArgumentError, "123456");
  EXPECT_THROW_WITH(Tokenizer::from_file(model, {{"[IMG0]", 32001}}), ArgumentError, "expected 32000");
  EXPECT_THROW_WITH(Tokenizer::from_file(model, {{"[IMG0]", 32000}, {"[IMG0]", 32001}}), ArgumentError,
                    "twice");
  EXPECT_THROW_WITH(Tokenizer::from_file(model, {{"\xE2\x96\x81Hello", 32000}}), ArgumentError, "already");
  EXPECT_THROW_WITH(Tokenizer::from_file(model, {{"", 32000}}), ArgumentError, "empty");
}

// ---------------------------------------------------------------------------------------------
// Streaming decode.

// For every prefix of `ids`: the streamed pieces are valid UTF-8 each, and together (with
// finish()) they equal decode() of that prefix.
void expect_streaming_matches(const Tokenizer& tokenizer, const std::vector<int64_t>& ids, bool skip) {
  for (size_t length = 0; length <= ids.size(); ++length) {
    StreamingDecoder stream(tokenizer, skip);
    std::string streamed;
    for (size_t i = 0; i < length; ++i) {
      const std::string piece = stream.push(ids[i]);
      ASSERT_TRUE(valid_utf8(piece)) << io::Json(ids).dump() << " at " << i;
      streamed += piece;
    }
    const std::string rest = stream.finish();
    ASSERT_TRUE(valid_utf8(rest));
    streamed += rest;
    const std::vector<int64_t> prefix(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(length));
    ASSERT_EQ(streamed, tokenizer.decode(prefix, skip)) << io::Json(prefix).dump() << " skip=" << skip;
  }
}

TEST(StreamingDecoder, EqualsFullDecodeForEveryPrefix) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  std::vector<std::vector<int64_t>> sequences;
  for (const auto& text : tricky_strings(40)) sequences.push_back(tokenizer.encode(text));
  sequences.push_back(
      tokenizer.encode("###Human: <Img><ImageHere></Img> What next? ###Assistant: A beach. "
                       "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]\n###"));
  // Random byte-piece sequences (truncated and corrupt characters) mixed with added tokens, but
  // without <s>/</s>/<unk> mid-run for skip=false (see the next test).
  std::mt19937 rng(99);
  for (auto ids : tricky_id_sequences(tokenizer, 120)) {
    std::vector<int64_t> mixed;
    for (const int64_t id : ids) {
      if (rng() % 5 == 0) mixed.push_back(32000 + static_cast<int64_t>(rng() % 9));
      mixed.push_back(id);
    }
    sequences.push_back(std::move(mixed));
  }
  for (const auto& ids : sequences) {
    expect_streaming_matches(tokenizer, ids, /*skip=*/true);
    bool special_mid_run = false;
    for (size_t i = 1; i < ids.size(); ++i)
      special_mid_run |= ids[i] < 3 && ids[i - 1] >= 3 && ids[i - 1] < tokenizer.sentencepiece_size();
    if (!special_mid_run) expect_streaming_matches(tokenizer, ids, /*skip=*/false);
  }
}

TEST(StreamingDecoder, HoldsBackSplitCharactersAndMovesTheRetroactiveSpace) {
  const std::string model = llama_model_path();
  SKIP_WITHOUT_LLAMA(model);
  const Tokenizer tokenizer = Tokenizer::from_file(model);
  // 😀 = F0 9F 98 80 as four byte pieces: nothing comes out until the last one.
  const std::vector<int64_t> emoji = {*tokenizer.token_id("<0xF0>"), *tokenizer.token_id("<0x9F>"),
                                      *tokenizer.token_id("<0x98>"), *tokenizer.token_id("<0x80>")};
  StreamingDecoder stream(tokenizer);
  EXPECT_EQ(stream.push(*tokenizer.token_id("\xE2\x96\x81Hi")), "Hi");
  EXPECT_EQ(stream.push(*tokenizer.token_id("\xE2\x96\x81")), " ");
  for (size_t i = 0; i + 1 < emoji.size(); ++i) EXPECT_EQ(stream.push(emoji[i]), "") << i;
  EXPECT_EQ(stream.push(emoji.back()), "\xF0\x9F\x98\x80");
  // A truncated character becomes U+FFFD per byte once it cannot complete any more.
  EXPECT_EQ(stream.push(emoji[0]), "");
  EXPECT_EQ(stream.push(emoji[1]), "");
  EXPECT_EQ(stream.push(*tokenizer.token_id("<0x41>")),
            "\xEF\xBF\xBD\xEF\xBF\xBD"
            "A");
  EXPECT_EQ(stream.push(emoji[0]), "");
  EXPECT_EQ(stream.push(32000), "\xEF\xBF\xBD [IMG0]");
  EXPECT_EQ(stream.finish(), "");
  // After finish() a new sequence starts (its first piece loses the dummy-prefix space).
  EXPECT_EQ(stream.push(emoji[0]), "");
  EXPECT_EQ(stream.finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.push(*tokenizer.token_id("\xE2\x96\x81Hi")), "Hi");
  // 4.31 decodes [▁Hello, </s>] as " Hello</s>"; the stream cannot prepend, so the space comes
  // where </s> arrives.
  const int64_t hello = *tokenizer.token_id("\xE2\x96\x81Hello");
  StreamingDecoder eos_stream(tokenizer);
  std::string streamed = eos_stream.push(hello);
  streamed += eos_stream.push(2);
  streamed += eos_stream.finish();
  EXPECT_EQ(tokenizer.decode({hello, 2}), " Hello</s>");
  EXPECT_EQ(streamed, "Hello </s>");
  StreamingDecoder skipping(tokenizer, /*skip_special_tokens=*/true);
  EXPECT_EQ(skipping.push(hello) + skipping.push(2) + skipping.finish(), tokenizer.decode({hello, 2}, true));
}

// ---------------------------------------------------------------------------------------------
// HF tokenizer directories.

class TokenizerDirectory : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = llama_model_path();
    if (model_.empty()) GTEST_SKIP() << "LLaMA tokenizer.model not found";
    // A link, not a copy, of the real model.
    std::filesystem::create_symlink(std::filesystem::absolute(model_), dir_.file("tokenizer.model"));
  }
  void write(const std::string& name, const io::Json& json) {
    test::write_file(dir_.file(name), json.dump(2));
  }

  std::string model_;
  TempDir dir_;
};

TEST_F(TokenizerDirectory, WithoutAddedTokenFilesUsesTheMiniGpt5Preset) {
  const Tokenizer tokenizer = Tokenizer::from_directory(dir_.path());
  ASSERT_EQ(tokenizer.added_tokens().size(), 9u);
  for (const auto& token : minigpt5_added_tokens()) EXPECT_EQ(tokenizer.token_id(token.content), token.id);
  EXPECT_TRUE(tokenizer.add_bos_token());
  EXPECT_FALSE(tokenizer.add_eos_token());
  const Tokenizer plain = Tokenizer::from_directory(dir_.path(), /*add_minigpt5_tokens=*/false);
  EXPECT_EQ(plain.vocab_size(), 32000);
  EXPECT_EQ(plain.encode("[IMG0]"), plain.sentencepiece_encode("[IMG0]"));
}

TEST_F(TokenizerDirectory, ReadsSavedMiniGpt5Tokenizer) {
  // What save_pretrained writes after MiniGPT-5 added its tokens (transformers 4.31).
  io::Json added = io::Json::object();
  for (const auto& token : minigpt5_added_tokens()) added[token.content] = token.id;
  write("added_tokens.json", added);
  io::Json additional = io::Json::array();
  for (const auto& token : minigpt5_added_tokens()) additional.push_back(token.content);
  const io::Json no_strip = {
      {"lstrip", false}, {"normalized", true}, {"rstrip", false}, {"single_word", false}};
  io::Json bos = no_strip, eos = no_strip, unk = no_strip;
  bos["content"] = "<s>";
  eos["content"] = "</s>";
  unk["content"] = "<unk>";
  write("special_tokens_map.json", {{"additional_special_tokens", additional},
                                    {"bos_token", bos},
                                    {"eos_token", eos},
                                    {"pad_token", "</s>"},
                                    {"unk_token", unk}});
  bos["__type"] = "AddedToken";
  write("tokenizer_config.json", {{"add_bos_token", true},
                                  {"add_eos_token", false},
                                  {"bos_token", bos},
                                  {"clean_up_tokenization_spaces", false},
                                  {"legacy", true},
                                  {"model_max_length", 2048},
                                  {"tokenizer_class", "LlamaTokenizer"}});
  const Tokenizer saved = Tokenizer::from_directory(dir_.path());
  const Tokenizer preset = Tokenizer::from_file(model_);
  EXPECT_EQ(saved.vocab_size(), preset.vocab_size());
  EXPECT_EQ(saved.pad_id(), 2);
  const std::string text = "###Human: <Img><ImageHere></Img> hi [IMG0][IMG1] ###Assistant:";
  EXPECT_EQ(saved.encode(text), preset.encode(text));
  EXPECT_EQ(saved.decode(saved.encode(text)), preset.decode(preset.encode(text)));
  // pad_token "</s>" (a plain string) is also the eos AddedToken, whose flags (no stripping)
  // decide, as in 4.31 where only AddedToken specials carry strip flags.
  EXPECT_EQ(saved.encode("a </s> b"), preset.encode("a </s> b"));
}

TEST_F(TokenizerDirectory, OtherAddedTokensShiftMiniGpt5Ids) {
  write("added_tokens.json", {{"[PAD]", 32000}});
  write("special_tokens_map.json", {{"pad_token", "[PAD]"}});
  write("tokenizer_config.json", {{"add_bos_token", false}, {"add_eos_token", true}});
  const Tokenizer tokenizer = Tokenizer::from_directory(dir_.path());
  EXPECT_EQ(tokenizer.vocab_size(), 32010);
  EXPECT_EQ(tokenizer.pad_id(), 32000);
  EXPECT_EQ(tokenizer.token_id("[IMG0]"), 32001);
  EXPECT_EQ(tokenizer.token_id("<ImageHere>"), 32009);
  EXPECT_FALSE(tokenizer.add_bos_token());
  EXPECT_TRUE(tokenizer.add_eos_token());
  EXPECT_TRUE(tokenizer.is_special(32000));
  EXPECT_EQ(tokenizer.encode("a [PAD] b"), tokenizer.encode("a[PAD]b"));
  EXPECT_EQ(tokenizer.decode({32000, 32001}, true), "");
}

TEST_F(TokenizerDirectory, ReadsAddedTokensDecoderAndAppendsMissingSpecials) {
  // transformers >= 4.34 writes added_tokens_decoder; ids below the vocabulary are pieces.
  write("tokenizer_config.json", {{"added_tokens_decoder",
                                   {{"0", {{"content", "<unk>"}, {"special", true}}},
                                    {"32000", {{"content", "[IMG0]"}, {"special", true}}}}},
                                  {"additional_special_tokens", {"<extra>", "[IMG0]"}},
                                  {"pad_token", nullptr}});
  const Tokenizer tokenizer = Tokenizer::from_directory(dir_.path());
  EXPECT_EQ(tokenizer.token_id("[IMG0]"), 32000);
  EXPECT_EQ(tokenizer.token_id("<extra>"), 32001);  // a special token missing from the vocabulary
  EXPECT_EQ(tokenizer.token_id("[IMG1]"), 32002);
  EXPECT_EQ(tokenizer.token_id("<ImageHere>"), 32009);
  // MiniGPT-5's add_special_tokens replaced the additional special tokens: <extra> is now an
  // ordinary added token (kept by skip_special_tokens).
  EXPECT_FALSE(tokenizer.is_special(32001));
  EXPECT_EQ(tokenizer.decode({32000, 32001}, true), "<extra>");
}

TEST_F(TokenizerDirectory, InconsistentFilesAreConfigErrors) {
  write("added_tokens.json", {{"[IMG0]", 32001}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "added_tokens.json");
  write("added_tokens.json", {{"[IMG0]", "32000"}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "not an integer");
  write("added_tokens.json", {{"[IMG0]", 32000}, {"[IMG1]", 32000}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "expected 32001");
  test::write_file(dir_.file("added_tokens.json"), "{\"[IMG0]\": 32000,");
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "added_tokens.json");
  std::filesystem::remove(dir_.file("added_tokens.json"));
  write("tokenizer_config.json", {{"bos_token", 7}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "bos_token");
  write("tokenizer_config.json", {{"add_bos_token", "yes"}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "add_bos_token");
  write("tokenizer_config.json", io::Json::object());
  write("special_tokens_map.json", {{"additional_special_tokens", "[IMG0]"}});
  EXPECT_THROW_WITH(Tokenizer::from_directory(dir_.path()), ConfigError, "special_tokens_map.json");
  TempDir empty;
  EXPECT_THROW_WITH(Tokenizer::from_directory(empty.path()), FileNotFoundError, "tokenizer.model");
}

// ---------------------------------------------------------------------------------------------
// Corrupt model files.

TEST(SentencePieceModelFile, CorruptOrUnsupportedModelsAreFormatErrors) {
  TempDir dir;
  const auto load = [&](const std::string& bytes) {
    test::write_file(dir.file("tokenizer.model"), bytes);
    return Tokenizer::from_file(dir.file("tokenizer.model"), {});
  };
  EXPECT_THROW_WITH(Tokenizer::from_file(dir.file("absent.model")), FileNotFoundError, "absent.model");
  EXPECT_THROW_WITH(Tokenizer::from_file(dir.path()), FormatError, "not a regular file");
  EXPECT_THROW_WITH(load(""), FormatError, "empty");
  EXPECT_THROW_WITH(load("this is not a protobuf"), FormatError, "tokenizer.model");
  EXPECT_THROW_WITH(load("\x0a\xff\xff\xff\xff\x0f"), FormatError, "past the end");
  EXPECT_THROW_WITH(load("\x0a\x80"), FormatError, "truncated varint");
  EXPECT_THROW_WITH(load(std::string("\x0b\x00", 2)), FormatError, "group");
  EXPECT_THROW_WITH(load(std::string("\x0a\x02\x10\x01", 4)), FormatError,
                    "wire type varint, expected 32-bit");

  const std::string good = synthetic_model(small_vocabulary());
  EXPECT_NO_THROW(load(good));
  for (const size_t cut : {good.size() - 1, good.size() - 5, good.size() / 2, size_t{7}, size_t{1}})
    EXPECT_THROW(load(good.substr(0, cut)), FormatError) << "cut at " << cut;
  EXPECT_THROW_WITH(load(good.substr(0, good.size() - 3)), FormatError, "at byte");

  auto pieces = small_vocabulary();
  // model_type UNIGRAM
  std::string unigram;
  for (const auto& p : pieces)
    unigram += field_bytes(1, field_bytes(1, p.text) + field_float(2, p.score) + field_varint(3, p.type));
  unigram += field_bytes(2, field_varint(3, 1));
  EXPECT_THROW_WITH(load(unigram), FormatError, "UNIGRAM");
  EXPECT_THROW_WITH(load(unigram.substr(0, unigram.size() - 4)), FormatError, "tokenizer.model");
  // No trainer spec at all: the proto default is UNIGRAM.
  EXPECT_THROW_WITH(load(field_bytes(1, field_bytes(1, "<unk>") + field_varint(3, 2))), FormatError,
                    "UNIGRAM");

  auto without_unk = pieces;
  without_unk[0].type = 1;
  EXPECT_THROW_WITH(load(synthetic_model(without_unk)), FormatError, "no unknown piece");
  auto two_unk = pieces;
  two_unk[5].type = 2;
  EXPECT_THROW_WITH(load(synthetic_model(two_unk)), FormatError, "two unknown pieces");
  auto duplicate = pieces;
  duplicate[6].text = "a";
  EXPECT_THROW_WITH(load(synthetic_model(duplicate)), FormatError, "'a' twice");
  auto empty_piece = pieces;
  empty_piece[7].text = "";
  EXPECT_THROW_WITH(load(synthetic_model(empty_piece)), FormatError, "piece 7");
  auto bad_type = pieces;
  bad_type[7].type = 9;
  EXPECT_THROW_WITH(load(synthetic_model(bad_type)), FormatError, "piece type 9");
  auto byte_piece = pieces;
  byte_piece[7] = {"<0x41>", 0, 6};
  EXPECT_THROW_WITH(load(synthetic_model(byte_piece)), FormatError, "byte_fallback is false");
  // byte_fallback (field 35) without the 256 byte pieces; a malformed byte piece.
  EXPECT_THROW_WITH(load(synthetic_model(byte_piece, field_varint(35, 1))), FormatError,
                    "no byte piece for 0x00");
  byte_piece[7] = {"<0x4g>", 0, 6};
  EXPECT_THROW_WITH(load(synthetic_model(byte_piece, field_varint(35, 1))), FormatError, "<0x4g>");
  // An nmt_nfkc-style precompiled normalizer is not implemented.
  EXPECT_THROW_WITH(
      load(synthetic_model(pieces, "", field_bytes(1, "nmt_nfkc") + field_bytes(2, "\x01\x02\x03\x04"))),
      FormatError, "nmt_nfkc");
}

TEST(SentencePieceModelFile, MutationFuzzOnlyThrowsVokenErrors) {
  std::string original;
  const std::string model = llama_model_path();
  original = model.empty() ? synthetic_model(small_vocabulary()) : test::read_file(model);
  ASSERT_FALSE(original.empty());
  std::mt19937 rng(31337);
  size_t parsed = 0, refused = 0;
  for (int round = 0; round < 300; ++round) {
    std::string bytes = original;
    switch (round % 4) {
      case 0:  // truncate
        bytes.resize(rng() % bytes.size());
        break;
      case 1:  // flip bytes anywhere, denser near the start (the first pieces, field headers)
        for (int k = 0; k < 1 + static_cast<int>(rng() % 8); ++k)
          bytes[rng() % std::min<size_t>(bytes.size(), rng() % 2 ? 256 : bytes.size())] =
              static_cast<char>(rng());
        break;
      case 2:  // flip bytes in the tail (trainer and normalizer specs)
        for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k)
          bytes[bytes.size() - 1 - rng() % std::min<size_t>(bytes.size(), 400)] = static_cast<char>(rng());
        break;
      default: {  // insert or delete a few bytes
        const size_t at = rng() % bytes.size();
        if (rng() % 2) {
          bytes.insert(at, std::string(1 + rng() % 3, static_cast<char>(rng())));
        } else {
          bytes.erase(at, 1 + rng() % 3);
        }
      }
    }
    try {
      const SentencePieceModel parsed_model = SentencePieceModel::parse(bytes, "mutated.model");
      // Whatever parsed must encode and decode without crashing.
      const auto ids = parsed_model.encode("Hello wörld 😀 ###\n 123");
      std::string text;
      SentencePieceDecoder decoder(parsed_model);
      for (const int id : ids) decoder.push(id, text);
      for (int id = 0; id < std::min(parsed_model.size(), 300); ++id) decoder.push(id, text);
      decoder.finish(text);
      ++parsed;
    } catch (const voken::Error& e) {
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "round " << round << ": non-voken exception " << e.what();
    }
  }
  std::printf("fuzz: %zu mutated models parsed, %zu refused with voken errors\n", parsed, refused);
  EXPECT_GT(refused, 0u);
}

}  // namespace
}  // namespace voken::text
