#include "pipeline/random_bundle.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <utility>

#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "text/sentencepiece_writer.h"
#include "voken/error.h"

namespace voken::pipeline {
namespace {

namespace fs = std::filesystem;
using Tensors = std::vector<std::pair<std::string, at::Tensor>>;
using io::Json;
using io::PickleValue;

// Names of the bundle's parts (the real downloads' names).
constexpr const char* kLlmDir = "vicuna-7b";
constexpr const char* kVitFile = "eva_vit_g.pth";
constexpr const char* kQFormerFile = "blip2_pretrained_flant5xxl.pth";
constexpr const char* kProjectionFile = "prerained_minigpt4_7b.pth";
constexpr const char* kVisionConfigFile = "vision_config.json";
constexpr const char* kStage1File = "minigpt5_stage1.ckpt";
constexpr const char* kStage2File = "minigpt5_stage2.ckpt";
constexpr const char* kDiffusionDir = "stable-diffusion-2-1-base";
constexpr int64_t kAddedTokens = 9;  // [IMG0]..[IMG7], <ImageHere>

// ---------------------------------------------------------------------------------------------
// Deterministic random tensors: every tensor has its own generator, seeded from the bundle seed
// and the tensor's file and name, so values do not depend on generation order or sharding.

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t fnv1a(const std::string& text) {
  uint64_t hash = 0xCBF29CE484222325ull;
  for (const char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001B3ull;
  }
  return hash;
}

class Random {
 public:
  Random(uint64_t seed, std::string file) : seed_(seed), file_(std::move(file)) {}

  at::Generator generator(const std::string& name) const {
    return at::make_generator<at::CPUGeneratorImpl>(splitmix64(seed_ ^ fnv1a(file_ + ":" + name)));
  }
  // float32 N(mean, std).
  at::Tensor normal(const std::string& name, const std::vector<int64_t>& shape, double std,
                    double mean = 0.0) const {
    at::Generator gen = generator(name);
    return at::normal(mean, std, shape, gen, at::TensorOptions().dtype(at::kFloat));
  }

 private:
  uint64_t seed_;
  std::string file_;
};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

// A layer's weights and biases in a transformer: N(0, std) matrices, small biases, LayerNorm
// weights near one.
struct TransformerInit {
  const Random& random;
  at::ScalarType dtype;
  double std = 0.02;

  void linear(Tensors& out, const std::string& name, int64_t out_features, int64_t in_features,
              bool bias = true, double weight_std = -1) const {
    out.emplace_back(
        name + ".weight",
        random.normal(name + ".weight", {out_features, in_features}, weight_std > 0 ? weight_std : std)
            .to(dtype));
    if (bias) out.emplace_back(name + ".bias", random.normal(name + ".bias", {out_features}, 0.02).to(dtype));
  }
  void layer_norm(Tensors& out, const std::string& name, int64_t width) const {
    out.emplace_back(name + ".weight", random.normal(name + ".weight", {width}, 0.05, 1.0).to(dtype));
    out.emplace_back(name + ".bias", random.normal(name + ".bias", {width}, 0.02).to(dtype));
  }
  void tensor(Tensors& out, const std::string& name, const std::vector<int64_t>& shape,
              double tensor_std) const {
    out.emplace_back(name, random.normal(name, shape, tensor_std).to(dtype));
  }
};

// ---------------------------------------------------------------------------------------------
// Files.

void write_json(const fs::path& path, const Json& json) {
  std::ofstream out(path, std::ios::trunc);
  out << json.dump(2) << "\n";
  out.close();
  if (!out) throw FormatError(path.string() + ": cannot be written");
}

int64_t bytes_on_disk(const fs::path& path) {
  std::error_code error;
  const auto size = fs::file_size(path, error);
  return error ? 0 : static_cast<int64_t>(size);
}

class Writer {
 public:
  Writer(fs::path dir, const RandomBundleProgress& progress) : dir_(std::move(dir)), progress_(progress) {}

  fs::path path(const std::string& relative) const { return dir_ / relative; }
  void done(const std::string& relative) const {
    if (progress_) progress_(relative, bytes_on_disk(path(relative)));
  }
  void json(const std::string& relative, const Json& value) const {
    write_json(path(relative), value);
    done(relative);
  }
  void safetensors(const std::string& relative, const Tensors& tensors) const {
    io::write_safetensors(path(relative).string(), tensors, {{"format", "pt"}});
    done(relative);
  }
  void torch(const std::string& relative, const PickleValue& root) const {
    io::save_torch_file(path(relative).string(), root);
    done(relative);
  }

 private:
  fs::path dir_;
  const RandomBundleProgress& progress_;
};

PickleValue tensor_dict(const Tensors& tensors) {
  std::vector<std::pair<std::string, PickleValue>> entries;
  entries.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) entries.emplace_back(name, PickleValue::of(tensor));
  return PickleValue::dict(std::move(entries));
}

const char* manifest_dtype(at::ScalarType dtype) { return dtype == at::kFloat ? "float32" : "bfloat16"; }

// HF's torch_dtype names.
const char* torch_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return "float16";
  }
}

// ---------------------------------------------------------------------------------------------
// The LLM (Vicuna-7B layout) and its tokenizer.

struct TokenIds {
  int64_t base_vocab = 0;                     // sentencepiece pieces
  int64_t img0 = 0;                           // [IMG0]; [IMGk] = img0 + k; <ImageHere> = img0 + 8
  int64_t stop_space = -1, stop_hashes = -1;  // "▁###", "##"
  std::vector<int64_t> quiet;                 // <unk>, <s> and the byte pieces
};

