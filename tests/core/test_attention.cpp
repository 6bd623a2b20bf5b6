// core::attention at every runnable tier and in both numerics modes against softmax(q k^T scale) v
// computed in float64 from the same bf16 inputs; the attention of diffusion's
// multi_head_attention (chunked path and the kernel it dispatches to); bad input.
//
// Tolerance, derived per output element (o = sum_j P_j v_j, P = softmax of the scaled scores):
//  - scores: the kernels sum D exact bf16 products in float32, then form s * c - max * c in
//    float32 (c = scale * log2 e), so each exponent is off by at most
//      Delta = score_scale * (D + 8) * 2^-24 * max_j sum_d |q_d| |k_jd|   (natural-log units)
//    per query row (the float scale and log2 e add a few units of 2^-24 of |s|, within the +8).
//    Scores off by <= Delta change each P_j by a factor within e^(+-2 Delta), so o moves by at most
//    (e^(2 Delta) - 1) sum_j P_j |v_j| ~ 2.02 Delta sum P |v|.
//  - probabilities: 2^x polynomial < 4e-6 relative; rounded to bf16 for the P V product at the
//    amx and avx512_bf16 tiers (2^-8 relative), kept float32 elsewhere (2^-24).
//  - sums over the keys in float32 (the softmax denominator and the P V accumulation):
//    keys * 2^-24 relative of sum P |v| each. Rescaling by a moved maximum scales the output and
//    the denominator by the same float, which cancels.
//  - the output rounded to bf16: 2^-8 |ref| (RNE with 8 significant bits).
// So |o - ref| <= 1.01 (delta_p + 4e-6 + 2 keys 2^-24 + 2.02 Delta) sum_j P_j |v_j| + 2^-8 |ref|,
// the 1.01 covering the products of the small terms. The reference's own error (float64) is far
// below.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/attention.h"
#include "core/cpu.h"
#include "diffusion/nn_blocks.h"
#include "voken/error.h"

