// The norm and elementwise kernels (core/norm_kernels.h) at every runnable CPU tier, against
// float64 references computed with ATen on the same (bf16-rounded) inputs: group norm in NCHW and
// NHWC with and without the fused SiLU, in place and not; the UNet layer norm; the vision
// layer_norm_bf16 with strided rows; softmax over the last dimension; GEGLU; the few-row bf16
// linear. Shapes leave tails after 8- and 16-wide steps, inputs carry large offsets, and bad
// arguments must give ArgumentError.
//
// Tolerances (u = 2^-24; each bound is first-order and per element):
//  - float32 sums: L sequential additions per lane, L <= n / 8 + 4 for n values (AVX2 has 8 lanes,
//    the others 16), so a sum of n values errs by at most L u sum|values|.
//  - group norm and the UNet layer norm sum d = x - shift (shift = the group's or row's first
//    value) in float32 runs of <= 4096 values (NHWC: 128 pixels per channel), so L <= 520, and
//    apply y = x * s + o with s = rstd w and o = b - mean s rounded to float32. With D =
//    max|x - shift| rstd, M2 = mean((x - shift)^2) / var and X = |x - mean| rstd, the mean errs by
//    <= (L + 2) u D / rstd and the variance by <= (L + 3) u M2 var (relative), so
//      |y - ref| <= u (|y| + 2 |w| rstd |x| + |b| + |w| rstd |mean| + (L + 3) |w| (D + X M2)).
//  - SiLU after it: silu' <= 1.1, and the polynomial exp and reciprocal add <= 8 u |silu|.
//  - layer_norm_bf16 (two-pass float32, C channels, S1 = mean|x| rstd): the mean errs by
//    <= (C / 8 + 6) u S1 / rstd, rstd relatively by <= (C / 16 + 7) u, so
//      |y - ref| <= u (|w| ((C / 8 + 6) S1 + X (C / 16 + 10)) + |y| + |b|).
//  - softmax: exp of x - max errs relatively by <= (|x - max| + 3) u, the sum of n positive terms
//    by <= (n / 8 + 4 + n) u (terms e^-t t <= 1/e each), 1/sum and the product by 2 u:
//      |y - ref| <= u (|x - max| + 2 n + 16) |ref| (+ 1e-37 for exp's clamp at -87).
//  - GELU(g) = 0.5 g erfc(z), z = |g| / sqrt 2, through Numerical Recipes' erfcc (relative error
//    < 1.2e-7): erfc = t exp(P(t) - z^2), t = 1 / (1 + z / 2). In float32 the 9 Horner steps err by
//    <= 2 u 1.49 each (1.49 = the largest partial value for t in (0, 1]), t's 3 u relative error
//    moves P by <= 1.26 * 3 u (max |t P'(t)| = 1.26), z^2 errs by 3 u z^2 = 1.5 u g^2; exp adds 2 u
//    and the remaining products and the final x - 0.5 x erfc 8 u, the value product u:
//      relative <= 1.2e-7 + u (1.5 g^2 + 42).
//  - A bf16 output rounds once more: bound * (1 + 2^-8) + 2^-8 |ref|.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "core/cpu.h"
#include "core/norm_kernels.h"
#include "voken/error.h"

