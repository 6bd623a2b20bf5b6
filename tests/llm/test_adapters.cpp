// Adapters on random tiny models: prefix tuning against an explicit-attention reference built
// here from the same weights, LoRA merged/unmerged against W + (alpha/r) B A, stage-1 style
// embed/lm_head replacement with a resized vocabulary, PEFT adapter directories, and every bad
// adapter checkpoint (rank mismatch, half pairs, unknown keys, wrong shapes) reported at once.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/test_support.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "llm/adapters.h"
#include "llm/decoder.h"
#include "llm/llama.h"
#include "tiny_llama.h"
#include "voken/error.h"

namespace voken::llm {
namespace {

using test::TempDir;

template <typename E, typename F>
void expect_error(F&& body, const std::vector<std::string>& fragments) {
  try {
    body();
    ADD_FAILURE() << "no exception; expected one mentioning '" << fragments.front() << "'";
  } catch (const E& e) {
    const std::string message = e.what();
    for (const auto& f : fragments)
      EXPECT_NE(message.find(f), std::string::npos) << "'" << f << "' not in: " << message;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// A Lightning-style checkpoint: {"state_dict": ..., "epoch": ..., "hyper_parameters": Namespace}.
void write_lightning_ckpt(const std::string& path, const tiny::Weights& state) {
  std::vector<std::pair<std::string, io::PickleValue>> entries;
  for (const auto& [name, t] : state) entries.emplace_back(name, io::PickleValue::of(t));
  io::save_torch_file(path, io::PickleValue::dict({{"epoch", io::PickleValue::of(int64_t{3})},
                                                   {"state_dict", io::PickleValue::dict(entries)},
                                                   {"hyper_parameters", io::PickleValue::ns({})}}));
}

const std::string kPeft = "model.llama_model.base_model.model.";

class AdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_.kv_heads = 2;  // GQA, to exercise the per-kv-head layout of the prefix rows
    weights_ = tiny::make_weights(spec_, 21);
    tiny::write_model(dir_.path(), spec_, weights_);
  }
  Llama load(const std::string& ckpt, bool merge = true) const {
    LlamaLoadOptions options;
    options.adapter_path = ckpt;
    options.merge_lora = merge;
    return Llama::load(dir_.path(), options);
  }
  tiny::Spec spec_;
  TempDir dir_;
  tiny::Weights weights_;
};

// ---------------------------------------------------------------------------------------------
// Prefix tuning.

struct PrefixWeights {
  at::Tensor embedding, w0, b0, w2, b2;
};

PrefixWeights make_prefix(const tiny::Spec& s, int64_t virtual_tokens, int64_t encoder_hidden) {
  at::manual_seed(5);
  const int64_t out = s.layers * 2 * s.kv_heads * s.head_dim();
  return {at::randn({virtual_tokens, s.hidden}), at::randn({encoder_hidden, s.hidden}) * 0.3,
          at::randn({encoder_hidden}) * 0.1, at::randn({out, encoder_hidden}) * 0.5, at::randn({out}) * 0.1};
}

// The reference prefix key/values, computed here as MiniGPT-5's get_prompt does: Embedding ->
// Linear -> Tanh -> Linear, view(P, layers*2, heads, head_dim), permute to [layers*2, heads, P, d],
// split in (key, value) pairs per layer.
std::vector<std::pair<at::Tensor, at::Tensor>> reference_prefix(const tiny::Spec& s, const PrefixWeights& p) {
  const at::Tensor e = p.embedding.to(at::kDouble);
  const at::Tensor hidden = at::tanh(at::matmul(e, p.w0.to(at::kDouble).t()) + p.b0.to(at::kDouble));
  const at::Tensor flat = at::matmul(hidden, p.w2.to(at::kDouble).t()) + p.b2.to(at::kDouble);
  const int64_t P = e.size(0);
  std::vector<std::pair<at::Tensor, at::Tensor>> kv;
  for (int64_t l = 0; l < s.layers; ++l) {
    at::Tensor key = at::empty({s.kv_heads, P, s.head_dim()}, at::kDouble);
    at::Tensor value = at::empty_like(key);
    const int64_t width = s.kv_heads * s.head_dim();
    for (int64_t t = 0; t < P; ++t) {
      key.select(1, t).copy_(flat[t].narrow(0, (2 * l) * width, width).view({s.kv_heads, s.head_dim()}));
      value.select(1, t).copy_(
          flat[t].narrow(0, (2 * l + 1) * width, width).view({s.kv_heads, s.head_dim()}));
    }
    kv.emplace_back(key, value);
  }
  return kv;
}

TEST_F(AdapterTest, PrefixTuningMatchesExplicitAttentionOverThePrefix) {
  const PrefixWeights p = make_prefix(spec_, 5, 24);
  write_lightning_ckpt(dir_.file("prefix.ckpt"), {{"model.prefix_encoder.embedding.weight", p.embedding},
                                                  {"model.prefix_encoder.transform.0.weight", p.w0},
                                                  {"model.prefix_encoder.transform.0.bias", p.b0},
                                                  {"model.prefix_encoder.transform.2.weight", p.w2},
                                                  {"model.prefix_encoder.transform.2.bias", p.b2},
                                                  {"llm_to_t2i_mapping.decoder.norm.weight", at::ones({8})}});
  const Llama model = load(dir_.file("prefix.ckpt"));
  EXPECT_EQ(model.prefix_length(), 5);
  const at::Tensor ids = at::randint(spec_.vocab, {1, 10}, at::kLong);
  const LlamaOutput out = model.forward(ids);
  const auto w = tiny::as_map(weights_);
  // Positions of the real tokens follow the 5 virtual ones (HF LlamaModel with past_key_values).
  const auto ref =
      tiny::reference_forward(spec_, w, w.at("model.embed_tokens.weight").index_select(0, ids[0]),
                              reference_prefix(spec_, p), /*first_position=*/5);
  EXPECT_LT(max_diff(out.logits[0], ref.logits), 2e-5);
  EXPECT_LT(max_diff(out.hidden[0], ref.hidden), 2e-5);

  // Cached decoding with the prefix equals the full forward.
  KvCache cache = model.new_cache(1, 10);
  EXPECT_EQ(cache.length(), 5);
  EXPECT_EQ(cache.capacity(), 15);
  model.forward(ids.narrow(1, 0, 6), &cache);
  for (int64_t i = 6; i < 10; ++i) {
    const LlamaOutput step = model.forward(ids.narrow(1, i, 1), &cache);
    EXPECT_LT(max_diff(step.logits[0][0], out.logits[0][i]), 1e-5) << i;
  }
  expect_error<ArgumentError>([&] { cache.truncate(4); }, {"[5, 15]"});
  // The session counts positions from the first prompt row; the prefix is not one of them.
  DecodeSession session(model, 10);
  session.prefill(model.embed(ids));
  EXPECT_EQ(session.length(), 10);
  EXPECT_LT(max_diff(session.hidden_states(0, 10), out.hidden[0]), 1e-5);
  // Context limit counts the prefix rows.
  expect_error<ArgumentError>([&] { model.new_cache(1, spec_.max_positions); }, {"5 prefix-tuning rows"});
}

TEST_F(AdapterTest, PrefixTuningWithoutProjection) {
  at::manual_seed(6);
  const at::Tensor table = at::randn({3, spec_.layers * 2 * spec_.kv_heads * spec_.head_dim()});
  write_lightning_ckpt(dir_.file("prefix.ckpt"), {{"model.prefix_encoder.embedding.weight", table}});
  const Llama model = load(dir_.file("prefix.ckpt"));
  EXPECT_EQ(model.prefix_length(), 3);
  const int64_t width = spec_.kv_heads * spec_.head_dim();
  std::vector<std::pair<at::Tensor, at::Tensor>> kv;
  for (int64_t l = 0; l < spec_.layers; ++l)
    kv.emplace_back(
        table.narrow(1, 2 * l * width, width).view({3, spec_.kv_heads, spec_.head_dim()}).transpose(0, 1),
        table.narrow(1, (2 * l + 1) * width, width)
            .view({3, spec_.kv_heads, spec_.head_dim()})
            .transpose(0, 1));
  const at::Tensor ids = at::randint(spec_.vocab, {1, 7}, at::kLong);
  const auto w = tiny::as_map(weights_);
  const auto ref =
      tiny::reference_forward(spec_, w, w.at("model.embed_tokens.weight").index_select(0, ids[0]), kv, 3);
  EXPECT_LT(max_diff(model.forward(ids).logits[0], ref.logits), 2e-5);
}

TEST_F(AdapterTest, PrefixEncoderOfTheWrongSizeIsRefused) {
  PrefixWeights p = make_prefix(spec_, 5, 24);
  p.w2 = p.w2.narrow(0, 0, 40).contiguous();
  p.b2 = p.b2.narrow(0, 0, 40).contiguous();
  write_lightning_ckpt(dir_.file("bad.ckpt"), {{"model.prefix_encoder.embedding.weight", p.embedding},
                                               {"model.prefix_encoder.transform.0.weight", p.w0},
                                               {"model.prefix_encoder.transform.0.bias", p.b0},
                                               {"model.prefix_encoder.transform.2.weight", p.w2},
                                               {"model.prefix_encoder.transform.2.bias", p.b2}});
  expect_error<WeightsError>([&] { load(dir_.file("bad.ckpt")); },
                             {"prefix encoder", "produces 40 values", "2*2*8 = 64"});
  write_lightning_ckpt(dir_.file("half.ckpt"), {{"model.prefix_encoder.embedding.weight", p.embedding},
                                                {"model.prefix_encoder.transform.0.weight", p.w0},
                                                {"model.prefix_encoder.mystery", p.b0}});
  expect_error<WeightsError>([&] { load(dir_.file("half.ckpt")); },
                             {"2 problems", "unexpected prefix-encoder tensor model.prefix_encoder.mystery",
                              "1 of the 4 projection tensors"});
}

// ---------------------------------------------------------------------------------------------
// LoRA.

TEST_F(AdapterTest, LoraMergedAndUnmergedMatchTheMergedReference) {
  at::manual_seed(8);
  tiny::Weights state;
  std::map<std::string, at::Tensor> merged = tiny::as_map(weights_);
  const double alpha = 16.0;
  const int64_t r = 4;
  for (int64_t l = 0; l < spec_.layers; ++l) {
    for (const char* module : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      const std::string name = "model.layers." + std::to_string(l) + "." + module;
      const at::Tensor base = merged.at(name + ".weight");
      const at::Tensor a = at::randn({r, base.size(1)}) * 0.2;
      const at::Tensor b = at::randn({base.size(0), r}) * 0.2;
      state.emplace_back(kPeft + name + ".lora_A.default.weight", a);
      state.emplace_back(kPeft + name + ".lora_B.default.weight", b);
      merged[name + ".weight"] = base + (alpha / r) * at::matmul(b.to(at::kDouble), a.to(at::kDouble));
    }
  }
  write_lightning_ckpt(dir_.file("lora.ckpt"), state);
  const Llama merged_model = load(dir_.file("lora.ckpt"), true);
  const Llama unmerged_model = load(dir_.file("lora.ckpt"), false);
  EXPECT_TRUE(unmerged_model.has_unmerged_lora());
  const at::Tensor ids = at::randint(spec_.vocab, {1, 9}, at::kLong);
  const auto ref =
      tiny::reference_forward(spec_, merged, merged.at("model.embed_tokens.weight").index_select(0, ids[0]));
  EXPECT_LT(max_diff(merged_model.forward(ids).logits[0], ref.logits), 5e-5);
  EXPECT_LT(max_diff(unmerged_model.forward(ids).logits[0], ref.logits), 5e-5);
  EXPECT_LT(max_diff(merged_model.weight("model.layers.1.mlp.down_proj.weight"),
                     merged.at("model.layers.1.mlp.down_proj.weight")),
            1e-6);
  // bf16 weights with an unmerged float32 LoRA on top still run.
  LlamaLoadOptions bf16;
  bf16.adapter_path = dir_.file("lora.ckpt");
  bf16.merge_lora = false;
  bf16.dtype = at::kBFloat16;
  const Llama bf16_model = Llama::load(dir_.path(), bf16);
  EXPECT_LT(max_diff(bf16_model.forward(ids).logits[0], ref.logits),
            0.05 * ref.logits.abs().max().item<double>());
}

TEST_F(AdapterTest, PeftAdapterDirectoryUsesItsConfig) {
  at::manual_seed(9);
  const std::string peft_dir = dir_.file("adapter");
  std::filesystem::create_directories(peft_dir);
  const at::Tensor a = at::randn({2, spec_.hidden}) * 0.3;
  const at::Tensor b = at::randn({spec_.heads * spec_.head_dim(), 2}) * 0.3;
  io::write_safetensors(peft_dir + "/adapter_model.safetensors",
                        {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", a},
                         {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", b}});
  std::ofstream(peft_dir + "/adapter_config.json") << io::Json{
      {"peft_type", "LORA"},
      {"r", 2},
      {"lora_alpha", 6},
      {"target_modules", io::Json::array({"q_proj", "v_proj"})},
      {"fan_in_fan_out", false}}.dump();
  const Llama model = load(peft_dir);
  const auto w = tiny::as_map(weights_);
  const at::Tensor want =
      w.at("model.layers.0.self_attn.q_proj.weight") + 3.0 * at::matmul(b, a).to(at::kDouble);
  EXPECT_LT(max_diff(model.weight("model.layers.0.self_attn.q_proj.weight"), want), 1e-6);

  std::ofstream(peft_dir + "/adapter_config.json")
      << io::Json{{"r", 2}, {"target_modules", "q_proj|v_proj"}}.dump();
  expect_error<ConfigError>([&] { load(peft_dir); }, {"adapter_config.json", "target_modules"});
  std::ofstream(peft_dir + "/adapter_config.json")
      << io::Json{{"r", 2}, {"target_modules", io::Json::array({"v_proj"})}}.dump();
  expect_error<WeightsError>([&] { load(peft_dir); }, {"'q_proj' is not among the LoRA target_modules"});
  std::ofstream(peft_dir + "/adapter_config.json") << io::Json{{"r", 4}}.dump();
  expect_error<WeightsError>([&] { load(peft_dir); }, {"rank mismatch", "r=2", "r=4"});
}

TEST_F(AdapterTest, BadLoraCheckpointsListEveryProblem) {
  const std::string q = "model.layers.0.self_attn.q_proj";
  const std::string v = "model.layers.0.self_attn.v_proj";
  const std::string k = "model.layers.1.self_attn.k_proj";
  write_lightning_ckpt(
      dir_.file("bad.ckpt"),
      {{kPeft + q + ".lora_A.default.weight", at::zeros({8, spec_.hidden})},
       {kPeft + q + ".lora_B.default.weight", at::zeros({spec_.hidden, 4})},  // rank 4 vs 8
       {kPeft + v + ".lora_A.default.weight", at::zeros({8, spec_.hidden})},  // no lora_B
       {kPeft + k + ".lora_A.other.weight", at::zeros({8, spec_.hidden})},    // named adapter
       {kPeft + k + ".lora_B.default.weight", at::zeros({16, 8})},
       {kPeft + "model.layers.0.mlp.lora_magnitude_vector", at::zeros({4})},  // DoRA: unknown
       {"fc.0.weight", at::zeros({3, 3})}});                                  // not the LLM's
  expect_error<WeightsError>(
      [&] { load(dir_.file("bad.ckpt")); },
      {"4 problems", "rank mismatch, lora_A [8, 32] (expected [r, in]) vs lora_B [32, 4]",
       v + ": lora_A without lora_B", "adapter 'other'",
       "unexpected tensor " + kPeft + "model.layers.0.mlp.lora_magnitude_vector"});

  // Shapes that are consistent with each other but not with the model: reported by the model.
  write_lightning_ckpt(
      dir_.file("shape.ckpt"),
      {{kPeft + q + ".lora_A.default.weight", at::zeros({8, spec_.hidden + 1})},
       {kPeft + q + ".lora_B.default.weight", at::zeros({spec_.hidden, 8})},
       {kPeft + "model.layers.7.self_attn.q_proj.lora_A.default.weight", at::zeros({8, 4})},
       {kPeft + "model.layers.7.self_attn.q_proj.lora_B.default.weight", at::zeros({4, 8})}});
  expect_error<WeightsError>(
      [&] { load(dir_.file("shape.ckpt")); },
      {"adapter problems (2)", "lora_A [8, 33] and lora_B [32, 8] do not fit a [32, 32] weight",
       "model.layers.7.self_attn.q_proj.weight", "not a linear weight of this model"});
  expect_error<FileNotFoundError>([&] { load(dir_.file("absent.ckpt")); }, {"absent.ckpt"});
}

// ---------------------------------------------------------------------------------------------
// Replaced embed_tokens / lm_head rows (MiniGPT-5's resized vocabulary).

TEST_F(AdapterTest, StageOneAndModulesToSaveReplaceEmbeddingsWithMoreRows) {
  at::manual_seed(10);
  const int64_t vocab = spec_.vocab + 9;
  const at::Tensor embed = at::randn({vocab, spec_.hidden});
  const at::Tensor head = at::randn({vocab, spec_.hidden}) * 0.2;
  // Stage 1: the trained tensors themselves.
  write_lightning_ckpt(dir_.file("stage1.ckpt"), {{"model.llama_model.model.embed_tokens.weight", embed},
                                                  {"model.llama_model.lm_head.weight", head},
                                                  {"t2i_decoder_prompt", at::zeros({1, 77, 8})}});
  // Stage 2: PEFT modules_to_save copies (and PEFT's frozen original_module, ignored).
  write_lightning_ckpt(
      dir_.file("stage2.ckpt"),
      {{kPeft + "model.embed_tokens.modules_to_save.default.weight", embed},
       {kPeft + "model.embed_tokens.original_module.weight", at::zeros({spec_.vocab, spec_.hidden})},
       {kPeft + "lm_head.modules_to_save.default.weight", head}});
  for (const char* ckpt : {"stage1.ckpt", "stage2.ckpt"}) {
    const Llama model = load(dir_.file(ckpt));
    EXPECT_EQ(model.vocab_size(), vocab) << ckpt;
    auto w = tiny::as_map(weights_);
    w["model.embed_tokens.weight"] = embed.to(at::kDouble);
    w["lm_head.weight"] = head.to(at::kDouble);
    tiny::Spec spec = spec_;
    spec.vocab = vocab;
    const at::Tensor ids =
        at::tensor(std::vector<int64_t>{1, 5, vocab - 9, vocab - 1}, at::kLong).unsqueeze(0);
    const auto ref =
        tiny::reference_forward(spec, w, w.at("model.embed_tokens.weight").index_select(0, ids[0]));
    EXPECT_LT(max_diff(model.forward(ids).logits[0], ref.logits), 2e-5) << ckpt;
  }

  // A bf16 checkpoint: the replacements stay bf16 views of the mapped file (no float32 copy of a
  // vocab x hidden matrix), and the model converts them to its own dtype.
  write_lightning_ckpt(dir_.file("stage1_bf16.ckpt"),
                       {{"model.llama_model.model.embed_tokens.weight", embed.to(at::kBFloat16)},
                        {"model.llama_model.lm_head.weight", head.to(at::kBFloat16)}});
  const io::StateDict stored = io::StateDict::load(dir_.file("stage1_bf16.ckpt"));
  const LlamaAdapters read = read_llama_adapters(stored);
  const at::Tensor& replacement = read.replacements.at("model.embed_tokens.weight");
  EXPECT_EQ(replacement.scalar_type(), at::kBFloat16);
  EXPECT_EQ(replacement.data_ptr(), stored.at("model.llama_model.model.embed_tokens.weight").data_ptr());
  const Llama from_bf16 = load(dir_.file("stage1_bf16.ckpt"));
  EXPECT_EQ(from_bf16.vocab_size(), vocab);

  write_lightning_ckpt(dir_.file("uneven.ckpt"),
                       {{"model.llama_model.model.embed_tokens.weight", embed},
                        {"model.llama_model.lm_head.weight", head.narrow(0, 0, 100)}});
  expect_error<WeightsError>([&] { load(dir_.file("uneven.ckpt")); },
                             {"embed_tokens has 106 rows but lm_head has 100"});
  write_lightning_ckpt(dir_.file("only_embed.ckpt"),
                       {{"model.llama_model.model.embed_tokens.weight", embed}});
  expect_error<WeightsError>([&] { load(dir_.file("only_embed.ckpt")); },
                             {"lm_head.weight: expected [106, 32], found [97, 32]"});
  write_lightning_ckpt(dir_.file("narrow.ckpt"),
                       {{"model.llama_model.model.embed_tokens.weight", at::zeros({spec_.vocab, 16})}});
  expect_error<WeightsError>([&] { load(dir_.file("narrow.ckpt")); },
                             {"replacement model.embed_tokens.weight", "expected [97, 32], found [97, 16]"});
}

}  // namespace
}  // namespace voken::llm
