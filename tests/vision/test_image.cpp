// Image decoding: every supported format and pixel layout against PIL's
// Image.open(f).convert("RGB"), the real photos of shared/assets pixel-exactly, no EXIF
// rotation, raw arrays, encoding round trips, and every kind of bad input.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "common/test_support.h"
#include "io/safetensors.h"
#include "vision/image.h"
#include "vision/preprocess.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

const std::string kPilReference = std::string(VOKEN_SOURCE_DIR) + "/tests/fixtures/pil_reference.py";

bool have_pil() { return test::run_python("-c 'import PIL, numpy' >/dev/null 2>&1") == 0; }

std::string assets_dir() {
  const std::string root = test::golden_root();
  if (root.empty()) return "";
  const fs::path dir = fs::path(root).parent_path() / "assets" / "images";
  return fs::is_directory(dir) ? dir.string() : "";
}

std::vector<std::string> asset_photos() {
  std::vector<std::string> photos;
  const std::string dir = assets_dir();
  if (dir.empty()) return photos;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".jpg") photos.push_back(entry.path().string());
  std::sort(photos.begin(), photos.end());
  return photos;
}

Image random_image(int width, int height, uint32_t seed) {
  std::mt19937 rng(seed);
  Image image(width, height);
  for (auto& v : image.pixels) v = static_cast<uint8_t>(rng() & 0xFF);
  return image;
}

// A smooth image (compresses like a photo) with a distinct value in every channel.
Image gradient_image(int width, int height) {
  Image image(width, height);
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x) {
      uint8_t* p = image.row(y) + x * 3;
      p[0] = static_cast<uint8_t>(x * 255 / std::max(1, width - 1));
      p[1] = static_cast<uint8_t>(y * 255 / std::max(1, height - 1));
      p[2] = static_cast<uint8_t>((x + 2 * y) % 256);
    }
  return image;
}

