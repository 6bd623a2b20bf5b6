#include "text/tokenizer.h"

#include <algorithm>
#include <array>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "io/json_file.h"
#include "io/paths.h"
#include "text/sentencepiece_model.h"
#include "voken/error.h"

namespace voken::text {

// A string matched as a whole in text before sentencepiece sees it: an added token, or a special
// token of the vocabulary (`<s>`...). lstrip/rstrip: whitespace on its left/right is stripped.
struct TokenRule {
  std::string content;
  int64_t id;
  bool lstrip;
  bool rstrip;
};

struct Tokenizer::State {
  explicit State(SentencePieceModel model) : sp(std::move(model)) {}
  SentencePieceModel sp;
  std::vector<AddedToken> added;  // ids sp.size(), sp.size() + 1, ...
  std::unordered_map<std::string, int64_t> added_ids;
  std::vector<TokenRule> rules;  // longest content first
  std::unordered_set<int64_t> special_ids;
  // Special tokens inside the sentencepiece vocabulary: emitted verbatim by decode().
  std::unordered_set<int64_t> vocab_special_ids;
  int64_t bos = -1, eos = -1, unk = -1, pad = -1;
  bool add_bos = true, add_eos = false, clean_up_spaces = false;

  int64_t base() const { return sp.size(); }
  int64_t size() const { return base() + static_cast<int64_t>(added.size()); }
  const std::string& content(int64_t id) const {
    return id >= base() ? added[static_cast<size_t>(id - base())].content
                        : sp.piece(static_cast<int>(id)).text;
  }
  void check_id(int64_t id) const {
    if (id < 0 || id >= size())
      throw ArgumentError("token id " + std::to_string(id) + " is out of range: the vocabulary has " +
                          std::to_string(size()) + " ids (" + std::to_string(base()) +
                          " sentencepiece pieces + " + std::to_string(added.size()) + " added tokens)");
  }
};

namespace {

constexpr const char* kMiniGpt5Tokens[] = {"[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]",     "[IMG4]",
                                           "[IMG5]", "[IMG6]", "[IMG7]", "<ImageHere>"};

// ---------------------------------------------------------------------------------------------
// Python's str.isspace() over UTF-8 (what str.strip() removes).

bool is_python_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// The code point of the well-formed UTF-8 character at text[0] and its length; false when
// malformed (such bytes never count as whitespace).
bool utf8_char(std::string_view text, uint32_t* cp, size_t* length) {
  const auto b = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const auto trail = [&](size_t i) { return i < text.size() && (b(i) & 0xC0) == 0x80; };
  if (text.empty()) return false;
  if (b(0) < 0x80) {
    *cp = b(0);
    *length = 1;
    return true;
  }
  if ((b(0) & 0xE0) == 0xC0 && trail(1)) {
    *cp = ((b(0) & 0x1Fu) << 6) | (b(1) & 0x3Fu);
    *length = 2;
    return *cp >= 0x80;
  }
  if ((b(0) & 0xF0) == 0xE0 && trail(1) && trail(2)) {
    *cp = ((b(0) & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
    *length = 3;
    return *cp >= 0x800 && (*cp < 0xD800 || *cp > 0xDFFF);
  }
  if ((b(0) & 0xF8) == 0xF0 && trail(1) && trail(2) && trail(3)) {
    *cp = ((b(0) & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu);
    *length = 4;
    return *cp >= 0x10000 && *cp <= 0x10FFFF;
  }
  return false;
}

std::string_view lstrip_python(std::string_view text) {
  uint32_t cp;
  size_t length;
  while (utf8_char(text, &cp, &length) && is_python_space(cp)) text.remove_prefix(length);
  return text;
}

std::string_view rstrip_python(std::string_view text) {
  while (!text.empty()) {
    // Step back to the start of the last character (at most 3 continuation bytes).
    size_t start = text.size() - 1;
    while (start > 0 && text.size() - start < 4 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80)
      --start;
    uint32_t cp;
    size_t length;
    if (!utf8_char(text.substr(start), &cp, &length) || start + length != text.size() || !is_python_space(cp))
      break;
    text.remove_suffix(length);
  }
  return text;
}

// transformers' clean_up_tokenization (only when the config asks for it; LLaMA's does not).
std::string clean_up_tokenization(std::string text) {
  static const std::pair<std::string_view, std::string_view> kRules[] = {
      {" .", "."},     {" ?", "?"},   {" !", "!"},   {" ,", ","},     {" ' ", "'"},
      {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& [from, to] : kRules) {
    std::string out;
    size_t pos = 0;
    for (size_t hit; (hit = text.find(from, pos)) != std::string::npos; pos = hit + from.size())
      out.append(text, pos, hit - pos).append(to);
    out.append(text, pos, std::string::npos);
    text = std::move(out);
  }
  return text;
}

// ---------------------------------------------------------------------------------------------
// Assembling the state.

// A special token as a config gives it: its string and how it strips its neighbours.
struct SpecialSpec {
  std::string content;
  bool lstrip = false;
  bool rstrip = false;
};

using Thrower = std::function<void(const std::string&)>;

// Validates the added tokens (ids continuing the vocabulary) and indexes everything.
std::shared_ptr<Tokenizer::State> assemble(SentencePieceModel model, std::vector<AddedToken> added,
                                           const std::array<std::optional<SpecialSpec>, 4>& roles,
                                           const std::vector<SpecialSpec>& vocab_specials,
                                           const Thrower& fail) {
  auto state = std::make_shared<Tokenizer::State>(std::move(model));
  const SentencePieceModel& sp = state->sp;
  std::stable_sort(added.begin(), added.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& token = added[i];
    const int64_t expected = sp.size() + static_cast<int64_t>(i);
    if (token.content.empty()) fail("added token with id " + std::to_string(token.id) + " has empty content");
    if (token.id != expected)
      fail("added token '" + token.content + "' has id " + std::to_string(token.id) + ", expected " +
           std::to_string(expected) + " (added-token ids must continue the " + std::to_string(sp.size()) +
           " sentencepiece pieces without gaps or repeats)");
    if (sp.find_piece(token.content) >= 0)
      fail("added token '" + token.content + "' (id " + std::to_string(token.id) +
           ") is already the sentencepiece piece " + std::to_string(sp.find_piece(token.content)));
    if (!state->added_ids.emplace(token.content, token.id).second)
      fail("added token '" + token.content + "' appears twice (ids " +
           std::to_string(state->added_ids.at(token.content)) + " and " + std::to_string(token.id) + ")");
    state->rules.push_back({token.content, token.id, token.lstrip, token.rstrip});
    if (token.special) state->special_ids.insert(token.id);
  }
  state->added = std::move(added);

  const auto lookup = [&](const std::string& content) -> int64_t {
    if (const auto it = state->added_ids.find(content); it != state->added_ids.end()) return it->second;
    return sp.find_piece(content);
  };
  const auto add_vocab_special = [&](const SpecialSpec& spec, int64_t id) {
    if (id < 0 || id >= sp.size()) return;
    state->special_ids.insert(id);
    state->vocab_special_ids.insert(id);
    state->rules.push_back({spec.content, id, spec.lstrip, spec.rstrip});
  };
  int64_t* const role_ids[4] = {&state->bos, &state->eos, &state->unk, &state->pad};
  for (size_t r = 0; r < roles.size(); ++r) {
    if (!roles[r]) continue;
    *role_ids[r] = lookup(roles[r]->content);
    add_vocab_special(*roles[r], *role_ids[r]);
    if (*role_ids[r] >= sp.size()) state->special_ids.insert(*role_ids[r]);
  }
  for (const SpecialSpec& spec : vocab_specials) add_vocab_special(spec, sp.find_piece(spec.content));

  // One rule per string (the first wins, as a set would), longest first for leftmost-longest.
  std::unordered_set<std::string> seen;
  std::vector<TokenRule> unique_rules;
  for (auto& rule : state->rules)
    if (seen.insert(rule.content).second) unique_rules.push_back(std::move(rule));
  std::stable_sort(unique_rules.begin(), unique_rules.end(), [](const TokenRule& a, const TokenRule& b) {
    return a.content.size() > b.content.size();
  });
  state->rules = std::move(unique_rules);
  return state;
}

// ---------------------------------------------------------------------------------------------
// HF tokenizer files.

// A special token value: a string or an AddedToken object ({"content", "lstrip", "rstrip", ...}).
// Empty strings (as some early LLaMA conversions wrote) count as absent.
std::optional<SpecialSpec> parse_special(const io::Json& value, const std::string& source,
                                         const std::string& field, bool plain_strips) {
  if (value.is_null()) return std::nullopt;
  if (value.is_string()) {
    const std::string content = value.get<std::string>();
    if (content.empty()) return std::nullopt;
    return SpecialSpec{content, plain_strips, plain_strips};
  }
  if (value.is_object()) {
    const io::JsonView view(value, source + " (" + field + ")");
    SpecialSpec spec{view.get<std::string>("content"), view.get_or<bool>("lstrip", false),
                     view.get_or<bool>("rstrip", false)};
    if (spec.content.empty()) return std::nullopt;
    return spec;
  }
  throw ConfigError(source + ": field '" + field + "' must be a string or an AddedToken object, found " +
                    value.dump());
}

std::vector<SpecialSpec> parse_special_list(const io::Json& value, const std::string& source,
                                            bool plain_strips) {
  if (!value.is_array())
    throw ConfigError(source + ": field 'additional_special_tokens' must be a list, found " + value.dump());
  std::vector<SpecialSpec> out;
  for (size_t i = 0; i < value.size(); ++i)
    if (auto spec = parse_special(value[i], source, "additional_special_tokens[" + std::to_string(i) + "]",
                                  plain_strips))
      out.push_back(std::move(*spec));
  return out;
}

// `{"content": id}` (added_tokens.json) -> (content, id) pairs.
std::vector<std::pair<std::string, int64_t>> read_added_tokens_json(const std::string& path) {
  const io::Json json = io::read_json_file(path);
  if (!json.is_object()) throw ConfigError(path + ": expected an object {token: id}, found " + json.dump());
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& [content, id] : json.items()) {
    if (!id.is_number_integer())
      throw ConfigError(path + ": the id of added token '" + content + "' is not an integer: " + id.dump());
    out.emplace_back(content, id.get<int64_t>());
  }
  return out;
}

// tokenizer_config.json's `added_tokens_decoder` (transformers >= 4.34): {"32000": {...}}.
std::vector<std::pair<std::string, int64_t>> read_added_tokens_decoder(const io::Json& decoder,
                                                                       const std::string& source,
                                                                       int64_t vocabulary) {
  if (!decoder.is_object())
    throw ConfigError(source + ": field 'added_tokens_decoder' must be an object, found " + decoder.dump());
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& [key, value] : decoder.items()) {
    int64_t id = -1;
    size_t used = 0;
    try {
      id = std::stoll(key, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != key.size() || key.empty())
      throw ConfigError(source + ": added_tokens_decoder key '" + key + "' is not a token id");
    const auto spec = parse_special(value, source, "added_tokens_decoder." + key, false);
    if (!spec) throw ConfigError(source + ": added_tokens_decoder." + key + " has no content");
    if (id >= vocabulary) out.emplace_back(spec->content, id);  // lower ids are pieces (<unk>, <s>...)
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<AddedToken> minigpt5_added_tokens() {
  std::vector<AddedToken> tokens;
  int64_t id = 32000;
  for (const char* content : kMiniGpt5Tokens) tokens.push_back({content, id++, true, true, true});
  return tokens;
}

Tokenizer Tokenizer::from_file(const std::string& tokenizer_model, std::vector<AddedToken> added) {
  SentencePieceModel model = SentencePieceModel::load(tokenizer_model);
  // LlamaTokenizer's defaults: the model's own pieces, as AddedToken(lstrip=False, rstrip=False).
  std::array<std::optional<SpecialSpec>, 4> roles;
  const SentencePieceSpec& spec = model.spec();
  const std::string* pieces[4] = {&spec.bos_piece, &spec.eos_piece, &spec.unk_piece, nullptr};
  for (size_t r = 0; r < 3; ++r)
    if (model.find_piece(*pieces[r]) >= 0) roles[r] = SpecialSpec{*pieces[r], false, false};
  const Thrower fail = [&](const std::string& what) { throw ArgumentError(tokenizer_model + ": " + what); };
  return Tokenizer(assemble(std::move(model), std::move(added), roles, {}, fail));
}

Tokenizer Tokenizer::from_directory(const std::string& dir, bool add_minigpt5_tokens) {
  const std::string model_path = dir + "/tokenizer.model";
  SentencePieceModel model = SentencePieceModel::load(model_path);
  const int64_t vocabulary = model.size();

  // Special tokens: LlamaTokenizer's defaults, then tokenizer_config.json (init kwargs: strings
  // become AddedToken(lstrip=False, rstrip=False)), then special_tokens_map.json (set as given:
  // plain strings strip both sides), as 4.31's from_pretrained applies them.
  std::array<std::optional<SpecialSpec>, 4> roles = {SpecialSpec{"<s>"}, SpecialSpec{"</s>"},
                                                     SpecialSpec{"<unk>"}, std::nullopt};
  static const char* const kRoleNames[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};
  std::vector<SpecialSpec> additional;
  std::vector<std::pair<std::string, int64_t>> file_tokens;
  bool add_bos = true, add_eos = false, clean_up = false;

  const std::string config_path = dir + "/tokenizer_config.json";
  std::optional<io::Json> config;
  if (io::is_regular_file(config_path)) {
    config = io::read_json_file(config_path);
    if (!config->is_object()) throw ConfigError(config_path + ": expected a JSON object");
    const io::JsonView view(*config, config_path);
    for (size_t r = 0; r < 4; ++r)
      if (config->contains(kRoleNames[r]))
        if (auto spec = parse_special(config->at(kRoleNames[r]), config_path, kRoleNames[r], false))
          roles[r] = std::move(spec);
    if (view.has("additional_special_tokens"))
      additional = parse_special_list(config->at("additional_special_tokens"), config_path, true);
    add_bos = view.get_or<bool>("add_bos_token", true);
    add_eos = view.get_or<bool>("add_eos_token", false);
    clean_up = view.get_or<bool>("clean_up_tokenization_spaces", false);
  }
  const std::string map_path = dir + "/special_tokens_map.json";
  if (io::is_regular_file(map_path)) {
    const io::Json map = io::read_json_file(map_path);
    if (!map.is_object()) throw ConfigError(map_path + ": expected a JSON object");
    for (size_t r = 0; r < 4; ++r)
      if (map.contains(kRoleNames[r]))
        if (auto spec = parse_special(map.at(kRoleNames[r]), map_path, kRoleNames[r], true))
          roles[r] = std::move(spec);
    if (map.contains("additional_special_tokens") && !map.at("additional_special_tokens").is_null())
      additional = parse_special_list(map.at("additional_special_tokens"), map_path, true);
  }
  std::string added_source = dir + "/added_tokens.json";
  if (io::is_regular_file(added_source)) {
    file_tokens = read_added_tokens_json(added_source);
  } else if (config && config->contains("added_tokens_decoder")) {
    added_source = config_path + " (added_tokens_decoder)";
    file_tokens = read_added_tokens_decoder(config->at("added_tokens_decoder"), config_path, vocabulary);
  }
  std::stable_sort(file_tokens.begin(), file_tokens.end(),
                   [](const auto& a, const auto& b) { return a.second < b.second; });

  // Token strings in id order: the file's, then special tokens missing from the vocabulary
  // (4.31's sanitize_special_tokens), then MiniGPT-5's.
  std::vector<std::pair<std::string, int64_t>> tokens = file_tokens;
  const auto known = [&](const std::string& content) {
    if (model.find_piece(content) >= 0) return true;
    return std::any_of(tokens.begin(), tokens.end(), [&](const auto& t) { return t.first == content; });
  };
  const auto append = [&](const std::string& content) {
    if (!known(content)) tokens.emplace_back(content, vocabulary + static_cast<int64_t>(tokens.size()));
  };
  // Ids are validated in assemble(); appended ones are only meaningful when the file's are right.
  for (const auto& role : roles)
    if (role) append(role->content);
  for (const auto& spec : additional) append(spec.content);
  if (add_minigpt5_tokens) {
    // add_special_tokens replaces the additional special tokens with MiniGPT-5's plain strings.
    additional.clear();
    for (const char* content : kMiniGpt5Tokens) additional.push_back({content, true, true});
    for (const auto& spec : additional) append(spec.content);
  }

  std::vector<AddedToken> added;
  for (const auto& [content, id] : tokens) {
    AddedToken token{content, id, false, true, true};  // a plain added token
    const auto special = std::find_if(additional.begin(), additional.end(),
                                      [&](const SpecialSpec& s) { return s.content == content; });
    const auto role =
        std::find_if(roles.begin(), roles.end(), [&](const auto& r) { return r && r->content == content; });
    if (special != additional.end()) {
      token = {content, id, true, special->lstrip, special->rstrip};
    } else if (role != roles.end()) {
      token = {content, id, true, (*role)->lstrip, (*role)->rstrip};
    }
    added.push_back(std::move(token));
  }
  std::vector<SpecialSpec> vocab_specials;
  for (const auto& spec : additional)
    if (model.find_piece(spec.content) >= 0) vocab_specials.push_back(spec);

  const Thrower fail = [&](const std::string& what) { throw ConfigError(added_source + ": " + what); };
  auto state = assemble(std::move(model), std::move(added), roles, vocab_specials, fail);
  state->add_bos = add_bos;
  state->add_eos = add_eos;
  state->clean_up_spaces = clean_up;
  return Tokenizer(std::move(state));
}

// ---------------------------------------------------------------------------------------------
// Encoding.

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
  const State& s = *state_;
  std::vector<int64_t> ids;
  if (add_bos) {
    if (s.bos < 0) throw ArgumentError("encode(add_bos=true): this tokenizer has no BOS token");
    ids.push_back(s.bos);
  }

  // Split on the rules (leftmost match, longest first): text chunks and token matches.
  struct Part {
    std::string_view text;
    const TokenRule* token;
  };
  std::vector<Part> parts;
  const std::string_view all(text);
  size_t chunk_start = 0;
  for (size_t pos = 0; pos < all.size();) {
    const TokenRule* match = nullptr;
    for (const TokenRule& rule : s.rules) {
      if (all.compare(pos, rule.content.size(), rule.content) == 0) {
        match = &rule;  // rules are longest first
        break;
      }
    }
    if (!match) {
      ++pos;
      continue;
    }
    if (pos > chunk_start) parts.push_back({all.substr(chunk_start, pos - chunk_start), nullptr});
    parts.push_back({std::string_view(match->content), match});
    pos += match->content.size();
    chunk_start = pos;
  }
  if (chunk_start < all.size()) parts.push_back({all.substr(chunk_start), nullptr});

  for (size_t i = 0; i < parts.size(); ++i) {
    const TokenRule* token = parts[i].token;
    if (!token) continue;
    if (token->rstrip && i + 1 < parts.size() && !parts[i + 1].token)
      parts[i + 1].text = lstrip_python(parts[i + 1].text);
    if (token->lstrip && i > 0 && !parts[i - 1].token) parts[i - 1].text = rstrip_python(parts[i - 1].text);
  }
  for (const Part& part : parts) {
    if (part.token) {
      ids.push_back(part.token->id);
    } else if (!part.text.empty()) {
      for (const int id : s.sp.encode(part.text)) ids.push_back(id);
    }
  }

  if (add_eos) {
    if (s.eos < 0) throw ArgumentError("encode(add_eos=true): this tokenizer has no EOS token");
    ids.push_back(s.eos);
  }
  return ids;
}

std::vector<int64_t> Tokenizer::sentencepiece_encode(const std::string& text) const {
  const std::vector<int> ids = state_->sp.encode(text);
  return {ids.begin(), ids.end()};
}

// ---------------------------------------------------------------------------------------------
// Decoding: one state machine for decode() and StreamingDecoder, following 4.31's _decode and
// LlamaTokenizer.convert_tokens_to_string.

namespace {

class DecodeState {
 public:
  DecodeState(const Tokenizer::State& state, bool skip_special_tokens)
      : state_(&state), skip_special_(skip_special_tokens) {}

  // Appends the text `id` makes final to `text`. Nothing before `frozen` may change (text already
  // handed out): the one retroactive edit of the HF rule is moved to `frozen` if it must.
  void push(int64_t id, std::string& text, size_t frozen) {
    const Tokenizer::State& s = *state_;
    if (skip_special_ && s.special_ids.count(id)) return;
    if (id >= s.base()) {  // an added token: ends the run, emitted verbatim
      end_run(text);
      if (any_part_) text.push_back(' ');
      text += s.content(id);
      any_part_ = true;
      return;
    }
    if (!in_run_) {
      if (any_part_) text.push_back(' ');
      any_part_ = in_run_ = true;
      run_index_ = 0;
      previous_special_ = false;
      start_subrun(text);
    }
    if (s.vocab_special_ids.count(id)) {
      // convert_tokens_to_string: the text since the last special goes through sentencepiece,
      // preceded by a space unless the run starts here or follows a special, then the token.
      subrun_->finish(text);
      if (!previous_special_ && run_index_ != 0) text.insert(std::max(subrun_start_, frozen), 1, ' ');
      text += s.content(id);
      previous_special_ = true;
      start_subrun(text);
    } else {
      subrun_->push(static_cast<int>(id), text);
      previous_special_ = false;
    }
    ++run_index_;
  }

  void finish(std::string& text) { end_run(text); }

  // The caller dropped the first `count` bytes of its text.
  void forget_prefix(size_t count) { subrun_start_ = subrun_start_ > count ? subrun_start_ - count : 0; }

 private:
  void start_subrun(const std::string& text) {
    subrun_.emplace(state_->sp);
    subrun_start_ = text.size();
  }
  void end_run(std::string& text) {
    if (!in_run_) return;
    subrun_->finish(text);
    subrun_.reset();
    in_run_ = false;
  }

  const Tokenizer::State* state_;
  bool skip_special_;
  bool any_part_ = false;  // something was emitted: the next part is joined with a space
  bool in_run_ = false;
  bool previous_special_ = false;
  size_t run_index_ = 0;
  size_t subrun_start_ = 0;
  std::optional<SentencePieceDecoder> subrun_;
};

}  // namespace

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  for (const int64_t id : ids) state_->check_id(id);
  DecodeState decoder(*state_, skip_special_tokens);
  std::string text;
  for (const int64_t id : ids) decoder.push(id, text, 0);
  decoder.finish(text);
  return state_->clean_up_spaces ? clean_up_tokenization(std::move(text)) : text;
}

std::string Tokenizer::sentencepiece_decode(const std::vector<int64_t>& ids) const {
  const SentencePieceModel& sp = state_->sp;
  for (const int64_t id : ids)
    if (id < 0 || id >= sp.size())
      throw ArgumentError("token id " + std::to_string(id) +
                          " is out of range for the sentencepiece model (" + std::to_string(sp.size()) +
                          " pieces)");
  SentencePieceDecoder decoder(sp);
  std::string text;
  for (const int64_t id : ids) decoder.push(static_cast<int>(id), text);
  decoder.finish(text);
  return text;
}

// ---------------------------------------------------------------------------------------------

int64_t Tokenizer::vocab_size() const { return state_->size(); }
int64_t Tokenizer::sentencepiece_size() const { return state_->base(); }
int64_t Tokenizer::bos_id() const { return state_->bos; }
int64_t Tokenizer::eos_id() const { return state_->eos; }
int64_t Tokenizer::unk_id() const { return state_->unk; }
int64_t Tokenizer::pad_id() const { return state_->pad; }
bool Tokenizer::add_bos_token() const { return state_->add_bos; }
bool Tokenizer::add_eos_token() const { return state_->add_eos; }
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return state_->added; }
const SentencePieceModel& Tokenizer::sentencepiece() const { return state_->sp; }

std::optional<int64_t> Tokenizer::token_id(const std::string& piece_or_added) const {
  if (const auto it = state_->added_ids.find(piece_or_added); it != state_->added_ids.end())
    return it->second;
  const int id = state_->sp.find_piece(piece_or_added);
  if (id >= 0) return id;
  return std::nullopt;
}

std::string Tokenizer::piece(int64_t id) const {
  state_->check_id(id);
  return state_->content(id);
}

bool Tokenizer::is_special(int64_t id) const {
  state_->check_id(id);
  return state_->special_ids.count(id) > 0;
}

bool Tokenizer::is_added(int64_t id) const {
  state_->check_id(id);
  return id >= state_->base();
}

// ---------------------------------------------------------------------------------------------

class StreamingDecoder::Impl {
 public:
  Impl(std::shared_ptr<const Tokenizer::State> state, bool skip)
      : state_(std::move(state)), skip_(skip), decoder_(*state_, skip) {}

  std::string push(int64_t id) {
    state_->check_id(id);
    std::string text;
    decoder_.push(id, text, 0);
    // Everything in `text` is final, so the decoder need not remember any of it.
    decoder_.forget_prefix(text.size());
    return text;
  }

  std::string finish() {
    std::string text;
    decoder_.finish(text);
    decoder_ = DecodeState(*state_, skip_);
    return text;
  }

 private:
  std::shared_ptr<const Tokenizer::State> state_;
  bool skip_;
  DecodeState decoder_;
};

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : impl_(std::make_unique<Impl>(tokenizer.state_, skip_special_tokens)) {}
StreamingDecoder::StreamingDecoder(StreamingDecoder&&) noexcept = default;
StreamingDecoder& StreamingDecoder::operator=(StreamingDecoder&&) noexcept = default;
StreamingDecoder::~StreamingDecoder() = default;

std::string StreamingDecoder::push(int64_t id) { return impl_->push(id); }
std::string StreamingDecoder::finish() { return impl_->finish(); }

}  // namespace voken::text
