// voken_example: MiniGPT-5 from a C++ program through voken's public API.
//
//   voken_example BUNDLE [--text TEXT | --image PATH]... [--out DIR] [--seed N] [--steps N]
//                 [--max-new-tokens N] [--size PIXELS] [--force-image]
//
// The text and image arguments form the user's turn, in the order given. The response's text is
// printed; its images are saved as DIR/image_<k>.png (DIR defaults to the current directory).
#include <voken/voken.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: voken_example BUNDLE [--text TEXT | --image PATH]... [--out DIR] [--seed N] [--steps N]\n"
    "                     [--max-new-tokens N] [--size PIXELS] [--force-image]\n";

long long parse_integer(const std::string& option, const std::string& value) {
  char* end = nullptr;
  const long long number = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0') throw voken::ArgumentError(option + ": not an integer: '" + value + "'");
  return number;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  try {
    const std::string bundle = argv[1];
    std::vector<voken::Segment> segments;
    std::string out_dir = ".";
    voken::GenerateOptions options;
    for (int i = 2; i < argc; ++i) {
      const std::string option = argv[i];
      if (option == "--force-image") {
        options.force_image = true;
        continue;
      }
      if (i + 1 >= argc) throw voken::ArgumentError(option + ": needs a value (or is unknown)\n" + kUsage);
      const std::string value = argv[++i];
      if (option == "--text") {
        segments.push_back(voken::Segment::text(value));
      } else if (option == "--image") {
        segments.push_back(voken::Segment::image_file(value));
      } else if (option == "--out") {
        out_dir = value;
      } else if (option == "--seed") {
        options.seed = static_cast<uint64_t>(parse_integer(option, value));
      } else if (option == "--steps") {
        options.image.steps = parse_integer(option, value);
      } else if (option == "--max-new-tokens") {
        options.text.max_new_tokens = parse_integer(option, value);
      } else if (option == "--size") {
        options.image.width = options.image.height = parse_integer(option, value);
      } else {
        throw voken::ArgumentError("unknown option " + option + "\n" + kUsage);
      }
    }
    if (segments.empty()) segments.push_back(voken::Segment::text("Tell me a short story with a picture."));

    std::printf("voken %s: loading %s\n", voken::version(), bundle.c_str());
    const auto pipeline = voken::Pipeline::load(bundle);

    // Reports denoising progress on stderr; returning false here would cancel the call.
    auto progress = [](const voken::ProgressEvent& event) {
      if (event.stage == voken::ProgressEvent::Stage::ImageDone)
        std::fprintf(stderr, "image %lld done\n", static_cast<long long>(event.image + 1));
      return true;
    };
    const voken::GenerateResult result = pipeline.generate_interleaved(segments, options, progress);

    int image_count = 0;
    for (const auto& segment : result.segments) {
      if (segment.is_text()) {
        std::printf("%s", segment.text().c_str());
      } else {
        const std::string path = out_dir + "/image_" + std::to_string(++image_count) + ".png";
        voken::save_image(segment.image(), path);
        std::printf("\n[image %d: %dx%d, %s]\n", image_count, segment.image().width, segment.image().height,
                    path.c_str());
      }
    }
    std::printf("\n%lld prompt tokens, %lld generated tokens, %lld image(s), stop: %s, %.2f s\n",
                static_cast<long long>(result.prompt_tokens), static_cast<long long>(result.generated_tokens),
                static_cast<long long>(result.images), result.stop_reason.c_str(), result.timings.total);
    return 0;
  } catch (const voken::Error& error) {
    std::fprintf(stderr, "voken_example: %s\n", error.what());
    return 1;
  }
}
