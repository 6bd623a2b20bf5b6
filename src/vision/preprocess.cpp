#include "vision/preprocess.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/cpu.h"
#include "core/parallel.h"
#include "voken/error.h"

#ifdef VOKEN_X86_KERNELS
#include <immintrin.h>
#endif

namespace voken::vision {
namespace {

// ---------------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c, 8 bits per channel), reimplemented.
//
// Each output pixel along an axis is a weighted sum over a window of input pixels. The window
// is centred on the output pixel's centre mapped into the input, and on downscaling both the
// window and the filter are stretched by the scale factor (that is the antialiasing). Weights
// are normalised to sum to one, then converted to fixed point with kPrecisionBits fractional
// bits; sums start at one half and are shifted back and clipped to uint8 after each of the two
// passes (horizontal, then vertical). Everything below that touches a weight or a sum follows
// Pillow's operation order, because one 8-bit level of difference is enough to fail parity.

// 32 bits minus 8 for the result minus 2 of headroom: with bicubic's negative lobes the
// normalised weights' absolute values sum to at most ~1.3, so 255 * 1.3 * 2^22 fits in int32.
constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = int32_t{1} << (kPrecisionBits - 1);

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

// Keys' cubic convolution with a = -0.5, evaluated exactly as Pillow writes it (the constants
// are Pillow's `a + 2.0`, `a + 3.0` folded, which is exact in double).
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

uint8_t clip8(int32_t sum) {
  const int32_t value = sum >> kPrecisionBits;  // arithmetic shift: floor, as in Pillow
  return static_cast<uint8_t>(value < 0 ? 0 : value > 255 ? 255 : value);
}

// The taps of one axis for the output indices [window_start, window_start + window_size) of a
// resize from in_size to out_size (only those outputs are computed: each output pixel's taps
// depend on its own index and the two sizes, never on its neighbours).
struct AxisTaps {
  std::vector<int> first;           // first input index of each output's window
  std::vector<int> count;           // taps in the window
  std::vector<std::size_t> offset;  // where the window's weights start in `weights`
  std::vector<int32_t> weights;     // fixed-point weights, windows back to back
};

AxisTaps compute_taps(int in_size, int out_size, int window_start, int window_size, ResampleFilter filter) {
  AxisTaps taps;
  taps.first.resize(window_size);
  taps.count.resize(window_size);
  taps.offset.resize(window_size);
  if (in_size == out_size) {
    // Pillow skips the pass when the size is unchanged; one tap of weight 1 is the same thing.
    taps.weights.assign(window_size, int32_t{1} << kPrecisionBits);
    for (int i = 0; i < window_size; ++i) {
      taps.first[i] = window_start + i;
      taps.count[i] = 1;
      taps.offset[i] = i;
    }
    return taps;
  }
  double (*const kernel)(double) = filter == ResampleFilter::Bilinear ? bilinear_filter : bicubic_filter;
  const double kernel_support = filter == ResampleFilter::Bilinear ? 1.0 : 2.0;
  // Pillow takes the box as floats: (in1 - in0) is a float subtraction, then the division is
  // in double.
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filter_scale = scale < 1.0 ? 1.0 : scale;
  const double support = kernel_support * filter_scale;
  const double inverse_filter_scale = 1.0 / filter_scale;
  std::vector<double> window;
  for (int i = 0; i < window_size; ++i) {
    const int xx = window_start + i;
    const double center = 0.0f + (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation, then clamped, as Pillow
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    const int n = std::max(0, xmax - xmin);
    window.resize(n);
    double total = 0.0;
    for (int x = 0; x < n; ++x) {
      const double w = kernel((static_cast<double>(x + xmin) - center + 0.5) * inverse_filter_scale);
      window[x] = w;
      total += w;
    }
    taps.first[i] = xmin;
    taps.count[i] = n;
    taps.offset[i] = taps.weights.size();
    for (int x = 0; x < n; ++x) {
      const double k = total != 0.0 ? window[x] / total : window[x];
      const double scaled = k * (1 << kPrecisionBits);
      taps.weights.push_back(static_cast<int32_t>(k < 0 ? -0.5 + scaled : 0.5 + scaled));
    }
  }
  return taps;
}

// What a pass reads: an image pasted at (x, y) onto a width x height canvas of one colour.
// expand2square's padding is described this way instead of being allocated: a tap on the
// padding contributes fill * weight, so those taps are summed up once per output index.
struct Canvas {
  const Image* image = nullptr;
  int width = 0;
  int height = 0;
  int image_x = 0;
  int image_y = 0;
  std::array<uint8_t, 3> fill = {0, 0, 0};
};

// One output index's taps split into those on the image and those on the padding.
struct SplitTaps {
  int image_first = 0;         // first image index (relative to the image) with a tap
  int count = 0;               // taps on the image
  std::size_t offset = 0;      // their first weight in AxisTaps::weights
  int32_t padding_weight = 0;  // sum of the weights of taps on the padding
  int32_t total_weight = 0;    // sum of all weights
};

std::vector<SplitTaps> split_taps(const AxisTaps& taps, int image_start, int image_size) {
  std::vector<SplitTaps> split(taps.first.size());
  for (std::size_t i = 0; i < split.size(); ++i) {
    const int32_t* w = taps.weights.data() + taps.offset[i];
    const int first = taps.first[i];
    const int last = first + taps.count[i];
    const int a = std::max(first, image_start);
    const int b = std::min(last, image_start + image_size);
    int32_t total = 0;
    int32_t on_image = 0;
    for (int t = 0; t < taps.count[i]; ++t) {
      total += w[t];
      if (first + t >= a && first + t < b) on_image += w[t];
    }
    SplitTaps& s = split[i];
    s.total_weight = total;
    s.padding_weight = total - on_image;
    if (a < b) {
      s.image_first = a - image_start;
      s.count = b - a;
      s.offset = taps.offset[i] + (a - first);
    }
  }
  return split;
}

// The two hot loops. Integer arithmetic gives the same bits on every instruction set, so they
// may use AVX2 when the CPU has it (8 lanes of 32-bit multiplies; the x86-64 baseline has no
// 32-bit vector multiply) without affecting results: the horizontal one through intrinsics
// chosen at run time, the vertical one through GCC's function multiversioning.
#if defined(VOKEN_X86_KERNELS) && !defined(__clang__)
#define VOKEN_HOT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define VOKEN_HOT_LOOP
#endif

// The horizontal pass works on interleaved RGB rows two taps at a time: 8 bytes read at a
// pixel's offset are R G B of it and of the next pixel plus 2 bytes of the one after, and the
// matching 8 weights are w0 w0 w0 w1 w1 w1 0 0. Lanes c and 3 + c then sum to channel c.
constexpr int kPairLanes = 8;

// For output columns [active_lo, active_hi): weights in pairs, and where each column's start.
struct PairedTaps {
  std::vector<int32_t> lanes;      // kPairLanes per pair
  std::vector<std::size_t> start;  // first lane of each column, relative to active_lo
  std::vector<int> pairs;          // pairs per column
};

PairedTaps pair_taps(const AxisTaps& taps, const std::vector<SplitTaps>& columns, int active_lo,
                     int active_hi) {
  PairedTaps paired;
  for (int j = active_lo; j < active_hi; ++j) {
    const SplitTaps& t = columns[j];
    const int32_t* w = taps.weights.data() + t.offset;
    const int pairs = (t.count + 1) / 2;
    paired.start.push_back(paired.lanes.size());
    paired.pairs.push_back(pairs);
    for (int k = 0; k < pairs; ++k) {
      const int32_t w0 = w[2 * k];
      const int32_t w1 = 2 * k + 1 < t.count ? w[2 * k + 1] : 0;
      paired.lanes.insert(paired.lanes.end(), {w0, w0, w0, w1, w1, w1, 0, 0});
    }
  }
  return paired;
}

// One image row (`row` points at its pixel 0; at least 5 readable bytes must follow the last
// pixel a tap uses) to out[(j - active_lo) * 3 + c]. bias[j * 3 + c] holds the rounding half
// plus the padding taps. The portable version; the AVX2 one below gives the same integers.
void horizontal_row_portable(const uint8_t* row, const SplitTaps* columns, int active_lo, int active_hi,
                             const PairedTaps& paired, const int32_t* bias, uint8_t* out) {
  for (int j = active_lo; j < active_hi; ++j) {
    const int index = j - active_lo;
    const uint8_t* pixels = row + static_cast<std::size_t>(columns[j].image_first) * 3;
    const int32_t* w = paired.lanes.data() + paired.start[index];
    int32_t acc[kPairLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < paired.pairs[index]; ++k, pixels += 6, w += kPairLanes)
      for (int l = 0; l < kPairLanes; ++l) acc[l] += pixels[l] * w[l];
    for (int c = 0; c < 3; ++c) out[index * 3 + c] = clip8(bias[j * 3 + c] + acc[c] + acc[3 + c]);
  }
}

#ifdef VOKEN_X86_KERNELS
// Each pair is one 8-byte load widened to eight int32 lanes, one 32-bit multiply, one add.
VOKEN_TARGET_AVX2 void horizontal_row_avx2(const uint8_t* row, const SplitTaps* columns, int active_lo,
                                           int active_hi, const PairedTaps& paired, const int32_t* bias,
                                           uint8_t* out) {
  for (int j = active_lo; j < active_hi; ++j) {
    const int index = j - active_lo;
    const uint8_t* pixels = row + static_cast<std::size_t>(columns[j].image_first) * 3;
    const int32_t* w = paired.lanes.data() + paired.start[index];
    __m256i sum = _mm256_setzero_si256();
    for (int k = 0; k < paired.pairs[index]; ++k, pixels += 6, w += kPairLanes) {
      const __m256i values = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pixels)));
      const __m256i weights = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(values, weights));
    }
    alignas(32) int32_t acc[kPairLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(acc), sum);
    for (int c = 0; c < 3; ++c) out[index * 3 + c] = clip8(bias[j * 3 + c] + acc[c] + acc[3 + c]);
  }
}
#endif

