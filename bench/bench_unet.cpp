// Stable Diffusion UNet step and VAE decode at SD 2.1-base's real shapes, with random weights in
// the real diffusers layout (config.json + diffusion_pytorch_model.safetensors written to a temp
// dir and read back through the normal loader).
//
//   UNet: batch 2 (classifier-free guidance), 4x64x64 latents, 77x1024 context, fp32 and bf16.
//   VAE:  decode 1x4x64x64 -> 1x3x512x512, fp32 and bf16.
//
// Every time is printed with the achieved GFLOP/s (matrix products and convolutions counted
// analytically from the config) next to the GEMM peak measured in the same run, and against the
// anchor: diffusers 0.31 eager on the same libtorch with 2 threads (UNet step 5.5 s bf16 / 15.9 s
// fp32; VAE decode 6.9 s bf16 / 12.4 s fp32). Also: which convolution memory order oneDNN runs
// faster here, and peak RSS.
//
// Usage: bench_unet [--threads N] [--reps N] [--skip-fp32] [--latent N] [--only unet|vae] [--attention-budget
// SCORES]
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "diffusion/attention_kernels.h"
#include "diffusion/nn_blocks.h"
#include "diffusion/norm_kernels.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "voken/error.h"

using namespace voken;
using namespace voken::diffusion;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double peak_rss_gb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0 / 1024.0;
}

double current_rss_gb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0 / 1024.0;
  return 0;
}

// Best-of timing of `run` (after one warm-up call); returns {min, median} seconds.
std::pair<double, double> time_it(const std::function<void()>& run, int reps) {
  run();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now();
    run();
    times.push_back(now() - t0);
  }
  std::sort(times.begin(), times.end());
  return {times.front(), times[times.size() / 2]};
}

// ---- GEMM peak ------------------------------------------------------------------------------

double gemm_peak(at::ScalarType dtype) {
  c10::InferenceMode guard;
  double best = 0;
  // Square products and the UNet's typical shapes (tokens x width x 4*width feed-forward).
  const std::vector<std::array<int64_t, 3>> shapes = {
      {2048, 2048, 2048}, {4096, 4096, 4096}, {8192, 320, 2560}, {8192, 1280, 5120}, {16384, 1024, 1024}};
  for (const auto& [m, k, n] : shapes) {
    const at::Tensor a = at::randn({m, k}).to(dtype), b = at::randn({k, n}).to(dtype);
    const at::Tensor b_t = b.t().contiguous();
    const auto [t, median] = time_it([&] { at::mm(a, b); }, 3);
    const auto [t_linear, median_linear] = time_it([&] { at::linear(a, b_t); }, 3);
    best = std::max(best, 2.0 * m * k * n / std::min(t, t_linear) / 1e9);
  }
  return best;
}

// ---- convolution memory order -----------------------------------------------------------------

void conv_layouts() {
  c10::InferenceMode guard;
  const int64_t b = 2, c = 320, h = 64;
  const double flops = 2.0 * b * h * h * c * c * 9;
  std::printf("conv 3x3 %ldx%ldx%ldx%ld -> %ld (oneDNN via at::conv2d):\n", b, c, h, h, c);
  for (const auto dtype : {at::kBFloat16, at::kFloat}) {
    for (const bool cl : {false, true}) {
      const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      const at::Tensor x = at::randn({b, c, h, h}).to(dtype).contiguous(format);
      const at::Tensor w = (at::randn({c, c, 3, 3}) * 0.02).to(dtype).contiguous(format);
      const at::Tensor bias = at::zeros({c}).to(dtype);
      const auto [t, median] = time_it([&] { at::conv2d(x, w, bias, 1, 1); }, 3);
      std::printf("  %-8s %-13s %7.1f ms  %6.0f GFLOP/s\n", c10::toString(dtype),
                  cl ? "channels-last" : "NCHW", t * 1e3, flops / t / 1e9);
    }
  }
}

// ---- random diffusers folders -----------------------------------------------------------------

using WeightShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;

