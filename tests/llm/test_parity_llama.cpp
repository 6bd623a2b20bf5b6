// Parity of the LLaMA forward, KV-cached greedy decoding and voken hidden states with the
// golden folders `llama` (tiny random model, vocab 1000) and `llama_e2e` (real 32009-token
// vocabulary, MiniGPT-5 prompt with image rows spliced in). One PARITY line per golden case.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "common/golden.h"
#include "llama_cases.h"
#include "llm/llama.h"

namespace voken::llm {
namespace {

void run_component(const std::string& component) {
  const auto golden = test::GoldenSet::open(component);
  if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason(component);
  const Llama model = Llama::load(golden->model_dir());
  test_cases::run_cases(*golden, [&](const io::Json&) -> const Llama& { return model; });
}

TEST(ParityLlama, EveryCaseOfLlama) { run_component("llama"); }

TEST(ParityLlama, EveryCaseOfLlamaE2e) { run_component("llama_e2e"); }

}  // namespace
}  // namespace voken::llm
