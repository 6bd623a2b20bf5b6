// bench_llm: prefill and decode speed of voken::llm::Llama, against the machine's read bandwidth.
//
// Models: the tiny golden LLaMA (fp32 file, run with fp32 and with bf16 weights), a ~1.1B
// TinyLlama-shaped model (GQA, 4 kv heads) and the real Vicuna-7B/MiniGPT-5 shape (hidden 4096,
// MLP 11008, 32 layers, vocab 32009), both with random bf16 weights written to a temporary
// safetensors file and memory-mapped by Llama::load (no copy: bf16 stays bf16).
//
// For each model, in one child process (fork: per-model peak RSS, and libgomp never runs in the
// parent, which is not fork-safe once its pool exists):
//   load; warm-up (a short prefill + steps: faults the mapped pages in);
//   prefill  = one forward of --prompt tokens into a fresh KV cache (logits for the last row only),
//              best of --repeat;
//   decode   = --decode single-token steps after a prefill, median time per token;
//   bandwidth= read rate of the very bytes one decode step reads (every layer matrix + lm_head),
//              measured right before the decode with a streaming sum over them (AVX-512 where
//              the CPU has it, whatever the tier), same
//              thread count; bound = bytes_per_token / bandwidth; ratio = decode time / bound;
//   peak RSS = VmHWM of the child, against the model's weight bytes.
// A separate child first measures DRAM read bandwidth on a 1 GB anonymous buffer (reference).
//
// Anchor (llama.cpp, 2 threads, 7B bf16, same machine class): decode 1.45 tok/s (0.69 s/token,
// ~20 GB/s), prefill 13.4 tok/s. Targets: decode within 1.1x of the bandwidth bound, prefill >= 2x
// llama.cpp, peak RSS < weight bytes + 10%.
//
// Before the models ("gemv"): the decode GEMV alone on the 7B shapes (4096x4096, 11008x4096,
// 4096x11008, 32000x4096), one row, weights cycling through a 1.5 GiB pool (beyond the last-level
// cache), at each kernel the process can run (generic, avx2, and avx512 when the tier has it), as
// GB/s of weights read and as a share of a plain read of the same pool. The CPU line names the
// tier: VOKEN_CPU=<tier> runs the whole benchmark at a lower one.
//
// Usage: bench_llm [--threads N] [--models gemv,tiny,1b,7b] [--prompt N] [--decode N] [--repeat N]
//                  [--dir D] [--golden D] [--keep] [--omp-passive]
//   --threads N   intra-op threads (default 2; Debian's libtorch would start with 1 here)
//   --models      what to measure, comma-separated (default gemv,tiny,1b,7b)
//   --prompt N    prefill length (default 128);  --decode N  decode steps (default 16)
//   --repeat N    prefill repetitions, best taken (default 3; 1 for 7B)
//   --dir D       where the synthetic checkpoints go (default $TMPDIR or /tmp); --keep keeps them
//   --golden D    golden root for the tiny model (default $VOKEN_GOLDEN_DIR, else ../shared/golden)
//   --omp-passive re-runs itself with OMP_WAIT_POLICY=passive: on a machine shared with other
//                 busy processes, libgomp's default spin-waiting at the end of every parallel region
//                 burns the CPU time the other thread needs (measured here under load ~6 on 2 cores:
//                 1.1B prefill 5 -> 22 tokens/s, decode/bound 2.4 -> 1.2). On an idle machine spinning
//                 is the faster choice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>  // set_num_threads
#include <c10/core/InferenceMode.h>
#include <sys/resource.h>
#include <sys/wait.h>
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
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_support.h"
#include "core/cpu.h"
#include "core/gemv.h"
#include "core/parallel.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "llm/linear.h"
#include "llm/llama.h"

#ifdef VOKEN_X86_KERNELS
#include <immintrin.h>
#endif