const uint8_t* bytes(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// Runs `call`, expects exception E whose message contains `needle`.
template <typename E, typename F>
void expect_error(F&& call, const std::string& needle) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected one containing '" << needle << "'";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

::testing::AssertionResult same_pixels(const Image& got, const at::Tensor& want) {
  return test::bit_equal(image_to_tensor(got), want.contiguous());
}

TEST(Image, RealPhotosDecodeExactlyAsPil) {
  if (!have_pil()) GTEST_SKIP() << "/usr/bin/python3 with PIL and numpy not available";
  const auto photos = asset_photos();
  if (photos.empty()) GTEST_SKIP() << "shared/assets/images not found beside the golden folder";
  TempDir dir;
  std::string args = "'" + kPilReference + "' decode '" + dir.file("pil.safetensors") + "'";
  for (const auto& photo : photos) args += " '" + photo + "'";
  ASSERT_EQ(test::run_python(args), 0);
  const auto pil = io::SafetensorsFile::open(dir.file("pil.safetensors"));
  for (const auto& photo : photos) {
    const Image image = load_image(photo);
    const std::string name = fs::path(photo).filename().string();
    EXPECT_TRUE(same_pixels(image, pil.tensor(name))) << name;
  }
}

TEST(Image, EveryFormatAndLayoutDecodesAsPil) {
  if (!have_pil()) GTEST_SKIP() << "/usr/bin/python3 with PIL and numpy not available";
  TempDir dir;
  ASSERT_EQ(test::run_python("'" + kPilReference + "' formats '" + dir.path() + "'"), 0);
  const auto expected = io::SafetensorsFile::open(dir.file("expected.safetensors"));
  ASSERT_GE(expected.entries().size(), 18u);
  for (const auto& entry : expected.entries()) {
    SCOPED_TRACE(entry.name);
    const Image from_file = load_image(dir.file(entry.name));
    EXPECT_TRUE(same_pixels(from_file, expected.tensor(entry.name)));
    // The same bytes from memory give the same pixels.
    const std::string encoded = test::read_file(dir.file(entry.name));
    EXPECT_EQ(decode_image(bytes(encoded), encoded.size()).pixels, from_file.pixels);
    EXPECT_EQ(probe_image(bytes(encoded), encoded.size()).width, from_file.width);
  }
  // The EXIF orientation tag (6 = rotate 90) is ignored, as PIL's Image.open ignores it: the
  // image keeps its stored 53 x 37 size instead of becoming 37 x 53.
  const Image rotated = load_image(dir.file("exif_rotated.jpg"));
  EXPECT_EQ(rotated.width, 53);
  EXPECT_EQ(rotated.height, 37);
  const std::string webp = test::read_file(dir.file("lossy.webp"));
  EXPECT_EQ(probe_image(bytes(webp), webp.size()).format, ImageFormat::WebP);
}

TEST(Image, PngRoundTripIsLosslessAndJpegIsClose) {
  const Image image = random_image(31, 17, 7);
  const std::string png = encode_image(image, ImageFormat::Png);
  EXPECT_EQ(probe_image(bytes(png), png.size()).format, ImageFormat::Png);
  const Image back = decode_image(bytes(png), png.size());
  EXPECT_EQ(back.width, 31);
  EXPECT_EQ(back.height, 17);
  EXPECT_EQ(back.pixels, image.pixels);

  const Image smooth = gradient_image(64, 48);
  const std::string jpeg = encode_image(smooth, ImageFormat::Jpeg, 98);
  const ImageInfo info = probe_image(bytes(jpeg), jpeg.size());
  EXPECT_EQ(info.format, ImageFormat::Jpeg);
  EXPECT_EQ(info.width, 64);
  EXPECT_EQ(info.height, 48);
  const Image lossy = decode_image(bytes(jpeg), jpeg.size());
  const auto diff = (image_to_tensor(lossy).to(at::kInt) - image_to_tensor(smooth).to(at::kInt)).abs();
  EXPECT_LE(diff.max().item<int>(), 12);  // quality 98 on a smooth image
  EXPECT_GT(diff.max().item<int>(), 0);   // ... but JPEG is lossy: the test sees the codec

  TempDir dir;
  save_image(image, dir.file("out.PNG"));
  EXPECT_EQ(load_image(dir.file("out.PNG")).pixels, image.pixels);
  save_image(smooth, dir.file("out.jpeg"));
  EXPECT_EQ(load_image(dir.file("out.jpeg")).width, 64);
}

TEST(Image, RawArraysAndTensors) {
  const Image image = random_image(5, 3, 11);
  const Image copy = image_from_rgb(image.pixels.data(), image.pixels.size(), 5, 3);
  EXPECT_EQ(copy.pixels, image.pixels);
  const at::Tensor hwc = image_to_tensor(image);
  ASSERT_EQ(hwc.sizes(), at::IntArrayRef({3, 5, 3}));
  EXPECT_EQ(hwc[2][4][1].item<uint8_t>(), image.row(2)[4 * 3 + 1]);
  EXPECT_EQ(image_from_tensor(hwc).pixels, image.pixels);
  // Non-contiguous input (a transposed view) is read through its strides.
  const Image transposed = image_from_tensor(hwc.transpose(0, 1));
  EXPECT_EQ(transposed.width, 3);
  EXPECT_EQ(transposed.height, 5);
  EXPECT_EQ(transposed.row(4)[2 * 3 + 1], image.row(2)[4 * 3 + 1]);

  expect_error<ArgumentError>([&] { image_from_rgb(image.pixels.data(), 44, 5, 3); },
                              "needs 45 bytes, got 44");
  expect_error<ArgumentError>([&] { image_from_rgb(image.pixels.data(), 0, 0, 3); }, "must be positive");
  expect_error<ArgumentError>([&] { image_from_tensor(hwc.to(at::kFloat)); }, "expected uint8 [H, W, 3]");
  expect_error<ArgumentError>([&] { image_from_tensor(hwc.slice(2, 0, 2)); }, "expected uint8 [H, W, 3]");
  expect_error<ArgumentError>([&] { image_from_tensor(at::zeros({0, 4, 3}, at::kByte)); }, "[1, 2^31)");
}

TEST(Image, SourcesLoadFromFileBytesAndPixels) {
  TempDir dir;
  const Image image = random_image(9, 4, 3);
  save_image(image, dir.file("a.png"));
  const std::vector<ImageSource> sources = {
      ImageSource::file(dir.file("a.png")),
      ImageSource::encoded(encode_image(image, ImageFormat::Png), "upload"), ImageSource::pixels(image)};
  const auto loaded = load_images(sources);
  ASSERT_EQ(loaded.size(), 3u);
  for (const auto& l : loaded) EXPECT_EQ(l.pixels, image.pixels);
  EXPECT_EQ(sources[1].describe(), "upload");
  EXPECT_EQ(sources[2].describe(), "RGB array 9x4");
  expect_error<FormatError>([] { ImageSource::encoded("hello", "chat upload").load(); },
                            "chat upload: not a JPEG");
  expect_error<ArgumentError>([] { ImageSource::pixels(Image()); }, "empty image");
}

// ---------------------------------------------------------------------------------------------
// Bad input: each gives a voken exception naming the problem, never a crash or a gray image.

TEST(ImageBadInput, NotAnImageEmptyMissingAndDirectory) {
  const std::string text = "this is a text file, not an image";
  expect_error<FormatError>([&] { decode_image(bytes(text), text.size(), {}, "notes.txt"); },
                            "notes.txt: not a JPEG, PNG, WebP or BMP image (first bytes 7468697320697320)");
  expect_error<FormatError>([&] { decode_image(bytes(text), 0, {}, "empty.jpg"); },
                            "empty.jpg: empty (0 bytes)");
  const std::string gif = "GIF89a\x01\x00\x01\x00";
  expect_error<FormatError>([&] { decode_image(bytes(gif), gif.size()); }, "GIF is not supported");
  expect_error<FileNotFoundError>([] { load_image("/nonexistent/photo.jpg"); }, "/nonexistent/photo.jpg");
  TempDir dir;
  expect_error<FormatError>([&] { load_image(dir.path()); }, "not a regular file");
  test::write_file(dir.file("empty.png"), "");
  expect_error<FormatError>([&] { load_image(dir.file("empty.png")); }, "empty (0 bytes)");
}

TEST(ImageBadInput, TruncatedFilesAreRefused) {
  const Image image = gradient_image(40, 30);
  const std::string jpeg = encode_image(image, ImageFormat::Jpeg, 90);
  const std::string png = encode_image(image, ImageFormat::Png);
  // Cut inside the scan data, inside the headers, and just before the final marker/chunk.
  for (std::size_t keep : {jpeg.size() / 2, std::size_t{20}, jpeg.size() - 2})
    expect_error<FormatError>([&] { decode_image(bytes(jpeg), keep, {}, "cut.jpg"); },
                              "cut.jpg: truncated JPEG");
  for (std::size_t keep : {png.size() / 2, std::size_t{40}, png.size() - 1})
    expect_error<FormatError>([&] { decode_image(bytes(png), keep, {}, "cut.png"); },
                              "cut.png: truncated PNG");
  // Trailing bytes after a complete JPEG are fine (cameras append data).
  const std::string padded = jpeg + std::string(100, '\0');
  EXPECT_EQ(decode_image(bytes(padded), padded.size()).width, 40);

  const auto photos = asset_photos();
  if (photos.empty()) return;
  const std::string photo = test::read_file(photos.front());
  expect_error<FormatError>([&] { decode_image(bytes(photo), photo.size() * 3 / 4, {}, "photo"); },
                            "photo: truncated JPEG");
}

// Offset of the first frame header (SOF0-SOF2) marker of a JPEG, by walking its segments.
std::size_t frame_header_offset(const std::string& jpeg) {
  std::size_t pos = 2;
  while (pos + 4 <= jpeg.size()) {
    const auto marker = static_cast<uint8_t>(jpeg[pos + 1]);
    if (marker >= 0xC0 && marker <= 0xC2) return pos;
    pos += 2 + ((static_cast<uint8_t>(jpeg[pos + 2]) << 8) | static_cast<uint8_t>(jpeg[pos + 3]));
  }
  return std::string::npos;
}

TEST(ImageBadInput, CorruptAndZeroSizeImages) {
  const Image image = gradient_image(40, 30);
  const std::string jpeg = encode_image(image, ImageFormat::Jpeg, 90);
  const std::size_t sof = frame_header_offset(jpeg);
  ASSERT_NE(sof, std::string::npos);
  // Zero components: the header parses, libjpeg refuses the frame.
  std::string corrupt = jpeg;
  corrupt[sof + 9] = 0;
  expect_error<FormatError>([&] { decode_image(bytes(corrupt), corrupt.size(), {}, "bad.jpg"); },
                            "bad.jpg: corrupt JPEG data");
  // Zero height in the frame header (SOF: marker, length, precision, height, width).
  std::string zero_height = jpeg;
  zero_height[sof + 5] = zero_height[sof + 6] = 0;
  expect_error<FormatError>([&] { decode_image(bytes(zero_height), zero_height.size()); },
                            "zero-size JPEG image (40 x 0)");
  // A corrupt first chunk, a zero-width IHDR.
  std::string png = encode_image(image, ImageFormat::Png);
  std::string bad_ihdr = png;
  bad_ihdr[12] = 'X';
  expect_error<FormatError>([&] { decode_image(bytes(bad_ihdr), bad_ihdr.size()); }, "corrupt PNG (no IHDR");
  std::string zero_width = png;
  for (int i = 16; i < 20; ++i) zero_width[i] = 0;
  expect_error<FormatError>([&] { decode_image(bytes(zero_width), zero_width.size()); },
                            "zero-size PNG image (0 x 30)");
  // Damaged compressed data in an otherwise complete PNG: libpng's CRC/zlib check fails.
  std::string damaged = png;
  for (std::size_t i = 60; i < 90 && i < damaged.size() - 20; ++i)
    damaged[i] = static_cast<char>(~damaged[i]);
  expect_error<FormatError>([&] { decode_image(bytes(damaged), damaged.size(), {}, "damaged.png"); },
                            "damaged.png: corrupt PNG data");
}

TEST(ImageBadInput, OnePixelImagesWork) {
  const Image pixel = random_image(1, 1, 5);
  const std::string png = encode_image(pixel, ImageFormat::Png);
  const Image back = decode_image(bytes(png), png.size());
  ASSERT_EQ(back.width, 1);
  ASSERT_EQ(back.height, 1);
  EXPECT_EQ(back.pixels, pixel.pixels);
  // Every transform upsamples it to a constant 224 x 224 image of its colour.
  for (auto kind : {TransformKind::Blip2Eval, TransformKind::Playground, TransformKind::TrainEval}) {
    PreprocessConfig config;
    config.kind = kind;
    const Image out = transform_pixels(back, config);
    ASSERT_EQ(out.width, 224);
    for (std::size_t i = 0; i < out.pixels.size(); ++i) ASSERT_EQ(out.pixels[i], pixel.pixels[i % 3]) << i;
  }
}

// A minimal PNG (IHDR + IEND, no pixel data) announcing the given size.
std::string png_header_only(uint32_t width, uint32_t height) {
  auto be32 = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
  };
  std::string ihdr = be32(width) + be32(height) + std::string("\x08\x02\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1A\n", 8) + be32(13) + "IHDR" + ihdr + be32(0) + be32(0) + "IEND" +
         be32(0);
}