// VOKEN_DISABLE_AVX2=1 (or a tier below avx2, core/cpu.h) forces the portable kernel (the tests
// run both).
bool cpu_has_avx2() {
#ifdef VOKEN_X86_KERNELS
  const char* disable = std::getenv("VOKEN_DISABLE_AVX2");
  if (disable != nullptr && *disable != '\0' && std::strcmp(disable, "0") != 0) return false;
  return core::cpu_tier() >= core::CpuTier::avx2;
#else
  return false;
#endif
}

// acc[j] += row[j] * weight for j < count.
VOKEN_HOT_LOOP void accumulate_row(int32_t* acc, const uint8_t* row, int32_t weight, int count) {
  for (int j = 0; j < count; ++j) acc[j] += row[j] * weight;
}

struct Window {
  int x = 0;
  int y = 0;
  int width = 0;
  int height = 0;
};

// Pillow's two-pass resize of the canvas to out_width x out_height, producing only `window`.
Image resample(const Canvas& canvas, int out_width, int out_height, const Window& window,
               ResampleFilter filter) {
  const Image& image = *canvas.image;
  const AxisTaps horizontal = compute_taps(canvas.width, out_width, window.x, window.width, filter);
  const AxisTaps vertical = compute_taps(canvas.height, out_height, window.y, window.height, filter);
  const auto columns = split_taps(horizontal, canvas.image_x, image.width);
  const auto rows = split_taps(vertical, canvas.image_y, image.height);
  const int out_w = window.width;

  // Image rows the vertical pass reads, and the output columns with taps on the image
  // ("active"); inactive columns see only the fill colour in every row.
  int row_lo = image.height, row_hi = 0, active_lo = out_w, active_hi = 0;
  for (const auto& r : rows)
    if (r.count > 0)
      row_lo = std::min(row_lo, r.image_first), row_hi = std::max(row_hi, r.image_first + r.count);
  for (int j = 0; j < out_w; ++j) {
    const SplitTaps& c = columns[j];
    if (c.count == 0) continue;
    active_lo = std::min(active_lo, j), active_hi = std::max(active_hi, j + 1);
  }
  const int band_rows = std::max(0, row_hi - row_lo);
  const int active = std::max(0, active_hi - active_lo);

  // Horizontal pass over the image rows in the band and the active columns; `band` holds the
  // results as interleaved rows of `active` pixels. A row of fill gives `fill_row`.
  std::vector<uint8_t> fill_row(3 * static_cast<std::size_t>(out_w));
  std::vector<int32_t> fill_bias(3 * static_cast<std::size_t>(out_w));
  for (int j = 0; j < out_w; ++j)
    for (int c = 0; c < 3; ++c) {
      fill_row[j * 3 + c] = clip8(kHalf + canvas.fill[c] * columns[j].total_weight);
      fill_bias[j * 3 + c] = kHalf + canvas.fill[c] * columns[j].padding_weight;
    }
  const std::size_t band_row_bytes = static_cast<std::size_t>(active) * 3;
  std::vector<uint8_t> band(band_row_bytes * band_rows);
  if (active > 0) {
    const PairedTaps paired = pair_taps(horizontal, columns, active_lo, active_hi);
    // A pair may read up to 5 bytes past a row's last pixel: rows too close to the end of the
    // pixel buffer are read from a zero-padded copy.
    std::vector<uint8_t> padded_row(image.row_bytes() + kPairLanes, 0);
    const bool use_avx2 = cpu_has_avx2();
    for (int r = 0; r < band_rows; ++r) {
      const int y = row_lo + r;
      const uint8_t* row = image.row(y);
      if (static_cast<std::size_t>(image.height - 1 - y) * image.row_bytes() < kPairLanes) {
        std::memcpy(padded_row.data(), row, image.row_bytes());
        row = padded_row.data();
      }
      uint8_t* out = band.data() + r * band_row_bytes;
#ifdef VOKEN_X86_KERNELS
      if (use_avx2) {
        horizontal_row_avx2(row, columns.data(), active_lo, active_hi, paired, fill_bias.data(), out);
        continue;
      }
#endif
      horizontal_row_portable(row, columns.data(), active_lo, active_hi, paired, fill_bias.data(), out);
    }
  }

  // Vertical pass: accumulate whole interleaved rows. Canvas rows outside the image contribute
  // fill_row times their summed weight; inactive columns are fill in every row.
  Image result(out_w, window.height);
  std::vector<int32_t> sums(3 * static_cast<std::size_t>(out_w));
  for (int i = 0; i < window.height; ++i) {
    const SplitTaps& t = rows[i];
    for (int j = 0; j < out_w; ++j) {
      const int32_t fill_weight = j >= active_lo && j < active_hi ? t.padding_weight : t.total_weight;
      for (int c = 0; c < 3; ++c) sums[j * 3 + c] = kHalf + fill_row[j * 3 + c] * fill_weight;
    }
    for (int k = 0; k < t.count && active > 0; ++k)
      accumulate_row(sums.data() + active_lo * 3,
                     band.data() + static_cast<std::size_t>(t.image_first + k - row_lo) * band_row_bytes,
                     vertical.weights[t.offset + k], static_cast<int>(band_row_bytes));
    uint8_t* dst = result.row(i);
    for (std::size_t v = 0; v < sums.size(); ++v) dst[v] = clip8(sums[v]);
  }
  return result;
}

