// The `voken` subcommands. Each takes the arguments after its name and returns the process's
// exit status: 0 done, 1 failed while working (a voken::Error), 2 bad command line (UsageError),
// 130 interrupted. They throw voken errors; main() prints them.
#pragma once

#include <string>
#include <vector>

#include "voken/pipeline.h"

namespace voken::cli {

int info_main(const std::vector<std::string>& args);
int inspect_main(const std::vector<std::string>& args);
int generate_main(const std::vector<std::string>& args);
int demo_main(const std::vector<std::string>& args);

// One generation as `voken generate` runs it (also what `voken demo` runs).
struct GenerateCommand {
  std::string bundle;             // bundle.json, or a directory holding one
  std::vector<Segment> segments;  // text and image files, in command-line order
  GenerateOptions options;
  LoadOptions load;
  std::string out = "story.html";  // the HTML page; the Markdown file goes beside it
  std::string title = "voken generate";
  bool quiet = false;      // no progress output
  bool show_help = false;  // --help was given: print the usage, nothing else
};

// The command line of `voken generate` (UsageError for anything malformed or out of range).
GenerateCommand parse_generate_command(const std::vector<std::string>& args);
// UsageError unless `out` names an HTML page (.html / .htm).
void check_output_path(const std::string& out);
// Checks the inputs, loads the bundle, generates with a progress display, writes the page and
// the Markdown, prints the response and the timings.
int run_generation(const GenerateCommand& command);

// The manifest a --bundle argument names: the path itself, or <dir>/bundle.json for a
// directory. FileNotFoundError when neither exists.
std::string resolve_manifest_path(const std::string& path);

}  // namespace voken::cli
