#include "text/sentencepiece_model.h"

#include <sys/stat.h>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <queue>
#include <sstream>
#include <utility>

#include "voken/error.h"

namespace voken::text {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";      // U+2581, sentencepiece's escaped space
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------------------------
// UTF-8, exactly as sentencepiece's util.cc judges it.

bool is_trail_byte(unsigned char c) { return c >= 0x80 && c <= 0xBF; }
bool is_valid_codepoint(uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); }

// string_util::DecodeUTF8 + IsValidDecodeUTF8: whether a well-formed character starts at
// text[0] (a literal U+FFFD counts as well-formed), and its length (1 when malformed).
bool decode_utf8(std::string_view text, size_t* length) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const size_t available = text.size();
  *length = 1;
  if (available == 0) return false;
  if (byte(0) < 0x80) return true;
  if (available >= 2 && (byte(0) & 0xE0) == 0xC0) {
    const uint32_t cp = ((byte(0) & 0x1Fu) << 6) | (byte(1) & 0x3Fu);
    if (is_trail_byte(byte(1)) && cp >= 0x80 && is_valid_codepoint(cp)) {
      *length = 2;
      return true;
    }
  } else if (available >= 3 && (byte(0) & 0xF0) == 0xE0) {
    const uint32_t cp = ((byte(0) & 0x0Fu) << 12) | ((byte(1) & 0x3Fu) << 6) | (byte(2) & 0x3Fu);
    if (is_trail_byte(byte(1)) && is_trail_byte(byte(2)) && cp >= 0x800 && is_valid_codepoint(cp)) {
      *length = 3;
      return true;
    }
  } else if (available >= 4 && (byte(0) & 0xF8) == 0xF0) {
    const uint32_t cp =
        ((byte(0) & 0x07u) << 18) | ((byte(1) & 0x3Fu) << 12) | ((byte(2) & 0x3Fu) << 6) | (byte(3) & 0x3Fu);
    if (is_trail_byte(byte(1)) && is_trail_byte(byte(2)) && is_trail_byte(byte(3)) && cp >= 0x10000 &&
        is_valid_codepoint(cp)) {
      *length = 4;
      return true;
    }
  }
  return false;
}

// string_util::OneCharLen: the length the lead byte announces, whether or not it is well-formed.
size_t one_char_length(unsigned char lead) {
  static constexpr unsigned char kLengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead >> 4];
}

// Whether bytes that are not (yet) a well-formed character could still become one when more
// bytes follow: a multi-byte lead followed by fewer trail bytes than it needs.
bool could_become_character(std::string_view bytes) {
  const auto lead = static_cast<unsigned char>(bytes[0]);
  size_t needed = 0;
  if ((lead & 0xE0) == 0xC0) {
    needed = 2;
  } else if ((lead & 0xF0) == 0xE0) {
    needed = 3;
  } else if ((lead & 0xF8) == 0xF0) {
    needed = 4;
  } else {
    return false;
  }
  if (bytes.size() >= needed) return false;
  for (size_t i = 1; i < bytes.size(); ++i)
    if (!is_trail_byte(static_cast<unsigned char>(bytes[i]))) return false;
  return true;
}

