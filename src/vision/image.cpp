#include "vision/image.h"

#include <ATen/ATen.h>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstring>
#include <fstream>

#include "io/mapped_file.h"
#include "voken/error.h"

namespace voken::vision {
namespace {

// OpenCV's own per-dimension decode limit (CV_IO_MAX_IMAGE_WIDTH/HEIGHT default 1 << 20); beyond
// it imdecode throws from inside, so it is checked up front with a clear message.
constexpr int64_t kOpenCvMaxDimension = int64_t{1} << 20;

uint32_t be16(const uint8_t* p) { return (uint32_t{p[0]} << 8) | p[1]; }
uint32_t be32(const uint8_t* p) { return (be16(p) << 16) | be16(p + 2); }
uint32_t le16(const uint8_t* p) { return (uint32_t{p[1]} << 8) | p[0]; }
uint32_t le24(const uint8_t* p) { return (uint32_t{p[2]} << 16) | le16(p); }
uint32_t le32(const uint8_t* p) { return (le16(p + 2) << 16) | le16(p); }

bool starts_with(const uint8_t* data, std::size_t size, const char* magic, std::size_t length) {
  return size >= length && std::memcmp(data, magic, length) == 0;
}

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw FormatError(source + ": " + problem);
}

// JPEG: walks the marker segments up to the first scan (the frame header gives the size), then
// the entropy-coded data and any further segments (progressive scans, tables) until EOI. In
// entropy-coded data a 0xFF byte is always followed by 0x00 (stuffing), a restart marker or a
// real marker, so EOI cannot be mistaken; segments are skipped by their length, so an EXIF
// thumbnail's own EOI is never seen.
ImageInfo probe_jpeg(const uint8_t* data, std::size_t size, const std::string& source) {
  ImageInfo info{ImageFormat::Jpeg, 0, 0};
  bool have_frame = false;
  bool in_scan = false;
  std::size_t pos = 2;
  while (true) {
    if (in_scan) {
      const void* found = pos < size ? std::memchr(data + pos, 0xFF, size - pos) : nullptr;
      if (found == nullptr)
        fail(source, "truncated JPEG (the data ends inside a scan, no end-of-image marker)");
      pos = static_cast<std::size_t>(static_cast<const uint8_t*>(found) - data);
    } else if (pos >= size) {
      fail(source, "truncated JPEG (the data ends before the first scan)");
    } else if (data[pos] != 0xFF) {
      fail(source, "corrupt JPEG (no marker at offset " + std::to_string(pos) + ")");
    }
    while (pos < size && data[pos] == 0xFF) ++pos;  // 0xFF fill bytes may precede any marker
    if (pos >= size) fail(source, "truncated JPEG (the data ends inside a marker)");
    const uint8_t marker = data[pos++];
    if (marker == 0x00 || (marker >= 0xD0 && marker <= 0xD7) || marker == 0x01) {
      if (!in_scan && marker == 0x00) fail(source, "corrupt JPEG (invalid marker 0xFF00 outside a scan)");
      continue;  // stuffed byte, restart marker or TEM: no length field
    }
    if (marker == 0xD9) {
      if (!in_scan) fail(source, "corrupt JPEG (end-of-image marker before any scan)");
      return info;
    }
    if (marker == 0xD8) fail(source, "corrupt JPEG (a second start-of-image marker)");
    if (pos + 2 > size) fail(source, "truncated JPEG (the data ends inside a segment header)");
    const std::size_t length = be16(data + pos);
    if (length < 2) fail(source, "corrupt JPEG (segment length " + std::to_string(length) + ")");
    if (pos + length > size) fail(source, "truncated JPEG (a segment runs past the end of the data)");
    const bool frame_header =
        marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (frame_header && !have_frame) {
      if (length < 8) fail(source, "corrupt JPEG (frame header too short)");
      info.height = static_cast<int>(be16(data + pos + 3));
      info.width = static_cast<int>(be16(data + pos + 5));
      have_frame = true;
    }
    if (marker == 0xDA) {
      if (!have_frame) fail(source, "corrupt JPEG (a scan before the frame header)");
      in_scan = true;
    }
    pos += length;
  }
}

// PNG: IHDR must come first; every chunk must fit, up to IEND.
ImageInfo probe_png(const uint8_t* data, std::size_t size, const std::string& source) {
  ImageInfo info{ImageFormat::Png, 0, 0};
  if (size < 8 + 8 + 13 || std::memcmp(data + 12, "IHDR", 4) != 0 || be32(data + 8) != 13)
    fail(source, "corrupt PNG (no IHDR chunk after the signature)");
  const uint32_t width = be32(data + 16);
  const uint32_t height = be32(data + 20);
  if (width > INT_MAX || height > INT_MAX) fail(source, "corrupt PNG (width or height above 2^31 - 1)");
  info.width = static_cast<int>(width);
  info.height = static_cast<int>(height);
  std::size_t pos = 8;
  while (pos + 12 <= size) {
    const uint32_t length = be32(data + pos);
    if (length > INT_MAX) fail(source, "corrupt PNG (chunk length above 2^31 - 1)");
    if (size - pos - 12 < length) break;
    if (std::memcmp(data + pos + 4, "IEND", 4) == 0) return info;
    pos += 12 + static_cast<std::size_t>(length);
  }
  fail(source, "truncated PNG (the data ends before the IEND chunk)");
}

// WebP: RIFF container; the first chunk is a lossy (VP8), lossless (VP8L) or extended (VP8X)
// header, each with its own encoding of the size.
ImageInfo probe_webp(const uint8_t* data, std::size_t size, const std::string& source) {
  ImageInfo info{ImageFormat::WebP, 0, 0};
  if (static_cast<uint64_t>(le32(data + 4)) + 8 > size)
    fail(source, "truncated WebP (the RIFF header announces " + std::to_string(le32(data + 4) + 8ull) +
                     " bytes, there are " + std::to_string(size) + ")");
  if (size < 30) fail(source, "truncated WebP (no complete image header)");
  const uint8_t* chunk = data + 12;
  const uint8_t* payload = chunk + 8;
  if (std::memcmp(chunk, "VP8 ", 4) == 0) {
    if (payload[3] != 0x9D || payload[4] != 0x01 || payload[5] != 0x2A)
      fail(source, "corrupt WebP (bad VP8 start code)");
    info.width = static_cast<int>(le16(payload + 6) & 0x3FFF);
    info.height = static_cast<int>(le16(payload + 8) & 0x3FFF);
  } else if (std::memcmp(chunk, "VP8L", 4) == 0) {
    if (payload[0] != 0x2F) fail(source, "corrupt WebP (bad VP8L signature)");
    const uint32_t bits = le32(payload + 1);
    info.width = static_cast<int>(bits & 0x3FFF) + 1;
    info.height = static_cast<int>((bits >> 14) & 0x3FFF) + 1;
  } else if (std::memcmp(chunk, "VP8X", 4) == 0) {
    if (payload[0] & 0x02) fail(source, "animated WebP is not supported");
    info.width = static_cast<int>(le24(payload + 4)) + 1;
    info.height = static_cast<int>(le24(payload + 7)) + 1;
  } else {
    fail(source, "corrupt WebP (first chunk is neither VP8, VP8L nor VP8X)");
  }
  return info;
}

// BMP: OS/2 (12-byte) or Windows (40+ byte) info header; for uncompressed data the pixel array
// must fit in the file.
ImageInfo probe_bmp(const uint8_t* data, std::size_t size, const std::string& source) {
  ImageInfo info{ImageFormat::Bmp, 0, 0};
  if (size < 26) fail(source, "truncated BMP (no complete header)");
  const uint32_t pixel_offset = le32(data + 10);
  const uint32_t header_size = le32(data + 14);
  int64_t width = 0;
  int64_t height = 0;
  uint32_t bits_per_pixel = 0;
  uint32_t compression = 0;
  if (header_size == 12) {
    width = le16(data + 18);
    height = le16(data + 20);
    bits_per_pixel = le16(data + 24);
  } else if (header_size >= 40) {
    if (size < 14 + 40) fail(source, "truncated BMP (no complete header)");
    width = static_cast<int32_t>(le32(data + 18));
    height = static_cast<int32_t>(le32(data + 22));
    bits_per_pixel = le16(data + 28);
    compression = le32(data + 30);
  } else {
    fail(source, "corrupt BMP (info header size " + std::to_string(header_size) + ")");
  }
  height = std::abs(height);  // negative height = rows stored top-down
  if (width < 0) fail(source, "corrupt BMP (negative width)");
  if (width > INT_MAX || height > INT_MAX) fail(source, "corrupt BMP (width or height above 2^31 - 1)");
  const uint32_t supported_depths[] = {1, 4, 8, 16, 24, 32};
  if (std::find(std::begin(supported_depths), std::end(supported_depths), bits_per_pixel) ==
      std::end(supported_depths))
    fail(source, "unsupported BMP bit depth " + std::to_string(bits_per_pixel));
  if (compression == 0 || compression == 3) {  // BI_RGB, BI_BITFIELDS: fixed-size rows
    const uint64_t row = (static_cast<uint64_t>(width) * bits_per_pixel + 31) / 32 * 4;
    if (pixel_offset + row * static_cast<uint64_t>(height) > size)
      fail(source, "truncated BMP (the pixel array needs " + std::to_string(row * height) +
                       " bytes from offset " + std::to_string(pixel_offset) + ", the file has " +
                       std::to_string(size) + ")");
  } else if (compression != 1 && compression != 2) {  // RLE8, RLE4 are decoded by OpenCV
    fail(source, "unsupported BMP compression " + std::to_string(compression));
  }
  info.width = static_cast<int>(width);
  info.height = static_cast<int>(height);
  return info;
}

std::string describe_signature(const uint8_t* data, std::size_t size) {
  if (starts_with(data, size, "GIF8", 4)) return "GIF is not supported (JPEG, PNG, WebP and BMP are)";
  if (starts_with(data, size, "II*\0", 4) || starts_with(data, size, "MM\0*", 4))
    return "TIFF is not supported (JPEG, PNG, WebP and BMP are)";
  static const char hex[] = "0123456789abcdef";
  std::string first;
  for (std::size_t i = 0; i < std::min<std::size_t>(size, 8); ++i) {
    first += hex[data[i] >> 4];
    first += hex[data[i] & 15];
  }
  return "not a JPEG, PNG, WebP or BMP image (first bytes " + first + ")";
}

cv::Mat wrap(Image& image) { return cv::Mat(image.height, image.width, CV_8UC3, image.pixels.data()); }

bool iequals_suffix(const std::string& text, const std::string& suffix) {
  if (text.size() < suffix.size()) return false;
  return std::equal(suffix.rbegin(), suffix.rend(), text.rbegin(),
                    [](char lower, char c) { return std::tolower(static_cast<unsigned char>(c)) == lower; });
}

}  // namespace

