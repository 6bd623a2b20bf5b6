// The LLaMA/Vicuna tokenizer as MiniGPT-5 uses it: transformers 4.31's slow
// `LlamaTokenizer(legacy=True)` over a sentencepiece BPE `tokenizer.model`, plus added tokens
// (MiniGPT-5's `[IMG0]`..`[IMG7]`, `<ImageHere>`). Sentencepiece itself is reimplemented in
// sentencepiece_model.h (no libsentencepiece, see README "Design decisions").
//
// Encoding (4.31 `PreTrainedTokenizer.tokenize`): the text is split on the added and special
// tokens (leftmost, longest first); the text chunk on each side of a token loses its adjacent
// whitespace (Python `str.strip` whitespace) where the token says so — tokens added as plain
// strings, like MiniGPT-5's, strip both sides, `<s>`/`</s>`/`<unk>` strip nothing; empty chunks
// are dropped and each remaining chunk is encoded by sentencepiece on its own (so each gets its
// own dummy-prefix space).
//
// Decoding (4.31 `_decode`): runs of vocabulary ids are decoded by sentencepiece (with the
// `convert_tokens_to_string` rule for `<s>`/`</s>`/`<unk>` inside a run), added tokens are
// emitted verbatim, and the parts are joined with one space.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace voken::text {

class SentencePieceModel;

// A token outside the sentencepiece vocabulary, always matched as a whole in text.
struct AddedToken {
  std::string content;
  int64_t id = -1;
  // An additional special token: decode(skip_special_tokens=true) drops it.
  bool special = true;
  // Whether the whitespace on the token's left / right is stripped from the neighbouring text
  // (HF AddedToken.lstrip / rstrip). Tokens added as plain strings strip both sides.
  bool lstrip = true;
  bool rstrip = true;
};

// MiniGPT-5's tokens as `add_special_tokens` gives them on top of LLaMA's 32000 pieces:
// [IMG0]..[IMG7] = 32000..32007, <ImageHere> = 32008.
std::vector<AddedToken> minigpt5_added_tokens();

class Tokenizer {
 public:
  // A sentencepiece model file plus added tokens, whose ids must continue the vocabulary
  // (sentencepiece size, +1, ...). BOS/EOS/UNK are the model's pieces (`<s>`, `</s>`, `<unk>`).
  // FileNotFoundError / FormatError for the model file, ArgumentError for bad added tokens.
  static Tokenizer from_file(const std::string& tokenizer_model,
                             std::vector<AddedToken> added = minigpt5_added_tokens());

  // An HF tokenizer directory: `tokenizer.model`, plus `added_tokens.json` (else the
  // `added_tokens_decoder` of `tokenizer_config.json`), the special tokens of
  // `tokenizer_config.json` overridden by `special_tokens_map.json`, and `add_bos_token`,
  // `add_eos_token`, `clean_up_tokenization_spaces` — as 4.31's `from_pretrained` reads them.
  // With `add_minigpt5_tokens`, MiniGPT-5's tokens are then added the way its model code does
  // (`add_special_tokens({"additional_special_tokens": ...})`): those already present keep
  // their ids, the others are appended; without any added-token file this gives the preset.
  // ConfigError naming the file and field for inconsistent files.
  static Tokenizer from_directory(const std::string& dir, bool add_minigpt5_tokens = true);

  // Text -> ids. add_bos / add_eos put the BOS / EOS id around the result (what
  // `build_inputs_with_special_tokens` does when add_bos_token / add_eos_token are set).
  std::vector<int64_t> encode(const std::string& text, bool add_bos = false, bool add_eos = false) const;
  // Ids -> text; skip_special_tokens drops BOS/EOS/UNK/PAD and the additional special tokens.
  // ArgumentError naming the id for ids outside [0, vocab_size()).
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = false) const;

  // Plain sentencepiece (`SentencePieceProcessor.encode(text)` / `.decode(ids)`): no added
  // tokens, control pieces decode to nothing, the unknown piece to " ⁇ ". decode takes ids below
  // sentencepiece_size().
  std::vector<int64_t> sentencepiece_encode(const std::string& text) const;
  std::string sentencepiece_decode(const std::vector<int64_t>& ids) const;

  // len(tokenizer): the sentencepiece pieces plus the added tokens.
  int64_t vocab_size() const;
  int64_t sentencepiece_size() const;
  // -1 when the tokenizer has no such token.
  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t unk_id() const;
  int64_t pad_id() const;
  // What the directory's tokenizer_config.json asks for (LlamaTokenizer defaults: true, false).
  bool add_bos_token() const;
  bool add_eos_token() const;

  // The id of an added token's content or of a sentencepiece piece (e.g. "▁Hello", "<0x0A>").
  std::optional<int64_t> token_id(const std::string& piece_or_added) const;
  // The piece of an id, or an added token's content (HF convert_ids_to_tokens).
  std::string piece(int64_t id) const;
  bool is_special(int64_t id) const;
  bool is_added(int64_t id) const;
  const std::vector<AddedToken>& added_tokens() const;
  const SentencePieceModel& sentencepiece() const;

  struct State;  // shared, immutable

 private:
  explicit Tokenizer(std::shared_ptr<const State> state) : state_(std::move(state)) {}
  std::shared_ptr<const State> state_;
  friend class StreamingDecoder;
};

// Detokenizes ids as they are generated. The concatenation of everything push() and finish()
// return equals Tokenizer::decode(ids, skip_special_tokens) of the ids pushed so far, and no
// returned piece ends inside a UTF-8 character: bytes of a character split over byte-fallback
// pieces are held back until the character is complete (or known to be malformed, then U+FFFD
// like sentencepiece). Two exceptions, both in text decode() produces retroactively: with
// skip_special_tokens=false, 4.31 puts a space *before* the text preceding a `<s>`/`</s>`/
// `<unk>` in the middle of a run (" Hello</s>"); text already returned cannot move, so that
// space comes where the token arrives ("Hello </s>"). And clean_up_tokenization_spaces (off for
// LLaMA) is not applied. The decoder keeps the tokenizer's state alive.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  StreamingDecoder(StreamingDecoder&&) noexcept;
  StreamingDecoder& operator=(StreamingDecoder&&) noexcept;
  ~StreamingDecoder();

  // Text that became final with this id (often empty). ArgumentError for ids out of range.
  std::string push(int64_t id);
  // The rest (held-back bytes of an unfinished character, as U+FFFD); the decoder then starts
  // a new sequence.
  std::string finish();

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace voken::text
