#include "cli/report.h"

#include <algorithm>
#include <fstream>

#include "voken/error.h"
#include "voken/version.h"

namespace voken::cli {
namespace {

constexpr const char* kRandomWeightsNote =
    "This bundle holds random weights (its manifest says random_weights: true). The pipeline ran for "
    "real, but the text and images carry no meaning.";

constexpr const char* kStyle = R"(
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 860px; margin: 2em auto;
       padding: 0 1em; color: #222; background: #fafafa; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
.meta { color: #666; font-size: .9em; margin-top: 0; }
.banner { background: #fff3cd; border: 1px solid #e0b84c; border-radius: 6px; padding: .6em 1em; }
.turn { border-radius: 10px; padding: .8em 1.1em; margin: 1em 0; }
.user { background: #e8f0fe; }
.assistant { background: #fff; border: 1px solid #ddd; }
.role { font-weight: 600; font-size: .8em; letter-spacing: .05em; text-transform: uppercase; color: #555; }
.text { white-space: pre-wrap; margin: .4em 0; }
figure { margin: .6em 0; }
figure img { max-width: 100%; height: auto; border-radius: 4px; }
figure img.pixelated { image-rendering: pixelated; }
figcaption { font-size: .8em; color: #666; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { padding: .2em .9em .2em 0; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; }
details pre { white-space: pre-wrap; background: #f1f1f1; padding: .6em; border-radius: 4px; }
footer { color: #888; font-size: .8em; margin-top: 2em; }
)";

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw Error("cannot write " + path);
}

// DIR/name.html -> (DIR/, name)
std::pair<std::string, std::string> split_output_path(const std::string& html_path) {
  const std::size_t slash = html_path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : html_path.substr(0, slash + 1);
  std::string name = html_path.substr(dir.size());
  const std::size_t dot = name.find_last_of('.');
  if (dot != std::string::npos && dot > 0) name.resize(dot);
  return {dir, name};
}

void render_html_items(std::string& html, const std::vector<ReportItem>& items) {
  for (const auto& item : items) {
    if (!item.is_image) {
      html += "<p class=\"text\">" + html_escape(item.text) + "</p>\n";
      continue;
    }
    const ReportImage& image = item.image;
    // Tiny images (random-weight demos draw 64x64) are shown enlarged with visible pixels.
    const bool enlarge = image.width > 0 && image.width < 256;
    const int shown = enlarge ? 256 : std::min(image.width, 512);
    html += "<figure><img src=\"data:" + mime_type(image.extension) + ";base64," +
            base64_encode(image.encoded) + "\" alt=\"" + html_escape(image.caption) + "\" width=\"" +
            std::to_string(shown) + "\"" + (enlarge ? " class=\"pixelated\"" : "") + "><figcaption>" +
            html_escape(image.caption) + " (" + std::to_string(image.width) + "&times;" +
            std::to_string(image.height) + ")</figcaption></figure>\n";
  }
}

void render_html_table(std::string& html, const std::vector<std::pair<std::string, std::string>>& rows) {
  html += "<table>\n";
  for (const auto& [name, value] : rows)
    html += "<tr><th>" + html_escape(name) + "</th><td>" + html_escape(value) + "</td></tr>\n";
  html += "</table>\n";
}

// Markdown text keeping the line breaks of `text` (a backslash at a line's end is a hard break).
std::string markdown_paragraphs(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (true) {
    const std::size_t newline = text.find('\n', start);
    lines.push_back(markdown_escape(text.substr(start, newline - start)));
    if (newline == std::string::npos) break;
    start = newline + 1;
  }
  std::string out;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    out += lines[i];
    if (i + 1 < lines.size()) out += !lines[i].empty() && !lines[i + 1].empty() ? "\\\n" : "\n";
  }
  return out;
}

// A fenced code block whose fence is longer than any run of backticks inside.
std::string markdown_code_block(const std::string& text) {
  std::size_t longest = 0, run = 0;
  for (char c : text) {
    run = c == '`' ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  const std::string fence(std::max<std::size_t>(3, longest + 1), '`');
  return fence + "text\n" + text + (text.empty() || text.back() != '\n' ? "\n" : "") + fence + "\n";
}

std::string markdown_cell(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '|')
      out += "\\|";
    else if (c == '\n')
      out += ' ';
    else
      out += c;
  }
  return out;
}

void render_markdown_items(std::string& md, const std::vector<ReportItem>& items,
                           const std::vector<std::string>& image_files, std::size_t& next_image) {
  for (const auto& item : items) {
    if (!item.is_image) {
      md += markdown_paragraphs(item.text) + "\n\n";
      continue;
    }
    const std::string file = next_image < image_files.size() ? image_files[next_image] : "";
    ++next_image;
    md += "![" + markdown_escape(item.image.caption) + "](<" + file + ">)\n\n";
  }
}

}  // namespace

ReportItem ReportItem::of_text(std::string text) {
  ReportItem item;
  item.text = std::move(text);
  return item;
}

ReportItem ReportItem::of_image(ReportImage image) {
  ReportItem item;
  item.is_image = true;
  item.image = std::move(image);
  return item;
}

std::string html_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string markdown_escape(const std::string& text) {
  // Inline formatting anywhere; block markers (headings, lists, quotes, rules) only where a line
  // starts, which is where they act.
  static const std::string inline_special = "\\`*_[]<>|~";
  std::string out;
  out.reserve(text.size());
  std::size_t first = text.find_first_not_of(' ');
  std::size_t digits_end = first;
  while (digits_end < text.size() && text[digits_end] >= '0' && text[digits_end] <= '9') ++digits_end;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const bool block_marker = (i == first && std::string("#-+=").find(c) != std::string::npos) ||
                              (i == digits_end && digits_end > first && (c == '.' || c == ')'));
    if (block_marker || inline_special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

std::string base64_encode(const std::string& bytes) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v =
        uint32_t(uint8_t(bytes[i])) << 16 | uint32_t(uint8_t(bytes[i + 1])) << 8 | uint8_t(bytes[i + 2]);
    out += alphabet[v >> 18 & 63];
    out += alphabet[v >> 12 & 63];
    out += alphabet[v >> 6 & 63];
    out += alphabet[v & 63];
  }
  if (i < bytes.size()) {
    const bool two = i + 1 < bytes.size();
    const uint32_t v = uint32_t(uint8_t(bytes[i])) << 16 | (two ? uint32_t(uint8_t(bytes[i + 1])) << 8 : 0);
    out += alphabet[v >> 18 & 63];
    out += alphabet[v >> 12 & 63];
    out += two ? alphabet[v >> 6 & 63] : '=';
    out += '=';
  }
  return out;
}

std::string mime_type(const std::string& extension) {
  if (extension == "jpg" || extension == "jpeg") return "image/jpeg";
  if (extension == "webp") return "image/webp";
  if (extension == "bmp") return "image/bmp";
  return "image/png";
}

std::string render_html(const Report& report) {
  std::string html = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
  html += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
  html += "<meta name=\"generator\" content=\"voken " + std::string(voken::version()) + "\">\n";
  html += "<title>" + html_escape(report.title) + (report.random_weights ? " (random weights)" : "") +
          "</title>\n";
  html += "<style>" + std::string(kStyle) + "</style>\n</head>\n<body>\n";
  html += "<h1>" + html_escape(report.title) + "</h1>\n";
  html += "<p class=\"meta\">bundle: " + html_escape(report.bundle_name) + " &middot; <code>" +
          html_escape(report.bundle_path) + "</code></p>\n";
  if (report.random_weights)
    html += "<p class=\"banner\" id=\"random-weights\"><strong>Random weights.</strong> " +
            html_escape(kRandomWeightsNote) + "</p>\n";
  html += "<section class=\"turn user\">\n<div class=\"role\">User</div>\n";
  render_html_items(html, report.user);
  html += "</section>\n<section class=\"turn assistant\">\n<div class=\"role\">Assistant</div>\n";
  render_html_items(html, report.assistant);
  html += "</section>\n<h2>Details</h2>\n<h3>Settings</h3>\n";
  render_html_table(html, report.settings);
  html += "<h3>Timings</h3>\n";
  render_html_table(html, report.timings);
  html += "<details><summary>Prompt as tokenized</summary><pre>" + html_escape(report.prompt) +
          "</pre></details>\n";
  html += "<details><summary>Response with voken markers</summary><pre>" + html_escape(report.raw_text) +
          "</pre></details>\n";
  html += "<footer>written by voken " + std::string(voken::version()) + "</footer>\n</body>\n</html>\n";
  return html;
}

std::string render_markdown(const Report& report, const std::vector<std::string>& image_files) {
  std::string md = "# " + markdown_escape(report.title) + "\n\n";
  if (report.random_weights) md += "> **Random weights.** " + std::string(kRandomWeightsNote) + "\n\n";
  md += "Bundle: " + markdown_escape(report.bundle_name) + " (`" + report.bundle_path + "`)\n\n";
  std::size_t next_image = 0;
  md += "## User\n\n";
  render_markdown_items(md, report.user, image_files, next_image);
  md += "## Assistant\n\n";
  render_markdown_items(md, report.assistant, image_files, next_image);
  md += "## Details\n\n| setting | value |\n|---|---|\n";
  for (const auto& [name, value] : report.settings)
    md += "| " + markdown_cell(name) + " | " + markdown_cell(value) + " |\n";
  md += "\n| stage | time |\n|---|---|\n";
  for (const auto& [name, value] : report.timings)
    md += "| " + markdown_cell(name) + " | " + markdown_cell(value) + " |\n";
  md += "\nPrompt as tokenized:\n\n" + markdown_code_block(report.prompt);
  md += "\nResponse with voken markers:\n\n" + markdown_code_block(report.raw_text);
  return md;
}

std::vector<std::string> write_report(const Report& report, const std::string& html_path) {
  const auto [dir, stem] = split_output_path(html_path);
  std::vector<std::string> written{html_path};
  write_file(html_path, render_html(report));

  // Image files for the Markdown: inputs keep their bytes and extension, outputs are PNG.
  std::vector<std::string> image_files;
  auto save_images = [&](const std::vector<ReportItem>& items, const std::string& kind) {
    int index = 0;
    for (const auto& item : items) {
      if (!item.is_image) continue;
      const std::string name = stem + "-" + kind + "-" + std::to_string(++index) + "." + item.image.extension;
      write_file(dir + name, item.image.encoded);
      image_files.push_back(name);
      written.push_back(dir + name);
    }
  };
  save_images(report.user, "input");
  save_images(report.assistant, "image");
  const std::string md_path = dir + stem + ".md";
  write_file(md_path, render_markdown(report, image_files));
  written.insert(written.begin() + 1, md_path);
  return written;
}

}  // namespace voken::cli
