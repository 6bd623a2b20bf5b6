// bench_vision: time per image of ImageEncoder::encode (EVA ViT-g + ln_vision + Q-Former +
// llama_proj) at the real MiniGPT-4 shape, in float32 and bf16, with the achieved GFLOP/s next to
// the GEMM peak measured in the same run.
//
// The weights are random, written first in the real containers (eva_vit_g.pth: a bare state dict
// with 40 blocks, of which 39 are built; the BLIP-2 and MiniGPT-4 checkpoints as {"model": ...})
// and loaded through ImageEncoder::load like the real files. They are bf16 on disk; the float32
// run converts them when loading.
//
// Anchor: upstream's eager PyTorch encode_img (ViT-g + Q-Former, 2 threads) takes about 1.0 s per
// image in bf16 and 4.0 s in float32 on this machine class.
//
// GFLOP counts only the matrix products (2 * m * n * k each: patch embedding, every linear, the
// attention products); elementwise work is a few percent of that. The GEMM peak is the best
// rate of at::linear over the ViT's own GEMM shapes (and one large square one), measured right
// before each encode run so that both see the same machine load.
//
// On a machine shared with other jobs, libgomp's default spin-waiting makes 2 threads slower
// than 1 (a spinning thread holds a core the other one needs); run with OMP_WAIT_POLICY=passive
// there. Every rate is also given per CPU-second, which waiting for a core does not inflate.
//
// Usage: bench_vision [--threads N] [--repeat N] [--batch B] [--dtype float32|bf16|both] [--dir D]
//   --threads N  at::set_num_threads (default 2: Debian's libtorch starts with 1 here)
//   --repeat N   timed encode calls per dtype, after one warm-up call; median reported (default 3)
//   --batch B    images per encode call (default 1)
//   --dir D      write the checkpoints into the existing directory D and keep them, or reuse the
//                ones a previous run left there (default: a temporary directory, removed at the end)
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <time.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.h"
#include "core/attention.h"
#include "core/cpu.h"
#include "core/inplace_gemm.h"
#include "io/torch_file.h"
#include "vision/image_encoder.h"

namespace {

namespace fs = std::filesystem;
using Tensors = std::vector<std::pair<std::string, at::Tensor>>;
using voken::vision::ImageEncoder;

// The real shape (create_eva_vit_g, bert-base Q-Former, Vicuna-7B's width).
constexpr int64_t kVitWidth = 1408, kVitStoredBlocks = 40, kVitMlp = 6144, kPatch = 14, kImage = 224;
constexpr int64_t kHidden = 768, kLayers = 12, kIntermediate = 3072, kQueries = 32, kLlmWidth = 4096;

struct Options {
  int threads = 2;
  int repeat = 3;
  int64_t batch = 1;
  bool float32 = true, bf16 = true;
  std::string dir;
};

using voken::bench::seconds_since;

// The first three fields of /proc/loadavg: other processes competing for the same cores make
// every number here slower, so each report says how busy the machine was.
std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return in ? one + " " + five + " " + fifteen : std::string("unknown");
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// ---------------------------------------------------------------------------------------------
// Random checkpoints in the real containers.

class RandomWeights {
 public:
  explicit RandomWeights(uint64_t seed) : gen_(at::make_generator<at::CPUGeneratorImpl>(seed)) {}