TokenIds write_tokenizer(const Writer& writer, const RandomBundleShape& shape) {
  const int64_t base = shape.llm.vocab_size - kAddedTokens;
  const std::vector<text::Piece> pieces = text::english_bpe_vocabulary(static_cast<int>(base));
  const std::string dir = std::string(kLlmDir) + "/";
  text::write_sentencepiece_model(writer.path(dir + "tokenizer.model").string(), pieces);
  writer.done(dir + "tokenizer.model");

  TokenIds ids;
  ids.base_vocab = base;
  ids.img0 = base;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (pieces[i].text == "\xE2\x96\x81###") ids.stop_space = static_cast<int64_t>(i);
    if (pieces[i].text == "##") ids.stop_hashes = static_cast<int64_t>(i);
    const text::PieceType type = pieces[i].type;
    if (type == text::PieceType::kByte || type == text::PieceType::kUnknown ||
        (type == text::PieceType::kControl && pieces[i].text != "</s>"))
      ids.quiet.push_back(static_cast<int64_t>(i));
  }

  // What transformers 4.31's save_pretrained writes after MiniGPT-5's add_special_tokens.
  std::vector<std::string> added;
  for (int k = 0; k < 8; ++k) added.push_back("[IMG" + std::to_string(k) + "]");
  added.push_back("<ImageHere>");
  Json added_ids = Json::object();
  for (size_t k = 0; k < added.size(); ++k) added_ids[added[k]] = base + static_cast<int64_t>(k);
  writer.json(dir + "added_tokens.json", added_ids);
  const auto special = [](const char* content) {
    return Json{{"content", content},
                {"lstrip", false},
                {"normalized", true},
                {"rstrip", false},
                {"single_word", false}};
  };
  writer.json(dir + "special_tokens_map.json", Json{{"additional_special_tokens", added},
                                                    {"bos_token", special("<s>")},
                                                    {"eos_token", special("</s>")},
                                                    {"pad_token", "</s>"},
                                                    {"unk_token", special("<unk>")}});
  Json bos = special("<s>"), eos = special("</s>"), unk = special("<unk>");
  for (Json* token : {&bos, &eos, &unk}) (*token)["__type"] = "AddedToken";
  writer.json(dir + "tokenizer_config.json", Json{{"add_bos_token", true},
                                                  {"add_eos_token", false},
                                                  {"bos_token", bos},
                                                  {"clean_up_tokenization_spaces", false},
                                                  {"eos_token", eos},
                                                  {"legacy", true},
                                                  {"model_max_length", shape.llm.context},
                                                  {"pad_token", nullptr},
                                                  {"sp_model_kwargs", Json::object()},
                                                  {"tokenizer_class", "LlamaTokenizer"},
                                                  {"unk_token", unk}});
  return ids;
}

// The embedding and lm_head with all `vocab_size` rows (the added tokens' included), as the
// header comment describes: embeddings N(0, 1) with the bias channel 0 held at 1; lm_head
// N(0, 1/hidden) with column 0 carrying the per-token logit biases.
at::Tensor embedding_rows(const Random& random, const RandomBundleShape& shape) {
  at::Tensor embed = random.normal("embed_tokens", {shape.llm.vocab_size, shape.llm.hidden_size}, 1.0);
  embed.select(1, 0).fill_(1.0);
  return embed;
}

at::Tensor lm_head_rows(const Random& random, const RandomBundleShape& shape, const TokenIds& ids) {
  const int64_t hidden = shape.llm.hidden_size;
  const double row_std = 1.0 / std::sqrt(static_cast<double>(hidden));
  at::Tensor head = random.normal("lm_head", {shape.llm.vocab_size, hidden}, row_std);
  head.select(1, 0).mul_(0.1);  // little bias for ordinary tokens
  // Biased tokens: a quieter row (the bias dominates their logit) and the bias in column 0.
  const auto bias = [&](int64_t id, double value) {
    if (id < 0) return;
    head[id].mul_(0.3);
    head[id][0].fill_(value);
  };
  bias(ids.img0, shape.llm.img0_logit_bias);
  for (int64_t k = 1; k < kAddedTokens; ++k) bias(ids.img0 + k, -shape.llm.img0_logit_bias);
  // Like a trained LLaMA, which rarely writes byte pieces (random ones would decode to U+FFFD).
  for (const int64_t id : ids.quiet) bias(id, -shape.llm.img0_logit_bias);
  bias(ids.stop_space, shape.llm.stop_logit_bias);
  bias(ids.stop_hashes, shape.llm.stop_logit_bias);
  return head;
}

// One tensor of the base model, generated when its shard is written.
struct LlmTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::function<at::Tensor()> make;  // float32
};

