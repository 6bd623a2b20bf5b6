// Images in and out of voken: decoding (JPEG, PNG, WebP, BMP through OpenCV) to 8-bit RGB the
// way PIL's `Image.open(f).convert("RGB")` sees them, raw RGB arrays, and encoding for saving
// generated images. OpenCV stays behind this header (it is linked privately).
//
// Decoding mirrors PIL where the two could disagree:
//  - no EXIF rotation (PIL's Image.open ignores the orientation tag; OpenCV would apply it);
//  - grayscale is replicated to three channels, alpha is dropped (not composited), palettes are
//    expanded;
//  - 16-bit samples keep their high byte (PIL does the same for 16-bit RGB(A) PNGs; for 16-bit
//    grayscale PNGs PIL's "I;16" -> "RGB" conversion clips at 255 instead, which voken does not
//    reproduce);
//  - a truncated file is an error (PIL raises "image file is truncated"; libjpeg would fill the
//    rest with gray).
// The container header is parsed before anything is decoded, so a file announcing more than
// DecodeOptions::max_pixels pixels is refused without allocating for it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "voken/image.h"

namespace voken::vision {

// The public image type (include/voken/image.h).
using Image = voken::Image;

enum class ImageFormat { Jpeg, Png, WebP, Bmp };
const char* format_name(ImageFormat format);

// What the container header says, read without decoding any pixel data.
struct ImageInfo {
  ImageFormat format = ImageFormat::Jpeg;
  int width = 0;
  int height = 0;
};

struct DecodeOptions {
  // Largest width * height accepted. The default is PIL's DecompressionBombError threshold
  // (2 * Image.MAX_IMAGE_PIXELS = 178,956,970 pixels, about 0.5 GB as RGB), so every image PIL
  // opens, voken opens. Checked on the header's dimensions before decoding.
  int64_t max_pixels = 178956970;
};

// Reads the header of encoded image bytes: recognises the format by its signature, reads the
// dimensions, and checks that the stream is complete (JPEG: an end-of-image marker after the
// scans; PNG: chunks up to IEND; WebP: the RIFF size; BMP: the pixel array). `source` names the
// bytes in error messages. Throws FormatError (not an image, unsupported format, truncated,
// corrupt header, zero width or height).
ImageInfo probe_image(const uint8_t* data, std::size_t size, const std::string& source = "image bytes");

// Decodes encoded bytes to RGB. Throws FormatError as probe_image does or when the pixel data
// cannot be decoded, ArgumentError when the image has more than options.max_pixels pixels.
Image decode_image(const uint8_t* data, std::size_t size, const DecodeOptions& options = {},
                   const std::string& source = "image bytes");
// Reads and decodes a file (memory-mapped, not copied). FileNotFoundError when it is absent.
Image load_image(const std::string& path, const DecodeOptions& options = {});

// Copies a raw HWC uint8 RGB array (rows of width * 3 bytes, no padding). ArgumentError when a
// dimension is not positive or `size` is not width * height * 3.
Image image_from_rgb(const uint8_t* data, std::size_t size, int width, int height);
// From a uint8 tensor [H, W, 3] (any strides; copied). ArgumentError for any other dtype/shape.
Image image_from_tensor(const at::Tensor& hwc);
// A uint8 tensor [H, W, 3] owning a copy of the pixels.
at::Tensor image_to_tensor(const Image& image);

// Encodes to PNG (lossless) or JPEG (quality 1-100). ArgumentError for an empty image, another
// format, or a quality out of range; Error if the encoder fails.
std::string encode_image(const Image& image, ImageFormat format, int jpeg_quality = 95);
// Writes PNG or JPEG, chosen by the extension (.png, .jpg, .jpeg; case-insensitive).
void save_image(const Image& image, const std::string& path, int jpeg_quality = 95);

// Where an image comes from: a file, encoded bytes in memory, or pixels already decoded.
class ImageSource {
 public:
  static ImageSource file(std::string path);
  static ImageSource encoded(std::string bytes, std::string name = "image bytes");
  static ImageSource pixels(Image image);

  Image load(const DecodeOptions& options = {}) const;
  // For messages: the path, the name given to the bytes, or "RGB array WxH".
  std::string describe() const;

 private:
  enum class Kind { File, Encoded, Pixels };
  Kind kind_ = Kind::Pixels;
  std::string text_;  // path, or name of the encoded bytes
  std::shared_ptr<const std::string> bytes_;
  std::shared_ptr<const Image> image_;
};

// Loads every source, in order (errors name the failing source, as load() does).
std::vector<Image> load_images(const std::vector<ImageSource>& sources, const DecodeOptions& options = {});

}  // namespace voken::vision