namespace voken::core {
namespace {

const double kU = std::ldexp(1.0, -24);
const double kBf16Step = std::ldexp(1.0, -8);

// Passes when |got - ref| <= bound everywhere (got in any dtype and memory order).
void expect_within(const at::Tensor& got, const at::Tensor& ref, const at::Tensor& bound,
                   const std::string& what) {
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  const at::Tensor err = (got.to(at::kDouble).contiguous() - ref).abs();
  const double ratio = (err / (bound + 1e-300)).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound (max error "
                        << err.max().item<double>() << ")";
}

at::Tensor with_output_rounding(const at::Tensor& bound, const at::Tensor& ref, at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? bound * (1 + kBf16Step) + ref.abs() * kBf16Step : bound;
}

std::string tier_label(CpuTier tier, at::ScalarType dtype) {
  return std::string(tier_name(tier)) + (dtype == at::kFloat ? " float32" : " bfloat16");
}

CpuTier tier_above() { return static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1); }

// ---- group norm ---------------------------------------------------------------------------------

struct Reference {
  at::Tensor value;  // float64, NCHW
  at::Tensor bound;
};

// Rows of xg (float64 [N, n]) normalised, with the statistics the bound above needs, each
// expanded to xg's shape.
struct Normalized {
  at::Tensor x_norm, mean, rstd;
  at::Tensor terms;  // (L + 3) (D + X M2)
};

Normalized shifted_normalization(const at::Tensor& xg, double eps) {
  constexpr double kL = 520;
  const at::Tensor mean = xg.mean(-1, true);
  const at::Tensor var = (xg - mean).pow(2).mean(-1, true);
  const at::Tensor rstd = (var + eps).rsqrt();
  const at::Tensor d = xg - xg.select(-1, 0).unsqueeze(-1);
  const at::Tensor big_d = d.abs().amax(-1, true) * rstd;
  const at::Tensor m2 = d.pow(2).mean(-1, true) / (var + eps);
  const at::Tensor x_norm = (xg - mean) * rstd;
  return {x_norm, mean.expand_as(xg), rstd.expand_as(xg), (kL + 3) * (big_d + x_norm.abs() * m2)};
}

// y = x_norm w + b and its bound, for x, w, b broadcast alike.
Reference affine_reference(const Normalized& n, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& b) {
  const at::Tensor y = n.x_norm * w + b;
  const at::Tensor bound = kU * (y.abs() + 2 * w.abs() * n.rstd * x.abs() + b.abs() +
                                 w.abs() * n.rstd * n.mean.abs() + w.abs() * n.terms);
  return {y, bound};
}

// Group norm of x (float64, [B, C, *]) and its bound, without and with SiLU, for a `dtype` output.
std::pair<Reference, Reference> group_norm_reference(const at::Tensor& x, int64_t groups, const at::Tensor& w,
                                                     const at::Tensor& b, double eps, at::ScalarType dtype) {
  const int64_t batch = x.size(0), channels = x.size(1);
  Normalized n = shifted_normalization(x.reshape({batch * groups, -1}), eps);
  for (at::Tensor* t : {&n.x_norm, &n.mean, &n.rstd, &n.terms}) *t = t->reshape({batch, channels, -1});
  const Reference plain = affine_reference(n, x.reshape({batch, channels, -1}), w.reshape({1, channels, 1}),
                                           b.reshape({1, channels, 1}));
  const at::Tensor silu = at::silu(plain.value);
  const at::Tensor silu_bound = 1.1 * plain.bound + 8 * kU * silu.abs();
  return {{plain.value.reshape(x.sizes()),
           with_output_rounding(plain.bound, plain.value, dtype).reshape(x.sizes())},
          {silu.reshape(x.sizes()), with_output_rounding(silu_bound, silu, dtype).reshape(x.sizes())}};
}

struct GroupNormCase {
  std::vector<int64_t> shape;
  int64_t groups;
};

TEST(NormKernels, GroupNormMatchesFloat64InBothLayoutsAtEveryTier) {
  at::manual_seed(2);
  // [2, 24, 19, 37]: planes of 703 (tails after 8 and 16); [1, 12, 5, 7]: NHWC rows of 12 channels;
  // [1, 8, 40, 40] groups 2: 6400 values per group (two float32 runs, the second partial; 13 NHWC
  // chunks); [3, 10, 9]: 3-D.
  const std::vector<GroupNormCase> cases = {
      {{2, 24, 19, 37}, 6}, {{1, 12, 5, 7}, 3}, {{1, 8, 40, 40}, 2}, {{3, 10, 9}, 5}};
  for (const auto& c : cases) {
    const int64_t channels = c.shape[1];
    for (const double offset : {0.0, 100.0}) {
      const at::Tensor x = at::randn(c.shape) * 3 + offset;
      const at::Tensor w = at::randn({channels}), b = at::randn({channels});
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        const at::Tensor xd = x.to(dtype);
        // weight and bias in the activation dtype, as the UNet stores them.
        const at::Tensor wd = w.to(dtype), bd = b.to(dtype);
        const auto [plain, silu] = group_norm_reference(xd.to(at::kDouble), c.groups, wd.to(at::kDouble),
                                                        bd.to(at::kDouble), 1e-6, dtype);
        for (const bool channels_last : {false, true}) {
          if (channels_last && c.shape.size() != 4) continue;
          const at::Tensor in = channels_last ? xd.contiguous(at::MemoryFormat::ChannelsLast) : xd;
          for (CpuTier tier : runnable_tiers()) {
            const std::string what = tier_label(tier, dtype) + " shape " + std::to_string(c.shape[1]) + "x" +
                                     std::to_string(c.shape.back()) + " offset " + std::to_string(offset) +
                                     (channels_last ? " NHWC" : " NCHW");
            const at::Tensor y = group_norm(in, c.groups, wd, bd, 1e-6, false, tier);
            EXPECT_EQ(y.scalar_type(), dtype);
            EXPECT_EQ(y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous(), channels_last);
            expect_within(y, plain.value, plain.bound, what);
            const at::Tensor ys = group_norm(in, c.groups, wd, bd, 1e-6, true, tier);
            expect_within(ys, silu.value, silu.bound, what + " silu");
            at::Tensor in_place = in.clone();
            group_norm_(in_place, c.groups, wd, bd, 1e-6, true, tier);
            EXPECT_TRUE(test::bit_equal(in_place, ys)) << what;
          }
        }
      }
    }
  }
}

TEST(NormKernels, GroupNormRejectsBadArguments) {
  const at::Tensor x = at::randn({2, 6, 4, 4});
  const at::Tensor w = at::ones({6}), b = at::zeros({6});
  EXPECT_THROW(group_norm(x, 4, w, b, 1e-6, false), ArgumentError);                  // 6 % 4 != 0
  EXPECT_THROW(group_norm(x, 0, w, b, 1e-6, false), ArgumentError);                  // no groups
  EXPECT_THROW(group_norm(x, 3, at::ones({5}), b, 1e-6, false), ArgumentError);      // weight size
  EXPECT_THROW(group_norm(x, 3, w, at::Tensor(), 1e-6, false), ArgumentError);       // no bias
  EXPECT_THROW(group_norm(x.to(at::kDouble), 3, w, b, 1e-6, false), ArgumentError);  // dtype
  EXPECT_THROW(group_norm(at::randn({6}), 3, w, b, 1e-6, false), ArgumentError);     // 1-D
  at::Tensor strided = at::randn({2, 6, 4, 8}).narrow(3, 0, 4);
  EXPECT_THROW(group_norm_(strided, 3, w, b, 1e-6, false), ArgumentError);  // layout
  try {
    group_norm(x, 3, at::ones({5}), b, 1e-6, false);
    ADD_FAILURE() << "no error";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("weight [5] Float"), std::string::npos) << e.what();
  }
  if (cpu_tier() != CpuTier::amx)
    EXPECT_THROW(group_norm(x, 3, w, b, 1e-6, false, tier_above()), ArgumentError);
  // Empty batches are fine.
  EXPECT_EQ(group_norm(at::randn({0, 6, 4, 4}), 3, w, b, 1e-6, true).sizes(), at::IntArrayRef({0, 6, 4, 4}));
}

