#include "cli/args.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

namespace voken::cli {

void parse_arguments(const std::vector<std::string>& args, const std::vector<OptionSpec>& specs,
                     const std::function<void(const std::string&)>& positional, const std::string& command) {
  bool options_ended = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (options_ended || arg.size() < 2 || arg.compare(0, 2, "--") != 0) {
      if (!positional)
        throw UsageError("unexpected argument '" + arg + "' (see voken " + command + " --help)");
      positional(arg);
      continue;
    }
    if (arg == "--") {
      options_ended = true;
      continue;
    }
    const std::size_t equals = arg.find('=');
    const std::string name = arg.substr(0, equals);
    const OptionSpec* spec = nullptr;
    for (const auto& candidate : specs)
      if (candidate.name == name) spec = &candidate;
    if (!spec) throw UsageError("unknown option " + name + " (see voken " + command + " --help)");
    if (!spec->takes_value) {
      if (equals != std::string::npos) throw UsageError(name + " takes no value");
      spec->apply("");
      continue;
    }
    if (equals != std::string::npos) {
      spec->apply(arg.substr(equals + 1));
    } else if (i + 1 < args.size()) {
      spec->apply(args[++i]);
    } else {
      throw UsageError(name + " needs a value");
    }
  }
}

int64_t parse_int(const std::string& option, const std::string& value, int64_t min, int64_t max) {
  errno = 0;
  char* end = nullptr;
  const long long number = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE)
    throw UsageError(option + ": expected an integer, got '" + value + "'");
  if (number < min || number > max)
    throw UsageError(option + " must be in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " +
                     value);
  return number;
}

uint64_t parse_seed(const std::string& option, const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long number = std::strtoull(value.c_str(), &end, 10);
  if (value.empty() || value[0] == '-' || *end != '\0' || errno == ERANGE)
    throw UsageError(option + ": expected a non-negative integer below 2^64, got '" + value + "'");
  return number;
}

double parse_double(const std::string& option, const std::string& value, double min, double max,
                    bool min_exclusive) {
  errno = 0;
  char* end = nullptr;
  const double number = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(number))
    throw UsageError(option + ": expected a number, got '" + value + "'");
  const bool below = min_exclusive ? number <= min : number < min;
  if (below || number > max) {
    auto format = [](double x) {
      char buffer[32];
      std::snprintf(buffer, sizeof buffer, "%g", x);
      return std::string(buffer);
    };
    throw UsageError(option + " must be in " + (min_exclusive ? "(" : "[") + format(min) + ", " +
                     format(max) + "], got " + value);
  }
  return number;
}

std::string parse_choice(const std::string& option, const std::string& value,
                         const std::vector<std::string>& choices) {
  std::string list;
  for (const auto& choice : choices) {
    if (choice == value) return value;
    list += (list.empty() ? "" : ", ") + choice;
  }
  throw UsageError(option + ": unknown value '" + value + "' (one of: " + list + ")");
}

}  // namespace voken::cli
