// The random-weight bundle (pipeline/random_bundle.h) and its tokenizer writer
// (text/sentencepiece_writer.h): every part loads through the component loaders exactly as a
// real download would, Python's sentencepiece reads the written tokenizer.model the way voken
// does, files are deterministic per seed, and sampling on the tiny bundle produces vokens and
// stop markers at the documented rates.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "diffusion/sd_pipeline.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "llm/adapters.h"
#include "llm/decoder.h"
#include "llm/llama.h"
#include "mapping/voken_mapper.h"
#include "pipeline/random_bundle.h"
#include "text/sentencepiece_model.h"
#include "text/sentencepiece_writer.h"
#include "text/tokenizer.h"
#include "vision/image_encoder.h"
#include "voken/error.h"

namespace voken {
namespace {

namespace fs = std::filesystem;
using pipeline::RandomBundleShape;
using test::TempDir;

const std::string kSpace = "\xE2\x96\x81";

// ---------------------------------------------------------------------------------------------
// The tokenizer writer.

TEST(SentencePieceWriter, VocabularyHasLlamaLayoutAndEncodesEnglishIntoWords) {
  const auto pieces = text::english_bpe_vocabulary(1000);
  ASSERT_EQ(pieces.size(), 1000u);
  EXPECT_EQ(pieces[0].text, "<unk>");
  EXPECT_EQ(pieces[1].text, "<s>");
  EXPECT_EQ(pieces[2].text, "</s>");
  EXPECT_EQ(pieces[3].text, "<0x00>");
  EXPECT_EQ(pieces[13].text, "<0x0A>");
  EXPECT_EQ(pieces[258].text, "<0xFF>");
  std::set<std::string> unique;
  for (const auto& piece : pieces) EXPECT_TRUE(unique.insert(piece.text).second) << piece.text;
  EXPECT_TRUE(unique.count(kSpace + "###"));
  EXPECT_TRUE(unique.count("##"));
  EXPECT_TRUE(unique.count("#"));
  EXPECT_FALSE(unique.count("###"));

  TempDir dir;
  text::write_sentencepiece_model(dir.file("tokenizer.model"), pieces);
  const text::Tokenizer tokenizer = text::Tokenizer::from_file(dir.file("tokenizer.model"), {});
  EXPECT_EQ(tokenizer.vocab_size(), 1000);
  const std::string sentence =
      "Give the following images in <Img>ImageContent</Img> format. The cat is sitting.";
  const auto ids = tokenizer.encode(sentence);
  EXPECT_LT(ids.size() * 3, sentence.size()) << "English should encode into multi-character pieces";
  EXPECT_EQ(tokenizer.decode(ids), sentence);
  // Characters outside the vocabulary fall back to bytes and come back intact.
  const std::string unicode = "caf\xC3\xA9 \xE2\x82\xAC 42\n";
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(unicode)), unicode);
  // "###" after a space is one piece, without one "##" "#" (as LLaMA's [835], [2277, 29937]).
  EXPECT_EQ(tokenizer.encode(" ###").back(), *tokenizer.token_id(kSpace + "###"));
  const auto glued = tokenizer.encode("end###");
  ASSERT_GE(glued.size(), 2u);
  EXPECT_EQ(std::vector<int64_t>(glued.end() - 2, glued.end()),
            (std::vector<int64_t>{*tokenizer.token_id("##"), *tokenizer.token_id("#")}));
}

TEST(SentencePieceWriter, RealVocabularySizeAndBadInput) {
  const auto pieces = text::english_bpe_vocabulary(32000);
  ASSERT_EQ(pieces.size(), 32000u);
  std::set<std::string> unique;
  for (const auto& piece : pieces) unique.insert(piece.text);
  EXPECT_EQ(unique.size(), 32000u);
  EXPECT_THROW(text::english_bpe_vocabulary(300), ArgumentError);

  auto duplicate = text::english_bpe_vocabulary(400);
  duplicate.back().text = duplicate[300].text;
  EXPECT_THROW(text::serialize_sentencepiece_model(duplicate), ArgumentError);
  auto no_bytes = text::english_bpe_vocabulary(400);
  no_bytes.erase(no_bytes.begin() + 10);
  EXPECT_THROW(text::serialize_sentencepiece_model(no_bytes), ArgumentError);
}

