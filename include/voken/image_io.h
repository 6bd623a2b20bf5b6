// Reading and writing image files with voken::Image, for programs that use only the public API
// (the same decoder and encoder generate_interleaved() uses).
#pragma once

#include <string>

#include "voken/image.h"

namespace voken {

// Decodes a JPEG, PNG, WebP or BMP file to RGB (no EXIF rotation, alpha dropped, as PIL's
// Image.open(path).convert("RGB")). FileNotFoundError when absent, FormatError when not a
// readable image.
Image load_image(const std::string& path);

// PNG (lossless) bytes of an image. ArgumentError for an empty image.
std::string encode_png(const Image& image);

// Writes PNG or JPEG (quality 95), chosen by the extension (.png, .jpg, .jpeg).
// ArgumentError for another extension or an empty image, Error when the file cannot be written.
void save_image(const Image& image, const std::string& path);

}  // namespace voken
