// Fused multi-head attention for bfloat16 on CPUs with AMX-BF16 tiles (Sapphire Rapids and later).
//
// Why: a 64x64 latent gives 4096-token self-attention. Materialised, its scores are 168M values
// per layer at batch 2 x 5 heads; the Q K^T product (reduction depth 64) is bound by writing them,
// and softmax and the P V product read them again. Here each 16-query block streams over the keys
// 32 at a time: Q K^T into two 16x16 float32 tiles, an online softmax in AVX-512 registers, and
// P V accumulated in tiles that stay resident for the whole row block, so the score matrix never
// leaves the core. Scores and sums are float32; probabilities enter P V as bfloat16, as in
// diffusers' bfloat16 attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace voken::diffusion {

// Heads of up to this many dimensions take the fused kernel.
constexpr int64_t kFusedAttentionMaxHeadDim = 64;

// softmax(q k^T * scale) v per head. q: [B, Nq, heads*D], k and v: [B, Nk, heads*D], bfloat16,
// unit stride in the last dimension (rows may be strided, e.g. views of a fused qkv product);
// D <= kFusedAttentionMaxHeadDim. Returns [B, Nq, heads*D] bfloat16. Throws ArgumentError when
// the CPU lacks AMX or the arguments do not fit.
at::Tensor fused_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                double scale);

}  // namespace voken::diffusion
