#include "diffusion/nn_blocks.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "core/attention.h"
#include "core/cpu.h"
#include "core/inplace_gemm.h"
#include "core/norm_kernels.h"
#include "core/packed_gemm.h"
#include "voken/error.h"

namespace voken::diffusion {

std::optional<Activation> activation_from_name(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "relu") return Activation::Relu;
  if (name == "mish") return Activation::Mish;
  return std::nullopt;
}

at::Tensor activate(const at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::Silu:
      return at::silu(x);
    case Activation::Gelu:
      return at::gelu(x);
    case Activation::Relu:
      return at::relu(x);
    case Activation::Mish:
      return at::mish(x);
  }
  return x;
}

void activate_(at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::Silu:
      at::silu_(x);
      return;
    case Activation::Gelu:
      x = at::gelu(x);
      return;
    case Activation::Relu:
      at::relu_(x);
      return;
    case Activation::Mish:
      at::mish_(x);
      return;
  }
}

at::Tensor to_layout(const at::Tensor& x, bool channels_last) {
  return x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor image_to_tokens(const at::Tensor& x) {
  const int64_t batch = x.size(0), channels = x.size(1);
  // A view when x is channels-last.
  return x.permute({0, 2, 3, 1}).reshape({batch, x.size(2) * x.size(3), channels});
}

at::Tensor tokens_to_image(const at::Tensor& tokens, int64_t height, int64_t width, bool channels_last) {
  const int64_t batch = tokens.size(0), channels = tokens.size(2);
  auto image = tokens.reshape({batch, height, width, channels}).permute({0, 3, 1, 2});
  return channels_last ? image : image.contiguous();
}

// ---------------------------------------------------------------------------------------------
// Conv2d, Linear, norms

Conv2d Conv2d::load(io::WeightLoader& weights, const std::string& prefix, int64_t in_channels,
                    int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding,
                    bool channels_last) {
  Conv2d conv;
  conv.weight = weights.take(prefix + "weight", {out_channels, in_channels, kernel, kernel});
  if (channels_last && kernel > 1) conv.weight = conv.weight.contiguous(at::MemoryFormat::ChannelsLast);
  conv.bias = weights.take(prefix + "bias", {out_channels});
  conv.stride = stride;
  conv.padding = padding;
  return conv;
}

namespace {

// Whether bf16 products that the packed kernels do not take run in voken's own kernels instead of
// libtorch's bf16 at::linear / at::conv2d (oneDNN, which repacks the weights per call, and which on
// CPUs without AVX-512 is libtorch's slow reference loop).
bool own_bf16_products() { return core::cpu_tier() >= core::CpuTier::avx2; }

}  // namespace

at::Tensor Conv2d::operator()(const at::Tensor& x) const {
  if (packed && x.scalar_type() == at::kBFloat16)
    return stride == 2 ? core::packed_conv2d_stride2(x, *packed, padding, padding)
                       : core::packed_conv2d(x, *packed);
  if (!weight.defined()) throw ArgumentError("Conv2d: packed bfloat16 weights need a bfloat16 input");
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && own_bf16_products()) {
    // Shapes the packed kernels do not take (conv_in/conv_out with 3-8 channels, quant convs):
    // small products, computed in float32 on the bf16 values and rounded once, as oneDNN's bf16
    // convolution rounds.
    const at::Tensor y =
        at::conv2d(x.to(at::kFloat), weight.to(at::kFloat),
                   bias.defined() ? bias.to(at::kFloat) : at::Tensor(), {stride, stride}, {padding, padding});
    return y.to(at::kBFloat16);
  }
  return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
}

at::Tensor Conv2d::operator()(const at::Tensor& x, const at::Tensor& residual) const {
  if (packed && stride == 1 && x.scalar_type() == at::kBFloat16 && residual.scalar_type() == at::kBFloat16)
    return core::packed_conv2d(x, *packed, residual);
  return (*this)(x).add_(residual);
}