TEST(SentencePieceWriter, PythonSentencePieceAgrees) {
  TempDir dir;
  const std::string model = dir.file("tokenizer.model");
  text::write_sentencepiece_model(model, text::english_bpe_vocabulary(1000));
  const text::Tokenizer tokenizer = text::Tokenizer::from_file(model, {});
  const std::vector<std::string> texts = {"###Human: <Img><ImageHere></Img> What happens next? ###Assistant:",
                                          "The people were walking together on the beach.",
                                          "  two  spaces, digits 2024 and caf\xC3\xA9\n\tnew line",
                                          "###",
                                          "end###",
                                          ""};
  std::vector<std::vector<int64_t>> id_lists;
  for (const auto& text : texts) id_lists.push_back(tokenizer.sentencepiece_encode(text));
  id_lists.push_back({1, 400, 500, 2, 13, 600});

  io::Json request = {{"encode", texts}, {"decode", id_lists}};
  test::write_file(dir.file("request.json"), request.dump());
  const std::string script = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/sentencepiece_reference.py";
  const int status = test::run_python(script + " '" + model + "' '" + dir.file("request.json") + "' '" +
                                      dir.file("response.json") + "'");
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3) GTEST_SKIP() << "Python sentencepiece is not importable";
  ASSERT_EQ(status, 0) << "sentencepiece_reference.py failed";
  const io::Json response = io::read_json_file(dir.file("response.json"));
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(response.at("encode").at(i).get<std::vector<int64_t>>(), id_lists[i]) << texts[i];
  for (size_t i = 0; i < id_lists.size(); ++i)
    EXPECT_EQ(response.at("decode").at(i).get<std::string>(), tokenizer.sentencepiece_decode(id_lists[i]));
}

// ---------------------------------------------------------------------------------------------
// The bundle.

// One tiny bundle for the whole suite (writing it takes well under a second).
class RandomBundle : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    manifest_ = pipeline::write_random_bundle(
        dir_->path(), RandomBundleShape::tiny(), 7,
        [](const std::string& file, int64_t bytes) { files_.emplace_back(file, bytes); });
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string path(const std::string& relative) { return dir_->file(relative); }

  // The LLM as a bundle loads it: base weights + stage 1's adapters with stage 2's on top, by
  // target weight (upstream's loading order; both stages replace embed_tokens/lm_head).
  static llm::Llama load_llm(at::ScalarType dtype = at::kFloat) {
    llm::LlamaAdapters adapters = llm::read_llama_adapters(io::StateDict::load(path("minigpt5_stage1.ckpt")));
    llm::LlamaAdapters stage2 = llm::read_llama_adapters(io::StateDict::load(path("minigpt5_stage2.ckpt")));
    for (auto& [name, tensor] : stage2.replacements) adapters.replacements[name] = tensor;
    for (auto& [name, update] : stage2.lora) adapters.lora[name] = update;
    llm::LlamaConfig config = llm::LlamaConfig::from_file(path("vicuna-7b/config.json"));
    config.vocab_size = adapters.replacements.at("model.embed_tokens.weight").size(0);
    io::WeightOptions options;
    options.float_dtype = dtype;
    io::WeightLoader loader(io::StateDict::load(path("vicuna-7b")), options, "random LLaMA");
    llm::Llama model(config, loader, adapters);
    loader.finish();
    return model;
  }

  static TempDir* dir_;
  static std::string manifest_;
  static std::vector<std::pair<std::string, int64_t>> files_;
};
TempDir* RandomBundle::dir_ = nullptr;
std::string RandomBundle::manifest_;
std::vector<std::pair<std::string, int64_t>> RandomBundle::files_;