// ---- UNet layer norm ----------------------------------------------------------------------------

TEST(NormKernels, LayerNormMatchesFloat64AtEveryTier) {
  at::manual_seed(3);
  // Rows of 37 (tails), 320 and 5000 (two float32 runs).
  for (const int64_t dim : {37, 320, 5000}) {
    for (const double offset : {0.0, 100.0}) {
      const at::Tensor x = at::randn({2, 7, dim}) * 3 + offset;
      const at::Tensor w = at::randn({dim}), b = at::randn({dim});
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        const at::Tensor xd = x.to(dtype), wd = w.to(dtype), bd = b.to(dtype);
        const at::Tensor x64 = xd.to(at::kDouble).reshape({-1, dim});
        const Reference ref =
            affine_reference(shifted_normalization(x64, 1e-5), x64, wd.to(at::kDouble), bd.to(at::kDouble));
        for (CpuTier tier : runnable_tiers()) {
          const at::Tensor y = layer_norm(xd, wd, bd, 1e-5, tier);
          EXPECT_EQ(y.scalar_type(), dtype);
          expect_within(
              y.reshape({-1, dim}), ref.value, with_output_rounding(ref.bound, ref.value, dtype),
              tier_label(tier, dtype) + " dim " + std::to_string(dim) + " offset " + std::to_string(offset));
        }
      }
    }
  }
  EXPECT_THROW(layer_norm(at::randn({2, 8}), at::ones({7}), at::zeros({8}), 1e-5), ArgumentError);
  EXPECT_THROW(layer_norm(at::randn({2, 8}), at::ones({8}), at::Tensor(), 1e-5), ArgumentError);
  EXPECT_THROW(layer_norm(at::randn({2, 8}, at::kDouble), at::ones({8}), at::zeros({8}), 1e-5),
               ArgumentError);
  if (cpu_tier() != CpuTier::amx)
    EXPECT_THROW(layer_norm(at::randn({2, 8}), at::ones({8}), at::zeros({8}), 1e-5, tier_above()),
                 ArgumentError);
}

// ---- vision layer norm (layer_norm_bf16) --------------------------------------------------------

