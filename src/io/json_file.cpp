#include "io/json_file.h"

#include <sys/stat.h>
#include <fstream>
#include <sstream>

namespace voken::io {

namespace {

// Python's json module writes NaN / Infinity / -Infinity (e.g. DPM-Solver's lambda_min_clipped);
// nlohmann::json rejects them. Outside strings they become the strings "NaN", "Infinity" and
// "-Infinity", which the float fields accept.
std::string quote_non_finite_literals(const std::string& text) {
  static const char* const kLiterals[] = {"-Infinity", "Infinity", "NaN"};
  std::string out;
  out.reserve(text.size() + 16);
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
      out += c;
      continue;
    }
    bool replaced = false;
    for (const char* literal : kLiterals) {
      const std::size_t length = std::char_traits<char>::length(literal);
      if (text.compare(i, length, literal) == 0) {
        out += '"';
        out += literal;
        out += '"';
        i += length - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return out;
}

}  // namespace

Json parse_json(const std::string& text, const std::string& source) {
  try {
    return Json::parse(quote_non_finite_literals(text));
  } catch (const Json::exception& e) {
    throw ConfigError(source + ": malformed JSON: " + e.what());
  }
}

Json read_json_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw FileNotFoundError("file not found: " + path);
  std::ifstream in(path);
  if (!in) throw ConfigError("cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse_json(buffer.str(), path);
}

JsonView JsonView::child(const std::string& key) const {
  if (!has(key) || !json_.at(key).is_object())
    throw ConfigError(source_ + ": missing object field '" + key + "'");
  return JsonView(json_.at(key), source_ + " [" + key + "]");
}

}  // namespace voken::io
