// voken.ImageEncoder and image helpers (vision/image.h, vision/preprocess.h, vision/image_encoder.h).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "io/tensor_bytes.h"
#include "vision/image.h"
#include "vision/image_encoder.h"
#include "vision/preprocess.h"

namespace py = pybind11;

namespace voken::python {
namespace {

using vision::ImageEncoder;

vision::TransformKind transform_kind(const std::string& mode) {
  for (auto kind : {vision::TransformKind::Playground, vision::TransformKind::Blip2Eval,
                    vision::TransformKind::TrainEval})
    if (mode == vision::transform_name(kind)) return kind;
  throw ArgumentError("mode: expected \"playground\", \"blip2_eval\" or \"train_eval\", got \"" + mode +
                      "\"");
}

vision::PreprocessConfig preprocess_config(const std::string& mode, int64_t image_size) {
  vision::PreprocessConfig config;
  config.kind = transform_kind(mode);
  if (image_size <= 0) throw ArgumentError("image_size: must be positive, got " + std::to_string(image_size));
  config.image_size = static_cast<int>(image_size);
  return config;
}

// A list/tuple of images, or one image.
std::vector<voken::Image> images_from_python(const py::handle& images) {
  std::vector<voken::Image> result;
  if (py::isinstance<py::list>(images) || py::isinstance<py::tuple>(images)) {
    for (const py::handle item : images) result.push_back(image_from_python(item));
    if (result.empty()) throw ArgumentError("images: the list is empty");
  } else {
    result.push_back(image_from_python(images));
  }
  return result;
}

// Preprocessed pixels [B, 3, S, S] (or [3, S, S]) as a float array, else images to preprocess.
bool is_pixel_array(const py::handle& object) {
  if (!py::isinstance<py::array>(object)) return false;
  const auto array = py::reinterpret_borrow<py::array>(object);
  return array.dtype().kind() == 'f' && (array.ndim() == 3 || array.ndim() == 4);
}

at::Tensor encoder_input(const ImageEncoder& encoder, const py::handle& images, const std::string& mode) {
  if (is_pixel_array(images)) {
    at::Tensor pixels = tensor_from_python(images, "images");
    return pixels.dim() == 3 ? pixels.unsqueeze(0) : pixels;
  }
  const auto decoded = images_from_python(images);
  const auto config = preprocess_config(mode, encoder.image_size());
  py::gil_scoped_release release;
  return vision::preprocess_batch(decoded, config);
}

}  // namespace

void bind_vision(py::module_& m) {
  m.def(
      "load_image", [](const py::object& image) { return image_to_numpy(image_from_python(image)); },
      py::arg("image"),
      "Decodes an image (path, encoded bytes, PIL image or array) to RGB uint8 [H, W, 3] the way "
      "PIL's Image.open(f).convert('RGB') does (no EXIF rotation, alpha dropped).");
  m.def(
      "encode_image",
      [](const py::object& image, const std::string& format, int quality) {
        const voken::Image pixels = image_from_python(image);
        vision::ImageFormat kind;
        if (format == "png" || format == "PNG")
          kind = vision::ImageFormat::Png;
        else if (format == "jpeg" || format == "jpg" || format == "JPEG" || format == "JPG")
          kind = vision::ImageFormat::Jpeg;
        else
          throw ArgumentError("format: expected \"png\" or \"jpeg\", got \"" + format + "\"");
        return py::bytes(vision::encode_image(pixels, kind, quality));
      },
      py::arg("image"), py::arg("format") = "png", py::arg("quality") = 95, "PNG or JPEG bytes of an image.");
  m.def(
      "save_image",
      [](const py::object& image, const Path& path, int quality) {
        vision::save_image(image_from_python(image), path.string(), quality);
      },
      py::arg("image"), py::arg("path"), py::arg("quality") = 95,
      "Writes an image as PNG or JPEG, chosen by the extension.");
  m.def(
      "preprocess",
      [](const py::object& image, const std::string& mode, int64_t image_size) {
        const voken::Image pixels = image_from_python(image);
        const auto config = preprocess_config(mode, image_size);
        at::Tensor result;
        {
          py::gil_scoped_release release;
          result = vision::preprocess(pixels, config);
        }
        return to_numpy(result);
      },
      py::arg("image"), py::arg("mode") = "playground", py::arg("image_size") = 224,
      "The encoder's input for one image, float32 [3, S, S], bit-exact with upstream's transforms: "
      "'playground' (MiniGPT-5: expand2square white + Resize + CenterCrop), 'blip2_eval' "
      "(Resize((S, S), BICUBIC)) or 'train_eval' (Resize + CenterCrop).");

  py::class_<ImageEncoder, std::shared_ptr<ImageEncoder>>(
      m, "ImageEncoder",
      "MiniGPT-4/5's image encoder: EVA ViT-g -> ln_vision -> BLIP-2 Q-Former -> llama_proj, from "
      "the three upstream checkpoint files.")
      .def_static(
          "load",
          [](const Path& vit, const Path& qformer, const Path& projection, const std::optional<Path>& config,
             const py::object& dtype) {
            io::WeightOptions options;
            options.float_dtype = parse_optional_dtype(dtype);
            py::gil_scoped_release release;
            const auto encoder_config =
                config ? vision::ImageEncoderConfig::load(config->string()) : vision::ImageEncoderConfig{};
            return std::make_shared<ImageEncoder>(ImageEncoder::load(
                vision::ImageEncoderFiles{vit.string(), qformer.string(), projection.string()},
                encoder_config, options));
          },
          py::arg("vit"), py::arg("qformer"), py::arg("projection"), py::arg("config") = py::none(),
          py::arg("dtype") = py::none(),
          "eva_vit_g.pth, the BLIP-2 checkpoint, MiniGPT-4's projection checkpoint; config: an optional "
          "JSON file with non-default sizes; dtype: None (the files'), 'float32' or 'bfloat16'.")
      .def(
          "preprocess",
          [](const ImageEncoder& encoder, const py::object& image, const std::string& mode) {
            const voken::Image pixels = image_from_python(image);
            const auto config = preprocess_config(mode, encoder.image_size());
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = vision::preprocess(pixels, config);
            }
            return to_numpy(result);
          },
          py::arg("image"), py::arg("mode") = "playground",
          "voken.preprocess at this encoder's image size: float32 [3, S, S].")
      .def(
          "encode",
          [](const ImageEncoder& encoder, const py::object& images, const std::string& mode) {
            const at::Tensor pixels = encoder_input(encoder, images, mode);
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = encoder.encode(pixels);
            }
            return to_numpy(result);
          },
          py::arg("images"), py::arg("mode") = "playground",
          "Images (a list of paths / bytes / PIL images / uint8 arrays, preprocessed with `mode`, or "
          "preprocessed float pixels [B, 3, S, S]) -> LLM input rows [B, queries, llm_width].")
      .def(
          "encode_all",
          [](const ImageEncoder& encoder, const py::object& images, const std::string& mode) {
            const at::Tensor pixels = encoder_input(encoder, images, mode);
            vision::ImageFeatures features;
            {
              py::gil_scoped_release release;
              features = encoder.encode_all(pixels);
            }
            py::dict d;
            d["vit"] = to_numpy(features.vit);
            d["ln_vision"] = to_numpy(features.ln_vision);
            d["qformer"] = to_numpy(features.qformer);
            d["llama_proj"] = to_numpy(features.llama_proj);
            return d;
          },
          py::arg("images"), py::arg("mode") = "playground",
          "encode() keeping every stage: {'vit', 'ln_vision', 'qformer', 'llama_proj'}.")
      .def_property_readonly("image_size", &ImageEncoder::image_size)
      .def_property_readonly("num_query_tokens", &ImageEncoder::num_query_tokens)
      .def_property_readonly("output_width", &ImageEncoder::output_width)
      .def_property_readonly("dtype", [](const ImageEncoder& e) { return dtype_name(e.dtype()); })
      .def("__repr__", [](const ImageEncoder& e) {
        return "voken.ImageEncoder(image_size=" + std::to_string(e.image_size()) +
               ", queries=" + std::to_string(e.num_query_tokens()) +
               ", output_width=" + std::to_string(e.output_width()) + ", dtype=" + dtype_name(e.dtype()) +
               ")";
      });
}

}  // namespace voken::python