void require_image(const Image& image, const char* what) {
  if (image.empty()) throw ArgumentError(std::string(what) + ": empty image");
  if (image.pixels.size() != static_cast<std::size_t>(image.width) * image.height * 3)
    throw ArgumentError(std::string(what) + ": pixel buffer holds " + std::to_string(image.pixels.size()) +
                        " bytes, " + std::to_string(image.width) + " x " + std::to_string(image.height) +
                        " x 3 needs " +
                        std::to_string(static_cast<std::size_t>(image.width) * image.height * 3));
}

// Python's round(d / 2.0) for an integer d >= 0: halves go to the even neighbour.
int half_round_even(int difference) {
  const int q = difference / 2;
  return (difference % 2 == 1 && q % 2 == 1) ? q + 1 : q;
}

Canvas plain_canvas(const Image& image) {
  Canvas canvas;
  canvas.image = &image;
  canvas.width = image.width;
  canvas.height = image.height;
  return canvas;
}

// expand2square as a canvas: the shorter side padded, offset (difference) // 2.
Canvas square_canvas(const Image& image, const std::array<uint8_t, 3>& fill) {
  Canvas canvas = plain_canvas(image);
  const int side = std::max(image.width, image.height);
  canvas.width = canvas.height = side;
  canvas.image_x = (side - image.width) / 2;
  canvas.image_y = (side - image.height) / 2;
  canvas.fill = fill;
  return canvas;
}

