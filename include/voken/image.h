// The image type of voken's public API: 8-bit RGB pixels, what generate_interleaved() takes in
// and gives back. (Decoding, resampling and encoding live in the library; this is just data.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace voken {

// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC): pixel (x, y) channel c is
// pixels[(y * width + x) * 3 + c].
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;

  Image() = default;
  // Allocates width x height pixels, all set to `fill`.
  Image(int width, int height, uint8_t fill = 0);

  bool empty() const { return width == 0 || height == 0; }
  std::size_t row_bytes() const { return static_cast<std::size_t>(width) * 3; }
  uint8_t* row(int y) { return pixels.data() + static_cast<std::size_t>(y) * row_bytes(); }
  const uint8_t* row(int y) const { return pixels.data() + static_cast<std::size_t>(y) * row_bytes(); }
};

}  // namespace voken
