// Reading a golden folder ($VOKEN_GOLDEN_DIR/<component>: cases.json + cases.safetensors +
// model/) and reporting parity in the one-line format every parity test prints:
//   PARITY <component>/<case>@<tier> max_abs_err=<e> atol=<a> PASS|FAIL
// where <tier> is the CPU kernel tier the case ran at (core/cpu.h; VOKEN_CPU forces a lower one).
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/json_file.h"
#include "io/safetensors.h"

namespace voken::test {

// A bundle manifest (docs/bundle.md; float32) made of the golden folders' parts under `root`:
// LLaMA + stage-2 LoRA (lora), image encoder (vision), stage-1 mapper (mapper) and Stable
// Diffusion (sd_loop). The goldens hold no tokenizer of their own, so the caller names one.
io::Json golden_parts_manifest(const std::string& root, const std::string& tokenizer);

class GoldenSet {
 public:
  // nullopt when the folder is absent (the caller should GTEST_SKIP with the returned reason).
  static std::optional<GoldenSet> open(const std::string& component);
  static std::string missing_reason(const std::string& component);

  const std::string& component() const { return component_; }
  const std::string& dir() const { return dir_; }
  // <dir>/<cases.json "model_dir"> (or <dir>/model).
  std::string model_dir() const;
  const io::Json& json() const { return json_; }
  const io::Json& cases() const { return json_.at("cases"); }
  const io::Json* find_case(const std::string& name) const;

  bool has(const std::string& tensor) const { return tensors_->contains(tensor); }
  // "<case>.<tensor>" from cases.safetensors; fails the test with the name when absent.
  at::Tensor tensor(const std::string& name) const;

 private:
  std::string component_;
  std::string dir_;
  io::Json json_;
  std::shared_ptr<io::SafetensorsFile> tensors_;
};

// Accumulates the outputs of one golden case and prints its PARITY line when finished.
class ParityCase {
 public:
  ParityCase(std::string component, std::string case_name);
  ~ParityCase();  // prints the line if finish() was not called
  // Elementwise |got - want| <= atol + rtol * |want| (shapes must match; compared in float64).
  void compare(const std::string& output, const at::Tensor& got, const at::Tensor& want, double atol,
               double rtol = 0.0);
  // Integer outputs (token ids...): must be equal.
  void compare_exact(const std::string& output, const at::Tensor& got, const at::Tensor& want);
  // Prints the line; returns whether every output passed (also recorded as gtest failures).
  bool finish();

 private:
  std::string component_;
  std::string case_name_;
  double max_abs_err_ = 0.0;
  double atol_ = 0.0;
  bool pass_ = true;
  bool finished_ = false;
};

// bfloat16 runs against the float32 goldens: max |got - want| <= `relative` * max |want| (a
// tolerance the calling test documents). Prints
//   BF16 <component>/<case>@<tier> <output> max_abs_err=<e> allowed=<a> [upstream_bf16=<u>] PASS|FAIL
// (upstream's own bf16 distance beside when the golden records one, i.e. upstream_bf16 >= 0),
// records a gtest failure when it fails, and returns whether it passed.
bool check_bf16(const std::string& component, const std::string& case_name, const std::string& output,
                const at::Tensor& got, const at::Tensor& want, double relative, double upstream_bf16 = -1.0);

// The CPU tier this process runs its kernels at ("amx", "avx2", ...), for report lines.
std::string tier_label();

}  // namespace voken::test
