// bench_load: what StateDict::load costs for a LLaMA-sized bf16 checkpoint, in time and in
// resident memory, for safetensors and for a torch.save zip (.pth), compared with the naive
// alternative of read()ing the whole file into a fresh buffer.
//
// Every measurement runs in its own fork()ed child so that (a) the 2 GB the generator holds
// while writing never pollutes a load measurement, (b) each load starts with an empty address
// space as far as the checkpoint is concerned (VmHWM is per process), and (c) OpenMP's thread
// pool is only ever started in children: libgomp is not fork-safe once it has spawned threads,
// so the parent never runs an ATen kernel.
//
// "cold" means: fdatasync + POSIX_FADV_DONTNEED on the file just before the run, and the share
// of the file still in the page cache afterwards (mincore) is printed. On a VM the host may still
// cache the disk image, hence "cold-ish". "warm" is the run right after, with the file cached.
//
// Usage: bench_load [--gb X] [--repeat N] [--threads N] [--dir D] [--keep]
//   --gb X       checkpoint size in GB (1e9 bytes), rounded to whole layers (default 2)
//   --repeat N   runs per measurement; medians are printed (default 3)
//   --threads N  at::set_num_threads(N) in every child (default: libtorch's default)
//   --dir D      write the checkpoints into the existing directory D and keep them
//   --keep       keep the temporary directory
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bench_support.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"

namespace {

namespace fs = std::filesystem;
using voken::bench::in_child;
using voken::bench::seconds_since;

constexpr double kGB = 1e9;
constexpr double kMB = 1e6;

struct Options {
  double gb = 2.0;
  int repeat = 3;
  int threads = 0;  // 0: leave libtorch's default
  std::string dir;
  bool keep = false;
};

// ---------------------------------------------------------------------------------------------
// Process memory, from /proc/self/status (kB there, bytes here).

struct Memory {
  double rss = 0;   // VmRSS: everything resident
  double hwm = 0;   // VmHWM: peak VmRSS of this process
  double anon = 0;  // RssAnon: private memory (heap, copies, copy-on-write pages)
  double file = 0;  // RssFile: file-backed pages mapped in (clean, shared with the page cache)
};

Memory memory_now() {
  Memory m;
  std::ifstream status("/proc/self/status");
  std::string line;
  auto field = [&line](const char* name, double& out) {
    if (line.rfind(name, 0) == 0) out = std::strtod(line.c_str() + std::strlen(name), nullptr) * 1024.0;
  };
  while (std::getline(status, line)) {
    field("VmRSS:", m.rss);
    field("VmHWM:", m.hwm);
    field("RssAnon:", m.anon);
    field("RssFile:", m.file);
  }
  return m;
}

void apply_threads(const Options& options) {
  if (options.threads > 0) at::set_num_threads(options.threads);
}

// ---------------------------------------------------------------------------------------------
// The checkpoint: LLaMA-7B-shaped decoder layers (hidden 4096, MLP 11008), about 405 MB each.

std::vector<std::pair<std::string, std::vector<int64_t>>> layer_shapes(int layers) {
  constexpr int64_t kHidden = 4096;
  constexpr int64_t kMlp = 11008;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (int i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    // Small norm weights too: real checkpoints mix tiny and huge tensors.
    shapes.push_back({p + "input_layernorm.weight", {kHidden}});
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"})
      shapes.push_back({p + "self_attn." + proj + ".weight", {kHidden, kHidden}});
    shapes.push_back({p + "post_attention_layernorm.weight", {kHidden}});
    shapes.push_back({p + "mlp.gate_proj.weight", {kMlp, kHidden}});
    shapes.push_back({p + "mlp.up_proj.weight", {kMlp, kHidden}});
    shapes.push_back({p + "mlp.down_proj.weight", {kHidden, kMlp}});
  }
  return shapes;
}

double shapes_bytes(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes) {
  double bytes = 0;
  for (const auto& [name, shape] : shapes) {
    double numel = 1;
    for (auto d : shape) numel *= static_cast<double>(d);
    bytes += numel * 2;  // bf16
  }
  return bytes;
}

struct WriteResult {
  int tensors = 0;
  double bytes = 0;  // tensor bytes
  double safetensors_s = 0;
  double pth_s = 0;
  double peak_rss = 0;
  int default_threads = 0;
  int threads = 0;
};

// Both writers take the whole tensor list (there is no streaming writer), so the generator
// holds the full checkpoint in memory; that is why it runs in a child of its own.
WriteResult write_checkpoints(const Options& options, int layers, const std::string& safetensors_path,
                              const std::string& pth_path) {
  WriteResult result;
  result.default_threads = at::get_num_threads();
  apply_threads(options);
  result.threads = at::get_num_threads();
  c10::InferenceMode guard;
  at::manual_seed(0);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, shape] : layer_shapes(layers)) {
    // uniform_ straight into bf16: no fp32 temporary, and weight-like magnitudes.
    tensors.emplace_back(name, at::empty(shape, at::kBFloat16).uniform_(-0.05, 0.05));
    result.bytes += static_cast<double>(tensors.back().second.nbytes());
  }
  result.tensors = static_cast<int>(tensors.size());
  auto start = std::chrono::steady_clock::now();
  voken::io::write_safetensors(safetensors_path, tensors, {{"format", "pt"}});
  result.safetensors_s = seconds_since(start);
  start = std::chrono::steady_clock::now();
  voken::io::save_torch_state_dict(pth_path, tensors);
  result.pth_s = seconds_since(start);
  result.peak_rss = memory_now().hwm;
  return result;
}