void write_llm(const Writer& writer, const RandomBundleShape& shape, const TokenIds& ids, uint64_t seed) {
  const auto& s = shape.llm;
  const Random random(seed, "llm");
  const int64_t head_dim = s.hidden_size / s.num_heads;
  const int64_t kv = s.num_kv_heads * head_dim;
  const double std = 0.02;
  // GPT-2's scaled initialisation of the residual branches' output projections; row 0 is zero so
  // that no layer writes the bias channel.
  const double out_std = std / std::sqrt(2.0 * static_cast<double>(s.num_layers));

  std::vector<LlmTensor> plan;
  const auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, double matrix_std,
                          bool zero_row0) {
    plan.push_back({name, {rows, cols}, [&random, name, rows, cols, matrix_std, zero_row0] {
                      at::Tensor t = random.normal(name, {rows, cols}, matrix_std);
                      if (zero_row0) t[0].zero_();
                      return t;
                    }});
  };
  const auto ones = [&](const std::string& name) {
    plan.push_back({name, {s.hidden_size}, [&s] { return at::ones({s.hidden_size}, at::kFloat); }});
  };
  plan.push_back({"model.embed_tokens.weight", {ids.base_vocab, s.hidden_size}, [&] {
                    return embedding_rows(random, shape).narrow(0, 0, ids.base_vocab).contiguous();
                  }});
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    matrix(p + "self_attn.q_proj.weight", s.num_heads * head_dim, s.hidden_size, std, false);
    matrix(p + "self_attn.k_proj.weight", kv, s.hidden_size, std, false);
    matrix(p + "self_attn.v_proj.weight", kv, s.hidden_size, std, false);
    matrix(p + "self_attn.o_proj.weight", s.hidden_size, s.num_heads * head_dim, out_std, true);
    matrix(p + "mlp.gate_proj.weight", s.intermediate_size, s.hidden_size, std, false);
    matrix(p + "mlp.up_proj.weight", s.intermediate_size, s.hidden_size, std, false);
    matrix(p + "mlp.down_proj.weight", s.hidden_size, s.intermediate_size, out_std, true);
    ones(p + "input_layernorm.weight");
    ones(p + "post_attention_layernorm.weight");
  }
  ones("model.norm.weight");
  plan.push_back({"lm_head.weight", {ids.base_vocab, s.hidden_size}, [&] {
                    return lm_head_rows(random, shape, ids).narrow(0, 0, ids.base_vocab).contiguous();
                  }});

  // Shards of at most shard_bytes (a tensor larger than that gets a shard of its own).
  const int64_t element = static_cast<int64_t>(c10::elementSize(shape.dtype));
  std::vector<std::vector<const LlmTensor*>> shards(1);
  int64_t shard_size = 0, total = 0;
  for (const auto& tensor : plan) {
    const int64_t bytes = numel(tensor.shape) * element;
    if (shard_size > 0 && shard_size + bytes > shape.shard_bytes) {
      shards.emplace_back();
      shard_size = 0;
    }
    shards.back().push_back(&tensor);
    shard_size += bytes;
    total += bytes;
  }

  const std::string dir = std::string(kLlmDir) + "/";
  Json weight_map = Json::object();
  for (size_t k = 0; k < shards.size(); ++k) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, shards.size());
    const std::string file = shards.size() == 1 ? std::string("model.safetensors") : std::string(name);
    Tensors tensors;
    for (const LlmTensor* tensor : shards[k]) {
      tensors.emplace_back(tensor->name, tensor->make().to(shape.dtype));
      weight_map[tensor->name] = file;
    }
    writer.safetensors(dir + file, tensors);
  }
  if (shards.size() > 1)
    writer.json(dir + "model.safetensors.index.json",
                Json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});

  writer.json(dir + "config.json", Json{{"architectures", Json::array({"LlamaForCausalLM"})},
                                        {"bos_token_id", 1},
                                        {"eos_token_id", 2},
                                        {"hidden_act", "silu"},
                                        {"hidden_size", s.hidden_size},
                                        {"initializer_range", 0.02},
                                        {"intermediate_size", s.intermediate_size},
                                        {"max_position_embeddings", s.context},
                                        {"model_type", "llama"},
                                        {"num_attention_heads", s.num_heads},
                                        {"num_hidden_layers", s.num_layers},
                                        {"num_key_value_heads", s.num_kv_heads},
                                        {"pad_token_id", 0},
                                        {"pretraining_tp", 1},
                                        {"rms_norm_eps", 1e-6},
                                        {"rope_scaling", nullptr},
                                        {"rope_theta", 10000.0},
                                        {"tie_word_embeddings", false},
                                        {"torch_dtype", torch_dtype_name(shape.dtype)},
                                        {"transformers_version", "4.31.0"},
                                        {"use_cache", true},
                                        {"vocab_size", ids.base_vocab}});
}

// ---------------------------------------------------------------------------------------------
// The image encoder's three files.

bool default_vision_dims(const RandomBundleShape& shape) {
  const RandomBundleShape real = RandomBundleShape::minigpt5();
  const auto& v = shape.vision;
  const auto& q = shape.qformer;
  return v.img_size == real.vision.img_size && v.patch_size == real.vision.patch_size &&
         v.width == real.vision.width && v.depth == real.vision.depth &&
         v.num_heads == real.vision.num_heads && v.mlp_hidden == real.vision.mlp_hidden &&
         q.hidden_size == real.qformer.hidden_size && q.num_layers == real.qformer.num_layers &&
         q.num_heads == real.qformer.num_heads && q.intermediate_size == real.qformer.intermediate_size &&
         q.num_queries == real.qformer.num_queries &&
         q.cross_attention_freq == real.qformer.cross_attention_freq;
}

