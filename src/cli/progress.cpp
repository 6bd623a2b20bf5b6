#include "cli/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>

namespace voken::cli {
namespace {

// Set by the SIGINT handler; read by progress callbacks on the generating thread.
volatile std::sig_atomic_t interrupted = 0;

extern "C" void on_interrupt(int) {
  interrupted = 1;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
}

std::string format(const char* pattern, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

std::string counts(int64_t current, int64_t total) {
  return std::to_string(current) + "/" + std::to_string(total);
}

}  // namespace

void install_interrupt_handler() { std::signal(SIGINT, on_interrupt); }
bool interrupt_requested() { return interrupted != 0; }

ProgressDisplay::ProgressDisplay(std::FILE* stream, bool interactive, bool quiet)
    : stream_(stream), interactive_(interactive), quiet_(quiet) {
  winsize size{};
  if (interactive_ && ioctl(fileno(stream_), TIOCGWINSZ, &size) == 0 && size.ws_col >= 20)
    width_ = size.ws_col;
}

ProgressDisplay ProgressDisplay::for_stream(std::FILE* stream, bool quiet) {
  return ProgressDisplay(stream, isatty(fileno(stream)) != 0, quiet);
}

void ProgressDisplay::log(const std::string& message) {
  if (quiet_) return;
  finish();
  std::fprintf(stream_, "%s\n", message.c_str());
  std::fflush(stream_);
}

void ProgressDisplay::finish() {
  if (!line_open_) return;
  std::fputc('\n', stream_);
  std::fflush(stream_);
  line_open_ = false;
}

void ProgressDisplay::draw(const std::string& label, int64_t current, int64_t total,
                           const std::string& detail, const std::string& tail, bool force) {
  const auto now = Clock::now();
  if (!force && line_open_ && now - last_draw_ < std::chrono::milliseconds(66)) return;
  last_draw_ = now;
  const std::string numbers = " " + counts(current, total) + (detail.empty() ? "" : "  " + detail);
  // label [#####.....] numbers, within the terminal's width (one column spare for the cursor).
  const int bar_width = std::max(10, std::min(30, width_ - 1 - int(label.size() + 3 + numbers.size())));
  const int filled = total > 0 ? int(std::min<int64_t>(bar_width, current * bar_width / total)) : 0;
  std::string line =
      label + " [" + std::string(filled, '#') + std::string(bar_width - filled, '.') + "]" + numbers;
  if (int(line.size()) > width_ - 1) line.resize(std::max(0, width_ - 1));
  // The end of the text generated so far, in the columns left (one column per code point).
  const int room = width_ - 1 - int(line.size()) - 3;
  if (!tail.empty() && room >= 10) {
    std::size_t start = tail.size(), columns = 0;
    while (start > 0 && columns < std::size_t(room)) {
      --start;
      if ((static_cast<unsigned char>(tail[start]) & 0xC0) != 0x80) ++columns;
    }
    line += "  " + tail.substr(start);
  }
  std::fprintf(stream_, "\r%s\x1b[K", line.c_str());
  std::fflush(stream_);
  line_open_ = true;
}

bool ProgressDisplay::operator()(const ProgressEvent& event) {
  using Stage = ProgressEvent::Stage;
  if (quiet_) return !interrupt_requested();
  const auto now = Clock::now();
  // A new run of tokens or a new image restarts the rate measurement.
  const bool new_stage = !started_ || event.stage != last_stage_;
  if (new_stage) {
    if (last_stage_ == Stage::Token && started_ && !interactive_ && last_logged_ != -1)
      std::fprintf(stream_, "tokens: %lld so far\n", static_cast<long long>(last_logged_));
    stage_start_ = now;
    stage_first_ = event.current - 1;
    // The image's time starts when the event before its first step came (mapping included).
    if (event.stage == Stage::Denoise) image_start_ = last_event_;
    started_ = true;
    last_stage_ = event.stage;
  }
  const double elapsed = std::chrono::duration<double>(now - stage_start_).count();
  const int64_t done_in_stage = event.current - stage_first_;

  switch (event.stage) {
    case Stage::EncodeImages:
      log("encoding " + std::to_string(event.total) + " input image" + (event.total == 1 ? "" : "s"));
      break;
    case Stage::Prefill:
      log("reading the prompt (" + std::to_string(event.total) + " positions)");
      break;
    case Stage::Token: {
      const std::string rate = elapsed > 0 && done_in_stage > 1
                                   ? format("%.1f tokens/s", double(done_in_stage - 1) / elapsed)
                                   : "";
      if (interactive_) {
        // Control characters (newlines, escape sequences in sampled bytes) would break the line.
        for (char c : event.text) text_tail_ += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? ' ' : c;
        if (text_tail_.size() > 4096) text_tail_.erase(0, text_tail_.size() - 1024);
        draw("tokens ", event.current, event.total, rate, text_tail_, event.current == event.total);
      } else {
        last_logged_ = event.current;
        if (event.current % 32 == 0 || event.current == event.total)
          std::fprintf(stream_, "tokens: %s%s%s\n", counts(event.current, event.total).c_str(),
                       rate.empty() ? "" : ", ", rate.c_str());
      }
      break;
    }
    case Stage::Denoise: {
      const std::string label = "image " + std::to_string(event.image + 1);
      const std::string rate =
          elapsed > 0 && done_in_stage > 1 ? format("%.2f s/step", elapsed / double(done_in_stage - 1)) : "";
      if (interactive_) {
        draw(label, event.current, event.total, rate, "", event.current == event.total);
      } else if (event.total > 0 &&
                 (event.current * 10 / event.total != (event.current - 1) * 10 / event.total ||
                  event.current == event.total)) {
        std::fprintf(stream_, "%s: step %s%s%s\n", label.c_str(), counts(event.current, event.total).c_str(),
                     rate.empty() ? "" : ", ", rate.c_str());
      }
      break;
    }
    case Stage::ImageDone:
      log("image " + std::to_string(event.image + 1) + " done in " +
          format("%.1f s", std::chrono::duration<double>(now - image_start_).count()));
      break;
  }
  if (!interactive_) std::fflush(stream_);
  last_event_ = now;
  return !interrupt_requested();
}

}  // namespace voken::cli
