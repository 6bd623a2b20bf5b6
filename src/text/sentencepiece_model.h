// A sentencepiece `tokenizer.model` read without libsentencepiece (whose bundled protobuf-lite
// clashes with libtorch's, see README "Design decisions"): a bounds-checked reader of the
// protobuf wire format for the few ModelProto fields a BPE model needs, plus sentencepiece's BPE
// encoding and id decoding, reproduced from sentencepiece v0.1.97 (bpe_model.cc, normalizer.cc,
// model_interface.cc, sentencepiece_processor.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace voken::text {

// ModelProto.SentencePiece.Type, with the protobuf's numbering.
enum class PieceType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

struct Piece {
  std::string text;
  float score = 0.0f;
  PieceType type = PieceType::kNormal;
};

// The fields of ModelProto that encoding and decoding depend on, with the proto's defaults.
struct SentencePieceSpec {
  // TrainerSpec
  int model_type = 1;  // 1 UNIGRAM (the proto default), 2 BPE, 3 WORD, 4 CHAR
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  bool split_digits = false;
  int unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  std::string unk_piece = "<unk>", bos_piece = "<s>", eos_piece = "</s>", pad_piece = "<pad>";
  std::string unk_surface = " \xE2\x81\x87 ";  // " ⁇ "
  // NormalizerSpec
  std::string normalizer_name;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

class SentencePieceModel {
 public:
  // Parses a serialized ModelProto. `source` names it in errors (a path). FormatError on
  // truncated or corrupt bytes (with the byte offset), on models sentencepiece itself would
  // refuse (duplicate or empty pieces, no unknown piece, incomplete byte pieces), and on what
  // this reader does not implement (non-BPE models, precompiled normalization rules).
  static SentencePieceModel parse(std::string_view bytes, const std::string& source);
  // Reads and parses a file: FileNotFoundError when absent.
  static SentencePieceModel load(const std::string& path);

  SentencePieceModel(const SentencePieceModel&) = delete;
  SentencePieceModel& operator=(const SentencePieceModel&) = delete;
  SentencePieceModel(SentencePieceModel&&) noexcept;
  SentencePieceModel& operator=(SentencePieceModel&&) noexcept;
  ~SentencePieceModel();

  const std::string& source() const { return source_; }
  const SentencePieceSpec& spec() const { return spec_; }
  int size() const { return static_cast<int>(pieces_.size()); }
  const Piece& piece(int id) const { return pieces_[static_cast<size_t>(id)]; }
  // sentencepiece's PieceToId: control/unknown/byte pieces first, then normal ones, else unk.
  int piece_to_id(std::string_view piece) const;
  // -1 when the piece is absent (no unk fallback).
  int find_piece(std::string_view piece) const;
  int unk_id() const { return unk_id_; }
  // Ids of the trainer spec's bos/eos/pad pieces when they are control pieces, else -1
  // (SentencePieceProcessor::bos_id() and friends).
  int bos_id() const;
  int eos_id() const;
  int pad_id() const;
  // The byte a `<0xXX>` byte piece stands for, -1 for other ids.
  int byte_of(int id) const { return byte_value_[static_cast<size_t>(id)]; }

  // SentencePieceProcessor::Encode(text) as ids (no BOS/EOS).
  std::vector<int> encode(std::string_view text) const;
  // The normalized text the BPE model segments (spaces escaped, dummy prefix added).
  std::string normalize(std::string_view text) const;

 private:
  SentencePieceModel() = default;
  void index_pieces();
  // Length of the symbol starting at `text`: the longest user-defined piece, else one UTF-8
  // character (sentencepiece's PrefixMatcher). `user_defined` tells which.
  size_t prefix_match(std::string_view text, bool* user_defined) const;

  std::string source_;
  SentencePieceSpec spec_;
  std::vector<Piece> pieces_;
  std::vector<int16_t> byte_value_;
  std::vector<int> byte_piece_id_;  // 256 entries when byte_fallback, else empty
  // Views into pieces_[i].text; pieces_ never changes after parse().
  std::unordered_map<std::string_view, int> normal_pieces_;    // NORMAL, USER_DEFINED, UNUSED
  std::unordered_map<std::string_view, int> reserved_pieces_;  // CONTROL, UNKNOWN, BYTE
  std::vector<std::string_view> user_defined_;                 // longest first
  int unk_id_ = -1;
};

// Incremental sentencepiece id decoding (SentencePieceProcessor::Decode) of one sequence: text
// comes out as soon as it is final, and never as half a UTF-8 character. Byte pieces gather into
// a byte string that is decoded one character at a time, invalid bytes becoming U+FFFD each; the
// dummy-prefix space of the first piece is dropped; control pieces decode to nothing.
class SentencePieceDecoder {
 public:
  explicit SentencePieceDecoder(const SentencePieceModel& model) : model_(&model) {}
  // Appends to `out` whatever text became final with this id (ids must be in range).
  void push(int id, std::string& out);
  // Ends the sequence: pending bytes become characters or U+FFFD.
  void finish(std::string& out);

 private:
  // Emits the complete characters at the front of pending_bytes_; with `final`, the rest too.
  void drain_bytes(bool final, std::string& out);

  const SentencePieceModel* model_;
  std::string pending_bytes_;
  bool is_bos_ws_ = true;  // the next piece may still lose its leading U+2581
  bool bos_ws_seen_ = false;
  bool text_seen_ = false;
};

}  // namespace voken::text