// The (key, shape) list a model takes: build it against an empty checkpoint and read the
// "missing" section of the loader's report. (Build with NCHW options: channels-last would
// materialise the zero placeholders.)
WeightShapes expected_weights(const std::function<void(io::WeightLoader&)>& build) {
  io::WeightLoader loader(io::StateDict(), io::WeightOptions{}, "probe");
  build(loader);
  WeightShapes out;
  try {
    loader.finish();
  } catch (const WeightsError& e) {
    std::istringstream lines(e.what());
    const std::regex entry(R"(^    (\S+) \[([0-9, ]*)\]$)");
    std::string line;
    while (std::getline(lines, line)) {
      std::smatch match;
      if (!std::regex_match(line, match, entry)) continue;
      std::vector<int64_t> shape;
      std::istringstream dims(std::regex_replace(match[2].str(), std::regex(","), " "));
      for (int64_t d; dims >> d;) shape.push_back(d);
      out.emplace_back(match[1].str(), shape);
    }
  }
  return out;
}

ComputeOptions probe_options() {
  ComputeOptions options;
  options.channels_last = false;
  return options;
}

// Writes config.json + bf16 safetensors of initialisation-scaled random weights; returns the
// parameter count.
int64_t write_random_model(const std::string& dir, const io::Json& config, const WeightShapes& shapes) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << config.dump(2);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  const std::regex norm_weight(R"((norm\d*|norm_out|group_norm|conv_norm_out)\.weight$)");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  int64_t params = 0;
  for (const auto& [name, shape] : shapes) {
    at::Tensor t = at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat));
    if (std::regex_search(name, norm_weight)) {
      t = 1 + 0.1 * t;
    } else if (shape.size() == 1) {
      t = 0.02 * t;
    } else {
      int64_t fan_in = 1;
      for (std::size_t d = 1; d < shape.size(); ++d) fan_in *= shape[d];
      t = t / std::sqrt(static_cast<double>(fan_in));
    }
    params += t.numel();
    tensors.emplace_back(name, t.to(at::kBFloat16));
  }
  io::write_safetensors(dir + "/diffusion_pytorch_model.safetensors", tensors);
  return params;
}

// ---- FLOP counts (multiply-adds x 2 of convolutions, linear maps and attention products) --------

double conv_flops(int64_t b, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k) {
  return 2.0 * b * h * w * cin * cout * k * k;
}

double resnet_flops(int64_t b, int64_t h, int64_t w, int64_t cin, int64_t cout) {
  return conv_flops(b, h, w, cin, cout, 3) + conv_flops(b, h, w, cout, cout, 3) +
         (cin != cout ? conv_flops(b, h, w, cin, cout, 1) : 0);
}

double transformer_flops(int64_t b, int64_t h, int64_t w, int64_t c, int64_t layers, int64_t seq,
                         int64_t context_dim) {
  const double tokens = static_cast<double>(b) * h * w;
  const double n = static_cast<double>(h) * w;
  double f = 2 * 2.0 * tokens * c * c;  // proj_in, proj_out
  for (int64_t l = 0; l < layers; ++l) {
    f += 4 * 2.0 * tokens * c * c + 2 * 2.0 * b * n * n * c;  // self-attention
    f += 2 * 2.0 * tokens * c * c + 2 * 2.0 * b * seq * context_dim * c + 2 * 2.0 * b * n * seq * c;  // cross
    f += 2.0 * tokens * c * 8 * c + 2.0 * tokens * 4 * c * c;  // GEGLU FF
  }
  return f;
}