// ---------------------------------------------------------------------------------------------
// Page cache control.

// Share of the file's pages in the page cache, from mincore on a fresh mapping (which itself
// faults nothing in).
double resident_fraction(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  const auto size = static_cast<std::size_t>(st.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw std::runtime_error("mmap " + path + ": " + std::strerror(errno));
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((size + page - 1) / page);
  double resident = 0;
  if (::mincore(map, size, vec.data()) == 0)
    for (unsigned char v : vec) resident += v & 1;
  ::munmap(map, size);
  return vec.empty() ? 0.0 : resident / static_cast<double>(vec.size());
}

// Drops the file from the page cache as far as an unprivileged call can: dirty pages are not
// dropped, hence the fdatasync first. Returns the share still resident.
double evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  return resident_fraction(path);
}

// ---------------------------------------------------------------------------------------------
// Measurements.

// Resident and private (copied-on-write) bytes of the mappings of `path` in this process, from
// /proc/self/smaps: unlike VmRSS this excludes library code the child faults in on first use.
struct MappingMemory {
  double rss = 0;
  double dirty = 0;  // Private_Dirty: pages copied on write; must stay 0 for a read-only model
};

struct LoadRun {
  double load_s = 0;
  double touch_s = 0;
  Memory before, after_load, after_touch;
  int tensors = 0;
  int in_mapping = 0;            // tensors whose bytes lie inside a mapping of the checkpoint file
  int mappings = 0;              // mappings of the file in /proc/self/maps after load
  double cached_after_load = 0;  // share of the file in the page cache right after load
  MappingMemory map_after_load, map_after_touch;
  double tensor_bytes = 0;
  double checksum = 0;
};

// [start, end) of every mapping of `path` in this process.
std::vector<std::pair<uintptr_t, uintptr_t>> mappings_of(const std::string& path) {
  const std::string canonical = fs::canonical(path).string();
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.size() < canonical.size() ||
        line.compare(line.size() - canonical.size(), canonical.size(), canonical) != 0)
      continue;
    uintptr_t start = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &start, &end) == 2) ranges.emplace_back(start, end);
  }
  return ranges;
}

