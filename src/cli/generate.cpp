// `voken generate`: one MiniGPT-5 turn from the command line, written as an HTML page and Markdown.
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/progress.h"
#include "cli/report.h"
#include "io/paths.h"
#include "pipeline/bundle.h"
#include "pipeline/pipeline_impl.h"
#include "vision/image.h"

namespace voken::cli {
namespace {

constexpr const char* kGenerateUsage =
    R"(usage: voken generate --bundle M (--text TEXT | --image PATH)... [options]

One MiniGPT-5 turn: the --text and --image arguments form the user's message, in the order
given; the response (text and generated images) is written as an HTML page (--out, images
embedded) and a Markdown file beside it (images as PNG files next to it).

  --bundle M             bundle.json (or its directory); see docs/bundle.md
  --text TEXT            a piece of the user's message
  --image PATH           an image of the user's message (JPEG, PNG, WebP, BMP)
  --out NAME.html        the HTML page to write (default story.html), images embedded; beside it
                         NAME.md with its images NAME-input-K.<ext> and NAME-image-K.png
text:
  --max-new-tokens N     tokens to sample (default 256; the 7 forced vokens per image not counted)
  --temperature T        sampling temperature > 0 (default 1.0); 0 = greedy
  --greedy               greedy decoding instead of sampling
  --top-p P              nucleus sampling, in (0, 1] (default 0.9)
  --top-k K              top-k filter, 0 = off (default 50)
  --repetition-penalty R >= 1, 1 = off (default 2.0, as upstream)
  --raw-prompt           the text is the whole prompt (no system prompt, no ###Human/###Assistant)
  --system-prompt TEXT   replaces upstream's system prompt
images:
  --force-image          keep boosting [IMG0] until the response holds an image (upstream's
                         force_generation)
  --max-images N         at most N images in the response (default 4; 0 = text only)
  --steps N              denoising steps (default 50)
  --guidance G           classifier-free guidance scale (default 7.5; <= 1: none)
  --scheduler NAME       pndm, ddim, euler, euler_ancestral, dpm_solver (default: the bundle's)
  --width W, --height H  image size, multiples of 8 (default 512 x 512)
run:
  --seed N               everything random derives from it (default 0): same seed, same output
  --dtype D              float32 or bfloat16 for every part (default: the manifest's)
  --device D             cpu, cuda, cuda:N (default: the manifest's)
  --threads N            libtorch intra-op threads (default: one per core, or $OMP_NUM_THREADS)
  --quiet                no progress output
)";

std::string seconds(double s) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, s < 10 ? "%.3f s" : "%.1f s", s);
  return buffer;
}

std::string number(double x) {
  std::ostringstream out;
  out << x;
  return out.str();
}

std::string file_name(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string read_binary_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileNotFoundError("cannot read " + path);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

ReportImage input_image(const Segment& segment) {
  ReportImage image;
  image.encoded = read_binary_file(segment.text());
  const auto info = vision::probe_image(reinterpret_cast<const uint8_t*>(image.encoded.data()),
                                        image.encoded.size(), segment.text());
  static const std::map<vision::ImageFormat, std::string> extensions = {{vision::ImageFormat::Jpeg, "jpg"},
                                                                        {vision::ImageFormat::Png, "png"},
                                                                        {vision::ImageFormat::WebP, "webp"},
                                                                        {vision::ImageFormat::Bmp, "bmp"}};
  image.extension = extensions.at(info.format);
  image.width = info.width;
  image.height = info.height;
  image.caption = file_name(segment.text());
  return image;
}

// What the run used, for the report.
std::vector<std::pair<std::string, std::string>> settings_rows(const GenerateCommand& command,
                                                               const Pipeline& pipeline) {
  const GenerateOptions& o = command.options;
  std::vector<std::pair<std::string, std::string>> rows;
  rows.emplace_back("seed", std::to_string(o.seed));
  if (o.text.do_sample)
    rows.emplace_back("sampling", "temperature " + number(o.text.temperature) + ", top_p " +
                                      number(o.text.top_p) + ", top_k " + std::to_string(o.text.top_k));
  else
    rows.emplace_back("sampling", "greedy");
  rows.emplace_back("repetition penalty", number(o.text.repetition_penalty));
  rows.emplace_back("max new tokens", std::to_string(o.text.max_new_tokens));
  rows.emplace_back("prompt", o.raw_prompt ? "raw (as given)" : "MiniGPT-5 template");
  std::string scheduler = o.image.scheduler;
  if (scheduler.empty() && pipeline.impl().diffusion())
    scheduler = diffusion::scheduler_class_name(pipeline.impl().diffusion()->scheduler_config().kind) +
                " (the bundle's)";
  rows.emplace_back("images", std::to_string(o.image.width) + "x" + std::to_string(o.image.height) + ", " +
                                  std::to_string(o.image.steps) + " steps, guidance " +
                                  number(o.image.guidance_scale) + ", " + scheduler);
  rows.emplace_back("max images", std::to_string(o.max_images) + (o.force_image ? ", force_image" : ""));
  const auto& manifest = pipeline.impl().manifest();
  rows.emplace_back("dtype / device", "llm " + manifest.llm.placement.dtype + ", vision " +
                                          manifest.vision.placement.dtype + ", diffusion " +
                                          manifest.diffusion.placement.dtype + " on " +
                                          manifest.llm.placement.device);
  rows.emplace_back("threads", std::to_string(at::get_num_threads()));
  return rows;
}

std::vector<std::pair<std::string, std::string>> timing_rows(const GenerateResult& result,
                                                             double load_seconds,
                                                             const GenerateOptions& options) {
  const StageTimings& t = result.timings;
  std::vector<std::pair<std::string, std::string>> rows;
  rows.emplace_back("load", seconds(load_seconds));
  rows.emplace_back("encode images", seconds(t.encode_images));
  rows.emplace_back("prefill",
                    seconds(t.prefill) + " (" + std::to_string(result.prompt_tokens) + " positions)");
  std::string decode = seconds(t.decode) + " (" + std::to_string(result.generated_tokens) + " tokens";
  if (t.decode > 0 && result.generated_tokens > 0) {
    char rate[32];
    std::snprintf(rate, sizeof rate, ", %.1f tokens/s", double(result.generated_tokens) / t.decode);
    decode += rate;
  }
  rows.emplace_back("decode", decode + ", stop: " + result.stop_reason + ")");
  rows.emplace_back("voken mapping", seconds(t.mapping));
  std::string diffusion = seconds(t.diffusion) + " (" + std::to_string(result.images) + " image" +
                          (result.images == 1 ? "" : "s");
  if (result.images > 0) {
    char per_step[48];
    std::snprintf(per_step, sizeof per_step, " x %lld steps, %.3f s/step incl. VAE",
                  static_cast<long long>(options.image.steps),
                  t.diffusion / double(result.images * options.image.steps));
    diffusion += per_step;
  }
  rows.emplace_back("diffusion", diffusion + ")");
  rows.emplace_back("total", seconds(t.total) + " (generate_interleaved; load not included)");
  return rows;
}

bool ends_with_ignore_case(const std::string& text, const std::string& suffix) {
  if (text.size() < suffix.size()) return false;
  for (std::size_t i = 0; i < suffix.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(text[text.size() - suffix.size() + i])) != suffix[i])
      return false;
  return true;
}

}  // namespace

std::string resolve_manifest_path(const std::string& path) {
  if (io::is_directory(path)) {
    const std::string manifest = path + "/bundle.json";
    if (!io::is_regular_file(manifest))
      throw FileNotFoundError("bundle: " + path + " is a directory without a bundle.json");
    return manifest;
  }
  if (!io::is_regular_file(path))
    throw FileNotFoundError("bundle not found: " + path + " (give a bundle.json manifest or its directory)");
  return path;
}

GenerateCommand parse_generate_command(const std::vector<std::string>& args) {
  GenerateCommand c;
  GenerateOptions& o = c.options;
  bool help = false;
  const std::string command = "generate";
  const std::vector<OptionSpec> specs = {
      {"--help", false, [&](const std::string&) { help = true; }},
      {"--bundle", true, [&](const std::string& v) { c.bundle = v; }},
      {"--text", true, [&](const std::string& v) { c.segments.push_back(Segment::text(v)); }},
      {"--image", true,
       [&](const std::string& v) {
         if (v.empty()) throw UsageError("--image needs a path");
         c.segments.push_back(Segment::image_file(v));
       }},
      {"--out", true, [&](const std::string& v) { c.out = v; }},
      {"--max-new-tokens", true,
       [&](const std::string& v) { o.text.max_new_tokens = parse_int("--max-new-tokens", v, 0, 1 << 20); }},
      {"--temperature", true,
       [&](const std::string& v) {
         const double t = parse_double("--temperature", v, 0, 100);
         if (t == 0)
           o.text.do_sample = false;
         else
           o.text.temperature = t;
       }},
      {"--greedy", false, [&](const std::string&) { o.text.do_sample = false; }},
      {"--top-p", true, [&](const std::string& v) { o.text.top_p = parse_double("--top-p", v, 0, 1, true); }},
      {"--top-k", true, [&](const std::string& v) { o.text.top_k = parse_int("--top-k", v, 0, 1 << 24); }},
      {"--repetition-penalty", true,
       [&](const std::string& v) {
         o.text.repetition_penalty = parse_double("--repetition-penalty", v, 1, 100);
       }},
      {"--raw-prompt", false, [&](const std::string&) { o.raw_prompt = true; }},
      {"--system-prompt", true, [&](const std::string& v) { o.system_prompt = v; }},
      {"--force-image", false, [&](const std::string&) { o.force_image = true; }},
      {"--max-images", true,
       [&](const std::string& v) { o.max_images = parse_int("--max-images", v, 0, 64); }},
      {"--steps", true, [&](const std::string& v) { o.image.steps = parse_int("--steps", v, 1, 1000); }},
      {"--guidance", true,
       [&](const std::string& v) { o.image.guidance_scale = parse_double("--guidance", v, 0, 100); }},
      {"--scheduler", true,
       [&](const std::string& v) {
         try {
           diffusion::scheduler_kind_from_name(v);
         } catch (const ArgumentError& e) {
           throw UsageError(std::string("--scheduler: ") + e.what());
         }
         o.image.scheduler = v;
       }},
      {"--width", true, [&](const std::string& v) { o.image.width = parse_int("--width", v, 8, 8192); }},
      {"--height", true, [&](const std::string& v) { o.image.height = parse_int("--height", v, 8, 8192); }},
      {"--seed", true, [&](const std::string& v) { o.seed = parse_seed("--seed", v); }},
      {"--dtype", true,
       [&](const std::string& v) {
         c.load.dtype = parse_choice("--dtype", v, {"float32", "bfloat16", "float16"});
       }},
      {"--device", true,
       [&](const std::string& v) {
         if (!std::regex_match(v, std::regex("cpu|cuda(:[0-9]+)?")))
           throw UsageError("--device: expected cpu, cuda or cuda:N, got '" + v + "'");
         c.load.device = v;
       }},
      {"--threads", true,
       [&](const std::string& v) {
         c.load.num_threads = static_cast<int>(parse_int("--threads", v, 1, 1024));
       }},
      {"--quiet", false, [&](const std::string&) { c.quiet = true; }},
  };
  parse_arguments(args, specs, nullptr, command);
  if (help) {
    c.show_help = true;
    return c;
  }
  if (c.bundle.empty()) throw UsageError("--bundle is required (a bundle.json; see voken generate --help)");
  if (c.segments.empty()) throw UsageError("give the message with --text and/or --image");
  for (const char* option : {"--width", "--height"}) {
    const int64_t size = option[2] == 'w' ? o.image.width : o.image.height;
    if (size % 8 != 0)
      throw UsageError(std::string(option) + " must be a multiple of 8, got " + std::to_string(size));
  }
  if (o.force_image && o.max_images == 0) throw UsageError("--force-image needs --max-images >= 1");
  check_output_path(c.out);
  return c;
}

void check_output_path(const std::string& out) {
  if (!ends_with_ignore_case(out, ".html") && !ends_with_ignore_case(out, ".htm"))
    throw UsageError("--out: the page's name must end in .html, got '" + out + "'");
}

int run_generation(const GenerateCommand& command) {
  using Clock = std::chrono::steady_clock;
  // Everything that can be checked cheaply is checked before the (possibly long) load.
  const std::string manifest_path = resolve_manifest_path(command.bundle);
  for (const auto& segment : command.segments)
    if (segment.kind() == Segment::Kind::ImageFile && !io::is_regular_file(segment.text()))
      throw FileNotFoundError("--image " + segment.text() + ": no such file");
  const std::filesystem::path out_dir = std::filesystem::path(command.out).parent_path();
  if (!out_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(out_dir, error);
    if (error) throw Error("--out: cannot create the directory " + out_dir.string() + ": " + error.message());
  }
  Report report;
  report.title = command.title;
  for (const auto& segment : command.segments)
    report.user.push_back(segment.is_text() ? ReportItem::of_text(segment.text())
                                            : ReportItem::of_image(input_image(segment)));

  ProgressDisplay progress = ProgressDisplay::for_stream(stderr, command.quiet);
  const auto manifest = pipeline::BundleManifest::read(manifest_path);
  progress.log("loading " + manifest_path + (manifest.random_weights ? " (random weights)" : ""));
  const auto load_start = Clock::now();
  const Pipeline pipeline = Pipeline::load(manifest_path, command.load);
  const double load_seconds = std::chrono::duration<double>(Clock::now() - load_start).count();
  progress.log("loaded in " + seconds(load_seconds));

  install_interrupt_handler();
  GenerateResult result;
  try {
    result = pipeline.generate_interleaved(command.segments, command.options, std::ref(progress));
  } catch (const Cancelled&) {
    progress.finish();
    std::fprintf(stderr, "voken: interrupted; nothing written\n");
    return 130;
  }
  progress.finish();

  report.bundle_name = manifest.name.empty() ? file_name(manifest_path) : manifest.name;
  report.bundle_path = manifest_path;
  report.random_weights = manifest.random_weights;
  report.prompt = result.prompt;
  report.raw_text = result.raw_text;
  int image_index = 0;
  for (const auto& segment : result.segments) {
    if (segment.is_text()) {
      report.assistant.push_back(ReportItem::of_text(segment.text()));
      continue;
    }
    ReportImage image;
    image.encoded = vision::encode_image(segment.image(), vision::ImageFormat::Png);
    image.extension = "png";
    image.width = segment.image().width;
    image.height = segment.image().height;
    image.caption = "generated image " + std::to_string(++image_index);
    report.assistant.push_back(ReportItem::of_image(std::move(image)));
  }
  report.settings = settings_rows(command, pipeline);
  report.timings = timing_rows(result, load_seconds, command.options);
  const std::vector<std::string> written = write_report(report, command.out);

  // The response on stdout (images by their Markdown files), then where everything went.
  if (report.random_weights) std::printf("(random weights: the response means nothing)\n");
  image_index = 0;
  const std::string md_dir = out_dir.empty() ? "" : out_dir.string() + "/";
  for (const auto& item : report.assistant) {
    if (item.is_image) {
      const std::string stem = std::filesystem::path(command.out).stem().string();
      std::printf("[%s: %s%s-image-%d.png]\n", item.image.caption.c_str(), md_dir.c_str(), stem.c_str(),
                  ++image_index);
    } else {
      std::printf("%s\n", item.text.c_str());
    }
  }
  if (report.assistant.empty()) std::printf("(empty response)\n");
  std::printf("\nwrote %s and %s (+ %zu image file%s)\n", written[0].c_str(), written[1].c_str(),
              written.size() - 2, written.size() == 3 ? "" : "s");
  std::printf("timings:\n");
  for (const auto& [stage, value] : report.timings) std::printf("  %-14s %s\n", stage.c_str(), value.c_str());
  return 0;
}

int generate_main(const std::vector<std::string>& args) {
  const GenerateCommand command = parse_generate_command(args);
  if (command.show_help) {
    std::fputs(kGenerateUsage, stdout);
    return 0;
  }
  return run_generation(command);
}

}  // namespace voken::cli