void write_vision(const Writer& writer, const RandomBundleShape& shape, uint64_t seed) {
  const auto& v = shape.vision;
  const auto& q = shape.qformer;
  {
    // eva_vit_g.pth: a bare float16 state dict with one block more than MiniGPT-4 builds.
    const Random random(seed, kVitFile);
    const TransformerInit init{random, at::kHalf};
    Tensors vit;
    const int64_t grid = v.img_size / v.patch_size;
    init.tensor(vit, "cls_token", {1, 1, v.width}, 0.02);
    init.tensor(vit, "pos_embed", {1, 1 + grid * grid, v.width}, 0.02);
    init.tensor(vit, "patch_embed.proj.weight", {v.width, 3, v.patch_size, v.patch_size}, 0.02);
    init.tensor(vit, "patch_embed.proj.bias", {v.width}, 0.02);
    for (int64_t i = 0; i < v.depth + 1; ++i) {
      const std::string p = "blocks." + std::to_string(i) + ".";
      init.layer_norm(vit, p + "norm1", v.width);
      init.tensor(vit, p + "attn.q_bias", {v.width}, 0.02);
      init.tensor(vit, p + "attn.v_bias", {v.width}, 0.02);
      init.linear(vit, p + "attn.qkv", 3 * v.width, v.width, /*bias=*/false);
      init.linear(vit, p + "attn.proj", v.width, v.width);
      init.layer_norm(vit, p + "norm2", v.width);
      init.linear(vit, p + "mlp.fc1", v.mlp_hidden, v.width);
      init.linear(vit, p + "mlp.fc2", v.width, v.mlp_hidden);
    }
    // In the order the real file lists them (cls_token, pos_embed, patch_embed, blocks).
    io::save_torch_state_dict(writer.path(kVitFile).string(), vit);
    writer.done(kVitFile);
  }
  {
    // BLIP-2 (as saved from Blip2T5, whose Q-Former text branch is removed): ln_vision, the
    // query path of Qformer.bert, query_tokens, and the unused t5_proj.
    const Random random(seed, kQFormerFile);
    const TransformerInit init{random, shape.dtype};
    Tensors blip2;
    init.tensor(blip2, "query_tokens", {1, q.num_queries, q.hidden_size}, 0.02);
    init.layer_norm(blip2, "ln_vision", v.width);
    blip2.emplace_back("Qformer.bert.embeddings.position_ids", at::arange(512, at::kLong).unsqueeze(0));
    init.layer_norm(blip2, "Qformer.bert.embeddings.LayerNorm", q.hidden_size);
    for (int64_t i = 0; i < q.num_layers; ++i) {
      const std::string p = "Qformer.bert.encoder.layer." + std::to_string(i) + ".";
      for (const char* projection : {"query", "key", "value"})
        init.linear(blip2, p + "attention.self." + projection, q.hidden_size, q.hidden_size);
      init.linear(blip2, p + "attention.output.dense", q.hidden_size, q.hidden_size);
      init.layer_norm(blip2, p + "attention.output.LayerNorm", q.hidden_size);
      if (i % q.cross_attention_freq == 0) {
        init.linear(blip2, p + "crossattention.self.query", q.hidden_size, q.hidden_size);
        init.linear(blip2, p + "crossattention.self.key", q.hidden_size, v.width);
        init.linear(blip2, p + "crossattention.self.value", q.hidden_size, v.width);
        init.linear(blip2, p + "crossattention.output.dense", q.hidden_size, q.hidden_size);
        init.layer_norm(blip2, p + "crossattention.output.LayerNorm", q.hidden_size);
      }
      init.linear(blip2, p + "intermediate_query.dense", q.intermediate_size, q.hidden_size);
      init.linear(blip2, p + "output_query.dense", q.hidden_size, q.intermediate_size);
      init.layer_norm(blip2, p + "output_query.LayerNorm", q.hidden_size);
    }
    init.linear(blip2, "t5_proj", q.t5_width, q.hidden_size);
    writer.torch(kQFormerFile, PickleValue::dict({{"model", tensor_dict(blip2)}}));
  }
  {
    // MiniGPT-4's projection, scaled so that image rows are about as large as text embeddings.
    const Random random(seed, kProjectionFile);
    const TransformerInit init{random, shape.dtype};
    Tensors projection;
    init.linear(projection, "llama_proj", shape.llm.hidden_size, q.hidden_size, true,
                1.0 / std::sqrt(static_cast<double>(q.hidden_size)));
    writer.torch(kProjectionFile, PickleValue::dict({{"model", tensor_dict(projection)}}));
  }
  if (!default_vision_dims(shape)) {
    writer.json(kVisionConfigFile,
                Json{{"_comment",
                      "Not an upstream file: the dimensions of this random-weight bundle's image encoder "
                      "(upstream hard-codes EVA ViT-g, bert-base and Vicuna-7B's width)."},
                     {"vision",
                      {{"img_size", v.img_size},
                       {"patch_size", v.patch_size},
                       {"embed_dim", v.width},
                       {"depth", v.depth},
                       {"num_heads", v.num_heads},
                       {"mlp_hidden", v.mlp_hidden}}},
                     {"qformer",
                      {{"hidden_size", q.hidden_size},
                       {"num_hidden_layers", q.num_layers},
                       {"num_attention_heads", q.num_heads},
                       {"intermediate_size", q.intermediate_size},
                       {"cross_attention_freq", q.cross_attention_freq},
                       {"query_length", q.num_queries}}},
                     {"num_query_token", q.num_queries},
                     {"llama_proj", {{"in", q.hidden_size}, {"out", shape.llm.hidden_size}}}});
  }
}

// ---------------------------------------------------------------------------------------------
// MiniGPT-5's Lightning checkpoints.

// llm_to_t2i_mapping (torch.nn.Transformer's state_dict names), xavier-like scales so that the
// condition depends on the vokens.
void mapping_tensors(Tensors& out, const Random& random, const RandomBundleShape& shape) {
  const auto& m = shape.mapper;
  const double d = static_cast<double>(m.sd_dim);
  const TransformerInit init{random, shape.dtype, 1.0 / std::sqrt(d)};
  const auto attention = [&](const std::string& p) {
    init.tensor(out, p + ".in_proj_weight", {3 * m.sd_dim, m.sd_dim}, 1.0 / std::sqrt(d));
    out.emplace_back(p + ".in_proj_bias",
                     random.normal(p + ".in_proj_bias", {3 * m.sd_dim}, 0.02).to(shape.dtype));
    init.linear(out, p + ".out_proj", m.sd_dim, m.sd_dim);
  };
  const auto feed_forward = [&](const std::string& p) {
    init.linear(out, p + "linear1", m.ffn_dim, m.sd_dim);
    init.linear(out, p + "linear2", m.sd_dim, m.ffn_dim, true,
                1.0 / std::sqrt(static_cast<double>(m.ffn_dim)));
  };
  for (int64_t i = 0; i < m.encoder_layers; ++i) {
    const std::string p = "llm_to_t2i_mapping.encoder.layers." + std::to_string(i) + ".";
    attention(p + "self_attn");
    feed_forward(p);
    init.layer_norm(out, p + "norm1", m.sd_dim);
    init.layer_norm(out, p + "norm2", m.sd_dim);
  }
  init.layer_norm(out, "llm_to_t2i_mapping.encoder.norm", m.sd_dim);
  for (int64_t i = 0; i < m.decoder_layers; ++i) {
    const std::string p = "llm_to_t2i_mapping.decoder.layers." + std::to_string(i) + ".";
    attention(p + "self_attn");
    attention(p + "multihead_attn");
    feed_forward(p);
    for (const char* norm : {"norm1", "norm2", "norm3"}) init.layer_norm(out, p + norm, m.sd_dim);
  }
  init.layer_norm(out, "llm_to_t2i_mapping.decoder.norm", m.sd_dim);
}

