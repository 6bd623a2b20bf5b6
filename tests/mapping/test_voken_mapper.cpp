// The voken mapper beyond the golden folder: sizes derived from the weights (checked against
// torch's nn.Transformer for a non-default shape), strict weight checking within its own keys,
// options and input validation, bf16 weights, the CFG negative, and stage-2 overrides.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "common/test_support.h"
#include "io/json_file.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "mapping/voken_mapper.h"
#include "voken/error.h"

namespace voken::mapping {
namespace {

using Tensors = std::vector<std::pair<std::string, at::Tensor>>;

// Sizes deliberately unlike upstream's (and unlike each other) so that a swapped dimension
// shows: LLM width 24, model width 16 (4 heads of 4), feed-forward 40, 2 encoder and 3 decoder
// layers, a 7-token decoder prompt.
struct Sizes {
  int64_t llm = 24, sd = 16, ffn = 40, encoder_layers = 2, decoder_layers = 3, prompt = 7;
};

// A MiniGPT-5-like checkpoint with random weights under the upstream names, plus LLM keys the
// mapper must leave alone.
Tensors make_checkpoint(uint64_t seed, const Sizes& s = {}) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto random = [&](std::vector<int64_t> shape, double scale) {
    return at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat)) * scale;
  };
  Tensors t;
  t.emplace_back("t2i_decoder_prompt", random({1, s.prompt, s.sd}, 1.0));
  t.emplace_back("model.llama_model.model.embed_tokens.weight", random({13, s.llm}, 1.0));
  t.emplace_back("model.llama_model.lm_head.weight", random({13, s.llm}, 1.0));
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    t.emplace_back(name + ".weight", random({out, in}, 1.0 / std::sqrt(static_cast<double>(in))));
    t.emplace_back(name + ".bias", random({out}, 0.1));
  };
  auto norm = [&](const std::string& name) {
    t.emplace_back(name + ".weight", 1.0 + random({s.sd}, 0.2));
    t.emplace_back(name + ".bias", random({s.sd}, 0.2));
  };
  auto attention = [&](const std::string& name) {
    t.emplace_back(name + ".in_proj_weight",
                   random({3 * s.sd, s.sd}, 1.0 / std::sqrt(static_cast<double>(s.sd))));
    t.emplace_back(name + ".in_proj_bias", random({3 * s.sd}, 0.1));
    linear(name + ".out_proj", s.sd, s.sd);
  };
  for (int64_t i = 0; i < s.encoder_layers; ++i) {
    const std::string layer = "llm_to_t2i_mapping.encoder.layers." + std::to_string(i) + ".";
    attention(layer + "self_attn");
    linear(layer + "linear1", s.ffn, s.sd);
    linear(layer + "linear2", s.sd, s.ffn);
    norm(layer + "norm1");
    norm(layer + "norm2");
  }
  norm("llm_to_t2i_mapping.encoder.norm");
  for (int64_t i = 0; i < s.decoder_layers; ++i) {
    const std::string layer = "llm_to_t2i_mapping.decoder.layers." + std::to_string(i) + ".";
    attention(layer + "self_attn");
    attention(layer + "multihead_attn");
    linear(layer + "linear1", s.ffn, s.sd);
    linear(layer + "linear2", s.sd, s.ffn);
    norm(layer + "norm1");
    norm(layer + "norm2");
    norm(layer + "norm3");
  }
  norm("llm_to_t2i_mapping.decoder.norm");
  linear("fc.0", s.sd, s.llm);
  linear("fc.2", s.sd, s.sd);
  return t;
}

io::StateDict to_state_dict(const Tensors& tensors, const std::string& source = "synthetic") {
  io::StateDict state;
  for (const auto& [name, tensor] : tensors) state.insert(name, tensor, source);
  return state;
}

MapperOptions four_heads() {
  MapperOptions options;
  options.nhead = 4;
  return options;
}

at::Tensor random_vokens(int64_t batch, int64_t tokens, int64_t width, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({batch, tokens, width}, generator, at::TensorOptions().dtype(at::kFloat));
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

template <typename Exception, typename F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const Exception& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected exception was not thrown";
  return "";
}

