// voken.Llama: the LLaMA/Vicuna decoder with MiniGPT-5's adapters (llm/llama.h, llm/decoder.h).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "io/tensor_bytes.h"
#include "llm/decoder.h"
#include "llm/llama.h"
#include "llm/sampling.h"

namespace py = pybind11;

namespace voken::python {
namespace {

using llm::Llama;

llm::LogitsFor logits_for(const std::string& name) {
  if (name == "all") return llm::LogitsFor::All;
  if (name == "last") return llm::LogitsFor::Last;
  if (name == "none") return llm::LogitsFor::None;
  throw ArgumentError("logits: expected \"all\", \"last\" or \"none\", got \"" + name + "\"");
}

py::dict config_dict(const llm::LlamaConfig& c) {
  py::dict d;
  d["vocab_size"] = c.vocab_size;
  d["hidden_size"] = c.hidden_size;
  d["intermediate_size"] = c.intermediate_size;
  d["num_hidden_layers"] = c.num_hidden_layers;
  d["num_attention_heads"] = c.num_attention_heads;
  d["num_key_value_heads"] = c.num_key_value_heads;
  d["max_position_embeddings"] = c.max_position_embeddings;
  d["rms_norm_eps"] = c.rms_norm_eps;
  d["rope_theta"] = c.rope_theta;
  d["tie_word_embeddings"] = c.tie_word_embeddings;
  d["bos_token_id"] = c.bos_token_id;
  d["eos_token_id"] = c.eos_token_id;
  return d;
}

// Token ids as a [B, T] (or [T]) int64 tensor.
at::Tensor ids_tensor(const py::handle& ids) {
  at::Tensor tensor = tensor_from_python(ids, "input_ids");
  if (tensor.numel() > 0 && !at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false))
    throw ArgumentError("input_ids: expected integers, got dtype " + dtype_name(tensor.scalar_type()));
  return tensor.to(at::kLong);
}

py::tuple forward_output(const llm::LlamaOutput& output) {
  return py::make_tuple(
      output.logits.defined() ? py::object(to_numpy(output.logits)) : py::object(py::none()),
      to_numpy(output.hidden));
}

}  // namespace

