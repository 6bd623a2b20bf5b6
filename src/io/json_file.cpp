#include "io/json_file.h"

#include <sys/stat.h>
#include <fstream>
#include <sstream>

namespace voken::io {

Json read_json_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw FileNotFoundError("file not found: " + path);
  std::ifstream in(path);
  if (!in) throw ConfigError("cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return Json::parse(buffer.str());
  } catch (const Json::exception& e) {
    throw ConfigError(path + ": malformed JSON: " + e.what());
  }
}

JsonView JsonView::child(const std::string& key) const {
  if (!has(key) || !json_.at(key).is_object())
    throw ConfigError(source_ + ": missing object field '" + key + "'");
  return JsonView(json_.at(key), source_ + " [" + key + "]");
}

}  // namespace voken::io