bool Conv2d::pack() {
  if (packed || !weight.defined() || weight.scalar_type() != at::kBFloat16 || weight.dim() != 4) return false;
  const int64_t kernel = weight.size(2);
  // Stride 1 with "same" padding, or stride 2 with a 3x3 kernel (Downsample2D).
  const bool same = stride == 1 && padding == (kernel - 1) / 2;
  const bool downsample = stride == 2 && kernel == 3 && padding >= 0 && padding <= 1;
  if (weight.size(3) != kernel || !(same || downsample) ||
      !core::packed_gemm_supported(weight.size(0), weight.size(1), kernel))
    return false;
  packed = core::pack_gemm_weight(weight, bias);
  weight = at::Tensor();
  return true;
}

Linear Linear::load(io::WeightLoader& weights, const std::string& prefix, int64_t in_features,
                    int64_t out_features, bool with_bias) {
  Linear linear;
  linear.weight = weights.take(prefix + "weight", {out_features, in_features});
  if (with_bias) linear.bias = weights.take(prefix + "bias", {out_features});
  return linear;
}

Linear Linear::load_pointwise_conv(io::WeightLoader& weights, const std::string& prefix, int64_t in_features,
                                   int64_t out_features) {
  Linear linear;
  linear.weight =
      weights.take(prefix + "weight", {out_features, in_features, 1, 1}).reshape({out_features, in_features});
  linear.bias = weights.take(prefix + "bias", {out_features});
  return linear;
}

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (packed && x.scalar_type() == at::kBFloat16) return core::packed_linear(x, *packed);
  if (!weight.defined()) throw ArgumentError("Linear: packed bfloat16 weights need a bfloat16 input");
  // Unpacked bf16 weights (widths that are no multiple of 32, the time embedding, packing turned
  // off): voken's in-place kernel, which reads the weights where they are.
  if (x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && weight.stride(-1) == 1 &&
      own_bf16_products() && core::inplace_gemm_supported())
    return core::inplace_linear(x, weight, bias, at::kBFloat16);
  return at::linear(x, weight, bias);
}

at::Tensor Linear::operator()(const at::Tensor& x, const at::Tensor& residual) const {
  if (packed && x.scalar_type() == at::kBFloat16 && residual.scalar_type() == at::kBFloat16)
    return core::packed_linear(x, *packed, residual);
  return (*this)(x).add_(residual);
}

void Linear::add_to(const at::Tensor& x, at::Tensor& accumulator) const {
  if (packed && x.scalar_type() == at::kBFloat16 && accumulator.scalar_type() == at::kBFloat16 &&
      accumulator.is_contiguous()) {
    core::packed_linear_into(x, *packed, accumulator);
    return;
  }
  accumulator.add_((*this)(x));
}

bool Linear::pack() {
  if (packed || !weight.defined() || weight.scalar_type() != at::kBFloat16 || weight.dim() != 2 ||
      !core::packed_gemm_supported(weight.size(0), weight.size(1), 1))
    return false;
  packed = core::pack_gemm_weight(weight, bias);
  weight = at::Tensor();
  return true;
}

GroupNorm GroupNorm::load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                          int64_t groups, double eps) {
  GroupNorm norm;
  norm.weight = weights.take(prefix + "weight", {channels});
  norm.bias = weights.take(prefix + "bias", {channels});
  norm.groups = groups;
  norm.eps = eps;
  return norm;
}

at::Tensor GroupNorm::operator()(const at::Tensor& x, std::optional<Activation> activation) const {
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    at::Tensor y = at::group_norm(x, groups, weight, bias, eps, /*cudnn_enabled=*/false);
    if (activation) activate_(y, *activation);
    return y;
  }
  // Our kernel rather than at::group_norm: see norm_kernels.h for libtorch 1.13's precision loss.
  const bool fused_silu = activation == Activation::Silu;
  at::Tensor y = core::group_norm(x, groups, weight, bias, eps, fused_silu);
  if (activation && !fused_silu) activate_(y, *activation);
  return y;
}

void GroupNorm::apply_(at::Tensor& x, std::optional<Activation> activation) const {
  const auto dtype = x.scalar_type();
  const bool layout_ok =
      x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  if ((dtype != at::kFloat && dtype != at::kBFloat16) || !layout_ok) {
    x = (*this)(x, activation);
    return;
  }
  const bool fused_silu = activation == Activation::Silu;
  core::group_norm_(x, groups, weight, bias, eps, fused_silu);
  if (activation && !fused_silu) activate_(x, *activation);
}

