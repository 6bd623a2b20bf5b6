// The model bundle: a small JSON manifest (bundle.json, see docs/bundle.md) naming every file
// MiniGPT-5 needs, checked as a whole before any weight is converted, then loaded into the
// components the pipeline runs.
//
// Three steps, each usable on its own (the CLI's `inspect` stops after the second):
//   1. BundleManifest::read    the manifest itself: required fields, types, unknown keys (typos),
//                              dtype/device names; every problem of the file in one ConfigError.
//   2. check_bundle            every part: files present, configs readable, the checkpoint in each
//                              slot is the kind of checkpoint that belongs there (a UNet directory
//                              where the ViT should be is named as such), and the dimensions that
//                              connect parts agree (LLM width = projection rows = fc input, mapper
//                              width = UNet cross-attention width, vocabulary rows cover the
//                              tokenizer's ids, ...). Checkpoints are only opened (memory-mapped
//                              headers), never converted. The result lists every problem.
//   3. load_bundle             builds the components from what check_bundle opened; weight
//                              problems of all components are reported in one WeightsError.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "diffusion/scheduler.h"
#include "diffusion/sd_pipeline.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "io/json_file.h"
#include "io/state_dict.h"
#include "llm/llama.h"
#include "mapping/voken_mapper.h"
#include "text/tokenizer.h"
#include "vision/image_encoder.h"
#include "vision/preprocess.h"
#include "voken/pipeline.h"

namespace voken::pipeline {

// Where one part's weights live and in which dtype: the manifest's defaults, overridden by the
// part's own "dtype"/"device", overridden by LoadOptions.
struct PartPlacement {
  std::string dtype = "bfloat16";  // "float32" | "bfloat16" ("float16" is read as bfloat16)
  std::string device = "cpu";      // "cpu" | "cuda" | "cuda:N"

  at::ScalarType scalar_type() const;
  at::Device torch_device() const;
};

// bundle.json, parsed; every path absolute (resolved against the manifest's directory).
struct BundleManifest {
  std::string manifest_path;  // the file read ("" when parsed from memory)
  std::string base_dir;       // relative paths are relative to this
  int64_t version = 1;
  std::string name;
  bool random_weights = false;
  PartPlacement defaults;

  struct Llm {
    std::string path;  // HF LLaMA directory
    PartPlacement placement;
  } llm;
  struct Tokenizer {
    std::string path;  // directory holding tokenizer.model, or the tokenizer.model file
  } tokenizer;
  struct Vision {
    vision::ImageEncoderFiles files;
    std::string config;  // ImageEncoderConfig JSON; "" = upstream's dimensions / the weights'
    vision::TransformKind preprocess = vision::TransformKind::Playground;
    PartPlacement placement;
  } vision;
  struct MiniGpt5 {
    std::string stage1;
    std::string stage2;  // "" = none
    int64_t nhead = 8;
    int64_t img_token_num = 8;
    PartPlacement placement;
  } minigpt5;
  struct Diffusion {
    std::string path;       // diffusers pipeline directory
    std::string scheduler;  // "" = scheduler/scheduler_config.json's _class_name
    PartPlacement placement;
  } diffusion;

  // Reads and checks the manifest file (FileNotFoundError when absent; one ConfigError listing
  // every problem of the file: missing/mistyped/unknown fields, bad dtype/device/scheduler names).
  static BundleManifest read(const std::string& manifest_path);
  // The same from parsed JSON; relative paths resolve against `base_dir`; `source` names it.
  static BundleManifest parse(const io::Json& json, const std::string& base_dir, const std::string& source);

  // Applies LoadOptions' dtype/device to every part (ArgumentError for unknown names).
  void override_placement(const LoadOptions& options);
};

// One problem found while checking a bundle.
struct BundleProblem {
  enum class Kind { MissingFile, Config, WrongPart, Mismatch, Weights };
  Kind kind = Kind::Config;
  std::string part;     // manifest field, e.g. "vision.vit"
  std::string message;  // what is wrong, expected vs found
};

// What check_bundle found and opened. The StateDicts view the files' mapped bytes; load_bundle
// builds the components from them without reopening anything.
struct BundleCheck {
  BundleManifest manifest;
  std::vector<BundleProblem> problems;

  std::optional<llm::LlamaConfig> llm_config;
  std::optional<io::StateDict> llm_weights;
  std::optional<text::Tokenizer> tokenizer;
  std::optional<vision::ImageEncoderConfig> vision_config;
  std::optional<io::StateDict> vit_weights, qformer_weights, projection_weights;
  std::optional<io::StateDict> stage1, stage2;
  std::string diffusion_unet_dir, diffusion_vae_dir, diffusion_scheduler_dir;
  std::optional<diffusion::UNetConfig> unet_config;
  std::optional<diffusion::VaeConfig> vae_config;
  std::optional<diffusion::SchedulerConfig> scheduler_config;

  bool ok() const { return problems.empty(); }
  // One line per problem, grouped by part.
  std::string report() const;
  // Throws when there are problems: FileNotFoundError if every problem is a missing file,
  // WeightsError if every problem is about tensors, else ConfigError; the message lists all.
  void throw_if_problems() const;
};

// Checks every part of the manifest (see the header comment). Never throws for problems of the
// parts (they are collected); `check_diffusion` false skips the diffusion directory.
BundleCheck check_bundle(const BundleManifest& manifest, bool check_diffusion = true);

// The tokens the pipeline handles specially, looked up in the tokenizer.
struct SpecialTokens {
  std::vector<int64_t> vokens;  // [IMG0]..[IMG{n-1}]
  int64_t image_here = -1;      // <ImageHere>
  int64_t bos = -1;
  int64_t eos = -1;  // the LLM config's eos_token_id (what generation stops on)

  int64_t img0() const { return vokens.front(); }
  bool is_marker(int64_t id) const;  // a voken or <ImageHere>
};

// Everything a bundle loads to.
struct LoadedBundle {
  BundleManifest manifest;
  std::optional<text::Tokenizer> tokenizer;
  std::optional<llm::Llama> llm;
  std::optional<vision::ImageEncoder> image_encoder;
  vision::PreprocessConfig preprocess;
  std::optional<mapping::VokenMapper> mapper;
  std::optional<diffusion::StableDiffusion> diffusion;  // unset when not loaded
  SpecialTokens tokens;
  // One line per part for describe(): path, dtype, parameter count.
  std::vector<std::string> summary;
};

// Builds every component from a problem-free check (ArgumentError otherwise). Weight problems
// of all components come in one WeightsError.
LoadedBundle load_bundle(BundleCheck&& check, bool load_diffusion = true);

// read + override_placement + check_bundle + throw_if_problems + load_bundle.
LoadedBundle load_bundle(const std::string& manifest_path, const LoadOptions& options = {});

}  // namespace voken::pipeline