// Resize(size) (short side) then CenterCrop(size) of the canvas, as one windowed resample.
Image resize_short_side_and_crop(const Canvas& canvas, int size, ResampleFilter filter) {
  const auto [resized_w, resized_h] = resize_short_side(canvas.width, canvas.height, size);
  Window window;
  window.x = half_round_even(resized_w - size);
  window.y = half_round_even(resized_h - size);
  window.width = window.height = size;
  return resample(canvas, resized_w, resized_h, window, filter);
}

std::array<float, 3> read_triple(const io::JsonView& json, const std::string& key,
                                 std::array<float, 3> fallback) {
  if (!json.has(key)) return fallback;
  const io::Json& value = json.json().at(key);
  if (!value.is_array() || value.size() != 3 ||
      !std::all_of(value.begin(), value.end(), [](const io::Json& v) { return v.is_number(); }))
    throw ConfigError(json.source() + ": field '" + key + "' must be a list of 3 numbers, got " +
                      value.dump());
  return {value[0].get<float>(), value[1].get<float>(), value[2].get<float>()};
}

}  // namespace

const char* transform_name(TransformKind kind) {
  switch (kind) {
    case TransformKind::Blip2Eval:
      return "blip2_eval";
    case TransformKind::Playground:
      return "playground";
    case TransformKind::TrainEval:
      return "train_eval";
  }
  return "?";
}