TEST_F(RandomBundle, WritesTheManifestAndEveryRealFile) {
  EXPECT_EQ(manifest_, path("bundle.json"));
  const io::Json manifest = io::read_json_file(manifest_);
  EXPECT_EQ(manifest.at("voken_bundle"), 1);
  EXPECT_EQ(manifest.at("random_weights"), true);
  EXPECT_EQ(manifest.at("dtype"), "float32");
  EXPECT_EQ(manifest.at("vision").at("config"), "vision_config.json");
  EXPECT_EQ(manifest.at("minigpt5").at("stage2"), "minigpt5_stage2.ckpt");
  for (const char* file :
       {"vicuna-7b/config.json", "vicuna-7b/model.safetensors", "vicuna-7b/tokenizer.model",
        "vicuna-7b/added_tokens.json", "vicuna-7b/special_tokens_map.json", "vicuna-7b/tokenizer_config.json",
        "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "prerained_minigpt4_7b.pth", "vision_config.json",
        "minigpt5_stage1.ckpt", "minigpt5_stage2.ckpt", "stable-diffusion-2-1-base/model_index.json",
        "stable-diffusion-2-1-base/unet/config.json",
        "stable-diffusion-2-1-base/unet/diffusion_pytorch_model.safetensors",
        "stable-diffusion-2-1-base/vae/config.json",
        "stable-diffusion-2-1-base/vae/diffusion_pytorch_model.safetensors",
        "stable-diffusion-2-1-base/scheduler/scheduler_config.json"}) {
    EXPECT_TRUE(fs::is_regular_file(path(file))) << file;
    EXPECT_TRUE(
        std::any_of(files_.begin(), files_.end(), [&](const auto& entry) { return entry.first == file; }))
        << file << " not reported to the progress callback";
  }
  // Files the components resolve relative to the manifest exist where it says.
  EXPECT_TRUE(fs::is_directory(path(manifest.at("llm").at("path").get<std::string>())));
  EXPECT_TRUE(fs::is_directory(path(manifest.at("diffusion").at("path").get<std::string>())));
}

TEST_F(RandomBundle, ContainersAreTheRealOnes) {
  // eva_vit_g.pth: a bare float16 state dict with one block more than is built.
  const io::TorchFile vit = io::load_torch_file(path("eva_vit_g.pth"));
  const auto vit_tensors = io::torch_state_dict(vit);
  ASSERT_FALSE(vit_tensors.empty());
  EXPECT_EQ(vit_tensors.front().first, "cls_token");
  for (const auto& [name, tensor] : vit_tensors) EXPECT_EQ(tensor.scalar_type(), at::kHalf) << name;
  const io::StateDict vit_state = io::StateDict::load(path("eva_vit_g.pth"));
  EXPECT_TRUE(vit_state.contains("blocks.3.mlp.fc2.bias"));
  EXPECT_FALSE(vit_state.contains("blocks.4.mlp.fc2.bias"));
  // BLIP-2 and MiniGPT-4 files wrap their state dicts in {"model": ...}.
  EXPECT_TRUE(
      io::StateDict::load(path("blip2_pretrained_flant5xxl.pth"), "model").contains("t5_proj.weight"));
  EXPECT_TRUE(io::StateDict::load(path("prerained_minigpt4_7b.pth"), "model").contains("llama_proj.weight"));
  // The stage checkpoints are Lightning dicts.
  const io::TorchFile stage1 = io::load_torch_file(path("minigpt5_stage1.ckpt"));
  const io::StateDict stage1_state = io::StateDict::load(path("minigpt5_stage1.ckpt"));
  EXPECT_EQ(stage1_state.at("model.llama_model.model.embed_tokens.weight").sizes(),
            at::IntArrayRef({1009, 64}));
  EXPECT_EQ(stage1_state.at("t2i_decoder_prompt").sizes(), at::IntArrayRef({1, 77, 32}));
  const io::StateDict stage2_state = io::StateDict::load(path("minigpt5_stage2.ckpt"));
  EXPECT_EQ(
      stage2_state
          .at("model.llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight")
          .sizes(),
      at::IntArrayRef({8, 64}));
  EXPECT_TRUE(
      stage2_state.contains("model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"));
  // The VAE has the attention names of the real SD 2.1 file.
  const io::StateDict vae = io::StateDict::load(path("stable-diffusion-2-1-base/vae"));
  EXPECT_TRUE(vae.contains("decoder.mid_block.attentions.0.query.weight"));
  EXPECT_TRUE(vae.contains("decoder.mid_block.attentions.0.proj_attn.weight"));
  EXPECT_FALSE(vae.contains("decoder.mid_block.attentions.0.to_q.weight"));
}

