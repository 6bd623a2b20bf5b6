#include "text/sentencepiece_writer.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <string_view>
#include <utility>

#include "voken/error.h"

namespace voken::text {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581

// ---------------------------------------------------------------------------------------------
// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/).

void put_varint(std::string& out, uint64_t value) {
  do {
    out += static_cast<char>((value & 0x7F) | (value >= 0x80 ? 0x80 : 0));
    value >>= 7;
  } while (value != 0);
}

void put_key(std::string& out, int field, int wire_type) {
  put_varint(out, (static_cast<uint64_t>(field) << 3) | static_cast<uint64_t>(wire_type));
}

// int32 fields: negative values are sign-extended to 64 bits (10 bytes), as protobuf does.
void put_int(std::string& out, int field, int64_t value) {
  put_key(out, field, 0);
  put_varint(out, static_cast<uint64_t>(value));
}

void put_bool(std::string& out, int field, bool value) { put_int(out, field, value ? 1 : 0); }

void put_float(std::string& out, int field, float value) {
  put_key(out, field, 5);
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  for (int i = 0; i < 4; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}

void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}

// ModelProto.TrainerSpec, with LLaMA's training settings where they describe the model (the
// fields a reader uses are model_type, byte_fallback, the special ids and pieces).
std::string trainer_spec(const SentencePieceSpec& spec, size_t vocab_size) {
  std::string out;
  put_bytes(out, 2, "tokenizer");  // model_prefix
  put_int(out, 3, spec.model_type);
  put_int(out, 4, static_cast<int64_t>(vocab_size));
  put_int(out, 6, 0);            // self_test_sample_size
  put_bytes(out, 7, "text");     // input_format
  put_float(out, 10, 0.99995f);  // character_coverage
  put_int(out, 11, 200000000);   // input_sentence_size
  put_int(out, 14, 1000000);     // seed_sentencepiece_size
  put_float(out, 15, 0.75f);     // shrinking_factor
  put_int(out, 16, 1);           // num_threads
  put_int(out, 17, 2);           // num_sub_iterations
  put_int(out, 18, 4192);        // max_sentence_length
  put_bool(out, 19, true);       // shuffle_input_sentence
  put_int(out, 20, 16);          // max_sentencepiece_length
  put_bool(out, 21, true);       // split_by_unicode_script
  put_bool(out, 22, true);       // split_by_whitespace
  put_bool(out, 23, true);       // split_by_number
  put_bool(out, 24, spec.treat_whitespace_as_suffix);
  put_bool(out, 25, spec.split_digits);
  put_bool(out, 26, true);   // allow_whitespace_only_pieces
  put_bool(out, 32, true);   // vocabulary_output_piece_score
  put_bool(out, 33, true);   // hard_vocab_limit
  put_bool(out, 34, false);  // use_all_vocab
  put_bool(out, 35, spec.byte_fallback);
  put_int(out, 40, spec.unk_id);
  put_int(out, 41, spec.bos_id);
  put_int(out, 42, spec.eos_id);
  put_int(out, 43, spec.pad_id);
  put_bytes(out, 44, spec.unk_surface);
  put_bytes(out, 45, spec.unk_piece);
  put_bytes(out, 46, spec.bos_piece);
  put_bytes(out, 47, spec.eos_piece);
  put_bytes(out, 48, spec.pad_piece);
  return out;
}

std::string normalizer_spec(const SentencePieceSpec& spec) {
  std::string out;
  put_bytes(out, 1, spec.normalizer_name);
  put_bytes(out, 2, "");  // precompiled_charsmap: none (identity)
  put_bool(out, 3, spec.add_dummy_prefix);
  put_bool(out, 4, spec.remove_extra_whitespaces);
  put_bool(out, 5, spec.escape_whitespaces);
  put_bytes(out, 6, "");  // normalization_rule_tsv
  return out;
}

// ---------------------------------------------------------------------------------------------
// The word list the vocabulary is learnt from: common English words, roughly by frequency, plus
// the words of MiniGPT-5's prompts (first). Weight of the word at rank r: 100000 / (r + 10).

// MiniGPT-5's prompts and the kind of text it writes: counted as the most frequent words.
constexpr const char* kPromptWords[] = {
    "following", "images",  "image",     "format",    "provide",      "please",  "understanding",
    "generate",  "Human",   "Assistant", "Img",       "ImageContent", "Give",    "You",
    "Please",    "The",     "A",         "It",        "He",           "She",     "They",
    "We",        "In",      "On",        "Then",      "cat",          "sofa",    "sitting",
    "looking",   "window",  "garden",    "beautiful", "happy",        "walking", "playing",
    "standing",  "wearing", "holding",   "people",    "scene",        "photo",   "next",
    "happens",   "after",   "suddenly",  "finally",   "together",     "sky",     "beach",
};

constexpr const char* kWords[] = {
    "the",      "of",       "and",      "to",      "a",        "in",       "is",      "it",
    "you",      "that",     "he",       "was",     "for",      "on",       "are",     "with",
    "as",       "I",        "his",      "they",    "be",       "at",       "one",     "have",
    "this",     "from",     "or",       "had",     "by",       "word",     "but",     "what",
    "some",     "we",       "can",      "out",     "other",    "were",     "all",     "there",
    "when",     "up",       "use",      "your",    "how",      "said",     "an",      "each",
    "she",      "which",    "do",       "their",   "time",     "if",       "will",    "way",
    "about",    "many",     "then",     "them",    "write",    "would",    "like",    "so",
    "these",    "her",      "long",     "make",    "thing",    "see",      "him",     "two",
    "has",      "look",     "more",     "day",     "could",    "go",       "come",    "did",
    "number",   "sound",    "no",       "most",    "people",   "my",       "over",    "know",
    "water",    "than",     "call",     "first",   "who",      "may",      "down",    "side",
    "been",     "now",      "find",     "any",     "new",      "work",     "part",    "take",
    "get",      "place",    "made",     "live",    "where",    "after",    "back",    "little",
    "only",     "round",    "man",      "year",    "came",     "show",     "every",   "good",
    "me",       "give",     "our",      "under",   "name",     "very",     "through", "just",
    "form",     "sentence", "great",    "think",   "say",      "help",     "low",     "line",
    "differ",   "turn",     "cause",    "much",    "mean",     "before",   "move",    "right",
    "boy",      "old",      "too",      "same",    "tell",     "does",     "set",     "three",
    "want",     "air",      "well",     "also",    "play",     "small",    "end",     "put",
    "home",     "read",     "hand",     "port",    "large",    "spell",    "add",     "even",
    "land",     "here",     "must",     "big",     "high",     "such",     "follow",  "act",
    "why",      "ask",      "men",      "change",  "went",     "light",    "kind",    "off",
    "need",     "house",    "picture",  "try",     "us",       "again",    "animal",  "point",
    "mother",   "world",    "near",     "build",   "self",     "earth",    "father",  "head",
    "stand",    "own",      "page",     "should",  "country",  "found",    "answer",  "school",
    "grow",     "study",    "still",    "learn",   "plant",    "cover",    "food",    "sun",
    "four",     "between",  "state",    "keep",    "eye",      "never",    "last",    "let",
    "thought",  "city",     "tree",     "cross",   "farm",     "hard",     "start",   "might",
    "story",    "saw",      "far",      "sea",     "draw",     "left",     "late",    "run",
    "while",    "press",    "close",    "night",   "real",     "life",     "few",     "north",
    "open",     "seem",     "together", "next",    "white",    "children", "begin",   "got",
    "walk",     "example",  "ease",     "paper",   "group",    "always",   "music",   "those",
    "both",     "mark",     "often",    "letter",  "until",    "mile",     "river",   "car",
    "feet",     "care",     "second",   "book",    "carry",    "took",     "science", "eat",
    "room",     "friend",   "began",    "idea",    "fish",     "mountain", "stop",    "once",
    "base",     "hear",     "horse",    "cut",     "sure",     "watch",    "color",   "face",
    "wood",     "main",     "enough",   "plain",   "girl",     "usual",    "young",   "ready",
    "above",    "ever",     "red",      "list",    "though",   "feel",     "talk",    "bird",
    "soon",     "body",     "dog",      "family",  "direct",   "pose",     "leave",   "song",
    "measure",  "door",     "product",  "black",   "short",    "numeral",  "class",   "wind",
    "question", "happen",   "complete", "ship",    "area",     "half",     "rock",    "order",
    "fire",     "south",    "problem",  "piece",   "told",     "knew",     "pass",    "since",
    "top",      "whole",    "king",     "space",   "heard",    "best",     "hour",    "better",
    "true",     "during",   "hundred",  "five",    "remember", "step",     "early",   "hold",
    "west",     "ground",   "interest", "reach",   "fast",     "verb",     "sing",    "listen",
    "six",      "table",    "travel",   "less",    "morning",  "ten",      "simple",  "several",
    "vowel",    "toward",   "war",      "lay",     "against",  "pattern",  "slow",    "center",
    "love",     "person",   "money",    "serve",   "appear",   "road",     "map",     "rain",
    "rule",     "govern",   "pull",     "cold",    "notice",   "voice",    "unit",    "power",
    "town",     "fine",     "certain",  "fly",     "fall",     "lead",     "cry",     "dark",
    "machine",  "note",     "wait",     "plan",    "figure",   "star",     "box",     "noun",
    "field",    "rest",     "correct",  "able",    "pound",    "done",     "beauty",  "drive",
    "stood",    "contain",  "front",    "teach",   "week",     "final",    "gave",    "green",
    "oh",       "quick",    "develop",  "ocean",   "warm",     "free",     "minute",  "strong",
    "special",  "mind",     "behind",   "clear",   "tail",     "produce",  "fact",    "street",
    "inch",     "multiply", "nothing",  "course",  "stay",     "wheel",    "full",    "force",
    "blue",     "object",   "decide",   "surface", "deep",     "moon",     "island",  "foot",
    "system",   "busy",     "test",     "record",  "boat",     "common",   "gold",    "possible",
    "plane",    "stead",    "dry",      "wonder",  "laugh",    "thousand", "ago",     "ran",
    "check",    "game",     "shape",    "equate",  "hot",      "miss",     "brought", "heat",
    "snow",     "tire",     "bring",    "yes",     "distant",  "fill",     "east",    "paint",
    "language", "among",
};

constexpr const char* kPunctuation[] = {".", ",", ":", "!",   "?",   "'s", "\"",
                                        "(", ")", "-", "...", "###", "</", ">"};

enum class CharClass { Letter, Digit, Other };

CharClass char_class(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return CharClass::Letter;
  if (c >= '0' && c <= '9') return CharClass::Digit;
  return CharClass::Other;
}

// A whitespace-free word -> the symbol sequences sentencepiece's trainer would learn from:
// runs of one character class (digits one by one: split_digits), the first with the escaped
// space in front.
std::vector<std::vector<std::string>> pre_tokenize(std::string_view word) {
  std::vector<std::vector<std::string>> runs;
  for (size_t i = 0; i < word.size();) {
    const CharClass cls = char_class(word[i]);
    size_t end = i + 1;
    if (cls != CharClass::Digit)
      while (end < word.size() && char_class(word[end]) == cls) ++end;
    std::vector<std::string> symbols;
    if (runs.empty()) symbols.emplace_back(kSpaceSymbol);
    for (size_t k = i; k < end; ++k) symbols.emplace_back(1, word[k]);
    runs.push_back(std::move(symbols));
    i = end;
  }
  return runs;
}

size_t utf8_length(std::string_view text) {
  size_t n = 0;
  for (const char c : text) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Plain BPE over weighted words: repeatedly merge the most frequent adjacent pair (ties: the
// lexicographically smallest merged piece). Returns at most `limit` merged pieces in merge order.
std::vector<std::string> learn_merges(size_t limit) {
  struct Word {
    std::vector<std::string> symbols;
    int64_t weight;
  };
  std::vector<Word> words;
  int64_t rank = 0;
  const auto add = [&](std::string_view text) {
    const int64_t weight = 100000 / (rank++ + 10);
    for (auto& run : pre_tokenize(text)) words.push_back({std::move(run), weight});
  };
  for (const char* word : kPromptWords) add(word);
  for (const char* word : kWords) add(word);
  for (const char* mark : kPunctuation) add(mark);

  std::vector<std::string> merges;
  std::set<std::string> known;
  while (merges.size() < limit) {
    std::map<std::pair<std::string, std::string>, int64_t> counts;
    for (const auto& word : words)
      for (size_t i = 0; i + 1 < word.symbols.size(); ++i)
        counts[{word.symbols[i], word.symbols[i + 1]}] += word.weight;
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_count = 0;
    std::string best_piece;
    for (const auto& [pair, count] : counts) {
      std::string piece = pair.first + pair.second;
      if (utf8_length(piece) > 16 || known.count(piece)) continue;
      if (count > best_count || (count == best_count && piece < best_piece)) {
        best = &pair;
        best_count = count;
        best_piece = std::move(piece);
      }
    }
    if (!best) break;
    const auto [left, right] = *best;
    for (auto& word : words) {
      std::vector<std::string> merged;
      for (size_t i = 0; i < word.symbols.size(); ++i) {
        if (i + 1 < word.symbols.size() && word.symbols[i] == left && word.symbols[i + 1] == right) {
          merged.push_back(best_piece);
          ++i;
        } else {
          merged.push_back(word.symbols[i]);
        }
      }
      word.symbols = std::move(merged);
    }
    known.insert(best_piece);
    merges.push_back(std::move(best_piece));
  }
  return merges;
}

bool starts_with_space(const std::string& piece) {
  return piece.compare(0, kSpaceSymbol.size(), kSpaceSymbol) == 0;
}

bool all_letters(const std::string& piece) {
  return !piece.empty() &&
         std::all_of(piece.begin(), piece.end(), [](char c) { return char_class(c) == CharClass::Letter; });
}

}  // namespace

SentencePieceSpec llama_sentencepiece_spec() {
  SentencePieceSpec spec;
  spec.model_type = 2;  // BPE
  spec.byte_fallback = true;
  spec.split_digits = true;
  spec.unk_id = 0;
  spec.bos_id = 1;
  spec.eos_id = 2;
  spec.pad_id = -1;
  spec.normalizer_name = "identity";
  spec.add_dummy_prefix = true;
  spec.remove_extra_whitespaces = false;
  spec.escape_whitespaces = true;
  return spec;
}

std::string serialize_sentencepiece_model(const std::vector<Piece>& pieces, const SentencePieceSpec& spec) {
  std::string model;
  for (const Piece& piece : pieces) {
    std::string body;
    put_bytes(body, 1, piece.text);
    put_float(body, 2, piece.score);
    // NORMAL is the proto default and is omitted, as sentencepiece's own serializer does.
    if (piece.type != PieceType::kNormal) put_int(body, 3, static_cast<int>(piece.type));
    put_bytes(model, 1, body);
  }
  put_bytes(model, 2, trainer_spec(spec, pieces.size()));
  put_bytes(model, 3, normalizer_spec(spec));
  // The reader applies every check sentencepiece does; a model it refuses is a caller's error.
  try {
    SentencePieceModel::parse(model, "serialize_sentencepiece_model");
  } catch (const FormatError& e) {
    throw ArgumentError(std::string("cannot write this sentencepiece model: ") + e.what());
  }
  return model;
}

void write_sentencepiece_model(const std::string& path, const std::vector<Piece>& pieces,
                               const SentencePieceSpec& spec) {
  const std::string bytes = serialize_sentencepiece_model(pieces, spec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw FormatError(path + ": cannot write the sentencepiece model");
}

std::vector<Piece> english_bpe_vocabulary(int vocab_size) {
  // The single characters: printable ASCII except the space, and the escaped space.
  std::vector<std::string> characters;
  for (char c = 33; c < 127; ++c) characters.emplace_back(1, c);
  characters.emplace_back(kSpaceSymbol);
  const int reserved = 3 + 256;
  const int minimum = reserved + static_cast<int>(characters.size()) + 16;
  if (vocab_size < minimum)
    throw ArgumentError("english_bpe_vocabulary: vocab_size " + std::to_string(vocab_size) +
                        " is below the minimum " + std::to_string(minimum) + " (3 special + 256 byte + " +
                        std::to_string(characters.size()) + " character pieces + 16 merges)");
  const size_t merge_count = static_cast<size_t>(vocab_size - reserved) - characters.size();

  // Four merges are kept free for the "#" pieces ensured below.
  std::vector<std::string> merges = learn_merges(merge_count - 4);
  std::set<std::string> known(merges.begin(), merges.end());
  known.insert(characters.begin(), characters.end());
  // As in LLaMA: "##" is a piece, "###" is not (it only occurs as "▁###").
  const auto ensure = [&](const std::string& piece) {
    if (known.insert(piece).second) merges.push_back(piece);
  };
  ensure(std::string(kSpaceSymbol) + "#");
  ensure(std::string(kSpaceSymbol) + "##");
  ensure(std::string(kSpaceSymbol) + "###");
  ensure("##");
  if (const auto it = std::find(merges.begin(), merges.end(), "###"); it != merges.end()) {
    merges.erase(it);
    known.erase("###");
  }
  // Word-like fillers: word starts x continuations, walked along anti-diagonals so that the
  // early fillers combine the most frequent pieces of both kinds.
  if (merges.size() < merge_count) {
    std::vector<std::string> starts, continuations;
    for (const auto& piece : merges) {
      if (starts_with_space(piece) && all_letters(piece.substr(kSpaceSymbol.size()))) starts.push_back(piece);
      if (all_letters(piece)) continuations.push_back(piece);
    }
    for (char c = 'a'; c <= 'z'; ++c) continuations.emplace_back(1, c);
    for (size_t diagonal = 0; merges.size() < merge_count && diagonal < starts.size() + continuations.size();
         ++diagonal) {
      for (size_t i = 0; i <= diagonal && merges.size() < merge_count; ++i) {
        const size_t j = diagonal - i;
        if (i >= starts.size() || j >= continuations.size()) continue;
        std::string piece = starts[i] + continuations[j];
        if (utf8_length(piece) > 16 || known.count(piece)) continue;
        known.insert(piece);
        merges.push_back(std::move(piece));
      }
    }
  }
  if (merges.size() > merge_count) merges.resize(merge_count);
  if (merges.size() < merge_count)
    throw ArgumentError("english_bpe_vocabulary: cannot build " + std::to_string(vocab_size) +
                        " distinct pieces");

  std::vector<Piece> pieces;
  pieces.reserve(static_cast<size_t>(vocab_size));
  pieces.push_back({"<unk>", 0.0f, PieceType::kUnknown});
  pieces.push_back({"<s>", 0.0f, PieceType::kControl});
  pieces.push_back({"</s>", 0.0f, PieceType::kControl});
  for (int byte = 0; byte < 256; ++byte) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", byte);
    pieces.push_back({name, 0.0f, PieceType::kByte});
  }
  float score = 0.0f;
  for (auto& piece : merges) pieces.push_back({std::move(piece), score--, PieceType::kNormal});
  for (auto& character : characters) pieces.push_back({std::move(character), score--, PieceType::kNormal});
  return pieces;
}

}  // namespace voken::text