TEST(VokenMapper, DerivesSizesFromTheWeightsAndIgnoresOtherComponents) {
  const auto mapper = VokenMapper::load(to_state_dict(make_checkpoint(1)), four_heads());
  EXPECT_EQ(mapper.llm_dim(), 24);
  EXPECT_EQ(mapper.sd_dim(), 16);
  EXPECT_EQ(mapper.dim_feedforward(), 40);
  EXPECT_EQ(mapper.num_encoder_layers(), 2);
  EXPECT_EQ(mapper.num_decoder_layers(), 3);
  EXPECT_EQ(mapper.prompt_len(), 7);
  EXPECT_EQ(mapper.nhead(), 4);
  EXPECT_EQ(mapper.dtype(), at::kFloat);
  const auto out = mapper.forward(random_vokens(2, 5, 24, 7));
  EXPECT_EQ(out.fc_out.sizes(), (at::IntArrayRef{2, 5, 16}));
  EXPECT_EQ(out.memory.sizes(), (at::IntArrayRef{2, 5, 16}));
  EXPECT_EQ(out.mapping_feature.sizes(), (at::IntArrayRef{2, 7, 16}));
  EXPECT_TRUE(out.mapping_feature.isfinite().all().item<bool>());
}

// nn.Transformer itself, for sizes other than the golden folder's (and a fresh Lightning .ckpt).
TEST(VokenMapper, MatchesTorchTransformerForOtherSizes) {
  if (test::run_python("-c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 cannot import torch; skipping the nn.Transformer cross-check";
  test::TempDir dir;
  const std::string script = std::string(VOKEN_SOURCE_DIR) + "/tests/mapping/mapper_reference.py";
  // llm 24, sd 20 with 5 heads, 3 encoder + 2 decoder layers, ffn 36, prompt 9, batch 2 x 6 vokens.
  ASSERT_EQ(test::run_python("'" + script + "' '" + dir.path() + "' 24 20 5 3 2 36 9 2 6 11"), 0);
  MapperOptions options;
  options.nhead = 5;
  const auto mapper = VokenMapper::load(dir.file("stage1.ckpt"), "", options);
  EXPECT_EQ(mapper.num_encoder_layers(), 3);
  EXPECT_EQ(mapper.num_decoder_layers(), 2);
  EXPECT_EQ(mapper.dim_feedforward(), 36);
  EXPECT_EQ(mapper.prompt_len(), 9);
  const auto expected = io::StateDict::load(dir.file("expected.pt"));
  const auto out = mapper.forward(expected.at("input"));
  EXPECT_LE(max_abs_diff(out.fc_out, expected.at("fc_out")), 1e-5);
  EXPECT_LE(max_abs_diff(out.memory, expected.at("memory")), 1e-5);
  EXPECT_LE(max_abs_diff(out.mapping_feature, expected.at("mapping_feature")), 1e-5);
}

TEST(VokenMapper, ReportsEveryWeightProblemAtOnce) {
  Tensors tensors;
  for (auto& [name, tensor] : make_checkpoint(1)) {
    if (name == "fc.2.bias" || name == "llm_to_t2i_mapping.decoder.layers.1.norm3.bias") continue;
    if (name == "llm_to_t2i_mapping.encoder.layers.1.linear2.weight") tensor = at::zeros({16, 41});
    tensors.emplace_back(name, tensor);
  }
  tensors.emplace_back("llm_to_t2i_mapping.encoder.layers.0.extra_scale", at::ones({16}));
  tensors.emplace_back("fc.1.weight", at::ones({16}));
  // A corrupt layer index is one unexpected key, not a million missing layers.
  tensors.emplace_back("llm_to_t2i_mapping.decoder.layers.123456.norm1.weight", at::ones({16}));
  const auto message = message_of<WeightsError>(
      [&] { VokenMapper::load(to_state_dict(tensors, "stage1.ckpt"), four_heads()); });
  for (const char* expected :
       {"missing (2)", "fc.2.bias", "llm_to_t2i_mapping.decoder.layers.1.norm3.bias", "wrong shape (1)",
        "llm_to_t2i_mapping.encoder.layers.1.linear2.weight", "unexpected (3)",
        "encoder.layers.0.extra_scale", "fc.1.weight", "decoder.layers.123456.norm1.weight"})
    EXPECT_NE(message.find(expected), std::string::npos) << expected << " not in: " << message;
  EXPECT_EQ(message.find("llama_model"), std::string::npos) << message;
}

TEST(VokenMapper, AGapInTheLayersIsReportedAsMissingKeys) {
  Tensors tensors;
  for (auto& [name, tensor] : make_checkpoint(1))
    if (name.rfind("llm_to_t2i_mapping.encoder.layers.0.", 0) != 0) tensors.emplace_back(name, tensor);
  const auto message =
      message_of<WeightsError>([&] { VokenMapper::load(to_state_dict(tensors), four_heads()); });
  EXPECT_NE(message.find("missing (12)"), std::string::npos) << message;
  EXPECT_NE(message.find("llm_to_t2i_mapping.encoder.layers.0.self_attn.in_proj_weight"), std::string::npos);
}

TEST(VokenMapper, CheckpointWithoutMapperWeightsIsNamedAsSuch) {
  const Tensors llm_only = {{"model.llama_model.lm_head.weight", at::zeros({4, 8})}};
  const auto message = message_of<WeightsError>([&] { VokenMapper::load(to_state_dict(llm_only)); });
  EXPECT_NE(message.find("no voken mapper weights"), std::string::npos) << message;
}

TEST(VokenMapper, RejectsHeadCountsThatDoNotFitTheWidth) {
  const auto state = to_state_dict(make_checkpoint(1));
  MapperOptions options;
  options.nhead = 3;
  const auto message = message_of<ArgumentError>([&] { VokenMapper::load(state, options); });
  EXPECT_NE(message.find("nhead 3 does not divide the model width 16"), std::string::npos) << message;
  options.nhead = 0;
  EXPECT_THROW(VokenMapper::load(state, options), ArgumentError);
  options = four_heads();
  options.img_token_num = 0;
  EXPECT_THROW(VokenMapper::load(state, options), ArgumentError);

  EXPECT_EQ(MapperOptions::from_json(io::JsonView(io::Json::object(), "bundle.json")).nhead, 8);
  EXPECT_EQ(MapperOptions::from_json(io::JsonView({{"nhead", 16}}, "bundle.json")).nhead, 16);
  const auto config_message = message_of<ConfigError>([&] {
    MapperOptions::from_json(io::JsonView({{"nhead", -2}}, "bundle.json"));
  });
  EXPECT_NE(config_message.find("bundle.json"), std::string::npos) << config_message;
  EXPECT_NE(config_message.find("nhead"), std::string::npos) << config_message;
}

TEST(VokenMapper, RejectsMisshapenInput) {
  const auto mapper = VokenMapper::load(to_state_dict(make_checkpoint(1)), four_heads());
  const std::vector<at::Tensor> bad = {
      at::zeros({5, 24}),    at::zeros({1, 5, 23}),    at::zeros({0, 5, 24}),
      at::zeros({1, 0, 24}), at::zeros({1, 1, 5, 24}), at::zeros({1, 5, 24}, at::kLong),
      at::Tensor()};
  for (const auto& input : bad) {
    SCOPED_TRACE(input.defined() ? c10::str(input.sizes(), " ", input.scalar_type()) : "undefined");
    EXPECT_THROW(mapper.map(input), ArgumentError);
  }
  const auto message = message_of<ArgumentError>([&] { mapper.map(at::zeros({1, 5, 23})); });
  EXPECT_NE(message.find("[batch >= 1, tokens >= 1, 24], got [1, 5, 23]"), std::string::npos) << message;
  EXPECT_THROW(mapper.negative(0), ArgumentError);
}

TEST(VokenMapper, NegativeIsTheMappingOfZeroVokens) {
  const auto mapper = VokenMapper::load(to_state_dict(make_checkpoint(2)), four_heads());
  const auto negative = mapper.negative(3);
  ASSERT_EQ(negative.sizes(), (at::IntArrayRef{3, 7, 16}));
  const auto zeros_mapped = mapper.map(at::zeros({1, mapper.img_token_num(), 24}));
  for (int64_t i = 0; i < 3; ++i) EXPECT_TRUE(test::bit_equal(negative[i], zeros_mapped[0]));
  // Computed once and handed out as copies: changing one does not change the next.
  auto first = mapper.negative(1);
  {
    c10::InferenceMode inference;  // the mapper's outputs are inference tensors
    first.add_(1.0);
  }
  EXPECT_TRUE(test::bit_equal(mapper.negative(1), zeros_mapped));
  // A real voken set maps elsewhere.
  EXPECT_GT(max_abs_diff(mapper.map(random_vokens(1, 8, 24, 3)), zeros_mapped), 1e-3);
}

TEST(VokenMapper, BatchItemsAreMappedIndependently) {
  const auto mapper = VokenMapper::load(to_state_dict(make_checkpoint(3)), four_heads());
  const auto vokens = random_vokens(3, 8, 24, 4);
  const auto together = mapper.map(vokens);
  for (int64_t i = 0; i < 3; ++i)
    EXPECT_LE(max_abs_diff(together[i], mapper.map(vokens.narrow(0, i, 1))[0]), 1e-5) << "item " << i;
}

TEST(VokenMapper, Bfloat16WeightsStayCloseToFloat32) {
  const auto state = to_state_dict(make_checkpoint(4));
  auto options = four_heads();
  const auto fp32 = VokenMapper::load(state, options);
  options.weights.float_dtype = at::kBFloat16;
  const auto bf16 = VokenMapper::load(state, options);
  EXPECT_EQ(bf16.dtype(), at::kBFloat16);
  const auto vokens = random_vokens(2, 8, 24, 5);
  const auto want = fp32.map(vokens);
  const auto got = bf16.map(vokens);
  EXPECT_EQ(got.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 mantissa bits (relative step 2^-8); through 5 layers of LayerNorm-ed values of
  // magnitude ~3 the error stays well under 0.15, while unrelated outputs differ by ~1.
  const double err = max_abs_diff(got, want);
  std::cout << "bf16 vs fp32 max_abs_err=" << err << " (max |fp32| " << want.abs().max().item<double>()
            << ")\n";
  EXPECT_LE(err, 0.15);
  EXPECT_GT(err, 0.0);  // the weights really were converted
}

TEST(VokenMapper, StageTwoKeysOverrideStageOne) {
  const auto stage1 = make_checkpoint(5);
  Tensors stage2;  // what a stage-2 .ckpt adds: a retrained mapping transformer (and LLM keys)
  for (const auto& [name, tensor] : make_checkpoint(6))
    if (name.rfind("llm_to_t2i_mapping.", 0) == 0 || name.rfind("model.", 0) == 0)
      stage2.emplace_back(name, tensor);
  // The expected mix, built by hand: fc and the prompt from stage 1, the transformer from stage 2.
  Tensors mix;
  for (const auto& [name, tensor] : stage1)
    if (name.rfind("llm_to_t2i_mapping.", 0) != 0) mix.emplace_back(name, tensor);
  for (const auto& [name, tensor] : stage2)
    if (name.rfind("llm_to_t2i_mapping.", 0) == 0) mix.emplace_back(name, tensor);

  const auto merged =
      overlay_state_dicts(to_state_dict(stage1, "stage1.ckpt"), to_state_dict(stage2, "stage2.ckpt"));
  EXPECT_EQ(merged.size(), stage1.size());
  EXPECT_EQ(merged.source_of("llm_to_t2i_mapping.decoder.norm.weight"), "stage2.ckpt");
  EXPECT_EQ(merged.source_of("fc.0.weight"), "stage1.ckpt");

  const auto vokens = random_vokens(1, 8, 24, 6);
  const auto want = VokenMapper::load(to_state_dict(mix), four_heads()).map(vokens);
  EXPECT_TRUE(test::bit_equal(VokenMapper::load(merged, four_heads()).map(vokens), want));
  EXPECT_GT(max_abs_diff(VokenMapper::load(to_state_dict(stage1), four_heads()).map(vokens), want), 1e-3);

  // The same from two files.
  test::TempDir dir;
  io::save_torch_state_dict(dir.file("stage1.ckpt"), stage1);
  io::save_torch_state_dict(dir.file("stage2.ckpt"), stage2);
  const auto from_files = VokenMapper::load(dir.file("stage1.ckpt"), dir.file("stage2.ckpt"), four_heads());
  EXPECT_TRUE(test::bit_equal(from_files.map(vokens), want));
}

TEST(VokenMapper, SharedLoaderLeavesOtherKeysToTheCaller) {
  io::WeightLoader loader(to_state_dict(make_checkpoint(1)), {}, "bundle");
  const VokenMapper mapper(four_heads(), loader);
  EXPECT_EQ(mapper.sd_dim(), 16);
  // The LLM keys are someone else's: a strict finish on the shared loader names them.
  const auto message = message_of<WeightsError>([&] { loader.finish(true); });
  EXPECT_NE(message.find("unexpected (2)"), std::string::npos) << message;
  EXPECT_NE(message.find("model.llama_model.lm_head.weight"), std::string::npos) << message;
}

}  // namespace
}  // namespace voken::mapping
