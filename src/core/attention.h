// Fused multi-head attention for bfloat16 activations: softmax(q k^T * scale) v per head, for the
// UNet, the VAE, the ViT, the Q-Former and the mapper.
//
// Why: a 64x64 latent gives 4096-token self-attention. Materialised, its scores are 168M values
// per layer at batch 2 x 5 heads; the Q K^T product (reduction depth 64) is bound by writing them,
// and softmax and the P V product read them again. A fused kernel streams each query block over
// the keys in chunks (online softmax), so the score matrix never leaves the core.
//
// Two numerics, as the upstream code computes them (each model's parity suite needs its own):
//  - the vision encoder's (amx_attention): q is scaled and rounded to bf16 first (as `q * scale`
//    would be), scores and softmax are float32, probabilities are rounded to bf16 for the product
//    with v, the output is rounded once;
//  - diffusers' (fused_attention_bf16): scores are scaled in float32, probabilities enter P V as
//    bf16.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "core/cpu.h"

namespace voken::core {

// The operands of the attention kernels: q [B, Tq, heads * D], k and v [B, Tk, heads * D], unit
// stride in the last dimension, rows possibly strided (e.g. views of a fused qkv product).
struct AttentionOperands {
  const uint16_t *q = nullptr, *k = nullptr, *v = nullptr;  // bfloat16 bits
  int64_t batch = 0, heads = 0, head_dim = 0, queries = 0, keys = 0;
  int64_t q_batch = 0, q_row = 0, k_batch = 0, k_row = 0, v_batch = 0, v_row = 0;  // strides (elements)
};
// Checks q, k and v against that layout (3-D bfloat16 CPU tensors, equal widths divisible by
// `heads`, equal batches, k and v of equal length, at least one key) and describes them; throws
// ArgumentError naming `what` and the shapes otherwise.
AttentionOperands attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     int64_t heads, const std::string& what);

// The vision encoder's numerics (see above). Returns [B, Tq, heads * D] bf16. Each 32-query block
// keeps all its scores in a buffer, so the key count is bounded.
constexpr int64_t kAmxAttentionMaxHeadDim = 256;
constexpr int64_t kAmxAttentionMaxKeys = 4096;
bool amx_attention_supported(int64_t head_dim, int64_t keys);
at::Tensor amx_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                         double scale);

// diffusers' numerics (see above), any number of keys. Heads of up to this many dimensions.
constexpr int64_t kFusedAttentionMaxHeadDim = 64;
// Returns [B, Nq, heads*D] bfloat16. Throws ArgumentError when the CPU lacks AMX or the arguments
// do not fit.
at::Tensor fused_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale);

}  // namespace voken::core
