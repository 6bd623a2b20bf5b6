// Runs the cases of a LLaMA-shaped golden folder (llama, llama_e2e, lora) against a model. The
// runner is driven by the tensors each case names, not by case names, so any folder of the same
// layout (other sizes, seeds, case lists) works:
//   inputs:  <case>.input_ids [B,T] | <case>.inputs_embeds [B,T,H] (when both, the embeddings win;
//            <case>.prefix_ids / image_feats / suffix_ids, when present, must assemble into
//            inputs_embeds with the model's embedding)
//   outputs: logits [B,T,V], hidden [B,T,H], last_logits [B,V] (full forward, no cache);
//            output_ids [1,N] + step_logits [N,V] (greedy decoding through DecodeSession + KV
//            cache); voken_hidden [1,n,H] (hidden states at positions p-1.. of a prompt prefilled
//            up to p = the case's "img0_position", then the rest forced in one pass, as MiniGPT-5
//            feeds [IMG0]..[IMG7]).
// Header-only, shared by the llama/lora parity tests and the bf16 checks.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/golden.h"
#include "llm/decoder.h"
#include "llm/llama.h"

namespace voken::llm::test_cases {

// One comparison sink per case: the golden PARITY reporter, or a plain one for extra checks
// (bf16, "BF16" lines) that must not print PARITY lines.
class CaseReport {
 public:
  CaseReport(const std::string& component, const std::string& name, bool parity)
      : label_(component + "/" + name) {
    if (parity) parity_.emplace(component, name);
  }
  ~CaseReport() {
    if (!parity_)
      std::printf("BF16 %s@%s max_abs_err=%.3g atol=%.3g %s\n", label_.c_str(), test::tier_label().c_str(),
                  max_err_, atol_, pass_ ? "PASS" : "FAIL");
  }
  void compare(const std::string& output, const at::Tensor& got, const at::Tensor& want, double atol,
               double rtol) {
    if (parity_) return parity_->compare(output, got, want, atol, rtol);
    atol_ = std::max(atol_, atol);
    if (!got.defined() || !got.sizes().equals(want.sizes())) {
      pass_ = false;
      ADD_FAILURE() << label_ << " " << output << ": shape mismatch";
      return;
    }
    const auto g = got.to(at::kDouble);
    const auto w = want.to(at::kDouble);
    const auto diff = (g - w).abs();
    max_err_ = std::max(max_err_, diff.max().item<double>());
    if (!diff.le(atol + rtol * w.abs()).all().item<bool>()) {
      pass_ = false;
      ADD_FAILURE() << label_ << " " << output << ": max_abs_err " << diff.max().item<double>() << " > atol "
                    << atol << " + rtol " << rtol << " * |want|";
    }
  }
  void compare_exact(const std::string& output, const at::Tensor& got, const at::Tensor& want) {
    if (parity_) return parity_->compare_exact(output, got, want);
    if (!got.sizes().equals(want.sizes()) || !got.to(at::kLong).equal(want.to(at::kLong))) {
      pass_ = false;
      ADD_FAILURE() << label_ << " " << output << ": ids differ";
    }
  }

