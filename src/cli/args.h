// Command-line parsing for the `voken` subcommands: options declared in a table, read in the
// order given (so `--text a --image b --text c` keeps its order), with values checked against
// their ranges before any model is loaded.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "voken/error.h"

namespace voken::cli {

// A mistake in the command line itself (unknown option, missing or malformed value, out of
// range). The CLI exits with status 2 for these, 1 for failures while working.
class UsageError : public ArgumentError {
 public:
  using ArgumentError::ArgumentError;
};

// One option of a subcommand. Flags take no value; the others take the next argument (or the
// text after '=' in --name=value).
struct OptionSpec {
  std::string name;  // with the dashes: "--steps"
  bool takes_value = true;
  std::function<void(const std::string& value)> apply;  // throws UsageError for bad values
};

// Reads `args` in order: options found in `specs` are applied, anything not starting with "--"
// goes to `positional` (UsageError if that is empty), "--" ends options. `command` names the
// subcommand in messages.
void parse_arguments(const std::vector<std::string>& args, const std::vector<OptionSpec>& specs,
                     const std::function<void(const std::string&)>& positional, const std::string& command);

// Value parsers; the whole text must be the number, and messages name the option.
int64_t parse_int(const std::string& option, const std::string& value, int64_t min, int64_t max);
uint64_t parse_seed(const std::string& option, const std::string& value);
// A finite number in [min, max]; with `min_exclusive`, in (min, max].
double parse_double(const std::string& option, const std::string& value, double min, double max,
                    bool min_exclusive = false);
// `value` must be one of `choices`.
std::string parse_choice(const std::string& option, const std::string& value,
                         const std::vector<std::string>& choices);

}  // namespace voken::cli