const char* format_name(ImageFormat format) {
  switch (format) {
    case ImageFormat::Jpeg:
      return "JPEG";
    case ImageFormat::Png:
      return "PNG";
    case ImageFormat::WebP:
      return "WebP";
    case ImageFormat::Bmp:
      return "BMP";
  }
  return "?";
}

ImageInfo probe_image(const uint8_t* data, std::size_t size, const std::string& source) {
  if (size == 0) fail(source, "empty (0 bytes), not an image");
  ImageInfo info;
  if (starts_with(data, size, "\xFF\xD8\xFF", 3)) {
    info = probe_jpeg(data, size, source);
  } else if (starts_with(data, size, "\x89PNG\r\n\x1A\n", 8)) {
    info = probe_png(data, size, source);
  } else if (size >= 12 && starts_with(data, size, "RIFF", 4) && std::memcmp(data + 8, "WEBP", 4) == 0) {
    info = probe_webp(data, size, source);
  } else if (starts_with(data, size, "BM", 2)) {
    info = probe_bmp(data, size, source);
  } else {
    fail(source, describe_signature(data, size));
  }
  if (info.width <= 0 || info.height <= 0)
    fail(source, std::string("zero-size ") + format_name(info.format) + " image (" +
                     std::to_string(info.width) + " x " + std::to_string(info.height) + ")");
  return info;
}

