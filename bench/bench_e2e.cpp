// bench_e2e: MiniGPT-5 end to end through voken::Pipeline, on random-weight bundles written in
// the real file formats (pipeline/random_bundle.h): the tiny shape and the real one (Vicuna-7B,
// EVA ViT-g + Q-Former, 4096 -> 1024 mapper, SD 2.1-base; bfloat16 on disk, about 18 GB, loaded
// by memory-mapping).
//
// Per shape, each step in its own child process (fork: a separate peak RSS per step, and
// libgomp never runs in the parent, which is not fork-safe once its thread pool exists):
//   write     write_random_bundle into --dir (or a fresh directory under $TMPDIR / /tmp, removed
//             at the end unless --keep); bytes and seconds;
//   run       Pipeline::load(bundle.json), then generate_interleaved with a text, a 640x480
//             image and a text segment, force_image (upstream's force_generation) and max_images 1,
//             so exactly one image comes out at --size (default 512x512) after --steps denoising
//             steps; printed: load time, the StageTimings, prompt positions, tokens generated,
//             prefill and decode rates, seconds per denoising step, peak RSS (VmHWM) against the
//             weight bytes on disk.
// Measured on this 2-core AMX machine, quiet (load < 0.5), 2 threads, seed 0, 50 steps, 512x512:
//   real shape: write 19.2 GB in 254 s (writer peak RSS 2.4 GB); load 22 s (page cache warm;
//   84 s cold under load); encode_images 1.9 s, prefill 115 positions 9.9 s, decode 1.09 s/token
//   (64 tokens), mapping 0.3 s, diffusion 2.2 s/step + VAE 3.0 s; total 197 s; peak RSS 22.2 GB
//   (mapped weight pages included) against 19.2 GB of files.
//   tiny shape: 1.5 s per denoising step at 512x512 (float32 64x64 latents), the rest < 0.3 s.
// The text is random-weight text (the response is printed, labelled as such). A bundle already
// present in --dir (bundle.json) is reused instead of written again.
//
// Usage: bench_e2e [--shapes tiny,real] [--dir D] [--keep] [--steps N] [--size S]
//                  [--max-new-tokens N] [--threads N] [--seed N] [--dtype float32|bfloat16]
//   --shapes          which shapes, comma-separated (default tiny,real)
//   --dir D           where the bundles go: D/tiny, D/real (default: a temporary directory)
//   --keep            keep the bundles written (default: removed afterwards)
//   --steps N         denoising steps (default 50, upstream's)
//   --size S          image height and width (default 512)
//   --max-new-tokens  token budget (default 64; upstream's 256 takes ~3 minutes at the real shape)
//   --threads N       intra-op threads (default 2)
//   --seed N          bundle and generation seed (default 0)
//   --dtype D         LoadOptions::dtype (default: the bundle's: float32 tiny, bfloat16 real)
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "bench_support.h"
#include "pipeline/random_bundle.h"
#include "voken/pipeline.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

using voken::bench::seconds_since;

struct Options {
  std::vector<std::string> shapes = {"tiny", "real"};
  std::string dir;
  bool keep = false;
  int64_t steps = 50;
  int64_t size = 512;
  int64_t max_new_tokens = 64;
  int threads = 2;
  uint64_t seed = 0;
  std::string dtype;
};

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> out;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, separator);)
    if (!item.empty()) out.push_back(item);
  return out;
}

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_e2e: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--shapes") {
      options.shapes = split(value(), ',');
    } else if (arg == "--dir") {
      options.dir = value();
    } else if (arg == "--keep") {
      options.keep = true;
    } else if (arg == "--steps") {
      options.steps = std::stoll(value());
    } else if (arg == "--size") {
      options.size = std::stoll(value());
    } else if (arg == "--max-new-tokens") {
      options.max_new_tokens = std::stoll(value());
    } else if (arg == "--threads") {
      options.threads = std::stoi(value());
    } else if (arg == "--seed") {
      options.seed = std::stoull(value());
    } else if (arg == "--dtype") {
      options.dtype = value();
    } else {
      std::fprintf(stderr, "bench_e2e: unknown argument %s (see the header of bench/bench_e2e.cpp)\n",
                   arg.c_str());
      std::exit(2);
    }
  }
  for (const auto& shape : options.shapes)
    if (shape != "tiny" && shape != "real") {
      std::fprintf(stderr, "bench_e2e: unknown shape '%s' (tiny, real)\n", shape.c_str());
      std::exit(2);
    }
  return options;
}

// VmHWM of this process in bytes.
double peak_rss() { return voken::bench::status_field("VmHWM:"); }

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