  at::Tensor normal(std::vector<int64_t> shape, double std, double mean = 0.0) {
    return at::normal(mean, std, shape, gen_, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
  }
  // Weights scaled like a trained network's (activations keep their size through the blocks).
  void linear(Tensors& out, const std::string& name, int64_t out_features, int64_t in_features,
              bool bias = true) {
    out.emplace_back(name + ".weight",
                     normal({out_features, in_features}, 0.5 / std::sqrt(double(in_features))));
    if (bias) out.emplace_back(name + ".bias", normal({out_features}, 0.02));
  }
  void norm(Tensors& out, const std::string& name, int64_t width) {
    out.emplace_back(name + ".weight", normal({width}, 0.05, 1.0));
    out.emplace_back(name + ".bias", normal({width}, 0.02));
  }

 private:
  at::Generator gen_;
};

voken::io::PickleValue wrapped_in_model(const Tensors& tensors) {
  std::vector<std::pair<std::string, voken::io::PickleValue>> entries;
  for (const auto& [name, tensor] : tensors) entries.emplace_back(name, voken::io::PickleValue::of(tensor));
  return voken::io::PickleValue::dict({{"model", voken::io::PickleValue::dict(std::move(entries))}});
}

voken::vision::ImageEncoderFiles write_checkpoints(const std::string& dir) {
  RandomWeights random(2024);
  const voken::vision::ImageEncoderFiles files{
      dir + "/eva_vit_g.pth", dir + "/blip2_pretrained_flant5xxl.pth", dir + "/prerained_minigpt4_7b.pth"};
  {
    Tensors vit;
    const int64_t tokens = 1 + (kImage / kPatch) * (kImage / kPatch);
    vit.emplace_back("cls_token", random.normal({1, 1, kVitWidth}, 0.02));
    vit.emplace_back("pos_embed", random.normal({1, tokens, kVitWidth}, 0.02));
    vit.emplace_back("patch_embed.proj.weight", random.normal({kVitWidth, 3, kPatch, kPatch}, 0.02));
    vit.emplace_back("patch_embed.proj.bias", random.normal({kVitWidth}, 0.02));
    for (int64_t i = 0; i < kVitStoredBlocks; ++i) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      random.norm(vit, p + "norm1", kVitWidth);
      vit.emplace_back(p + "attn.q_bias", random.normal({kVitWidth}, 0.02));
      vit.emplace_back(p + "attn.v_bias", random.normal({kVitWidth}, 0.02));
      random.linear(vit, p + "attn.qkv", 3 * kVitWidth, kVitWidth, /*bias=*/false);
      random.linear(vit, p + "attn.proj", kVitWidth, kVitWidth);
      random.norm(vit, p + "norm2", kVitWidth);
      random.linear(vit, p + "mlp.fc1", kVitMlp, kVitWidth);
      random.linear(vit, p + "mlp.fc2", kVitWidth, kVitMlp);
    }
    voken::io::save_torch_state_dict(files.vit, vit);
  }
  {
    Tensors blip2;
    blip2.emplace_back("query_tokens", random.normal({1, kQueries, kHidden}, 0.02));
    random.norm(blip2, "ln_vision", kVitWidth);
    random.norm(blip2, "Qformer.bert.embeddings.LayerNorm", kHidden);
    for (int64_t i = 0; i < kLayers; ++i) {
      const std::string p = "Qformer.bert.encoder.layer." + std::to_string(i) + ".";
      for (const char* proj : {"query", "key", "value"})
        random.linear(blip2, p + "attention.self." + proj, kHidden, kHidden);
      random.linear(blip2, p + "attention.output.dense", kHidden, kHidden);
      random.norm(blip2, p + "attention.output.LayerNorm", kHidden);
      if (i % 2 == 0) {
        random.linear(blip2, p + "crossattention.self.query", kHidden, kHidden);
        random.linear(blip2, p + "crossattention.self.key", kHidden, kVitWidth);
        random.linear(blip2, p + "crossattention.self.value", kHidden, kVitWidth);
        random.linear(blip2, p + "crossattention.output.dense", kHidden, kHidden);
        random.norm(blip2, p + "crossattention.output.LayerNorm", kHidden);
      }
      random.linear(blip2, p + "intermediate_query.dense", kIntermediate, kHidden);
      random.linear(blip2, p + "output_query.dense", kHidden, kIntermediate);
      random.norm(blip2, p + "output_query.LayerNorm", kHidden);
    }
    voken::io::save_torch_file(files.qformer, wrapped_in_model(blip2));
  }
  {
    Tensors projection;
    random.linear(projection, "llama_proj", kLlmWidth, kHidden);
    voken::io::save_torch_file(files.projection, wrapped_in_model(projection));
  }
  return files;
}

// ---------------------------------------------------------------------------------------------
// FLOP counts of the matrix products, per image.

struct Flops {
  double vit = 0, qformer = 0, projection = 0;
  double total() const { return vit + qformer + projection; }
};

Flops count_flops(const ImageEncoder& encoder) {
  const auto& vit = encoder.vit();
  const auto& qf = encoder.qformer();
  const double t = static_cast<double>(vit.num_tokens()), d = static_cast<double>(vit.width());
  const double a = static_cast<double>(vit.num_heads() * vit.head_dim()),
               m = static_cast<double>(vit.mlp_hidden());
  const double p = static_cast<double>(vit.patch_size()), c = static_cast<double>(vit.in_channels());
  Flops flops;
  flops.vit = 2 * (t - 1) * d * c * p * p;
  flops.vit +=
      static_cast<double>(vit.depth()) * 2 * (t * d * 3 * a + t * a * d + 2 * t * d * m + 2 * t * t * a);
  const double q = static_cast<double>(qf.num_query_tokens()), h = static_cast<double>(qf.hidden_size());
  const double e = static_cast<double>(qf.encoder_width()), i = static_cast<double>(qf.intermediate_size());
  // Every layer: fused q/k/v, the two attention products, output dense, query feed-forward.
  flops.qformer =
      static_cast<double>(qf.num_layers()) * 2 * (q * h * 3 * h + 2 * q * q * h + q * h * h + 2 * q * h * i);
  // Cross-attention layers: query, key/value over the image tokens, the two products, output dense.
  const double cross_layers = static_cast<double>(qf.cross_attention_layers().size());
  flops.qformer += cross_layers * 2 * (q * h * h + t * e * 2 * h + 2 * q * t * h + q * h * h);
  flops.projection = 2 * q * h * static_cast<double>(encoder.output_width());
  return flops;
}

// ---------------------------------------------------------------------------------------------
// GEMM peak: the best rate of at::linear (x [m, k] times w [n, k]^T) over a few shapes.

// Process CPU seconds (all threads). On a shared machine wall time includes waiting for a core
// and CPU time does not; CPU time does include OpenMP's spin-waiting (OMP_WAIT_POLICY=passive
// removes most of it). Rates per CPU-second are the contention-robust view of efficiency.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Timing {
  double wall = 1e30, cpu = 1e30;  // best of the runs, each on its own
};

