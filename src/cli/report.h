// What `voken generate` and `voken demo` write: the conversation as an HTML page and as Markdown.
//
// Layout of the files for `--out DIR/story.html`:
//   DIR/story.html           self-contained: every image embedded as a data: URI (one file to
//                            open, mail or archive)
//   DIR/story.md             the same conversation in Markdown, with images as files beside it:
//   DIR/story-input-<k>.<ext>    the k-th input image, its original bytes (jpg/png/webp/bmp)
//   DIR/story-image-<k>.png      the k-th generated image
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace voken::cli {

// An image as the report shows it: encoded bytes and what they are.
struct ReportImage {
  std::string encoded;    // the file's bytes
  std::string extension;  // "png", "jpg", "webp", "bmp"
  int width = 0;
  int height = 0;
  std::string caption;  // e.g. the input's file name, or "generated image 1"
};

// One piece of a turn: text or an image.
struct ReportItem {
  bool is_image = false;
  std::string text;
  ReportImage image;

  static ReportItem of_text(std::string text);
  static ReportItem of_image(ReportImage image);
};

struct Report {
  std::string title;        // page title, e.g. "voken generate"
  std::string bundle_name;  // the manifest's name
  std::string bundle_path;
  bool random_weights = false;  // labelled prominently: the output means nothing
  std::vector<ReportItem> user;
  std::vector<ReportItem> assistant;
  std::string prompt;                                         // as tokenized
  std::string raw_text;                                       // the response with voken markers
  std::vector<std::pair<std::string, std::string>> settings;  // option, value
  std::vector<std::pair<std::string, std::string>> timings;   // stage, "1.23 s (...)"
};

std::string html_escape(const std::string& text);
// Backslash-escapes the characters Markdown would read as formatting or HTML.
std::string markdown_escape(const std::string& text);
std::string base64_encode(const std::string& bytes);
// "image/png" for "png", ...
std::string mime_type(const std::string& extension);

std::string render_html(const Report& report);
// `image_files[i]` is the file name (relative to the Markdown file) of the i-th image, inputs
// first then generated, in the order they appear.
std::string render_markdown(const Report& report, const std::vector<std::string>& image_files);

// Writes the HTML page at `html_path`, the Markdown file and its image files beside it (see the
// header comment). Returns every path written, the page first. Error when a file cannot be
// written.
std::vector<std::string> write_report(const Report& report, const std::string& html_path);

}  // namespace voken::cli