void bind_llm(py::module_& m) {
  py::class_<Llama, std::shared_ptr<Llama>>(
      m, "Llama",
      "LLaMA/Vicuna (HF LlamaForCausalLM semantics) with MiniGPT-5's adapters. Arrays in and out "
      "are numpy; logits and hidden states are float32.")
      .def_static(
          "load",
          [](const Path& model_dir, const py::object& dtype, const std::optional<Path>& adapter,
             bool merge_lora, std::optional<int> num_threads, bool strict) {
            llm::LlamaLoadOptions options;
            options.dtype = parse_optional_dtype(dtype).value_or(at::kFloat);
            options.adapter_path = adapter ? adapter->string() : std::string();
            options.merge_lora = merge_lora;
            options.num_threads = thread_count_option(num_threads);
            options.strict = strict;
            py::gil_scoped_release release;
            return std::make_shared<Llama>(Llama::load(model_dir.string(), options));
          },
          py::arg("model_dir"), py::arg("dtype") = py::none(), py::arg("adapter") = py::none(),
          py::arg("merge_lora") = true, py::arg("num_threads") = py::none(), py::arg("strict") = true,
          "An HF LLaMA directory (config.json + safetensors/bin, sharded or not). dtype: 'float32' "
          "(default) or 'bfloat16'. adapter: a MiniGPT-5 .ckpt or a PEFT adapter directory applied on "
          "top (LoRA merged unless merge_lora=False). num_threads: None keeps the process's thread count, an "
          "int sets it (0: one per core unless $OMP_NUM_THREADS).")
      .def_property_readonly("config", [](const Llama& l) { return config_dict(l.config()); })
      .def_property_readonly("vocab_size", &Llama::vocab_size)
      .def_property_readonly("hidden_size", &Llama::hidden_size)
      .def_property_readonly("dtype", [](const Llama& l) { return dtype_name(l.weight_dtype()); })
      .def_property_readonly("prefix_length", &Llama::prefix_length,
                             "Prefix-tuning rows put in front of every sequence (0 without).")
      .def_property_readonly("weight_bytes", &Llama::weight_bytes)
      .def(
          "forward",
          [](const Llama& model, const py::object& input_ids, const py::object& inputs_embeds,
             const std::string& logits) {
            if (input_ids.is_none() == inputs_embeds.is_none())
              throw ArgumentError("forward: pass exactly one of input_ids and inputs_embeds");
            const auto which = logits_for(logits);
            llm::LlamaOutput output;
            if (!input_ids.is_none()) {
              const at::Tensor ids = ids_tensor(input_ids);
              py::gil_scoped_release release;
              output = model.forward(ids, nullptr, which);
            } else {
              const at::Tensor embeds = tensor_from_python(inputs_embeds, "inputs_embeds");
              py::gil_scoped_release release;
              output = model.forward_embeds(embeds, nullptr, which);
            }
            return forward_output(output);
          },
          py::arg("input_ids") = py::none(), py::arg("inputs_embeds") = py::none(), py::arg("logits") = "all",
          "One pass over a fresh sequence: input_ids [B, T] / [T] or inputs_embeds [B, T, H] / [T, H] "
          "-> (logits [B, T, V] float32 (None with logits='none'; [B, 1, V] with 'last'), hidden "
          "[B, T, H] float32: the last layer after the final norm).")
      .def(
          "embed",
          [](const Llama& model, const py::object& input_ids) {
            const at::Tensor ids = ids_tensor(input_ids);
            return to_numpy(model.embed(ids));
          },
          py::arg("input_ids"), "Token ids -> embedding rows (float32).")
      .def(
          "generate",
          [](const Llama& model, const py::object& input_ids, const py::object& inputs_embeds,
             int64_t max_new_tokens, bool do_sample, double temperature, int64_t top_k, double top_p,
             double repetition_penalty, int64_t min_new_tokens,
             const std::vector<std::vector<int64_t>>& stop_sequences,
             const std::optional<std::vector<int64_t>>& eos_token_ids, uint64_t seed,
             int64_t force_token_id) {
            if (input_ids.is_none() == inputs_embeds.is_none())
              throw ArgumentError("generate: pass exactly one of input_ids and inputs_embeds");
            llm::SamplingOptions options;
            options.do_sample = do_sample;
            options.temperature = temperature;
            options.top_k = top_k;
            options.top_p = top_p;
            options.repetition_penalty = repetition_penalty;
            options.min_new_tokens = min_new_tokens;
            options.max_new_tokens = max_new_tokens;
            options.stop_sequences = stop_sequences;
            options.eos_token_ids = eos_token_ids.value_or(std::vector<int64_t>{model.config().eos_token_id});
            options.seed = seed;
            options.force_token_id = force_token_id;
            options.validate();

            // The prompt: ids (which the repetition penalty sees, as HF's input_ids) or embeddings.
            std::vector<int64_t> prompt_ids;
            at::Tensor embeds;
            int64_t prompt_length = 0;
            if (!input_ids.is_none()) {
              at::Tensor ids = ids_tensor(input_ids);
              if (ids.dim() == 2 && ids.size(0) == 1) ids = ids[0];
              if (ids.dim() != 1 || ids.numel() == 0)
                throw ArgumentError(
                    "generate: input_ids must be one non-empty sequence ([T] or [1, T]), got " +
                    io::shape_string(ids.sizes()));
              ids = ids.contiguous();
              prompt_ids.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
              prompt_length = ids.numel();
            } else {
              embeds = tensor_from_python(inputs_embeds, "inputs_embeds");
              if (embeds.dim() == 3 && embeds.size(0) == 1) embeds = embeds[0];
              if (embeds.dim() != 2 || embeds.size(0) == 0)
                throw ArgumentError(
                    "generate: inputs_embeds must be one non-empty sequence ([T, H] or [1, T, H]), got " +
                    io::shape_string(embeds.sizes()));
              prompt_length = embeds.size(0);
            }
            CallbackBridge bridge;
            const llm::GenerateResult result = run_without_gil(bridge, [&] {
              llm::DecodeSession session(model, prompt_length + std::max<int64_t>(max_new_tokens, 1));
              if (embeds.defined())
                session.prefill(embeds);
              else
                session.prefill(prompt_ids);
              // Ctrl-C between tokens stops the loop (then raised as KeyboardInterrupt below).
              auto out = llm::generate(
                  session, options,
                  [&](int64_t, const llm::DecodeSession&) { return bridge.check_signals(); }, prompt_ids);
              if (bridge.has_pending()) throw Cancelled("generate: interrupted");
              return out;
            });
            return result.tokens;
          },
          py::arg("input_ids") = py::none(), py::kw_only(), py::arg("inputs_embeds") = py::none(),
          py::arg("max_new_tokens") = 20, py::arg("do_sample") = false, py::arg("temperature") = 1.0,
          py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("repetition_penalty") = 1.0,
          py::arg("min_new_tokens") = 0, py::arg("stop_sequences") = std::vector<std::vector<int64_t>>{},
          py::arg("eos_token_ids") = py::none(), py::arg("seed") = 0, py::arg("force_token_id") = -1,
          "Generates from one prompt (ids, which the repetition penalty sees as HF's input_ids do, "
          "or embeddings) with HF generate's semantics (greedy by default; do_sample with temperature, "
          "top_k, top_p; stops at EOS (default: the config's), a stop sequence or max_new_tokens). "
          "Returns the generated ids, the stopping token included. The sampler is seeded with `seed`.")
      .def("__repr__", [](const Llama& l) {
        const auto& c = l.config();
        return "voken.Llama(layers=" + std::to_string(c.num_hidden_layers) +
               ", hidden=" + std::to_string(c.hidden_size) + ", vocab=" + std::to_string(c.vocab_size) +
               ", dtype=" + dtype_name(l.weight_dtype()) + ")";
      });
}

}  // namespace voken::python