Timing time_best(const std::function<void()>& body, int repeat) {
  body();  // warm-up (first-touch, oneDNN primitive creation)
  Timing best;
  for (int r = 0; r < repeat; ++r) {
    const double cpu_start = cpu_seconds();
    const auto start = std::chrono::steady_clock::now();
    body();
    best.wall = std::min(best.wall, seconds_since(start));
    best.cpu = std::min(best.cpu, cpu_seconds() - cpu_start);
  }
  return best;
}

double time_best_wall(const std::function<void()>& body, int repeat) { return time_best(body, repeat).wall; }

struct Rates {
  double wall = 0, cpu = 0;  // GFLOP per second, GFLOP per CPU-second
};

Rates gemm_peak(at::ScalarType dtype, int64_t batch, bool verbose) {
  struct Shape {
    const char* what;
    int64_t m, n, k;
  };
  const int64_t tokens = batch * (1 + (kImage / kPatch) * (kImage / kPatch));
  const std::vector<Shape> shapes = {{"ViT qkv", tokens, 3 * kVitWidth, kVitWidth},
                                     {"ViT fc1", tokens, kVitMlp, kVitWidth},
                                     {"ViT fc2", tokens, kVitWidth, kVitMlp},
                                     {"square 2048", 2048, 2048, 2048},
                                     {"7B prefill", 64, 11008, 4096}};
  Rates peak;
  // bf16 at tier avx2 or above (VOKEN_CPU forces a lower one): the encoder's own kernel
  // (core::inplace_linear, at the process's tier) as well as at::linear; the peak is the best of
  // both, so the encoder is measured against the fastest product available.
  const bool own = dtype == at::kBFloat16 && voken::core::inplace_gemm_supported();
  if (verbose && own)
    std::printf("  core::inplace_linear at tier %s\n", voken::core::tier_name(voken::core::cpu_tier()));
  for (const auto& s : shapes) {
    const auto x = at::randn({s.m, s.k}).to(dtype);
    const auto w = at::randn({s.n, s.k}).to(dtype);
    const double gflop = 2.0 * double(s.m) * double(s.n) * double(s.k) / 1e9;
    for (int kernel = 0; kernel < (own ? 2 : 1); ++kernel) {
      const Timing t = kernel == 0
                           ? time_best([&] { at::linear(x, w); }, 5)
                           : time_best([&] { voken::core::inplace_linear(x, w, {}, at::kBFloat16); }, 5);
      if (verbose)
        std::printf(
            "  gemm %-5s %-12s [%5ld x %5ld] x [%5ld x %5ld]^T  %-15s %8.2f ms  %7.1f GFLOP/s  %7.1f "
            "GFLOP/CPU-s\n",
            dtype == at::kBFloat16 ? "bf16" : "fp32", s.what, long(s.m), long(s.k), long(s.n), long(s.k),
            kernel == 0 ? "at::linear" : "core::inplace_linear", t.wall * 1e3, gflop / t.wall, gflop / t.cpu);
      peak.wall = std::max(peak.wall, gflop / t.wall);
      peak.cpu = std::max(peak.cpu, gflop / t.cpu);
    }
  }
  return peak;
}

