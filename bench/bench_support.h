// What the benchmarks share: clocks, process memory from /proc, machine load, and running a
// measurement in a forked child (so that each gets a fresh process: its own peak RSS, a cold
// allocator, no pages mapped by an earlier measurement).
#pragma once

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace voken::bench {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// User + system CPU seconds of this process so far.
inline double cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// A "Name:   value kB" field of a /proc file, in bytes (0 when absent).
inline double proc_kb_field(const char* path, const char* name) {
  std::ifstream file(path);
  std::string line;
  while (std::getline(file, line))
    if (line.rfind(name, 0) == 0) return std::strtod(line.c_str() + std::strlen(name), nullptr) * 1024.0;
  return 0;
}

// This process's memory (VmRSS, VmHWM = peak VmRSS, RssAnon, RssFile, ...), in bytes.
inline double status_field(const char* name) { return proc_kb_field("/proc/self/status", name); }

inline double load_average() {
  double one = 0;
  std::ifstream("/proc/loadavg") >> one;
  return one;
}

// Runs body() in a forked child and returns its result, which travels back through a pipe as
// raw bytes (so it must be trivially copyable). An exception in the child becomes a
// std::runtime_error here, as does the child dying.
template <typename Result>
Result in_child(const std::string& what, const std::function<Result()>& body) {
  static_assert(std::is_trivially_copyable_v<Result>, "results cross a pipe as raw bytes");
  struct Envelope {
    bool ok = false;
    char error[1024] = {};
    Result value{};
  };
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe: " + std::string(std::strerror(errno)));
  std::cout.flush();  // buffered output would otherwise be printed by both processes
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    ::close(fds[0]);
    Envelope envelope;
    try {
      envelope.value = body();
      envelope.ok = true;
    } catch (const std::exception& e) {
      std::snprintf(envelope.error, sizeof envelope.error, "%s", e.what());
    }
    const auto* bytes = reinterpret_cast<const char*>(&envelope);
    for (std::size_t done = 0; done < sizeof envelope;) {
      const ssize_t n = ::write(fds[1], bytes + done, sizeof envelope - done);
      if (n <= 0) ::_exit(3);
      done += static_cast<std::size_t>(n);
    }
    std::fflush(stdout);
    // _exit: no static destructors or atexit handlers of libtorch in a forked copy.
    ::_exit(envelope.ok ? 0 : 2);
  }
  ::close(fds[1]);
  Envelope envelope;
  auto* bytes = reinterpret_cast<char*>(&envelope);
  std::size_t done = 0;
  while (done < sizeof envelope) {
    const ssize_t n = ::read(fds[0], bytes + done, sizeof envelope - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (done != sizeof envelope)
    throw std::runtime_error(what + ": child died (wait status " + std::to_string(status) +
                             (WIFSIGNALED(status) ? ", signal " + std::to_string(WTERMSIG(status)) : "") +
                             ")");
  if (!envelope.ok) throw std::runtime_error(what + ": " + envelope.error);
  return envelope.value;
}

}  // namespace voken::bench