TEST(NormKernels, LayerNormBf16MatchesFloat64AtEveryTierWithStridedRows) {
  at::manual_seed(9);
  for (int64_t channels : {1, 7, 16, 100, 1408}) {
    for (const double offset : {1.0, 100.0}) {
      const auto x = (at::randn({5, 33, channels}) * 3 + offset).to(at::kBFloat16);
      const auto weight = at::randn({channels}), bias = at::randn({channels});
      const at::Tensor x64 = x.to(at::kDouble), w64 = weight.to(at::kDouble), b64 = bias.to(at::kDouble);
      const at::Tensor mean = x64.mean(-1, true);
      const at::Tensor rstd = ((x64 - mean).pow(2).mean(-1, true) + 1e-6).rsqrt();
      const at::Tensor x_norm = (x64 - mean) * rstd;
      const at::Tensor ref = x_norm * w64 + b64;
      const double c = static_cast<double>(channels);
      const at::Tensor s1 = x64.abs().mean(-1, true) * rstd;
      const at::Tensor bound =
          kU * (w64.abs() * ((c / 8 + 6) * s1 + x_norm.abs() * (c / 16 + 10)) + ref.abs() + b64.abs());
      const at::Tensor wide = at::cat({x, x}, -1).narrow(-1, 0, channels);  // rows 2C apart
      for (CpuTier tier : runnable_tiers()) {
        const std::string what = std::string(tier_name(tier)) + " channels " + std::to_string(channels) +
                                 " offset " + std::to_string(offset);
        const auto got = layer_norm_bf16(x, weight, bias, 1e-6, tier);
        ASSERT_EQ(got.scalar_type(), at::kBFloat16);
        expect_within(got, ref, with_output_rounding(bound, ref, at::kBFloat16), what);
        EXPECT_TRUE(test::bit_equal(layer_norm_bf16(wide, weight, bias, 1e-6, tier), got)) << what;
        // Without weight and bias: the normalised values.
        const at::Tensor bare_bound = kU * ((c / 8 + 6) * s1 + x_norm.abs() * (c / 16 + 10) + x_norm.abs());
        expect_within(layer_norm_bf16(x, {}, {}, 1e-6, tier), x_norm,
                      with_output_rounding(bare_bound, x_norm, at::kBFloat16), what + " no affine");
      }
    }
  }
  EXPECT_THROW(layer_norm_bf16(at::randn({2, 4}), {}, {}, 1e-5), ArgumentError);
  EXPECT_THROW(layer_norm_bf16(at::randn({2, 4}).to(at::kBFloat16), at::ones({3}), {}, 1e-5), ArgumentError);
  EXPECT_THROW(layer_norm_bf16(at::Tensor(), {}, {}, 1e-5), ArgumentError);
  if (cpu_tier() != CpuTier::amx)
    EXPECT_THROW(layer_norm_bf16(at::randn({2, 4}).to(at::kBFloat16), {}, {}, 1e-5, tier_above()),
                 ArgumentError);
  EXPECT_EQ(layer_norm_bf16(at::randn({0, 4}).to(at::kBFloat16), {}, {}, 1e-5).sizes(),
            at::IntArrayRef({0, 4}));
}

// ---- softmax ------------------------------------------------------------------------------------

TEST(NormKernels, SoftmaxMatchesFloat64AtEveryTier) {
  at::manual_seed(4);
  for (const int64_t n : {1, 7, 8, 9, 16, 17, 77, 1029}) {
    // Spreads of 3 and 40 (exp's clamp at -87 reached), and an offset of 1000.
    for (const double scale : {3.0, 40.0}) {
      const at::Tensor x = at::randn({3, 5, n}) * scale + (scale > 10 ? 0.0 : 1000.0);
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        const at::Tensor xd = x.to(dtype);
        const at::Tensor x64 = xd.to(at::kDouble);
        const at::Tensor ref = at::softmax(x64, -1);
        const at::Tensor gap = x64.amax(-1, true) - x64;
        const at::Tensor bound = kU * (gap + 2.0 * n + 16) * ref + 1e-37;
        for (CpuTier tier : runnable_tiers()) {
          at::Tensor y = xd.clone();
          softmax_lastdim_(y, tier);
          expect_within(
              y, ref, with_output_rounding(bound, ref, dtype),
              tier_label(tier, dtype) + " n " + std::to_string(n) + " scale " + std::to_string(scale));
        }
      }
    }
  }
  at::Tensor strided = at::randn({4, 8}).t();
  EXPECT_THROW(softmax_lastdim_(strided), ArgumentError);
  at::Tensor doubles = at::randn({4, 8}, at::kDouble);
  EXPECT_THROW(softmax_lastdim_(doubles), ArgumentError);
  at::Tensor fine = at::randn({4, 8});
  if (cpu_tier() != CpuTier::amx) EXPECT_THROW(softmax_lastdim_(fine, tier_above()), ArgumentError);
}