double directory_bytes(const fs::path& dir) {
  double total = 0;
  for (const auto& entry : fs::recursive_directory_iterator(dir))
    if (entry.is_regular_file()) total += static_cast<double>(entry.file_size());
  return total;
}

// Runs `body` in a child process; true when it exited normally with status 0.
bool in_child(const std::string& what, const std::function<void()>& body) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fork");
    return false;
  }
  if (pid == 0) {
    int code = 0;
    try {
      body();
    } catch (const std::exception& e) {
      std::printf("  %s failed: %s\n", what.c_str(), e.what());
      code = 1;
    }
    std::fflush(stdout);
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) std::printf("  %s: child killed by signal %d\n", what.c_str(), WTERMSIG(status));
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// A 640x480 RGB test picture: smooth gradients with a disc, so that resizing and cropping see
// structure (the weights are random, the content only has to be a valid photo-sized image).
voken::Image test_picture() {
  voken::Image image(640, 480);
  for (int y = 0; y < image.height; ++y) {
    uint8_t* row = image.row(y);
    for (int x = 0; x < image.width; ++x) {
      const int dx = x - 320, dy = y - 240;
      const bool disc = dx * dx + dy * dy < 120 * 120;
      row[3 * x + 0] = static_cast<uint8_t>(disc ? 230 : x * 255 / 640);
      row[3 * x + 1] = static_cast<uint8_t>(disc ? 120 : y * 255 / 480);
      row[3 * x + 2] = static_cast<uint8_t>(disc ? 40 : 128);
    }
  }
  return image;
}

void write_bundle(const std::string& dir, const voken::pipeline::RandomBundleShape& shape, uint64_t seed) {
  const auto start = Clock::now();
  double bytes = 0;
  int files = 0;
  voken::pipeline::write_random_bundle(dir, shape, seed, [&](const std::string& file, int64_t size) {
    bytes += static_cast<double>(size);
    ++files;
    if (size > (int64_t{256} << 20))
      std::printf("    %-58s %6.2f GB  (%.0f s)\n", file.c_str(), static_cast<double>(size) / 1e9,
                  seconds_since(start));
    std::fflush(stdout);
  });
  const double seconds = seconds_since(start);
  std::printf("  write: %d files, %.2f GB in %.1f s (%.0f MB/s), peak RSS of the writer %.2f GB\n", files,
              bytes / 1e9, seconds, bytes / 1e6 / seconds, peak_rss() / 1e9);
}

