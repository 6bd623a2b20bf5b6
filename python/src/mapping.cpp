// voken.VokenMapper: MiniGPT-5's voken hidden states -> Stable Diffusion prompt embeddings
// (mapping/voken_mapper.h).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "bindings.h"
#include "mapping/voken_mapper.h"

namespace py = pybind11;

namespace voken::python {

void bind_mapping(py::module_& m) {
  using mapping::VokenMapper;
  py::class_<VokenMapper, std::shared_ptr<VokenMapper>>(
      m, "VokenMapper",
      "MiniGPT-5's fc + llm_to_t2i_mapping (nn.Transformer) + t2i_decoder_prompt: the LLM's hidden "
      "states at the voken positions -> Stable Diffusion prompt embeddings [B, 77, sd_dim].")
      .def_static(
          "load",
          [](const Path& stage1, const std::optional<Path>& stage2, int64_t nhead, int64_t img_token_num,
             const py::object& dtype) {
            mapping::MapperOptions options;
            options.nhead = nhead;
            options.img_token_num = img_token_num;
            options.weights.float_dtype = parse_optional_dtype(dtype);
            py::gil_scoped_release release;
            return std::make_shared<VokenMapper>(
                VokenMapper::load(stage1.string(), stage2 ? stage2->string() : std::string(), options));
          },
          py::arg("stage1"), py::arg("stage2") = py::none(), py::arg("nhead") = 8,
          py::arg("img_token_num") = 8, py::arg("dtype") = py::none(),
          "From MiniGPT-5's stage-1 checkpoint, with the stage-2 one's keys on top when given (as "
          "upstream loads them). dtype: None (the file's), 'float32' or 'bfloat16'.")
      .def(
          "map",
          [](const VokenMapper& mapper, const py::object& hidden) {
            const at::Tensor input = tensor_from_python(hidden, "hidden");
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = mapper.map(input);
            }
            return to_numpy(result);
          },
          py::arg("hidden"), "Voken hidden states [B, T, llm_dim] -> prompt embeddings [B, 77, sd_dim].")
      .def(
          "forward",
          [](const VokenMapper& mapper, const py::object& hidden) {
            const at::Tensor input = tensor_from_python(hidden, "hidden");
            mapping::MapperOutputs outputs;
            {
              py::gil_scoped_release release;
              outputs = mapper.forward(input);
            }
            py::dict d;
            d["fc_out"] = to_numpy(outputs.fc_out);
            d["memory"] = to_numpy(outputs.memory);
            d["mapping_feature"] = to_numpy(outputs.mapping_feature);
            return d;
          },
          py::arg("hidden"), "map() keeping the intermediates: {'fc_out', 'memory', 'mapping_feature'}.")
      .def(
          "negative",
          [](const VokenMapper& mapper, int64_t batch) {
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = mapper.negative(batch);
            }
            return to_numpy(result);
          },
          py::arg("batch") = 1,
          "The classifier-free-guidance negative (upstream USE_CFG): the mapping of all-zero vokens, "
          "[batch, 77, sd_dim].")
      .def_property_readonly("llm_dim", &VokenMapper::llm_dim)
      .def_property_readonly("sd_dim", &VokenMapper::sd_dim)
      .def_property_readonly("prompt_len", &VokenMapper::prompt_len)
      .def_property_readonly("nhead", &VokenMapper::nhead)
      .def_property_readonly("dim_feedforward", &VokenMapper::dim_feedforward)
      .def_property_readonly("img_token_num", &VokenMapper::img_token_num)
      .def_property_readonly("num_encoder_layers", &VokenMapper::num_encoder_layers)
      .def_property_readonly("num_decoder_layers", &VokenMapper::num_decoder_layers)
      .def_property_readonly("dtype", [](const VokenMapper& mapper) { return dtype_name(mapper.dtype()); })
      .def("__repr__", [](const VokenMapper& mapper) {
        return "voken.VokenMapper(llm_dim=" + std::to_string(mapper.llm_dim()) +
               ", sd_dim=" + std::to_string(mapper.sd_dim()) +
               ", prompt_len=" + std::to_string(mapper.prompt_len()) +
               ", layers=" + std::to_string(mapper.num_encoder_layers()) + "+" +
               std::to_string(mapper.num_decoder_layers()) + ", dtype=" + dtype_name(mapper.dtype()) + ")";
      });
}

}  // namespace voken::python