TEST(ImageBadInput, HugeImagesAreRefusedBeforeDecoding) {
  // 100000 x 100000 (30 GB as RGB) in a 45-byte file: refused from the header alone.
  const std::string bomb = png_header_only(100000, 100000);
  EXPECT_EQ(probe_image(bytes(bomb), bomb.size()).width, 100000);
  expect_error<ArgumentError>(
      [&] { decode_image(bytes(bomb), bomb.size(), {}, "bomb.png"); },
      "bomb.png: PNG image of 100000 x 100000 = 10000000000 pixels exceeds the limit of "
      "178956970 (DecodeOptions::max_pixels)");
  // The limit is configurable, and applies to real images too.
  const Image image = gradient_image(40, 30);
  const std::string jpeg = encode_image(image, ImageFormat::Jpeg, 90);
  DecodeOptions strict;
  strict.max_pixels = 1199;
  expect_error<ArgumentError>([&] { decode_image(bytes(jpeg), jpeg.size(), strict); }, "1200 pixels exceeds");
  strict.max_pixels = 1200;
  EXPECT_EQ(decode_image(bytes(jpeg), jpeg.size(), strict).height, 30);
  // Within the pixel limit but wider than OpenCV's per-side limit.
  const std::string wide = png_header_only(2000000, 1);
  expect_error<ArgumentError>([&] { decode_image(bytes(wide), wide.size()); }, "OpenCV's decoder limit");
}

TEST(ImageBadInput, EncodingErrors) {
  expect_error<ArgumentError>([] { encode_image(Image(), ImageFormat::Png); }, "empty image");
  expect_error<ArgumentError>([] { encode_image(Image(2, 2), ImageFormat::Jpeg, 0); },
                              "quality must be in [1, 100]");
  expect_error<ArgumentError>([] { encode_image(Image(2, 2), ImageFormat::WebP); }, "cannot encode WebP");
  TempDir dir;
  expect_error<ArgumentError>([&] { save_image(Image(2, 2), dir.file("x.gif")); }, "unknown extension");
  expect_error<Error>([&] { save_image(Image(2, 2), dir.file("missing/x.png")); }, "cannot write");
}

}  // namespace
}  // namespace voken::vision