// "<0x0A>" -> 10 (sentencepiece writes byte pieces with two upper-case hex digits); else -1.
int byte_piece_value(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = piece[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/), bounds-checked.

enum WireType : int { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

const char* wire_type_name(int type) {
  switch (type) {
    case kVarint:
      return "varint";
    case kFixed64:
      return "64-bit";
    case kLengthDelimited:
      return "length-delimited";
    case 3:
    case 4:
      return "group";
    case kFixed32:
      return "32-bit";
    default:
      return "invalid";
  }
}

class WireReader {
 public:
  // `base` is the offset of `data` inside the file, for error messages.
  WireReader(std::string_view data, size_t base, const std::string& source, const char* message)
      : data_(data), base_(base), source_(source), message_(message) {}

  bool done() const { return pos_ >= data_.size(); }
  size_t offset() const { return base_ + pos_; }

  // Reads a field key; returns false at the end of the message.
  bool next_field(uint32_t* field, int* wire_type) {
    if (done()) return false;
    field_offset_ = offset();
    const uint64_t key = varint();
    *field = static_cast<uint32_t>(key >> 3);
    *wire_type = static_cast<int>(key & 7);
    if (*field == 0 || key >> 3 > 0x1FFFFFFF) fail("invalid field number " + std::to_string(key >> 3));
    if (*wire_type != kVarint && *wire_type != kFixed64 && *wire_type != kLengthDelimited &&
        *wire_type != kFixed32)
      fail(std::string("unsupported wire type ") + std::to_string(*wire_type) + " (" +
           wire_type_name(*wire_type) + ") of field " + std::to_string(*field));
    field_ = *field;
    wire_type_ = *wire_type;
    return true;
  }

  uint64_t varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (done()) fail("truncated varint");
      const auto byte = static_cast<unsigned char>(data_[pos_++]);
      if (shift == 63 && byte > 1) fail("varint longer than 64 bits");
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return value;
    }
    fail("varint longer than 10 bytes");
  }

  std::string_view bytes(size_t* start_offset = nullptr) {
    const uint64_t length = varint();
    if (length > data_.size() - pos_)
      fail("length " + std::to_string(length) + " runs past the end of the enclosing message (" +
           std::to_string(data_.size() - pos_) + " bytes left)");
    if (start_offset) *start_offset = offset();
    const std::string_view out = data_.substr(pos_, static_cast<size_t>(length));
    pos_ += static_cast<size_t>(length);
    return out;
  }

  uint32_t fixed32() {
    if (data_.size() - pos_ < 4) fail("truncated 32-bit value");
    uint32_t value = 0;
    for (int i = 3; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(data_[pos_ + i]);
    pos_ += 4;
    return value;
  }

  void skip() {
    switch (wire_type_) {
      case kVarint:
        varint();
        break;
      case kFixed64:
        if (data_.size() - pos_ < 8) fail("truncated 64-bit value");
        pos_ += 8;
        break;
      case kLengthDelimited:
        bytes();
        break;
      case kFixed32:
        fixed32();
        break;
    }
  }

  // The typed readers check that the field's wire type is the one the schema declares.
  int64_t int_value() {
    expect(kVarint);
    return static_cast<int64_t>(varint());
  }
  int32_t int32_value() {
    // proto int32: negative numbers are sign-extended to 64 bits; keep the low 32 as protobuf does.
    return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(int_value())));
  }
  bool bool_value() { return int_value() != 0; }
  float float_value() {
    expect(kFixed32);
    const uint32_t bits = fixed32();
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  std::string string_value() {
    expect(kLengthDelimited);
    return std::string(bytes());
  }
  WireReader message_value(const char* message) {
    expect(kLengthDelimited);
    size_t start = 0;
    const std::string_view body = bytes(&start);
    return WireReader(body, start, source_, message);
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(source_ + ": corrupt sentencepiece model at byte " + std::to_string(offset()) +
                      " (in " + message_ + "): " + what);
  }

 private:
  void expect(int wire_type) const {
    if (wire_type_ != wire_type)
      throw FormatError(source_ + ": corrupt sentencepiece model at byte " + std::to_string(field_offset_) +
                        " (in " + message_ + "): field " + std::to_string(field_) + " has wire type " +
                        wire_type_name(wire_type_) + ", expected " + wire_type_name(wire_type));
  }

  std::string_view data_;
  size_t base_;
  const std::string& source_;
  const char* message_;
  size_t pos_ = 0;
  size_t field_offset_ = 0;
  uint32_t field_ = 0;
  int wire_type_ = 0;
};

void parse_trainer_spec(WireReader reader, SentencePieceSpec& spec) {
  uint32_t field;
  int wire_type;
  while (reader.next_field(&field, &wire_type)) {
    switch (field) {
      case 3:
        spec.model_type = reader.int32_value();
        break;
      case 24:
        spec.treat_whitespace_as_suffix = reader.bool_value();
        break;
      case 25:
        spec.split_digits = reader.bool_value();
        break;
      case 35:
        spec.byte_fallback = reader.bool_value();
        break;
      case 40:
        spec.unk_id = reader.int32_value();
        break;
      case 41:
        spec.bos_id = reader.int32_value();
        break;
      case 42:
        spec.eos_id = reader.int32_value();
        break;
      case 43:
        spec.pad_id = reader.int32_value();
        break;
      case 44:
        spec.unk_surface = reader.string_value();
        break;
      case 45:
        spec.unk_piece = reader.string_value();
        break;
      case 46:
        spec.bos_piece = reader.string_value();
        break;
      case 47:
        spec.eos_piece = reader.string_value();
        break;
      case 48:
        spec.pad_piece = reader.string_value();
        break;
      default:
        reader.skip();
    }
  }
}