namespace {

namespace fs = std::filesystem;
using voken::bench::cpu_seconds;
using voken::bench::in_child;
using voken::bench::load_average;
using voken::bench::seconds_since;
using voken::bench::status_field;
using voken::llm::Llama;

struct Options {
  int threads = 2;
  std::vector<std::string> models = {"gemv", "tiny", "1b", "7b"};
  int prompt = 128;
  int decode = 16;
  int repeat = 3;
  std::string dir;
  std::string golden;
  bool keep = false;
  bool omp_passive = false;
};

double mem_available() { return voken::bench::proc_kb_field("/proc/meminfo", "MemAvailable:"); }

// ---------------------------------------------------------------------------------------------
// Read bandwidth: a sum of 32-bit words over byte ranges, split over the intra-op pool, with the
// widest loads the CPU has (whatever VOKEN_CPU chose: this is the machine's reference).

#ifdef VOKEN_X86_KERNELS
VOKEN_TARGET_AVX512 uint64_t sum_words_avx512(const uint8_t* p, std::size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi32(a3, _mm512_loadu_si512(p + i + 192));
  }
  uint64_t tail = 0;
  for (; i < bytes; ++i) tail += p[i];
  return static_cast<uint64_t>(
             _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)))) +
         tail;
}

VOKEN_TARGET_AVX2 uint64_t sum_words_avx2(const uint8_t* p, std::size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  std::size_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi32(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi32(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi32(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi32(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
  uint64_t total = 0;
  for (uint32_t lane : lanes) total += lane;
  for (; i < bytes; ++i) total += p[i];
  return total;
}
#endif

// Plain C++ (vectorized by the compiler with the baseline instruction set).
uint64_t sum_words_generic(const uint8_t* p, std::size_t bytes) {
  uint32_t lanes[16] = {};
  std::size_t i = 0;
  for (; i + 64 <= bytes; i += 64)
    for (int l = 0; l < 16; ++l) {
      uint32_t word;
      std::memcpy(&word, p + i + 4 * l, sizeof word);
      lanes[l] += word;
    }
  uint64_t total = 0;
  for (uint32_t lane : lanes) total += lane;
  for (; i < bytes; ++i) total += p[i];
  return total;
}

uint64_t sum_words(const uint8_t* p, std::size_t bytes) {
#ifdef VOKEN_X86_KERNELS
  const voken::core::CpuTier native = voken::core::cpu_info().native;
  if (native >= voken::core::CpuTier::avx512) return sum_words_avx512(p, bytes);
  if (native >= voken::core::CpuTier::avx2) return sum_words_avx2(p, bytes);
#endif
  return sum_words_generic(p, bytes);
}

// Bytes/s to read every range once (best of `passes`).
double read_bandwidth(const std::vector<std::pair<const uint8_t*, std::size_t>>& ranges, int passes) {
  constexpr std::size_t kChunk = 1 << 20;
  std::vector<std::pair<const uint8_t*, std::size_t>> chunks;
  double total = 0;
  for (const auto& [p, n] : ranges) {
    for (std::size_t off = 0; off < n; off += kChunk) chunks.emplace_back(p + off, std::min(kChunk, n - off));
    total += static_cast<double>(n);
  }
  double best = 0;
  volatile uint64_t sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    std::vector<uint64_t> partial(chunks.size(), 0);
    const auto start = std::chrono::steady_clock::now();
    voken::core::parallel_items(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
      partial[static_cast<std::size_t>(c)] = sum_words(chunks[c].first, chunks[c].second);
    });
    const double seconds = seconds_since(start);
    for (auto s : partial) sink = sink + s;
    best = std::max(best, total / seconds);
  }
  return best;
}

struct DramResult {
  double bandwidth = 0;
  double bandwidth_1thread = 0;
};

DramResult measure_dram(const Options& options) {
  at::set_num_threads(options.threads);
  const std::size_t bytes = std::size_t{1} << 30;
  std::vector<uint8_t> buffer(bytes, 1);  // touched: resident
  DramResult r;
  r.bandwidth = read_bandwidth({{buffer.data(), bytes}}, 5);
  at::set_num_threads(1);
  r.bandwidth_1thread = read_bandwidth({{buffer.data(), bytes}}, 3);
  return r;
}

// ---------------------------------------------------------------------------------------------
// The decode GEMV alone on the 7B shapes, one row of x, at each kernel this process can run.

struct GemvShape {
  int64_t out, in;
  const char* what;
};
constexpr GemvShape kGemvShapes[] = {
    {4096, 4096, "q/k/v/o"}, {11008, 4096, "gate/up"}, {4096, 11008, "down"}, {32000, 4096, "lm_head"}};
constexpr int kGemvShapeCount = 4;
constexpr int kGemvKernelCount = 3;  // generic, avx2, avx512 (which avx512_bf16 and amx run too)

struct GemvResult {
  int kernels = 0;
  voken::core::CpuTier tier[kGemvKernelCount] = {};
  double rate[kGemvKernelCount][kGemvShapeCount] = {};  // weight bytes/s, best of 5 passes
  double read = 0;                                      // plain read of the same pool, bytes/s
  double pool_bytes = 0;
};

GemvResult measure_gemv(const Options& options) {
  using voken::core::CpuTier;
  at::set_num_threads(options.threads);
  c10::InferenceMode guard;
  // The weights cycle through a pool well beyond the last-level cache, so every call reads DRAM.
  const int64_t pool_values = int64_t{3} << 28;  // 1.5 GiB of bf16
  at::Tensor pool = at::empty({pool_values}, at::kBFloat16);
  auto* bits = reinterpret_cast<uint16_t*>(pool.data_ptr<at::BFloat16>());
  voken::core::parallel_range(0, pool_values, 1 << 20, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto h = static_cast<uint32_t>((static_cast<uint64_t>(i) * 2654435761u) >> 13);
      bits[i] = static_cast<uint16_t>(0x3C00u | (h & 0x7Fu) | ((h & 0x80u) << 8));  // +-(2^-7 .. 2^-6)
    }
  });
  GemvResult r;
  r.pool_bytes = static_cast<double>(pool.nbytes());
  std::vector<CpuTier> tiers = {CpuTier::generic};
  if (voken::core::cpu_tier() >= CpuTier::avx2) tiers.push_back(CpuTier::avx2);
  if (voken::core::cpu_tier() >= CpuTier::avx512) tiers.push_back(voken::core::cpu_tier());
  r.kernels = static_cast<int>(tiers.size());
  std::vector<at::Tensor> xs;
  for (const GemvShape& shape : kGemvShapes) xs.push_back(at::randn({1, shape.in}));
  // Passes interleaved (a plain read of the pool before every measurement): on a shared machine
  // the available bandwidth drifts over seconds, and each figure is its best pass.
  const std::vector<std::pair<const uint8_t*, std::size_t>> whole_pool = {
      {reinterpret_cast<const uint8_t*>(bits), static_cast<std::size_t>(pool.nbytes())}};
  for (int pass = 0; pass < 5; ++pass) {
    for (int k = 0; k < r.kernels; ++k) {
      r.tier[k] = tiers[k];
      for (int s = 0; s < kGemvShapeCount; ++s) {
        r.read = std::max(r.read, read_bandwidth(whole_pool, 1));
        const GemvShape& shape = kGemvShapes[s];
        const int64_t values = shape.out * shape.in;
        const int64_t count = pool_values / values;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < count; ++i)
          voken::core::gemv_bf16(xs[s], pool.narrow(0, i * values, values).view({shape.out, shape.in}),
                                 tiers[k]);
        r.rate[k][s] =
            std::max(r.rate[k][s], 2.0 * static_cast<double>(values * count) / seconds_since(start));
      }
    }
  }
  return r;
}

