// `voken demo`: the whole pipeline end to end with no download: a tiny bundle with random
// weights, written in the real file formats, and one generation from a text + image prompt.
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "cli/args.h"
#include "cli/commands.h"
#include "pipeline/random_bundle.h"
#include "vision/image.h"

namespace voken::cli {
namespace {

constexpr const char* kDemoUsage = R"(usage: voken demo [--dir D] [--keep] [--out PATH] [--steps N] [--seed N]
                  [--max-new-tokens N] [--bundle-only] [--quiet]

Writes a tiny MiniGPT-5 bundle with RANDOM weights (every file in the format of the real
download: HF LLaMA safetensors + tokenizer.model, EVA ViT / BLIP-2 / MiniGPT-4 .pth files,
Lightning .ckpt stage checkpoints, a diffusers Stable Diffusion folder) and runs
`voken generate` on it with a text + image prompt. The output shows the pipeline working; its
text and pictures mean nothing.

  --dir D              where the bundle and the input picture go (default: a new temporary
                       directory, removed afterwards unless --keep); a given D is kept
  --keep               keep the temporary directory
  --out PATH           the page to write (default demo.html; demo.md beside it)
  --steps N            denoising steps per image (default 10)
  --seed N             generation seed (default 0; the bundle itself is always the same)
  --max-new-tokens N   (default 48)
  --bundle-only        write the bundle and input.png into D, then stop
  --quiet              no progress output
)";

// The demo's input picture, drawn in code: a sunset over the sea.
Image sunset(int width, int height) {
  Image image(width, height);
  const int horizon = height * 3 / 5;
  const double sun_x = width * 0.62, sun_y = horizon - height * 0.12, sun_r = height * 0.11;
  for (int y = 0; y < height; ++y) {
    uint8_t* row = image.row(y);
    for (int x = 0; x < width; ++x) {
      double r, g, b;
      if (y < horizon) {  // sky: deep blue at the top to orange at the horizon
        const double t = double(y) / horizon;
        r = 40 + 215 * t, g = 50 + 110 * t, b = 120 - 60 * t;
        const double d = std::hypot(x - sun_x, y - sun_y);
        if (d < sun_r)
          r = 255, g = 230, b = 140;
        else if (d < sun_r * 2.2) {
          const double glow = 1 - (d - sun_r) / (sun_r * 1.2);
          r += (255 - r) * glow * 0.6, g += (200 - g) * glow * 0.6, b += (120 - b) * glow * 0.3;
        }
      } else {  // sea: dark blue, with the sun's reflection in broken stripes
        const double t = double(y - horizon) / (height - horizon);
        r = 30 + 40 * (1 - t), g = 60 + 40 * (1 - t), b = 110 + 30 * (1 - t);
        const bool stripe = ((y - horizon) / 3) % 2 == 0;
        if (stripe && std::abs(x - sun_x) < sun_r * (1.2 - 0.8 * t)) r = 240, g = 170, b = 90;
      }
      row[x * 3 + 0] = static_cast<uint8_t>(std::clamp(r, 0.0, 255.0));
      row[x * 3 + 1] = static_cast<uint8_t>(std::clamp(g, 0.0, 255.0));
      row[x * 3 + 2] = static_cast<uint8_t>(std::clamp(b, 0.0, 255.0));
    }
  }
  return image;
}

std::string make_temp_dir() {
  const std::filesystem::path base = std::filesystem::temp_directory_path();
  std::string pattern = (base / "voken-demo-XXXXXX").string();
  if (!mkdtemp(pattern.data()))
    throw Error("demo: cannot create a temporary directory under " + base.string());
  return pattern;
}

}  // namespace

int demo_main(const std::vector<std::string>& args) {
  std::string dir, out = "demo.html";
  bool keep = false, bundle_only = false, help = false;
  GenerateCommand command;
  command.title = "voken demo (random weights)";
  command.options.image.steps = 10;
  command.options.text.max_new_tokens = 48;
  const std::vector<OptionSpec> specs = {
      {"--help", false, [&](const std::string&) { help = true; }},
      {"--dir", true, [&](const std::string& v) { dir = v; }},
      {"--keep", false, [&](const std::string&) { keep = true; }},
      {"--out", true, [&](const std::string& v) { out = v; }},
      {"--steps", true,
       [&](const std::string& v) { command.options.image.steps = parse_int("--steps", v, 1, 1000); }},
      {"--seed", true, [&](const std::string& v) { command.options.seed = parse_seed("--seed", v); }},
      {"--max-new-tokens", true,
       [&](const std::string& v) {
         command.options.text.max_new_tokens = parse_int("--max-new-tokens", v, 0, 1024);
       }},
      {"--bundle-only", false, [&](const std::string&) { bundle_only = true; }},
      {"--quiet", false, [&](const std::string&) { command.quiet = true; }},
  };
  parse_arguments(args, specs, nullptr, "demo");
  if (help) {
    std::fputs(kDemoUsage, stdout);
    return 0;
  }
  if (bundle_only && dir.empty()) throw UsageError("--bundle-only needs --dir");
  check_output_path(out);
  command.out = out;

  const bool temporary = dir.empty();
  if (temporary) dir = make_temp_dir();
  struct Cleanup {
    std::string dir;
    bool remove;
    ~Cleanup() {
      std::error_code ignored;
      if (remove) std::filesystem::remove_all(dir, ignored);
    }
  } cleanup{dir, temporary && !keep};

  const pipeline::RandomBundleShape shape = pipeline::RandomBundleShape::tiny();
  const std::string manifest = pipeline::write_random_bundle(dir, shape, /*seed=*/0);
  const std::string picture = dir + "/input.png";
  vision::save_image(sunset(192, 144), picture);
  if (!command.quiet || bundle_only)
    std::fprintf(stderr, "wrote a tiny random-weight bundle: %s (+ %s)\n", manifest.c_str(), picture.c_str());
  if (bundle_only) return 0;

  command.bundle = manifest;
  command.segments = {Segment::text("Here is a picture of a sunset over the sea."),
                      Segment::image_file(picture),
                      Segment::text("What happens next? Tell a short story with pictures.")};
  // Tiny sizes: the tiny VAE decodes 8x8 latents to 64x64 pixels in a few milliseconds.
  command.options.image.width = shape.vae.sample_size;
  command.options.image.height = shape.vae.sample_size;
  command.options.force_image = true;
  command.options.max_images = 2;
  const int status = run_generation(command);
  if (temporary)
    std::fprintf(stderr, "bundle directory %s %s\n", dir.c_str(),
                 keep ? "kept" : "removed (--keep keeps it)");
  return status;
}

}  // namespace voken::cli
