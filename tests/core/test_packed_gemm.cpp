// The packed bfloat16 GEMM (core/packed_gemm.h) at every CPU tier this machine can run: linear
// layers, GEGLU projections, 1x1 / 3x3 stride-1 convolutions (with fused 2x upsampling and
// residuals) and stride-2 3x3 convolutions, against float64 references computed by ATen on the
// same bfloat16 inputs.
//
// Tolerance (derived): the inputs are bfloat16, so every product is exact in float32; the kernels
// sum K products, the bias and the residual in float32 (in any order), which errs by at most
// (K + 2) * 2^-24 * S, S = |x| |W|^T + |bias| + |residual| (the sum of the magnitudes of the
// terms); the output is then rounded once to bfloat16, which adds at most 2^-8 |ref|. A GEGLU
// output v * gelu(g) propagates the sums' errors through the product (|gelu(g)| dv + 1.13 |v| dg:
// GELU's slope is at most 1.13) plus the kernel's GELU error (1.2e-7 relative) and the rounding.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "core/cpu.h"
#include "core/packed_gemm.h"
#include "voken/error.h"

namespace voken::core {
namespace {

// The tiers at which the packed kernels run here (avx2 and above).
std::vector<CpuTier> packed_tiers() {
  std::vector<CpuTier> tiers;
  for (const CpuTier tier : runnable_tiers())
    if (packed_gemm_supported(32, 32, 1, tier)) tiers.push_back(tier);
  return tiers;
}

class PackedGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    tiers_ = packed_tiers();
    if (tiers_.empty()) GTEST_SKIP() << "no packed kernel for this CPU (needs AVX2)";
  }
  std::vector<CpuTier> tiers_;
  at::Generator generator_ = at::make_generator<at::CPUGeneratorImpl>(21);

  at::Tensor bf16(std::vector<int64_t> sizes, double scale = 1.0) {
    return (at::randn(sizes, generator_, at::TensorOptions().dtype(at::kFloat)) * scale).to(at::kBFloat16);
  }
};

at::Tensor f64(const at::Tensor& t) { return t.defined() ? t.to(at::kDouble) : t; }

// |got - ref| <= (k + 2) 2^-24 magnitude + 2^-8 |ref|, elementwise; reports the worst ratio.
void expect_within(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& magnitude, int64_t k,
                   const std::string& what) {
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  ASSERT_EQ(got.scalar_type(), at::kBFloat16) << what;
  const at::Tensor bound = magnitude * (static_cast<double>(k + 2) * std::ldexp(1.0, -24)) +
                           ref.abs() * std::ldexp(1.0, -8) + 1e-30;
  const double ratio = ((f64(got) - ref).abs() / bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

// Reference and magnitude of x W^T + b (+ residual).
void expect_linear(const at::Tensor& got, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                   const at::Tensor& residual, const std::string& what) {
  at::Tensor ref = at::linear(f64(x), f64(w), f64(b));
  at::Tensor magnitude = at::linear(f64(x).abs(), f64(w).abs(), b.defined() ? f64(b).abs() : at::Tensor());
  if (residual.defined()) {
    ref = ref + f64(residual);
    magnitude = magnitude + f64(residual).abs();
  }
  expect_within(got, ref, magnitude, w.size(1), what);
}

std::string tier_text(CpuTier tier) { return std::string("tier ") + tier_name(tier); }

TEST_F(PackedGemm, SupportedShapesAndPackingRoundTrip) {
  EXPECT_FALSE(packed_gemm_supported(64, 64, 3, CpuTier::generic));
  if (cpu_tier() < CpuTier::amx) {
    EXPECT_FALSE(packed_gemm_supported(64, 64, 3, static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)));
    EXPECT_THROW(pack_gemm_weight(at::zeros({64, 64}), at::Tensor(),
                                  static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)),
                 ArgumentError);
  }
  EXPECT_THROW(pack_gemm_weight(at::zeros({64, 64}), at::Tensor(), CpuTier::generic), ArgumentError);
  for (const CpuTier tier : tiers_) {
    SCOPED_TRACE(tier_text(tier));
    EXPECT_TRUE(packed_gemm_supported(64, 96, 1, tier));
    EXPECT_TRUE(packed_gemm_supported(32, 32, 3, tier));
    EXPECT_FALSE(packed_gemm_supported(48, 64, 1, tier));  // N not a multiple of 32
    EXPECT_FALSE(packed_gemm_supported(64, 4, 3, tier));   // conv_in's 4 channels
    EXPECT_FALSE(packed_gemm_supported(64, 64, 5, tier));
    EXPECT_THROW(pack_gemm_weight(at::zeros({48, 64}), at::Tensor(), tier), ArgumentError);
    EXPECT_THROW(pack_gemm_weight(at::zeros({64, 64}), at::zeros({3}), tier), ArgumentError);
    EXPECT_THROW(pack_gemm_weight(at::zeros({64}), at::Tensor(), tier), ArgumentError);
    const at::Tensor linear = bf16({96, 64});
    const auto packed = pack_gemm_weight(linear, at::Tensor(), tier);
    EXPECT_EQ(packed->tier, tier);
    EXPECT_TRUE(test::bit_equal(unpack_gemm_weight(*packed), linear));
    // Convolution kernels in either memory order pack as [N, (ky, kx, c)].
    const at::Tensor conv = bf16({64, 32, 3, 3});
    const at::Tensor as_matrix = conv.permute({0, 2, 3, 1}).reshape({64, -1});
    EXPECT_TRUE(test::bit_equal(unpack_gemm_weight(*pack_gemm_weight(conv, at::Tensor(), tier)), as_matrix));
    EXPECT_TRUE(test::bit_equal(unpack_gemm_weight(*pack_gemm_weight(
                                    conv.contiguous(at::MemoryFormat::ChannelsLast), at::Tensor(), tier)),
                                as_matrix));
  }
}