double unet_flops(const UNetConfig& cfg, int64_t b, int64_t h, int64_t w, int64_t seq) {
  const auto& ch = cfg.block_out_channels;
  const std::size_t n = ch.size();
  double f = conv_flops(b, h, w, cfg.in_channels, ch[0], cfg.conv_in_kernel);
  std::vector<std::pair<int64_t, int64_t>> sizes;  // spatial size per level
  int64_t hh = h, ww = w, out = ch[0];
  for (std::size_t i = 0; i < n; ++i) {
    sizes.emplace_back(hh, ww);
    const int64_t in = out;
    out = ch[i];
    for (int64_t j = 0; j < cfg.layers_per_block[i]; ++j) {
      f += resnet_flops(b, hh, ww, j == 0 ? in : out, out);
      if (cfg.down_block_types[i] == "CrossAttnDownBlock2D")
        f += transformer_flops(b, hh, ww, out, cfg.transformer_layers_per_block[i], seq,
                               cfg.cross_attention_dim[i]);
    }
    if (i + 1 < n) {
      hh = (hh + 1) / 2;
      ww = (ww + 1) / 2;
      f += conv_flops(b, hh, ww, out, out, 3);
    }
  }
  if (cfg.mid_block_type)
    f += 2 * resnet_flops(b, hh, ww, ch[n - 1], ch[n - 1]) +
         transformer_flops(b, hh, ww, ch[n - 1], cfg.transformer_layers_per_block[n - 1], seq,
                           cfg.cross_attention_dim[n - 1]);
  out = ch[n - 1];
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t mirror = n - 1 - i;
    const auto [lh, lw] = sizes[mirror];
    const int64_t prev = out;
    out = ch[mirror];
    const int64_t in = ch[mirror == 0 ? 0 : mirror - 1];
    const int64_t layers = cfg.layers_per_block[mirror] + 1;
    for (int64_t j = 0; j < layers; ++j) {
      f += resnet_flops(b, lh, lw, (j == 0 ? prev : out) + (j == layers - 1 ? in : out), out);
      if (cfg.up_block_types[i] == "CrossAttnUpBlock2D")
        f += transformer_flops(b, lh, lw, out, cfg.transformer_layers_per_block[mirror], seq,
                               cfg.cross_attention_dim[mirror]);
    }
    if (i + 1 < n) f += conv_flops(b, sizes[mirror - 1].first, sizes[mirror - 1].second, out, out, 3);
  }
  return f + conv_flops(b, h, w, ch[0], cfg.out_channels, cfg.conv_out_kernel);
}

double vae_decode_flops(const VaeConfig& cfg, int64_t b, int64_t h, int64_t w) {
  const auto& ch = cfg.block_out_channels;
  const std::size_t n = ch.size();
  const int64_t top = ch[n - 1];
  double f = conv_flops(b, h, w, cfg.latent_channels, cfg.latent_channels, 1) +
             conv_flops(b, h, w, cfg.latent_channels, top, 3) + 2 * resnet_flops(b, h, w, top, top);
  const double tokens = static_cast<double>(h) * w;
  if (cfg.mid_block_add_attention)
    f += 4 * 2.0 * b * tokens * top * top + 2 * 2.0 * b * tokens * tokens * top;
  int64_t out = top;
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t in = out;
    out = ch[n - 1 - i];
    for (int64_t j = 0; j <= cfg.layers_per_block; ++j) f += resnet_flops(b, h, w, j == 0 ? in : out, out);
    if (i + 1 < n) {
      h *= 2;
      w *= 2;
      f += conv_flops(b, h, w, out, out, 3);
    }
  }
  return f + conv_flops(b, h, w, ch[0], cfg.out_channels, 3);
}