void run_bundle(const std::string& manifest, const Options& options, double weight_bytes) {
  voken::LoadOptions load_options;
  load_options.num_threads = options.threads;
  load_options.dtype = options.dtype;
  const auto load_start = Clock::now();
  const voken::Pipeline pipe = voken::Pipeline::load(manifest, load_options);
  const double load_seconds = seconds_since(load_start);
  const double rss_after_load = peak_rss();
  std::printf("  load: %.1f s, peak RSS %.2f GB\n", load_seconds, rss_after_load / 1e9);
  std::printf("  %s\n", pipe.describe().c_str());

  voken::GenerateOptions generate;
  generate.seed = options.seed;
  generate.force_image = true;
  generate.max_images = 1;
  generate.text.max_new_tokens = options.max_new_tokens;
  generate.image.steps = options.steps;
  generate.image.height = options.size;
  generate.image.width = options.size;
  const std::vector<voken::Segment> segments = {
      voken::Segment::text("A story in pictures. Here is how it starts:"),
      voken::Segment::image(test_picture()), voken::Segment::text("What happens next? Show me.")};

  int64_t steps_seen = 0;
  double last_step_at = 0, image_done_at = 0;
  const auto run_start = Clock::now();
  const auto progress = [&](const voken::ProgressEvent& event) {
    if (event.stage == voken::ProgressEvent::Stage::Denoise) {
      ++steps_seen;
      last_step_at = seconds_since(run_start);
      if (event.current % 10 == 0 || event.current == event.total) {
        std::printf("    denoise step %lld/%lld at %.1f s\n", static_cast<long long>(event.current),
                    static_cast<long long>(event.total), seconds_since(run_start));
        std::fflush(stdout);
      }
    }
    if (event.stage == voken::ProgressEvent::Stage::ImageDone) image_done_at = seconds_since(run_start);
    return true;
  };
  const voken::GenerateResult result = pipe.generate_interleaved(segments, generate, progress);
  const double run_seconds = seconds_since(run_start);
  const double rss = peak_rss();

  const auto& t = result.timings;
  int64_t images = 0;
  std::string image_size = "none";
  for (const auto& segment : result.segments)
    if (segment.is_image()) {
      ++images;
      image_size = std::to_string(segment.image().width) + "x" + std::to_string(segment.image().height);
    }
  std::string text = result.raw_text.substr(0, 160);
  for (char& c : text)
    if (c == '\n') c = ' ';
  std::printf("  response (random weights): \"%s%s\"\n", text.c_str(),
              result.raw_text.size() > 160 ? "..." : "");
  std::printf("  images out: %lld (%s); stop: %s\n", static_cast<long long>(images), image_size.c_str(),
              result.stop_reason.c_str());
  std::printf("  prompt positions %lld, tokens generated %lld\n",
              static_cast<long long>(result.prompt_tokens), static_cast<long long>(result.generated_tokens));
  std::printf(
      "  stage times [s]: encode_images %.2f | prefill %.2f | decode %.2f | mapping %.3f | diffusion %.1f |"
      " total %.1f (wall %.1f)\n",
      t.encode_images, t.prefill, t.decode, t.mapping, t.diffusion, t.total, run_seconds);
  if (t.prefill > 0)
    std::printf("  prefill: %.1f positions/s\n", static_cast<double>(result.prompt_tokens) / t.prefill);
  if (t.decode > 0 && result.generated_tokens > 0)
    std::printf("  decode: %.2f tokens/s (%.3f s/token, vokens forced included in the time)\n",
                static_cast<double>(result.generated_tokens) / t.decode,
                t.decode / static_cast<double>(result.generated_tokens));
  if (steps_seen > 0) {
    // The VAE decode runs between the last denoising step and the image's ImageDone event.
    const double vae = image_done_at > last_step_at ? image_done_at - last_step_at : 0.0;
    std::printf(
        "  diffusion: %lld steps, %.2f s/step (UNet on the CFG batch of 2 + scheduler), VAE decode %.1f s\n",
        static_cast<long long>(steps_seen), (t.diffusion - vae) / static_cast<double>(steps_seen), vae);
  }
  std::printf("  peak RSS %.2f GB (after load %.2f GB) vs %.2f GB of weights on disk (%.0f%%)\n", rss / 1e9,
              rss_after_load / 1e9, weight_bytes / 1e9, 100.0 * rss / weight_bytes);
  if (images != 1) throw std::runtime_error("expected exactly one image (force_image, max_images 1)");
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  std::string root = options.dir;
  bool remove_root = false;
  if (root.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/voken-bench-e2e-XXXXXX";
    if (!::mkdtemp(pattern.data())) {
      std::perror("mkdtemp");
      return 1;
    }
    root = pattern;
    remove_root = !options.keep;
  }
  voken::bench::print_machine("bench_e2e", options.threads);
  std::printf(
      "bench_e2e: threads %d, steps %lld, image %lldx%lld, max_new_tokens %lld, seed %llu, load average %s\n",
      options.threads, static_cast<long long>(options.steps), static_cast<long long>(options.size),
      static_cast<long long>(options.size), static_cast<long long>(options.max_new_tokens),
      static_cast<unsigned long long>(options.seed), load_average().c_str());
  bool ok = true;
  for (const auto& name : options.shapes) {
    const auto shape = name == "tiny" ? voken::pipeline::RandomBundleShape::tiny()
                                      : voken::pipeline::RandomBundleShape::minigpt5();
    const std::string dir = root + "/" + name;
    const std::string manifest = dir + "/bundle.json";
    std::printf("\n== %s shape (%s)\n", name.c_str(), dir.c_str());
    const bool reuse = fs::exists(manifest);
    if (reuse) {
      std::printf("  reusing the bundle already in %s\n", dir.c_str());
    } else {
      struct statvfs disk {};
      fs::create_directories(dir);
      if (::statvfs(dir.c_str(), &disk) == 0) {
        const double available = static_cast<double>(disk.f_bavail) * static_cast<double>(disk.f_frsize);
        const double needed = name == "real" ? 19e9 : 0.1e9;
        std::printf("  disk: %.1f GB available, about %.1f GB needed\n", available / 1e9, needed / 1e9);
        if (available < needed) {
          std::printf("  skipped: not enough disk space in %s (use --dir)\n", dir.c_str());
          ok = false;
          continue;
        }
      }
      if (!in_child("write", [&] { write_bundle(dir, shape, options.seed); })) {
        ok = false;
        continue;
      }
    }
    const double weight_bytes = directory_bytes(dir);
    ok = in_child("run", [&] { run_bundle(manifest, options, weight_bytes); }) && ok;
    if (!reuse && !options.keep && !remove_root) fs::remove_all(dir);
  }
  if (remove_root) fs::remove_all(root);
  return ok ? 0 : 1;
}