TEST_F(PackedGemm, LinearMatchesFloat64ForAnyRowCountStrideAndResidual) {
  // Row counts around every tier's row tiles (6, 12, 16) and 32-row pairs, depths of 1-3 steps and
  // 20 steps (K chunks: 2 x 10 at the bf16 tiers, 3 x 7 at the FMA tiers), widths of 1-3 blocks
  // and 40 blocks (several tasks).
  for (const CpuTier tier : tiers_) {
    for (const auto& [k, n] :
         std::vector<std::pair<int64_t, int64_t>>{{32, 32}, {96, 64}, {640, 96}, {64, 1280}}) {
      const at::Tensor w = bf16({n, k}, 1.0 / std::sqrt(static_cast<double>(k)));
      const at::Tensor b = bf16({n});
      const auto packed = pack_gemm_weight(w, b, tier);
      for (const int64_t m : {1, 5, 6, 7, 12, 13, 16, 17, 33, 100}) {
        const std::string what = tier_text(tier) + " m " + std::to_string(m) + " k " + std::to_string(k) +
                                 " n " + std::to_string(n);
        const at::Tensor x = bf16({m, k});
        expect_linear(packed_linear(x, *packed), x, w, b, at::Tensor(), what);
        // Rows with a stride (a view into a wider tensor, like q of a fused qkv product).
        const at::Tensor strided = bf16({m, k + 64}).narrow(1, 32, k);
        expect_linear(packed_linear(strided, *packed), strided, w, b, at::Tensor(), what + " strided");
        // + residual, with one rounding; and in place into an accumulator (the residual aliasing
        // the output) with the same result.
        const at::Tensor residual = bf16({m, n});
        const at::Tensor with_residual = packed_linear(x, *packed, residual);
        expect_linear(with_residual, x, w, b, residual, what + " residual");
        at::Tensor accumulator = residual.clone();
        packed_linear_into(x, *packed, accumulator);
        EXPECT_TRUE(test::bit_equal(accumulator, with_residual)) << what;
      }
    }
    // Leading dimensions are kept; no bias; an empty input.
    const at::Tensor w = bf16({64, 32});
    const auto packed = pack_gemm_weight(w, at::Tensor(), tier);
    const at::Tensor x = bf16({2, 3, 5, 32});
    const at::Tensor y = packed_linear(x, *packed);
    EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 5, 64}));
    expect_linear(y.reshape({-1, 64}), x.reshape({-1, 32}), w, at::Tensor(), at::Tensor(), tier_text(tier));
    EXPECT_EQ(packed_linear(bf16({0, 32}), *packed).sizes(), (std::vector<int64_t>{0, 64}));
  }
}

