// StateDict loading from every container and directory layout, prefix views, renames, and the
// WeightLoader's conversion and all-at-once error reporting.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "common/test_support.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "voken/error.h"

namespace voken::io {
namespace {

using test::TempDir;

std::vector<std::pair<std::string, at::Tensor>> small_model() {
  return {{"model.embed_tokens.weight", at::arange(40, at::kFloat).reshape({10, 4})},
          {"model.layers.0.self_attn.q_proj.weight", at::arange(16, at::kFloat).reshape({4, 4}) * 0.5},
          {"model.layers.0.self_attn.v_proj.weight", at::arange(16, at::kFloat).reshape({4, 4}) * -0.25},
          {"model.norm.weight", at::ones({4}, at::kFloat)},
          {"lm_head.weight", at::arange(40, at::kFloat).reshape({10, 4}) * 2}};
}

void expect_model(const StateDict& state) {
  const auto want = small_model();
  ASSERT_EQ(state.size(), want.size());
  for (const auto& [name, tensor] : want) EXPECT_TRUE(test::bit_equal(state.at(name), tensor)) << name;
}

TEST(StateDict, LoadsSafetensorsTorchZipAndKeepsFileOrder) {
  TempDir dir;
  write_safetensors(dir.file("m.safetensors"), small_model());
  save_torch_state_dict(dir.file("m.pth"), small_model());
  for (const char* name : {"m.safetensors", "m.pth"}) {
    const auto state = StateDict::load(dir.file(name));
    expect_model(state);
    EXPECT_EQ(state.source_of("lm_head.weight"), dir.file(name));
  }
  const auto keys = StateDict::load(dir.file("m.pth")).keys();
  EXPECT_EQ(keys.front(), "model.embed_tokens.weight");
  EXPECT_EQ(keys.back(), "lm_head.weight");
}

TEST(StateDict, TorchFileWithoutExtensionIsSniffed) {
  TempDir dir;
  save_torch_state_dict(dir.file("weights"), small_model());
  expect_model(StateDict::load(dir.file("weights")));
}

TEST(StateDict, FindsCheckpointInsideHfAndDiffusersDirectories) {
  TempDir dir;
  std::filesystem::create_directories(dir.file("hf"));
  std::filesystem::create_directories(dir.file("diffusers"));
  std::filesystem::create_directories(dir.file("bin"));
  std::filesystem::create_directories(dir.file("empty"));
  write_safetensors(dir.file("hf/model.safetensors"), small_model());
  write_safetensors(dir.file("diffusers/diffusion_pytorch_model.safetensors"), small_model());
  save_torch_state_dict(dir.file("bin/pytorch_model.bin"), small_model());
  expect_model(StateDict::load(dir.file("hf")));
  expect_model(StateDict::load(dir.file("diffusers")));
  expect_model(StateDict::load(dir.file("bin")));
  try {
    StateDict::load(dir.file("empty"));
    FAIL();
  } catch (const FileNotFoundError& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
}

// Writes the model split over two shards plus an HF index, in either format.
void write_shards(const TempDir& dir, bool safetensors) {
  const auto model = small_model();
  const std::string ext = safetensors ? ".safetensors" : ".bin";
  const std::string stem = safetensors ? "model" : "pytorch_model";
  Json index = {{"metadata", {{"total_size", 123}}}, {"weight_map", Json::object()}};
  for (int shard = 0; shard < 2; ++shard) {
    std::vector<std::pair<std::string, at::Tensor>> part;
    for (std::size_t i = 0; i < model.size(); ++i)
      if (static_cast<int>(i % 2) == shard) part.push_back(model[i]);
    const std::string file = stem + "-0000" + std::to_string(shard + 1) + "-of-00002" + ext;
    if (safetensors)
      write_safetensors(dir.file(file), part);
    else
      save_torch_state_dict(dir.file(file), part);
    for (const auto& [name, tensor] : part) index["weight_map"][name] = file;
  }
  test::write_file(dir.file(stem + ext + ".index.json"), index.dump());
}

TEST(StateDict, LoadsShardedCheckpointsThroughTheirIndex) {
  for (bool safetensors : {true, false}) {
    TempDir dir;
    write_shards(dir, safetensors);
    const std::string index = safetensors ? "model.safetensors.index.json" : "pytorch_model.bin.index.json";
    const auto by_index = StateDict::load(dir.file(index));
    const auto by_directory = StateDict::load(dir.path());
    for (const auto& [name, tensor] : small_model()) {
      EXPECT_TRUE(test::bit_equal(by_index.at(name), tensor)) << name;
      EXPECT_TRUE(test::bit_equal(by_directory.at(name), tensor)) << name;
    }
  }
}

TEST(StateDict, ShardIndexNamingAbsentTensorOrFileIsAnError) {
  TempDir dir;
  write_shards(dir, true);
  auto index = read_json_file(dir.file("model.safetensors.index.json"));
  index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors";
  test::write_file(dir.file("model.safetensors.index.json"), index.dump());
  EXPECT_THROW(StateDict::load(dir.path()), FormatError);
  index["weight_map"].erase("ghost.weight");
  index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors";
  test::write_file(dir.file("model.safetensors.index.json"), index.dump());
  EXPECT_THROW(StateDict::load(dir.path()), FileNotFoundError);
  test::write_file(dir.file("model.safetensors.index.json"), "{\"weight_map\": ");
  EXPECT_THROW(StateDict::load(dir.path()), ConfigError);
}

TEST(StateDict, MissingPathAndGarbageFiles) {
  TempDir dir;
  EXPECT_THROW(StateDict::load(dir.file("nope.pth")), FileNotFoundError);
  test::write_file(dir.file("garbage.bin"), "this is not a checkpoint at all");
  try {
    StateDict::load(dir.file("garbage.bin"));
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("garbage.bin"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("neither a torch.save zip"), std::string::npos) << e.what();
  }
}

TEST(StateDict, SafetensorsWhoseHeaderLengthStartsWith0x80IsNotMistakenForATorchFile) {
  // The first byte of a safetensors file is the low byte of its header length; 0x80 is also
  // the first byte of a pickle, so sniffing must look for torch's full signatures.
  std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header.append(128 - header.size(), ' ');
  std::string bytes(1, '\x80');
  bytes.append(7, '\0');
  bytes += header + std::string(8, '\0');
  TempDir dir;
  test::write_file(dir.file("weights.bin"), bytes);
  const auto state = StateDict::load(dir.file("weights.bin"));
  EXPECT_TRUE(test::bit_equal(state.at("w"), at::zeros({2})));
}

TEST(StateDict, PrefixViewsAndRenames) {
  TempDir dir;
  write_safetensors(dir.file("m.safetensors"), small_model());
  const auto state = StateDict::load(dir.file("m.safetensors"));
  const auto layers = state.with_prefix("model.layers.0.");
  EXPECT_EQ(layers.keys(), (std::vector<std::string>{"self_attn.q_proj.weight", "self_attn.v_proj.weight"}));
  EXPECT_EQ(layers.at("self_attn.q_proj.weight").data_ptr(),
            state.at("model.layers.0.self_attn.q_proj.weight").data_ptr());  // shared, not copied
  const auto renamed = state.renamed({{R"(\.self_attn\.(q|v)_proj\.)", ".attention.$1."}, {"^model\\.", ""}});
  EXPECT_TRUE(renamed.contains("layers.0.attention.q.weight"));
  EXPECT_TRUE(renamed.contains("lm_head.weight"));
  EXPECT_THROW(state.renamed({{".*", "same"}}), WeightsError);
  EXPECT_THROW(state.renamed({{"(", "x"}}), ArgumentError);
}

TEST(WeightLoader, ConvertsFp16ToFp32OnCpuByDefaultAndToRequestedDtype) {
  StateDict state;
  state.insert("h", at::arange(6, at::kFloat).to(at::kHalf), "mem");
  state.insert("b", at::arange(6, at::kFloat).to(at::kBFloat16), "mem");
  state.insert("i", at::arange(6, at::kLong), "mem");
  WeightLoader keep(state, {}, "test");
  EXPECT_EQ(keep.take("h", {6}).scalar_type(), at::kFloat);
  EXPECT_EQ(keep.take("b", {6}).scalar_type(), at::kBFloat16);
  EXPECT_EQ(keep.take("i", {6}).scalar_type(), at::kLong);
  keep.finish();
  WeightLoader bf16(state, {at::kBFloat16, at::kCPU}, "test");
  EXPECT_EQ(bf16.take("h", {6}).scalar_type(), at::kBFloat16);
  EXPECT_EQ(bf16.take("i", {-1}).scalar_type(), at::kLong);  // integers are never converted
  const auto b = bf16.take("b", {6});
  EXPECT_EQ(b.data_ptr(), state.at("b").data_ptr());  // nothing to convert: zero-copy
}

TEST(WeightLoader, ReportsEveryMissingMisShapedAndUnexpectedKeyInOneError) {
  StateDict state;
  state.insert("a.weight", at::zeros({4, 3}), "ckpt.pth");
  state.insert("b.weight", at::zeros({5}), "ckpt.pth");
  state.insert("extra.weight", at::zeros({2}), "ckpt.pth");
  state.insert("t5_proj.weight", at::zeros({2}), "ckpt.pth");
  WeightLoader loader(state, {}, "Tiny model");
  loader.ignore("^t5_proj\\.");
  const auto a = loader.take("a.weight", {4, 4});  // wrong shape
  EXPECT_EQ(a.sizes(), at::IntArrayRef({4, 4}));   // a placeholder lets construction go on
  loader.take("b.weight", {5});
  const auto missing = loader.take("c.weight", {7, 2});
  EXPECT_EQ(missing.sizes(), at::IntArrayRef({7, 2}));
  loader.take("d.bias", {3});
  EXPECT_FALSE(loader.take_optional("e.bias", {3}).defined());
  try {
    loader.finish();
    FAIL() << "no exception";
  } catch (const WeightsError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("Tiny model"), std::string::npos) << m;
    EXPECT_NE(m.find("missing (2)"), std::string::npos) << m;
    EXPECT_NE(m.find("c.weight [7, 2]"), std::string::npos) << m;
    EXPECT_NE(m.find("d.bias [3]"), std::string::npos) << m;
    EXPECT_NE(m.find("wrong shape (1)"), std::string::npos) << m;
    EXPECT_NE(m.find("a.weight: expected [4, 4], found [4, 3] in ckpt.pth"), std::string::npos) << m;
    EXPECT_NE(m.find("unexpected (1)"), std::string::npos) << m;
    EXPECT_NE(m.find("extra.weight [2]"), std::string::npos) << m;
    EXPECT_EQ(m.find("t5_proj"), std::string::npos) << m;  // ignored on purpose
    EXPECT_EQ(m.find("e.bias"), std::string::npos) << m;   // optional
  }
  WeightLoader lenient(state, {}, "Tiny model");
  lenient.take("a.weight", {4, 3});
  lenient.take("b.weight", {5});
  EXPECT_NO_THROW(lenient.finish(/*strict=*/false));
}

TEST(WeightLoader, DerivesDimensionsFromStoredShapes) {
  StateDict state;
  state.insert("w", at::zeros({8, 3}), "mem");
  WeightLoader loader(state, {}, "m");
  EXPECT_EQ(*loader.shape_of("w"), (std::vector<int64_t>{8, 3}));
  EXPECT_FALSE(loader.shape_of("v").has_value());
}

}  // namespace
}  // namespace voken::io
