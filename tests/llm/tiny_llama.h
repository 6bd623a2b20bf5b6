// Test helpers: random tiny LLaMA models written as HF directories, and an independent reference
// forward (float64, explicit per-head attention, rotary by explicit angles, explicit GQA head
// mapping, optional prefix key/values) to check voken::llm::Llama against shapes the goldens
// do not cover (GQA, tied embeddings, prefix tuning, unmerged LoRA).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "io/json_file.h"
#include "io/safetensors.h"

namespace voken::llm::tiny {

struct Spec {
  int64_t vocab = 97;
  int64_t hidden = 32;
  int64_t intermediate = 48;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 4;
  int64_t max_positions = 128;
  double eps = 1e-6;
  double theta = 10000.0;
  bool tie = false;
  int64_t head_dim() const { return hidden / heads; }
};

using Weights = std::vector<std::pair<std::string, at::Tensor>>;

inline Weights make_weights(const Spec& s, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t d = s.head_dim();
  Weights w;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double scale) {
    w.emplace_back(name, at::randn(shape, at::kFloat) * scale);
  };
  add("model.embed_tokens.weight", {s.vocab, s.hidden}, 1.0);
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    w.emplace_back(p + "input_layernorm.weight", 1.0 + 0.1 * at::randn({s.hidden}));
    w.emplace_back(p + "post_attention_layernorm.weight", 1.0 + 0.1 * at::randn({s.hidden}));
    const double in_scale = 1.0 / std::sqrt(static_cast<double>(s.hidden));
    add(p + "self_attn.q_proj.weight", {s.heads * d, s.hidden}, in_scale);
    add(p + "self_attn.k_proj.weight", {s.kv_heads * d, s.hidden}, in_scale);
    add(p + "self_attn.v_proj.weight", {s.kv_heads * d, s.hidden}, in_scale);
    add(p + "self_attn.o_proj.weight", {s.hidden, s.heads * d}, in_scale);
    add(p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}, in_scale);
    add(p + "mlp.up_proj.weight", {s.intermediate, s.hidden}, in_scale);
    add(p + "mlp.down_proj.weight", {s.hidden, s.intermediate}, 1.0 / std::sqrt(double(s.intermediate)));
  }
  w.emplace_back("model.norm.weight", 1.0 + 0.1 * at::randn({s.hidden}));
  if (!s.tie) add("lm_head.weight", {s.vocab, s.hidden}, 1.0 / std::sqrt(static_cast<double>(s.hidden)));
  return w;
}

inline io::Json config_json(const Spec& s) {
  return io::Json{{"architectures", {"LlamaForCausalLM"}},
                  {"model_type", "llama"},
                  {"vocab_size", s.vocab},
                  {"hidden_size", s.hidden},
                  {"intermediate_size", s.intermediate},
                  {"num_hidden_layers", s.layers},
                  {"num_attention_heads", s.heads},
                  {"num_key_value_heads", s.kv_heads},
                  {"max_position_embeddings", s.max_positions},
                  {"rms_norm_eps", s.eps},
                  {"rope_theta", s.theta},
                  {"rope_scaling", nullptr},
                  {"hidden_act", "silu"},
                  {"tie_word_embeddings", s.tie},
                  {"bos_token_id", 1},
                  {"eos_token_id", 2},
                  {"torch_dtype", "float32"}};
}

inline void write_model(const std::string& dir, const Spec& s, const Weights& weights) {
  std::ofstream(dir + "/config.json") << config_json(s).dump(2);
  io::write_safetensors(dir + "/model.safetensors", weights);
}

inline std::map<std::string, at::Tensor> as_map(const Weights& weights) {
  std::map<std::string, at::Tensor> m;
  for (const auto& [name, t] : weights) m[name] = t.to(at::kDouble);
  return m;
}

struct Reference {
  at::Tensor logits;  // [T, V] float64
  at::Tensor hidden;  // [T, H] float64
};

// A straightforward float64 forward of one sequence. `embeds` [T, H]; prefix key/values per
// layer ([kv_heads, P, d] each) are attended to by every position; token positions start at
// `first_position`. `overrides` replace weights by name (e.g. LoRA-merged ones).
inline Reference reference_forward(const Spec& s, std::map<std::string, at::Tensor> w,
                                   const at::Tensor& embeds,
                                   const std::vector<std::pair<at::Tensor, at::Tensor>>& prefix = {},
                                   int64_t first_position = 0) {
  const int64_t T = embeds.size(0);
  const int64_t d = s.head_dim();
  const int64_t group = s.heads / s.kv_heads;
  auto norm = [&](const at::Tensor& x, const at::Tensor& weight) {
    return x / at::sqrt(x.pow(2).mean(-1, true) + s.eps) * weight;
  };
  // Rotary, HF layout: the pair (i, i + d/2) rotates by angle pos * theta^(-2i/d).
  auto rotate = [&](const at::Tensor& x /*[T, d]*/) {
    at::Tensor out = x.clone();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < d / 2; ++i) {
        const double angle = static_cast<double>(first_position + t) * std::pow(s.theta, -2.0 * i / d);
        const double a = x[t][i].item<double>(), b = x[t][i + d / 2].item<double>();
        out[t][i] = a * std::cos(angle) - b * std::sin(angle);
        out[t][i + d / 2] = b * std::cos(angle) + a * std::sin(angle);
      }
    }
    return out;
  };
  at::Tensor x = embeds.to(at::kDouble);
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const at::Tensor h = norm(x, w[p + "input_layernorm.weight"]);
    const at::Tensor q = at::matmul(h, w[p + "self_attn.q_proj.weight"].t());
    const at::Tensor k = at::matmul(h, w[p + "self_attn.k_proj.weight"].t());
    const at::Tensor v = at::matmul(h, w[p + "self_attn.v_proj.weight"].t());
    std::vector<at::Tensor> heads;
    for (int64_t head = 0; head < s.heads; ++head) {
      const int64_t kv = head / group;
      const at::Tensor qh = rotate(q.narrow(1, head * d, d));
      at::Tensor kh = rotate(k.narrow(1, kv * d, d));
      at::Tensor vh = v.narrow(1, kv * d, d);
      int64_t P = 0;
      if (!prefix.empty()) {
        P = prefix[l].first.size(1);
        kh = at::cat({prefix[l].first[kv].to(at::kDouble), kh}, 0);
        vh = at::cat({prefix[l].second[kv].to(at::kDouble), vh}, 0);
      }
      at::Tensor scores = at::matmul(qh, kh.t()) / std::sqrt(static_cast<double>(d));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = P + t + 1; j < P + T; ++j) scores[t][j] = -INFINITY;
      heads.push_back(at::matmul(at::softmax(scores, -1), vh));
    }
    x = x + at::matmul(at::cat(heads, 1), w[p + "self_attn.o_proj.weight"].t());
    const at::Tensor h2 = norm(x, w[p + "post_attention_layernorm.weight"]);
    const at::Tensor gate = at::matmul(h2, w[p + "mlp.gate_proj.weight"].t());
    const at::Tensor up = at::matmul(h2, w[p + "mlp.up_proj.weight"].t());
    x = x + at::matmul(gate * at::sigmoid(gate) * up, w[p + "mlp.down_proj.weight"].t());
  }
  Reference r;
  r.hidden = norm(x, w["model.norm.weight"]);
  const at::Tensor head = s.tie ? w["model.embed_tokens.weight"] : w["lm_head.weight"];
  r.logits = at::matmul(r.hidden, head.t());
  return r;
}

}  // namespace voken::llm::tiny