TEST_F(PackedGemm, GegluProjectionMatchesFloat64) {
  for (const CpuTier tier : tiers_) {
    for (const auto& [k, inner] : std::vector<std::pair<int64_t, int64_t>>{{32, 16}, {64, 48}, {640, 128}}) {
      const std::string what =
          tier_text(tier) + " k " + std::to_string(k) + " inner " + std::to_string(inner);
      const at::Tensor w = bf16({2 * inner, k}, 1.0 / std::sqrt(static_cast<double>(k)));
      const at::Tensor b = bf16({2 * inner});
      const at::Tensor x = bf16({2, 37, k});
      const at::Tensor projected = at::linear(f64(x), f64(w), f64(b));
      const at::Tensor magnitude = at::linear(f64(x).abs(), f64(w).abs(), f64(b).abs());
      const at::Tensor value = projected.narrow(-1, 0, inner), gate = projected.narrow(-1, inner, inner);
      const at::Tensor ref = value * at::gelu(gate);
      const double sums = static_cast<double>(k + 1) * std::ldexp(1.0, -24);
      const at::Tensor bound = at::gelu(gate).abs() * magnitude.narrow(-1, 0, inner) * sums +
                               value.abs() * magnitude.narrow(-1, inner, inner) * (1.13 * sums) +
                               ref.abs() * (std::ldexp(1.0, -8) + 2e-7) + 1e-30;
      const auto packed = pack_geglu_weight(w, b, tier);
      EXPECT_TRUE(packed->geglu);
      EXPECT_EQ(packed->output_width(), inner);
      const at::Tensor y = packed_linear(x, *packed);
      ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 37, inner})) << what;
      EXPECT_LE(((f64(y) - ref).abs() / bound).max().item<double>(), 1.0) << what;
      EXPECT_THROW(packed_linear(x, *packed, y), ArgumentError);
      at::Tensor accumulator = y.clone();
      EXPECT_THROW(packed_linear_into(x, *packed, accumulator), ArgumentError);
    }
    EXPECT_THROW(pack_geglu_weight(at::zeros({40, 32}), at::Tensor(), tier), ArgumentError);
  }
}

TEST_F(PackedGemm, ConvolutionsMatchFloat64InBothLayouts) {
  struct Case {
    int64_t batch, cin, cout, height, width, kernel;
  };
  // Image sizes whose padded rows do and do not fill whole tiles of every tier; widths of 8 and 16
  // (the AVX-512 tiers' 8-row tiles aligned to output rows, one or two per row); an odd tile count
  // per image; 96 channels for K chunks that end inside a tap (27 steps: 2 x 14/13 at the bf16
  // tiers, 4 x 7/6 at the FMA tiers); a 1x1 convolution.
  for (const CpuTier tier : tiers_) {
    for (const Case& c : {Case{1, 32, 32, 1, 1, 3}, Case{2, 32, 64, 3, 5, 3}, Case{2, 64, 32, 6, 10, 3},
                          Case{2, 96, 96, 8, 8, 3}, Case{3, 32, 32, 9, 7, 3}, Case{1, 64, 32, 5, 16, 3},
                          Case{2, 64, 96, 6, 10, 1}}) {
      const std::string what = tier_text(tier) + " " + std::to_string(c.cin) + "->" + std::to_string(c.cout) +
                               " " + std::to_string(c.height) + "x" + std::to_string(c.width) + " k" +
                               std::to_string(c.kernel);
      const at::Tensor w = bf16({c.cout, c.cin, c.kernel, c.kernel}, 1.0 / std::sqrt(c.cin * 9.0));
      const at::Tensor b = bf16({c.cout});
      const auto packed = pack_gemm_weight(w, b, tier);
      const at::Tensor x = bf16({c.batch, c.cin, c.height, c.width});
      const int64_t pad = (c.kernel - 1) / 2, k = c.cin * c.kernel * c.kernel;
      const at::Tensor ref = at::conv2d(f64(x), f64(w), f64(b), 1, pad);
      const at::Tensor magnitude = at::conv2d(f64(x).abs(), f64(w).abs(), f64(b).abs(), 1, pad);
      const at::Tensor residual = bf16({c.batch, c.cout, c.height, c.width});
      const at::Tensor up = at::upsample_nearest2d(f64(x), {2 * c.height, 2 * c.width});
      const at::Tensor ref_up = at::conv2d(up, f64(w), f64(b), 1, pad);
      const at::Tensor magnitude_up = at::conv2d(up.abs(), f64(w).abs(), f64(b).abs(), 1, pad);
      for (const bool channels_last : {true, false}) {
        const at::Tensor in = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
        const at::Tensor y = packed_conv2d(in, *packed);
        EXPECT_EQ(y.is_contiguous(at::MemoryFormat::ChannelsLast),
                  channels_last || (c.height == 1 && c.width == 1))
            << what;
        expect_within(y, ref, magnitude, k, what + (channels_last ? " cl" : " nchw"));
        expect_within(packed_conv2d(in, *packed, residual), ref + f64(residual),
                      magnitude + f64(residual).abs(), k, what + " residual");
        // Nearest 2x upsampling fused into the padded copy (Upsample2D).
        expect_within(packed_conv2d(in, *packed, at::Tensor(), /*upsample_2x=*/true), ref_up, magnitude_up, k,
                      what + " upsampled");
      }
    }
  }
}

