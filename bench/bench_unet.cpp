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
// Measured (2 threads, OMP_WAIT_POLICY=passive, 2026-11-22; this VM's speed varies by up to ~1.5x
// from run to run, so several runs are quoted as min-of-reps ranges, medians in brackets):
//   UNet step bf16  2.02-2.62 s [2.38-2.98] = 2.1-2.7x the anchor, 614-796 GFLOP/s, 52-91% of
//                   the at::mm bf16 peak measured in the same run (packed AMX convolutions run at
//                   650-1350 GFLOP/s, so that peak understates the machine);
//   UNet step fp32  16.2-16.8 s (0.95-0.98x; 14.1 s with OPENBLAS_CORETYPE=SkylakeX, 1.13x);
//   VAE decode bf16 3.0-4.8 s [4.0-5.2] = 1.45-2.3x; fp32 13.6-16.3 s (0.76-0.91x: 91% of it is
//                   oneDNN's fp32 3x3 convolutions, the same calls diffusers makes);
//   peak RSS 5.3 GB for the whole run (UNet bf16 alone 3.5 GB).
//
// Usage: bench_unet [--threads N] [--reps N] [--skip-fp32] [--latent N] [--only unet|vae] [--attention-budget
// SCORES] [--kernels] [--attention]
//   --kernels: only the table of packed products (convolutions, stride-2 convolutions, GEGLU and
//   linear layers at SD 2.1's shapes) against libtorch, at the process's CPU tier; VOKEN_CPU=avx2,
//   avx512 or avx512_bf16 forces a lower tier (and ONEDNN_MAX_CPU_ISA / OPENBLAS_CORETYPE make
//   libtorch's side behave as on that CPU).
//   --attention: only the attention table, core::attention at this process's tier against the
//   chunked path (VOKEN_CPU chooses a lower tier).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>
#include <dlfcn.h>
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
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_support.h"
#include "core/attention.h"
#include "core/cpu.h"
#include "core/norm_kernels.h"
#include "core/packed_gemm.h"
#include "diffusion/nn_blocks.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "voken/error.h"

using namespace voken;
using namespace voken::diffusion;
using voken::core::geglu;
using voken::core::group_norm;
using voken::core::pack_geglu_weight;
using voken::core::pack_gemm_weight;
using voken::core::packed_conv2d;
using voken::core::packed_conv2d_stride2;
using voken::core::packed_gemm_supported;
using voken::core::packed_linear;

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double peak_rss_gb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0 / 1024.0;
}

double current_rss_gb() { return voken::bench::status_field("VmRSS:") / (1024.0 * 1024.0 * 1024.0); }

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

// ---- per-operation profile (--profile) ----------------------------------------------------------
//
// Times every outermost ATen operation (and voken's named scopes, see profile_scope.h) called on the
// profiling thread through a RecordFunction callback, keyed by name, input shapes and memory order:
// where a step's time goes without touching the library's code paths. Time between operations
// (voken's own kernels) shows up as the difference to the wall time.
struct OpStats {
  int64_t calls = 0;
  double seconds = 0;
};