LayerNorm LayerNorm::load(io::WeightLoader& weights, const std::string& prefix, int64_t dim, double eps) {
  LayerNorm norm;
  norm.weight = weights.take(prefix + "weight", {dim});
  norm.bias = weights.take(prefix + "bias", {dim});
  norm.eps = eps;
  return norm;
}

at::Tensor LayerNorm::operator()(const at::Tensor& x) const {
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16)
    return at::layer_norm(x, {x.size(-1)}, weight, bias, eps, /*cudnn_enable=*/false);
  return core::layer_norm(x, weight, bias, eps);
}

// ---------------------------------------------------------------------------------------------
// ResnetBlock2D, Downsample2D, Upsample2D

ResnetBlock2D ResnetBlock2D::load(io::WeightLoader& weights, const std::string& prefix, int64_t in_channels,
                                  int64_t out_channels, const ResnetSettings& settings) {
  ResnetBlock2D block;
  const bool cl = settings.channels_last;
  block.norm1 = GroupNorm::load(weights, prefix + "norm1.", in_channels, settings.groups, settings.eps);
  block.conv1 = Conv2d::load(weights, prefix + "conv1.", in_channels, out_channels, 3, 1, 1, cl);
  if (settings.temb_channels) {
    const int64_t projected =
        settings.time_embedding_norm == TimeEmbeddingNorm::ScaleShift ? 2 * out_channels : out_channels;
    block.time_emb_proj = Linear::load(weights, prefix + "time_emb_proj.", *settings.temb_channels, projected,
                                       /*with_bias=*/true);
  }
  block.norm2 = GroupNorm::load(weights, prefix + "norm2.", out_channels,
                                settings.groups_out.value_or(settings.groups), settings.eps);
  block.conv2 = Conv2d::load(weights, prefix + "conv2.", out_channels, out_channels, 3, 1, 1, cl);
  if (in_channels != out_channels)
    block.conv_shortcut =
        Conv2d::load(weights, prefix + "conv_shortcut.", in_channels, out_channels, 1, 1, 0, cl);
  block.activation = settings.activation;
  block.time_embedding_norm = settings.time_embedding_norm;
  block.skip_time_act = settings.skip_time_act;
  block.output_scale_factor = settings.output_scale_factor;
  return block;
}

at::Tensor ResnetBlock2D::operator()(const at::Tensor& x, const at::Tensor& temb) const {
  if (!time_emb_proj) return forward_projected(x, {});
  if (!temb.defined()) throw ArgumentError("ResnetBlock2D: a time embedding is required");
  return forward_projected(x, (*time_emb_proj)(skip_time_act ? temb : activate(temb, activation)));
}

at::Tensor ResnetBlock2D::forward_projected(const at::Tensor& x, const at::Tensor& time_proj) const {
  at::Tensor h = conv1(norm1(x, activation));
  if (time_emb_proj) {
    if (!time_proj.defined()) throw ArgumentError("ResnetBlock2D: a time embedding is required");
    const at::Tensor t = time_proj.to(h.scalar_type());
    const auto per_channel = [&](const at::Tensor& v) { return v.reshape({v.size(0), v.size(1), 1, 1}); };
    if (time_embedding_norm == TimeEmbeddingNorm::ScaleShift) {
      const auto halves = t.chunk(2, 1);
      norm2.apply_(h);
      h.mul_(per_channel(halves[0]) + 1).add_(per_channel(halves[1]));
      activate_(h, activation);
    } else {
      h.add_(per_channel(t));
      norm2.apply_(h, activation);
    }
  } else {
    norm2.apply_(h, activation);
  }
  h = conv2(h, conv_shortcut ? (*conv_shortcut)(x) : x);
  if (output_scale_factor != 1.0) h.div_(output_scale_factor);
  return h;
}

void ResnetBlock2D::pack() {
  conv1.pack();
  conv2.pack();
  if (conv_shortcut) conv_shortcut->pack();
}

Downsample2D Downsample2D::load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                                int64_t padding, bool channels_last) {
  Downsample2D down;
  down.conv = Conv2d::load(weights, prefix + "conv.", channels, channels, 3, 2, padding, channels_last);
  down.pad_right_bottom = padding == 0;
  return down;
}