// ---- GEGLU --------------------------------------------------------------------------------------

TEST(NormKernels, GegluMatchesFloat64AtEveryTier) {
  at::manual_seed(5);
  for (const int64_t inner : {1, 7, 8, 9, 17, 640}) {
    // Gates over [-12, 12]: GELU's negative tail, where it is tiny, is part of the test.
    const at::Tensor projected = at::cat({at::randn({6, inner}) * 2, at::rand({6, inner}) * 24 - 12}, -1);
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor pd = projected.to(dtype);
      const at::Tensor value = pd.narrow(-1, 0, inner).to(at::kDouble),
                       gate = pd.narrow(-1, inner, inner).to(at::kDouble);
      // GELU through erfc: at::gelu's 1 + erf(x / sqrt 2) cancels to 0 in float64 below x = -8.
      const at::Tensor ref = value * 0.5 * gate * at::erfc(gate * -M_SQRT1_2);
      const at::Tensor bound = ref.abs() * (1.2e-7 + kU * (1.5 * gate.pow(2) + 42)) + 1e-40;
      for (CpuTier tier : runnable_tiers()) {
        const at::Tensor y = geglu(pd, tier);
        EXPECT_EQ(y.scalar_type(), dtype);
        expect_within(y, ref, with_output_rounding(bound, ref, dtype),
                      tier_label(tier, dtype) + " inner " + std::to_string(inner));
      }
    }
  }
  EXPECT_THROW(geglu(at::randn({2, 7})), ArgumentError);  // odd
  EXPECT_THROW(geglu(at::randn({2, 8}, at::kDouble)), ArgumentError);
  if (cpu_tier() != CpuTier::amx) EXPECT_THROW(geglu(at::randn({2, 8}), tier_above()), ArgumentError);
}

// ---- few-row bf16 linear ------------------------------------------------------------------------

// The decode GEMV plus a float32 bias: test_gemv's bound (ceil(K / 8) + 5) u |x| |W|^T, plus u |y|
// for the bias addition.
TEST(NormKernels, FewRowsLinearMatchesFloat64AtEveryTier) {
  at::manual_seed(6);
  for (const int64_t rows : {1, 2, 5, 8, 11}) {
    for (const int64_t in : {13, 320, 1280}) {
      const at::Tensor x = at::randn({rows, in});
      const at::Tensor w = (at::randn({77, in}) * 0.1).to(at::kBFloat16);
      const at::Tensor b = at::randn({77});
      const at::Tensor x64 = x.to(at::kDouble), w64 = w.to(at::kDouble);
      const at::Tensor ref = at::linear(x64, w64, b.to(at::kDouble));
      const at::Tensor bound =
          static_cast<double>((in + 7) / 8 + 5) * kU * at::linear(x64.abs(), w64.abs()) + kU * ref.abs();
      for (CpuTier tier : runnable_tiers()) {
        const std::string what =
            std::string(tier_name(tier)) + " rows " + std::to_string(rows) + " in " + std::to_string(in);
        const at::Tensor y = few_rows_linear_bf16(x, w, b, tier);
        ASSERT_EQ(y.scalar_type(), at::kFloat) << what;
        expect_within(y, ref, bound, what);
        const at::Tensor no_bias = few_rows_linear_bf16(x, w, {}, tier);
        EXPECT_TRUE(at::equal(no_bias + b, y)) << what;
      }
    }
  }
  const at::Tensor x = at::randn({2, 16});
  const at::Tensor w = at::ones({4, 16}, at::kBFloat16);
  EXPECT_THROW(few_rows_linear_bf16(x, w.to(at::kFloat), {}), ArgumentError);
  EXPECT_THROW(few_rows_linear_bf16(x, at::ones({4, 15}, at::kBFloat16), {}), ArgumentError);
  EXPECT_THROW(few_rows_linear_bf16(x, w, at::ones({3})), ArgumentError);
  EXPECT_THROW(few_rows_linear_bf16(x.to(at::kBFloat16), w, {}), ArgumentError);
  if (cpu_tier() != CpuTier::amx) EXPECT_THROW(few_rows_linear_bf16(x, w, {}, tier_above()), ArgumentError);
}

}  // namespace
}  // namespace voken::core