// ---------------------------------------------------------------------------------------------
// Attention: batched matmul + softmax (what the ViT does) against at::_scaled_dot_product_attention.

void compare_attention(at::ScalarType dtype, int64_t batch) {
  const int64_t heads = 16, tokens = 257, head_dim = kVitWidth / heads;
  const auto q = at::randn({batch, heads, tokens, head_dim}).to(dtype);
  const auto k = at::randn({batch, heads, tokens, head_dim}).to(dtype);
  const auto v = at::randn({batch, heads, tokens, head_dim}).to(dtype);
  const double scale = 1.0 / std::sqrt(double(head_dim));
  at::Tensor manual, fused;
  const double t_manual = time_best_wall(
      [&] {
        const auto probs = at::softmax(at::matmul(q * scale, k.transpose(-2, -1)), -1);
        manual = at::matmul(probs, v);
      },
      5);
  const double t_fused = time_best_wall(
      [&] { fused = std::get<0>(at::_scaled_dot_product_attention(q, k, v, {}, 0.0, false, false)); }, 5);
  const double diff = (manual.to(at::kFloat) - fused.to(at::kFloat)).abs().max().item<double>();
  std::printf(
      "  attention %-5s [%ld,16,257,88]: matmul+softmax %.2f ms, _scaled_dot_product_attention %.2f ms "
      "(max diff %.2g) per ViT block\n",
      dtype == at::kBFloat16 ? "bf16" : "fp32", long(batch), t_manual * 1e3, t_fused * 1e3, diff);
  if (dtype == at::kBFloat16 && voken::core::cpu_tier() >= voken::core::CpuTier::avx2) {
    // The encoder's kernel (this process's tier; VOKEN_CPU chooses a lower one), on [B, T, heads * D]
    // rows.
    const auto rows = [&](const at::Tensor& t) {
      return t.transpose(1, 2).reshape({batch, tokens, heads * head_dim});
    };
    const auto qr = rows(q), kr = rows(k), vr = rows(v);
    at::Tensor fused_rows;
    const double t_kernel = time_best_wall(
        [&] {
          fused_rows = voken::core::attention(qr, kr, vr, heads, scale,
                                              voken::core::AttentionNumerics::ScaledQueryBf16);
        },
        5);
    const double flops = 4.0 * batch * tokens * tokens * heads * head_dim;
    std::printf(
        "  attention bf16  core::attention (tier %s) %.2f ms = %.0f GFLOP/s per ViT block (matmul+softmax "
        "%.0f GFLOP/s; max diff to it %.2g)\n",
        voken::core::tier_name(voken::core::cpu_tier()), t_kernel * 1e3, flops / t_kernel / 1e9,
        flops / t_manual / 1e9,
        (fused_rows.to(at::kFloat) - rows(manual).to(at::kFloat)).abs().max().item<double>());
  }
}