at::Tensor Downsample2D::operator()(const at::Tensor& x) const {
  if (!pad_right_bottom) return conv(x);
  // The asymmetric padding folded into the packed convolution's padded copy.
  if (conv.packed && x.scalar_type() == at::kBFloat16)
    return core::packed_conv2d_stride2(x, *conv.packed, 0, 1);
  return conv(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));
}

Upsample2D Upsample2D::load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                            bool channels_last) {
  Upsample2D up;
  up.conv = Conv2d::load(weights, prefix + "conv.", channels, channels, 3, 1, 1, channels_last);
  return up;
}

at::Tensor Upsample2D::operator()(const at::Tensor& x,
                                  std::optional<std::pair<int64_t, int64_t>> size) const {
  // With an explicit size upstream calls interpolate(size=...), whose source index is
  // floor(dst * in / out); for exactly twice the input that equals scale_factor=2's floor(dst / 2).
  const std::vector<int64_t> out_size = size ? std::vector<int64_t>{size->first, size->second}
                                             : std::vector<int64_t>{2 * x.size(2), 2 * x.size(3)};
  if (conv.packed && x.scalar_type() == at::kBFloat16 && out_size[0] == 2 * x.size(2) &&
      out_size[1] == 2 * x.size(3))
    return core::packed_conv2d(x, *conv.packed, at::Tensor(), /*upsample_2x=*/true);
  return conv(at::upsample_nearest2d(x, out_size));
}

// ---------------------------------------------------------------------------------------------
// Attention

at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale, bool upcast, int64_t max_scores, bool allow_fused) {
  const int64_t batch = q.size(0), queries = q.size(1), inner = q.size(2), keys = k.size(1);
  if (heads <= 0 || inner % heads != 0 || k.size(2) != inner || v.size(2) != inner || v.size(1) != keys ||
      k.size(0) != batch || v.size(0) != batch)
    throw ArgumentError("multi_head_attention: q " + std::to_string(batch) + "x" + std::to_string(queries) +
                        "x" + std::to_string(inner) + ", k/v with " + std::to_string(keys) + " keys, " +
                        std::to_string(heads) + " heads do not fit together");
  const int64_t head_dim = inner / heads;
  // bfloat16 goes through the fused kernel at every tier from avx2 up (libtorch's bf16 bmm is a
  // slow reference path on AVX2 CPUs, and the chunked path writes and reads every score). Its
  // scores are float32 q k^T times the scale in float32: exactly diffusers' upcast_attention, and
  // closer to float32 than diffusers' bf16 scores without it.
  const bool bf16 = q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                    v.scalar_type() == at::kBFloat16;
  if (allow_fused && bf16 && core::cpu_tier() >= core::CpuTier::avx2 &&
      core::attention_supported(head_dim, keys, core::AttentionNumerics::ScaledScoresFloat32) &&
      q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1)
    return core::attention(q, k, v, heads, scale, core::AttentionNumerics::ScaledScoresFloat32);
  const int64_t groups = batch * heads;
  // [B, N, H*D] -> [B*H, N, D]; keys transposed once to [B*H, D, Nk] for the score products.
  const auto split_heads = [&](const at::Tensor& t, int64_t n) {
    return t.reshape({batch, n, heads, head_dim}).permute({0, 2, 1, 3}).reshape({groups, n, head_dim});
  };
  at::Tensor q_heads = split_heads(q, queries);
  at::Tensor k_heads_t =
      k.reshape({batch, keys, heads, head_dim}).permute({0, 2, 3, 1}).reshape({groups, head_dim, keys});
  const at::Tensor v_heads = split_heads(v, keys);
  if (upcast) {
    q_heads = q_heads.to(at::kFloat);
    k_heads_t = k_heads_t.to(at::kFloat);
  }
  // The scale goes on q (queries x D values) rather than on the scores (queries x keys).
  q_heads = q_heads * scale;

  // Chunking: whole problem, else whole heads several at a time, else row blocks of one head.
  const int64_t budget_rows = std::max<int64_t>(1, max_scores / std::max<int64_t>(1, keys));
  int64_t group_step = groups, row_step = queries;
  if (budget_rows < groups * queries) {
    if (budget_rows >= queries) {
      group_step = budget_rows / queries;
    } else {
      group_step = 1;
      row_step = budget_rows;
    }
  }
  const auto attend = [&](const at::Tensor& q_part, const at::Tensor& k_t_part, const at::Tensor& v_part) {
    // Dense operands: oneDNN runs strided batches through a far slower GEMM (gemm:jit).
    at::Tensor probs = at::bmm(q_part.contiguous(), k_t_part.contiguous());
    core::softmax_lastdim_(probs);
    if (probs.scalar_type() != v_part.scalar_type()) probs = probs.to(v_part.scalar_type());
    return at::bmm(probs, v_part.contiguous());
  };
  at::Tensor out;
  if (group_step == groups && row_step == queries) {
    out = attend(q_heads, k_heads_t, v_heads);
  } else {
    out = at::empty({groups, queries, head_dim}, v_heads.options());
    for (int64_t g0 = 0; g0 < groups; g0 += group_step) {
      const int64_t g = std::min(group_step, groups - g0);
      const at::Tensor k_part = k_heads_t.narrow(0, g0, g);
      const at::Tensor v_part = v_heads.narrow(0, g0, g);
      const at::Tensor q_group = q_heads.narrow(0, g0, g);
      for (int64_t r0 = 0; r0 < queries; r0 += row_step) {
        const int64_t r = std::min(row_step, queries - r0);
        out.narrow(0, g0, g).narrow(1, r0, r).copy_(attend(q_group.narrow(1, r0, r), k_part, v_part));
      }
    }
  }
  return out.view({batch, heads, queries, head_dim}).permute({0, 2, 1, 3}).reshape({batch, queries, inner});
}

