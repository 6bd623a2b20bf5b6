// voken.Tokenizer: the LLaMA tokenizer with MiniGPT-5's added tokens (text/tokenizer.h).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "io/tensor_bytes.h"
#include "text/tokenizer.h"

namespace py = pybind11;

namespace voken::python {
namespace {

using text::AddedToken;
using text::Tokenizer;

// Token ids from a list, tuple or 1-D integer numpy array.
std::vector<int64_t> ids_from_python(const py::handle& ids) {
  at::Tensor tensor = tensor_from_python(ids, "ids");
  if (tensor.dim() > 1)
    throw ArgumentError("ids: expected a 1-D sequence, got shape " + io::shape_string(tensor.sizes()));
  if (tensor.numel() > 0 && at::isFloatingType(tensor.scalar_type()))
    throw ArgumentError("ids: expected integers, got floating-point values");
  tensor = tensor.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* data = tensor.data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + tensor.numel());
}

}  // namespace

void bind_text(py::module_& m) {
  py::class_<AddedToken>(m, "AddedToken",
                         "A token outside the sentencepiece vocabulary, always matched whole in text "
                         "(HF AddedToken): content, id, special (dropped by skip_special_tokens), "
                         "lstrip/rstrip (strip the neighbouring text's whitespace).")
      .def(py::init([](std::string content, int64_t id, bool special, bool lstrip, bool rstrip) {
             return AddedToken{std::move(content), id, special, lstrip, rstrip};
           }),
           py::arg("content"), py::arg("id"), py::arg("special") = true, py::arg("lstrip") = true,
           py::arg("rstrip") = true)
      .def_readwrite("content", &AddedToken::content)
      .def_readwrite("id", &AddedToken::id)
      .def_readwrite("special", &AddedToken::special)
      .def_readwrite("lstrip", &AddedToken::lstrip)
      .def_readwrite("rstrip", &AddedToken::rstrip)
      .def("__repr__", [](const AddedToken& t) {
        return "AddedToken(" + py::repr(py::str(t.content)).cast<std::string>() +
               ", id=" + std::to_string(t.id) + ", special=" + (t.special ? "True" : "False") + ")";
      });
  m.def("minigpt5_added_tokens", &text::minigpt5_added_tokens,
        "MiniGPT-5's added tokens: [IMG0]..[IMG7] = 32000..32007, <ImageHere> = 32008.");

  py::class_<Tokenizer, std::shared_ptr<Tokenizer>>(
      m, "Tokenizer",
      "The LLaMA/Vicuna tokenizer as MiniGPT-5 uses it (transformers 4.31 slow LlamaTokenizer, "
      "legacy=True) plus added tokens, without the sentencepiece library.")
      .def_static(
          "from_file",
          [](const Path& path, std::optional<std::vector<AddedToken>> added_tokens) {
            return std::make_shared<Tokenizer>(
                Tokenizer::from_file(path.string(), added_tokens.value_or(text::minigpt5_added_tokens())));
          },
          py::arg("path"), py::arg("added_tokens") = py::none(),
          "A tokenizer.model file plus added tokens (default: MiniGPT-5's; [] for none), whose ids "
          "continue the vocabulary.")
      .def_static(
          "from_directory",
          [](const Path& directory, bool add_minigpt5_tokens) {
            return std::make_shared<Tokenizer>(
                Tokenizer::from_directory(directory.string(), add_minigpt5_tokens));
          },
          py::arg("directory"), py::arg("add_minigpt5_tokens") = true,
          "An HF tokenizer directory (tokenizer.model, added_tokens.json, tokenizer_config.json, "
          "special_tokens_map.json); MiniGPT-5's tokens are added unless add_minigpt5_tokens=False.")
      .def(
          "encode",
          [](const Tokenizer& t, const std::string& text, bool add_bos, bool add_eos) {
            return t.encode(text, add_bos, add_eos);
          },
          py::arg("text"), py::arg("add_bos") = false, py::arg("add_eos") = false,
          "Text -> list of ids (MiniGPT-5 tokenizes without BOS and prepends the BOS embedding itself).")
      .def(
          "decode",
          [](const Tokenizer& t, const py::object& ids, bool skip_special_tokens) {
            return t.decode(ids_from_python(ids), skip_special_tokens);
          },
          py::arg("ids"), py::arg("skip_special_tokens") = false,
          "Ids (list or 1-D integer array) -> text; ValueError for ids outside [0, vocab_size).")
      .def(
          "sentencepiece_encode",
          [](const Tokenizer& t, const std::string& s) { return t.sentencepiece_encode(s); }, py::arg("text"),
          "Plain sentencepiece encode (no added tokens).")
      .def(
          "sentencepiece_decode",
          [](const Tokenizer& t, const py::object& ids) {
            return t.sentencepiece_decode(ids_from_python(ids));
          },
          py::arg("ids"), "Plain sentencepiece decode.")
      .def("token_id", &Tokenizer::token_id, py::arg("piece"),
           "The id of an added token or a sentencepiece piece (e.g. '▁Hello'), or None.")
      .def("piece", &Tokenizer::piece, py::arg("id"), "The piece or added token of an id.")
      .def("is_special", &Tokenizer::is_special, py::arg("id"))
      .def("is_added", &Tokenizer::is_added, py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size,
                             "Sentencepiece pieces plus added tokens (len(tokenizer)).")
      .def_property_readonly("sentencepiece_size", &Tokenizer::sentencepiece_size)
      .def_property_readonly("bos_id", &Tokenizer::bos_id)
      .def_property_readonly("eos_id", &Tokenizer::eos_id)
      .def_property_readonly("unk_id", &Tokenizer::unk_id)
      .def_property_readonly("pad_id", &Tokenizer::pad_id)
      .def_property_readonly("add_bos_token", &Tokenizer::add_bos_token)
      .def_property_readonly("add_eos_token", &Tokenizer::add_eos_token)
      .def_property_readonly("added_tokens", &Tokenizer::added_tokens)
      .def("__len__", &Tokenizer::vocab_size)
      .def("__repr__", [](const Tokenizer& t) {
        return "voken.Tokenizer(vocab_size=" + std::to_string(t.vocab_size()) +
               ", added_tokens=" + std::to_string(t.added_tokens().size()) + ")";
      });
}

}  // namespace voken::python