TEST_F(RandomBundle, TokenizerHasTheMiniGpt5TokensAfterTheVocabulary) {
  const text::Tokenizer tokenizer = text::Tokenizer::from_directory(path("vicuna-7b"));
  EXPECT_EQ(tokenizer.sentencepiece_size(), 1000);
  EXPECT_EQ(tokenizer.vocab_size(), 1009);
  for (int k = 0; k < 8; ++k) EXPECT_EQ(tokenizer.token_id("[IMG" + std::to_string(k) + "]"), 1000 + k);
  EXPECT_EQ(tokenizer.token_id("<ImageHere>"), 1008);
  EXPECT_TRUE(tokenizer.add_bos_token());
  const auto ids = tokenizer.encode("###Human: <Img><ImageHere></Img> hi [IMG0][IMG1]", true);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 1008), ids.end());
}

TEST_F(RandomBundle, EveryComponentLoads) {
  c10::InferenceMode guard;
  // LLM with the stage overlay: LoRA merged, the resized embeddings/lm_head from stage 2.
  const llm::Llama model = load_llm();
  EXPECT_EQ(model.vocab_size(), 1009);
  const auto stage2 = io::StateDict::load(path("minigpt5_stage2.ckpt"));
  EXPECT_TRUE(test::bit_equal(
      model.weight("lm_head.weight"),
      stage2.at("model.llama_model.base_model.model.lm_head.modules_to_save.default.weight").to(at::kFloat)));
  const llm::LlamaOutput out = model.forward(at::tensor({1, 400, 500, 1000}, at::kLong).unsqueeze(0));
  EXPECT_TRUE(at::isfinite(out.logits).all().item<bool>());

  // The image encoder from its three files and the bundle's config.
  const vision::ImageEncoder encoder = vision::ImageEncoder::load(
      {path("eva_vit_g.pth"), path("blip2_pretrained_flant5xxl.pth"), path("prerained_minigpt4_7b.pth")},
      vision::ImageEncoderConfig::load(path("vision_config.json")), io::WeightOptions{at::kFloat});
  const at::Tensor features = encoder.encode(at::rand({2, 3, 224, 224}));
  EXPECT_EQ(features.sizes(), at::IntArrayRef({2, 32, 64}));
  EXPECT_TRUE(at::isfinite(features).all().item<bool>());
  // Image rows about as large as text embeddings (N(0, 1) entries).
  const double rms = features.pow(2).mean().sqrt().item<double>();
  EXPECT_GT(rms, 0.2);
  EXPECT_LT(rms, 5.0);

  // The mapper, stage 2 over stage 1; the condition depends on the vokens.
  const mapping::VokenMapper mapper =
      mapping::VokenMapper::load(path("minigpt5_stage1.ckpt"), path("minigpt5_stage2.ckpt"));
  const at::Tensor vokens = at::randn({1, 8, 64});
  const at::Tensor condition = mapper.map(vokens);
  EXPECT_EQ(condition.sizes(), at::IntArrayRef({1, 77, 32}));
  EXPECT_TRUE(at::isfinite(condition).all().item<bool>());
  EXPECT_GT((condition - mapper.map(at::randn({1, 8, 64}))).abs().max().item<double>(), 1e-3);
  EXPECT_GT((condition - mapper.negative()).abs().max().item<double>(), 1e-3);

  // Stable Diffusion: a few steps give a finite, non-constant image.
  const diffusion::StableDiffusion sd = diffusion::StableDiffusion::load(path("stable-diffusion-2-1-base"));
  diffusion::DiffusionOptions options;
  options.steps = 3;
  options.height = 64;
  options.width = 64;
  options.seed = 1;
  const auto result = sd.generate(condition, mapper.negative(), options);
  EXPECT_EQ(result.image_uint8.sizes(), at::IntArrayRef({1, 64, 64, 3}));
  EXPECT_TRUE(at::isfinite(result.decoded).all().item<bool>());
  EXPECT_GT(result.image_uint8.to(at::kFloat).std().item<double>(), 1.0);
}