CrossAttention CrossAttention::load(io::WeightLoader& weights, const std::string& prefix, int64_t query_dim,
                                    std::optional<int64_t> context_dim, int64_t heads, int64_t head_dim,
                                    bool upcast) {
  CrossAttention attn;
  const int64_t inner = heads * head_dim;
  const int64_t kv_dim = context_dim.value_or(query_dim);
  attn.to_q = Linear::load(weights, prefix + "to_q.", query_dim, inner, /*with_bias=*/false);
  attn.to_k = Linear::load(weights, prefix + "to_k.", kv_dim, inner, false);
  attn.to_v = Linear::load(weights, prefix + "to_v.", kv_dim, inner, false);
  attn.to_out = Linear::load(weights, prefix + "to_out.0.", inner, query_dim, true);
  if (!context_dim) {
    attn.qkv.emplace();
    attn.qkv->weight = at::cat({attn.to_q.weight, attn.to_k.weight, attn.to_v.weight}, 0);
  }
  attn.heads = heads;
  attn.upcast = upcast;
  return attn;
}

at::Tensor CrossAttention::attend(const at::Tensor& x, const at::Tensor& context,
                                  const ComputeOptions& options) const {
  const int64_t inner = to_out.in_features();
  at::Tensor q, k, v;
  if (!context.defined() && qkv) {
    const at::Tensor stacked = (*qkv)(x);
    q = stacked.narrow(-1, 0, inner);
    k = stacked.narrow(-1, inner, inner);
    v = stacked.narrow(-1, 2 * inner, inner);
  } else {
    const at::Tensor& source = context.defined() ? context : x;
    q = to_q(x);
    k = to_k(source);
    v = to_v(source);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(inner / heads));
  return multi_head_attention(q, k, v, heads, scale, upcast, options.attention_max_scores,
                              options.fused_attention);
}

at::Tensor CrossAttention::operator()(const at::Tensor& x, const at::Tensor& context,
                                      const ComputeOptions& options, const at::Tensor& residual) const {
  const at::Tensor attended = attend(x, context, options);
  return residual.defined() ? to_out(attended, residual) : to_out(attended);
}

void CrossAttention::add_to(const at::Tensor& x, const at::Tensor& context, const ComputeOptions& options,
                            at::Tensor& accumulator) const {
  to_out.add_to(attend(x, context, options), accumulator);
}

void CrossAttention::pack() {
  if (qkv) {
    if (qkv->pack()) to_q = to_k = to_v = Linear();  // only the stacked product is used
  } else {
    to_q.pack();
    to_k.pack();
    to_v.pack();
  }
  to_out.pack();
}