namespace voken::core {
namespace {

using diffusion::multi_head_attention;

// [B, T, heads * D] -> [B, heads, T, D] in float64.
at::Tensor split_heads(const at::Tensor& t, int64_t heads) {
  return t.to(at::kDouble).reshape({t.size(0), t.size(1), heads, t.size(2) / heads}).permute({0, 2, 1, 3});
}
at::Tensor merge_heads(const at::Tensor& t) {
  return t.permute({0, 2, 1, 3}).reshape({t.size(0), t.size(2), t.size(1) * t.size(3)});
}

struct Reference {
  at::Tensor out;     // [B, Tq, heads * D] float64
  at::Tensor pv_abs;  // sum_j P_j |v_j|, same shape
  at::Tensor delta;   // the exponent error bound per query row, broadcast to the same shape
};

Reference reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                    double scale, AttentionNumerics numerics) {
  const int64_t head_dim = q.size(2) / heads;
  at::Tensor qd = split_heads(q, heads);
  double score_scale = scale;
  if (numerics == AttentionNumerics::ScaledQueryBf16) {
    // The kernels' rounding of q * scale (a float product, exact in double, rounded to bf16).
    qd = split_heads((q.to(at::kFloat) * static_cast<float>(scale)).to(at::kBFloat16), heads);
    score_scale = 1;
  }
  const at::Tensor kd = split_heads(k, heads), vd = split_heads(v, heads);
  const at::Tensor probs = at::softmax(at::matmul(qd, kd.transpose(-1, -2)) * score_scale, -1);
  Reference r;
  r.out = merge_heads(at::matmul(probs, vd));
  r.pv_abs = merge_heads(at::matmul(probs, vd.abs()));
  const at::Tensor magnitude = std::get<0>(at::matmul(qd.abs(), kd.abs().transpose(-1, -2)).max(-1, true));
  r.delta = merge_heads((magnitude * (score_scale * (head_dim + 8) * std::ldexp(1.0, -24)))
                            .expand({qd.size(0), qd.size(1), qd.size(2), head_dim}));
  return r;
}

// The largest |got - ref| / bound over all elements (<= 1 passes).
double error_ratio(const at::Tensor& got, const Reference& r, CpuTier tier, int64_t keys) {
  const bool bf16_probabilities = tier == CpuTier::amx || tier == CpuTier::avx512_bf16;
  const double delta_p = bf16_probabilities ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
  const at::Tensor bound =
      (r.delta * 2.02 + (delta_p + 4e-6 + 2.0 * keys * std::ldexp(1.0, -24))) * r.pv_abs * 1.01 +
      r.out.abs() * std::ldexp(1.0, -8) + 1e-30;
  return ((got.to(at::kDouble) - r.out).abs() / bound).max().item<double>();
}

struct Case {
  int64_t batch, queries, keys, heads, head_dim;
};

std::string describe(const Case& c) {
  return "B " + std::to_string(c.batch) + " Tq " + std::to_string(c.queries) + " Tk " +
         std::to_string(c.keys) + " heads " + std::to_string(c.heads) + " D " + std::to_string(c.head_dim);
}

// q, k, v as views of fused products (strided rows, as from a qkv projection); `shared_kv` makes k
// and v one batch item expanded (batch stride 0).
struct Operands {
  at::Tensor q, k, v;
};
Operands make_operands(const Case& c, at::Generator& generator, bool shared_kv) {
  const int64_t width = c.heads * c.head_dim;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // 2 x unit normal: scores with a standard deviation of ~4 at scale 1 / sqrt(D), sharp rows.
  const at::Tensor qkv =
      (at::randn({c.batch, std::max(c.queries, c.keys), 3 * width}, generator, f32) * 2).to(at::kBFloat16);
  Operands o;
  o.q = qkv.narrow(1, 0, c.queries).narrow(2, 0, width);
  if (shared_kv) {
    const at::Tensor kv = (at::randn({1, c.keys, 2 * width}, generator, f32) * 2).to(at::kBFloat16);
    o.k = kv.narrow(2, 0, width).expand({c.batch, c.keys, width});
    o.v = kv.narrow(2, width, width).expand({c.batch, c.keys, width});
  } else {
    o.k = qkv.narrow(1, 0, c.keys).narrow(2, width, width);
    o.v = qkv.narrow(1, 0, c.keys).narrow(2, 2 * width, width);
  }
  return o;
}

void expect_every_tier_close(const Operands& o, int64_t heads, double scale, const std::string& what) {
  for (const auto numerics : {AttentionNumerics::ScaledQueryBf16, AttentionNumerics::ScaledScoresFloat32}) {
    const Reference ref = reference(o.q, o.k, o.v, heads, scale, numerics);
    for (const CpuTier tier : runnable_tiers()) {
      const at::Tensor got = attention(o.q, o.k, o.v, heads, scale, numerics, tier);
      ASSERT_EQ(got.sizes(), ref.out.sizes()) << what;
      ASSERT_EQ(got.scalar_type(), at::kBFloat16);
      ASSERT_TRUE(got.is_contiguous());
      const double ratio = error_ratio(got, ref, tier, o.k.size(1));
      EXPECT_LE(ratio, 1.0) << what << ", " << numerics_name(numerics) << ", tier " << tier_name(tier)
                            << ": error reaches " << ratio << " x the bound";
    }
  }
}

TEST(Attention, EveryTierMatchesFloat64) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(11);
  // Head sizes of the models (40 SD 1.x, 64 SD 2.x / Q-Former, 80, 88 ViT, 128 mapper, 512 VAE)
  // and odd ones; key counts around the vector, tile and chunk boundaries (16, 32, 64, 128, 256,
  // 512); query counts that leave partial row tiles and blocks.
  const std::vector<Case> cases = {
      {2, 33, 77, 2, 64},   {1, 50, 1, 3, 40},    {1, 17, 31, 2, 80},   {2, 100, 257, 2, 88},
      {1, 40, 511, 1, 128}, {1, 37, 513, 2, 64},  {1, 20, 4100, 1, 64}, {1, 70, 600, 1, 512},
      {2, 5, 130, 1, 130},  {1, 9, 9, 4, 8},      {1, 3, 300, 1, 1},    {1, 257, 257, 16, 88},
      {1, 49, 1024, 2, 40}, {1, 25, 129, 3, 200},
  };
  for (const Case& c : cases) {
    const Operands o = make_operands(c, generator, /*shared_kv=*/false);
    expect_every_tier_close(o, c.heads, 1.0 / std::sqrt(static_cast<double>(c.head_dim)), describe(c));
  }
  // k and v shared by the batch (stride 0), another scale.
  const Case shared{3, 21, 45, 2, 64};
  expect_every_tier_close(make_operands(shared, generator, true), shared.heads, 0.3,
                          describe(shared) + " shared");
}

// Rows whose maximum moves up chunk after chunk (the resident output is rescaled many times) and
// a few keys with far larger scores late in the sequence.
TEST(Attention, MovingMaximaAndSharpRows) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t keys = 2500, dim = 64;
  const at::Tensor q = (at::randn({1, 19, dim}, generator, f32).abs() + 0.5).to(at::kBFloat16);
  // Keys growing along the sequence: every 128-, 256- and 512-key chunk raises the maximum by more
  // than the rescale threshold.
  const at::Tensor ramp = at::linspace(0.2, 6.0, keys, f32).view({1, keys, 1});
  at::Tensor k = at::randn({1, keys, dim}, generator, f32).abs() * ramp;
  k.narrow(1, 2300, 10).mul_(3);
  const at::Tensor v = at::randn({1, keys, dim}, generator, f32);
  Operands o{q, k.to(at::kBFloat16), v.to(at::kBFloat16)};
  expect_every_tier_close(o, 1, 0.125, "ramp of keys");
  // Sharp rows the other way round: the largest scores first.
  Operands reversed{q, k.flip(1).to(at::kBFloat16), v.flip(1).to(at::kBFloat16)};
  expect_every_tier_close(reversed, 1, 0.125, "reversed ramp");
}