 private:
  std::string label_;
  std::optional<test::ParityCase> parity_;
  double max_err_ = 0, atol_ = 0;
  bool pass_ = true;
};

struct RunOptions {
  // Prints PARITY lines (the golden tolerances) when true; BF16 lines otherwise.
  bool parity = true;
  // Tolerance of an output: (atol, rtol). Default: the case's own.
  std::function<std::pair<double, double>(const io::Json& c, const std::string& output,
                                          const at::Tensor& want)>
      tolerance;
  // Greedy decoding feeds the golden output_ids instead of the model's own choices (for bf16,
  // where a near-tie may legitimately flip an argmax); ids are then not compared.
  bool teacher_forcing = false;
};

// `model_for(case)` picks the model a case runs on.
inline void run_cases(const test::GoldenSet& golden,
                      const std::function<const Llama&(const io::Json&)>& model_for,
                      const RunOptions& options = {}) {
  ASSERT_GT(golden.cases().size(), 0u) << golden.dir() << ": no cases";
  for (const auto& c : golden.cases()) {
    const std::string name = c.at("name").get<std::string>();
    SCOPED_TRACE(golden.component() + "/" + name);
    const Llama& model = model_for(c);
    CaseReport report(golden.component(), name, options.parity);
    auto tolerance = [&](const std::string& output, const at::Tensor& want) {
      if (options.tolerance) return options.tolerance(c, output, want);
      return std::pair<double, double>{c.at("atol").get<double>(), c.value("rtol", 0.0)};
    };
    auto check = [&](const std::string& output, const at::Tensor& got, const at::Tensor& want) {
      const auto [atol, rtol] = tolerance(output, want);
      report.compare(output, got, want, atol, rtol);
    };
    auto has = [&](const std::string& tensor) { return golden.has(name + "." + tensor); };
    auto get = [&](const std::string& tensor) { return golden.tensor(name + "." + tensor); };

    // The prompt.
    at::Tensor embeds;
    if (has("inputs_embeds")) {
      embeds = get("inputs_embeds");
      if (has("prefix_ids") && has("image_feats") && has("suffix_ids")) {
        const at::Tensor assembled =
            at::cat({model.embed(get("prefix_ids")), get("image_feats"), model.embed(get("suffix_ids"))}, 1);
        check("assembled_inputs_embeds", assembled, embeds);
      }
    } else if (has("input_ids")) {
      embeds = model.embed(get("input_ids"));
    } else {
      ADD_FAILURE() << name << ": neither inputs_embeds nor input_ids in cases.safetensors";
      continue;
    }

    const auto& outputs = c.at("outputs");
    std::optional<LlamaOutput> full;
    auto full_forward = [&]() -> const LlamaOutput& {
      if (!full) full = model.forward_embeds(embeds, nullptr, LogitsFor::All);
      return *full;
    };
    for (const auto& [key, description] : outputs.items()) {
      const std::string output = key.substr(name.size() + 1);
      const at::Tensor want = golden.tensor(key);
      if (output == "logits") {
        check(output, full_forward().logits, want);
      } else if (output == "hidden") {
        check(output, full_forward().hidden, want);
      } else if (output == "last_logits") {
        const auto& logits = full_forward().logits;
        check(output, logits.select(1, logits.size(1) - 1), want);
      } else if (output == "output_ids") {
        const at::Tensor want_logits = get("step_logits");
        ASSERT_EQ(embeds.size(0), 1) << "greedy cases are single sequences";
        const int64_t steps = want.size(1);
        DecodeSession session(model, embeds.size(1) + steps);
        session.prefill(embeds);
        std::vector<int64_t> ids;
        std::vector<at::Tensor> step_logits;
        if (options.teacher_forcing) {
          for (int64_t i = 0; i < steps; ++i) {
            step_logits.push_back(session.last_logits());
            const int64_t token = want[0][i].item<int64_t>();
            ids.push_back(token);
            if (i + 1 < steps) session.step(token);
          }
        } else {
          SamplingOptions greedy;
          greedy.max_new_tokens = steps;
          const auto result = generate(session, greedy, [&](int64_t, const DecodeSession& s) {
            step_logits.push_back(s.last_logits());
            return true;
          });
          EXPECT_EQ(result.reason, StopReason::MaxNewTokens);
          ids = result.tokens;
          report.compare_exact(output, at::tensor(ids, at::kLong).unsqueeze(0), want);
        }
        check("step_logits", at::stack(step_logits), want_logits);
      } else if (output == "step_logits") {
        // Compared together with output_ids.
      } else if (output == "voken_hidden") {
        ASSERT_TRUE(c.contains("img0_position"))
            << name << ": voken_hidden needs img0_position in cases.json";
        ASSERT_TRUE(has("input_ids"));
        const at::Tensor ids = get("input_ids")[0];
        const int64_t p = c.at("img0_position").get<int64_t>();
        const int64_t count = want.size(1);
        ASSERT_GE(p, 1);
        ASSERT_LE(p - 1 + count, ids.size(0));
        const auto id_list = [&](int64_t begin, int64_t end) {
          const at::Tensor slice = ids.slice(0, begin, end).contiguous();
          return std::vector<int64_t>(slice.data_ptr<int64_t>(), slice.data_ptr<int64_t>() + slice.numel());
        };
        DecodeSession session(model, ids.size(0));
        session.prefill(id_list(0, p));
        session.force(id_list(p, ids.size(0)));
        check(output, session.hidden_states(p - 1, p - 1 + count).unsqueeze(0), want);
      } else {
        ADD_FAILURE() << name << ": no runner for output '" << output << "'";
      }
    }
  }
}

}  // namespace voken::llm::test_cases