MappingMemory mapping_memory(const std::string& path) {
  const std::string canonical = fs::canonical(path).string();
  MappingMemory m;
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    const std::string first = line.substr(0, line.find(' '));
    if (first.empty() || first.back() != ':') {  // a mapping's header line: "start-end perms ... path"
      inside = line.size() >= canonical.size() &&
               line.compare(line.size() - canonical.size(), canonical.size(), canonical) == 0;
      continue;
    }
    if (!inside) continue;
    const double kb = std::strtod(line.c_str() + first.size(), nullptr);
    if (first == "Rss:") m.rss += kb * 1024.0;
    if (first == "Private_Dirty:") m.dirty += kb * 1024.0;
  }
  return m;
}

LoadRun measure_load(const Options& options, const std::string& path) {
  apply_threads(options);
  c10::InferenceMode guard;
  LoadRun run;
  run.before = memory_now();
  auto start = std::chrono::steady_clock::now();
  const auto weights = voken::io::StateDict::load(path);
  run.load_s = seconds_since(start);
  run.after_load = memory_now();
  run.map_after_load = mapping_memory(path);

  // Zero-copy check: every tensor's bytes must lie inside the file's mapping.
  const auto ranges = mappings_of(path);
  run.mappings = static_cast<int>(ranges.size());
  const auto keys = weights.keys();
  for (const auto& key : keys) {
    const at::Tensor& t = weights.at(key);
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto end = begin + t.nbytes();
    ++run.tensors;
    run.tensor_bytes += static_cast<double>(t.nbytes());
    for (const auto& [lo, hi] : ranges)
      if (begin >= lo && end <= hi) {
        ++run.in_mapping;
        break;
      }
  }
  // After a cold start this is what load itself read from disk: ideally only the header, but
  // every page fault pulls in a whole readahead window around the faulting page.
  run.cached_after_load = resident_fraction(path);

  // Touch every byte the way inference would: a reduction reading each weight once. Plain
  // bf16 sum (float accumulation inside): sum(kFloat) would first materialise an fp32 copy.
  start = std::chrono::steady_clock::now();
  for (const auto& key : keys) run.checksum += weights.at(key).sum().item<double>();
  run.touch_s = seconds_since(start);
  run.after_touch = memory_now();
  run.map_after_touch = mapping_memory(path);
  return run;
}

struct ReadRun {
  double read_s = 0;
  double sum_s = 0;
  double bytes = 0;
  Memory before, after_read, after_sum;
  double checksum = 0;
};

// The naive loader: read() the whole file into a freshly allocated buffer, then run the same
// reduction over its bytes (as one bf16 tensor; the few header bytes do not matter for timing).
ReadRun measure_read(const Options& options, const std::string& path) {
  apply_threads(options);
  c10::InferenceMode guard;
  ReadRun run;
  run.before = memory_now();
  auto start = std::chrono::steady_clock::now();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  const auto size = static_cast<std::size_t>(st.st_size);
  at::Tensor buffer = at::empty({static_cast<int64_t>(size)}, at::kByte);
  auto* data = static_cast<char*>(buffer.data_ptr());
  for (std::size_t done = 0; done < size;) {
    // Linux caps one read() at ~2 GiB; 64 MiB chunks keep the syscall count low anyway.
    const ssize_t n = ::read(fd, data + done, std::min<std::size_t>(size - done, std::size_t{64} << 20));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error("read " + path + " failed at byte " + std::to_string(done));
    }
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  run.read_s = seconds_since(start);
  run.bytes = static_cast<double>(size);
  run.after_read = memory_now();
  start = std::chrono::steady_clock::now();
  run.checksum = at::from_blob(data, {static_cast<int64_t>(size / 2)}, at::kBFloat16).sum().item<double>();
  run.sum_s = seconds_since(start);
  run.after_sum = memory_now();
  return run;
}

// ---------------------------------------------------------------------------------------------
// Reporting.

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