class OpProfiler {
 public:
  explicit OpProfiler(int max_depth) {
    max_depth_ = max_depth;
    stats_.clear();
    thread_ = std::this_thread::get_id();
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&OpProfiler::start, &OpProfiler::end)
                                        .needsInputs(true)
                                        .scopes({at::RecordScope::FUNCTION, at::RecordScope::USER_SCOPE}));
  }
  ~OpProfiler() { at::removeCallback(handle_); }

  // The `top` most expensive keys, then the total.
  void print(double wall, std::size_t top) const {
    std::vector<std::pair<std::string, OpStats>> rows(stats_.begin(), stats_.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    double outer = 0;
    std::map<std::string, OpStats> by_name;
    for (const auto& [key, s] : rows) {
      const std::string name = key.substr(0, key.find(' '));
      by_name[name].calls += s.calls;
      by_name[name].seconds += s.seconds;
    }
    for (const auto& [key, s] : rows)
      if (key.rfind("1|", 0) == 0) outer += s.seconds;
    std::printf("profile: wall %.1f ms, outermost recorded %.1f ms\n", wall * 1e3, outer * 1e3);
    std::vector<std::pair<std::string, OpStats>> names(by_name.begin(), by_name.end());
    std::sort(names.begin(), names.end(),
              [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    std::printf("  by name (depth|name: calls, ms):\n");
    for (const auto& [name, s] : names)
      if (s.seconds * 1e3 >= 0.5)
        std::printf("    %-50s %5ld %9.1f\n", name.c_str(), s.calls, s.seconds * 1e3);
    std::printf("  by name and shapes (top %zu):\n", top);
    for (std::size_t i = 0; i < rows.size() && i < top; ++i)
      std::printf("    %5ld %9.1f ms  %s\n", rows[i].second.calls, rows[i].second.seconds * 1e3,
                  rows[i].first.c_str());
  }

 private:
  struct Context : at::ObserverContext {
    double start = 0;
    std::string key;
  };

  static std::unique_ptr<at::ObserverContext> start(const at::RecordFunction& fn) {
    if (std::this_thread::get_id() != thread_) return nullptr;
    ++depth_;
    if (depth_ > max_depth_) return nullptr;
    auto context = std::make_unique<Context>();
    std::ostringstream key;
    key << depth_ << "|" << fn.name();
    for (const auto& input : fn.inputs()) {
      if (!input.isTensor()) continue;
      const at::Tensor& t = input.toTensor();
      if (!t.defined()) continue;
      key << " [";
      for (int64_t d = 0; d < t.dim(); ++d) key << (d ? "," : "") << t.size(d);
      key << "]";
      if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
        key << "cl";
      else if (!t.is_contiguous())
        key << "strided";
    }
    context->key = key.str();
    context->start = now();
    return context;
  }
  static void end(const at::RecordFunction&, at::ObserverContext* base) {
    if (std::this_thread::get_id() != thread_) return;
    --depth_;
    auto* context = static_cast<Context*>(base);
    if (!context) return;
    auto& s = stats_[context->key];
    ++s.calls;
    s.seconds += now() - context->start;
  }

  static inline std::thread::id thread_;
  static inline int depth_ = 0;
  static inline int max_depth_ = 1;
  static inline std::map<std::string, OpStats> stats_;
  at::CallbackHandle handle_ = 0;
};

// (CPU time, bench::cpu_seconds: on a shared machine, CPU time divided by the thread count is a
// steadier measure of a parallel kernel than wall time; time spent descheduled is not counted,
// cache sharing still is.)
using voken::bench::cpu_seconds;

// Min over reps (after a warm-up) of wall time and of CPU time per thread.
std::pair<double, double> time_wall_cpu(const std::function<void()>& run, int reps, bool warm_up = true) {
  if (warm_up) run();
  double wall = 1e30, cpu = 1e30;
  for (int i = 0; i < reps; ++i) {
    const double c0 = cpu_seconds(), t0 = now();
    run();
    wall = std::min(wall, now() - t0);
    cpu = std::min(cpu, (cpu_seconds() - c0) / at::get_num_threads());
  }
  return {wall, cpu};
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

// ---- attention (--attention) ---------------------------------------------------------------------
//
// core::attention at this process's tier (VOKEN_CPU chooses a lower one) against the chunked
// bmm + softmax + bmm path, at the UNet's and the VAE's shapes (batch 2 = classifier-free guidance).
// The chunked path's bf16 bmm runs in oneDNN at the CPU's own ISA whatever VOKEN_CPU says: cap it
// with ONEDNN_MAX_CPU_ISA (AVX512_CORE, AVX512_CORE_BF16) to see it as such a CPU runs it.
//
// Measured (this Sapphire Rapids VM, 2026-12-05, 1 thread, CPU time, machine load 3-6), 64x64
// self-attention: amx 240-400 GFLOP/s; avx512_bf16 61-79 (vdpbf16ps runs at half the FMA rate
// here, 83 GFLOP/s per core: not Zen's ratio); avx512 84-127 (FMA peak 165); avx2 50-64 (peak 82).
// The chunked path with oneDNN capped at the same ISA: 10-20 GFLOP/s.
void attention_kernels(int reps) {
  c10::InferenceMode guard;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  struct Shape {
    const char* what;
    int64_t batch, queries, keys, heads, head_dim;
  };
  std::printf("attention, tier %s, min of %d, FLOPs = 4 B Tq Tk H D:\n",
              voken::core::tier_name(voken::core::cpu_tier()), reps);
  for (const Shape& s :
       {Shape{"UNet 64x64 self", 2, 4096, 4096, 5, 64}, Shape{"UNet 32x32 self", 2, 1024, 1024, 10, 64},
        Shape{"UNet 16x16 self", 2, 256, 256, 20, 64}, Shape{"UNet 64x64 cross", 2, 4096, 77, 5, 64},
        Shape{"UNet 32x32 cross", 2, 1024, 77, 10, 64}, Shape{"VAE mid-block", 1, 4096, 4096, 1, 512}}) {
    const int64_t inner = s.heads * s.head_dim;
    // q from a fused qkv product (strided rows), k and v from a context projection.
    const at::Tensor qkv = at::randn({s.batch, s.queries, 3 * inner}, generator, f32).to(at::kBFloat16);
    const at::Tensor kv = at::randn({s.batch, s.keys, 2 * inner}, generator, f32).to(at::kBFloat16);
    const at::Tensor q = qkv.narrow(2, 0, inner), k = kv.narrow(2, 0, inner), v = kv.narrow(2, inner, inner);
    const double scale = 1 / std::sqrt(static_cast<double>(s.head_dim));
    const double flops = 4.0 * s.batch * s.queries * s.keys * inner;
    const auto fused = [&] {
      voken::core::attention(q, k, v, s.heads, scale, voken::core::AttentionNumerics::ScaledScoresFloat32);
    };
    const auto chunked = [&] {
      multi_head_attention(q, k, v, s.heads, scale, false, ComputeOptions().attention_max_scores, false);
    };
    // Wall time, and CPU time per thread (what a step takes when the threads get their cores; on a
    // shared machine the better measure of the kernel itself).
    const auto [wall_kernel, cpu_kernel] = time_wall_cpu(fused, reps);
    const auto [wall_chunked, cpu_chunked] = time_wall_cpu(chunked, std::max(1, reps / 2));
    std::printf(
        "  %-17s B%ld %4ld x %4ld keys, %2ld x %3ld: fused %7.1f ms %4.0f GFLOP/s (cpu %4.0f) | chunked "
        "%7.1f ms "
        "%4.0f GFLOP/s (cpu %4.0f)\n",
        s.what, s.batch, s.queries, s.keys, s.heads, s.head_dim, wall_kernel * 1e3, flops / wall_kernel / 1e9,
        flops / cpu_kernel / 1e9, wall_chunked * 1e3, flops / wall_chunked / 1e9, flops / cpu_chunked / 1e9);
  }
  std::printf("  (load average %.1f)\n", voken::bench::load_average());
}

// ---- packed products against libtorch (--kernels) --------------------------------------------------

double conv_flops(int64_t b, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k);

// The packed kernels run at the process's CPU tier (VOKEN_CPU=avx2|avx512|avx512_bf16 forces a
// lower one). The reference is libtorch's bf16 product (oneDNN) where the tier has AVX-512, and its
// float32 product (what eager libtorch reaches without bf16 instructions) at the avx2 tier. oneDNN
// picks its own instruction set, not VOKEN_CPU's: ONEDNN_MAX_CPU_ISA (e.g. AVX2, AVX512_CORE)
// and OPENBLAS_CORETYPE (e.g. Haswell) make libtorch behave as on the smaller CPU.
void packed_kernels(int reps) {
  c10::InferenceMode guard;
  const voken::core::CpuTier tier = voken::core::cpu_tier();
  if (!packed_gemm_supported(32, 32, 3)) {
    std::printf("packed kernels: none at tier %s\n", voken::core::tier_name(tier));
    return;
  }
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const bool reference_bf16 = tier >= voken::core::CpuTier::avx512;
  const char* reference = reference_bf16 ? "libtorch bf16" : "libtorch fp32";
  const auto ref_operand = [&](const at::Tensor& t) { return reference_bf16 ? t : t.to(at::kFloat); };
  std::printf("packed products at tier %s vs %s (GFLOP/s by CPU time per thread, min of %d):\n",
              voken::core::tier_name(tier), reference, reps);
  // (libtorch's bf16 at::mm only where the tier has AVX-512: limited to AVX2 by ONEDNN_MAX_CPU_ISA,
  // oneDNN refuses it, while a real AVX2 CPU would run libtorch's slow fallback loops.)
  for (const auto dtype : {at::kBFloat16, at::kFloat}) {
    if (dtype == at::kBFloat16 && !reference_bf16) continue;
    const at::Tensor a = at::randn({2048, 2048}, generator, f32).to(dtype);
    const double t = time_wall_cpu([&] { at::mm(a, a); }, reps).second;
    std::printf("  at::mm %s 2048^3 (libtorch peak reference): %6.0f GFLOP/s\n", c10::toString(dtype),
                2.0 * 2048 * 2048 * 2048 / t / 1e9);
  }
  struct Conv {
    int64_t batch, cin, cout, size, kernel, stride;
  };
  for (const Conv& c :
       {Conv{2, 320, 320, 64, 3, 1}, Conv{2, 640, 640, 32, 3, 1}, Conv{2, 1280, 1280, 16, 3, 1},
        Conv{2, 2560, 1280, 16, 3, 1}, Conv{2, 1280, 1280, 8, 3, 1}, Conv{2, 2560, 1280, 8, 3, 1},
        Conv{2, 2560, 1280, 16, 1, 1}, Conv{2, 320, 320, 64, 3, 2}, Conv{2, 640, 640, 32, 3, 2},
        Conv{2, 1280, 1280, 16, 3, 2}, Conv{1, 512, 512, 128, 3, 1}}) {
    const at::Tensor x = at::randn({c.batch, c.cin, c.size, c.size}, generator, f32)
                             .to(at::kBFloat16)
                             .contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = (at::randn({c.cout, c.cin, c.kernel, c.kernel}, generator, f32) /
                          std::sqrt(static_cast<double>(c.cin * c.kernel * c.kernel)))
                             .to(at::kBFloat16)
                             .contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor bias = at::randn({c.cout}, generator, f32).to(at::kBFloat16);
    const auto packed = pack_gemm_weight(w, bias);
    const int64_t pad = (c.kernel - 1) / 2, out = c.stride == 2 ? c.size / 2 : c.size;
    const double flops = conv_flops(c.batch, out, out, c.cin, c.cout, c.kernel);
    const auto run_packed = [&] {
      return c.stride == 2 ? packed_conv2d_stride2(x, *packed, 1, 1) : packed_conv2d(x, *packed);
    };
    const at::Tensor xr = ref_operand(x), wr = ref_operand(w), br = ref_operand(bias);
    const auto run_reference = [&] { return at::conv2d(xr, wr, br, c.stride, pad); };
    const double t_packed = time_wall_cpu([&] { run_packed(); }, reps).second;
    const double t_reference = time_wall_cpu([&] { run_reference(); }, reps).second;
    const double err =
        (run_packed().to(at::kFloat) - run_reference().to(at::kFloat)).abs().max().item<double>();
    std::printf(
        "  conv %ldx%ld/%ld %4ld->%4ld %3ldx%-3ld b%ld: packed %7.2f ms %5.0f GFLOP/s, %s %7.2f ms %5.0f "
        "GFLOP/s  (max diff %.3f)\n",
        c.kernel, c.kernel, c.stride, c.cin, c.cout, c.size, c.size, c.batch, t_packed * 1e3,
        flops / t_packed / 1e9, reference, t_reference * 1e3, flops / t_reference / 1e9, err);
  }
  struct Lin {
    int64_t m, k, n;
  };
  // GEGLU feed-forward input projection: fused epilogue against product + geglu kernel.
  for (const Lin& l : {Lin{1632, 320, 2560}, Lin{8192, 320, 2560}, Lin{2048, 640, 5120}}) {
    const at::Tensor x = at::randn({l.m, l.k}, generator, f32).to(at::kBFloat16);
    const at::Tensor w =
        (at::randn({l.n, l.k}, generator, f32) / std::sqrt(static_cast<double>(l.k))).to(at::kBFloat16);
    const at::Tensor bias = at::randn({l.n}, generator, f32).to(at::kBFloat16);
    const auto plain = pack_gemm_weight(w, bias);
    const auto fused = pack_geglu_weight(w, bias);
    const double flops = 2.0 * l.m * l.k * l.n;
    double t_fused = 1e9, t_plain = 1e9;
    for (int i = 0; i < reps; ++i) {
      t_fused = std::min(t_fused, time_wall_cpu([&] { packed_linear(x, *fused); }, 1).second);
      t_plain = std::min(t_plain, time_wall_cpu([&] { geglu(packed_linear(x, *plain)); }, 1).second);
    }
    std::printf("  GEGLU %5ldx%-5ld x %5ld:       fused  %7.2f ms %5.0f GFLOP/s, product + geglu %7.2f ms\n",
                l.m, l.k, l.n, t_fused * 1e3, flops / t_fused / 1e9, t_plain * 1e3);
  }
  for (const Lin& l :
       {Lin{8192, 320, 960}, Lin{8192, 320, 320}, Lin{1638, 320, 2560}, Lin{1638, 1280, 320},
        Lin{409, 1280, 10240}, Lin{409, 5120, 1280}, Lin{154, 1024, 1280}, Lin{512, 1280, 1280}}) {
    const at::Tensor x = at::randn({l.m, l.k}, generator, f32).to(at::kBFloat16);
    const at::Tensor w =
        (at::randn({l.n, l.k}, generator, f32) / std::sqrt(static_cast<double>(l.k))).to(at::kBFloat16);
    const at::Tensor bias = at::randn({l.n}, generator, f32).to(at::kBFloat16);
    const auto packed = pack_gemm_weight(w, bias);
    const double flops = 2.0 * l.m * l.k * l.n;
    const at::Tensor xr = ref_operand(x), wr = ref_operand(w), br = ref_operand(bias);
    const double t_packed = time_wall_cpu([&] { packed_linear(x, *packed); }, reps).second;
    const double t_reference = time_wall_cpu([&] { at::linear(xr, wr, br); }, reps).second;
    const double err = (packed_linear(x, *packed).to(at::kFloat) - at::linear(xr, wr, br).to(at::kFloat))
                           .abs()
                           .max()
                           .item<double>();
    std::printf(
        "  linear %5ldx%-5ld x %5ld:       packed %7.2f ms %5.0f GFLOP/s, %s %7.2f ms %5.0f GFLOP/s  "
        "(max diff %.3f)\n",
        l.m, l.k, l.n, t_packed * 1e3, flops / t_packed / 1e9, reference, t_reference * 1e3,
        flops / t_reference / 1e9, err);
  }
}

// ---- random diffusers folders -----------------------------------------------------------------

using io::expected_weights;
using io::WeightShapes;

// Options for listing a model's weights (expected_weights): NCHW, since channels-last would
// materialise the zero placeholders.
ComputeOptions probe_options() {
  ComputeOptions options;
  options.channels_last = false;
  return options;
}

// Writes config.json + bf16 safetensors of initialisation-scaled random weights; returns the
// parameter count.
int64_t write_random_model(const std::string& dir, const io::Json& config, const WeightShapes& shapes) {
  int64_t params = 0;
  for (const auto& entry : shapes) {
    int64_t count = 1;
    for (const int64_t d : entry.second) count *= d;
    params += count;
  }
  // A folder kept from an earlier run (--dir) with the same config is reused.
  if (std::filesystem::exists(dir + "/diffusion_pytorch_model.safetensors") &&
      std::filesystem::exists(dir + "/config.json") && io::read_json_file(dir + "/config.json") == config)
    return params;
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << config.dump(2);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  const std::regex norm_weight(R"((norm\d*|norm_out|group_norm|conv_norm_out)\.weight$)");
  std::vector<std::pair<std::string, at::Tensor>> tensors;
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
  auto resnet = random_block<ResnetBlock2D>(
      [&](io::WeightLoader& l) { return ResnetBlock2D::load(l, "r.", 320, 320, rs); }, bf16);
  const Conv2d conv_onednn = resnet.conv1;
  if (options.packed_weights) resnet.pack();
  show("ResnetBlock2D 320->320", 2 * conv_flops(2, 64, 64, 320, 320, 3), [&] { resnet(x, temb); });
  const GroupNorm norm = resnet.norm1;
  show("  group norm + SiLU", 0, [&] { norm(x, Activation::Silu); });
  show("  conv 3x3", conv_flops(2, 64, 64, 320, 320, 3), [&] { resnet.conv1(x); });
  if (resnet.conv1.packed)
    show("  conv 3x3 through oneDNN (not packed)", conv_flops(2, 64, 64, 320, 320, 3),
         [&] { conv_onednn(x); });
  TransformerSettings ts;
  ts.heads = 5;
  ts.head_dim = 64;
  ts.cross_attention_dim = 1024;
  ts.use_linear_projection = true;
  auto transformer = random_block<Transformer2D>(
      [&](io::WeightLoader& l) { return Transformer2D::load(l, "t.", 320, ts); }, bf16);
  // Plain copies taken before pack(), which releases the weights it packs.
  const Linear qkv_onednn = *transformer.blocks[0].attn1.qkv;
  const Linear ff_in_plain = transformer.blocks[0].ff_in;
  if (options.packed_weights) transformer.pack();
  show("Transformer2D 320, 5 heads", transformer_flops(2, 64, 64, 320, 1, 77, 1024),
       [&] { transformer(x, context, options); });
  const at::Tensor tokens = image_to_tokens(x).contiguous();
  const auto& block = transformer.blocks[0];
  const at::Tensor qkv = (*block.attn1.qkv)(tokens);
  const at::Tensor q = qkv.narrow(-1, 0, 320), k = qkv.narrow(-1, 320, 320), v = qkv.narrow(-1, 640, 320);
  const double attention_flops = 2 * 2.0 * 2 * 4096.0 * 4096 * 320;
  if (dtype == at::kBFloat16 && voken::core::cpu_tier() >= voken::core::CpuTier::avx2)
    show("  self-attention core, fused (4096 tokens)", attention_flops,
         [&] { multi_head_attention(q, k, v, 5, 0.125, false, options.attention_max_scores, true); });
  show("  self-attention core, chunked", attention_flops,
       [&] { multi_head_attention(q, k, v, 5, 0.125, false, options.attention_max_scores, false); });
  show("  qkv projection", 2.0 * 8192 * 320 * 960, [&] { (*block.attn1.qkv)(tokens); });
  if (block.attn1.qkv->packed)
    show("  qkv projection through oneDNN (not packed)", 2.0 * 8192 * 320 * 960, [&] { qkv_onednn(tokens); });
  show("  layer norm", 0, [&] { block.norm1(tokens); });
  const at::Tensor projected = ff_in_plain(tokens);
  if (block.ff_geglu)
    show("  feed-forward in + GEGLU, fused (packed)", 2.0 * 8192 * 320 * 2560,
         [&] { packed_linear(tokens, *block.ff_geglu); });
  show("  feed-forward in (8192x320 -> 2560), plain", 2.0 * 8192 * 320 * 2560, [&] { ff_in_plain(tokens); });
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
    auto block = random_block<ResnetBlock2D>(
        [&](io::WeightLoader& l) { return ResnetBlock2D::load(l, "r.", c, c, r); }, dtype);
    if (options.packed_weights) block.pack();
    TransformerSettings t;
    t.heads = level.heads;
    t.head_dim = c / level.heads;
    t.cross_attention_dim = 1024;
    t.use_linear_projection = true;
    auto tf = random_block<Transformer2D>(
        [&](io::WeightLoader& l) { return Transformer2D::load(l, "t.", c, t); }, dtype);
    if (options.packed_weights) tf.pack();
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

// The kernels OpenBLAS (libtorch's fp32 BLAS on Debian) chose: its fp32 GEMM speed doubles from
// "Haswell" (AVX2, its fallback for CPU models it does not know) to "SkylakeX" (AVX-512); set
// OPENBLAS_CORETYPE=SkylakeX to choose (importing voken in Python does).
std::string blas_kernels() {
  using CoreName = char* (*)();
  const auto core_name = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  return core_name ? std::string("OpenBLAS ") + core_name() : "BLAS is not OpenBLAS";
}

struct Peaks {
  double fp32 = 0, bf16 = 0;
  double of(at::ScalarType dtype) const { return dtype == at::kBFloat16 ? bf16 : fp32; }
};

// `anchor`: the diffusers eager time on this CPU (0: none known for it).
void report(const char* what, at::ScalarType dtype, std::pair<double, double> t, double flops,
            const Peaks& peaks, double anchor) {
  const double achieved = flops / t.first / 1e9;
  std::printf("%-18s %-9s min %7.3f s  median %7.3f s  %6.0f GFLOP/s = %4.0f%% of %s GEMM peak (%.0f)  ",
              what, c10::toString(dtype), t.first, t.second, achieved, 100 * achieved / peaks.of(dtype),
              c10::toString(dtype), peaks.of(dtype));
  if (anchor > 0)
    std::printf("anchor %.1f s -> %.2fx\n", anchor, anchor / t.first);
  else
    std::printf("(no anchor for this CPU)\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress visible live, and kept if a step aborts
  int threads = 2, reps = 3;
  int64_t latent = 64;
  bool skip_fp32 = false;
  std::string only;    // "unet" or "vae"
  bool quick = false;  // --quick: no GEMM peaks, layout probe, breakdown or NCHW step
  int profile_depth = 0;
  bool compare_unpacked = false;
  bool kernels_only = false;
  std::string keep_dir;  // --dir DIR: random models written there and reused by later runs
  int extra_steps = 0;   // --steps N: N more bf16 steps at the end (e.g. for perf record)  // --kernels: only
                         // the packed-vs-oneDNN product table  // --ab: bf16 step with and without packed
                         // weights, alternating  //
                         // --profile N: one profiled step per model, ops nested up to N deep
  // --attention: only the attention table.
  bool attention_only = false;
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
    else if (arg == "--profile" && i + 1 < argc)
      profile_depth = std::max(1, std::atoi(argv[++i]));
    else if (arg == "--quick")
      quick = true;
    else if (arg == "--dir" && i + 1 < argc)
      keep_dir = argv[++i];
    else if (arg == "--steps" && i + 1 < argc)
      extra_steps = std::atoi(argv[++i]);
    else if (arg == "--kernels")
      kernels_only = true;
    else if (arg == "--attention")
      attention_only = true;
    else if (arg == "--no-pack")
      compute.packed_weights = false;
    else if (arg == "--ab")
      compare_unpacked = true;
    else if (arg == "--nchw")
      compute.channels_last = false;
    else if (arg == "--attention-budget" && i + 1 < argc)
      compute.attention_max_scores = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: %s [--threads N] [--reps N] [--skip-fp32] [--latent N] [--only unet|vae] "
                   "[--attention-budget SCORES] [--nchw] [--profile DEPTH] [--quick] [--no-pack] [--ab] "
                   "[--kernels] [--attention] [--dir DIR] [--steps N]\n",
                   argv[0]);
      return 2;
    }
  }
  // Debian's libtorch starts with one intra-op thread here although two cores exist.
  at::set_num_threads(threads);
  voken::bench::print_machine("bench_unet", at::get_num_threads());
  const voken::bench::Anchors anchors = voken::bench::anchors_for_this_cpu();
  std::printf("bench_unet: %d threads, %d timed reps (after a warm-up), latents %ldx%ld\n",
              at::get_num_threads(), reps, latent, latent);

  if (kernels_only) {
    packed_kernels(reps);
    return 0;
  }
  if (attention_only) {
    attention_kernels(reps);
    return 0;
  }
  Peaks peaks{139, 1181};  // --quick: this machine's idle peaks (fp32, bf16)
  if (!quick) {
    peaks.bf16 = gemm_peak(at::kBFloat16);
    peaks.fp32 = gemm_peak(at::kFloat);
    std::printf(
        "GEMM peak (at::mm / at::linear, best of 5 shapes): bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s (%s)\n",
        peaks.bf16, peaks.fp32, blas_kernels().c_str());
    conv_layouts();
  }
  if (only != "vae" && !quick) {
    breakdown(std::max(2, reps), at::kBFloat16);
    if (!skip_fp32) breakdown(std::max(2, reps), at::kFloat);
  }

  char pattern[] = "/tmp/voken-bench-unet-XXXXXX";
  const char* made = mkdtemp(pattern);
  if (!made) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string tmp = keep_dir.empty() ? std::string(made) : keep_dir;
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
      std::printf("UNet: %.0fM parameters written or reused (bf16 safetensors) in %.1f s\n",
                  unet_params / 1e6, now() - t0);
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
        const double cpu = time_wall_cpu([&] { unet.forward(sample, timestep, context); }, 1, false).second;
        if (!at::isfinite(out).all().item<bool>()) std::printf("  (warning: non-finite output)\n");
        report("UNet step", dtype, t, unet_gflop, peaks,
               dtype == at::kBFloat16 ? anchors.unet_bf16_s : anchors.unet_fp32_s);
        std::printf(
            "  CPU time per thread of one more step: %.3f s (steadier than wall time on a shared machine)\n",
            cpu);
        if (compare_unpacked && dtype == at::kBFloat16) {
          ComputeOptions plain = compute;
          plain.packed_weights = !compute.packed_weights;
          const auto other = UNet2DCondition::load(tmp + "/unet", dtype, plain);
          const at::Tensor other_out = other.forward(sample, timestep, context);
          std::printf("  packed vs not: max |difference| %.4f (output max %.3f)\n",
                      (other_out - out).abs().max().item<double>(), out.abs().max().item<double>());
          double wall_this = 1e9, wall_other = 1e9, cpu_this = 1e9, cpu_other = 1e9;
          for (int i = 0; i < reps; ++i) {
            const auto a = time_wall_cpu([&] { unet.forward(sample, timestep, context); }, 1, false);
            const auto b = time_wall_cpu([&] { other.forward(sample, timestep, context); }, 1, false);
            wall_this = std::min(wall_this, a.first);
            cpu_this = std::min(cpu_this, a.second);
            wall_other = std::min(wall_other, b.first);
            cpu_other = std::min(cpu_other, b.second);
          }
          std::printf(
              "  A/B (alternating, min of %d; wall / CPU per thread): packed_weights=%d %.3f / %.3f s, "
              "packed_weights=%d %.3f / %.3f s\n",
              reps, compute.packed_weights, wall_this, cpu_this, plain.packed_weights, wall_other, cpu_other);
        }
        if (profile_depth > 0) {
          OpProfiler profiler(profile_depth);
          const double start = now();
          unet.forward(sample, timestep, context);
          profiler.print(now() - start, 60);
        }
        std::printf("  RSS after: %.2f GB, peak so far %.2f GB\n", current_rss_gb(), peak_rss_gb());
        if (dtype == at::kBFloat16 && extra_steps > 0) {
          const double c0 = cpu_seconds(), w0 = now();
          for (int i = 0; i < extra_steps; ++i) unet.forward(sample, timestep, context);
          std::printf("  %d more steps: %.3f s wall, %.3f s CPU per thread each\n", extra_steps,
                      (now() - w0) / extra_steps, (cpu_seconds() - c0) / at::get_num_threads() / extra_steps);
        }
      }
      // The bf16 step with NCHW activations, for the record of the layout choice.
      if (!quick) {
        ComputeOptions nchw;
        nchw.channels_last = false;
        const auto unet = UNet2DCondition::load(tmp + "/unet", at::kBFloat16, nchw);
        const auto t = time_it([&] { unet.forward(sample, timestep, context); }, 1);
        report("UNet step (NCHW)", at::kBFloat16, t, unet_gflop, peaks, anchors.unet_bf16_s);
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
        report("VAE decode", dtype, t, vae_gflop, peaks,
               dtype == at::kBFloat16 ? anchors.vae_bf16_s : anchors.vae_fp32_s);
        if (profile_depth > 0) {
          OpProfiler profiler(profile_depth);
          const double start = now();
          vae.decode(latents);
          profiler.print(now() - start, 40);
        }
        std::printf("  RSS after: %.2f GB, peak so far %.2f GB\n", current_rss_gb(), peak_rss_gb());
      }
    }
    // The machine is shared: measure the peak again and show the better one.
    if (!quick) {
      Peaks again{gemm_peak(at::kFloat), gemm_peak(at::kBFloat16)};
      std::printf("GEMM peak re-measured at the end: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s\n", again.bf16,
                  again.fp32);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_unet: %s\n", e.what());
    status = 1;
  }
  std::filesystem::remove_all(made);
  std::printf("peak RSS %.2f GB\n", peak_rss_gb());
  return status;
}
