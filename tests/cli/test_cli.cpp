// The `voken` command line, run as a separate process on a tiny random-weight bundle: generate
// writes the page and the Markdown with their images, demo runs end to end, inspect lists a
// bundle's parts and still reads checkpoints, and bad command lines or inputs fail with a
// non-zero status and a message naming the problem.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/report.h"
#include "common/test_support.h"
#include "pipeline/random_bundle.h"
#include "vision/image.h"

namespace voken {
namespace {

using test::read_file;
using test::TempDir;

struct CliRun {
  int status = -1;
  std::string out, err;
};

std::string quote(const std::string& arg) {
  std::string quoted = "'";
  for (char c : arg) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// Runs the CLI with `args`; stdout and stderr captured through files in `scratch`.
CliRun run_cli(const std::vector<std::string>& args, const std::string& scratch) {
  std::string command = quote(VOKEN_CLI_PATH);
  for (const auto& arg : args) command += " " + quote(arg);
  const std::string out = scratch + "/stdout.txt", err = scratch + "/stderr.txt";
  command += " >" + quote(out) + " 2>" + quote(err);
  const int raw = std::system(command.c_str());
  CliRun run;
  run.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  run.out = read_file(out);
  run.err = read_file(err);
  return run;
}

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

bool is_png(const std::string& path) { return read_file(path).compare(0, 8, "\x89PNG\r\n\x1a\n") == 0; }

// One tiny bundle and input picture for the whole suite.
class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    manifest_ =
        pipeline::write_random_bundle(dir_->path() + "/bundle", pipeline::RandomBundleShape::tiny(), 0);
    picture_ = dir_->path() + "/picture.png";
    Image image(40, 30);
    for (int y = 0; y < image.height; ++y)
      for (int x = 0; x < image.width; ++x)
        for (int c = 0; c < 3; ++c) image.row(y)[x * 3 + c] = static_cast<uint8_t>(x * 6 + y * 2 + c * 40);
    vision::save_image(image, picture_);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  CliRun run(const std::vector<std::string>& args) { return run_cli(args, scratch_.path()); }
  // A generate command line for the tiny bundle writing to `out`: fast settings, one image forced.
  std::vector<std::string> generate_args(const std::string& out, const std::string& seed = "3") {
    return {"generate",
            "--bundle",
            manifest_,
            "--text",
            "A picture:",
            "--image",
            picture_,
            "--text",
            "What happens next?",
            "--out",
            out,
            "--seed",
            seed,
            "--steps",
            "2",
            "--max-new-tokens",
            "12",
            "--force-image",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet"};
  }

  static TempDir* dir_;
  static std::string manifest_, picture_;
  TempDir scratch_;
};

TempDir* Cli::dir_ = nullptr;
std::string Cli::manifest_, Cli::picture_;

TEST_F(Cli, UsageAndBadCommandLines) {
  const CliRun usage = run({});
  EXPECT_EQ(usage.status, 2);
  EXPECT_NE(usage.err.find("usage: voken"), std::string::npos) << usage.err;
  const CliRun help = run({"generate", "--help"});
  EXPECT_EQ(help.status, 0);
  EXPECT_NE(help.out.find("--max-new-tokens"), std::string::npos);
  // A bad option: status 2 and the message, before anything is loaded.
  const CliRun bad = run({"generate", "--bundle", manifest_, "--text", "hi", "--top-p", "1.5"});
  EXPECT_EQ(bad.status, 2);
  EXPECT_NE(bad.err.find("voken generate: --top-p must be in (0, 1], got 1.5"), std::string::npos) << bad.err;
}

// What parse_generate_command says about each bad option (the same code the executable runs).
std::string usage_error(std::vector<std::string> args) {
  try {
    cli::parse_generate_command(args);
  } catch (const cli::UsageError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(CliOptions, BadOptionsAreNamedWithTheirRange) {
  struct Case {
    std::vector<std::string> extra;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--steps", "0"}, "--steps must be in [1, 1000], got 0"},
      {{"--steps", "ten"}, "--steps: expected an integer, got 'ten'"},
      {{"--steps", "5x"}, "--steps: expected an integer, got '5x'"},
      {{"--top-p", "1.5"}, "--top-p must be in (0, 1], got 1.5"},
      {{"--top-p", "0"}, "--top-p must be in (0, 1], got 0"},
      {{"--temperature", "-1"}, "--temperature must be in [0, 100], got -1"},
      {{"--guidance", "nan"}, "--guidance: expected a number, got 'nan'"},
      {{"--width", "100"}, "--width must be a multiple of 8, got 100"},
      {{"--height", "4"}, "--height must be in [8, 8192], got 4"},
      {{"--max-images", "-1"}, "--max-images must be in [0, 64], got -1"},
      {{"--seed", "-5"}, "--seed: expected a non-negative integer below 2^64, got '-5'"},
      {{"--scheduler", "heun"}, "--scheduler: unknown scheduler 'heun'"},
      {{"--dtype", "float64"}, "--dtype: unknown value 'float64' (one of: float32, bfloat16, float16)"},
      {{"--device", "gpu"}, "--device: expected cpu, cuda or cuda:N, got 'gpu'"},
      {{"--threads", "0"}, "--threads must be in [1, 1024], got 0"},
      {{"--force-image", "--max-images", "0"}, "--force-image needs --max-images >= 1"},
      {{"--out", "story.txt"}, "--out: the page's name must end in .html, got 'story.txt'"},
      {{"--frobnicate"}, "unknown option --frobnicate (see voken generate --help)"},
      {{"stray"}, "unexpected argument 'stray'"},
      {{"--greedy=yes"}, "--greedy takes no value"},
      {{"--steps"}, "--steps needs a value"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args = {"--bundle", "b.json", "--text", "hi"};
    args.insert(args.end(), c.extra.begin(), c.extra.end());
    EXPECT_NE(usage_error(args).find(c.message), std::string::npos)
        << "expected '" << c.message << "', got '" << usage_error(args) << "'";
  }
  EXPECT_NE(usage_error({"--text", "hi"}).find("--bundle is required"), std::string::npos);
  EXPECT_NE(usage_error({"--bundle", "b.json"}).find("give the message with --text and/or --image"),
            std::string::npos);
}

TEST(CliOptions, OptionsReachGenerateOptionsInOrder) {
  const cli::GenerateCommand c = cli::parse_generate_command({"--bundle",
                                                              "b.json",
                                                              "--text",
                                                              "one",
                                                              "--image",
                                                              "a.png",
                                                              "--text=two",
                                                              "--seed",
                                                              "18446744073709551615",
                                                              "--steps",
                                                              "7",
                                                              "--guidance",
                                                              "3.5",
                                                              "--top-p",
                                                              "0.5",
                                                              "--top-k",
                                                              "0",
                                                              "--temperature",
                                                              "0",
                                                              "--width",
                                                              "64",
                                                              "--height",
                                                              "128",
                                                              "--scheduler",
                                                              "ddim",
                                                              "--max-images",
                                                              "2",
                                                              "--force-image",
                                                              "--raw-prompt",
                                                              "--dtype",
                                                              "float32",
                                                              "--device",
                                                              "cuda:1",
                                                              "--threads",
                                                              "3",
                                                              "--max-new-tokens",
                                                              "9",
                                                              "--out",
                                                              "x/y.html"});
  ASSERT_EQ(c.segments.size(), 3u);
  EXPECT_TRUE(c.segments[0].is_text() && c.segments[0].text() == "one");
  EXPECT_TRUE(c.segments[1].kind() == Segment::Kind::ImageFile && c.segments[1].text() == "a.png");
  EXPECT_TRUE(c.segments[2].is_text() && c.segments[2].text() == "two");
  EXPECT_EQ(c.options.seed, 18446744073709551615ull);
  EXPECT_EQ(c.options.image.steps, 7);
  EXPECT_EQ(c.options.image.guidance_scale, 3.5);
  EXPECT_EQ(c.options.text.top_p, 0.5);
  EXPECT_EQ(c.options.text.top_k, 0);
  EXPECT_FALSE(c.options.text.do_sample) << "--temperature 0 is greedy";
  EXPECT_EQ(c.options.image.width, 64);
  EXPECT_EQ(c.options.image.height, 128);
  EXPECT_EQ(c.options.image.scheduler, "ddim");
  EXPECT_EQ(c.options.max_images, 2);
  EXPECT_TRUE(c.options.force_image);
  EXPECT_TRUE(c.options.raw_prompt);
  EXPECT_EQ(c.options.text.max_new_tokens, 9);
  EXPECT_EQ(c.load.dtype, "float32");
  EXPECT_EQ(c.load.device, "cuda:1");
  EXPECT_EQ(c.load.num_threads, 3);
  EXPECT_EQ(c.out, "x/y.html");
  EXPECT_FALSE(c.show_help);
}

TEST_F(Cli, MissingBundleOrImageFailsClearly) {
  const CliRun missing = run({"generate", "--bundle", "/nonexistent/bundle.json", "--text", "hi"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("bundle not found: /nonexistent/bundle.json"), std::string::npos) << missing.err;

  const std::string no_image = scratch_.file("missing.jpg");
  const CliRun image =
      run({"generate", "--bundle", manifest_, "--image", no_image, "--out", scratch_.file("x.html")});
  EXPECT_EQ(image.status, 1);
  EXPECT_NE(image.err.find("--image " + no_image + ": no such file"), std::string::npos) << image.err;
  EXPECT_FALSE(std::filesystem::exists(scratch_.file("x.html")));

  const CliRun inspect = run({"inspect", "/nonexistent/bundle.json"});
  EXPECT_EQ(inspect.status, 1);
  EXPECT_NE(inspect.err.find("/nonexistent/bundle.json: no such file or directory"), std::string::npos)
      << inspect.err;
}

TEST_F(Cli, GenerateWritesThePageAndTheMarkdownWithTheirImages) {
  const std::string out = scratch_.path() + "/pages/story.html";  // the directory is created
  const CliRun r = run(generate_args(out));
  ASSERT_EQ(r.status, 0) << r.err << r.out;

  const std::string html = read_file(out);
  EXPECT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(html.find("id=\"random-weights\""), std::string::npos) << "random-weight output must say so";
  EXPECT_NE(html.find("<section class=\"turn user\">"), std::string::npos);
  EXPECT_NE(html.find("<section class=\"turn assistant\">"), std::string::npos);
  EXPECT_NE(html.find("A picture:"), std::string::npos);
  EXPECT_NE(html.find("What happens next?"), std::string::npos);
  // The input and at least the forced image, embedded; the user's turn comes first.
  EXPECT_GE(count(html, "src=\"data:image/png;base64,"), 2u);
  EXPECT_LT(html.find("turn user"), html.find("turn assistant"));
  EXPECT_LT(html.find("turn assistant"), html.find("generated image 1"));
  EXPECT_NE(html.find("Timings"), std::string::npos);

  const std::string md = read_file(scratch_.path() + "/pages/story.md");
  EXPECT_NE(md.find("**Random weights.**"), std::string::npos);
  EXPECT_NE(md.find("## User"), std::string::npos);
  EXPECT_NE(md.find("## Assistant"), std::string::npos);
  EXPECT_NE(md.find("](<story-input-1.png>)"), std::string::npos) << md;
  EXPECT_NE(md.find("](<story-image-1.png>)"), std::string::npos) << md;
  EXPECT_TRUE(is_png(scratch_.path() + "/pages/story-input-1.png"));
  EXPECT_TRUE(is_png(scratch_.path() + "/pages/story-image-1.png"));
  EXPECT_EQ(read_file(scratch_.path() + "/pages/story-input-1.png"), read_file(picture_))
      << "inputs are copied byte for byte";

  EXPECT_NE(r.out.find("[generated image 1: "), std::string::npos) << r.out;
  for (const char* stage : {"load", "encode images", "prefill", "decode", "diffusion", "total"})
    EXPECT_NE(r.out.find(std::string("  ") + stage), std::string::npos) << stage << " timing missing:\n"
                                                                        << r.out;

  // Same seed, same response; the timings aside, the Markdown is the same.
  auto response = [](const std::string& markdown) {
    return markdown.substr(markdown.find("## Assistant"),
                           markdown.find("## Details") - markdown.find("## Assistant"));
  };
  const std::string again = scratch_.path() + "/again/story.html";
  ASSERT_EQ(run(generate_args(again)).status, 0);
  EXPECT_EQ(response(read_file(scratch_.path() + "/again/story.md")), response(md));
  EXPECT_EQ(read_file(scratch_.path() + "/again/story-image-1.png"),
            read_file(scratch_.path() + "/pages/story-image-1.png"));
}

TEST_F(Cli, DemoRunsEndToEndAndRemovesItsBundle) {
  const std::string out = scratch_.file("demo.html");
  const CliRun r = run({"demo", "--out", out, "--steps", "2", "--max-new-tokens", "12", "--quiet"});
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  const std::string html = read_file(out);
  EXPECT_NE(html.find("random weights"), std::string::npos);
  EXPECT_NE(html.find("sunset"), std::string::npos);
  EXPECT_GE(count(html, "src=\"data:image/png;base64,"), 2u);
  EXPECT_TRUE(std::filesystem::exists(scratch_.file("demo.md")));
  EXPECT_TRUE(is_png(scratch_.file("demo-image-1.png")));
  EXPECT_NE(r.err.find("removed"), std::string::npos) << r.err;

  const std::string kept = scratch_.path() + "/kept";
  const CliRun bundle_only = run({"demo", "--dir", kept, "--bundle-only"});
  ASSERT_EQ(bundle_only.status, 0) << bundle_only.err;
  EXPECT_TRUE(std::filesystem::exists(kept + "/bundle.json"));
  EXPECT_TRUE(is_png(kept + "/input.png"));
}

TEST_F(Cli, InspectListsEveryPartOfABundle) {
  const CliRun r = run({"inspect", manifest_});
  ASSERT_EQ(r.status, 0) << r.err << r.out;
  for (const char* part : {"llm", "tokenizer", "vision.vit", "vision.qformer", "vision.projection",
                           "minigpt5.stage1", "minigpt5.stage2", "diffusion", "  unet: ", "  vae: "})
    EXPECT_NE(r.out.find(std::string("\n") + part), std::string::npos) << part << " missing in:\n" << r.out;
  EXPECT_NE(r.out.find("RANDOM"), std::string::npos);
  EXPECT_NE(r.out.find("model.layers.*.self_attn.q_proj.weight"), std::string::npos) << "layers are folded";
  EXPECT_NE(r.out.find("parameters"), std::string::npos);
  EXPECT_NE(r.out.find("check: files, configs"), std::string::npos);
  EXPECT_NE(r.out.find("no missing, unexpected or mis-shaped tensors"), std::string::npos) << r.out;

  // The bundle's directory works too; --tensors lists layer 1's tensors by name.
  const CliRun all =
      run({"inspect", std::filesystem::path(manifest_).parent_path().string(), "--tensors", "--quick"});
  ASSERT_EQ(all.status, 0) << all.err;
  EXPECT_NE(all.out.find("model.layers.1.self_attn.q_proj.weight"), std::string::npos);
  EXPECT_EQ(all.out.find("load:"), std::string::npos) << "--quick stops after the check";

  // A checkpoint is listed tensor by tensor, as before bundles existed.
  const std::string stage1 =
      std::filesystem::path(manifest_).parent_path().string() + "/minigpt5_stage1.ckpt";
  const CliRun checkpoint = run({"inspect", stage1});
  ASSERT_EQ(checkpoint.status, 0) << checkpoint.err;
  EXPECT_NE(checkpoint.out.find("t2i_decoder_prompt"), std::string::npos);
  EXPECT_NE(checkpoint.out.find("tensors,"), std::string::npos);
}

TEST_F(Cli, BrokenBundleIsReportedByInspectAndGenerate) {
  const std::string copy = scratch_.path() + "/broken";
  std::filesystem::copy(std::filesystem::path(manifest_).parent_path(), copy,
                        std::filesystem::copy_options::recursive);
  std::filesystem::remove(copy + "/eva_vit_g.pth");
  const CliRun inspect = run({"inspect", copy + "/bundle.json"});
  EXPECT_EQ(inspect.status, 1);
  EXPECT_NE(inspect.out.find("vision.vit: not found: " + copy + "/eva_vit_g.pth"), std::string::npos)
      << inspect.out;

  const CliRun generate =
      run({"generate", "--bundle", copy, "--text", "hi", "--out", scratch_.file("b.html"), "--quiet"});
  EXPECT_EQ(generate.status, 1);
  EXPECT_NE(generate.err.find("eva_vit_g.pth"), std::string::npos) << generate.err;
}

TEST(CliReport, EncodingsAndEscapes) {
  // RFC 4648 test vectors.
  EXPECT_EQ(cli::base64_encode(""), "");
  EXPECT_EQ(cli::base64_encode("f"), "Zg==");
  EXPECT_EQ(cli::base64_encode("fo"), "Zm8=");
  EXPECT_EQ(cli::base64_encode("foo"), "Zm9v");
  EXPECT_EQ(cli::base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(cli::base64_encode(std::string("\xff\x00\x80", 3)), "/wCA");
  EXPECT_EQ(cli::html_escape("<b>\"Tom\" & 'Jerry'</b>"),
            "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;");
  EXPECT_EQ(cli::markdown_escape("a *b* [c](d) <e> x_y"), "a \\*b\\* \\[c\\](d) \\<e\\> x\\_y");
  EXPECT_EQ(cli::markdown_escape("# title"), "\\# title");
  EXPECT_EQ(cli::markdown_escape("- item - dash"), "\\- item - dash");
  EXPECT_EQ(cli::markdown_escape("12. not a list"), "12\\. not a list");

  cli::Report report;
  report.title = "t";
  report.user = {cli::ReportItem::of_text("line one\nline two\n\nnew paragraph")};
  const std::string md = cli::render_markdown(report, {});
  EXPECT_NE(md.find("line one\\\nline two\n\nnew paragraph"), std::string::npos) << md;
  report.prompt = "a ``` fence";
  EXPECT_NE(cli::render_markdown(report, {}).find("````text\na ``` fence\n````"), std::string::npos);
  EXPECT_EQ(cli::render_html(report).find("random-weights"), std::string::npos);
  report.random_weights = true;
  EXPECT_NE(cli::render_html(report).find("random-weights"), std::string::npos);
}

}  // namespace
}  // namespace voken
