// The bundle manifest and the checks made before any weight is loaded: every problem of the
// manifest in one ConfigError, missing parts listed together, a checkpoint in the wrong slot
// named for what it is, dimensions that do not connect, and a bundle assembled from the golden
// folders' parts (which disagree on one thing only: their tokenizer's size).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "io/json_file.h"
#include "pipeline/bundle.h"
#include "voken/error.h"

namespace voken::pipeline {
namespace {

namespace fs = std::filesystem;

#define EXPECT_CONTAINS(text, needle) EXPECT_NE(std::string(text).find(needle), std::string::npos) << (text)

io::Json minimal_manifest() {
  return io::Json::parse(R"({
    "voken_bundle": 1,
    "llm": {"path": "vicuna-7b"},
    "vision": {"vit": "eva_vit_g.pth", "qformer": "blip2.pth", "projection": "minigpt4.pth"},
    "minigpt5": {"stage1": "stage1.ckpt"},
    "diffusion": {"path": "sd"}
  })");
}

std::string parse_error(const io::Json& json) {
  try {
    BundleManifest::parse(json, "/base", "test.json");
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no ConfigError for " << json.dump();
  return "";
}

TEST(BundleManifest, ResolvesPathsAndDefaults) {
  io::Json json = minimal_manifest();
  json["vision"]["config"] = "/abs/vision.json";
  json["minigpt5"]["stage2"] = "sub/../stage2.ckpt";
  json["dtype"] = "float16";
  json["diffusion"]["dtype"] = "float32";
  json["diffusion"]["scheduler"] = "ddim";
  json["_comment"] = "ignored";
  const BundleManifest m = BundleManifest::parse(json, "/base", "test.json");
  EXPECT_EQ(m.llm.path, "/base/vicuna-7b");
  EXPECT_EQ(m.tokenizer.path, "/base/vicuna-7b");  // defaults to the LLM directory
  EXPECT_EQ(m.vision.files.vit, "/base/eva_vit_g.pth");
  EXPECT_EQ(m.vision.config, "/abs/vision.json");
  EXPECT_EQ(m.minigpt5.stage2, "/base/stage2.ckpt");
  EXPECT_EQ(m.minigpt5.nhead, 8);
  EXPECT_EQ(m.minigpt5.img_token_num, 8);
  EXPECT_EQ(m.vision.preprocess, vision::TransformKind::Playground);
  EXPECT_EQ(m.llm.placement.dtype, "bfloat16");  // float16 runs as bfloat16 on the CPU
  EXPECT_EQ(m.diffusion.placement.dtype, "float32");
  EXPECT_EQ(m.diffusion.placement.scalar_type(), at::kFloat);
  EXPECT_EQ(m.llm.placement.device, "cpu");
  EXPECT_EQ(m.diffusion.scheduler, "ddim");
  EXPECT_FALSE(m.random_weights);

  BundleManifest overridden = m;
  LoadOptions options;
  options.dtype = "float32";
  overridden.override_placement(options);
  EXPECT_EQ(overridden.llm.placement.dtype, "float32");
  EXPECT_EQ(overridden.vision.placement.dtype, "float32");
  options.dtype = "int8";
  EXPECT_THROW(overridden.override_placement(options), ArgumentError);
  options.dtype = "";
  options.device = "gpu";
  EXPECT_THROW(overridden.override_placement(options), ArgumentError);
}

TEST(BundleManifest, EveryProblemInOneError) {
  io::Json json = minimal_manifest();
  json["voken_bundle"] = 2;
  json["lmm"] = {{"path", "typo"}};
  json["llm"]["dtyp"] = "float32";
  json["vision"].erase("qformer");
  json["vision"]["preprocess"] = "squash";
  json["minigpt5"]["nhead"] = "eight";
  json["minigpt5"]["img_token_num"] = 0;
  json["diffusion"]["scheduler"] = "heun";
  json["device"] = "tpu";
  json["dtype"] = "int4";
  json["random_weights"] = "yes";
  const std::string message = parse_error(json);
  EXPECT_CONTAINS(message, "test.json");
  EXPECT_CONTAINS(message, "'voken_bundle': format version 2");
  EXPECT_CONTAINS(message, "'lmm': unknown field");
  EXPECT_CONTAINS(message, "'llm.dtyp': unknown field");
  EXPECT_CONTAINS(message, "'vision.qformer': missing");
  EXPECT_CONTAINS(message, "'vision.preprocess': unknown transform 'squash'");
  EXPECT_CONTAINS(message, "'minigpt5.nhead': expected an integer");
  EXPECT_CONTAINS(message, "'minigpt5.img_token_num': must be positive");
  EXPECT_CONTAINS(message, "'diffusion.scheduler'");
  EXPECT_CONTAINS(message, "'device': unknown device 'tpu'");
  EXPECT_CONTAINS(message, "'dtype': unknown dtype 'int4'");
  EXPECT_CONTAINS(message, "'random_weights'");
  EXPECT_CONTAINS(message, "11 problems");
}

TEST(BundleManifest, RequiredParts) {
  const std::string message = parse_error(io::Json::object());
  for (const char* field : {"'voken_bundle'", "'llm'", "'vision'", "'minigpt5'"})
    EXPECT_CONTAINS(message, field);
  // Diffusion may be absent (a text-only bundle); the check asks for it when images are drawn.
  io::Json json = minimal_manifest();
  json.erase("diffusion");
  EXPECT_NO_THROW(BundleManifest::parse(json, "/base", "test.json"));
  EXPECT_THROW(BundleManifest::parse(io::Json::array(), "/base", "test.json"), ConfigError);
}

TEST(BundleManifest, ReadFromFileOrDirectory) {
  test::TempDir dir;
  EXPECT_THROW(BundleManifest::read(dir.file("bundle.json")), FileNotFoundError);
  EXPECT_THROW(BundleManifest::read(dir.path()), FileNotFoundError);
  test::write_file(dir.file("bundle.json"), minimal_manifest().dump());
  const BundleManifest m = BundleManifest::read(dir.path());
  EXPECT_EQ(m.manifest_path, dir.file("bundle.json"));
  EXPECT_EQ(m.llm.path, (fs::path(dir.path()) / "vicuna-7b").lexically_normal().string());
  test::write_file(dir.file("broken.json"), "{\"voken_bundle\": 1,");
  EXPECT_THROW(BundleManifest::read(dir.file("broken.json")), ConfigError);
}

TEST(BundleCheck, MissingPartsAreListedTogether) {
  test::TempDir dir;
  io::Json json = minimal_manifest();
  json["minigpt5"]["stage2"] = "stage2.ckpt";
  test::write_file(dir.file("bundle.json"), json.dump());
  const BundleCheck check = check_bundle(BundleManifest::read(dir.path()));
  ASSERT_FALSE(check.ok());
  for (const auto& p : check.problems) EXPECT_EQ(p.kind, BundleProblem::Kind::MissingFile) << p.message;
  const std::string report = check.report();
  for (const char* path :
       {"vicuna-7b", "eva_vit_g.pth", "blip2.pth", "minigpt4.pth", "stage1.ckpt", "stage2.ckpt", "/sd"})
    EXPECT_CONTAINS(report, path);
  try {
    check.throw_if_problems();
    ADD_FAILURE() << "no error";
  } catch (const FileNotFoundError& e) {
    EXPECT_CONTAINS(e.what(), "8 problems found before loading any weights");
  }
  // Without diffusion, its directory is not asked for.
  EXPECT_EQ(check_bundle(BundleManifest::read(dir.path()), false).problems.size(), 7u);
}

// A manifest whose parts are the golden folders' files.
struct GoldenParts {
  std::string root;
  bool present() const {
    for (const char* p :
         {"/lora/model/config.json", "/vision/model/eva_vit_g.pth", "/mapper/model/minigpt5_stage1.ckpt",
          "/sd_loop/model/unet/config.json", "/../assets/llama/tokenizer.model"})
      if (!fs::exists(root + p)) return false;
    return true;
  }
  io::Json manifest() const {
    return test::golden_parts_manifest(root, root + "/../assets/llama/tokenizer.model");
  }
};

#define SKIP_WITHOUT_GOLDEN_PARTS(parts) \
  if (!(parts).present())                \
  GTEST_SKIP() << "golden folders (lora, vision, mapper, sd_loop, assets/llama) not found"

TEST(BundleCheck, GoldenPartsDisagreeOnlyOnTheTokenizer) {
  const GoldenParts parts{test::golden_root()};
  SKIP_WITHOUT_GOLDEN_PARTS(parts);
  const BundleCheck check = check_bundle(BundleManifest::parse(parts.manifest(), "/", "golden"));
  // The real LLaMA tokenizer has 32009 tokens with MiniGPT-5's; the tiny LLaMA's resized
  // embedding has 1009 rows. Everything else connects (hidden 64, mapper 64 -> 32, UNet 32).
  ASSERT_EQ(check.problems.size(), 1u) << check.report();
  EXPECT_EQ(check.problems[0].kind, BundleProblem::Kind::Mismatch);
  EXPECT_CONTAINS(check.problems[0].message, "32009 tokens");
  EXPECT_CONTAINS(check.problems[0].message, "1009 rows");
  EXPECT_THROW(check.throw_if_problems(), ConfigError);
  EXPECT_TRUE(check.stage1 && check.stage2 && check.llm_weights && check.vit_weights);
}

TEST(BundleCheck, WrongPartIsNamedForWhatItIs) {
  const GoldenParts parts{test::golden_root()};
  SKIP_WITHOUT_GOLDEN_PARTS(parts);
  io::Json json = parts.manifest();
  const std::string unet_dir = parts.root + "/sd_loop/model/unet";
  json["vision"]["vit"] = unet_dir;                                        // a UNet where the ViT goes
  json["vision"]["qformer"] = parts.root + "/vision/model/eva_vit_g.pth";  // the ViT where BLIP-2 goes
  json["minigpt5"]["stage1"] = parts.root + "/vision/model/prerained_minigpt4_7b.pth";  // MiniGPT-4, not -5
  json["llm"]["path"] = parts.root + "/sd_loop/model/vae";                              // a diffusers VAE dir
  json["diffusion"]["path"] = parts.root + "/lora/model/minigpt5_stage2.ckpt";          // a file
  const BundleCheck check = check_bundle(BundleManifest::parse(json, "/", "golden"));
  const std::string report = check.report();
  auto problem_of = [&](const std::string& part) -> std::string {
    for (const auto& p : check.problems)
      if (p.part == part) return p.message;
    ADD_FAILURE() << "no problem for " << part << "\n" << report;
    return "";
  };
  const std::string vit = problem_of("vision.vit");
  EXPECT_CONTAINS(vit, "is not an EVA ViT-g checkpoint");
  EXPECT_CONTAINS(vit, "looks like a diffusers UNet");
  EXPECT_CONTAINS(problem_of("vision.qformer"), "looks like an EVA ViT checkpoint");
  EXPECT_CONTAINS(problem_of("minigpt5.stage1"), "looks like a MiniGPT-4 checkpoint");
  EXPECT_CONTAINS(problem_of("llm.path"), "AutoencoderKL");
  EXPECT_CONTAINS(problem_of("diffusion.path"), "is a file");
  EXPECT_THROW(check.throw_if_problems(), ConfigError);
}

TEST(BundleCheck, DimensionsThatDoNotConnect) {
  const GoldenParts parts{test::golden_root()};
  SKIP_WITHOUT_GOLDEN_PARTS(parts);
  io::Json json = parts.manifest();
  json["llm"]["path"] = parts.root + "/llama_e2e/model";  // hidden 32: projection and fc expect 64
  json["tokenizer"]["path"] = parts.root + "/../assets/llama/tokenizer.model";
  json["minigpt5"]["nhead"] = 3;
  json["diffusion"]["path"] = parts.root + "/sd_loop/model";
  const BundleCheck check = check_bundle(BundleManifest::parse(json, "/", "golden"));
  const std::string report = check.report();
  EXPECT_CONTAINS(report, "llama_proj.weight is [64, 32] but the LLM's hidden_size is 32");
  EXPECT_CONTAINS(report, "fc.0.weight is [32, 64] but the LLM's hidden_size is 32");
  EXPECT_CONTAINS(report, "3 attention heads do not divide the mapper width 32");
}

}  // namespace
}  // namespace voken::pipeline