PreprocessConfig PreprocessConfig::from_json(const io::JsonView& json) {
  PreprocessConfig config;
  config.image_size = json.get_or<int>("image_size", config.image_size);
  if (config.image_size <= 0)
    throw ConfigError(json.source() + ": field 'image_size' must be positive, got " +
                      std::to_string(config.image_size));
  config.mean = read_triple(json, "mean", config.mean);
  config.std = read_triple(json, "std", config.std);
  for (float s : config.std)
    if (!(s > 0.0f) || !std::isfinite(s))
      throw ConfigError(json.source() + ": field 'std' must hold positive finite numbers");
  for (float m : config.mean)
    if (!std::isfinite(m)) throw ConfigError(json.source() + ": field 'mean' must hold finite numbers");
  if (json.has("name") && json.has("transform"))
    throw ConfigError(json.source() + ": give either 'name' or 'transform', not both");
  if (json.has("name")) {
    const auto name = json.get<std::string>("name");
    if (name != "blip2_image_eval")
      throw ConfigError(json.source() + ": field 'name' is '" + name +
                        "'; the only LAVIS processor supported is 'blip2_image_eval'");
    config.kind = TransformKind::Blip2Eval;
  } else if (json.has("transform")) {
    const auto name = json.get<std::string>("transform");
    bool found = false;
    for (auto kind : {TransformKind::Blip2Eval, TransformKind::Playground, TransformKind::TrainEval})
      if (name == transform_name(kind)) config.kind = kind, found = true;
    if (!found)
      throw ConfigError(json.source() + ": field 'transform' is '" + name +
                        "', expected 'blip2_eval', 'playground' or 'train_eval'");
  }
  if (json.has("fill")) {
    const io::Json& value = json.json().at("fill");
    const bool ok = value.is_array() && value.size() == 3 &&
                    std::all_of(value.begin(), value.end(), [](const io::Json& v) {
                      return v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= 255;
                    });
    if (!ok)
      throw ConfigError(json.source() + ": field 'fill' must be a list of 3 integers in [0, 255], got " +
                        value.dump());
    for (int c = 0; c < 3; ++c) config.fill[c] = static_cast<uint8_t>(value[c].get<int>());
  }
  return config;
}

void PreprocessConfig::validate() const {
  if (image_size <= 0)
    throw ArgumentError("PreprocessConfig: image_size must be positive, got " + std::to_string(image_size));
  for (int c = 0; c < 3; ++c) {
    if (!(std[c] > 0.0f) || !std::isfinite(std[c]))
      throw ArgumentError("PreprocessConfig: std[" + std::to_string(c) + "] must be positive and finite");
    if (!std::isfinite(mean[c]))
      throw ArgumentError("PreprocessConfig: mean[" + std::to_string(c) + "] must be finite");
  }
}

Image resize(const Image& image, int width, int height, ResampleFilter filter) {
  require_image(image, "resize");
  if (width <= 0 || height <= 0)
    throw ArgumentError("resize: target size must be positive, got " + std::to_string(width) + " x " +
                        std::to_string(height));
  Window window;
  window.width = width;
  window.height = height;
  return resample(plain_canvas(image), width, height, window, filter);
}

Image expand_to_square(const Image& image, const std::array<uint8_t, 3>& fill) {
  require_image(image, "expand_to_square");
  if (image.width == image.height) return image;
  const Canvas canvas = square_canvas(image, fill);
  Image square(canvas.width, canvas.height);
  for (std::size_t i = 0; i < square.pixels.size(); i += 3) std::memcpy(&square.pixels[i], fill.data(), 3);
  for (int y = 0; y < image.height; ++y)
    std::memcpy(square.row(canvas.image_y + y) + static_cast<std::size_t>(canvas.image_x) * 3, image.row(y),
                image.row_bytes());
  return square;
}