void print_gemv(const GemvResult& r, int threads) {
  std::printf("\n== decode GEMV alone: 1 row, bf16 weights cycling through a %.1f GiB pool, %d threads\n",
              r.pool_bytes / (1 << 30), threads);
  std::printf(
      "  plain read of the pool %.2f GB/s (best pass); GEMV weight read rate (GB/s, best of 5 interleaved "
      "passes):\n",
      r.read / 1e9);
  std::printf("  %-22s", "kernel (tier)");
  for (const auto& shape : kGemvShapes) {
    const std::string label =
        std::string(shape.what) + " " + std::to_string(shape.out) + "x" + std::to_string(shape.in);
    std::printf(" %20s", label.c_str());
  }
  std::printf("\n");
  for (int k = 0; k < r.kernels; ++k) {
    const voken::core::CpuTier tier = r.tier[k];
    const char* kernel = tier >= voken::core::CpuTier::avx512 ? "avx512" : voken::core::tier_name(tier);
    const std::string label = std::string(kernel) + " (" + voken::core::tier_name(tier) + ")";
    std::printf("  %-22s", label.c_str());
    for (int s = 0; s < kGemvShapeCount; ++s)
      std::printf(" %14.2f (%3.0f%%)", r.rate[k][s] / 1e9, 100 * r.rate[k][s] / r.read);
    std::printf("\n");
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints.

struct Shape {
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads;
};

const Shape kShape1B = {32000, 2048, 5632, 22, 32, 4};    // TinyLlama-1.1B
const Shape kShape7B = {32009, 4096, 11008, 32, 32, 32};  // Vicuna-7B as MiniGPT-5 resizes it

void write_config(const std::string& dir, const Shape& s) {
  const voken::io::Json config = {{"architectures", voken::io::Json::array({"LlamaForCausalLM"})},
                                  {"model_type", "llama"},
                                  {"vocab_size", s.vocab},
                                  {"hidden_size", s.hidden},
                                  {"intermediate_size", s.intermediate},
                                  {"num_hidden_layers", s.layers},
                                  {"num_attention_heads", s.heads},
                                  {"num_key_value_heads", s.kv_heads},
                                  {"max_position_embeddings", 2048},
                                  {"rms_norm_eps", 1e-6},
                                  {"rope_theta", 10000.0},
                                  {"hidden_act", "silu"},
                                  {"tie_word_embeddings", false},
                                  {"torch_dtype", "bfloat16"}};
  std::ofstream(dir + "/config.json") << config.dump(2);
}

struct WriteResult {
  double bytes = 0;
  double seconds = 0;
};

// Random bf16 weights: every tensor is a view into one random pool (as large as the largest
// tensor), at a different offset, so the generator needs ~0.3 GB whatever the model size.
WriteResult write_model(const std::string& dir, const Shape& s) {
  c10::InferenceMode guard;
  fs::create_directories(dir);
  write_config(dir, s);
  const int64_t d = s.hidden / s.heads;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  shapes.push_back({"model.embed_tokens.weight", {s.vocab, s.hidden}});
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    shapes.push_back({p + "input_layernorm.weight", {s.hidden}});
    shapes.push_back({p + "self_attn.q_proj.weight", {s.heads * d, s.hidden}});
    shapes.push_back({p + "self_attn.k_proj.weight", {s.kv_heads * d, s.hidden}});
    shapes.push_back({p + "self_attn.v_proj.weight", {s.kv_heads * d, s.hidden}});
    shapes.push_back({p + "self_attn.o_proj.weight", {s.hidden, s.heads * d}});
    shapes.push_back({p + "post_attention_layernorm.weight", {s.hidden}});
    shapes.push_back({p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}});
    shapes.push_back({p + "mlp.up_proj.weight", {s.intermediate, s.hidden}});
    shapes.push_back({p + "mlp.down_proj.weight", {s.hidden, s.intermediate}});
  }
  shapes.push_back({"model.norm.weight", {s.hidden}});
  shapes.push_back({"lm_head.weight", {s.vocab, s.hidden}});
  int64_t largest = 0;
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1;
    for (auto x : shape) n *= x;
    largest = std::max(largest, n);
  }
  at::manual_seed(0);
  const int64_t extra = 1 << 20;
  const at::Tensor pool = (at::randn({largest + extra}) * 0.02).to(at::kBFloat16);
  const at::Tensor norm = at::ones({s.hidden}, at::kBFloat16);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  WriteResult result;
  int64_t offset = 0;
  for (const auto& [name, shape] : shapes) {
    if (shape.size() == 1) {
      tensors.emplace_back(name, norm);
    } else {
      const int64_t n = shape[0] * shape[1];
      offset = (offset + 4099) % extra;
      tensors.emplace_back(name, pool.narrow(0, offset, n).view(shape));
    }
    result.bytes += static_cast<double>(tensors.back().second.nbytes());
  }
  const auto start = std::chrono::steady_clock::now();
  voken::io::write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  result.seconds = seconds_since(start);
  return result;
}