TEST(Attention, EmptyQueriesOrBatchGiveEmptyOutputs) {
  const at::Tensor kv = at::randn({2, 5, 16}).to(at::kBFloat16);
  for (const CpuTier tier : runnable_tiers()) {
    EXPECT_EQ(attention(at::randn({2, 0, 16}).to(at::kBFloat16), kv, kv, 2, 0.25,
                        AttentionNumerics::ScaledScoresFloat32, tier)
                  .sizes(),
              at::IntArrayRef({2, 0, 16}));
    const at::Tensor none = at::randn({0, 5, 16}).to(at::kBFloat16);
    EXPECT_EQ(attention(at::randn({0, 3, 16}).to(at::kBFloat16), none, none, 2, 0.25,
                        AttentionNumerics::ScaledQueryBf16, tier)
                  .sizes(),
              at::IntArrayRef({0, 3, 16}));
  }
}

TEST(Attention, SupportedShapes) {
  for (const CpuTier tier : runnable_tiers()) {
    for (const auto numerics : {AttentionNumerics::ScaledQueryBf16, AttentionNumerics::ScaledScoresFloat32}) {
      EXPECT_TRUE(attention_supported(1, 1, numerics, tier));
      EXPECT_TRUE(attention_supported(kAttentionMaxHeadDim, 100000, numerics, tier));
      EXPECT_FALSE(attention_supported(0, 10, numerics, tier));
      EXPECT_FALSE(attention_supported(64, 0, numerics, tier));
      EXPECT_EQ(attention_supported(kAttentionMaxHeadDim + 1, 10, numerics, tier), tier == CpuTier::generic);
    }
  }
  if (cpu_tier() != CpuTier::amx)
    EXPECT_FALSE(attention_supported(64, 64, AttentionNumerics::ScaledScoresFloat32,
                                     static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)));
}