template <typename Run, typename Field>
double median_of(const std::vector<Run>& runs, Field field) {
  std::vector<double> values;
  for (const auto& run : runs) values.push_back(field(run));
  return median(values);
}

// One (format, cache state) pair: its load runs and its read() baseline runs.
struct Series {
  std::string format;
  std::string cache;
  double file_bytes = 0;
  std::vector<LoadRun> loads;
  std::vector<ReadRun> reads;
};

void print_main_row(const Series& s) {
  const auto& L = s.loads;
  const auto& R = s.reads;
  const double load_s = median_of(L, [](const LoadRun& x) { return x.load_s; });
  const double d_rss = median_of(L, [](const LoadRun& x) { return x.after_load.rss - x.before.rss; });
  const double touch_s = median_of(L, [](const LoadRun& x) { return x.touch_s; });
  const double peak = median_of(L, [](const LoadRun& x) { return x.after_touch.hwm; });
  const double read_s = median_of(R, [](const ReadRun& x) { return x.read_s; });
  const double sum_s = median_of(R, [](const ReadRun& x) { return x.sum_s; });
  const double bytes = L.front().tensor_bytes;
  std::printf("%-11s %-4s %7.3f %9.2f %8.2f %6.2f%% %7.3f %6.2f %8.0f %8.3f %6.2f %9.0fx %9.2f\n",
              s.format.c_str(), s.cache.c_str(), s.file_bytes / kGB, load_s * 1e3, d_rss / kMB,
              100.0 * d_rss / s.file_bytes, touch_s, bytes / touch_s / kGB, peak / kMB, read_s,
              s.file_bytes / read_s / kGB, read_s / load_s, (load_s + touch_s) / (read_s + sum_s));
}

void print_detail_row(const Series& s) {
  const auto& L = s.loads;
  const auto& R = s.reads;
  const double load_anon = median_of(L, [](const LoadRun& x) { return x.after_load.anon - x.before.anon; });
  const double map_load = median_of(L, [](const LoadRun& x) { return x.map_after_load.rss; });
  const double map_touch = median_of(L, [](const LoadRun& x) { return x.map_after_touch.rss; });
  const double map_dirty = median_of(L, [](const LoadRun& x) { return x.map_after_touch.dirty; });
  const double cached = median_of(L, [](const LoadRun& x) { return x.cached_after_load; });
  const double touch_anon = median_of(L, [](const LoadRun& x) { return x.after_touch.anon - x.before.anon; });
  const double touch_hwm = median_of(L, [](const LoadRun& x) { return x.after_touch.hwm - x.before.rss; });
  const double read_anon = median_of(R, [](const ReadRun& x) { return x.after_sum.anon - x.before.anon; });
  const double read_hwm = median_of(R, [](const ReadRun& x) { return x.after_sum.hwm - x.before.rss; });
  const double sum_s = median_of(R, [](const ReadRun& x) { return x.sum_s; });
  const LoadRun& first = L.front();
  const std::string views = std::to_string(first.in_mapping) + "/" + std::to_string(first.tensors) + " (" +
                            std::to_string(first.mappings) + " map)";
  std::printf("%-11s %-4s %8.2f %8.3f %8.1f%% %-14s %9.0f %7.1f %9.1f %9.0f %9.0f %9.0f %8.3f\n",
              s.format.c_str(), s.cache.c_str(), load_anon / kMB, map_load / kMB, 100.0 * cached,
              views.c_str(), map_touch / kMB, map_dirty / kMB, touch_anon / kMB, touch_hwm / kMB,
              read_anon / kMB, read_hwm / kMB, sum_s);
}

std::string fixed(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", decimals, value);
  return text;
}

std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line.empty() ? "?" : line;
}