BasicTransformerBlock BasicTransformerBlock::load(io::WeightLoader& weights, const std::string& prefix,
                                                  int64_t dim, const TransformerSettings& settings) {
  BasicTransformerBlock block;
  // diffusers builds the block's LayerNorms with its default norm_eps (1e-5) in the UNet.
  constexpr double kLayerNormEps = 1e-5;
  block.only_cross_attention = settings.only_cross_attention;
  block.norm1 = LayerNorm::load(weights, prefix + "norm1.", dim, kLayerNormEps);
  block.attn1 = CrossAttention::load(
      weights, prefix + "attn1.", dim,
      settings.only_cross_attention ? std::optional<int64_t>(settings.cross_attention_dim) : std::nullopt,
      settings.heads, settings.head_dim, settings.upcast_attention);
  block.norm2 = LayerNorm::load(weights, prefix + "norm2.", dim, kLayerNormEps);
  block.attn2 = CrossAttention::load(weights, prefix + "attn2.", dim, settings.cross_attention_dim,
                                     settings.heads, settings.head_dim, settings.upcast_attention);
  block.norm3 = LayerNorm::load(weights, prefix + "norm3.", dim, kLayerNormEps);
  const int64_t ff_inner = 4 * dim;
  block.ff_in = Linear::load(weights, prefix + "ff.net.0.proj.", dim, 2 * ff_inner, true);
  block.ff_out = Linear::load(weights, prefix + "ff.net.2.", ff_inner, dim, true);
  return block;
}

at::Tensor BasicTransformerBlock::operator()(const at::Tensor& tokens, const at::Tensor& context,
                                             const ComputeOptions& options) const {
  at::Tensor x =
      attn1(norm1(tokens), only_cross_attention ? context : at::Tensor(), options, tokens).contiguous();
  attn2.add_to(norm2(x), context, options, x);
  // Feed-forward, a chunk of token rows at a time (rows are independent). GEGLU: the first half
  // of the projection is the value, the second the (exact-GELU) gate.
  const int64_t dim = x.size(-1);
  const at::Tensor rows = x.view({-1, dim});
  const int64_t projected_width = ff_geglu ? ff_geglu->out_features : ff_in.out_features();
  const int64_t row_bytes = projected_width * static_cast<int64_t>(x.element_size());
  // Whole 32-row blocks of the packed products per chunk.
  const int64_t chunk =
      std::max<int64_t>(64, options.feed_forward_chunk_bytes / std::max<int64_t>(1, row_bytes) / 32 * 32);
  for (int64_t r0 = 0; r0 < rows.size(0); r0 += chunk) {
    at::Tensor part = rows.narrow(0, r0, std::min(chunk, rows.size(0) - r0));
    at::Tensor gated;
    if (ff_geglu && part.scalar_type() == at::kBFloat16) {
      gated = core::packed_linear(norm3(part), *ff_geglu);  // projection and GEGLU in one pass
    } else if (part.scalar_type() == at::kFloat || part.scalar_type() == at::kBFloat16) {
      gated = core::geglu(ff_in(norm3(part)));
    } else {
      const at::Tensor projected = ff_in(norm3(part));
      const int64_t inner = projected.size(-1) / 2;
      gated = at::gelu(projected.narrow(-1, inner, inner)).mul_(projected.narrow(-1, 0, inner));
    }
    ff_out.add_to(gated, part);
  }
  return x;
}

void BasicTransformerBlock::pack() {
  attn1.pack();
  attn2.pack();
  const int64_t projected = ff_in.weight.defined() ? ff_in.weight.size(0) : 0;
  if (!ff_geglu && ff_in.weight.defined() && ff_in.weight.scalar_type() == at::kBFloat16 &&
      projected % 32 == 0 && core::packed_gemm_supported(projected, ff_in.weight.size(1), 1)) {
    ff_geglu = core::pack_geglu_weight(ff_in.weight, ff_in.bias);
    ff_in = Linear();
  }
  ff_out.pack();
}