// The rest of what Lightning 2.0 saves around the state_dict (MiniGPT-5's trainer settings).
PickleValue lightning_checkpoint(const Tensors& state, int64_t epoch, int64_t step) {
  const std::string best_path =
      "weights/model_epoch=" + std::to_string(epoch) + "-step=" + std::to_string(step) + ".ckpt";
  PickleValue callback = PickleValue::dict({{"monitor", PickleValue::of("val_loss")},
                                            {"best_model_score", PickleValue::of(at::scalar_tensor(0.4375))},
                                            {"best_model_path", PickleValue::of(best_path)},
                                            {"current_score", PickleValue::of(at::scalar_tensor(0.4375))},
                                            {"dirpath", PickleValue::of("weights")},
                                            {"best_k_models", PickleValue::dict({})},
                                            {"kth_best_model_path", PickleValue::of("")},
                                            {"kth_value", PickleValue::of(at::scalar_tensor(INFINITY))},
                                            {"last_model_path", PickleValue::of("")}});
  PickleValue loops = PickleValue::dict(
      {{"fit_loop",
        PickleValue::dict(
            {{"state_dict", PickleValue::dict({})},
             {"epoch_loop.state_dict", PickleValue::dict({{"_batches_that_stepped", PickleValue::of(step)}})},
             {"epoch_progress",
              PickleValue::dict(
                  {{"total", PickleValue::dict({{"ready", PickleValue::of(epoch + 1)},
                                                {"completed", PickleValue::of(epoch)}})}})}})}});
  PickleValue model_args = PickleValue::ns({{"model_type", PickleValue::of("multimodal_encoder")},
                                            {"snr_loss", PickleValue::of(true)},
                                            {"model_save_name", PickleValue::of("model_{epoch}-{step}")},
                                            {"stage1_weight", PickleValue::none()}});
  PickleValue hyper_parameters = PickleValue::dict(
      {{"cache_dir", PickleValue::none()},
       {"output_dir", PickleValue::of("weights")},
       {"num_train_epochs", PickleValue::of(2)},
       {"per_device_train_batch_size", PickleValue::of(2)},
       {"per_device_eval_batch_size", PickleValue::of(2)},
       {"real_batch_size", PickleValue::of(48)},
       {"save_total_limit", PickleValue::of(1)},
       {"learning_rate", PickleValue::of(2e-5)},
       {"warmup_ratio", PickleValue::of(0.03)},
       {"warmup_steps", PickleValue::of(1000)},
       {"adam_epsilon", PickleValue::of(1e-8)},
       {"num_workers", PickleValue::of(16)},
       {"gpus",
        PickleValue::list({PickleValue::of(0), PickleValue::of(1), PickleValue::of(2), PickleValue::of(3)})},
       {"resume", PickleValue::none()},
       {"is_training", PickleValue::of(true)},
       {"test_weight", PickleValue::none()},
       {"model_args", model_args}});
  const std::string callback_key =
      "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
      "'train_time_interval': None}";
  return PickleValue::dict({{"epoch", PickleValue::of(epoch)},
                            {"global_step", PickleValue::of(step)},
                            {"pytorch-lightning_version", PickleValue::of("2.0.2")},
                            {"state_dict", tensor_dict(state)},
                            {"loops", loops},
                            {"callbacks", PickleValue::dict({{callback_key, callback}})},
                            {"optimizer_states", PickleValue::list({})},
                            {"lr_schedulers", PickleValue::list({})},
                            {"hparams_name", PickleValue::of("kwargs")},
                            {"hyper_parameters", hyper_parameters}});
}

void write_stages(const Writer& writer, const RandomBundleShape& shape, const TokenIds& ids, uint64_t seed) {
  const Random llm_random(seed, "llm");
  {
    // Stage 1: the mapper, the decoder prompt and the LLM's resized embedding/lm_head.
    const Random random(seed, kStage1File);
    const TransformerInit init{random, shape.dtype};
    Tensors state;
    state.emplace_back(
        "t2i_decoder_prompt",
        random.normal("t2i_decoder_prompt", {1, shape.mapper.prompt_len, shape.mapper.sd_dim}, 1.0)
            .to(shape.dtype));
    state.emplace_back("model.llama_model.model.embed_tokens.weight",
                       embedding_rows(llm_random, shape).to(shape.dtype));
    state.emplace_back("model.llama_model.lm_head.weight",
                       lm_head_rows(llm_random, shape, ids).to(shape.dtype));
    mapping_tensors(state, random, shape);
    const double llm_width = static_cast<double>(shape.llm.hidden_size);
    init.linear(state, "fc.0", shape.mapper.sd_dim, shape.llm.hidden_size, true, 1.0 / std::sqrt(llm_width));
    init.linear(state, "fc.2", shape.mapper.sd_dim, shape.mapper.sd_dim, true,
                1.0 / std::sqrt(static_cast<double>(shape.mapper.sd_dim)));
    writer.torch(kStage1File, lightning_checkpoint(state, 1, 5000));
  }
  if (!shape.write_stage2) return;
  {
    // Stage 2: PEFT LoRA (r, alpha 16, q_proj/v_proj), modules_to_save copies of embed_tokens and
    // lm_head (stage 1's, moved a little by training), and the retrained mapping.
    const Random random(seed, kStage2File);
    const auto& s = shape.llm;
    const int64_t head_dim = s.hidden_size / s.num_heads;
    const std::string peft = "model.llama_model.base_model.model.";
    Tensors state;
    const auto moved = [&](const std::string& name, const at::Tensor& rows) {
      return (rows + random.normal(name, {rows.size(0), rows.size(1)}, 0.01)).to(shape.dtype);
    };
    const std::string embed = peft + "model.embed_tokens.modules_to_save.default.weight";
    state.emplace_back(embed, moved(embed, embedding_rows(llm_random, shape)));
    const double a_std = 1.0 / std::sqrt(static_cast<double>(s.hidden_size));
    for (int64_t i = 0; i < s.num_layers; ++i) {
      const std::string p = peft + "model.layers." + std::to_string(i) + ".self_attn.";
      for (const auto& [module, rows] :
           {std::pair<const char*, int64_t>{"q_proj", s.num_heads * head_dim},
            std::pair<const char*, int64_t>{"v_proj", s.num_kv_heads * head_dim}}) {
        const std::string a = p + module + ".lora_A.default.weight";
        const std::string b = p + module + ".lora_B.default.weight";
        state.emplace_back(a, random.normal(a, {s.lora_rank, s.hidden_size}, a_std).to(shape.dtype));
        state.emplace_back(b, random.normal(b, {rows, s.lora_rank}, 0.02).to(shape.dtype));
      }
    }
    const std::string head = peft + "lm_head.modules_to_save.default.weight";
    state.emplace_back(head, moved(head, lm_head_rows(llm_random, shape, ids)));
    mapping_tensors(state, random, shape);
    writer.torch(kStage2File, lightning_checkpoint(state, 0, 1234));
  }
}