// The readahead of the block device holding `path`: how much one cold page fault or read()
// pulls in, which decides what a "near-instant" mmap load really reads.
std::string readahead_of(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "?";
  const std::string dev =
      "/sys/dev/block/" + std::to_string(major(st.st_dev)) + ":" + std::to_string(minor(st.st_dev));
  for (const char* queue : {"/queue/read_ahead_kb", "/../queue/read_ahead_kb"}) {  // disk, partition
    std::error_code error;
    const auto file = fs::canonical(dev + queue, error);
    if (!error)
      return file.parent_path().parent_path().filename().string() + " read_ahead_kb " +
             read_first_line(file.string());
  }
  return "read_ahead_kb ? (not a block device)";
}

void print_machine(const WriteResult& written, const std::string& dir) {
  voken::bench::print_machine("bench_load", written.threads);
  const double ram =
      static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  std::printf(
      "machine: nproc %ld, at::get_num_threads() %d (libtorch default %d), %.1f GiB RAM, page %ld B\n",
      ::sysconf(_SC_NPROCESSORS_ONLN), written.threads, written.default_threads, ram / (1024.0 * 1024 * 1024),
      ::sysconf(_SC_PAGESIZE));
  std::printf("         %s, vm.overcommit_memory %s, libtorch %s\n", readahead_of(dir).c_str(),
              read_first_line("/proc/sys/vm/overcommit_memory").c_str(), TORCH_VERSION);
}

// ---------------------------------------------------------------------------------------------

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--gb")
      options.gb = std::stod(value());
    else if (arg == "--repeat")
      options.repeat = std::max(1, std::stoi(value()));
    else if (arg == "--threads")
      options.threads = std::stoi(value());
    else if (arg == "--dir")
      options.dir = value();
    else if (arg == "--keep")
      options.keep = true;
    else if (arg == "--help" || arg == "-h") {
      std::printf("usage: %s [--gb X] [--repeat N] [--threads N] [--dir D] [--keep]\n", argv[0]);
      std::exit(0);
    } else
      throw std::invalid_argument("unknown argument " + arg + " (see --help)");
  }
  if (!(options.gb > 0)) throw std::invalid_argument("--gb must be positive");
  return options;
}

// Removes the working directory on every exit path unless asked to keep it.
struct WorkDir {
  std::string path;
  std::vector<std::string> files;
  bool remove = true;
  ~WorkDir() {
    if (!remove || path.empty()) return;
    std::error_code ignored;
    for (const auto& f : files) fs::remove(f, ignored);
    fs::remove(path, ignored);
  }
};

