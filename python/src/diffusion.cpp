// voken.UNet, voken.VAE, voken.Scheduler, voken.StableDiffusion and voken.Generator
// (diffusion/unet.h, vae.h, scheduler.h, sd_pipeline.h).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "diffusion/scheduler.h"
#include "diffusion/sd_pipeline.h"
#include "diffusion/unet.h"
#include "diffusion/vae.h"
#include "vision/image.h"

namespace py = pybind11;

namespace voken::python {
namespace {

using diffusion::AutoencoderKL;
using diffusion::Scheduler;
using diffusion::SchedulerConfig;
using diffusion::StableDiffusion;
using diffusion::UNet2DCondition;
using diffusion::VaePosterior;

// A CPU random generator equal to torch.Generator().manual_seed(seed) (same draws).
struct Generator {
  explicit Generator(uint64_t seed) : seed(seed), generator(at::make_generator<at::CPUGeneratorImpl>(seed)) {}
  uint64_t seed;
  at::Generator generator;
};

std::vector<int64_t> shape_from_python(const py::handle& shape) {
  if (py::isinstance<py::int_>(shape)) return {shape.cast<int64_t>()};
  return shape.cast<std::vector<int64_t>>();
}

at::Tensor optional_tensor(const py::object& object, const char* what) {
  return object.is_none() ? at::Tensor() : tensor_from_python(object, what);
}

std::optional<diffusion::SchedulerKind> optional_kind(const std::optional<std::string>& name) {
  if (!name || name->empty()) return std::nullopt;
  return diffusion::scheduler_kind_from_name(*name);
}

py::dict scheduler_config_dict(const SchedulerConfig& c) {
  py::dict d;
  d["_class_name"] = diffusion::scheduler_class_name(c.kind);
  d["num_train_timesteps"] = c.num_train_timesteps;
  d["beta_start"] = c.beta_start;
  d["beta_end"] = c.beta_end;
  d["beta_schedule"] = c.beta_schedule;
  d["prediction_type"] = c.prediction_type;
  d["timestep_spacing"] = c.timestep_spacing;
  d["steps_offset"] = c.steps_offset;
  d["source"] = c.source;
  return d;
}

// The pipeline with another scheduler class configured from the same file (diffusers'
// Other.from_config(pipe.scheduler.config)). Copies share the UNet and VAE.
StableDiffusion with_scheduler(const StableDiffusion& pipe, const std::optional<std::string>& name) {
  StableDiffusion copy = pipe;
  if (const auto kind = optional_kind(name))
    copy.set_scheduler_config(pipe.scheduler_config().as_kind(*kind));
  return copy;
}

py::object diffusion_output(const diffusion::DiffusionResult& result, bool return_all) {
  if (!return_all) return to_numpy(result.image_uint8);
  py::dict d;
  d["image_uint8"] = to_numpy(result.image_uint8);
  d["image"] = to_numpy(result.image);
  d["decoded"] = to_numpy(result.decoded);
  d["latents"] = to_numpy(result.latents);
  d["timesteps"] = to_numpy(result.timesteps);
  if (result.init_latents.defined()) d["init_latents"] = to_numpy(result.init_latents);
  return std::move(d);
}

// Steps are reported to `progress(step, total)`; False from it cancels (voken.Cancelled). The
// callback refers to `progress` (no Python reference is copied without the GIL).
diffusion::StepCallback step_callback(CallbackBridge& bridge, const py::object& progress) {
  const py::object* function = &progress;
  return [&bridge, function](int64_t step, int64_t total) {
    return bridge.run([&] {
      if (function->is_none()) return true;
      const py::object answer = (*function)(step, total);
      return !(py::isinstance<py::bool_>(answer) && !answer.cast<bool>());
    });
  };
}

// An img2img input: float [B, 3, H, W] in [0, 1] as is, or any image voken reads.
at::Tensor img2img_input(const py::object& image) {
  if (py::isinstance<py::array>(image) && py::reinterpret_borrow<py::array>(image).dtype().kind() == 'f')
    return tensor_from_python(image, "image");
  const at::Tensor hwc = vision::image_to_tensor(image_from_python(image));
  return hwc.permute({2, 0, 1}).unsqueeze(0).to(at::kFloat).div(255.0);
}

}  // namespace

void bind_diffusion(py::module_& m) {
  py::class_<Generator, std::shared_ptr<Generator>>(
      m, "Generator",
      "A CPU random generator; Generator(s) draws what torch.Generator().manual_seed(s) draws.")
      .def(py::init<uint64_t>(), py::arg("seed") = 0)
      .def(
          "manual_seed",
          [](std::shared_ptr<Generator> g, uint64_t seed) {
            *g = Generator(seed);
            return g;
          },
          py::arg("seed"), "Reseeds (returns the generator).")
      .def_readonly("seed", &Generator::seed)
      .def(
          "randn",
          [](Generator& g, const py::object& shape) {
            return to_numpy(
                at::randn(shape_from_python(shape), g.generator, at::TensorOptions().dtype(at::kFloat)));
          },
          py::arg("shape"), "Standard normal float32 samples (torch.randn(shape, generator=...)).")
      .def("__repr__",
           [](const Generator& g) { return "voken.Generator(seed=" + std::to_string(g.seed) + ")"; });

  py::class_<UNet2DCondition, std::shared_ptr<UNet2DCondition>>(
      m, "UNet",
      "Stable Diffusion's denoiser (diffusers UNet2DConditionModel) from a diffusers unet/ folder.")
      .def_static(
          "load",
          [](const Path& directory, const py::object& dtype) {
            const auto float_dtype = parse_optional_dtype(dtype);
            py::gil_scoped_release release;
            return std::make_shared<UNet2DCondition>(UNet2DCondition::load(directory.string(), float_dtype));
          },
          py::arg("directory"), py::arg("dtype") = py::none(),
          "<directory>/config.json + the weights in it; dtype: None (the file's; fp16 -> fp32), "
          "'float32' or 'bfloat16'.")
      .def(
          "forward",
          [](const UNet2DCondition& unet, const py::object& sample, const py::object& timestep,
             const py::object& encoder_hidden_states) {
            const at::Tensor x = tensor_from_python(sample, "sample");
            const at::Tensor context = tensor_from_python(encoder_hidden_states, "encoder_hidden_states");
            const at::Tensor t = tensor_from_python(timestep, "timestep");
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = unet.forward(x, t, context);
            }
            return to_numpy(result);
          },
          py::arg("sample"), py::arg("timestep"), py::arg("encoder_hidden_states"),
          "Noise prediction float32 [B, out_channels, H, W] for latents [B, in_channels, H, W], a "
          "timestep (a number or [B]) and prompt embeddings [B, S, cross_attention_dim].")
      .def_property_readonly("dtype", [](const UNet2DCondition& u) { return dtype_name(u.dtype()); })
      .def_property_readonly("in_channels", [](const UNet2DCondition& u) { return u.config().in_channels; })
      .def_property_readonly("out_channels", [](const UNet2DCondition& u) { return u.config().out_channels; })
      .def_property_readonly("context_dim", &UNet2DCondition::context_dim,
                             "The prompt-embedding width the cross-attention expects.")
      .def_property_readonly("block_out_channels",
                             [](const UNet2DCondition& u) { return u.config().block_out_channels; })
      .def("__repr__", [](const UNet2DCondition& u) {
        std::string blocks;
        for (auto c : u.config().block_out_channels)
          blocks += (blocks.empty() ? "" : ", ") + std::to_string(c);
        return "voken.UNet(block_out_channels=[" + blocks +
               "], context_dim=" + std::to_string(u.context_dim()) + ", dtype=" + dtype_name(u.dtype()) + ")";
      });