// Samples like upstream (top_p 0.9, top_k 50, repetition penalty 2 over generated ids) from a
// text prompt; after [IMG0] the other seven vokens are forced in, as the pipeline does.
struct SampledResponse {
  int64_t images = 0;
  int64_t first_image_at = -1;  // generated-token index of the first [IMG0]
  bool stopped = false;         // ended with a "###" stop sequence
};

SampledResponse sample_response(const llm::Llama& model, const text::Tokenizer& tokenizer, uint64_t seed,
                                int64_t max_new_tokens) {
  llm::SamplingOptions options = llm::SamplingOptions::minigpt5();
  options.seed = seed;
  options.stop_sequences = {{*tokenizer.token_id(kSpace + "###")},
                            {*tokenizer.token_id("##"), *tokenizer.token_id("#")}};
  options.eos_token_ids = {tokenizer.eos_id()};
  const int64_t img0 = *tokenizer.token_id("[IMG0]");
  llm::TokenSampler sampler(options);
  const llm::StopChecker stop(options);
  const auto prompt = tokenizer.encode("###Human: Tell me a story about a cat. ###Assistant:", true);
  llm::DecodeSession session(model, static_cast<int64_t>(prompt.size()) + max_new_tokens + 8 * 8);
  session.prefill(prompt);
  std::vector<int64_t> generated;
  SampledResponse response;
  for (int64_t n = 0; n < max_new_tokens; ++n) {
    const int64_t token = sampler.next(session.last_logits(), generated, n);
    generated.push_back(token);
    if (stop.check(generated) == llm::StopReason::StopSequence) {
      response.stopped = true;
      break;
    }
    if (stop.check(generated) != llm::StopReason::None) break;
    if (token == img0) {
      if (response.images++ == 0) response.first_image_at = n;
      std::vector<int64_t> vokens;
      for (int64_t k = 1; k < 8; ++k) vokens.push_back(img0 + k);
      session.step(token);
      session.force(vokens);
      generated.insert(generated.end(), vokens.begin(), vokens.end());
    } else {
      session.step(token);
    }
  }
  return response;
}

TEST_F(RandomBundle, SamplingProducesVokensAndStops) {
  c10::InferenceMode guard;
  const llm::Llama model = load_llm();
  const text::Tokenizer tokenizer = text::Tokenizer::from_directory(path("vicuna-7b"));
  int early_image = 0, two_images = 0, stopped = 0;
  const int seeds = 12;
  for (int seed = 0; seed < seeds; ++seed) {
    const SampledResponse response = sample_response(model, tokenizer, static_cast<uint64_t>(seed), 256);
    early_image += response.first_image_at >= 0 && response.first_image_at < 60;
    two_images += response.images >= 2;
    stopped += response.stopped;
  }
  std::printf("of %d seeds: [IMG0] within 60 tokens %d, two images %d, stopped by ### %d\n", seeds,
              early_image, two_images, stopped);
  EXPECT_GE(early_image, seeds / 2);
  EXPECT_GE(two_images, 1);
  EXPECT_GE(stopped, 1);
}