// ---------------------------------------------------------------------------------------------

void run_dtype(const voken::vision::ImageEncoderFiles& files, at::ScalarType dtype, const Options& options) {
  const char* name = dtype == at::kBFloat16 ? "bf16" : "float32";
  std::printf("\n== %s ==\n", name);
  auto start = std::chrono::steady_clock::now();
  const auto encoder = ImageEncoder::load(files, {}, {dtype});
  std::printf(
      "  load: %.2f s (ViT %ld blocks of %ld stored, width %ld, %ld heads; Q-Former %ld layers; "
      "%ld queries -> %ld)\n",
      seconds_since(start), long(encoder.vit().depth()), long(kVitStoredBlocks), long(encoder.vit().width()),
      long(encoder.vit().num_heads()), long(encoder.qformer().num_layers()), long(encoder.num_query_tokens()),
      long(encoder.output_width()));
  const Flops flops = count_flops(encoder);

  const auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto pixels = at::normal(0.0, 1.0, {options.batch, 3, kImage, kImage}, gen, at::TensorOptions());

  gemm_peak(dtype, options.batch, true);
  compare_attention(dtype, options.batch);

  // The load of a shared machine changes from second to second: the GEMM peak is measured right
  // before every timed encode call and each call is compared with its own peak, by wall time and
  // by CPU time.
  at::Tensor output = encoder.encode(pixels);  // warm-up
  std::vector<double> totals, cpu_totals, peaks, cpu_peaks, ratios, cpu_ratios, vit_times, qformer_times;
  const double gflop = flops.total() * double(options.batch) / 1e9;
  for (int r = 0; r < options.repeat; ++r) {
    const Rates peak = gemm_peak(dtype, options.batch, false);
    const double cpu_start = cpu_seconds();
    start = std::chrono::steady_clock::now();
    output = encoder.encode(pixels);
    const double seconds = seconds_since(start);
    const double cpu = cpu_seconds() - cpu_start;
    totals.push_back(seconds);
    cpu_totals.push_back(cpu);
    peaks.push_back(peak.wall);
    cpu_peaks.push_back(peak.cpu);
    ratios.push_back(gflop / seconds / peak.wall);
    cpu_ratios.push_back(gflop / cpu / peak.cpu);
    // The two big stages on their own, for the breakdown.
    start = std::chrono::steady_clock::now();
    const auto tokens = encoder.apply_ln_vision(encoder.vit().forward(pixels));
    vit_times.push_back(seconds_since(start));
    start = std::chrono::steady_clock::now();
    encoder.qformer().forward(tokens);
    qformer_times.push_back(seconds_since(start));
  }
  const bool finite = output.isfinite().all().item<bool>();
  const double batch = double(options.batch);
  const double per_image = median(totals) / batch;
  std::printf(
      "  encode: %.3f s per image (median of %d calls, batch %ld; fastest %.3f s)  output [%ld, %ld, %ld] "
      "%s%s\n",
      per_image, options.repeat, long(options.batch), *std::min_element(totals.begin(), totals.end()) / batch,
      long(output.size(0)), long(output.size(1)), long(output.size(2)), c10::toString(output.scalar_type()),
      finite ? "" : "  NOT FINITE");
  std::printf("    ViT + ln_vision %.3f s, Q-Former %.3f s per image; CPU time %.3f s per image\n",
              median(vit_times) / batch, median(qformer_times) / batch, median(cpu_totals) / batch);
  std::printf("  GFLOP per image: %.1f (ViT %.1f, Q-Former %.2f, llama_proj %.3f)\n", flops.total() / 1e9,
              flops.vit / 1e9, flops.qformer / 1e9, flops.projection / 1e9);
  std::printf(
      "  wall: achieved %.1f GFLOP/s, GEMM peak %.1f GFLOP/s -> %.0f%% of peak (median per call; best "
      "%.0f%%)\n",
      flops.total() / per_image / 1e9, median(peaks), 100.0 * median(ratios),
      100.0 * *std::max_element(ratios.begin(), ratios.end()));
  std::printf(
      "  CPU:  achieved %.1f GFLOP/CPU-s, GEMM peak %.1f GFLOP/CPU-s -> %.0f%% of peak (median per call; "
      "best %.0f%%)\n",
      flops.total() / (median(cpu_totals) / batch) / 1e9, median(cpu_peaks), 100.0 * median(cpu_ratios),
      100.0 * *std::max_element(cpu_ratios.begin(), cpu_ratios.end()));
  const auto anchors = voken::bench::anchors_for_this_cpu();
  const double anchor = dtype == at::kBFloat16 ? anchors.encode_bf16_s : anchors.encode_fp32_s;
  if (anchor > 0)
    std::printf("  upstream eager anchor %.2f s per image -> %.2fx   (load average now %s)\n", anchor,
                anchor / per_image, load_average().c_str());
  else
    std::printf("  (no upstream anchor for this CPU; load average now %s)\n", load_average().c_str());
}