Image decode_image(const uint8_t* data, std::size_t size, const DecodeOptions& options,
                   const std::string& source) {
  const ImageInfo info = probe_image(data, size, source);
  const int64_t pixel_count = int64_t{info.width} * info.height;
  if (pixel_count > options.max_pixels)
    throw ArgumentError(source + ": " + format_name(info.format) + " image of " + std::to_string(info.width) +
                        " x " + std::to_string(info.height) + " = " + std::to_string(pixel_count) +
                        " pixels exceeds the limit of " + std::to_string(options.max_pixels) +
                        " (DecodeOptions::max_pixels); refused before decoding");
  if (info.width > kOpenCvMaxDimension || info.height > kOpenCvMaxDimension)
    throw ArgumentError(source + ": " + std::to_string(info.width) + " x " + std::to_string(info.height) +
                        " exceeds OpenCV's decoder limit of " + std::to_string(kOpenCvMaxDimension) +
                        " pixels per side");
  if (size > static_cast<std::size_t>(INT_MAX))
    throw ArgumentError(source + ": " + std::to_string(size) + " bytes of encoded data exceed 2 GiB");

  cv::Mat decoded;
  try {
    const cv::Mat encoded(1, static_cast<int>(size), CV_8UC1, const_cast<uint8_t*>(data));
    // PIL's Image.open never applies the EXIF orientation; OpenCV does unless told not to.
    decoded = cv::imdecode(encoded, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {
    fail(source,
         std::string("OpenCV failed to decode the ") + format_name(info.format) + " data: " + e.what());
  }
  if (decoded.empty())
    fail(source, std::string("corrupt ") + format_name(info.format) + " data (OpenCV could not decode it)");
  if (decoded.cols != info.width || decoded.rows != info.height || decoded.type() != CV_8UC3)
    fail(source, "decoded " + std::to_string(decoded.cols) + " x " + std::to_string(decoded.rows) +
                     " pixels but the header says " + std::to_string(info.width) + " x " +
                     std::to_string(info.height));
  Image image(info.width, info.height);
  cv::Mat rgb = wrap(image);
  cv::cvtColor(decoded, rgb, cv::COLOR_BGR2RGB);
  return image;
}

Image load_image(const std::string& path, const DecodeOptions& options) {
  const auto file = io::MappedFile::open(path);
  return decode_image(file->data(), file->size(), options, path);
}

Image image_from_rgb(const uint8_t* data, std::size_t size, int width, int height) {
  if (width <= 0 || height <= 0)
    throw ArgumentError("RGB array: width and height must be positive, got " + std::to_string(width) + " x " +
                        std::to_string(height));
  const std::size_t expected = static_cast<std::size_t>(width) * height * 3;
  if (size != expected)
    throw ArgumentError("RGB array: " + std::to_string(width) + " x " + std::to_string(height) +
                        " x 3 needs " + std::to_string(expected) + " bytes, got " + std::to_string(size));
  if (data == nullptr) throw ArgumentError("RGB array: null data pointer");
  Image image(width, height);
  std::memcpy(image.pixels.data(), data, expected);
  return image;
}

Image image_from_tensor(const at::Tensor& hwc) {
  if (!hwc.defined()) throw ArgumentError("image tensor: undefined tensor");
  if (hwc.scalar_type() != at::kByte || hwc.dim() != 3 || hwc.size(2) != 3)
    throw ArgumentError("image tensor: expected uint8 [H, W, 3] RGB, got " + std::string(hwc.dtype().name()) +
                        " " + c10::str(hwc.sizes()));
  if (hwc.size(0) <= 0 || hwc.size(1) <= 0 || hwc.size(0) > INT_MAX || hwc.size(1) > INT_MAX)
    throw ArgumentError("image tensor: height and width must be in [1, 2^31), got " + c10::str(hwc.sizes()));
  const auto dense = hwc.to(at::kCPU).contiguous();
  return image_from_rgb(dense.data_ptr<uint8_t>(), static_cast<std::size_t>(dense.numel()),
                        static_cast<int>(dense.size(1)), static_cast<int>(dense.size(0)));
}

at::Tensor image_to_tensor(const Image& image) {
  auto tensor = at::empty({image.height, image.width, 3}, at::kByte);
  if (!image.pixels.empty())
    std::memcpy(tensor.data_ptr<uint8_t>(), image.pixels.data(), image.pixels.size());
  return tensor;
}

std::string encode_image(const Image& image, ImageFormat format, int jpeg_quality) {
  if (image.empty()) throw ArgumentError("encode_image: empty image");
  if (image.pixels.size() != static_cast<std::size_t>(image.width) * image.height * 3)
    throw ArgumentError("encode_image: pixel buffer does not hold width x height x 3 bytes");
  std::vector<int> params;
  const char* extension = nullptr;
  if (format == ImageFormat::Png) {
    extension = ".png";
  } else if (format == ImageFormat::Jpeg) {
    if (jpeg_quality < 1 || jpeg_quality > 100)
      throw ArgumentError("encode_image: JPEG quality must be in [1, 100], got " +
                          std::to_string(jpeg_quality));
    extension = ".jpg";
    params = {cv::IMWRITE_JPEG_QUALITY, jpeg_quality};
  } else {
    throw ArgumentError(std::string("encode_image: cannot encode ") + format_name(format) + " (PNG or JPEG)");
  }
  cv::Mat bgr;
  const cv::Mat rgb(image.height, image.width, CV_8UC3, const_cast<uint8_t*>(image.pixels.data()));
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  std::vector<uint8_t> encoded;
  bool ok = false;
  try {
    ok = cv::imencode(extension, bgr, encoded, params);
  } catch (const cv::Exception& e) {
    throw Error(std::string("encode_image: OpenCV failed: ") + e.what());
  }
  if (!ok) throw Error(std::string("encode_image: OpenCV could not encode ") + format_name(format));
  return std::string(encoded.begin(), encoded.end());
}

void save_image(const Image& image, const std::string& path, int jpeg_quality) {
  ImageFormat format;
  if (iequals_suffix(path, ".png")) {
    format = ImageFormat::Png;
  } else if (iequals_suffix(path, ".jpg") || iequals_suffix(path, ".jpeg")) {
    format = ImageFormat::Jpeg;
  } else {
    throw ArgumentError("save_image: " + path + ": unknown extension (use .png, .jpg or .jpeg)");
  }
  const std::string bytes = encode_image(image, format, jpeg_quality);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw Error("save_image: cannot write " + path);
}

ImageSource ImageSource::file(std::string path) {
  ImageSource source;
  source.kind_ = Kind::File;
  source.text_ = std::move(path);
  return source;
}

ImageSource ImageSource::encoded(std::string bytes, std::string name) {
  ImageSource source;
  source.kind_ = Kind::Encoded;
  source.text_ = std::move(name);
  source.bytes_ = std::make_shared<const std::string>(std::move(bytes));
  return source;
}

ImageSource ImageSource::pixels(Image image) {
  if (image.empty()) throw ArgumentError("ImageSource::pixels: empty image");
  ImageSource source;
  source.kind_ = Kind::Pixels;
  source.image_ = std::make_shared<const Image>(std::move(image));
  return source;
}

Image ImageSource::load(const DecodeOptions& options) const {
  switch (kind_) {
    case Kind::File:
      return load_image(text_, options);
    case Kind::Encoded:
      return decode_image(reinterpret_cast<const uint8_t*>(bytes_->data()), bytes_->size(), options, text_);
    case Kind::Pixels:
      break;
  }
  if (!image_) throw ArgumentError("ImageSource: no image (default-constructed source)");
  return *image_;
}

std::string ImageSource::describe() const {
  if (kind_ != Kind::Pixels) return text_;
  if (!image_) return "no image";
  return "RGB array " + std::to_string(image_->width) + "x" + std::to_string(image_->height);
}

std::vector<Image> load_images(const std::vector<ImageSource>& sources, const DecodeOptions& options) {
  std::vector<Image> images;
  images.reserve(sources.size());
  for (const auto& source : sources) images.push_back(source.load(options));
  return images;
}

}  // namespace voken::vision

namespace voken {

Image::Image(int width_, int height_, uint8_t fill) : width(width_), height(height_) {
  if (width_ < 0 || height_ < 0)
    throw ArgumentError("Image: negative size " + std::to_string(width_) + " x " + std::to_string(height_));
  pixels.assign(static_cast<std::size_t>(width_) * height_ * 3, fill);
}

}  // namespace voken
