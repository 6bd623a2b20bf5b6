// voken._voken._Pipeline: the native side of voken.Pipeline (include/voken/pipeline.h). The
// Python class (voken/pipeline.py) adds keyword options, the progress bar and PIL images.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "vision/image.h"
#include "voken/pipeline.h"

#include "pipeline/pipeline_impl.h"
#include "pipeline/random_bundle.h"

namespace py = pybind11;

namespace voken::python {
namespace {

// Text from the library as a Python str; invalid UTF-8 (should a model produce it) becomes
// U+FFFD instead of an exception that would lose the whole result.
py::str utf8(const std::string& text) {
  PyObject* object = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "replace");
  if (object == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(object);
}

const char* stage_name(ProgressEvent::Stage stage) {
  switch (stage) {
    case ProgressEvent::Stage::EncodeImages:
      return "encode_images";
    case ProgressEvent::Stage::Prefill:
      return "prefill";
    case ProgressEvent::Stage::Token:
      return "token";
    case ProgressEvent::Stage::Denoise:
      return "denoise";
    case ProgressEvent::Stage::ImageDone:
      return "image_done";
  }
  return "unknown";
}

// One conversation segment from a Python object, via voken._images.as_segment: str / voken.Text
// are text; pathlib.Path / voken.ImageFile, bytes, PIL images and uint8 arrays are images.
Segment segment_from_python(const py::handle& object) {
  static const char* kModule = "voken._images";
  const py::tuple source = py::module_::import(kModule).attr("as_segment")(object);
  const auto kind = source[0].cast<std::string>();
  if (kind == "text") return Segment::text(source[1].cast<std::string>());
  if (kind == "file") return Segment::image_file(source[1].cast<std::string>());
  if (kind == "bytes")
    return Segment::image_bytes(source[1].cast<std::string>(), source[2].cast<std::string>());
  if (kind == "pixels") {
    auto array = source[1].cast<py::array_t<uint8_t, py::array::c_style>>();
    return Segment::image(vision::image_from_rgb(array.data(), static_cast<std::size_t>(array.size()),
                                                 static_cast<int>(array.shape(1)),
                                                 static_cast<int>(array.shape(0))));
  }
  throw ArgumentError("internal: unknown segment kind '" + kind + "'");
}

std::vector<Segment> segments_from_python(const py::handle& segments) {
  std::vector<Segment> result;
  for (const py::handle item : segments) result.push_back(segment_from_python(item));
  return result;
}

py::dict result_to_python(const GenerateResult& r) {
  py::list segments;
  for (const Segment& segment : r.segments) {
    if (segment.is_text())
      segments.append(utf8(segment.text()));
    else
      segments.append(image_to_numpy(segment.image()));
  }
  py::dict timings;
  timings["encode_images"] = r.timings.encode_images;
  timings["prefill"] = r.timings.prefill;
  timings["decode"] = r.timings.decode;
  timings["mapping"] = r.timings.mapping;
  timings["diffusion"] = r.timings.diffusion;
  timings["total"] = r.timings.total;
  py::list conditions;
  for (const auto& c : r.conditions) {
    const auto as_array = [&c](const std::vector<float>& values) {
      py::array_t<float> array({static_cast<py::ssize_t>(c.rows), static_cast<py::ssize_t>(c.width)});
      std::copy(values.begin(), values.end(), array.mutable_data());
      return array;
    };
    conditions.append(py::make_tuple(as_array(c.positive), as_array(c.negative)));
  }
  py::dict d;
  d["segments"] = segments;
  d["raw_text"] = utf8(r.raw_text);
  d["prompt"] = utf8(r.prompt);
  d["prompt_tokens"] = r.prompt_tokens;
  d["generated_tokens"] = r.generated_tokens;
  d["images"] = r.images;
  d["stop_reason"] = r.stop_reason;
  d["timings"] = timings;
  d["conditions"] = conditions;
  return d;
}

// A progress callback for the C++ side: the Python callable (if any) under the GIL, with a
// check for Ctrl-C before each call. Only an explicit False from Python cancels.
ProgressCallback progress_callback(CallbackBridge& bridge, const py::object& progress) {
  const py::object* function = &progress;  // outlives the call; never copied without the GIL
  return [&bridge, function](const ProgressEvent& event) {
    return bridge.run([&] {
      if (function->is_none()) return true;
      const py::object answer = (*function)(py::cast(event));
      return !(py::isinstance<py::bool_>(answer) && !answer.cast<bool>());
    });
  };
}

void bind_options(py::module_& m) {
  py::class_<GenerateOptions>(m, "GenerateOptions",
                              "Every option of generate_interleaved() (include/voken/pipeline.h), flat.")
      .def(py::init<>())
      .def_property(
          "do_sample", [](const GenerateOptions& o) { return o.text.do_sample; },
          [](GenerateOptions& o, bool v) { o.text.do_sample = v; })
      .def_property(
          "temperature", [](const GenerateOptions& o) { return o.text.temperature; },
          [](GenerateOptions& o, double v) { o.text.temperature = v; })
      .def_property(
          "top_k", [](const GenerateOptions& o) { return o.text.top_k; },
          [](GenerateOptions& o, int64_t v) { o.text.top_k = v; })
      .def_property(
          "top_p", [](const GenerateOptions& o) { return o.text.top_p; },
          [](GenerateOptions& o, double v) { o.text.top_p = v; })
      .def_property(
          "repetition_penalty", [](const GenerateOptions& o) { return o.text.repetition_penalty; },
          [](GenerateOptions& o, double v) { o.text.repetition_penalty = v; })
      .def_property(
          "min_new_tokens", [](const GenerateOptions& o) { return o.text.min_new_tokens; },
          [](GenerateOptions& o, int64_t v) { o.text.min_new_tokens = v; })
      .def_property(
          "max_new_tokens", [](const GenerateOptions& o) { return o.text.max_new_tokens; },
          [](GenerateOptions& o, int64_t v) { o.text.max_new_tokens = v; })
      .def_property(
          "scheduler", [](const GenerateOptions& o) { return o.image.scheduler; },
          [](GenerateOptions& o, const std::string& v) { o.image.scheduler = v; })
      .def_property(
          "steps", [](const GenerateOptions& o) { return o.image.steps; },
          [](GenerateOptions& o, int64_t v) { o.image.steps = v; })
      .def_property(
          "guidance_scale", [](const GenerateOptions& o) { return o.image.guidance_scale; },
          [](GenerateOptions& o, double v) { o.image.guidance_scale = v; })
      .def_property(
          "height", [](const GenerateOptions& o) { return o.image.height; },
          [](GenerateOptions& o, int64_t v) { o.image.height = v; })
      .def_property(
          "width", [](const GenerateOptions& o) { return o.image.width; },
          [](GenerateOptions& o, int64_t v) { o.image.width = v; })
      .def_readwrite("seed", &GenerateOptions::seed)
      .def_readwrite("system_prompt", &GenerateOptions::system_prompt)
      .def_readwrite("raw_prompt", &GenerateOptions::raw_prompt)
      .def_readwrite("force_image", &GenerateOptions::force_image)
      .def_readwrite("max_images", &GenerateOptions::max_images)
      .def_readwrite("draw_images", &GenerateOptions::draw_images)
      .def_readwrite("keep_conditions", &GenerateOptions::keep_conditions);

  py::class_<ProgressEvent>(m, "ProgressEvent",
                            "What a progress callback sees: stage ('encode_images', 'prefill', 'token', "
                            "'denoise', 'image_done'), current, total, image (index of the image being "
                            "drawn), text (the text a token completed).")
      .def_property_readonly("stage", [](const ProgressEvent& e) { return stage_name(e.stage); })
      .def_readonly("current", &ProgressEvent::current)
      .def_readonly("total", &ProgressEvent::total)
      .def_readonly("image", &ProgressEvent::image)
      .def_property_readonly("text", [](const ProgressEvent& e) { return utf8(e.text); })
      .def("__repr__", [](const ProgressEvent& e) {
        return std::string("ProgressEvent(") + stage_name(e.stage) + ", " + std::to_string(e.current) + "/" +
               std::to_string(e.total) + ", image=" + std::to_string(e.image) + ")";
      });
}

}  // namespace

void bind_pipeline(py::module_& m) {
  bind_options(m);

  // The components are shared with the pipeline (aliasing pointers keep it alive), not copied.
  const auto component = [](const std::shared_ptr<Pipeline>& pipe, const auto& part) {
    using Part = std::remove_cv_t<std::remove_reference_t<decltype(part)>>;
    return std::shared_ptr<Part>(pipe, const_cast<Part*>(&part));
  };
  py::class_<Pipeline, std::shared_ptr<Pipeline>>(m, "_Pipeline",
                                                  "Native MiniGPT-5 pipeline; use voken.Pipeline.")
      .def_static(
          "load",
          [](const Path& manifest, const std::string& dtype, const std::string& device,
             std::optional<int> num_threads, bool load_diffusion) {
            LoadOptions options;
            options.dtype = dtype;
            options.device = device;
            options.num_threads = thread_count_option(num_threads);
            options.load_diffusion = load_diffusion;
            py::gil_scoped_release release;
            return std::make_shared<Pipeline>(Pipeline::load(manifest.string(), options));
          },
          py::arg("manifest"), py::arg("dtype") = "", py::arg("device") = "",
          py::arg("num_threads") = py::none(), py::arg("load_diffusion") = true)
      .def(
          "generate",
          [](const Pipeline& pipeline, const py::object& segments, const GenerateOptions& options,
             const py::object& progress) {
            const std::vector<Segment> native = segments_from_python(segments);
            CallbackBridge bridge;
            const ProgressCallback callback = progress_callback(bridge, progress);
            const GenerateResult result = run_without_gil(
                bridge, [&] { return pipeline.generate_interleaved(native, options, callback); });
            return result_to_python(result);
          },
          py::arg("segments"), py::arg("options"), py::arg("progress") = py::none())
      .def(
          "build_prompt",
          [](const Pipeline& pipeline, const py::object& segments, const GenerateOptions& options) {
            const std::vector<Segment> native = segments_from_python(segments);
            return utf8(pipeline.build_prompt(native, options));
          },
          py::arg("segments"), py::arg("options"))
      .def("describe", [](const Pipeline& pipeline) { return utf8(pipeline.describe()); })
      .def_property_readonly(
          "tokenizer",
          [component](const std::shared_ptr<Pipeline>& p) { return component(p, p->impl().tokenizer()); })
      .def_property_readonly(
          "llm", [component](const std::shared_ptr<Pipeline>& p) { return component(p, p->impl().llm()); })
      .def_property_readonly(
          "image_encoder",
          [component](const std::shared_ptr<Pipeline>& p) { return component(p, p->impl().image_encoder()); })
      .def_property_readonly(
          "mapper",
          [component](const std::shared_ptr<Pipeline>& p) { return component(p, p->impl().mapper()); })
      .def_property_readonly("diffusion",
                             [component](const std::shared_ptr<Pipeline>& p) {
                               const diffusion::StableDiffusion* sd = p->impl().diffusion();
                               return sd ? component(p, *sd) : std::shared_ptr<diffusion::StableDiffusion>();
                             })
      .def_property_readonly("random_weights",
                             [](const Pipeline& p) { return p.impl().manifest().random_weights; })
      .def_property_readonly("name", [](const Pipeline& p) { return utf8(p.impl().manifest().name); })
      .def_property_readonly("manifest_path",
                             [](const Pipeline& p) { return utf8(p.impl().manifest().manifest_path); });

  m.def(
      "_write_random_bundle",
      [](const Path& directory, const std::string& shape, uint64_t seed, const py::object& progress) {
        pipeline::RandomBundleShape dims;
        if (shape == "tiny")
          dims = pipeline::RandomBundleShape::tiny();
        else if (shape == "minigpt5")
          dims = pipeline::RandomBundleShape::minigpt5();
        else
          throw ArgumentError("shape: expected \"tiny\" or \"minigpt5\", got \"" + shape + "\"");
        // progress(file, bytes) after each file; an exception raised there stops the writing.
        CallbackBridge bridge;
        const py::object* function = &progress;
        const pipeline::RandomBundleProgress on_file = [&bridge, function](const std::string& file,
                                                                           int64_t bytes) {
          const bool go_on = bridge.run([&] {
            if (!function->is_none()) (*function)(utf8(file), bytes);
            return true;
          });
          if (!go_on) throw Cancelled("write_random_bundle: stopped by the progress callback");
        };
        return run_without_gil(
            bridge, [&] { return pipeline::write_random_bundle(directory.string(), dims, seed, on_file); });
      },
      py::arg("directory"), py::arg("shape") = "tiny", py::arg("seed") = 0, py::arg("progress") = py::none());
}

}  // namespace voken::python