TEST_F(PackedGemm, StrideTwoConvolutionsMatchFloat64) {
  struct Case {
    int64_t batch, cin, cout, height, width;
  };
  // Even and odd sizes (odd ones leave a last row/column that only padding reaches), the smallest
  // input a 3x3 kernel fits, 96 channels for chunks ending inside a tap, and an output width of 8
  // (row-aligned tiles).
  for (const CpuTier tier : tiers_) {
    for (const Case& c : {Case{2, 32, 32, 8, 8}, Case{1, 64, 32, 7, 9}, Case{2, 96, 64, 16, 12},
                          Case{1, 32, 64, 2, 2}, Case{3, 32, 32, 5, 6}, Case{2, 32, 32, 16, 16}}) {
      const at::Tensor w = bf16({c.cout, c.cin, 3, 3}, 1.0 / std::sqrt(c.cin * 9.0));
      const at::Tensor b = bf16({c.cout});
      const auto packed = pack_gemm_weight(w, b, tier);
      const at::Tensor x = bf16({c.batch, c.cin, c.height, c.width});
      for (const auto& [pad_begin, pad_end] :
           std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {0, 1}, {0, 0}}) {
        if (c.height + pad_begin + pad_end < 3 || c.width + pad_begin + pad_end < 3) continue;
        const std::string what = tier_text(tier) + " " + std::to_string(c.cin) + "->" +
                                 std::to_string(c.cout) + " " + std::to_string(c.height) + "x" +
                                 std::to_string(c.width) + " pad " + std::to_string(pad_begin) + "," +
                                 std::to_string(pad_end);
        // diffusers' Downsample2D: F.pad(x, (0, 1, 0, 1)) then a stride-2 convolution.
        const auto padded = [&](const at::Tensor& t) {
          return at::constant_pad_nd(t, {pad_begin, pad_end, pad_begin, pad_end}, 0);
        };
        const at::Tensor ref = at::conv2d(padded(f64(x)), f64(w), f64(b), 2);
        const at::Tensor magnitude = at::conv2d(padded(f64(x).abs()), f64(w).abs(), f64(b).abs(), 2);
        for (const bool channels_last : {true, false}) {
          const at::Tensor in = channels_last ? x.contiguous(at::MemoryFormat::ChannelsLast) : x;
          const at::Tensor y = packed_conv2d_stride2(in, *packed, pad_begin, pad_end);
          EXPECT_EQ(y.is_contiguous(at::MemoryFormat::ChannelsLast),
                    channels_last || (y.size(2) == 1 && y.size(3) == 1))
              << what;
          expect_within(y, ref, magnitude, 9 * c.cin, what + (channels_last ? " cl" : " nchw"));
        }
      }
    }
  }
}

TEST_F(PackedGemm, RejectsBadInput) {
  for (const CpuTier tier : tiers_) {
    SCOPED_TRACE(tier_text(tier));
    const auto linear = pack_gemm_weight(bf16({64, 32}), at::Tensor(), tier);
    EXPECT_THROW(packed_linear(bf16({4, 32}).to(at::kFloat), *linear), ArgumentError);
    EXPECT_THROW(packed_linear(bf16({4, 64}), *linear), ArgumentError);
    EXPECT_THROW(packed_linear(bf16({4, 32}), *linear, bf16({4, 32})), ArgumentError);
    EXPECT_THROW(packed_linear(at::Tensor(), *linear), ArgumentError);
    at::Tensor wrong = bf16({5, 64});
    EXPECT_THROW(packed_linear_into(bf16({4, 32}), *linear, wrong), ArgumentError);
    at::Tensor strided = bf16({4, 128}).narrow(1, 0, 64);
    EXPECT_THROW(packed_linear_into(bf16({4, 32}), *linear, strided), ArgumentError);
    const auto conv = pack_gemm_weight(bf16({32, 32, 3, 3}), at::Tensor(), tier);
    EXPECT_THROW(packed_conv2d(bf16({1, 16, 4, 4}), *conv), ArgumentError);
    EXPECT_THROW(packed_conv2d(bf16({1, 32, 4, 4}), *conv, bf16({1, 32, 4, 5})), ArgumentError);
    EXPECT_THROW(packed_conv2d(bf16({32, 4, 4}), *conv), ArgumentError);
    EXPECT_THROW(packed_linear(bf16({4, 288}), *conv), ArgumentError);
    EXPECT_THROW(packed_conv2d_stride2(bf16({1, 32, 4, 4}), *conv, 2, 1), ArgumentError);
    EXPECT_THROW(packed_conv2d_stride2(bf16({1, 32, 1, 1}), *conv, 0, 1), ArgumentError);
    EXPECT_THROW(packed_conv2d_stride2(bf16({1, 32, 4, 4}), *linear, 1, 1), ArgumentError);
  }
  // A weight claiming a tier this process cannot run.
  PackedGemmWeight generic;
  generic.out_features = 32;
  generic.in_channels = 32;
  EXPECT_THROW(packed_linear(bf16({4, 32}), generic), ArgumentError);
}

}  // namespace
}  // namespace voken::core