// ---------------------------------------------------------------------------------------------
// The measurement.

struct ModelResult {
  char name[48] = {};
  double params = 0;
  double weight_bytes = 0;
  double bytes_per_token = 0;
  double load_s = 0;
  double prefill_s = 0;  // best of repeats, for `prompt` tokens
  double decode_s = 0;   // median per token
  double decode_mean_s = 0;
  double products_s = 0;   // the decode step's matrix products alone (best of 3 passes)
  double bandwidth = 0;    // reading the decode weights, bytes/s
  double peak_rss = 0;     // VmHWM
  double prefill_cpu = 0;  // CPU seconds / wall seconds during the timed prefills
  double decode_cpu = 0;   // the same during the decode steps
  double load = 0;         // 1-minute load average when the measurement started
  double rss_file = 0, rss_anon = 0;
  int prompt = 0, decode = 0;
};

ModelResult measure_model(const Options& options, const std::string& label, const std::string& dir,
                          at::ScalarType dtype, int repeat) {
  at::set_num_threads(options.threads);
  ModelResult r;
  std::snprintf(r.name, sizeof r.name, "%s", label.c_str());
  r.prompt = options.prompt;
  r.decode = options.decode;
  r.load = load_average();
  voken::llm::LlamaLoadOptions load_options;
  load_options.dtype = dtype;
  auto start = std::chrono::steady_clock::now();
  const Llama model = Llama::load(dir, load_options);
  r.load_s = seconds_since(start);
  c10::InferenceMode guard;
  r.weight_bytes = static_cast<double>(model.weight_bytes());
  r.bytes_per_token = static_cast<double>(model.weight_bytes_per_token());
  const auto& c = model.config();
  r.params =
      static_cast<double>(c.vocab_size * c.hidden_size * 2 +
                          c.num_hidden_layers * (2 * c.hidden_size * c.hidden_size +
                                                 2 * c.num_key_value_heads * c.head_dim() * c.hidden_size +
                                                 3 * c.hidden_size * c.intermediate_size));
  at::manual_seed(1);
  const int64_t vocab = c.vocab_size;
  const at::Tensor prompt = at::randint(vocab, {1, options.prompt}, at::kLong);

  // Warm-up: faults the mapped weights in and starts the thread pool.
  {
    auto cache = model.new_cache(1, 16);
    auto out = model.forward(prompt.narrow(1, 0, 8), &cache, voken::llm::LogitsFor::Last);
    for (int i = 0; i < 2; ++i)
      out = model.forward(out.logits.argmax(-1).view({1, 1}), &cache, voken::llm::LogitsFor::Last);
  }

  r.prefill_s = INFINITY;
  voken::llm::KvCache cache = model.new_cache(1, options.prompt + options.decode);
  voken::llm::LlamaOutput out;
  double cpu_start = cpu_seconds();
  auto wall_start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeat; ++i) {
    cache = model.new_cache(1, options.prompt + options.decode);
    start = std::chrono::steady_clock::now();
    out = model.forward(prompt, &cache, voken::llm::LogitsFor::Last);
    r.prefill_s = std::min(r.prefill_s, seconds_since(start));
  }
  r.prefill_cpu = (cpu_seconds() - cpu_start) / seconds_since(wall_start);

  // The bytes a decode step reads, read once more as fast as possible: the bound.
  std::vector<std::pair<const uint8_t*, std::size_t>> ranges;
  auto add = [&](const at::Tensor& t) {
    ranges.emplace_back(static_cast<const uint8_t*>(t.data_ptr()), static_cast<std::size_t>(t.nbytes()));
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
      add(model.weight(p + m + ".weight"));
  }
  add(model.weight("lm_head.weight"));
  r.bandwidth = read_bandwidth(ranges, 3);

  // The decode step's matrix products on their own: one single-row pass over every decode matrix,
  // grouped as a decode step groups them (q/k/v and gate/up share a pass), right after the read
  // bound. Decode time minus this is what the rest of the step (norms, rotary, attention over the
  // cache, thread hand-offs) costs.
  {
    const at::Tensor xh = at::randn({1, c.hidden_size});
    const at::Tensor xi = at::randn({1, c.intermediate_size});
    std::vector<std::pair<const at::Tensor*, std::vector<at::Tensor>>> groups;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      auto w = [&](const char* m) { return model.weight(p + m + ".weight"); };
      groups.push_back({&xh, {w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")}});
      groups.push_back({&xh, {w("self_attn.o_proj")}});
      groups.push_back({&xh, {w("mlp.gate_proj"), w("mlp.up_proj")}});
      groups.push_back({&xi, {w("mlp.down_proj")}});
    }
    groups.push_back({&xh, {model.weight("lm_head.weight")}});
    r.products_s = INFINITY;
    for (int pass = 0; pass < 3; ++pass) {
      const auto t0 = std::chrono::steady_clock::now();
      for (const auto& [x, weights] : groups) voken::llm::dense_many(*x, weights);
      r.products_s = std::min(r.products_s, seconds_since(t0));
    }
  }

  std::vector<double> steps;
  cpu_start = cpu_seconds();
  wall_start = std::chrono::steady_clock::now();
  for (int i = 0; i < options.decode; ++i) {
    const at::Tensor next = out.logits.argmax(-1).view({1, 1});
    start = std::chrono::steady_clock::now();
    out = model.forward(next, &cache, voken::llm::LogitsFor::Last);
    steps.push_back(seconds_since(start));
  }
  r.decode_cpu = (cpu_seconds() - cpu_start) / seconds_since(wall_start);
  double sum = 0;
  for (double s : steps) sum += s;
  r.decode_mean_s = sum / static_cast<double>(steps.size());
  std::sort(steps.begin(), steps.end());
  r.decode_s = steps[steps.size() / 2];
  r.peak_rss = status_field("VmHWM:");
  r.rss_file = status_field("RssFile:");
  r.rss_anon = status_field("RssAnon:");
  return r;
}

void print_result(const ModelResult& r, const DramResult& dram) {
  constexpr double GB = 1e9;
  const double bound = r.bytes_per_token / r.bandwidth;
  std::printf("\n== %s  (%.3g params, weights %.3f GB, read per decoded token %.3f GB)\n", r.name, r.params,
              r.weight_bytes / GB, r.bytes_per_token / GB);
  std::printf("  load                 %.3f s  (machine load average %.2f at start)\n", r.load_s, r.load);
  std::printf("  prefill              %.2f tokens/s  (%d tokens in %.3f s, %.0f GFLOP/s)\n",
              r.prompt / r.prefill_s, r.prompt, r.prefill_s, 2.0 * r.params * r.prompt / r.prefill_s / GB);
  std::printf("  decode               %.3f tokens/s  (median %.4f s/token, mean %.4f s, %d steps)\n",
              1.0 / r.decode_s, r.decode_s, r.decode_mean_s, r.decode);
  std::printf("  CPU used / wall      prefill %.2f, decode %.2f cores (busy-waiting threads count as used)\n",
              r.prefill_cpu, r.decode_cpu);
  std::printf("  weight read rate     %.2f GB/s (DRAM reference %.2f GB/s)\n", r.bandwidth / GB,
              dram.bandwidth / GB);
  if (r.bytes_per_token > 64e6)
    std::printf("  bandwidth bound      %.4f s/token -> decode / bound = %.3f  (target <= 1.10)\n", bound,
                r.decode_s / bound);
  else
    std::printf(
        "  bandwidth bound      n/a: the weights fit in cache, per-op overhead dominates (%.2g s/token)\n",
        bound);
  std::printf("  effective decode bw  %.2f GB/s\n", r.bytes_per_token / r.decode_s / GB);
  std::printf("  decode products only %.4f s/token (%.3f x bound); rest of the step %.4f s (%.1f%%)\n",
              r.products_s, r.products_s / bound, r.decode_s - r.products_s,
              100.0 * (r.decode_s - r.products_s) / r.decode_s);
  std::printf("  peak RSS             %.3f GB (file-backed %.3f, anonymous %.3f) = %.3f x weight bytes%s\n",
              r.peak_rss / GB, r.rss_file / GB, r.rss_anon / GB, r.peak_rss / r.weight_bytes,
              r.weight_bytes > 1e9 ? "  (target < 1.10)" : "  (process baseline dominates)");
}

// --golden, else $VOKEN_GOLDEN_DIR, else shared/golden beside the repository (the executable
// lives in <repo>/<build>/bench/).
std::string golden_root(const Options& options) {
  if (!options.golden.empty()) return options.golden;
  const char* env = std::getenv("VOKEN_GOLDEN_DIR");
  if (env && *env) return env;
  std::error_code ignored;
  return (fs::read_symlink("/proc/self/exe", ignored).parent_path() / "../../../shared/golden")
      .lexically_normal();
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(item);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--threads")
      options.threads = std::stoi(next());
    else if (arg == "--models")
      options.models = split(next());
    else if (arg == "--prompt")
      options.prompt = std::stoi(next());
    else if (arg == "--decode")
      options.decode = std::stoi(next());
    else if (arg == "--repeat")
      options.repeat = std::stoi(next());
    else if (arg == "--dir")
      options.dir = next();
    else if (arg == "--golden")
      options.golden = next();
    else if (arg == "--keep")
      options.keep = true;
    else if (arg == "--omp-passive")
      options.omp_passive = true;
    else {
      std::fprintf(stderr,
                   "usage: bench_llm [--threads N] [--models gemv,tiny,1b,7b] [--prompt N] [--decode N] "
                   "[--repeat N] [--dir D] [--golden D] [--keep] [--omp-passive]\n");
      return 2;
    }
  }
  // libgomp reads OMP_WAIT_POLICY when it is loaded, so the setting needs a fresh process.
  if (options.omp_passive && std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::execv("/proc/self/exe", argv);
    std::perror("bench_llm: re-exec with OMP_WAIT_POLICY=passive failed");
    return 1;
  }
  if (options.prompt < 8 || options.decode < 1 || options.threads < 1 || options.repeat < 1) {
    std::fprintf(stderr, "bench_llm: --prompt >= 8, --decode >= 1, --threads >= 1, --repeat >= 1\n");
    return 2;
  }
  try {
    std::string base = options.dir;
    if (base.empty()) {
      const char* tmp = std::getenv("TMPDIR");
      base = tmp && *tmp ? tmp : "/tmp";
    }
    const std::string work = base + "/voken-bench-llm-" + std::to_string(::getpid());
    fs::create_directories(work);

    std::printf("bench_llm: %d threads, prompt %d tokens, %d decode steps\n", options.threads, options.prompt,
                options.decode);
    voken::bench::print_machine("bench_llm", options.threads);
    const DramResult dram = in_child<DramResult>("dram", [&] { return measure_dram(options); });
    std::printf("DRAM read bandwidth (1 GB buffer): %.2f GB/s with %d threads, %.2f GB/s with 1\n",
                dram.bandwidth / 1e9, options.threads, dram.bandwidth_1thread / 1e9);

    for (const auto& which : options.models) {
      if (which == "gemv") {
        print_gemv(in_child<GemvResult>("gemv", [&] { return measure_gemv(options); }), options.threads);
        continue;
      }
      if (which == "tiny") {
        const std::string dir = golden_root(options) + "/llama/model";
        if (!fs::exists(dir + "/config.json")) {
          std::printf("\n== tiny: skipped (%s not found; set VOKEN_GOLDEN_DIR)\n", dir.c_str());
          continue;
        }
        for (auto dtype : {at::kFloat, at::kBFloat16}) {
          const std::string label =
              std::string("tiny golden (") + (dtype == at::kFloat ? "fp32" : "bf16") + ")";
          print_result(
              in_child<ModelResult>(
                  label,
                  [&] { return measure_model(options, label, dir, dtype, std::max(options.repeat, 5)); }),
              dram);
        }
        continue;
      }
      const Shape* shape = which == "1b" ? &kShape1B : which == "7b" ? &kShape7B : nullptr;
      if (shape == nullptr) throw std::runtime_error("unknown model '" + which + "' (gemv, tiny, 1b, 7b)");
      const std::string dir = work + "/" + which;
      const WriteResult written =
          in_child<WriteResult>("write " + which, [&] { return write_model(dir, *shape); });
      std::printf("\n(%s: wrote %.2f GB of random bf16 weights in %.1f s; MemAvailable now %.1f GB)\n",
                  which.c_str(), written.bytes / 1e9, written.seconds, mem_available() / 1e9);
      if (mem_available() < written.bytes * 1.05)
        std::printf("  WARNING: less memory available than the weights; decode will read from disk\n");
      const std::string label =
          which == "1b" ? "1.1B TinyLlama shape (bf16, GQA 32/4)" : "7B Vicuna shape (bf16)";
      const int repeat = which == "7b" ? 1 : options.repeat;
      const ModelResult r = in_child<ModelResult>(
          label, [&] { return measure_model(options, label, dir, at::kBFloat16, repeat); });
      print_result(r, dram);
      const auto anchors = voken::bench::anchors_for_this_cpu();
      if (which == "7b" && anchors.machine) {
        std::printf("  vs llama.cpp anchor  decode %.2fx of %.2f tok/s, prefill %.2fx of %.1f tok/s\n",
                    (1.0 / r.decode_s) / anchors.llm_decode_tps, anchors.llm_decode_tps,
                    (r.prompt / r.prefill_s) / anchors.llm_prefill_tps, anchors.llm_prefill_tps);
      }
      if (!options.keep) fs::remove_all(dir);
    }
    if (!options.keep) fs::remove_all(work);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_llm: %s\n", e.what());
    return 1;
  }
  return 0;
}
