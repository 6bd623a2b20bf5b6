// Parity of the MiniGPT-5 stage-2 adapter (PEFT LoRA on q/v + modules_to_save embed_tokens/
// lm_head with the resized vocabulary, read from a Lightning .ckpt) with the golden folder
// `lora`. Every case runs with the LoRA merged into the weights and again unmerged (applied at
// every product) with the same tolerances (PARITY lines for merged, CHECK lines for unmerged). Cases named
// "base*" run on the base model directory alone.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/golden.h"
#include "llama_cases.h"
#include "llm/llama.h"

namespace voken::llm {
namespace {

struct LoraModels {
  Llama base, merged, unmerged;
};

LoraModels load_models(const test::GoldenSet& golden) {
  const std::string checkpoint = golden.dir() + "/" + golden.json().at("checkpoint").get<std::string>();
  LlamaLoadOptions merged_options;
  merged_options.adapter_path = checkpoint;
  LlamaLoadOptions unmerged_options = merged_options;
  unmerged_options.merge_lora = false;
  return {Llama::load(golden.model_dir()), Llama::load(golden.model_dir(), merged_options),
          Llama::load(golden.model_dir(), unmerged_options)};
}

bool is_base_case(const io::Json& c) { return c.at("name").get<std::string>().rfind("base", 0) == 0; }

TEST(ParityLora, EveryCaseMergedAndUnmerged) {
  const auto golden = test::GoldenSet::open("lora");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("lora");
  const LoraModels models = load_models(*golden);
  EXPECT_FALSE(models.merged.has_unmerged_lora());
  EXPECT_TRUE(models.unmerged.has_unmerged_lora());
  if (golden->json().contains("vocab")) {
    EXPECT_EQ(models.base.vocab_size(), golden->json()["vocab"]["base"].get<int64_t>());
    EXPECT_EQ(models.merged.vocab_size(), golden->json()["vocab"]["with_added_tokens"].get<int64_t>());
  }
  // The merged model prints the PARITY lines; the unmerged one is held to the same tolerances
  // and prints CHECK lines.
  test_cases::run_cases(*golden, [&](const io::Json& c) -> const Llama& {
    return is_base_case(c) ? models.base : models.merged;
  });
  test_cases::RunOptions unmerged;
  unmerged.parity = false;
  test_cases::run_cases(
      *golden,
      [&](const io::Json& c) -> const Llama& { return is_base_case(c) ? models.base : models.unmerged; },
      unmerged);
}

TEST(ParityLora, MergedWeightsEqualTheReference) {
  const auto golden = test::GoldenSet::open("lora");
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason("lora");
  ASSERT_TRUE(golden->json().contains("merged_weights"));
  const LoraModels models = load_models(*golden);
  for (const auto& [name, shape] : golden->json().at("merged_weights").items()) {
    ASSERT_EQ(name.rfind("merged.", 0), 0u) << name;
    const std::string weight = "model." + name.substr(std::string("merged.").size());
    const at::Tensor want = golden->tensor(name);
    EXPECT_TRUE(at::allclose(models.merged.weight(weight), want, 0, 1e-6)) << weight;
    EXPECT_TRUE(at::allclose(models.unmerged.weight(weight), want, 0, 1e-6)) << weight;
  }
}

}  // namespace
}  // namespace voken::llm
