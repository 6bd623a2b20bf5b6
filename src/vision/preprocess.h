// Image preprocessing for the EVA ViT / Q-Former encoder, bit-exact with the upstream PIL +
// torchvision transforms (Pillow 9.4, torchvision 0.14):
//
//   Blip2Eval   Resize((S, S), BICUBIC) -> ToTensor -> Normalize
//               (LAVIS/MiniGPT-4 "blip2_image_eval", the MiniGPT-4 demo path)
//   Playground  expand2square(fill) -> Resize(S, BILINEAR) -> CenterCrop(S) -> ToTensor -> Normalize
//               (MiniGPT-5 examples/playground.py)
//   TrainEval   Resize(S, BILINEAR) -> CenterCrop(S) -> ToTensor -> Normalize
//               (MiniGPT-5 train_eval.py inference transform, no expand2square)
//
// Resampling reimplements Pillow's Resample.c instead of calling OpenCV: Pillow widens the
// filter by the downscale factor (antialiasing) and works in 22-bit fixed point with rounding
// to uint8 after each separable pass, and cv::resize does neither (88 8-bit levels off on the
// golden set). The uint8 results are identical to Pillow's; the normalized floats match
// torchvision's float32 arithmetic.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

#include "io/json_file.h"
#include "vision/image.h"

namespace voken::vision {

// Pillow's resampling filters (only the two the upstream transforms use).
enum class ResampleFilter { Bilinear, Bicubic };

enum class TransformKind { Blip2Eval, Playground, TrainEval };
const char* transform_name(TransformKind kind);  // "blip2_eval", "playground", "train_eval"

struct PreprocessConfig {
  int image_size = 224;
  // OpenAI CLIP statistics, the default of LAVIS's BlipImageBaseProcessor.
  std::array<float, 3> mean = {0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> std = {0.26862954f, 0.26130258f, 0.27577711f};
  TransformKind kind = TransformKind::Blip2Eval;
  // Background of expand2square (Playground only); MiniGPT-5 uses white.
  std::array<uint8_t, 3> fill = {255, 255, 255};

  // Fields as in the LAVIS processor config: "image_size", "mean", "std" (3 numbers each), and
  // the transform as "name" (LAVIS registry name "blip2_image_eval") or "transform"
  // ("blip2_eval" | "playground" | "train_eval"); optional "fill" (3 integers 0-255).
  // ConfigError naming the source and field for anything invalid.
  static PreprocessConfig from_json(const io::JsonView& json);
  // ArgumentError if image_size is not positive or a std is not positive and finite.
  void validate() const;
};

// Pillow's Image.resize(size, filter) on an RGB image (box = whole image, no reducing_gap).
Image resize(const Image& image, int width, int height, ResampleFilter filter);
// MiniGPT-5's expand2square: pads the shorter side to a square with `fill`, image centred with
// offset (difference) // 2; a square image is returned unchanged.
Image expand_to_square(const Image& image, const std::array<uint8_t, 3>& fill);
// torchvision's CenterCrop on an image at least as large as the crop: offsets
// int(round((size - crop) / 2.0)) with Python's round-half-to-even.
Image center_crop(const Image& image, int width, int height);
// torchvision 0.14 Resize(int) output (width, height): the short side becomes `size`, the long
// side int(size * long / short) (truncated, computed in double as Python does).
std::pair<int, int> resize_short_side(int width, int height, int size);

// The transform's uint8 RGB result of image_size x image_size pixels, before ToTensor. The
// padding of expand2square and the discarded margins of CenterCrop are never materialised, so
// the cost stays proportional to the input even for extreme aspect ratios.
Image transform_pixels(const Image& image, const PreprocessConfig& config);
// ToTensor + Normalize: float32 [3, H, W], ((u8 / 255) - mean) / std per channel.
at::Tensor normalize_to_tensor(const Image& image, const PreprocessConfig& config);
// The whole transform: float32 [3, S, S].
at::Tensor preprocess(const Image& image, const PreprocessConfig& config);
// A batch: float32 [B, 3, S, S] (B >= 1), images processed in parallel on the ATen pool.
at::Tensor preprocess_batch(const std::vector<Image>& images, const PreprocessConfig& config);

}  // namespace voken::vision