// ---------------------------------------------------------------------------------------------
// Stable Diffusion 2.1-base layout.

Json unet_config(const RandomBundleShape& shape) {
  const auto& u = shape.unet;
  const size_t blocks = u.block_out_channels.size();
  std::vector<std::string> down(blocks, "CrossAttnDownBlock2D"), up(blocks, "CrossAttnUpBlock2D");
  down.back() = "DownBlock2D";
  up.front() = "UpBlock2D";
  if (!u.full_resolution_attention) {
    down.front() = "DownBlock2D";
    up.back() = "UpBlock2D";
  }
  return Json{{"_class_name", "UNet2DConditionModel"},
              {"_diffusers_version", "0.31.0"},
              {"act_fn", "silu"},
              {"addition_embed_type", nullptr},
              {"addition_embed_type_num_heads", 64},
              {"addition_time_embed_dim", nullptr},
              {"attention_head_dim", u.attention_head_dim},
              {"attention_type", "default"},
              {"block_out_channels", u.block_out_channels},
              {"center_input_sample", false},
              {"class_embed_type", nullptr},
              {"class_embeddings_concat", false},
              {"conv_in_kernel", 3},
              {"conv_out_kernel", 3},
              {"cross_attention_dim", u.cross_attention_dim},
              {"cross_attention_norm", nullptr},
              {"down_block_types", down},
              {"downsample_padding", 1},
              {"dropout", 0.0},
              {"dual_cross_attention", false},
              {"encoder_hid_dim", nullptr},
              {"encoder_hid_dim_type", nullptr},
              {"flip_sin_to_cos", true},
              {"freq_shift", 0},
              {"in_channels", 4},
              {"layers_per_block", u.layers_per_block},
              {"mid_block_only_cross_attention", nullptr},
              {"mid_block_scale_factor", 1},
              {"mid_block_type", "UNetMidBlock2DCrossAttn"},
              {"norm_eps", 1e-05},
              {"norm_num_groups", u.norm_num_groups},
              {"num_attention_heads", nullptr},
              {"num_class_embeds", nullptr},
              {"only_cross_attention", false},
              {"out_channels", 4},
              {"projection_class_embeddings_input_dim", nullptr},
              {"resnet_out_scale_factor", 1.0},
              {"resnet_skip_time_act", false},
              {"resnet_time_scale_shift", "default"},
              {"reverse_transformer_layers_per_block", nullptr},
              {"sample_size", u.sample_size},
              {"time_cond_proj_dim", nullptr},
              {"time_embedding_act_fn", nullptr},
              {"time_embedding_dim", nullptr},
              {"time_embedding_type", "positional"},
              {"timestep_post_act", nullptr},
              {"transformer_layers_per_block", 1},
              {"up_block_types", up},
              {"upcast_attention", false},
              {"use_linear_projection", u.use_linear_projection}};
}

Json vae_config(const RandomBundleShape& shape) {
  const auto& v = shape.vae;
  const size_t blocks = v.block_out_channels.size();
  return Json{{"_class_name", "AutoencoderKL"},
              {"_diffusers_version", "0.31.0"},
              {"act_fn", "silu"},
              {"block_out_channels", v.block_out_channels},
              {"down_block_types", std::vector<std::string>(blocks, "DownEncoderBlock2D")},
              {"force_upcast", true},
              {"in_channels", 3},
              {"latent_channels", v.latent_channels},
              {"latents_mean", nullptr},
              {"latents_std", nullptr},
              {"layers_per_block", v.layers_per_block},
              {"mid_block_add_attention", true},
              {"norm_num_groups", v.norm_num_groups},
              {"out_channels", 3},
              {"sample_size", v.sample_size},
              {"scaling_factor", 0.18215},
              {"shift_factor", nullptr},
              {"up_block_types", std::vector<std::string>(blocks, "UpDecoderBlock2D")},
              {"use_post_quant_conv", true},
              {"use_quant_conv", true}};
}

// SD 2.1-base's scheduler/scheduler_config.json (diffusers 0.31 field set).
Json pndm_config() {
  return Json{{"_class_name", "PNDMScheduler"},
              {"_diffusers_version", "0.31.0"},
              {"beta_end", 0.012},
              {"beta_schedule", "scaled_linear"},
              {"beta_start", 0.00085},
              {"clip_sample", false},
              {"num_train_timesteps", 1000},
              {"prediction_type", "epsilon"},
              {"set_alpha_to_one", false},
              {"skip_prk_steps", true},
              {"steps_offset", 1},
              {"timestep_spacing", "leading"},
              {"trained_betas", nullptr}};
}

using io::WeightShapes;

// The (key, shape) list a diffusers model takes (io::expected_weights), which keeps the random
// files exactly in step with what the loaders take.
WeightShapes expected_weights(const std::function<void(io::WeightLoader&)>& build) {
  WeightShapes out = io::expected_weights(build);
  if (out.empty()) throw Error("random bundle: could not list the weights of a diffusion model");
  return out;
}