// Reads a NormalizerSpec into `spec` (or only checks it, for the denormalizer) and refuses
// precompiled character maps: those are nmt_nfkc-style rules this reader does not implement.
void parse_normalizer_spec(WireReader reader, SentencePieceSpec* spec, const std::string& source,
                           const char* which) {
  uint32_t field;
  int wire_type;
  std::string name;
  while (reader.next_field(&field, &wire_type)) {
    switch (field) {
      case 1:
        name = reader.string_value();
        break;
      case 2: {
        const size_t at = reader.offset();
        if (!reader.string_value().empty())
          throw FormatError(source + ": the sentencepiece model's " + which + " (byte " + std::to_string(at) +
                            ", name '" + name +
                            "') has a precompiled normalization rule, which voken does not implement "
                            "(only the 'identity' normalizer of LLaMA-style BPE models is supported)");
        break;
      }
      case 3:
        if (spec)
          spec->add_dummy_prefix = reader.bool_value();
        else
          reader.skip();
        break;
      case 4:
        if (spec)
          spec->remove_extra_whitespaces = reader.bool_value();
        else
          reader.skip();
        break;
      case 5:
        if (spec)
          spec->escape_whitespaces = reader.bool_value();
        else
          reader.skip();
        break;
      default:
        reader.skip();
    }
  }
  if (spec) spec->normalizer_name = name;
}