  py::class_<VaePosterior>(m, "VaePosterior", "The VAE encoder's diagonal Gaussian (float32).")
      .def_property_readonly("mean", [](const VaePosterior& p) { return to_numpy(p.mean); })
      .def_property_readonly("logvar", [](const VaePosterior& p) { return to_numpy(p.logvar); })
      .def_property_readonly("std", [](const VaePosterior& p) { return to_numpy(p.std()); })
      .def(
          "sample",
          [](const VaePosterior& p, const py::object& noise) {
            return to_numpy(p.sample(tensor_from_python(noise, "noise")));
          },
          py::arg("noise"), "mean + std * noise.");

  py::class_<AutoencoderKL, std::shared_ptr<AutoencoderKL>>(
      m, "VAE", "Stable Diffusion's autoencoder (diffusers AutoencoderKL) from a diffusers vae/ folder.")
      .def_static(
          "load",
          [](const Path& directory, const py::object& dtype) {
            const auto float_dtype = parse_optional_dtype(dtype);
            py::gil_scoped_release release;
            return std::make_shared<AutoencoderKL>(AutoencoderKL::load(directory.string(), float_dtype));
          },
          py::arg("directory"), py::arg("dtype") = py::none(),
          "<directory>/config.json + the weights in it; dtype: None (the file's), 'float32' or 'bfloat16'.")
      .def(
          "encode",
          [](const AutoencoderKL& vae, const py::object& image) {
            const at::Tensor x = tensor_from_python(image, "image");
            py::gil_scoped_release release;
            return vae.encode(x);
          },
          py::arg("image"), "Image [B, 3, H, W] in [-1, 1] -> the posterior (mean, logvar).")
      .def(
          "decode",
          [](const AutoencoderKL& vae, const py::object& latents) {
            const at::Tensor z = tensor_from_python(latents, "latents");
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = vae.decode(z);
            }
            return to_numpy(result);
          },
          py::arg("latents"),
          "Latents (already divided by scaling_factor) -> image float32 [B, 3, H, W], not clamped.")
      .def(
          "forward",
          [](const AutoencoderKL& vae, const py::object& image) {
            const at::Tensor x = tensor_from_python(image, "image");
            at::Tensor result;
            {
              py::gil_scoped_release release;
              result = vae.decode(vae.encode(x).mean);
            }
            return to_numpy(result);
          },
          py::arg("image"), "decode(encode(image).mean), diffusers' AutoencoderKL.forward.")
      .def_property_readonly("scaling_factor", &AutoencoderKL::scaling_factor)
      .def_property_readonly("latent_channels",
                             [](const AutoencoderKL& v) { return v.config().latent_channels; })
      .def_property_readonly("dtype", [](const AutoencoderKL& v) { return dtype_name(v.dtype()); })
      .def("__repr__", [](const AutoencoderKL& v) {
        return "voken.VAE(latent_channels=" + std::to_string(v.config().latent_channels) +
               ", scaling_factor=" + std::to_string(v.scaling_factor()) + ", dtype=" + dtype_name(v.dtype()) +
               ")";
      });

  py::class_<Scheduler, std::unique_ptr<Scheduler>>(
      m, "Scheduler",
      "A diffusers noise scheduler (PNDM, DDIM, Euler, Euler ancestral, DPM-Solver++). Stateful per "
      "generation: set_timesteps(n), then step() for step indices 0, 1, ... in order.")
      .def_static(
          "from_config",
          [](const Path& path, const std::optional<std::string>& name) {
            return diffusion::make_scheduler(SchedulerConfig::from_file(path.string(), optional_kind(name)));
          },
          py::arg("path"), py::arg("name") = py::none(),
          "From a scheduler_config.json, a directory holding one, or a diffusers pipeline directory. "
          "name: build this class instead of the file's _class_name ('pndm', 'ddim', 'euler', "
          "'euler_ancestral', 'dpm_solver' or a diffusers class name), like Other.from_config(config).")
      .def_property_readonly("name",
                             [](const Scheduler& s) { return diffusion::scheduler_class_name(s.kind()); })
      .def_property_readonly("config", [](const Scheduler& s) { return scheduler_config_dict(s.config()); })
      .def("set_timesteps", &Scheduler::set_timesteps, py::arg("num_inference_steps"),
           "Computes the schedule and resets the per-generation state.")
      .def_property_readonly(
          "timesteps", [](const Scheduler& s) { return to_numpy(s.timesteps()); },
          "int64 (PNDM, DDIM, DPM-Solver) or float32 (Euler kinds).")
      .def_property_readonly("num_steps", &Scheduler::num_steps, "Iterations of the denoising loop.")
      .def("timestep", &Scheduler::timestep, py::arg("step_index"))
      .def_property_readonly("sigmas",
                             [](const Scheduler& s) {
                               return s.sigmas().defined() ? py::object(to_numpy(s.sigmas()))
                                                           : py::object(py::none());
                             })
      .def_property_readonly("alphas_cumprod",
                             [](const Scheduler& s) { return to_numpy(s.alphas_cumprod()); })
      .def_property_readonly("init_noise_sigma", &Scheduler::init_noise_sigma)
      .def(
          "scale_model_input",
          [](const Scheduler& s, const py::object& sample, int64_t step_index) {
            return to_numpy(s.scale_model_input(tensor_from_python(sample, "sample"), step_index));
          },
          py::arg("sample"), py::arg("step_index"))
      .def(
          "step",
          [](Scheduler& s, const py::object& model_output, int64_t step_index, const py::object& sample,
             std::shared_ptr<Generator> generator, const py::object& noise, double eta,
             bool use_clipped_model_output) {
            diffusion::StepOptions options;
            if (generator) options.generator = generator->generator;
            options.noise = optional_tensor(noise, "noise");
            options.eta = eta;
            options.use_clipped_model_output = use_clipped_model_output;
            return to_numpy(s.step(tensor_from_python(model_output, "model_output"), step_index,
                                   tensor_from_python(sample, "sample"), options));
          },
          py::arg("model_output"), py::arg("step_index"), py::arg("sample"), py::kw_only(),
          py::arg("generator") = py::none(), py::arg("noise") = py::none(), py::arg("eta") = 0.0,
          py::arg("use_clipped_model_output") = false,
          "One denoising step from step `step_index` (an index into timesteps, not the timestep) -> "
          "the previous sample. Stochastic kinds need a voken.Generator or explicit noise.")
      .def(
          "add_noise",
          [](const Scheduler& s, const py::object& original, const py::object& noise, int64_t step_index) {
            return to_numpy(s.add_noise(tensor_from_python(original, "original"),
                                        tensor_from_python(noise, "noise"), step_index));
          },
          py::arg("original"), py::arg("noise"), py::arg("step_index"))
      .def("clone", &Scheduler::clone, "A fresh scheduler with the same config and no timesteps.")
      .def("__repr__", [](const Scheduler& s) {
        return "voken.Scheduler(" + diffusion::scheduler_class_name(s.kind()) +
               (s.has_timesteps() ? ", steps=" + std::to_string(s.num_steps()) : std::string()) + ")";
      });

  py::class_<StableDiffusion, std::shared_ptr<StableDiffusion>>(
      m, "StableDiffusion",
      "Stable Diffusion's denoising loop with classifier-free guidance (diffusers "
      "StableDiffusionPipeline given prompt embeddings; no text encoder).")
      .def_static(
          "load",
          [](const std::optional<Path>& directory, const std::optional<Path>& unet,
             const std::optional<Path>& vae, const std::optional<Path>& scheduler, const py::object& dtype) {
            const auto float_dtype = parse_optional_dtype(dtype);
            if (directory && !unet && !vae && !scheduler) {
              py::gil_scoped_release release;
              return std::make_shared<StableDiffusion>(
                  StableDiffusion::load(directory->string(), float_dtype));
            }
            const auto part = [&](const std::optional<Path>& given, const char* name) {
              if (given) return given->string();
              if (!directory)
                throw ArgumentError(
                    std::string("StableDiffusion.load: give a pipeline directory or all of unet, "
                                "vae and scheduler (") +
                    name + " is missing)");
              return (*directory / name).string();
            };
            const std::string unet_dir = part(unet, "unet"), vae_dir = part(vae, "vae"),
                              scheduler_dir = part(scheduler, "scheduler");
            py::gil_scoped_release release;
            return std::make_shared<StableDiffusion>(
                StableDiffusion::load(unet_dir, vae_dir, scheduler_dir, float_dtype));
          },
          py::arg("directory") = py::none(), py::kw_only(), py::arg("unet") = py::none(),
          py::arg("vae") = py::none(), py::arg("scheduler") = py::none(), py::arg("dtype") = py::none(),
          "A diffusers pipeline directory (unet/, vae/, scheduler/), or its parts given one by one.")
      .def_property_readonly("unet",
                             [](const std::shared_ptr<StableDiffusion>& sd) {
                               return std::shared_ptr<UNet2DCondition>(
                                   sd, const_cast<UNet2DCondition*>(&sd->unet()));
                             })
      .def_property_readonly("vae",
                             [](const std::shared_ptr<StableDiffusion>& sd) {
                               return std::shared_ptr<AutoencoderKL>(sd,
                                                                     const_cast<AutoencoderKL*>(&sd->vae()));
                             })
      .def_property_readonly(
          "scheduler",
          [](const StableDiffusion& sd) { return diffusion::make_scheduler(sd.scheduler_config()); },
          "A fresh scheduler as configured for this pipeline.")
      .def(
          "generate",
          [](const StableDiffusion& sd, const py::object& cond, const py::object& negative, int64_t steps,
             double guidance_scale, std::optional<uint64_t> seed, int64_t height, int64_t width,
             const std::optional<std::string>& scheduler, const py::object& initial_latents, double eta,
             const py::object& progress, bool return_all) {
            diffusion::DiffusionOptions options;
            options.steps = steps;
            options.guidance_scale = guidance_scale;
            options.seed = seed;
            options.height = height;
            options.width = width;
            options.eta = eta;
            options.initial_latents = optional_tensor(initial_latents, "initial_latents");
            const at::Tensor c = tensor_from_python(cond, "cond");
            const at::Tensor n = optional_tensor(negative, "negative");
            const StableDiffusion pipe = with_scheduler(sd, scheduler);
            CallbackBridge bridge;
            const auto callback = step_callback(bridge, progress);
            const auto result =
                run_without_gil(bridge, [&] { return pipe.generate(c, n, options, callback); });
            return diffusion_output(result, return_all);
          },
          py::arg("cond"), py::arg("negative") = py::none(), py::kw_only(), py::arg("steps") = 50,
          py::arg("guidance_scale") = 7.5, py::arg("seed") = 0, py::arg("height") = 512,
          py::arg("width") = 512, py::arg("scheduler") = py::none(), py::arg("initial_latents") = py::none(),
          py::arg("eta") = 0.0, py::arg("progress") = py::none(), py::arg("return_all") = false,
          "txt2img from prompt embeddings cond [B, S, D] and negative (required when guidance_scale > 1) "
          "-> images uint8 [B, height, width, 3]. The initial latents are drawn as "
          "torch.randn(shape, generator=torch.Generator().manual_seed(seed)). progress(step, total) is "
          "called after each step; returning False cancels (voken.Cancelled). return_all: a dict with "
          "the latents, decoded and [0, 1] images too.")
      .def(
          "img2img",
          [](const StableDiffusion& sd, const py::object& image, const py::object& cond,
             const py::object& negative, double strength, int64_t steps, double guidance_scale,
             std::optional<uint64_t> seed, const std::optional<std::string>& scheduler, double eta,
             const py::object& progress, bool return_all) {
            diffusion::DiffusionOptions options;
            options.steps = steps;
            options.guidance_scale = guidance_scale;
            options.seed = seed;
            options.strength = strength;
            options.eta = eta;
            const at::Tensor pixels = img2img_input(image);
            const at::Tensor c = tensor_from_python(cond, "cond");
            const at::Tensor n = optional_tensor(negative, "negative");
            const StableDiffusion pipe = with_scheduler(sd, scheduler);
            CallbackBridge bridge;
            const auto callback = step_callback(bridge, progress);
            const auto result =
                run_without_gil(bridge, [&] { return pipe.img2img(pixels, c, n, options, callback); });
            return diffusion_output(result, return_all);
          },
          py::arg("image"), py::arg("cond"), py::arg("negative") = py::none(), py::kw_only(),
          py::arg("strength") = 0.8, py::arg("steps") = 50, py::arg("guidance_scale") = 7.5,
          py::arg("seed") = 0, py::arg("scheduler") = py::none(), py::arg("eta") = 0.0,
          py::arg("progress") = py::none(), py::arg("return_all") = false,
          "img2img: image (float [B, 3, H, W] in [0, 1], or any image voken reads; H and W multiples "
          "of 8) -> images uint8 [B, H, W, 3].")
      .def("__repr__", [](const StableDiffusion& sd) {
        return "voken.StableDiffusion(scheduler=" +
               diffusion::scheduler_class_name(sd.scheduler_config().kind) +
               ", unet_dtype=" + dtype_name(sd.unet().dtype()) + ")";
      });
}

}  // namespace voken::python