Image center_crop(const Image& image, int width, int height) {
  require_image(image, "center_crop");
  if (width <= 0 || height <= 0 || width > image.width || height > image.height)
    throw ArgumentError("center_crop: crop " + std::to_string(width) + " x " + std::to_string(height) +
                        " does not fit in the image " + std::to_string(image.width) + " x " +
                        std::to_string(image.height));
  const int left = half_round_even(image.width - width);
  const int top = half_round_even(image.height - height);
  Image crop(width, height);
  for (int y = 0; y < height; ++y)
    std::memcpy(crop.row(y), image.row(top + y) + static_cast<std::size_t>(left) * 3, crop.row_bytes());
  return crop;
}

std::pair<int, int> resize_short_side(int width, int height, int size) {
  if (width <= 0 || height <= 0 || size <= 0)
    throw ArgumentError("resize_short_side: sizes must be positive, got " + std::to_string(width) + " x " +
                        std::to_string(height) + " to " + std::to_string(size));
  const bool wide = width > height;
  const int short_side = wide ? height : width;
  const int long_side = wide ? width : height;
  // Python: int(size * long / short), the product exact in integers, the quotient a double.
  const double scaled = static_cast<double>(int64_t{size} * long_side) / short_side;
  if (scaled >= 2147483648.0)
    throw ArgumentError("resize_short_side: " + std::to_string(width) + " x " + std::to_string(height) +
                        " resized to short side " + std::to_string(size) + " has a long side beyond 2^31");
  const int new_long = static_cast<int>(scaled);
  return wide ? std::make_pair(new_long, size) : std::make_pair(size, new_long);
}

Image transform_pixels(const Image& image, const PreprocessConfig& config) {
  require_image(image, "preprocess");
  config.validate();
  const int size = config.image_size;
  switch (config.kind) {
    case TransformKind::Blip2Eval: {
      Window window;
      window.width = window.height = size;
      return resample(plain_canvas(image), size, size, window, ResampleFilter::Bicubic);
    }
    case TransformKind::Playground:
      return resize_short_side_and_crop(square_canvas(image, config.fill), size, ResampleFilter::Bilinear);
    case TransformKind::TrainEval:
      return resize_short_side_and_crop(plain_canvas(image), size, ResampleFilter::Bilinear);
  }
  throw ArgumentError("preprocess: unknown transform kind");
}

namespace {

// ToTensor + Normalize into `out` (float32 [3, H, W] contiguous): torchvision computes
// (u8 / 255.f - mean) / std in float32, so a per-channel table of the 256 results is exact.
void write_normalized(const Image& image, const PreprocessConfig& config, float* out) {
  float table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v)
      table[c][v] = (static_cast<float>(v) / 255.0f - config.mean[c]) / config.std[c];
  const std::size_t plane = static_cast<std::size_t>(image.width) * image.height;
  const uint8_t* src = image.pixels.data();
  for (std::size_t p = 0; p < plane; ++p)
    for (int c = 0; c < 3; ++c) out[c * plane + p] = table[c][src[p * 3 + c]];
}

}  // namespace

at::Tensor normalize_to_tensor(const Image& image, const PreprocessConfig& config) {
  c10::InferenceMode guard;
  require_image(image, "normalize_to_tensor");
  config.validate();
  auto tensor = at::empty({3, image.height, image.width}, at::kFloat);
  write_normalized(image, config, tensor.data_ptr<float>());
  return tensor;
}

at::Tensor preprocess(const Image& image, const PreprocessConfig& config) {
  c10::InferenceMode guard;
  return normalize_to_tensor(transform_pixels(image, config), config);
}

at::Tensor preprocess_batch(const std::vector<Image>& images, const PreprocessConfig& config) {
  c10::InferenceMode guard;
  if (images.empty()) throw ArgumentError("preprocess_batch: no images");
  config.validate();
  for (std::size_t i = 0; i < images.size(); ++i)
    require_image(images[i], ("preprocess_batch: image " + std::to_string(i)).c_str());
  const int64_t size = config.image_size;
  auto batch = at::empty({static_cast<int64_t>(images.size()), 3, size, size}, at::kFloat);
  float* out = batch.data_ptr<float>();
  core::parallel_items(static_cast<int64_t>(images.size()), [&](int64_t i) {
    write_normalized(transform_pixels(images[i], config), config, out + i * 3 * size * size);
  });
  return batch;
}

}  // namespace voken::vision