TEST_F(RandomBundle, SameSeedSameFilesOtherSeedOtherWeights) {
  TempDir again, other;
  pipeline::write_random_bundle(again.path(), RandomBundleShape::tiny(), 7);
  pipeline::write_random_bundle(other.path(), RandomBundleShape::tiny(), 8);
  for (const char* file :
       {"vicuna-7b/model.safetensors", "vicuna-7b/tokenizer.model", "eva_vit_g.pth", "minigpt5_stage2.ckpt",
        "stable-diffusion-2-1-base/unet/diffusion_pytorch_model.safetensors"})
    EXPECT_EQ(test::read_file(again.file(file)), test::read_file(path(file))) << file;
  EXPECT_NE(test::read_file(other.file("vicuna-7b/model.safetensors")),
            test::read_file(path("vicuna-7b/model.safetensors")));
  EXPECT_EQ(test::read_file(other.file("vicuna-7b/tokenizer.model")),
            test::read_file(path("vicuna-7b/tokenizer.model")));
}

TEST_F(RandomBundle, ShardedLlmHasTheSameWeights) {
  c10::InferenceMode guard;
  RandomBundleShape shape = RandomBundleShape::tiny();
  shape.shard_bytes = 100000;
  shape.write_stage2 = false;
  shape.vae.deprecated_attention_names = false;
  TempDir sharded;
  const std::string manifest = pipeline::write_random_bundle(sharded.path(), shape, 7);
  EXPECT_FALSE(io::read_json_file(manifest).at("minigpt5").contains("stage2"));
  EXPECT_TRUE(fs::is_regular_file(sharded.file("vicuna-7b/model.safetensors.index.json")));
  EXPECT_FALSE(fs::exists(sharded.file("vicuna-7b/model.safetensors")));
  const io::StateDict whole = io::StateDict::load(path("vicuna-7b"));
  const io::StateDict shards = io::StateDict::load(sharded.file("vicuna-7b"));
  auto shard_keys = shards.keys(), whole_keys = whole.keys();
  std::sort(shard_keys.begin(), shard_keys.end());
  std::sort(whole_keys.begin(), whole_keys.end());
  ASSERT_EQ(shard_keys, whole_keys);
  for (const auto& key : whole.keys()) EXPECT_TRUE(test::bit_equal(shards.at(key), whole.at(key))) << key;
  EXPECT_TRUE(io::StateDict::load(sharded.file("stable-diffusion-2-1-base/vae"))
                  .contains("decoder.mid_block.attentions.0.to_q.weight"));
  // The bfloat16 flavour loads too.
  shape.dtype = at::kBFloat16;
  TempDir bf16;
  const io::Json bf16_manifest = io::read_json_file(pipeline::write_random_bundle(bf16.path(), shape, 7));
  EXPECT_EQ(bf16_manifest.at("dtype"), "bfloat16");
  llm::LlamaLoadOptions options;
  options.dtype = at::kBFloat16;
  options.adapter_path = bf16.file("minigpt5_stage1.ckpt");
  EXPECT_EQ(llm::Llama::load(bf16.file("vicuna-7b"), options).vocab_size(), 1009);
}

TEST(RandomBundleShapeTest, ValidatesDimensions) {
  EXPECT_NO_THROW(RandomBundleShape::tiny().validate());
  EXPECT_NO_THROW(RandomBundleShape::minigpt5().validate());
  RandomBundleShape shape = RandomBundleShape::tiny();
  shape.mapper.sd_dim = 40;
  EXPECT_THROW(shape.validate(), ArgumentError);
  shape = RandomBundleShape::tiny();
  shape.llm.num_kv_heads = 3;
  EXPECT_THROW(shape.validate(), ArgumentError);
  shape = RandomBundleShape::tiny();
  shape.unet.attention_head_dim = {2, 4};
  EXPECT_THROW(shape.validate(), ArgumentError);
  shape = RandomBundleShape::tiny();
  shape.dtype = at::kInt;
  TempDir dir;
  EXPECT_THROW(pipeline::write_random_bundle(dir.path(), shape, 0), ArgumentError);
}

}  // namespace
}  // namespace voken