int run(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const int per_layer_tensors = static_cast<int>(layer_shapes(1).size());
  const double per_layer = shapes_bytes(layer_shapes(1));
  const int layers = std::max(1, static_cast<int>(std::lround(options.gb * kGB / per_layer)));

  WorkDir work;
  if (!options.dir.empty()) {
    work.path = options.dir;
    work.remove = false;
  } else {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/voken_bench_load.XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr)
      throw std::runtime_error("mkdtemp " + pattern + ": " + std::strerror(errno));
    work.path = pattern;
    work.remove = !options.keep;
  }
  struct statvfs vfs {};
  if (::statvfs(work.path.c_str(), &vfs) == 0) {
    const double free_bytes = static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize);
    if (free_bytes < 2.1 * layers * per_layer)
      throw std::runtime_error(work.path + " has " + fixed(free_bytes / kGB, 1) +
                               " GB free; two copies of the " + fixed(layers * per_layer / kGB, 2) +
                               " GB checkpoint need more");
  }

  const std::vector<std::pair<std::string, std::string>> files = {
      {"safetensors", work.path + "/model.safetensors"}, {"pth (zip)", work.path + "/model.pth"}};
  for (const auto& file : files) work.files.push_back(file.second);

  std::printf("voken bench_load: StateDict::load of a bf16 checkpoint, safetensors vs torch.save zip\n");
  std::printf("writing %d LLaMA-7B-shaped layers (%d tensors, %.3f GB) to %s ...\n", layers,
              layers * per_layer_tensors, layers * per_layer / kGB, work.path.c_str());
  const auto written = in_child<WriteResult>("write checkpoints", [&] {
    return write_checkpoints(options, layers, files[0].second, files[1].second);
  });
  print_machine(written, work.path);
  std::printf("write:   safetensors %.2f s (%.2f GB/s), pth %.2f s (%.2f GB/s); generator peak RSS %.0f MB\n",
              written.safetensors_s, fs::file_size(files[0].second) / written.safetensors_s / kGB,
              written.pth_s, fs::file_size(files[1].second) / written.pth_s / kGB, written.peak_rss / kMB);

  // Order per repeat: cold load, warm load, cold read, warm read; each cold run evicts first.
  std::vector<Series> series;
  double still_cached = 0;
  for (const auto& [format, path] : files) {
    Series cold{format, "cold", static_cast<double>(fs::file_size(path)), {}, {}};
    Series warm{format, "warm", cold.file_bytes, {}, {}};
    for (int i = 0; i < options.repeat; ++i) {
      still_cached = std::max(still_cached, evict(path));
      cold.loads.push_back(in_child<LoadRun>("load " + path, [&] { return measure_load(options, path); }));
      warm.loads.push_back(in_child<LoadRun>("load " + path, [&] { return measure_load(options, path); }));
      still_cached = std::max(still_cached, evict(path));
      cold.reads.push_back(in_child<ReadRun>("read " + path, [&] { return measure_read(options, path); }));
      warm.reads.push_back(in_child<ReadRun>("read " + path, [&] { return measure_read(options, path); }));
    }
    series.push_back(std::move(cold));
    series.push_back(std::move(warm));
  }
  std::printf(
      "runs:    median of %d, each in a fresh fork; cold = fdatasync + POSIX_FADV_DONTNEED first "
      "(at most %.2f%% of a file still cached)\n\n",
      options.repeat, 100.0 * still_cached);

  std::printf(
      "load = StateDict::load (mmap); dRSS = VmRSS growth during load (mostly library code run for the\n"
      "first time; the checkpoint's own pages are 'ld map' below); touch = bf16 sum of every tensor;\n"
      "read() = whole file into a fresh buffer; read/load = read() time / load time;\n"
      "mmap/read = (load + touch) / (read() + the same sum)\n");
  std::printf("%-11s %-4s %7s %9s %8s %7s %7s %6s %8s %8s %6s %10s %9s\n", "format", "", "file GB", "load ms",
              "dRSS MB", "of file", "touch s", "GB/s", "peak MB", "read() s", "GB/s", "read/load",
              "mmap/read");
  for (const auto& s : series) print_main_row(s);

  std::printf(
      "\ndetails, MB: ld/tch = after load/touch; anon = growth of private memory; map = resident part of\n"
      "the checkpoint's own mapping (smaps Rss); dirty = its copied-on-write pages; cached = share of the\n"
      "file in the page cache right after load; views = tensors whose bytes lie inside the mapping;\n"
      "peak = VmHWM growth; rd = the read() baseline\n");
  std::printf("%-11s %-4s %8s %8s %9s %-14s %9s %7s %9s %9s %9s %9s %8s\n", "format", "", "ld anon", "ld map",
              "cached", "views", "tch map", "dirty", "tch anon", "tch peak", "rd anon", "rd peak",
              "rd sum s");
  for (const auto& s : series) print_detail_row(s);

  const double reference = series[0].loads.front().checksum;
  bool equal = true;
  for (const auto& s : series)
    for (const auto& run : s.loads) equal = equal && run.checksum == reference;
  std::printf("\nchecksum (sum of per-tensor bf16 sums) %.6g, %s across formats and runs\n", reference,
              equal ? "identical" : "DIFFERENT");
  if (!work.remove) std::printf("kept %s\n", work.path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_load: %s\n", e.what());
    return 1;
  }
}