TEST(Attention, RejectsBadArguments) {
  const auto x = at::randn({1, 4, 16}).to(at::kBFloat16);
  const auto mode = AttentionNumerics::ScaledScoresFloat32;
  for (const CpuTier tier : runnable_tiers()) {
    const std::string name = tier_name(tier);
    EXPECT_THROW(attention(x, x, x, 3, 1.0, mode, tier), ArgumentError) << name;                 // 16 % 3
    EXPECT_THROW(attention(x.to(at::kFloat), x, x, 2, 1.0, mode, tier), ArgumentError) << name;  // dtype
    EXPECT_THROW(attention(x, x, at::randn({1, 5, 16}).to(at::kBFloat16), 2, 1.0, mode, tier), ArgumentError)
        << name;  // v rows
    EXPECT_THROW(attention(x, x, at::randn({2, 4, 16}).to(at::kBFloat16), 2, 1.0, mode, tier), ArgumentError)
        << name;  // v batch
    const auto no_keys = at::randn({1, 0, 16}).to(at::kBFloat16);
    EXPECT_THROW(attention(x, no_keys, no_keys, 2, 1.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(x, x, x, 0, 1.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(x, x, x, 2, 0.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(x, x, x, 2, -1.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(x, x, x, 2, NAN, mode, tier), ArgumentError) << name;
    // Columns not contiguous.
    const auto columns = at::randn({1, 16, 4}).to(at::kBFloat16).transpose(1, 2);
    EXPECT_THROW(attention(columns, columns, columns, 2, 1.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(x.view({4, 16}), x, x, 2, 1.0, mode, tier), ArgumentError) << name;
    EXPECT_THROW(attention(at::Tensor(), x, x, 2, 1.0, mode, tier), ArgumentError) << name;
    const auto wide = at::randn({1, 3, kAttentionMaxHeadDim + 16}).to(at::kBFloat16);
    if (tier == CpuTier::generic)
      EXPECT_NO_THROW(attention(wide, wide, wide, 1, 0.1, mode, tier));
    else
      EXPECT_THROW(attention(wide, wide, wide, 1, 0.1, mode, tier), ArgumentError) << name;
  }
  if (cpu_tier() != CpuTier::amx)
    EXPECT_THROW(attention(x, x, x, 2, 1.0, mode, static_cast<CpuTier>(static_cast<int>(cpu_tier()) + 1)),
                 ArgumentError);
  try {
    attention(x, x, at::randn({1, 5, 16}).to(at::kBFloat16), 2, 1.0, mode);
    ADD_FAILURE() << "no error";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("[1, 5, 16]"), std::string::npos) << e.what();
  }
}

// ---- diffusion's multi_head_attention: the chunked path, and the kernel it dispatches to ------

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(MultiHeadAttention, ChunkedEqualsWholeScoreMatrix) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t batch = 2, queries = 50, keys = 37, heads = 3, head_dim = 8;
  const at::Tensor q = at::randn({batch, queries, heads * head_dim}, generator, f32);
  const at::Tensor k = at::randn({batch, keys, heads * head_dim}, generator, f32);
  const at::Tensor v = at::randn({batch, keys, heads * head_dim}, generator, f32);
  const double scale = 1 / std::sqrt(8.0);
  const auto split = [&](const at::Tensor& t) { return split_heads(t, heads); };
  const at::Tensor want = merge_heads(
      at::matmul(at::softmax(at::matmul(split(q), split(k).transpose(-1, -2)) * scale, -1), split(v)));
  // float32: the chunked path always (the kernel takes bf16 only).
  const at::Tensor whole = multi_head_attention(q, k, v, heads, scale, false, int64_t{1} << 40);
  EXPECT_LT(max_abs_diff(whole, want), 1e-5);
  // Budgets: one score row at a time, one head's rows in pieces, several heads at once.
  for (const int64_t budget : {int64_t{1}, keys, 7 * keys, queries * keys, 4 * queries * keys}) {
    const at::Tensor chunked = multi_head_attention(q, k, v, heads, scale, false, budget);
    EXPECT_LT(max_abs_diff(chunked, whole), 1e-6) << "budget " << budget;
  }
  // upcast (float32 scores) on bfloat16 inputs stays close to the float32 result.
  const at::Tensor bf16 = multi_head_attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16),
                                               heads, scale, true, keys * 5);
  EXPECT_EQ(bf16.scalar_type(), at::kBFloat16);
  EXPECT_LT(max_abs_diff(bf16, whole), 0.05);
}

// bfloat16 through multi_head_attention: the fused kernel at tiers from avx2 up (exactly
// core::attention's ScaledScoresFloat32 result, upcast or not), the chunked path when the kernel is
// not allowed; both close to float64.
TEST(MultiHeadAttention, BFloat16TakesTheKernelFromAvx2Up) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(4);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const int64_t batch = 2, heads = 3;
  for (const int64_t dim : {int64_t{8}, int64_t{40}, int64_t{64}}) {
    for (const auto& [nq, nk] : std::vector<std::pair<int64_t, int64_t>>{{50, 37}, {16, 77}, {20, 1100}}) {
      // Unit-variance inputs: scores of O(1). (The chunked path rounds scores to bfloat16, as
      // diffusers does, which costs ~2^-8 of their magnitude in the exponent.)
      const at::Tensor qkv = at::randn({batch, nq, 3 * heads * dim}, generator, f32).to(at::kBFloat16);
      const at::Tensor kv = at::randn({batch, nk, 2 * heads * dim}, generator, f32).to(at::kBFloat16);
      const at::Tensor qb = qkv.narrow(2, heads * dim, heads * dim);  // strided rows
      const at::Tensor kb = kv.narrow(2, 0, heads * dim), vb = kv.narrow(2, heads * dim, heads * dim);
      const double s = 1 / std::sqrt(static_cast<double>(dim));
      const std::string what =
          "dim " + std::to_string(dim) + " nq " + std::to_string(nq) + " nk " + std::to_string(nk);
      const Reference ref = reference(qb, kb, vb, heads, s, AttentionNumerics::ScaledScoresFloat32);
      const double tol = 0.02 * ref.out.abs().max().item<double>();
      const at::Tensor chunked = multi_head_attention(qb, kb, vb, heads, s, false, 64, /*allow_fused=*/false);
      EXPECT_LT(max_abs_diff(chunked, ref.out), 2.5 * tol) << "chunked " << what;
      for (const bool upcast : {false, true}) {
        const at::Tensor dispatched = multi_head_attention(qb, kb, vb, heads, s, upcast, 64);
        if (cpu_tier() >= CpuTier::avx2) {
          const at::Tensor kernel = attention(qb, kb, vb, heads, s, AttentionNumerics::ScaledScoresFloat32);
          EXPECT_TRUE(at::equal(dispatched, kernel)) << what;
          EXPECT_LE(error_ratio(dispatched, ref, cpu_tier(), nk), 1.0) << what;
        } else {
          EXPECT_LT(max_abs_diff(dispatched, ref.out), 2.5 * tol) << "generic " << what;
        }
      }
    }
  }
}

}  // namespace
}  // namespace voken::core
