// StableDiffusion loop behaviour beyond parity: bad input, cancellation from the step callback,
// seed determinism and equality of a seed with Python's torch.manual_seed + torch.randn. Uses the
// tiny models of $VOKEN_GOLDEN_DIR/sd_loop (skipped without them).
#include "diffusion/sd_pipeline.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "common/golden.h"
#include "common/test_support.h"
#include "voken/error.h"

namespace voken::diffusion {
namespace {

class SdPipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto golden = test::GoldenSet::open("sd_loop");
    if (!golden) return;
    const std::string model = golden->model_dir();
    pipeline_ = std::make_unique<StableDiffusion>(
        StableDiffusion::load(model + "/unet", model + "/vae", model + "/scheduler", at::kFloat));
  }
  static void TearDownTestSuite() { pipeline_.reset(); }
  void SetUp() override {
    if (!pipeline_) GTEST_SKIP() << test::GoldenSet::missing_reason("sd_loop");
    const int64_t width = pipeline_->unet().context_dim();
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(7);
    cond_ = at::randn({1, 77, width}, generator);
    negative_ = at::randn({1, 77, width}, generator);
    options_.steps = 2;
    options_.height = 32;
    options_.width = 32;
    options_.seed = 1234;
  }
  static std::unique_ptr<StableDiffusion> pipeline_;
  at::Tensor cond_, negative_;
  DiffusionOptions options_;
};
std::unique_ptr<StableDiffusion> SdPipelineTest::pipeline_;

TEST_F(SdPipelineTest, ProducesImagesOfTheRequestedSize) {
  options_.width = 48;
  const DiffusionResult result = pipeline_->generate(cond_, negative_, options_);
  EXPECT_EQ(result.image.sizes(), (at::IntArrayRef{1, 3, 32, 48}));
  EXPECT_EQ(result.image_uint8.sizes(), (at::IntArrayRef{1, 32, 48, 3}));
  EXPECT_EQ(result.image_uint8.scalar_type(), at::kByte);
  EXPECT_GE(result.image.min().item<float>(), 0.0f);
  EXPECT_LE(result.image.max().item<float>(), 1.0f);
}

TEST_F(SdPipelineTest, SameSeedGivesSameLatentsAndOtherSeedDiffers) {
  const DiffusionResult a = pipeline_->generate(cond_, negative_, options_);
  const DiffusionResult b = pipeline_->generate(cond_, negative_, options_);
  EXPECT_TRUE(test::bit_equal(a.latents, b.latents));
  options_.seed = 1235;
  const DiffusionResult c = pipeline_->generate(cond_, negative_, options_);
  EXPECT_FALSE(at::equal(a.latents, c.latents));
}