// Initialisation-scaled weights: norms near one, small biases, others N(0, 1/fan_in).
Tensors diffusion_weights(const Random& random, const WeightShapes& shapes, at::ScalarType dtype,
                          const std::function<std::string(const std::string&)>& rename = {}) {
  const std::regex norm_weight(R"((norm\d*|norm_out|group_norm|conv_norm_out)\.weight$)");
  Tensors out;
  for (const auto& [name, dims] : shapes) {
    const std::string stored = rename ? rename(name) : name;
    at::Tensor t;
    if (std::regex_search(name, norm_weight)) {
      t = random.normal(stored, dims, 0.1, 1.0);
    } else if (dims.size() == 1) {
      t = random.normal(stored, dims, 0.02);
    } else {
      const int64_t fan_in = numel(dims) / dims[0];
      t = random.normal(stored, dims, 1.0 / std::sqrt(static_cast<double>(fan_in)));
    }
    out.emplace_back(stored, t.to(dtype));
  }
  return out;
}

void write_diffusion(const Writer& writer, const RandomBundleShape& shape, uint64_t seed) {
  const std::string root = std::string(kDiffusionDir) + "/";
  for (const char* sub : {"unet", "vae", "scheduler"}) fs::create_directories(writer.path(root + sub));
  diffusion::ComputeOptions probe_options;
  probe_options.channels_last = false;  // channels-last would materialise the placeholders
  {
    const Json config = unet_config(shape);
    const auto parsed = diffusion::UNetConfig::from_json(io::JsonView(config, "random unet/config.json"));
    const WeightShapes shapes = expected_weights(
        [&](io::WeightLoader& loader) { diffusion::UNet2DCondition unet(parsed, loader, probe_options); });
    writer.json(root + "unet/config.json", config);
    writer.safetensors(root + "unet/diffusion_pytorch_model.safetensors",
                       diffusion_weights(Random(seed, "unet"), shapes, shape.dtype));
  }
  {
    const Json config = vae_config(shape);
    const auto parsed = diffusion::VaeConfig::from_json(io::JsonView(config, "random vae/config.json"));
    const WeightShapes shapes = expected_weights(
        [&](io::WeightLoader& loader) { diffusion::AutoencoderKL vae(parsed, loader, probe_options); });
    // The real SD 2.1 VAE file still has the attention names diffusers deprecated in 0.15.
    std::function<std::string(const std::string&)> rename;
    if (shape.vae.deprecated_attention_names) {
      rename = [](const std::string& name) {
        static const std::vector<std::pair<std::regex, std::string>> rules = {
            {std::regex(R"((attentions\.\d+\.)to_q\.)"), "$1query."},
            {std::regex(R"((attentions\.\d+\.)to_k\.)"), "$1key."},
            {std::regex(R"((attentions\.\d+\.)to_v\.)"), "$1value."},
            {std::regex(R"((attentions\.\d+\.)to_out\.0\.)"), "$1proj_attn."}};
        std::string out = name;
        for (const auto& [pattern, replacement] : rules) out = std::regex_replace(out, pattern, replacement);
        return out;
      };
    }
    writer.json(root + "vae/config.json", config);
    writer.safetensors(root + "vae/diffusion_pytorch_model.safetensors",
                       diffusion_weights(Random(seed, "vae"), shapes, shape.dtype, rename));
  }
  writer.json(root + "scheduler/scheduler_config.json", pndm_config());
  // Only the parts MiniGPT-5 uses are present (its vokens replace the text encoder).
  writer.json(root + "model_index.json", Json{{"_class_name", "StableDiffusionPipeline"},
                                              {"_diffusers_version", "0.31.0"},
                                              {"requires_safety_checker", false},
                                              {"scheduler", Json::array({"diffusers", "PNDMScheduler"})},
                                              {"unet", Json::array({"diffusers", "UNet2DConditionModel"})},
                                              {"vae", Json::array({"diffusers", "AutoencoderKL"})}});
}

void require(bool ok, const std::string& what) {
  if (!ok) throw ArgumentError("RandomBundleShape: " + what);
}

std::string dims_string(const std::vector<int64_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

}  // namespace

RandomBundleShape RandomBundleShape::tiny() { return RandomBundleShape{}; }

RandomBundleShape RandomBundleShape::minigpt5() {
  RandomBundleShape s;
  s.llm = {32009, 4096, 11008, 32, 32, 32, 2048, 3.2, 1.4, 8};
  s.vision = {224, 14, 1408, 39, 16, 6144};
  s.qformer = {768, 12, 12, 3072, 32, 2, 64, 4096};
  s.mapper = {1024, 4, 4, 4096, 8, 77};
  s.unet.block_out_channels = {320, 640, 1280, 1280};
  s.unet.layers_per_block = 2;
  s.unet.attention_head_dim = {5, 10, 20, 20};
  s.unet.cross_attention_dim = 1024;
  s.unet.use_linear_projection = true;
  s.unet.full_resolution_attention = true;
  s.unet.sample_size = 64;
  s.unet.norm_num_groups = 32;
  s.vae.block_out_channels = {128, 256, 512, 512};
  s.vae.layers_per_block = 2;
  s.vae.norm_num_groups = 32;
  s.vae.latent_channels = 4;
  s.vae.sample_size = 512;
  s.vae.deprecated_attention_names = true;
  s.dtype = at::kBFloat16;
  return s;
}