// SD 2.1-base's unet/config.json and vae/config.json (stabilityai/stable-diffusion-2-1-base).
io::Json sd21_unet_config() {
  return io::Json{
      {"_class_name", "UNet2DConditionModel"},
      {"act_fn", "silu"},
      {"attention_head_dim", {5, 10, 20, 20}},
      {"block_out_channels", {320, 640, 1280, 1280}},
      {"center_input_sample", false},
      {"cross_attention_dim", 1024},
      {"down_block_types",
       {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
      {"downsample_padding", 1},
      {"dual_cross_attention", false},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"in_channels", 4},
      {"layers_per_block", 2},
      {"mid_block_scale_factor", 1},
      {"norm_eps", 1e-05},
      {"norm_num_groups", 32},
      {"num_class_embeds", nullptr},
      {"only_cross_attention", false},
      {"out_channels", 4},
      {"sample_size", 64},
      {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
      {"upcast_attention", false},
      {"use_linear_projection", true}};
}

io::Json sd21_vae_config() {
  return io::Json{
      {"_class_name", "AutoencoderKL"},
      {"act_fn", "silu"},
      {"block_out_channels", {128, 256, 512, 512}},
      {"down_block_types",
       {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}},
      {"in_channels", 3},
      {"latent_channels", 4},
      {"layers_per_block", 2},
      {"norm_num_groups", 32},
      {"out_channels", 3},
      {"sample_size", 512},
      {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"}}};
}

// A block with initialisation-scaled random weights (bf16), built through the normal loader.
template <typename Block>
Block random_block(const std::function<Block(io::WeightLoader&)>& build, at::ScalarType dtype) {
  const WeightShapes shapes = expected_weights([&](io::WeightLoader& l) { build(l); });
  io::StateDict state;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(99);
  for (const auto& [name, shape] : shapes) {
    int64_t fan_in = 1;
    for (std::size_t d = 1; d < shape.size(); ++d) fan_in *= shape[d];
    at::Tensor t = at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat));
    t = shape.size() == 1 ? 1 + 0.05 * t : t / std::sqrt(static_cast<double>(fan_in));
    state.insert(name, t.to(dtype), "random");
  }
  io::WeightOptions options;
  options.float_dtype = dtype;
  io::WeightLoader loader(std::move(state), options, "random block");
  return build(loader);
}

// Where a bf16 step goes: the pieces of SD 2.1's top (64x64, 320-wide, 5 heads) level at batch 2.
void breakdown(int reps, at::ScalarType dtype) {
  c10::InferenceMode guard;
  const auto bf16 = dtype;
  const ComputeOptions options;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x =
      at::randn({2, 320, 64, 64}, generator, opts).to(bf16).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor context = at::randn({2, 77, 1024}, generator, opts).to(bf16);
  const at::Tensor temb = at::randn({2, 1280}, generator, opts).to(bf16);
  std::printf("breakdown (%s, batch 2, 64x64x320, min of %d):\n", c10::toString(dtype), reps);
  const auto show = [&](const char* what, double flops, const std::function<void()>& run) {
    const auto t = time_it(run, reps);
    std::printf(
        "  %-44s %8.2f ms %s\n", what, t.first * 1e3,
        flops > 0 ? (std::to_string(static_cast<int>(flops / t.first / 1e9)) + " GFLOP/s").c_str() : "");
  };
  ResnetSettings rs;
  rs.temb_channels = 1280;
  rs.eps = 1e-5;
  const auto resnet = random_block<ResnetBlock2D>(
      [&](io::WeightLoader& l) { return ResnetBlock2D::load(l, "r.", 320, 320, rs); }, bf16);
  show("ResnetBlock2D 320->320", 2 * conv_flops(2, 64, 64, 320, 320, 3), [&] { resnet(x, temb); });
  const GroupNorm norm = resnet.norm1;
  show("  group norm + SiLU", 0, [&] { norm(x, Activation::Silu); });
  show("  conv 3x3", conv_flops(2, 64, 64, 320, 320, 3), [&] { resnet.conv1(x); });
  TransformerSettings ts;
  ts.heads = 5;
  ts.head_dim = 64;
  ts.cross_attention_dim = 1024;
  ts.use_linear_projection = true;
  const auto transformer = random_block<Transformer2D>(
      [&](io::WeightLoader& l) { return Transformer2D::load(l, "t.", 320, ts); }, bf16);
  show("Transformer2D 320, 5 heads", transformer_flops(2, 64, 64, 320, 1, 77, 1024),
       [&] { transformer(x, context, options); });
  const at::Tensor tokens = image_to_tokens(x).contiguous();
  const auto& block = transformer.blocks[0];
  const at::Tensor qkv = at::linear(tokens, block.attn1.qkv_weight);
  const at::Tensor q = qkv.narrow(-1, 0, 320), k = qkv.narrow(-1, 320, 320), v = qkv.narrow(-1, 640, 320);
  const double attention_flops = 2 * 2.0 * 2 * 4096.0 * 4096 * 320;
  if (dtype == at::kBFloat16 && has_amx_bf16())
    show("  self-attention core, fused (4096 tokens)", attention_flops,
         [&] { multi_head_attention(q, k, v, 5, 0.125, false, options.attention_max_scores, true); });
  show("  self-attention core, chunked", attention_flops,
       [&] { multi_head_attention(q, k, v, 5, 0.125, false, options.attention_max_scores, false); });
  show("  qkv projection", 2.0 * 8192 * 320 * 960, [&] { at::linear(tokens, block.attn1.qkv_weight); });
  show("  layer norm", 0, [&] { block.norm1(tokens); });
  const at::Tensor projected = block.ff_in(tokens);
  show("  feed-forward in (8192x320 -> 2560)", 2.0 * 8192 * 320 * 2560, [&] { block.ff_in(tokens); });
  show("  GEGLU", 0, [&] { geglu(projected); });
  show("  residual add", 0, [&] { tokens + tokens; });

  // A rough composition of the whole step: one resnet and one transformer per level, times the
  // number SD 2.1 has there (resnets: 5, 5, 5, 7; transformers: 5, 5, 5, 1 with the mid block).
  if (dtype != at::kBFloat16) return;
  struct Level {
    int64_t size, channels, heads, resnets, transformers;
  };
  double total = 0;
  for (const Level& level : {Level{64, 320, 5, 5, 5}, Level{32, 640, 10, 5, 5}, Level{16, 1280, 20, 5, 5},
                             Level{8, 1280, 20, 7, 1}}) {
    const int64_t c = level.channels, hw = level.size;
    ResnetSettings r;
    r.temb_channels = 1280;
    r.eps = 1e-5;
    const auto block = random_block<ResnetBlock2D>(
        [&](io::WeightLoader& l) { return ResnetBlock2D::load(l, "r.", c, c, r); }, dtype);
    TransformerSettings t;
    t.heads = level.heads;
    t.head_dim = c / level.heads;
    t.cross_attention_dim = 1024;
    t.use_linear_projection = true;
    const auto tf = random_block<Transformer2D>(
        [&](io::WeightLoader& l) { return Transformer2D::load(l, "t.", c, t); }, dtype);
    const at::Tensor xs =
        at::randn({2, c, hw, hw}, generator, opts).to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
    const double tr = time_it([&] { block(xs, temb); }, reps).first;
    const double tt = time_it([&] { tf(xs, context, options); }, reps).first;
    std::printf("  level %2ldx%-2ld: resnet %7.2f ms x %ld, transformer %7.2f ms x %ld = %6.0f ms\n", hw, hw,
                tr * 1e3, level.resnets, tt * 1e3, level.transformers,
                (tr * level.resnets + tt * level.transformers) * 1e3);
    total += tr * level.resnets + tt * level.transformers;
  }
  std::printf("  sum (without up/downsampling and skip-concat widths): %.0f ms\n", total * 1e3);
}

struct Peaks {
  double fp32 = 0, bf16 = 0;
  double of(at::ScalarType dtype) const { return dtype == at::kBFloat16 ? bf16 : fp32; }
};

void report(const char* what, at::ScalarType dtype, std::pair<double, double> t, double flops,
            const Peaks& peaks, double anchor) {
  const double achieved = flops / t.first / 1e9;
  std::printf(
      "%-18s %-9s min %7.3f s  median %7.3f s  %6.0f GFLOP/s = %4.0f%% of %s GEMM peak (%.0f)  "
      "anchor %.1f s -> %.2fx\n",
      what, c10::toString(dtype), t.first, t.second, achieved, 100 * achieved / peaks.of(dtype),
      c10::toString(dtype), peaks.of(dtype), anchor, anchor / t.first);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 3;
  int64_t latent = 64;
  bool skip_fp32 = false;
  std::string only;  // "unet" or "vae"
  ComputeOptions compute;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads" && i + 1 < argc)
      threads = std::atoi(argv[++i]);
    else if (arg == "--reps" && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else if (arg == "--latent" && i + 1 < argc)
      latent = std::atoi(argv[++i]);
    else if (arg == "--skip-fp32")
      skip_fp32 = true;
    else if (arg == "--only" && i + 1 < argc)
      only = argv[++i];
    else if (arg == "--nchw")
      compute.channels_last = false;
    else if (arg == "--attention-budget" && i + 1 < argc)
      compute.attention_max_scores = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--reps N] [--skip-fp32] [--latent N] [--only unet|vae] "
                   "[--attention-budget SCORES]\n",
                   argv[0]);
      return 2;
    }
  }
  // Debian's libtorch starts with one intra-op thread here although two cores exist.
  at::set_num_threads(threads);
  std::printf("bench_unet: %d threads, %d timed reps (after a warm-up), latents %ldx%ld\n",
              at::get_num_threads(), reps, latent, latent);

  Peaks peaks;
  peaks.bf16 = gemm_peak(at::kBFloat16);
  peaks.fp32 = gemm_peak(at::kFloat);
  std::printf("GEMM peak (at::mm / at::linear, best of 5 shapes): bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s\n",
              peaks.bf16, peaks.fp32);
  conv_layouts();
  if (only != "vae") {
    breakdown(std::max(2, reps), at::kBFloat16);
    if (!skip_fp32) breakdown(std::max(2, reps), at::kFloat);
  }

  char pattern[] = "/tmp/voken-bench-unet-XXXXXX";
  const char* made = mkdtemp(pattern);
  if (!made) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string tmp = made;
  int status = 0;
  try {
    std::vector<at::ScalarType> dtypes = {at::kBFloat16};
    if (!skip_fp32) dtypes.push_back(at::kFloat);
    auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    if (only != "vae") {
      // UNet.
      const io::Json unet_json = sd21_unet_config();
      const UNetConfig unet_config =
          UNetConfig::from_json(io::JsonView(unet_json, "sd21-base unet/config.json"));
      double t0 = now();
      const int64_t unet_params =
          write_random_model(tmp + "/unet", unet_json, expected_weights([&](io::WeightLoader& l) {
                               UNet2DCondition unet(unet_config, l, probe_options());
                             }));
      std::printf("UNet: %.0fM parameters written (bf16 safetensors) in %.1f s\n", unet_params / 1e6,
                  now() - t0);
      const int64_t batch = 2, seq = 77;
      const double unet_gflop = unet_flops(unet_config, batch, latent, latent, seq);
      std::printf("UNet step: %.0f GFLOP (batch %ld, %ldx%ld latents, %ld context tokens)\n",
                  unet_gflop / 1e9, batch, latent, latent, seq);
      const at::Tensor sample = at::randn({batch, 4, latent, latent}, generator, f32);
      const at::Tensor context = at::randn({batch, seq, 1024}, generator, f32);
      const at::Tensor timestep = at::full({1}, 981, at::TensorOptions().dtype(at::kLong));
      for (const auto dtype : dtypes) {
        t0 = now();
        const auto unet = UNet2DCondition::load(tmp + "/unet", dtype, compute);
        std::printf("UNet %s loaded in %.1f s, RSS %.2f GB\n", c10::toString(dtype), now() - t0,
                    current_rss_gb());
        at::Tensor out;
        const auto t = time_it([&] { out = unet.forward(sample, timestep, context); }, reps);
        if (!at::isfinite(out).all().item<bool>()) std::printf("  (warning: non-finite output)\n");
        report("UNet step", dtype, t, unet_gflop, peaks, dtype == at::kBFloat16 ? 5.5 : 15.9);
        std::printf("  RSS after: %.2f GB, peak so far %.2f GB\n", current_rss_gb(), peak_rss_gb());
      }
      // The bf16 step with NCHW activations, for the record of the layout choice.
      {
        ComputeOptions nchw;
        nchw.channels_last = false;
        const auto unet = UNet2DCondition::load(tmp + "/unet", at::kBFloat16, nchw);
        const auto t = time_it([&] { unet.forward(sample, timestep, context); }, 1);
        report("UNet step (NCHW)", at::kBFloat16, t, unet_gflop, peaks, 5.5);
      }
    }
    if (only != "unet") {
      // VAE decode.
      const io::Json vae_json = sd21_vae_config();
      const VaeConfig vae_config = VaeConfig::from_json(io::JsonView(vae_json, "sd21-base vae/config.json"));
      const int64_t vae_params = write_random_model(
          tmp + "/vae", vae_json,
          expected_weights([&](io::WeightLoader& l) { AutoencoderKL vae(vae_config, l, probe_options()); }));
      const double vae_gflop = vae_decode_flops(vae_config, 1, latent, latent);
      std::printf("VAE: %.0fM parameters; decode 1x4x%ldx%ld -> %ldx%ld: %.0f GFLOP\n", vae_params / 1e6,
                  latent, latent, latent * 8, latent * 8, vae_gflop / 1e9);
      const at::Tensor latents = at::randn({1, 4, latent, latent}, generator, f32);
      for (const auto dtype : dtypes) {
        const auto vae = AutoencoderKL::load(tmp + "/vae", dtype, compute);
        at::Tensor image;
        const auto t = time_it([&] { image = vae.decode(latents); }, reps);
        if (!at::isfinite(image).all().item<bool>()) std::printf("  (warning: non-finite output)\n");
        report("VAE decode", dtype, t, vae_gflop, peaks, dtype == at::kBFloat16 ? 6.9 : 12.4);
        std::printf("  RSS after: %.2f GB, peak so far %.2f GB\n", current_rss_gb(), peak_rss_gb());
      }
    }
    // The machine is shared: measure the peak again and show the better one.
    Peaks again{gemm_peak(at::kFloat), gemm_peak(at::kBFloat16)};
    std::printf("GEMM peak re-measured at the end: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s\n", again.bf16,
                again.fp32);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_unet: %s\n", e.what());
    status = 1;
  }
  std::filesystem::remove_all(tmp);
  std::printf("peak RSS %.2f GB\n", peak_rss_gb());
  return status;
}