int run(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--threads") {
      options.threads = std::stoi(value());
    } else if (arg == "--repeat") {
      options.repeat = std::max(1, std::stoi(value()));
    } else if (arg == "--batch") {
      options.batch = std::max<int64_t>(1, std::stoll(value()));
    } else if (arg == "--dtype") {
      const auto d = value();
      options.float32 = d == "float32" || d == "both";
      options.bf16 = d == "bf16" || d == "both";
      if (!options.float32 && !options.bf16)
        throw std::runtime_error("--dtype must be float32, bf16 or both");
    } else if (arg == "--dir") {
      options.dir = value();
    } else {
      std::fprintf(stderr,
                   "usage: bench_vision [--threads N] [--repeat N] [--batch B] [--dtype float32|bf16|both] "
                   "[--dir D]\n");
      return 2;
    }
  }
  at::set_num_threads(options.threads);
  voken::bench::print_machine("bench_vision", at::get_num_threads());
  c10::InferenceMode guard;
  const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
  std::printf(
      "bench_vision: libtorch %s, %d threads (%ld CPUs online), batch %ld, OMP_WAIT_POLICY=%s, load average "
      "%s\n",
      TORCH_VERSION, at::get_num_threads(), sysconf(_SC_NPROCESSORS_ONLN), long(options.batch),
      wait_policy ? wait_policy : "(unset)", load_average().c_str());

  std::string dir = options.dir;
  const bool temporary = dir.empty();
  if (temporary) {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/bench-vision-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir = pattern;
  }
  struct Cleanup {
    std::string dir;
    bool active;
    ~Cleanup() {
      std::error_code ignored;
      if (active) fs::remove_all(dir, ignored);
    }
  } cleanup{dir, temporary};

  auto start = std::chrono::steady_clock::now();
  const voken::vision::ImageEncoderFiles existing{
      dir + "/eva_vit_g.pth", dir + "/blip2_pretrained_flant5xxl.pth", dir + "/prerained_minigpt4_7b.pth"};
  const bool reuse = !temporary && fs::exists(existing.vit) && fs::exists(existing.qformer) &&
                     fs::exists(existing.projection);
  const auto files = reuse ? existing : write_checkpoints(dir);
  std::printf("random bf16 checkpoints %s %s in %.1f s (ViT %.2f GB)\n", reuse ? "reused from" : "written to",
              dir.c_str(), seconds_since(start), double(fs::file_size(files.vit)) / 1e9);

  if (options.bf16) run_dtype(files, at::kBFloat16, options);
  if (options.float32) run_dtype(files, at::kFloat, options);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_vision: %s\n", e.what());
    return 1;
  }
}
