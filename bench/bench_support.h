// What the benchmarks share: clocks, process memory from /proc, machine load, running a
// measurement in a forked child (so that each gets a fresh process: its own peak RSS, a cold
// allocator, no pages mapped by an earlier measurement), the line naming the CPU and kernel tier
// every benchmark prints first, and the anchor figures of the CPU it runs on.
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

#include "core/cpu.h"

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

// The peers voken is compared with, measured on this project's machines (2 threads; the table in
// ../shared/anchors.md): llama.cpp (7B bf16), diffusers 0.31 eager (SD 2.1-base UNet step at
// batch 2 64x64, VAE decode 512x512) and MiniGPT-4 eager encode_img, on Debian's libtorch 1.13.
struct Anchors {
  const char* machine = nullptr;  // which row; nullptr when this CPU has none
  double llm_decode_tps = 0, llm_prefill_tps = 0;
  double unet_bf16_s = 0, unet_fp32_s = 0, vae_bf16_s = 0, vae_fp32_s = 0;
  double encode_bf16_s = 0, encode_fp32_s = 0;
};

// The anchor row of the CPU this runs on: Intel with AMX (the Sapphire Rapids row) or AMD family
// 26 (the Zen 5 row). Where ranges were measured, the faster end. Anchors were taken at the CPU's
// native ISA: a run with VOKEN_CPU forcing a lower tier is compared with them only as a ratio to
// the same machine's eager code, which the benchmark line says.
inline Anchors anchors_for_this_cpu() {
  const auto& cpu = core::cpu_info();
  Anchors a;
  if (cpu.vendor == "GenuineIntel" && cpu.detected.amx_bf16) {
    a = {"Intel Sapphire Rapids (AMX)", 1.45, 13.4, 5.5, 15.9, 6.9, 12.4, 1.0, 4.0};
  } else if (cpu.vendor == "AuthenticAMD" && cpu.family == 26) {
    a = {"AMD EPYC Zen 5", 1.87, 23.5, 16.4, 40.0, 35.0, 52.0, 1.19, 6.1};
  }
  return a;
}

// The first line of every benchmark: the CPU, its family/model, the kernel tier in use (VOKEN_CPU
// may force a lower one), the threads, and which anchor row applies.
inline void print_machine(const char* benchmark, int threads) {
  const Anchors anchors = anchors_for_this_cpu();
  std::printf("%s: %s, %d threads; anchors: %s\n", benchmark, core::cpu_summary().c_str(), threads,
              anchors.machine ? anchors.machine
                              : "none for this CPU (compare with the closer row of the anchor table)");
  if (core::cpu_info().forced)
    std::printf(
        "%s: tier %s forced by VOKEN_CPU; the anchors were measured at this CPU's own ISA, so "
        "ratios to them understate a forced tier (ONEDNN_MAX_CPU_ISA=%s for libtorch's side)\n",
        benchmark, core::tier_name(core::cpu_tier()),
        std::getenv("ONEDNN_MAX_CPU_ISA") ? std::getenv("ONEDNN_MAX_CPU_ISA") : "unset");
  std::fflush(stdout);
}

}  // namespace voken::bench
