// Progress of a generate_interleaved() call on the terminal: a redrawn bar for tokens and
// denoising steps when stderr is a terminal, plain log lines otherwise (pipes, CI logs).
// Ctrl-C asks the running call to stop (through the progress callback) instead of killing it.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "voken/pipeline.h"

namespace voken::cli {

// The first SIGINT sets a flag that progress callbacks turn into cancellation; a second one
// kills the process as usual.
void install_interrupt_handler();
bool interrupt_requested();

class ProgressDisplay {
 public:
  // `interactive`: redraw one line with a bar (a terminal); else log lines. `quiet`: nothing is
  // written, but interruption still cancels.
  ProgressDisplay(std::FILE* stream, bool interactive, bool quiet = false);
  // For the terminal the process runs in: interactive when `stream` is a TTY.
  static ProgressDisplay for_stream(std::FILE* stream, bool quiet = false);

  // The ProgressCallback: shows the event; returns false once Ctrl-C was pressed.
  bool operator()(const ProgressEvent& event);
  // Ends a bar left on the current line.
  void finish();

  // Writes a message on its own line (ending a bar first).
  void log(const std::string& message);

 private:
  using Clock = std::chrono::steady_clock;
  // One redraw of the bar; `tail` (text) fills what is left of the line.
  void draw(const std::string& label, int64_t current, int64_t total, const std::string& detail,
            const std::string& tail, bool force);

  std::FILE* stream_;
  bool interactive_;
  bool quiet_;
  bool line_open_ = false;           // a bar is drawn on the current line
  std::string text_tail_;            // the end of the generated text, shown after the token bar
  int width_ = 80;                   // terminal columns
  Clock::time_point last_draw_{};    // redraws are limited to ~15 per second
  Clock::time_point stage_start_{};  // start of the current token run or image
  Clock::time_point image_start_{};  // the event before the current image's first step
  Clock::time_point last_event_ = Clock::now();
  ProgressEvent::Stage last_stage_ = ProgressEvent::Stage::EncodeImages;
  int64_t stage_first_ = 0;  // token count / step at stage_start_
  int64_t last_logged_ = -1;
  bool started_ = false;
};

}  // namespace voken::cli