const char* model_type_name(int type) {
  switch (type) {
    case 1:
      return "UNIGRAM";
    case 2:
      return "BPE";
    case 3:
      return "WORD";
    case 4:
      return "CHAR";
    default:
      return "unknown";
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------

SentencePieceModel::SentencePieceModel(SentencePieceModel&&) noexcept = default;
SentencePieceModel& SentencePieceModel::operator=(SentencePieceModel&&) noexcept = default;
SentencePieceModel::~SentencePieceModel() = default;

SentencePieceModel SentencePieceModel::load(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw FileNotFoundError(path + ": sentencepiece model not found");
  if (!S_ISREG(st.st_mode))
    throw FormatError(path + ": not a regular file (expected a sentencepiece tokenizer.model)");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot be opened for reading");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (!in.good() && !in.eof()) throw FormatError(path + ": read error");
  return parse(buffer.str(), path);
}

SentencePieceModel SentencePieceModel::parse(std::string_view bytes, const std::string& source) {
  SentencePieceModel model;
  model.source_ = source;
  if (bytes.empty())
    throw FormatError(source + ": empty file, expected a serialized sentencepiece ModelProto");

  WireReader reader(bytes, 0, source, "ModelProto");
  uint32_t field;
  int wire_type;
  while (reader.next_field(&field, &wire_type)) {
    switch (field) {
      case 1: {
        WireReader piece_reader = reader.message_value("ModelProto.pieces");
        const size_t at = piece_reader.offset();
        Piece piece;
        uint32_t piece_field;
        int piece_wire_type;
        while (piece_reader.next_field(&piece_field, &piece_wire_type)) {
          if (piece_field == 1) {
            piece.text = piece_reader.string_value();
          } else if (piece_field == 2) {
            piece.score = piece_reader.float_value();
          } else if (piece_field == 3) {
            const int64_t type = piece_reader.int_value();
            if (type < 1 || type > 6)
              piece_reader.fail("piece type " + std::to_string(type) + " is not one of NORMAL(1) .. BYTE(6)");
            piece.type = static_cast<PieceType>(type);
          } else {
            piece_reader.skip();
          }
        }
        if (piece.text.empty())
          throw FormatError(source + ": corrupt sentencepiece model: piece " +
                            std::to_string(model.pieces_.size()) + " (byte " + std::to_string(at) +
                            ") is empty");
        model.pieces_.push_back(std::move(piece));
        break;
      }
      case 2:
        parse_trainer_spec(reader.message_value("ModelProto.trainer_spec"), model.spec_);
        break;
      case 3:
        parse_normalizer_spec(reader.message_value("ModelProto.normalizer_spec"), &model.spec_, source,
                              "normalizer_spec");
        break;
      case 5:
        parse_normalizer_spec(reader.message_value("ModelProto.denormalizer_spec"), nullptr, source,
                              "denormalizer_spec");
        break;
      default:
        reader.skip();
    }
  }

  if (model.spec_.model_type != 2)
    throw FormatError(source + ": sentencepiece model type is " + model_type_name(model.spec_.model_type) +
                      " (" + std::to_string(model.spec_.model_type) +
                      "); voken implements BPE models (LLaMA) only");
  if (model.pieces_.empty()) throw FormatError(source + ": sentencepiece model has no pieces");
  if (model.pieces_.size() > static_cast<size_t>(INT32_MAX))
    throw FormatError(source + ": sentencepiece model has too many pieces");
  model.index_pieces();
  return model;
}

// ModelInterface::InitializePieces, with its checks.
void SentencePieceModel::index_pieces() {
  byte_value_.assign(pieces_.size(), -1);
  if (spec_.byte_fallback) byte_piece_id_.assign(256, -1);
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const Piece& piece = pieces_[i];
    const int id = static_cast<int>(i);
    const bool normal = piece.type == PieceType::kNormal || piece.type == PieceType::kUserDefined ||
                        piece.type == PieceType::kUnused;
    auto& map = normal ? normal_pieces_ : reserved_pieces_;
    if (!map.emplace(std::string_view(piece.text), id).second)
      throw FormatError(source_ + ": sentencepiece model defines the piece '" + piece.text + "' twice (ids " +
                        std::to_string(map.at(piece.text)) + " and " + std::to_string(id) + ")");
    if (piece.type == PieceType::kUserDefined) user_defined_.push_back(piece.text);
    if (piece.type == PieceType::kUnknown) {
      if (unk_id_ >= 0)
        throw FormatError(source_ + ": sentencepiece model has two unknown pieces (ids " +
                          std::to_string(unk_id_) + " and " + std::to_string(id) + ")");
      unk_id_ = id;
    }
    if (piece.type == PieceType::kByte) {
      if (!spec_.byte_fallback)
        throw FormatError(source_ + ": byte piece '" + piece.text + "' (id " + std::to_string(id) +
                          ") although the model's byte_fallback is false");
      const int value = byte_piece_value(piece.text);
      if (value < 0)
        throw FormatError(source_ + ": byte piece '" + piece.text + "' (id " + std::to_string(id) +
                          ") is not of the form <0xXX>");
      byte_value_[i] = static_cast<int16_t>(value);
      byte_piece_id_[static_cast<size_t>(value)] = id;
    }
  }
  if (unk_id_ < 0) throw FormatError(source_ + ": sentencepiece model has no unknown piece");
  if (spec_.byte_fallback) {
    const auto missing = std::find(byte_piece_id_.begin(), byte_piece_id_.end(), -1);
    if (missing != byte_piece_id_.end())
      throw FormatError(source_ + ": sentencepiece model has byte_fallback but no byte piece for 0x" + [&] {
        char hex[3];
        std::snprintf(hex, sizeof hex, "%02X", static_cast<int>(missing - byte_piece_id_.begin()));
        return std::string(hex);
      }());
  }
  // Longest first, so that prefix_match() finds the longest user-defined piece.
  std::sort(user_defined_.begin(), user_defined_.end(),
            [](std::string_view a, std::string_view b) { return a.size() > b.size(); });
}

int SentencePieceModel::find_piece(std::string_view piece) const {
  if (const auto it = reserved_pieces_.find(piece); it != reserved_pieces_.end()) return it->second;
  if (const auto it = normal_pieces_.find(piece); it != normal_pieces_.end()) return it->second;
  return -1;
}

int SentencePieceModel::piece_to_id(std::string_view piece) const {
  const int id = find_piece(piece);
  return id >= 0 ? id : unk_id_;
}

namespace {
int control_id(const SentencePieceModel& model, const std::string& piece) {
  const int id = model.find_piece(piece);
  return id >= 0 && model.piece(id).type == PieceType::kControl ? id : -1;
}
}  // namespace

int SentencePieceModel::bos_id() const { return control_id(*this, spec_.bos_piece); }
int SentencePieceModel::eos_id() const { return control_id(*this, spec_.eos_piece); }
int SentencePieceModel::pad_id() const { return control_id(*this, spec_.pad_piece); }

size_t SentencePieceModel::prefix_match(std::string_view text, bool* user_defined) const {
  for (const std::string_view piece : user_defined_) {
    if (text.substr(0, piece.size()) == piece) {
      *user_defined = true;
      return piece.size();
    }
  }
  *user_defined = false;
  return std::min(text.size(), one_char_length(static_cast<unsigned char>(text[0])));
}

// normalizer::Normalizer::Normalize without a precompiled character map (parse() refuses those):
// characters are kept (malformed UTF-8 bytes become U+FFFD one by one), spaces escaped to U+2581,
// the dummy prefix added and extra whitespace removed as the spec says.
std::string SentencePieceModel::normalize(std::string_view input) const {
  std::string normalized;
  // NormalizePrefix: one user-defined piece or one character, and how many input bytes it used.
  const auto next_unit = [&](std::string_view text) -> std::pair<std::string_view, size_t> {
    bool user_defined = false;
    const size_t matched = prefix_match(text, &user_defined);
    if (user_defined) return {text.substr(0, matched), matched};
    size_t length = 0;
    if (!decode_utf8(text, &length)) return {kReplacementChar, 1};
    return {text.substr(0, length), length};
  };
  const std::string_view space = spec_.escape_whitespaces ? kSpaceSymbol : std::string_view(" ");

  if (spec_.remove_extra_whitespaces) {
    while (!input.empty()) {
      const auto unit = next_unit(input);
      if (unit.first != " ") break;
      input.remove_prefix(unit.second);
    }
  }
  if (input.empty()) return normalized;
  normalized.reserve(input.size() * 3);

  if (!spec_.treat_whitespace_as_suffix && spec_.add_dummy_prefix) normalized.append(space);
  bool is_prev_space = spec_.remove_extra_whitespaces;
  while (!input.empty()) {
    const auto unit = next_unit(input);
    std::string_view piece = unit.first;
    while (is_prev_space && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    if (!piece.empty()) {
      for (const char c : piece) {
        if (spec_.escape_whitespaces && c == ' ') {
          normalized.append(kSpaceSymbol);
        } else {
          normalized.push_back(c);
        }
      }
      is_prev_space = piece.back() == ' ';
    }
    input.remove_prefix(unit.second);
    if (!spec_.remove_extra_whitespaces) is_prev_space = false;
  }
  if (spec_.remove_extra_whitespaces) {
    while (normalized.size() >= space.size() &&
           std::string_view(normalized).substr(normalized.size() - space.size()) == space)
      normalized.resize(normalized.size() - space.size());
  }
  if (spec_.treat_whitespace_as_suffix && spec_.add_dummy_prefix) normalized.append(space);
  return normalized;
}

// bpe::Model::Encode (SampleEncode without dropout) followed by the byte fallback and unknown
// merging of SentencePieceProcessor::PopulateSentencePieceText.
std::vector<int> SentencePieceModel::encode(std::string_view text) const {
  const std::string normalized = normalize(text);
  std::vector<int> ids;
  if (normalized.empty()) return ids;

  struct Symbol {
    int prev;
    int next;
    bool frozen;  // a user-defined piece: never merged
    std::string_view piece;
  };
  struct SymbolPair {
    int left;
    int right;
    float score;
    size_t size;
  };
  // Highest score first; on equal scores the leftmost pair.
  const auto lower_priority = [](const SymbolPair& a, const SymbolPair& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<SymbolPair, std::vector<SymbolPair>, decltype(lower_priority)> agenda(lower_priority);
  std::vector<Symbol> symbols;
  // Merged UNUSED pieces are split back into the two symbols they were made of.
  std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> reverse_merges;

  std::string_view rest = normalized;
  for (int index = 0; !rest.empty(); ++index) {
    bool frozen = false;
    const size_t length = prefix_match(rest, &frozen);
    symbols.push_back({index - 1, rest.size() == length ? -1 : index + 1, frozen, rest.substr(0, length)});
    rest.remove_prefix(length);
  }

  const auto maybe_add_pair = [&](int left, int right) {
    if (left == -1 || right == -1 || symbols[left].frozen || symbols[right].frozen) return;
    const std::string_view merged(symbols[left].piece.data(),
                                  symbols[left].piece.size() + symbols[right].piece.size());
    const auto it = normal_pieces_.find(merged);
    if (it == normal_pieces_.end()) return;
    agenda.push({left, right, pieces_[static_cast<size_t>(it->second)].score, merged.size()});
    if (pieces_[static_cast<size_t>(it->second)].type == PieceType::kUnused)
      reverse_merges[merged] = {symbols[left].piece, symbols[right].piece};
  };
  for (size_t i = 1; i < symbols.size(); ++i) maybe_add_pair(static_cast<int>(i) - 1, static_cast<int>(i));

  while (!agenda.empty()) {
    const SymbolPair top = agenda.top();
    agenda.pop();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    // Stale: one side was merged away or grew since this pair was queued.
    if (left.piece.empty() || right.piece.empty() || left.piece.size() + right.piece.size() != top.size)
      continue;
    left.piece = std::string_view(left.piece.data(), top.size);
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    right.piece = std::string_view();
    maybe_add_pair(left.prev, top.left);
    maybe_add_pair(top.left, left.next);
  }

  bool previous_unknown = false;
  const std::function<void(std::string_view)> emit = [&](std::string_view piece) {
    const int id = piece_to_id(piece);
    if (pieces_[static_cast<size_t>(id)].type == PieceType::kUnused) {
      if (const auto it = reverse_merges.find(piece); it != reverse_merges.end()) {
        emit(it->second.first);
        emit(it->second.second);
        return;
      }
    }
    const bool unknown = pieces_[static_cast<size_t>(id)].type == PieceType::kUnknown;
    if (unknown && spec_.byte_fallback) {
      for (const char byte : piece) ids.push_back(byte_piece_id_[static_cast<unsigned char>(byte)]);
    } else if (!(unknown && previous_unknown)) {
      // A run of unknown pieces becomes one unknown id.
      ids.push_back(id);
    }
    previous_unknown = unknown;
  };
  for (int index = 0; index != -1; index = symbols[index].next) emit(symbols[index].piece);
  return ids;
}

// ---------------------------------------------------------------------------------------------

void SentencePieceDecoder::drain_bytes(bool final, std::string& out) {
  size_t offset = 0;
  while (offset < pending_bytes_.size()) {
    const std::string_view rest = std::string_view(pending_bytes_).substr(offset);
    size_t length = 0;
    if (decode_utf8(rest, &length)) {
      out.append(rest.substr(0, length));
    } else if (!final && could_become_character(rest)) {
      break;
    } else {
      out.append(kReplacementChar);
    }
    text_seen_ = true;
    offset += length;
  }
  pending_bytes_.erase(0, offset);
}

void SentencePieceDecoder::push(int id, std::string& out) {
  const int byte = model_->byte_of(id);
  if (byte >= 0) {
    pending_bytes_.push_back(static_cast<char>(byte));
    drain_bytes(false, out);
    return;
  }
  drain_bytes(true, out);
  if (bos_ws_seen_ || text_seen_) is_bos_ws_ = false;

  const Piece& piece = model_->piece(id);
  const SentencePieceSpec& spec = model_->spec();
  bos_ws_seen_ = false;
  if (piece.type == PieceType::kControl) return;  // <s>, </s>: invisible
  if (piece.type == PieceType::kUnknown) {
    out.append(spec.unk_surface);
    text_seen_ = text_seen_ || !spec.unk_surface.empty();
    return;
  }
  std::string_view text = piece.text;
  if (is_bos_ws_ && (spec.add_dummy_prefix || spec.remove_extra_whitespaces)) {
    if (text.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
      text.remove_prefix(kSpaceSymbol.size());
      // With remove_extra_whitespaces every leading space goes, not only the first.
      bos_ws_seen_ = !spec.remove_extra_whitespaces;
    }
  }
  const size_t before = out.size();
  for (size_t i = 0; i < text.size();) {
    if (text.substr(i, kSpaceSymbol.size()) == kSpaceSymbol) {
      out.push_back(' ');
      i += kSpaceSymbol.size();
    } else {
      out.push_back(text[i++]);
    }
  }
  if (out.size() > before) text_seen_ = true;
}

void SentencePieceDecoder::finish(std::string& out) { drain_bytes(true, out); }

}  // namespace voken::text
