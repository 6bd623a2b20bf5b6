#include "common/golden.h"

#include <cstdio>
#include <sstream>

#include "common/test_support.h"
#include "core/cpu.h"

namespace voken::test {

io::Json golden_parts_manifest(const std::string& root, const std::string& tokenizer) {
  io::Json json;
  json["voken_bundle"] = 1;
  json["dtype"] = "float32";
  json["llm"] = {{"path", root + "/lora/model"}};
  json["tokenizer"] = {{"path", tokenizer}};
  json["vision"] = {{"vit", root + "/vision/model/eva_vit_g.pth"},
                    {"qformer", root + "/vision/model/blip2_pretrained_flant5xxl.pth"},
                    {"projection", root + "/vision/model/prerained_minigpt4_7b.pth"},
                    {"config", root + "/vision/model/config.json"}};
  json["minigpt5"] = {{"stage1", root + "/mapper/model/minigpt5_stage1.ckpt"},
                      {"stage2", root + "/lora/model/minigpt5_stage2.ckpt"}};
  json["diffusion"] = {{"path", root + "/sd_loop/model"}};
  return json;
}

std::optional<GoldenSet> GoldenSet::open(const std::string& component) {
  const std::string dir = golden_component(component);
  if (dir.empty()) return std::nullopt;
  GoldenSet set;
  set.component_ = component;
  set.dir_ = dir;
  set.json_ = io::read_json_file(dir + "/cases.json");
  set.tensors_ = std::make_shared<io::SafetensorsFile>(io::SafetensorsFile::open(dir + "/cases.safetensors"));
  return set;
}

std::string GoldenSet::missing_reason(const std::string& component) {
  return "golden folder for '" + component + "' not found (set VOKEN_GOLDEN_DIR; default ../shared/golden)";
}

std::string GoldenSet::model_dir() const {
  return dir_ + "/" + (json_.contains("model_dir") ? json_.at("model_dir").get<std::string>() : "model");
}

const io::Json* GoldenSet::find_case(const std::string& name) const {
  for (const auto& c : cases())
    if (c.at("name") == name) return &c;
  return nullptr;
}

at::Tensor GoldenSet::tensor(const std::string& name) const {
  if (!tensors_->contains(name)) {
    ADD_FAILURE() << dir_ << "/cases.safetensors has no tensor '" << name << "'";
    return {};
  }
  return tensors_->tensor(name);
}

ParityCase::ParityCase(std::string component, std::string case_name)
    : component_(std::move(component)), case_name_(std::move(case_name)) {}

ParityCase::~ParityCase() {
  if (!finished_) finish();
}

void ParityCase::compare(const std::string& output, const at::Tensor& got, const at::Tensor& want,
                         double atol, double rtol) {
  atol_ = std::max(atol_, atol);
  if (!got.defined() || !want.defined() || !got.sizes().equals(want.sizes())) {
    pass_ = false;
    ADD_FAILURE() << component_ << "/" << case_name_ << " " << output << ": shape "
                  << (got.defined() ? got.sizes() : at::IntArrayRef{}) << " vs expected "
                  << (want.defined() ? want.sizes() : at::IntArrayRef{});
    return;
  }
  const auto g = got.detach().to(at::kCPU, at::kDouble);
  const auto w = want.detach().to(at::kCPU, at::kDouble);
  const auto diff = (g - w).abs();
  const double max_err = diff.numel() ? diff.max().item<double>() : 0.0;
  const bool finite = g.isfinite().all().item<bool>() || !w.isfinite().all().item<bool>();
  const auto bound = atol + rtol * w.abs();
  const bool ok = finite && diff.le(bound).all().item<bool>();
  max_abs_err_ = std::max(max_abs_err_, std::isnan(max_err) ? INFINITY : max_err);
  if (!ok) {
    pass_ = false;
    ADD_FAILURE() << component_ << "/" << case_name_ << " " << output << ": max_abs_err " << max_err
                  << " exceeds atol " << atol << " + rtol " << rtol << " * |want|";
  }
}

void ParityCase::compare_exact(const std::string& output, const at::Tensor& got, const at::Tensor& want) {
  const bool ok = got.defined() && want.defined() && got.sizes().equals(want.sizes()) &&
                  got.to(at::kLong).equal(want.to(at::kLong));
  if (!ok) {
    pass_ = false;
    max_abs_err_ = INFINITY;
    ADD_FAILURE() << component_ << "/" << case_name_ << " " << output << ": got " << got << " expected "
                  << want;
  }
}

bool ParityCase::finish() {
  finished_ = true;
  // The CPU tier the kernels ran at (VOKEN_CPU chooses it) follows the case name, so that the
  // passes of one suite at several tiers read apart.
  std::printf("PARITY %s/%s@%s max_abs_err=%.3g atol=%.3g %s\n", component_.c_str(), case_name_.c_str(),
              tier_label().c_str(), max_abs_err_, atol_, pass_ ? "PASS" : "FAIL");
  std::fflush(stdout);
  return pass_;
}

std::string tier_label() {
  try {
    return core::tier_name(core::cpu_tier());
  } catch (const std::exception&) {
    return "?";
  }
}

bool check_bf16(const std::string& component, const std::string& case_name, const std::string& output,
                const at::Tensor& got, const at::Tensor& want, double relative, double upstream_bf16) {
  const bool shapes = got.defined() && want.defined() && got.sizes().equals(want.sizes());
  const double allowed = want.defined() ? relative * want.abs().max().item<double>() : 0.0;
  const double err =
      shapes ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() : INFINITY;
  const bool pass = err <= allowed;
  std::string upstream;
  if (upstream_bf16 >= 0) upstream = " upstream_bf16=" + std::to_string(upstream_bf16);
  std::printf("BF16 %s/%s@%s %s max_abs_err=%.3g allowed=%.3g%s %s\n", component.c_str(), case_name.c_str(),
              tier_label().c_str(), output.c_str(), err, allowed, upstream.c_str(), pass ? "PASS" : "FAIL");
  std::fflush(stdout);
  EXPECT_TRUE(pass) << component << "/" << case_name << " " << output << ": bfloat16 max |err| " << err
                    << " > " << allowed << (shapes ? "" : " (shapes differ)");
  return pass;
}

}  // namespace voken::test