TEST_F(SdPipelineTest, SeedEqualsPythonTorchManualSeedRandn) {
  if (test::run_python("-c 'import torch, numpy' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "Debian python3 with torch and numpy not available";
  test::TempDir dir;
  const int64_t channels = pipeline_->unet().config().in_channels;
  const std::string script =
      "import sys, torch\n"
      "torch.manual_seed(int(sys.argv[1]))\n"
      "torch.randn(1, int(sys.argv[2]), 4, 4).numpy().astype('<f4').tofile(sys.argv[3])\n";
  test::write_file(dir.file("randn.py"), script);
  ASSERT_EQ(test::run_python("'" + dir.file("randn.py") + "' " + std::to_string(*options_.seed) + " " +
                             std::to_string(channels) + " '" + dir.file("latents.f32") + "'"),
            0);
  const std::string bytes = test::read_file(dir.file("latents.f32"));
  ASSERT_EQ(bytes.size(), static_cast<size_t>(channels * 16 * sizeof(float)));
  at::Tensor python_latents = at::empty({1, channels, 4, 4}, at::kFloat);
  std::memcpy(python_latents.data_ptr<float>(), bytes.data(), bytes.size());

  const DiffusionResult seeded = pipeline_->generate(cond_, negative_, options_);
  DiffusionOptions explicit_options = options_;
  explicit_options.seed.reset();
  explicit_options.initial_latents = python_latents;
  const DiffusionResult given = pipeline_->generate(cond_, negative_, explicit_options);
  EXPECT_TRUE(test::bit_equal(seeded.latents, given.latents));
}

TEST_F(SdPipelineTest, CallbackReportsProgressAndCanCancel) {
  std::vector<std::pair<int64_t, int64_t>> calls;
  pipeline_->generate(cond_, negative_, options_, [&](int64_t step, int64_t total) {
    calls.emplace_back(step, total);
    return true;
  });
  // PNDM (skip_prk_steps) runs steps + 1 UNet calls.
  ASSERT_EQ(calls.size(), 3u);
  EXPECT_EQ(calls.front(), std::make_pair(int64_t{1}, int64_t{3}));
  EXPECT_EQ(calls.back(), std::make_pair(int64_t{3}, int64_t{3}));

  int64_t seen = 0;
  EXPECT_THROW(pipeline_->generate(cond_, negative_, options_,
                                   [&](int64_t step, int64_t) {
                                     seen = step;
                                     return false;
                                   }),
               Cancelled);
  EXPECT_EQ(seen, 1);
}

TEST_F(SdPipelineTest, GuidanceOneIgnoresTheNegative) {
  options_.guidance_scale = 1.0;
  const DiffusionResult with_negative = pipeline_->generate(cond_, negative_, options_);
  const DiffusionResult without = pipeline_->generate(cond_, at::Tensor(), options_);
  EXPECT_TRUE(test::bit_equal(with_negative.latents, without.latents));
}

TEST_F(SdPipelineTest, Img2ImgRunsTheStrengthShareOfSteps) {
  options_.steps = 4;
  options_.strength = 0.5;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor image = at::rand({1, 3, 32, 32}, generator);
  int64_t total = 0;
  const DiffusionResult result =
      pipeline_->img2img(image, cond_, negative_, options_, [&](int64_t, int64_t n) {
        total = n;
        return true;
      });
  // diffusers get_timesteps: t_start = steps - int(steps * strength) = 2; every later entry of the
  // schedule runs (PNDM's has steps + 1 entries).
  auto scheduler = make_scheduler(pipeline_->scheduler_config());
  scheduler->set_timesteps(options_.steps);
  EXPECT_EQ(total, scheduler->num_steps() - 2);
  EXPECT_TRUE(test::bit_equal(result.timesteps, scheduler->timesteps().slice(0, 2)));
  EXPECT_EQ(result.image.sizes(), image.sizes());
  const DiffusionResult again = pipeline_->img2img(image, cond_, negative_, options_);
  EXPECT_TRUE(test::bit_equal(result.latents, again.latents));
}

TEST_F(SdPipelineTest, RejectsBadInput) {
  auto expect_argument_error = [&](DiffusionOptions options, const at::Tensor& cond,
                                   const at::Tensor& negative, const std::string& needle) {
    try {
      pipeline_->generate(cond, negative, options);
      ADD_FAILURE() << "no exception; expected one mentioning " << needle;
    } catch (const ArgumentError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  DiffusionOptions bad = options_;
  bad.height = 36;
  expect_argument_error(bad, cond_, negative_, "height");
  bad = options_;
  bad.width = 0;
  expect_argument_error(bad, cond_, negative_, "width");
  bad = options_;
  bad.steps = 0;
  expect_argument_error(bad, cond_, negative_, "steps");
  bad.steps = -3;
  expect_argument_error(bad, cond_, negative_, "steps");
  at::Tensor nan_cond = cond_.clone();
  nan_cond[0][5][1] = std::numeric_limits<float>::quiet_NaN();
  expect_argument_error(options_, nan_cond, negative_, "cond");
  at::Tensor nan_negative = negative_.clone();
  nan_negative[0][0][0] = std::numeric_limits<float>::infinity();
  expect_argument_error(options_, cond_, nan_negative, "negative");
  expect_argument_error(options_, cond_, at::Tensor(), "negative");
  expect_argument_error(options_, cond_.narrow(2, 0, 3), negative_.narrow(2, 0, 3), "width");
  bad = options_;
  bad.seed.reset();
  expect_argument_error(bad, cond_, negative_, "seed");
  bad = options_;
  bad.initial_latents = at::zeros({1, 4, 3, 3});
  expect_argument_error(bad, cond_, negative_, "initial_latents");

  DiffusionOptions img = options_;
  EXPECT_THROW(pipeline_->img2img(at::rand({1, 3, 30, 32}), cond_, negative_, img), ArgumentError);
  img.strength = 1.5;
  EXPECT_THROW(pipeline_->img2img(at::rand({1, 3, 32, 32}), cond_, negative_, img), ArgumentError);
  // Strength 0 leaves no step of a steps-long schedule (Euler; PNDM's extra entry still runs).
  StableDiffusion euler = *pipeline_;
  euler.set_scheduler_config(pipeline_->scheduler_config().as_kind(SchedulerKind::kEuler));
  img.strength = 0.0;
  EXPECT_THROW(euler.img2img(at::rand({1, 3, 32, 32}), cond_, negative_, img), ArgumentError);
}

}  // namespace
}  // namespace voken::diffusion