Transformer2D Transformer2D::load(io::WeightLoader& weights, const std::string& prefix, int64_t channels,
                                  const TransformerSettings& settings) {
  Transformer2D model;
  const int64_t inner = settings.heads * settings.head_dim;
  // Transformer2DModel's input norm has a fixed eps of 1e-6 (not the UNet's norm_eps).
  model.norm = GroupNorm::load(weights, prefix + "norm.", channels, settings.norm_num_groups, 1e-6);
  if (settings.use_linear_projection) {
    model.proj_in = Linear::load(weights, prefix + "proj_in.", channels, inner, true);
    model.proj_out = Linear::load(weights, prefix + "proj_out.", inner, channels, true);
  } else {
    model.proj_in = Linear::load_pointwise_conv(weights, prefix + "proj_in.", channels, inner);
    model.proj_out = Linear::load_pointwise_conv(weights, prefix + "proj_out.", inner, channels);
  }
  for (int64_t i = 0; i < settings.num_layers; ++i)
    model.blocks.push_back(BasicTransformerBlock::load(
        weights, prefix + "transformer_blocks." + std::to_string(i) + ".", inner, settings));
  return model;
}

at::Tensor Transformer2D::operator()(const at::Tensor& x, const at::Tensor& context,
                                     const ComputeOptions& options) const {
  const int64_t height = x.size(2), width = x.size(3);
  at::Tensor tokens = proj_in(image_to_tokens(norm(x)));
  for (const auto& block : blocks) tokens = block(tokens, context, options);
  return tokens_to_image(proj_out(tokens, image_to_tokens(x)), height, width, options.channels_last);
}

void Transformer2D::pack() {
  proj_in.pack();
  proj_out.pack();
  for (auto& block : blocks) block.pack();
}

SpatialSelfAttention SpatialSelfAttention::load(io::WeightLoader& weights, const std::string& prefix,
                                                int64_t channels, int64_t heads, int64_t groups, double eps) {
  SpatialSelfAttention attn;
  attn.group_norm = GroupNorm::load(weights, prefix + "group_norm.", channels, groups, eps);
  // Current diffusers names first, then the deprecated ones real SD VAE files still carry.
  const auto take = [&](const char* current, const char* deprecated) {
    std::string name = prefix + current + ".";
    if (!weights.contains(name + "weight") && weights.contains(prefix + deprecated + ".weight"))
      name = prefix + deprecated + ".";
    const auto shape = weights.shape_of(name + "weight");
    if (shape && shape->size() == 4) return Linear::load_pointwise_conv(weights, name, channels, channels);
    return Linear::load(weights, name, channels, channels, true);
  };
  attn.to_q = take("to_q", "query");
  attn.to_k = take("to_k", "key");
  attn.to_v = take("to_v", "value");
  attn.to_out = take("to_out.0", "proj_attn");
  attn.heads = heads;
  return attn;
}

at::Tensor SpatialSelfAttention::operator()(const at::Tensor& x, const ComputeOptions& options) const {
  const int64_t height = x.size(2), width = x.size(3);
  const at::Tensor tokens = image_to_tokens(group_norm(x));
  const int64_t inner = to_q.out_features();
  const double scale = 1.0 / std::sqrt(static_cast<double>(inner / heads));
  const at::Tensor attended =
      multi_head_attention(to_q(tokens), to_k(tokens), to_v(tokens), heads, scale,
                           /*upcast=*/false, options.attention_max_scores, options.fused_attention);
  at::Tensor out =
      tokens_to_image(to_out(attended, image_to_tokens(x)), height, width, options.channels_last);
  if (rescale_output_factor != 1.0) out.div_(rescale_output_factor);
  return out;
}

void SpatialSelfAttention::pack() {
  to_q.pack();
  to_k.pack();
  to_v.pack();
  to_out.pack();
}

// ---------------------------------------------------------------------------------------------

at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                              double downscale_freq_shift, double scale, double max_period) {
  // Same operations in the same order and dtype as get_timestep_embedding: fractional and large
  // timesteps make sin/cos sensitive to the last bit of the frequencies.
  const int64_t half = dim / 2;
  at::Tensor exponent = at::arange(0, half, at::TensorOptions().dtype(at::kFloat)) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  at::Tensor emb = timesteps.reshape({-1, 1}).to(at::kFloat) * at::exp(exponent).unsqueeze(0);
  if (scale != 1.0) emb = emb * scale;
  emb = at::cat({at::sin(emb), at::cos(emb)}, -1);
  if (flip_sin_to_cos) emb = at::cat({emb.narrow(1, half, half), emb.narrow(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

}  // namespace voken::diffusion
