// JSON files (configs, manifests, shard indexes) with errors that name the file and the key.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "voken/error.h"

namespace voken::io {

using Json = nlohmann::json;

// Parses JSON text; `source` names it in the ConfigError for malformed text. Python's json module
// (which writes every HF/diffusers config) emits NaN, Infinity and -Infinity, which strict JSON
// and nlohmann::json reject: outside strings they are read as the strings "NaN", "Infinity" and
// "-Infinity", for float fields to accept.
Json parse_json(const std::string& text, const std::string& source);
// Parses a whole file as parse_json does. FileNotFoundError if absent, ConfigError if not valid.
Json read_json_file(const std::string& path);

// A JSON object together with where it came from, for typed lookups with precise errors.
class JsonView {
 public:
  JsonView(const Json& json, std::string source) : json_(json), source_(std::move(source)) {}

  bool has(const std::string& key) const {
    return json_.is_object() && json_.contains(key) && !json_.at(key).is_null();
  }
  // Required field of type T; ConfigError naming source, key, expected type and found value.
  template <typename T>
  T get(const std::string& key) const {
    if (!has(key)) throw ConfigError(source_ + ": missing required field '" + key + "'");
    return convert<T>(key, json_.at(key));
  }
  template <typename T>
  T get_or(const std::string& key, T fallback) const {
    return has(key) ? convert<T>(key, json_.at(key)) : fallback;
  }
  JsonView child(const std::string& key) const;
  const Json& json() const { return json_; }
  const std::string& source() const { return source_; }

 private:
  template <typename T>
  T convert(const std::string& key, const Json& value) const {
    try {
      if constexpr (std::is_same_v<T, bool>) {
        if (!value.is_boolean()) throw std::runtime_error("not a boolean");
      } else if constexpr (std::is_integral_v<T>) {
        if (!value.is_number_integer()) throw std::runtime_error("not an integer");
      } else if constexpr (std::is_floating_point_v<T>) {
        if (!value.is_number()) throw std::runtime_error("not a number");
      } else if constexpr (std::is_same_v<T, std::string>) {
        if (!value.is_string()) throw std::runtime_error("not a string");
      }
      return value.get<T>();
    } catch (const std::exception& e) {
      throw ConfigError(source_ + ": field '" + key + "' has the wrong type (" + e.what() +
                        "): " + value.dump());
    }
  }
  const Json& json_;
  std::string source_;
};

}  // namespace voken::io