void RandomBundleShape::validate() const {
  const auto positive = [](const char* name, int64_t value) {
    require(value > 0, std::string(name) + " must be positive, found " + std::to_string(value));
  };
  positive("llm.hidden_size", llm.hidden_size);
  positive("llm.intermediate_size", llm.intermediate_size);
  positive("llm.num_layers", llm.num_layers);
  positive("llm.num_heads", llm.num_heads);
  positive("llm.num_kv_heads", llm.num_kv_heads);
  positive("llm.context", llm.context);
  positive("llm.lora_rank", llm.lora_rank);
  require(llm.hidden_size % llm.num_heads == 0 && (llm.hidden_size / llm.num_heads) % 2 == 0,
          "llm.hidden_size " + std::to_string(llm.hidden_size) + " must be num_heads (" +
              std::to_string(llm.num_heads) + ") times an even head size");
  require(llm.num_heads % llm.num_kv_heads == 0, "llm.num_kv_heads " + std::to_string(llm.num_kv_heads) +
                                                     " must divide num_heads " +
                                                     std::to_string(llm.num_heads));
  require(llm.hidden_size >= 2, "llm.hidden_size must be at least 2 (channel 0 is the bias channel)");
  positive("vision.img_size", vision.img_size);
  positive("vision.patch_size", vision.patch_size);
  positive("vision.width", vision.width);
  positive("vision.depth", vision.depth);
  positive("vision.num_heads", vision.num_heads);
  positive("vision.mlp_hidden", vision.mlp_hidden);
  require(vision.img_size % vision.patch_size == 0, "vision.patch_size must divide vision.img_size");
  require(vision.width % vision.num_heads == 0, "vision.num_heads must divide vision.width");
  positive("qformer.hidden_size", qformer.hidden_size);
  positive("qformer.num_layers", qformer.num_layers);
  positive("qformer.num_heads", qformer.num_heads);
  positive("qformer.intermediate_size", qformer.intermediate_size);
  positive("qformer.num_queries", qformer.num_queries);
  positive("qformer.cross_attention_freq", qformer.cross_attention_freq);
  positive("qformer.t5_width", qformer.t5_width);
  require(qformer.hidden_size % qformer.num_heads == 0, "qformer.num_heads must divide qformer.hidden_size");
  positive("mapper.sd_dim", mapper.sd_dim);
  positive("mapper.encoder_layers", mapper.encoder_layers);
  positive("mapper.decoder_layers", mapper.decoder_layers);
  positive("mapper.ffn_dim", mapper.ffn_dim);
  positive("mapper.nhead", mapper.nhead);
  positive("mapper.prompt_len", mapper.prompt_len);
  require(mapper.sd_dim % mapper.nhead == 0, "mapper.nhead " + std::to_string(mapper.nhead) +
                                                 " must divide mapper.sd_dim " +
                                                 std::to_string(mapper.sd_dim));
  require(mapper.sd_dim == unet.cross_attention_dim,
          "mapper.sd_dim " + std::to_string(mapper.sd_dim) + " must equal unet.cross_attention_dim " +
              std::to_string(unet.cross_attention_dim) + " (the mapping is the UNet's condition)");
  require(
      !unet.block_out_channels.empty() && unet.attention_head_dim.size() == unet.block_out_channels.size(),
      "unet.attention_head_dim " + dims_string(unet.attention_head_dim) +
          " needs one entry per unet.block_out_channels " + dims_string(unet.block_out_channels));
  for (const int64_t c : unet.block_out_channels)
    require(c > 0 && c % unet.norm_num_groups == 0,
            "unet.block_out_channels " + dims_string(unet.block_out_channels) +
                " must be multiples of norm_num_groups " + std::to_string(unet.norm_num_groups));
  positive("unet.layers_per_block", unet.layers_per_block);
  positive("unet.sample_size", unet.sample_size);
  require(!vae.block_out_channels.empty(), "vae.block_out_channels is empty");
  for (const int64_t c : vae.block_out_channels)
    require(c > 0 && c % vae.norm_num_groups == 0,
            "vae.block_out_channels " + dims_string(vae.block_out_channels) +
                " must be multiples of norm_num_groups " + std::to_string(vae.norm_num_groups));
  positive("vae.layers_per_block", vae.layers_per_block);
  positive("vae.latent_channels", vae.latent_channels);
  require(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
          std::string("dtype must be float32, bfloat16 or float16, found ") + c10::toString(dtype));
  positive("shard_bytes", shard_bytes);
  // The tokenizer's vocabulary (english_bpe_vocabulary checks its own minimum).
  require(llm.vocab_size - kAddedTokens >= 400,
          "llm.vocab_size " + std::to_string(llm.vocab_size) + " leaves fewer than 400 sentencepiece pieces");
}

std::string write_random_bundle(const std::string& dir, const RandomBundleShape& shape, uint64_t seed,
                                const RandomBundleProgress& progress) {
  shape.validate();
  c10::InferenceMode guard;
  const fs::path root(dir);
  std::error_code error;
  fs::create_directories(root / kLlmDir, error);
  if (error) throw FormatError(dir + ": cannot create the bundle directory (" + error.message() + ")");
  const Writer writer(root, progress);

  const TokenIds ids = write_tokenizer(writer, shape);
  write_llm(writer, shape, ids, seed);
  write_vision(writer, shape, seed);
  write_stages(writer, shape, ids, seed);
  write_diffusion(writer, shape, seed);

  Json vision = {{"vit", kVitFile}, {"qformer", kQFormerFile}, {"projection", kProjectionFile}};
  if (!default_vision_dims(shape)) vision["config"] = kVisionConfigFile;
  vision["preprocess"] = "playground";
  Json minigpt5 = {{"stage1", kStage1File}};
  if (shape.write_stage2) minigpt5["stage2"] = kStage2File;
  minigpt5["nhead"] = shape.mapper.nhead;
  minigpt5["img_token_num"] = 8;
  const std::string name =
      "MiniGPT-5 layout with random weights (LLaMA " + std::to_string(shape.llm.num_layers) + "x" +
      std::to_string(shape.llm.hidden_size) + ", ViT " + std::to_string(shape.vision.depth) + "x" +
      std::to_string(shape.vision.width) + ", UNet " + dims_string(shape.unet.block_out_channels) +
      ", seed " + std::to_string(seed) + ")";
  const Json manifest = {{"voken_bundle", 1},
                         {"name", name},
                         {"random_weights", true},
                         {"dtype", manifest_dtype(shape.dtype)},
                         {"device", "cpu"},
                         {"llm", {{"path", kLlmDir}}},
                         {"tokenizer", {{"path", kLlmDir}}},
                         {"vision", vision},
                         {"minigpt5", minigpt5},
                         {"diffusion", {{"path", kDiffusionDir}, {"scheduler", "pndm"}}}};
  writer.json("bundle.json", manifest);
  return (root / "bundle.json").string();
}

}  // namespace voken::pipeline
