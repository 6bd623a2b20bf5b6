// Parity of the LLaMA forward, KV-cached greedy decoding and voken hidden states with the
// golden folders `llama` (tiny random model, vocab 1000) and `llama_e2e` (real 32009-token
// vocabulary, MiniGPT-5 prompt with image rows spliced in). One PARITY line per golden case; the
// same cases with bf16 weights print BF16 lines against a looser, documented tolerance.
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

// ---------------------------------------------------------------------------------------------
// bf16 weights against the float32 goldens (teacher-forced greedy steps). Documented tolerance:
// bf16 keeps 8 significant bits, so each weight is off by up to 2^-9 relative; through a few
// layers the logits move by ~1% of their range. atol = 3% of max|want| (+ the case's rtol).

TEST(ParityLlama, Bfloat16WeightsWithinBf16Tolerance) {
  for (const char* component : {"llama", "llama_e2e"}) {
    const auto golden = test::GoldenSet::open(component);
    if (!golden) GTEST_SKIP() << test::GoldenSet::missing_reason(component);
    LlamaLoadOptions options;
    options.dtype = at::kBFloat16;
    const Llama model = Llama::load(golden->model_dir(), options);
    test_cases::RunOptions run;
    run.parity = false;
    run.teacher_forcing = true;
    run.tolerance = [](const io::Json& c, const std::string&, const at::Tensor& want) {
      return std::pair<double, double>{0.03 * want.abs().max().item<double>(), c.value("rtol", 0.0)};
    };
    test_cases::run_cases(
        *golden, [&](const io::Json&) -> const Llama& { return model; }, run);
  }
}

}  // namespace
}  // namespace voken::llm
